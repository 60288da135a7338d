"""Temp files and atomic replacement: the only way a final name comes into being (docs/FORMAT.md §1)."""
from __future__ import annotations

import errno
import os
import re
import secrets
import socket

from .paths import TEMP_PREFIX

_HOST = re.sub(r"[^A-Za-z0-9_.-]", "_", socket.gethostname())[:64] or "host"


def temp_name() -> str:
    """A temp file name unique across hosts, processes and threads; readers ignore the prefix."""
    return f"{TEMP_PREFIX}{_HOST}-{os.getpid()}-{secrets.token_hex(8)}"


def temp_path_beside(path: str) -> str:
    return os.path.join(os.path.dirname(path), temp_name())


def write_all(fd: int, data: bytes | memoryview) -> None:
    """os.write until all of `data` is written (a write may be short)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def write_file(path: str, data: bytes, *, fsync: bool = True, exclusive: bool = True) -> None:
    """Write `data` to a new file at `path` (a temp name), optionally fsynced. Unlinks it on any failure."""
    flags = os.O_WRONLY | os.O_CREAT | (os.O_EXCL if exclusive else os.O_TRUNC)
    fd = os.open(path, flags, 0o644)
    try:
        write_all(fd, data)
        if fsync:
            os.fsync(fd)
    except BaseException:
        os.close(fd)
        _unlink_quietly(path)
        raise
    os.close(fd)


def replace_atomically(path: str, data: bytes, *, fsync: bool = True) -> None:
    """Replace `path` with `data`: temp file in the same directory, fsync, rename. Readers see old or new."""
    tmp = temp_path_beside(path)
    write_file(tmp, data, fsync=fsync)
    try:
        os.rename(tmp, path)
    except BaseException:
        _unlink_quietly(tmp)
        raise


def create_once(path: str, data: bytes) -> bool:
    """Create `path` holding `data` unless it exists. Complete-or-absent even on NFS (temp + link, not O_EXCL on
    the final name, so no reader sees it half written). Returns True if this call created it."""
    tmp = temp_path_beside(path)
    write_file(tmp, data)
    try:
        os.link(tmp, path)
        return True
    except FileExistsError:
        return False
    except OSError as exc:
        # Some FUSE/SMB mounts refuse hard links: fall back to rename if the name is still free (a small race
        # with a concurrent creator, who would write identical-purpose data).
        if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK, errno.ENOSYS):
            raise
        if os.path.exists(path):
            return False
        os.rename(tmp, path)
        return True
    finally:
        _unlink_quietly(tmp)


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass
