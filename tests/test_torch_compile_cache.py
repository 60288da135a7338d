"""Real torch.compile round trips on the CPU, each replica a fresh Python process (no in-memory caches).

Replica A compiles batch size 2 on an empty stand-in volume and saves; every test starts from a copy of that volume.
Inductor's own counters decide hit or miss: `fxgraph_cache_hit/miss` and `autograd_cache_hit/miss`.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from b10_transfer import OperationStatus, core
from b10_transfer.config import read_settings
from b10_transfer.demo import spawn_replica
from cas import BlobStore, Scope
from conftest import b10_environ, child_environ

pytestmark = pytest.mark.slow

SHAPE_1, SHAPE_2 = 2, 8
# Restored kernels must compute what eager computes (float32 on the CPU: differences are rounding only).
MAX_ABS_ERR = 1e-4


def replica(volume: Path, local: Path, shapes, *, load=True, save=True) -> dict:
    return spawn_replica(child_environ(volume, local), shapes, load=load, save=save)


@pytest.fixture(scope="session")
def replica_a(tmp_path_factory):
    """Replica A on an empty volume: compiles SHAPE_1 and saves. Returns (volume, A's local cache, A's result)."""
    root = tmp_path_factory.mktemp("replica-a")
    volume = root / "volume"
    (volume / "model").mkdir(parents=True)
    (volume / "org").mkdir()
    local = root / "local" / "inductor"
    result = replica(volume, local, [SHAPE_1])
    assert result["load"] == "DOES_NOT_EXIST", result["log"]
    assert result["save"] == "SUCCESS", result["log"]
    assert result["counters"]["fxgraph_cache_miss"] >= 1  # A really compiled
    return volume, local, result


@pytest.fixture
def volume_after_a(replica_a, tmp_path) -> Path:
    """A private copy of the volume as A left it."""
    copy = tmp_path / "volume"
    shutil.copytree(replica_a[0], copy)
    return copy


def test_round_trip_hits_only(volume_after_a, tmp_path):
    r = replica(volume_after_a, tmp_path / "b" / "inductor", [SHAPE_1], save=False)
    c = r["counters"]
    assert r["load"] == "SUCCESS", r["log"]
    assert c["fxgraph_cache_hit"] >= 1 and c["autograd_cache_hit"] >= 1
    assert c["fxgraph_cache_miss"] == 0 and c["autograd_cache_miss"] == 0
    assert r["max_abs_err"] < MAX_ABS_ERR


def test_three_replicas_new_shape_reaches_the_store(volume_after_a, tmp_path, record_property):
    """B adds a shape to A's cache and saves it (the peer skips that save); C then has hits only for both."""
    b = replica(volume_after_a, tmp_path / "b" / "inductor", [SHAPE_1, SHAPE_2])
    assert b["load"] == "SUCCESS", b["log"]
    assert b["counters"]["fxgraph_cache_hit"] >= 1  # SHAPE_1 from A
    assert b["counters"]["fxgraph_cache_miss"] >= 1  # SHAPE_2 compiled by B
    assert b["save"] == "SUCCESS", b["log"]

    c = replica(volume_after_a, tmp_path / "c" / "inductor", [SHAPE_1, SHAPE_2])
    assert c["load"] == "SUCCESS", c["log"]
    cc = c["counters"]
    assert cc["fxgraph_cache_miss"] == 0 and cc["autograd_cache_miss"] == 0
    graphs_of_b = b["counters"]["fxgraph_cache_hit"] + b["counters"]["fxgraph_cache_miss"]
    assert cc["fxgraph_cache_hit"] == graphs_of_b
    assert cc["autograd_cache_hit"] == b["counters"]["autograd_cache_hit"] + b["counters"]["autograd_cache_miss"]
    assert c["save"] == "SKIPPED"  # C compiled nothing new
    assert c["max_abs_err"] < MAX_ABS_ERR
    record_property("three_replicas", {"B": b["counters"], "C": cc})
    print(f"\nthree replicas: B counters {b['counters']}, C counters {cc}")


@pytest.mark.parametrize("stored", ["pack", "loose"])
def test_corrupt_blob_loads_the_rest_and_that_graph_recompiles(volume_after_a, tmp_path, monkeypatch, stored):
    """A corrupt stored blob costs exactly the entries stored in it (they recompile), never a crash or a wrong result.
    A CPU cache is a few hundred KB: every file is in one pack ("pack": all are lost). With "loose" the graph is first
    re-stored as its own blob (as a format 1 manifest or a file above PACK_FILE_MAX has it): only it is lost."""
    from cas import Entry, limits
    from cas.pack import extract

    env = b10_environ(volume_after_a, tmp_path / "d" / "inductor")
    s = read_settings(env)
    key = core.key_for()
    scope = Scope(s.b10fs_cache_dir)
    store = BlobStore(s.store_root(), create=False)
    manifest = scope.read_manifest(key)
    graphs = sorted(p for p in manifest.entries if p.startswith("fxgraph/"))
    assert graphs, sorted(manifest.entries)
    victim = graphs[0]
    e = manifest.entries[victim]
    if stored == "loose":
        assert e.pack is not None
        content = extract(store.get_bytes(e.pack, limits.MAX_PACK_BYTES), e.blob_id, e.size, e.offset)
        assert store.put_bytes(content) == e.blob_id
        manifest.entries[victim] = e = Entry(e.blob_id, e.size, e.mode)
        scope.write_manifest(manifest.dumps(), key)
    lost = {p for p, x in manifest.entries.items() if x.stored_id == e.stored_id}
    assert lost == ({victim} if stored == "loose" else set(manifest.entries))
    blob = Path(store.blob_path(e.stored_id))
    data = bytearray(blob.read_bytes())
    data[len(data) // 2] ^= 0xFF
    blob.write_bytes(bytes(data))

    status, stats = core.load(settings=s)
    # Nothing restorable is an ERROR (the model still starts and compiles); anything restored is a SUCCESS.
    assert status is (OperationStatus.SUCCESS if lost != set(manifest.entries) else OperationStatus.ERROR)
    assert stats.misses == len(lost) and stats.corrupt == len(lost)
    assert stats.files_transferred == len(manifest.entries) - len(lost)
    for p in manifest.entries:
        assert (s.torch_cache_dir / p).exists() == (p not in lost), p

    r = replica(volume_after_a, s.torch_cache_dir, [SHAPE_1], load=False, save=False)
    # The corrupt graph is compiled again (Inductor counts the AOTAutograd entry's failed lookup as a miss too).
    assert r["counters"]["fxgraph_cache_miss"] >= 1, r["counters"]
    assert r["max_abs_err"] < MAX_ABS_ERR
    # Inductor wrote the graph back under the same key directory (the entry's file name is its own content hash).
    assert any((s.torch_cache_dir / victim).parent.iterdir())


def test_transient_files_of_a_real_cache_are_not_saved(replica_a):
    volume, local, _ = replica_a
    transient = [p for p in local.rglob("*") if p.is_file() and (p.suffix == ".lock" or "locks" in p.parts)]
    assert transient  # Inductor did leave lock files behind
    s = read_settings(b10_environ(volume, local))
    manifest = Scope(s.b10fs_cache_dir).read_manifest(core.key_for())
    assert manifest.entries
    for path in manifest.entries:
        parts = path.split("/")
        assert "locks" not in parts and not parts[-1].endswith((".lock", ".tmp")) and not parts[-1].startswith(".")
