"""The filesystem itself: a passthrough of a source directory that makes every request pay a round trip.

Run it through ``python -m tools.slowfs`` or ``tools.slowfs.mounted``; importing this module needs libfuse.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import functools
import json
import os
import stat
import threading
import time
from collections import Counter

import mfusepy

from . import channel
from .mount import device_of, unmount

# libfuse's multi-threaded loop starts at most this many workers at once (its own default is 10). A request that
# finds every worker busy waits in the kernel queue, so fewer workers than concurrent clients would serialize
# exactly the parallel I/O a benchmark wants to measure. 32 benchmark threads plus async releases fit in 64; more
# would not help: one Python process answers ~20k requests/s, i.e. ~40 in flight at 2 ms each.
MAX_THREADS = 64

# The kernel keeps at most this many background requests (readahead, asynchronous release) in flight per mount;
# its default of 12 would make delayed releases hold up readahead.
MAX_BACKGROUND = 64

UTIME_NOW = (1 << 30) - 1  # <sys/stat.h>: tv_nsec values that libfuse passes on for utimensat(2)
UTIME_OMIT = (1 << 30) - 2

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_AT_FDCWD = -100


def _renameat2(old: str, new: str, flags: int) -> None:
    if _libc.renameat2(_AT_FDCWD, os.fsencode(old), _AT_FDCWD, os.fsencode(new), ctypes.c_uint(flags)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), old)


class Link:
    """A shared network link: transfers queue behind each other so that all of them together get `bytes_per_s`."""

    def __init__(self, bytes_per_s: float) -> None:
        self._seconds_per_byte = 1.0 / bytes_per_s
        self._lock = threading.Lock()
        self._free_at = 0.0

    def transfer(self, nbytes: int) -> None:
        with self._lock:
            self._free_at = max(time.monotonic(), self._free_at) + nbytes * self._seconds_per_byte
            done = self._free_at
        time.sleep(max(0.0, done - time.monotonic()))


_TRACE = open(os.environ["SLOWFS_TRACE"], "a") if os.environ.get("SLOWFS_TRACE") else None


def _round_trip(method):
    """Count the request and make it wait `delay_s` first, as if it went to a server and back."""

    @functools.wraps(method)
    def wrapper(self, *args):
        with self._counts_lock:
            self.counts[method.__name__] += 1
            if _TRACE is not None:  # SLOWFS_TRACE=<file>: one line per request, to see which paths cost requests
                _TRACE.write(f"{method.__name__} {args[0] if args and isinstance(args[0], str) else '-'}\n")
                _TRACE.flush()
            self._in_flight += 1
            self.counts["in_flight_max"] = max(self.counts["in_flight_max"], self._in_flight)
        try:
            if self.delay_s:
                time.sleep(self.delay_s)  # releases the GIL: concurrent requests wait in parallel
            return method(self, *args)
        finally:
            with self._counts_lock:
                self._in_flight -= 1

    return wrapper


class SlowFS(mfusepy.Operations):
    """Passthrough of `root`. Paths arrive as '/a/b' relative to the mount point."""

    use_ns = True  # exact nanosecond times in getattr/utimens

    def __init__(self, root: str, delay_s: float, bytes_per_s: float | None = None, stats_path: str | None = None):
        self.root = os.path.realpath(root)
        self.delay_s = delay_s
        self.network = Link(bytes_per_s) if bytes_per_s else None  # not `link`: that is an operation
        self.stats_path = stats_path
        self.counts: Counter[str] = Counter()  # requests per operation, bytes read/written, in_flight_max
        self._counts_lock = threading.Lock()
        self._in_flight = 0

    def _count(self, op: str, n: int = 1) -> None:
        with self._counts_lock:
            self.counts[op] += n

    def _full(self, path: str | None) -> str:
        if path is None:  # libfuse could not name the file (an open one): only calls with a handle can work
            raise mfusepy.FuseOSError(errno.ENOENT)
        return self.root + path

    # -- lifecycle --------------------------------------------------------------------------------------------------

    def init_with_config(self, conn, config) -> None:
        if conn is not None:
            conn.max_background = MAX_BACKGROUND
            conn.congestion_threshold = MAX_BACKGROUND * 3 // 4  # the kernel's own ratio (12 -> 9)

    def destroy(self, path) -> None:
        if self.stats_path:
            tmp = self.stats_path + ".tmp"
            with open(tmp, "w") as f:
                json.dump(dict(self.counts), f, indent=1, sort_keys=True)
            os.replace(tmp, self.stats_path)

    # -- metadata ---------------------------------------------------------------------------------------------------

    @_round_trip
    def getattr(self, path, fh=None) -> os.stat_result:  # _FUSE.fgetattr copies it out (mfusepy expects a dict)
        return os.fstat(fh) if fh is not None else os.lstat(self._full(path))

    @_round_trip
    def access(self, path, amode):
        if not os.access(self._full(path), amode, follow_symlinks=False):
            raise mfusepy.FuseOSError(errno.EACCES)
        return 0

    @_round_trip
    def readdir(self, path, fh):
        """Names with their inode numbers: with use_ino, an entry without one reads as d_ino 0, which libc skips."""
        full = self._full(path)
        entries = [(".", {"st_ino": os.lstat(full).st_ino, "st_mode": stat.S_IFDIR}, 0),
                   ("..", {"st_ino": os.lstat(full + "/..").st_ino, "st_mode": stat.S_IFDIR}, 0)]
        with os.scandir(full) as it:
            for entry in it:
                mode = (stat.S_IFLNK if entry.is_symlink() else stat.S_IFDIR if entry.is_dir(follow_symlinks=False)
                        else stat.S_IFREG)  # readdir passes on only the type bits
                entries.append((entry.name, {"st_ino": entry.inode(), "st_mode": mode}, 0))
        return entries

    @_round_trip
    def statfs(self, path):
        st = os.statvfs(self._full(path))
        return {key: getattr(st, key) for key in
                ("f_bsize", "f_frsize", "f_blocks", "f_bfree", "f_bavail", "f_files", "f_ffree", "f_favail",
                 "f_flag", "f_namemax")}

    @_round_trip
    def mkdir(self, path, mode):
        os.mkdir(self._full(path), mode)
        return 0

    @_round_trip
    def rmdir(self, path):
        os.rmdir(self._full(path))
        return 0

    @_round_trip
    def unlink(self, path):
        os.unlink(self._full(path))
        return 0

    @_round_trip
    def rename(self, old, new, flags=0):
        if flags:  # RENAME_NOREPLACE / RENAME_EXCHANGE: keep their semantics rather than silently replacing
            _renameat2(self._full(old), self._full(new), flags)
        else:
            os.rename(self._full(old), self._full(new))
        return 0

    @_round_trip
    def link(self, target, source):
        os.link(self._full(source), self._full(target))
        return 0

    @_round_trip
    def symlink(self, target, source):
        os.symlink(source, self._full(target))
        return 0

    @_round_trip
    def readlink(self, path):
        return os.readlink(self._full(path))

    @_round_trip
    def chmod(self, path, mode):
        os.chmod(self._full(path), mode)
        return 0

    @_round_trip
    def chown(self, path, uid, gid):
        os.lchown(self._full(path), uid, gid)
        return 0

    @_round_trip
    def utimens(self, path, times):
        """`times` is None (both now) or two (sec, nsec) pairs, where nsec may be UTIME_NOW or UTIME_OMIT."""
        full = self._full(path)
        if times is None:
            os.utime(full, follow_symlinks=False)
            return 0
        now = time.time_ns()
        old = os.lstat(full)
        (asec, ansec), (msec, mnsec) = times
        atime = now if ansec == UTIME_NOW else old.st_atime_ns if ansec == UTIME_OMIT else asec * 10**9 + ansec
        mtime = now if mnsec == UTIME_NOW else old.st_mtime_ns if mnsec == UTIME_OMIT else msec * 10**9 + mnsec
        os.utime(full, ns=(atime, mtime), follow_symlinks=False)
        return 0

    # -- files ------------------------------------------------------------------------------------------------------

    @_round_trip
    def create(self, path, mode, flags):
        return os.open(self._full(path), flags | os.O_CREAT, mode)  # O_EXCL, when asked, is checked right here

    @_round_trip
    def open(self, path, flags):
        return os.open(self._full(path), flags)

    def read(self, path, size, offset, fh):
        data = os.pread(fh, size, offset)
        self._count("read")
        self._count("read_bytes", len(data))
        if self.network:
            self.network.transfer(len(data))
        return data

    def write(self, path, data, offset, fh):
        self._count("write")
        self._count("write_bytes", len(data))
        if self.network:
            self.network.transfer(len(data))
        return os.pwrite(fh, data, offset)

    @_round_trip
    def truncate(self, path, length, fh=None):
        if fh is not None:
            os.ftruncate(fh, length)
        else:
            os.truncate(self._full(path), length)
        return 0

    @_round_trip
    def flush(self, path, fh):
        """close(2) waits for this one (NFS: close flushes to the server); data already went through pwrite."""
        return 0

    @_round_trip
    def release(self, path, fh):
        """The kernel sends this after close(2) has returned, so it costs the caller nothing but a server slot."""
        os.close(fh)
        return 0

    @_round_trip
    def fsync(self, path, datasync, fh):
        if datasync:
            os.fdatasync(fh)
        else:
            os.fsync(fh)
        return 0


_worker = threading.local()


class _FUSE(mfusepy.FUSE):
    """mfusepy, faster under concurrency, with the rename flags and utimensat specials it would drop."""

    def _wrapper(self, func, *args, **kwargs):
        # ctypes gives each callback on a libfuse worker thread a fresh Python thread state and deletes it on
        # return; that churn, under the GIL, cut throughput with 32 concurrent requests from ~20k to ~9k
        # requests/s (and stretched a 2 ms delay to 4 ms). One extra reference keeps the worker's state alive.
        if not getattr(_worker, "has_thread_state", False):
            ctypes.pythonapi.PyGILState_Ensure()
            _worker.has_thread_state = True
        return super()._wrapper(func, *args, **kwargs)

    def fgetattr(self, path, buf, fip) -> int:
        """getattr is most requests: copy the stat result straight into libfuse's buffer, skipping a dict."""
        st = self.operations.getattr(None if path is None else os.fsdecode(path), fip.contents.fh if fip else None)
        ctypes.memset(buf, 0, ctypes.sizeof(mfusepy.c_stat))
        c = buf.contents
        c.st_mode, c.st_ino, c.st_nlink, c.st_uid, c.st_gid = st.st_mode, st.st_ino, st.st_nlink, st.st_uid, st.st_gid
        c.st_size, c.st_blocks, c.st_blksize = st.st_size, st.st_blocks, st.st_blksize
        c.st_atimespec.tv_sec, c.st_atimespec.tv_nsec = divmod(st.st_atime_ns, 10**9)
        c.st_mtimespec.tv_sec, c.st_mtimespec.tv_nsec = divmod(st.st_mtime_ns, 10**9)
        c.st_ctimespec.tv_sec, c.st_ctimespec.tv_nsec = divmod(st.st_ctime_ns, 10**9)
        return 0

    def rename_fuse_3(self, old: bytes, new: bytes, flags: int) -> int:
        return self.operations.rename(os.fsdecode(old), os.fsdecode(new), flags)

    def utimens_fuse_3(self, path, buf, fip) -> int:
        times = None
        if buf:  # raw timespecs: mfusepy would fold UTIME_NOW / UTIME_OMIT into bogus times
            atime, mtime = buf.contents.actime, buf.contents.modtime
            times = ((atime.tv_sec, atime.tv_nsec), (mtime.tv_sec, mtime.tv_nsec))
        return self.operations.utimens(None if path is None else os.fsdecode(path), times)


