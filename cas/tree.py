"""Walking a local cache directory: which files a save takes, with their sizes and modes."""
from __future__ import annotations

import logging
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass

from . import limits, nogc
from .errors import UnsafePath
from .paths import check_entry_path, is_transient

log = logging.getLogger("cas.tree")


@dataclass(frozen=True)
class LocalFile:
    rel: str  # '/'-separated, relative to the tree root
    path: str  # absolute
    size: int
    mode: int  # permission bits
    stat: os.stat_result


class Unreadable(Exception):
    """A directory under the tree could not be listed, or is too deep to save (raised only if the caller asks, see
    walk)."""


def walk(root: str | os.PathLike, *, validate: bool = True, strict: bool = False,
         dirs: dict[str, os.stat_result] | None = None, start: str = "",
         ) -> Iterator[tuple[str, str, os.stat_result]]:
    """(rel, absolute path, lstat) of each regular file a save takes under `root`: transient names
    (paths.is_transient) skipped, symlinks never followed (one in a cache directory points somewhere we must not
    publish), and with `validate` names no reader accepts (backslash, not UTF-8) left out with a warning. A directory
    that cannot be listed (permissions, I/O error, a path the kernel refuses as too long) or whose relative path is
    over limits.MAX_PATH_BYTES (no entry below it is legal) is skipped whole with one warning, or with `strict`
    raises Unreadable: one bad subtree must not fail the save of the rest. Order is unspecified.

    With `dirs`, each subdirectory met is put there (relative path without the trailing '/' -> its lstat, taken
    before the listing: a change made after the stat, even during the listing, then shows as a changed directory).
    One found to be no longer a directory (swapped since its parent was listed) is put there too, and not listed.

    `start` ("" or ending in '/') is `root`'s own path relative to the tree, for a walk of one subtree: it prefixes
    every relative path, counts toward the depth limit, and with `dirs` `root` itself is recorded."""
    stack = [(start, os.fspath(root))]
    while stack:
        prefix, directory = stack.pop()
        if len(prefix.encode("utf-8", "surrogateescape")) > limits.MAX_PATH_BYTES:
            _skip(directory, f"deeper than {limits.MAX_PATH_BYTES} bytes", strict)
            continue
        try:
            if dirs is not None and prefix:
                dirs[prefix[:-1]] = st = os.lstat(directory)
                if not stat.S_ISDIR(st.st_mode):  # swapped for a symlink or a file since its parent was listed
                    continue
            with os.scandir(directory) as it:
                entries = list(it)
        except (FileNotFoundError, NotADirectoryError):
            continue  # gone since its parent was listed
        except OSError as exc:  # EACCES, EIO, ENAMETOOLONG, ELOOP (swapped for a symlink since it was listed)
            _skip(directory, exc.strerror or str(exc), strict)
            continue
        for entry in entries:
            if is_transient(entry.name):
                continue
            rel = prefix + entry.name
            try:
                if entry.is_dir(follow_symlinks=False):  # the listing's d_type: no stat for a directory
                    stack.append((rel + "/", entry.path))
                    continue
                st = entry.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue
            except OSError as exc:  # e.g. ENAMETOOLONG: the directory's path fits, this one does not
                log.warning("not saving %s: %s", entry.path[:200], exc.strerror or exc)
                continue
            if stat.S_ISDIR(st.st_mode):  # d_type was unknown
                stack.append((rel + "/", entry.path))
            elif stat.S_ISREG(st.st_mode):
                if validate:
                    try:
                        check_entry_path(rel)  # a name no reader accepts would poison the manifest
                    except UnsafePath as exc:
                        log.warning("not saving %s: %s", entry.path, exc)
                        continue
                yield rel, entry.path, st
            elif stat.S_ISLNK(st.st_mode):
                log.debug("not saving symlink %s", entry.path)


def _skip(directory: str, why: str, strict: bool) -> None:
    if strict:
        raise Unreadable(f"{directory[:200]}: {why}")
    log.warning("skipping directory %s and everything below it: %s", directory[:200], why)


def scan(root: str | os.PathLike) -> list[LocalFile]:
    """The files a save takes under `root` (walk's rules), sorted by path."""
    with nogc.paused():  # a few objects per file, no cycles (cas/nogc.py)
        found = [LocalFile(rel, path, st.st_size, stat.S_IMODE(st.st_mode) & 0o777, st)
                 for rel, path, st in walk(root)]
        found.sort(key=lambda f: f.rel)
    return found
