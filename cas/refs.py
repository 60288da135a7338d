"""What the live roots protect, read once: the roots (in parallel) and each *distinct* manifest blob (in parallel,
parsed once however many roots name it), for gc, check and stats (FORMAT §4, §5).

Memory is proportional to distinct blobs, not roots x entries: a manifest's stored ids are one frozenset shared by
every root that names it, and per-root figures are counts.

gc needs only the stored blob ids of each entry (`stored_refs`), not the validated entries a load builds: full
validation (every path, size and mode) was 87 % of gc's CPU at 300 deployments. The fast path still rejects what is
not a manifest (bad framing, wrong types, a missing or malformed id), because gc must never guess which blobs an
unreadable manifest needs: a manifest that fails here is a problem that stops deletion. What it lets through and a
load would refuse (an illegal path, a size out of range) only keeps blobs alive that no load will ever read.
"""
from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import msgpack

from . import layout, limits
from .blobstore import BlobStore, Decoded
from .errors import BlobCorrupt, BlobMissing, CasError, ManifestError
from .manifest import READABLE_VERSIONS, ZSTD_MAGIC, _decompress
from .roots import Root, parse_root, read_root
from .scan import SCAN_THREADS, list_prefix, parallel_map
from .storage import BadObject, NotFound, ObjectInfo

# Roots and manifests read at once: each is a stat and a read, so on a 2 ms volume or a 20 ms bucket the round trips,
# not bandwidth, set the time; 32 in flight as elsewhere in `cas`.
READERS = SCAN_THREADS
_ID_BYTES = 32


@dataclass(frozen=True)
class ManifestRefs:
    """One manifest blob as gc sees it."""

    id: str
    env_key: str
    stored: frozenset[str]  # the stored blobs its entries need (packs, or files' own blobs); not the manifest itself
    entries: int
    raw_bytes: int

    @property
    def blobs(self) -> frozenset[str]:
        """Everything this manifest keeps alive: its stored blobs and its own blob."""
        return self.stored | {self.id}


@dataclass(frozen=True)
class UnreadableRoot:
    key: str
    path: str
    reason: str
    info: ObjectInfo | None  # its stat, when it had one: a dead root protects nothing, readable or not


@dataclass
class RootListing:
    roots: list[Root] = field(default_factory=list)
    unreadable: list[UnreadableRoot] = field(default_factory=list)
    planted: list[str] = field(default_factory=list)  # keys under roots/ that are links, FIFOs, ...: never read
    temp: list[ObjectInfo] = field(default_factory=list)  # temp objects under roots/ and roots/<scope>/
    prefixes: list[str] = field(default_factory=list)  # roots/<scope-id>/ listed
    problems: list[str] = field(default_factory=list)  # roots/ itself unlistable: no root can be trusted absent


def stored_refs(data: Decoded, source: object, manifest_id: str = "",
                contents: dict[bytes, int] | None = None, areas: dict[str, int] | None = None) -> ManifestRefs:
    """The stored blob ids of a manifest's entries, without building Entry objects (see the module docstring).
    `contents`, if given, receives file blob id (32 bytes) -> size for every entry, and `areas` the sum of entry
    sizes per top-level directory (both for `cas stats`). Raises ManifestError for anything that is not a
    manifest."""
    doc = _unpack(data, source)
    if not isinstance(doc, dict):
        raise ManifestError(source, f"top level is {type(doc).__name__}, not a map")
    version = doc.get("format")
    if isinstance(version, bool) or version not in READABLE_VERSIONS:
        raise ManifestError(source, f"format {version!r}, this code reads {READABLE_VERSIONS}")
    env_key, entries = doc.get("env_key"), doc.get("entries")
    if not isinstance(env_key, str) or not isinstance(entries, dict):
        raise ManifestError(source, "env_key or entries missing or of the wrong type")
    if len(entries) > limits.MAX_ENTRIES:
        raise ManifestError(source, f"{len(entries)} entries exceeds the limit of {limits.MAX_ENTRIES}")
    stored, raw = _entry_ids(entries, version, source, contents)
    if areas is not None:
        _sum_areas(entries, areas)
    return ManifestRefs(manifest_id, env_key, frozenset(b.hex() for b in stored), len(entries), raw)


