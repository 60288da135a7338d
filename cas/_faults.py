"""Crash and delay injection for tests, through named checkpoints in the code (`checkpoint(<point>)`).

- `CAS_KILL_AT=<point>[:<n>]` SIGKILLs this process at the n-th pass (default 1st) through that point.
- `CAS_PAUSE_AT=<point>:<seconds>` sleeps that long at every pass: a test widens a window (a load holding the pod
  lock, say) instead of hoping the scheduler does.

Unset in production, where a checkpoint costs two comparisons.
"""
from __future__ import annotations

import os
import signal
import threading
import time

_SPEC = os.environ.get("CAS_KILL_AT", "")
_POINT, _, _NTH = _SPEC.partition(":")
_remaining = int(_NTH or 1)
_lock = threading.Lock()
_PAUSE_POINT, _, _PAUSE_S = os.environ.get("CAS_PAUSE_AT", "").partition(":")
_PAUSE = float(_PAUSE_S or 0)


def checkpoint(point: str) -> None:
    global _remaining
    if _PAUSE_POINT and point == _PAUSE_POINT:
        time.sleep(_PAUSE)
    if not _POINT or point != _POINT:
        return
    with _lock:
        _remaining -= 1
        if _remaining == 0:
            os.kill(os.getpid(), signal.SIGKILL)
