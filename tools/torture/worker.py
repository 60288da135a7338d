"""One torture worker: a loop of random operations on the shared stores until a deadline, an op budget or a stop
file. Every operation is journaled (`begin` before, `end` after) so the supervisor knows what a killed worker was
doing and which saves succeeded. Run by the supervisor as `python -m tools.torture.worker ARGS`."""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import time

_REAL_TIME = time.time  # deadlines use the real clock even when this worker's clock is skewed

ENV_KEYS = ("env-a", "env-b")
FAKE_ENV = {"device_type": "cpu", "cpu_architecture": "x86_64", "torch_version": "torture", "triton_version": "none"}
OPS = ("save", "load", "gc", "check", "api_save", "api_load")


def layout(base: str, s3: str | None = None) -> dict:
    """Where everything is; with `s3` (an s3://bucket URL) the org store and the scopes are prefixes of that bucket
    (tools/torture/backends.py), the rest stays local."""
    vol = os.path.join(base, "vol")
    org, scope_root = (f"{s3}/org/b10_cas", f"{s3}/model") if s3 else (os.path.join(vol, "org", "b10_cas"),
                                                                        os.path.join(vol, "model"))
    return {"vol": vol, "org": org, "s3": s3,
            "scope": lambda i: f"{scope_root}/scope{i}" if s3 else os.path.join(scope_root, f"scope{i}"),
            "journal": os.path.join(base, "journal"), "local": os.path.join(base, "local"),
            "stop": os.path.join(base, "STOP")}


def api_settings(base: str, scope_i: int, local: str):
    from b10_transfer.config import read_settings

    L = layout(base)
    return read_settings({
        "BASETEN_FS_ENABLED": "1", "B10FS_VOLUME_ROOT": L["vol"], "TORCHINDUCTOR_CACHE_DIR": local,
        "B10FS_CACHE_DIR": L["scope"](scope_i), "B10FS_ORG_CACHE_DIR": L["org"], "LOCAL_WORK_DIR": os.path.dirname(local),
        "MIN_LOCAL_SPACE_MB": "1", "MIN_B10FS_SPACE_MB": "1", "MAX_CONCURRENT_SAVES": "6",
        "CLEANUP_LOCK_TIMEOUT_SECONDS": "5", "B10_TRANSFER_IO_THREADS": "4",
    })


