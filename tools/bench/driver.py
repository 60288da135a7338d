"""Benchmark worker: run with an implementation's own python; calls b10_transfer's public API on command.

    <venv>/bin/python tools/bench/driver.py ours|peer

Protocol (one JSON object per line): the worker first prints {"ready": ..., "module": <b10_transfer.__file__>}, then
for each command line {"op": "load"|"save", "env": {...}, "start_at": <unix s, optional>} it sets the environment
variables (both implementations read them at call time), waits until `start_at` (so concurrent loaders start
together), calls load_compile_cache() / save_compile_cache(), and prints
{"status": NAME, "seconds": perf_counter delta, "t_start": unix s, "t_end": unix s}. Logging goes to stderr; only
this protocol uses stdout. Imports (torch included: both implementations need it for the environment key) happen
before the first command, as in a model server, so they are not timed.

The peer accepts B10FS_CACHE_DIR only under /cache/model and archive paths only under /app or /cache. The benchmark
keeps its volumes elsewhere, so for the peer `validate_path_security` is wrapped to map allowed prefixes starting
with /cache to $BENCH_CACHE_ROOT and /app to $BENCH_APP_ROOT; the check itself still runs, nothing else changes.
"""
from __future__ import annotations

import json
import os
import sys
import time


def _shim_peer() -> None:
    import b10_transfer

    def mapped(prefix: str) -> str:
        for fake, var in (("/cache", "BENCH_CACHE_ROOT"), ("/app", "BENCH_APP_ROOT")):
            root = os.environ.get(var)
            if root and (prefix == fake or prefix.startswith(fake + "/")):
                return root + prefix[len(fake):]
        return prefix

    for name in ("utils", "config", "archive", "core", "cache"):
        mod = sys.modules.get(f"b10_transfer.{name}")
        orig = getattr(mod, "validate_path_security", None)
        if orig is None or getattr(orig, "_bench_shim", False):
            continue

        def shim(path, allowed_prefixes, *args, _orig=orig, **kwargs):
            return _orig(path, [mapped(p) for p in allowed_prefixes], *args, **kwargs)

        shim._bench_shim = True
        setattr(mod, "validate_path_security", shim)
    # constants are bound at import; the config property reads REQUIRED_TORCH_CACHE_DIR_PREFIX from its module
    _ = b10_transfer


def main() -> int:
    impl = sys.argv[1]
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # anything an implementation prints goes to stderr
    sys.stdout = sys.stderr
    import logging

    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    import torch  # noqa: F401  (a model server has it imported before loading its cache)

    import b10_transfer

    if impl == "peer":
        import b10_transfer.archive  # noqa: F401
        import b10_transfer.config  # noqa: F401

        _shim_peer()
    try:
        from importlib import metadata

        version = metadata.version("b10-transfer") if impl == "peer" else metadata.version("b10-transfer-cas")
    except Exception:
        version = "?"
    proto.write(json.dumps({"ready": impl, "module": b10_transfer.__file__, "version": version,
                            "python": sys.executable}) + "\n")
    for line in sys.stdin:
        if not line.strip():
            continue
        cmd = json.loads(line)
        for k, v in cmd.get("env", {}).items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = str(v)
        fn = {"load": b10_transfer.load_compile_cache, "save": b10_transfer.save_compile_cache}[cmd["op"]]
        if cmd.get("start_at"):
            delay = cmd["start_at"] - time.time()
            if delay > 0:
                time.sleep(delay)
        t_start = time.time()
        t0 = time.perf_counter()
        try:
            status = fn()
            name = getattr(status, "name", str(status))
            err = None
        except BaseException as exc:  # noqa: BLE001 - reported, the harness decides
            name, err = "EXCEPTION", f"{type(exc).__name__}: {exc}"
        seconds = time.perf_counter() - t0
        proto.write(json.dumps({"status": name, "seconds": seconds, "t_start": t_start, "t_end": time.time(),
                                "error": err}) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
