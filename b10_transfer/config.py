"""Settings, read from the environment at call time (not import time) so a model can set them in `load()`.

Every variable of the `b10-transfer` package is honoured with the same name, default, cap and path check; ours are
`B10FS_ORG_CACHE_DIR`, `B10_TRANSFER_IO_THREADS` and `B10FS_VOLUME_ROOT`. `B10FS_CACHE_DIR` and `B10FS_ORG_CACHE_DIR`
may also be `s3://bucket/prefix` URLs (object storage; `Settings.needs_volume` says whether the volume is used).
Invalid values raise `CacheValidationError` naming the variable; the load/save wrappers turn that into
`OperationStatus.ERROR`.
"""

from __future__ import annotations

import getpass
import logging
import os
import re
import tempfile
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from cas.recent import check_family
from cas.s3 import SCHEME as S3_SCHEME
from cas.s3 import parse_s3_url

from .errors import CacheValidationError

logger = logging.getLogger(__name__)

# Where the platform mounts the b10fs volume. Overridable (B10FS_VOLUME_ROOT) only so that tests and the demo can
# stand a local directory in for it: every path check below is made relative to this root, so they keep their meaning
# (a deployment scope must still sit under <root>/model, the org store under <root>/).
DEFAULT_VOLUME_ROOT = "/cache"
# Per-deployment part of the volume; the peer requires B10FS_CACHE_DIR under /cache/model.
MODEL_SUBDIR = "model"
# Per-organization part of the volume, shared by every deployment of the org (dedup across deployments).
ORG_SUBDIR = "org"
# Default leaf names: the peer's deployment directory, and a name of ours for the org-wide blob store.
DEFAULT_SCOPE_LEAF = "compile_cache"
DEFAULT_ORG_LEAF = "b10_cas"
# Store used when <root>/org is not mounted: kept on the deployment volume so saving still works (dedup is then only
# within the deployment, which is all the peer ever had).
FALLBACK_STORE_LEAF = "b10_cas"

# Peer defaults and caps (same numbers so existing deployments behave the same).
DEFAULT_MAX_CACHE_SIZE_MB = 1024  # one cache may not take more than 1 GiB (compressed) of the volume
DEFAULT_MAX_CACHE_SIZE_CAP_MB = 1024  # ceiling on the above, so a typo cannot let one deployment fill the volume
DEFAULT_MAX_CONCURRENT_SAVES = 50  # replicas uploading at once; the rest wait, then skip
MAX_CONCURRENT_SAVES_CAP = 100  # hard ceiling: more writers than this only add contention on the volume
DEFAULT_CLEANUP_LOCK_TIMEOUT_S = 30  # a lock/slot not refreshed for this long belongs to a dead holder
LOCK_TIMEOUT_CAP_S = 3600  # a dead holder may block others for at most an hour, whatever is configured
DEFAULT_CLEANUP_INCOMPLETE_TIMEOUT_S = 60  # a temp file this old was left by a writer that died
INCOMPLETE_TIMEOUT_CAP_S = 7200  # leftovers are reclaimed within two hours at most
DEFAULT_MIN_LOCAL_SPACE_MB = 4096  # local disk is shared with model weights and other writers on the node
DEFAULT_MIN_B10FS_SPACE_MB = 100_000  # the volume is shared by every deployment; never push it near full
DEFAULT_LOCAL_SPACE_MULTIPLIER = 5.0  # peer's slack factor on the bytes a load will write locally

# Ours: threads for blob I/O. 32 measured 10x faster than serial copies on a 2 ms/op network volume; 256 caps the
# file descriptors and threads one call may hold.
DEFAULT_IO_THREADS = 32
IO_THREADS_CAP = 256
# Ours: how long a process waits for another process of this pod that holds the local lock of the same cache
# directory (b10_transfer.pod). Long enough for a large load on a slow volume; a waiter that gives up only repeats
# the load's reads, so the bound costs volume reads, never correctness. 0 turns the coordination off.
DEFAULT_POD_LOCK_TIMEOUT_S = 300
POD_LOCK_TIMEOUT_CAP_S = 3600

# Values BASETEN_FS_ENABLED may take (as the peer); only the first three enable the volume.
_TRUE_VALUES = ("1", "true", "True")
_BOOL_VALUES = (*_TRUE_VALUES, "0", "false", "False", "")

_MIB = 1024 * 1024


