"""Free-space checks: never fill a disk (ours or the volume) with a cache."""
from __future__ import annotations

import os

from .errors import CasError, NoSpace
from .storage import Backend

# Keep this much free after our writes: a model server still needs room for logs, temp files and its own caches.
RESERVE_BYTES = int(os.environ.get("CAS_RESERVE_MB", "256")) << 20  # env override: a test seam for tiny tmpfs volumes


def require_free(directory: str, needed: int, what: str) -> None:
    """Raise NoSpace if writing `needed` bytes under `directory` would leave less than RESERVE_BYTES free.
    Filesystems that cannot report (some FUSE mounts report 0 blocks) are not second-guessed."""
    if needed <= 0:
        return
    try:
        st = os.statvfs(directory)
    except OSError:
        return
    if st.f_blocks == 0:
        return
    free = st.f_bavail * st.f_frsize
    if free - needed < RESERVE_BYTES:
        raise NoSpace(
            f"{what}: {needed / 1e6:.1f} MB needed at {directory}, {free / 1e6:.1f} MB free "
            f"(keeping {RESERVE_BYTES >> 20} MiB in reserve)"
        )


def require_free_bytes(backend: Backend, needed: int, what: str) -> None:
    """require_free for a storage backend: object stores report no limit and are never refused."""
    if needed <= 0:
        return
    try:
        free = backend.free_bytes()
    except CasError:
        return
    if free is None:
        return
    if free - needed < RESERVE_BYTES:
        raise NoSpace(
            f"{what}: {needed / 1e6:.1f} MB needed at {backend.location}, {free / 1e6:.1f} MB free "
            f"(keeping {RESERVE_BYTES >> 20} MiB in reserve)"
        )
