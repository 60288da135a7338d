"""load_tree: restore into a local directory the manifest's files that are missing or differ there.

Every file is written to a temp name in its target directory and renamed into place, so a killed load never leaves
a partial file where torch would read it. Per-file problems (missing or corrupt blob, unsafe path) are misses: the
file is simply compiled again. Only whole-load problems (no space, unreadable manifest, store gone) raise.
"""
from __future__ import annotations

import errno
import logging
import os
import stat
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from . import _faults, layout, limits, localfs, nogc, pack, timing
from .atomic import write_all
from .blobstore import BlobStore, RangeUnusable
from .errors import BlobCorrupt, BlobMissing, CasError, NoSpace, StoreUnavailable, UnsafePath
from .index import Index
from .localfs import TargetDir
from .manifest import Entry, FrameTable, Manifest
from .paths import TEMP_PREFIX
from .posix import PosixBackend
from .roots import refresh_root
from .save import DEFAULT_THREADS
from .scope import Scope, check_env_key
from .space import require_free

log = logging.getLogger("cas.load")

# A temp file in the target older than this belongs to a load that died (FORMAT §7); a live load finishes a file
# in well under a minute. (cas/timing.py holds it with the store's own timing constants.)
TEMP_EXPIRY = timing.TEMP_EXPIRY
# Packs decoded and held at once (each up to limits.MAX_PACK_BYTES): bounds a load's memory to ~100 MB whatever the
# thread count, and a few packs already keep every core busy writing files.
PACKS_IN_MEMORY = 8
# A pack whose needed frames are more than this share of its stored bytes is fetched whole (FORMAT §3a): one request
# instead of several, for at most twice the bytes, and the whole pack is verified as a blob. A full load needs every
# frame of every pack, so it always fetches whole packs.
RANGED_SHARE_MAX = 0.5
# Two runs of needed frames closer than this (compressed bytes between them) are fetched as one range: a request
# costs a round trip (1-20 ms to an object store, a few to a network volume), in which 128 KiB moves at ~100 MB/s
# or more, and it is about half a frame of PACK_FRAME_BYTES of text.
RANGE_GAP_BYTES = 128 << 10


@dataclass
class PackRange:
    """One ranged read of a pack: consecutive frames from `frames[0]`'s start, and the entries they hold."""

    start: int  # compressed byte offset in the pack blob
    content_start: int  # where the first frame's content starts in the pack's content
    frames: list[tuple[int, int]]  # (compressed length, content length) per frame
    items: list[tuple[str, Entry]]


def plan_ranges(items: list[tuple[str, Entry]]) -> list[PackRange] | None:
    """The ranged reads that fetch just the frames of one pack holding `items` (its entries a load needs), or None
    when the pack is to be read whole: an entry without a frame table or outside every frame of it (a pack written
    before frames, or a wrong claim), entries disagreeing on the table, or frames needed beyond RANGED_SHARE_MAX."""
    table = items[0][1].frames
    if table is None:
        return None
    needed = _needed_frames(table, items)
    if needed is None:
        return None
    ranges: list[PackRange] = []
    last = -1
    for index in sorted(needed):
        gap = sum(table.sizes[i][0] for i in range(last + 1, index))
        if ranges and gap <= RANGE_GAP_BYTES:
            ranges[-1].frames += table.sizes[last + 1:index + 1]  # the gap's frames too: one contiguous read
        else:
            frame = table.frame(index)
            ranges.append(PackRange(frame.start, frame.content_start, [table.sizes[index]], []))
        ranges[-1].items += needed[index]
        last = index
    return ranges


def _needed_frames(table: FrameTable, items: list[tuple[str, Entry]]) -> dict[int, list[tuple[str, Entry]]] | None:
    """Frame index -> the entries of `items` it holds, or None when the pack is to be read whole (see plan_ranges).
    Stops at the first frame past RANGED_SHARE_MAX: a full load reads every pack whole, and planning each entry
    of a 20,000-file load cost ~40 ms before the first file was written (docs/benchmarks.md)."""
    budget = RANGED_SHARE_MAX * table.stored_size
    needed: dict[int, list[tuple[str, Entry]]] = {}
    for path, entry in items:
        # (entries of one pack share one parsed table: `is` spares comparing its tuples for each)
        index = table.index_of(entry.offset, entry.size) if entry.frames is table or entry.frames == table else None
        if index is None:
            return None
        if index not in needed:
            budget -= table.sizes[index][0]
            if budget < 0:
                return None
            needed[index] = []
        needed[index].append((path, entry))
    return needed


