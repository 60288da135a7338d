"""The local half of the no-op check (cas/quick.py): every file a save would take (tree.walk's rules), each one
vouched for by `.cas-index`, found without listing the tree where the index's directory record allows it
(FORMAT §7, "`.cas-index` directory record").

Listing a directory costs an open, getdents and close; a cache with one directory per file (Inductor's default
layout) has as many directories as files. The record holds each directory's (mtime, ctime, inode) as the last
walk saw it before listing it; a directory whose three values are unchanged holds the same names, because creating,
removing or renaming a name changes them (POSIX). So a check stats every recorded directory and every entry by
path, lists only the root (the index is renamed into it) and the directories that changed, and walks only
directories that are new.

A directory that last changed less than the racy window before the walk began (index.settled) is recorded as
UNSETTLED, which no lstat matches, so a name added within the timestamp tick of its stat is never hidden behind an
unchanged mtime: it is listed by every check until one finds it settled.
"""
from __future__ import annotations

import os
import stat
import time

from . import limits
from .errors import UnsafePath
from .index import DirKey, Index, dir_key, settled
from .paths import check_entry_path, is_transient
from .tree import Unreadable, walk

Hit = tuple[str, str, os.stat_result]  # path, blob id, lstat
Found = tuple[list[Hit], "dict[str, DirKey] | None"]  # the hits, and the record to keep (None: keep the index's)

# The clock a walk's directory stats are judged by (index.settled); tests move it.
clock_ns = time.time_ns
# The recorded values of a directory that changed within the racy window of the walk that recorded it: no lstat has
# them (no inode is 0), so every check lists it until one finds it settled and records its own.
UNSETTLED: DirKey = (0, 0, 0)

_ROOT_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC


class _Changed(Exception):
    """A file is not the indexed one (new, modified, or recorded too recently): the answer is "maybe"."""


class _Walk(Exception):
    """The record cannot be used (gone or swapped mid-check, or not as written): walk the whole tree."""


def local_hits(src: str, index: Index) -> Found | None:
    """(path, blob id, lstat) of every file `tree.scan(src)` would return, from the index alone, and the directory
    record to write (None: nothing to write, either because the index's record holds as it is or because none can
    be kept, see _kept and _recordable). None at the first file the index does not vouch for, or when a directory
    cannot be listed (scan skips it with a warning: save_tree then says so)."""
    try:
        if index.dirs is not None:
            try:
                return _from_record(src, index)
            except _Walk:
                pass
        return _walked(src, index)
    except (_Changed, Unreadable):
        return None


def _walked(src: str, index: Index) -> Found:
    """Every directory listed, each one's stat noted for the record."""
    since = clock_ns()
    hits: list[Hit] = []
    met: dict[str, os.stat_result] = {}
    _walk_into(hits, index, src, "", met)
    return hits, _kept(_recordable(met, since))


def _walk_into(hits: list[Hit], index: Index, path: str, prefix: str, met: dict[str, os.stat_result]) -> None:
    lookup = index.lookup
    # Names are checked only on an index miss: the index records only files a save took, so a hit is valid.
    for rel, _, st in walk(path, validate=False, strict=True, dirs=met, start=prefix):
        blob_id = lookup(rel, st)
        if blob_id is None:
            _miss(rel)
            continue
        hits.append((rel, blob_id, st))


def _miss(rel: str) -> None:
    """A regular file the index does not vouch for: a change, unless scan never takes its name (and says why)."""
    try:
        check_entry_path(rel)
    except UnsafePath:
        return
    raise _Changed(rel)


