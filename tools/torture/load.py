"""Load under faults: many worker processes on one org store and several deployment scopes, SIGKILLed at random
moments and at the store's deterministic kill points, some with skewed clocks, while blob mtimes are pushed into
the past and the future; then the end-state invariants."""
from __future__ import annotations

import collections
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

from .content import verify_tree
from .worker import ENV_KEYS, FAKE_ENV, OPS, layout

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# cas/_faults.py checkpoints: (point, how many passes a process may make before the kill is drawn from).
# blob-written: a save writes a pack of its new small files, a loose blob per new big one and the manifest's blob.
KILL_POINTS = [("hashed", 4), ("uploaded", 4), ("locked", 4), ("manifest-renamed", 4), ("blob-written", 12),
               ("restored-temp", 60), ("gc-trashed", 20), ("gc-deleted", 20)]
# Errors a healthy store still gives under this load: a gc finding another gc running, a save slot or lock busy.
EXPECTED_ERRORS = {"LockTimeout", "status-SKIPPED"}
SKEWS = (-3600.0, -300.0, 300.0, 3600.0)


class Worker:
    def __init__(self, wid, gen, proc, kill_at, skew, err_path):
        self.wid, self.gen, self.proc, self.kill_at, self.skew, self.err_path = wid, gen, proc, kill_at, skew, err_path
        self.killed_by_us: str | None = None


def run_load(base: str, *, workers: int, seconds: float, max_ops: int | None, kills: int, freshen: float,
             grace: float, scopes: int = 4, seed: int = 0, point_frac: float = 0.3, skew_frac: float = 0.15,
             mtime_faults: bool = True, say=print, s3: str | None = None) -> dict:
    """`s3`: an s3://bucket URL (AWS_* in the environment) for the org store and scopes instead of the volume. The
    API operations (api_save, api_load) and the blob mtime shifts are then left out: the API's s3:// settings are
    tested elsewhere, and an object's LastModified cannot be set by a client."""
    from cas import BlobStore, Scope

    from .backends import open_backend

    rng = random.Random(seed)
    shutil.rmtree(base, ignore_errors=True)
    L = layout(base, s3)
    os.makedirs(os.path.join(base, "logs"))
    if s3:
        mtime_faults = False
    else:
        os.makedirs(os.path.join(L["vol"], "model"))
        os.makedirs(os.path.join(L["vol"], "org"))
    store = BlobStore(open_backend(L["org"]), freshen_after=freshen)
    store.ready()  # created before any worker opens it (on S3 in the background), with this run's freshen_after
    for i in range(scopes):
        Scope(open_backend(L["scope"](i)), create=True)
    started = time.time()
    deadline = started + seconds
    per_worker_ops = -(-max_ops // workers) if max_ops else None
    gens = collections.Counter()
    live: dict[int, Worker] = {}
    kill_log: list[dict] = []
    crashes: list[str] = []
    mtime_shifts = collections.Counter()

    def spawn(wid: int) -> None:
        gen = gens[wid]
        gens[wid] += 1
        kill_at = None
        if rng.random() < point_frac:
            point, most = rng.choice(KILL_POINTS)
            kill_at = f"{point}:{rng.randint(1, most)}"
        skew = rng.choice(SKEWS) if rng.random() < skew_frac else 0.0
        env = {k: v for k, v in os.environ.items() if k != "CAS_KILL_AT"}
        env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
        if kill_at:
            env["CAS_KILL_AT"] = kill_at
        args = [sys.executable, "-m", "tools.torture.worker", "--base", base, "--id", str(wid), "--gen", str(gen),
                "--seed", str(rng.randrange(1 << 30)), "--deadline", str(deadline), "--scopes", str(scopes),
                "--grace", str(grace), "--skew", str(skew)]
        if per_worker_ops:
            args += ["--max-ops", str(per_worker_ops)]
        if s3:
            args += ["--s3", s3, "--weights", "30,30,8,4,0,0"]
        err_path = os.path.join(base, "logs", f"w{wid:03d}-g{gen:03d}.err")
        with open(err_path, "wb") as err:
            proc = subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=err)
        live[wid] = Worker(wid, gen, proc, kill_at, skew, err_path)

    for wid in range(workers):
        spawn(wid)
    say(f"load: {workers} workers, {scopes} scopes, {seconds:.0f}s, freshen_after {freshen:g}s, grace {grace:g}s, "
        f"target {kills} random kills, store {L['org']}")

    kill_times = sorted(rng.uniform(1.0, max(1.5, seconds * 0.92)) for _ in range(kills))
    next_mtime_fault = started + 1.0
    op_cycle = list(OPS)
    last_report = time.time()
    while live:
        now = time.time()
        for wid, w in list(live.items()):
            rc = w.proc.poll()
            if rc is None:
                continue
            del live[wid]
            doing = _current_op(base, wid, w.gen)
            if rc == -signal.SIGKILL:
                how = w.killed_by_us or f"point {w.kill_at}"
                kill_log.append({"worker": wid, "gen": w.gen, "how": how, "op": doing, "at": round(now - started, 2)})
            elif rc != 0:
                crashes.append(f"worker {wid} gen {w.gen} exited {rc}: {_tail(w.err_path)}")
            if rc != 0 and now < deadline - 1:
                spawn(wid)
        while kill_times and now - started >= kill_times[0]:
            kill_times.pop(0)
            want = op_cycle[len(kill_log) % len(op_cycle)]
            busy = {wid: _current_op(base, wid, w.gen) for wid, w in live.items() if w.killed_by_us is None}
            cands = ([wid for wid, op in busy.items() if op == want]
                     or [wid for wid, op in busy.items() if op and op != "start"])
            if not cands:
                if now < deadline:
                    kill_times.insert(0, now - started + 0.25)  # nobody busy yet: try again shortly
                    break
                continue
            wid = rng.choice(cands)
            time.sleep(rng.uniform(0, 0.03))  # anywhere inside the operation, not just at its start
            w = live[wid]
            w.killed_by_us = f"random SIGKILL"
            try:
                w.proc.send_signal(signal.SIGKILL)
            except ProcessLookupError:
                pass
        if mtime_faults and now >= next_mtime_fault:
            next_mtime_fault = now + 0.5
            _shift_mtimes(store, rng, mtime_shifts)
        if now >= deadline and not os.path.exists(L["stop"]):
            open(L["stop"], "w").close()
        if now >= deadline + 90:  # a worker stuck past its deadline: kill it (and report it)
            for w in live.values():
                crashes.append(f"worker {w.wid} gen {w.gen} still running 90s after the deadline")
                w.killed_by_us = "straggler"
                w.proc.kill()
        if now - last_report >= 15:
            last_report = now
            say(f"  {now - started:5.0f}s: {len(live)} workers, {len(kill_log)} kills")
        time.sleep(0.02)
    run_seconds = time.time() - started
    say(f"load: workers done after {run_seconds:.0f}s; verifying")

    figures = _tally(base, kill_log, crashes)
    figures.update(workers=workers, scopes=scopes, seconds=round(run_seconds, 1), freshen_after=freshen, grace=grace,
                   mtime_shifts=dict(mtime_shifts), processes_started=sum(gens.values()),
                   backend="s3" if s3 else "posix")
    figures["final"] = final_checks(base, scopes, figures.pop("_saved"), say, s3)
    figures["violations"].update(figures["final"].pop("violations"))
    figures["violation_count"] = sum(figures["violations"].values())
    return figures


