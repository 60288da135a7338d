"""Packs (FORMAT §2): small files stored as slices of one blob, verified per file, deduplicated across deployments."""
from __future__ import annotations

import os
import random

import msgpack
import pytest
import zstandard

from cas import limits, load_tree, pack, save_tree
from cas.errors import ManifestError
from cas.manifest import loads
from cas.tree import scan

from cas_helpers import ENV_KEY, blob_id, entry_bytes, manifest_entries, open_store, read_tree, write_tree

BIG = pack.PACK_FILE_MAX + 1


def _tree(rng: random.Random, n_small: int = 40) -> dict[str, bytes]:
    files = {f"triton/k{i:03d}/kernel.py": (f"def k{i}(x):\n    return x * {i}\n" * rng.randint(1, 200)).encode()
             for i in range(n_small)}
    files["fxgraph/big.bin"] = rng.randbytes(BIG)  # one file past the pack limit: stored as its own blob
    files["empty"] = b""
    return files


def _blob_count(store) -> int:
    return sum(1 for _ in store.iter_blobs())


def test_small_files_go_into_a_pack_large_ones_stay_loose(tmp_path):
    store, scope = open_store(tmp_path)
    files = _tree(random.Random(1))
    write_tree(tmp_path / "src", files)
    res = save_tree(tmp_path / "src", store, scope, ENV_KEY)
    entries = manifest_entries(scope)

    assert res.packs_written == 1 and res.blobs_uploaded == len(files)
    assert entries["fxgraph/big.bin"].pack is None
    packed = {p for p, e in entries.items() if e.pack is not None}
    assert packed == set(files) - {"fxgraph/big.bin"}
    assert len({entries[p].pack for p in packed}) == 1
    # Blobs in the store: one pack, one large file, the manifest's own copy.
    assert _blob_count(store) == 3
    for path, entry in entries.items():
        assert entry.blob_id == blob_id(files[path])
        assert entry_bytes(store, entry) == files[path]

    res = load_tree(tmp_path / "dst", store, scope, ENV_KEY)
    assert res.restored == len(files) and not res.misses
    assert {p: d for p, (d, _) in read_tree(tmp_path / "dst").items()} == files


def test_packs_are_bounded_and_files_never_straddle_two(tmp_path):
    store, scope = open_store(tmp_path)
    rng = random.Random(2)
    # ~20 MiB of incompressible small files: at least three packs of at most MAX_PACK_BYTES each.
    files = {f"d{i // 50}/f{i}": rng.randbytes(rng.randint(200_000, pack.PACK_FILE_MAX)) for i in range(36)}
    write_tree(tmp_path / "src", files)
    res = save_tree(tmp_path / "src", store, scope, ENV_KEY)
    entries = manifest_entries(scope)
    packs = {e.pack for e in entries.values()}
    assert res.packs_written == len(packs) >= 3
    for pack_id in packs:
        content = store.get_bytes(pack_id, limits.MAX_PACK_BYTES)
        assert len(content) <= limits.MAX_PACK_BYTES
        members = sorted((e.offset, e.size) for e in entries.values() if e.pack == pack_id)
        # Members tile the pack exactly: nothing unaccounted for, nothing overlapping.
        assert sum(size for _, size in members) == len(content)
        assert all(a[0] + a[1] == b[0] for a, b in zip(members, members[1:]))
    assert load_tree(tmp_path / "dst", store, scope, ENV_KEY).restored == len(files)


def test_second_deployment_reuses_the_first_ones_packs(tmp_path):
    files = _tree(random.Random(3))
    write_tree(tmp_path / "src", files)
    store, scope_a = open_store(tmp_path)
    save_tree(tmp_path / "src", store, scope_a, ENV_KEY)
    before = _blob_count(store)

    from cas import Scope

    scope_b = Scope(tmp_path / "scope-b", create=True)
    res = save_tree(tmp_path / "src", store, scope_b, ENV_KEY)
    assert res.packs_written == 0 and res.blobs_uploaded == 0
    assert res.blobs_present == len({blob_id(d) for d in files.values()})
    assert _blob_count(store) == before + 1  # only deployment B's manifest blob is new
    a, b = manifest_entries(scope_a), manifest_entries(scope_b)
    assert {p: (e.pack, e.offset) for p, e in a.items()} == {p: (e.pack, e.offset) for p, e in b.items()}
    assert load_tree(tmp_path / "dst", store, scope_b, ENV_KEY).restored == len(files)


