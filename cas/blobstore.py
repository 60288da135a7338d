"""The org store's blobs: content-addressed, zstd-compressed files verified on every read (docs/FORMAT.md §2).

Storage verbs only (put, get, stat, freshen, quarantine, list); which blobs a tree needs is `save.py`'s business.
"""
from __future__ import annotations

import errno
import logging
import os
import stat as stat_mod
import threading
import time
from dataclasses import dataclass
from typing import BinaryIO, Callable, Iterator

import blake3
import msgpack
import zstandard

from . import _faults, limits, localfs
from .atomic import create_once, temp_path_beside, write_file
from .errors import BlobCorrupt, BlobMissing, FormatError, StoreReadOnly, StoreUnavailable

log = logging.getLogger("cas.blobstore")

FORMAT_LINE = b"cas-store 1\n"
ID_HEX_LEN = 64
_HEX = frozenset("0123456789abcdef")
FANOUT = [f"{i:02x}" for i in range(256)]

# zstd level 3 compresses Inductor's text artifacts ~4-6x at several hundred MB/s per core: the volume, not the
# CPU, stays the bottleneck. Higher levels cost seconds for a few percent.
ZSTD_LEVEL = 3
# Files up to this size are read, compressed and hashed in one piece (fewest syscalls); larger ones stream, so
# memory stays bounded whatever the cache holds.
WHOLE_FILE_LIMIT = 8 << 20
CHUNK = 1 << 20
# Writers freshen a relied-upon blob at most once an hour (docs/FORMAT.md §2): one utime per blob per hour.
DEFAULT_FRESHEN_AFTER = 3600


def is_blob_id(value: str) -> bool:
    return len(value) == ID_HEX_LEN and set(value) <= _HEX


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
    path: str
    stored_size: int
    mtime: float


