"""Load and save a local compile-cache directory through the content-addressed store, returning a status.

This is the engine behind `load_compile_cache()` / `save_compile_cache()`; it takes the directory as an argument so
other callers (e.g. the vLLM companion, whose cache lives elsewhere) reuse it with their own directory and label:

    status, stats = core.load(Path(vllm_root), label="vllm")
    status, stats = core.save(Path(vllm_root), label="vllm")

`env` replaces the environment dict of this process (see `environment.environment()`), e.g. for a process that
should not initialise CUDA just to name its manifest. Neither function raises: every failure becomes
`OperationStatus.ERROR` with a reason, logged in the one summary line each call emits (logger `b10_transfer`).

The scope and the org store may be directories on the volume or s3:// URLs (object storage); with both in a bucket
the volume is not used at all (`Settings.needs_volume`).
"""

from __future__ import annotations

import logging
import os
import re
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from cas import BlobStore, Manifest, Scope, load_tree, save_tree
from cas.errors import CasError, LockTimeout
from cas.localfs import refuse_overlap
from cas.lock import acquire_slot
from cas.quick import nothing_new, remember_scope_id

from . import family, pod, precompile, side_trees
from .config import Settings, is_dir, read_settings
from .environment import environment, environment_key
from .errors import CacheError, VolumeUnavailable
from .file_transfer import transfer  # noqa: F401  (the peer exports transfer from its core module)
from .report import OperationStats, emit
from .space import require_free
from .status import OperationStatus

logger = logging.getLogger(__name__)

# A waiter must see a dead holder's slot unchanged for CLEANUP_LOCK_TIMEOUT_SECONDS before it may take it; waiting
# that long plus two of cas's longest poll intervals guarantees a dead slot is taken over rather than skipped.
SLOT_WAIT_MARGIN_S = 2.0
# A companion's label: a short name that leaves most of the store's 128 key characters to the environment key.
_LABEL = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,23}")
_KEY_MAX = 128


def load(
    cache_dir: Path | None = None,
    *,
    label: str | None = None,
    settings: Settings | None = None,
    environ: Mapping[str, str] | None = None,
    env: dict[str, str] | None = None,
) -> tuple[OperationStatus, OperationStats]:
    """Restore the manifest of this environment into `cache_dir` (default: TORCHINDUCTOR_CACHE_DIR).

    SUCCESS: files were restored (entries whose blob was missing or corrupt are skipped; they simply recompile).
    SKIPPED: every file the manifest lists was already present locally.
    DOES_NOT_EXIST: no manifest for this environment.
    ERROR: b10fs disabled or not mounted, invalid settings, unreadable manifest, no local space, nothing restorable.
    Processes of one pod on one directory load it once (pod.py); a TRITON_CACHE_DIR outside it is a second tree.
    """
    _side_trees("load", _load, cache_dir, label, settings, environ, env)
    return _run("load", _load, cache_dir, label, settings, environ, env)


def save(
    cache_dir: Path | None = None,
    *,
    label: str | None = None,
    settings: Settings | None = None,
    environ: Mapping[str, str] | None = None,
    env: dict[str, str] | None = None,
) -> tuple[OperationStatus, OperationStats]:
    """Record the files of `cache_dir` (default: TORCHINDUCTOR_CACHE_DIR) in this environment's manifest.

    SUCCESS: new or changed entries were recorded. SKIPPED: nothing new, no local cache, or every save slot stayed
    busy. ERROR: b10fs disabled or not mounted, invalid settings, over MAX_CACHE_SIZE_MB, no space, write failure.
    Saves of one directory by processes of one pod run one after the other (pod.py).
    """
    _side_trees("save", _save, cache_dir, label, settings, environ, env)
    return _run("save", _save, cache_dir, label, settings, environ, env)


