"""Demo: torch.compile a small model on the CPU twice, the second time from a cache restored via the store.

    python -m b10_transfer.demo [--volume ./.demo-volume]

A local directory stands in for the b10fs volume (`B10FS_VOLUME_ROOT`); `<volume>/model` and `<volume>/org` play the
deployment and org mounts. Steps, each compile in a fresh process so no in-memory cache helps:
  1. replica 1: load (nothing there yet) -> compile -> save
  2. clear the local Inductor cache
  3. replica 2: load -> compile again (Inductor cache hits) -> save (nothing new)
and prints both compile times and Inductor's hit/miss counters.

`python -m b10_transfer.demo replica --shapes 2,4 [--load] [--save]` is one replica on its own (used by the tests);
it prints a single line `B10_DEMO_RESULT {json}`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULT_MARKER = "B10_DEMO_RESULT "
# Marks a directory as created by this demo: it is wiped at the start of each run, and only if the marker is there.
VOLUME_MARKER = ".b10-demo-volume"
DEFAULT_VOLUME = "./.demo-volume"
# A dev machine's disk is not a shared volume: the production floors (100 GB free on the volume, 4 GB locally)
# would refuse a demo on a small disk. Used only where the caller has not set the variables.
DEMO_SPACE_FLOOR_MB = "256"
# Small enough to compile in ~20 s on 2 CPU cores, big enough to produce several fused C++ kernels.
_WIDTH = 32
_COUNTERS = {
    "fxgraph_cache_hit": ("inductor", "fxgraph_cache_hit"),
    "fxgraph_cache_miss": ("inductor", "fxgraph_cache_miss"),
    "autograd_cache_hit": ("aot_autograd", "autograd_cache_hit"),
    "autograd_cache_miss": ("aot_autograd", "autograd_cache_miss"),
}


def run_replica(shapes: list[int], load: bool, save: bool) -> dict:
    """One model server start: optional load, compile + first call per batch size, optional save."""
    import torch
    from torch._dynamo.utils import counters

    import b10_transfer

    result: dict = {"shapes": shapes}
    if load:
        start = time.perf_counter()
        result["load"] = b10_transfer.load_compile_cache().name
        result["load_s"] = time.perf_counter() - start

    torch.manual_seed(0)
    model = _build_model(_WIDTH).eval()
    compiled = torch.compile(model)
    start = time.perf_counter()
    max_err = 0.0
    with torch.no_grad():
        for batch in shapes:
            x = torch.randn(batch, _WIDTH)
            max_err = max(max_err, (compiled(x) - model(x)).abs().max().item())
    result["compile_s"] = time.perf_counter() - start
    result["max_abs_err"] = max_err  # restored kernels must compute what eager computes
    result["counters"] = {name: int(counters[group][key]) for name, (group, key) in _COUNTERS.items()}

    if save:
        start = time.perf_counter()
        result["save"] = b10_transfer.save_compile_cache().name
        result["save_s"] = time.perf_counter() - start
    return result


def _build_model(width: int):
    import torch

    class Block(torch.nn.Module):
        """Linear -> GELU -> Linear -> residual -> LayerNorm: the shape of a transformer MLP."""

        def __init__(self, width: int):
            super().__init__()
            self.up = torch.nn.Linear(width, 2 * width)
            self.down = torch.nn.Linear(2 * width, width)
            self.norm = torch.nn.LayerNorm(width)

        def forward(self, x):
            return self.norm(self.down(torch.nn.functional.gelu(self.up(x))) + x)

    return Block(width)


def spawn_replica(env: dict[str, str], shapes: list[int], *, load: bool, save: bool, timeout: float = 600) -> dict:
    """Run `run_replica` in a fresh interpreter with `env` and return its result (wall time added as `wall_s`)."""
    cmd = [sys.executable, "-m", "b10_transfer.demo", "replica", "--shapes", ",".join(map(str, shapes))]
    cmd += ["--load"] if load else []
    cmd += ["--save"] if save else []
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    wall = time.perf_counter() - start
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT_MARKER):
            result = json.loads(line[len(RESULT_MARKER):])
            result["wall_s"] = wall
            result["log"] = proc.stderr
            return result
    raise RuntimeError(f"replica failed (exit {proc.returncode}):\n{proc.stdout}\n{proc.stderr}")


def demo_env(volume: Path, local_cache: Path, base: dict[str, str] | None = None) -> dict[str, str]:
    """Environment pointing every setting at `volume` (as /cache) and `local_cache` (as the Inductor cache)."""
    env = dict(os.environ if base is None else base)
    env.update(
        BASETEN_FS_ENABLED="1",
        B10FS_VOLUME_ROOT=str(volume),
        TORCHINDUCTOR_CACHE_DIR=str(local_cache),
        LOCAL_WORK_DIR=str(local_cache.parent),
    )
    # Settings derived from the volume root unless the caller chose them.
    for name in ("B10FS_CACHE_DIR", "B10FS_ORG_CACHE_DIR"):
        env.pop(name, None)
    env.setdefault("MIN_B10FS_SPACE_MB", DEMO_SPACE_FLOOR_MB)
    env.setdefault("MIN_LOCAL_SPACE_MB", DEMO_SPACE_FLOOR_MB)
    return env


def prepare_volume(volume: Path) -> None:
    """Create (or empty, if this demo created it) the stand-in volume with its two mount points."""
    if volume.exists() and any(volume.iterdir()):
        if not (volume / VOLUME_MARKER).exists():
            raise SystemExit(f"{volume} exists and was not created by this demo; pass another --volume")
        shutil.rmtree(volume)
    (volume / "model").mkdir(parents=True, exist_ok=True)
    (volume / "org").mkdir(parents=True, exist_ok=True)
    (volume / VOLUME_MARKER).write_text("created by python -m b10_transfer.demo; deleted by its next run\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m b10_transfer.demo", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command")
    rep = sub.add_parser("replica", help="one replica: load, compile, save (prints B10_DEMO_RESULT json)")
    rep.add_argument("--shapes", default="2")
    rep.add_argument("--load", action="store_true")
    rep.add_argument("--save", action="store_true")
    parser.add_argument("--volume", default=DEFAULT_VOLUME, help="directory standing in for /cache")
    args = parser.parse_args(argv)

    if args.command == "replica":
        result = run_replica([int(s) for s in args.shapes.split(",")], args.load, args.save)
        print(RESULT_MARKER + json.dumps(result), flush=True)
        return 0
    return _demo(Path(args.volume).resolve())


def _demo(volume: Path) -> int:
    prepare_volume(volume)
    local = Path(tempfile.mkdtemp(prefix="b10-demo-")) / "inductor"
    env = demo_env(volume, local)
    shapes = [2, 8]
    print(f"volume (stands in for /cache): {volume}\nlocal Inductor cache: {local}\n", flush=True)
    try:
        print("1) replica 1: load -> torch.compile (cold) -> save ...", flush=True)
        cold = spawn_replica(env, shapes, load=True, save=True)
        _show(cold)

        print("2) clearing the local Inductor cache ...", flush=True)
        os.environ.update({k: env[k] for k in ("BASETEN_FS_ENABLED", "B10FS_VOLUME_ROOT", "TORCHINDUCTOR_CACHE_DIR")})
        from . import clear_local_cache

        clear_local_cache()
        print(f"   local cache present: {local.exists()}\n", flush=True)

        print("3) replica 2 (fresh process): load -> torch.compile (warm) -> save ...", flush=True)
        warm = spawn_replica(env, shapes, load=True, save=True)
        _show(warm)

        speedup = cold["compile_s"] / warm["compile_s"] if warm["compile_s"] else float("inf")
        print(
            f"compile + first calls: cold {cold['compile_s']:.1f} s, warm {warm['compile_s']:.1f} s "
            f"({speedup:.1f}x); load {warm['load_s']:.2f} s, save {cold['save_s']:.2f} s\n"
            f"warm Inductor counters: FX graph hits {warm['counters']['fxgraph_cache_hit']}, "
            f"misses {warm['counters']['fxgraph_cache_miss']}; AOTAutograd hits "
            f"{warm['counters']['autograd_cache_hit']}",
            flush=True,
        )
        ok = (
            warm["load"] == "SUCCESS"
            and warm["counters"]["fxgraph_cache_miss"] == 0
            and warm["counters"]["fxgraph_cache_hit"] > 0
        )
        print("RESULT: " + ("OK (warm start served from the restored cache)" if ok else "UNEXPECTED (see above)"))
        return 0 if ok else 1
    finally:
        shutil.rmtree(local.parent, ignore_errors=True)


def _show(r: dict) -> None:
    c = r["counters"]
    print(
        f"   load={r.get('load')} ({r.get('load_s', 0):.2f} s)  compile+run={r['compile_s']:.1f} s  "
        f"save={r.get('save')} ({r.get('save_s', 0):.2f} s)  process={r['wall_s']:.1f} s\n"
        f"   fxgraph hit/miss {c['fxgraph_cache_hit']}/{c['fxgraph_cache_miss']}, "
        f"aot_autograd hit/miss {c['autograd_cache_hit']}/{c['autograd_cache_miss']}\n",
        flush=True,
    )


if __name__ == "__main__":
    sys.exit(main())
