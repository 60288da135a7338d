"""The local side's file access (docs/FORMAT.md §7): the cache directory a save reads and the target a load writes.

Both directories belong to a pod whose other processes (the model server, Inductor, anything else in the image) may
change them while we work, so nothing here trusts a path twice:

- a save opens every local file `O_NOFOLLOW | O_NONBLOCK` and compares its `fstat` (device, inode, size, mtime) with
  what the scan saw (`verified_fd`): a file swapped for a symlink or for another file after the scan is
  `FileChanged`, skipped like a file modified mid-save, never read into the store;
- a load writes through directory descriptors opened one component at a time from the target root with
  `O_NOFOLLOW | O_DIRECTORY` (`TargetDir`): a parent swapped for a symlink mid-load makes that entry a miss instead
  of redirecting the write;
- small local files we own (`.cas-index`) are read with `read_regular`: never a FIFO, device or symlink, bounded.

`hook` is the test seam: tests set it to a callable that runs before each local read of a save and each restored
file of a load, to drive a race at an exact point (tests/test_local_hardening.py).
"""
from __future__ import annotations

import errno
import logging
import os
import random
import stat
import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import BinaryIO

import blake3

from .atomic import temp_name as _store_temp_name
from .errors import OverlappingDirs, UnsafePath

log = logging.getLogger("cas.localfs")

# O_NONBLOCK: opening a FIFO planted at a local path must not wait for a writer (reads of regular files ignore it).
READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# O_EXCL never follows a symlink at the temp name; O_NOFOLLOW says so explicitly.
CREATE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
# Directory descriptors a TargetDir keeps open. An Inductor cache has about one directory per file: keeping one fd
# per directory would hit the process's fd limit (often 1024) on a 20,000-file cache, so the least recently used
# are closed and reopened from their nearest open ancestor when needed again. Loads write files of one directory
# together (packs are in path order), so a small cache hits almost always.
MAX_OPEN_DIRS = 128
CHUNK = 1 << 20

# Test seam: called as hook(event, path) before each local file a save opens ("read", its absolute path), before
# each file a load restores ("restore", the entry path) and before each old temp file a load removes ("sweep", its
# path in the target). None in production.
hook: Callable[[str, str], None] | None = None


class FileChanged(Exception):
    """A local file is not the one the scan saw (replaced, swapped for a symlink or non-regular file, resized or
    modified): a save leaves it for the next save."""


def before(event: str, path: str) -> None:
    """Run the test seam, if set."""
    if hook is not None:
        hook(event, path)


# -- save: reading local files -----------------------------------------------------------------------------------------
def same_file(st: os.stat_result, seen: os.stat_result) -> bool:
    """True if `st` is the file `seen` describes, unchanged: same inode of the same device, same size and mtime."""
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns) == (
        seen.st_dev, seen.st_ino, seen.st_size, seen.st_mtime_ns)


def verified_fd(path: str, seen: os.stat_result) -> int:
    """An fd of the regular file at `path`, checked to be the file the scan saw (`seen`, its lstat). Raises
    FileChanged if it is now a symlink, a non-regular file or another file; FileNotFoundError if it is gone."""
    before("read", path)
    try:
        fd = os.open(path, READ_FLAGS)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENXIO, errno.EISDIR, errno.ENOTDIR):  # symlink, socket, dir, parent
            raise FileChanged(f"{path} is no longer the regular file the scan saw") from None
        raise
    try:
        st = os.fstat(fd)
    except BaseException:
        os.close(fd)
        raise
    if not stat.S_ISREG(st.st_mode) or not same_file(st, seen):
        os.close(fd)
        raise FileChanged(f"{path} changed since the scan")
    return fd


def hash_verified(path: str, seen: os.stat_result) -> tuple[str, int]:
    """blake3 hex digest and size of the local file the scan saw at `path` (verified_fd's checks)."""
    fd = verified_fd(path, seen)
    try:
        return hash_fd(fd)
    finally:
        os.close(fd)


