"""Markdown rendering of the GPU end-to-end results (no torch, no third-party imports)."""

from __future__ import annotations

import statistics

ROW_ORDER = ["cold", "hot", "peer-load", "ours-load", "peer-A", "peer-B", "peer-C",
             "ours-A", "ours-B", "ours-C", "ours-pc-A", "ours-pc-B", "ours-pc-C", "ours-pc-hot"]
WHAT = {
    "prime": "page-cache primer (not a measurement)",
    "cold": "empty Inductor cache",
    "hot": "hot local: same process again on its own cache",
    "peer-load": "peer: empty local cache, load from volume",
    "ours-load": "ours: empty local cache, load from volume",
    "peer-A": "peer replica A: set 1, save",
    "peer-B": "peer replica B: load, sets 1+2, save",
    "peer-C": "peer replica C: load, sets 1+2",
    "ours-A": "ours replica A: set 1, save",
    "ours-B": "ours replica B: load, sets 1+2, save",
    "ours-C": "ours replica C: load, sets 1+2",
    "ours-pc-A": "ours + B10_TRANSFER_PRECOMPILE replica A: set 1, save",
    "ours-pc-B": "ours + precompile replica B: load, sets 1+2, save",
    "ours-pc-C": "ours + precompile replica C: load, sets 1+2, save",
    "ours-pc-hot": "ours + precompile on the ours-replicas volume (no entry, hot Inductor cache)",
    "ours-pc-seed": "B10_TRANSFER_PRECOMPILE=seed on the ours-replicas volume (hot, no entry)",
    "ours-pc-seed-C": "precompile reader on that volume after the seed",
    "ours-pc-prof": "precompile replica C again under cProfile (slower: not a measurement)",
    "ours-fam-A": "new deployment of the family, replica 1: load (from its siblings), sets 1+2, save",
    "ours-fam-B": "new deployment of the family, replica 2: load (its own manifest), sets 1+2",
    **{f"ours-pod-r{i}": f"pod of 4 ranks, one empty local dir, rank {i}: load, sets 1+2, save" for i in range(4)},
    **{f"hot-pod-r{i}": f"pod of 4 ranks on the hot local dir, no library, rank {i}" for i in range(4)},
}


def _f(x, nd=2):
    return "–" if x is None else f"{x:.{nd}f}"


def _mb(b):
    return "–" if b is None else f"{b / 1e6:.1f}"


def _ctr(res, group, key):
    return (res.get("counters") or {}).get(group, {}).get(key, 0)


def fx(res) -> str:
    if not res.get("counters"):
        return "–"
    return f"{_ctr(res, 'inductor', 'fxgraph_cache_hit')}/{_ctr(res, 'inductor', 'fxgraph_cache_miss')}"


def aot(res) -> str:
    if not res.get("counters"):
        return "–"
    return (f"{_ctr(res, 'aot_autograd', 'autograd_cache_hit')}/"
            f"{_ctr(res, 'aot_autograd', 'autograd_cache_miss')}")


def tune_counts(res) -> tuple[int, int, int] | None:
    """(GEMM autotune rounds, Triton multi-config benchmark rounds, coordinate-descent benches).

    GEMM rounds: the larger of our probe's count of AlgorithmSelectorCache.benchmark calls and
    Inductor's own counter select_algorithm_autotune (its increment moved between versions)."""
    a = res.get("autotune")
    if not a and not res.get("counters"):
        return None
    a = a or {}
    gemm = max(a.get("gemm_benchmarks", 0), _ctr(res, "inductor", "select_algorithm_autotune"))
    return (gemm, a.get("triton_config_benchmarks", 0),
            _ctr(res, "inductor", "coordesc_tuning_bench"))


def tune(res) -> str:
    t = tune_counts(res)
    return "–" if t is None else f"{t[0]} / {t[1]} / {t[2]}"


