"""The no-op save check: "would save_tree record anything?" answered with a handful of concurrent reads.

Most saves (every replica after the first, every periodic save of the companion) have nothing new. `nothing_new`
settles that exactly, without hashing, without a save slot and without writing, so the caller can skip the rest:

- locally: every regular file the save would take (`tree.scan`'s rules) has a `.cas-index` entry matching its
  stat (size, mtime, inode, ctime), which gives its blob id without hashing; where the index's directory record
  allows, without listing the tree (cas/dircache.py);
- on the volume (FORMAT §3, §4): the manifest holds every one of those entries identically (`Manifest.changes_from`),
  no audit marker exists, and the gc root of this scope and environment names exactly the manifest's bytes.

On a network volume each request is a round trip of milliseconds, so the reads run concurrently: the manifest, the
audit marker and `scope.id` -> root, while this thread walks the local tree. On an object store the manifest and the
marker come from one LIST of `manifests/` (the manifest's bytes from this process's memory when the listed ETag is
their MD5), so a no-op check there costs 3 requests: the LIST, `scope.id` and the root (FORMAT §3a). The store's
CAS-FORMAT is not read: nothing is written, and the root found under the store names the manifest, so the store is
there.

Every doubt is a "maybe" (None): a missing or unreadable file, a corrupt manifest or root, anything unexpected. The
caller then runs save_tree, which re-derives everything and reports what is actually wrong.

Every call reads what it decides on again, but for two things kept between calls, neither of which can make a
change be missed: the last parsed manifest of each path with the blake3 of its bytes (reused only for the same
bytes), and the `scope.id` this process last used per scope: the root is read under it without reading `scope.id`
again, and is accepted only if it names exactly the manifest's bytes (see _gc_root).
"""
from __future__ import annotations

import logging
import os
import queue
import stat
import threading
from collections.abc import Callable
from concurrent.futures import Future

import blake3

from . import layout, limits, nogc
from .backends import open_location
from .dircache import Hit, local_hits
from .errors import CasError
from .index import INDEX_NAME, DirKey, Index
from .manifest import Entry, Manifest, loads
from .roots import parse_root
from .scope import Scope, check_env_key, read_scope_id
from .storage import Backend, NotFound

log = logging.getLogger("cas.quick")

# Reads in flight: manifest, scope.id, gc root (the guessed one too), audit marker.
THREADS = 5

# scope root -> the scope.id this process last used there (see _gc_root).
_last_scope_id: dict[str, str] = {}
# manifest path -> (blake3 of its bytes, the parsed manifest), see _parsed.
_manifests: dict[str, tuple[str, Manifest]] = {}
_MANIFESTS_KEPT = 16
_last_lock = threading.Lock()
_POOL: _Readers | None = None
_POOL_PID = 0


def nothing_new(
    src_dir: str | os.PathLike,
    store_root: str | os.PathLike | Backend | Callable[[], str | os.PathLike | Backend],
    scope: Scope,
    env_key: str,
) -> int | None:
    """The number of files of `src_dir` if a save would record nothing (every file indexed and recorded identically,
    no audit pending, the gc root names the manifest), else None ("maybe": run save_tree). Never writes to the
    volume. Locally it may note in `.cas-index` that every indexed file is recorded in the manifest with these bytes
    (FORMAT §7), so that the next check, in any process, skips parsing the manifest and comparing entry by entry.

    `store_root` is a path on a volume, an s3:// URL or a Backend (used as it is, never closed here), or a callable
    returning one: it is then called once, in a worker thread, so that finding which store is in use (a request to
    the volume, in b10_transfer) overlaps the other reads."""
    check_env_key(env_key)
    src = os.fspath(src_dir)
    if not os.path.isfile(os.path.join(src, INDEX_NAME)):  # no index: every file would be hashed anyway
        return None
    if _overlaps_scope(src, scope.root):
        return None  # save_tree refuses it and says why (FORMAT §7)
    manifest_path = scope.manifest_path(env_key)
    try:
        pool = _pool()
        # On an object store one LIST of manifests/ stands for the manifest read and the audit marker's stat
        # (_listed); on a volume, a read and a stat.
        listed_f = pool.submit(_listed, scope, env_key) if scope.backend.atomic_replace else None
        manifest_f = None if listed_f else pool.submit(_read, scope.backend, layout.manifest(env_key),
                                                       limits.MAX_MANIFEST_BYTES)
        root_f = _gc_root(pool, store_root, scope, env_key)
        audit_f = None if listed_f else pool.submit(_exists, scope.backend, layout.audit(env_key))
        with nogc.paused():  # a few objects per file, no cycles (cas/nogc.py)
            index = Index(src)
            local = local_hits(src, index)  # this thread, while the volume answers (cas/dircache.py)
            if local is None:
                return None  # reads still in flight finish on their own
            hits, walked_dirs = local
            if listed_f is not None:
                data, audit = listed_f.result()
            else:
                assert manifest_f is not None and audit_f is not None
                data, audit = manifest_f.result(), audit_f.result()
            if data is None or audit:
                return None
            digest = blake3.blake3(data).hexdigest()
            # Every file is the one the index holds; if the index was compared whole with exactly these manifest
            # bytes since its last change, every file is recorded: no parse, no entry-by-entry comparison.
            known = index.verified == (manifest_path, digest)
            if not known:
                current = _parsed(manifest_path, data, digest)
                if current is None or current.env_key != env_key or current.changes_from(_entries_of(hits)):
                    return None
        root = root_f.result()
        if root is None or root.manifest != digest:
            return None  # no root, or it names other bytes: save_tree audits the manifest (FORMAT §3)
        if not known or walked_dirs is not None:
            _note_verified(index, hits, manifest_path, digest, walked_dirs)
        return len(hits)
    except Exception as exc:  # noqa: BLE001 - any doubt is a "maybe"
        log.debug("no-op check inconclusive: %s: %s", type(exc).__name__, exc)
        return None


