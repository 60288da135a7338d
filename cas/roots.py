"""GC roots: each deployment's live manifest made visible to a collector running anywhere (FORMAT §4)."""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Iterator

import msgpack

from . import limits
from .atomic import replace_atomically
from .blobstore import BlobStore, is_blob_id

ROOT_SUFFIX = ".root"
# Loads and saves refresh a root at most hourly: enough resolution for a 30-day TTL, one utime per pod-hour.
ROOT_REFRESH = 3600
DEFAULT_ROOT_TTL = 30 * 24 * 3600


@dataclass(frozen=True)
class Root:
    path: str
    scope_id: str
    env_key: str
    manifest: str  # blob id
    scope_path: str
    updated: float
    mtime: float


def root_path(store: BlobStore, scope_id: str, env_key: str) -> str:
    return os.path.join(store.root, "roots", scope_id, env_key + ROOT_SUFFIX)


def write_root(store: BlobStore, scope_id: str, env_key: str, manifest_id: str, scope_path: str) -> None:
    path = root_path(store, scope_id, env_key)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    body = {
        "format": 1,
        "manifest": bytes.fromhex(manifest_id),
        "scope_id": scope_id,
        "env_key": env_key,
        "scope_path": scope_path,
        "updated": time.time(),
    }
    replace_atomically(path, msgpack.packb(body, use_bin_type=True))


def refresh_root(store: BlobStore, scope_id: str, env_key: str) -> bool:
    """Mark the root used, at most once per ROOT_REFRESH. Returns True if it wrote."""
    path = root_path(store, scope_id, env_key)
    try:
        mtime = os.stat(path).st_mtime
        if store.server_now() - mtime < ROOT_REFRESH:
            return False
        os.utime(path, None)
        return True
    except OSError:
        return False  # no root yet (written by the next save) or read-only volume: a refresh is best effort


def parse_root(path: str, data: bytes, mtime: float) -> Root:
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
    return Root(path, fields["scope_id"], fields["env_key"], manifest.hex(), fields["scope_path"], float(updated), mtime)


def read_root(path: str) -> Root:
    """One root record, its mtime being its last use. Raises OSError (FileNotFoundError: none) or, for anything
    that is not a root record, ValueError or msgpack's own errors."""
    with open(path, "rb") as fh:
        mtime = os.fstat(fh.fileno()).st_mtime
        data = fh.read(limits.MAX_SMALL_FILE_BYTES + 1)
    if len(data) > limits.MAX_SMALL_FILE_BYTES:
        raise ValueError("oversized root record")
    root = parse_root(path, data, mtime)
    if not is_blob_id(root.manifest):
        raise ValueError("bad manifest id")
    return root


def iter_roots(store: BlobStore) -> Iterator[Root | tuple[str, str]]:
    """Every root record; an unreadable one is yielded as (path, reason) so gc can refuse to collect."""
    base = os.path.join(store.root, "roots")
    try:
        scopes = sorted(os.listdir(base))
    except FileNotFoundError:
        return
    for scope in scopes:
        if scope.startswith("."):
            continue
        try:
            names = sorted(os.listdir(os.path.join(base, scope)))
        except (NotADirectoryError, FileNotFoundError):
            continue
        for name in names:
            if not name.endswith(ROOT_SUFFIX):
                continue
            path = os.path.join(base, scope, name)
            try:
                yield read_root(path)
            except FileNotFoundError:
                continue
            except Exception as exc:
                yield (path, f"{type(exc).__name__}: {exc}")