def test_peer_pack_gone_means_pack_again(tmp_path):
    files = _tree(random.Random(4), n_small=10)
    write_tree(tmp_path / "src", files)
    store, scope_a = open_store(tmp_path)
    save_tree(tmp_path / "src", store, scope_a, ENV_KEY)
    victim = next(e for e in manifest_entries(scope_a).values() if e.pack)
    os.unlink(store.blob_path(victim.pack))  # collected (or lost) since A's save

    from cas import Scope

    scope_b = Scope(tmp_path / "scope-b", create=True)
    res = save_tree(tmp_path / "src", store, scope_b, ENV_KEY)
    assert res.packs_written == 1 and res.blobs_uploaded == len(files) - 1  # the large file was still there
    # Packing is deterministic (path order): the same files make the same pack, written again under its old id.
    assert os.path.exists(store.blob_path(victim.pack))
    res = load_tree(tmp_path / "dst", store, scope_b, ENV_KEY)
    assert res.restored == len(files) and not res.misses


def test_wrong_location_is_a_miss_and_the_audit_repairs_it(tmp_path):
    """A location is a claim: an entry whose slice does not hash to it is a miss (the rest of the pack loads), the
    loader asks for an audit, and the next save re-packs so that every file loads again."""
    store, scope = open_store(tmp_path)
    files = _tree(random.Random(5), n_small=12)
    write_tree(tmp_path / "src", files)
    save_tree(tmp_path / "src", store, scope, ENV_KEY)
    manifest = scope.read_manifest(ENV_KEY)
    victim_path = "triton/k003/kernel.py"
    victim = manifest.entries[victim_path]
    manifest.entries[victim_path] = victim.located(victim.pack, victim.offset + 1)
    scope.write_manifest(manifest.dumps(), ENV_KEY)

    from cas.check import check

    found = check(store, scope=scope, read_data=True).problems
    assert [(p.kind, p.detail.split(": ")[1]) for p in found if p.kind == "misplaced-entry"] == [
        ("misplaced-entry", victim_path)]

    res = load_tree(tmp_path / "dst", store, scope, ENV_KEY)
    assert [p for p, _ in res.misses] == [victim_path] and res.corrupt == 1
    assert res.restored == len(files) - 1
    assert scope.audit_requested(ENV_KEY)
    assert os.path.exists(store.blob_path(victim.pack))  # the pack itself is sound: not quarantined

    save_tree(tmp_path / "src", store, scope, ENV_KEY)
    assert not scope.audit_requested(ENV_KEY)
    assert entry_bytes(store, manifest_entries(scope)[victim_path]) == files[victim_path]
    res = load_tree(tmp_path / "dst2", store, scope, ENV_KEY)
    assert res.restored == len(files) and not res.misses


def test_pack_claiming_more_than_the_limit_is_refused_before_decoding(tmp_path):
    store, scope = open_store(tmp_path)
    files = _tree(random.Random(6), n_small=5)
    write_tree(tmp_path / "src", files)
    save_tree(tmp_path / "src", store, scope, ENV_KEY)
    victim = next(e for e in manifest_entries(scope).values() if e.pack)
    bomb = zstandard.ZstdCompressor(write_content_size=True).compress(bytes(limits.MAX_PACK_BYTES + 1))
    with open(store.blob_path(victim.pack), "wb") as fh:
        fh.write(bomb)

    res = load_tree(tmp_path / "dst", store, scope, ENV_KEY)
    packed = {p for p, e in manifest_entries(scope).items() if e.pack == victim.pack}
    assert {p for p, _ in res.misses} == packed
    assert res.restored == len(files) - len(packed)
    assert not os.path.exists(store.blob_path(victim.pack))  # quarantined
    assert os.listdir(os.path.join(store.root, "quarantine"))