class BlobStore:
    """The org store root. Creates its layout on first write use; refuses other format versions."""

    def __init__(
        self,
        root: str | os.PathLike,
        *,
        create: bool = True,
        freshen_after: float | None = None,
        clock: Callable[[], float] = time.time,
    ):
        self.root = os.path.abspath(os.fspath(root))
        self._clock = clock
        self._clock_offset: float | None = None
        self._local = threading.local()  # zstd contexts are not thread-safe: one per thread
        self._dirs_ok: set[str] = set()  # store directories seen to be real directories, not planted symlinks
        self.freshen_after = float(self._open(create, freshen_after))

    # -- layout ------------------------------------------------------------------------------------------------
    def _open(self, create: bool, freshen_after: float | None) -> float:
        fmt = os.path.join(self.root, "CAS-FORMAT")
        config = self._read_format(fmt)
        if config is None:
            if not create:
                raise StoreUnavailable(f"no store at {self.root}")
            self._create_layout()
            body = {"freshen_after": int(freshen_after if freshen_after is not None else DEFAULT_FRESHEN_AFTER)}
            try:
                create_once(fmt, FORMAT_LINE + msgpack.packb(body))
            except OSError as exc:
                raise self._os_error("cannot initialise store", exc) from exc
            config = self._read_format(fmt) or body
        value = config.get("freshen_after", DEFAULT_FRESHEN_AFTER)
        if not isinstance(value, (int, float)) or value <= 0:
            raise FormatError(f"store {self.root}: bad freshen_after {value!r} in CAS-FORMAT")
        return value

    def _read_format(self, fmt: str) -> dict | None:
        try:
            with open(fmt, "rb") as fh:
                data = fh.read(limits.MAX_SMALL_FILE_BYTES)
        except FileNotFoundError:
            if not os.path.isdir(self.root) and not os.path.isdir(os.path.dirname(self.root)):
                raise StoreUnavailable(f"store root {self.root} and its parent do not exist (volume not mounted?)")
            return None
        except OSError as exc:
            raise StoreUnavailable(f"cannot read {fmt}: {exc.strerror}") from exc
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

    def _create_layout(self) -> None:
        # Top-level directories first, format file last: a store with a format file has its whole layout. The
        # fan-out directories blobs/<xx> and trash/<xx> are made by the first write into each (FORMAT §2): with
        # small files in packs a save writes a handful of blobs, and 256 mkdirs up front (serialised by the kernel
        # under one parent) were most of a first save on a 2 ms volume.
        try:
            os.makedirs(self.root, exist_ok=True)
            for top in ("blobs", "trash", "quarantine", "roots", "locks"):
                os.makedirs(os.path.join(self.root, top), exist_ok=True)
        except OSError as exc:
            raise self._os_error("cannot create store layout", exc) from exc

    def _os_error(self, what: str, exc: OSError) -> StoreUnavailable:
        if exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
            return StoreReadOnly(f"{what} at {self.root}: {exc.strerror}")
        return StoreUnavailable(f"{what} at {self.root}: {exc.strerror or exc}")

    def blob_path(self, blob_id: str) -> str:
        return os.path.join(self.root, "blobs", blob_id[:2], blob_id)

    def trash_path(self, blob_id: str) -> str:
        return os.path.join(self.root, "trash", blob_id[:2], blob_id)

    @property
    def _cctx(self) -> zstandard.ZstdCompressor:
        cctx = getattr(self._local, "cctx", None)
        if cctx is None:
            cctx = self._local.cctx = zstandard.ZstdCompressor(level=ZSTD_LEVEL, write_content_size=True)
        return cctx

    # -- clock -------------------------------------------------------------------------------------------------
    def server_now(self) -> float:
        """Now by the volume's clock (FORMAT §1): our clock plus the offset seen on a file we wrote, measured once."""
        if self._clock_offset is None:
            probe = temp_path_beside(os.path.join(self.root, "locks", "x"))
            try:
                write_file(probe, b"", fsync=False)
                try:
                    self._clock_offset = os.stat(probe).st_mtime - self._clock()
                finally:
                    os.unlink(probe)
            except OSError:
                self._clock_offset = 0.0  # read-only store: nothing will be freshened anyway
        return self._clock() + self._clock_offset

    # -- existence ---------------------------------------------------------------------------------------------
    def stat(self, blob_id: str) -> os.stat_result | None:
        """Stat a blob, bringing it back from trash if gc retired it (FORMAT §2). None if absent."""
        path = self.blob_path(blob_id)
        try:
            st = os.lstat(path)
            # Only a regular file is a blob: a planted symlink, FIFO or directory is absent (a save replaces it).
            return st if stat_mod.S_ISREG(st.st_mode) else None
        except FileNotFoundError:
            pass
        if not self.untrash(blob_id):
            return None
        log.info("restored blob %s from trash", blob_id)
        try:
            os.utime(path, None)
            return os.stat(path)
        except OSError:
            return None

    def untrash(self, blob_id: str) -> bool:
        """Rename a blob from trash back into blobs/ (its fan-out directory may not exist yet). False if it is not
        in trash."""
        src, dest = self.trash_path(blob_id), self.blob_path(blob_id)
        try:
            os.rename(src, dest)
            return True
        except FileNotFoundError:
            if not os.path.lexists(src):
                return False
        except OSError:
            return False
        try:
            self._refuse_planted_dir(os.path.dirname(dest))
            os.makedirs(os.path.dirname(dest), exist_ok=True)
            os.rename(src, dest)
            return True
        except (OSError, StoreUnavailable):
            return False

    def ensure_fresh(self, blob_id: str) -> bool:
        """True if the blob is stored; freshens its mtime if older than freshen_after (a save relies on it)."""
        st = self.stat(blob_id)
        if st is None:
            return False
        if self.server_now() - st.st_mtime > self.freshen_after:
            try:
                os.utime(self.blob_path(blob_id), None)
            except FileNotFoundError:
                return False  # collected between stat and utime (only possible past the grace assumption)
        return True

    # -- writing -----------------------------------------------------------------------------------------------
    def put_file(self, src: str, blob_id: str, size: int) -> int:
        """Store local file `src`, which hashed to `blob_id`. Returns bytes written. Raises SourceChanged if the
        file no longer hashes to `blob_id`; the blob is then not stored."""
        final = self.blob_path(blob_id)
        self._refuse_planted_dir(os.path.dirname(final))
        tmp = temp_path_beside(final)
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileNotFoundError:
            os.makedirs(os.path.dirname(final), exist_ok=True)  # first blob under this prefix
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            with open(fd, "wb", closefd=False) as out, localfs.open_source(src) as inp:
                digest, read = self._compress_into(inp, out, size)
                out.flush()
                _faults.checkpoint("blob-written")
                os.fsync(fd)
                written = out.tell()
            if digest != blob_id or read != size:
                raise SourceChanged(f"{src} changed while being saved")
        except BaseException:
            os.close(fd)
            _unlink(tmp)
            raise
        os.close(fd)
        try:
            try:
                os.rename(tmp, final)
            except (IsADirectoryError, NotADirectoryError, OSError) as exc:
                if exc.errno not in (errno.EISDIR, errno.ENOTEMPTY, errno.EEXIST):
                    raise
                self.quarantine(blob_id)  # something planted at the blob's name: set it aside, store the real one
                os.rename(tmp, final)
        except BaseException:
            _unlink(tmp)
            raise
        return written

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

    def _refuse_planted_dir(self, fan_dir: str) -> None:
        """Never write through `blobs/` or `blobs/<xx>` if someone with write access to the store replaced it by a
        symlink (or a file): that would put our files wherever it points, outside the store. One lstat per directory
        per process: the layout never changes once created."""
        for path in (os.path.dirname(fan_dir), fan_dir):
            if path in self._dirs_ok:
                continue
            try:
                st = os.lstat(path)
            except FileNotFoundError:
                continue  # put_file recreates a missing fan-out directory
            if not stat_mod.S_ISDIR(st.st_mode):
                raise StoreUnavailable(f"{path} is not a directory (a planted symlink?): refusing to write through it")
            self._dirs_ok.add(path)

    def put_bytes(self, data: bytes) -> str:
        """Store an in-memory blob (a manifest). Returns its id."""
        return self.put_bytes_sized(data)[0]

    def put_bytes_sized(self, data: bytes) -> tuple[str, int]:
        """Store an in-memory blob (a manifest, a pack). Returns its id and the bytes written (0: already stored,
        now freshened)."""
        blob_id = blake3.blake3(data).hexdigest()
        if self.stat(blob_id) is not None:
            os.utime(self.blob_path(blob_id), None)
            return blob_id, 0
        final = self.blob_path(blob_id)
        self._refuse_planted_dir(os.path.dirname(final))
        tmp = temp_path_beside(final)
        try:
            frame = self._cctx.compress(data)
            write_file(tmp, frame)
        except FileNotFoundError:
            os.makedirs(os.path.dirname(final), exist_ok=True)  # first blob under this prefix
            write_file(tmp, frame)
        try:
            _faults.checkpoint("blob-written")
            os.rename(tmp, final)
        except BaseException:
            _unlink(tmp)
            raise
        return blob_id, len(frame)

    def compressed_size(self, src: str) -> int:
        """Size `src` would take in the store (used only to enforce a size cap)."""
        with localfs.open_source(src) as fh:
            counter = self._cctx.stream_writer(_Counter(), closefd=False)
            while chunk := fh.read(CHUNK):
                counter.write(chunk)
            counter.flush(zstandard.FLUSH_FRAME)
            return counter.tell()

    # -- reading -----------------------------------------------------------------------------------------------
    def get_into(self, blob_id: str, size: int, out: BinaryIO) -> None:
        """Decompress blob `blob_id` (claimed `size` bytes) into `out`, verified. Raises BlobMissing, or BlobCorrupt
        after moving the blob to quarantine. On error `out` may hold partial data: the caller discards it."""
        try:
            with self._open_stored(blob_id) as fh:
                self._decode(fh, blob_id, size, out)
        except _Invalid as exc:
            self.quarantine(blob_id)
            raise BlobCorrupt(f"blob {blob_id}: {exc}; quarantined") from None

    def get_bytes(self, blob_id: str, max_size: int) -> bytes:
        """A whole blob in memory, verified (a pack, FORMAT §2): as get_into, with the size taken from the frame and
        refused above `max_size`. Raises BlobMissing, or BlobCorrupt after moving the blob to quarantine."""
        try:
            with self._open_stored(blob_id) as fh:
                # One bounded read: a frame of at most max_size bytes cannot take more than compress_bound of them.
                data = fh.read(compress_bound(max_size) + 1)
            claimed = _frame_size(data)
            if claimed > max_size:
                raise _Invalid(f"claims {claimed} bytes, limit {max_size}")
            return _decode_whole(data, blob_id, claimed)
        except _Invalid as exc:
            self.quarantine(blob_id)
            raise BlobCorrupt(f"blob {blob_id}: {exc}; quarantined") from None

    def _open_stored(self, blob_id: str) -> BinaryIO:
        """Open a blob for a reader that needs it (FORMAT §2: one found in trash is brought back first). Raises
        BlobMissing, or _Invalid for a planted symlink or directory."""
        path = self.blob_path(blob_id)
        try:
            return _open_blob(path)
        except FileNotFoundError:
            if self.stat(blob_id) is None:  # maybe in trash
                raise BlobMissing(f"blob {blob_id} not in store") from None
            return _open_blob(path)

    def read_bytes(self, blob_id: str, max_size: int) -> bytes:
        """Whole blob in memory, verified; for manifests and other small blobs."""
        import io

        path = self.blob_path(blob_id)
        try:
            with _open_blob(path) as fh:
                header = fh.read(18)
                fh.seek(0)
                claimed = _frame_size(header)
                if claimed > max_size:
                    raise BlobCorrupt(f"blob {blob_id} claims {claimed} bytes, limit {max_size}")
                buf = io.BytesIO()
                self._decode(fh, blob_id, claimed, buf)
                return buf.getvalue()
        except FileNotFoundError:
            raise BlobMissing(f"blob {blob_id} not in store") from None
        except _Invalid as exc:
            raise BlobCorrupt(f"blob {blob_id}: {exc}") from None

    def _decode(self, fh: BinaryIO, blob_id: str, size: int, out: BinaryIO) -> None:
        st = os.fstat(fh.fileno())
        if not stat_mod.S_ISREG(st.st_mode):
            raise _Invalid("not a regular file")
        if st.st_size > compress_bound(size):
            raise _Invalid(f"{st.st_size} stored bytes cannot encode {size} bytes")
        hasher = blake3.blake3()
        if st.st_size <= WHOLE_FILE_LIMIT and size <= WHOLE_FILE_LIMIT:  # a small blob can claim a huge size
            out.write(_decode_whole(fh.read(st.st_size + 1), blob_id, size))
            return
        header = fh.read(18)
        if _frame_size(header) != size:
            raise _Invalid(f"frame claims {_frame_size(header)} bytes, manifest says {size}")
        fh.seek(0)
        written = 0
        try:
            reader = zstandard.ZstdDecompressor().stream_reader(fh, read_across_frames=False, closefd=False)
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

    def verify(self, blob_id: str) -> None:
        """Re-hash one stored blob (`cas check --read-data`). Raises BlobMissing or BlobCorrupt (not quarantined:
        checking never changes the store)."""
        path = self.blob_path(blob_id)
        try:
            with _open_blob(path) as fh:
                claimed = _frame_size(fh.read(18))
                fh.seek(0)
                self._decode(fh, blob_id, claimed, _Counter())
        except FileNotFoundError:
            raise BlobMissing(f"blob {blob_id} not in store") from None
        except _Invalid as exc:
            raise BlobCorrupt(f"blob {blob_id}: {exc}") from None

    def quarantine(self, blob_id: str) -> None:
        dest = os.path.join(self.root, "quarantine", f"{blob_id}.{time.time_ns()}")
        try:
            os.rename(self.blob_path(blob_id), dest)
            log.warning("quarantined corrupt blob %s", blob_id)
        except OSError as exc:
            log.warning("corrupt blob %s could not be quarantined: %s", blob_id, exc.strerror)

    # -- listing -----------------------------------------------------------------------------------------------
    def iter_blobs(self, area: str = "blobs") -> Iterator[BlobInfo]:
        """Every blob in `blobs/` (or `trash/`), skipping temp files and foreign names."""
        base = os.path.join(self.root, area)
        if os.path.islink(base):
            return  # planted: what it points to is not ours to list, trash or delete
        for fan in FANOUT:
            if os.path.islink(os.path.join(base, fan)):
                continue
            try:
                entries = os.scandir(os.path.join(base, fan))
            except FileNotFoundError:
                continue
            with entries:
                for entry in entries:
                    if not is_blob_id(entry.name) or entry.name[:2] != fan:
                        continue
                    try:
                        st = entry.stat(follow_symlinks=False)
                    except FileNotFoundError:
                        continue
                    yield BlobInfo(entry.name, entry.path, st.st_size, st.st_mtime)