@dataclass(frozen=True)
class Settings:
    """Validated settings of one call. Paths are absolute and resolved."""

    b10fs_enabled: bool
    volume_root: Path
    torch_cache_dir: Path
    b10fs_cache_dir: Path | str  # a resolved path on the volume, or an s3://bucket/prefix URL (object storage)
    org_cache_dir: Path | str
    local_work_dir: Path
    max_cache_size_mb: int
    max_cache_size_cap_mb: int
    max_concurrent_saves: int
    cleanup_lock_timeout_s: int
    cleanup_incomplete_timeout_s: int
    min_local_space_mb: int
    min_b10fs_space_mb: int
    local_space_multiplier: float
    io_threads: int
    pod_lock_timeout_s: int = DEFAULT_POD_LOCK_TIMEOUT_S
    cache_family: str | None = None  # B10_TRANSFER_CACHE_FAMILY: warm start from sibling deployments (family.py)

    @property
    def model_mount(self) -> Path:
        """The per-deployment part of the volume; its absence means b10fs is not mounted."""
        return self.volume_root / MODEL_SUBDIR

    @property
    def max_cache_bytes(self) -> int:
        return self.max_cache_size_mb * _MIB

    @property
    def required_b10fs_space_bytes(self) -> int:
        """Free space a save requires on the volume: room for every concurrent saver at full size (peer formula)."""
        return max(self.max_concurrent_saves * self.max_cache_size_mb, self.min_b10fs_space_mb) * _MIB

    def required_local_space_bytes(self, incoming_bytes: int) -> int:
        """Free space a load requires locally for `incoming_bytes` of restored files."""
        return max(int(incoming_bytes * self.local_space_multiplier), self.min_local_space_mb * _MIB)

    @property
    def scope_on_volume(self) -> bool:
        """The deployment scope is a directory on the volume (not an s3:// URL)."""
        return isinstance(self.b10fs_cache_dir, Path)

    @property
    def store_on_volume(self) -> bool:
        return isinstance(self.org_cache_dir, Path)

    @property
    def needs_volume(self) -> bool:
        """Some location lies on the b10fs volume, so BASETEN_FS_ENABLED and the mount are required. With both the
        scope and the org store on object storage nothing is: a pod without any volume works."""
        return self.scope_on_volume or self.store_on_volume

    def store_root(self) -> Path | str:
        """The blob store in use: the org store if its mount exists (or it is an s3:// URL), else the deployment
        fallback."""
        org = self.org_cache_dir
        if isinstance(org, Path) and org.is_relative_to(self.volume_root / ORG_SUBDIR) and not is_dir(
            self.volume_root / ORG_SUBDIR
        ):
            return self.model_mount / FALLBACK_STORE_LEAF
        return org