def _plan_packs(packed: list[tuple[str, Entry]]) -> tuple[dict[str, list[tuple[str, Entry]]],
                                                          list[tuple[str, PackRange]]]:
    """Which packs a load reads whole (pack id -> its entries to restore) and which by ranges (pack id, range)."""
    by_pack: dict[str, list[tuple[str, Entry]]] = {}
    for item in packed:
        by_pack.setdefault(item[1].stored_id, []).append(item)
    whole: dict[str, list[tuple[str, Entry]]] = {}
    ranged: list[tuple[str, PackRange]] = []
    for pack_id, items in by_pack.items():
        parts = plan_ranges(items)
        if parts is None:
            whole[pack_id] = items
        else:
            ranged += [(pack_id, part) for part in parts]
    return whole, ranged


@dataclass
class LoadResult:
    manifest_found: bool = False
    files: int = 0  # entries in the manifest
    restored: int = 0
    present: int = 0  # already in the target with the right size (and hash, with verify)
    bytes_restored: int = 0
    corrupt: int = 0  # blobs that failed verification (quarantined)
    missing: int = 0  # blobs in neither blobs/ nor trash/
    misses: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)
    seconds: float = 0.0


def safe_mode(mode: int) -> int:
    """Never setuid/setgid/sticky or group/world-writable; always owner read-write (FORMAT §3)."""
    return (mode & 0o755) | 0o600


def load_tree(
    dst_dir: str | os.PathLike,
    store: BlobStore,
    scope: Scope,
    env_key: str,
    *,
    threads: int = DEFAULT_THREADS,
    verify: bool = False,
    manifest: Manifest | None = None,
    temp_expiry: float = TEMP_EXPIRY,
) -> LoadResult:
    """`manifest`: the manifest of `env_key` if the caller has just read it (spares a second read).
    `temp_expiry`: temp files in the target older than this many seconds are a dead load's leftovers."""
    check_env_key(env_key)
    dst = os.fspath(dst_dir)
    localfs.refuse_overlap(dst, scope=scope.root, store=store.root)  # before anything is read or written
    started = time.monotonic()
    result = LoadResult()
    if manifest is None:
        manifest = scope.read_manifest(env_key)
    if manifest is None:
        result.seconds = time.monotonic() - started
        return result
    result.manifest_found = True
    result.files = len(manifest.entries)

    try:
        os.makedirs(dst, exist_ok=True)
        target = TargetDir(dst)
    except OSError as exc:
        raise _local_error(exc, dst) from exc
    with target:
        _remove_old_temp_files(target, temp_expiry)
        with nogc.paused():  # a few objects per file, no cycles (cas/nogc.py)
            _restore_all(target, store, scope, env_key, manifest, result, threads, verify)
    result.seconds = time.monotonic() - started
    log.debug("load %s: restored %d, present %d, misses %d", env_key, result.restored, result.present,
              len(result.misses))
    return result


