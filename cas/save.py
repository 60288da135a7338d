"""save_tree: publish a local cache directory into the store and merge it into the deployment's manifest.

Order matters for crash safety (FORMAT §3, §7): blobs are made durable first, the manifest is renamed into place
second, the GC root is replaced last, all manifest work under the manifest lock (on an object store, a compare-and-
swap instead). On an object store each step is one concurrent wave of requests (FORMAT §3a): a small cache's save is
a handful of round trips, not one per request.
"""
from __future__ import annotations

import errno
import itertools
import logging
import os
import random
import time
from collections.abc import Collection
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import blake3

from . import _faults, layout, limits, localfs, pack, recent, timing
from .blobstore import BlobStore, SourceChanged
from .errors import (
    BlobCorrupt,
    BlobMissing,
    CasError,
    LockTimeout,
    ManifestError,
    NoSpace,
    StoreReadOnly,
    StoreUnavailable,
    TooLarge,
)
from .index import Index
from .manifest import Entry, FrameTable, Manifest, loads
from .roots import encode_root, parse_root, read_root, write_root
from .scope import Scope, check_env_key
from .space import require_free_bytes
from .storage import AlreadyExists, BadObject, NotFound, ObjectInfo, ObjectTooLarge, PreconditionFailed
from .tree import LocalFile, scan

log = logging.getLogger("cas.save")

# The volume is high-latency: per-file round trips, not bandwidth, dominate. 32 requests in flight hide a 2 ms
# round trip for a few thousand files while staying far below NFS client slot limits.
DEFAULT_THREADS = 32
# Hashing is local CPU and page-cache work: more threads than cores only adds contention.
HASH_THREADS = max(1, min(8, os.cpu_count() or 1))
# Packs built at once: each holds up to 8 MiB of content plus its frame in memory, and compression is CPU work.
PACK_WRITERS = 4
# Other deployments' manifests read to find small files the store already holds (dedup across deployments of
# one model). The most recently used ones with the same environment are the likely twins; each costs a root and a
# manifest read, so a large organisation does not turn every first save into hundreds of reads.
PEER_MANIFESTS = 8
# A peer's manifest is read only up to this size (a real one is ~300 KB for thousands of files): eight hostile
# manifests at the 64 MiB format limit would otherwise cost a saver gigabytes of memory.
PEER_MANIFEST_BYTES = 4 << 20


@dataclass
class SaveResult:
    files: int = 0  # files in the local tree
    bytes: int = 0  # their raw size
    new_entries: int = 0  # entries added or changed in the manifest
    blobs_uploaded: int = 0  # files whose content was written: as loose blobs or inside new packs
    packs_written: int = 0
    bytes_uploaded: int = 0  # compressed bytes written to the store
    raw_bytes_uploaded: int = 0  # the same blobs' uncompressed size
    blobs_present: int = 0  # file contents the store already had (dedup hits)
    skipped_changed: int = 0  # files that changed while being saved (left for the next save)
    manifest_written: bool = False
    seconds: float = 0.0


def save_tree(
    src_dir: str | os.PathLike,
    store: BlobStore,
    scope: Scope,
    env_key: str,
    *,
    env: dict[str, str] | None = None,
    threads: int = DEFAULT_THREADS,
    max_stored_bytes: int | None = None,
    lock_timeout: float = timing.MANIFEST_LOCK_TIMEOUT,
    stale_after: float = timing.DEFAULT_STALE_AFTER,
    use_index: bool = True,
    family: str | None = None,
) -> SaveResult:
    """Save the files of `src_dir` (FORMAT §3). `use_index` keeps a local stat cache in `src_dir/.cas-index` so
    unchanged files are not re-hashed. `family` also lists this deployment in that family's recent-savers record
    (FORMAT §4a), so new deployments of the same model can start from its files."""
    check_env_key(env_key)
    localfs.refuse_overlap(src_dir, scope=scope.root, store=store.root)  # before anything is read or written
    started = time.monotonic()
    result = SaveResult()
    files = scan(src_dir)
    result.files, result.bytes = len(files), sum(f.size for f in files)

    index = Index(src_dir) if use_index else None
    with ThreadPoolExecutor(max_workers=max(1, threads), thread_name_prefix="cas-save") as pool:
        # Everything that depends on nothing is read at once, while the files are hashed (FORMAT §3a).
        wave = _FirstWave(pool, store, scope, env_key)
        with ThreadPoolExecutor(max_workers=min(max(1, threads), HASH_THREADS),
                                thread_name_prefix="cas-hash") as hashers:
            entries, by_id, result.skipped_changed = _hash_all(files, hashers, index)
        if index is not None:
            index.retain(set(entries))
            index.write()
        data, current = wave.manifest()
        # A manifest whose gc root is missing or names another manifest may reference blobs gc has collected
        # (its root died, or a save died between manifest and root), and a loader that missed a blob asks for
        # an audit: re-check every entry instead of trusting the manifest.
        audit = current is not None and data is not None and (  # a parsed manifest always has its bytes
            wave.marker.result() or wave.root().named != blake3.blake3(data).hexdigest())
        delta = dict(entries) if audit or current is None else current.changes_from(entries)
        if not delta and not audit:
            store.ready()  # an unusable store (another format version, a missing bucket) still fails the save
            result.seconds = time.monotonic() - started
            return result  # nothing new: the volume saw reads only
        _faults.checkpoint("hashed")

        if max_stored_bytes is not None:
            _check_cap(files, entries, store, max_stored_bytes, pool)

        claim = wave.claim_scope_id(pool)  # a new deployment's scope.id, created alongside the uploads
        missing, to_pack, located = _plan_uploads(store, scope, env_key, current, delta, by_id, audit, pool, wave,
                                                  result)
        changed = _write_blobs(store, pool, missing, to_pack, by_id, located, result)
        wave.claimed(claim)
        # A file that changed under us is left for the next save: drop every entry that expected that content.
        result.skipped_changed += len(changed)
        delta = {
            p: e.located(*located[e.blob_id]) if e.blob_id in located else e
            for p, e in delta.items()
            if e.blob_id not in changed
        }
    _faults.checkpoint("uploaded")

    if delta or audit:
        result.new_entries, result.manifest_written = _commit(
            store, scope, env_key, env or {}, delta, lock_timeout, stale_after, audit=audit, threads=threads,
            family=family, wave=wave,
        )
    result.seconds = time.monotonic() - started
    log.debug("save %s: %s", env_key, result)
    return result


