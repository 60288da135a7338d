"""The no-op check alone (cas.quick.nothing_new) on one deployment's cache of 680 to 20,000 files, local disk.

    .venv/bin/python -m tools.bench.noop_check [--trees 680,5000,20000,20000:1] [--reps 5] [--json PATH]

Trees are tools/bench/scale.py's (`20000:1`: one directory per file; made once under .scratch/bench-trees). Each is
copied to a work directory, saved once into a new store on the same disk, and left 2.5 s (the index's racy window)
so that its directories may be recorded. Then, per repeat, three cold checks (scale.cold_quick: the first check of
a process): `steady` (nothing changed since the last check), `after save` (one new file written into one
directory, an hour old, and saved by save_tree first: the check then compares the manifest again and rewrites the
index) and `next` (the check after that one); `first` is the one check before them, right after the first save.
Wall and CPU time (time.process_time, this process) of each; medians.

To measure another commit, run this file from a checkout of it (or with PYTHONPATH pointing at one).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from cas import BlobStore, Scope, save_tree  # noqa: E402
from cas.index import RACY_NS  # noqa: E402
from cas.quick import nothing_new  # noqa: E402
from tools.bench.scale import ENV_KEYS, big_tree, cold_quick, parse_tree  # noqa: E402

KINDS = ("steady", "after save", "next")
OLD = 3600  # seconds: new files are written an hour old, so the index keeps them at once


def checked(local: Path, org: Path, scope: Path) -> tuple[int, float, float]:
    cold_quick()
    c0, t0 = time.process_time(), time.perf_counter()
    n = nothing_new(str(local), str(org), Scope(str(scope)), ENV_KEYS[0])
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    assert n is not None, "the check found something new"
    return n, wall, cpu


def tree_point(spec: str, work: Path, reps: int) -> dict:
    files, per_dir = parse_tree(spec)
    local, org, scope = work / "src", work / "org", work / "scope"
    subprocess.run(["cp", "-a", str(big_tree(spec)), str(local)], check=True)
    (local / ".complete").unlink(missing_ok=True)
    save_tree(str(local), BlobStore(str(org), create=True), Scope(str(scope), create=True), ENV_KEYS[0])
    time.sleep(RACY_NS / 1e9 + 0.5)
    dirs = sorted({os.path.relpath(d, local) for d, _, names in os.walk(local) if names})
    out: dict = {"spec": spec, "files": files, "per_dir": per_dir, "dirs": sum(1 for _ in os.walk(local)) - 1,
                 "wall": {k: [] for k in KINDS}, "cpu": {k: [] for k in KINDS}}
    _, out["first_wall"], out["first_cpu"] = checked(local, org, scope)  # after the first save: it may record
    old = time.time() - OLD
    for i in range(reps):
        for kind in KINDS:
            if kind == "after save":
                new = local / dirs[(i * 7919) % len(dirs)] / f"new-{i}.py"
                new.write_bytes(b"a new kernel %d\n" % i)
                os.utime(new, (old, old))
                assert save_tree(str(local), BlobStore(str(org)), Scope(str(scope)), ENV_KEYS[0]).new_entries == 1
            _, wall, cpu = checked(local, org, scope)
            out["wall"][kind].append(wall)
            out["cpu"][kind].append(cpu)
    out["loadavg"] = os.getloadavg()[0]
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tools.bench.noop_check", description=__doc__.split("\n")[0])
    ap.add_argument("--trees", default="680,5000,20000,20000:1")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--workdir", default="/tmp")
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    points = []
    for spec in [x for x in a.trees.split(",") if x]:
        work = Path(tempfile.mkdtemp(prefix="b10noopcheck-", dir=a.workdir))
        try:
            points.append(tree_point(spec, work, a.reps))
        finally:
            shutil.rmtree(work, ignore_errors=True)
    print("| files | dirs | first: wall | first: CPU | " + " | ".join(f"{k}: wall | {k}: CPU" for k in KINDS)
          + " | load |")
    print("|---:|---:|---:|---:|" + "---:|---:|" * len(KINDS) + "---:|")
    for p in points:
        cells = [f"{p['first_wall'] * 1e3:.0f} ms", f"{p['first_cpu'] * 1e3:.0f} ms"]
        cells += [f"{statistics.median(p[m][k]) * 1e3:.0f} ms" for k in KINDS for m in ("wall", "cpu")]
        print(f"| {p['files']:,} | {p['dirs']:,} | " + " | ".join(cells) + f" | {p['loadavg']:.1f} |")
    if a.json:
        Path(a.json).write_text(json.dumps(points, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
