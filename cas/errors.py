"""Typed exceptions of the store. Each names what went wrong and where; callers map them to statuses."""
from __future__ import annotations


class CasError(Exception):
    """Base of every error raised by `cas`."""


class StoreUnavailable(CasError):
    """A store root is missing, unreachable or not a store we can use."""


class StoreReadOnly(StoreUnavailable):
    """A store root exists but cannot be written (read-only mount, permissions)."""


class FormatError(StoreUnavailable):
    """The store declares a format version this code does not speak."""


class ManifestError(CasError):
    """A manifest is truncated, garbage, oversized or violates the format; names the file."""

    def __init__(self, path: object, reason: str):
        super().__init__(f"manifest {path}: {reason}")
        self.path = path
        self.reason = reason


class UnsafePath(CasError):
    """A path would escape the target directory, or is not a legal entry path."""


class BlobMissing(CasError):
    """A blob is in neither blobs/ nor trash/."""


class BlobCorrupt(CasError):
    """A blob's content does not match its id (or its encoding is broken). It has been quarantined."""


class LockTimeout(CasError):
    """A lock (or every save slot) stayed held by a live holder for longer than we may wait."""


class NoSpace(CasError):
    """Not enough free space to finish without filling the disk; nothing partial was left behind."""


class TooLarge(CasError):
    """The tree to save exceeds the configured size cap."""


class OverlappingDirs(CasError):
    """The local cache directory is, contains or lies inside the deployment scope or the store (FORMAT §7)."""