def _unpack(data: Decoded, source: object) -> object:
    if len(data) > limits.MAX_MANIFEST_BYTES:
        raise ManifestError(source, f"{len(data)} bytes exceeds the {limits.MAX_MANIFEST_BYTES} byte limit")
    if data[:4] == ZSTD_MAGIC:
        data = _decompress(data, source)
    try:
        return msgpack.unpackb(data, raw=False, strict_map_key=True, use_list=False,
                               max_str_len=limits.MAX_PATH_BYTES, max_bin_len=_ID_BYTES, max_array_len=5,
                               max_map_len=max(limits.MAX_ENTRIES, limits.MAX_ENV_ITEMS))
    except Exception as exc:  # noqa: BLE001 - msgpack raises assorted types on hostile input (ExtraData, StackError...)
        raise ManifestError(source, f"not a valid msgpack manifest ({type(exc).__name__}: {exc})") from None


def _entry_ids(entries: dict, version: int, source: object,
               contents: dict[bytes, int] | None) -> tuple[set[bytes], int]:
    """Distinct stored ids (as bytes: hex only for the few distinct ones) and the sum of entry sizes."""
    lengths = (3, 5) if version >= 2 else (3,)
    stored: set[bytes] = set()
    raw = 0
    try:
        for value in entries.values():
            n = len(value)
            if n not in lengths:
                raise ManifestError(source, "an entry is not [id, size, mode] or [id, size, mode, pack, offset]")
            blob, size = value[0], value[1]
            sid = value[3] if n == 5 else blob
            if type(sid) is not bytes or len(sid) != _ID_BYTES or type(blob) is not bytes or len(blob) != _ID_BYTES:
                raise ManifestError(source, "an entry's blob or pack id is not 32 bytes")
            if type(size) is not int:
                raise ManifestError(source, "an entry's size is not an integer")
            stored.add(sid)
            raw += size
            if contents is not None:
                contents[blob] = size
    except (TypeError, KeyError, IndexError):  # an entry that is not an array (a number, a map, ...)
        raise ManifestError(source, "an entry is not an array") from None
    return stored, raw


OTHER_AREA = "(other)"  # top-level names past limits.MAX_STATS_AREAS, and keys that are not text
TOP_LEVEL_FILES = "."  # entries directly in the cache directory


def _sum_areas(entries: dict, areas: dict[str, int]) -> None:
    """Add each entry's size to its top-level directory's sum (entries already validated by _entry_ids)."""
    for path, value in entries.items():
        if isinstance(path, str):
            top, sep, _ = path.partition("/")
            area = top if sep else TOP_LEVEL_FILES
        else:
            area = OTHER_AREA
        if area not in areas and len(areas) >= limits.MAX_STATS_AREAS:
            area = OTHER_AREA
        areas[area] = areas.get(area, 0) + value[1]


# -- reading ---------------------------------------------------------------------------------------------------------
Parse = Callable[[Decoded, str], object]

# A save on an object store puts its root alongside its manifest's blob (FORMAT §3a), so for about a round trip a
# root can name a blob not stored yet. A root this young (by the store's clock) whose manifest blob is missing is read
# again, after a wait longer than a commit takes, before gc or check calls it a problem.
JUST_WRITTEN_S = 60.0
JUST_WRITTEN_WAIT_S = 1.0


def reread_young(store: BlobStore, roots: list[Root], missing: Callable[[Root], bool], now: float,
                 sleep: Callable[[float], None] = time.sleep) -> tuple[list[Root], set[str]]:
    """`roots`, with each one written in the last JUST_WRITTEN_S whose manifest blob is `missing` read again after
    JUST_WRITTEN_WAIT_S (a root deleted meanwhile is dropped; one that cannot be read now is kept as it was), and the
    keys of those read again (their manifests are worth a second read)."""
    young = {r.key for r in roots if now - r.mtime < JUST_WRITTEN_S and missing(r)}
    if not young:
        return roots, young
    sleep(JUST_WRITTEN_WAIT_S)
    out = []
    for root in roots:
        if root.key in young:
            try:
                root = read_root(store, root.key)
            except NotFound:
                continue
            except Exception:  # noqa: BLE001 - unreadable now: judged as first read (msgpack's assorted errors)
                pass
        out.append(root)
    return out, young


