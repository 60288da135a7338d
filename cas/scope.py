"""A deployment scope: the manifests of one deployment, one per environment key, with their locks (FORMAT §3)."""
from __future__ import annotations

import hashlib
import os
import re
import secrets
import threading

from . import layout, limits, timing
from .backends import open_location
from .errors import CasError, ManifestError, StoreUnavailable
from .lock import LockFile
from .manifest import Manifest, loads
from .storage import AlreadyExists, Backend, BadObject, NotFound, ObjectTooLarge

MANIFEST_SUFFIX = layout.MANIFEST_SUFFIX
# Object stores: (scope location, env key) -> (MD5 hex, bytes) of the manifest this process last read or wrote
# (Scope.remember_manifest); a few deployments' worth, each a compressed manifest.
_recent: dict[tuple[str, str], tuple[str, bytes]] = {}
_RECENT_KEPT = 8
_RECENT_MAX_BYTES = 8 << 20  # a real manifest is ~1 MB for 20,000 files; larger ones are simply read again
_recent_lock = threading.Lock()
check_env_key = layout.check_env_key
# scope.id is 32 hex digits and a newline; anything longer is not one.
_SCOPE_ID_READ = 256


def read_scope_id(scope: str | os.PathLike | Backend) -> str | None:
    """The id in `<scope>/scope.id` (its first 256 bytes, stripped, 32 lowercase hex digits); None if absent,
    unreadable or malformed. Never creates it."""
    backend = open_location(scope)
    try:
        data = backend.get(layout.SCOPE_ID, limit=_SCOPE_ID_READ, length=_SCOPE_ID_READ)
    except CasError:
        return None
    value = data.decode("ascii", "replace").strip()
    return value if re.fullmatch(r"[0-9a-f]{32}", value) else None


