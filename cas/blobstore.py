"""The org store's blobs: content-addressed, zstd-compressed files verified on every read (docs/FORMAT.md §2).

Storage verbs only (put, get, stat, freshen, quarantine, list); which blobs a tree needs is `save.py`'s business.
"""
from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass
from typing import BinaryIO, TypeVar, cast

import blake3
import msgpack
import zstandard

from . import _faults, layout, limits, localfs, timing
from .backends import open_location
from .errors import BlobCorrupt, BlobMissing, CasError, FormatError, StoreUnavailable
from .storage import AlreadyExists, Backend, BadObject, NotFound, ObjectInfo, ObjectTooLarge, Payload

T = TypeVar("T")
# A decoded blob: bytes when it was one frame, a bytearray when it was several (a pack's frames, decoded into one
# buffer without a second copy: _decode_across).
Decoded = bytes | bytearray
log = logging.getLogger("cas.blobstore")

FORMAT_LINE = b"cas-store 1\n"
# CAS-FORMAT key (FORMAT §2): writers store packs as several frames. The first writer of a new store writes it; a
# store made before frames lacks it, and its writers keep one frame per pack, because readers before frames (an org's
# older deployments share its store) decode only a blob's first frame and would quarantine a framed pack.
PACK_FRAMES_KEY = "pack_frames"
FANOUT = list(layout.FANOUT)

# zstd level 3 compresses Inductor's text artifacts ~4-6x at several hundred MB/s per core: the volume, not the
# CPU, stays the bottleneck. Higher levels cost seconds for a few percent.
ZSTD_LEVEL = 3
# Files up to this size are read, compressed and hashed in one piece (fewest syscalls); larger ones stream, so
# memory stays bounded whatever the cache holds.
WHOLE_FILE_LIMIT = 8 << 20
CHUNK = 1 << 20
# Writers freshen a relied-upon blob at most once an hour (docs/FORMAT.md §2): cas/timing.py, with the others.
DEFAULT_FRESHEN_AFTER = timing.DEFAULT_FRESHEN_AFTER


is_blob_id = layout.is_blob_id


def hash_file(path: str) -> tuple[str, int]:
    """blake3 hex digest and size of a local file."""
    hasher = blake3.blake3()
    size = 0
    with open(path, "rb", buffering=0) as fh:
        while chunk := fh.read(CHUNK):
            hasher.update(chunk)
            size += len(chunk)
    return hasher.hexdigest(), size


def compress_bound(size: int) -> int:
    """Largest zstd frame a `size`-byte input can need (ZSTD_COMPRESSBOUND plus header room)."""
    return size + (size >> 8) + 1024


class SourceChanged(Exception):
    """The local file changed between hashing and uploading; the upload was discarded."""


@dataclass(frozen=True)
class BlobInfo:
    id: str
    key: str
    stored_size: int
    mtime: float
    version: str = ""
    path: str = ""  # on a volume, for tests and messages; `cas` itself uses `key`


