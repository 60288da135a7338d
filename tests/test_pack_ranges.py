"""Packs of independent frames (FORMAT §2) and partial loads that fetch only the frames they need (FORMAT §3a): on a
real volume, moto and SeaweedFS, counted through FaultyBackend; old packs and manifests; hostile frame tables and
blobs cost a read of the whole pack or a miss, never wrong content."""
from __future__ import annotations

import os
import random
from pathlib import Path

import msgpack
import pytest
import zstandard
from cas_helpers import ENV_KEY, blob_id, read_tree, write_tree

from cas import BlobStore, Scope, layout, limits, load, load_tree, pack, save_tree
from cas.blobstore import _frames, compress_bound
from cas.errors import BlobCorrupt
from cas.faulty import FaultyBackend
from cas.manifest import Entry, FrameTable, loads
from cas.posix import PosixBackend

_WORDS = ("tl.load", "tl.store", "xindex", "xmask", "tmp0", "tmp1", "triton_poi_fused_add", "rsqrt", "float32",
          "bf16", "arith.addf", "ld.global.v4.b32", "mov.u32", "def", "kernel", "num_warps=4", "XBLOCK",
          "tl.constexpr", "return", "torch.ops.aten.mm")


def _text(rng: random.Random, size: int) -> bytes:
    """Kernel-like text (compresses ~3x, with no long-range repeats: framing costs it ~1 %, FORMAT §2)."""
    out = bytearray()
    while len(out) < size:
        out += (" ".join(rng.choice(_WORDS) for _ in range(rng.randint(3, 12))) + f" {rng.getrandbits(32):08x}\n"
                ).encode()
    return bytes(out[:size])


def _tree(seed: int = 0, n: int = 64) -> dict[str, bytes]:
    rng = random.Random(seed)
    files = {f"triton/k{i:03d}/kernel.ptx": _text(rng, rng.randint(16_000, 48_000)) for i in range(n)}
    files["triton/zz/empty"] = b""  # an empty file at the very end of the pack's content
    return files


class Stores:
    """A store and scope, each behind a counting FaultyBackend, on a volume or in a moto bucket."""

    def __init__(self, store_backend, scope_backend):
        self.store_calls = FaultyBackend(store_backend)
        self.store = BlobStore(self.store_calls, create=True)
        self.scope = Scope(FaultyBackend(scope_backend), create=True)

    def reset(self) -> None:
        self.store_calls.calls.clear()
        self.store_calls.got_bytes.clear()
        self.store_calls.ranged_gets.clear()

    def entries(self) -> dict[str, Entry]:
        manifest = self.scope.read_manifest(ENV_KEY)
        assert manifest is not None
        return manifest.entries

    def put_raw(self, blob: str, data: bytes) -> None:
        """Replace a stored blob's bytes behind the store's back (a damaged or hostile blob)."""
        self.store_calls.inner.put(layout.blob(blob), data)


@pytest.fixture(params=["volume", "moto", "seaweedfs"])
def stores(request, tmp_path) -> Stores:
    if request.param == "volume":
        return Stores(PosixBackend(tmp_path / "store", create=True), PosixBackend(tmp_path / "scope", create=True))
    bucket = request.getfixturevalue("moto_bucket" if request.param == "moto" else "seaweed_bucket")
    return Stores(bucket.backend("org/b10_cas"), bucket.backend("model/compile_cache"))


@pytest.fixture
def vol(tmp_path) -> Stores:
    return Stores(PosixBackend(tmp_path / "store", create=True), PosixBackend(tmp_path / "scope", create=True))


def _saved(s: Stores, tmp_path: Path, files: dict[str, bytes] | None = None) -> dict[str, bytes]:
    files = files if files is not None else _tree()
    write_tree(tmp_path / "src", files)
    assert save_tree(tmp_path / "src", s.store, s.scope, ENV_KEY).packs_written == 1
    return files


def _contents(root: Path) -> dict[str, bytes]:
    return {rel: data for rel, (data, _) in read_tree(root).items()}


def _table(s: Stores) -> tuple[str, FrameTable]:
    (entry,) = {e.pack: e for e in s.entries().values()}.values()
    assert entry.pack is not None and entry.frames is not None
    return entry.pack, entry.frames


def _in_frame(s: Stores, index: int) -> str:
    """A file (not the empty one) in frame `index` of the pack."""
    return next(p for p, e in sorted(s.entries().items())
                if e.size and e.frames is not None and e.frames.frame_of(e.offset, e.size).index == index)


def _loaded(s: Stores, tmp_path: Path, files: dict[str, bytes], victims: list[str]):
    """Full load into dst, remove `victims` there, count the partial load that brings them back."""
    dst = tmp_path / "dst"
    assert load_tree(dst, s.store, s.scope, ENV_KEY).restored == len(files)
    for rel in victims:
        os.unlink(dst / rel)
    s.reset()
    res = load_tree(dst, s.store, s.scope, ENV_KEY)
    assert _contents(dst) == files
    return res


