"""Where `cas gc`, `cas check` and `cas stats` spend their time on S3 at N deployments (issue 14): the organisation
of tools/bench/scale.py on a SeaweedFS bucket, each command run once in this process through the delaying proxy,
with every request timed (tools/bench/s3profile.timing_backend).

    .venv/bin/python -m tools.bench.scale_profile [--n 1000] [--rtt-ms 5] [--server seaweedfs|moto]

Per command: wall, CPU of this process, requests by verb; then per (key area, verb) the count, when the first started
and the last ended (seconds from the command's start), the mean request time and the mean number in flight. A `list`
is timed as the call that returns its iterator, so its own times read 0: its span shows in the gap before the next
area.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
for _p in (str(REPO), str(REPO / "tests")):
    if _p not in sys.path:
        sys.path.insert(0, _p)


def profile(fn, backend) -> dict:
    from cas import BlobStore

    c0, t0 = os.times(), time.perf_counter()
    fn(BlobStore(backend, create=False))
    wall, c1 = time.perf_counter() - t0, os.times()
    areas: dict[str, list[float]] = {}
    for start, end, verb, key, _ in sorted(backend.log):
        a = areas.setdefault(f"{key.split('/')[0] or '(root)'} {verb}", [1e9, 0.0, 0, 0.0])
        a[0], a[1] = min(a[0], start - t0), max(a[1], end - t0)
        a[2] += 1
        a[3] += end - start
    return {"wall": wall, "cpu": c1.user - c0.user + c1.system - c0.system, "requests": len(backend.log),
            "verbs": dict(Counter(v for _, _, v, _, _ in backend.log)), "areas": areas}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tools.bench.scale_profile", description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--rtt-ms", type=float, default=5.0)
    ap.add_argument("--server", choices=("seaweedfs", "moto"), default="seaweedfs")
    a = ap.parse_args(argv)
    from cas.check import check
    from cas.gc import collect
    from cas.s3 import S3Backend
    from cas.stats import compute
    from tools.bench import scale, scale_s3
    from tools.bench.s3profile import timing_backend

    work = Path(tempfile.mkdtemp(prefix="b10scale-prof-"))
    with scale_s3.s3_site(a.server, a.rtt_ms, work) as site:
        org = scale.Org(site=site)
        print(f"N={a.n}: built in {org.grow(a.n):.1f} s; {site.version}, +{a.rtt_ms:g} ms RTT, load average "
              f"{os.getloadavg()[0]:.1f}", flush=True)
        for name, fn in (("gc", collect), ("check", check), ("stats", compute)):
            tb = timing_backend(S3Backend(site.url(org.org_prefix), credentials=site.measured.credentials()))
            p = profile(fn, tb)
            print(f"{name}: wall {p['wall']:.2f} s, CPU {p['cpu']:.2f} s, {p['requests']} requests {p['verbs']}")
            for area, (lo, hi, n, busy) in sorted(p["areas"].items(), key=lambda kv: kv[1][0]):
                print(f"    {area:22s} {n:6d}  {lo:6.2f} -> {hi:6.2f} s  mean {busy / n * 1e3:6.1f} ms  "
                      f"in flight {busy / max(hi - lo, 1e-9):5.1f}")
            tb.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
