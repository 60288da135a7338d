"""Manifests: path -> (blob id, size, mode[, pack, offset]) for one deployment and environment (docs/FORMAT.md §3),
and each pack's frame table (where its files can be fetched alone).

Parsing treats the bytes as hostile: size and count limits are enforced by the msgpack decoder itself, and any
entry that is not exactly what the format allows rejects the whole manifest.
"""
from __future__ import annotations

import bisect
import re
import time
from dataclasses import dataclass, field

import msgpack
import zstandard

from . import limits, nogc
from .blobstore import Decoded, compress_bound
from .errors import ManifestError, TooLarge, UnsafePath
from .paths import check_entry_path

# 2 added the pack location of small files (entries of five elements). Version 1 manifests are still read.
# A manifest file is a zstd frame of the msgpack map (a plain msgpack map is read too: it cannot start with these
# bytes). Compressed, a manifest of 680 entries shrinks ~3x: it is stored twice per deployment (scope and store).
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
ZSTD_LEVEL = 3
# The optional `frames` map (each pack's frame table, FORMAT §3) left the version at 2: earlier readers ignore keys
# they do not know, as they did `parent`, whereas a saver of an earlier version that met a version it cannot read
# would replace the whole manifest with its own files (save.py `_read_current`).
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
_ID_BYTES = 32


# A stored frame table: ASCII decimal numbers (at most 10 digits: the content bound is far below 10**10) separated
# by commas; the decoder's string limit (limits.MAX_PATH_BYTES) bounds its length.
_TABLE = re.compile(r"[0-9]{1,10}(?:,[0-9]{1,10})*")


@dataclass(frozen=True)
class Frame:
    """One frame of a pack (FORMAT §2): bytes [start, start+length) of the pack blob decode to content bytes
    [content_start, content_start+content_length)."""

    index: int
    start: int
    length: int
    content_start: int
    content_length: int


@dataclass(frozen=True, eq=True)
class FrameTable:
    """A pack's frames in order, as (compressed length, content length) pairs: the frames tile the blob and its
    content, so the starts are running sums. A claim like any location (FORMAT §3): whatever a reader takes through
    it is checked frame by frame and file by file."""

    sizes: tuple[tuple[int, int], ...]
    _starts: tuple[tuple[int, ...], tuple[int, ...]] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        starts, content_starts = [0], [0]
        for length, content in self.sizes:
            starts.append(starts[-1] + length)
            content_starts.append(content_starts[-1] + content)
        object.__setattr__(self, "_starts", (tuple(starts), tuple(content_starts)))

    @property
    def stored_size(self) -> int:
        return self._starts[0][-1]

    def frame(self, index: int) -> Frame:
        starts, content_starts = self._starts
        length, content = self.sizes[index]
        return Frame(index, starts[index], length, content_starts[index], content)

    def frame_of(self, offset: int, size: int) -> Frame | None:
        """The frame holding content bytes [offset, offset+size) whole, or None (a file never straddles frames)."""
        index = self.index_of(offset, size)
        return None if index is None else self.frame(index)

    def index_of(self, offset: int, size: int) -> int | None:
        """frame_of's index alone: a load plans every entry of every pack through it, and a Frame per entry cost
        a full load of 20,000 files ~40 ms (docs/benchmarks.md)."""
        content_starts = self._starts[1]
        # (an empty file at the very end of the content belongs to the last frame)
        index = min(bisect.bisect_right(content_starts, offset) - 1, len(self.sizes) - 1)
        if index < 0 or offset + size > content_starts[index + 1]:
            return None
        return index

    def dump(self) -> str:
        """As stored (FORMAT §3): "c0,n0,c1,n1,..." in decimal, a string because every reader's decoder limits
        (arrays of at most 5 elements, bins of at most 32 bytes) let through strings of up to 4 KiB."""
        return ",".join(str(n) for pair in self.sizes for n in pair)

    @classmethod
    def parse(cls, value: object) -> FrameTable | None:
        """A table as stored, or None if it is not one a writer could have made: at most MAX_PACK_FRAMES frames,
        every frame of 1 content byte or more and no larger than zstd's bound for it, at most MAX_PACK_BYTES of
        content. Bounds every range a reader asks for through it."""
        if type(value) is not str or not _TABLE.fullmatch(value):
            return None
        numbers = [int(n) for n in value.split(",")]
        if len(numbers) % 2 or len(numbers) > 2 * limits.MAX_PACK_FRAMES:
            return None
        sizes = tuple(zip(numbers[::2], numbers[1::2], strict=True))
        if not all(0 < length <= compress_bound(content) and content > 0 for length, content in sizes):
            return None
        if sum(content for _, content in sizes) > limits.MAX_PACK_BYTES:
            return None
        return cls(sizes)


