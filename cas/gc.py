"""Garbage collection of the org store (docs/FORMAT.md §5).

One run, under `locks/gc.lock`:

1. `now` from the volume's clock; `cutoff = now - grace`.
2. Roots: dead ones (unused for longer than the root TTL) are removed; the live set is every blob named by a live
   root plus every blob its manifest references. Anything unreadable on the way stops the run from deleting.
3. `--max-size`: least recently used roots (never one used within the grace period) are retired until the blobs
   that stay fit.
4. Phase one: unreferenced blobs older than the cutoff move to `trash/`, stamped with the time they were trashed.
5. Phase two: trash older than the cutoff is deleted; trash that is live again is put back.
6. Temp files, stale lock files and old quarantine evidence are removed by age.

Everything compares mtimes with the server's clock, never the client's.
"""
from __future__ import annotations

import logging
import os
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterable

from . import _faults, limits
from .atomic import temp_path_beside
from .blobstore import BlobInfo, BlobStore, is_blob_id
from .errors import BlobCorrupt, BlobMissing, CasError, ManifestError
from .load import TEMP_EXPIRY
from .lock import LockFile
from .manifest import loads
from .paths import TEMP_PREFIX
from .roots import DEFAULT_ROOT_TTL, Root, iter_roots
from .scan import parallel_map, scan_area
from .scope import Scope

log = logging.getLogger("cas.gc")

# Default grace: 6 h = the 1 h default freshen_after plus 5 h during which a save may sit between checking a blob
# and committing its root (FORMAT §5). A real save takes seconds; hours cover a suspended or throttled pod.
DEFAULT_GRACE = 6 * 3600
# Grace must leave room for a blob to be one freshen_after old when a save finds it, plus a save's duration; at
# 2x freshen_after the window a save has is one freshen_after (FORMAT §5's inequality).
MIN_GRACE_FACTOR = 2
# A held manifest lock lives for a save's commit (seconds, 60 s lock timeout); a held slot lock is refreshed every
# 10 s. A lock file untouched for 10 minutes by the server's clock therefore has no live holder.
LOCK_EXPIRY = 600
# Quarantined blobs are evidence for an operator, not data: a week is time enough to look at them.
QUARANTINE_EXPIRY = 7 * 24 * 3600
# The gc lock is refreshed every stale_after/3 while held; a dead collector's lock is broken after a minute.
GC_LOCK_STALE = 60.0
# A second collector waits this long for the first by default: a collection of a large store takes minutes.
DEFAULT_LOCK_WAIT = 120.0
GC_LOCK = "gc.lock"

Progress = Callable[[str, int, int], None]  # (phase, done, total); total 0 when unknown


class GcRefused(CasError):
    """gc will not run with these settings (a grace period too short for the store's freshen_after)."""


class GcLockLost(CasError):
    """Another collector took `locks/gc.lock` from us mid-run (ours looked stale to it); we stop at once."""


@dataclass
class RootInfo:
    scope_id: str
    env_key: str
    scope_path: str
    manifest: str
    last_used: float  # root mtime (server clock)
    blobs: int = 0
    raw_bytes: int = 0


@dataclass
class GcResult:
    dry_run: bool = False
    collected: bool = False  # False when a problem kept the run from deleting anything
    now: float = 0.0
    grace: float = 0.0
    cutoff: float = 0.0
    roots_live: int = 0
    roots_dead: int = 0
    roots_retired: list[RootInfo] = field(default_factory=list)
    blobs_live: int = 0  # distinct ids in the live set
    blobs_kept: int = 0
    bytes_kept: int = 0
    blobs_young: int = 0  # kept only because younger than the cutoff
    blobs_trashed: int = 0
    bytes_trashed: int = 0
    blobs_deleted: int = 0
    bytes_deleted: int = 0
    blobs_restored: int = 0  # live blobs found in trash and put back
    trash_left: int = 0
    bytes_trash_left: int = 0
    temp_deleted: int = 0
    locks_deleted: int = 0
    quarantine_deleted: int = 0
    max_size: int | None = None
    over_max_size: int = 0  # bytes still above --max-size after retiring every eligible root
    problems: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