def _quarantined(s: Stores) -> list:
    return [i for i in s.store_calls.inner.list(layout.QUARANTINE) if i.kind == "object"]


# -- the pack as written ---------------------------------------------------------------------------------------------
def test_a_pack_is_frames_of_whole_files_and_still_one_blob(vol, tmp_path):
    files = _saved(vol, tmp_path)
    pack_id, table = _table(vol)
    raw = vol.store_calls.inner.get(layout.blob(pack_id), limit=1 << 30)
    spans = _frames(raw, limits.MAX_PACK_BYTES)
    # The table the manifest records is the blob's frames, which tile it; each file lies inside one frame.
    assert [(length, content) for _, length, content in spans] == list(table.sizes)
    assert len(spans) >= 6 and table.stored_size == len(raw)
    for rel, e in vol.entries().items():
        frame = table.frame_of(e.offset, e.size)
        assert frame is not None, rel
        content = zstandard.ZstdDecompressor().decompress(raw[frame.start:frame.start + frame.length])
        assert content[e.offset - frame.content_start:][:e.size] == files[rel]
    # Every reader of whole blobs takes it: the content hashes to the pack's id.
    whole = vol.store.get_bytes(pack_id, limits.MAX_PACK_BYTES)
    assert blob_id(whole) == pack_id and len(whole) == sum(n for _, n in table.sizes)
    vol.store.verify(pack_id)
    assert vol.store.read_bytes(pack_id, limits.MAX_PACK_BYTES) == whole
    # On disk the table is the manifest's top-level `frames` map (pack id -> flat sizes); entries keep 5 fields.
    doc = msgpack.unpackb(zstandard.ZstdDecompressor().decompress(vol.scope.read_manifest_bytes(ENV_KEY)))
    assert doc["format"] == 2 and doc["frames"] == {bytes.fromhex(pack_id): table.dump()}
    assert {len(v) for v in doc["entries"].values()} == {5}


def test_frame_runs_hold_whole_files_of_about_the_target():
    assert pack.frame_runs([]) == []
    assert pack.frame_runs([10, 10, 10], target=25) == [(0, 2), (2, 3)]
    assert pack.frame_runs([30, 5, 30], target=25) == [(0, 1), (1, 2), (2, 3)]  # a file above the target: alone
    assert pack.frame_runs([0, 0, 25, 0], target=25) == [(0, 4)]
    # Empty files after a large one stay in its run: a frame of no content would void the whole table.
    assert pack.frame_runs([30, 0, 0, 5], target=25) == [(0, 3), (3, 4)]
    assert pack.frame_runs([0, 0], target=25) == [(0, 2)]


def test_framing_that_costs_compression_is_not_used(vol, tmp_path):
    """A pack whose files repeat each other across frames (FRAMING_COST_MAX) is one frame, with no table."""
    rng = random.Random(5)
    common = rng.randbytes(200_000)  # incompressible, but repeated in every file: one frame stores it once
    files = {f"k{i:02d}": common + rng.randbytes(1000) for i in range(8)}
    _saved(vol, tmp_path, files)
    entries = vol.entries()
    assert {e.frames for e in entries.values()} == {None}
    (pack_id,) = {e.pack for e in entries.values()}
    raw = vol.store_calls.inner.get(layout.blob(pack_id), limit=1 << 30)
    assert len(_frames(raw, limits.MAX_PACK_BYTES)) == 1 and len(raw) < 400_000
    assert "frames" not in msgpack.unpackb(zstandard.ZstdDecompressor().decompress(
        vol.scope.read_manifest_bytes(ENV_KEY)))


# -- partial and full loads ------------------------------------------------------------------------------------------
def test_partial_load_reads_only_the_frames_it_needs(stores, tmp_path):
    files = _saved(stores, tmp_path)
    _, table = _table(stores)
    last = len(table.sizes) - 1
    assert sum(table.sizes[i][0] for i in range(1, last)) > load.RANGE_GAP_BYTES  # two separate ranges
    victims = [_in_frame(stores, 0), _in_frame(stores, last)]

    res = _loaded(stores, tmp_path, files, victims)
    assert res.restored == 2 and not res.misses
    assert stores.store_calls.ranged_gets["blobs"] == 2
    assert stores.store_calls.got_bytes["blobs"] == table.sizes[0][0] + table.sizes[last][0]
    assert stores.store_calls.got_bytes["blobs"] < table.stored_size / 3


