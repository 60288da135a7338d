"""Garbage collection of the org store (docs/FORMAT.md §5), in the storage seam's verbs only.

One run, under `locks/gc.lock`:

1. `now` from the server's clock (`backend.now()`); `cutoff = now - grace`.
2. Roots, read in parallel: dead ones (unused for longer than the root TTL) are removed with
   `delete(if_version=)`; the live set is every blob named by a live root plus every stored blob its manifest
   references, each distinct manifest blob read and parsed once. Anything unreadable on the way stops the run from
   deleting.
3. `--max-size`: least recently used roots (never one used within the grace period) are retired until the blobs
   that stay fit.
4. Phase one: unreferenced blobs older than the cutoff are stat'ed again, touched (the trash time) and moved to
   `trash/`.
5. Phase two: trash older than the cutoff is deleted in the version judged; trash that is live again is put back.
6. Temp files, stale lock files and old quarantine evidence are removed by age, each in the version judged.

Everything compares mtimes with the server's clock, never the client's. Anything planted (a symlink, FIFO or
device where the layout has a directory or an object) is reported and left alone: the backend never lists,
moves or deletes through it.
"""
from __future__ import annotations

import logging
import os
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field

from . import _faults, layout
from .blobstore import BlobInfo, BlobStore, is_blob_id
from .errors import BlobMissing, CasError, ManifestError
from .lock import LockFile
from .refs import ManifestRefs, RootListing, gc_refs, list_roots, read_manifests, reread_young
from .roots import Root
from .scan import Listing, list_prefix, parallel_map, scan_area
from .scope import Scope
from .storage import Backend, BadObject, NotFound, ObjectInfo, PreconditionFailed
from .timing import (  # noqa: F401 - re-exported: tests and tools import these names from cas.gc
    DEFAULT_GRACE,
    DEFAULT_LOCK_WAIT,
    DEFAULT_ROOT_TTL,
    GC_LOCK_STALE,
    LOCK_EXPIRY,
    MIN_GRACE_FACTOR,
    QUARANTINE_EXPIRY,
    TEMP_EXPIRY,
    TimingError,
    check_relations,
)

log = logging.getLogger("cas.gc")

GC_LOCK = layout.name_of(layout.GC_LOCK)

Progress = Callable[[str, int, int], None]  # (phase, done, total); total 0 when unknown


class GcRefused(TimingError):
    """gc will not run with these settings (a grace period too short for the store's freshen_after), or on this
    store as it is (its lock directory is planted)."""


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
    manifests_parsed: int = 0  # distinct manifest blobs read (each once, however many roots name it)
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
    planted: list[str] = field(default_factory=list)  # paths of planted links/FIFOs: reported, never touched
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Leftover:
    """A temp, lock or quarantine object found by age, with the backend it lives in (store or scope)."""

    backend: Backend
    info: ObjectInfo

    @property
    def path(self) -> str:
        return os.path.join(self.backend.location, self.info.key)


def check_grace(store: BlobStore, grace: float, root_ttl: float = DEFAULT_ROOT_TTL) -> None:
    """The timing relations gc's safety needs, with this store's freshen_after and this run's settings."""
    try:
        check_relations(freshen_after=store.freshen_after, grace=grace, root_ttl=root_ttl)
    except TimingError as exc:
        raise GcRefused(f"{exc} (freshen_after from {store.root}/CAS-FORMAT)") from None


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
    check_grace(store, grace, root_ttl)
    started = time.monotonic()
    if dry_run:
        # A dry run changes nothing, so it needs no lock; what it prints may race a real run, which is fine.
        return _Run(store, scope, grace, root_ttl, max_size, True, None, progress, started).run()
    _refuse_planted_lock(store)
    lock = LockFile(store.backend, layout.GC_LOCK, stale_after=GC_LOCK_STALE, timeout=lock_wait, heartbeat=True)
    with lock:
        return _Run(store, scope, grace, root_ttl, max_size, False, lock, progress, started).run()


def _refuse_planted_lock(store: BlobStore) -> None:
    """A link or FIFO at locks/ or locks/gc.lock can never be taken or broken: say so now instead of waiting out
    the lock timeout."""
    where = os.path.join(store.root, layout.GC_LOCK)
    try:
        store.backend.stat(layout.GC_LOCK)
    except NotFound:
        pass
    except BadObject:
        raise GcRefused(f"{where} (or its directory) is not a plain file (a planted link or FIFO?): remove it "
                        f"by hand; gc never follows or deletes it") from None