def check_grace(store: BlobStore, grace: float) -> None:
    if grace < MIN_GRACE_FACTOR * store.freshen_after:
        raise GcRefused(
            f"grace period {grace:g}s is shorter than {MIN_GRACE_FACTOR} x freshen_after "
            f"({store.freshen_after:g}s, from {store.root}/CAS-FORMAT): a blob a save relies on could be collected "
            f"before the save commits; use --grace {MIN_GRACE_FACTOR * store.freshen_after:g} or more"
        )


def collect(
    store: BlobStore,
    *,
    scope: Scope | None = None,
    grace: float = DEFAULT_GRACE,
    root_ttl: float = DEFAULT_ROOT_TTL,
    max_size: int | None = None,
    dry_run: bool = False,
    lock_wait: float = DEFAULT_LOCK_WAIT,
    progress: Progress | None = None,
) -> GcResult:
    """One collection. `scope` (optional) is this pod's deployment scope: only its temp and lock files are swept,
    since gc cannot see other deployments' scopes. Raises GcRefused, LockTimeout, GcLockLost, StoreUnavailable."""
    check_grace(store, grace)
    if root_ttl <= grace:
        raise GcRefused(f"root TTL {root_ttl:g}s must be longer than the grace period {grace:g}s")
    started = time.monotonic()
    if dry_run:
        # A dry run changes nothing, so it needs no lock; what it prints may race a real run, which is fine.
        return _run(store, scope, grace, root_ttl, max_size, True, None, progress, started)
    lock = LockFile(os.path.join(store.root, "locks", GC_LOCK), stale_after=GC_LOCK_STALE, timeout=lock_wait,
                    heartbeat=True)
    with lock:
        return _run(store, scope, grace, root_ttl, max_size, False, lock, progress, started)


