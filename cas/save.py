"""save_tree: publish a local cache directory into the store and merge it into the deployment's manifest.

Order matters for crash safety (FORMAT §3, §7): blobs are made durable first, the manifest is renamed into place
second, the GC root is replaced last, all manifest work under the manifest lock.
"""
from __future__ import annotations

import errno
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from . import _faults, limits
from .blobstore import BlobStore, SourceChanged, hash_file
from .index import Index
from .errors import ManifestError, NoSpace, StoreReadOnly, StoreUnavailable, TooLarge
from .manifest import Entry, Manifest
from .roots import write_root
from .scope import Scope, check_env_key
from .space import require_free
from .tree import LocalFile, scan

log = logging.getLogger("cas.save")

# The volume is high-latency: per-file round trips, not bandwidth, dominate. 32 requests in flight hide a 2 ms
# round trip for a few thousand files while staying far below NFS client slot limits.
DEFAULT_THREADS = 32
# Hashing is local CPU and page-cache work: more threads than cores only adds contention.
HASH_THREADS = max(1, min(8, os.cpu_count() or 1))


@dataclass
class SaveResult:
    files: int = 0  # files in the local tree
    bytes: int = 0  # their raw size
    new_entries: int = 0  # entries added or changed in the manifest
    blobs_uploaded: int = 0
    bytes_uploaded: int = 0  # compressed bytes written to the store
    blobs_present: int = 0  # blobs the store already had (dedup hits)
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
    lock_timeout: float = 60.0,
    stale_after: float = 30.0,
    use_index: bool = True,
) -> SaveResult:
    """Save the files of `src_dir` (FORMAT §3). `use_index` keeps a local stat cache in `src_dir/.cas-index` so
    unchanged files are not re-hashed."""
    check_env_key(env_key)
    started = time.monotonic()
    result = SaveResult()
    files = scan(src_dir)
    result.files, result.bytes = len(files), sum(f.size for f in files)

    index = Index(src_dir) if use_index else None
    with ThreadPoolExecutor(max_workers=min(max(1, threads), HASH_THREADS), thread_name_prefix="cas-hash") as hashers:
        entries, by_id = _hash_all(files, hashers, index)
    if index is not None:
        index.retain(set(entries))
        index.write()
    with ThreadPoolExecutor(max_workers=max(1, threads), thread_name_prefix="cas-save") as pool:
        current = _read_or_none(scope, env_key)
        delta = current.changes_from(entries) if current else dict(entries)
        if not delta:
            _repair_root(store, scope, env_key, lock_timeout, stale_after)
            result.seconds = time.monotonic() - started
            return result  # nothing new: the volume saw reads only (unless the root needed repair)
        _faults.checkpoint("hashed")

        if max_stored_bytes is not None:
            _check_cap(files, entries, store, max_stored_bytes, pool)

        needed = sorted({e.blob_id for e in delta.values()})
        present = list(pool.map(store.ensure_fresh, needed))
        missing = [bid for bid, ok in zip(needed, present) if not ok]
        result.blobs_present = len(needed) - len(missing)
        require_free(store.root, sum(by_id[b].size for b in missing), "saving to the store")

        uploads = list(pool.map(lambda bid: _upload(store, bid, by_id[bid]), missing))
        for bid, written in zip(missing, uploads):
            if written is None:  # the file changed under us: drop every entry that expected that content
                delta = {p: e for p, e in delta.items() if e.blob_id != bid}
                result.skipped_changed += 1
            else:
                result.blobs_uploaded += 1
                result.bytes_uploaded += written
    _faults.checkpoint("uploaded")

    if delta:
        result.new_entries, result.manifest_written = _commit(
            store, scope, env_key, env or {}, delta, lock_timeout, stale_after
        )
    result.seconds = time.monotonic() - started
    log.debug("save %s: %s", env_key, result)
    return result


def _hash_all(
    files: list[LocalFile], pool: ThreadPoolExecutor, index: Index | None
) -> tuple[dict[str, Entry], dict[str, LocalFile]]:
    def one(f: LocalFile):
        cached = index.lookup(f.rel, f.stat) if index is not None else None
        if cached is not None:
            return f, cached, f.size
        try:
            blob_id, size = hash_file(f.path)
        except (FileNotFoundError, PermissionError, IsADirectoryError) as exc:
            log.warning("not saving %s: %s", f.path, exc.strerror)
            return None
        if index is not None and size == f.size:
            index.record(f.rel, f.stat, blob_id)
        return f, blob_id, size

    entries: dict[str, Entry] = {}
    by_id: dict[str, LocalFile] = {}
    for item in pool.map(one, files):
        if item is None:
            continue
        f, blob_id, size = item
        entries[f.rel] = Entry(blob_id, size, f.mode)
        by_id[blob_id] = LocalFile(f.rel, f.path, size, f.mode, f.stat)
    return entries, by_id


