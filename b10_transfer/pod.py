"""Several processes of one pod on one cache directory: a local lock, so the volume sees one load, not one per rank.

`torchrun` ranks, or several workers of one server, call `load_compile_cache()` / `save_compile_cache()` on the same
TORCHINDUCTOR_CACHE_DIR at once. Every load and save of one directory runs under an exclusive `filelock` lock
(flock(2): the kernel releases it when its holder dies, SIGKILL included, so a killed holder never blocks anyone):

- **load**: the first process loads. A process that finds the lock held waits for it (at most
  B10_TRANSFER_POD_LOCK_TIMEOUT_S) and then returns the *same result* the holder recorded (status and counters,
  `waited=` and `shared_from=<pid>` in its log line) without touching the volume. If the holder recorded nothing
  while it waited (it was saving, or it died), the waiter loads itself, still under the lock;
- **save**: saves of one directory run one after the other, each on its own (a later save records what an earlier
  one did not see); they never race on the directory's local stat cache (`.cas-index`);
- after the bound the waiter goes on without the lock: a load repeats the reads, a save its hashing. Both are safe
  without the lock (atomic renames, manifest merges under the volume's lock): the lock saves work, it does not
  guard correctness.

The lock is keyed on the directory alone, so LOCAL_RANK/RANK change nothing: whichever process comes first loads,
and processes with different cache directories never wait for each other. The lock and its result record live next
to the cache directory (`<parent>/.<name>.b10-pod.lock`, `.<name>.b10-pod-result.lock`), on the pod's local disk;
for a cache directory on the volume itself they go to `<tempdir>/b10-transfer-pod/` instead (a lock on the shared
volume would couple pods). Both names end in `.lock`, which no save ever takes (cas.paths.is_transient).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import secrets
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from filelock import Timeout, UnixFileLock

from .report import OperationStats
from .status import OperationStatus

logger = logging.getLogger(__name__)

_LOCK_SUFFIX = ".b10-pod.lock"
_RESULT_SUFFIX = ".b10-pod-result.lock"
_FALLBACK_DIR = "b10-transfer-pod"
# A result record is a few hundred bytes; anything much larger is not ours.
_RESULT_MAX_BYTES = 64 * 1024
# The counters a waiter copies from the loader's record.
_SHARED_FIELDS = ("env_key", "files", "files_transferred", "bytes_transferred", "files_skipped", "bytes_skipped",
                  "misses", "corrupt", "reason")


@dataclass(frozen=True)
class PodPaths:
    lock: Path
    result: Path


def paths_for(cache_dir: Path, volume_root: Path) -> PodPaths:
    """Where the lock of `cache_dir` lives: beside it on the local disk, or in the temp directory if `cache_dir`
    is on the volume (the lock must be local to the pod). `volume_root`: resolved (as in Settings)."""
    real = Path(os.path.realpath(cache_dir))
    name = real.name or "root"
    if real.is_relative_to(volume_root):  # Settings.volume_root is resolved: no lookups on the volume here
        digest = hashlib.sha256(os.fsencode(real)).hexdigest()[:16]
        base = Path(tempfile.gettempdir()) / _FALLBACK_DIR / f"{name}-{digest}"
    else:
        base = real.parent / f".{name}"
    return PodPaths(Path(f"{base}{_LOCK_SUFFIX}"), Path(f"{base}{_RESULT_SUFFIX}"))


def serialized(
    operation: str,
    cache_dir: Path,
    env_key: str,
    volume_root: Path,
    timeout_s: float,
    stats: OperationStats,
    body: Callable[[], OperationStatus],
) -> OperationStatus:
    """Run `body` (the load or save of `cache_dir`) under the pod's lock of that directory; see the module doc."""
    if timeout_s <= 0:
        return body()
    paths = paths_for(cache_dir, volume_root)
    lock = _open_lock(paths.lock)
    if lock is None:
        return body()
    if _try(lock, 0):
        return _holding(lock, operation, paths, env_key, stats, body)
    seen = _read_token(paths.result)  # the record before we wait: a new one was written by the holder we waited on
    started = time.monotonic()
    acquired = _try(lock, timeout_s)
    stats.waited_s = time.monotonic() - started
    if not acquired:
        note = f"another process of this pod held {paths.lock} for {timeout_s:g}s; went on without the lock"
        status = body()
        stats.reason = f"{stats.reason}; {note}" if stats.reason else note
        return status
    if operation == "load":
        shared = _fresh_result(paths.result, seen, env_key)
        if shared is not None:
            if lock.is_locked:
                lock.release()
            return _adopt(shared, stats)
    return _holding(lock, operation, paths, env_key, stats, body)


