"""Where ours spends an S3 operation's time (issue 13 point 5: the goals missed): one SeaweedFS behind the latency
proxy, each operation once, with a timeline of its requests and the store's checkpoints.

    .venv/bin/python -m tools.bench.s3profile [--rtt-ms 20] [--tree synthetic|real] [--reps 3]

Per operation: wall; CPU of this process (user + sys, obstore's Rust threads included) against s5cmd's (children's
rusage); requests by verb with their bytes; when the first and last request started; the store's checkpoints
(`cas/_faults.py`: hashed, uploaded, locked, manifest-renamed) as offsets from the start; and the requests issued after
the last blob upload (the commit's serial chain).
"""
from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
for p in (str(REPO), str(REPO / "tests")):
    if p not in sys.path:
        sys.path.insert(0, p)

from tools.bench.__main__ import add_new_files, copy_tree, real_tree, remove_some, synth_tree, tree_files  # noqa: E402
from tools.bench.s3bench import KEY, S5, THREADS, latency_proxy_process, requests_of  # noqa: E402

VERBS = ("get", "get_versioned", "open", "stat", "list", "put", "delete", "touch", "move", "now", "exists",
         "check_alive")


def timing_backend(inner):
    """A FaultyBackend that also records (start, end, verb, key, bytes) of every call."""
    from cas.faulty import FaultyBackend

    class Timed(FaultyBackend):
        pass

    tb = Timed(inner)
    tb.log = []
    lock = threading.Lock()

    def wrap(name):
        orig = getattr(FaultyBackend, name)

        def method(self, *args, **kwargs):
            t0 = time.perf_counter()
            verb = name
            try:
                out = orig(self, *args, **kwargs)
            except Exception as exc:  # logged (a 404 is a round trip too), then raised as it was
                verb, out = f"{name}!{type(exc).__name__}", None
                raise
            finally:
                size = (len(out) if isinstance(out, (bytes, bytearray))
                        else getattr(out, "size", 0) if name == "put" else 0)
                with lock:
                    self.log.append((t0, time.perf_counter(), verb, args[0] if args else "", size))
            return out

        return method

    for name in VERBS:
        setattr(Timed, name, wrap(name))
    return tb


def cpu() -> tuple[float, float]:
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime, kids.ru_utime + kids.ru_stime


def profile_op(op, ep, bucket, prefix, local) -> dict:
    import cas._faults as faults
    from cas import BlobStore, Scope, load_tree, save_tree
    from cas.s3 import S3Backend

    marks: list[tuple[str, float]] = []
    real_checkpoint = faults.checkpoint

    def checkpoint(point: str) -> None:
        marks.append((point, time.perf_counter()))
        real_checkpoint(point)

    faults.checkpoint = checkpoint
    creds = ep.credentials()
    c0, t0 = cpu()[0], time.perf_counter()
    sb = timing_backend(S3Backend(f"s3://{bucket}/{prefix}/org/b10_cas", credentials=creds))
    cb = timing_backend(S3Backend(f"s3://{bucket}/{prefix}/model/compile_cache", credentials=creds))
    try:
        if op == "save":
            save_tree(local, BlobStore(sb, create=True), Scope(cb, create=True), KEY, threads=THREADS)
        else:
            load_tree(local, BlobStore(sb, create=False), Scope(cb), KEY, threads=THREADS)
    finally:
        faults.checkpoint = real_checkpoint
    wall, cpu_s = time.perf_counter() - t0, cpu()[0] - c0
    reqs = sorted(sb.log + cb.log)
    blob_puts = [r for r in reqs if r[2] == "put" and "/blobs/" in f"/{r[3]}"]
    blob_gets = [r for r in reqs if r[2] in ("get", "open") and "blobs/" in r[3]]
    after = [r for r in reqs if blob_puts and r[0] >= max(b[1] for b in blob_puts)]
    first_marks = {}
    for name, t in marks:
        first_marks.setdefault(name, t - t0)
    return {
        "wall": wall, "cpu": cpu_s, "requests": requests_of(sb.calls + cb.calls),
        "verbs": dict(sb.calls + cb.calls),
        "first_request": reqs[0][0] - t0 if reqs else None,
        "blob_transfer": (min(r[0] for r in blob_puts or blob_gets) - t0,
                          max(r[1] for r in blob_puts or blob_gets) - t0) if (blob_puts or blob_gets) else None,
        "blob_bytes": sum(r[4] for r in blob_puts or blob_gets),
        "blob_requests": len(blob_puts or blob_gets),
        "longest_blob_request": max((r[1] - r[0] for r in blob_puts or blob_gets), default=0.0),
        "after_last_upload": [(round(r[0] - t0, 3), r[2], r[3].rsplit("/", 2)[-2] if "/" in r[3] else r[3])
                              for r in after],
        "marks": {k: round(v, 3) for k, v in first_marks.items()},
        "timeline": [(round((r[0] - t0) * 1000), round((r[1] - t0) * 1000), r[2], _short_key(r[3])) for r in reqs],
    }


