"""Figures as markdown."""
from __future__ import annotations


def _kv(d: dict) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(d.items(), key=lambda kv: (-kv[1], kv[0])) if v) or "none" \
        if all(isinstance(v, (int, float)) for v in d.values()) else ", ".join(f"{k} {v}" for k, v in d.items())


def to_markdown(f: dict) -> str:
    out = [f"## Torture run {f.get('started', '')}", "",
           f"`{f.get('command', '')}` (seed {f.get('seed')}, {f['host']['cpus']} CPUs, Python {f['host']['python']}, "
           f"kernel {f['host']['kernel']}), {f.get('seconds', 0):.0f} s in all. **Violations: {f.get('violations', 0)}**.",
           ""]
    ld = f.get("load")
    if ld:
        fin = ld["final"]
        out += [
            "### Load", "",
            "| figure | value |", "|---|---|",
            f"| workers × scopes | {ld['workers']} processes × {ld['scopes']} deployment scopes, one org store"
            + (" (store and scopes in a SeaweedFS bucket)" if ld.get("backend") == "s3" else "") + " |",
            f"| duration | {ld['seconds']} s (freshen_after {ld['freshen_after']:g} s, gc grace {ld['grace']:g} s) |",
            f"| operations done | {ld['operations']} ({_kv(ld['operations_by_kind'])}) |",
            f"| errors by kind | {_kv(ld['errors_by_kind'])} |",
            f"| unexpected errors | {_kv(ld['unexpected_errors'])} |",
            f"| SIGKILLs | {ld['kills']} ({_kv(ld['kills_by_method'])}); in op: {_kv(ld['kills_by_op'])} |",
            f"| kill points hit | {_kv(ld['kill_points'])} |",
            f"| distinct kill sites (method × op) | {ld['distinct_kill_sites']} |",
            f"| processes started | {ld['processes_started']} |",
            f"| gc | {_kv(ld['gc'])} |",
            f"| blob mtimes shifted (clock skew) | {_kv(ld['mtime_shifts'])} |",
            f"| files verified after kills | {ld['files_checked_after_kills']} |",
            f"| reported save entries found in manifests | {fin['reported_entries_checked']} |",
            f"| files loaded and verified at the end | {fin['files_loaded_and_verified']} before a final gc, "
            f"{fin['files_loaded_after_final_gc']} after |",
            f"| `cas check` at the end | exits {[c['exit'] for c in fin['check'].values()]}, "
            f"{fin['check'].get('scope0', {}).get('blobs_read', 0)} blobs re-read (`--read-data`) |",
            f"| stale roots left by kills (FORMAT §8) | {fin['stale_roots']} |",
            f"| transient `cas check` problems during the run | {_kv(ld['transient_check_problems'])} |",
            f"| op seconds p50 / max | " + ", ".join(f"{k} {v}/{ld['op_seconds_max'][k]}"
                                                   for k, v in sorted(ld['op_seconds_p50'].items())) + " |",
            f"| **violations** | **{ld['violation_count']}** {_kv(dict(ld['violations']))} |", ""]
        ex = {**ld.get("examples", {}), **({"final": fin["examples"]} if fin.get("examples") else {})}
        if ex:
            out += ["Examples:", ""] + [f"- {k}: {v}" for k, v in ex.items()] + [""]
    fl = f.get("faults")
    if fl:
        out += ["### Faults", "", "| scenario | result | figures |", "|---|---|---|"]
        for s in fl["scenarios"]:
            figs = "; ".join(f"{k}={v}" for k, v in s.items() if k not in ("name", "result"))
            out.append(f"| {s['name']} | {s['result']} | {figs.replace('|', '/')} |")
        out.append("")
    h = f.get("hostile")
    if h:
        out += ["### Hostile input", "", f"tests/test_hostile.py: {h['summary']}", ""]
        out += [f"- {x}" for x in h.get("failures", [])]
    return "\n".join(out) + "\n"
