"""Hostile or broken input from the shared volume (issue 2, point 4; FORMAT §2, §3): a bad blob is a quarantined miss,
a bad manifest is a ManifestError naming the file, unsafe entry paths reject the whole manifest, a planted symlink
never redirects a write, an unusable store root is a typed error."""
from __future__ import annotations

import os
import random
import subprocess
import sys
import textwrap

import msgpack
import pytest
import zstandard

from cas import (BlobCorrupt, BlobMissing, BlobStore, Entry, Manifest, ManifestError, Scope, StoreReadOnly,
                 StoreUnavailable, load_tree, save_tree)
from cas import limits, pack
from cas.errors import FormatError
from cas.manifest import loads

from cas_helpers import ENV_KEY, blob_id, entry_bytes, manifest_entries, open_store, read_tree, sharing, temp_files, \
    verify_all_blobs, write_tree

# Four small files, stored together in one pack (FORMAT §2), and one file above cas.pack.PACK_FILE_MAX, stored as its
# own loose blob: the blob tests damage either kind of stored blob.
BIG = "c/big.bin"
FILES = {"a/one.py": b"one " * 500, "a/two.py": b"two " * 300, "b/three.bin": bytes(range(256)) * 20,
         "four": b"4" * 1000, BIG: random.Random(7).randbytes(pack.PACK_FILE_MAX + 5000)}
SMALL = sorted(p for p in FILES if p != BIG)
# A blob test damages the pack of one of the small files, or BIG's own blob.
VICTIM_KINDS = ["pack", "loose"]


def victim_path(kind: str, small: str) -> str:
    return small if kind == "pack" else BIG


@pytest.fixture
def saved(tmp_path):
    store, scope = open_store(tmp_path)
    write_tree(tmp_path / "src", FILES)
    save_tree(tmp_path / "src", store, scope, ENV_KEY)
    entries = manifest_entries(scope)
    assert entries[BIG].pack is None
    assert len({entries[p].stored_id for p in SMALL}) == 1 and entries[SMALL[0]].pack is not None
    return store, scope


def quarantined(store) -> list[str]:
    return sorted(os.listdir(os.path.join(store.root, "quarantine")))


def _stored_content(store, entry) -> bytes:
    """The uncompressed content of the blob the store keeps for `entry` (its pack, or its own blob)."""
    return entry_bytes(store, entry) if entry.pack is None else store.get_bytes(entry.pack, limits.MAX_PACK_BYTES)


# -- blobs -----------------------------------------------------------------------------------------------------------
def _other_frame(size):
    return zstandard.ZstdCompressor(write_content_size=True).compress(b"X" * size)


