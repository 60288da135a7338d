"""`cas check`: is the store consistent? Reads only; never changes the store (no quarantine, no restore).

Structure: every live root parses, its manifest blob exists and parses, every blob a manifest references exists in
`blobs/`; no stray temp files, stale locks or foreign files. `read_data` re-hashes blobs (all, or a `subset`) and
checks that every packed entry's slice of its pack is the file it names.
"""
from __future__ import annotations

import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field

import blake3

from . import limits, pack
from .blobstore import BlobStore
from .errors import BlobCorrupt, BlobMissing, ManifestError, StoreUnavailable
from .gc import LOCK_EXPIRY, Progress, find_old_temp, find_stale_locks, lock_files, temp_dirs
from .load import TEMP_EXPIRY
from .manifest import Manifest, loads
from .paths import TEMP_PREFIX
from .roots import DEFAULT_ROOT_TTL, iter_roots, read_root, root_path
from .scan import Listing, scan_area
from .scope import Scope

log = logging.getLogger("cas.check")

# Re-hashing is CPU (zstd, blake3; both release the GIL) plus one read per blob on a high-latency volume: a few
# threads keep both busy without starving a model server sharing the pod.
READ_THREADS = 8
# A save renames its manifest, then writes the root, seconds apart; a local manifest older than this whose root does
# not name it was left by a save that died in between, or lost its root to gc.
UNROOTED_AGE = 300


@dataclass
class Problem:
    kind: str  # missing-blob, corrupt-blob, blob-in-trash, unreadable-root, unreadable-manifest, stray-temp, ...
    path: str
    detail: str

    def __str__(self) -> str:
        return f"{self.kind}: {self.path}: {self.detail}"


@dataclass
class CheckResult:
    blobs: int = 0
    stored_bytes: int = 0
    trash: int = 0
    quarantine: int = 0
    roots_live: int = 0
    roots_dead: int = 0
    manifests: int = 0
    entries: int = 0
    referenced_blobs: int = 0
    blobs_read: int = 0
    bytes_read: int = 0
    subset: str | None = None
    problems: list[Problem] = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


def parse_subset(text: str) -> tuple[int, int]:
    """'n/m' with 1 <= n <= m: the n-th of m disjoint slices that together cover every blob."""
    try:
        n_s, m_s = text.split("/")
        n, m = int(n_s), int(m_s)
    except ValueError:
        raise ValueError(f"--subset must be n/m, e.g. 1/10; got {text!r}") from None
    if not 1 <= n <= m:
        raise ValueError(f"--subset n/m needs 1 <= n <= m; got {text!r}")
    return n, m


def in_subset(blob_id: str, subset: tuple[int, int] | None) -> bool:
    if subset is None:
        return True
    n, m = subset
    return int(blob_id[:8], 16) % m == n - 1  # by id, so slices are stable across runs and across hosts


def check(
    store: BlobStore,
    *,
    scope: Scope | None = None,
    read_data: bool = False,
    subset: tuple[int, int] | None = None,
    root_ttl: float = DEFAULT_ROOT_TTL,
    progress: Progress | None = None,
) -> CheckResult:
    started = time.monotonic()
    res = CheckResult(subset=f"{subset[0]}/{subset[1]}" if subset else None)
    report = progress or (lambda *_: None)
    now = store.server_now()

    report("scan blobs", 0, 0)
    listings = {area: _scan(store, area, res) for area in ("blobs", "trash")}
    blobs = {b.id: b.stored_size for b in listings["blobs"].blobs}
    trash = {b.id: b.stored_size for b in listings["trash"].blobs}
    res.blobs, res.stored_bytes, res.trash = len(blobs), sum(blobs.values()), len(trash)
    try:
        res.quarantine = sum(1 for n in os.listdir(os.path.join(store.root, "quarantine"))
                             if not n.startswith(TEMP_PREFIX))
    except FileNotFoundError:
        pass

    referenced: set[str] = set()
    packed: dict[str, dict[tuple[str, int, int], str]] = {}  # pack -> (file id, size, offset) -> who names it

    def check_manifest(manifest: Manifest, where: str) -> None:
        res.manifests += 1
        res.entries += len(manifest.entries)
        for path, entry in sorted(manifest.entries.items()):
            if entry.pack is not None:
                packed.setdefault(entry.pack, {}).setdefault((entry.blob_id, entry.size, entry.offset),
                                                             f"{where}: {path}")
            if entry.stored_id in referenced:
                continue
            referenced.add(entry.stored_id)
            _check_present(store, entry.stored_id, blobs, trash, f"{where}: {path}", res)

    roots = list(iter_roots(store))
    for i, item in enumerate(roots):
        report("roots", i, len(roots))
        if isinstance(item, tuple):
            res.problems.append(Problem("unreadable-root", item[0], item[1]))
            continue
        if item.mtime < now - root_ttl:
            res.roots_dead += 1  # gc removes it; its blobs may already be gone, which is no problem
            continue
        res.roots_live += 1
        where = f"root {item.scope_id}/{item.env_key}"
        if not _check_present(store, item.manifest, blobs, trash, f"{where} manifest", res):
            continue
        try:
            manifest = loads(store.read_bytes(item.manifest, limits.MAX_MANIFEST_BYTES), f"blob {item.manifest}")
        except (BlobMissing, BlobCorrupt, ManifestError, OSError) as exc:
            res.problems.append(Problem("unreadable-manifest", item.path, str(exc)))
            continue
        referenced.add(item.manifest)
        check_manifest(manifest, where)
    report("roots", len(roots), len(roots))

    if scope is not None and scope.exists():
        scope_id = scope.existing_scope_id()
        for env_key in scope.env_keys():
            path = scope.manifest_path(env_key)
            try:
                data = scope.read_manifest_bytes(env_key)
                manifest = scope.read_manifest(env_key)
            except (ManifestError, StoreUnavailable) as exc:
                res.problems.append(Problem("unreadable-manifest", path, str(exc)))
                continue
            if manifest is None or data is None:
                continue
            check_manifest(manifest, f"manifest {path}")
            unrooted = _unrooted(store, scope_id, env_key, data, path, now)
            if unrooted:
                res.problems.append(Problem("unrooted-manifest", path, unrooted))
    res.referenced_blobs = len(referenced)

    temp_cutoff = now - TEMP_EXPIRY
    old_temp = [p for listing in listings.values() for p, m in listing.temp if m < temp_cutoff]
    for path in sorted(old_temp + find_old_temp(temp_dirs(store, scope), temp_cutoff)):
        res.problems.append(Problem("stray-temp", path, "temp file older than TEMP_EXPIRY (cas gc removes it)"))
    for path, mtime in find_stale_locks(lock_files(store, scope), now - LOCK_EXPIRY):
        res.problems.append(Problem("stale-lock", path, f"untouched for {now - mtime:.0f}s (cas gc removes it)"))

    if read_data:
        _read_all(store, [b for b in sorted(blobs) if in_subset(b, subset)], blobs, packed, res, report)
    res.problems.sort(key=lambda p: (p.kind, p.path))
    res.seconds = time.monotonic() - started
    return res