def _run(store, scope, grace, root_ttl, max_size, dry_run, lock, progress, started) -> GcResult:
    res = GcResult(dry_run=dry_run, grace=grace, max_size=max_size)
    res.now = now = _server_now(store)
    res.cutoff = cutoff = now - grace
    report = progress or (lambda *_: None)

    # -- roots and the live set -------------------------------------------------------------------------------
    live_roots: list[Root] = []
    dead: list[tuple[str, float, bytes | None]] = []  # (path, mtime seen, content seen)
    for item in iter_roots(store):
        if isinstance(item, tuple):
            path, reason = item
            mtime = _mtime(path)
            if mtime is not None and mtime < now - root_ttl:
                dead.append((path, mtime, None))  # a dead root protects nothing, readable or not
            elif mtime is not None:
                res.problems.append(f"unreadable root {path}: {reason} (remove it, or re-save that deployment)")
        elif item.mtime < now - root_ttl:
            dead.append((item.path, item.mtime, _read_small(item.path)))
        else:
            live_roots.append(item)
    res.roots_live, res.roots_dead = len(live_roots), len(dead)

    refs: dict[str, set[str]] = {}
    infos: dict[str, RootInfo] = {}
    for i, root in enumerate(live_roots):
        report("roots", i, len(live_roots))
        ids = _root_blobs(store, root, res.problems)
        if ids is not None:
            refs[root.path], info = ids
            infos[root.path] = info
    report("roots", len(live_roots), len(live_roots))

    report("scan blobs", 0, 0)
    listing = scan_area(store, "blobs")
    blobs: dict[str, BlobInfo] = {b.id: b for b in listing.blobs}
    report("scan blobs", len(blobs), len(blobs))
    refcount: Counter[str] = Counter()
    for ids in refs.values():
        refcount.update(ids)

    # -- --max-size: retire least recently used roots ---------------------------------------------------------
    if max_size is not None and not res.problems:
        projected = sum(b.stored_size for b in blobs.values() if refcount[b.id] or b.mtime >= cutoff)
        eligible = sorted((r for r in live_roots if r.path in refs and r.mtime < cutoff), key=lambda r: r.mtime)
        for root in eligible:
            if projected <= max_size:
                break
            for bid in refs.pop(root.path):
                refcount[bid] -= 1
                if refcount[bid] == 0:
                    del refcount[bid]
                    b = blobs.get(bid)
                    if b is not None and b.mtime < cutoff:
                        projected -= b.stored_size
            res.roots_retired.append(infos[root.path])
            dead.append((root.path, root.mtime, _read_small(root.path)))
            log.info("retiring root %s/%s (last used %.0fs ago) to fit --max-size", root.scope_id, root.env_key,
                     now - root.mtime)
        res.over_max_size = max(0, projected - max_size)
        res.roots_live -= len(res.roots_retired)
    live = set(refcount)
    res.blobs_live = len(live)

    if res.problems:
        for b in blobs.values():
            res.blobs_kept += 1
            res.bytes_kept += b.stored_size
        log.error("gc: %d problem(s); nothing deleted", len(res.problems))
        res.seconds = time.monotonic() - started
        return res

    # -- dead and retired roots -------------------------------------------------------------------------------
    _check_lock(lock)
    for path, mtime, content in dead:
        if not dry_run and not _remove_unchanged(path, mtime, content):
            log.info("root %s was used while being removed; kept", path)

    # -- phase one: unreferenced, old blobs to trash ----------------------------------------------------------
    _check_lock(lock)
    garbage: list[BlobInfo] = []
    for b in blobs.values():
        if b.id in live or b.mtime >= cutoff:
            res.blobs_kept += 1
            res.bytes_kept += b.stored_size
            res.blobs_young += b.id not in live
        else:
            garbage.append(b)
    report("trash", 0, len(garbage))
    trashed = [True] * len(garbage) if dry_run else parallel_map(lambda b: _trash(store, b, cutoff), garbage)
    for b, ok in zip(garbage, trashed):
        if ok:
            res.blobs_trashed += 1
            res.bytes_trashed += b.stored_size
        else:  # freshened or restored since the scan
            res.blobs_kept += 1
            res.bytes_kept += b.stored_size
    report("trash", len(garbage), len(garbage))

    # -- phase two: delete old trash, put back live trash -----------------------------------------------------
    _check_lock(lock)
    trash = scan_area(store, "trash")
    back: list[BlobInfo] = []
    old: list[BlobInfo] = []
    for t in trash.blobs:
        if t.id in live:
            # A save past the grace assumption, or a scan racing a save, left a live blob in trash: put it back now
            # rather than wait for a reader to.
            back.append(t)
        elif t.mtime >= cutoff:
            res.trash_left += 1
            res.bytes_trash_left += t.stored_size
        else:
            old.append(t)
    report("empty trash", 0, len(old))
    res.blobs_restored = len(back) if dry_run else sum(parallel_map(lambda t: _restore(store, t.id), back))
    deleted = [True] * len(old) if dry_run else parallel_map(_delete, old)
    for t, ok in zip(old, deleted):
        if ok:  # else a reader restored it meanwhile
            res.blobs_deleted += 1
            res.bytes_deleted += t.stored_size
    report("empty trash", len(old), len(old))

    # -- leftovers by age -------------------------------------------------------------------------------------
    _check_lock(lock)
    temp_cutoff = now - TEMP_EXPIRY
    old_temp = [p for p, m in listing.temp + trash.temp if m < temp_cutoff]
    res.temp_deleted = _sweep_temp(old_temp + find_old_temp(temp_dirs(store, scope), temp_cutoff), dry_run)
    res.locks_deleted = _sweep_locks(lock_files(store, scope), now - LOCK_EXPIRY, dry_run)
    res.quarantine_deleted = _sweep_quarantine(store, now - QUARANTINE_EXPIRY, dry_run)
    res.collected = True
    res.seconds = time.monotonic() - started
    log.info(
        "gc%s: kept %d blobs (%d bytes), trashed %d (%d bytes), deleted %d (%d bytes), roots live %d dead %d "
        "retired %d, %.1fs", " (dry run)" if dry_run else "", res.blobs_kept, res.bytes_kept, res.blobs_trashed,
        res.bytes_trashed, res.blobs_deleted, res.bytes_deleted, res.roots_live, res.roots_dead,
        len(res.roots_retired), res.seconds,
    )
    return res


