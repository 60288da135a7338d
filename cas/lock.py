"""Lock files that work on network filesystems (docs/FORMAT.md §6).

`flock` is not reliable over NFS, so a lock is a file created with O_EXCL that names its holder. A lock whose holder
died is broken by the next waiter: at once if the holder was a process of this host that no longer exists, otherwise
once the waiter itself has seen the lock unchanged for `stale_after` seconds of its own monotonic clock. The second
rule never trusts another host's clock, so a live foreign holder is never robbed early.
"""
from __future__ import annotations

import errno
import logging
import os
import random
import secrets
import socket
import threading
import time
from typing import Callable

import msgpack

from . import limits
from .atomic import temp_path_beside
from .errors import LockTimeout, StoreReadOnly, StoreUnavailable

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


class LockFile:
    """An O_EXCL lock file. Use as a context manager, or acquire()/release()."""

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        stale_after: float = 30.0,
        timeout: float = 60.0,
        heartbeat: bool = False,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
        is_guard: bool = False,
    ):
        self.path = os.fspath(path)
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
        if self._is_stale(*info):
            (self._break_guard if self._is_guard else self._break)(info[0])
            return self._create()
        return False

    def acquire(self) -> "LockFile":
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
        # The holder record is written under a temp name and linked into place, so the lock never exists empty: a
        # process killed between an O_EXCL create and its write left a lock nobody could attribute, which every
        # waiter then had to age for stale_after instead of breaking it at once by the dead-pid rule.
        tmp = temp_path_beside(self.path)
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileNotFoundError as exc:
            raise StoreUnavailable(f"cannot create lock {self.path}: {exc.strerror}") from exc
        except OSError as exc:
            if exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
                raise StoreReadOnly(f"cannot create lock {self.path}: {exc.strerror}") from exc
            raise
        try:
            try:
                os.write(fd, body)
            finally:
                os.close(fd)
            try:
                os.link(tmp, self.path)  # atomic, fails if the lock exists (also on NFS)
            except FileExistsError:
                return False
            except OSError as exc:
                if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK, errno.ENOSYS):
                    raise
                if not self._create_excl(body):  # no hard links on this filesystem
                    return False
        finally:
            try:
                os.unlink(tmp)
            except OSError:
                pass
        self._token = token
        self._seen.clear()
        if self.heartbeat:
            self._stop.clear()
            self._beat = threading.Thread(target=self._refresh_loop, name="cas-lock-heartbeat", daemon=True)
            self._beat.start()
        return True

    def _create_excl(self, body: bytes) -> bool:
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        try:
            os.write(fd, body)
        finally:
            os.close(fd)
        return True

    def _read(self) -> tuple[bytes, float] | None:
        try:
            with open(self.path, "rb") as fh:
                st = os.fstat(fh.fileno())
                content = fh.read(limits.MAX_SMALL_FILE_BYTES)
        except FileNotFoundError:
            return None
        return content, st.st_mtime

    def _is_stale(self, content: bytes, mtime: float) -> bool:
        holder = _parse(content)
        if holder and holder.get("host") == _HOST and isinstance(holder.get("pid"), int):
            if holder["pid"] != os.getpid() and not _pid_alive(holder["pid"]):
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
        it still holds the content judged stale. Without the guard, two waiters that both judged the same lock
        stale can each remove one: the second removes the lock the first just took."""
        if self._guard is None:
            base = self.path[:-5] if self.path.endswith(".lock") else self.path
            self._guard = LockFile(base + ".break.lock", stale_after=self.stale_after, timeout=0,
                                   clock=self._clock, sleep=self._sleep, is_guard=True)
        if not self._guard.try_acquire():
            return  # another waiter is breaking it; our caller tries again
        try:
            info = self._read()
            if info is not None and info[0] == stale_content:
                os.unlink(self.path)
        except FileNotFoundError:
            pass
        finally:
            self._guard.release()

    def _break_guard(self, stale_content: bytes) -> None:
        """A guard is stale only if a breaker died inside its microsecond critical section: rename it aside,
        and put it back if it turns out to be a fresh one."""
        aside = temp_path_beside(self.path)
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return
        try:
            with open(aside, "rb") as fh:
                moved = fh.read(limits.MAX_SMALL_FILE_BYTES)
            if moved != stale_content:
                try:
                    os.link(aside, self.path)
                except OSError:
                    log.warning("guard %s changed hands while being broken", self.path)
        finally:
            try:
                os.unlink(aside)
            except OSError:
                pass

    # -- holding -----------------------------------------------------------------------------------------------
    def _refresh_loop(self) -> None:
        interval = max(self.stale_after / 3, 0.05)
        while not self._stop.wait(interval):
            try:
                if not self.still_held():  # broken by a waiter who judged us stale: never freshen their lock
                    log.warning("lock %s was taken over; no longer refreshing it", self.path)
                    return
                os.utime(self.path, None)
            except OSError:
                return

    def still_held(self) -> bool:
        info = self._read()
        parsed = _parse(info[0]) if info else None
        return bool(parsed) and parsed.get("token") == self._token

    def release(self) -> None:
        self._stop.set()
        if self._beat is not None:
            self._beat.join(timeout=5)
            self._beat = None
        if self._token is None:
            return
        try:
            if self.still_held():
                os.unlink(self.path)
        except OSError as exc:
            log.debug("releasing %s: %s", self.path, exc)
        self._token = None

    def describe_holder(self) -> str:
        info = self._read()
        return _describe(_parse(info[0]) if info else None)

    def __enter__(self) -> "LockFile":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _parse(content: bytes) -> dict | None:
    try:
        value = msgpack.unpackb(content, raw=False, max_str_len=1024, max_map_len=16, max_array_len=16)
    except Exception:
        return None
    return value if isinstance(value, dict) else None


def _describe(holder: dict | None) -> str:
    if not holder:
        return "holder unknown"
    return f"held by pid {holder.get('pid')} on {holder.get('host')}"


def acquire_slot(
    directory: str | os.PathLike,
    slots: int,
    *,
    timeout: float,
    stale_after: float = 30.0,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> LockFile:
    """Take one of `slots` lock files `slot-<n>.lock` in `directory`, refreshed while held, so at most `slots`
    holders run at once across every host. Raises LockTimeout when all stay busy for `timeout` seconds."""
    directory = os.fspath(directory)
    try:
        os.makedirs(directory, exist_ok=True)
    except OSError as exc:
        raise StoreUnavailable(f"cannot create slot directory {directory}: {exc.strerror}") from exc
    locks = [
        LockFile(os.path.join(directory, f"slot-{n}.lock"), stale_after=stale_after, heartbeat=True,
                 clock=clock, sleep=sleep)
        for n in range(slots)
    ]
    deadline = clock() + timeout
    delay = _POLL_MIN_S
    while True:
        for lock in random.sample(locks, len(locks)):
            if lock.try_acquire():
                return lock
        if clock() >= deadline:
            raise LockTimeout(f"all {slots} save slots in {directory} busy for {timeout:.0f}s")
        sleep(delay * random.uniform(0.5, 1.5))
        delay = min(delay * 2, _POLL_MAX_S)