def test_a_file_that_changed_since_hashing_is_left_out_of_the_pack(tmp_path):
    store, _ = open_store(tmp_path)
    write_tree(tmp_path / "src", {"a": b"first", "b": b"second"})
    files = {f.rel: f for f in scan(tmp_path / "src")}
    group = [(blob_id(b"first"), files["a"]), (blob_id(b"second"), files["b"])]
    (tmp_path / "src" / "a").write_bytes(b"FIRST")  # same size, other content
    written = pack.write(store, group)
    assert written.changed == [blob_id(b"first")]
    assert written.offsets == {blob_id(b"second"): 0}
    assert store.get_bytes(written.pack_id, limits.MAX_PACK_BYTES) == b"second"


def _manifest_bytes(entry: list, version: int = 2) -> bytes:
    return msgpack.packb({"format": version, "env_key": ENV_KEY, "env": {}, "created": 1.0, "updated": 1.0,
                          "entries": {"a": entry}}, use_bin_type=True)


@pytest.mark.parametrize("entry, version, why", [
    ([b"\1" * 32, 10, 0o644, b"\2" * 32, limits.MAX_PACK_BYTES - 9], 2, "outside any pack"),
    ([b"\1" * 32, 10, 0o644, b"\2" * 32, -1], 2, "outside any pack"),
    ([b"\1" * 32, 10, 0o644, b"\2" * 31, 0], 2, "pack id"),
    ([b"\1" * 32, 10, 0o644, "x" * 32, 0], 2, "pack id"),
    ([b"\1" * 32, 10, 0o644, b"\2" * 32, True], 2, "outside any pack"),
    ([b"\1" * 32, 10, 0o644, b"\2" * 32], 2, "is not"),
    ([b"\1" * 32, 10, 0o644, b"\2" * 32, 0], 1, "is not"),  # version 1 has no locations
])
def test_bad_pack_locations_reject_the_manifest(entry, version, why):
    with pytest.raises(ManifestError, match=why):
        loads(_manifest_bytes(entry, version))


def test_version_1_manifests_are_still_read():
    m = loads(_manifest_bytes([b"\1" * 32, 10, 0o644], version=1))
    assert m.entries["a"].pack is None and m.entries["a"].stored_id == (b"\1" * 32).hex()
    last = loads(_manifest_bytes([b"\1" * 32, 10, 0o644, b"\2" * 32, limits.MAX_PACK_BYTES - 10]))
    assert last.entries["a"].stored_id == (b"\2" * 32).hex()


def test_manifest_file_is_one_bounded_zstd_frame():
    """FORMAT §3: written as a zstd frame of the msgpack map; a plain map is read too; a frame with bytes after it,
    cut short, without a recorded size or claiming more than the manifest limit is a corrupt manifest."""
    from cas.manifest import ZSTD_MAGIC, Entry, Manifest

    m = Manifest(ENV_KEY, {}, {f"p{i}": Entry(blob_id(b"%d" % i), i, 0o644) for i in range(100)}, 1.0, 2.0)
    data = m.dumps()
    assert data[:4] == ZSTD_MAGIC and len(data) < len(m.dumps_plain())
    assert loads(data).entries == loads(m.dumps_plain()).entries == m.entries
    no_size = zstandard.ZstdCompressor(write_content_size=False).compress(m.dumps_plain())
    too_big = zstandard.ZstdCompressor(write_content_size=True).compress(bytes(limits.MAX_MANIFEST_BYTES + 1))
    nested = zstandard.ZstdCompressor(write_content_size=True).compress(data)
    for bad, why in [(data + b"\0", "after it"), (data[:-3], "truncated"), (no_size, "size"),
                     (too_big, "over the"), (nested, "one msgpack")]:
        with pytest.raises(ManifestError, match=why):
            loads(bad)