def test_neighbouring_frames_are_one_range(vol, tmp_path):
    files = _saved(vol, tmp_path)
    _, table = _table(vol)
    assert table.sizes[1][0] <= load.RANGE_GAP_BYTES
    res = _loaded(vol, tmp_path, files, [_in_frame(vol, 0), _in_frame(vol, 2)])
    assert res.restored == 2
    assert vol.store_calls.ranged_gets["blobs"] == 1  # frames 0-2 in one read, the gap's frame included
    assert vol.store_calls.got_bytes["blobs"] == sum(c for c, _ in table.sizes[:3])


def test_full_load_and_mostly_missing_packs_fetch_whole_packs(stores, tmp_path):
    files = _saved(stores, tmp_path)
    _, table = _table(stores)
    stores.reset()
    assert load_tree(tmp_path / "full", stores.store, stores.scope, ENV_KEY).restored == len(files)
    assert stores.store_calls.ranged_gets["blobs"] == 0
    assert stores.store_calls.got_bytes["blobs"] == table.stored_size
    # Files in more than RANGED_SHARE_MAX of the pack's bytes: one read of the whole pack.
    victims = [_in_frame(stores, i) for i in range(len(table.sizes)) if i % 4 != 3]
    res = _loaded(stores, tmp_path, files, victims)
    assert res.restored == len(victims)
    assert stores.store_calls.ranged_gets["blobs"] == 0
    assert stores.store_calls.got_bytes["blobs"] == table.stored_size


def test_empty_file_at_the_end_needs_only_the_last_frame(vol, tmp_path):
    files = _saved(vol, tmp_path)
    _, table = _table(vol)
    e = vol.entries()["triton/zz/empty"]
    assert e.offset == sum(n for _, n in table.sizes) and table.frame_of(e.offset, 0).index == len(table.sizes) - 1
    res = _loaded(vol, tmp_path, files, ["triton/zz/empty"])
    assert res.restored == 1 and vol.store_calls.ranged_gets["blobs"] == 1


def test_a_pack_in_trash_is_brought_back_by_a_ranged_read(vol, tmp_path):
    files = _saved(vol, tmp_path)
    pack_id, _ = _table(vol)
    dst = tmp_path / "dst"
    load_tree(dst, vol.store, vol.scope, ENV_KEY)
    os.unlink(dst / _in_frame(vol, 1))
    os.makedirs(os.path.dirname(vol.store.trash_path(pack_id)), exist_ok=True)
    os.rename(vol.store.blob_path(pack_id), vol.store.trash_path(pack_id))  # as gc retires a blob (FORMAT §5)
    vol.reset()
    res = load_tree(dst, vol.store, vol.scope, ENV_KEY)
    assert res.restored == 1 and not res.misses and _contents(dst) == files
    assert vol.store_calls.ranged_gets["blobs"] == 1
    assert os.path.exists(vol.store.blob_path(pack_id)) and not os.path.exists(vol.store.trash_path(pack_id))


def test_a_second_deployment_copies_the_frame_table_with_the_location(tmp_path):
    files = _tree(seed=3)
    write_tree(tmp_path / "src", files)
    a = Stores(PosixBackend(tmp_path / "store", create=True), PosixBackend(tmp_path / "scope-a", create=True))
    save_tree(tmp_path / "src", a.store, a.scope, ENV_KEY)
    b = Stores(PosixBackend(tmp_path / "store"), PosixBackend(tmp_path / "scope-b", create=True))
    res = save_tree(tmp_path / "src", b.store, b.scope, ENV_KEY)
    assert res.packs_written == 0 and res.blobs_present == len(files)
    assert {p: (e.pack, e.offset, e.frames) for p, e in b.entries().items()} == \
        {p: (e.pack, e.offset, e.frames) for p, e in a.entries().items()}
    _, table = _table(b)
    res = _loaded(b, tmp_path, files, [_in_frame(b, 1)])
    assert res.restored == 1 and b.store_calls.got_bytes["blobs"] == table.sizes[1][0]


# -- old packs and old manifests -------------------------------------------------------------------------------------
def test_old_single_frame_packs_and_manifests_without_tables_still_load(vol, tmp_path, monkeypatch):
    monkeypatch.setattr(pack, "FRAMING_COST_MAX", -1.0)  # every pack one frame, no table: what earlier writers made
    files = _saved(vol, tmp_path)
    (pack_id,) = {e.pack for e in vol.entries().values()}
    assert {e.frames for e in vol.entries().values()} == {None}
    raw = vol.store_calls.inner.get(layout.blob(pack_id), limit=1 << 30)
    assert len(_frames(raw, limits.MAX_PACK_BYTES)) == 1
    res = _loaded(vol, tmp_path, files, [_in_frame_plain(vol, 3)])
    assert res.restored == 1 and vol.store_calls.ranged_gets["blobs"] == 0
    assert vol.store_calls.got_bytes["blobs"] == len(raw)