def _plan_uploads(store: BlobStore, scope: Scope, env_key: str, current: Manifest | None, delta: dict[str, Entry],
                  by_id: dict[str, LocalFile], audit: bool, pool: ThreadPoolExecutor, wave: _FirstWave,
                  result: SaveResult) -> tuple[list[str], list[str], dict[str, Location]]:
    """Which large files the store lacks, which small files go into new packs, and where the store already holds the
    others (pack, offset, frame table); counts the contents already stored in `result`."""
    needed = sorted({e.blob_id for e in delta.values()})
    small = [b for b in needed if by_id[b].size <= pack.PACK_FILE_MAX]
    large = [b for b in needed if by_id[b].size > pack.PACK_FILE_MAX]
    # An audit distrusts recorded locations (that is what it checks): its small files go into new packs.
    located = {} if audit else _located(store, scope, env_key, current, small, pool, wave)
    # A large file is the blob other deployments of one model share: one stat (no look into trash: a trashed copy is
    # simply stored again, FORMAT §2) saves re-sending it when it is there.
    present = list(pool.map(lambda b: store.ensure_fresh(b, from_trash=False), large))
    missing = [bid for bid, ok in zip(large, present, strict=True) if not ok]
    to_pack = [b for b in small if b not in located]
    result.blobs_present = len(needed) - len(missing) - len(to_pack)
    require_free_bytes(store.backend, sum(by_id[b].size for b in missing + to_pack), "saving to the store")
    return missing, to_pack, located


def _write_blobs(store: BlobStore, pool: ThreadPoolExecutor, missing: list[str], to_pack: list[str],
                 by_id: dict[str, LocalFile], located: dict[str, Location], result: SaveResult) -> set[str]:
    """Upload the large files the store lacks and the packs of the small ones, all at once. Records each packed
    file's location in `located`; returns the blob ids whose file changed under us (not stored)."""
    changed: set[str] = set()
    uploads = [pool.submit(_upload, store, bid, by_id[bid]) for bid in missing]
    groups = pack.plan([(bid, by_id[bid]) for bid in to_pack])
    # A pack is built in memory (at most PACK_TARGET bytes plus its frame): a few at a time bound the memory.
    with ThreadPoolExecutor(max_workers=min(len(groups), PACK_WRITERS) or 1,
                            thread_name_prefix="cas-pack") as packers:
        packs = [packers.submit(_write_pack, store, group) for group in groups]
        for bid, fut in zip(missing, uploads, strict=True):
            written = fut.result()
            if written is None:
                changed.add(bid)
            elif written == 0:  # stored meanwhile by another saver: freshened, nothing sent
                result.blobs_present += 1
            else:
                result.blobs_uploaded += 1
                result.bytes_uploaded += written
                result.raw_bytes_uploaded += by_id[bid].size
        for pack_fut in packs:
            written_pack = pack_fut.result()
            changed.update(written_pack.changed)
            if written_pack.pack_id is not None:  # else every file changed: no offsets
                for bid, offset in written_pack.offsets.items():
                    located[bid] = (written_pack.pack_id, offset, written_pack.frames)
                    result.blobs_uploaded += 1
                    result.raw_bytes_uploaded += by_id[bid].size
            result.bytes_uploaded += written_pack.stored_bytes
            result.packs_written += written_pack.pack_id is not None
    return changed


@dataclass
class _RootSeen:
    """This deployment's gc root as the first wave read it: the manifest it names (None: absent or unreadable) and
    its version (None: absent), under `scope_id` (None: no scope.id, so no root)."""

    scope_id: str | None
    named: str | None = None
    version: str | None = None
    known: bool = True  # False: it could not be read, so its version is unknown


