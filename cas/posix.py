"""The storage seam on a POSIX directory (a network volume), hardened once for every caller.

Defences, each for a class of hostile or broken volume (docs/reliability.md):
- Every directory is opened `O_DIRECTORY|O_NOFOLLOW` component by component from the root's descriptor and used
  through its descriptor (`dir_fd=`, `os.scandir(fd)`): a directory swapped for a symlink is refused (`BadObject`),
  never followed, so no listing, sweep, delete or write ever leaves the root.
- Every file is opened `O_NOFOLLOW|O_NONBLOCK` and `fstat`-checked to be a regular file before it is read: a
  planted FIFO, device or symlink is `BadObject`, never a hang.
- Every read is bounded by the caller's limit, checked on the `fstat` size before reading.
- Directories are created only *below* the root (mkdir one component at a time, through descriptors); the root
  itself is created only by `create=True` and only when its parent exists. A missing root is `StoreUnavailable`,
  and `check_alive` notices a root that was unmounted or renamed after it was opened, so nothing re-creates a
  vanished store.
- Final names come into being only by `rename`/`link` of a complete, fsynced temp file in the same directory
  (FORMAT §1).
"""
from __future__ import annotations

import ctypes
import errno
import os
import stat as stat_mod
import struct
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from typing import BinaryIO

from . import _faults
from .atomic import temp_name
from .errors import CasError, NoSpace, StoreReadOnly, StoreUnavailable
from .paths import TEMP_PREFIX
from .storage import (
    AlreadyExists,
    Backend,
    BadObject,
    NotFound,
    ObjectInfo,
    ObjectTooLarge,
    Payload,
    PreconditionFailed,
    check_key,
    check_prefix,
    listable,
)

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
_TEMP_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
# Open directory descriptors kept per backend. A store has a few fixed directories plus up to 512 fan-out
# directories and one per deployment under roots/; a scope has two. 1,024 keeps every hot directory open while
# gc walks an organisation of thousands of roots, far below the usual 65,536-descriptor limit.
MAX_OPEN_DIRS = 1024
# errnos that mean "this mount refuses hard links": fall back to rename-if-absent (FORMAT §1).
_NO_LINK = (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK, errno.ENOSYS)
_READ_ONLY = (errno.EROFS, errno.EACCES, errno.EPERM)
_PLANTED = (errno.ELOOP, errno.ENOTDIR, errno.EISDIR, errno.ENXIO)
_FULL = (errno.ENOSPC, errno.EDQUOT)


class _SinkError(Exception):
    """An error of the backend's own temp file, told apart from what a payload function raises (a local read error
    of the file being stored must reach the caller as it is, not as a volume error)."""

    def __init__(self, exc: OSError):
        self.exc = exc


class _Sink:
    """The writable handed to a payload function: the temp file, with its write errors marked as ours."""

    def __init__(self, fh: BinaryIO):
        self._fh = fh

    def write(self, data: bytes) -> int:
        try:
            return self._fh.write(data)
        except OSError as exc:
            raise _SinkError(exc) from exc

    def flush(self) -> None:
        try:
            self._fh.flush()
        except OSError as exc:
            raise _SinkError(exc) from exc

    def tell(self) -> int:
        return self._fh.tell()


class _Openat2:
    """openat2(2) with RESOLVE_BENEATH|RESOLVE_NO_SYMLINKS (Linux 5.6+): the kernel resolves a whole key below the
    root's descriptor in one call, refusing any symlink on the way and any escape, so a read costs one open instead
    of one per directory component (on a network volume each is a round trip). Where the call is missing (older
    kernels, seccomp profiles that answer ENOSYS) the backend walks the components itself, with the same result."""

    _SYS = 437  # the same number on x86_64 and aarch64 (the unified syscall table)
    _RESOLVE = 0x02 | 0x04 | 0x08  # RESOLVE_NO_MAGICLINKS | RESOLVE_NO_SYMLINKS | RESOLVE_BENEATH

    def __init__(self) -> None:
        self.available: bool | None = None
        self._libc: ctypes.CDLL | None = None

    def open(self, dirfd: int, path: str, flags: int) -> int | None:
        """A descriptor, or None when openat2 is unavailable (the caller walks instead). Raises OSError."""
        if self.available is False or not sys.platform.startswith("linux"):
            return None
        if self._libc is None:
            self._libc = ctypes.CDLL(None, use_errno=True)
        how = ctypes.create_string_buffer(struct.pack("QQQ", flags, 0, self._RESOLVE))
        fd = self._libc.syscall(self._SYS, dirfd, os.fsencode(path), how, 24)
        if fd >= 0:
            self.available = True
            return int(fd)
        err = ctypes.get_errno()
        if err in (errno.ENOSYS, errno.EPERM) and self.available is None:
            self.available = False  # not this kernel, or filtered: walk from now on
            return None
        if err == errno.EAGAIN:  # RESOLVE_* cannot be honoured right now (a racing rename): walk this once
            return None
        raise OSError(err, os.strerror(err), path)