def _in_frame_plain(s: Stores, n: int) -> str:
    return sorted(p for p, e in s.entries().items() if e.size)[n]


def test_a_table_for_a_pack_stored_as_one_frame_falls_back_to_the_whole_pack(vol, tmp_path):
    """The table describes the pack as its writer framed it; the blob with that id was stored earlier as one frame
    (an earlier writer): the ranged read finds other frames there and the pack is read whole, quarantining nothing."""
    files = _saved(vol, tmp_path)
    pack_id, _ = _table(vol)
    vol.put_raw(pack_id, zstandard.ZstdCompressor(level=3, write_content_size=True).compress(
        vol.store.get_bytes(pack_id, limits.MAX_PACK_BYTES)))
    res = _loaded(vol, tmp_path, files, [_in_frame(vol, 2)])
    assert res.restored == 1 and not res.misses and res.corrupt == 0
    assert vol.store_calls.ranged_gets["blobs"] == 1 and vol.store_calls.calls["get"] >= 2
    assert not _quarantined(vol) and not vol.scope.audit_requested(ENV_KEY)


def test_a_manifest_without_the_frames_map_reads_multi_frame_packs_whole(vol, tmp_path):
    files = _saved(vol, tmp_path)
    manifest = vol.scope.read_manifest(ENV_KEY)
    manifest.entries = {p: e.located(e.pack, e.offset) for p, e in manifest.entries.items()}  # tables dropped
    vol.scope.write_manifest(manifest.dumps(), ENV_KEY)
    res = _loaded(vol, tmp_path, files, [_in_frame_plain(vol, 5)])
    assert res.restored == 1 and vol.store_calls.ranged_gets["blobs"] == 0


# -- hostile tables and blobs ----------------------------------------------------------------------------------------
def _with_table(s: Stores, table: FrameTable) -> None:
    """Rewrite the manifest with `table` as its pack's frame table (a broken or hostile writer or peer)."""
    manifest = s.scope.read_manifest(ENV_KEY)
    manifest.entries = {p: e.located(e.pack, e.offset, table) for p, e in manifest.entries.items()}
    s.scope.write_manifest(manifest.dumps(), ENV_KEY)


def test_wrong_frame_coordinates_cost_a_whole_pack_read_never_wrong_content(stores, tmp_path):
    files = _saved(stores, tmp_path)
    _, table = _table(stores)
    sizes = list(table.sizes)
    # Frame 1 one byte longer, frame 2 one shorter: same totals, a valid-looking table, ranges off by one.
    sizes[1] = (sizes[1][0] + 1, sizes[1][1])
    sizes[2] = (sizes[2][0] - 1, sizes[2][1])
    _with_table(stores, FrameTable(tuple(sizes)))
    res = _loaded(stores, tmp_path, files, [_in_frame(stores, 2)])
    assert res.restored == 1 and not res.misses and res.corrupt == 0 and not _quarantined(stores)
    assert stores.store_calls.ranged_gets["blobs"] == 1  # the ranged read, then one whole read
    assert stores.store_calls.got_bytes["blobs"] == sizes[2][0] + table.stored_size


def test_a_range_past_the_end_of_the_pack_falls_back(stores, tmp_path):
    files = _saved(stores, tmp_path)
    _, table = _table(stores)
    last = len(table.sizes) - 1
    # Every frame before the last claims zstd's bound for its content (the most a parser accepts): the last frame's
    # range then starts past the end of the blob, which is far smaller (compressed).
    sizes = [(compress_bound(n), n) for _, n in table.sizes[:last]] + [table.sizes[last]]
    assert FrameTable(tuple(sizes)).frame(last).start > table.stored_size
    _with_table(stores, FrameTable(tuple(sizes)))
    res = _loaded(stores, tmp_path, files, [_in_frame(stores, last)])
    assert res.restored == 1 and not res.misses and not _quarantined(stores)
    assert stores.store_calls.got_bytes["blobs"] == table.stored_size  # the ranged read got nothing, then the whole


