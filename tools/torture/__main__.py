"""Torture the cache and print figures: `python -m tools.torture` (see docs/reliability.md).

    python -m tools.torture                         # full run: 64 workers for 120 s, 200+ kills, every fault
    python -m tools.torture --workers 12 --seconds 30 --kills 40      # a short run
    python -m tools.torture --json out.json --markdown out.md         # also write the figures
    python -m tools.torture --backend s3 --workers 12 --seconds 60 --kills 40   # org store + scopes on SeaweedFS

Phases (--phases, default all): `load` (many processes saving, loading, collecting and checking on one org store
and --scopes deployment scopes, SIGKILLed at random moments and at the cas/_faults.py kill points, some with skewed
clocks), `faults` (stale locks of dead and foreign holders, disk full on the volume and locally, read-only volume,
volume vanishing mid-load, clock skew), `hostile` (tests/test_hostile.py: hostile or broken input through the public
API). Bounded by --seconds/--max-ops and stops by itself; exit status 0 when there are no violations, 1 otherwise.
Faults that need `mount` (root) are reported as skipped where it is not permitted.

`--backend s3` starts SeaweedFS on 127.0.0.1 (tests/s3_servers.py) and runs the `load` phase with the org store and
the scopes in one of its buckets: the same saves, loads, gcs with a short grace and checks, the same random SIGKILLs
and kill points (mid-save, mid-commit, mid-gc), the same end-state checks (tools/torture/backends.py says what
differs). The `faults` and `hostile` phases are volume scenarios (mounts, ENOSPC, planted files) and run only on posix.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

from .report import to_markdown

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tools.torture", description=__doc__.split("\n\n")[0])
    ap.add_argument("--phases", default="load,faults,hostile", help="comma-separated: load, faults, hostile")
    ap.add_argument("--workers", type=int, default=64, help="worker processes in the load phase (default 64)")
    ap.add_argument("--seconds", type=float, default=120.0, help="duration of the load phase (default 120)")
    ap.add_argument("--max-ops", type=int, default=None, help="stop the load phase after about this many operations")
    ap.add_argument("--kills", type=int, default=200, help="random SIGKILLs during the load phase (default 200)")
    ap.add_argument("--point-kills", type=float, default=0.3,
                    help="fraction of worker processes started with a CAS_KILL_AT kill point (default 0.3)")
    ap.add_argument("--scopes", type=int, default=4, help="deployment scopes sharing the org store (default 4)")
    ap.add_argument("--freshen-after", type=float, default=4.0, help="store's freshen_after, seconds (default 4)")
    ap.add_argument("--grace", type=float, default=None, help="gc grace, seconds (default 2 x freshen-after)")
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--dir", default=None, help="work directory (default: a fresh temp dir, removed afterwards)")
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    ap.add_argument("--json", dest="json_out", default=None, help="write the figures as JSON to this file")
    ap.add_argument("--markdown", default=None, help="write the figures as markdown to this file")
    ap.add_argument("--backend", choices=("posix", "s3"), default="posix",
                    help="where the org store and scopes live: a directory (default) or a SeaweedFS bucket")
    a = ap.parse_args(argv)
    seed = a.seed if a.seed is not None else int(time.time()) & 0xFFFFFF
    phases = [p.strip() for p in a.phases.split(",") if p.strip()]
    if a.backend == "s3":
        phases = [p for p in phases if p == "load"]
    work = a.dir or tempfile.mkdtemp(prefix="torture-")
    os.makedirs(work, exist_ok=True)
    figures: dict = {"command": " ".join(["python -m tools.torture", *(argv if argv is not None else sys.argv[1:])]),
                     "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), "seed": seed,
                     "host": {"cpus": os.cpu_count(), "python": platform.python_version(),
                              "kernel": platform.release()}, "backend": a.backend}
    t0 = time.monotonic()

    def say(msg: str) -> None:
        print(msg, flush=True)

    try:
        if "load" in phases:
            from contextlib import nullcontext

            from .backends import seaweed_bucket
            from .load import run_load

            where = seaweed_bucket(os.path.join(work, "s3"), say) if a.backend == "s3" else nullcontext(None)
            with where as s3:
                figures["load"] = run_load(os.path.join(work, "load"), workers=a.workers, seconds=a.seconds,
                                           max_ops=a.max_ops, kills=a.kills, freshen=a.freshen_after,
                                           grace=a.grace or 2 * a.freshen_after, scopes=a.scopes, seed=seed,
                                           point_frac=a.point_kills, say=say, s3=s3)
        if "faults" in phases:
            from .faults import run_faults

            figures["faults"] = run_faults(os.path.join(work, "faults"), seed=seed, say=say)
        if "hostile" in phases:
            figures["hostile"] = run_hostile(say)
    finally:
        if not a.keep and not a.dir:
            subprocess.run(["rm", "-rf", work])
    figures["seconds"] = round(time.monotonic() - t0, 1)
    violations = 0
    if "load" in figures:
        violations += figures["load"]["violation_count"]
    if "faults" in figures:
        violations += sum(1 for s in figures["faults"]["scenarios"] if s["result"] == "FAIL")
    if "hostile" in figures:
        violations += figures["hostile"]["failed"]
    figures["violations"] = violations
    md = to_markdown(figures)
    print(md)
    if a.json_out:
        with open(a.json_out, "w") as fh:
            json.dump(figures, fh, indent=2, sort_keys=True, default=str)
    if a.markdown:
        with open(a.markdown, "w") as fh:
            fh.write(md)
    return 0 if violations == 0 else 1


def run_hostile(say) -> dict:
    """Run the hostile-input suite (tests/test_hostile.py) and count its cases."""
    say("hostile: running tests/test_hostile.py")
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rfE",
                           os.path.join(REPO, "tests", "test_hostile.py")], cwd=REPO, capture_output=True, text=True)
    tail = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else proc.stderr[-300:]
    counts = {}
    for part in tail.replace("=", "").split(" in ")[0].split(","):
        bits = part.strip().split()
        if len(bits) == 2 and bits[0].isdigit():
            counts[bits[1]] = int(bits[0])
    failed = counts.get("failed", 0) + counts.get("error", 0) + counts.get("errors", 0) + (proc.returncode not in (0, 1))
    failures = [line for line in proc.stdout.splitlines() if line.startswith(("FAILED", "ERROR"))]
    return {"passed": counts.get("passed", 0), "failed": failed, "skipped": counts.get("skipped", 0),
            "xfailed": counts.get("xfailed", 0), "summary": tail, "failures": failures[:20]}


if __name__ == "__main__":
    sys.exit(main())
