"""A partial load on a local directory store (no added latency): the case where ranged pack reads cannot win on
round trips, so any cost they add (more reads, more tasks) shows. One process, one tree, `--reps` runs, JSON out.

    PYTHONPATH=. .venv/bin/python -m tools.bench.partial_local [--tree synthetic|real] [--reps 5]

Each rep: a first save into a fresh store, a full load, 10 % of the files removed (tools/bench's pick), the
partial load timed, with the bytes and ranged reads the store's GETs made (FaultyBackend counters).
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from tools.bench.__main__ import real_tree, remove_some, synth_tree, tree_files

KEY = "bench-env-local"


def one(tree: Path, work: Path, rep: int) -> dict:
    from cas import BlobStore, Scope, load_tree, save_tree
    from cas.faulty import FaultyBackend
    from cas.posix import PosixBackend

    expected = tree_files(tree)
    store_dir, scope_dir, dst = work / "store", work / "scope", work / "dst"
    save_tree(tree, BlobStore(store_dir, create=True), Scope(scope_dir, create=True), KEY, use_index=False)
    load_tree(dst, BlobStore(store_dir), Scope(scope_dir), KEY)
    remove_some(dst, expected, seed=rep)
    backend = FaultyBackend(PosixBackend(store_dir))
    t0 = time.perf_counter()
    res = load_tree(dst, BlobStore(backend, create=False), Scope(scope_dir), KEY)
    seconds = time.perf_counter() - t0
    assert not res.misses and res.restored, res
    for p in (store_dir, scope_dir, dst):
        shutil.rmtree(p)
    return {"s": seconds, "restored": res.restored, "got_mb": backend.got_bytes["blobs"] / 1e6,
            "ranged": backend.ranged_gets["blobs"], "gets": backend.calls["get"]}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tree", choices=("synthetic", "real"), default="synthetic")
    ap.add_argument("--reps", type=int, default=5)
    a = ap.parse_args()
    tree = synth_tree(False) if a.tree == "synthetic" else real_tree()
    with tempfile.TemporaryDirectory(prefix="b10-partial-") as tmp:
        runs = [one(tree, Path(tmp), rep) for rep in range(a.reps)]
    out = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    print(json.dumps({"tree": a.tree, "median": out, "runs": runs}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