class _FirstWave:
    """The reads a save makes before it knows anything, started together before hashing (FORMAT §3a): the manifest
    (with its version on an object store, for the commit's first compare-and-swap), the audit marker, `scope.id`
    then the gc root, and the recent-savers record (the peers a first save dedups against). On a volume the
    commit reads the manifest again under its lock; the rest is used as read."""

    def __init__(self, pool: ThreadPoolExecutor, store: BlobStore, scope: Scope, env_key: str):
        self.store, self.scope, self.env_key = store, scope, env_key
        self.swap = scope.backend.atomic_replace
        self._manifest = pool.submit(self._read_manifest)
        self.marker = pool.submit(scope.audit_requested, env_key)
        self._root = pool.submit(self._read_root)
        # A process that has this manifest in memory saved or loaded it before: its files are mostly recorded
        # there, so peers are read only if needed. Otherwise (a first save) the record is read now, in parallel.
        self._recent = None if scope.remembers_manifest(env_key) else pool.submit(recent.read_seen, store, env_key)
        self.created_scope_id: str | None = None  # set when this save created scope.id: no root exists under it
        self.manifest_for_commit: tuple[bytes | None, Manifest | None, str | None] | None = None

    def _read_manifest(self) -> tuple[bytes | None, Manifest | None]:
        if not self.swap:
            return _read_current(self.scope, self.env_key)
        data, version = self.scope.read_manifest_versioned(self.env_key)
        current = _parsed(self.scope, self.env_key, data)
        self.manifest_for_commit = (data, current, version)
        return data, current

    def manifest(self) -> tuple[bytes | None, Manifest | None]:
        return self._manifest.result()

    def _read_root(self) -> _RootSeen:
        scope_id = self.scope.existing_scope_id()  # a reader: no scope.id means no root, and it is not made here
        if scope_id is None:
            return _RootSeen(None)
        try:
            named, version = _root_as_is(self.store, layout.root(scope_id, self.env_key))
        except CasError:  # unreadable now: the audit decision sees no root; the commit settles it the long way
            return _RootSeen(scope_id, known=False)
        return _RootSeen(scope_id, named, version)

    def root(self) -> _RootSeen:
        return self._root.result()

    def claim_scope_id(self, pool: ThreadPoolExecutor) -> Future[None] | None:
        """On an object store, create scope.id when the first wave found none, alongside the uploads, without
        reading it first (FORMAT §3a). Every replica of a new deployment races here, and a server whose conditional
        writes are check-then-act can let two creates succeed: the commit confirms the id after its root write."""
        if not self.swap or self.root().scope_id is not None:
            return None
        return pool.submit(self._claim)

    def _claim(self) -> None:
        if self.scope.create_scope_id():
            self.created_scope_id = self.scope.scope_id

    def claimed(self, claim: Future[None] | None) -> None:
        """Wait for claim_scope_id's create: the commit uses the id in force (its error, a bad scope.id, fails the
        save before the manifest is touched)."""
        if claim is not None:
            try:
                claim.result()
            except OSError as exc:
                raise _store_error(exc, self.store) from exc

    def peers_record(self) -> recent.Seen | None:
        return self._recent.result() if self._recent is not None else None


def _hash_all(
    files: list[LocalFile], pool: ThreadPoolExecutor, index: Index | None
) -> tuple[dict[str, Entry], dict[str, LocalFile], int]:
    """path -> Entry and blob id -> file for every file that is still the one the scan saw, and how many were not
    (replaced, swapped for a symlink, modified: left for the next save)."""
    def one(f: LocalFile):
        cached = index.lookup(f.rel, f.stat) if index is not None else None
        if cached is not None:
            return f, cached, f.size
        try:
            blob_id, size = localfs.hash_verified(f.path, f.stat)
        except localfs.FileChanged as exc:
            log.info("%s; it will be saved next time", exc)
            return f
        except OSError as exc:  # gone, unreadable, a path too long to open: not saved, and said so
            log.warning("not saving %s: %s", f.path, exc.strerror or exc)
            return None
        if index is not None and size == f.size:
            index.record(f.rel, f.stat, blob_id)
        return f, blob_id, size

    entries: dict[str, Entry] = {}
    by_id: dict[str, LocalFile] = {}
    changed = 0
    for item in pool.map(one, files):
        if item is None:
            continue
        if isinstance(item, LocalFile):
            changed += 1
            continue
        f, blob_id, size = item
        entries[f.rel] = Entry(blob_id, size, f.mode)
        by_id[blob_id] = LocalFile(f.rel, f.path, size, f.mode, f.stat)
    return entries, by_id, changed


# Where a small file is stored: pack id, offset in its content, the pack's frame table (if recorded).
Location = tuple[str, int, FrameTable | None]


def _located(
    store: BlobStore, scope: Scope, env_key: str, current: Manifest | None, wanted: list[str], pool: ThreadPoolExecutor,
    wave: _FirstWave | None = None,
) -> dict[str, Location]:
    """Where the store already holds these small files: pack locations recorded by this deployment's manifest or,
    for the rest, by the manifests of the deployments that saved the same environment most recently, with the
    pack's frame table where the manifest records one. Only packs that are still there (and freshened, FORMAT §2)
    count. A location is a claim checked on every read (the file's own hash), so a wrong one costs a miss and an
    audit, never wrong content (a wrong frame table: a read of the whole pack)."""
    if not wanted:
        return {}
    todo = set(wanted)
    candidates: dict[str, list[Location]] = {}

    def collect(manifest: Manifest) -> None:
        for e in manifest.entries.values():
            if e.pack is not None and e.blob_id in todo:
                spots = candidates.setdefault(e.blob_id, [])
                if all((e.pack, e.offset) != spot[:2] for spot in spots):
                    spots.append((e.pack, e.offset, e.frames))

    if current is not None:
        collect(current)
    if todo - candidates.keys():
        for manifest in _peer_manifests(store, scope, env_key, pool, wave):
            collect(manifest)
    packs = sorted({spot[0] for spots in candidates.values() for spot in spots})
    alive = {p for p, ok in zip(packs, pool.map(store.ensure_fresh, packs), strict=True) if ok}
    found: dict[str, Location] = {}
    for bid, spots in candidates.items():
        spot = next((s for s in spots if s[0] in alive), None)
        if spot is not None:
            found[bid] = spot
    return found


