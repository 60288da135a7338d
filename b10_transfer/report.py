"""What one load or save did: the numbers, the single INFO summary line, and the last result per operation."""

from __future__ import annotations

import logging
import sys
import threading
from dataclasses import asdict, dataclass

from .status import OperationStatus

# The logger users configure (`logging.getLogger("b10_transfer")`); every summary line goes here, not to a child,
# so one name filters all of them.
logger = logging.getLogger("b10_transfer")

_MB = 1024 * 1024
_handler_lock = threading.Lock()
_last: dict[str, OperationStats] = {}


@dataclass
class OperationStats:
    """Counters of one call. `files`: files in the manifest (load) or in the local cache (save)."""

    operation: str  # "load" or "save"
    status: OperationStatus = OperationStatus.ERROR
    env_key: str | None = None
    files: int = 0
    files_transferred: int = 0  # restored (load) or uploaded as new blobs (save)
    bytes_transferred: int = 0  # raw bytes restored (load) / compressed bytes uploaded (save)
    files_skipped: int = 0  # already present locally (load) / already recorded or already in the store (save)
    bytes_skipped: int | None = None  # raw bytes of the above
    new_entries: int = 0  # save: manifest entries added or changed
    misses: int = 0  # load: entries that could not be restored (corrupt/missing blob); they just recompile
    corrupt: int = 0
    seconds: float = 0.0
    reason: str = ""
    waited_s: float = 0.0  # time spent waiting for another process of this pod on the same directory (pod.py)
    source: str = ""  # load: where the files came from when not only this deployment's manifest (family.py)
    shared_from: int | None = None  # load: pid whose load this call's result is (it read nothing from the volume)

    def as_dict(self) -> dict:
        d = asdict(self)
        d["status"] = self.status.name
        return d


def emit(stats: OperationStats) -> None:
    """Log the one INFO line of a call and remember it for get_cache_info()."""
    _ensure_visible()
    _last[stats.operation] = stats
    verb = "restored" if stats.operation == "load" else "uploaded"
    line = (
        f"{stats.operation} status={stats.status.name} files={stats.files} "
        f"{verb}={stats.files_transferred} ({stats.bytes_transferred / _MB:.2f} MB"
        f"{' compressed' if stats.operation == 'save' else ''}) skipped={stats.files_skipped}"
    )
    if stats.bytes_skipped is not None:
        line += f" ({stats.bytes_skipped / _MB:.2f} MB)"
    if stats.operation == "save":
        line += f" new_entries={stats.new_entries}"
    else:
        line += f" misses={stats.misses}"
    line += f" seconds={stats.seconds:.2f} env={stats.env_key or '-'}"
    if stats.waited_s >= 0.005:
        line += f" waited={stats.waited_s:.2f}"
    if stats.source:
        line += f" source={stats.source}"
    if stats.shared_from is not None:
        line += f" shared_from=pid:{stats.shared_from}"
    if stats.reason:
        line += f" reason={stats.reason}"
    logger.info(line)


def get_b10_logger(name: str) -> logging.Logger:
    """The peer's logger helper, kept for code that calls it: a plain stdlib logger (no colours, no handler of its
    own; the application's logging configuration decides where lines go)."""
    return logging.getLogger(name)


def last(operation: str) -> OperationStats | None:
    return _last.get(operation)


def _ensure_visible() -> None:
    """Make INFO lines visible when the application configured no logging at all (as the peer's prints were).

    If the application has any handler on the root logger, or on ours, it decides; we add nothing.
    """
    with _handler_lock:
        if logger.handlers or logging.getLogger().handlers:
            return
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        logger.addHandler(handler)
        if logger.level == logging.NOTSET:
            logger.setLevel(logging.INFO)