def one_line(model: str, case: str, res: dict) -> str:
    if res.get("skipped"):
        return f"{model}/{case}: SKIPPED ({res.get('error')})"
    if not res.get("ok"):
        return f"{model}/{case}: FAILED {res.get('error')} (rc={res.get('rc')})"
    bits = [f"{model}/{case}:"]
    if "ready_s" in res:
        bits.append(f"ready {_f(res['ready_s'])}s = setup {_f(res.get('setup_s'))}"
                    f" + compile {_f(res.get('compile_first_run_s'))}")
    if "load_s" in res:
        bits.append(f"load {_f(res['load_s'])}s {res.get('load_status')}")
    if "save_s" in res:
        bits.append(f"save {_f(res['save_s'])}s {res.get('save_status')}")
    if res.get("counters"):
        bits.append(f"fx {fx(res)} aot {aot(res)} tune {tune(res)}")
    if "volume" in res:
        v = res["volume"]["total"]
        bits.append(f"volume {v['files']} files {_mb(v['bytes'])} MB")
    bits.append(f"(wall {_f(res.get('process_wall_s'), 1)}s)")
    return " ".join(bits)


def render(results: dict) -> str:
    env = results.get("env") or {}
    out = []
    out.append("### Environment\n")
    out.append(f"- GPU: {env.get('gpu', 'none (CPU)')}; torch {env.get('torch')} (CUDA "
               f"{env.get('cuda')}), triton {env.get('triton')}, transformers "
               f"{env.get('transformers')}, timm {env.get('timm')}, Python {env.get('python')}, "
               f"{env.get('nproc')} CPUs; {env.get('host_date_utc', '')}")
    a = results.get("args") or {}
    if a:
        out.append(f"- run: size `{a.get('size')}`, device `{a.get('device')}`, impls "
                   f"`{a.get('impl')}`, cases `{a.get('cases')}`, cache root "
                   f"`{results.get('cache_root')}`; total wall {_f(results.get('total_wall_s'), 0)} s")
    srcs = results.get("merged_from") or []
    if srcs:
        out.append(f"- merged from {len(srcs)} runs: " + "; ".join(
            f"{s.get('run_id')} ({(s.get('env') or {}).get('gpu')}, "
            f"{_f(s.get('total_wall_s'), 0)} s)" for s in srcs))
        gpus = {(s.get("env") or {}).get("gpu") for s in srcs}
        if len(gpus) > 1:
            out.append(f"- WARNING: the merged runs used different GPUs {sorted(map(str, gpus))}: "
                       "ratios across them are not comparable")
    out.append("")
    for model, m in (results.get("models") or {}).items():
        C = m.get("cases", {})
        out.append(f"### {model} ({m.get('size')})\n")
        out.append(f"{m.get('describe')}\n")
        cold = C.get("cold", {})
        hot = C.get("hot", {})
        lc = cold.get("local_cache") or cold.get("local_after")
        if lc:
            out.append(f"Local Inductor cache after the cold run: {lc['files']} files, "
                       f"{_mb(lc['bytes'])} MB, {lc.get('triton_files')} under triton/, "
                       f"{lc.get('best_config')} `.best_config`.\n")
        if C.get("prime", {}).get("ok"):
            pr = C["prime"]
            out.append(f"Setup floor (primer: imports {_f(pr.get('t_imports'))} s, model build "
                       f"{_f(pr.get('t_model'))} s, python start {_f(pr.get('t_interp'))} s).\n")
        out.append("Time to ready = process start to the first outputs of every warm-up input; "
                   "setup = imports + model build + cache load. FX and AOT are Inductor's "
                   "FX-graph and AOTAutograd cache hit/miss counters in that process; autotune = "
                   "benchmarking done in that process: GEMM autotune rounds / Triton "
                   "multi-config benchmark rounds / coordinate-descent benches (all 0 when "
                   "autotuning results came from the cache).\n")
        out.append("| case | setup s | load s (status) | compile+first run s | ready s | × hot "
                   "| × cold | FX hit/miss | AOT hit/miss | autotune | save s (status) | rel err |")
        out.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        hr = hot.get("ready_s") if hot.get("ok") else None
        cr = cold.get("ready_s") if cold.get("ok") else None
        for name in ROW_ORDER + [n for n in C if n not in ROW_ORDER]:
            r = C.get(name)
            if r is None or name in ("prime", "ours-seed", "peer-seed"):
                continue
            label = f"{name}: {WHAT.get(name, '')}"
            if r.get("skipped"):
                out.append(f"| {label} | not run ({r.get('error')}) |" + " |" * 10)
                continue
            if not r.get("ok"):
                out.append(f"| {label} | FAILED: {str(r.get('error'))[:120]} |" + " |" * 10)
                continue
            ready = r.get("ready_s")
            load = f"{_f(r['load_s'])} ({r.get('load_status')})" if "load_s" in r else "–"
            save = f"{_f(r['save_s'])} ({r.get('save_status')})" if "save_s" in r else "–"
            xh = _f(ready / hr) if (hr and ready) else "–"
            xc = _f(ready / cr) if (cr and ready) else "–"
            err = r.get("rel_err_vs_eager")
            out.append(f"| {label} | {_f(r.get('setup_s'))} | {load} | "
                       f"{_f(r.get('compile_first_run_s'))} | {_f(ready)} | {xh} | {xc} | "
                       f"{fx(r)} | {aot(r)} | {tune(r)} | {save} | "
                       f"{'–' if err is None else f'{err:.1e}'} |")
        out.append("")
        # save / load / volume per implementation
        rows = []
        for impl in ("ours", "peer"):
            seed, ld = C.get(f"{impl}-seed"), C.get(f"{impl}-load")
            A, B, Cc = C.get(f"{impl}-A"), C.get(f"{impl}-B"), C.get(f"{impl}-C")
            if not any((seed, ld, A, B, Cc)):
                continue

            def g(r, k, nd=2):
                return _f(r.get(k), nd) if r else "–"

            def st(r, k):
                return f"{g(r, k + '_s')} ({r.get(k + '_status')})" if r and (k + "_s") in r else "–"

            def vol(r):
                if not r or "volume" not in r:
                    return "–"
                v = r["volume"]
                return (f"{v['total']['files']} / {_mb(v['total']['bytes'])} "
                        f"({v['manifests']['files']}+{v['blobs']['files']})")

            restored = (ld or {}).get("local_after_load") or {}
            rows.append(f"| {impl} | {st(seed, 'save')} | {vol(seed)} | {st(ld, 'load')} | "
                        f"{restored.get('files', '–')} / {_mb(restored.get('bytes'))} | "
                        f"{st(ld, 'save')} | {st(A, 'save')} | {vol(A)} | {st(B, 'load')} | "
                        f"{st(B, 'save')} | {vol(B)} | {st(Cc, 'load')} |")
        if rows:
            out.append("Save and load seconds (status) as timed around the call inside the "
                       "measured process; volume = files / MB on the volume (deployment-scope "
                       "files + org-store files), restored = local files / MB right after the "
                       "load.\n")
            out.append("| impl | seed save | volume after seed | load into empty | restored | "
                       "re-save after load | A save | volume after A | B load | B save | "
                       "volume after B | C load |")
            out.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
            out.extend(rows)
            out.append("")
        # goal checks
        checks = []
        oc, pc, ol = C.get("ours-C"), C.get("peer-C"), C.get("ours-load")
        if oc and oc.get("ok") and hr:
            x = oc["ready_s"] / hr
            checks.append(f"ours C time-to-ready {x:.2f}× hot local (goal ≤ 1.1×): "
                          f"{'met' if x <= 1.1 else 'NOT met'}")
        if pc and pc.get("ok"):
            miss = _ctr(pc, "inductor", "fxgraph_cache_miss")
            checks.append(f"peer C FX-graph misses {miss} (set 2 recompiled: "
                          f"{'yes' if miss else 'no'}); peer B save "
                          f"{(C.get('peer-B') or {}).get('save_status')}")
        if oc and oc.get("ok"):
            checks.append(f"ours C FX-graph hit/miss {fx(oc)}, AOT {aot(oc)}")
        checks.extend(precompile_checks(C, hot))
        checks.extend(warm_start_checks(C, hot, cold))
        if ol and ol.get("ok") and "load_s" in ol:
            checks.append(f"ours load of the full cache {ol['load_s']:.2f} s (goal ≤ 0.3 s): "
                          f"{'met' if ol['load_s'] <= 0.3 else 'NOT met'}")
        if m.get("preset", {}).get("mode", "default") != "default":
            ct = tune_counts(cold) if cold.get("ok") else None
            if ct is not None:
                checks.append(f"cold: {sum(ct)} autotune benchmark rounds (GEMM / configs / "
                              f"coordesc = {ct[0]} / {ct[1]} / {ct[2]})")
            for name in ("hot", "ours-load", "peer-load", "ours-C", "peer-C"):
                r = C.get(name)
                if r and r.get("ok") and tune_counts(r) is not None:
                    n = sum(tune_counts(r))
                    if ct is not None and sum(ct) == 0:
                        verdict = "no autotuning ran even cold: this check proves nothing here"
                    elif n == 0:
                        verdict = "autotuning results survived"
                    else:
                        verdict = "autotuned again"
                    checks.append(f"{name}: {n} autotune benchmark rounds ({verdict})")
        if checks:
            out.append("Checks:\n")
            out.extend(f"- {c}" for c in checks)
            out.append("")
    return "\n".join(out) + "\n"