class _Run:
    """One collection's state: the judged roots and blobs, shared by the phases below."""

    def __init__(self, store: BlobStore, scope: Scope | None, grace: float, root_ttl: float, max_size: int | None,
                 dry_run: bool, lock: LockFile | None, progress: Progress | None, started: float):
        self.store, self.backend, self.scope = store, store.backend, scope
        self.root_ttl, self.dry_run, self.lock = root_ttl, dry_run, lock
        self.report: Progress = progress or (lambda *_: None)
        self.started = started
        self.res = res = GcResult(dry_run=dry_run, grace=grace, max_size=max_size)
        res.now = self.now = store.backend.now()
        res.cutoff = self.cutoff = self.now - grace
        self.dead: list[tuple[str, str]] = []  # (key, version judged) of roots to remove
        self.refs: dict[str, ManifestRefs] = {}  # distinct live manifest blob -> its stored ids
        self.named: Counter[str] = Counter()  # live manifest blob -> live roots naming it
        self.infos: dict[str, RootInfo] = {}  # root key -> its figures (counts, not sets)
        self.live_roots: list[Root] = []
        self.refcount: Counter[str] = Counter()  # blob -> distinct live manifests keeping it

    def run(self) -> GcResult:
        res = self.res
        roots = list_roots(self.store)
        self._plant(self.store.backend, roots.planted)
        self._judge_roots(roots)
        listing = self._scan("blobs")
        blobs = {b.id: b for b in listing.blobs}
        if res.max_size is not None and not res.problems:
            self._retire(blobs)
        res.blobs_live = len(self.refcount)
        if res.problems:
            res.blobs_kept, res.bytes_kept = len(blobs), sum(b.stored_size for b in blobs.values())
            log.error("gc: %d problem(s); nothing deleted", len(res.problems))
            res.seconds = time.monotonic() - self.started
            return res
        self._check_lock()
        self._remove_roots()
        self._check_lock()
        self._phase_one(blobs)
        self._check_lock()
        trash = self._scan("trash")
        self._phase_two(trash)
        self._check_lock()
        self._leftovers(listing.temp + trash.temp + roots.temp)
        res.collected = True
        res.seconds = time.monotonic() - self.started
        self._log_summary()
        return res

    # -- roots and the live set -----------------------------------------------------------------------------------
    def _judge_roots(self, roots: RootListing) -> None:
        res, dead_before = self.res, self.now - self.root_ttl
        res.problems += roots.problems
        for bad in roots.unreadable:
            if bad.info is not None and bad.info.mtime < dead_before:
                self.dead.append((bad.key, bad.info.version))  # a dead root protects nothing, readable or not
            else:
                res.problems.append(f"unreadable root {bad.path}: {bad.reason} (remove it, or re-save that "
                                    f"deployment)")
        for root in roots.roots:
            if root.mtime < dead_before:
                self.dead.append((root.key, root.version))
            else:
                self.live_roots.append(root)
        res.roots_live, res.roots_dead = len(self.live_roots), len(self.dead)
        self.report("roots", 0, len(self.live_roots))
        parsed = read_manifests(self.store, {r.manifest for r in self.live_roots}, gc_refs, restore=True)
        self.live_roots, again = reread_young(self.store, self.live_roots,
                                              lambda r: isinstance(parsed[r.manifest], BlobMissing), self.now)
        if again:  # roots written alongside their manifest's blob (FORMAT §3a): their manifests read once more
            ids = {r.manifest for r in self.live_roots if r.key in again}
            parsed.update(read_manifests(self.store, ids, gc_refs, restore=True))
        res.manifests_parsed = len(parsed)
        for root in self.live_roots:
            self._add_root(root, parsed[root.manifest])
        for manifest_id in self.named:
            self.refcount.update(self.refs[manifest_id].blobs)
        self.report("roots", len(self.live_roots), len(self.live_roots))

    def _add_root(self, root: Root, refs: object) -> None:
        if isinstance(refs, ManifestRefs) and refs.env_key != root.env_key:
            refs = ManifestError(f"blob {root.manifest}", f"holds env_key {refs.env_key!r}, root says "
                                                          f"{root.env_key!r}")
        if not isinstance(refs, ManifestRefs):
            self.res.problems.append(f"root {root.path}: {refs} (re-save that deployment, or remove the root)")
            return
        self.refs[refs.id] = refs
        self.named[refs.id] += 1
        self.infos[root.key] = RootInfo(root.scope_id, root.env_key, root.scope_path, root.manifest, root.mtime,
                                        refs.entries, refs.raw_bytes)

    def _retire(self, blobs: dict[str, BlobInfo]) -> None:
        """Retire least recently used roots (never one used since the cutoff) until the blobs that stay fit."""
        res, cutoff = self.res, self.cutoff
        assert res.max_size is not None
        projected = sum(b.stored_size for b in blobs.values() if self.refcount[b.id] or b.mtime >= cutoff)
        eligible = sorted((r for r in self.live_roots if r.key in self.infos and r.mtime < cutoff),
                          key=lambda r: r.mtime)
        for root in eligible:
            if projected <= res.max_size:
                break
            projected -= self._release(root.manifest, blobs)
            res.roots_retired.append(self.infos[root.key])
            self.dead.append((root.key, root.version))
            log.info("retiring root %s/%s (last used %.0fs ago) to fit --max-size", root.scope_id, root.env_key,
                     self.now - root.mtime)
        res.over_max_size = max(0, projected - res.max_size)
        res.roots_live -= len(res.roots_retired)

    def _release(self, manifest_id: str, blobs: dict[str, BlobInfo]) -> int:
        """One root naming `manifest_id` is gone: the stored bytes that leave the projection."""
        self.named[manifest_id] -= 1
        if self.named[manifest_id]:
            return 0  # another live root names the same manifest: nothing is released
        freed = 0
        for bid in self.refs[manifest_id].blobs:
            self.refcount[bid] -= 1
            if self.refcount[bid] <= 0:
                del self.refcount[bid]
                b = blobs.get(bid)
                if b is not None and b.mtime < self.cutoff:
                    freed += b.stored_size
        return freed

    def _remove_roots(self) -> None:
        """Delete each dead or retired root only in the version judged: PreconditionFailed means a save replaced it
        or a load refreshed it meanwhile, and it stays."""
        if self.dry_run:
            return
        for key, version in self.dead:
            try:
                self.backend.delete(key, if_version=version)
            except PreconditionFailed:
                log.info("root %s was used while being removed; kept", key)
            except NotFound:
                pass
            except BadObject:
                self._plant(self.backend, [key])

    # -- phase one: unreferenced, old blobs to trash ----------------------------------------------------------------
    def _phase_one(self, blobs: dict[str, BlobInfo]) -> None:
        res, live = self.res, self.refcount
        garbage: list[BlobInfo] = []
        for b in blobs.values():
            if b.id in live or b.mtime >= self.cutoff:
                res.blobs_kept += 1
                res.bytes_kept += b.stored_size
                res.blobs_young += b.id not in live
            else:
                garbage.append(b)
        self.report("trash", 0, len(garbage))
        outcomes = ["trashed"] * len(garbage) if self.dry_run else parallel_map(self._trash, garbage)
        for b, outcome in zip(garbage, outcomes, strict=True):
            if outcome == "trashed":
                res.blobs_trashed += 1
                res.bytes_trashed += b.stored_size
            else:  # freshened, restored or removed since the scan, or its trash prefix is planted (the trash
                res.blobs_kept += 1  # scan reports that link)
                res.bytes_kept += b.stored_size
                if outcome == "planted":
                    log.warning("gc: %s not trashed: %s is not a directory", b.id, layout.trash(b.id))
        self.report("trash", len(garbage), len(garbage))

    def _trash(self, b: BlobInfo) -> str:
        """Stamp one garbage blob with the trash time, then move it to trash. Re-checks its age first: a save may
        have freshened it since the scan (a freshen can still land between the stat and the move; FORMAT §5 says why
        that is safe). Returns trashed, kept, gone or planted.

        Touch before move, not after: a volume's move keeps the mtime, so the trash time travels with the blob, and
        a gc killed in between leaves a blob that is merely younger. Stamped after the move, a killed gc left the blob
        in trash with its old mtime, and the next run deleted it at once, skipping the second grace period
        (tests/test_torture.py). On an object store the move's copy is stamped anew anyway."""
        dest = layout.trash(b.id)
        try:
            if self.backend.stat(b.key).mtime >= self.cutoff:
                return "kept"
            self.backend.touch(b.key)
            self.backend.move(b.key, dest)
        except NotFound:
            return "gone"
        except BadObject:
            return "planted"  # trash/<xx> is a link (or the blob became one): nothing moves through it
        _faults.checkpoint("gc-trashed")
        return "trashed"

    # -- phase two: delete old trash, put back live trash ------------------------------------------------------------
    def _phase_two(self, trash: Listing) -> None:
        res = self.res
        back: list[BlobInfo] = []
        old: list[BlobInfo] = []
        for t in trash.blobs:
            if t.id in self.refcount:
                # A save past the grace assumption, or a scan racing a save, left a live blob in trash: put it back
                # now rather than wait for a reader to.
                back.append(t)
            elif t.mtime >= self.cutoff:
                res.trash_left += 1
                res.bytes_trash_left += t.stored_size
            else:
                old.append(t)
        self.report("empty trash", 0, len(old))
        res.blobs_restored = len(back) if self.dry_run else sum(parallel_map(self._restore, back))
        deleted = [True] * len(old) if self.dry_run else parallel_map(self._delete_trash, old)
        for t, ok in zip(old, deleted, strict=True):
            if ok:  # else a reader restored it meanwhile, or it changed since the listing
                res.blobs_deleted += 1
                res.bytes_deleted += t.stored_size
        self.report("empty trash", len(old), len(old))

    def _delete_trash(self, t: BlobInfo) -> bool:
        try:
            self.backend.delete(t.key, if_version=t.version)
        except (NotFound, PreconditionFailed, BadObject):
            return False
        _faults.checkpoint("gc-deleted")
        return True

    def _restore(self, t: BlobInfo) -> bool:
        key = layout.blob(t.id)
        try:
            self.backend.stat(key)
        except NotFound:
            pass
        except BadObject:
            self._plant(self.backend, [key])
            return False
        else:
            # A writer stored it again: the trash copy is redundant.
            try:
                self.backend.delete(t.key, if_version=t.version)
            except (NotFound, PreconditionFailed, BadObject):
                pass
            return True
        try:
            self.backend.move(t.key, key)
            self.backend.touch(key)
        except (NotFound, BadObject):
            return False
        log.info("gc: live blob %s was in trash; restored", t.id)
        return True

    # -- leftovers by age --------------------------------------------------------------------------------------------
    def _leftovers(self, temp: list[ObjectInfo]) -> None:
        res, now = self.res, self.now
        found = find_leftovers(self.store, self.scope, now, temp)
        self._plant(self.store.backend, found.planted)
        if self.scope is not None:
            self._plant(self.scope.backend, found.scope_planted)
        res.temp_deleted = self._sweep(found.temp, "temp file")
        res.locks_deleted = self._sweep(found.locks, "stale lock")
        res.quarantine_deleted = self._sweep(old_quarantine(self.store, now - QUARANTINE_EXPIRY), "quarantined blob")

    def _sweep(self, items: list[Leftover], what: str) -> int:
        """Delete each in the version judged: a lock taken, or a temp file rewritten, meanwhile survives."""
        if self.dry_run:
            return len(items)
        n = 0
        for item in items:
            try:
                item.backend.delete(item.info.key, if_version=item.info.version)
            except (NotFound, PreconditionFailed, BadObject):
                continue
            n += 1
            log.info("removed %s %s", what, item.path)
        return n

    # -- helpers -----------------------------------------------------------------------------------------------------
    def _scan(self, area: str) -> Listing:
        self.report(f"scan {area}", 0, 0)
        listing = scan_area(self.store, area)
        self._plant(self.backend, listing.planted)
        self.report(f"scan {area}", len(listing.blobs), len(listing.blobs))
        return listing

    def _plant(self, backend: Backend, keys: Iterable[str]) -> None:
        for key in keys:
            path = os.path.join(backend.location, key)
            if path not in self.res.planted:
                self.res.planted.append(path)
                log.warning("gc: %s is not a plain object or directory (a planted link or FIFO?): left alone", path)

    def _check_lock(self) -> None:
        lock = self.lock
        if lock is not None and not lock.still_held():
            raise GcLockLost(f"{lock.path} was taken by another collector ({lock.describe_holder()}); stopping")

    def _log_summary(self) -> None:
        res = self.res
        log.info(
            "gc%s: kept %d blobs (%d bytes), trashed %d (%d bytes), deleted %d (%d bytes), roots live %d dead %d "
            "retired %d, %d planted, %.1fs", " (dry run)" if res.dry_run else "", res.blobs_kept, res.bytes_kept,
            res.blobs_trashed, res.bytes_trashed, res.blobs_deleted, res.bytes_deleted, res.roots_live,
            res.roots_dead, len(res.roots_retired), len(res.planted), res.seconds,
        )