def serve(src: str, mnt: str, *, delay_s: float, bytes_per_s: float | None, entry_timeout: float,
          attr_timeout: float, negative_timeout: float, kernel_cache: bool, direct_io: bool,
          stats_path: str | None = None, exit_on_stdin_eof: bool = False) -> None:
    """Mount and serve in the foreground until unmounted, or SIGINT/SIGTERM/SIGHUP; always leaves unmounted."""
    kernel_fd = channel.mount(os.path.abspath(mnt), "rw,nosuid,nodev,fsname=slowfs,subtype=slowfs")
    device = device_of(mnt)
    if exit_on_stdin_eof:
        threading.Thread(target=_unmount_on_eof, args=(mnt, device), daemon=True).start()
    try:
        _FUSE(
            SlowFS(src, delay_s, bytes_per_s, stats_path),
            f"/dev/fd/{channel.libfuse_device(kernel_fd)}",  # see channel.py: parallel lookups
            foreground=True,
            max_threads=MAX_THREADS,
            max_idle_threads=MAX_THREADS,  # keep workers between bursts (unset, libfuse 3.14 logs a bogus error)
            entry_timeout=entry_timeout,
            attr_timeout=attr_timeout,
            negative_timeout=negative_timeout,
            kernel_cache=kernel_cache,
            direct_io=direct_io,
            use_ino=True,  # st_ino from the source, so hard links (link(2), tar) show as the same inode
            # hard_remove stays off: a file unlinked while open is renamed to .fuse_hiddenNNN until closed, like
            # NFS's silly rename to .nfsNNN, and fstat(2) keeps working on it (with hard_remove: ESTALE).
        )
    finally:
        unmount(mnt, device)  # libfuse unmounts only what it mounted itself


def _unmount_on_eof(mnt: str, device: str | None) -> None:
    """Outlive no parent: whoever started us holds our stdin; once it is gone, so is the mount."""
    while os.read(0, 4096):  # raw reads: a buffered sys.stdin would trip up interpreter shutdown
        pass
    unmount(mnt, device)
