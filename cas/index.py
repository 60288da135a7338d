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
DirKey = tuple[int, int, int]  # a directory's mtime_ns, ctime_ns, inode


def stat_key(st: os.stat_result) -> StatKey:
    return (st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns)


def dir_key(st: os.stat_result) -> DirKey:
    return (st.st_mtime_ns, st.st_ctime_ns, st.st_ino)


def settled(st: os.stat_result, since_ns: int) -> bool:
    """The directory's listing, read after `st` was taken at `since_ns` or later, may be trusted for as long as its
    dir_key stays the same: it last changed more than RACY_NS before. (A listing change within one timestamp tick
    of the stat would leave mtime and ctime as they were; ctime is set by the kernel on every change, mtime too.)"""
    return max(st.st_mtime_ns, st.st_ctime_ns) < since_ns - RACY_NS


class Index:
    def __init__(self, directory: str | os.PathLike):
        self.path = os.path.join(os.fspath(directory), INDEX_NAME)
        self._entries: dict[str, tuple[StatKey, str]] = {}
        self._dirty = False
        # (manifest, blake3 of its bytes): every entry of this index is recorded identically in that manifest
        # (FORMAT §7). Set only by the no-op check (cas/quick.py) after comparing them all; any change to an entry
        # drops it, so it never vouches for a file that was recorded here after the comparison.
        self.verified: tuple[str, str] | None = None
        # Subdirectory (relative path, no trailing '/') -> DirKey of every directory under the root, recorded by the
        # no-op check (cas/dircache.py, FORMAT §7). Its meaning: each directory held, while it had that key, exactly
        # the entries now directly below it, its recorded subdirectories and names a save never takes. So while a
        # directory's key still matches, stat-ing its entries by path stands for listing it. Dropping an entry
        # drops the record (the file may still be there, unlisted). Adding one does not: a name a save or load
        # records in a directory that still has its recorded key was in its listing then, so it was an entry
        # already; a new name is in a directory whose key has changed, which is listed again. Nor does a changed
        # key of an entry: a file rewritten in place leaves its directory's listing as it was.
        self.dirs: dict[str, DirKey] | None = None
        self._read()

    def _read(self) -> None:
        try:
            # Not followed if a symlink, never a FIFO (no wait for a writer), bounded: it is only an optimisation.
            data = localfs.read_regular(self.path, limits.MAX_MANIFEST_BYTES)
            if data is None:
                return
            with nogc.paused():  # a few objects per file, no cycles (cas/nogc.py)
                # Tuples, not lists: a directory's [mtime, ctime, inode] is then its DirKey as read, and tuples
                # are cheaper to build (20,000 entries and as many directories).
                doc = msgpack.unpackb(data, raw=False, use_list=False, max_array_len=5, max_bin_len=32,
                                      max_str_len=limits.MAX_PATH_BYTES, max_map_len=limits.MAX_ENTRIES)
                for rel, (size, mtime, ino, ctime, blob) in doc["entries"].items():
                    self._entries[rel] = ((size, mtime, ino, ctime), blob.hex())
                verified = doc.get("verified")
                if (isinstance(verified, tuple) and len(verified) == 2
                        and all(isinstance(v, str) for v in verified)):
                    self.verified = (verified[0], verified[1])
                self.dirs = _read_dirs(doc.get("dirs"))
        except Exception as exc:  # noqa: BLE001 - an optimisation only: start over
            log.debug("ignoring unreadable index %s: %s", self.path, exc)
            self._entries.clear()
            self.verified = self.dirs = None

    def entries(self) -> dict[str, tuple[StatKey, str]]:
        """path -> (stat key, blob id) of every entry (the index's own map: not to be changed)."""
        return self._entries

    def lookup(self, rel: str, st: os.stat_result) -> str | None:
        hit = self._entries.get(rel)
        return hit[1] if hit and hit[0] == stat_key(st) else None

    def record(self, rel: str, st: os.stat_result, blob_id: str, *, trusted: bool = False) -> None:
        """Remember `rel` holds `blob_id`. Untrusted (hashed by us) entries modified too recently are not kept."""
        if not trusted and time.time_ns() - st.st_mtime_ns < RACY_NS:
            if self._entries.pop(rel, None) is not None:
                self.dirs = None  # one name fewer
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

    def record_dirs(self, dirs: dict[str, DirKey]) -> None:
        """The full walk that just found exactly the entries now held listed these directories (see `dirs`)."""
        if self.dirs != dirs:
            self.dirs = dirs
            self._dirty = True

    def paths(self) -> set[str]:
        return set(self._entries)

    def retain(self, paths: set[str]) -> None:
        stale = self._entries.keys() - paths
        for rel in stale:
            del self._entries[rel]
        if stale:
            self.dirs = None
            self._dirty = True

    def write(self) -> None:
        if not self._dirty:
            return
        doc: dict = {"format": 1, "entries": {r: [*k, bytes.fromhex(b)] for r, (k, b) in self._entries.items()}}
        if self.verified is not None:
            doc["verified"] = list(self.verified)
        if self.dirs is not None:
            doc["dirs"] = {rel: list(key) for rel, key in self.dirs.items()}
        data = msgpack.packb(doc, use_bin_type=True)
        if len(data) > limits.MAX_MANIFEST_BYTES and self.dirs is not None:
            # Over what _read accepts: without the record the entries may still fit (a walk costs less than
            # hashing everything again).
            self.dirs = None
            del doc["dirs"]
            data = msgpack.packb(doc, use_bin_type=True)
        try:
            replace_atomically(self.path, data, fsync=False)
            self._dirty = False
        except OSError as exc:
            log.debug("cannot write index %s: %s", self.path, exc)


def _read_dirs(found: object) -> dict[str, DirKey] | None:
    """The `dirs` record, or None if it is not a map of paths to 3-tuples (written by something else: the next check
    walks and records it again). The three values are not checked one by one (20,000 directories): a value that is
    not a directory's (mtime, ctime, inode) never equals one, which only sends the check to listing it, and a path
    that is not one makes its lstat fail, which sends the check to the walk (cas/quick.py)."""
    if not (isinstance(found, dict) and all(type(rel) is str for rel in found)
            and all(type(key) is tuple and len(key) == 3 for key in found.values())):
        return None
    return found
