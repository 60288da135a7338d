"""GPU end to end: time-to-ready of fresh replicas, ours vs the peer vs no cache (issue 8).

    python -m tools.gpu_e2e --out DIR [--impl ours,peer] [--models llama,llama-autotune,timm]
                            [--quick] [--device cuda|cpu] [--cache-root /cache] [--export DIR]
    python -m tools.gpu_e2e merge --out DIR RESULTS.json [RESULTS.json ...]

Every measurement is a fresh process (worker.py, run by path) with its own environment;
see docs/benchmarks.md, section "GPU end to end".
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from concurrent.futures import ThreadPoolExecutor

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
WORKER = os.path.join(HERE, "worker.py")

sys.path.insert(0, HERE)
import e2e_models  # noqa: E402
import report  # noqa: E402

# Variables the measured processes must not inherit from whoever runs the tool.
SCRUB = ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "TRITON_CACHE_DIR", "TRITON_HOME",
         "TORCHINDUCTOR_CACHE_DIR", "CUDA_CACHE_PATH", "B10FS_CACHE_DIR", "B10FS_ORG_CACHE_DIR",
         "LOCAL_WORK_DIR", "BASETEN_FS_ENABLED", "TORCHINDUCTOR_FX_GRAPH_REMOTE_CACHE",
         "TORCHINDUCTOR_AUTOGRAD_REMOTE_CACHE", "TORCHINDUCTOR_AUTOTUNE_REMOTE_CACHE",
         "TORCHINDUCTOR_FORCE_DISABLE_CACHES", "B10FS_VOLUME_ROOT")

# Same for both implementations, so neither trips over the peer's space checks (its
# default asks for max(50 x 1024 MB, 100 GB) free on the volume, more than the device's disk).
IMPL_ENV = {"BASETEN_FS_ENABLED": "1", "MIN_B10FS_SPACE_MB": "1024",
            "MIN_LOCAL_SPACE_MB": "1024", "MAX_CONCURRENT_SAVES": "1"}


def log(msg: str) -> None:
    print(time.strftime("%H:%M:%S"), msg, flush=True)


def walk(path: str) -> dict:
    files = size = 0
    for d in path if isinstance(path, (list, tuple)) else [path]:
        if not d or not os.path.isdir(d):
            continue
        for root, _dirs, names in os.walk(d):
            for n in names:
                try:
                    size += os.lstat(os.path.join(root, n)).st_size
                    files += 1
                except OSError:
                    pass
    return {"files": files, "bytes": size}


def pip_target(python: str, target: str, wheels: list[str]) -> None:
    if not wheels:
        return
    os.makedirs(target, exist_ok=True)
    cmd = [python, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
           "--disable-pip-version-check", "--upgrade", "--target", target, *wheels]
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PIP_CONSTRAINT")}
    subprocess.run(cmd, check=True, env=env)


def importable(python: str, mod: str) -> bool:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    r = subprocess.run([python, "-c", f"import {mod}"], env=env, cwd="/",
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return r.returncode == 0


class Runner:
    def __init__(self, args):
        self.a = args
        self.out = os.path.abspath(args.out)
        self.python = args.python
        self.run_id = time.strftime("%Y%m%d-%H%M%S") + f"-{os.getpid()}"
        root = args.cache_root or os.path.join(self.out, "cache")
        self.cache_root = os.path.abspath(root)
        self.base = f"gpu_e2e-{self.run_id}"
        os.makedirs(os.path.join(self.out, "logs"), exist_ok=True)
        os.makedirs(os.path.join(self.out, "specs"), exist_ok=True)
        self.sites: dict[str, str] = {}
        self.results: dict = {"args": vars(args), "run_id": self.run_id,
                              "cache_root": self.cache_root, "models": {}}
        self.extra_env = dict(kv.split("=", 1) for kv in args.env)
        self.t0 = time.time()

    # ---- import paths of the two implementations -------------------------------------
    def prepare_sites(self, impls: list[str]) -> None:
        wheels = os.path.abspath(self.a.wheels) if self.a.wheels else None
        if "peer" in impls:
            site = self.a.peer_site
            if not site:
                found = sorted(glob.glob(os.path.join(wheels or "", "b10_transfer-*.whl")))
                if not found:
                    raise SystemExit("peer: no --peer-site and no b10_transfer-*.whl in --wheels "
                                     f"({wheels}); run: pip download --no-deps b10-transfer -d wheels/")
                site = os.path.join(self.out, "site", "peer")
                shutil.rmtree(site, ignore_errors=True)
                pip_target(self.python, site, [found[-1]])
            self.sites["peer"] = os.path.abspath(site)
            log(f"peer import path: {self.sites['peer']}")
        if "ours" in impls:
            paths = [REPO]
            deps = os.path.join(self.out, "site", "deps")
            need = [m for m in ("blake3", "zstandard", "msgpack", "filelock")
                    if not importable(self.python, m)]
            if need:
                if not wheels:
                    raise SystemExit(f"ours needs {need}: pass --wheels DIR holding their wheels")
                whl = []
                for m in need:
                    got = sorted(glob.glob(os.path.join(wheels, f"{m}-*.whl")))
                    if not got:
                        raise SystemExit(f"ours needs {m}: no {m}-*.whl in {wheels}")
                    whl.append(got[-1])
                shutil.rmtree(deps, ignore_errors=True)
                pip_target(self.python, deps, whl)
                paths.append(deps)
            self.sites["ours"] = os.pathsep.join(paths)
            log(f"ours import path: {self.sites['ours']}")

    # ---- one fresh process ---------------------------------------------------------------
    def dirs(self, model: str, case: str) -> dict:
        r = self.cache_root
        return {
            "local": os.path.join(r, "local", self.base, model, case),
            "work": os.path.join(r, "work", self.base, model, case),
        }

    def volume(self, model: str, name: str) -> dict:
        r = self.cache_root
        return {"B10FS_CACHE_DIR": os.path.join(r, "model", self.base, model, name, "compile_cache"),
                "B10FS_ORG_CACHE_DIR": os.path.join(r, "org", self.base, model, name)}

    def spawn(self, verb: str, model: str, case: str, spec: dict, *, local: str | None,
              impl: str | None, vol: dict | None, case_env: dict | None = None) -> dict:
        if self.over_budget():
            res = {"case": case, "ok": False, "skipped": True,
                   "error": f"not run: --budget-s {self.a.budget_s:.0f} s spent"}
            log(report.one_line(model, case, res))
            return res
        d = self.dirs(model, case)
        local = local or d["local"]
        env = {k: v for k, v in os.environ.items() if k not in SCRUB}
        env.update({
            "PYTHONUNBUFFERED": "1",
            "PYTHONDONTWRITEBYTECODE": "1",
            "E2E_CACHE_ROOT": self.cache_root,
            "TORCHINDUCTOR_CACHE_DIR": os.path.join(local, "inductor"),
            # keep Triton's and the CUDA driver's own caches per case too, so that no
            # warmth leaks from one case into the next outside the directory we measure
            "TRITON_HOME": os.path.join(local, "triton_home"),
            "CUDA_CACHE_PATH": os.path.join(local, "nv"),
        })
        os.makedirs(env["TRITON_HOME"], exist_ok=True)
        if impl:
            env["PYTHONPATH"] = self.sites[impl]
            env.update(IMPL_ENV)
            # ours: the volume root its path checks are relative to (default /cache); the
            # peer has no such variable and gets the path shim in worker.py instead
            env["B10FS_VOLUME_ROOT"] = self.cache_root
            os.makedirs(d["work"], exist_ok=True)
            env["LOCAL_WORK_DIR"] = d["work"]
            env.update(vol or {})
            for k in ("B10FS_CACHE_DIR", "B10FS_ORG_CACHE_DIR"):
                if vol and k in vol:
                    os.makedirs(vol[k], exist_ok=True)
        env.update(self.extra_env)
        env.update(case_env or {})
        if impl:
            env.update(dict(kv.split("=", 1) for kv in getattr(self.a, f"env_{impl}")))
        spec = dict(spec, case=case, device=self.a.device, impl=impl,
                    result=os.path.join(self.out, "specs", f"{model}-{case}.result.json"))
        if impl == "peer":
            spec["expect_impl_under"] = self.sites["peer"]
        elif impl == "ours":
            spec["expect_impl_under"] = REPO
        spec_path = os.path.join(self.out, "specs", f"{model}-{case}.json")
        with open(spec_path, "w") as f:
            json.dump(spec, f, indent=1)
        logf = os.path.join(self.out, "logs", f"{model}-{case}.log")
        if os.path.exists(spec["result"]):
            os.unlink(spec["result"])
        with open(logf, "w") as lf:
            env["E2E_T0"] = repr(time.time())
            t0 = time.time()
            try:
                # cwd outside the repo: nothing there may shadow the implementation under test
                rc = subprocess.run([self.python, WORKER, verb, spec_path], env=env,
                                    cwd=self.out, stdout=lf, stderr=subprocess.STDOUT,
                                    timeout=self.a.case_timeout).returncode
            except subprocess.TimeoutExpired:
                rc = "timeout"
            wall = time.time() - t0
        try:
            with open(spec["result"]) as f:
                res = json.load(f)
        except (OSError, ValueError):
            res = {"case": case, "ok": False, "error": f"no result (rc={rc})"}
        res["rc"] = rc
        res["process_wall_s"] = wall
        res["env"] = {k: env[k] for k in sorted(env) if k in (
            "TORCHINDUCTOR_CACHE_DIR", "B10FS_CACHE_DIR", "B10FS_ORG_CACHE_DIR", "LOCAL_WORK_DIR",
            "PYTHONPATH", "TRITON_HOME", "MAX_CONCURRENT_SAVES", "B10FS_VOLUME_ROOT")}
        if vol:
            res["volume"] = {
                "manifests": walk(vol.get("B10FS_CACHE_DIR", "")),
                "blobs": walk(vol.get("B10FS_ORG_CACHE_DIR", "")),
            }
            res["volume"]["total"] = {
                k: res["volume"]["manifests"][k] + res["volume"]["blobs"][k] for k in ("files", "bytes")}
        if not res.get("ok"):
            try:
                with open(logf) as lf:
                    res["log_tail"] = lf.read()[-3000:]
            except OSError:
                pass
        log(report.one_line(model, case, res))
        return res

    # ---- the scenarios of one model ------------------------------------------------------
    def run_model(self, model: str, impls: list[str], cases: set[str]) -> None:
        size = self.a.size
        p = e2e_models.preset(model, size)
        allshapes = p["set1"] + p["set2"]
        mres: dict = {"preset": p, "size": size, "describe": e2e_models.describe(p), "cases": {}}
        self.results["models"][model] = mres
        C = mres["cases"]
        probe = True  # count autotuning work in every case (cheap; needed to compare)

        def spec(shapes, **kw):
            return dict(preset=p, shapes=shapes, probe_autotune=probe, **kw)

        log(f"== {model} ({size}): {mres['describe']}")
        cold_local = self.dirs(model, "cold")["local"]
        if "baseline" in cases or "single" in cases:
            C["prime"] = self.spawn("run", model, "prime", spec(allshapes[:1], prime=True),
                                    local=None, impl=None, vol=None)
            C["cold"] = self.spawn("run", model, "cold", spec(allshapes), local=cold_local,
                                   impl=None, vol=None)
            C["cold"]["local_cache"] = C["cold"].get("local_after")
            C["hot"] = self.spawn("run", model, "hot", spec(allshapes), local=cold_local,
                                  impl=None, vol=None)
        self.flush()
        if "ours" in impls:  # first: the device time of a run may end before the peer's cases
            self.run_precompile(model, C, spec, allshapes, p, cases & {"precompile", "pc-repeat"})
        for impl in impls:
            if "single" in cases and C.get("cold", {}).get("ok"):
                vol = self.volume(model, f"{impl}-single")
                # save from a pristine copy of the cold run's cache: a save may write into the
                # directory it saves (ours keeps an index there), which must not reach the other
                seed_local = self.dirs(model, f"{impl}-seed")["local"]
                shutil.rmtree(seed_local, ignore_errors=True)
                shutil.copytree(os.path.join(cold_local, "inductor"),
                                os.path.join(seed_local, "inductor"), symlinks=True)
                C[f"{impl}-seed"] = self.spawn(
                    "save", model, f"{impl}-seed", spec([]), local=seed_local, impl=impl, vol=vol)
                C[f"{impl}-load"] = self.spawn(
                    "run", model, f"{impl}-load", spec(allshapes, load=True, save=True),
                    local=None, impl=impl, vol=vol)
                self.flush()
            if "replicas" in cases:
                vol = self.volume(model, f"{impl}-replicas")
                # family: the replicas' deployment is a member, so its saves record it (issue 15)
                fam = self.family_env(model) if impl == "ours" and "family" in cases else None
                C[f"{impl}-A"] = self.spawn("run", model, f"{impl}-A", spec(p["set1"], save=True),
                                            local=None, impl=impl, vol=vol, case_env=fam)
                C[f"{impl}-B"] = self.spawn("run", model, f"{impl}-B",
                                            spec(allshapes, load=True, save=True),
                                            local=None, impl=impl, vol=vol, case_env=fam)
                if "no-C" not in cases:  # no-C: A and B only (a volume for pc-seed)
                    C[f"{impl}-C"] = self.spawn("run", model, f"{impl}-C", spec(allshapes, load=True),
                                                local=None, impl=impl, vol=vol, case_env=fam)
                self.flush()
        if "ours" in impls:
            self.run_warm_starts(model, C, spec, allshapes, cases & {"family", "pod"})
            self.run_precompile(model, C, spec, allshapes, p, cases & {"pc-hot", "pc-prof", "pc-seed"})

    def family_env(self, model: str) -> dict:
        return {"B10_TRANSFER_CACHE_FAMILY": f"e2e-{model}"}

    def run_warm_starts(self, model: str, C: dict, spec, allshapes: list, cases: set[str]) -> None:
        """Issue 15, after the ours replicas (A: set 1, B: sets 1+2, both saved):
        "family": a new deployment (its own, empty scope; the same org store) of the same family:
        its first replica (fam-A) starts from its siblings' manifests, its second (fam-B) from its
        own; "pod": 4 ranks started together on one empty local directory of the replicas'
        deployment, and 4 ranks together on the hot local directory (no library) to compare."""
        if not C.get("ours-B", {}).get("ok"):
            return
        rep = self.volume(model, "ours-replicas")
        if "family" in cases:
            vol = {"B10FS_CACHE_DIR": self.volume(model, "ours-fam")["B10FS_CACHE_DIR"],
                   "B10FS_ORG_CACHE_DIR": rep["B10FS_ORG_CACHE_DIR"]}
            for case, save in (("ours-fam-A", True), ("ours-fam-B", False)):
                C[case] = self.spawn("run", model, case,
                                     spec(allshapes, load=True, load_stats=True, save=save),
                                     local=None, impl="ours", vol=vol, case_env=self.family_env(model))
            self.flush()
        if "pod" in cases:
            ranks = 4
            shared = self.dirs(model, "ours-pod")["local"]
            cold_local = self.dirs(model, "cold")["local"]

            def rank(i: int, prefix: str, impl: str | None) -> tuple[str, dict]:
                case = f"{prefix}-r{i}"
                env = {"LOCAL_RANK": str(i), "RANK": str(i), "WORLD_SIZE": str(ranks)}
                if impl:
                    return case, self.spawn("run", model, case,
                                            spec(allshapes, load=True, load_stats=True, save=True),
                                            local=shared, impl=impl, vol=rep, case_env=env)
                return case, self.spawn("run", model, case, spec(allshapes), local=cold_local,
                                        impl=None, vol=None, case_env=env)

            for prefix, impl in (("ours-pod", "ours"), ("hot-pod", None)):
                if prefix == "hot-pod" and not C.get("hot", {}).get("ok"):
                    continue
                with ThreadPoolExecutor(ranks) as pool:  # started together, one process each
                    for case, res in pool.map(lambda i, p=prefix, im=impl: rank(i, p, im), range(ranks)):
                        C[case] = res
                self.flush()

    def run_precompile(self, model: str, C: dict, spec, allshapes: list, p: dict,
                       cases: set[str]) -> None:
        """Issue 16: ours with B10_TRANSFER_PRECOMPILE=1 and b10_transfer.compile, replicas A -> B -> C
        on a volume of their own; "pc-hot": a writer in the mode on the hot volume of the ours
        replicas (no Dynamo entry there, every graph an Inductor cache hit)."""
        pc = {"B10_TRANSFER_PRECOMPILE": "1"}
        if "precompile" in cases:
            vol = self.volume(model, "ours-pc")
            C["ours-pc-A"] = self.spawn("run", model, "ours-pc-A",
                                        spec(p["set1"], save=True, precompile=True),
                                        local=None, impl="ours", vol=vol, case_env=pc)
            C["ours-pc-B"] = self.spawn("run", model, "ours-pc-B",
                                        spec(allshapes, load=True, save=True, precompile=True),
                                        local=None, impl="ours", vol=vol, case_env=pc)
            C["ours-pc-C"] = self.spawn("run", model, "ours-pc-C",
                                        spec(allshapes, load=True, save=True, precompile=True),
                                        local=None, impl="ours", vol=vol, case_env=pc)
            self.flush()
        if "pc-repeat" in cases and C.get("ours-pc-C", {}).get("ok") and C.get("hot", {}).get("ok"):
            # hot and precompile C again, interleaved, for the spread of both (setup is 10-15 s of
            # imports and varies run to run)
            vol = self.volume(model, "ours-pc")
            cold_local = self.dirs(model, "cold")["local"]
            for i in range(2, 2 + self.a.repeats):
                C[f"hot-{i}"] = self.spawn("run", model, f"hot-{i}", spec(allshapes), local=cold_local,
                                           impl=None, vol=None)
                C[f"ours-pc-C-{i}"] = self.spawn(
                    "run", model, f"ours-pc-C-{i}", spec(allshapes, load=True, precompile=True),
                    local=None, impl="ours", vol=vol, case_env=pc)
                self.flush()
        if "pc-prof" in cases:  # replica C again under cProfile: where its time goes (log only)
            vol = self.volume(model, "ours-pc")
            C["ours-pc-prof"] = self.spawn("run", model, "ours-pc-prof",
                                           spec(allshapes, load=True, precompile=True, profile=True),
                                           local=None, impl="ours", vol=vol, case_env=pc)
            self.flush()
        if "pc-seed" in cases and C.get("ours-B", {}).get("ok"):
            # the mode turned on for an existing deployment: B10_TRANSFER_PRECOMPILE=seed on the hot
            # volume of the ours replicas (no entry), then a reader in the mode on that volume
            vol = self.volume(model, "ours-replicas")
            C["ours-pc-seed"] = self.spawn(
                "run", model, "ours-pc-seed", spec(allshapes, load=True, save=True, precompile=True),
                local=None, impl="ours", vol=vol, case_env={"B10_TRANSFER_PRECOMPILE": "seed"})
            C["ours-pc-seed-C"] = self.spawn(
                "run", model, "ours-pc-seed-C", spec(allshapes, load=True, save=True, precompile=True),
                local=None, impl="ours", vol=vol, case_env=pc)
            self.flush()
        if "pc-hot" in cases and C.get("ours-C", {}).get("ok"):
            vol = self.volume(model, "ours-replicas")
            C["ours-pc-hot"] = self.spawn("run", model, "ours-pc-hot",
                                          spec(allshapes, load=True, save=True, precompile=True),
                                          local=None, impl="ours", vol=vol, case_env=pc)
            self.flush()

    def env_info(self) -> None:
        spec_path = os.path.join(self.out, "specs", "env.json")
        res_path = os.path.join(self.out, "specs", "env.result.json")
        with open(spec_path, "w") as f:
            json.dump({"result": res_path}, f)
        env = {k: v for k, v in os.environ.items() if k not in SCRUB}
        subprocess.run([self.python, WORKER, "env", spec_path], env=env, cwd=self.out,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            with open(res_path) as f:
                self.results["env"] = json.load(f)
        except (OSError, ValueError):
            self.results["env"] = {}
        self.results["env"]["host_date_utc"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
        log(f"env: {self.results['env']}")

    def flush(self) -> None:
        self.results["total_wall_s"] = time.time() - self.t0
        with open(os.path.join(self.out, "results.json"), "w") as f:
            json.dump(self.results, f, indent=1, default=str)
        with open(os.path.join(self.out, "report.md"), "w") as f:
            f.write(report.render(self.results))
        if self.a.export:
            # after every step, so a command killed at its time limit still leaves results
            self.export(self.a.export)

    def over_budget(self) -> bool:
        return bool(self.a.budget_s) and time.time() - self.t0 > self.a.budget_s

    def export(self, dest: str) -> None:
        os.makedirs(dest, exist_ok=True)
        for n in ("results.json", "report.md"):
            shutil.copy2(os.path.join(self.out, n), os.path.join(dest, n))
        with tarfile.open(os.path.join(dest, "logs.tar.gz"), "w:gz") as t:
            t.add(os.path.join(self.out, "logs"), arcname="logs")
            t.add(os.path.join(self.out, "specs"), arcname="specs")


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "merge":
        return merge(argv[1:])
    ap = argparse.ArgumentParser(prog="python -m tools.gpu_e2e", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="work and result directory (created)")
    ap.add_argument("--impl", default="ours,peer", help="comma list of ours,peer (or '' for none)")
    ap.add_argument("--models", default="llama,llama-autotune,timm",
                    help=f"comma list of {','.join(e2e_models.PRESETS)}")
    ap.add_argument("--cases", default="baseline,single,replicas",
                    help="comma list: baseline (prime, cold, hot local), single (seed save + "
                         "load into an empty cache), replicas (A -> B -> C), precompile (ours "
                         "replicas with B10_TRANSFER_PRECOMPILE=1), pc-hot (a writer in the mode "
                         "on the hot ours-replicas volume), pc-prof (precompile replica C under cProfile), pc-repeat (hot and precompile C twice more), pc-seed (B10_TRANSFER_PRECOMPILE=seed on the hot ours-replicas volume, then a reader)")
    ap.add_argument("--quick", action="store_true",
                    help="small models: a GPU smoke run (or a CPU one with --device cpu)")
    ap.add_argument("--size", choices=("full", "quick", "tiny"), default=None,
                    help="model size preset (default: full; --quick: quick on cuda, tiny on cpu)")
    ap.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    ap.add_argument("--cache-root", default=None,
                    help="directory standing in for /cache (default OUT/cache; pass /cache on a "
                         "throwaway machine to run both implementations with unpatched path checks)")
    ap.add_argument("--wheels", default=os.path.join(REPO, "wheels"),
                    help="dir with b10_transfer-*.whl (the peer) and blake3/zstandard wheels")
    ap.add_argument("--peer-site", default=None, help="an existing --target install of the peer")
    ap.add_argument("--python", default=sys.executable, help="interpreter of the measured processes")
    ap.add_argument("--case-timeout", type=float, default=1200.0,
                    help="kill a measured process after this many seconds")
    ap.add_argument("--budget-s", type=float, default=0.0,
                    help="start no new case after this many seconds (0: no limit); results so "
                         "far are written (and exported) after every step")
    ap.add_argument("--repeats", type=int, default=2,
                    help="pc-repeat: how many more interleaved pairs of hot and precompile C")
    ap.add_argument("--env", action="append", default=[], help="K=V for every measured process")
    ap.add_argument("--env-ours", action="append", default=[], help="K=V for ours only")
    ap.add_argument("--env-peer", action="append", default=[], help="K=V for the peer only")
    ap.add_argument("--export", default=None,
                    help="also copy results.json, report.md and logs.tar.gz here (e.g. $OUT)")
    a = ap.parse_args(argv)
    if a.size is None:
        a.size = ("tiny" if a.device == "cpu" else "quick") if a.quick else "full"
    impls = [i for i in a.impl.split(",") if i]
    for i in impls:
        if i not in ("ours", "peer"):
            raise SystemExit(f"unknown impl {i!r}")
    models = [m for m in a.models.split(",") if m]
    for m in models:
        e2e_models.preset(m, a.size)
    cases = {c for c in a.cases.split(",") if c}
    os.makedirs(a.out, exist_ok=True)
    r = Runner(a)
    r.prepare_sites(impls)
    r.env_info()
    try:
        for m in models:
            r.run_model(m, impls, cases)
    finally:
        r.flush()
    print()
    print(report.render(r.results))
    return 0


def merge(argv) -> int:
    ap = argparse.ArgumentParser(prog="python -m tools.gpu_e2e merge")
    ap.add_argument("--out", required=True)
    ap.add_argument("results", nargs="+")
    a = ap.parse_args(argv)
    merged: dict = {"models": {}, "merged_from": []}
    for path in a.results:
        with open(path) as f:
            r = json.load(f)
        merged.setdefault("env", r.get("env"))
        merged["merged_from"].append({"path": path, "run_id": r.get("run_id"),
                                      "env": r.get("env"), "total_wall_s": r.get("total_wall_s")})
        for m, mres in r.get("models", {}).items():
            if m in merged["models"]:
                cases = merged["models"][m]["cases"]
                for name, res in mres["cases"].items():
                    # a case skipped or failed in a later run does not hide a good earlier one
                    if res.get("ok") or name not in cases or not cases[name].get("ok"):
                        cases[name] = res
            else:
                merged["models"][m] = mres
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "results.json"), "w") as f:
        json.dump(merged, f, indent=1, default=str)
    md = report.render(merged)
    with open(os.path.join(a.out, "report.md"), "w") as f:
        f.write(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