@dataclass(frozen=True)
class Entry:
    """One file. `blob_id` is the blake3 of its content. A small file is stored inside a pack (FORMAT §2): `pack` is
    the id of the pack blob and `offset` where the file starts in the pack's uncompressed content. The location is
    not part of the file's identity: two entries with the same content are equal wherever they are stored."""

    blob_id: str  # 64 lowercase hex digits
    size: int
    mode: int  # permission bits only
    pack: str | None = field(default=None, compare=False)
    offset: int = field(default=0, compare=False)
    # The pack's frame table, when the manifest records one (FORMAT §3: shared by the pack's entries; None for
    # loose files and for packs written before frames, which are read whole).
    frames: FrameTable | None = field(default=None, compare=False, repr=False)

    @property
    def stored_id(self) -> str:
        """The blob the store must keep for this entry: its pack, or the file's own blob."""
        return self.pack or self.blob_id

    def located(self, pack: str | None, offset: int = 0, frames: FrameTable | None = None) -> Entry:
        return Entry(self.blob_id, self.size, self.mode, pack, offset, frames if pack is not None else None)

    def pack_fields(self) -> list:
        fields = [bytes.fromhex(self.blob_id), self.size, self.mode]
        if self.pack is not None:
            fields += [bytes.fromhex(self.pack), self.offset]
        return fields


@dataclass
class Manifest:
    env_key: str
    env: dict[str, str] = field(default_factory=dict)
    entries: dict[str, Entry] = field(default_factory=dict)
    created: float = 0.0
    updated: float = 0.0
    # The blob id of the manifest bytes this one replaced ("" for the first, or one written before this field):
    # lets a save tell its own stale gc root from a root another scope wrote under the same scope id (FORMAT §4).
    parent: str = ""

    @property
    def total_size(self) -> int:
        return sum(e.size for e in self.entries.values())

    def blob_ids(self) -> set[str]:
        """The blobs this manifest needs the store to keep (packs for packed entries)."""
        return {e.stored_id for e in self.entries.values()}

    def changes_from(self, entries: dict[str, Entry]) -> dict[str, Entry]:
        """The subset of `entries` this manifest does not already hold identically."""
        return {p: e for p, e in entries.items() if self.entries.get(p) != e}

    def merged(self, incoming: dict[str, Entry], env: dict[str, str], now: float | None = None) -> Manifest:
        """Union with `incoming`; on a path held by both with different content, `incoming` (the newer save) wins."""
        now = time.time() if now is None else now
        entries = dict(self.entries)
        entries.update(incoming)
        return Manifest(self.env_key, dict(env or self.env), entries, self.created or now, now, self.parent)

    def dumps(self) -> bytes:
        """The manifest file's bytes: one zstd frame (recording its size) of the msgpack map (FORMAT §3). Raises
        TooLarge when a reader would refuse the result (FORMAT §3: writers enforce every reader limit), so no save
        can leave a manifest that every load then reports as corrupt."""
        if len(self.entries) > limits.MAX_ENTRIES:
            raise TooLarge(f"manifest {self.env_key}: {len(self.entries)} entries, over the {limits.MAX_ENTRIES} limit")
        plain = self.dumps_plain()
        if len(plain) > limits.MAX_MANIFEST_BYTES:
            raise TooLarge(f"manifest {self.env_key}: {len(plain)} bytes, over the {limits.MAX_MANIFEST_BYTES} limit")
        # A compressor per call: zstd contexts are not thread-safe, and a manifest is written once per save.
        return zstandard.ZstdCompressor(level=ZSTD_LEVEL, write_content_size=True).compress(plain)

    def dumps_plain(self) -> bytes:
        return msgpack.packb(
            {
                "format": FORMAT_VERSION,
                "env_key": self.env_key,
                "env": self.env,
                "created": float(self.created),
                "updated": float(self.updated),
                "entries": {p: e.pack_fields() for p, e in sorted(self.entries.items())},
                **({"parent": bytes.fromhex(self.parent)} if self.parent else {}),
                **({"frames": frames} if (frames := self._frame_tables()) else {}),
            },
            use_bin_type=True,
        )

    def _frame_tables(self) -> dict[bytes, str]:
        """pack id -> its frame table, for every pack an entry names with a table (FORMAT §3). Entries of one pack
        carry the same table unless a peer claimed another (save.py `_located`); the first in path order wins,
        since a wrong one only costs a reader the whole pack."""
        tables: dict[bytes, str] = {}
        for _, e in sorted(self.entries.items()):
            # (a table longer than every reader's decoder takes, 4 KiB, is never made: 65 frames are ~1 KiB)
            if e.pack is not None and e.frames is not None and len(table := e.frames.dump()) <= limits.MAX_PATH_BYTES:
                tables.setdefault(bytes.fromhex(e.pack), table)
        return tables


