"""`cas stats` / `cas du`: what the store holds and who uses it. Reads only.

Raw sizes come from manifests (what a load writes), stored sizes from the blob files (compressed, on the volume).
Deployments are enumerated from the roots, since a pod sees only its own deployment scope.
"""
from __future__ import annotations

import os
import time
from collections import Counter
from dataclasses import asdict, dataclass, field

from . import limits
from .blobstore import BlobStore
from .errors import BlobCorrupt, BlobMissing, ManifestError
from .gc import Progress
from .manifest import loads
from .roots import DEFAULT_ROOT_TTL, iter_roots
from .scan import scan_area


@dataclass
class RootUsage:
    scope_id: str
    scope_path: str
    env_key: str
    live: bool
    last_used: float  # root mtime, server clock
    age_s: float
    entries: int = 0
    raw_bytes: int = 0  # sum of entry sizes: what a load of this manifest writes
    blobs: int = 0  # distinct blobs it references (its manifest blob included)
    stored_bytes: int = 0  # on-disk bytes of those blobs
    exclusive_bytes: int = 0  # on-disk bytes only this root references: what retiring it would free


@dataclass
class Stats:
    blobs: int = 0
    stored_bytes: int = 0  # every file in blobs/
    trash_blobs: int = 0
    trash_bytes: int = 0
    quarantined: int = 0
    roots_live: int = 0
    roots_dead: int = 0
    logical_raw_bytes: int = 0  # sum over live manifests of their raw size
    unique_raw_bytes: int = 0  # raw size of the distinct blobs live manifests reference
    referenced_stored_bytes: int = 0
    unreferenced_blobs: int = 0  # garbage (or young blobs of a save in progress)
    unreferenced_bytes: int = 0
    dedup_ratio: float = 0.0  # logical / unique raw
    compression_ratio: float = 0.0  # unique raw / stored (referenced)
    roots: list[RootUsage] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


def compute(store: BlobStore, *, root_ttl: float = DEFAULT_ROOT_TTL, progress: Progress | None = None) -> Stats:
    started = time.monotonic()
    report = progress or (lambda *_: None)
    st = Stats()
    now = store.server_now()
    report("scan blobs", 0, 0)
    stored = {b.id: b.stored_size for b in scan_area(store, "blobs").blobs}
    st.blobs, st.stored_bytes = len(stored), sum(stored.values())
    trash = scan_area(store, "trash").blobs
    st.trash_blobs, st.trash_bytes = len(trash), sum(b.stored_size for b in trash)
    try:
        st.quarantined = len(os.listdir(os.path.join(store.root, "quarantine")))
    except FileNotFoundError:
        pass

    raw: dict[str, int] = {}  # file content (blob id) -> raw size
    per_root: list[tuple[RootUsage, set[str], set[str]]] = []  # (usage, stored blobs, file contents)
    roots = list(iter_roots(store))
    for i, item in enumerate(roots):
        report("roots", i, len(roots))
        if isinstance(item, tuple):
            st.problems.append(f"unreadable root {item[0]}: {item[1]}")
            continue
        live = item.mtime >= now - root_ttl
        usage = RootUsage(item.scope_id, item.scope_path, item.env_key, live, item.mtime, max(0.0, now - item.mtime))
        ids: set[str] = {item.manifest}
        contents: set[str] = set()
        try:
            data = store.read_bytes(item.manifest, limits.MAX_MANIFEST_BYTES)
            manifest = loads(data, f"blob {item.manifest}")
        except (BlobMissing, BlobCorrupt, ManifestError, OSError) as exc:
            if live:
                st.problems.append(f"root {item.path}: {exc}")
        else:
            usage.entries, usage.raw_bytes = len(manifest.entries), manifest.total_size
            for e in manifest.entries.values():
                ids.add(e.stored_id)  # a pack, for a packed file
                contents.add(e.blob_id)
                raw[e.blob_id] = e.size
        usage.blobs = len(ids)
        usage.stored_bytes = sum(stored.get(b, 0) for b in ids)
        per_root.append((usage, ids, contents))
    report("roots", len(roots), len(roots))

    owners: Counter[str] = Counter()
    live_contents: set[str] = set()
    for usage, ids, contents in per_root:
        if usage.live:
            owners.update(ids)
            live_contents |= contents
    for usage, ids, _ in per_root:
        if usage.live:
            usage.exclusive_bytes = sum(stored.get(b, 0) for b in ids if owners[b] == 1)
            st.roots_live += 1
            st.logical_raw_bytes += usage.raw_bytes
        else:
            st.roots_dead += 1
        st.roots.append(usage)
    st.roots.sort(key=lambda u: (-u.stored_bytes, u.scope_id, u.env_key))

    st.unique_raw_bytes = sum(raw[b] for b in live_contents)
    st.referenced_stored_bytes = sum(stored.get(b, 0) for b in owners)
    unreferenced = [s for b, s in stored.items() if b not in owners]
    st.unreferenced_blobs, st.unreferenced_bytes = len(unreferenced), sum(unreferenced)
    st.dedup_ratio = st.logical_raw_bytes / st.unique_raw_bytes if st.unique_raw_bytes else 0.0
    st.compression_ratio = st.unique_raw_bytes / st.referenced_stored_bytes if st.referenced_stored_bytes else 0.0
    st.seconds = time.monotonic() - started
    return st