def hash_fd(fd: int) -> tuple[str, int]:
    """blake3 hex digest and size of what `fd` reads from its current offset to the end."""
    hasher = blake3.blake3()
    size = 0
    while chunk := os.read(fd, CHUNK):
        hasher.update(chunk)
        size += len(chunk)
    return hasher.hexdigest(), size


def read_verified(path: str, seen: os.stat_result) -> bytes:
    """The content of the local file the scan saw at `path`, read once; at most its scanned size plus one byte (so a
    file that grew is seen to differ). For files small enough to hold in memory (packs)."""
    fd = verified_fd(path, seen)
    try:
        return _read_upto(fd, seen.st_size + 1)
    finally:
        os.close(fd)


def open_source(src: str | int) -> BinaryIO:
    """A binary reader of a local file to upload: `src` is an fd from verified_fd (not closed with the reader) or a
    path, opened O_NOFOLLOW|O_NONBLOCK and refused unless a regular file. The caller still checks the content hash."""
    if isinstance(src, int):
        os.lseek(src, 0, os.SEEK_SET)  # from the start each time: a writer may retry with the same fd
        return open(src, "rb", buffering=0, closefd=False)
    fd = os.open(src, READ_FLAGS)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise FileChanged(f"{src} is not a regular file")
        return open(fd, "rb", buffering=0)
    except BaseException:
        os.close(fd)
        raise


def read_regular(path: str, limit: int) -> bytes | None:
    """The bytes of the regular file at `path` (a symlink there is not followed), or None if absent. Raises
    OSError if it is not a regular file (a FIFO: no wait) or unreadable, ValueError if over `limit` bytes."""
    try:
        fd = os.open(path, READ_FLAGS)
    except FileNotFoundError:
        return None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise OSError(errno.EINVAL, f"not a regular file: {path}")
        data = _read_upto(fd, limit + 1)
    finally:
        os.close(fd)
    if len(data) > limit:
        raise ValueError(f"{path} is over {limit} bytes")
    return data


def _read_upto(fd: int, limit: int) -> bytes:
    """At most `limit` bytes from `fd`: one read for a regular file, more only if reads come back short."""
    chunks: list[bytes] = []
    left = limit
    while left > 0:
        chunk = os.read(fd, left)
        if not chunk:
            break
        chunks.append(chunk)
        left -= len(chunk)
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