def loads(data: Decoded, source: object = "<manifest>", limit: int = limits.MAX_MANIFEST_BYTES) -> Manifest:
    """Parse and validate a manifest. Raises ManifestError naming `source` on any violation. `limit` bounds the
    manifest's plain size (compressed or not): readers of other deployments' manifests use a lower one."""
    with nogc.paused():  # a few objects per entry, no cycles: collections would only walk the heap (cas/nogc.py)
        return _loads(data, source, limit)


def _loads(data: Decoded, source: object, limit: int) -> Manifest:
    if len(data) > limit:
        raise ManifestError(source, f"{len(data)} bytes exceeds the {limit} byte limit")
    if not data:
        raise ManifestError(source, "empty file")
    if data[:4] == ZSTD_MAGIC:
        data = _decompress(data, source, limit)
    try:
        doc = msgpack.unpackb(
            data,
            raw=False,
            strict_map_key=True,
            use_list=True,
            max_str_len=limits.MAX_PATH_BYTES,
            max_bin_len=_ID_BYTES,
            max_array_len=5,
            max_map_len=max(limits.MAX_ENTRIES, limits.MAX_ENV_ITEMS),
            object_pairs_hook=_map_without_duplicates,
        )
    except _DuplicateKey as exc:
        raise ManifestError(source, f"duplicate key {exc.args[0]!r}") from None
    except msgpack.ExtraData:
        raise ManifestError(source, "trailing bytes after the manifest") from None
    except (ValueError, msgpack.UnpackException, RecursionError, MemoryError) as exc:
        raise ManifestError(source, f"not a valid msgpack manifest ({type(exc).__name__}: {exc})") from None
    except Exception as exc:  # noqa: BLE001 - msgpack raises assorted types on hostile input (StackError: deep nesting)
        raise ManifestError(source, f"not a valid msgpack manifest ({type(exc).__name__}: {exc})") from None

    if not isinstance(doc, dict):
        raise ManifestError(source, f"top level is {type(doc).__name__}, not a map")
    version = doc.get("format")
    if isinstance(version, bool) or version not in READABLE_VERSIONS:
        raise ManifestError(source, f"format {version!r}, this code reads {READABLE_VERSIONS}")
    env_key = doc.get("env_key")
    if not isinstance(env_key, str):
        raise ManifestError(source, "env_key missing or not a string")
    env = doc.get("env", {})
    if not isinstance(env, dict) or len(env) > limits.MAX_ENV_ITEMS or not all(
        isinstance(k, str) and isinstance(v, str) and len(v) <= limits.MAX_ENV_VALUE_BYTES for k, v in env.items()
    ):
        raise ManifestError(source, "env must be a small map of strings")
    created, updated = doc.get("created", 0.0), doc.get("updated", 0.0)
    if not isinstance(created, (int, float)) or not isinstance(updated, (int, float)):
        raise ManifestError(source, "created/updated must be numbers")
    raw_entries = doc.get("entries")
    if not isinstance(raw_entries, dict):
        raise ManifestError(source, "entries missing or not a map")
    if len(raw_entries) > limits.MAX_ENTRIES:
        raise ManifestError(source, f"{len(raw_entries)} entries exceeds the limit of {limits.MAX_ENTRIES}")
    tables = _frame_tables(doc.get("frames"))
    entries: dict[str, Entry] = {}
    for path, value in raw_entries.items():
        try:
            check_entry_path(path)
        except UnsafePath as exc:
            raise ManifestError(source, f"illegal entry: {exc}") from None
        entries[path] = _entry(value, path, source, version, tables)
    parent = doc.get("parent", b"")
    parent_id = parent.hex() if isinstance(parent, bytes) and len(parent) == _ID_BYTES else ""
    return Manifest(env_key, env, entries, float(created), float(updated), parent_id)