def key_for(label: str | None = None, env: dict[str, str] | None = None) -> str:
    """The manifest name used for `label` (None: the Inductor cache) in environment `env` (default: this one)."""
    if label is None:
        return environment_key(env)
    if not _LABEL.fullmatch(label):
        raise ValueError(f"label must match {_LABEL.pattern}, got {label!r}")
    # The label shortens the readable slug, never the hash that makes the key unique.
    return f"{label}.{environment_key(env, max_len=_KEY_MAX - len(label) - 1)}"


def _run(operation, body, cache_dir, label, settings, environ, env) -> tuple[OperationStatus, OperationStats]:
    stats = OperationStats(operation)
    start = time.monotonic()
    try:
        s = settings if settings is not None else read_settings(environ)
        target = Path(cache_dir).absolute() if cache_dir is not None else s.torch_cache_dir
        env = env if env is not None else environment()
        stats.status = pod.serialized(operation, target, key_for(label, env), s.volume_root, s.pod_lock_timeout_s,
                                      stats, lambda: body(target, s, label, env, stats))
    except (CacheError, CasError) as exc:
        stats.status = OperationStatus.ERROR
        stats.reason = f"{type(exc).__name__}: {exc}"
    except OSError as exc:
        stats.status = OperationStatus.ERROR
        stats.reason = f"{type(exc).__name__}: {exc}"
    except Exception as exc:  # the boundary: a model's load() must go on whatever the volume or store does
        stats.status = OperationStatus.ERROR
        stats.reason = f"unexpected {type(exc).__name__}: {exc}"
        logger.warning("%s failed unexpectedly", operation, exc_info=True)
    stats.seconds = time.monotonic() - start
    if operation == "save" and settings is None and stats.status is OperationStatus.SUCCESS:
        _remember_paths(environ)
    if stats.status is OperationStatus.ERROR:
        logger.warning("%s failed: %s", operation, stats.reason)
    emit(stats)
    return stats.status, stats


def _side_trees(operation, body, cache_dir, label, settings, environ, env) -> None:
    """Load/save the caches the directory does not contain (TRITON_CACHE_DIR outside it, side_trees.py): each its
    own manifest and summary line, before the main tree's so that the main line is the call's last."""
    try:
        s = settings if settings is not None else read_settings(environ)
    except CacheError:
        return  # the main call reports the invalid setting
    target = Path(cache_dir).absolute() if cache_dir is not None else s.torch_cache_dir
    for side in side_trees.outside_trees(target, label, s, environ):
        _run(operation, body, side.directory, side.label, s, environ, env)


def _remember_paths(environ: Mapping[str, str] | None) -> None:
    """After a save that may have created the scope and store directories: resolve the settings' paths again, now
    that they exist, so the process keeps them (config._resolve) and the next save, most often a no-op, makes no
    requests for them (slowfs 2 ms: ~20 requests, ~40 ms, moved here from the next call). Not timed in the save's
    seconds; never fails the save."""
    try:
        read_settings(environ)
    except Exception:  # noqa: BLE001 - the save already succeeded with these settings
        pass


def _require_enabled(s: Settings) -> None:
    """BASETEN_FS_ENABLED gates the volume: it is required when the scope or the org store lies on it, and not
    looked at when both are s3:// URLs (a pod with no volume at all, docs/configuration.md)."""
    if s.needs_volume and not s.b10fs_enabled:
        raise VolumeUnavailable("b10fs is not enabled (BASETEN_FS_ENABLED is not 1/true)")


def _require_volume(s: Settings) -> None:
    _require_enabled(s)
    if not s.needs_volume:
        return
    if not is_dir(s.model_mount):
        raise VolumeUnavailable(f"volume not mounted: {s.model_mount} is not a directory")
    scope = s.b10fs_cache_dir
    if isinstance(scope, Path) and not is_dir(scope) and scope.exists():
        raise VolumeUnavailable(f"B10FS_CACHE_DIR {scope} is not a directory")