def _peer_manifests(store: BlobStore, scope: Scope, env_key: str, pool: ThreadPoolExecutor,
                    wave: _FirstWave | None = None) -> list[Manifest]:
    """The manifests of up to PEER_MANIFESTS other deployments that saved this environment most recently, found
    through the recent-savers record (FORMAT §4a: one read, whatever the organisation's size; the first wave's if
    it read it) and their roots. Anything unreadable is skipped: dedup is an optimisation."""
    own = wave.root().scope_id if wave is not None else scope.existing_scope_id()
    seen = wave.peers_record() if wave is not None else None
    listed = [s for s, _ in seen.entries] if seen is not None else recent.read_recent(store, env_key)
    names = [n for n in listed if n != own][:PEER_MANIFESTS]

    def root(name: str):
        try:
            return read_root(store, layout.root(name, env_key))
        except Exception:  # noqa: BLE001 - absent (another environment), unreadable or garbage: no dedup from it
            return None

    roots = [r for r in pool.map(root, names)
             if r is not None and r.env_key == env_key and r.scope_id == r.key.split("/")[1]]

    def manifest(r) -> Manifest | None:
        try:
            found = loads(store.read_bytes(r.manifest, PEER_MANIFEST_BYTES), f"blob {r.manifest}",
                          PEER_MANIFEST_BYTES)
        except Exception:  # noqa: BLE001 - missing, corrupt or hostile: no dedup from it
            return None
        return found if found.env_key == env_key else None

    return [m for m in pool.map(manifest, roots) if m is not None]


def _write_pack(store: BlobStore, group) -> pack.WrittenPack:
    try:
        return pack.write(store, group)
    except OSError as exc:
        raise _store_error(exc, store) from exc


def _check_cap(files, entries, store: BlobStore, cap: int, pool: ThreadPoolExecutor) -> None:
    unique = {e.blob_id: f for f in files if (e := entries.get(f.rel))}
    raw = sum(f.size for f in unique.values())
    # zstd never expands by more than a few bytes per block, so a raw total well under the cap needs no counting.
    if raw + (raw >> 7) + 1024 * len(unique) <= cap:
        return
    stored = sum(pool.map(lambda f: _compressed_size(store, f), unique.values()))
    if stored > cap:
        raise TooLarge(f"cache is {stored / 1e6:.1f} MB compressed, over the {cap / 1e6:.1f} MB cap")


def _compressed_size(store: BlobStore, f: LocalFile) -> int:
    """What `f` would take in the store; a file no longer the scan's counts its scanned size (it is not saved)."""
    try:
        fd = localfs.verified_fd(f.path, f.stat)
    except (OSError, localfs.FileChanged):
        return f.size
    try:
        return store.compressed_size(fd)
    finally:
        os.close(fd)


def _upload(store: BlobStore, blob_id: str, f: LocalFile) -> int | None:
    """Store `f` as a loose blob from an fd checked against the scan (localfs.verified_fd); None if it changed."""
    try:
        fd = localfs.verified_fd(f.path, f.stat)
    except localfs.FileChanged as exc:
        log.info("%s; it will be saved next time", exc)
        return None
    except FileNotFoundError:
        return None  # deleted locally since hashing
    except OSError as exc:
        log.warning("not saving %s: %s", f.path, exc.strerror or exc)
        return None
    try:
        return store.put_file(fd, blob_id, f.size)
    except SourceChanged:
        log.info("%s changed while being saved; it will be saved next time", f.path)
        return None
    except OSError as exc:
        raise _store_error(exc, store) from exc
    finally:
        os.close(fd)


def _store_error(exc: OSError, store: BlobStore) -> Exception:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return NoSpace(f"store {store.root} is full: {exc.strerror}")
    if exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return StoreReadOnly(f"store {store.root} is not writable: {exc.strerror}")
    return StoreUnavailable(f"store {store.root}: {exc.strerror or exc}")


def _read_current(scope: Scope, env_key: str) -> tuple[bytes | None, Manifest | None]:
    """The manifest's bytes and parsed form; (bytes, None) if it is corrupt (this save replaces it)."""
    data = scope.read_manifest_bytes(env_key)
    return data, _parsed(scope, env_key, data)


def _parsed(scope: Scope, env_key: str, data: bytes | None) -> Manifest | None:
    if data is None:
        return None
    try:
        manifest = loads(data, scope.manifest_path(env_key))
    except ManifestError as exc:
        log.warning("replacing unreadable manifest: %s", exc)
        return None
    return manifest if manifest.env_key == env_key else None


def _needs_audit(store: BlobStore, scope: Scope, env_key: str, data: bytes | None) -> bool:
    return scope.audit_requested(env_key) or not _root_names(store, scope, env_key, data)


