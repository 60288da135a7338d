"""Listing `blobs/` or `trash/` in parallel: on a network volume every directory read and every stat is a round trip
of milliseconds, so gc, check and stats read the 256 fan-out directories many at a time."""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Iterable, TypeVar

from .blobstore import FANOUT, BlobInfo, BlobStore, is_blob_id
from .paths import TEMP_PREFIX

# Like save's 32 uploads in flight: enough requests to hide a 2 ms round trip, far below NFS client slot limits.
SCAN_THREADS = 32

T = TypeVar("T")
R = TypeVar("R")


@dataclass
class Listing:
    blobs: list[BlobInfo] = field(default_factory=list)
    temp: list[tuple[str, float]] = field(default_factory=list)  # (path, mtime) of `.tmp-*` files
    foreign: list[str] = field(default_factory=list)  # anything else: not ours, never touched, reported by check


def scan_area(store: BlobStore, area: str = "blobs", threads: int = SCAN_THREADS) -> Listing:
    """Every entry of `<store>/<area>/<xx>/`, classified. A missing fan-out directory is empty (writers recreate it)."""
    base = os.path.join(store.root, area)

    def one(fan: str) -> Listing:
        part = Listing()
        try:
            entries = list(os.scandir(os.path.join(base, fan)))
        except (FileNotFoundError, NotADirectoryError):
            return part
        for e in entries:
            try:
                st = e.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue  # renamed or removed since the listing
            if e.name.startswith(TEMP_PREFIX):
                part.temp.append((e.path, st.st_mtime))
            elif is_blob_id(e.name) and e.name[:2] == fan and e.is_file(follow_symlinks=False):
                part.blobs.append(BlobInfo(e.name, e.path, st.st_size, st.st_mtime))
            else:
                part.foreign.append(e.path)
        return part

    out = Listing()
    for part in parallel_map(one, FANOUT, threads):
        out.blobs += part.blobs
        out.temp += part.temp
        out.foreign += part.foreign
    return out


def parallel_map(fn: Callable[[T], R], items: Iterable[T], threads: int = SCAN_THREADS) -> list[R]:
    items = list(items)
    if threads <= 1 or len(items) <= 1:
        return [fn(i) for i in items]
    with ThreadPoolExecutor(max_workers=min(threads, len(items)), thread_name_prefix="cas-scan") as pool:
        return list(pool.map(fn, items))
