"""Packs: many small files stored as one blob of several zstd frames (docs/FORMAT.md §2).

On a network volume every file costs round trips (create, fsync, rename, close on write; lookup, open, read,
close on read) whatever its size, and an Inductor cache is hundreds of files of a few KB. A pack is an ordinary
blob whose content is the concatenation of small files, compressed as a run of independent frames of whole files;
a manifest entry names the pack and the file's offset in it, and the manifest records each pack's frame table, so a
reader that needs a few of its files fetches only the frames that hold them. The store, gc and check see only
blobs: a pack lives while any manifest entry names it, and dedup of small files works through the locations other
manifests already record (save.py).
"""
from __future__ import annotations

import itertools
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import blake3

from . import limits, localfs
from .blobstore import BlobStore
from .manifest import FrameTable
from .tree import LocalFile

# Files up to this size go into packs. Beyond it a file's own transfer time outweighs the ~10 round trips a loose
# blob costs (10 x 2 ms on a slow volume ~ 1 MB at a few hundred MB/s), and a partial load should not have to
# fetch a pack for one large file.
PACK_FILE_MAX = 1 << 20
# A pack's uncompressed content; the reader's bound is limits.MAX_PACK_BYTES (decoded in memory).
PACK_TARGET = limits.MAX_PACK_BYTES
# A pack is a run of zstd frames, each of whole files and about this much content, so a partial load fetches and
# decodes only the frames holding the files it misses (FORMAT §2). Smaller frames make those ranges tighter and
# cost compression (every frame starts with an empty window). Measured (docs/benchmarks.md, "Pack frames"), the
# synthetic tree's packs: 256 KiB frames +1.3 % stored, a 10 % partial load fetches 0.50 of the whole packs;
# 128 KiB +0.9 % and 0.39; 512 KiB -0.1 % and 0.83. The real tree's redundancy is longer-range (+159 % at 256 KiB,
# +242 % at 128 KiB), so the larger of the two frames that pay keeps more real packs framed (FRAMING_COST_MAX).
PACK_FRAME_BYTES = 256 << 10
# ... unless the frames together are this much larger than one frame of the whole pack: then it is one frame, read
# whole. Files that repeat each other far apart in path order (a real Inductor cache compiled for three shapes:
# measured +159 % at 256 KiB frames, +61 % even at 1 MiB) lose their redundancy across frames, and a partial load
# would save nothing (it fetches 0.23 MB of frames against the 0.21 MB pack); the synthetic tree costs +1.3 %.
FRAMING_COST_MAX = 0.10


@dataclass
class WrittenPack:
    pack_id: str | None = None  # None: every file changed, nothing written
    offsets: dict[str, int] = field(default_factory=dict)  # blob id -> offset in the pack
    frames: FrameTable | None = None  # the pack's frame table, for its manifest entries
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
        content = b"".join(parts)
        out.pack_id = blake3.blake3(content).hexdigest()
        encoded, out.frames = _encode(store, content, [len(p) for p in parts])
        out.stored_bytes = store.put_encoded(out.pack_id, encoded)
    return out


def _encode(store: BlobStore, content: bytes, sizes: list[int]) -> tuple[bytes, FrameTable | None]:
    """The pack's stored bytes: its frames of whole files, and their table, unless framing costs more than
    FRAMING_COST_MAX over one frame, or the store was made before frames (blobstore.PACK_FRAMES_KEY); then one frame
    and no table (its readers fetch it whole)."""
    runs = frame_runs(sizes)
    if len(runs) == 1 or not store.pack_frames:
        return store.compress_frames([content])[0], None
    cuts = list(itertools.pairwise([*(sum(sizes[:a]) for a, _ in runs), len(content)]))  # content [a, b) per frame
    # Both trials at once (zstd releases the GIL; each thread has its own compressor): a small first save is
    # latency-bound, and this is its CPU between the first wave's reads and the pack's upload.
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="cas-pack-trial") as trial:
        whole = trial.submit(lambda: store.compress_frames([content])[0])
        frames = store.compress_frames([content[a:b] for a, b in cuts])
        single = whole.result()
    if sum(len(f) for f in frames) > len(single) * (1 + FRAMING_COST_MAX):
        return single, None
    return b"".join(frames), FrameTable(tuple((len(f), b - a) for f, (a, b) in zip(frames, cuts, strict=True)))


def frame_runs(sizes: list[int], target: int = PACK_FRAME_BYTES) -> list[tuple[int, int]]:
    """Cut a pack's files (their sizes, in pack order) into runs [a, b) of whole files of about `target` bytes: a
    run ends before the (non-empty) file that would take it past `target`, so a file larger than `target` is a run
    of its own, no run after the first is empty (a reader refuses a table with an empty frame), and any two
    neighbouring runs hold more than `target` together (at most 2 * PACK_TARGET / target + 1 runs)."""
    runs: list[tuple[int, int]] = []
    start = size = 0
    for i, n in enumerate(sizes):
        if i > start and n and size + n > target:
            runs.append((start, i))
            start, size = i, 0
        size += n
    if sizes:
        runs.append((start, len(sizes)))
    return runs


def extract(pack: bytes | bytearray, blob_id: str, size: int, offset: int) -> memoryview:
    """The file an entry names inside a pack's content, verified against the entry's own blob id. A view into the
    pack, not a copy: a load writes it straight out, and the pack is released once its files are written."""
    data = memoryview(pack)[offset:offset + size]
    if len(data) != size:
        raise PackEntryCorrupt(f"pack holds {len(pack)} bytes, entry wants {size} at {offset}")
    if blake3.blake3(data).hexdigest() != blob_id:
        raise PackEntryCorrupt(f"bytes at {offset} in the pack do not hash to {blob_id}")
    return data
