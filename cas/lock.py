"""Locks that work on network filesystems and object stores (docs/FORMAT.md §6), in the storage seam's verbs.

`flock` is not reliable over NFS and does not exist on S3, so a lock is an object created with `put(if_absent=True)`
(a hard link on a volume, `If-None-Match: *` on S3) that names its holder. A lock whose holder
died is broken by the next waiter: at once if the holder was a process of this host that no longer exists, otherwise
once the waiter itself has seen the lock unchanged for `stale_after` seconds of its own monotonic clock. The second
rule never trusts another host's clock, so a live foreign holder is never robbed early.
"""
from __future__ import annotations

import logging
import os
import random
import secrets
import socket
import threading
import time
from collections.abc import Callable

import msgpack

from . import layout, limits, timing
from .errors import CasError, LockTimeout
from .posix import PosixBackend
from .storage import AlreadyExists, Backend, BadObject, NotFound, ObjectTooLarge, PreconditionFailed

log = logging.getLogger("cas.lock")

_HOST = socket.gethostname()
# Waiters poll; a lock is held for milliseconds (manifest) or seconds (slot), so 50 ms to 1 s of backoff keeps the
# number of round trips on a slow volume low without adding noticeable latency.
_POLL_MIN_S = 0.05
_POLL_MAX_S = 1.0


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A killed process stays a zombie until its parent reaps it: kill(0) still finds it, but it holds nothing.
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            state = fh.read().rsplit(b")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True  # no /proc (not Linux) or it just vanished: the next poll decides
    return state not in (b"Z", b"X")


def _at(target: str | os.PathLike | Backend, key: str | None) -> tuple[Backend, str]:
    """(backend, key) of a lock given either both or a plain path on a volume (its directory is the backend)."""
    if isinstance(target, Backend):
        if key is None:
            raise ValueError("a lock on a backend needs its key")
        return target, key
    path = os.path.abspath(os.fspath(target))
    return PosixBackend(os.path.dirname(path)), os.path.basename(path)


class LockFile:
    """A lock object. Use as a context manager, or acquire()/release(). `LockFile(backend, key)`, or
    `LockFile(path)` for a lock file in an existing directory."""

    def __init__(
        self,
        target: str | os.PathLike | Backend,
        key: str | None = None,
        *,
        stale_after: float = timing.DEFAULT_STALE_AFTER,
        timeout: float = timing.MANIFEST_LOCK_TIMEOUT,
        heartbeat: bool = False,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
        is_guard: bool = False,
    ):
        self.backend, self.key = _at(target, key)
        self.path = os.path.join(self.backend.location, self.key)  # for messages
        self._is_guard = is_guard
        self._guard: LockFile | None = None
        self.stale_after = stale_after
        self.timeout = timeout
        self.heartbeat = heartbeat
        self._clock = clock
        self._sleep = sleep
        self._token: str | None = None
        self._beat: threading.Thread | None = None
        self._stop = threading.Event()
        # (content, mtime) of a foreign lock -> when we first saw it unchanged.
        self._seen: dict[tuple[bytes, float], float] = {}

    # -- acquiring ---------------------------------------------------------------------------------------------
    def try_acquire(self) -> bool:
        """One attempt: take the lock if free (or stale and broken now). Never waits."""
        if self._create():
            return True
        info = self._read()
        if info is None:
            return self._create()  # vanished between our create and read
        if self._is_stale(info[0], info[1]):
            if self._is_guard:
                self._break_guard(info)
            else:
                self._break(info[0])
            return self._create()
        return False

    def acquire(self) -> LockFile:
        deadline = self._clock() + self.timeout
        delay = _POLL_MIN_S
        while not self.try_acquire():
            if self._clock() >= deadline:
                raise LockTimeout(f"lock {self.path} still held after {self.timeout:.0f}s ({self.describe_holder()})")
            self._sleep(delay * random.uniform(0.5, 1.5))
            delay = min(delay * 2, _POLL_MAX_S)
        return self

    def _create(self) -> bool:
        token = secrets.token_hex(8)
        body = msgpack.packb({"host": _HOST, "pid": os.getpid(), "time": time.time(), "token": token})
        # Created complete (temp + link on a volume, one PUT on S3): the lock never exists empty, so a holder killed
        # while creating it left either nothing or a record the dead-pid rule breaks at once.
        try:
            self.backend.put(self.key, body, if_absent=True)
        except AlreadyExists:
            return False
        except BadObject:
            return False  # something planted at the lock's name: held by nobody we can break; wait, then time out
        self._token = token
        self._seen.clear()
        if self.heartbeat:
            self._stop.clear()
            self._beat = threading.Thread(target=self._refresh_loop, name="cas-lock-heartbeat", daemon=True)
            self._beat.start()
        return True

    def _read(self) -> tuple[bytes, float, str] | None:
        """(content, mtime, version) of the lock, None if there is none. A planted non-lock reads as an unknown
        holder that never changes, so it goes stale by rule (b) and is then reported, never followed."""
        try:
            info = self.backend.stat(self.key)
            content = self.backend.get(self.key, limit=limits.MAX_SMALL_FILE_BYTES)
        except NotFound:
            return None
        except (BadObject, ObjectTooLarge):
            return b"", 0.0, "planted"
        return content, info.mtime, info.version

    def _is_stale(self, content: bytes, mtime: float) -> bool:
        holder = _parse(content)
        if (holder and holder.get("host") == _HOST and isinstance(holder.get("pid"), int)
                and holder["pid"] != os.getpid() and not _pid_alive(holder["pid"])):
            log.info("breaking lock %s of dead local pid %s", self.path, holder["pid"])
            return True
        now = self._clock()
        key = (content, mtime)
        first = self._seen.setdefault(key, now)
        if now - first >= self.stale_after:
            log.warning("breaking lock %s unchanged for %.0fs (%s)", self.path, now - first, _describe(holder))
            return True
        return False

    def _break(self, stale_content: bytes) -> None:
        """Remove a stale lock without ever removing a fresh one taken meanwhile by someone else.

        Breakers serialise on a guard lock (`<name>.break.lock`, held for microseconds) and delete the lock only if
        it still holds the content judged stale. Without the guard, two waiters that judged the same lock
        stale can each remove one: the second removes the lock the first just took."""
        if self._guard is None:
            base = self.key[:-5] if self.key.endswith(".lock") else self.key
            self._guard = LockFile(self.backend, base + ".break.lock", stale_after=self.stale_after, timeout=0,
                                   clock=self._clock, sleep=self._sleep, is_guard=True)
        if not self._guard.try_acquire():
            return  # another waiter is breaking it; our caller tries again
        try:
            info = self._read()
            if info is not None and info[0] == stale_content:
                self.backend.delete(self.key, if_version=info[2])
        except (NotFound, PreconditionFailed, BadObject):
            pass
        finally:
            self._guard.release()

    def _break_guard(self, stale: tuple[bytes, float, str]) -> None:
        """A guard is stale only if a breaker died inside its microsecond critical section: delete it only in the
        version judged stale (a volume renames it aside and links it back if it turns out to be a fresh one)."""
        try:
            self.backend.delete(self.key, if_version=stale[2])
        except PreconditionFailed:
            log.warning("guard %s changed hands while being broken", self.path)
        except (NotFound, BadObject):
            pass

    # -- holding -----------------------------------------------------------------------------------------------
    def _refresh_loop(self) -> None:
        interval = max(timing.heartbeat_interval(self.stale_after), 0.05)
        while not self._stop.wait(interval):
            try:
                if not self.still_held():  # broken by a waiter who judged us stale: never freshen their lock
                    log.warning("lock %s was taken over; no longer refreshing it", self.path)
                    return
                self.backend.touch(self.key)
            except CasError:
                return

    def still_held(self) -> bool:
        info = self._read()
        parsed = _parse(info[0]) if info else None
        return bool(parsed) and parsed is not None and parsed.get("token") == self._token

    def release(self) -> None:
        self._stop.set()
        if self._beat is not None:
            self._beat.join(timeout=5)
            self._beat = None
        if self._token is None:
            return
        try:
            info = self._read()
            parsed = _parse(info[0]) if info else None
            if info is not None and parsed and parsed.get("token") == self._token:
                self.backend.delete(self.key, if_version=info[2])
        except CasError as exc:
            log.debug("releasing %s: %s", self.path, exc)
        self._token = None

    def describe_holder(self) -> str:
        info = self._read()
        return _describe(_parse(info[0]) if info else None)

    def __enter__(self) -> LockFile:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _parse(content: bytes) -> dict | None:
    try:
        value = msgpack.unpackb(content, raw=False, max_str_len=1024, max_map_len=16, max_array_len=16)
    except Exception:  # noqa: BLE001 - msgpack's assorted errors on garbage: holder unknown
        return None
    return value if isinstance(value, dict) else None


def _describe(holder: dict | None) -> str:
    if not holder:
        return "holder unknown"
    return f"held by pid {holder.get('pid')} on {holder.get('host')}"


def acquire_slot(
    target: str | os.PathLike | Backend,
    slots: int,
    *,
    timeout: float,
    stale_after: float = timing.DEFAULT_STALE_AFTER,
    prefix: str = layout.SLOTS,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> LockFile:
    """Take one of `slots` locks `<prefix>slot-<n>.lock` of a scope backend (or of a plain directory, which then
    holds the slot files), refreshed while held, so at most `slots` holders run at once across every host. Raises
    LockTimeout when all stay busy for `timeout` seconds."""
    if isinstance(target, Backend):
        backend, keys = target, [layout.slot(n) if prefix == layout.SLOTS else f"{prefix}slot-{n}.lock"
                                 for n in range(slots)]
    else:
        path = os.path.abspath(os.fspath(target))
        backend = PosixBackend(os.path.dirname(path))
        keys = [f"{os.path.basename(path)}/slot-{n}.lock" for n in range(slots)]
    locks = [LockFile(backend, key, stale_after=stale_after, heartbeat=True, clock=clock, sleep=sleep)
             for key in keys]
    deadline = clock() + timeout
    delay = _POLL_MIN_S
    while True:
        for lock in random.sample(locks, len(locks)):
            if lock.try_acquire():
                return lock
        if clock() >= deadline:
            raise LockTimeout(f"all {slots} save slots in {backend.location} busy for {timeout:.0f}s")
        sleep(delay * random.uniform(0.5, 1.5))
        delay = min(delay * 2, _POLL_MAX_S)