def _current_op(base: str, wid: int, gen: int) -> str | None:
    """The op a worker is inside (its last journal line is a `begin`), or None."""
    path = os.path.join(base, "journal", f"w{wid:03d}-g{gen:03d}.jsonl")
    try:
        with open(path, "rb") as fh:
            fh.seek(0, 2)
            size = fh.tell()
            fh.seek(max(0, size - 8192))
            tail = fh.read()
    except FileNotFoundError:
        return "start"
    lines = tail.rstrip(b"\n").split(b"\n")
    try:
        doc = json.loads(lines[-1])
    except ValueError:
        return None
    return doc["op"] if doc.get("phase") == "begin" else None


def _tail(path: str, n: int = 600) -> str:
    try:
        with open(path, "rb") as fh:
            return fh.read()[-n:].decode("utf-8", "replace")
    except OSError:
        return ""


def _shift_mtimes(store, rng, counter) -> None:
    """Clock skew on the volume: a few blobs get mtimes a year in the past or a day in the future."""
    fan = f"{rng.randrange(256):02x}"
    d = os.path.join(store.root, "blobs", fan)
    try:
        names = [n for n in os.listdir(d) if not n.startswith(".tmp-")]
    except OSError:
        return
    for name in rng.sample(names, min(2, len(names))):
        delta = rng.choice((-365 * 86400, 86400))
        try:
            t = time.time() + delta
            os.utime(os.path.join(d, name), (t, t))
            counter["past" if delta < 0 else "future"] += 1
        except OSError:
            pass


