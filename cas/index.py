"""A local stat cache (like git's index): remembers which blob each file of a cache directory holds, keyed by its
(size, mtime, inode, ctime), so a save re-hashes only files that changed. It lives inside the directory as
`.cas-index`, is never saved, and is only an optimisation: a missing or corrupt index means "hash everything".
"""
from __future__ import annotations

import logging
import os
import time

import msgpack

from . import limits, localfs, nogc
from .atomic import replace_atomically

log = logging.getLogger("cas.index")

INDEX_NAME = ".cas-index"
# A file modified less than this long before we looked at it may still be being written within one timestamp
# tick (Linux file times advance in jiffies): hash it again next time rather than trust its stat.
RACY_NS = 2_000_000_000

StatKey = tuple[int, int, int, int]  # size, mtime_ns, inode, ctime_ns


def stat_key(st: os.stat_result) -> StatKey:
    return (st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns)


class Index:
    def __init__(self, directory: str | os.PathLike):
        self.path = os.path.join(os.fspath(directory), INDEX_NAME)
        self._entries: dict[str, tuple[StatKey, str]] = {}
        self._dirty = False
        # (manifest, blake3 of its bytes): every entry of this index is recorded identically in that manifest
        # (FORMAT §7). Set only by the no-op check (cas/quick.py) after comparing them all; any change to an entry
        # drops it, so it never vouches for a file that was recorded here after the comparison.
        self.verified: tuple[str, str] | None = None
        self._read()

    def _read(self) -> None:
        try:
            # Not followed if a symlink, never a FIFO (no wait for a writer), bounded: it is only an optimisation.
            data = localfs.read_regular(self.path, limits.MAX_MANIFEST_BYTES)
            if data is None:
                return
            with nogc.paused():  # a few objects per file, no cycles (cas/nogc.py)
                doc = msgpack.unpackb(data, raw=False, max_array_len=5, max_bin_len=32,
                                      max_str_len=limits.MAX_PATH_BYTES, max_map_len=limits.MAX_ENTRIES)
                for rel, (size, mtime, ino, ctime, blob) in doc["entries"].items():
                    self._entries[rel] = ((size, mtime, ino, ctime), blob.hex())
                verified = doc.get("verified")
                if (isinstance(verified, list) and len(verified) == 2
                        and all(isinstance(v, str) for v in verified)):
                    self.verified = (verified[0], verified[1])
        except Exception as exc:  # noqa: BLE001 - an optimisation only: start over
            log.debug("ignoring unreadable index %s: %s", self.path, exc)
            self._entries.clear()

    def lookup(self, rel: str, st: os.stat_result) -> str | None:
        hit = self._entries.get(rel)
        return hit[1] if hit and hit[0] == stat_key(st) else None

    def record(self, rel: str, st: os.stat_result, blob_id: str, *, trusted: bool = False) -> None:
        """Remember `rel` holds `blob_id`. Untrusted (hashed by us) entries modified too recently are not kept."""
        if not trusted and time.time_ns() - st.st_mtime_ns < RACY_NS:
            self._entries.pop(rel, None)
            return
        key = stat_key(st)
        if self._entries.get(rel) != (key, blob_id):
            self._entries[rel] = (key, blob_id)
            self._dirty = True
            self.verified = None  # this entry was never compared with the manifest

    def mark_verified(self, manifest: str, digest: str) -> None:
        """Every entry now held is recorded identically in the manifest `manifest` whose bytes hash to `digest`."""
        if self.verified != (manifest, digest):
            self.verified = (manifest, digest)
            self._dirty = True

    def paths(self) -> set[str]:
        return set(self._entries)

    def retain(self, paths: set[str]) -> None:
        stale = self._entries.keys() - paths
        for rel in stale:
            del self._entries[rel]
        self._dirty |= bool(stale)

    def write(self) -> None:
        if not self._dirty:
            return
        doc: dict = {"format": 1, "entries": {r: [*k, bytes.fromhex(b)] for r, (k, b) in self._entries.items()}}
        if self.verified is not None:
            doc["verified"] = list(self.verified)
        try:
            replace_atomically(self.path, msgpack.packb(doc, use_bin_type=True), fsync=False)
            self._dirty = False
        except OSError as exc:
            log.debug("cannot write index %s: %s", self.path, exc)