# -- through the record ------------------------------------------------------------------------------------------------
def _from_record(src: str, index: Index) -> Found:
    dirs = index.dirs
    assert dirs is not None
    since = clock_ns()  # before any directory is stat-ed: those stats may go into the new record
    try:
        fd = os.open(src, _ROOT_FLAGS)
    except OSError:
        raise _Walk from None  # the walk says what is wrong
    try:
        changed = _changed_dirs(fd, dirs)
        if not changed and _root_as_recorded(fd, index.entries(), dirs):
            return _entry_hits(fd, index, None), None  # the common case: nothing listed but the root
        return _repaired(src, fd, index, changed, since)
    except (OSError, TypeError, ValueError):
        # Gone or swapped since its directory was checked (a race), or a record that is not as written (a path
        # that is not a string, or holds a NUL): the walk decides.
        raise _Walk from None
    finally:
        os.close(fd)


def _changed_dirs(fd: int, dirs: dict[str, DirKey]) -> dict[str, os.stat_result | None]:
    """Recorded directory -> its lstat now (None if it cannot be stat-ed), for each one whose (mtime, ctime, inode)
    is not the recorded one or that is no longer a directory. All of them are stat-ed before any entry is, so a
    directory swapped for a symlink shows here, never as an entry read through the link."""
    lstat, isdir = os.lstat, stat.S_ISDIR
    changed: dict[str, os.stat_result | None] = {}
    for rel, key in dirs.items():
        try:
            st = lstat(rel, dir_fd=fd)
        except (FileNotFoundError, NotADirectoryError):
            changed[rel] = None  # gone, or a component is no longer a directory
            continue
        if (st.st_mtime_ns, st.st_ctime_ns, st.st_ino) != key or not isdir(st.st_mode):
            changed[rel] = st
    return changed


def _root_as_recorded(fd: int, entries: dict, dirs: dict[str, DirKey]) -> bool:
    """The root directory (descriptor `fd`) holds exactly the top-level entries and recorded subdirectories, besides
    names a save never takes."""
    files = {rel for rel in entries if "/" not in rel}
    subdirs = {rel for rel in dirs if "/" not in rel}
    seen_files = seen_dirs = 0
    with os.scandir(fd) as it:
        for entry in it:
            name = entry.name
            if is_transient(name):
                continue
            if entry.is_dir(follow_symlinks=False):
                if name not in subdirs:
                    return False
                seen_dirs += 1
            elif entry.is_file(follow_symlinks=False):
                if name not in files:
                    try:
                        check_entry_path(name)
                    except UnsafePath:
                        continue  # never taken (scan says why)
                    return False
                seen_files += 1
            # symlinks and other non-regular files: never taken
    return seen_files == len(files) and seen_dirs == len(subdirs)


def _entry_hits(fd: int, index: Index, parents: set[str] | None) -> list[Hit]:
    """The hit of each entry (of those directly below `parents`, or all of them), by lstat of its path from the
    root's descriptor. Raises _Changed at the first one whose stat is not the indexed one."""
    lstat = os.lstat
    hits: list[Hit] = []
    for rel, (want, blob_id) in index.entries().items():
        if parents is not None and rel.rpartition("/")[0] not in parents:
            continue
        st = lstat(rel, dir_fd=fd)
        if (st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns) != want:
            raise _Changed(rel)
        hits.append((rel, blob_id, st))
    return hits


def _repaired(src: str, fd: int, index: Index, changed: dict[str, os.stat_result | None], since: int) -> Found:
    """Some directories changed: take the unchanged ones' files from the record, list the root and the changed
    ones (stat-ed before their listing, in _changed_dirs), walk the new ones, and make the record anew."""
    dirs = index.dirs
    assert dirs is not None
    unchanged, relisted = _reached(dirs, changed)
    hits = _entry_hits(fd, index, unchanged)
    met: dict[str, os.stat_result] = {}
    new_dirs: list[tuple[str, str]] = []
    for rel in ["", *relisted]:
        if rel:
            met[rel] = relisted[rel]
        _relist(hits, index, src, rel, unchanged, relisted, new_dirs)
    for rel, path in new_dirs:
        _walk_into(hits, index, path, rel + "/", met)
    fresh = _recordable(met, since)
    if fresh is None:
        return hits, None
    fresh.update((rel, dirs[rel]) for rel in unchanged)
    return hits, (None if fresh == dirs else _kept(fresh))  # None: nothing to write