def _overlaps_scope(src: str, scope_root: str) -> bool:
    """The cache directory is, contains or lies inside the scope. Real path of the local side only: the scope's
    resolution costs requests on the volume (save_tree checks both sides, and the store, with real paths). A scope
    that is not a local path (an object store) cannot overlap."""
    if not os.path.isabs(scope_root):
        return False
    here, there = os.path.realpath(src), os.path.normpath(scope_root)
    return here == there or here.startswith(there + "/") or there.startswith(here.rstrip("/") + "/")


def _pool() -> _Readers:
    """Reader threads kept for the process: starting threads costs milliseconds on a busy machine, more than the
    reads themselves. A child after fork(2) starts its own (the parent's threads do not exist there)."""
    global _POOL, _POOL_PID
    with _last_lock:
        if _POOL is None or _POOL_PID != os.getpid():
            _POOL = _Readers(THREADS)
            _POOL_PID = os.getpid()
        return _POOL


class _Readers:
    """A minimal executor of daemon threads. Daemon, unlike ThreadPoolExecutor's: a read hanging on a dead volume
    must not keep the process from exiting (the companion gives its last save a deadline, then exits). Its tasks
    never wait for one another (see _gc_root), so concurrent callers cannot deadlock it."""

    def __init__(self, threads: int):
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        for i in range(threads):
            threading.Thread(target=self._work, name=f"cas-quick-{i}", daemon=True).start()

    def submit(self, fn: Callable, *args) -> Future:
        future: Future = Future()
        self._queue.put((future, fn, args))
        return future

    def _work(self) -> None:
        while True:
            future, fn, args = self._queue.get()
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(fn(*args))
            except BaseException as exc:  # noqa: BLE001 - handed to whoever waits on the future
                future.set_exception(exc)
            del future, fn, args


def _gc_root(pool: _Readers, store_root, scope: Scope, env_key: str) -> Future:
    """A future of the parsed gc root of this scope and environment (None: absent or unreadable).

    When this process has used the scope's id before (a load, a save or an earlier check), the root under that id is
    read at once, without reading `scope.id` again: a root under it that names exactly the manifest's bytes proves
    those bytes rooted, which is all the check needs (if the scope has since taken another id, that root still
    protects them, and the first save that finds something new writes the root under the new id). Otherwise
    `scope.id` and the store are found concurrently, then the root is read, and the id is remembered."""
    result: Future = Future()
    scope_root = scope.root  # the callbacks below must not hold the Scope (and its descriptors) in their cycle
    known = remembered_scope_id(scope_root)
    scope_id_f = None if known is not None else pool.submit(read_scope_id, scope.backend)
    store_f = pool.submit(_store_backend, store_root)
    pending = [1 if scope_id_f is None else 2]
    lock = threading.Lock()

    def all_done(_: Future) -> None:
        with lock:
            pending[0] -= 1
            if pending[0]:
                return
        try:
            store, owned = store_f.result()
            if owned:
                # A backend opened here keeps directory descriptors on the volume: close it once the root is read
                # (a reference cycle through these callbacks would otherwise keep them open until the next GC,
                # and an unmount of the volume fails while they are). Descriptors still in use close after use.
                result.add_done_callback(lambda _: store.close())
            scope_id = known if scope_id_f is None else scope_id_f.result()
            if scope_id is None:
                result.set_result(None)
                return
            remember_scope_id(scope_root, scope_id)
            pool.submit(_root, store, scope_id, env_key).add_done_callback(lambda f: _copy(f, result))
        except BaseException as exc:  # noqa: BLE001 - handed to the waiting caller
            if not result.done():
                result.set_exception(exc)

    store_f.add_done_callback(all_done)
    if scope_id_f is not None:
        scope_id_f.add_done_callback(all_done)
    return result


