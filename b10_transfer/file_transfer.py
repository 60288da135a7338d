"""`transfer()`: copy one file to or from the volume, checking free space first and never leaving half a file."""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

from .config import read_settings
from .errors import CacheError
from .space import require_free
from .status import OperationStatus

logger = logging.getLogger(__name__)

# Same marker cas uses for its temp files, so the store's transient-file rules (never saved) cover ours too.
_TEMP_PREFIX = ".tmp-"


def transfer(source: str, dest: str) -> OperationStatus:
    """Copy `source` to `dest` (parents created). SUCCESS, or ERROR with a log line; never raises.

    Free space needed at the destination: MIN_B10FS_SPACE_MB-based when `dest` is on the volume (B10FS_CACHE_DIR),
    else max(size x LOCAL_SPACE_ARCHIVE_MULTIPLIER, MIN_LOCAL_SPACE_MB). The copy goes to a temp file beside
    `dest` and is renamed into place, so readers never see a partial file.
    """
    tmp: Path | None = None
    try:
        s = read_settings()
        src, dst = Path(source), Path(dest)
        if not src.is_file():
            logger.warning("transfer: source %s does not exist", src)
            return OperationStatus.ERROR
        size = src.stat().st_size
        if isinstance(s.b10fs_cache_dir, Path) and dst.absolute().is_relative_to(s.b10fs_cache_dir):
            need = s.required_b10fs_space_bytes
        else:
            need = s.required_local_space_bytes(size)
        dst.parent.mkdir(parents=True, exist_ok=True)
        require_free(dst.parent, need, f"copying {src.name}")
        tmp = dst.parent / f"{_TEMP_PREFIX}{os.getpid()}-{dst.name}"
        with open(src, "rb") as fin, open(tmp, "wb") as fout:
            shutil.copyfileobj(fin, fout, 1 << 20)
            fout.flush()
            os.fsync(fout.fileno())
        shutil.copymode(src, tmp)
        os.replace(tmp, dst)
        tmp = None
        logger.info("transfer status=SUCCESS %s -> %s (%d bytes)", src, dst, size)
        return OperationStatus.SUCCESS
    except (CacheError, OSError) as exc:
        logger.warning("transfer status=ERROR %s -> %s: %s", source, dest, exc)
        return OperationStatus.ERROR
    finally:
        if tmp is not None:
            try:
                tmp.unlink()
            except OSError:
                pass