class BlobStore:
    """The org store: blobs, trash and quarantine over a storage backend (a directory path is a POSIX volume, an
    `s3://bucket/prefix` URL an object store: cas/backends.py).
    Creates the format file on first write use; refuses other format versions."""

    def __init__(
        self,
        root: str | os.PathLike | Backend,
        *,
        create: bool = True,
        freshen_after: float | None = None,
        clock: Callable[[], float] = time.time,
    ):
        self.backend: Backend = open_location(root, create=create)
        self.root = self.backend.location
        self._clock = clock
        self._local = threading.local()  # zstd contexts are not thread-safe: one per thread
        # Resolved once the format file was read and found ours (or absent, for a creator): writes wait for it.
        self._writable: Future[None] = Future()
        # Resolved with freshen_after once the store is open (on a new store: its format file created).
        self._opened: Future[float] = Future()
        self._pack_frames = False  # from the format file (FORMAT §2, Packs): read through `pack_frames`
        if create and self.backend.atomic_replace:
            # An object store is opened in the background while the save reads its scope and hashes its files: the
            # format file's read (and a new store's create) leaves a first save's chain of round trips (FORMAT §3a).
            # Its errors surface at the first write, or at the commit (`ready`), as the same exceptions.
            threading.Thread(target=self._open_into_futures, args=(create, freshen_after), name="cas-store-open",
                             daemon=True).start()
        else:
            self._open_into_futures(create, freshen_after)
            self.ready()  # a volume, or a reader: opened (or refused) before the constructor returns

    @property
    def freshen_after(self) -> float:
        return self._opened.result()

    @property
    def pack_frames(self) -> bool:
        """Whether saves may write packs of several frames: the format file says so (FORMAT §2, Packs). Known once
        the store may be written (a new store's is its creator's, True)."""
        self._writable.result()
        return self._pack_frames

    def ready(self) -> None:
        """Wait until the store is open (its format file read, or on a new store created); raises what opening
        raised (FormatError, StoreUnavailable). A save calls it before it commits."""
        self._opened.result()

    def ready_to_write(self) -> None:
        """Wait until the format file was read (and found ours, or absent on a new store whose creation may still be
        in flight); raises what that read raised. A caller about to write elsewhere first (a save slot) calls it, so
        that a missing bucket fails before anything is written (SeaweedFS would create the bucket on a PUT)."""
        self._writable.result()

    # -- layout ------------------------------------------------------------------------------------------------
    def _open_into_futures(self, create: bool, freshen_after: float | None) -> None:
        try:
            value = float(self._open(create, freshen_after))
        except BaseException as exc:  # noqa: BLE001 - handed to whoever waits (the constructor, or the first write)
            for future in (self._writable, self._opened):
                if not future.done():
                    future.set_exception(exc)
            return
        if not self._writable.done():
            self._writable.set_result(None)
        self._opened.set_result(value)

    def _open(self, create: bool, freshen_after: float | None) -> float:
        config = self._read_format()
        if config is None:
            if not create:
                raise StoreUnavailable(f"no store at {self.root}")
            # No format file: no other version to refuse, so blobs may be written while it is created (an object
            # store has no areas to make first; a reader takes the store for absent until the file is there).
            body = {"freshen_after": int(freshen_after if freshen_after is not None else DEFAULT_FRESHEN_AFTER),
                    PACK_FRAMES_KEY: True}
            if self.backend.atomic_replace:
                self._pack_frames = True  # what this creator writes; a racing creator's file is read below
                self._writable.set_result(None)
            try:
                # The areas first, the format file last: a store with a format file has its whole layout. The
                # fan-out prefixes blobs/<xx> and trash/<xx> are made by the first write into each (FORMAT §2).
                for area in layout.STORE_AREAS:
                    self.backend.make_prefix(area + "/")
                self.backend.put(layout.FORMAT, FORMAT_LINE + msgpack.packb(body), if_absent=True)
                # An object store's create has one winner, ours: nothing to read back. A volume may have fallen
                # back to check-then-rename (no hard links, FORMAT §1), where a racing creator can win after us.
                created = self.backend.atomic_replace
            except AlreadyExists:
                created = False  # a concurrent first writer: its file wins, read below
            except BadObject as exc:
                raise StoreUnavailable(f"cannot initialise store at {self.root}: {exc}") from None
            config = body if created else (self._read_format() or body)
        self._pack_frames = config.get(PACK_FRAMES_KEY) is True
        value = config.get("freshen_after", DEFAULT_FRESHEN_AFTER)
        if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
            raise FormatError(f"store {self.root}: bad freshen_after {value!r} in CAS-FORMAT")
        return value

    def _read_format(self) -> dict | None:
        try:
            data = self.backend.get(layout.FORMAT, limit=limits.MAX_SMALL_FILE_BYTES)
        except NotFound:
            return None
        except (BadObject, ObjectTooLarge) as exc:
            raise FormatError(f"store {self.root}: CAS-FORMAT is unusable: {exc}") from None
        if not data.startswith(FORMAT_LINE):
            first = data.split(b"\n", 1)[0][:80]
            raise FormatError(f"store {self.root} has format {first!r}; this code speaks {FORMAT_LINE.strip()!r}")
        rest = data[len(FORMAT_LINE):]
        if not rest:
            return {}
        try:
            config = msgpack.unpackb(rest, raw=False, max_map_len=64, max_str_len=1024)
        except Exception as exc:
            raise FormatError(f"store {self.root}: unreadable CAS-FORMAT config: {exc}") from exc
        return config if isinstance(config, dict) else {}

    def enable_pack_frames(self) -> bool:
        """Set `"pack_frames": true` in CAS-FORMAT (FORMAT §2, Packs) of an existing store; False if already set.

        For an operator, once no reader older than frames uses the store. A conditional write of the file as read:
        a concurrent change of it raises PreconditionFailed, and nothing else of the file changes."""
        info = self.backend.stat(layout.FORMAT)
        config = self._read_format()
        if info is None or config is None:
            raise StoreUnavailable(f"no store at {self.root}")
        if config.get(PACK_FRAMES_KEY) is True:
            return False
        body = dict(config, **{PACK_FRAMES_KEY: True})
        self.backend.put(layout.FORMAT, FORMAT_LINE + msgpack.packb(body), if_version=info.version)
        self._pack_frames = True
        return True

    def blob_path(self, blob_id: str) -> str:
        """The blob's path on a POSIX volume (tests and tools; `cas` itself goes through the backend)."""
        return os.path.join(self.root, layout.blob(blob_id))

    def trash_path(self, blob_id: str) -> str:
        return os.path.join(self.root, layout.trash(blob_id))

    @property
    def _cctx(self) -> zstandard.ZstdCompressor:
        cctx = getattr(self._local, "cctx", None)
        if cctx is None:
            cctx = self._local.cctx = zstandard.ZstdCompressor(level=ZSTD_LEVEL, write_content_size=True)
        return cctx

    # -- clock -------------------------------------------------------------------------------------------------
    def server_now(self) -> float:
        """Now by the store's clock (FORMAT §1)."""
        return self.backend.now()

    # -- existence ---------------------------------------------------------------------------------------------
    def stat(self, blob_id: str, *, from_trash: bool = True) -> ObjectInfo | None:
        """Stat a blob, bringing it back from trash if gc retired it (FORMAT §2; `from_trash=False`: a writer that
        can store the blob again does not look there). None if absent (something that is not a plain object at its
        key counts as absent: a save replaces it)."""
        key = layout.blob(blob_id)
        try:
            return self.backend.stat(key)
        except NotFound:
            pass
        except BadObject:
            return None
        if not from_trash or not self.untrash(blob_id):
            return None
        log.info("restored blob %s from trash", blob_id)
        try:
            self.backend.touch(key)
            return self.backend.stat(key)
        except CasError:
            return None

    def untrash(self, blob_id: str) -> bool:
        """Move a blob from trash back into blobs/. False if it is not in trash (or cannot be moved)."""
        self.ready_to_write()
        try:
            self.backend.move(layout.trash(blob_id), layout.blob(blob_id))
            return True
        except CasError:
            return False

    def ensure_fresh(self, blob_id: str, *, from_trash: bool = True) -> bool:
        """True if the blob is stored; freshens its mtime if older than freshen_after (a save relies on it).
        `from_trash=False`: a writer that holds the content and stores it again when absent (FORMAT §2)."""
        info = self.stat(blob_id, from_trash=from_trash)
        if info is None:
            return False
        return self._freshen(info)

    def _freshen(self, info: ObjectInfo) -> bool:
        """Touch a stored blob older than freshen_after; False if it vanished meanwhile."""
        if self.server_now() - info.mtime > self.freshen_after:
            try:
                self.backend.touch(info.key)
            except NotFound:
                return False  # collected between stat and touch (only possible past the grace assumption)
        return True

    # -- writing -----------------------------------------------------------------------------------------------
    def put_file(self, src: str | int, blob_id: str, size: int, *, seen_absent: bool = False) -> int:
        """Store local file `src`, which hashed to `blob_id`. Returns bytes written, 0 when the blob was already
        stored (it is then freshened). Raises SourceChanged if the file no longer hashes to `blob_id`; the blob is
        then not stored. `seen_absent`: the caller's `stat` just found no blob, so a plain put (on S3 multipart
        above 64 MiB) replaces the create-if-absent; identical content makes an overwrite harmless either way."""

        def fill(out: BinaryIO) -> None:
            with localfs.open_source(src) as inp:  # an fd checked against the scan, or a path: no symlink, no FIFO
                digest, read = self._compress_into(inp, out, size)
            _faults.checkpoint("blob-written")
            if digest != blob_id or read != size:
                raise SourceChanged(f"{src} changed while being saved")

        if seen_absent:
            return self._put(blob_id, fill).size
        return self._create(blob_id, fill)

    def _put(self, blob_id: str, data: Payload) -> ObjectInfo:
        self.ready_to_write()
        key = layout.blob(blob_id)
        try:
            return self.backend.put(key, data)
        except BadObject:
            # Something planted at the blob's name (a directory): set it aside, store the real one.
            self.quarantine(blob_id)
            return self.backend.put(key, data)

    def _create(self, blob_id: str, data: Payload) -> int:
        """Store a blob with one create-if-absent put (FORMAT §2: no stat, no look into trash first). Returns the
        bytes written, or 0 when `blobs/` already had it: that copy is then checked to be a plain object and
        freshened, as a writer relying on a stored blob does. A copy in trash is not looked for: this one makes it a
        duplicate that gc deletes."""
        self.ready_to_write()
        key = layout.blob(blob_id)
        try:
            return self.backend.put(key, data, if_absent=True).size
        except AlreadyExists:
            pass
        except BadObject:
            return self._put(blob_id, data).size
        try:
            info = self.backend.stat(key)
        except NotFound:  # gc moved it to trash since the put found it: store it again
            return self._put(blob_id, data).size
        except BadObject:  # a directory at the name (link(2) says "exists" for one): set aside, store the blob
            return self._put(blob_id, data).size
        if not self._freshen(info):
            return self._put(blob_id, data).size
        return 0

    def _compress_into(self, inp: BinaryIO, out: BinaryIO, size: int) -> tuple[str, int]:
        if size <= WHOLE_FILE_LIMIT:
            data = inp.read(size + 1)
            out.write(self._cctx.compress(data))
            return blake3.blake3(data).hexdigest(), len(data)
        hasher = blake3.blake3()
        read = 0
        try:
            with self._cctx.stream_writer(out, size=size, closefd=False) as writer:
                while chunk := inp.read(CHUNK):
                    read += len(chunk)
                    if read > size:
                        break  # grew: abandon, the caller sees read != size
                    hasher.update(chunk)
                    writer.write(chunk)
        except zstandard.ZstdError:
            if read == size:
                raise
            # the frame's declared size no longer matches the file: it changed; the caller discards the temp file
        return hasher.hexdigest(), read

    def put_bytes(self, data: bytes) -> str:
        """Store an in-memory blob (a manifest). Returns its id."""
        return self.put_bytes_sized(data)[0]

    def put_bytes_sized(self, data: bytes) -> tuple[str, int]:
        """Store an in-memory blob (a manifest, a pack). Returns its id and the bytes written (0: already stored,
        now freshened). A pack's or manifest's id is the hash of what this save just assembled, so it is almost
        always new: one create-if-absent put, no stat first."""
        blob_id = blake3.blake3(data).hexdigest()
        return blob_id, self.put_encoded(blob_id, self._cctx.compress(data))

    def compress_frames(self, parts: list[bytes]) -> list[bytes]:
        """One zstd frame (recording its content size) per part: the frames of a pack (FORMAT §2), whose
        concatenation is a blob of the parts' concatenation."""
        return [self._cctx.compress(part) for part in parts]

    def put_encoded(self, blob_id: str, encoded: bytes) -> int:
        """Store a blob already encoded by the caller (a manifest; a pack's frames, checked against `blob_id` by its
        builder, cas/pack.py) with one create-if-absent put. Returns the bytes written (0: already stored, now
        freshened)."""

        def fill(out: BinaryIO) -> None:
            out.write(encoded)
            _faults.checkpoint("blob-written")

        return self._create(blob_id, fill)

    def compressed_size(self, src: str | int) -> int:
        """Size `src` would take in the store (used only to enforce a size cap)."""
        with localfs.open_source(src) as fh:
            counter = self._cctx.stream_writer(cast(BinaryIO, _Counter()), closefd=False)  # duck-typed sink
            while chunk := fh.read(CHUNK):
                counter.write(chunk)
            counter.flush(zstandard.FLUSH_FRAME)
            return counter.tell()

    # -- reading -----------------------------------------------------------------------------------------------
    def get_into(self, blob_id: str, size: int, out: BinaryIO) -> None:
        """Decompress blob `blob_id` (claimed `size` bytes) into `out`, verified. Raises BlobMissing, or BlobCorrupt
        after moving the blob to quarantine. On error `out` may hold partial data: the caller discards it."""
        try:
            if size <= WHOLE_FILE_LIMIT:
                out.write(_decode_whole(self._get_stored(blob_id, compress_bound(size)), blob_id, size))
                return
            with self._open_stored(blob_id, compress_bound(size)) as fh:
                self._decode_stream(fh, blob_id, size, out)
        except _Invalid as exc:
            self.quarantine(blob_id)
            raise BlobCorrupt(f"blob {blob_id}: {exc}; quarantined") from None

    def get_bytes(self, blob_id: str, max_size: int) -> Decoded:
        """A whole blob in memory, verified (a pack, FORMAT §2): as get_into, with the size taken from the frames and
        refused above `max_size` (a bytearray when there are several: `Decoded`). Raises BlobMissing, or BlobCorrupt
        after moving the blob to quarantine."""
        try:
            return self._decode_bounded(self._get_stored(blob_id, compress_bound(max_size)), blob_id, max_size)
        except _Invalid as exc:
            self.quarantine(blob_id)
            raise BlobCorrupt(f"blob {blob_id}: {exc}; quarantined") from None

    def _get_stored(self, blob_id: str, limit: int) -> bytes:
        """A stored blob's bytes for a reader that needs it (FORMAT §2: one found in trash is brought back first).
        Raises BlobMissing, or _Invalid for something that is not a blob (planted, or too large to be one)."""
        return self._stored(blob_id, limit, self.backend.get)

    def _open_stored(self, blob_id: str, limit: int) -> BinaryIO:
        """As _get_stored, streaming (for blobs too large to hold in memory)."""
        return self._stored(blob_id, limit, self.backend.open)

    def _stored(self, blob_id: str, limit: int, read: Callable[..., T]) -> T:
        key = layout.blob(blob_id)
        for attempt in (0, 1):
            try:
                return read(key, limit=limit)
            except NotFound:
                if attempt or self.stat(blob_id) is None:  # maybe in trash: brought back, then read again
                    raise BlobMissing(f"blob {blob_id} not in store") from None
            except ObjectTooLarge as exc:
                raise _Invalid(f"too large to be this blob ({exc})") from None
            except BadObject as exc:
                raise _Invalid(str(exc)) from None
        raise BlobMissing(f"blob {blob_id} not in store")

    def read_bytes(self, blob_id: str, max_size: int) -> Decoded:
        """Whole blob in memory, verified; for manifests and other small blobs. Never moves anything (gc, check and
        peers read with it). Raises BlobMissing or BlobCorrupt."""
        try:
            data = self.backend.get(layout.blob(blob_id), limit=compress_bound(max_size))
            return self._decode_bounded(data, blob_id, max_size)
        except NotFound:
            raise BlobMissing(f"blob {blob_id} not in store") from None
        except (ObjectTooLarge, BadObject) as exc:
            raise BlobCorrupt(f"blob {blob_id}: {exc}") from None
        except _Invalid as exc:
            raise BlobCorrupt(f"blob {blob_id}: {exc}") from None

    def get_frames(self, blob_id: str, start: int, frames: list[tuple[int, int]]) -> Decoded:
        """The content of a run of a multi-frame blob's frames (a pack, FORMAT §2), fetched with one ranged read from
        byte `start`: `frames` is the run's (compressed length, content length) per frame, from the manifest's frame
        table, and each frame is checked against it before it is decoded. The content is not verified against the
        blob id (only the whole blob can be): the caller verifies each file it takes from it. Raises BlobMissing
        (after looking in trash), or RangeUnusable when the range does not hold exactly those frames: a wrong table
        or a damaged blob, which only a read of the whole blob can tell apart. Never quarantines."""
        length = sum(c for c, _ in frames)
        content = sum(n for _, n in frames)
        # A table the manifest parser accepted is within these bounds; checked again since the range is a request.
        if not frames or start < 0 or content > limits.MAX_PACK_BYTES or length > compress_bound(content):
            raise RangeUnusable(f"blob {blob_id}: frames {frames[:4]}... at {start} are not a pack's frames")
        try:
            data = self._stored(blob_id, length,
                                lambda key, limit: self.backend.get(key, limit=limit, offset=start, length=length))
            if len(data) != length:
                raise _Invalid(f"{len(data)} bytes at {start}, expected {length} (past the end)")
            spans = _frames(data, content)
            if [(size, claimed) for _, size, claimed in spans] != frames:
                raise _Invalid("the frames there are not the ones the table records")
            return _decode_spans(data, spans)
        except _Invalid as exc:
            raise RangeUnusable(f"blob {blob_id}, bytes {start}+{length}: {exc}") from None

    @staticmethod
    def _decode_bounded(data: bytes, blob_id: str, max_size: int) -> Decoded:
        spans = _frames(data, max_size)
        return _check_content(_decode_spans(data, spans), blob_id, sum(n for _, _, n in spans))

    def _decode_stream(self, fh: BinaryIO, blob_id: str, size: int, out: BinaryIO) -> None:
        header = fh.read(_FRAME_HEADER_MAX)
        if _frame_size(header) != size:
            raise _Invalid(f"frame claims {_frame_size(header)} bytes, manifest says {size}")
        hasher = blake3.blake3()
        written = 0
        try:
            reader = zstandard.ZstdDecompressor().stream_reader(cast(BinaryIO, _Prefixed(header, fh)),  # duck-typed
                                                                read_across_frames=False, closefd=False)
            while chunk := reader.read(CHUNK):
                written += len(chunk)
                if written > size:
                    raise _Invalid(f"decodes to more than {size} bytes")
                hasher.update(chunk)
                out.write(chunk)
        except zstandard.ZstdError as exc:
            raise _Invalid(f"undecodable: {exc}") from None
        if written != size:
            raise _Invalid(f"decoded {written} bytes, expected {size}")
        if hasher.hexdigest() != blob_id:
            raise _Invalid("content does not match id")

    def verify(self, blob_id: str, max_size: int = limits.MAX_ENTRY_SIZE) -> None:
        """Re-hash one stored blob (`cas check --read-data`). Raises BlobMissing or BlobCorrupt (not quarantined:
        checking never changes the store)."""
        try:
            with self.backend.open(layout.blob(blob_id), limit=compress_bound(max_size)) as fh:
                # A blob that may be a pack (its first frame within a pack's bound) is checked by the rules of the
                # in-memory readers (several frames allowed, FORMAT §2); a larger one streams, as its loader streams
                # it (one frame), never held in memory.
                head = fh.read(_FRAME_HEADER_MAX)
                if _frame_size(head) <= limits.MAX_PACK_BYTES:
                    head += fh.read(_IN_MEMORY_STORED + 1 - len(head))
                    if len(head) <= _IN_MEMORY_STORED and _content_size(head, max_size) <= limits.MAX_PACK_BYTES:
                        self._decode_bounded(head, blob_id, max_size)
                        return
                self._decode_stream(_Prefixed(head, fh), blob_id, _frame_size(head), _Counter())  # type: ignore[arg-type]
        except NotFound:
            raise BlobMissing(f"blob {blob_id} not in store") from None
        except (ObjectTooLarge, BadObject) as exc:
            raise BlobCorrupt(f"blob {blob_id}: {exc}") from None
        except _Invalid as exc:
            raise BlobCorrupt(f"blob {blob_id}: {exc}") from None

    def quarantine(self, blob_id: str) -> None:
        self.ready_to_write()
        try:
            self.backend.move(layout.blob(blob_id), layout.quarantine(blob_id, time.time_ns()))
            log.warning("quarantined corrupt blob %s", blob_id)
        except CasError as exc:
            log.warning("corrupt blob %s could not be quarantined: %s", blob_id, exc)

    # -- listing -----------------------------------------------------------------------------------------------
    def iter_blobs(self, area: str = "blobs") -> Iterator[BlobInfo]:
        """Every blob in `blobs/` (or `trash/`), skipping temp files, foreign names and anything planted."""
        for fan in FANOUT:
            yield from self.iter_fan(area, fan)

    def iter_fan(self, area: str, fan: str) -> Iterator[BlobInfo]:
        """The blobs of one fan-out prefix. A planted symlink at the prefix lists nothing (never followed)."""
        prefix = layout.fan_prefix(area + "/", fan)
        try:
            for info in self.backend.list(prefix):
                name = layout.name_of(info.key)
                if info.kind == "object" and is_blob_id(name) and name[:2] == fan:
                    yield BlobInfo(name, info.key, info.size, info.mtime, info.version,
                                   os.path.join(self.root, info.key))
        except BadObject:
            return


