"""The storage seam: the handful of verbs through which `cas` reaches the org store and a deployment scope.

Everything in `cas/` that touches the volume (or a bucket) goes through a `Backend`; which keys exist is
`layout.py`'s business, what they mean is docs/FORMAT.md's. Models: restic's `internal/backend` and borgstore's
`BackendBase` - few verbs, each with its contract, layout kept apart from storage.

A backend is rooted at one location (a directory, or a bucket + prefix) and addresses objects by *keys*:
`/`-separated names below that root, validated once here (`check_key`) and mapped to paths or object names only
inside the backend. Values are opaque bytes. The contracts are what both a POSIX volume and an S3-compatible object
store can honour:

- a `put` is all-or-nothing for readers and durable on return;
- `put(if_absent=True)` creates only if no object has the key (one winner among racing creators);
- `put(if_version=v)` / `delete(if_version=v)` act only on the version `v` a previous `stat` returned;
- `touch` makes an object's server-side mtime "now" (POSIX utime; S3 a self-copy);
- `now()` is the server's clock, so no decision ever depends on a client's clock;
- every read is bounded by a `limit` the caller states.

Errors are narrow, one per condition (all `CasError`): `NotFound`, `AlreadyExists`, `PreconditionFailed`,
`ObjectTooLarge`, `BadObject` (something that is not a plain object sits at the key: a FIFO, a directory, a
symlink), `StoreUnavailable` (missing root, dead endpoint, I/O error) and `StoreReadOnly`.
"""
from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import BinaryIO, Literal

from .errors import CasError, StoreUnavailable

# A key is at most this long: far above the layout's longest (`roots/<32 hex>/<128-char env key>.root`), far below
# S3's 1,024-byte object-name limit once a prefix is added.
MAX_KEY_BYTES = 512
_COMPONENT = re.compile(r"[A-Za-z0-9_.-]{1,255}")

Kind = Literal["object", "prefix", "temp", "other"]
# A writer either hands over the bytes, or a function that writes them into the sink the backend provides (a temp
# file on a volume, a spooled buffer or multipart upload on S3): large blobs are compressed straight into it.
Payload = bytes | Callable[[BinaryIO], None]


class NotFound(CasError):
    """No object has this key (or its parent prefix does not exist)."""


class AlreadyExists(CasError):
    """`put(if_absent=True)` found an object at the key."""


class PreconditionFailed(CasError):
    """`put`/`delete(if_version=)` found another version at the key (or none)."""


class ObjectTooLarge(CasError):
    """The object is larger than the limit the caller set for reading it."""


class BadObject(CasError):
    """Something that is not a plain object sits at the key (a FIFO, device, directory or symlink on a volume):
    never followed, never read; callers treat it as corrupt."""


class Unsupported(CasError):
    """The backend cannot do this (e.g. no hard links and no O_EXCL on a strange mount)."""


@dataclass(frozen=True)
class ObjectInfo:
    """What `stat` and `list` report. `mtime` is by the server's clock. `version` changes on every write of the
    key (POSIX: inode, size and mtime_ns; S3: the ETag) and is what `if_version=` compares."""

    key: str
    size: int
    mtime: float
    version: str
    kind: Kind = "object"


def check_key(key: str) -> str:
    """Return `key` if it is a legal key: `/`-separated components of `[A-Za-z0-9_.-]`, none `.` or `..`, at most
    MAX_KEY_BYTES. A prefix given to `list` ends with `/`; an empty prefix is the root."""
    if not isinstance(key, str) or not key or len(key) > MAX_KEY_BYTES:
        raise ValueError(f"invalid storage key {key!r}")
    for part in key.split("/"):
        if part in (".", "..") or not _COMPONENT.fullmatch(part):
            raise ValueError(f"invalid storage key {key!r}")
    return key


def listable(key: str) -> bool:
    """True if a listed entry's `key` (a prefix without its trailing '/') is a legal key. A listing calls anything
    else `other` whatever it is (a file, a directory, a temp name), so nothing built from a listing is an invalid
    key: a planted `locks/a b.lock` or `families/a b/` is left alone, never a ValueError in gc or check. The listed
    prefix is legal already, so only the last component and the length need a look."""
    name = key.rpartition("/")[2]
    return len(key) <= MAX_KEY_BYTES and name not in (".", "..") and _COMPONENT.fullmatch(name) is not None


def check_prefix(prefix: str) -> str:
    if prefix == "":
        return prefix
    if not prefix.endswith("/"):
        raise ValueError(f"a list prefix ends with '/': {prefix!r}")
    check_key(prefix[:-1])
    return prefix


