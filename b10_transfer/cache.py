"""The public cache calls of `b10-transfer`: thin wrappers over `core` for the Inductor cache directory."""

from __future__ import annotations

import logging
import shutil

from . import core
from .config import read_settings
from .errors import CacheError
from .status import OperationStatus

logger = logging.getLogger(__name__)


def load_compile_cache() -> OperationStatus:
    """Restore this environment's compile cache from the volume into TORCHINDUCTOR_CACHE_DIR. Never raises.

    SUCCESS: files restored. SKIPPED: everything was already local. DOES_NOT_EXIST: nothing saved yet for this
    environment. ERROR: volume missing/unreadable, invalid settings or the load failed (the log line says why).
    """
    return core.load()[0]


def save_compile_cache() -> OperationStatus:
    """Record newly compiled artifacts of TORCHINDUCTOR_CACHE_DIR on the volume. Never raises.

    SUCCESS: new entries recorded. SKIPPED: nothing new (or every save slot stayed busy). ERROR: otherwise.
    Unlike the peer, an existing cache does not make a save skip: shapes compiled since the last save are added.
    """
    return core.save()[0]


def clear_local_cache() -> bool:
    """Delete the local TORCHINDUCTOR_CACHE_DIR. True if it is gone (or never existed), False on failure."""
    try:
        torch_dir = read_settings().torch_cache_dir
        if torch_dir.exists():
            shutil.rmtree(torch_dir)
        logger.info("cleared local cache %s", torch_dir)
        return True
    except (CacheError, OSError) as exc:
        logger.warning("clearing the local cache failed: %s", exc)
        return False