def main(argv=None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--base", required=True)
    ap.add_argument("--id", type=int, required=True)
    ap.add_argument("--gen", type=int, default=0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--deadline", type=float, required=True, help="real unix time to stop at")
    ap.add_argument("--max-ops", type=int, default=1 << 30)
    ap.add_argument("--scopes", type=int, default=4)
    ap.add_argument("--shared", type=int, default=300, help="size of the shared key pool")
    ap.add_argument("--grace", type=float, required=True)
    ap.add_argument("--skew", type=float, default=0.0, help="seconds this worker's clock is off")
    ap.add_argument("--weights", default="30,30,8,4,14,14", help="save,load,gc,check,api_save,api_load")
    ap.add_argument("--s3", default=None, help="s3://bucket holding the org store and scopes (AWS_* from the env)")
    a = ap.parse_args(argv)

    if a.skew:
        real_ns = time.time_ns
        time.time = lambda: _REAL_TIME() + a.skew
        time.time_ns = lambda: real_ns() + int(a.skew * 1e9)

    import logging

    logging.basicConfig(level=logging.CRITICAL)  # the journal is the record; keep 64 workers' stderr quiet
    import blake3

    from cas import BlobStore, Scope
    import b10_transfer.core as core
    import b10_transfer.environment as environment

    environment.environment = lambda: dict(FAKE_ENV)  # no torch import in 64 processes
    core.environment = environment.environment

    from .backends import open_backend

    L = layout(a.base, a.s3)
    rng = random.Random(a.seed)
    weights = [float(w) for w in a.weights.split(",")]
    store = BlobStore(open_backend(L["org"]), create=False)
    scopes = [Scope(open_backend(L["scope"](i))) for i in range(a.scopes)]
    os.makedirs(L["journal"], exist_ok=True)
    journal = open(os.path.join(L["journal"], f"w{a.id:03d}-g{a.gen:03d}.jsonl"), "a", buffering=1)
    home = os.path.join(L["local"], f"w{a.id:03d}")  # this worker's persistent cache dir, like a pod's /tmp
    os.makedirs(home, exist_ok=True)
    ctx = Ctx(a, L, rng, store, scopes, home, blake3)

    def log(doc: dict) -> None:
        journal.write(json.dumps(doc, separators=(",", ":")) + "\n")

    # A respawned worker first checks the cache dir its killed predecessor was writing: a partial file at a final
    # name must be caught before a later load silently repairs it.
    from .content import verify_tree

    checked, bad = verify_tree(home)
    log({"n": 0, "op": "startup", "phase": "end", "ok": True, "checked": checked, "bad": bad[:10]})
    n = 0
    while n < a.max_ops and _REAL_TIME() < a.deadline and not os.path.exists(L["stop"]):
        n += 1
        op = rng.choices(OPS, weights)[0]
        scope_i = rng.randrange(a.scopes)
        key = rng.choice(ENV_KEYS)
        log({"n": n, "op": op, "phase": "begin", "scope": scope_i, "key": key, "t": _REAL_TIME()})
        started = time.monotonic()
        try:
            result = getattr(ctx, op)(scope_i, key, n)
            result.setdefault("ok", True)
        except Exception as exc:  # every failure is a figure; the supervisor judges which are violations
            result = {"ok": False, "error": type(exc).__name__, "msg": str(exc)[:300]}
        result.update(n=n, op=op, phase="end", scope=scope_i, key=key, dur=round(time.monotonic() - started, 4))
        log(result)
    journal.close()


class Ctx:
    def __init__(self, a, L, rng, store, scopes, home, blake3):
        self.a, self.L, self.rng, self.store, self.scopes, self.home, self.b3 = a, L, rng, store, scopes, home, blake3

    # -- trees ---------------------------------------------------------------------------------------------------
    def _keys(self, n: int) -> list[str]:
        from .content import path_of  # noqa: F401  (warms the cache)

        rng = self.rng
        keys = [f"s{rng.randrange(self.a.shared)}" for _ in range(rng.randint(2, 12))]
        keys += [f"u{self.a.id}-{self.a.gen}-{n}-{j}" for j in range(rng.randint(0, 6))]
        if rng.random() < 0.01:
            keys.append(f"big{rng.randrange(2)}")
        return keys

    def _tree(self, n: int) -> str:
        """A cache dir to save: usually this worker's growing home dir, sometimes a fresh one."""
        from .content import write_files

        if self.rng.random() < 0.25:
            root = os.path.join(self.L["local"], f"w{self.a.id:03d}-t{self.a.gen}-{n}")
        else:
            root = self.home
            if _count_files(root) > 250:  # a new pod
                shutil.rmtree(root, ignore_errors=True)
        os.makedirs(root, exist_ok=True)
        write_files(root, self._keys(n))
        return root

    def _entries(self, root: str) -> dict:
        """What a save of `root` reports: every file it takes, with its blob id, size and mode."""
        from cas.tree import scan

        from .content import expected

        out = {}
        for f in scan(root):
            data = expected(f.rel)
            if data is None:
                continue  # not ours (cannot happen); the check of the tree reports it
            out[f.rel] = [self.b3.blake3(data).hexdigest(), len(data), f.mode]
        return out

    # -- operations ------------------------------------------------------------------------------------------
    def save(self, scope_i, key, n):
        from cas import save_tree

        root = self._tree(n)
        entries = self._entries(root)
        res = save_tree(root, self.store, self.scopes[scope_i], key, threads=4, lock_timeout=60, stale_after=5)
        out = {"entries": entries, "new": res.new_entries, "written": res.manifest_written,
               "uploaded": res.blobs_uploaded, "changed": res.skipped_changed}
        _cleanup(root, self.home)
        return out

    def api_save(self, scope_i, key, n):
        from b10_transfer import core

        root = self._tree(n)
        entries = self._entries(root)
        status, stats = core.save(root, settings=api_settings(self.a.base, scope_i, root))
        out = {"status": status.name, "reason": stats.reason, "api_key": stats.env_key}
        if status.name == "SUCCESS" or (status.name == "SKIPPED" and stats.reason == "nothing new to record"):
            out["entries"] = entries
        else:
            out["ok"] = False
            out["error"] = f"status-{status.name}"
        _cleanup(root, self.home)
        return out

    def load(self, scope_i, key, n):
        from cas import Scope, load_tree

        class Recording(Scope):
            seen = None

            def read_manifest(self, env_key):
                m = super().read_manifest(env_key)
                Recording.seen = m
                return m

        target = self._target(n)
        scope = Recording(self.scopes[scope_i].backend)
        res = load_tree(target, self.store, scope, key, threads=4)
        bad = []
        if res.manifest_found:
            for rel, e in Recording.seen.entries.items():
                if any(rel == p for p, _ in res.misses):
                    continue
                try:
                    with open(os.path.join(target, rel), "rb") as fh:
                        data = fh.read()
                except OSError as exc:
                    bad.append(f"{rel}: not restored ({exc.strerror})")
                    continue
                if len(data) != e.size or self.b3.blake3(data).hexdigest() != e.blob_id:
                    bad.append(f"{rel}: content differs from the manifest the load read")
        bad += self._verify(target)
        out = {"found": res.manifest_found, "files": res.files, "restored": res.restored,
               "misses": [f"{p}: {why}"[:200] for p, why in res.misses[:5]], "n_misses": len(res.misses),
               "bad": bad[:10]}
        _cleanup(target, self.home)
        return out

    def api_load(self, scope_i, key, n):
        from b10_transfer import core

        target = self._target(n)
        status, stats = core.load(target, settings=api_settings(self.a.base, scope_i, target))
        out = {"status": status.name, "reason": stats.reason, "n_misses": stats.misses, "bad": self._verify(target)[:10]}
        if status.name == "ERROR":
            out["ok"] = False
            out["error"] = "status-ERROR"
        _cleanup(target, self.home)
        return out

    def gc(self, scope_i, key, n):
        from cas.gc import collect

        res = collect(self.store, scope=self.scopes[scope_i], grace=self.a.grace, lock_wait=self.rng.uniform(0, 2))
        return {"collected": res.collected, "trashed": res.blobs_trashed, "deleted": res.blobs_deleted,
                "restored": res.blobs_restored, "temp": res.temp_deleted, "problems": res.problems[:5]}

    def check(self, scope_i, key, n):
        from cas.check import check

        subset = (self.rng.randint(1, 8), 8) if self.rng.random() < 0.5 else None
        res = check(self.store, scope=self.scopes[scope_i], read_data=subset is not None, subset=subset)
        return {"problems": [str(p)[:300] for p in res.problems[:10]], "n_problems": len(res.problems),
                "read": res.blobs_read}

    # -- helpers ---------------------------------------------------------------------------------------------
    def _target(self, n: int) -> str:
        if self.rng.random() < 0.3:
            return self.home  # a partial load into a cache dir that already holds files
        return os.path.join(self.L["local"], f"w{self.a.id:03d}-l{self.a.gen}-{n}")

    def _verify(self, target: str) -> list[str]:
        from .content import verify_tree

        return verify_tree(target)[1] if os.path.isdir(target) else []


def _count_files(root: str) -> int:
    return sum(len(names) for _, _, names in os.walk(root))


def _cleanup(root: str, home: str) -> None:
    if root != home:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