# (stored frame, its uncompressed content) -> the bytes planted instead
CORRUPTIONS = {
    "other-content-same-size": lambda good, content: _other_frame(len(content)),
    "bit-flip": lambda good, content: good[:-5] + bytes([good[-5] ^ 0x40]) + good[-4:],
    "truncated": lambda good, content: good[: len(good) // 2],
    "garbage": lambda good, content: os.urandom(200),
    "empty": lambda good, content: b"",
    "wrong-size-claim": lambda good, content: zstandard.ZstdCompressor(write_content_size=True).compress(content[:-4]),
    "no-size-in-frame": lambda good, content: zstandard.ZstdCompressor(write_content_size=False).compress(content),
}


@pytest.mark.parametrize("victim", VICTIM_KINDS)
@pytest.mark.parametrize("kind", sorted(CORRUPTIONS))
def test_corrupt_blob_is_a_quarantined_miss(tmp_path, saved, kind, victim):
    store, scope = saved
    entries = manifest_entries(scope)
    entry = entries[victim_path(victim, "a/one.py")]
    lost = sharing(entries, entry)
    assert lost == (set(SMALL) if victim == "pack" else {BIG})
    path = store.blob_path(entry.stored_id)
    content = _stored_content(store, entry)
    with open(path, "rb") as fh:
        good = fh.read()
    with open(path, "wb") as fh:
        fh.write(CORRUPTIONS[kind](good, content))
    with pytest.raises(BlobCorrupt):
        store.verify(entry.stored_id)  # verify reports without changing the store
    assert os.path.exists(path)

    dst = tmp_path / "dst"
    res = load_tree(dst, store, scope, ENV_KEY)
    assert sorted(p for p, _ in res.misses) == sorted(lost)
    assert res.corrupt == len(lost)
    assert res.restored == len(FILES) - len(lost)
    for p in lost:
        assert not (dst / p).exists()  # never written to its target
    assert temp_files(dst) == []
    got = read_tree(dst)
    assert {r: d for r, (d, _) in got.items()} == {r: d for r, d in FILES.items() if r not in lost}
    assert not os.path.exists(path)  # moved out of blobs/
    q = quarantined(store)
    assert len(q) == 1 and q[0].startswith(entry.stored_id + ".")


@pytest.mark.parametrize("victim", VICTIM_KINDS)
def test_quarantined_blob_is_uploaded_again_by_next_save(tmp_path, saved, victim):
    store, scope = saved
    entries = manifest_entries(scope)
    entry = entries[victim_path(victim, "a/one.py")]
    with open(store.blob_path(entry.stored_id), "wb") as fh:
        fh.write(b"garbage")
    assert load_tree(tmp_path / "dst", store, scope, ENV_KEY).corrupt == len(sharing(entries, entry))
    save_tree(tmp_path / "src", store, scope, ENV_KEY, use_index=False)  # a replica that has the file saves
    res = load_tree(tmp_path / "dst2", store, scope, ENV_KEY)
    assert res.misses == []
    assert {r: d for r, (d, _) in read_tree(tmp_path / "dst2").items()} == FILES


@pytest.mark.parametrize("victim", VICTIM_KINDS)
def test_corrupt_blob_repeated_quarantine_keeps_both(tmp_path, saved, victim):
    store, scope = saved
    entries = manifest_entries(scope)
    entry = entries[victim_path(victim, "four")]
    for i in range(2):
        with open(store.blob_path(entry.stored_id), "wb") as fh:
            fh.write(b"garbage %d" % i)
        res = load_tree(tmp_path / f"dst{i}", store, scope, ENV_KEY)
        assert res.corrupt == len(sharing(entries, entry))
    assert len(quarantined(store)) == 2


@pytest.mark.parametrize("victim", VICTIM_KINDS)
def test_missing_blob_is_a_miss(tmp_path, saved, victim):
    store, scope = saved
    entries = manifest_entries(scope)
    entry = entries[victim_path(victim, "b/three.bin")]
    lost = sharing(entries, entry)
    os.unlink(store.blob_path(entry.stored_id))
    res = load_tree(tmp_path / "dst", store, scope, ENV_KEY)
    assert sorted(p for p, _ in res.misses) == sorted(lost) and res.corrupt == 0
    assert res.missing == len(lost)
    assert res.restored == len(FILES) - len(lost)
    with pytest.raises(BlobMissing):
        store.verify(entry.stored_id)


@pytest.mark.parametrize("victim", VICTIM_KINDS)
def test_blob_in_trash_is_brought_back(tmp_path, saved, victim):
    store, scope = saved
    entry = manifest_entries(scope)[victim_path(victim, "b/three.bin")]
    os.makedirs(os.path.dirname(store.trash_path(entry.stored_id)), exist_ok=True)  # trash fan-out is lazy
    os.rename(store.blob_path(entry.stored_id), store.trash_path(entry.stored_id))
    res = load_tree(tmp_path / "dst", store, scope, ENV_KEY)
    assert res.misses == []
    assert os.path.exists(store.blob_path(entry.stored_id))
    assert {r: d for r, (d, _) in read_tree(tmp_path / "dst").items()} == FILES


@pytest.mark.timeout(60)
@pytest.mark.parametrize("victim", VICTIM_KINDS)
@pytest.mark.parametrize("kind", ["symlink-to-good-copy", "symlink-to-outside", "dangling-symlink", "fifo",
                                  "directory"])
def test_planted_non_regular_blob(tmp_path, saved, kind, victim):
    store, scope = saved
    entries = manifest_entries(scope)
    entry = entries[victim_path(victim, "a/two.py")]
    lost = sharing(entries, entry)
    path = store.blob_path(entry.stored_id)
    good_copy = tmp_path / "good-copy"
    os.rename(path, good_copy)  # a file with exactly the right bytes, reached only through a link
    if kind == "symlink-to-good-copy":
        os.symlink(good_copy, path)
    elif kind == "symlink-to-outside":
        os.symlink("/etc/hostname", path)
    elif kind == "dangling-symlink":
        os.symlink(tmp_path / "nothing-here", path)
    elif kind == "fifo":
        os.mkfifo(path)
    else:
        os.mkdir(path)
    with pytest.raises((BlobCorrupt, BlobMissing)):
        store.verify(entry.stored_id)
    res = load_tree(tmp_path / "dst", store, scope, ENV_KEY)  # must not hang on the FIFO
    assert sorted(p for p, _ in res.misses) == sorted(lost)
    for p in lost:
        assert not (tmp_path / "dst" / p).exists()
    assert res.restored == len(FILES) - len(lost)
    assert temp_files(tmp_path / "dst") == []


# -- zstd bombs ------------------------------------------------------------------------------------------------------
class _Sink:
    def __init__(self):
        self.data = b""

    def write(self, b):
        self.data += bytes(b)
        return len(b)

    def flush(self):
        pass


def bomb_frame(claimed: int) -> bytes:
    """A zstd frame header claiming `claimed` content bytes, followed by a little compressed data."""
    sink = _Sink()
    writer = zstandard.ZstdCompressor(write_content_size=True).stream_writer(sink, size=claimed, closefd=False)
    writer.write(b"\0" * 100_000)
    writer.flush(zstandard.FLUSH_BLOCK)
    assert zstandard.frame_content_size(sink.data) == claimed
    return sink.data


@pytest.mark.parametrize("victim", VICTIM_KINDS)
def test_bomb_frame_rejected_before_decompressing(tmp_path, saved, monkeypatch, victim):
    """The frame claims 1 TiB; the manifest says 1000 bytes (a loose blob) or the reader's pack bound applies
    (limits.MAX_PACK_BYTES): rejected on the header alone."""
    store, scope = saved
    entries = manifest_entries(scope)
    entry = entries[victim_path(victim, "four")]
    with open(store.blob_path(entry.stored_id), "wb") as fh:
        fh.write(bomb_frame(1 << 40))

    def no_decompressing(*a, **kw):
        raise AssertionError("decompressor created for a blob whose header already disagreed with the manifest")

    with monkeypatch.context() as m:
        m.setattr(zstandard, "ZstdDecompressor", no_decompressing)
        with pytest.raises(BlobCorrupt):
            if entry.pack is None:
                store.get_into(entry.blob_id, entry.size, open(os.devnull, "wb"))
            else:
                store.get_bytes(entry.pack, limits.MAX_PACK_BYTES)
    assert quarantined(store)
    with open(store.blob_path(entry.stored_id), "wb") as fh:
        fh.write(bomb_frame(1 << 40))
    lost = sharing(entries, entry)
    res = load_tree(tmp_path / "dst", store, scope, ENV_KEY)
    assert sorted(p for p, _ in res.misses) == sorted(lost) and res.corrupt == len(lost)
    for p in lost:
        assert not (tmp_path / "dst" / p).exists()
    assert res.restored == len(FILES) - len(lost)


def test_pack_frame_claiming_just_over_the_pack_bound_is_rejected(tmp_path, saved, monkeypatch):
    """A pack is decoded in memory: a frame claiming more than limits.MAX_PACK_BYTES is refused on its header."""
    store, scope = saved
    entry = manifest_entries(scope)["four"]
    with open(store.blob_path(entry.pack), "wb") as fh:
        fh.write(bomb_frame(limits.MAX_PACK_BYTES + 1))
    with monkeypatch.context() as m:
        m.setattr(zstandard, "ZstdDecompressor", lambda *a, **kw: pytest.fail("decompressor created"))
        with pytest.raises(BlobCorrupt):
            store.get_bytes(entry.pack, limits.MAX_PACK_BYTES)
    assert quarantined(store)


_BOMB_SCRIPT = textwrap.dedent("""
    import resource, sys, zstandard
    from cas import BlobStore, BlobCorrupt
    from cas.blobstore import _Counter
    sys.path.insert(0, {tests!r})
    from test_cas_bad_input import bomb_frame
    store = BlobStore({store!r})
    size = {size}
    import os
    os.makedirs(os.path.dirname(store.blob_path("0" * 64)), exist_ok=True)  # fan-out directories are made lazily
    os.makedirs(os.path.dirname(store.blob_path("ab" * 32)), exist_ok=True)
    if {legit}:
        # A genuine file of zeros: a huge content size in a small blob. Must stream, bounded memory.
        cctx = zstandard.ZstdCompressor(level=3, write_content_size=True)
        out = open(store.blob_path("0" * 64) + ".tmpbuild", "wb")
        w = cctx.stream_writer(out, size=size, closefd=False)
        import blake3
        h = blake3.blake3()
        zero = bytes(1 << 24)
        for _ in range(size // len(zero)):
            w.write(zero); h.update(zero)
        w.flush(zstandard.FLUSH_FRAME); out.close()
        bid = h.hexdigest()
        import os
        os.makedirs(os.path.dirname(store.blob_path(bid)), exist_ok=True)
        os.rename(store.blob_path("0" * 64) + ".tmpbuild", store.blob_path(bid))
    else:
        bid = "ab" * 32
        open(store.blob_path(bid), "wb").write(bomb_frame(size))
    # Address space capped well below `size`: decompressing into memory cannot succeed.
    resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))
    sink = _Counter()
    try:
        store.get_into(bid, size, sink)
        print("OK", sink.n)
    except BlobCorrupt as exc:
        print("CORRUPT", exc)
""")


@pytest.mark.timeout(120)
@pytest.mark.parametrize("legit", [False, True], ids=["hostile-garbage", "genuine-zeros"])
def test_huge_claimed_size_never_decoded_in_memory(tmp_path, legit):
    """Manifest and frame agree on a size far above memory (legal: entries may be up to 64 GiB). A reader must
    stream with bounded memory: a genuine blob comes out whole, a hostile one is BlobCorrupt; neither is a
    MemoryError."""
    BlobStore(tmp_path / "store")
    size = (3 << 29) if legit else (40 << 30)
    script = _BOMB_SCRIPT.format(tests=os.path.dirname(__file__), store=str(tmp_path / "store"), size=size,
                                 legit=legit)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=110)
    assert proc.returncode == 0, proc.stderr[-2000:]
    if legit:
        assert proc.stdout.split() == ["OK", str(size)], proc.stdout
    else:
        assert proc.stdout.startswith("CORRUPT"), proc.stdout