def _tally(base: str, kill_log: list[dict], crashes: list[str]) -> dict:
    ops = collections.Counter()
    outcomes = collections.Counter()
    errors = collections.Counter()
    unexpected = collections.Counter()
    violations = collections.Counter()
    transient = collections.Counter()
    examples: dict[str, list[str]] = collections.defaultdict(list)
    saved: dict[tuple[int, str], dict[str, list]] = collections.defaultdict(dict)
    gc_totals = collections.Counter()
    durations = collections.defaultdict(list)
    killed_loads: list[str] = []

    def note(kind: str, text: str) -> None:
        if len(examples[kind]) < 5:
            examples[kind].append(text[:400])

    jdir = os.path.join(base, "journal")
    for name in sorted(os.listdir(jdir)):
        begun: dict[int, dict] = {}
        with open(os.path.join(jdir, name), "rb") as fh:
            for raw in fh:
                try:
                    doc = json.loads(raw)
                except ValueError:
                    continue  # a line cut by SIGKILL
                if doc["phase"] == "begin":
                    begun[doc["n"]] = doc
                    continue
                begun.pop(doc["n"], None)
                op = doc["op"]
                if op == "startup":
                    if doc.get("bad"):
                        violations["partial-file-after-kill"] += len(doc["bad"])
                        note("partial-file-after-kill", f"home of a killed worker: {doc['bad'][:3]}")
                    continue
                ops[op] += 1
                durations[op].append(doc.get("dur", 0))
                if doc.get("entries") is not None and doc.get("ok", True):
                    key = doc.get("api_key") or doc["key"]
                    bucket = saved[(doc["scope"], key)]
                    for rel, e in doc["entries"].items():
                        if bucket.setdefault(rel, e) != e:
                            violations["conflicting-entries-reported"] += 1
                if not doc.get("ok", True):
                    kind = doc.get("error", "?")
                    errors[f"{op} {kind}"] += 1
                    if kind not in EXPECTED_ERRORS:
                        unexpected[kind] += 1
                        note(f"error:{kind}", f"{op}: {doc.get('msg') or doc.get('reason')}")
                    outcomes[f"{op}:error"] += 1
                else:
                    outcomes[f"{op}:ok"] += 1
                if doc.get("bad"):
                    violations["partial-or-wrong-file-seen-by-loader"] += len(doc["bad"])
                    note("bad", f"{op}: {doc['bad'][:3]}")
                if doc.get("n_misses"):
                    violations["load-miss"] += doc["n_misses"]
                    note("load-miss", f"{op}: {doc.get('misses') or doc.get('reason')}")
                if op == "gc" and doc.get("ok", True):
                    gc_totals.update({k: doc.get(k, 0) for k in ("trashed", "deleted", "restored", "temp")})
                    gc_totals["runs"] += 1
                    if doc.get("problems"):
                        violations["gc-problem"] += 1
                        note("gc-problem", str(doc["problems"][:2]))
                if op == "check" and doc.get("n_problems"):
                    for p in doc["problems"]:
                        transient[p.split(":", 1)[0]] += 1
        wid, gen = name[1:4], name[6:9]
        for n, doc in begun.items():  # ops cut short by a kill: their target dirs must hold no partial file
            if doc["op"] in ("load", "api_load"):
                killed_loads.append(os.path.join(base, "local", f"w{wid}-l{int(gen)}-{n}"))
    checked = 0
    for d in killed_loads + [os.path.join(base, "local", n) for n in os.listdir(os.path.join(base, "local"))]:
        if os.path.isdir(d):
            n, bad = verify_tree(d)
            checked += n
            if bad:
                violations["partial-file-after-kill"] += len(bad)
                note("partial-file-after-kill", f"{d}: {bad[:3]}")
    for c in crashes:
        violations["worker-crash"] += 1
        note("worker-crash", c)
    kills_by = collections.Counter(k["how"].split(":")[0] if k["how"].startswith("point") else k["how"]
                                   for k in kill_log)
    points = collections.Counter(k["how"].removeprefix("point ").split(":")[0] for k in kill_log
                                 if k["how"].startswith("point"))
    kills_op = collections.Counter(k["op"] or "between-ops" for k in kill_log)
    return {
        "operations": sum(ops.values()), "operations_by_kind": dict(ops), "outcomes": dict(outcomes),
        "errors_by_kind": dict(errors), "unexpected_errors": dict(unexpected),
        "violations": violations, "transient_check_problems": dict(transient), "examples": dict(examples),
        "kills": len(kill_log), "kills_by_method": dict(kills_by), "kill_points": dict(points),
        "kills_by_op": dict(kills_op), "distinct_kill_sites": len({(k['how'], k['op']) for k in kill_log}),
        "files_checked_after_kills": checked, "gc": dict(gc_totals),
        "op_seconds_p50": {op: round(sorted(v)[len(v) // 2], 3) for op, v in durations.items() if v},
        "op_seconds_max": {op: round(max(v), 3) for op, v in durations.items() if v},
        "_saved": saved,
    }


def final_checks(base: str, scopes: int, saved: dict, say, s3: str | None = None) -> dict:
    """End state: every reported entry is in its manifest; every manifest loads completely and verified, before and
    after a final gc; `cas check --read-data` is clean for every scope."""
    from cas import BlobStore, Scope, load_tree
    from cas.roots import iter_roots
    from b10_transfer.environment import environment_key

    from .backends import open_backend

    L = layout(base, s3)
    store = BlobStore(open_backend(L["org"]), create=False)
    violations = collections.Counter()
    examples: list[str] = []
    out: dict = {}
    entries_checked = 0
    for (scope_i, key), want in sorted(saved.items()):
        m = Scope(open_backend(L["scope"](scope_i))).read_manifest(key)
        have = m.entries if m else {}
        for rel, (bid, size, mode) in want.items():
            entries_checked += 1
            e = have.get(rel)
            if e is None or (e.blob_id, e.size, e.mode) != (bid, size, mode):
                violations["reported-entry-missing-from-manifest"] += 1
                if len(examples) < 5:
                    examples.append(f"scope{scope_i}/{key}: {rel} -> {e}")
    out["reported_entries_checked"] = entries_checked

    keys = list(ENV_KEYS) + [environment_key(FAKE_ENV)]
    stale_roots = 0
    roots = {(r.scope_id, r.env_key): r for r in iter_roots(store) if not isinstance(r, tuple)}
    for i in range(scopes):
        scope = Scope(open_backend(L["scope"](i)))
        for key in keys:
            data = scope.read_manifest_bytes(key)
            if data is None:
                continue
            r = roots.get((scope.scope_id, key))
            if r is None or store.read_bytes(r.manifest, 64 << 20) != data:
                stale_roots += 1  # FORMAT §8: a crash after the manifest rename leaves the old root
    out["stale_roots"] = stale_roots

    def load_all(tag: str) -> int:
        files = 0
        for i in range(scopes):
            scope = Scope(open_backend(L["scope"](i)))
            for key in keys:
                dst = os.path.join(base, "final", f"{tag}-{i}-{key}")
                res = load_tree(dst, store, scope, key, threads=8, verify=True)
                if not res.manifest_found:
                    continue
                n, bad = verify_tree(dst)
                files += n
                if res.misses or bad or n != res.files:
                    violations[f"final-load-incomplete-{tag}"] += len(res.misses) + len(bad) + (n != res.files)
                    if len(examples) < 10:
                        examples.append(f"{tag} scope{i}/{key}: misses {res.misses[:2]} bad {bad[:2]}")
                shutil.rmtree(dst, ignore_errors=True)
        return files

    out["files_loaded_and_verified"] = load_all("before-gc")
    out["check"] = {}
    for i in range(scopes):
        if s3:  # the check itself in this process (the CLI's s3:// arguments are another change's)
            from cas.check import check

            res = check(store, scope=Scope(open_backend(L["scope"](i))), read_data=i == 0)
            doc = {"problems": [str(p) for p in res.problems], "blobs_read": res.blobs_read, "blobs": res.blobs}
            proc = subprocess.CompletedProcess([], 1 if res.problems else 0)
            out["check"][f"scope{i}"] = {"exit": proc.returncode, "problems": len(doc["problems"]),
                                         "blobs_read": doc["blobs_read"], "blobs": doc["blobs"]}
            if proc.returncode != 0:
                violations["cas-check-not-clean"] += 1
                examples.append(f"check scope{i}: {str(doc['problems'])[:300]}")
            continue
        args = [sys.executable, "-c", "import sys; from cas.cli import main; sys.exit(main())", "--org", L["org"],
                "--scope", L["scope"](i), "--json", "check"] + (["--read-data"] if i == 0 else [])
        proc = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=600)
        try:
            doc = json.loads(proc.stdout)
        except ValueError:
            doc = {"problems": [proc.stderr[-500:]]}
        out["check"][f"scope{i}"] = {"exit": proc.returncode, "problems": len(doc.get("problems", [])),
                                     "blobs_read": doc.get("blobs_read", 0), "blobs": doc.get("blobs", 0)}
        if proc.returncode != 0:
            violations["cas-check-not-clean"] += 1
            examples.append(f"cas check scope{i}: exit {proc.returncode}: {str(doc.get('problems'))[:300]}")
    from cas.gc import collect

    # A last gc with every grace long past: whatever it deletes must not be needed by any manifest.
    time.sleep(0)
    res = collect(store, scope=Scope(open_backend(L["scope"](0))), grace=2 * store.freshen_after)
    out["final_gc"] = {"trashed": res.blobs_trashed, "deleted": res.blobs_deleted, "problems": res.problems[:3]}
    if res.problems:
        violations["final-gc-problem"] += 1
    out["files_loaded_after_final_gc"] = load_all("after-gc")
    out["violations"] = violations
    out["examples"] = examples
    say(f"final: {entries_checked} reported entries checked, {out['files_loaded_and_verified']} files loaded and "
        f"verified, check exits {[c['exit'] for c in out['check'].values()]}, stale roots {stale_roots}")
    return out
