"""`cas check`: is the store consistent? Reads only, through the storage seam's verbs; never changes the store (no
quarantine, no restore).

Structure: every live root parses, its manifest blob exists and parses (each distinct manifest blob read and fully
validated once, however many roots name it), every blob a manifest references exists in `blobs/`; no stray temp
files, stale locks, foreign files or planted links. `read_data` re-hashes blobs (all, or a `subset`) and checks that
every packed entry's slice of its pack is the file it names.
"""
from __future__ import annotations

import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field

import blake3

from . import layout, limits, pack
from .blobstore import BlobStore
from .errors import BlobCorrupt, BlobMissing, CasError, ManifestError
from .gc import Progress, find_leftovers
from .manifest import Manifest, loads
from .refs import list_roots, read_manifests, reread_young
from .roots import read_root
from .scan import Listing, list_prefix, scan_area
from .scope import Scope
from .storage import Backend, BadObject, NotFound
from .timing import DEFAULT_ROOT_TTL, UNROOTED_AGE

log = logging.getLogger("cas.check")

# Re-hashing is CPU (zstd, blake3; both release the GIL) plus one read per blob on a high-latency volume: a few
# threads keep both busy without starving a model server sharing the pod.
READ_THREADS = 8


@dataclass
class Problem:
    # missing-blob, corrupt-blob, blob-in-trash, unreadable-root, unreadable-manifest, stray-temp, stale-lock,
    # foreign-file, planted (a link, FIFO or device where the layout has a directory or object: never followed), ...
    kind: str
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
    manifests: int = 0  # distinct manifests checked (a manifest named by many roots counts once)
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
        if len(n_s) > 9 or len(m_s) > 9:  # a billion slices is already absurd; int() of 400 digits is not the point
            raise ValueError
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


@dataclass(frozen=True)
class Checked:
    """A fully validated manifest reduced to what check needs: memory per distinct stored blob, not per entry (the
    parallel readers hand these back, so a thousand manifests are never held whole at once)."""

    env_key: str
    entries: int
    stored: dict[str, str]  # stored blob id -> the first entry path (sorted) that needs it, for messages
    packed: dict[str, dict[tuple[str, int, int], str]]  # with read_data: pack -> (file id, size, offset) -> path


def summarize(manifest: Manifest, keep_packs: bool) -> Checked:
    stored: dict[str, str] = {}
    packed: dict[str, dict[tuple[str, int, int], str]] = {}
    for path, entry in sorted(manifest.entries.items()):
        stored.setdefault(entry.stored_id, path)
        if keep_packs and entry.pack is not None:
            packed.setdefault(entry.pack, {}).setdefault((entry.blob_id, entry.size, entry.offset), path)
    return Checked(manifest.env_key, len(manifest.entries), stored, packed)


def _planted(backend: Backend, key: str) -> Problem:
    return Problem("planted", os.path.join(backend.location, key),
                   "not a plain object or directory (a planted link, FIFO or device?): never followed; remove it")