def dynamo(res) -> str:
    """Dynamo cache hit/miss/error and frames traced (stats.unique_graphs) of one process."""
    if not res.get("counters"):
        return "–"
    return (f"dynamo hit/miss/error {_ctr(res, 'dynamo_cache', 'dynamo_cache_hit')}/"
            f"{_ctr(res, 'dynamo_cache', 'dynamo_cache_miss')}/"
            f"{_ctr(res, 'dynamo_cache', 'dynamo_cache_error')}, graphs traced "
            f"{_ctr(res, 'stats', 'unique_graphs')}")


def warm_start_checks(C: dict, hot: dict, cold: dict) -> list[str]:
    """Issue 15: a new deployment of a known model starts from its siblings; a pod of 4 ranks makes
    one load's reads (read(2) bytes of each rank's load call, /proc/self/io)."""
    out = []
    hr = hot.get("ready_s") if hot.get("ok") else None
    cr = cold.get("ready_s") if cold.get("ok") else None
    for name in ("ours-fam-A", "ours-fam-B"):
        r = C.get(name)
        if r and r.get("ok"):
            ls = r.get("load_stats") or {}
            ratio = "".join(f", {r['ready_s'] / b:.2f}× {w}" for w, b in (("hot", hr), ("cold", cr)) if b)
            out.append(f"{name}: load {ls.get('status')} {ls.get('files_transferred')} files from "
                       f"{ls.get('source') or 'its own manifest'}; FX {fx(r)}, AOT {aot(r)}; "
                       f"ready {r['ready_s']:.2f} s{ratio}")
    ranks = [C[k] for k in sorted(C) if k.startswith("ours-pod-r") and C[k].get("ok")]
    hot_ranks = [C[k] for k in sorted(C) if k.startswith("hot-pod-r") and C[k].get("ok")]
    if ranks:
        loaded = [r for r in ranks if (r.get("load_stats") or {}).get("files_transferred")]
        total = sum(r.get("load_read_bytes", 0) for r in ranks)
        one = max((r.get("load_read_bytes", 0) for r in ranks), default=0)
        ready = [r["ready_s"] for r in ranks]
        line = (f"pod of {len(ranks)} ranks: {len(loaded)} loaded from the volume, the others "
                f"{', '.join(sorted({(r.get('load_stats') or {}).get('status', '?') for r in ranks if r not in loaded}))}; "
                f"read(2) bytes of the loads {_mb(total)} MB in all, the largest one {_mb(one)} MB; "
                f"ready max {max(ready):.2f} s, mean {sum(ready) / len(ready):.2f} s")
        if hot_ranks:
            hready = [r["ready_s"] for r in hot_ranks]
            line += (f"; 4 ranks on the hot local cache: max {max(hready):.2f} s, mean "
                     f"{sum(hready) / len(hready):.2f} s ({max(ready) / max(hready):.2f}× by max)")
        out.append(line)
    return out