def _restore_all(target: TargetDir, store: BlobStore, scope: Scope, env_key: str, manifest: Manifest,
                 result: LoadResult, threads: int, verify: bool) -> None:
    """Restore every entry of `manifest` missing from `target` (the body of load_tree, fds open)."""
    top = _top_level_names(target)
    todo = [(p, e) for p, e in manifest.entries.items() if not _already_there(target.root, p, e, verify, top)]
    result.present = result.files - len(todo)
    require_free(target.root, sum(e.size for _, e in todo), "restoring the cache")

    abort = threading.Event()
    lock = threading.Lock()
    restored: list[tuple[str, os.stat_result, str]] = []

    def miss(path: str, exc: Exception) -> None:
        with lock:
            result.misses.append((path, str(exc)))
            result.corrupt += isinstance(exc, (BlobCorrupt, pack.PackEntryCorrupt))
            result.missing += isinstance(exc, BlobMissing)

    def restore(item: tuple[str, Entry], data: memoryview | None = None) -> None:
        path, entry = item
        if abort.is_set():
            return
        try:
            st = _restore_one(store, target, path, entry, data)
        except (BlobMissing, BlobCorrupt, UnsafePath, _LocalMiss) as exc:
            miss(path, exc)
            return
        except NoSpace:
            abort.set()
            raise
        with lock:
            result.restored += 1
            result.bytes_restored += entry.size
            restored.append((path, st, entry.blob_id))

    def restore_pack(pack_id: str, items: list[tuple[str, Entry]]) -> None:
        with pack_slots:  # a pack's content is in memory until its files are written
            if abort.is_set():
                return
            try:
                content = store.get_bytes(pack_id, limits.MAX_PACK_BYTES)
            except (BlobMissing, BlobCorrupt) as exc:
                for path, _ in items:
                    miss(path, exc)
                return
            for path, entry in items:
                try:
                    data = pack.extract(content, entry.blob_id, entry.size, entry.offset)
                except pack.PackEntryCorrupt as exc:
                    miss(path, exc)
                    continue
                restore((path, entry), data)

    def restore_range(pack_id: str, part: PackRange) -> None:
        """A pack's frames fetched alone; whatever they do not yield verified goes to the whole pack (`retry`): a
        ranged read proves nothing about the pack, so it never quarantines it or counts anything corrupt."""
        with pack_slots:
            if abort.is_set():
                return
            try:
                content = store.get_frames(pack_id, part.start, part.frames)
            except BlobMissing as exc:
                for path, _ in part.items:
                    miss(path, exc)
                return
            except RangeUnusable as exc:
                log.info("%s; reading the whole pack", exc)
                with lock:
                    retry.setdefault(pack_id, []).extend(part.items)
                return
            for path, entry in part.items:
                try:
                    data = pack.extract(content, entry.blob_id, entry.size, entry.offset - part.content_start)
                except pack.PackEntryCorrupt:
                    with lock:
                        retry.setdefault(pack_id, []).append((path, entry))
                    continue
                restore((path, entry), data)

    loose = [item for item in todo if item[1].pack is None]
    whole, ranged = _plan_packs([item for item in todo if item[1].pack is not None])
    retry: dict[str, list[tuple[str, Entry]]] = {}  # pack -> entries its ranges did not yield
    pack_slots = threading.Semaphore(PACKS_IN_MEMORY)
    workers = _io_workers(store, todo, threads)
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="cas-load") as pool:
        # The root refresh (scope.id read, root stat, server-clock probe: ~10 serial requests) overlaps the restores.
        pool.submit(_refresh_root, store, scope, env_key)
        # Packs first: each is one large read followed by many local writes, the longest tasks.
        futures = [pool.submit(restore_pack, p, items) for p, items in whole.items()]
        futures += [pool.submit(restore_range, p, part) for p, part in ranged]
        futures += [pool.submit(restore, item) for item in loose]
        errors = [f.exception() for f in futures]
        if retry and not abort.is_set():  # at most one whole read per pack, after all its ranges have answered
            errors += [f.exception() for f in [pool.submit(restore_pack, p, items) for p, items in retry.items()]]
    first = next((e for e in errors if e is not None), None)
    if first is not None:
        raise first
    if result.corrupt or result.missing:
        scope.request_audit(env_key)  # so the next save uploads these files again
    if restored:
        index = Index(target.root)
        for path, st, blob_id in restored:
            index.record(path, st, blob_id, trusted=True)  # we wrote exactly this content
        index.write()


def _refresh_root(store: BlobStore, scope: Scope, env_key: str) -> None:
    try:
        refresh_root(store, scope.scope_id, env_key)
    except Exception as exc:  # noqa: BLE001 - a refresh is best effort; never fail a load over it
        log.debug("root refresh failed: %s", exc)


# Opening a file reaches the file server on a network volume (NFS checks attributes at open: close-to-open
# consistency), so it takes a round trip there (>= a few hundred microseconds) and tens of microseconds on a local
# disk. Below this the store is local-like: restores are CPU-bound, and threads beyond the cores only fight over
# the GIL (measured, 680 files / 56.6 MB on 2 cores: 0.27 s with 2 threads, 0.95 s with 32).
LOCAL_OPEN_S = 200e-6
_PROBES = 3
# On a local-like store, a restore of small files (a few KB each) is nearly all per-file Python work between short
# syscalls, and a second thread only passes the GIL back and forth; with larger files decompression, hashing and
# writes release the GIL and threads help. Measured on 2 cores: 20,000 files of 7.5 KB mean, 0.84 s with one
# thread and 0.95 s with two; 680 files of 83 KB mean, 0.11 s with one and 0.083 s with two.
LOCAL_SMALL_MEAN = 32 << 10


def _io_workers(store: BlobStore, todo: list[tuple[str, Entry]], threads: int) -> int:
    """`threads` for a high-latency store; about the core count when blob opens are as fast as a local disk's."""
    cores = max(2, os.cpu_count() or 2)
    if threads <= cores or len(todo) < _PROBES or not isinstance(store.backend, PosixBackend):
        return max(1, threads)  # (an object store is never as fast as a local disk: no probe requests)
    fastest = float("inf")
    for _, entry in todo[:_PROBES]:
        started = time.perf_counter()
        try:
            store.backend.stat(layout.blob(entry.stored_id))
        except CasError:
            return threads  # missing or odd blob: no verdict, keep the safe choice for a slow volume
        fastest = min(fastest, time.perf_counter() - started)
    if fastest >= LOCAL_OPEN_S:
        return threads
    return cores if sum(e.size for _, e in todo) >= LOCAL_SMALL_MEAN * len(todo) else 1


