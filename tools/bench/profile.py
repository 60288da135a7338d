"""Where our time goes (issue 5 point 4): each operation in its own slowfs mount, with request counts and phases.

    .venv/bin/python -m tools.bench.profile [--tree synthetic|real|DIR] [--delay-ms 2] [--threads 32] [--local]

Runs ours in this process (no peer), one fresh mount per operation over the same backing directory, so the
request counts (from slowfs) belong to that operation alone. Phase times are wall-clock sums per function (a
function run in N threads adds up N calls). --local uses a plain directory instead of slowfs.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from collections import defaultdict
from contextlib import nullcontext
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

PHASES: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])
_lock = threading.Lock()


def timed(owner, name: str, label: str | None = None) -> None:
    orig = getattr(owner, name, None)
    if orig is None or getattr(orig, "_profiled", False):  # renamed since: profile what is there
        return

    @functools.wraps(orig)
    def wrapper(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return orig(*args, **kwargs)
        finally:
            dt = time.perf_counter() - t0
            with _lock:
                slot = PHASES[label or f"{getattr(owner, '__name__', owner)}.{name}"]
                slot[0] += 1
                slot[1] += dt

    wrapper._profiled = True
    setattr(owner, name, wrapper)


def instrument() -> None:
    import b10_transfer.core as core
    import b10_transfer.environment as environment
    import cas.blobstore as blobstore
    import cas.index as index
    import cas.load as load
    import cas.lock as lock
    import cas.roots as roots
    import cas.save as save
    import cas.scope as scope
    import cas.space as space

    timed(core, "environment", "core.environment()")
    timed(core, "key_for", "core.key_for()")
    timed(core, "require_free", "core.require_free()")
    timed(core, "acquire_slot", "core.acquire_slot()")
    timed(core, "_require_volume", "core._require_volume()")
    timed(core, "_incoming_bytes", "core._incoming_bytes()")
    timed(core, "BlobStore", "BlobStore() (open store)")
    timed(core, "Scope", "Scope()")
    timed(core, "save_tree", "save_tree (total)")
    timed(core, "load_tree", "load_tree (total)")
    timed(save, "scan", "save: scan local tree")
    timed(save, "_hash_all", "save: hash (index lookups + blake3)")
    timed(save, "_read_or_none", "save: read manifest")
    timed(save, "_read_current", "save: read manifest")
    timed(core, "nothing_new", "core: nothing_new pre-check")
    timed(save, "_commit", "save: commit (lock, manifest, blob, root)")
    if hasattr(save, "_repair_root"):
        timed(save, "_repair_root", "save: no-op root check")
    timed(save, "_upload", "save: upload one blob [per thread]")
    timed(save, "require_free", "save: require_free")
    timed(blobstore.BlobStore, "ensure_fresh", "store.ensure_fresh [per thread]")
    timed(blobstore.BlobStore, "server_now", "store.server_now")
    timed(blobstore.BlobStore, "put_bytes", "store.put_bytes (manifest blob)")
    timed(blobstore.BlobStore, "get_into", "store.get_into [per thread]")
    timed(blobstore.BlobStore, "get_bytes", "store.get_bytes (a pack) [per thread]")
    timed(save, "_write_pack", "save: write one pack [per thread]")
    timed(save, "_located", "save: find small files already packed")
    timed(index.Index, "write", "index.write")
    timed(index.Index, "_read", "index.read")
    timed(scope.Scope, "read_manifest", "scope.read_manifest")
    timed(scope.Scope, "write_manifest", "scope.write_manifest")
    timed(load, "_already_there", "load: local presence check [per file]")
    timed(load, "_restore_one", "load: restore one file [per thread]")
    timed(load, "_remove_old_temp_files", "load: sweep old temp files")
    timed(load, "refresh_root", "load: refresh_root")
    timed(load, "require_free", "load: require_free")
    timed(roots, "write_root", "roots.write_root")
    timed(lock.LockFile, "acquire", "LockFile.acquire")
    timed(lock.LockFile, "release", "LockFile.release")
    _ = (environment, space)


def _cpu_s(pid: int) -> float:
    """CPU seconds (user + system) of process `pid` so far."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return float("nan")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tree", default="synthetic")
    ap.add_argument("--delay-ms", type=float, default=2.0)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--local", action="store_true")
    ap.add_argument("--ops", default="first save,no-op save,full load,partial load,incremental save")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    from tools.bench.__main__ import TREES, add_new_files, copy_tree, remove_some, synth_tree, tree_files

    tree = Path(a.tree) if os.path.isdir(a.tree) else synth_tree(False) if a.tree == "synthetic" else TREES / "inductor"
    expected = tree_files(tree)
    run = Path(tempfile.mkdtemp(prefix="b10prof-", dir="/tmp"))
    report = {}
    try:
        backing, mnt = run / "backing", run / "mnt"
        backing.mkdir()
        mnt.mkdir()
        (backing / "model").mkdir()
        (backing / "org").mkdir()
        src, target = run / "src", run / "target"
        copy_tree(tree, src)
        vol = backing if a.local else mnt
        env = {"BASETEN_FS_ENABLED": "1", "B10FS_VOLUME_ROOT": str(vol), "TORCHINDUCTOR_CACHE_DIR": str(src),
               "LOCAL_WORK_DIR": str(run), "MIN_LOCAL_SPACE_MB": "512", "MIN_B10FS_SPACE_MB": "512",
               "MAX_CONCURRENT_SAVES": "8"}
        if a.threads:
            env["B10_TRANSFER_IO_THREADS"] = str(a.threads)
        os.environ.update(env)
        import torch  # noqa: F401

        import b10_transfer

        instrument()
        from tools.slowfs import mounted

        for op in a.ops.split(","):
            if op == "full load":
                shutil.rmtree(target, ignore_errors=True)
            if op == "partial load":
                remove_some(target, expected, seed=0)
            if op == "incremental save":
                add_new_files(src, expected, seed=0)
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(target if "load" in op else src)
            PHASES.clear()
            ctx = nullcontext() if a.local else mounted(backing, mnt, delay_ms=a.delay_ms)
            with ctx as m:
                server0 = _cpu_s(m.pid) if m is not None else 0.0
                client0 = sum(os.times()[:2])
                t0 = time.perf_counter()
                status = (b10_transfer.load_compile_cache if "load" in op else b10_transfer.save_compile_cache)()
                dt = time.perf_counter() - t0
                client_cpu = sum(os.times()[:2]) - client0
                server_cpu = _cpu_s(m.pid) - server0 if m is not None else 0.0
            counts = {} if m is None else {k: v for k, v in sorted(m.op_counts.items(), key=lambda kv: -kv[1])}
            report[op] = {"seconds": dt, "status": status.name, "requests": counts, "client_cpu_s": client_cpu,
                          "server_cpu_s": server_cpu,
                          "phases": {k: {"calls": v[0], "seconds": round(v[1], 4)} for k, v in PHASES.items()}}
            reqs = sum(v for k, v in counts.items() if not k.endswith("_bytes") and k != "in_flight_max")
            print(f"\n== {op}: {dt * 1000:.0f} ms, {status.name}, CPU: ours {client_cpu:.2f} s, slowfs server "
                  f"{server_cpu:.2f} s ({server_cpu / max(reqs, 1) * 1e6:.0f} us/request); {reqs} requests: "
                  + ", ".join(f"{k} {v}" for k, v in counts.items()))
            for k, (n, s) in sorted(PHASES.items(), key=lambda kv: -kv[1][1]):
                print(f"   {s * 1000:9.1f} ms  {n:5d}x  {k}")
    finally:
        shutil.rmtree(run, ignore_errors=True)
    if a.json:
        Path(a.json).write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