def precompile_checks(C: dict, hot: dict) -> list[str]:
    """Issue 16's goals for replica C in the mode: compile+first <= 0.5x hot, ready <= 0.75x hot."""
    out = []
    pcC, oc = C.get("ours-pc-C"), C.get("ours-C")
    for name in ("ours-pc-A", "ours-pc-B", "ours-pc-C", "ours-pc-hot", "ours-pc-seed", "ours-pc-seed-C"):
        r = C.get(name)
        if r and r.get("ok"):
            ent = r.get("dynamo_entries") or {}
            out.append(f"{name}: {dynamo(r)}, FX {fx(r)}, AOT {aot(r)}; local dynamo/ "
                       f"{ent.get('files', 0)} files {_mb(ent.get('bytes'))} MB; save "
                       f"{r.get('save_status')}")
    if not (pcC and pcC.get("ok") and hot.get("ok")):
        return out
    cf = pcC["compile_first_run_s"] / hot["compile_first_run_s"]
    rd = pcC["ready_s"] / hot["ready_s"]
    out.append(f"ours-pc C compile+first run {cf:.2f}× hot local (goal ≤ 0.5×): "
               f"{'met' if cf <= 0.5 else 'NOT met'}")
    out.append(f"ours-pc C time-to-ready {rd:.2f}× hot local (goal ≤ 0.75×): "
               f"{'met' if rd <= 0.75 else 'NOT met'}")
    if oc and oc.get("ok"):
        out.append(f"ours-pc C vs ours C (no mode): compile+first run "
                   f"{pcC['compile_first_run_s'] / oc['compile_first_run_s']:.2f}×, ready "
                   f"{pcC['ready_s'] / oc['ready_s']:.2f}×")
    out.extend(repeat_summary(C))
    return out