# -- leftovers, shared with `cas check` --------------------------------------------------------------------------------
@dataclass
class Leftovers:
    temp: list[Leftover] = field(default_factory=list)
    locks: list[Leftover] = field(default_factory=list)
    planted: list[str] = field(default_factory=list)  # store keys
    scope_planted: list[str] = field(default_factory=list)  # scope keys


def find_leftovers(store: BlobStore, scope: Scope | None, now: float,
                   listed_temp: Iterable[ObjectInfo] = ()) -> Leftovers:
    """Temp files older than TEMP_EXPIRY and lock files untouched for LOCK_EXPIRY, by the server's clock, in the store
    and in `scope` (the only scope a pod sees). `listed_temp`: temp objects the blob, trash and root scans already
    found (those prefixes are not listed again)."""
    out = Leftovers()
    temp_cutoff, lock_cutoff = now - TEMP_EXPIRY, now - LOCK_EXPIRY
    sb = store.backend
    temp = list(listed_temp)
    prefixes = ["", layout.LOCKS, layout.QUARANTINE, *RECORD_PREFIXES]
    while prefixes:
        prefix = prefixes.pop()
        entries, extra = list_prefix(sb, prefix)
        temp += extra.temp
        if prefix:  # the store root's own odd entries are check's business (areas), not leftovers
            out.planted += extra.planted
        if prefix == layout.LOCKS:
            out.locks += _old_locks(sb, entries, lock_cutoff)
        if prefix == FAMILIES:
            prefixes += [i.key for i in entries if i.kind == "prefix"]  # families/<family>/
    seen: set[str] = set()
    for info in temp:
        if info.mtime < temp_cutoff and info.key not in seen:
            seen.add(info.key)
            out.temp.append(Leftover(sb, info))
    if scope is not None:
        _scope_leftovers(scope.backend, temp_cutoff, lock_cutoff, out)
    return out


