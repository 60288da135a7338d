"""A deployment scope: the manifests of one deployment, one per environment key, with their locks (FORMAT §3)."""
from __future__ import annotations

import errno
import os
import re
import secrets

from . import limits
from .atomic import create_once, replace_atomically
from .errors import ManifestError, StoreReadOnly, StoreUnavailable
from .lock import LockFile
from .manifest import Manifest, loads

_ENV_KEY = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}")
MANIFEST_SUFFIX = ".manifest"


def check_env_key(env_key: str) -> str:
    if not isinstance(env_key, str) or not _ENV_KEY.fullmatch(env_key):
        raise ValueError(f"invalid environment key {env_key!r}: must match [A-Za-z0-9._-]{{1,128}}, not start with '.'")
    return env_key


def read_scope_id(scope_root: str) -> str | None:
    """The id in `<scope>/scope.id` (its first 256 bytes, stripped, 32 lowercase hex digits); None if absent,
    unreadable or malformed. Never creates it. One open and one read: no fstat, a request on the volume."""
    try:
        fd = os.open(os.path.join(scope_root, "scope.id"), os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        value = os.read(fd, 256).decode("ascii", "replace").strip()
    except OSError:
        return None
    finally:
        os.close(fd)
    return value if re.fullmatch(r"[0-9a-f]{32}", value) else None


class Scope:
    def __init__(self, root: str | os.PathLike, *, create: bool = False):
        self.root = os.path.abspath(os.fspath(root))
        self.manifests = os.path.join(self.root, "manifests")
        self.slots = os.path.join(self.root, "slots")
        self._scope_id: str | None = None
        if create:
            try:
                if not os.path.isdir(os.path.dirname(self.root)):
                    raise StoreUnavailable(f"parent of deployment scope {self.root} does not exist (volume not mounted?)")
                os.makedirs(self.manifests, exist_ok=True)
                os.makedirs(self.slots, exist_ok=True)
            except OSError as exc:
                if exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
                    raise StoreReadOnly(f"cannot create deployment scope {self.root}: {exc.strerror}") from exc
                raise StoreUnavailable(f"cannot create deployment scope {self.root}: {exc.strerror}") from exc

    def exists(self) -> bool:
        return os.path.isdir(self.manifests)

    @property
    def scope_id(self) -> str:
        """This deployment's identity in the org store, created by the first writer. Read once per Scope object (a
        Scope is one operation's view of the deployment): it never changes once written, and a save needs it
        several times, a few round trips each."""
        if self._scope_id is None:
            self._scope_id = self._read_or_create_id()
        return self._scope_id

    def existing_scope_id(self) -> str | None:
        """The id if scope.id exists and is well formed; never creates it (for readers)."""
        if self._scope_id is None:
            self._scope_id = read_scope_id(self.root)
        return self._scope_id

    def _read_or_create_id(self) -> str:
        path = os.path.join(self.root, "scope.id")
        value = read_scope_id(self.root)
        if value is None:
            create_once(path, (secrets.token_hex(16) + "\n").encode())
            value = read_scope_id(self.root)
        if value is None:
            raise StoreUnavailable(f"{path} is unreadable or not 32 hex digits")
        return value

    def manifest_path(self, env_key: str) -> str:
        return os.path.join(self.manifests, check_env_key(env_key) + MANIFEST_SUFFIX)

    def lock(self, env_key: str, *, timeout: float = 60.0, stale_after: float = 30.0) -> LockFile:
        path = os.path.join(self.manifests, check_env_key(env_key) + ".lock")
        return LockFile(path, timeout=timeout, stale_after=stale_after)

    def audit_path(self, env_key: str) -> str:
        return os.path.join(self.manifests, check_env_key(env_key) + ".audit")

    def request_audit(self, env_key: str) -> None:
        """A reader found a blob this manifest references missing or corrupt: ask the next save to re-check every
        entry (FORMAT §3). Best effort: a read-only volume just keeps missing."""
        try:
            os.close(os.open(self.audit_path(env_key), os.O_WRONLY | os.O_CREAT, 0o644))
        except OSError:
            pass

    def audit_requested(self, env_key: str) -> bool:
        return os.path.exists(self.audit_path(env_key))

    def clear_audit(self, env_key: str) -> None:
        try:
            os.unlink(self.audit_path(env_key))
        except FileNotFoundError:
            pass

    def env_keys(self) -> list[str]:
        try:
            names = os.listdir(self.manifests)
        except FileNotFoundError:
            return []
        return sorted(n[: -len(MANIFEST_SUFFIX)] for n in names
                      if n.endswith(MANIFEST_SUFFIX) and _ENV_KEY.fullmatch(n[: -len(MANIFEST_SUFFIX)]))

    def read_manifest_bytes(self, env_key: str) -> bytes | None:
        path = self.manifest_path(env_key)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        except FileNotFoundError:
            return None
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise ManifestError(path, "is a symlink") from None
            raise StoreUnavailable(f"cannot read {path}: {exc.strerror}") from exc
        with open(fd, "rb") as fh:
            st = os.fstat(fh.fileno())
            if not _is_regular(st.st_mode):
                raise ManifestError(path, "not a regular file")
            if st.st_size > limits.MAX_MANIFEST_BYTES:
                raise ManifestError(path, f"{st.st_size} bytes exceeds the {limits.MAX_MANIFEST_BYTES} byte limit")
            return fh.read(limits.MAX_MANIFEST_BYTES + 1)

    def read_manifest(self, env_key: str) -> Manifest | None:
        """The current manifest, or None if there is none. Raises ManifestError if it is corrupt."""
        data = self.read_manifest_bytes(env_key)
        if data is None:
            return None
        path = self.manifest_path(env_key)
        manifest = loads(data, path)
        if manifest.env_key != env_key:
            raise ManifestError(path, f"holds env_key {manifest.env_key!r}, stored under {env_key!r}")
        return manifest

    def write_manifest(self, data: bytes, env_key: str) -> None:
        """Atomic replace; the caller holds the lock and made every referenced blob durable."""
        replace_atomically(self.manifest_path(env_key), data)


def _is_regular(mode: int) -> bool:
    import stat

    return stat.S_ISREG(mode)
