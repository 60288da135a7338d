"""Walking a local cache directory: which files a save takes, with their sizes and modes."""
from __future__ import annotations

import logging
import os
import stat
from dataclasses import dataclass

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


def scan(root: str | os.PathLike) -> list[LocalFile]:
    """Regular files under `root`, skipping transient names (paths.is_transient) and never following symlinks:
    a symlink in a cache directory points somewhere we must not publish."""
    root = os.fspath(root)
    found: list[LocalFile] = []
    stack = [("", root)]
    while stack:
        prefix, directory = stack.pop()
        try:
            entries = list(os.scandir(directory))
        except (FileNotFoundError, NotADirectoryError):
            continue
        except PermissionError as exc:
            log.warning("skipping unreadable directory %s: %s", directory, exc.strerror)
            continue
        for entry in entries:
            if is_transient(entry.name):
                continue
            rel = prefix + entry.name
            try:
                st = entry.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue
            if stat.S_ISDIR(st.st_mode):
                stack.append((rel + "/", entry.path))
            elif stat.S_ISREG(st.st_mode):
                try:
                    check_entry_path(rel)  # a name no reader accepts (backslash, not UTF-8) would poison the manifest
                except UnsafePath as exc:
                    log.warning("not saving %s: %s", entry.path, exc)
                    continue
                found.append(LocalFile(rel, entry.path, st.st_size, stat.S_IMODE(st.st_mode) & 0o777, st))
            elif stat.S_ISLNK(st.st_mode):
                log.debug("not saving symlink %s", entry.path)
    found.sort(key=lambda f: f.rel)
    return found
