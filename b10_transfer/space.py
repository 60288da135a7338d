"""Free-space checks made before writing, so an operation refuses up front instead of filling a disk."""

from __future__ import annotations

import os
from pathlib import Path

from .errors import InsufficientSpace

_MIB = 1024 * 1024


def free_bytes(path: Path) -> int | None:
    """Bytes available to this user on the filesystem that holds `path` (or its nearest existing parent), or None
    when the filesystem does not report its size (some FUSE mounts report 0 blocks): then we do not second-guess."""
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    st = os.statvfs(probe)
    if st.f_blocks == 0:
        return None
    return st.f_bavail * st.f_frsize


def require_free(path: Path, needed: int, what: str) -> None:
    """Raise InsufficientSpace if fewer than `needed` bytes are free at `path`."""
    available = free_bytes(path)
    if available is not None and available < needed:
        raise InsufficientSpace(
            f"not enough free space for {what} at {path}: need {needed / _MIB:.1f} MB, "
            f"have {available / _MIB:.1f} MB"
        )
