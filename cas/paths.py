"""Entry paths: what a legal relative path is, and how to place one inside a target directory without escaping it."""
from __future__ import annotations

import os
import stat

from . import limits
from .errors import UnsafePath

TEMP_PREFIX = ".tmp-"


def is_transient(name: str) -> bool:
    """True for a path component that must never be saved: lock files, lock directories and temp files
    (ours `.tmp-*`, Inductor's `*.tmp`), and our local index. They belong to one live process or pod."""
    return (
        name == "locks"
        or name == ".cas-index"
        or name.endswith(".lock")
        or name.startswith(TEMP_PREFIX)
        or name.endswith(".tmp")
    )


def check_entry_path(path: object) -> str:
    """Return `path` if it is a legal entry path (docs/FORMAT.md §3), else raise UnsafePath saying why."""
    if not isinstance(path, str):
        raise UnsafePath(f"entry path is not a string: {type(path).__name__}")
    if not path:
        raise UnsafePath("empty entry path")
    if "\x00" in path:
        raise UnsafePath(f"NUL byte in entry path {path!r}")
    if "\\" in path:
        raise UnsafePath(f"backslash in entry path {path!r}")
    if path.startswith("/"):
        raise UnsafePath(f"absolute entry path {path!r}")
    try:
        encoded = path.encode("utf-8")
    except UnicodeEncodeError:
        raise UnsafePath(f"entry path is not valid UTF-8: {path!r}") from None
    if len(encoded) > limits.MAX_PATH_BYTES:
        raise UnsafePath(f"entry path longer than {limits.MAX_PATH_BYTES} bytes: {path[:80]!r}...")
    for part in path.split("/"):
        if part in ("", ".", ".."):
            raise UnsafePath(f"entry path has an empty, '.' or '..' component: {path!r}")
        if len(part.encode("utf-8")) > limits.MAX_COMPONENT_BYTES:
            raise UnsafePath(f"entry path component longer than {limits.MAX_COMPONENT_BYTES} bytes: {path[:80]!r}")
    return path


class TargetDir:
    """A directory files are restored into. Creates parent directories on demand and refuses any parent that is a
    symlink or not a directory, so a planted link in the target can never redirect a write outside it."""

    def __init__(self, root: str | os.PathLike):
        self.root = os.path.realpath(os.fspath(root))
        self._checked: set[str] = {self.root}

    def parent_for(self, rel: str) -> str:
        """Return the absolute parent directory of entry `rel`, creating it if needed; raise UnsafePath if a
        component on the way is a symlink or a non-directory."""
        parts = rel.split("/")[:-1]
        current = self.root
        for part in parts:
            current = os.path.join(current, part)
            if current in self._checked:
                continue
            # mkdir first: in a fresh target nearly every parent is new (an Inductor cache has about one directory
            # per file), and a directory mkdir just created is ours. Anything already there is checked.
            try:
                os.mkdir(current, 0o755)
                self._checked.add(current)
                continue
            except FileExistsError:
                pass
            st = os.lstat(current)
            if stat.S_ISLNK(st.st_mode):
                raise UnsafePath(f"{rel!r}: parent {current!r} is a symlink")
            if not stat.S_ISDIR(st.st_mode):
                raise UnsafePath(f"{rel!r}: parent {current!r} is not a directory")
            self._checked.add(current)
        return current