class _Checker:
    """One check's state: what is stored, what is referenced, and the problems found."""

    def __init__(self, store: BlobStore, res: CheckResult):
        self.store, self.res = store, res
        self.blobs: dict[str, int] = {}
        self.trash: dict[str, int] = {}
        self.referenced: set[str] = set()
        self.parsed: set[str] = set()  # manifest content ids already checked
        self.packed: dict[str, dict[tuple[str, int, int], str]] = {}  # pack -> (file id, size, offset) -> who

    def problem(self, kind: str, path: str, detail: str) -> None:
        self.res.problems.append(Problem(kind, path, detail))

    def scan(self, area: str) -> Listing:
        listing = scan_area(self.store, area)
        for key in listing.foreign:
            self.problem("foreign-file", os.path.join(self.store.root, key), "not a blob (name, place or file type)")
        self.res.problems += [_planted(self.store.backend, key) for key in listing.planted]
        return listing

    def manifest(self, checked: Checked, where: str) -> None:
        res = self.res
        res.manifests += 1
        res.entries += checked.entries
        for pack_id, files in checked.packed.items():
            mine = self.packed.setdefault(pack_id, {})
            for located, path in files.items():
                mine.setdefault(located, f"{where}: {path}")
        for stored_id, path in checked.stored.items():
            if stored_id not in self.referenced:
                self.referenced.add(stored_id)
                self.present(stored_id, f"{where}: {path}")

    def present(self, blob_id: str, where: str) -> bool:
        if blob_id in self.blobs:
            return True
        # Not in our listing: it may have been written since. Ask once more before calling it missing.
        store = self.store
        if _exists(store.backend, layout.blob(blob_id)):
            return True
        if blob_id in self.trash or _exists(store.backend, layout.trash(blob_id)):
            self.problem("blob-in-trash", store.trash_path(blob_id),
                         f"{where} references it; the next load, save or gc restores it")
        else:
            self.problem("missing-blob", store.blob_path(blob_id), f"referenced by {where}")
        return False


def _exists(backend: Backend, key: str) -> bool:
    try:
        backend.stat(key)
        return True
    except (NotFound, BadObject):
        return False


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
    now = store.backend.now()
    ck = _Checker(store, res)

    report("scan blobs", 0, 0)
    # A missing blobs/ or trash/ is empty (an object store has no empty prefixes); what references it is then a
    # missing-blob problem.
    listings = {area: ck.scan(area) for area in ("blobs", "trash")}
    ck.blobs = {b.id: b.stored_size for b in listings["blobs"].blobs}
    ck.trash = {b.id: b.stored_size for b in listings["trash"].blobs}
    res.blobs, res.stored_bytes, res.trash = len(ck.blobs), sum(ck.blobs.values()), len(ck.trash)
    quarantined, _ = list_prefix(store.backend, layout.QUARANTINE)
    res.quarantine = sum(1 for i in quarantined if i.kind == "object")

    roots_temp = _check_roots(ck, now, root_ttl, read_data, report)
    if scope is not None:
        _check_scope(ck, scope, now, read_data)
    res.referenced_blobs = len(ck.referenced)

    found = find_leftovers(store, scope, now, [t for listing in listings.values() for t in listing.temp] + roots_temp)
    for item in sorted(found.temp, key=lambda i: i.path):
        ck.problem("stray-temp", item.path, "temp file older than TEMP_EXPIRY (cas gc removes it)")
    for item in sorted(found.locks, key=lambda i: i.path):
        ck.problem("stale-lock", item.path, f"untouched for {now - item.info.mtime:.0f}s (cas gc removes it)")
    res.problems += [_planted(store.backend, key) for key in found.planted]
    if scope is not None:
        res.problems += [_planted(scope.backend, key) for key in found.scope_planted]

    if read_data:
        ids = [b for b in sorted(ck.blobs) if in_subset(b, subset)]
        _read_all(store, ids, ck.blobs, ck.packed, res, report)
    res.problems = _dedup(res.problems)
    res.problems.sort(key=lambda p: (p.kind, p.path))
    res.seconds = time.monotonic() - started
    return res