def _open_lock(path: Path) -> UnixFileLock | None:
    """A lock object for `path`, creating its directory; None (no coordination, as before) if that fails."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        logger.warning("no pod lock for %s (%s): loading and saving without it", path, exc.strerror or exc)
        return None
    return UnixFileLock(str(path))


def _try(lock: UnixFileLock, timeout_s: float) -> bool:
    """Acquire within `timeout_s` (0: one attempt). False on timeout; an unusable lock counts as acquired (we then
    run uncoordinated, as before) so a read-only parent, or a file system without flock (filelock 3 raises
    NotImplementedError; filelock 4 falls back to a marker whose dead owner it detects), never fails a load."""
    try:
        lock.acquire(timeout=timeout_s, poll_interval=0.05)
    except Timeout:
        return False
    except (OSError, NotImplementedError) as exc:
        logger.warning("pod lock %s unusable (%s): going on without it", lock.lock_file, exc)
    return True


def _holding(
    lock: UnixFileLock,
    operation: str,
    paths: PodPaths,
    env_key: str,
    stats: OperationStats,
    body: Callable[[], OperationStatus],
) -> OperationStatus:
    """Run `body` while holding `lock`; a load that returns records its result for the processes waiting on it."""
    try:
        status = body()
        if operation == "load":
            _write_result(paths.result, env_key, paths.lock, status, stats)
        return status
    finally:
        if lock.is_locked:
            lock.release()


def _write_result(path: Path, env_key: str, lock_path: Path, status: OperationStatus, stats: OperationStats) -> None:
    record = {
        "token": secrets.token_hex(8),
        "pid": os.getpid(),
        "env_key": env_key,
        "lock": str(lock_path),
        "status": status.name,
        "stats": {name: getattr(stats, name) for name in _SHARED_FIELDS},
    }
    tmp = path.with_name(f"{path.name}.{os.getpid()}.{secrets.token_hex(4)}.lock")
    try:
        tmp.write_text(json.dumps(record))
        os.replace(tmp, path)
    except OSError as exc:  # waiters then load themselves: more reads, same result
        logger.debug("cannot record the load result in %s: %s", path, exc)
        tmp.unlink(missing_ok=True)


def _read_record(path: Path) -> dict | None:
    try:
        with open(path, "rb") as fh:
            data = fh.read(_RESULT_MAX_BYTES + 1)
        record = json.loads(data) if len(data) <= _RESULT_MAX_BYTES else None
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def _read_token(path: Path) -> str | None:
    record = _read_record(path)
    return record.get("token") if record else None


def _fresh_result(path: Path, seen: str | None, env_key: str) -> dict | None:
    """The record the holder we waited on wrote for this environment, or None (it saved, died, or loaded another
    manifest into this directory)."""
    record = _read_record(path)
    if record is None or record.get("token") in (None, seen) or record.get("env_key") != env_key:
        return None
    if record.get("status") not in OperationStatus.__members__ or not isinstance(record.get("stats"), dict):
        return None
    return record


def _adopt(record: dict, stats: OperationStats) -> OperationStatus:
    """Copy the loader's counters into this waiter's stats: same status, same numbers, no volume reads."""
    for name in _SHARED_FIELDS:
        value = record["stats"].get(name)
        if isinstance(value, (int, str)) or (value is None and name == "bytes_skipped"):
            setattr(stats, name, value)
    stats.shared_from = int(record.get("pid") or 0)
    return OperationStatus[record["status"]]