class _Invalid(Exception):
    pass


class RangeUnusable(Exception):
    """A byte range of a blob does not hold the frames a manifest's frame table says it holds (FORMAT §2): the
    table or the blob is wrong, which only reading the whole blob can tell."""


# The largest stored form of a blob decoded in memory: a pack of MAX_PACK_BYTES content at its compress bound.
_IN_MEMORY_STORED = compress_bound(limits.MAX_PACK_BYTES)


class _Prefixed:
    """A reader that yields `head` (bytes already read to inspect a frame header) and then the rest of `fh`: lets
    a stream be checked before decoding without seeking, which an object-store stream cannot."""

    def __init__(self, head: bytes, fh: BinaryIO):
        self._head = head
        self._fh = fh

    def read(self, n: int = -1) -> bytes:
        if self._head:
            if n < 0 or n >= len(self._head):
                head, self._head = self._head, b""
                rest = self._fh.read(-1 if n < 0 else n - len(head))
                return head + rest
            head, self._head = self._head[:n], self._head[n:]
            return head
        return self._fh.read(n)


class _Counter:
    """A write-only sink that counts bytes: measures compressed size without storing it."""

    def __init__(self) -> None:
        self.n = 0

    def write(self, data) -> int:
        self.n += len(data)
        return len(data)

    def tell(self) -> int:
        return self.n

    def flush(self) -> None:
        pass