def _runs(C: dict, first: str, prefix: str) -> list[dict]:
    """The ok runs of one kind: `first` (the scenario's own) and `prefix`-2, -3, ... (pc-repeat's)."""
    names = [first] + sorted((k for k in C if k.startswith(prefix) and k[len(prefix):].isdigit()),
                             key=lambda k: int(k[len(prefix):]))
    return [C[k] for k in names if k in C and C[k].get("ok")]


def repeat_summary(C: dict) -> list[str]:
    """Medians over pc-repeat's interleaved runs of hot and precompile C; ratios of the medians to hot's, and
    where each run loaded its Triton kernels (Inductor's compile worker pool, or this process)."""
    hot = _runs(C, "hot", "hot-")
    kinds = [("hot", hot), ("ours-pc-C", _runs(C, "ours-pc-C", "ours-pc-C-"))]
    if len(hot) < 2:
        return []
    med = statistics.median
    h_cf, h_rd = med(r["compile_first_run_s"] for r in hot), med(r["ready_s"] for r in hot)
    out = []
    for name, runs in kinds:
        if not runs:
            continue
        cf, rd = med(r["compile_first_run_s"] for r in runs), med(r["ready_s"] for r in runs)
        call = med(r.get("compile_call_s", 0.0) for r in runs)
        loads = [(r.get("pool") or {}) for r in runs]
        split = ", ".join(f"{p.get('parallel', '?')}/{p.get('serial', '?')}" for p in loads)
        out.append(f"{name} medians over {len(runs)} runs: compile+first run {cf:.2f} s ({cf / h_cf:.2f}× hot; "
                   f"compile call {call:.2f} s), ready {rd:.2f} s ({rd / h_rd:.2f}× hot); kernel loads in the "
                   f"pool/in the process per run: {split}")
    return out
