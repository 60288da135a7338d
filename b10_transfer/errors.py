"""Exceptions of the public API.

Load and save never let these escape (they return an `OperationStatus`); they are public because callers of the
lower-level helpers and existing code that catches them by name expect them to exist.
"""


class CacheError(Exception):
    """Base class of every error this package raises."""


class CacheValidationError(CacheError):
    """A setting, path or precondition (free space, volume present) failed validation."""


class CacheOperationInterrupted(CacheError):
    """An operation stopped part-way, e.g. because a disk ran short of space; nothing half-written is left."""


class VolumeUnavailable(CacheValidationError):
    """The shared volume (or the directory the settings point at) is absent or not a directory."""


class InsufficientSpace(CacheValidationError):
    """Free space is below what the operation needs (see MIN_LOCAL_SPACE_MB / MIN_B10FS_SPACE_MB)."""