def _short_key(key: str) -> str:
    """The layout part of a key, with ids cut to 8 characters."""
    parts = [p[:8] if len(p) > 16 else p for p in key.split("/")]
    return "/".join(parts[-3:])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rtt-ms", type=float, default=20.0)
    ap.add_argument("--tree", default="synthetic")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--timeline", action="store_true",
                    help="also print every request of the middle rep (ms from its start)")
    a = ap.parse_args(argv)
    from s3_servers import S3Endpoint, seaweed_server

    tree = synth_tree(False) if a.tree == "synthetic" else real_tree() if a.tree == "real" else Path(a.tree)
    expected = tree_files(tree)
    work = Path(tempfile.mkdtemp(prefix="b10s3prof-", dir="/tmp"))
    rows: dict[str, list[dict]] = {}
    try:
        with seaweed_server(work / "seaweed") as server, latency_proxy_process(server.endpoint.url, a.rtt_ms) as url:
            base = server.endpoint
            ep = S3Endpoint(base.kind, url, base.access_key_id, base.secret_access_key, base.region)
            bucket = "prof"
            base.create_bucket(bucket)
            s5 = S5(ep, bucket)
            for rep in range(a.reps):
                src, dst, s5dst = work / "src", work / "dst", work / "s5dst"
                copy_tree(tree, src)
                for d in (dst, s5dst):
                    shutil.rmtree(d, ignore_errors=True)
                s5dst.mkdir()
                pre = f"p{rep}"
                rows.setdefault("first save", []).append(profile_op("save", ep, bucket, pre, src))
                rows.setdefault("full load", []).append(profile_op("load", ep, bucket, pre, dst))
                remove_some(dst, expected, seed=rep)
                rows.setdefault("partial load (10% missing)", []).append(profile_op("load", ep, bucket, pre, dst))
                add_new_files(src, expected, seed=rep)
                rows.setdefault("incremental save", []).append(profile_op("save", ep, bucket, pre, src))
                for kind, local in (("cp up", src), ("cp down", s5dst)):
                    c0, t0 = cpu()[1], time.perf_counter()
                    s5.run(kind, local, pre + "/raw")
                    rows.setdefault(f"s5cmd {kind}", []).append({"wall": time.perf_counter() - t0,
                                                                 "cpu": cpu()[1] - c0})
                shutil.rmtree(src)
                print(f"rep {rep + 1}/{a.reps} done (load average {os.getloadavg()[0]:.1f})", file=sys.stderr)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"added RTT {a.rtt_ms:g} ms, tree {a.tree} ({len(expected)} files), medians of {a.reps}; "
          f"load average {os.getloadavg()[0]:.1f}")
    for op, rs in rows.items():
        wall, c = statistics.median(r["wall"] for r in rs), statistics.median(r["cpu"] for r in rs)
        line = f"{op:28s} wall {wall * 1000:7.0f} ms  cpu {c * 1000:7.0f} ms"
        r = rs[len(rs) // 2]
        if "requests" in r:
            bt = r["blob_transfer"]
            line += (f"  requests {r['requests']:3d}  {dict(Counter(r['verbs']))}\n{'':30s}first request at "
                     f"{r['first_request'] * 1000:.0f} ms; blob requests {r['blob_requests']} ("
                     f"{r['blob_bytes'] / 1e6:.1f} MB) from {bt[0] * 1000:.0f} to {bt[1] * 1000:.0f} ms, longest "
                     f"{r['longest_blob_request'] * 1000:.0f} ms; checkpoints {r['marks']}")
            if r["after_last_upload"]:
                line += f"\n{'':30s}after the last blob upload: {r['after_last_upload']}"
            if a.timeline:
                line += "".join(f"\n{'':30s}{t0:5d}-{t1:5d} ms  {verb:8s} {key}" for t0, t1, verb, key in r["timeline"])
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