# The saver records of FORMAT §4a (cas/recent.py): written by put like any object, so a writer killed mid-put leaves a
# temp object there too.
FAMILIES = "families/"
RECORD_PREFIXES = ("recent/", FAMILIES)


def _scope_leftovers(backend: Backend, temp_cutoff: float, lock_cutoff: float, out: Leftovers) -> None:
    for prefix in ("", layout.MANIFESTS, layout.SLOTS):
        entries, extra = list_prefix(backend, prefix)
        out.temp += [Leftover(backend, i) for i in extra.temp if i.mtime < temp_cutoff]
        if prefix:
            out.scope_planted += extra.planted
            out.locks += _old_locks(backend, entries, lock_cutoff)


def _old_locks(backend: Backend, entries: list[ObjectInfo], cutoff: float) -> list[Leftover]:
    return [Leftover(backend, i) for i in entries
            if i.kind == "object" and i.key.endswith(".lock") and i.key != layout.GC_LOCK and i.mtime < cutoff]


def old_quarantine(store: BlobStore, cutoff: float) -> list[Leftover]:
    """Quarantined blobs older than `cutoff` by the time in their name (a move kept the blob's old mtime on a
    volume). That time is a client's clock, off by seconds or minutes at worst, which does not matter against a
    week."""
    entries, _ = list_prefix(store.backend, layout.QUARANTINE)
    old = []
    for info in entries:
        blob_id, _, stamp = layout.name_of(info.key).partition(".")
        if info.kind == "object" and is_blob_id(blob_id) and stamp.isdigit() and int(stamp) / 1e9 < cutoff:
            old.append(Leftover(store.backend, info))
    return old


# -- for tools and tests -----------------------------------------------------------------------------------------------
def read_root_manifest(store: BlobStore, root: Root):
    """The full manifest a root names (validated as a load would). Brings its blob back from trash if needed (it is
    live). Raises BlobMissing, BlobCorrupt or ManifestError."""
    from .errors import BlobMissing
    from .limits import MAX_MANIFEST_BYTES
    from .manifest import loads

    if store.stat(root.manifest) is None:
        raise BlobMissing(f"manifest blob {root.manifest} not in store")
    manifest = loads(store.read_bytes(root.manifest, MAX_MANIFEST_BYTES), f"blob {root.manifest}")
    if manifest.env_key != root.env_key:
        raise ManifestError(f"blob {root.manifest}", f"holds env_key {manifest.env_key!r}, root says {root.env_key!r}")
    return manifest
