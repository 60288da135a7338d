"""Packs: many small files stored as one blob (docs/FORMAT.md §2).

On a network volume every file costs round trips (create, fsync, rename, close on write; lookup, open, read,
close on read) whatever its size, and an Inductor cache is hundreds of files of a few KB. A pack is an ordinary
blob whose content is the concatenation of small files; a manifest entry names the pack and the file's offset in
it. The store, gc and check see only blobs: a pack lives while any manifest entry names it, and dedup of small files
works through the locations other manifests already record (save.py).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import blake3

from . import limits, localfs
from .blobstore import BlobStore
from .tree import LocalFile

# Files up to this size go into packs. Beyond it a file's own transfer time outweighs the ~10 round trips a loose
# blob costs (10 x 2 ms on a slow volume ~ 1 MB at a few hundred MB/s), and a partial load should not have to
# fetch a pack for one large file.
PACK_FILE_MAX = 1 << 20
# A pack's uncompressed content; the reader's bound is limits.MAX_PACK_BYTES (decoded in memory).
PACK_TARGET = limits.MAX_PACK_BYTES


@dataclass
class WrittenPack:
    pack_id: str | None = None  # None: every file changed, nothing written
    offsets: dict[str, int] = field(default_factory=dict)  # blob id -> offset in the pack
    changed: list[str] = field(default_factory=list)  # blob ids whose file no longer hashes as it did
    stored_bytes: int = 0


class PackEntryCorrupt(Exception):
    """A manifest entry's slice of a (verified) pack is not the file the entry describes."""


def plan(files: list[tuple[str, LocalFile]]) -> list[list[tuple[str, LocalFile]]]:
    """Group (blob id, file) pairs into packs of at most PACK_TARGET bytes, in path order: files of one kernel
    directory sit side by side, which is where zstd finds the redundancy a per-file frame cannot use."""
    groups: list[list[tuple[str, LocalFile]]] = []
    current: list[tuple[str, LocalFile]] = []
    size = 0
    for blob_id, f in sorted(files, key=lambda item: item[1].rel):
        if current and size + f.size > PACK_TARGET:
            groups.append(current)
            current, size = [], 0
        current.append((blob_id, f))
        size += f.size
    if current:
        groups.append(current)
    return groups


def write(store: BlobStore, group: list[tuple[str, LocalFile]]) -> WrittenPack:
    """Read the group's files, keep those that are still the files the scan saw and still hash to their id, and
    store their concatenation as one blob. Each file is read once more here (it may have changed, or been swapped
    for a symlink, since it was hashed), so what is stored is checked."""
    out = WrittenPack()
    parts: list[bytes] = []
    offset = 0
    for blob_id, f in group:
        try:
            data = localfs.read_verified(f.path, f.stat)  # the file the scan saw, or FileChanged
        except (OSError, localfs.FileChanged):
            out.changed.append(blob_id)
            continue
        if len(data) != f.size or blake3.blake3(data).hexdigest() != blob_id:
            out.changed.append(blob_id)
            continue
        out.offsets[blob_id] = offset
        parts.append(data)
        offset += len(data)
    if parts:
        out.pack_id, out.stored_bytes = store.put_bytes_sized(b"".join(parts))
    return out


def extract(pack: bytes, blob_id: str, size: int, offset: int) -> bytes:
    """The file an entry names inside a pack's content, verified against the entry's own blob id."""
    data = pack[offset:offset + size]
    if len(data) != size:
        raise PackEntryCorrupt(f"pack holds {len(pack)} bytes, entry wants {size} at {offset}")
    if blake3.blake3(data).hexdigest() != blob_id:
        raise PackEntryCorrupt(f"bytes at {offset} in the pack do not hash to {blob_id}")
    return data