def _unrooted(store: BlobStore, scope_id: str | None, env_key: str, data: bytes, path: str, now: float) -> str:
    """Why gc cannot see this local manifest, or '' if its root names exactly these bytes."""
    try:
        if os.stat(path).st_mtime > now - UNROOTED_AGE:
            return ""  # a save may be between renaming the manifest and writing the root
    except OSError:
        return ""
    if scope_id is None:
        return "scope.id is missing or unreadable, so no root can name this manifest"
    rpath = root_path(store, scope_id, env_key)
    try:
        root = read_root(rpath)
    except FileNotFoundError:
        return (f"no root {rpath} (gc removed it as dead or retired, or a save died before writing it): gc does not "
                f"protect this manifest's blobs")
    except Exception as exc:
        return f"root {rpath} is unreadable: {exc}"
    if root.manifest != blake3.blake3(data).hexdigest():
        return f"root {rpath} names another manifest ({root.manifest[:16]}): gc protects that one's blobs, not these"
    return ""


def _scan(store: BlobStore, area: str, res: CheckResult) -> Listing:
    base = os.path.join(store.root, area)
    if not os.path.isdir(base):
        raise StoreUnavailable(f"{base} is missing: not a store, or a damaged one")
    listing = scan_area(store, area)
    for path in listing.foreign:
        res.problems.append(Problem("foreign-file", path, "not a blob (name, place or file type)"))
    return listing


def _check_present(store, blob_id, blobs, trash, where, res) -> bool:
    if blob_id in blobs:
        return True
    # Not in our listing: it may have been written since. Ask once more before calling it missing.
    if os.path.isfile(store.blob_path(blob_id)):
        return True
    if blob_id in trash or os.path.isfile(store.trash_path(blob_id)):
        res.problems.append(Problem("blob-in-trash", store.trash_path(blob_id),
                                    f"{where} references it; the next load, save or gc restores it"))
    else:
        res.problems.append(Problem("missing-blob", store.blob_path(blob_id), f"referenced by {where}"))
    return False


def _read_all(store: BlobStore, ids: list[str], sizes: dict[str, int], packed: dict, res: CheckResult,
              report) -> None:
    lock = threading.Lock()
    done = 0

    def one(blob_id: str) -> None:
        nonlocal done
        problem = None
        problems: list[Problem] = []
        try:
            if blob_id in packed:
                content = store.read_bytes(blob_id, limits.MAX_PACK_BYTES)  # verified; never quarantines
                for (file_id, size, offset), who in packed[blob_id].items():
                    try:
                        pack.extract(content, file_id, size, offset)
                    except pack.PackEntryCorrupt as exc:
                        problems.append(Problem("misplaced-entry", store.blob_path(blob_id), f"{who}: {exc}"))
            else:
                store.verify(blob_id)
        except BlobCorrupt as exc:
            problem = Problem("corrupt-blob", store.blob_path(blob_id), str(exc))
        except BlobMissing:
            pass  # collected since the listing
        except OSError as exc:
            problem = Problem("unreadable-blob", store.blob_path(blob_id), str(exc))
        with lock:
            done += 1
            res.blobs_read += 1
            res.bytes_read += sizes.get(blob_id, 0)
            if problem:
                res.problems.append(problem)
            res.problems.extend(problems)
            if done % 100 == 0:
                report("read data", done, len(ids))

    with ThreadPoolExecutor(max_workers=READ_THREADS, thread_name_prefix="cas-check") as pool:
        list(pool.map(one, ids))
    report("read data", len(ids), len(ids))