def _decompress(data: Decoded, source: object, limit: int = limits.MAX_MANIFEST_BYTES) -> bytes:
    """A compressed manifest, bounded by the same limit as a plain one: a frame claiming more is refused unread."""
    try:
        claimed = zstandard.frame_content_size(data)
    except zstandard.ZstdError as exc:
        raise ManifestError(source, f"not a zstd frame: {exc}") from None
    if claimed < 0:
        raise ManifestError(source, "zstd frame does not record its size")
    if claimed > limit:
        raise ManifestError(source, f"decompresses to {claimed} bytes, over the {limit} limit")
    try:
        # zstd checks the output against the size the header records (bounded above), and a decompressobj tells
        # what follows the frame: a manifest file is exactly one frame.
        frame = zstandard.ZstdDecompressor().decompressobj()
        plain = frame.decompress(data)
    except zstandard.ZstdError as exc:
        raise ManifestError(source, f"undecodable zstd frame: {exc}") from None
    if not frame.eof or frame.unused_data:
        raise ManifestError(source, "truncated zstd frame, or bytes after it")
    if len(plain) != claimed or plain[:4] == ZSTD_MAGIC:
        raise ManifestError(source, "zstd frame does not hold one msgpack manifest")
    return plain


class _DuplicateKey(Exception):
    pass


def _map_without_duplicates(pairs: list) -> dict:
    result = dict(pairs)
    if len(result) != len(pairs):
        seen = set()
        for key, _ in pairs:
            if key in seen:
                raise _DuplicateKey(key)
            seen.add(key)
    return result


def _frame_tables(raw: object) -> dict[str, FrameTable]:
    """The optional `frames` map (FORMAT §3): pack id -> frame table. A hint, not content: a table that is not one
    a writer could have made is ignored (its pack's files are then read from the whole pack), never an error."""
    if not isinstance(raw, dict):
        return {}
    tables: dict[str, FrameTable] = {}
    for pack, value in raw.items():
        if type(pack) is bytes and len(pack) == _ID_BYTES and (table := FrameTable.parse(value)) is not None:
            tables[pack.hex()] = table
    return tables


def _entry(value: object, path: str, source: object, version: int, tables: dict[str, FrameTable]) -> Entry:
    # The common case, checked in one expression (`type(x) is int` also refuses bool, as the full check does); any
    # doubt goes to the full check, which says what is wrong.
    if type(value) is list:
        if len(value) == 5 and version >= 2:
            blob, size, mode, pack, offset = value
            if (type(blob) is bytes and len(blob) == _ID_BYTES and type(size) is int
                    and 0 <= size <= limits.MAX_ENTRY_SIZE and type(mode) is int and 0 <= mode <= 0o777
                    and type(pack) is bytes and len(pack) == _ID_BYTES and type(offset) is int
                    and 0 <= offset and offset + size <= limits.MAX_PACK_BYTES):
                pack_id = pack.hex()
                return Entry(blob.hex(), size, mode, pack_id, offset, tables.get(pack_id) if tables else None)
        elif len(value) == 3:
            blob, size, mode = value
            if (type(blob) is bytes and len(blob) == _ID_BYTES and type(size) is int
                    and 0 <= size <= limits.MAX_ENTRY_SIZE and type(mode) is int and 0 <= mode <= 0o777):
                return Entry(blob.hex(), size, mode)
    return _entry_checked(value, path, source, version, tables)


def _entry_checked(value: object, path: str, source: object, version: int, tables: dict[str, FrameTable]) -> Entry:
    lengths = (3, 5) if version >= 2 else (3,)
    if not (isinstance(value, list) and len(value) in lengths):
        raise ManifestError(source, f"entry {path!r} is not [id, size, mode] or [id, size, mode, pack, offset]")
    blob, size, mode = value[:3]
    if not (isinstance(blob, bytes) and len(blob) == _ID_BYTES):
        raise ManifestError(source, f"entry {path!r}: blob id is not {_ID_BYTES} bytes")
    if not (isinstance(size, int) and not isinstance(size, bool) and 0 <= size <= limits.MAX_ENTRY_SIZE):
        raise ManifestError(source, f"entry {path!r}: size {size!r} out of range")
    if not (isinstance(mode, int) and not isinstance(mode, bool) and 0 <= mode <= 0o777):
        raise ManifestError(source, f"entry {path!r}: mode {mode!r} out of range")
    if len(value) == 3:
        return Entry(blob.hex(), size, mode)
    pack, offset = value[3:]
    if not (isinstance(pack, bytes) and len(pack) == _ID_BYTES):
        raise ManifestError(source, f"entry {path!r}: pack id is not {_ID_BYTES} bytes")
    # A packed file lies wholly inside a pack, whose content is bounded (FORMAT §2): anything else is not ours.
    if not (isinstance(offset, int) and not isinstance(offset, bool) and 0 <= offset
            and offset + size <= limits.MAX_PACK_BYTES):
        raise ManifestError(source, f"entry {path!r}: offset {offset!r} puts it outside any pack")
    return Entry(blob.hex(), size, mode, pack.hex(), offset, tables.get(pack.hex()))
