"""The no-op save (issue 5): `save_compile_cache()` when nothing is new, repeated in one process, on slowfs.

    .venv/bin/python -m tools.bench.noop_save [--tree synthetic|DIR] [--delay-ms 2] [--repeat 5] [--local] [--trace]

The first save is made once on the backing directory (no slowfs, so it is quick), then each no-op save runs in a
fresh slowfs mount of that directory so its request count is its own. Prints, per repeat, wall ms, requests by
operation and our CPU; --trace also prints which paths got the requests (SLOWFS_TRACE). --local: no slowfs.
"""
from __future__ import annotations

import argparse
import collections
import os
import shutil
import statistics
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tree", default="synthetic")
    ap.add_argument("--delay-ms", type=float, default=2.0)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--local", action="store_true")
    ap.add_argument("--trace", action="store_true")
    a = ap.parse_args()
    from tools.bench.__main__ import copy_tree, synth_tree
    from tools.slowfs import mounted

    tree = Path(a.tree) if os.path.isdir(a.tree) else synth_tree(False)
    run = Path(tempfile.mkdtemp(prefix="b10noop-", dir="/tmp"))
    try:
        backing, mnt, src = run / "backing", run / "mnt", run / "src"
        for d in (backing / "model", backing / "org", mnt):
            d.mkdir(parents=True)
        copy_tree(tree, src)
        env = {"BASETEN_FS_ENABLED": "1", "B10FS_VOLUME_ROOT": str(backing), "TORCHINDUCTOR_CACHE_DIR": str(src),
               "LOCAL_WORK_DIR": str(run), "MIN_LOCAL_SPACE_MB": "512", "MIN_B10FS_SPACE_MB": "512",
               "MAX_CONCURRENT_SAVES": "8"}
        os.environ.update(env)
        import torch  # noqa: F401  (as in a model server: a full gc pass then costs ~150 ms)

        import b10_transfer

        first = b10_transfer.save_compile_cache()
        print(f"first save on the backing directory: {first.name}")
        os.environ["B10FS_VOLUME_ROOT"] = str(backing if a.local else mnt)
        trace = run / "trace"
        walls = []
        for i in range(a.repeat):
            if a.trace and not a.local:
                os.environ["SLOWFS_TRACE"] = str(trace)
                trace.write_text("")
            ctx = nullcontext() if a.local else mounted(backing, mnt, delay_ms=a.delay_ms)
            with ctx as m:
                os.environ.pop("SLOWFS_TRACE", None)
                cpu0 = sum(os.times()[:2])
                t0 = time.perf_counter()
                status = b10_transfer.save_compile_cache()
                dt = time.perf_counter() - t0
                cpu = sum(os.times()[:2]) - cpu0
            walls.append(dt)
            counts = {} if m is None else {k: v for k, v in sorted(m.op_counts.items(), key=lambda kv: -kv[1])
                                           if not k.endswith("_bytes") and k != "in_flight_max"}
            print(f"no-op save {i + 1}: {dt * 1000:.1f} ms, {status.name}, CPU {cpu * 1000:.0f} ms; "
                  f"{sum(counts.values())} requests: " + ", ".join(f"{k} {v}" for k, v in counts.items())
                  + (f", in_flight_max {m.op_counts.get('in_flight_max')}" if m is not None else ""))
            if a.trace and not a.local:
                lines = trace.read_text().splitlines()
                root = str(backing)
                for line, n in collections.Counter(lines).most_common():
                    print(f"    {n:3d} {line.replace(root, '')}")
        print(f"median {statistics.median(walls) * 1000:.1f} ms, min {min(walls) * 1000:.1f} ms over {a.repeat}")
    finally:
        shutil.rmtree(run, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