# -- load: writing into the target -------------------------------------------------------------------------------------
class TargetDir:
    """A directory files are restored into, reached only through directory descriptors.

    `parent(rel)` yields the fd of entry `rel`'s parent directory, creating missing directories on the way. Each
    component is opened O_NOFOLLOW|O_DIRECTORY relative to the fd of the one above it, so a symlink or non-directory
    anywhere on the way is UnsafePath (the entry is a miss) and a directory swapped for a symlink after we opened it
    cannot redirect anything: we keep writing into the directory we opened. Up to `max_open` directory fds stay
    open (least recently used closed first; one in use by a thread is never closed). Thread-safe."""

    def __init__(self, root: str | os.PathLike, *, max_open: int | None = None):
        self.root = os.path.realpath(os.fspath(root))
        self.root_bytes = len(os.fsencode(self.root)) + 1  # with the '/' before an entry path
        self.root_fd = os.open(self.root, DIR_FLAGS)  # realpath'd: the root itself is the caller's choice
        self._max_open = max(1, MAX_OPEN_DIRS if max_open is None else max_open)
        self._open: OrderedDict[str, list[int]] = OrderedDict()  # rel dir -> [fd, users], least recent first
        self._lock = threading.Lock()

    def close(self) -> None:
        with self._lock:
            for fd, _ in self._open.values():
                os.close(fd)
            self._open.clear()
            if self.root_fd >= 0:
                os.close(self.root_fd)
                self.root_fd = -1

    def __enter__(self) -> TargetDir:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def open_count(self) -> int:
        """Directory fds held besides the root's (for tests)."""
        with self._lock:
            return len(self._open)

    def parent(self, rel: str, *, create: bool = True) -> _Parent:
        """(fd of the directory holding entry `rel`, `rel`'s last component), valid inside the with block. Missing
        directories are created, or with `create=False` are FileNotFoundError. (A class, not a generator: a load
        enters one per restored file, and a generator-based context manager costs several times as much.)"""
        return _Parent(self, rel, create)

    def _release(self, head: str) -> None:
        with self._lock:
            slot = self._open.get(head)
            if slot is not None:
                slot[1] -= 1
            self._trim()

    def _acquire(self, head: str, rel: str, create: bool) -> int:
        # Under the lock: opening is a few syscalls per new directory, and holding it keeps any fd in use from being
        # closed by another thread's eviction.
        with self._lock:
            slot = self._open.get(head)
            if slot is None:
                slot = self._open_dirs(head, rel, create)
            slot[1] += 1
            self._open.move_to_end(head)
            self._trim()
            return slot[0]

    def _open_dirs(self, head: str, rel: str, create: bool) -> list[int]:
        """Open (creating as needed) `head` from its nearest open ancestor, caching every directory on the way."""
        parts = head.split("/")
        start = len(parts) - 1
        while start > 0 and "/".join(parts[:start]) not in self._open:
            start -= 1
        fd = self.root_fd if start == 0 else self._open["/".join(parts[:start])][0]
        slot: list[int] = [fd, 0]
        for i in range(start, len(parts)):
            fd = _open_child(fd, parts[i], rel, create)
            slot = [fd, 0]
            self._open["/".join(parts[:i + 1])] = slot
        return slot

    def _trim(self) -> None:
        """Close least recently used directory fds no thread is using, down to max_open."""
        excess = len(self._open) - self._max_open
        if excess <= 0:
            return
        # Oldest first, stopping at the first `excess` idle ones: nearly always the first (this runs twice per file).
        victims = []
        for key, (_, users) in self._open.items():
            if users == 0:
                victims.append(key)
                if len(victims) == excess:
                    break
        for key in victims:
            os.close(self._open.pop(key)[0])


class _Parent:
    __slots__ = ("create", "head", "rel", "target")

    def __init__(self, target: TargetDir, rel: str, create: bool):
        self.target, self.rel, self.create, self.head = target, rel, create, ""

    def __enter__(self) -> tuple[int, str]:
        head, _, name = self.rel.rpartition("/")
        if not head:
            return self.target.root_fd, name
        fd = self.target._acquire(head, self.rel, self.create)
        self.head = head  # only once acquired: __exit__ releases what __enter__ took
        return fd, name

    def __exit__(self, *exc: object) -> None:
        if self.head:
            self.target._release(self.head)


def _open_child(parent_fd: int, name: str, rel: str, create: bool = True) -> int:
    """Open directory `name` under `parent_fd` without following a symlink, creating it if absent (`create`)."""
    # mkdir first: in a fresh target nearly every parent is new (about one directory per file in an Inductor cache).
    if create:
        try:
            os.mkdir(name, 0o755, dir_fd=parent_fd)
        except FileExistsError:
            pass
    try:
        return os.open(name, DIR_FLAGS, dir_fd=parent_fd)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):
            raise UnsafePath(f"{rel!r}: parent {name!r} is a symlink or not a directory") from None
        raise