def _decode_whole(data: bytes, blob_id: str, size: int) -> Decoded:
    """Decode an in-memory blob (one frame, or a pack's several) that must hold exactly `size` bytes hashing to
    `blob_id`. The frame headers are checked against `size` before anything is decoded."""
    spans = _frames(data, size)
    claimed = sum(n for _, _, n in spans)
    if claimed != size:
        raise _Invalid(f"frames claim {claimed} bytes, expected {size}")
    return _check_content(_decode_spans(data, spans), blob_id, size)


def _check_content(raw: Decoded, blob_id: str, size: int) -> Decoded:
    if len(raw) != size:
        raise _Invalid(f"decoded {len(raw)} bytes, expected {size}")
    if blake3.blake3(raw).hexdigest() != blob_id:
        raise _Invalid("content does not match id")
    return raw


ZSTD_MAGIC = zstandard.FRAME_HEADER
# RFC 8878 §3.1.1: a frame header is at most 18 bytes (magic, descriptor, window, dictionary id, content size); its
# descriptor's bit 2 says a 4-byte checksum follows the last block.
_FRAME_HEADER_MAX = 18
# RFC 8878 §3.1.1.2: a block header is 3 bytes (last-block flag, type, size); no block holds more than 128 KiB.
_BLOCK_HEADER = 3
_BLOCK_MAX = 128 << 10
_RLE_BLOCK, _RESERVED_BLOCK = 1, 3
_CHECKSUM_BYTES = 4


