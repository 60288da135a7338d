"""4 processes of one pod load one cache directory from a slow volume at once, with the pod lock and without it.

    .venv/bin/python -m tools.pod_bench [--ranks 4] [--delay-ms 2] [--synthetic]

One replica compiles a small model on the CPU and saves to a stand-in volume (`--synthetic`: a tree shaped like a
measured H100 Inductor cache instead, 680 files, 56.6 MB, tools/synth_tree.py); that volume is then served through
slowfs (every request but read/write costs `--delay-ms`, tools/slowfs) and `--ranks` processes, released together by
a file barrier, call `core.load()` on one empty local cache directory. Printed per mode: the volume's request counts
and bytes read (slowfs's own counters: what the volume saw), and per rank the load's seconds, the files it opened on
the volume (audit hook) and its read(2) bytes (/proc/self/io). The ranks are the child mode of
tests/test_multiprocess_pod.py. Needs /dev/fuse and mfusepy (root here).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from b10_transfer.demo import demo_env, prepare_volume, spawn_replica
from tools.slowfs import mounted

CHILD = Path(__file__).resolve().parent.parent / "tests" / "test_multiprocess_pod.py"
MARKER = "B10_POD_RESULT "


def _wait_for(paths: list[Path], timeout: float = 600.0) -> None:  # 4 torch imports on a busy box
    deadline = time.monotonic() + timeout
    while not all(p.exists() for p in paths):
        if time.monotonic() > deadline:
            raise TimeoutError(f"children never reached {paths}")
        time.sleep(0.01)


def _pod(volume: Path, local: Path, sync: Path, ranks: int, lock_timeout: str) -> list[dict]:
    env = demo_env(volume, local)
    env["B10_TRANSFER_POD_LOCK_TIMEOUT_S"] = lock_timeout
    env.pop("TRITON_CACHE_DIR", None)
    names = [f"r{i}" for i in range(ranks)]
    procs = [subprocess.Popen([sys.executable, str(CHILD), "child",
                               json.dumps({"name": n, "sync": str(sync), "volume": str(volume)})],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for n in names]
    _wait_for([sync / f"{n}.ready" for n in names])
    (sync / "go").touch()
    results = []
    for p in procs:
        out, err = p.communicate(timeout=300)
        line = next((x for x in out.splitlines() if x.startswith(MARKER)), None)
        if line is None:
            raise RuntimeError(f"rank failed (exit {p.returncode}):\n{out}\n{err}")
        results.append(json.loads(line[len(MARKER):]))
    return results


def _report(mode: str, counts: dict, results: list[dict]) -> dict:
    requests = {k: v for k, v in counts.items() if isinstance(v, int) and not k.endswith("_bytes")
                and k != "in_flight_max"}
    summary = {
        "mode": mode,
        "volume_requests": sum(requests.values()),
        "volume_open": requests.get("open", 0),
        "volume_read_bytes": counts.get("read_bytes", 0),
        "ranks": [{"name": r["name"], "status": r["load"]["status"], "seconds": round(r["load"]["seconds"], 3),
                   "shared_from": r["load"]["shared_from"], "volume_opens": r["load_volume_opens"],
                   "rchar": r["load_rchar"]} for r in results],
        "requests": requests,
    }
    print(json.dumps(summary, indent=1))
    return summary


def _seed(volume: Path, local: Path, synthetic: bool) -> None:
    if not synthetic:
        r = spawn_replica(demo_env(volume, local), [2], load=False, save=True)
        assert r["save"] == "SUCCESS", r["log"]
        return
    from b10_transfer import OperationStatus, core
    from tools.synth_tree import make_tree

    make_tree(str(local))
    status, stats = core.save(local, environ=demo_env(volume, local))
    assert status is OperationStatus.SUCCESS, stats


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ranks", type=int, default=4)
    ap.add_argument("--delay-ms", type=float, default=2.0)
    ap.add_argument("--synthetic", action="store_true", help="seed with the H100-shaped synthetic tree")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="pod-bench-") as tmp:
        root = Path(tmp)
        seed = root / "seed-volume"
        prepare_volume(seed)
        _seed(seed, root / "seed" / "inductor", args.synthetic)
        out = []
        for mode, timeout in (("pod lock", "300"), ("no lock", "0")):
            src, mnt, sync = root / f"src-{timeout}", root / f"mnt-{timeout}", root / f"sync-{timeout}"
            shutil.copytree(seed, src)
            mnt.mkdir()
            sync.mkdir()
            with mounted(str(src), str(mnt), delay_ms=args.delay_ms) as m:
                results = _pod(mnt, root / f"local-{timeout}" / "inductor", sync, args.ranks, timeout)
            out.append(_report(mode, m.op_counts, results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