# -- helpers ------------------------------------------------------------------------------------------------------
def read_root_manifest(store: BlobStore, root: Root):
    """The manifest a root names. Brings its blob back from trash if needed (it is live). Raises BlobMissing,
    BlobCorrupt or ManifestError."""
    if store.stat(root.manifest) is None:
        raise BlobMissing(f"manifest blob {root.manifest} not in store")
    data = store.read_bytes(root.manifest, limits.MAX_MANIFEST_BYTES)
    manifest = loads(data, f"blob {root.manifest}")
    if manifest.env_key != root.env_key:
        raise ManifestError(f"blob {root.manifest}", f"holds env_key {manifest.env_key!r}, root says {root.env_key!r}")
    return manifest


def _root_blobs(store: BlobStore, root: Root, problems: list[str]) -> tuple[set[str], RootInfo] | None:
    try:
        manifest = read_root_manifest(store, root)
    except (BlobMissing, BlobCorrupt, ManifestError) as exc:
        problems.append(f"root {root.path}: {exc} (re-save that deployment, or remove the root)")
        return None
    except OSError as exc:
        problems.append(f"root {root.path}: cannot read manifest blob {root.manifest}: {exc}")
        return None
    ids = manifest.blob_ids()
    ids.add(root.manifest)
    info = RootInfo(root.scope_id, root.env_key, root.scope_path, root.manifest, root.mtime,
                    len(manifest.entries), manifest.total_size)
    return ids, info


def _server_now(store: BlobStore) -> float:
    """The volume's clock now, read from a file created for the purpose (FORMAT §1). Measured afresh each run, not
    cached as an offset, so a client clock stepped since (NTP) cannot move the cutoff."""
    probe = temp_path_beside(os.path.join(store.root, "locks", "now"))
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except OSError:
        return store.server_now()  # read-only store (a dry run): the best estimate there is
    try:
        return os.fstat(fd).st_mtime
    finally:
        os.close(fd)
        try:
            os.unlink(probe)
        except OSError:
            pass


def _check_lock(lock: LockFile | None) -> None:
    if lock is not None and not lock.still_held():
        raise GcLockLost(f"{lock.path} was taken by another collector ({lock.describe_holder()}); stopping")


def _trash(store: BlobStore, b: BlobInfo, cutoff: float) -> bool:
    """Move one garbage blob to trash, stamped now. Re-checks its age first: a save may have freshened it since
    the scan (the rename can still race a freshen; FORMAT §5 says why that is safe)."""
    try:
        if os.stat(b.path).st_mtime >= cutoff:
            return False
        dest = store.trash_path(b.id)
        # Trash time (server clock) first, then the rename, which keeps it: a gc killed in between leaves a blob
        # that is merely younger, never one in trash with its old mtime that the next run would delete at once,
        # skipping the second grace period (FORMAT §5).
        os.utime(b.path, None)
        try:
            os.rename(b.path, dest)
        except FileNotFoundError:
            if os.path.exists(b.path):  # trash fan-out directory removed by hand
                os.makedirs(os.path.dirname(dest), exist_ok=True)
                os.rename(b.path, dest)
            else:
                return False
        _faults.checkpoint("gc-trashed")
        return True
    except FileNotFoundError:
        return False


def _delete(t: BlobInfo) -> bool:
    try:
        os.unlink(t.path)
    except FileNotFoundError:
        return False
    _faults.checkpoint("gc-deleted")
    return True


def _restore(store: BlobStore, blob_id: str) -> bool:
    path = store.blob_path(blob_id)
    try:
        if os.path.exists(path):
            os.unlink(store.trash_path(blob_id))  # a writer stored it again: the trash copy is redundant
        else:
            if not store.untrash(blob_id):
                return False
            os.utime(path, None)
        log.info("gc: live blob %s was in trash; restored", blob_id)
        return True
    except FileNotFoundError:
        return False


def _mtime(path: str) -> float | None:
    try:
        return os.stat(path).st_mtime
    except OSError:
        return None


def _read_small(path: str) -> bytes | None:
    try:
        with open(path, "rb") as fh:
            return fh.read(limits.MAX_SMALL_FILE_BYTES + 1)
    except OSError:
        return None


