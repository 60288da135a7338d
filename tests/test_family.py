"""Warm start from sibling deployments of one model (B10_TRANSFER_CACHE_FAMILY, b10_transfer/family.py).

Two deployments share the org store, each with its own scope (B10FS_CACHE_DIR under <volume>/model). The second's
first replica must start with FX/AOT hits for everything the first compiled; off by default; hostile siblings cost
misses at most."""
from __future__ import annotations

import os
from pathlib import Path

import msgpack
import pytest

from b10_transfer import OperationStatus, core
from b10_transfer.demo import spawn_replica
from b10_transfer.family import SIBLING_MANIFEST_BYTES
from cas import BlobStore, Scope, layout, save_tree
from cas.manifest import Entry, Manifest
from cas.recent import note_saver
from cas.roots import write_root
from conftest import b10_environ, child_environ

from cas_helpers import write_tree


def _volume(tmp_path: Path) -> Path:
    volume = tmp_path / "volume"
    (volume / "model").mkdir(parents=True)
    (volume / "org").mkdir()
    return volume


def _env(volume: Path, local: Path, deployment: str, family: str | None, *, child: bool = True) -> dict[str, str]:
    env = child_environ(volume, local) if child else b10_environ(volume, local)
    env["B10FS_CACHE_DIR"] = str(volume / "model" / deployment)
    env.pop("B10_TRANSFER_CACHE_FAMILY", None)
    if family is not None:
        env["B10_TRANSFER_CACHE_FAMILY"] = family
    return env


@pytest.mark.slow
def test_new_deployment_of_a_known_model_starts_warm(tmp_path):
    volume = _volume(tmp_path)
    first = spawn_replica(_env(volume, tmp_path / "a" / "inductor", "dep-a", "llama"), [2], load=True, save=True)
    assert first["save"] == "SUCCESS", first["log"]
    assert first["counters"]["fxgraph_cache_miss"] >= 1

    off = spawn_replica(_env(volume, tmp_path / "b0" / "inductor", "dep-b0", None), [2], load=True, save=False)
    assert off["load"] == "DOES_NOT_EXIST", off["log"]  # off by default: no sibling is read
    assert "source=" not in off["log"]

    second = spawn_replica(_env(volume, tmp_path / "b" / "inductor", "dep-b", "llama"), [2], load=True, save=True)
    c = second["counters"]
    assert second["load"] == "SUCCESS", second["log"]
    assert "source=family:llama" in second["log"]
    assert c["fxgraph_cache_hit"] >= 1 and c["fxgraph_cache_miss"] == 0
    assert c["autograd_cache_hit"] >= 1 and c["autograd_cache_miss"] == 0
    assert second["max_abs_err"] < 1e-4
    # Its first save wrote its own manifest: the next replica of dep-b needs no sibling.
    assert second["save"] == "SUCCESS", second["log"]
    scope_b = Scope(volume / "model" / "dep-b")
    assert scope_b.env_keys()


def _sibling(store: BlobStore, volume: Path, name: str, env_key: str, manifest_bytes: bytes, family: str) -> str:
    scope = Scope(volume / "model" / name, create=True)
    manifest_id = store.put_bytes(manifest_bytes)
    write_root(store, scope.scope_id, env_key, manifest_id, scope.root)
    note_saver(store, env_key, scope.scope_id, family)
    return scope.scope_id


@pytest.mark.parametrize("hostile", ["huge-manifest", "wrong-locations", "other-environment", "garbage-root"])
def test_hostile_family_member_costs_misses_only(tmp_path, monkeypatch, hostile):
    volume = _volume(tmp_path)
    local = tmp_path / "local" / "inductor"
    for k, v in _env(volume, local, "dep-new", "fam", child=False).items():
        monkeypatch.setenv(k, v)
    key = core.key_for(None)
    store = BlobStore(volume / "org" / "b10_cas")
    # A good sibling first, so the hostile one's effects are seen next to real restores.
    good_src = tmp_path / "good-src"
    write_tree(good_src, {"good/a.py": b"print('a')\n" * 20})
    (volume / "model" / "dep-good").mkdir()
    save_tree(good_src, store, Scope(volume / "model" / "dep-good", create=True), key, family="fam")
    outside = tmp_path / "outside"
    outside.mkdir()
    if hostile == "huge-manifest":
        entries = {f"junk/{i:07d}": Entry("0" * 64, 1, 0o644) for i in range(360_000)}
        data = Manifest(key, {}, entries).dumps()
        assert len(Manifest(key, {}, entries).dumps_plain()) > SIBLING_MANIFEST_BYTES
        _sibling(store, volume, "dep-evil", key, data, "fam")
    elif hostile == "wrong-locations":
        real = Scope(volume / "model" / "dep-good").read_manifest(key)
        e = real.entries["good/a.py"]
        bad = {"evil/x.py": Entry(e.blob_id, e.size, 0o644, e.pack, e.offset + 1),
               "evil/y.py": Entry("1" * 64, 10, 0o644, e.pack, 0)}
        _sibling(store, volume, "dep-evil", key, Manifest(key, {}, bad).dumps(), "fam")
    elif hostile == "other-environment":
        _sibling(store, volume, "dep-evil", key, Manifest("other-env", {}, {"evil/z": Entry("2" * 64, 1, 0o644)}).dumps(),
                 "fam")
    elif hostile == "garbage-root":
        sid = _sibling(store, volume, "dep-evil", key, Manifest(key, {}, {}).dumps(), "fam")
        (volume / "org" / "b10_cas" / layout.root(sid, key)).write_bytes(msgpack.packb({"format": 1, "x": 2}))
    status, stats = core.load()
    assert status is OperationStatus.SUCCESS, stats.reason
    assert (local / "good" / "a.py").read_bytes() == b"print('a')\n" * 20
    assert not (local / "evil").exists() or all(
        (local / "evil" / n).read_bytes() != b"" for n in os.listdir(local / "evil"))
    assert os.listdir(outside) == []
    if hostile == "wrong-locations":
        assert stats.misses == 2  # verified and refused, never written
        assert not (local / "evil").exists()
    else:
        assert stats.misses == 0 and not (local / "junk").exists()


def test_family_name_with_odd_characters_is_an_error(tmp_path, monkeypatch):
    volume = _volume(tmp_path)
    for k, v in _env(volume, tmp_path / "l" / "inductor", "dep", "../evil", child=False).items():
        monkeypatch.setenv(k, v)
    status, stats = core.load()
    assert status is OperationStatus.ERROR
    assert "B10_TRANSFER_CACHE_FAMILY" in stats.reason
