"""A fault-injecting wrapper around any backend: the test seam for races, latency and broken volumes.

Tests and the torture suite wrap the real backend instead of monkeypatching `os`, so what they exercise is the code
that runs in production:

    backend = FaultyBackend(PosixBackend(root), latency=0.002)
    backend.before = lambda verb, key: ...        # runs before every verb: swap a file, kill, pause
    backend.fail("put", "blobs/", StoreUnavailable("volume gone"), times=1)
    backend.check_then_put("roots/", between=lambda key: ...)  # a conditional put as moto's: check, hook, write

Counts every verb (`calls`), and for `get` the bytes returned and the ranged reads (`got_bytes`, `ranged_gets`, per
key area: "blobs", "manifests", ...), so a test can also assert how many requests an operation made and what they
fetched.
"""
from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import BinaryIO

from .storage import AlreadyExists, Backend, NotFound, ObjectInfo, Payload, PreconditionFailed

Hook = Callable[[str, str], None]  # (verb, key)


@dataclass
class _Fault:
    verb: str
    prefix: str
    error: BaseException
    times: int  # < 0: always


class FaultyBackend(Backend):
    """Delegates every verb to `inner`, after an optional delay, a hook and any armed fault."""

    def __init__(self, inner: Backend, *, latency: float = 0.0, before: Hook | None = None,
                 sleep: Callable[[float], None] = time.sleep):
        self.inner = inner
        self.latency = latency
        self.before = before
        self.atomic_replace = inner.atomic_replace
        self.check_alive_first = inner.check_alive_first
        self.location = inner.location
        self.calls: Counter[str] = Counter()
        self.got_bytes: Counter[str] = Counter()  # area -> bytes returned by `get`
        self.ranged_gets: Counter[str] = Counter()  # area -> `get` calls with a length (ranged reads)
        self._faults: list[_Fault] = []
        self._racy: list[tuple[str, Callable[[str], None]]] = []  # check_then_put rules, each used once
        self._lock = threading.Lock()
        self._sleep = sleep

    def fail(self, verb: str, prefix: str, error: BaseException, *, times: int = -1) -> None:
        """Make `verb` on keys starting with `prefix` raise `error`, `times` times (-1: until `clear`)."""
        with self._lock:
            self._faults.append(_Fault(verb, prefix, error, times))

    def check_then_put(self, prefix: str, between: Callable[[str], None]) -> None:
        """Make the next conditional put on a key under `prefix` check-then-act, as moto's are (and SeaweedFS was
        seen to let two racing creates both succeed): its condition is checked with a stat, `between(key)` runs (the
        window another writer's request can fall into), then the bytes go in unconditionally."""
        with self._lock:
            self._racy.append((prefix, between))

    def _racy_rule(self, key: str) -> Callable[[str], None] | None:
        with self._lock:
            rule = next((r for r in self._racy if key.startswith(r[0])), None)
            if rule is not None:
                self._racy.remove(rule)
        return rule[1] if rule is not None else None

    def clear(self) -> None:
        with self._lock:
            self._faults.clear()

    def _enter(self, verb: str, key: str) -> None:
        with self._lock:
            self.calls[verb] += 1
            fault = next((f for f in self._faults if f.verb in (verb, "*") and key.startswith(f.prefix)), None)
            if fault is not None and fault.times > 0:
                fault.times -= 1
                if fault.times == 0:
                    self._faults.remove(fault)
        if self.latency:
            self._sleep(self.latency)
        if self.before is not None:
            self.before(verb, key)
        if fault is not None:
            raise fault.error

    def get(self, key: str, *, limit: int, offset: int = 0, length: int | None = None) -> bytes:
        self._enter("get", key)
        data = self.inner.get(key, limit=limit, offset=offset, length=length)
        area = key.split("/", 1)[0]
        with self._lock:
            self.got_bytes[area] += len(data)
            self.ranged_gets[area] += length is not None
        return data

    def get_versioned(self, key: str, *, limit: int) -> tuple[bytes, str]:
        self._enter("get", key)  # one request where the inner backend can: counted (and failed) as a get
        return self.inner.get_versioned(key, limit=limit)

    def open(self, key: str, *, limit: int) -> BinaryIO:
        self._enter("open", key)
        return self.inner.open(key, limit=limit)

    def stat(self, key: str) -> ObjectInfo:
        self._enter("stat", key)
        return self.inner.stat(key)

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        self._enter("list", prefix)
        return self.inner.list(prefix)

    def put(self, key: str, data: Payload, *, if_absent: bool = False,
            if_version: str | None = None) -> ObjectInfo:
        self._enter("put", key)
        between = self._racy_rule(key) if if_absent or if_version is not None else None
        if between is None:
            return self.inner.put(key, data, if_absent=if_absent, if_version=if_version)
        try:
            version: str | None = self.inner.stat(key).version
        except NotFound:
            version = None
        if if_absent and version is not None:
            raise AlreadyExists(key)
        if if_version is not None and version != if_version:
            raise PreconditionFailed(key)
        between(key)
        return self.inner.put(key, data)

    def delete(self, key: str, *, if_version: str | None = None) -> None:
        self._enter("delete", key)
        self.inner.delete(key, if_version=if_version)

    def touch(self, key: str) -> None:
        self._enter("touch", key)
        self.inner.touch(key)

    def move(self, src: str, dst: str) -> None:
        self._enter("move", src)
        self.inner.move(src, dst)

    def now(self) -> float:
        self._enter("now", "")
        return self.inner.now()

    def free_bytes(self) -> int | None:
        self._enter("free_bytes", "")
        return self.inner.free_bytes()

    def exists(self) -> bool:
        self._enter("exists", "")
        return self.inner.exists()

    def check_alive(self) -> None:
        self._enter("check_alive", "")
        self.inner.check_alive()

    def close(self) -> None:
        self.inner.close()