def test_a_frame_range_holding_another_file_is_a_miss(vol, tmp_path):
    """The table is right but an entry claims an offset in another frame, where a file of the same size lies: the
    frame decodes, the slice fails its hash, the whole pack gives the same answer: a miss, an audit."""
    files = _tree(seed=9)
    files["triton/k010/kernel.ptx"] = files["triton/k010/kernel.ptx"][:20_000]
    files["triton/k050/kernel.ptx"] = files["triton/k050/kernel.ptx"][:20_000]
    _saved(vol, tmp_path, files)
    manifest = vol.scope.read_manifest(ENV_KEY)
    e10, e50 = manifest.entries["triton/k010/kernel.ptx"], manifest.entries["triton/k050/kernel.ptx"]
    assert e10.frames.frame_of(e10.offset, e10.size) != e50.frames.frame_of(e50.offset, e50.size)
    manifest.entries["triton/k010/kernel.ptx"] = e10.located(e10.pack, e50.offset, e10.frames)
    vol.scope.write_manifest(manifest.dumps(), ENV_KEY)
    dst = tmp_path / "dst"
    load_tree(dst, vol.store, vol.scope, ENV_KEY)
    assert not (dst / "triton/k010/kernel.ptx").exists()  # the full load already misses it
    vol.scope.clear_audit(ENV_KEY)
    vol.reset()
    res = load_tree(dst, vol.store, vol.scope, ENV_KEY)
    assert [p for p, _ in res.misses] == ["triton/k010/kernel.ptx"] and res.corrupt == 1
    assert not (dst / "triton/k010/kernel.ptx").exists()
    assert vol.store_calls.ranged_gets["blobs"] == 1 and not _quarantined(vol)
    assert vol.scope.audit_requested(ENV_KEY)


def test_a_frame_claiming_a_huge_size_is_refused_unread(vol, tmp_path, monkeypatch):
    """The needed frame of the pack replaced by one whose header claims 1 TiB (same blocks), the table matching it:
    the ranged read refuses it on its header, so does the whole read, which quarantines the pack: a miss, and
    nothing was decoded."""
    files = _saved(vol, tmp_path)
    pack_id, table = _table(vol)
    raw = vol.store_calls.inner.get(layout.blob(pack_id), limit=1 << 30)
    frame = table.frame(2)
    header = zstandard.frame_header_size(raw[frame.start:frame.start + 18])
    blocks = raw[frame.start + header:frame.start + frame.length]
    # Frame header descriptor 0xE0: 8-byte content size, single segment, no checksum, no dictionary.
    bomb = zstandard.FRAME_HEADER + b"\xe0" + (1 << 40).to_bytes(8, "little") + blocks
    assert zstandard.frame_content_size(bomb) == 1 << 40
    sizes = list(table.sizes)
    sizes[2] = (len(bomb), sizes[2][1])
    _with_table(vol, FrameTable(tuple(sizes)))
    victim = _in_frame(vol, 2)
    dst = tmp_path / "dst"
    load_tree(dst, vol.store, vol.scope, ENV_KEY)  # from the good pack
    os.unlink(dst / victim)
    vol.put_raw(pack_id, raw[:frame.start] + bomb + raw[frame.start + frame.length:])

    def no_decoding(*a, **kw):
        raise AssertionError("a frame was decoded although its header claims more than the table allows")

    manifest = vol.scope.read_manifest(ENV_KEY)  # (a manifest is a zstd frame too: read before the patch)
    monkeypatch.setattr(zstandard, "ZstdDecompressor", no_decoding)
    vol.reset()
    res = load_tree(dst, vol.store, vol.scope, ENV_KEY, manifest=manifest)
    assert [p for p, _ in res.misses] == [victim] and res.corrupt == 1
    assert vol.store_calls.ranged_gets["blobs"] == 1
    assert not (dst / victim).exists() and len(_quarantined(vol)) == 1
    assert _contents(dst) == {p: d for p, d in files.items() if p != victim}


def test_a_damaged_frame_only_the_whole_pack_read_quarantines(vol, tmp_path):
    files = _saved(vol, tmp_path)
    pack_id, table = _table(vol)
    raw = bytearray(vol.store_calls.inner.get(layout.blob(pack_id), limit=1 << 30))
    raw[table.frame(1).start] ^= 0xFF  # frame 1 is no zstd frame any more
    dst = tmp_path / "dst"
    load_tree(dst, vol.store, vol.scope, ENV_KEY)
    vol.put_raw(pack_id, bytes(raw))
    # A file in another frame: its range decodes and verifies; the damage is not this load's to find.
    os.unlink(dst / _in_frame(vol, 4))
    res = load_tree(dst, vol.store, vol.scope, ENV_KEY)
    assert res.restored == 1 and not _quarantined(vol)
    # A file in the damaged frame: the range fails, the whole read fails verification: quarantined, a miss.
    victim = _in_frame(vol, 1)
    os.unlink(dst / victim)
    res = load_tree(dst, vol.store, vol.scope, ENV_KEY)
    assert [p for p, _ in res.misses] == [victim] and res.corrupt == 1 and len(_quarantined(vol)) == 1
    assert not (dst / victim).exists()
    assert _contents(dst) == {p: d for p, d in files.items() if p != victim}


