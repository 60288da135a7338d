"""Entry paths: what a legal relative path is, and which names a save never takes. Writing one inside a target
directory without escaping it is localfs.TargetDir's job."""
from __future__ import annotations

import re

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


# The common case in one C-level match: an ASCII path (one byte per character) of components of 1-255 characters,
# none `.` or `..`, without NUL or backslash, not absolute. Anything else takes the full check below, which also
# says what is wrong.
_COMPONENT = rf"(?!\.\.?(?:/|\Z))[^/\\\x00]{{1,{limits.MAX_COMPONENT_BYTES}}}"
_PLAIN_ASCII = re.compile(rf"{_COMPONENT}(?:/{_COMPONENT})*")


def check_entry_path(path: object) -> str:
    """Return `path` if it is a legal entry path (docs/FORMAT.md §3), else raise UnsafePath saying why."""
    if (type(path) is str and len(path) <= limits.MAX_PATH_BYTES and path.isascii()
            and _PLAIN_ASCII.fullmatch(path)):
        return path  # a manifest of 20,000 entries checks them all at every load: this is ~10x the loop below
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