class Scope:
    """One deployment's scope over a storage backend (a directory path is a POSIX volume, an s3:// URL an object
    store: cas/backends.py). `create=True` makes the scope's own directory (one level below an existing parent, never
    more: FORMAT §3); an object store has nothing to make."""

    def __init__(self, root: str | os.PathLike | Backend, *, create: bool = False):
        self.backend: Backend = open_location(root, create=create)
        self.root = self.backend.location
        self.manifests = os.path.join(self.root, "manifests")  # paths for messages and tests
        self.slots = os.path.join(self.root, "slots")
        self._scope_id: str | None = None
        if create:
            # Opens (and on a volume creates) the root and its areas now, so a missing volume fails here, clearly.
            try:
                for area in layout.SCOPE_AREAS:
                    self.backend.make_prefix(area + "/")
            except BadObject as exc:
                raise StoreUnavailable(f"deployment scope {self.root}: {exc}") from None

    def exists(self) -> bool:
        try:
            return any(True for _ in self.backend.list(layout.MANIFESTS))
        except CasError:
            return False

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
            self._scope_id = read_scope_id(self.backend)
        return self._scope_id

    def _read_or_create_id(self) -> str:
        value = read_scope_id(self.backend)
        if value is not None:
            return value
        self.create_scope_id()  # sets the id in force (ours or another writer's), or raises
        assert self._scope_id is not None
        return self._scope_id

    def create_scope_id(self) -> bool:
        """Create scope.id after a read found none (existing_scope_id() was None), without reading it again first.
        Returns True when the id now in force is this call's own and known new: an object store's create-if-absent
        has one winner, so no root can exist under it yet (the save's root write is then a create, FORMAT §3a)."""
        if self._scope_id is not None:
            return False
        mine = secrets.token_hex(16)
        try:
            self.backend.put(layout.SCOPE_ID, (mine + "\n").encode(), if_absent=True)
            # On an object store a create-if-absent has one winner: ours. A volume without hard links falls back to
            # a check-then-rename that two creators can both pass (FORMAT §1): read back who won there.
            if self.backend.atomic_replace:
                self._scope_id = mine
                return True
            value = read_scope_id(self.backend)
        except (AlreadyExists, BadObject):
            # Ours can be what is there: a client that retried a create whose first attempt went in (its answer
            # lost to a 5xx or a reset) is told it exists. The id is random, so finding ours means ours won.
            value = read_scope_id(self.backend)
        if value is None:
            raise StoreUnavailable(f"{self.root}/{layout.SCOPE_ID} is unreadable or not 32 hex digits")
        self._scope_id = value
        return value == mine and self.backend.atomic_replace

    def confirm_scope_id(self) -> bool:
        """Read scope.id again: False (and the id found now in force) when it holds another well-formed id than the
        one this object uses. A server whose conditional writes are check-then-act (moto, and SeaweedFS was seen to)
        can let two racing creates both succeed, and the one that lands last is the deployment's id (FORMAT §3a).
        Unreadable or malformed: True, the id in force stays."""
        found = read_scope_id(self.backend)
        if found is None or found == self._scope_id:
            return True
        self._scope_id = found
        return False

    def renew_scope_id(self, old: str) -> str:
        """Give this scope a fresh identity (FORMAT §4: a scope whose id another scope also uses, a cloned volume).
        Replaces scope.id only if it still holds `old`; returns the id now in force."""
        new = secrets.token_hex(16)
        try:
            info = self.backend.stat(layout.SCOPE_ID)
            if read_scope_id(self.backend) == old:
                self.backend.put(layout.SCOPE_ID, (new + "\n").encode(), if_version=info.version)
        except CasError:
            pass
        self._scope_id = None
        return self.scope_id

    def manifest_path(self, env_key: str) -> str:
        return os.path.join(self.root, layout.manifest(env_key))

    def lock(self, env_key: str, *, timeout: float = timing.MANIFEST_LOCK_TIMEOUT,
             stale_after: float = timing.DEFAULT_STALE_AFTER) -> LockFile:
        return LockFile(self.backend, layout.manifest_lock(env_key), timeout=timeout, stale_after=stale_after)

    def audit_path(self, env_key: str) -> str:
        return os.path.join(self.root, layout.audit(env_key))

    def request_audit(self, env_key: str) -> None:
        """A reader found a blob this manifest references missing or corrupt: ask the next save to re-check every
        entry (FORMAT §3). Best effort: a read-only volume just keeps missing."""
        try:
            self.backend.put(layout.audit(env_key), b"")
        except CasError:
            pass

    def audit_requested(self, env_key: str) -> bool:
        """True when the marker exists. Anything planted there counts as a request (an audit is always safe)."""
        try:
            self.backend.stat(layout.audit(env_key))
            return True
        except NotFound:
            return False
        except BadObject:
            return True

    def clear_audit(self, env_key: str) -> None:
        try:
            self.backend.delete(layout.audit(env_key))
        except (NotFound, BadObject):
            pass

    def env_keys(self) -> list[str]:
        keys = []
        try:
            for info in self.backend.list(layout.MANIFESTS):
                key = layout.env_key_of_manifest(layout.name_of(info.key))
                if info.kind == "object" and key is not None:
                    keys.append(key)
        except (BadObject, NotFound):
            return []
        return sorted(keys)

    def read_manifest_bytes(self, env_key: str, limit: int = limits.MAX_MANIFEST_BYTES) -> bytes | None:
        path = self.manifest_path(env_key)
        try:
            data = self.backend.get(layout.manifest(env_key), limit=limit)
            self.remember_manifest(env_key, data)
            return data
        except NotFound:
            return None
        except BadObject:
            raise ManifestError(path, "not a regular file (a symlink, FIFO or directory?)") from None
        except ObjectTooLarge:
            raise ManifestError(path, f"exceeds the {limit} byte limit") from None

    def read_manifest_versioned(self, env_key: str) -> tuple[bytes | None, str | None]:
        """The manifest's bytes and the version of exactly those bytes (one request: Backend.get_versioned); (None,
        None) when there is none."""
        path = self.manifest_path(env_key)
        try:
            data, version = self.backend.get_versioned(layout.manifest(env_key), limit=limits.MAX_MANIFEST_BYTES)
        except NotFound:
            return None, None
        except BadObject:
            raise ManifestError(path, "not a regular file (a symlink, FIFO or directory?)") from None
        except ObjectTooLarge:
            raise ManifestError(path, f"exceeds the {limits.MAX_MANIFEST_BYTES} byte limit") from None
        self.remember_manifest(env_key, data)
        return data, version

    def remembers_manifest(self, env_key: str) -> bool:
        """True when this process read or wrote this manifest before (object stores only, remember_manifest)."""
        return (self.root, env_key) in _recent

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
        self.backend.put(layout.manifest(env_key), data)

    def remember_manifest(self, env_key: str, data: bytes) -> None:
        """Object store: keep the manifest bytes this process just read or wrote, keyed by their MD5, which is the
        ETag S3 gives a single-part object (not under SSE-KMS/SSE-C: there nothing ever matches). The no-op check
        (cas/quick.py) then recognises a listed ETag without reading the manifest again."""
        if not self.backend.atomic_replace or len(data) > _RECENT_MAX_BYTES:
            return
        with _recent_lock:
            if len(_recent) >= _RECENT_KEPT:
                _recent.clear()
            _recent[(self.root, env_key)] = (hashlib.md5(data, usedforsecurity=False).hexdigest(), data)

    def remembered_manifest(self, env_key: str, version: str) -> bytes | None:
        """The bytes remembered for this manifest if their MD5 is `version` (an ETag, quotes ignored), else None.
        Self-checking: bytes are used only for the ETag they hash to."""
        hit = _recent.get((self.root, env_key))
        return hit[1] if hit is not None and hit[0] == version.strip('"').lower() else None