def _root_names(store: BlobStore, scope: Scope, env_key: str, data: bytes | None) -> bool:
    """True if the gc root of this manifest exists and names exactly these manifest bytes (FORMAT §4)."""
    return data is None or _root_manifest_id(store, scope, env_key) == blake3.blake3(data).hexdigest()


def _root_manifest_id(store: BlobStore, scope: Scope, env_key: str) -> str | None:
    """The manifest blob this deployment's gc root names; None if it is absent or unreadable."""
    try:
        scope_id = scope.existing_scope_id()  # a reader: no scope.id means no root, and it is not made here
        if scope_id is None:
            return None
        key = layout.root(scope_id, env_key)  # one GET: the name it holds is all that is needed here
        return parse_root(key, store.backend.get(key, limit=limits.MAX_SMALL_FILE_BYTES), 0.0).manifest
    except (CasError, ValueError):
        return None
    except Exception:  # noqa: BLE001 - msgpack's assorted errors on a garbage root: replace it
        return None


def _root_is_foreign(store: BlobStore, scope: Scope, env_key: str, data: bytes, current: Manifest, *,
                     lagging_ok: bool = False) -> bool:
    """True when this scope's gc root names a manifest that is neither the scope's current one nor the one it
    replaced (a save killed between manifest and root leaves the latter): another scope with the same scope.id
    wrote it (FORMAT §4, copied scopes). An absent or unreadable root is not foreign (a dead root, or gc).

    `lagging_ok` (lock-free commits, FORMAT §3a): concurrent savers may leave the root several manifests behind for a
    moment, so a root naming an older manifest of this scope (every path of it still in the current manifest: merges
    never remove a path) is not foreign either, nor one merged into the same manifest as the current one or into it
    (a saver killed after a compare-and-swap that lost, whose root went in alongside); a clone's manifest holds
    paths this one lacks."""
    named = _root_manifest_id(store, scope, env_key)
    if named is None or named in (blake3.blake3(data).hexdigest(), current.parent):
        return False
    if not lagging_ok:
        return True
    try:
        older = loads(store.read_bytes(named, limits.MAX_MANIFEST_BYTES), f"blob {named}")
    except Exception:  # noqa: BLE001 - unreadable: it protects nothing of ours either way; not proof of a clone
        return False
    if older.parent and older.parent in (current.parent, blake3.blake3(data).hexdigest()):
        return False  # a sibling: a commit that lost its compare-and-swap to ours, its root written alongside
    return any(p not in current.entries for p in older.entries)


def _commit(store, scope, env_key, env, delta, lock_timeout, stale_after, *, audit=False, threads=DEFAULT_THREADS,
            family=None, wave=None):
    """Merge `delta` into the manifest. Returns (entries changed, manifest written).

    On a volume (`atomic_replace` False) under the manifest's lock (FORMAT §3). On an object store (S3: `put` with
    If-Match / If-None-Match is a true compare-and-swap) without any lock: merge into the manifest as the first wave
    read it (bytes and their version), put it only if it is still that version, and on a conflict read, merge and try
    again (FORMAT §3a), for at most `lock_timeout` seconds.

    An audit (the manifest's root was missing or stale, or a loader asked for one) also drops entries whose blob is gone
    from the store, so replicas stop asking for them and the files this or a later replica compiles are uploaded
    again."""
    if not scope.backend.atomic_replace:
        with scope.lock(env_key, timeout=lock_timeout, stale_after=stale_after):
            _faults.checkpoint("locked")
            return _merge_and_write(store, scope, env_key, env, delta, audit, threads, family, {}, swap=False,
                                    wave=wave)
    deadline = time.monotonic() + lock_timeout
    delay = CAS_RETRY_MIN_S
    checked: dict[str, bool] = {}  # stored blob id -> present, kept across attempts (an audit checks each once)
    # The first attempt merges into the manifest the first wave read (a newer one fails its put). Not an audit's:
    # it compares the manifest with the root, which other savers may have moved past that read since, and a root
    # naming a manifest newer than the one compared looks like another scope's (a clone) to the copied-scope check.
    prior = wave.manifest_for_commit if wave is not None and not audit else None
    for attempt in itertools.count(1):
        _faults.checkpoint("locked")  # the point where the volume's commit holds its lock
        try:
            return _merge_and_write(store, scope, env_key, env, delta, audit, threads, family, checked, swap=True,
                                    wave=wave, prior=prior)
        except _Conflict as exc:
            prior = None
            if time.monotonic() >= deadline:
                raise LockTimeout(f"manifest {scope.manifest_path(env_key)} was replaced by other savers "
                                  f"{attempt} times in {lock_timeout:.0f}s; last: {exc}") from None
            log.debug("manifest %s: concurrent commit (%s), attempt %d", env_key, exc, attempt + 1)
            time.sleep(delay * random.uniform(0.5, 1.5))
            delay = min(delay * 2, CAS_RETRY_MAX_S)
    raise AssertionError("unreachable")


class _Conflict(Exception):
    """Another saver replaced the manifest between this commit's read and its conditional put."""


