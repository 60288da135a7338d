"""Walking a local cache directory: which files a save takes, with their sizes and modes."""
from __future__ import annotations

import logging
import os
import stat
from dataclasses import dataclass
from typing import Iterator

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
    """A directory under the tree could not be listed (raised only if the caller asks, see walk)."""


def walk(root: str | os.PathLike, *, validate: bool = True,
         strict: bool = False) -> Iterator[tuple[str, str, os.stat_result]]:
    """(rel, absolute path, lstat) of each regular file a save takes under `root`: transient names
    (paths.is_transient) skipped, symlinks never followed (one in a cache directory points somewhere we must not
    publish), and with `validate` names no reader accepts (backslash, not UTF-8) left out with a warning. An
    unreadable directory is skipped with a warning, or with `strict` raises Unreadable. Order is unspecified."""
    stack = [("", os.fspath(root))]
    while stack:
        prefix, directory = stack.pop()
        try:
            with os.scandir(directory) as it:
                entries = list(it)
        except (FileNotFoundError, NotADirectoryError):
            continue  # gone since its parent was listed
        except PermissionError as exc:
            if strict:
                raise Unreadable(directory) from exc
            log.warning("skipping unreadable directory %s: %s", directory, exc.strerror)
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


def scan(root: str | os.PathLike) -> list[LocalFile]:
    """The files a save takes under `root` (walk's rules), sorted by path."""
    found = [LocalFile(rel, path, st.st_size, stat.S_IMODE(st.st_mode) & 0o777, st) for rel, path, st in walk(root)]
    found.sort(key=lambda f: f.rel)
    return found
