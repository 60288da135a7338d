"""Read-only views of the cache state: `get_cache_info()` and `list_available_caches()`. Neither raises."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from cas import Scope
from cas.errors import CasError
from cas.paths import is_transient

from .config import read_settings
from .core import key_for
from .environment import environment
from .errors import CacheError
from .report import last

logger = logging.getLogger(__name__)

_MB = 1024 * 1024


def get_cache_info() -> dict[str, Any]:
    """Snapshot of local and volume state for this environment.

    Keys of the peer (environment_key, local_cache_exists, b10fs_enabled, b10fs_cache_exists, local_cache_size_mb,
    b10fs_cache_size_mb) plus: environment (this process's environment dict), manifest_files, manifest_size_bytes,
    manifest_environment, manifest_updated, last_load / last_save (the numbers of this process's last calls, or
    None), and error (only when something could not be read).
    """
    info: dict[str, Any] = {"last_load": _last("load"), "last_save": _last("save")}
    try:
        env = environment()
        info["environment"] = env
        info["environment_key"] = key = key_for(None, env)
        s = read_settings()
        torch_dir = s.torch_cache_dir
        files, size = _tree_size(torch_dir)
        info["local_cache_exists"] = files > 0
        info["local_cache_files"] = files
        info["local_cache_size_mb"] = size / _MB
        info["b10fs_enabled"] = s.b10fs_enabled
        info["b10fs_cache_exists"] = False
        if _scope_there(s):
            manifest = Scope(s.b10fs_cache_dir, create=False).read_manifest(key)
            if manifest is not None:
                info["b10fs_cache_exists"] = True
                info["b10fs_cache_size_mb"] = manifest.total_size / _MB
                info["manifest_files"] = len(manifest.entries)
                info["manifest_size_bytes"] = manifest.total_size
                info["manifest_environment"] = dict(manifest.env)
                info["manifest_updated"] = manifest.updated
    except (CacheError, CasError, OSError, ImportError) as exc:
        info["error"] = f"{type(exc).__name__}: {exc}"
    return info


def list_available_caches() -> dict[str, Any]:
    """Every environment with a manifest in this deployment's scope, newest first.

    Each cache: filename (the manifest's name, i.e. its environment key), environment_key, size_mb (raw size of the
    files it lists), files, environment, is_current_environment, created_time, updated_time.
    """
    result: dict[str, Any] = {"caches": [], "total_caches": 0, "current_cache_exists": False}
    try:
        result["current_environment"] = current = key_for()
        s = read_settings()
        result["b10fs_enabled"] = s.b10fs_enabled
        if s.scope_on_volume and not s.b10fs_enabled:
            result["error"] = "b10fs is not enabled"
            return result
        if not _scope_there(s):
            return result
        scope = Scope(s.b10fs_cache_dir, create=False)
        for key in scope.env_keys():
            try:
                manifest = scope.read_manifest(key)
            except CasError as exc:  # one bad manifest must not hide the others
                logger.warning("skipping unreadable manifest %s: %s", key, exc)
                continue
            if manifest is None:
                continue
            result["caches"].append(
                {
                    "filename": key,
                    "environment_key": key,
                    "size_mb": manifest.total_size / _MB,
                    "files": len(manifest.entries),
                    "environment": dict(manifest.env),
                    "is_current_environment": key == current,
                    "created_time": manifest.created,
                    "updated_time": manifest.updated,
                }
            )
        result["caches"].sort(key=lambda c: c["updated_time"], reverse=True)
        result["total_caches"] = len(result["caches"])
        result["current_cache_exists"] = any(c["is_current_environment"] for c in result["caches"])
    except (CacheError, CasError, OSError, ImportError) as exc:
        result["error"] = f"{type(exc).__name__}: {exc}"
    return result


def _last(operation: str) -> dict | None:
    stats = last(operation)
    return stats.as_dict() if stats else None


def _tree_size(root: Path) -> tuple[int, int]:
    """Files and bytes a save would consider: lock files, temp files and the store's local index left out."""
    files = size = 0
    for dirpath, dirs, names in os.walk(root):
        dirs[:] = [d for d in dirs if not is_transient(d)]
        for name in names:
            if is_transient(name):
                continue
            try:
                size += os.lstat(os.path.join(dirpath, name)).st_size
                files += 1
            except OSError:
                continue
    return files, size


def _scope_there(s) -> bool:
    """The deployment scope can be read: an s3:// scope always can be tried; one on the volume when b10fs is enabled
    and its directory exists."""
    scope = s.b10fs_cache_dir
    return not isinstance(scope, Path) or (s.b10fs_enabled and scope.is_dir())
