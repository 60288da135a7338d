"""Crash injection for tests: `CAS_KILL_AT=<point>[:<n>]` SIGKILLs this process at the n-th pass (default 1st)
through `checkpoint(<point>)`. Unset in production, where a checkpoint costs one dict lookup."""
from __future__ import annotations

import os
import signal
import threading

_SPEC = os.environ.get("CAS_KILL_AT", "")
_POINT, _, _NTH = _SPEC.partition(":")
_remaining = int(_NTH or 1)
_lock = threading.Lock()


def checkpoint(point: str) -> None:
    global _remaining
    if not _POINT or point != _POINT:
        return
    with _lock:
        _remaining -= 1
        if _remaining == 0:
            os.kill(os.getpid(), signal.SIGKILL)