class _LocalMiss(Exception):
    """The target holds something at that path we will not replace (a directory), or a local write failed."""


def _top_level_names(target: TargetDir) -> set[str] | None:
    """The names in the target's root (one listing), or None if it cannot be listed."""
    try:
        return set(os.listdir(target.root_fd))
    except OSError:
        return None


def _already_there(root: str, rel: str, entry: Entry, verify: bool, top: set[str] | None = None) -> bool:
    if top is not None and rel.partition("/")[0] not in top:
        return False  # nothing at its first component: no lstat per file in a fresh target
    path = os.path.join(root, rel)
    try:
        st = os.lstat(path)
    except OSError:  # absent, a parent is a file, or the path is too long for this target (ENAMETOOLONG)
        return False
    if not stat.S_ISREG(st.st_mode) or st.st_size != entry.size:
        return False
    if not verify:
        return True
    try:
        return localfs.hash_verified(path, st)[0] == entry.blob_id
    except (OSError, localfs.FileChanged):
        return False


def _restore_one(store: BlobStore, target: TargetDir, rel: str, entry: Entry,
                 data: memoryview | None) -> os.stat_result:
    """Write one file: `data` (already verified, from a pack) or the entry's own blob, fetched and verified here.
    Everything goes through the parent directory's fd (localfs.TargetDir): a parent swapped for a symlink is a miss,
    never a write outside the target."""
    localfs.before("restore", rel)
    if len(rel.encode()) + target.root_bytes >= limits.MAX_PATH_BYTES:  # PATH_MAX counts the NUL
        raise _LocalMiss(f"{rel[:80]!r}...: path too long for this target ({limits.MAX_PATH_BYTES} bytes)")
    try:
        with target.parent(rel) as (dir_fd, name):
            return _write_into(store, dir_fd, name, entry, data)
    except OSError as exc:
        if exc.errno in (errno.EISDIR, errno.ENOTEMPTY, errno.ENOTDIR):
            raise _LocalMiss(f"{os.path.join(target.root, rel)} is a directory") from None
        raise _local_error(exc, os.path.join(target.root, rel)) from exc


# Read once: a process's umask does not change under a library (and reading it per file costs a file read).
_umask = localfs.process_umask()


def _write_into(store: BlobStore, dir_fd: int, name: str, entry: Entry, data: memoryview | None) -> os.stat_result:
    """Create a temp file in `dir_fd`, fill it, rename it to `name`; the stat of the result (for the index)."""
    tmp = localfs.temp_name()
    mode = safe_mode(entry.mode)
    fd = os.open(tmp, localfs.CREATE_FLAGS, mode, dir_fd=dir_fd)
    try:
        if data is None:
            with open(fd, "wb", closefd=False) as out:
                store.get_into(entry.blob_id, entry.size, out)
        else:  # a packed file, in memory already: plain syscalls, no file object per file
            write_all(fd, data)
        _faults.checkpoint("restored-temp")
        if _umask is None or mode & _umask:  # created with exactly `mode` unless the umask took bits away
            os.fchmod(fd, mode)
        # No fsync: a pod whose machine crashes loses its local /tmp; a torn file after a power cut would fail
        # Inductor's own checks and be recompiled. The rename keeps other processes from ever seeing it partial.
        os.rename(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        return os.fstat(fd)  # after the rename: it changes ctime, which the index keys on
    except BaseException:
        _unlink(tmp, dir_fd)
        raise
    finally:
        os.close(fd)


def _local_error(exc: OSError, where: str) -> Exception:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return NoSpace(f"local disk full at {where}: {exc.strerror}")
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS, errno.ENAMETOOLONG):
        return _LocalMiss(f"cannot write {where}: {exc.strerror}")
    return StoreUnavailable(f"{where}: {exc.strerror or exc}")


def _remove_old_temp_files(target: TargetDir, expiry: float) -> None:
    """Temp files a killed load left in the target (FORMAT §7), by age; through dir fds, never following a link."""
    localfs.remove_old_temp_files(target, TEMP_PREFIX, time.time() - expiry)


def _unlink(name: str, dir_fd: int) -> None:
    try:
        os.unlink(name, dir_fd=dir_fd)
    except OSError:
        pass
