"""Manifests: path -> (blob id, size, mode) for one deployment and environment (docs/FORMAT.md §3).

Parsing treats the bytes as hostile: size and count limits are enforced by the msgpack decoder itself, and any
entry that is not exactly what the format allows rejects the whole manifest.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import msgpack

from . import limits
from .errors import ManifestError, UnsafePath
from .paths import check_entry_path

FORMAT_VERSION = 1
_ID_BYTES = 32


@dataclass(frozen=True)
class Entry:
    blob_id: str  # 64 lowercase hex digits
    size: int
    mode: int  # permission bits only

    def pack(self) -> list:
        return [bytes.fromhex(self.blob_id), self.size, self.mode]


@dataclass
class Manifest:
    env_key: str
    env: dict[str, str] = field(default_factory=dict)
    entries: dict[str, Entry] = field(default_factory=dict)
    created: float = 0.0
    updated: float = 0.0

    @property
    def total_size(self) -> int:
        return sum(e.size for e in self.entries.values())

    def blob_ids(self) -> set[str]:
        return {e.blob_id for e in self.entries.values()}

    def changes_from(self, entries: dict[str, Entry]) -> dict[str, Entry]:
        """The subset of `entries` this manifest does not already hold identically."""
        return {p: e for p, e in entries.items() if self.entries.get(p) != e}

    def merged(self, incoming: dict[str, Entry], env: dict[str, str], now: float | None = None) -> "Manifest":
        """Union with `incoming`; on a path held by both with different content, `incoming` (the newer save) wins."""
        now = time.time() if now is None else now
        entries = dict(self.entries)
        entries.update(incoming)
        return Manifest(self.env_key, dict(env or self.env), entries, self.created or now, now)

    def dumps(self) -> bytes:
        return msgpack.packb(
            {
                "format": FORMAT_VERSION,
                "env_key": self.env_key,
                "env": self.env,
                "created": float(self.created),
                "updated": float(self.updated),
                "entries": {p: e.pack() for p, e in sorted(self.entries.items())},
            },
            use_bin_type=True,
        )


def loads(data: bytes, source: object = "<manifest>") -> Manifest:
    """Parse and validate a manifest. Raises ManifestError naming `source` on any violation."""
    if len(data) > limits.MAX_MANIFEST_BYTES:
        raise ManifestError(source, f"{len(data)} bytes exceeds the {limits.MAX_MANIFEST_BYTES} byte limit")
    if not data:
        raise ManifestError(source, "empty file")
    try:
        doc = msgpack.unpackb(
            data,
            raw=False,
            strict_map_key=True,
            use_list=True,
            max_str_len=limits.MAX_PATH_BYTES,
            max_bin_len=_ID_BYTES,
            max_array_len=3,
            max_map_len=max(limits.MAX_ENTRIES, limits.MAX_ENV_ITEMS),
            object_pairs_hook=_map_without_duplicates,
        )
    except _DuplicateKey as exc:
        raise ManifestError(source, f"duplicate key {exc.args[0]!r}") from None
    except msgpack.ExtraData:
        raise ManifestError(source, "trailing bytes after the manifest") from None
    except (ValueError, msgpack.UnpackException, RecursionError, MemoryError) as exc:
        raise ManifestError(source, f"not a valid msgpack manifest ({type(exc).__name__}: {exc})") from None
    except Exception as exc:  # msgpack raises assorted types on hostile input (e.g. StackError for deep nesting)
        raise ManifestError(source, f"not a valid msgpack manifest ({type(exc).__name__}: {exc})") from None

    if not isinstance(doc, dict):
        raise ManifestError(source, f"top level is {type(doc).__name__}, not a map")
    if doc.get("format") != FORMAT_VERSION:
        raise ManifestError(source, f"format {doc.get('format')!r}, this code reads {FORMAT_VERSION}")
    env_key = doc.get("env_key")
    if not isinstance(env_key, str):
        raise ManifestError(source, "env_key missing or not a string")
    env = doc.get("env", {})
    if not isinstance(env, dict) or len(env) > limits.MAX_ENV_ITEMS or not all(
        isinstance(k, str) and isinstance(v, str) and len(v) <= limits.MAX_ENV_VALUE_BYTES for k, v in env.items()
    ):
        raise ManifestError(source, "env must be a small map of strings")
    created, updated = doc.get("created", 0.0), doc.get("updated", 0.0)
    if not isinstance(created, (int, float)) or not isinstance(updated, (int, float)):
        raise ManifestError(source, "created/updated must be numbers")
    raw_entries = doc.get("entries")
    if not isinstance(raw_entries, dict):
        raise ManifestError(source, "entries missing or not a map")
    if len(raw_entries) > limits.MAX_ENTRIES:
        raise ManifestError(source, f"{len(raw_entries)} entries exceeds the limit of {limits.MAX_ENTRIES}")
    entries: dict[str, Entry] = {}
    for path, value in raw_entries.items():
        try:
            check_entry_path(path)
        except UnsafePath as exc:
            raise ManifestError(source, f"illegal entry: {exc}") from None
        entries[path] = _entry(value, path, source)
    return Manifest(env_key, env, entries, float(created), float(updated))


class _DuplicateKey(Exception):
    pass


def _map_without_duplicates(pairs: list) -> dict:
    result = dict(pairs)
    if len(result) != len(pairs):
        seen = set()
        for key, _ in pairs:
            if key in seen:
                raise _DuplicateKey(key)
            seen.add(key)
    return result


def _entry(value: object, path: str, source: object) -> Entry:
    if not (isinstance(value, list) and len(value) == 3):
        raise ManifestError(source, f"entry {path!r} is not [id, size, mode]")
    blob, size, mode = value
    if not (isinstance(blob, bytes) and len(blob) == _ID_BYTES):
        raise ManifestError(source, f"entry {path!r}: blob id is not {_ID_BYTES} bytes")
    if not (isinstance(size, int) and not isinstance(size, bool) and 0 <= size <= limits.MAX_ENTRY_SIZE):
        raise ManifestError(source, f"entry {path!r}: size {size!r} out of range")
    if not (isinstance(mode, int) and not isinstance(mode, bool) and 0 <= mode <= 0o777):
        raise ManifestError(source, f"entry {path!r}: mode {mode!r} out of range")
    return Entry(blob.hex(), size, mode)