# -- manifests -------------------------------------------------------------------------------------------------------
def _write_manifest_bytes(scope, data: bytes) -> str:
    path = scope.manifest_path(ENV_KEY)
    with open(path, "wb") as fh:
        fh.write(data)
    return path


def _valid_manifest_bytes() -> bytes:
    return Manifest(ENV_KEY, {"gpu": "H100"}, {"a/b": Entry("ab" * 32, 3, 0o644), "c": Entry("cd" * 32, 0, 0o755)},
                    1.0, 2.0).dumps()


def _raw(doc) -> bytes:
    return msgpack.packb(doc, use_bin_type=True)


def _doc(**over):
    doc = {"format": 1, "env_key": ENV_KEY, "env": {}, "created": 1.0, "updated": 2.0,
           "entries": {"x": [b"\x01" * 32, 1, 0o644]}}
    doc.update(over)
    return doc


def _dup_key_map(pairs) -> bytes:
    """A msgpack map with the given (possibly repeated) key/value pairs."""
    out = bytearray(b"\xde" + len(pairs).to_bytes(2, "big"))
    for k, v in pairs:
        out += _raw(k) + _raw(v)
    return bytes(out)


def _nested(depth: int) -> bytes:
    return b"\x91" * depth + b"\x00"  # [[[[...0...]]]]