def remember_scope_id(scope_root: str, scope_id: str) -> None:
    """Note the id a load or save of this process just used for the scope at `scope_root` (see _gc_root)."""
    with _last_lock:
        _last_scope_id[scope_root] = scope_id


def remembered_scope_id(scope_root: str) -> str | None:
    with _last_lock:
        return _last_scope_id.get(scope_root)


def _store_backend(store_root) -> tuple[Backend, bool]:
    """The store's backend, and whether this check opened it (and so closes it)."""
    found = store_root() if callable(store_root) else store_root
    owned = not isinstance(found, Backend)
    return (open_location(found) if owned else found), owned  # a path on a volume, or an s3:// URL


def _copy(source: Future, target: Future) -> None:
    exc = source.exception()
    if exc is not None:
        target.set_exception(exc)
    else:
        target.set_result(source.result())


def _local_entries(src: str) -> dict[str, Entry] | None:
    """path -> Entry of every file `tree.scan(src)` would return, from the index alone; None at the first file the
    index does not vouch for (new, changed, or modified too recently to trust its stat)."""
    local = local_hits(src, Index(src))
    return None if local is None else _entries_of(local[0])


def _entries_of(hits: list[Hit]) -> dict[str, Entry]:
    return {rel: Entry(blob_id, st.st_size, stat.S_IMODE(st.st_mode) & 0o777) for rel, blob_id, st in hits}


def _note_verified(index: Index, hits: list[Hit], manifest_path: str, digest: str,
                   dirs: dict[str, DirKey] | None) -> None:
    """Record in the local index that each of its entries (only the files just compared: the others are dropped)
    is in the manifest with `digest`, and the walk's directory record if there is one (after the drop: it vouches
    for exactly these entries). Best effort: a lost write only means the next check compares or walks again."""
    index.retain({rel for rel, _, _ in hits})
    if dirs is not None:
        index.record_dirs(dirs)
    index.mark_verified(manifest_path, digest)
    index.write()


def _read(backend: Backend, key: str, limit: int) -> bytes | None:
    """The object's bytes, or None if absent, unreadable, planted or over `limit` (every doubt is a "maybe")."""
    try:
        return backend.get(key, limit=limit)
    except CasError:
        return None


def _listed(scope: Scope, env_key: str) -> tuple[bytes | None, bool]:
    """Object store (FORMAT §3a): (the manifest's bytes or None, whether the audit marker exists) from one LIST of
    `manifests/`, which gives every object's version (ETag) and so the marker's presence. The bytes are the ones this
    process last read or wrote for that key when their MD5 is the listed ETag (`Scope.remembered_manifest`: a
    load then a save, or periodic saves, read nothing more); otherwise one GET."""
    found = {info.key: info for info in scope.backend.list(layout.MANIFESTS)}
    audit = layout.audit(env_key) in found
    info = found.get(layout.manifest(env_key))
    if info is None:
        return None, audit
    data = scope.remembered_manifest(env_key, info.version)
    if data is None:
        data = _read(scope.backend, layout.manifest(env_key), limits.MAX_MANIFEST_BYTES)
    return data, audit


def _exists(backend: Backend, key: str) -> bool:
    """Anything at `key` (something planted too: when in doubt, the audit runs)."""
    try:
        backend.stat(key)
    except NotFound:
        return False
    except CasError:
        return True  # unknown: treat as present, so the answer is "maybe"
    return True


def _root(store: Backend, scope_id: str, env_key: str):
    key = layout.root(scope_id, env_key)
    data = _read(store, key, limits.MAX_SMALL_FILE_BYTES)
    if data is None:
        return None
    try:
        return parse_root(key, data, 0.0)
    except Exception:  # noqa: BLE001 - msgpack's assorted errors on a garbage root: "maybe"
        return None


def _parsed(path: str, data: bytes, digest: str) -> Manifest | None:
    """`loads(data)`, or None if it is not a valid manifest. The last manifest parsed from each path is kept with
    the digest of its bytes: the same bytes parse to the same manifest, so a periodic save (the companion) does
    not parse an unchanged manifest again."""
    hit = _manifests.get(path)
    if hit is not None and hit[0] == digest:
        return hit[1]
    try:
        manifest = loads(data, path)
    except Exception:  # noqa: BLE001 - corrupt: save_tree replaces it and says so
        return None
    with _last_lock:
        if len(_manifests) >= _MANIFESTS_KEPT:
            _manifests.clear()
        _manifests[path] = (digest, manifest)
    return manifest