def _read_or_none(scope: Scope, env_key: str) -> Manifest | None:
    try:
        return scope.read_manifest(env_key)
    except ManifestError as exc:
        # A corrupt manifest must not block saving forever: this save replaces it with what it knows.
        log.warning("replacing unreadable manifest: %s", exc)
        return None


def _check_cap(files, entries, store: BlobStore, cap: int, pool: ThreadPoolExecutor) -> None:
    unique = {e.blob_id: f for f in files if (e := entries.get(f.rel))}
    raw = sum(f.size for f in unique.values())
    # zstd never expands by more than a few bytes per block, so a raw total well under the cap needs no counting.
    if raw + (raw >> 7) + 1024 * len(unique) <= cap:
        return
    stored = sum(pool.map(lambda f: store.compressed_size(f.path), unique.values()))
    if stored > cap:
        raise TooLarge(f"cache is {stored / 1e6:.1f} MB compressed, over the {cap / 1e6:.1f} MB cap")


def _upload(store: BlobStore, blob_id: str, f: LocalFile) -> int | None:
    try:
        return store.put_file(f.path, blob_id, f.size)
    except SourceChanged as exc:
        log.info("%s; it will be saved next time", exc)
        return None
    except FileNotFoundError:
        return None  # deleted locally since hashing
    except OSError as exc:
        raise _store_error(exc, store) from exc


def _store_error(exc: OSError, store: BlobStore) -> Exception:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return NoSpace(f"store {store.root} is full: {exc.strerror}")
    if exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return StoreReadOnly(f"store {store.root} is not writable: {exc.strerror}")
    return StoreUnavailable(f"store {store.root}: {exc.strerror or exc}")


def _repair_root(store, scope, env_key, lock_timeout, stale_after, *, locked: bool = False) -> None:
    """A save that died (or failed) after renaming its manifest and before writing its root (FORMAT §8) leaves a
    root naming an older manifest: gc does not see the newer entries and collects their blobs, and since every later
    save of the same files finds nothing new, none would ever write the root again. So a save with nothing new
    checks that the root names the current manifest (two small reads) and rewrites it if not. Best effort."""
    import contextlib

    import blake3

    from .roots import parse_root, root_path

    def root_ok(data: bytes) -> bool:
        path = root_path(store, scope.scope_id, env_key)
        try:
            with open(path, "rb") as fh:
                root = parse_root(path, fh.read(limits.MAX_SMALL_FILE_BYTES + 1), 0.0)
        except FileNotFoundError:
            return False
        except ValueError:
            return False  # unreadable root: replace it
        return root.manifest == blake3.blake3(data).hexdigest()

    try:
        data = scope.read_manifest_bytes(env_key)
        if data is None or root_ok(data):
            return
        with contextlib.nullcontext() if locked else scope.lock(env_key, timeout=lock_timeout, stale_after=stale_after):
            data = scope.read_manifest_bytes(env_key)
            if data is None or root_ok(data):
                return
            write_root(store, scope.scope_id, env_key, store.put_bytes(data), scope.root)
            log.warning("rewrote the gc root of %s: it did not name the current manifest (a save died in between)",
                        env_key)
    except Exception as exc:  # noqa: BLE001 - a repair must never fail a save that had nothing to write
        log.warning("could not repair the gc root of %s: %s", env_key, exc)


def _commit(store, scope, env_key, env, delta, lock_timeout, stale_after) -> tuple[int, bool]:
    """Merge `delta` into the manifest under its lock. Returns (entries changed, manifest written)."""
    with scope.lock(env_key, timeout=lock_timeout, stale_after=stale_after):
        _faults.checkpoint("locked")
        current = _read_or_none(scope, env_key) or Manifest(env_key, dict(env), {}, 0.0, 0.0)
        changes = current.changes_from(delta)
        if not changes:
            _repair_root(store, scope, env_key, lock_timeout, stale_after, locked=True)
            return 0, False  # a concurrent replica already recorded the same content
        merged = current.merged(changes, env)
        data = merged.dumps()
        if len(data) > limits.MAX_MANIFEST_BYTES:
            raise TooLarge(f"manifest would be {len(data)} bytes, over the {limits.MAX_MANIFEST_BYTES} byte limit")
        try:
            scope.write_manifest(data, env_key)
            _faults.checkpoint("manifest-renamed")
            manifest_id = store.put_bytes(data)
            write_root(store, scope.scope_id, env_key, manifest_id, scope.root)
        except OSError as exc:
            raise _store_error(exc, store) from exc
        return len(changes), True