def _scope_dir_missing(s: Settings) -> bool:
    """The deployment scope is a directory on the volume that does not exist yet (an object store's scope always
    "exists": a missing manifest says the same there)."""
    return isinstance(s.b10fs_cache_dir, Path) and not s.b10fs_cache_dir.is_dir()


def _load(target: Path, s: Settings, label: str | None, env: dict, stats: OperationStats) -> OperationStatus:
    _require_volume(s)
    store_root = s.store_root()
    refuse_overlap(target, scope=s.b10fs_cache_dir, store=store_root)  # before the target is created or written
    stats.env_key = key = key_for(label, env)
    if _scope_dir_missing(s) and not s.cache_family:
        stats.reason = f"no cache directory {s.b10fs_cache_dir}"
        return OperationStatus.DOES_NOT_EXIST
    # A family member's first replica has no scope yet: make it (its first save would), then fill from siblings.
    scope = Scope(s.b10fs_cache_dir, create=_scope_dir_missing(s))
    manifest = _with_family(s, store_root, scope, key, scope.read_manifest(key), stats)
    if manifest is None:
        stats.reason = "no manifest for this environment" + (f" (nor in family {s.cache_family})"
                                                               if s.cache_family else "")
        return OperationStatus.DOES_NOT_EXIST
    stats.files = len(manifest.entries)

    require_free(target, s.required_local_space_bytes(_incoming_bytes(target, manifest)), "restoring the cache")
    store = BlobStore(store_root, create=False)
    target.mkdir(parents=True, exist_ok=True)
    res = load_tree(target, store, scope, key, threads=s.io_threads, manifest=manifest,
                    temp_expiry=s.cleanup_incomplete_timeout_s)
    _remember_id(scope)
    if not res.manifest_found:  # removed between our read and load_tree's
        stats.reason = "no manifest for this environment"
        return OperationStatus.DOES_NOT_EXIST

    missed = {path for path, _ in res.misses}
    stats.files = res.files
    stats.files_transferred = res.restored
    stats.bytes_transferred = res.bytes_restored
    stats.files_skipped = res.present
    stats.bytes_skipped = sum(
        e.size for p, e in manifest.entries.items() if p not in missed
    ) - res.bytes_restored
    stats.misses = len(res.misses)
    stats.corrupt = res.corrupt
    if res.misses:
        path, why = res.misses[0]
        stats.reason = f"{len(res.misses)} entries not restored (they will recompile), e.g. {path}: {why}"
    if res.restored:
        return OperationStatus.SUCCESS
    if res.misses:
        return OperationStatus.ERROR
    return OperationStatus.SKIPPED


def _with_family(s: Settings, store_root: Path | str, scope: Scope, key: str, own, stats: OperationStats):
    """`own` (this deployment's manifest or None), completed with the entries of sibling deployments of the
    configured family that it lacks (family.py). Unchanged when no family is set; never raises."""
    if not s.cache_family:
        return own
    try:
        store = BlobStore(store_root, create=False)
        found = family.sibling_files(store, scope.existing_scope_id(), key, s.cache_family, own, s.max_cache_bytes)
    except (CasError, OSError) as exc:
        logger.info("family %s: no siblings read: %s", s.cache_family, exc)
        return own
    if not found.entries:
        return own
    stats.source = (f"{'own+' if own is not None else ''}family:{s.cache_family}"
                    f"({len(found.entries)} files from {len(found.siblings)} siblings)")
    base = own if own is not None else Manifest(key, {}, {})
    return Manifest(key, base.env, {**found.entries, **base.entries}, base.created, base.updated, base.parent)


def _remember_id(scope: Scope) -> None:
    """Let the next no-op check of this process read the gc root without reading scope.id first (cas/quick.py)."""
    scope_id = scope.existing_scope_id()
    if scope_id is not None:
        remember_scope_id(scope.root, scope_id)