def _frames(data: bytes, limit: int) -> list[tuple[int, int, int]]:
    """The zstd frames that make up an in-memory blob, as (start, compressed length, content length), from their
    headers and block headers alone (RFC 8878 §3.1.1): nothing is decoded. Every frame must record its content size,
    their total must stay within `limit`, the frames must cover `data` exactly, and there are at most
    limits.MAX_PACK_FRAMES of them: a hostile blob is refused on arithmetic, before any allocation."""
    view = memoryview(data)
    spans: list[tuple[int, int, int]] = []
    pos = total = 0
    while pos < len(data) or not spans:
        if len(spans) >= limits.MAX_PACK_FRAMES:
            raise _Invalid(f"more than {limits.MAX_PACK_FRAMES} frames")
        if bytes(view[pos:pos + 4]) != ZSTD_MAGIC:
            raise _Invalid(f"no zstd frame at byte {pos}")
        claimed = _frame_size(bytes(view[pos:pos + _FRAME_HEADER_MAX]))
        total += claimed
        if total > limit:
            raise _Invalid(f"claims more than {limit} bytes")
        end = _frame_end(view, pos)
        spans.append((pos, end - pos, claimed))
        pos = end
    return spans


def _content_size(data: bytes, limit: int) -> int:
    """The content size an in-memory blob's frames claim together (header arithmetic only)."""
    return sum(n for _, _, n in _frames(data, limit))


