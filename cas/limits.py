"""Limits on untrusted data read from the shared volume. Anything beyond them is corrupt or hostile.

Each value is far above what a real compile cache produces (the largest measured: 2,604 files, 168 MB, largest file
62 MB) and low enough that a hostile file cannot exhaust a pod's memory.
"""
from __future__ import annotations

# A manifest of 1,000,000 entries is about 120 MB of paths; real ones hold a few thousand entries (~300 KB).
MAX_MANIFEST_BYTES = 64 << 20
MAX_ENTRIES = 1_000_000
# `cas stats` sums raw bytes per top-level directory of a manifest's paths (Inductor's cache has about ten: triton,
# fxgraph, aotautograd, dynamo, ...); past this many names a hostile manifest's others are summed as one.
MAX_STATS_AREAS = 32
# POSIX PATH_MAX and NAME_MAX on Linux.
MAX_PATH_BYTES = 4096
MAX_COMPONENT_BYTES = 255
# One compiled artifact larger than this is not a compile cache.
MAX_ENTRY_SIZE = 64 << 30
# Informational environment map stored in each manifest.
MAX_ENV_ITEMS = 64
MAX_ENV_VALUE_BYTES = 1024
# Root records and lock files are a few hundred bytes; anything larger is not ours.
MAX_SMALL_FILE_BYTES = 64 << 10
# A pack's uncompressed content (FORMAT §2): small enough to decode in memory, large enough that a cache of
# thousands of small files needs a handful of packs. Readers refuse packs and packed entries beyond it.
MAX_PACK_BYTES = 8 << 20
# Frames in one blob, and in a pack's frame table (FORMAT §2, §3). Writers cut a pack's content into frames of about
# pack.PACK_FRAME_BYTES (at most 2 * 8 MiB / 256 KiB + 1 = 65 frames); a blob claiming more is not ours, and the
# bound keeps a hostile blob of tiny frames from costing a reader a list of a million spans. A table of this many
# frames (~13 characters each) still fits the manifest decoder's 4 KiB string limit.
MAX_PACK_FRAMES = 256