_OPENAT2 = _Openat2()


def version_of(st: os.stat_result) -> str:
    """A version that changes on every write: a rename brings a new inode, an in-place write a new mtime or size."""
    return f"{st.st_ino:x}-{st.st_size:x}-{st.st_mtime_ns:x}"


class _DirCache:
    """Open directory descriptors by relative path, bounded, with reference counts so a descriptor in use by one
    thread is never closed (and its number reused) under it by another thread's eviction."""

    def __init__(self, limit: int = MAX_OPEN_DIRS):
        self._fds: OrderedDict[str, int] = OrderedDict()
        self._refs: dict[int, int] = {}
        self._evicted: set[int] = set()
        self._limit = limit
        self._lock = threading.Lock()

    def take(self, rel: str) -> int | None:
        with self._lock:
            fd = self._fds.get(rel)
            if fd is not None:
                self._fds.move_to_end(rel)
                self._refs[fd] = self._refs.get(fd, 0) + 1
            return fd

    def add(self, rel: str, fd: int) -> int:
        """Cache `fd` for `rel` (or, if another thread won the race, close ours and use theirs); returns the fd,
        with a reference taken."""
        with self._lock:
            have = self._fds.get(rel)
            if have is not None:
                os.close(fd)
                fd = have
            else:
                self._fds[rel] = fd
                while len(self._fds) > self._limit:
                    oldest = next(iter(self._fds))
                    if oldest == "":  # the root is never evicted: check_alive compares against it
                        self._fds.move_to_end("")
                        oldest = next(iter(self._fds))
                    old = self._fds.pop(oldest)
                    if self._refs.get(old, 0):
                        self._evicted.add(old)
                    else:
                        os.close(old)
            self._refs[fd] = self._refs.get(fd, 0) + 1
            return fd

    def give(self, fd: int) -> None:
        with self._lock:
            left = self._refs.get(fd, 1) - 1
            if left:
                self._refs[fd] = left
                return
            self._refs.pop(fd, None)
            if fd in self._evicted:
                self._evicted.discard(fd)
                os.close(fd)

    def forget(self, rel: str) -> None:
        """Drop `rel` and everything below it (a directory that was found replaced)."""
        with self._lock:
            for name in [k for k in self._fds if k == rel or k.startswith(rel + "/")]:
                fd = self._fds.pop(name)
                if self._refs.get(fd, 0):
                    self._evicted.add(fd)
                else:
                    os.close(fd)

    def close_all(self) -> None:
        with self._lock:
            for fd in self._fds.values():
                if self._refs.get(fd, 0):
                    self._evicted.add(fd)
                else:
                    os.close(fd)
            self._fds.clear()


