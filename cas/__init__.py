"""A content-addressed store for directories of build artifacts on a shared, possibly slow, network volume or an
S3-compatible object store.

Knows nothing of torch. See docs/FORMAT.md for the contract; every access to the store goes through a `Backend`
(cas/storage.py): `PosixBackend` (cas/posix.py) for a volume, `S3Backend` (cas/s3.py) for a bucket.
"""
from .blobstore import BlobStore
from .errors import (
    BlobCorrupt,
    BlobMissing,
    CasError,
    FormatError,
    LockTimeout,
    ManifestError,
    NoSpace,
    OverlappingDirs,
    StoreReadOnly,
    StoreUnavailable,
    TooLarge,
    UnsafePath,
)
from .load import LoadResult, load_tree
from .lock import LockFile, acquire_slot
from .manifest import Entry, Manifest
from .posix import PosixBackend
from .save import SaveResult, save_tree
from .scope import Scope
from .storage import AlreadyExists, Backend, BadObject, NotFound, ObjectInfo, ObjectTooLarge, PreconditionFailed

__all__ = [
    "BlobStore", "Scope", "Manifest", "Entry", "save_tree", "load_tree", "SaveResult", "LoadResult",
    "LockFile", "acquire_slot", "CasError", "StoreUnavailable", "StoreReadOnly", "FormatError", "ManifestError",
    "UnsafePath", "BlobMissing", "BlobCorrupt", "LockTimeout", "NoSpace", "TooLarge", "OverlappingDirs",
    "Backend", "PosixBackend", "ObjectInfo", "NotFound", "AlreadyExists", "PreconditionFailed", "ObjectTooLarge",
    "BadObject",
]