class _Invalid(Exception):
    pass


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


def _open_blob(path: str) -> BinaryIO:
    """Open a blob for reading without following a planted symlink and without blocking on a planted FIFO."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise _Invalid("is a symlink") from None
        raise
    try:
        return open(fd, "rb", buffering=0)
    except IsADirectoryError:  # FileIO refuses directories: a planted directory is a bad blob, not a crash
        os.close(fd)
        raise _Invalid("is a directory") from None


def _decode_whole(data: bytes, blob_id: str, size: int) -> bytes:
    """Decode one in-memory frame that must hold exactly `size` bytes hashing to `blob_id`."""
    if _frame_size(data) != size:
        raise _Invalid(f"frame claims {_frame_size(data)} bytes, expected {size}")
    try:
        raw = zstandard.ZstdDecompressor().decompress(data, max_output_size=size)
    except zstandard.ZstdError as exc:
        raise _Invalid(f"undecodable: {exc}") from None
    if len(raw) != size:
        raise _Invalid(f"decoded {len(raw)} bytes, expected {size}")
    if blake3.blake3(raw).hexdigest() != blob_id:
        raise _Invalid("content does not match id")
    return raw


def _frame_size(header: bytes) -> int:
    try:
        size = zstandard.frame_content_size(header)
    except zstandard.ZstdError as exc:
        raise _Invalid(f"not a zstd frame: {exc}") from None
    if size < 0:
        raise _Invalid("zstd frame does not record its content size")
    return size


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass
