"""GC roots: each deployment's live manifest made visible to a collector running anywhere (FORMAT §4)."""
from __future__ import annotations

import os
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import msgpack

from . import layout, limits, timing
from .blobstore import BlobStore
from .errors import CasError
from .storage import BadObject, NotFound, ObjectTooLarge

ROOT_SUFFIX = layout.ROOT_SUFFIX
# Loads and saves refresh a root at most hourly; a root unused for 30 days is dead (cas/timing.py says why).
ROOT_REFRESH = timing.ROOT_REFRESH
DEFAULT_ROOT_TTL = timing.DEFAULT_ROOT_TTL
# Roots read at once by gc, check and stats: each is a stat and a read of a few hundred bytes, so on a 2 ms volume
# or a 20 ms bucket the organisation's size, not bandwidth, sets the time; 32 in flight as elsewhere in `cas`.
ROOT_READERS = 32


@dataclass(frozen=True)
class Root:
    key: str
    scope_id: str
    env_key: str
    manifest: str  # blob id
    scope_path: str
    updated: float
    mtime: float
    version: str = ""
    path: str = ""  # for messages: where it lives


def root_path(store: BlobStore, scope_id: str, env_key: str) -> str:
    return os.path.join(store.root, layout.root(scope_id, env_key))


def encode_root(scope_id: str, env_key: str, manifest_id: str, scope_path: str) -> bytes:
    return msgpack.packb({
        "format": 1,
        "manifest": bytes.fromhex(manifest_id),
        "scope_id": scope_id,
        "env_key": env_key,
        "scope_path": scope_path,
        "updated": time.time(),
    }, use_bin_type=True)


def write_root(store: BlobStore, scope_id: str, env_key: str, manifest_id: str, scope_path: str) -> None:
    store.backend.put(layout.root(scope_id, env_key), encode_root(scope_id, env_key, manifest_id, scope_path))


def refresh_root(store: BlobStore, scope_id: str, env_key: str) -> bool:
    """Mark the root used, at most once per ROOT_REFRESH. Returns True if it wrote."""
    key = layout.root(scope_id, env_key)
    try:
        if store.server_now() - store.backend.stat(key).mtime < ROOT_REFRESH:
            return False
        store.backend.touch(key)
        return True
    except CasError:
        return False  # no root yet (written by the next save) or read-only volume: a refresh is best effort


def parse_root(key: str, data: bytes, mtime: float, version: str = "", path: str = "") -> Root:
    doc = msgpack.unpackb(data, raw=False, max_str_len=4096, max_bin_len=32, max_map_len=16, max_array_len=0)
    if not isinstance(doc, dict) or doc.get("format") != 1:
        raise ValueError("not a format-1 root record")
    manifest = doc.get("manifest")
    if not (isinstance(manifest, bytes) and len(manifest) == 32):
        raise ValueError("manifest id is not 32 bytes")
    fields = {k: doc.get(k) for k in ("scope_id", "env_key", "scope_path")}
    if not all(isinstance(v, str) for v in fields.values()):
        raise ValueError("scope_id, env_key and scope_path must be strings")
    updated = doc.get("updated", 0.0)
    if not isinstance(updated, (int, float)):
        raise ValueError("updated must be a number")
    return Root(key, str(fields["scope_id"]), str(fields["env_key"]), manifest.hex(), str(fields["scope_path"]),
                float(updated), mtime, version, path or key)


def read_root(store: BlobStore, key: str) -> Root:
    """One root record, its mtime being its last use. Raises NotFound when there is none, ValueError (or msgpack's
    own errors) for anything that is not a root record, CasError when it cannot be read."""
    path = os.path.join(store.root, key)
    try:
        info = store.backend.stat(key)
        data = store.backend.get(key, limit=limits.MAX_SMALL_FILE_BYTES)
    except (BadObject, ObjectTooLarge) as exc:
        raise ValueError(f"not a root record: {exc}") from None
    return parse_root(key, data, info.mtime, info.version, path)


def root_keys(store: BlobStore) -> Iterator[str]:
    """The key of every root record, in sorted order. A planted link under roots/ is never followed."""
    try:
        scopes = sorted(i.key for i in store.backend.list(layout.ROOTS) if i.kind == "prefix")
    except (BadObject, NotFound):
        return
    for prefix in scopes:
        if layout.name_of(prefix).startswith("."):
            continue
        try:
            names = sorted(i.key for i in store.backend.list(prefix)
                           if i.kind == "object" and i.key.endswith(ROOT_SUFFIX))
        except (BadObject, NotFound):
            continue
        yield from names


def iter_roots(store: BlobStore, threads: int = ROOT_READERS) -> Iterator[Root | tuple[str, str]]:
    """Every root record, read `threads` at a time, in key order; an unreadable one is yielded as (path, reason) so
    gc can refuse to collect. A root removed since the listing is skipped."""
    keys = list(root_keys(store))

    def one(key: str) -> Root | tuple[str, str] | None:
        try:
            return read_root(store, key)
        except NotFound:
            return None
        except Exception as exc:  # noqa: BLE001 - every kind of unreadable root is reported, never raised
            return (os.path.join(store.root, key), f"{type(exc).__name__}: {exc}")

    if not keys:
        return
    with ThreadPoolExecutor(max_workers=max(1, min(threads, len(keys))), thread_name_prefix="cas-roots") as pool:
        for item in pool.map(one, keys):
            if item is not None:
                yield item