def _reached(dirs: dict[str, DirKey], changed: dict[str, os.stat_result | None],
             ) -> tuple[set[str], dict[str, os.stat_result]]:
    """(unchanged recorded directories, changed ones -> lstat) still reached from the root through directories:
    one below a directory that is gone or no longer one is not part of the tree any more."""
    unchanged: set[str] = set()
    relisted: dict[str, os.stat_result] = {}
    for rel in sorted(dirs):  # a parent sorts before its children (it is their prefix)
        parent = rel.rpartition("/")[0]
        if parent and parent not in unchanged and parent not in relisted:
            continue
        if rel not in changed:
            unchanged.add(rel)
            continue
        st = changed[rel]
        if st is not None and stat.S_ISDIR(st.st_mode):
            relisted[rel] = st
    return unchanged, relisted


def _relist(hits: list[Hit], index: Index, src: str, rel: str, unchanged: set[str],
            relisted: dict[str, os.stat_result], new_dirs: list[tuple[str, str]]) -> None:
    """List one directory (as tree.walk does): its files are looked up, subdirectories the record does not cover
    are noted in `new_dirs` to be walked."""
    path = os.path.join(src, rel) if rel else src
    prefix = rel + "/" if rel else ""
    try:
        with os.scandir(path) as it:
            listing = list(it)
    except (FileNotFoundError, NotADirectoryError):
        return  # gone since it was stat-ed
    except OSError as exc:
        raise Unreadable(f"{path[:200]}: {exc.strerror or exc}") from None
    for entry in listing:
        if is_transient(entry.name):
            continue
        child = prefix + entry.name
        try:
            if entry.is_dir(follow_symlinks=False):
                if child not in unchanged and child not in relisted:
                    new_dirs.append((child, entry.path))
                continue
            st = entry.stat(follow_symlinks=False)
        except FileNotFoundError:
            continue
        if stat.S_ISDIR(st.st_mode):  # d_type was unknown
            if child not in unchanged and child not in relisted:
                new_dirs.append((child, entry.path))
        elif stat.S_ISREG(st.st_mode):
            blob_id = index.lookup(child, st)
            if blob_id is None:
                _miss(child)
                continue
            hits.append((child, blob_id, st))


def _recordable(met: dict[str, os.stat_result], since: int) -> dict[str, DirKey] | None:
    """The directory record for the walk that started at `since` and met these directories. One that changed within
    RACY_NS of the walk is recorded as UNSETTLED, so that every check lists it until one records it settled (a
    change in the same timestamp tick as its stat would not show in its values). None if the walk cannot be
    recorded: a directory swapped for a non-directory while walked, one named in no UTF-8, or too many."""
    if len(met) > limits.MAX_ENTRIES:  # the index's map limit (a reader would refuse the whole index)
        return None
    dirs: dict[str, DirKey] = {}
    for rel, st in met.items():
        if not stat.S_ISDIR(st.st_mode) or not _storable(rel):
            return None
        dirs[rel] = dir_key(st) if settled(st, since) else UNSETTLED
    return dirs


def _kept(record: dict[str, DirKey] | None) -> dict[str, DirKey] | None:
    """The record, unless most of its directories are unsettled (a tree just copied or restored): checks would then
    list them all anyway, and rewrite the index each time a few more settle. Not writing it leaves them to walk,
    until a check past the racy window records the tree."""
    if record is None:
        return None
    unsettled = sum(1 for key in record.values() if key == UNSETTLED)
    return None if unsettled * 2 > len(record) else record


def _storable(rel: str) -> bool:
    """The index can hold this path: a directory whose name is not UTF-8 (its files are never taken, FORMAT §3) is
    walked, for msgpack cannot write the name."""
    if rel.isascii():
        return True
    try:
        rel.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True