class PosixBackend(Backend):
    """A backend rooted at a directory. `create=True` makes the root (one level, only if its parent exists)."""

    atomic_replace = False

    def __init__(self, root: str | os.PathLike, *, create: bool = False):
        self.root = os.path.abspath(os.fspath(root))
        self.location = self.root
        self._create = create
        self._dirs = _DirCache()
        self._root_id: tuple[int, int] | None = None
        self._root_lock = threading.Lock()
        self._clock_offset: float | None = None

    # -- descriptors -----------------------------------------------------------------------------------------------
    def _root_fd(self) -> int:
        fd = self._dirs.take("")
        if fd is not None:
            return fd
        with self._root_lock:
            fd = self._dirs.take("")
            if fd is not None:
                return fd
            try:
                # The root's own path is the operator's configuration and may go through links above it (a mount
                # point); from here down nothing is followed.
                new = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            except FileNotFoundError:
                if not self._create:
                    raise StoreUnavailable(f"{self.root} does not exist (volume not mounted?)") from None
                new = self._make_root()
            except OSError as exc:
                raise self._error("cannot open", exc) from exc
            if self._root_id is not None:  # opened before (then closed): it must still be that directory
                st = os.fstat(new)
                if self._root_id != (st.st_dev, st.st_ino):
                    os.close(new)
                    raise StoreUnavailable(f"{self.root} was replaced since it was opened (unmounted or renamed?)")
            # No fstat on a first open: on a network volume it is a request, and the identity is needed only by
            # check_alive, which takes it from the descriptor (the root stays open: the cache never evicts it).
            return self._dirs.add("", new)

    def _make_root(self) -> int:
        parent = os.path.dirname(self.root)
        if not os.path.isdir(parent):
            raise StoreUnavailable(f"{self.root}: parent {parent} does not exist (volume not mounted?)")
        try:
            os.mkdir(self.root, 0o755)
        except FileExistsError:
            pass
        except OSError as exc:
            raise self._error("cannot create", exc) from exc
        try:
            return os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as exc:
            raise self._error("cannot open", exc) from exc

    @contextmanager
    def _dir(self, rel: str, *, create: bool = False) -> Iterator[int]:
        """A descriptor of directory `rel` ('' = root), opened without following any link below the root. Raises
        NotFound if it is missing (unless `create`), BadObject if a component is not a real directory."""
        fd = self._open_dir(rel, create)
        try:
            yield fd
        finally:
            self._dirs.give(fd)

    def _open_dir(self, rel: str, create: bool) -> int:
        if not rel:
            return self._root_fd()
        fd = self._dirs.take(rel)
        if fd is not None:
            return fd
        parent_rel, _, name = rel.rpartition("/")
        parent = self._open_dir(parent_rel, create)
        try:
            try:
                new = os.open(name, _DIR_FLAGS, dir_fd=parent)
            except FileNotFoundError:
                if not create:
                    raise NotFound(f"{self._path(rel)} does not exist") from None
                try:
                    os.mkdir(name, 0o755, dir_fd=parent)
                except FileExistsError:
                    pass
                new = os.open(name, _DIR_FLAGS, dir_fd=parent)
        except OSError as exc:
            if exc.errno in _PLANTED:
                raise BadObject(f"{self._path(rel)} is not a directory (a planted symlink?): not followed") from None
            if isinstance(exc, FileNotFoundError):
                raise NotFound(f"{self._path(rel)} does not exist") from None
            raise self._error("cannot open directory", exc, rel) from exc
        finally:
            self._dirs.give(parent)
        return self._dirs.add(rel, new)

    def _path(self, key: str) -> str:
        return os.path.join(self.root, key) if key else self.root

    def _error(self, what: str, exc: OSError, key: str = "") -> StoreUnavailable | NoSpace:
        where = self._path(key)
        if exc.errno in _FULL:
            return NoSpace(f"{what} {where}: volume full ({exc.strerror})")
        if exc.errno in _READ_ONLY:
            return StoreReadOnly(f"{what} {where}: {exc.strerror}")
        return StoreUnavailable(f"{what} {where}: {exc.strerror or exc}")

    @staticmethod
    def _split(key: str) -> tuple[str, str]:
        check_key(key)
        parent, _, name = key.rpartition("/")
        return parent, name

    # -- reading ---------------------------------------------------------------------------------------------------
    def _open_beneath(self, key: str, flags: int) -> int:
        """A descriptor of `key` opened with `flags` and no symlink followed on the way (openat2, or a walk of
        directory descriptors). Raises NotFound, BadObject, StoreUnavailable."""
        try:
            with self._dir("") as root:
                fd = _OPENAT2.open(root, key, flags)
            if fd is not None:
                return fd
            parent, name = self._split(key)
            with self._dir(parent) as d:
                return os.open(name, flags, dir_fd=d)
        except FileNotFoundError:
            raise NotFound(f"{self._path(key)} does not exist") from None
        except OSError as exc:
            if exc.errno in _PLANTED or exc.errno == errno.EXDEV:
                raise BadObject(f"{self._path(key)}: a symlink or special file on the way: not followed") from None
            raise self._error("cannot open", exc, key) from exc

    def _open_regular(self, key: str) -> tuple[int, os.stat_result]:
        check_key(key)
        fd = self._open_beneath(key, _READ_FLAGS)
        st = os.fstat(fd)
        if not stat_mod.S_ISREG(st.st_mode):
            os.close(fd)
            raise BadObject(f"{self._path(key)} is not a regular file: not read")
        return fd, st

    def get(self, key: str, *, limit: int, offset: int = 0, length: int | None = None) -> bytes:
        fd, st = self._open_regular(key)
        try:
            left_in_file = max(0, st.st_size - offset)
            # Never ask past the end the fstat saw: a read that returns nothing is one more request on a volume.
            want = left_in_file if length is None else min(length, left_in_file)
            if want > limit:
                raise ObjectTooLarge(f"{self._path(key)}: {want} bytes, limit {limit}")
            chunks = []
            pos, left = offset, want
            while left > 0:
                chunk = os.pread(fd, left, pos)
                if not chunk:
                    break  # shorter than its fstat size: truncated meanwhile; the caller's checks decide
                chunks.append(chunk)
                pos += len(chunk)
                left -= len(chunk)
            return b"".join(chunks)
        except OSError as exc:
            raise self._error("cannot read", exc, key) from exc
        finally:
            os.close(fd)

    def get_versioned(self, key: str, *, limit: int) -> tuple[bytes, str]:
        """One open: the version is the fstat of the descriptor the bytes are read from."""
        fd, st = self._open_regular(key)
        try:
            if st.st_size > limit:
                raise ObjectTooLarge(f"{self._path(key)}: {st.st_size} bytes, limit {limit}")
            chunks, pos = [], 0
            while pos < st.st_size:
                chunk = os.pread(fd, st.st_size - pos, pos)
                if not chunk:
                    break  # truncated in place meanwhile: the version below is then not these bytes'
                chunks.append(chunk)
                pos += len(chunk)
            return b"".join(chunks), version_of(os.fstat(fd))
        except OSError as exc:
            raise self._error("cannot read", exc, key) from exc
        finally:
            os.close(fd)

    def open(self, key: str, *, limit: int) -> BinaryIO:
        fd, st = self._open_regular(key)
        if st.st_size > limit:
            os.close(fd)
            raise ObjectTooLarge(f"{self._path(key)}: {st.st_size} bytes, limit {limit}")
        return open(fd, "rb", buffering=0)

    def stat(self, key: str) -> ObjectInfo:
        check_key(key)
        # O_PATH: a bare lookup, nothing is opened for I/O (a FIFO cannot block, a device is not touched).
        fd = self._open_beneath(key, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            st = os.fstat(fd)
        finally:
            os.close(fd)
        if not stat_mod.S_ISREG(st.st_mode):
            raise BadObject(f"{self._path(key)} is not a regular file")
        return ObjectInfo(key, st.st_size, st.st_mtime, version_of(st))

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        check_prefix(prefix)
        rel = prefix[:-1]
        try:
            d = self._open_dir(rel, False)
        except NotFound:
            return
        try:
            try:
                with os.scandir(d) as it:  # through the descriptor: a swapped path is never listed
                    entries = list(it)
            except OSError as exc:
                raise self._error("cannot list", exc, rel) from exc
            for entry in entries:
                try:
                    st = entry.stat(follow_symlinks=False)
                except FileNotFoundError:
                    continue  # removed since the listing
                except OSError:
                    continue
                yield _info(prefix + entry.name, entry.name, st)
        finally:
            self._dirs.give(d)

    # -- writing ---------------------------------------------------------------------------------------------------
    def _write_temp(self, d: int, data: Payload, key: str) -> tuple[str, os.stat_result]:
        tmp = temp_name()
        try:
            fd = os.open(tmp, _TEMP_FLAGS, 0o644, dir_fd=d)
        except OSError as exc:
            raise self._error("cannot write", exc, key) from exc
        try:
            try:
                with open(fd, "wb", closefd=False) as out:
                    sink = _Sink(out)
                    if isinstance(data, (bytes, bytearray, memoryview)):
                        sink.write(bytes(data))
                    else:
                        data(sink)  # type: ignore[arg-type]
                    sink.flush()
                _faults.checkpoint("temp-written")
            except _SinkError as exc:
                raise self._error("cannot write", exc.exc, key) from exc.exc
            # (any other exception is the payload function's own, a local read error say: it propagates as it is)
            try:
                os.fsync(fd)
                st = os.fstat(fd)
            except OSError as exc:
                raise self._error("cannot write", exc, key) from exc
        except BaseException:
            os.close(fd)
            _unlink_at(d, tmp)
            raise
        os.close(fd)
        return tmp, st

    def put(self, key: str, data: Payload, *, if_absent: bool = False,
            if_version: str | None = None) -> ObjectInfo:
        parent, name = self._split(key)
        with self._dir(parent, create=True) as d:
            tmp, st = self._write_temp(d, data, key)
            try:
                if if_absent:
                    self._link_new(d, tmp, name, key)
                elif if_version is not None:
                    self._replace_version(d, tmp, name, key, if_version)
                else:
                    self._rename_over(d, tmp, name, key)
            finally:
                _unlink_at(d, tmp)
        return ObjectInfo(key, st.st_size, st.st_mtime, version_of(st))

    def _rename_over(self, d: int, tmp: str, name: str, key: str) -> None:
        self._rename(d, tmp, d, name, key, "cannot write", key)

    def _rename(self, sd: int, sn: str, dd: int, dn: str, dst_key: str, what: str, err_key: str,
                missing: str | None = None) -> None:
        """rename(2) at two directory descriptors, its errors as storage errors: a directory (or a non-directory
        on the way) where the object goes is BadObject, an absent source NotFound of `missing` when given."""
        try:
            os.rename(sn, dn, src_dir_fd=sd, dst_dir_fd=dd)
        except FileNotFoundError as exc:
            if missing is not None:
                raise NotFound(f"{self._path(missing)} does not exist") from None
            raise self._error(what, exc, err_key) from exc
        except OSError as exc:
            if exc.errno in (errno.EISDIR, errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR):
                raise BadObject(f"{self._path(dst_key)} is a directory: cannot replace it") from None
            raise self._error(what, exc, err_key) from exc

    def _link_new(self, d: int, tmp: str, name: str, key: str) -> None:
        """Create-if-absent: link(2) fails if the name exists, atomically even on NFS, and the object is complete
        before it has its name."""
        try:
            os.link(tmp, name, src_dir_fd=d, dst_dir_fd=d, follow_symlinks=False)
            return
        except FileExistsError:
            raise AlreadyExists(f"{self._path(key)} exists") from None
        except OSError as exc:
            if exc.errno not in _NO_LINK:
                raise self._error("cannot write", exc, key) from exc
        # No hard links on this mount: rename if the name is still free. A concurrent creator can slip into the
        # gap between the check and the rename; both then believe they created it (documented in FORMAT §1).
        try:
            os.stat(name, dir_fd=d, follow_symlinks=False)
            raise AlreadyExists(f"{self._path(key)} exists")
        except FileNotFoundError:
            self._rename_over(d, tmp, name, key)

    def _replace_version(self, d: int, tmp: str, name: str, key: str, version: str) -> None:
        """Compare-and-swap by rename-aside: only one of racing swappers can rename the current object aside; it
        then links its own in only if nobody created the name meanwhile, or puts the old one back. The name is
        absent for that instant, which is why `atomic_replace` is False here."""
        with self._aside_if(d, name, key, version, "replaced"):
            try:
                os.link(tmp, name, src_dir_fd=d, dst_dir_fd=d, follow_symlinks=False)
            except FileExistsError:
                raise PreconditionFailed(f"{self._path(key)} was recreated meanwhile") from None

    @contextmanager
    def _aside_if(self, d: int, name: str, key: str, version: str, what: str,
                  missing: type[CasError] = PreconditionFailed) -> Iterator[None]:
        """The object renamed aside for the body, if it is `version` (else put back: PreconditionFailed); the aside
        name is removed after the body, which has the key to itself meanwhile. An absent object raises `missing`."""
        aside = self._aside(d, name, key, missing)
        try:
            found = version_of(os.stat(aside, dir_fd=d, follow_symlinks=False))
            if found != version:
                _relink(d, aside, name)
                raise PreconditionFailed(f"{self._path(key)} changed (version {found}, expected {version}): "
                                         f"not {what}")
            yield
        finally:
            _unlink_at(d, aside)

    def _aside(self, d: int, name: str, key: str, missing: type[CasError]) -> str:
        aside = temp_name()
        try:
            os.rename(name, aside, src_dir_fd=d, dst_dir_fd=d)
        except FileNotFoundError:
            raise missing(f"{self._path(key)} does not exist") from None
        except OSError as exc:
            raise self._error("cannot replace", exc, key) from exc
        return aside

    def delete(self, key: str, *, if_version: str | None = None) -> None:
        parent, name = self._split(key)
        with self._dir(parent) as d:
            if if_version is None:
                self._unlink(d, name, key)
                return
            with self._aside_if(d, name, key, if_version, "deleted", missing=NotFound):
                pass  # the aside name goes: that is the delete

    def _unlink(self, d: int, name: str, key: str) -> None:
        try:
            os.unlink(name, dir_fd=d)
        except FileNotFoundError:
            raise NotFound(f"{self._path(key)} does not exist") from None
        except OSError as exc:
            if exc.errno in (errno.EISDIR, errno.EPERM):
                raise BadObject(f"{self._path(key)} is a directory: not deleted") from None
            raise self._error("cannot delete", exc, key) from exc

    def touch(self, key: str) -> None:
        parent, name = self._split(key)
        with self._dir(parent) as d:
            try:
                # Not following: a planted symlink gets its own mtime set, never its target's.
                os.utime(name, None, dir_fd=d, follow_symlinks=False)
            except FileNotFoundError:
                raise NotFound(f"{self._path(key)} does not exist") from None
            except OSError as exc:
                raise self._error("cannot touch", exc, key) from exc

    def move(self, src: str, dst: str) -> None:
        sp, sn = self._split(src)
        dp, dn = self._split(dst)
        with self._dir(sp) as sd:
            try:
                os.stat(sn, dir_fd=sd, follow_symlinks=False)
            except FileNotFoundError:
                raise NotFound(f"{self._path(src)} does not exist") from None
            except OSError as exc:
                raise self._error("cannot move", exc, src) from exc
            with self._dir(dp, create=True) as dd:
                self._rename(sd, sn, dd, dn, dst, "cannot move", src, missing=src)

    def make_prefix(self, prefix: str) -> None:
        check_prefix(prefix)
        with self._dir(prefix[:-1], create=True):
            pass

    # -- the server ------------------------------------------------------------------------------------------------
    def now(self) -> float:
        if self._clock_offset is None:
            try:
                with self._dir("") as d:
                    tmp, st = self._write_temp_quick(d)
                    _unlink_at(d, tmp)
                self._clock_offset = st.st_mtime - time.time()
            except (OSError, StoreUnavailable):
                self._clock_offset = 0.0  # read-only: nothing will be freshened or aged by us anyway
        return time.time() + self._clock_offset

    def _write_temp_quick(self, d: int) -> tuple[str, os.stat_result]:
        tmp = temp_name()
        fd = os.open(tmp, _TEMP_FLAGS, 0o644, dir_fd=d)
        try:
            return tmp, os.fstat(fd)
        finally:
            os.close(fd)

    def free_bytes(self) -> int | None:
        with self._dir("") as d:
            try:
                st = os.fstatvfs(d)
            except OSError as exc:
                raise self._error("cannot statvfs", exc) from exc
        if st.f_blocks == 0:
            return None  # some FUSE mounts report no blocks at all: no limit we can see
        return st.f_bavail * st.f_frsize

    def exists(self) -> bool:
        return os.path.isdir(self.root)

    def check_alive(self) -> None:
        fd = self._dirs.take("")
        if fd is None:
            return  # nothing opened yet: nothing this backend wrote can have gone to a ghost
        try:
            opened = os.fstat(fd)
        finally:
            self._dirs.give(fd)
        self._root_id = (opened.st_dev, opened.st_ino)
        try:
            st = os.stat(self.root)
        except OSError as exc:
            raise StoreUnavailable(f"{self.root} vanished mid-operation: {exc.strerror}") from exc
        if (st.st_dev, st.st_ino) != self._root_id:
            raise StoreUnavailable(f"{self.root} was replaced mid-operation (unmounted or renamed?)")

    def close(self) -> None:
        self._dirs.close_all()

    def __del__(self) -> None:
        try:
            self._dirs.close_all()
        except Exception:  # noqa: BLE001 - a finalizer never raises
            pass


def _info(key: str, name: str, st: os.stat_result) -> ObjectInfo:
    mode = st.st_mode
    if not listable(key):
        return ObjectInfo(key, st.st_size, st.st_mtime, version_of(st), "other")
    if stat_mod.S_ISDIR(mode):
        return ObjectInfo(key + "/", 0, st.st_mtime, version_of(st), "prefix")
    if stat_mod.S_ISREG(mode):
        return ObjectInfo(key, st.st_size, st.st_mtime, version_of(st),
                          "temp" if name.startswith(TEMP_PREFIX) else "object")
    return ObjectInfo(key, st.st_size, st.st_mtime, version_of(st), "other")


def _unlink_at(d: int, name: str) -> None:
    try:
        os.unlink(name, dir_fd=d)
    except OSError:
        pass


def _relink(d: int, aside: str, name: str) -> None:
    """Put an object renamed aside back under its name, unless a newer one took the name meanwhile."""
    try:
        os.link(aside, name, src_dir_fd=d, dst_dir_fd=d, follow_symlinks=False)
    except OSError:
        pass
