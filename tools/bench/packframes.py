"""What pack frames cost and save (FORMAT §2, cas/pack.py PACK_FRAME_BYTES): the packs a first save would write
for a tree, stored at several frame sizes, and what a partial load (10 % of the files missing, as tools/bench picks
them) would fetch of them, whole packs against the byte ranges of the frames that hold the missing files.

    .venv/bin/python -m tools.bench.packframes [--tree DIR ...] [--seed 1]

No store is written: the packs are planned and compressed as cas/pack.py does (level 3, one frame per run of whole
files of about the frame size), the ranges chosen as cas/load.py chooses them.
"""
from __future__ import annotations

import argparse
import os
import random
import sys
from pathlib import Path

import blake3
import zstandard

from cas import pack
from cas.blobstore import ZSTD_LEVEL
from cas.load import plan_ranges
from cas.manifest import Entry, FrameTable
from cas.tree import scan

REPO = Path(__file__).resolve().parents[2]
TREES = REPO / ".scratch" / "bench-trees"
FRAME_SIZES = (None, 1 << 20, 512 << 10, 256 << 10, 128 << 10, 64 << 10)  # None: one frame per pack (before)
FRACTION = 0.10  # as tools/bench: files missing for a partial load


def _packs(root: Path) -> list[list[tuple[str, bytes]]]:
    files = [f for f in scan(root) if f.size <= pack.PACK_FILE_MAX]
    groups = pack.plan([(f.rel, f) for f in files])
    return [[(f.rel, Path(f.path).read_bytes()) for _, f in group] for group in groups]


def measure(root: Path, seed: int) -> list[dict]:
    packs = _packs(root)
    every = sorted(rel for group in packs for rel, _ in group)
    all_files = sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())
    missing = set(random.Random(seed).sample(all_files, max(1, round(len(all_files) * FRACTION)))) & set(every)
    cctx = zstandard.ZstdCompressor(level=ZSTD_LEVEL, write_content_size=True)
    rows = []
    for frame in FRAME_SIZES:
        stored = fetched_whole = fetched_ranged = requests = 0
        for group in packs:
            sizes = [len(d) for _, d in group]
            runs = [(0, len(group))] if frame is None else pack.frame_runs(sizes, frame)
            table = FrameTable(tuple((len(cctx.compress(b"".join(d for _, d in group[a:b]))),
                                      sum(sizes[a:b])) for a, b in runs))
            stored += table.stored_size
            items, offset = [], 0
            for rel, data in group:
                if rel in missing:
                    items.append((rel, Entry(blake3.blake3(data).hexdigest(), len(data), 0o644, "p" * 64, offset,
                                             table)))
                offset += len(data)
            if not items:
                continue
            fetched_whole += table.stored_size
            planned = plan_ranges(items)
            if planned is None:
                fetched_ranged += table.stored_size
                requests += 1
            else:
                fetched_ranged += sum(sum(c for c, _ in run.frames) for run in planned)
                requests += len(planned)
        rows.append({"frame": frame, "packs": len(packs), "files": len(every), "missing": len(missing),
                     "stored": stored, "whole": fetched_whole, "ranged": fetched_ranged, "requests": requests})
    return rows


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tree", action="append", type=Path)
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    for root in args.tree or [TREES / "synth", TREES / "inductor"]:
        rows = measure(root, args.seed)
        base = rows[0]["stored"]
        print(f"\n{root}: {rows[0]['files']} packed files in {rows[0]['packs']} packs, "
              f"{rows[0]['missing']} of them missing for the partial load")
        print("| frame | stored | vs one frame | partial load fetches | requests | vs whole packs |")
        print("|---|---|---|---|---|---|")
        for r in rows:
            name = "one per pack" if r["frame"] is None else f"{r['frame'] >> 10} KiB"
            print(f"| {name} | {r['stored'] / 1e6:.3f} MB | {r['stored'] / base - 1:+.1%} | "
                  f"{r['ranged'] / 1e6:.3f} MB | {r['requests']} | {r['ranged'] / max(1, r['whole']):.2f} |")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, os.fspath(REPO))
    sys.exit(main())