class Backend(ABC):
    """One storage location. Thread-safe: `cas` calls a backend from many threads at once."""

    #: True when `put(if_version=)` is an atomic compare-and-swap that readers never see half done. A POSIX volume
    #: has none (its conditional replace leaves the key absent for an instant), so writers of objects that readers
    #: must always find (manifests) serialise on a lock there instead (FORMAT §3).
    atomic_replace: bool = False
    #: A short description for messages: a path or a URL.
    location: str = ""

    # -- reading ---------------------------------------------------------------------------------------------------
    @abstractmethod
    def get(self, key: str, *, limit: int, offset: int = 0, length: int | None = None) -> bytes:
        """The object's bytes `[offset, offset+length)` (to its end when `length` is None). Raises NotFound,
        BadObject, or ObjectTooLarge when more than `limit` bytes would be returned (checked before reading)."""

    def get_versioned(self, key: str, *, limit: int) -> tuple[bytes, str]:
        """The whole object and the version of exactly those bytes (what a later `put(if_version=)` compares), in
        one request where the backend can (S3: the GET's ETag; a volume: `fstat` of the descriptor read). This
        default takes the version first, then the bytes: an object replaced in between gives a version older than
        the bytes, so a put conditioned on it fails rather than overwriting a version nobody merged. Raises as
        `get`."""
        version = self.stat(key).version
        return self.get(key, limit=limit), version

    @abstractmethod
    def open(self, key: str, *, limit: int) -> BinaryIO:
        """A streaming reader of the whole object (for blobs too large to hold in memory); the caller closes it.
        Raises NotFound, BadObject, or ObjectTooLarge when the object is larger than `limit`."""

    @abstractmethod
    def stat(self, key: str) -> ObjectInfo:
        """Size, server mtime and version of the object. Raises NotFound or BadObject."""

    @abstractmethod
    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        """The entries directly below `prefix` (which ends with '/', or is '' for the root), in no particular
        order: objects (`kind="object"`), sub-prefixes (`kind="prefix"`, key ending '/', size 0), a writer's temp
        objects (`kind="temp"`, for expiry by age) and anything else (`kind="other"`: never followed or read; a
        planted symlink is listed as `other`, never descended into). A missing prefix lists nothing."""

    # -- writing ---------------------------------------------------------------------------------------------------
    @abstractmethod
    def put(self, key: str, data: Payload, *, if_absent: bool = False,
            if_version: str | None = None) -> ObjectInfo:
        """Store `data` at `key`, all-or-nothing for readers and durable on return; returns the new object's info.
        `if_absent`: raise AlreadyExists if an object has the key. `if_version`: raise PreconditionFailed unless the
        object's current version is that one. A callable `data` writes into the sink it is given; an exception it
        raises aborts the put (nothing becomes visible) and propagates. Raises StoreReadOnly, StoreUnavailable, and
        BadObject when something that is not a plain object blocks the key."""

    @abstractmethod
    def delete(self, key: str, *, if_version: str | None = None) -> None:
        """Remove the object. Raises NotFound; with `if_version`, PreconditionFailed if another version is there (the
        object is then left as it is)."""

    @abstractmethod
    def touch(self, key: str) -> None:
        """Make the object's mtime the server's now, content unchanged (it may change the version). Raises NotFound."""

    @abstractmethod
    def move(self, src: str, dst: str) -> None:
        """Give object `src` the key `dst`, replacing any object there. On a volume one atomic rename, keeping mtime;
        on an object store a copy then a delete, so for an instant both keys exist (never neither), and the copy's
        mtime is the time of the move. Raises NotFound if `src` is absent."""

    #: True when writers must call `check_alive` *before* the commit's writes: on a volume a write into one unmounted
    #: mid-save lands, unnoticed, in the bare mount point. False on an object store, where a PUT into a deleted bucket
    #: fails (or, on SeaweedFS, makes a new empty bucket): the check may run alongside the commit's writes, as long
    #: as it passes before a save reports success (and before the gc root names anything).
    check_alive_first: bool = True

    def make_prefix(self, prefix: str) -> None:
        """Make `prefix` exist where the backend has directories (a volume: the store's and scope's own areas, made
        once by their first writer, below the root only); nothing to do on an object store."""

    # -- the server ------------------------------------------------------------------------------------------------
    @abstractmethod
    def now(self) -> float:
        """Now by the server's clock (unix seconds), the clock every mtime is compared with."""

    @abstractmethod
    def free_bytes(self) -> int | None:
        """Space left for writes, or None when the backend has no such limit (object storage)."""

    @abstractmethod
    def exists(self) -> bool:
        """True when the location itself is there (the directory, or the bucket). Never creates it."""

    def check_alive(self) -> None:
        """Raise StoreUnavailable if the location this backend opened is no longer the one at its address (a volume
        unmounted or renamed mid-operation). Writers call it before committing, so a save never reports success
        into a ghost of the store."""

    def close(self) -> None:
        """Release descriptors and connections. The backend may be used again (it reopens)."""


def unavailable(location: str, what: str, exc: BaseException) -> StoreUnavailable:
    detail = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
    return StoreUnavailable(f"{what} at {location}: {detail}")