BAD_MANIFESTS = {
    "empty": b"",
    "garbage": bytes(range(256)) * 3,
    "truncated-1": _valid_manifest_bytes()[:-1],
    "truncated-half": _valid_manifest_bytes()[: len(_valid_manifest_bytes()) // 2],
    "truncated-10": _valid_manifest_bytes()[:10],
    "trailing-bytes": _valid_manifest_bytes() + b"\x00",
    "not-a-map": _raw([1, 2, 3]),
    "deeply-nested": _nested(100_000),
    "deeply-nested-in-entries": _raw(_doc(entries={})).replace(b"\xa7entries\x80", b"\xa7entries\x81\xa1x")
    + _nested(5000),
    "duplicate-top-key": _dup_key_map([("format", 1), ("env_key", ENV_KEY), ("entries", {}), ("entries", {})]),
    "duplicate-entry": b"\x83" + _raw("format") + _raw(1) + _raw("env_key") + _raw(ENV_KEY) + _raw("entries")
    + b"\x82" + _raw("p") + _raw([b"\x01" * 32, 1, 0o644]) + _raw("p") + _raw([b"\x02" * 32, 1, 0o644]),
    "format-99": _raw(_doc(format=99)),
    "no-format": _raw({k: v for k, v in _doc().items() if k != "format"}),
    "wrong-env-key": _raw(_doc(env_key="other")),
    "entries-not-map": _raw(_doc(entries=[1])),
    "entry-short": _raw(_doc(entries={"x": [b"\x01" * 32, 1]})),
    "entry-long": _raw(_doc(entries={"x": [b"\x01" * 32, 1, 0o644, 0]})),
    "id-not-bytes": _raw(_doc(entries={"x": ["01" * 32, 1, 0o644]})),
    "id-short": _raw(_doc(entries={"x": [b"\x01" * 31, 1, 0o644]})),
    "id-long": _raw(_doc(entries={"x": [b"\x01" * 33, 1, 0o644]})),
    "negative-size": _raw(_doc(entries={"x": [b"\x01" * 32, -1, 0o644]})),
    "size-over-64GiB": _raw(_doc(entries={"x": [b"\x01" * 32, (64 << 30) + 1, 0o644]})),
    "size-bool": _raw(_doc(entries={"x": [b"\x01" * 32, True, 0o644]})),
    "size-float": _raw(_doc(entries={"x": [b"\x01" * 32, 1.0, 0o644]})),
    "mode-setuid": _raw(_doc(entries={"x": [b"\x01" * 32, 1, 0o4755]})),
    "mode-negative": _raw(_doc(entries={"x": [b"\x01" * 32, 1, -1]})),
    "env-too-many": _raw(_doc(env={f"k{i}": "v" for i in range(65)})),
    "env-value-too-long": _raw(_doc(env={"k": "v" * 1025})),
    "env-not-str": _raw(_doc(env={"k": 1})),
    "created-str": _raw(_doc(created="yesterday")),
    "int-map-key": _raw(_doc(entries={1: [b"\x01" * 32, 1, 0o644]})),
    "huge-map-claim": b"\x85" + _raw("format") + _raw(1) + _raw("env_key") + _raw(ENV_KEY) + _raw("entries")
    + b"\xdf\xff\xff\xff\xff",
    "huge-str-claim": b"\x81\xdb\xff\xff\xff\xff",
    "invalid-utf8-path": _raw(_doc(entries={})).replace(b"\xa7entries\x80", b"\xa7entries\x81\xa2\xff\xfe")
    + _raw([b"\x01" * 32, 1, 0o644]),
}

BAD_PATHS = {
    "absolute": "/etc/passwd",
    "dotdot": "../escape",
    "dotdot-inside": "a/../../escape",
    "dotdot-last": "a/..",
    "dot": "a/./b",
    "nul": "a\x00b",
    "backslash": "a\\..\\b",
    "empty-component": "a//b",
    "trailing-slash": "a/",
    "empty": "",
    "component-256-bytes": "a/" + "x" * 256,
    "component-256-bytes-utf8": "é" * 128,
    "path-4097-bytes": "/".join(["y" * 200] * 20) + "/" + "z" * 77,
}


@pytest.mark.parametrize("kind", sorted(BAD_MANIFESTS))
def test_bad_manifest_rejected_naming_the_file(tmp_path, saved, kind):
    store, scope = saved
    path = _write_manifest_bytes(scope, BAD_MANIFESTS[kind])
    with pytest.raises(ManifestError) as info:
        load_tree(tmp_path / "dst", store, scope, ENV_KEY)
    assert info.value.path == path
    assert path in str(info.value)
    assert not (tmp_path / "dst").exists() or read_tree(tmp_path / "dst") == {}
    if kind != "wrong-env-key":  # only the scope knows the key a manifest is stored under
        with pytest.raises(ManifestError) as info:
            loads(BAD_MANIFESTS[kind], "some/source")
        assert info.value.path == "some/source"


@pytest.mark.parametrize("kind", sorted(BAD_PATHS))
def test_unsafe_entry_path_rejects_whole_manifest(tmp_path, saved, kind):
    store, scope = saved
    good = manifest_entries(scope)
    entries = dict(good)
    entries[BAD_PATHS[kind]] = good["four"]
    path = _write_manifest_bytes(scope, Manifest(ENV_KEY, {}, entries, 1.0, 2.0).dumps())
    with pytest.raises(ManifestError) as info:
        load_tree(tmp_path / "dst", store, scope, ENV_KEY)
    assert info.value.path == path
    assert not (tmp_path / "dst").exists() or read_tree(tmp_path / "dst") == {}
    assert not (tmp_path / "escape").exists()


def test_legal_edge_paths_accepted(tmp_path, saved):
    """The limits are limits, not off by one: 255-byte components, 4096-byte paths, dots inside names."""
    store, scope = saved
    e = manifest_entries(scope)["four"]
    entries = {"x" * 255: e, "é" * 127 + "x": e, "..a": e, ".a.": e, "...": e, "a b/ c": e}
    entries["/".join(["d" * 255] * 15 + ["e" * 128, "f" * 127])] = e
    assert len(max(entries, key=len).encode()) == 4096
    _write_manifest_bytes(scope, Manifest(ENV_KEY, {}, entries, 1.0, 2.0).dumps())
    assert set(scope.read_manifest(ENV_KEY).entries) == set(entries)


def test_oversized_manifest_file_rejected_without_reading(tmp_path, saved):
    store, scope = saved
    path = scope.manifest_path(ENV_KEY)
    with open(path, "wb") as fh:
        fh.truncate((64 << 20) + 1)  # sparse: costs no disk
    with pytest.raises(ManifestError) as info:
        load_tree(tmp_path / "dst", store, scope, ENV_KEY)
    assert info.value.path == path and "limit" in str(info.value)
    with pytest.raises(ManifestError):
        loads(b"\x80" * ((64 << 20) + 1), path)


def test_manifest_that_is_a_symlink_or_fifo(tmp_path, saved):
    store, scope = saved
    path = scope.manifest_path(ENV_KEY)
    real = tmp_path / "elsewhere.manifest"
    os.rename(path, real)
    os.symlink(real, path)
    with pytest.raises(ManifestError) as info:
        load_tree(tmp_path / "dst", store, scope, ENV_KEY)
    assert info.value.path == path
    os.unlink(path)
    os.mkfifo(path)
    with pytest.raises(ManifestError):
        load_tree(tmp_path / "dst", store, scope, ENV_KEY)


def test_save_replaces_a_corrupt_manifest(tmp_path, saved):
    """A corrupt manifest must not block saving forever: the next save writes a valid one."""
    store, scope = saved
    _write_manifest_bytes(scope, b"\xc1garbage")
    res = save_tree(tmp_path / "src", store, scope, ENV_KEY, use_index=False)
    assert res.manifest_written
    assert manifest_entries(scope) == {r: Entry(blob_id(d), len(d), 0o644) for r, d in FILES.items()}


# -- the target directory ----------------------------------------------------------------------------------------------
def test_symlinked_parent_in_target_is_a_miss(tmp_path, saved):
    store, scope = saved
    outside = tmp_path / "outside"
    outside.mkdir()
    dst = tmp_path / "dst"
    dst.mkdir()
    os.symlink(outside, dst / "a")  # entries a/one.py and a/two.py would land outside
    res = load_tree(dst, store, scope, ENV_KEY)
    assert sorted(p for p, _ in res.misses) == ["a/one.py", "a/two.py"]
    assert os.listdir(outside) == []
    assert res.restored == len(FILES) - 2
    assert (dst / "four").read_bytes() == FILES["four"]


def test_symlinked_deeper_parent_and_symlink_to_inside(tmp_path, saved):
    store, scope = saved
    dst = tmp_path / "dst"
    (dst / "inside").mkdir(parents=True)
    os.symlink(dst / "inside", dst / "b")  # even a link that stays inside is refused
    res = load_tree(dst, store, scope, ENV_KEY)
    assert [p for p, _ in res.misses] == ["b/three.bin"]
    assert os.listdir(dst / "inside") == []


def test_symlink_at_final_name_is_replaced_not_followed(tmp_path, saved):
    store, scope = saved
    outside = tmp_path / "victim"
    outside.write_bytes(b"precious")
    dst = tmp_path / "dst"
    dst.mkdir()
    os.symlink(outside, dst / "four")
    res = load_tree(dst, store, scope, ENV_KEY)
    assert res.misses == []
    assert outside.read_bytes() == b"precious"
    assert not os.path.islink(dst / "four")
    assert (dst / "four").read_bytes() == FILES["four"]


def test_entry_too_long_for_the_target_is_a_miss(tmp_path, saved):
    """A legal 4096-byte entry path cannot exist below any target (PATH_MAX): a miss, not a crashed load."""
    store, scope = saved
    good = manifest_entries(scope)
    entries = dict(good)
    entries["/".join(["d" * 255] * 15 + ["e" * 128, "f" * 127])] = good["four"]
    entries["/".join(["g" * 255] * 16)] = good["four"]
    _write_manifest_bytes(scope, Manifest(ENV_KEY, {}, entries, 1.0, 2.0).dumps())
    res = load_tree(tmp_path / "dst", store, scope, ENV_KEY)
    assert len(res.misses) == 2
    assert res.restored == len(FILES)


def test_file_where_a_directory_is_needed_is_a_miss(tmp_path, saved):
    store, scope = saved
    dst = tmp_path / "dst"
    write_tree(dst, {"a": b"a file, not a directory"})
    os.mkdir(dst / "four")  # a directory where a file entry goes
    res = load_tree(dst, store, scope, ENV_KEY)
    assert sorted(p for p, _ in res.misses) == ["a/one.py", "a/two.py", "four"]
    assert (dst / "a").read_bytes() == b"a file, not a directory"
    assert (dst / "b" / "three.bin").read_bytes() == FILES["b/three.bin"]
    assert temp_files(dst) == []


# -- store roots -----------------------------------------------------------------------------------------------------
def test_missing_store_root(tmp_path):
    with pytest.raises(StoreUnavailable):
        BlobStore(tmp_path / "not-mounted" / "store")
    (tmp_path / "empty").mkdir()
    with pytest.raises(StoreUnavailable):
        BlobStore(tmp_path / "empty", create=False)
    with pytest.raises(StoreUnavailable):
        Scope(tmp_path / "not-mounted" / "scope", create=True)
    store = BlobStore(tmp_path / "store")
    scope = Scope(tmp_path / "scope", create=True)
    write_tree(tmp_path / "src", {"f": b"x"})
    save_tree(tmp_path / "src", store, scope, ENV_KEY)
    # The volume goes away under a live process: reads go on through the descriptors it opened (the real store,
    # wherever it now is, verified as ever), and a save fails instead of re-creating a ghost store at the old path.
    os.rename(tmp_path / "store", tmp_path / "gone")
    res = load_tree(tmp_path / "dst", store, scope, ENV_KEY)
    assert res.restored + len(res.misses) == 1
    write_tree(tmp_path / "src", {"g": b"y"})
    with pytest.raises(StoreUnavailable):
        save_tree(tmp_path / "src", store, scope, ENV_KEY)
    assert not (tmp_path / "store").exists()


def test_store_of_another_format_version(tmp_path):
    root = tmp_path / "store"
    root.mkdir()
    (root / "CAS-FORMAT").write_bytes(b"cas-store 2\n")
    with pytest.raises(FormatError):
        BlobStore(root)
    (root / "CAS-FORMAT").write_bytes(b"cas-store 1\n" + _raw({"freshen_after": -5}))
    with pytest.raises(FormatError):
        BlobStore(root)


def _mount(args: list[str]) -> None:
    proc = subprocess.run(["mount", *args], capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"mount not permitted here: {proc.stderr.strip()}")


def _umount(path) -> None:
    subprocess.run(["umount", "-l", str(path)], capture_output=True)


@pytest.fixture
def ro_bind(tmp_path):
    """ro_bind(src) -> a read-only bind mount of src (tests run as root: chmod would not stop writes)."""
    mounted = []

    def make(src):
        dst = tmp_path / f"ro-{len(mounted)}"
        dst.mkdir()
        _mount(["--bind", str(src), str(dst)])
        mounted.append(dst)
        _mount(["-o", "remount,ro,bind", str(dst)])
        return dst

    yield make
    for path in reversed(mounted):
        _umount(path)


def test_read_only_empty_store_root(tmp_path, ro_bind):
    (tmp_path / "empty").mkdir()
    ro = ro_bind(tmp_path / "empty")
    with pytest.raises(StoreReadOnly):
        BlobStore(ro)


def test_read_only_tmpfs_store_root(tmp_path):
    mnt = tmp_path / "tmpfs"
    mnt.mkdir()
    _mount(["-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(mnt)])
    try:
        with pytest.raises(StoreReadOnly):
            BlobStore(mnt)
        with pytest.raises(StoreReadOnly):
            BlobStore(mnt / "store")
        with pytest.raises(StoreReadOnly):
            Scope(mnt / "scope", create=True)
    finally:
        _umount(mnt)


def test_read_only_existing_store_loads_but_does_not_save(tmp_path, saved, ro_bind):
    store, scope = saved
    ro_store = BlobStore(ro_bind(store.root))  # opening for reads works
    dst = tmp_path / "dst"
    res = load_tree(dst, ro_store, scope, ENV_KEY)
    assert res.misses == [] and res.restored == len(FILES)
    write_tree(tmp_path / "src2", {"new": b"new content"})
    with pytest.raises(StoreReadOnly):
        save_tree(tmp_path / "src2", ro_store, scope, ENV_KEY)
    assert set(manifest_entries(scope)) == set(FILES)  # the manifest was not touched
    # A corrupt blob on a read-only store is still a miss (quarantine fails quietly).
    entries = manifest_entries(scope)
    for victim in ("four", BIG):  # the pack of "four", then a loose blob
        entry = entries[victim]
        path = store.blob_path(entry.stored_id)
        with open(path, "rb") as fh:
            good = fh.read()
        with open(path, "wb") as fh:
            fh.write(b"bad")
        res = load_tree(tmp_path / f"dst-{victim.replace('/', '-')}", ro_store, scope, ENV_KEY)
        assert sorted(p for p, _ in res.misses) == sorted(sharing(entries, entry))
        assert res.restored == len(FILES) - len(sharing(entries, entry))
        with open(path, "rb") as fh:
            assert fh.read() == b"bad"  # not quarantined: the store is read-only
        with open(path, "wb") as fh:
            fh.write(good)


def test_read_only_scope(tmp_path, saved, ro_bind):
    store, scope = saved
    ro_scope = Scope(ro_bind(scope.root))
    res = load_tree(tmp_path / "dst", store, ro_scope, ENV_KEY)
    assert res.restored == len(FILES)
    write_tree(tmp_path / "src2", {"new": b"new content"})
    with pytest.raises(StoreReadOnly):
        save_tree(tmp_path / "src2", store, ro_scope, ENV_KEY)
    entries = manifest_entries(scope)
    # Every blob is intact: the pack of the small files, BIG's blob, the manifest's blob and, at most, the pack the
    # failed save may have written before the scope refused it (a one-file pack: its id is the file's hash).
    assert verify_all_blobs(store) >= 3
    stored = {info.id for info in store.iter_blobs()}
    manifest_blob = blob_id(scope.read_manifest_bytes(ENV_KEY))
    assert {e.stored_id for e in entries.values()} | {manifest_blob} <= stored
    assert stored - {e.stored_id for e in entries.values()} - {manifest_blob} <= {blob_id(b"new content")}
    assert {p: entry_bytes(store, e) for p, e in entries.items()} == FILES


def test_entry_that_is_also_a_parent_of_another(tmp_path, saved):
    """A manifest may (legally, per parse) hold both 'x' and 'x/y': whichever lands first wins, the other is a miss,
    and the load neither fails nor leaves temp files."""
    store, scope = saved
    good = manifest_entries(scope)
    entries = dict(good)
    entries["four/inner"] = good["a/one.py"]  # 'four' is a file entry
    _write_manifest_bytes(scope, Manifest(ENV_KEY, {}, entries, 1.0, 2.0).dumps())
    for i in range(3):
        dst = tmp_path / f"dst{i}"
        res = load_tree(dst, store, scope, ENV_KEY, threads=8)
        assert len(res.misses) == 1 and {p for p, _ in res.misses} <= {"four", "four/inner"}
        assert res.restored == len(entries) - 1
        assert temp_files(dst) == []


def test_read_only_target_is_all_misses(tmp_path, saved, ro_bind):
    """A local directory that cannot be written (read-only mount) makes every entry a miss, not a failed load."""
    store, scope = saved
    (tmp_path / "target").mkdir()
    write_tree(tmp_path / "target", {"four": b"x"})  # one entry present with the wrong size, one parent to create
    ro = ro_bind(tmp_path / "target")
    res = load_tree(ro, store, scope, ENV_KEY)
    assert sorted(p for p, _ in res.misses) == sorted(FILES)
    assert res.restored == 0