def is_dir(path: Path) -> bool:
    """`path.is_dir()` (symlinks followed) in one request to a network volume instead of two: an O_PATH open is a
    bare lookup, where stat(2) adds a getattr (slowfs 2 ms: 2.5 ms instead of 4.8 ms)."""
    try:
        fd = os.open(path, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    except (OSError, ValueError):
        return False
    os.close(fd)
    return True


def default_torch_cache_dir() -> str:
    """Inductor's own default (torch._inductor.runtime.cache_dir_utils), so we read where torch.compile writes when
    the variable is unset: /tmp/torchinductor_<user> unless TMPDIR moves the temp directory."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError, ModuleNotFoundError):  # no passwd entry for this uid (common in containers)
        user = f"uid_{os.getuid()}"
    return os.path.join(tempfile.gettempdir(), "torchinductor_" + re.sub(r'[\\/:*?"<>|]', "_", user))


def read_settings(environ: Mapping[str, str] | None = None) -> Settings:
    """Read and validate every setting. Raises CacheValidationError on the first invalid one."""
    env = os.environ if environ is None else environ

    enabled_raw = env.get("BASETEN_FS_ENABLED", "0")
    if enabled_raw not in _BOOL_VALUES:
        raise CacheValidationError(
            f"BASETEN_FS_ENABLED must be one of {sorted(set(_BOOL_VALUES))}, got {enabled_raw!r}")

    volume_root = _volume_root(env.get("B10FS_VOLUME_ROOT", DEFAULT_VOLUME_ROOT))
    home_cache = Path(os.path.expanduser("~/.cache"))
    # Peer's allowed prefixes, plus the (possibly overridden) volume root so a local stand-in works like /cache.
    torch_prefixes = [Path("/tmp"), Path("/cache"), home_cache, Path("/bdn/cache"), volume_root]
    work_prefixes = [Path("/app"), Path("/tmp"), Path("/cache"), volume_root]

    torch_cache_dir = _checked_path(env, "TORCHINDUCTOR_CACHE_DIR", default_torch_cache_dir(), torch_prefixes)
    # A deployment scope or org store may also be an s3://bucket/prefix URL (object storage, docs/configuration.md):
    # the peer's path-prefix checks apply to paths; a URL is checked as a URL.
    scope_dir = _location(
        env, "B10FS_CACHE_DIR", str(volume_root / MODEL_SUBDIR / DEFAULT_SCOPE_LEAF), [volume_root / MODEL_SUBDIR]
    )
    org_dir = _location(
        env, "B10FS_ORG_CACHE_DIR", str(volume_root / ORG_SUBDIR / DEFAULT_ORG_LEAF), [volume_root]
    )
    work_dir = _checked_path(env, "LOCAL_WORK_DIR", "/app", work_prefixes)

    cap_mb = _int(env, "MAX_CACHE_SIZE_CAP_MB", DEFAULT_MAX_CACHE_SIZE_CAP_MB, minimum=1)
    return Settings(
        b10fs_enabled=enabled_raw in _TRUE_VALUES,
        volume_root=volume_root,
        torch_cache_dir=torch_cache_dir,
        b10fs_cache_dir=scope_dir,
        org_cache_dir=org_dir,
        local_work_dir=work_dir,
        max_cache_size_mb=_int(env, "MAX_CACHE_SIZE_MB", DEFAULT_MAX_CACHE_SIZE_MB, minimum=1, cap=cap_mb),
        max_cache_size_cap_mb=cap_mb,
        max_concurrent_saves=_int(
            env, "MAX_CONCURRENT_SAVES", DEFAULT_MAX_CONCURRENT_SAVES, minimum=1, cap=MAX_CONCURRENT_SAVES_CAP
        ),
        cleanup_lock_timeout_s=_int(
            env, "CLEANUP_LOCK_TIMEOUT_SECONDS", DEFAULT_CLEANUP_LOCK_TIMEOUT_S, minimum=1, cap=LOCK_TIMEOUT_CAP_S
        ),
        cleanup_incomplete_timeout_s=_int(
            env,
            "CLEANUP_INCOMPLETE_TIMEOUT_SECONDS",
            DEFAULT_CLEANUP_INCOMPLETE_TIMEOUT_S,
            minimum=1,
            cap=INCOMPLETE_TIMEOUT_CAP_S,
        ),
        min_local_space_mb=_int(env, "MIN_LOCAL_SPACE_MB", DEFAULT_MIN_LOCAL_SPACE_MB, minimum=0),
        min_b10fs_space_mb=_int(env, "MIN_B10FS_SPACE_MB", DEFAULT_MIN_B10FS_SPACE_MB, minimum=0),
        local_space_multiplier=_float(env, "LOCAL_SPACE_ARCHIVE_MULTIPLIER", DEFAULT_LOCAL_SPACE_MULTIPLIER),
        io_threads=_int(env, "B10_TRANSFER_IO_THREADS", DEFAULT_IO_THREADS, minimum=1, cap=IO_THREADS_CAP),
        pod_lock_timeout_s=_int(
            env, "B10_TRANSFER_POD_LOCK_TIMEOUT_S", DEFAULT_POD_LOCK_TIMEOUT_S, minimum=0, cap=POD_LOCK_TIMEOUT_CAP_S
        ),
        cache_family=_family(env.get("B10_TRANSFER_CACHE_FAMILY", "")),
    )


def _family(raw: str) -> str | None:
    """Off when unset or empty; otherwise a name of [A-Za-z0-9._-]{1,64} not starting with '.' (it becomes part of
    a key in the org store)."""
    if raw == "":
        return None
    try:
        return check_family(raw)
    except ValueError as exc:
        raise CacheValidationError(f"B10_TRANSFER_CACHE_FAMILY: {exc}") from None


def _volume_root(raw: str) -> Path:
    _reject_unsafe(raw, "B10FS_VOLUME_ROOT")
    root = _resolve(raw)
    if root == Path(root.anchor):
        # "/" would make every prefix check below pass for any path.
        raise CacheValidationError("B10FS_VOLUME_ROOT must not be the filesystem root")
    return root


def _reject_unsafe(raw: str, name: str) -> None:
    if not raw:
        raise CacheValidationError(f"{name} must not be empty")
    if raw != raw.strip() or ".." in Path(raw).parts or "\x00" in raw:
        raise CacheValidationError(f"{name} contains unsafe path components: {raw!r}")


def _location(env: Mapping[str, str], name: str, default: str, allowed: list[Path]) -> Path | str:
    """A checked path, or for a value starting with s3:// the normalised URL (bucket name and key-safe prefix
    components; credentials, region and endpoint come from the AWS_* variables, never from the URL)."""
    raw = env.get(name, default)
    if raw.startswith(S3_SCHEME):
        try:
            return parse_s3_url(raw).url
        except ValueError as exc:
            raise CacheValidationError(f"{name}: {exc}") from None
    return _checked_path(env, name, default, allowed)


def _checked_path(env: Mapping[str, str], name: str, default: str, allowed: list[Path]) -> Path:
    raw = env.get(name, default)
    _reject_unsafe(raw, name)
    try:
        path = _resolve(os.path.expanduser(raw))
    except (OSError, RuntimeError) as exc:  # RuntimeError: symlink loop
        raise CacheValidationError(f"{name}: cannot resolve {raw!r}: {exc}") from exc
    # Resolve the prefixes too (e.g. /tmp may be a symlink) and compare whole components: /tmpfoo is not /tmp.
    for prefix in allowed:
        if path.is_relative_to(_resolve(str(prefix))):
            return path
    raise CacheValidationError(f"{name} {str(path)!r} must be under one of {[str(p) for p in allowed]}")


def _int(env: Mapping[str, str], name: str, default: int, *, minimum: int, cap: int | None = None) -> int:
    raw = env.get(name)
    if raw is None or raw == "":
        value = default
    else:
        try:
            value = int(raw.strip())
        except ValueError:
            raise CacheValidationError(f"{name} must be an integer, got {raw!r}") from None
    if value < minimum:
        raise CacheValidationError(f"{name} must be >= {minimum}, got {value}")
    if cap is not None and value > cap:
        # Peer behaviour: over-cap values are clamped with a warning, not rejected.
        logger.warning("%s capped at %d (requested %d)", name, cap, value)
        value = cap
    return value


def _float(env: Mapping[str, str], name: str, default: float) -> float:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = float(raw.strip())
    except ValueError:
        raise CacheValidationError(f"{name} must be a number, got {raw!r}") from None
    if not value > 0 or value == float("inf"):
        raise CacheValidationError(f"{name} must be a finite number > 0, got {raw!r}")
    return value


# Resolved paths, per process, keyed on the raw string (after `~` expansion, so a changed HOME or variable is a new
# key). Resolving walks every component with lstat(2): on the volume each is a request (19 of a no-op save's 67 on
# slowfs). Only a path that exists entirely is kept: one that does not yet exist (a scope before the first save
# creates it) is resolved again on every call, so a symlink created there later is seen and checked, not followed
# blindly. What this gives up: a component of an existing resolved path replaced by a symlink *after* the first
# call in this process is not re-checked (resolving on every call only narrowed that race, it could not close it).
_RESOLVED: dict[str, Path] = {}
_RESOLVED_MAX = 256
_resolved_lock = threading.Lock()


def _resolve(raw: str) -> Path:
    """`Path(raw).resolve()` (not strict), remembered per process for paths that exist."""
    hit = _RESOLVED.get(raw)
    if hit is not None:
        return hit
    if not os.path.isabs(raw):  # relative to the working directory, which may change: never remembered
        return Path(raw).resolve()
    try:
        path = Path(raw).resolve(strict=True)
    except OSError:  # missing, not a directory, unreadable, a loop: as before, resolved (or refused) every time
        return Path(raw).resolve()
    with _resolved_lock:
        if len(_RESOLVED) >= _RESOLVED_MAX:
            _RESOLVED.clear()
        _RESOLVED[raw] = path
    return path


def clear_resolved_paths() -> None:
    """Forget the resolved paths (tests that swap a directory for a symlink within one process)."""
    with _resolved_lock:
        _RESOLVED.clear()
