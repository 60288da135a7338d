"""Listing the store in parallel through the backend's `list` verb (FORMAT §2): on a network volume or a bucket every
listing is a round trip of milliseconds, so gc, check and stats read the fan-out prefixes many at a time.

Nothing here follows a planted link: the backend lists a symlink (or FIFO, device) as `kind="other"` and refuses to
list through one (`BadObject`). Such entries are returned as `planted`, for gc to leave alone and check to report.
"""
from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TypeVar

from . import layout
from .blobstore import BlobInfo, BlobStore, is_blob_id
from .storage import Backend, BadObject, ObjectInfo

# Like save's 32 uploads in flight: enough requests to hide a 2 ms round trip, far below NFS client slot limits.
SCAN_THREADS = 32

T = TypeVar("T")
R = TypeVar("R")


@dataclass
class Listing:
    blobs: list[BlobInfo] = field(default_factory=list)
    temp: list[ObjectInfo] = field(default_factory=list)  # a writer's temp objects, expired by age
    foreign: list[str] = field(default_factory=list)  # keys of plain objects that are not ours: never touched
    planted: list[str] = field(default_factory=list)  # keys of links, FIFOs, stray directories: never followed

    def extend(self, other: Listing) -> None:
        self.blobs += other.blobs
        self.temp += other.temp
        self.foreign += other.foreign
        self.planted += other.planted


def list_prefix(backend: Backend, prefix: str) -> tuple[list[ObjectInfo], Listing]:
    """The entries of one prefix: (objects and sub-prefixes, a Listing holding its temp and planted entries). A
    prefix that is itself planted (a symlink) lists nothing and is reported as planted."""
    out = Listing()
    entries: list[ObjectInfo] = []
    try:
        for info in backend.list(prefix):
            if info.kind == "temp":
                out.temp.append(info)
            elif info.kind == "other":
                out.planted.append(info.key)
            else:
                entries.append(info)
    except BadObject:
        out.planted.append(prefix.rstrip("/"))  # the link itself, named as a listing names one
    return entries, out


def scan_area(store: BlobStore, area: str = "blobs", threads: int = SCAN_THREADS) -> Listing:
    """Every entry of `<area>/<xx>/`, classified. A missing fan-out prefix is empty (writers create it)."""
    top, out = list_prefix(store.backend, area + "/")
    fans = []
    for info in top:
        name = layout.name_of(info.key)
        if info.kind == "prefix" and name in layout.FANOUT:
            fans.append(name)
        else:
            out.foreign.append(info.key)
    for part in parallel_map(lambda fan: _scan_fan(store.backend, area, fan), sorted(fans), threads):
        out.extend(part)
    return out


def _scan_fan(backend: Backend, area: str, fan: str) -> Listing:
    entries, part = list_prefix(backend, layout.fan_prefix(area + "/", fan))
    for info in entries:
        name = layout.name_of(info.key)
        if info.kind == "object" and is_blob_id(name) and name[:2] == fan:
            part.blobs.append(BlobInfo(name, info.key, info.size, info.mtime, info.version,
                                       os.path.join(backend.location, info.key)))
        elif info.kind == "prefix":
            part.planted.append(info.key)  # a directory where a blob belongs: nobody's blob
        else:
            part.foreign.append(info.key)
    return part


def parallel_map(fn: Callable[[T], R], items: Iterable[T], threads: int = SCAN_THREADS) -> list[R]:
    items = list(items)
    if threads <= 1 or len(items) <= 1:
        return [fn(i) for i in items]
    with ThreadPoolExecutor(max_workers=min(threads, len(items)), thread_name_prefix="cas-scan") as pool:
        return list(pool.map(fn, items))