def _incoming_bytes(target: Path, manifest) -> int:
    """Bytes a load would write: entries not already present locally with the right size (a cheap local stat)."""
    total = 0
    for rel, entry in manifest.entries.items():
        try:
            if os.stat(target / rel).st_size == entry.size:
                continue
        except OSError:
            pass
        total += entry.size
    return total


def _save(target: Path, s: Settings, label: str | None, env: dict, stats: OperationStats) -> OperationStatus:
    _require_enabled(s)  # only when a location lies on the volume
    stats.env_key = key = key_for(label, env)
    if label is None:  # B10_TRANSFER_PRECOMPILE: torch writes Dynamo entries only when asked; good ones only
        precompile.write_entries(target)
    # Most saves (every replica after the first) have nothing new: settle that with a few concurrent reads before
    # anything else touches the volume (a save slot, directories, free space). "Nothing new" means this scope's
    # manifest was just read, so the volume is mounted: _require_volume is implied and only runs otherwise.
    unchanged = nothing_new(target, s.store_root, Scope(s.b10fs_cache_dir), key)
    if unchanged is not None:
        stats.files = stats.files_skipped = unchanged
        stats.reason = "nothing new to record"
        return OperationStatus.SKIPPED
    _require_volume(s)
    store_root = s.store_root()
    refuse_overlap(target, scope=s.b10fs_cache_dir, store=store_root)  # before the scope or store is created
    if not target.is_dir() or not any(target.iterdir()):
        stats.reason = f"no local cache at {target}"
        return OperationStatus.SKIPPED

    wait = s.cleanup_lock_timeout_s + SLOT_WAIT_MARGIN_S
    # Four independent chains of round trips on the volume (two free-space checks, the store's format file, the
    # scope's directories): concurrently, they cost one chain. Object storage has no free space to check.
    with ThreadPoolExecutor(max_workers=4, thread_name_prefix="b10-save-setup") as pool:
        checks = [pool.submit(require_free, where, s.required_b10fs_space_bytes, "saving to the volume")
                  for where in (s.b10fs_cache_dir, store_root) if isinstance(where, Path)]
        opened_store = pool.submit(BlobStore, store_root, create=True)
        opened_scope = pool.submit(Scope, s.b10fs_cache_dir, create=True)
        for check in checks:
            check.result()
        store, scope = opened_store.result(), opened_scope.result()
    store.ready_to_write()  # an object store opens in the background: its bucket is there before a slot is written
    try:
        slot = acquire_slot(
            scope.backend,  # slots/ below the scope: the peer's cleanup (top-level *.lock by age) cannot touch them
            s.max_concurrent_saves,
            timeout=wait,
            stale_after=s.cleanup_lock_timeout_s,
        )
    except LockTimeout:
        stats.reason = f"all {s.max_concurrent_saves} save slots busy for {wait:.0f}s (MAX_CONCURRENT_SAVES)"
        return OperationStatus.SKIPPED
    try:
        res = save_tree(
            target,
            store,
            scope,
            key,
            env=env,
            threads=s.io_threads,
            max_stored_bytes=s.max_cache_bytes,
            lock_timeout=wait,
            stale_after=s.cleanup_lock_timeout_s,
            family=s.cache_family,
        )
        _remember_id(scope)
    finally:
        slot.release()

    stats.files = res.files
    stats.files_transferred = res.blobs_uploaded
    stats.bytes_transferred = res.bytes_uploaded
    stats.files_skipped = res.files - res.blobs_uploaded  # already recorded, or content the store already had
    stats.bytes_skipped = res.bytes - res.raw_bytes_uploaded
    if res.skipped_changed:
        stats.reason = f"{res.skipped_changed} files changed while saving; the next save records them"
    stats.new_entries = res.new_entries
    if res.new_entries or res.manifest_written:
        return OperationStatus.SUCCESS
    stats.reason = stats.reason or "nothing new to record"
    return OperationStatus.SKIPPED