def _read_versioned(scope: Scope, env_key: str) -> tuple[bytes | None, Manifest | None, str | None]:
    """The manifest's bytes, parsed form and the version of exactly those bytes (None: no manifest): a put
    conditioned on it fails if the manifest was replaced since, so a commit never merges into older bytes than the
    version it replaces."""
    data, version = scope.read_manifest_versioned(env_key)
    return data, _parsed(scope, env_key, data), version


def _merge_and_write(store, scope, env_key, env, delta, audit, threads, family, checked, *, swap, wave=None,
                     prior=None):
    """One read-merge-write of the manifest (FORMAT §3): under the lock (`swap` False), or as a compare-and-swap
    that raises _Conflict when another saver won (`swap` True; `prior`: the manifest as already read, for the first
    attempt)."""
    if swap:
        data, current, version = prior if prior is not None else _read_versioned(scope, env_key)
    else:
        (data, current), version = _read_current(scope, env_key), None
    current = current or Manifest(env_key, dict(env), {}, 0.0, 0.0)
    audit = audit and _needs_audit(store, scope, env_key, data)  # a concurrent save may have done it
    if audit and data is not None and _root_is_foreign(store, scope, env_key, data, current, lagging_ok=swap):
        old = scope.scope_id
        log.warning("scope %s: gc root %s names a manifest this scope never wrote (a copied volume shares its "
                    "scope.id): taking a fresh identity", scope.root, old)
        scope.renew_scope_id(old)
    # An audit re-checked (and re-packed) every local file: its entries replace recorded ones even where the
    # content is the same, since the recorded location is what it distrusts.
    changes = dict(delta) if audit else current.changes_from(delta)
    dropped: list[str] = []
    if audit:
        others = {p: e for p, e in current.entries.items() if p not in delta}
        ids = sorted({e.stored_id for e in others.values()} - checked.keys())
        # Blobs this save cannot store again (it lacks their files): one found in trash is brought back (FORMAT §2).
        with ThreadPoolExecutor(max_workers=max(1, threads), thread_name_prefix="cas-audit") as pool:
            checked.update(zip(ids, pool.map(store.ensure_fresh, ids), strict=True))
        gone = {b for b, ok in checked.items() if not ok}
        dropped = [p for p, e in others.items() if e.stored_id in gone]
        dropped += _misplaced(store, {p: e for p, e in others.items() if e.pack and e.pack not in gone})
    if not changes and not dropped:
        if audit:  # every blob is there: the root just has to name this manifest again
            if data is not None:  # (none to name if the manifest vanished since the save began)
                if swap:
                    _settle_root(store, scope, env_key, data, version)
                else:
                    _write_root(store, scope, env_key, data)
            scope.clear_audit(env_key)
        return 0, False  # a concurrent replica already recorded the same content
    merged = current.merged(changes, env)
    merged.parent = blake3.blake3(data).hexdigest() if data is not None else ""
    for path in dropped:
        del merged.entries[path]
    if dropped:
        log.warning("manifest %s: dropped %d entries whose blobs the store no longer has", env_key, len(dropped))
    new = merged.dumps()  # refuses (TooLarge) a manifest any reader would refuse
    try:
        if swap:
            # The first attempt knows the root's state from the first wave: its root goes with the manifest.
            condition = _root_condition(scope, wave) if prior is not None else None
            manifest_id, written, root_written = _publish_swapped(store, scope, env_key, new, version, condition)
        else:
            manifest_id = _publish_locked(store, scope, env_key, new)
        _faults.checkpoint("manifest-renamed")
    except OSError as exc:
        raise _store_error(exc, store) from exc
    # Peers and family loads find this deployment through the recent-savers records (FORMAT §4a). Independent of the
    # root, so written alongside it: on a high-latency store the commit's tail is a chain of round trips.
    scope_id = scope.scope_id
    seen = wave.peers_record() if wave is not None else None
    with ThreadPoolExecutor(max_workers=2, thread_name_prefix="cas-recent") as notes:
        noted = [notes.submit(recent.note_saver, store, env_key, scope_id, None, seen=seen)]
        if family:
            noted.append(notes.submit(recent.note_saver, store, env_key, scope_id, family))
        if swap:
            _settle_root(store, scope, env_key, new, written.version, manifest_id, root_written=root_written,
                         check_root=root_written, mine=changes.keys())
        else:
            _write_root(store, scope, env_key, new, manifest_id)
        for note in noted:
            note.result()
    if audit:
        scope.clear_audit(env_key)
    return len(changes) + len(dropped), True


def _publish_locked(store: BlobStore, scope: Scope, env_key: str, new: bytes) -> str:
    """Volume, under the manifest lock: the manifest's copy in the store first (if the volume is full there, the
    save fails with the old manifest untouched; a copy nobody names is garbage for gc), then the manifest. Returns
    the copy's id."""
    # A store or scope unmounted or renamed mid-save must fail the save, not receive a manifest in its ghost.
    for backend in (store.backend, scope.backend):
        backend.check_alive()
    store.ready()
    manifest_id = store.put_bytes(new)
    scope.write_manifest(new, env_key)
    return manifest_id