def remove_old_temp_files(target: TargetDir, prefix: str, cutoff: float) -> int:
    """Unlink files named `prefix`* whose mtime is before `cutoff` anywhere under `target` (temp files of a killed
    load). The listing is a plain walk by path (as cheap as before; symlinks are never descended into) and only
    yields candidate names; each candidate is checked and unlinked through its parent's fd (TargetDir.parent,
    O_NOFOLLOW on every component, nothing created), so a directory swapped for a symlink during the walk can never
    make us remove a file outside the target. Returns the number removed."""
    removed = 0
    for directory, _, names in os.walk(target.root):
        candidates = [n for n in names if n.startswith(prefix)]
        if not candidates:
            continue  # nearly every directory: no syscall beyond the listing
        rel_dir = os.path.relpath(directory, target.root)
        for name in candidates:
            rel = name if rel_dir == "." else f"{rel_dir}/{name}"
            before("sweep", rel)
            try:
                with target.parent(rel, create=False) as (dir_fd, leaf):
                    if os.lstat(leaf, dir_fd=dir_fd).st_mtime < cutoff:
                        os.unlink(leaf, dir_fd=dir_fd)
                        removed += 1
            except (OSError, UnsafePath):
                continue  # gone, or a parent is now a symlink: not ours to clean
    return removed


def process_umask() -> int | None:
    """This process's umask from /proc/self/status (Linux >= 4.7), or None if unknown. Read, never set: os.umask
    would change it for every thread for an instant."""
    try:
        with open("/proc/self/status", "rb") as fh:
            for line in fh:
                if line.startswith(b"Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    return None


_temp_prefix: str = ""


def temp_name() -> str:
    """A temp name in atomic.temp_name's format (FORMAT §1) without a getpid(2) per file: the `.tmp-<host>-<pid>-`
    prefix is computed once per process (again after a fork). A load names one temp file per restored file: the 16
    hex digits come from `random` (reseeded after a fork), not from a getrandom(2) per file. They only keep this
    process's own temp names apart (host and pid are in the prefix; O_EXCL refuses a clash); nothing relies on
    them being unpredictable."""
    global _temp_prefix
    if not _temp_prefix:
        sample = _store_temp_name()
        _temp_prefix = sample[:len(sample) - 16]
    return f"{_temp_prefix}{random.getrandbits(64):016x}"


def _forget_temp_prefix() -> None:
    global _temp_prefix
    _temp_prefix = ""


os.register_at_fork(after_in_child=_forget_temp_prefix)


# -- both: the cache directory must not overlap the volume's directories -----------------------------------------------
def refuse_overlap(local: str | os.PathLike, **volume_dirs: str | os.PathLike) -> None:
    """Raise OverlappingDirs if the local cache directory `local` is, contains or lies inside any of `volume_dirs`
    (name=path, e.g. scope=..., store=...), comparing real paths (symlinks resolved). A save from such a directory
    would record the store's own files as cache entries, and a load into it would overwrite them. A location that is
    not an absolute path (an object store's URL) cannot overlap a local directory."""
    here = os.path.realpath(os.fspath(local))
    for label, path in volume_dirs.items():
        if not os.path.isabs(os.fspath(path)):
            continue
        there = _real_volume_dir(os.fspath(path))
        if here == there:
            raise OverlappingDirs(f"cache directory {here} is the {label} directory")
        if _inside(here, there):
            raise OverlappingDirs(f"cache directory {here} lies inside the {label} directory {there}")
        if _inside(there, here):
            raise OverlappingDirs(f"cache directory {here} contains the {label} directory {there}")


# Real paths of volume directories, per process: on a network volume realpath costs a request per component, and
# the scope and store of a process do not move (b10_transfer's config keeps its resolved paths the same way).
_real_dirs: dict[str, str] = {}
_REAL_DIRS_KEPT = 64


def _real_volume_dir(path: str) -> str:
    hit = _real_dirs.get(path)
    if hit is not None:
        return hit
    try:
        real = os.path.realpath(path, strict=True)
    except OSError:  # absent (not created yet) or unreadable: resolved again next time
        return os.path.realpath(path)
    if len(_real_dirs) >= _REAL_DIRS_KEPT:
        _real_dirs.clear()
    _real_dirs[path] = real
    return real


def forget_real_paths() -> None:
    """Drop the remembered real paths (a test that swaps a volume directory for a symlink within one process)."""
    _real_dirs.clear()


def _inside(path: str, ancestor: str) -> bool:
    return path.startswith(ancestor.rstrip("/") + "/")