def test_a_full_load_verifies_a_multi_frame_pack_whole_and_quarantines_a_damaged_frame(stores, tmp_path):
    """A full load reads each pack whole and decodes its frames in one stream (blobstore._decode_across): damage
    inside a frame's blocks, which no header shows, still fails the whole pack's hash before any file is written."""
    files = _saved(stores, tmp_path)
    pack_id, table = _table(stores)
    raw = bytearray(stores.store_calls.inner.get(layout.blob(pack_id), limit=1 << 30))
    frame = table.frame(2)
    raw[frame.start + frame.length // 2] ^= 0x01  # mid-frame: headers and block headers as written
    stores.put_raw(pack_id, bytes(raw))
    # (the header walk still finds the frames the table records: only decoding can tell)
    assert [(length, n) for _, length, n in _frames(bytes(raw), limits.MAX_PACK_BYTES)] == list(table.sizes)
    res = load_tree(tmp_path / "dst", stores.store, stores.scope, ENV_KEY)
    assert res.restored == 0 and res.corrupt == len(files) and len(_quarantined(stores)) == 1
    assert stores.store_calls.ranged_gets["blobs"] == 0
    assert _contents(tmp_path / "dst") == {}


def _claiming(frame: bytes, size: int) -> bytes:
    """`frame` with its header's content size field rewritten to `size` (RFC 8878 §3.1.1.1.4: the field ends the
    header; a 2-byte field stores size - 256), the field's width kept."""
    end = zstandard.frame_header_size(frame)
    width = {0: 1, 1: 2, 2: 4, 3: 8}[frame[4] >> 6]
    value = size - 256 if width == 2 else size
    return frame[:end - width] + value.to_bytes(width, "little") + frame[end:]


def test_frames_whose_headers_trade_bytes_between_them_are_refused(vol):
    """Several frames are decoded as one stream: their claims' total alone would let a frame decode to more than
    its header records while its neighbour records as much less. zstd checks each frame against its own header,
    so such a blob is corrupt to every whole reader, never content at shifted offsets."""
    c = zstandard.ZstdCompressor(level=3, write_content_size=True)
    parts = [b"a" * 1000, b"b" * 3000, b"c" * 2000]
    frames = [c.compress(p) for p in parts]
    bid = blob_id(b"".join(parts))
    for traded in ([_claiming(frames[0], 999), _claiming(frames[1], 3001), frames[2]],
                   [_claiming(frames[0], 1001), _claiming(frames[1], 2999), frames[2]]):
        blob = b"".join(traded)
        assert sum(n for _, _, n in _frames(blob, limits.MAX_PACK_BYTES)) == sum(map(len, parts))
        vol.put_raw(bid, blob)
        with pytest.raises(BlobCorrupt):
            vol.store.read_bytes(bid, limits.MAX_PACK_BYTES)
        with pytest.raises(BlobCorrupt):
            vol.store.verify(bid)
        with pytest.raises(BlobCorrupt, match="quarantined"):
            vol.store.get_bytes(bid, limits.MAX_PACK_BYTES)
    vol.put_raw(bid, b"".join(frames))  # as written: read whole, one buffer
    assert vol.store.get_bytes(bid, limits.MAX_PACK_BYTES) == b"".join(parts)


@pytest.mark.parametrize("raw, why", [
    ("", "empty"),
    ("1,2,3", "odd"),
    ("0,10", "no compressed bytes"),
    ("100,0", "no content"),
    (f"{compress_bound(1000) + 1},1000", "over zstd's bound: an unbounded range"),
    (",".join(["9,1"] * (limits.MAX_PACK_FRAMES + 1)), "too many frames"),
    (f"{compress_bound(limits.MAX_PACK_BYTES)},{limits.MAX_PACK_BYTES},20,1", "over MAX_PACK_BYTES"),
    ("10,+10", "a sign"), ("10, 10", "a space"), ("10,1_0", "an underscore"), ("10,\u0661\u0660", "non-ASCII digits"),
    ("10,10,", "a trailing comma"), ("10,12345678901", "11 digits"),
    ([10, 10], "an array: the decoder refuses arrays longer than 5, so tables are strings"),
    (b"10,10", "bytes"),
])
def test_frame_tables_a_writer_could_not_make_are_ignored(raw, why):
    assert FrameTable.parse(raw) is None, why
    entry = loads(_with_frames_map({b"\2" * 32: raw})).entries["a"]
    assert entry.pack == (b"\2" * 32).hex() and entry.frames is None  # the entry stands; its pack is read whole


def _with_frames_map(frames: object) -> bytes:
    return msgpack.packb({"format": 2, "env_key": ENV_KEY, "env": {}, "created": 1.0, "updated": 1.0,
                          "entries": {"a": [b"\1" * 32, 10, 0o644, b"\2" * 32, 0]}, "frames": frames},
                         use_bin_type=True)


def test_frame_table_limits_and_junk_maps():
    most = ",".join(["9,1"] * limits.MAX_PACK_FRAMES)
    assert FrameTable.parse(most) is not None
    assert loads(_with_frames_map({b"\2" * 32: most})).entries["a"].frames == FrameTable.parse(most)
    # A map that is not pack id -> table is ignored as a whole or per key.
    for junk in ([1, 2], "x", {b"\2" * 31: "9,1"}, {"p" * 32: "9,1"}):
        assert loads(_with_frames_map(junk)).entries["a"].frames is None


def test_manifests_with_tables_pass_every_earlier_readers_decoder(vol, tmp_path):
    """Earlier loads, saves and gc (cas/refs.py, unchanged) decode manifests with these msgpack limits and ignore
    keys they do not know: a manifest with frame tables must stay readable to them (FORMAT §3), or an earlier saver
    would replace it as corrupt and an earlier gc would stop deleting."""
    from cas.refs import stored_refs

    _saved(vol, tmp_path)
    data = vol.scope.read_manifest_bytes(ENV_KEY)
    plain = zstandard.ZstdDecompressor().decompress(data)
    doc = msgpack.unpackb(plain, raw=False, strict_map_key=True, max_str_len=limits.MAX_PATH_BYTES, max_bin_len=32,
                          max_array_len=5, max_map_len=limits.MAX_ENTRIES)
    assert doc["frames"] and doc["format"] == 2
    refs = stored_refs(data, "m")
    assert refs.stored == {e.stored_id for e in vol.entries().values()}


def test_frame_tables_locate_files_by_content_offset():
    table = FrameTable.parse("50,100,40,100,30,60")
    assert table is not None and table.stored_size == 120
    assert table.frame_of(0, 100).index == 0 and table.frame_of(100, 100).index == 1
    assert table.frame_of(99, 2) is None  # straddles two frames: not a file a writer framed
    assert table.frame_of(260, 0).index == 2 and table.frame_of(261, 0) is None and table.frame_of(250, 20) is None
    f = table.frame(2)
    assert (f.start, f.length, f.content_start, f.content_length) == (90, 30, 200, 60)


# -- blob readers: several frames, bounded -----------------------------------------------------------------------------
def _frames_blob(parts: list[bytes]) -> bytes:
    c = zstandard.ZstdCompressor(level=3, write_content_size=True)
    return b"".join(c.compress(p) for p in parts)


def test_blob_readers_take_several_frames_and_refuse_what_is_not_them(vol):
    parts = [b"a" * 1000, b"", b"bc" * 50_000]
    good = _frames_blob(parts)
    bid = blob_id(b"".join(parts))
    vol.put_raw(bid, good)
    assert vol.store.get_bytes(bid, limits.MAX_PACK_BYTES) == b"".join(parts)
    vol.store.verify(bid)
    unsized = zstandard.ZstdCompressor(write_content_size=False).compress(b"x")
    for bad in (good + b"\0", good[:-1], good + unsized, _frames_blob([b"z"] * (limits.MAX_PACK_FRAMES + 1)), b""):
        vol.put_raw(bid, bad)
        with pytest.raises(BlobCorrupt):
            vol.store.read_bytes(bid, limits.MAX_PACK_BYTES)
        with pytest.raises(BlobCorrupt):
            vol.store.verify(bid)
    # Several frames claiming more than the limit together are refused on their headers.
    vol.put_raw(bid, _frames_blob([bytes(limits.MAX_PACK_BYTES // 2 + 1)] * 2))
    with pytest.raises(BlobCorrupt, match="claims more"):
        vol.store.get_bytes(bid, limits.MAX_PACK_BYTES)


def test_frame_walk_finds_the_boundaries_zstd_wrote():
    """_frames reads frame and block headers only (RFC 8878): its spans must be the frames as the compressor wrote
    them, whatever the block kinds (raw, RLE, compressed) and with or without checksums."""
    rng = random.Random(11)
    for checksum in (False, True):
        c = zstandard.ZstdCompressor(level=3, write_content_size=True, write_checksum=checksum)
        parts = [rng.randbytes(rng.randint(0, 300_000)) if i % 3 == 0 else
                 bytes(rng.randint(0, 300_000)) if i % 3 == 1 else _text(rng, rng.randint(1, 300_000))
                 for i in range(12)]
        frames = [c.compress(p) for p in parts]
        blob = b"".join(frames)
        starts = [sum(len(f) for f in frames[:i]) for i in range(len(frames))]
        assert _frames(blob, limits.MAX_PACK_BYTES) == [(s, len(f), len(p))
                                                        for s, f, p in zip(starts, frames, parts, strict=True)]


def test_a_store_made_before_frames_keeps_one_frame_per_pack(tmp_path):
    """CAS-FORMAT without `pack_frames` (FORMAT §2): readers before frames may share the store, so packs stay one
    frame there; a new store's CAS-FORMAT says `pack_frames`, and an earlier reader's parse of it still works."""
    from cas.blobstore import FORMAT_LINE

    old = PosixBackend(tmp_path / "old", create=True)
    old.put(layout.FORMAT, FORMAT_LINE + msgpack.packb({"freshen_after": 3600}))
    s = Stores(old, PosixBackend(tmp_path / "scope", create=True))
    assert not s.store.pack_frames
    files = _saved(s, tmp_path)
    assert {e.frames for e in s.entries().values()} == {None}
    res = _loaded(s, tmp_path, files, [_in_frame_plain(s, 4)])
    assert res.restored == 1 and s.store_calls.ranged_gets["blobs"] == 0

    new = BlobStore(tmp_path / "new", create=True)
    assert new.pack_frames
    config = msgpack.unpackb(new.backend.get(layout.FORMAT, limit=1 << 16)[len(FORMAT_LINE):], raw=False,
                             max_map_len=64, max_str_len=1024)  # the limits every reader parses it with
    assert config == {"freshen_after": 3600, "pack_frames": True}


def test_verify_streams_blobs_larger_than_a_pack_and_holds_packs_in_memory(vol):
    """verify (cas check --read-data) reads a blob whose first frame is within a pack's bound by the in-memory
    rules (several frames) and streams a larger one (one frame), so a 64 GiB blob never sits in memory."""
    big = bytes(range(256)) * ((limits.MAX_PACK_BYTES + 4096) // 256)  # one frame, more than a pack's content
    bid = blob_id(big)
    vol.put_raw(bid, zstandard.ZstdCompressor(level=1, write_content_size=True).compress(big))
    vol.store.verify(bid)
    vol.put_raw(bid, _frames_blob([big[:100], big[100:]]))  # the same content as two frames: beyond a pack's bound
    with pytest.raises(BlobCorrupt):
        vol.store.verify(bid)
    small = _frames_blob([b"x" * 10, b"y" * 20])
    vol.put_raw(blob_id(b"x" * 10 + b"y" * 20), small)
    vol.store.verify(blob_id(b"x" * 10 + b"y" * 20))


def test_get_frames_refuses_unbounded_ranges_before_any_request(vol, tmp_path):
    from cas.blobstore import RangeUnusable

    _saved(vol, tmp_path)
    pack_id, table = _table(vol)
    vol.reset()
    for start, frames in [(0, []), (-1, [table.sizes[0]]), (0, [(compress_bound(1000) + 1, 1000)]),
                          (0, [(compress_bound(limits.MAX_PACK_BYTES), limits.MAX_PACK_BYTES), (9, 1)])]:
        with pytest.raises(RangeUnusable):
            vol.store.get_frames(pack_id, start, frames)
    assert sum(vol.store_calls.calls.values()) == 0
    first = table.frame(0)
    content = vol.store.get_frames(pack_id, first.start, [table.sizes[0]])
    assert len(content) == first.content_length and vol.store_calls.got_bytes["blobs"] == first.length


def test_cas_enable_pack_frames_upgrades_a_store_made_before_frames(tmp_path, capsys):
    """`cas enable-pack-frames` adds the key to an existing store's CAS-FORMAT (keeping the rest), once: after it
    a save writes framed packs there and a partial load fetches ranges; a second run changes nothing."""
    from cas import cli
    from cas.blobstore import FORMAT_LINE

    old = PosixBackend(tmp_path / "old", create=True)
    old.put(layout.FORMAT, FORMAT_LINE + msgpack.packb({"freshen_after": 7200}))
    assert cli.main(["--org", str(tmp_path / "old"), "--scope", str(tmp_path / "scope"), "enable-pack-frames"]) == 0
    assert "pack_frames enabled" in capsys.readouterr().out
    config = msgpack.unpackb(old.get(layout.FORMAT, limit=1 << 16)[len(FORMAT_LINE):], raw=False)
    assert config == {"freshen_after": 7200, "pack_frames": True}
    assert cli.main(["--org", str(tmp_path / "old"), "--json", "enable-pack-frames"]) == 0
    assert '"changed": false' in capsys.readouterr().out

    s = Stores(old, PosixBackend(tmp_path / "scope", create=True))
    assert s.store.pack_frames
    files = _saved(s, tmp_path)
    assert any(e.frames for e in s.entries().values())
    res = _loaded(s, tmp_path, files, [_in_frame_plain(s, 4)])
    assert res.restored == 1 and s.store_calls.ranged_gets["blobs"] >= 1


def test_cas_enable_pack_frames_on_no_store_is_an_error(tmp_path, capsys):
    from cas import cli

    assert cli.main(["--org", str(tmp_path / "none"), "enable-pack-frames"]) == 2
    assert "enable-pack-frames" in capsys.readouterr().err