def read_manifests(store: BlobStore, ids: set[str], parse: Parse, *, restore: bool,
                   threads: int = READERS) -> dict[str, object]:
    """`parse(bytes, id)` of each manifest blob in `ids`, read `threads` at a time: id -> its result, or the
    CasError that kept it from being read. `restore` brings a blob found only in trash back first (gc: it is live);
    check never changes the store."""

    def one(manifest_id: str) -> object:
        try:
            try:
                data = store.read_bytes(manifest_id, limits.MAX_MANIFEST_BYTES)
            except BlobMissing:
                # Read first, stat (which brings a blob back from trash) only on a miss: a stat before every read
                # was one more round trip per distinct manifest, 2,000 HEADs of gc's ~8,600 requests at N = 1,000
                # on S3, for the rare manifest found in trash.
                if not restore or store.stat(manifest_id) is None:
                    raise
                data = store.read_bytes(manifest_id, limits.MAX_MANIFEST_BYTES)
            return parse(data, manifest_id)
        except (BlobMissing, BlobCorrupt, ManifestError) as exc:
            return exc
        except CasError as exc:  # the volume failed under us: unreadable, reported as such
            return BlobCorrupt(f"manifest blob {manifest_id}: cannot read: {exc}")

    ordered = sorted(ids)
    return dict(zip(ordered, parallel_map(one, ordered, threads), strict=True))


def gc_refs(data: Decoded, manifest_id: str) -> ManifestRefs:
    return stored_refs(data, f"blob {manifest_id}", manifest_id)


def list_roots(store: BlobStore, threads: int = READERS) -> RootListing:
    """Every root record under `roots/<scope-id>/`, read `threads` at a time, in key order. A planted link or FIFO
    is listed as planted, never read; a root removed since the listing is skipped."""
    out = RootListing()
    keys = _root_keys(store, out)

    for item in parallel_map(lambda key: _read_one(store, key), keys, threads):
        if isinstance(item, Root):
            out.roots.append(item)
        elif isinstance(item, UnreadableRoot):
            out.unreadable.append(item)
        elif item is not None:
            out.planted.append(item)  # became a link or FIFO since the listing
    return out


def _root_keys(store: BlobStore, out: RootListing) -> list[str]:
    backend = store.backend
    try:
        top = list(backend.list(layout.ROOTS))
    except BadObject:
        out.problems.append(f"{os.path.join(store.root, 'roots')} is not a directory (a planted link?): no root "
                            f"can be read, so no blob can be judged garbage")
        return []
    scopes = []
    for info in top:
        if info.kind == "prefix" and layout.is_scope_id(layout.name_of(info.key)):
            scopes.append(info.key)
        elif info.kind == "temp":
            out.temp.append(info)
        elif info.kind == "other":
            out.planted.append(info.key)
    out.prefixes = sorted(scopes)
    keys: list[str] = []
    for entries, extra in parallel_map(lambda p: list_prefix(backend, p), out.prefixes):
        out.temp += extra.temp
        out.planted += extra.planted
        keys += [i.key for i in entries if i.kind == "object" and i.key.endswith(layout.ROOT_SUFFIX)]
    out.planted.sort()
    return sorted(keys)


def _read_one(store: BlobStore, key: str) -> Root | UnreadableRoot | str | None:
    """Stat, then read: the version is the stat's, so a root replaced between the two is never deleted by it. A key
    where something that is not a plain object sits is returned as it is (planted); None when it is gone."""
    path = os.path.join(store.root, key)
    info: ObjectInfo | None = None
    try:
        info = store.backend.stat(key)
        data = store.backend.get(key, limit=limits.MAX_SMALL_FILE_BYTES)
        return parse_root(key, data, info.mtime, info.version, path)
    except NotFound:
        return None
    except BadObject:
        return key
    except Exception as exc:  # noqa: BLE001 - msgpack's and parse_root's assorted errors on a garbage record
        return UnreadableRoot(key, path, f"{type(exc).__name__}: {exc}", info)
