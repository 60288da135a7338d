"""Pausing Python's cyclic garbage collector around allocation-heavy loops over a whole cache.

Parsing a manifest, reading the local index, walking the cache directory and restoring it allocate a few objects per
file and free none of them until the end: for 20,000 files that triggers dozens of collections, each of which walks
every tracked object of the process (in a model server, all of torch's). None of these loops makes reference
cycles, so collecting during them finds nothing. Measured on a 20,000-file cache (2 cores): a no-op save check
1.6 -> 0.5 s, a load into tmpfs 2.4 -> 1.4 s.

The pause is process-wide, so it nests and overlaps safely: only the caller that found the collector enabled turns
it back on, and a process that disabled it itself keeps it disabled.
"""
from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def paused() -> Iterator[None]:
    enabled = gc.isenabled()
    if enabled:
        gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()
