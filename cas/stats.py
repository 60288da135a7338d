"""`cas stats` / `cas du`: what the store holds and who uses it. Reads only, through the storage seam's verbs.

Raw sizes come from manifests (what a load writes), stored sizes from the blob listing (compressed, on the volume).
Deployments are enumerated from the roots, since a pod sees only its own deployment scope. Each distinct manifest
blob is read and parsed once however many roots name it, and per-root figures are computed once per distinct
manifest, so time and memory grow with distinct blobs, not roots x entries.
"""
from __future__ import annotations

import os
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass, field

from . import layout
from .blobstore import BlobStore
from .gc import Progress
from .refs import ManifestRefs, list_roots, read_manifests, stored_refs
from .scan import list_prefix, scan_area
from .timing import DEFAULT_ROOT_TTL


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
    areas: dict[str, int] = field(default_factory=dict)  # raw bytes per top-level directory of its paths


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
    areas: dict[str, int] = field(default_factory=dict)  # logical_raw_bytes per top-level directory (dynamo/, ...)
    unique_raw_bytes: int = 0  # raw size of the distinct blobs live manifests reference
    referenced_stored_bytes: int = 0
    unreferenced_blobs: int = 0  # garbage (or young blobs of a save in progress)
    unreferenced_bytes: int = 0
    dedup_ratio: float = 0.0  # logical / unique raw
    compression_ratio: float = 0.0  # unique raw / stored (referenced)
    manifests_parsed: int = 0  # distinct manifest blobs read
    roots: list[RootUsage] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


class _Contents:
    """File content id (32 bytes) -> raw size, over the live manifests: distinct blobs, filled by parallel parsers;
    and each manifest's raw bytes per top-level directory."""

    def __init__(self) -> None:
        self.sizes: dict[bytes, int] = {}
        self.areas: dict[str, dict[str, int]] = {}
        self._lock = threading.Lock()

    def parse(self, live: set[str]):
        def one(data: bytes, manifest_id: str) -> ManifestRefs:
            mine: dict[bytes, int] | None = {} if manifest_id in live else None
            areas: dict[str, int] = {}
            refs = stored_refs(data, f"blob {manifest_id}", manifest_id, mine, areas)
            with self._lock:
                self.areas[manifest_id] = areas
                if mine:
                    self.sizes.update(mine)
            return refs
        return one


def compute(store: BlobStore, *, root_ttl: float = DEFAULT_ROOT_TTL, progress: Progress | None = None) -> Stats:
    started = time.monotonic()
    report = progress or (lambda *_: None)
    st = Stats()
    now = store.backend.now()
    report("scan blobs", 0, 0)
    blob_listing, trash_listing = scan_area(store, "blobs"), scan_area(store, "trash")
    stored = {b.id: b.stored_size for b in blob_listing.blobs}
    st.blobs, st.stored_bytes = len(stored), sum(stored.values())
    st.trash_blobs, st.trash_bytes = len(trash_listing.blobs), sum(b.stored_size for b in trash_listing.blobs)
    quarantined, q_listing = list_prefix(store.backend, layout.QUARANTINE)
    st.quarantined = sum(1 for i in quarantined if i.kind == "object")
    planted = blob_listing.planted + trash_listing.planted + q_listing.planted

    roots = list_roots(store)
    planted += roots.planted
    st.problems += roots.problems + [f"planted (never followed): {os.path.join(store.root, k)}" for k in planted]
    st.problems += [f"unreadable root {bad.path}: {bad.reason}" for bad in roots.unreadable]
    live_ids = {r.manifest for r in roots.roots if r.mtime >= now - root_ttl}
    contents = _Contents()
    report("roots", 0, len(roots.roots))
    parsed = read_manifests(store, {r.manifest for r in roots.roots}, contents.parse(live_ids), restore=False)
    st.manifests_parsed = len(parsed)

    good = {m: refs for m, refs in parsed.items() if isinstance(refs, ManifestRefs)}
    live_count: Counter[str] = Counter(r.manifest for r in roots.roots
                                       if r.mtime >= now - root_ttl and r.manifest in good)
    owners: Counter[str] = Counter()  # blob -> live roots keeping it
    for manifest_id, n in live_count.items():
        for b in good[manifest_id].blobs:
            owners[b] += n
    per_manifest: dict[str, tuple[int, int]] = {}  # manifest -> (stored bytes, exclusive bytes if named once)

    for item in roots.roots:
        live = item.mtime >= now - root_ttl
        usage = RootUsage(item.scope_id, item.scope_path, item.env_key, live, item.mtime, max(0.0, now - item.mtime))
        refs = parsed[item.manifest]
        if isinstance(refs, ManifestRefs):
            usage.entries, usage.raw_bytes, usage.blobs = refs.entries, refs.raw_bytes, len(refs.blobs)
            usage.areas = dict(contents.areas.get(item.manifest, {}))
            if item.manifest not in per_manifest:
                per_manifest[item.manifest] = _bytes_of(refs, stored, owners)
            usage.stored_bytes, exclusive = per_manifest[item.manifest]
            usage.exclusive_bytes = exclusive if live else 0
        else:
            usage.blobs, usage.stored_bytes = 1, stored.get(item.manifest, 0)
            if live:
                st.problems.append(f"root {item.path}: {refs}")
        if live:
            st.roots_live += 1
            st.logical_raw_bytes += usage.raw_bytes
            for area, size in usage.areas.items():
                st.areas[area] = st.areas.get(area, 0) + size
        else:
            st.roots_dead += 1
        st.roots.append(usage)
    report("roots", len(roots.roots), len(roots.roots))
    st.roots.sort(key=lambda u: (-u.stored_bytes, u.scope_id, u.env_key))

    st.unique_raw_bytes = sum(contents.sizes.values())
    st.referenced_stored_bytes = sum(stored.get(b, 0) for b in owners)
    unreferenced = [s for b, s in stored.items() if b not in owners]
    st.unreferenced_blobs, st.unreferenced_bytes = len(unreferenced), sum(unreferenced)
    st.dedup_ratio = st.logical_raw_bytes / st.unique_raw_bytes if st.unique_raw_bytes else 0.0
    st.compression_ratio = st.unique_raw_bytes / st.referenced_stored_bytes if st.referenced_stored_bytes else 0.0
    st.seconds = time.monotonic() - started
    return st


def _bytes_of(refs: ManifestRefs, stored: dict[str, int], owners: Counter[str]) -> tuple[int, int]:
    """(stored bytes of the blobs a manifest keeps, the part of them no other live root keeps)."""
    total = exclusive = 0
    for b in refs.blobs:
        size = stored.get(b, 0)
        total += size
        if owners[b] == 1:
            exclusive += size
    return total, exclusive