def _remove_unchanged(path: str, mtime: float, content: bytes | None) -> bool:
    """Delete `path` only if it still has the mtime (and content, if given) we judged it by. Renames it aside first
    and puts it back if it changed in between, so a root replaced or refreshed meanwhile survives."""
    aside = temp_path_beside(path)
    try:
        os.rename(path, aside)
    except FileNotFoundError:
        return False
    try:
        st = os.stat(aside)
        if st.st_mtime != mtime or (content is not None and _read_small(aside) != content):
            try:
                os.link(aside, path)
            except FileExistsError:
                pass  # a newer one took the name: ours is obsolete anyway
            except OSError as exc:
                if not os.path.exists(path):
                    os.rename(aside, path)  # no hard links on this mount
                else:
                    log.debug("put back %s: %s", path, exc)
            return False
        return True
    finally:
        try:
            os.unlink(aside)
        except OSError:
            pass


def temp_dirs(store: BlobStore, scope: Scope | None) -> list[str]:
    """Directories that may hold temp files, other than the fan-out directories (scan_area lists those)."""
    dirs = [store.root, os.path.join(store.root, "locks"), os.path.join(store.root, "quarantine"),
            os.path.join(store.root, "roots")]
    try:
        dirs += [e.path for e in os.scandir(os.path.join(store.root, "roots")) if e.is_dir(follow_symlinks=False)]
    except OSError:
        pass
    if scope is not None:
        dirs += [scope.root, scope.manifests, scope.slots]
    return dirs


def find_old_temp(dirs: Iterable[str], cutoff: float) -> list[str]:
    found = []
    for d in dirs:
        try:
            entries = list(os.scandir(d))
        except OSError:
            continue
        for e in entries:
            if not e.name.startswith(TEMP_PREFIX):
                continue
            try:
                if e.stat(follow_symlinks=False).st_mtime < cutoff:
                    found.append(e.path)
            except FileNotFoundError:
                pass
    return found


def _sweep_temp(paths: list[str], dry_run: bool) -> int:
    n = 0
    for path in paths:
        if dry_run:
            n += 1
            continue
        try:
            os.unlink(path)
            n += 1
        except FileNotFoundError:
            pass
    return n


def lock_files(store: BlobStore, scope: Scope | None) -> list[str]:
    paths = []
    dirs = [os.path.join(store.root, "locks")]
    if scope is not None:
        dirs += [scope.manifests, scope.slots]
    for d in dirs:
        try:
            names = os.listdir(d)
        except OSError:
            continue
        paths += [os.path.join(d, n) for n in names if n.endswith(".lock") and n != GC_LOCK]
    return paths


def find_stale_locks(paths: Iterable[str], cutoff: float) -> list[tuple[str, float]]:
    stale = []
    for path in paths:
        mtime = _mtime(path)
        if mtime is not None and mtime < cutoff:
            stale.append((path, mtime))
    return stale


def _sweep_locks(paths: list[str], cutoff: float, dry_run: bool) -> int:
    n = 0
    for path, mtime in find_stale_locks(paths, cutoff):
        # Same content and mtime as judged, or a new holder took it meanwhile and it stays.
        if dry_run or _remove_unchanged(path, mtime, _read_small(path)):
            n += 1
            log.info("removed stale lock %s", path)
    return n


def _sweep_quarantine(store: BlobStore, cutoff: float, dry_run: bool) -> int:
    base = os.path.join(store.root, "quarantine")
    try:
        names = os.listdir(base)
    except OSError:
        return 0
    n = 0
    for name in names:
        blob_id, _, stamp = name.partition(".")
        if not is_blob_id(blob_id) or not stamp.isdigit():
            continue
        # Aged by the quarantine time in the name: rename kept the blob's old mtime. That time is a client's
        # clock, off by seconds or minutes at worst, which does not matter against a week.
        if int(stamp) / 1e9 >= cutoff:
            continue
        if dry_run:
            n += 1
            continue
        try:
            os.unlink(os.path.join(base, name))
            n += 1
        except FileNotFoundError:
            pass
    return n

