"""A content-addressed store for directories of build artifacts on a shared, possibly slow, network volume.

Knows nothing of torch. See docs/FORMAT.md for the on-disk contract.
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
    StoreReadOnly,
    StoreUnavailable,
    TooLarge,
    UnsafePath,
)
from .load import LoadResult, load_tree
from .lock import LockFile, acquire_slot
from .manifest import Entry, Manifest
from .save import SaveResult, save_tree
from .scope import Scope

__all__ = [
    "BlobStore", "Scope", "Manifest", "Entry", "save_tree", "load_tree", "SaveResult", "LoadResult",
    "LockFile", "acquire_slot", "CasError", "StoreUnavailable", "StoreReadOnly", "FormatError", "ManifestError",
    "UnsafePath", "BlobMissing", "BlobCorrupt", "LockTimeout", "NoSpace", "TooLarge",
]