def _publish_swapped(store: BlobStore, scope: Scope, env_key: str, new: bytes, version: str | None,
                     root: _RootSeen | None) -> tuple[str, ObjectInfo, bool]:
    """Object store: the manifest's compare-and-swap, its copy in the store, the liveness checks and, when `root`
    gives the root's state as read before (FORMAT §3a), the root's conditional put, at once: one round trip.
    Loaders read only the manifest, whose blobs are all durable already. Returns the copy's id, the manifest's new
    version and whether the root went in (the settle's confirmation then also reads the root back).

    Raises _Conflict when another saver replaced the manifest (the copy is then garbage gc collects; a root written
    alongside names a manifest that never was, which the retry's settle replaces), or the copy's, the root's or a
    check's error after the manifest went in (the root then names another manifest, so the next save audits, as
    after a crash there)."""
    for backend in (store.backend, scope.backend):
        if backend.check_alive_first:
            backend.check_alive()
    store.ready()  # opened in the background (a new store's format file created): done, or its error, before this
    manifest_id = blake3.blake3(new).hexdigest()  # the copy's id: what the root names
    with ThreadPoolExecutor(max_workers=4, thread_name_prefix="cas-commit") as side:
        copy = side.submit(store.put_bytes, new)
        alive = [side.submit(b.check_alive) for b in (store.backend, scope.backend) if not b.check_alive_first]
        root_put = side.submit(_put_root, store, scope, env_key, manifest_id, root) if root is not None else None
        try:
            written = scope.backend.put(layout.manifest(env_key), new, if_absent=version is None,
                                        if_version=version)
        except (PreconditionFailed, AlreadyExists) as exc:
            raise _Conflict(str(exc)) from None
        scope.remember_manifest(env_key, new)
        copy.result()
        for check in alive:
            check.result()
        root_written = root_put.result() if root_put is not None else False
    return manifest_id, written, root_written


def _put_root(store: BlobStore, scope: Scope, env_key: str, manifest_id: str, seen: _RootSeen) -> bool:
    """The root's put conditioned on `seen` (its version, or absent); False when another saver wrote it since."""
    try:
        store.backend.put(layout.root(scope.scope_id, env_key),
                          encode_root(scope.scope_id, env_key, manifest_id, scope.root),
                          if_absent=seen.version is None, if_version=seen.version)
    except (PreconditionFailed, AlreadyExists):
        return False
    return True


def _root_condition(scope: Scope, wave: _FirstWave | None) -> _RootSeen | None:
    """The root's state as read before this commit, under the scope id now in force; None when not known."""
    if wave is None:
        return None
    if wave.created_scope_id is not None:
        return _RootSeen(wave.created_scope_id) if wave.created_scope_id == scope.scope_id else None
    seen = wave.root()
    return seen if seen.known and seen.scope_id == scope.scope_id else None


# Rounds of "make the root name the manifest, check the manifest is still that one" after a lock-free commit
# (FORMAT §3a); each round is a few requests, and a round is only repeated when another saver committed meanwhile.
SETTLE_ROUNDS = 16
CAS_RETRY_MIN_S = 0.05
CAS_RETRY_MAX_S = 1.0


def _settle_root(store: BlobStore, scope: Scope, env_key: str, data: bytes, version: str | None,
                 manifest_id: str | None = None, *, root_written: bool = False, check_root: bool = False,
                 mine: Collection[str] = ()) -> None:
    """Point the gc root at the manifest without a lock (FORMAT §3a).

    Savers that commit one after the other may reach the root in the other order, so each one, after committing:
    (1) makes the root name its manifest: reads it (version, and the manifest it names) and, if it names another,
    replaces it *conditionally* (If-Match on the version read, If-None-Match when absent), so a root write never
    silently overwrites one it saw change (measured on SeaweedFS: of two unconditional PUTs of one key, the one
    acknowledged last did not always win); `root_written`: the caller already did, conditioned on an earlier read;
    (2) confirms, after that write: the manifest is still the version whose bytes the root names, scope.id still
    the id it was written under, and (`check_root`: the root went in alongside the manifest, so a root that landed
    between the two may have replaced it) the root still names it. A newer manifest starts again with it; another id
    (two creates that both succeeded) is adopted and the root pointed under it; a root naming another manifest is
    pointed again. A newer manifest that lacks one of `mine` (the paths this save
    committed) was put by a saver whose compare-and-swap such a server let through on the version this one replaced:
    raises _Conflict, and the commit merges them in again.

    The confirmation is what makes it hold on servers whose conditional writes are check-then-act (moto, and
    SeaweedFS was seen to let two racing creates both succeed), where two conditional puts on one version can both
    go in: every root write is followed by its writer's confirmation, and a commit after that confirmation is
    followed by its own root write, so the root written last is by a saver that then saw the final manifest, which
    it named or names next. The manifest blob of a version found this way was stored by its writer before its root
    was written (FORMAT §3a), so only its id is needed."""
    delay = CAS_RETRY_MIN_S
    for _ in range(SETTLE_ROUNDS):
        want = manifest_id or blake3.blake3(data).hexdigest()
        if not root_written and not _point_root(store, scope, env_key, want):
            time.sleep(delay * random.uniform(0.5, 1.5))  # another saver wrote it since: look again
            delay = min(delay * 2, CAS_RETRY_MAX_S)
            continue
        root_written = False
        now, same_scope_id, root_ok = _confirm(store, scope, env_key, want if check_root else None)
        check_root = False
        manifest_id = want
        if not same_scope_id:
            log.info("scope %s: scope.id was created by two savers at once; %s is the one in force",
                     scope.root, scope.scope_id)
            continue  # the same manifest, its root now under the id in force
        if now is None:
            return  # deleted: nothing to name (the next save writes both)
        if now == version:
            if not root_ok:
                continue  # replaced by a root that landed after ours: point it again
            return
        # The bytes and their own version: if the manifest changes again before the next check, that check fails.
        found, found_version = scope.read_manifest_versioned(env_key)
        if found is None:
            return
        _check_kept(scope, env_key, found, mine)
        mine = ()  # merges never drop a path: a later version keeps them too
        data, version, manifest_id = found, found_version, None
    log.info("manifest %s: still being replaced after %d rounds; the next save corrects its root",
             env_key, SETTLE_ROUNDS)