def _check_roots(ck: _Checker, now: float, root_ttl: float, read_data: bool, report: Progress):
    res, store = ck.res, ck.store
    roots = list_roots(store)
    for text in roots.problems:
        ck.problem("planted", os.path.join(store.root, "roots"), text)
    res.problems += [_planted(store.backend, key) for key in roots.planted]
    for bad in roots.unreadable:
        ck.problem("unreadable-root", bad.path, bad.reason)
    live = []
    for root in roots.roots:
        if root.mtime < now - root_ttl:
            res.roots_dead += 1  # gc removes it; its blobs may already be gone, which is no problem
        else:
            live.append(root)
    live, _ = reread_young(store, live, lambda r: r.manifest not in ck.blobs
                           and not _exists(store.backend, layout.blob(r.manifest)), now)
    res.roots_live = len(live)
    report("roots", 0, len(live))
    present = {r.manifest for r in live if ck.present(r.manifest, f"root {r.scope_id}/{r.env_key} manifest")}
    parsed = read_manifests(store, present, lambda data, mid: summarize(loads(data, f"blob {mid}"), read_data),
                            restore=False)
    for root in live:
        checked = parsed.get(root.manifest)
        if checked is None:
            continue  # reported missing above
        if isinstance(checked, Checked) and checked.env_key != root.env_key:
            checked = ManifestError(f"blob {root.manifest}", f"holds env_key {checked.env_key!r}, root says "
                                                             f"{root.env_key!r}")
        if not isinstance(checked, Checked):
            ck.problem("unreadable-manifest", root.path, str(checked))
            continue
        ck.referenced.add(root.manifest)
        if root.manifest not in ck.parsed:  # each distinct manifest once, however many roots name it
            ck.parsed.add(root.manifest)
            ck.manifest(checked, f"root {root.scope_id}/{root.env_key}")
    report("roots", len(live), len(live))
    return roots.temp


def _check_scope(ck: _Checker, scope: Scope, now: float, read_data: bool) -> None:
    backend = scope.backend
    entries, listing = list_prefix(backend, layout.MANIFESTS)  # a planted manifests/ itself lists nothing
    ck.res.problems += [_planted(backend, key) for key in listing.planted]
    scope_id = scope.existing_scope_id()
    names = sorted(layout.name_of(i.key) for i in entries if i.kind == "object")
    for env_key in filter(None, map(layout.env_key_of_manifest, names)):
        path = scope.manifest_path(env_key)
        try:
            data = scope.read_manifest_bytes(env_key)
            if data is None:
                continue
            digest = blake3.blake3(data).hexdigest()
            if digest not in ck.parsed:  # the same bytes as a root's manifest blob were checked already
                manifest = loads(data, path)
                if manifest.env_key != env_key:
                    raise ManifestError(path, f"holds env_key {manifest.env_key!r}, stored under {env_key!r}")
                ck.parsed.add(digest)
                ck.manifest(summarize(manifest, read_data), f"manifest {path}")
        except (ManifestError, CasError) as exc:
            ck.problem("unreadable-manifest", path, str(exc))
            continue
        unrooted = _unrooted(ck.store, scope, scope_id, env_key, digest, now)
        if unrooted:
            ck.problem("unrooted-manifest", path, unrooted)


def _unrooted(store: BlobStore, scope: Scope, scope_id: str | None, env_key: str, digest: str, now: float) -> str:
    """Why gc cannot see this local manifest, or '' if its root names exactly these bytes."""
    try:
        if scope.backend.stat(layout.manifest(env_key)).mtime > now - UNROOTED_AGE:
            return ""  # a save may be between renaming the manifest and writing the root
    except CasError:
        return ""
    if scope_id is None:
        return "scope.id is missing or unreadable, so no root can name this manifest"
    key = layout.root(scope_id, env_key)
    rpath = os.path.join(store.root, key)
    try:
        root = read_root(store, key)
    except NotFound:
        return (f"no root {rpath} (gc removed it as dead or retired, or a save died before writing it): gc does not "
                f"protect this manifest's blobs")
    except Exception as exc:  # noqa: BLE001 - any unreadable root is reported, never raised
        return f"root {rpath} is unreadable: {exc}"
    if root.manifest != digest:
        return f"root {rpath} names another manifest ({root.manifest[:16]}): gc protects that one's blobs, not these"
    return ""


def _dedup(problems: list[Problem]) -> list[Problem]:
    seen: set[tuple[str, str]] = set()
    out = []
    for p in problems:
        if (p.kind, p.path) not in seen:
            seen.add((p.kind, p.path))
            out.append(p)
    return out


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
        except CasError as exc:
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