def _frame_end(view: memoryview, pos: int) -> int:
    """Where the frame starting at `pos` ends: past its header, its blocks and its checksum."""
    try:
        p = pos + zstandard.frame_header_size(bytes(view[pos:pos + _FRAME_HEADER_MAX]))
    except zstandard.ZstdError as exc:
        raise _Invalid(f"bad frame header at byte {pos}: {exc}") from None
    has_checksum = view[pos + 4] & 0x04
    while True:
        if p + _BLOCK_HEADER > len(view):
            raise _Invalid(f"frame at byte {pos} is cut short")
        header = int.from_bytes(view[p:p + _BLOCK_HEADER], "little")
        last, kind, size = header & 1, (header >> 1) & 3, header >> 3
        if kind == _RESERVED_BLOCK or size > _BLOCK_MAX:
            raise _Invalid(f"bad block header at byte {p}")
        p += _BLOCK_HEADER + (1 if kind == _RLE_BLOCK else size)
        if last:
            break
    p += _CHECKSUM_BYTES if has_checksum else 0
    if p > len(view):
        raise _Invalid(f"frame at byte {pos} is cut short")
    return p


def _decode_spans(data: bytes, spans: list[tuple[int, int, int]]) -> Decoded:
    """Decode frames whose headers _frames has checked, each to exactly the size it records (zstd checks each frame
    against its header: a frame decoding to more or less is an error), into one buffer of their claimed total."""
    try:
        if len(spans) == 1:
            start, length, claimed = spans[0]
            part = zstandard.ZstdDecompressor().decompress(memoryview(data)[start:start + length],
                                                           max_output_size=claimed)
            if len(part) != claimed:
                raise _Invalid(f"frame at byte {start} decoded to {len(part)} bytes, it claims {claimed}")
            return part
        return _decode_across(data, spans)
    except zstandard.ZstdError as exc:
        raise _Invalid(f"undecodable: {exc}") from None