def _check_kept(scope: Scope, env_key: str, found: bytes, mine: Collection[str]) -> None:
    """Raise _Conflict when the manifest that replaced this save's lacks one of its paths (FORMAT §3a: a lost
    update on a server whose conditional writes are check-then-act). An unparsable one is left to the next save."""
    if not mine:
        return
    try:
        entries = loads(found, scope.manifest_path(env_key)).entries
    except ManifestError:
        return
    lost = sum(1 for path in mine if path not in entries)
    if lost:
        log.warning("manifest %s: a concurrent commit replaced it without %d of this save's entries (the server let "
                    "two compare-and-swaps on one version through): merging them in again", env_key, lost)
        raise _Conflict(f"{lost} entries lost to a concurrent commit")


def _point_root(store: BlobStore, scope: Scope, env_key: str, manifest_id: str) -> bool:
    """Make the root name `manifest_id` unless it already does, conditioned on the state read; False when another
    saver replaced it in between (read it again)."""
    named, rversion = _root_as_is(store, layout.root(scope.scope_id, env_key))
    if named == manifest_id:
        return True
    try:
        return _put_root(store, scope, env_key, manifest_id, _RootSeen(scope.scope_id, named, rversion))
    except OSError as exc:
        raise _store_error(exc, store) from exc


def _confirm(store: BlobStore, scope: Scope, env_key: str, root_names: str | None) -> tuple[str | None, bool, bool]:
    """After a root write, in one round trip: the manifest's version now (None: deleted); whether scope.id still
    holds the id the root was written under (scope.confirm_scope_id: when not, the id found is now in force); and,
    given `root_names`, whether the root still names that manifest (True when not asked)."""
    rkey = layout.root(scope.scope_id, env_key)
    with ThreadPoolExecutor(max_workers=2, thread_name_prefix="cas-confirm") as side:
        same_scope_id = side.submit(scope.confirm_scope_id)
        root = side.submit(_root_as_is, store, rkey) if root_names is not None else None
        try:
            now: str | None = scope.backend.stat(layout.manifest(env_key)).version
        except NotFound:
            now = None
        try:
            root_ok = root is None or root.result()[0] == root_names
        except OSError as exc:
            raise _store_error(exc, store) from exc
        return now, same_scope_id.result(), root_ok


def _root_as_is(store: BlobStore, key: str) -> tuple[str | None, str | None]:
    """(manifest id the root names or None when unreadable, its version or None when absent), in one request: the
    version is that of exactly the bytes read (Backend.get_versioned), so a root replaced since fails the
    conditional put made on it."""
    try:
        data, version = store.backend.get_versioned(key, limit=limits.MAX_SMALL_FILE_BYTES)
    except NotFound:
        return None, None
    except (BadObject, ObjectTooLarge):  # not a root: replaced (conditionally, on its version) like a stale one
        try:
            return None, store.backend.stat(key).version
        except NotFound:
            return None, None
    try:
        return parse_root(key, data, 0.0).manifest, version
    except Exception:  # noqa: BLE001 - garbage or planted: replaced (conditionally) like a stale one
        return None, version


def _misplaced(store: BlobStore, packed: dict[str, Entry]) -> list[str]:
    """Audit of packed entries: the paths whose pack is unreadable or does not hold their content where they say."""
    by_pack: dict[str, list[tuple[str, Entry]]] = {}
    for path, entry in packed.items():
        by_pack.setdefault(entry.stored_id, []).append((path, entry))  # packed: stored_id is the pack

    def bad(items: list[tuple[str, Entry]]) -> list[str]:
        try:
            content = store.get_bytes(items[0][1].stored_id, limits.MAX_PACK_BYTES)
        except (BlobMissing, BlobCorrupt):
            return [path for path, _ in items]
        out = []
        for path, e in items:
            try:
                pack.extract(content, e.blob_id, e.size, e.offset)
            except pack.PackEntryCorrupt:
                out.append(path)
        return out

    # Each worker holds a whole pack in memory: as few at once as the pack writers.
    with ThreadPoolExecutor(max_workers=PACK_WRITERS, thread_name_prefix="cas-audit") as pool:
        return [path for paths in pool.map(bad, by_pack.values()) for path in paths]


def _write_root(store: BlobStore, scope: Scope, env_key: str, data: bytes, manifest_id: str | None = None) -> None:
    """Store the manifest's bytes as a blob (unless the caller did: `manifest_id`) and point this deployment's gc
    root at it (FORMAT §4)."""
    try:
        write_root(store, scope.scope_id, env_key, manifest_id or store.put_bytes(data), scope.root)
    except OSError as exc:
        raise _store_error(exc, store) from exc
