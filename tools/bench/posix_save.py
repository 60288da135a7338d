"""A first save on a volume, two versions of `cas` interleaved: is a change to the save path slower on POSIX?

    .venv/bin/python -m tools.bench.posix_save --before DIR [--reps 5] [--delay-ms 2] [--trees real,synthetic]

DIR holds the other version's `cas/` (e.g. `git archive <base> cas | tar -x -C DIR`); "after" is this checkout.
Each run is one process per version (its own imports, not timed) saving a fresh copy of the tree into a new store
and scope, `save_tree` alone timed, versions alternating which goes first; on the local disk under /tmp and on
tools.slowfs (FUSE passthrough, `--delay-ms` per request). Prints medians.
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from tools.bench.__main__ import copy_tree, real_tree, synth_tree  # noqa: E402

KEY = "bench-env"
# The child: import `cas` from argv[1], save argv[2] into a new store argv[3] and scope argv[4], print seconds.
CHILD = """
import sys, time
sys.path.insert(0, sys.argv[1])
from cas import BlobStore, Scope, save_tree
t0 = time.perf_counter()
res = save_tree(sys.argv[2], BlobStore(sys.argv[3], create=True), Scope(sys.argv[4], create=True), "bench-env")
assert res.manifest_written, res
print(time.perf_counter() - t0)
"""


def one(src_dir: str, tree: Path, work: Path, volume: Path, tag: str) -> float:
    src = work / f"src-{tag}"
    shutil.rmtree(src, ignore_errors=True)
    copy_tree(tree, src)
    vol = volume / f"vol-{tag}"
    shutil.rmtree(vol, ignore_errors=True)
    (vol / "model").mkdir(parents=True)
    out = subprocess.run([sys.executable, "-c", CHILD, src_dir, str(src), str(vol / "org"), str(vol / "model" / "cc")],
                         capture_output=True, text=True, check=True)
    shutil.rmtree(vol, ignore_errors=True)
    return float(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tools.bench.posix_save", description=__doc__.split("\n")[0])
    ap.add_argument("--before", required=True, help="directory holding the other version's cas/")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--delay-ms", type=float, default=2.0)
    ap.add_argument("--trees", default="real,synthetic")
    a = ap.parse_args(argv)
    from tools.slowfs import mounted

    versions = {"before": str(Path(a.before).resolve()), "after": str(REPO)}
    trees = {t: real_tree() if t == "real" else synth_tree(False) for t in a.trees.split(",")}
    work = Path(tempfile.mkdtemp(prefix="b10posixsave-", dir="/tmp"))
    times: dict[tuple[str, str, str], list[float]] = {}
    load = [os.getloadavg()[0]]
    try:
        (work / "backing").mkdir()
        (work / "mnt").mkdir()
        with mounted(work / "backing", work / "mnt", delay_ms=a.delay_ms):
            for volume_name, volume in (("local", work / "local"), ("slowfs", work / "mnt")):
                volume.mkdir(exist_ok=True)
                for tname, tree in trees.items():
                    for rep in range(a.reps):
                        order = list(versions) if rep % 2 == 0 else list(versions)[::-1]
                        for version in order:
                            t = one(versions[version], tree, work, volume, version)
                            times.setdefault((volume_name, tname, version), []).append(t)
                    print(f"{volume_name} {tname}: done (load {os.getloadavg()[0]:.1f})", file=sys.stderr)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    load.append(os.getloadavg()[0])
    print(f"first save, medians of {a.reps}, slowfs {a.delay_ms:g} ms per request, load average "
          f"{load[0]:.1f} at start, {load[1]:.1f} at end")
    print("| volume | tree | before | after | after/before |")
    print("|---|---|---|---|---|")
    for volume_name in ("local", "slowfs"):
        for tname in trees:
            b = statistics.median(times[(volume_name, tname, "before")])
            f = statistics.median(times[(volume_name, tname, "after")])
            print(f"| {volume_name} | {tname} | {b * 1000:.0f} ms | {f * 1000:.0f} ms | {f / b:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