def _decode_across(data: bytes, spans: list[tuple[int, int, int]]) -> bytearray:
    """Several frames (a pack's) decoded by one stream straight into a buffer of their total: decoding frame by frame
    and joining cost a second copy of the content and the page faults of two allocations (a full load of 20,000
    files spent ~80 ms of its ~1.2 s there, docs/benchmarks.md). The buffer is the claims' total, which _frames
    bounded before anything is allocated."""
    start = spans[0][0]
    end = spans[-1][0] + spans[-1][1]
    out = bytearray(sum(claimed for _, _, claimed in spans))
    view = memoryview(out)
    reader = zstandard.ZstdDecompressor().stream_reader(memoryview(data)[start:end], read_across_frames=True)
    filled = 0
    while filled < len(out) and (n := reader.readinto(view[filled:])):  # readinto may return short: loop
        filled += n
    if filled != len(out) or reader.read(1):
        raise _Invalid(f"frames decoded to {'less' if filled < len(out) else 'more'} than the {len(out)} bytes "
                       "they claim")
    return out


def _frame_size(header: bytes) -> int:
    try:
        size = zstandard.frame_content_size(header)
    except zstandard.ZstdError as exc:
        raise _Invalid(f"not a zstd frame: {exc}") from None
    if size < 0:
        raise _Invalid("zstd frame does not record its content size")
    return size
