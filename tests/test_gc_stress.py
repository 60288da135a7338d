"""gc never deletes a referenced blob: many processes save new and overlapping trees into one org store and
several deployment scopes while another process runs gc in a loop with a short grace period.

The store's freshen_after is 1 s and the grace 3 s, so blobs age, get trashed and get deleted within the run;
every path always holds the same content, so a manifest never drops a blob it once referenced and every blob a
manifest names must stay readable. Violations: a load that misses a file, a gc problem, and afterwards any blob of
a live root's or a scope's manifest that is absent or does not verify."""
from __future__ import annotations

import json
import multiprocessing as mp
import os
import random
import shutil
import time

from cas import BlobStore, Scope, limits, load_tree, save_tree
from cas.errors import BlobCorrupt, BlobMissing
from cas.gc import collect, read_root_manifest
from cas.pack import PACK_FILE_MAX, PackEntryCorrupt, extract
from cas.roots import iter_roots

SECONDS = float(os.environ.get("CAS_STRESS_SECONDS", "20"))
SAVERS = 8
SCOPES = 3
ENV_KEYS = ("gpu-a", "gpu-b", "gpu-c")
FRESHEN = 1
GRACE = 3
SHARED = 40  # contents every saver draws from: dedup across scopes and keys
RECYCLED = 30  # contents uploaded as orphans (garbage) and later referenced again: exercises freshen/trash restore


def shared(i: int) -> bytes:
    return f"shared kernel {i}\n".encode() * (50 + i)


def recycled(j: int) -> bytes:
    # Above PACK_FILE_MAX: stored as its own (loose) blob, so an orphan upload of it is the very blob a later save
    # relies on (small files go into packs, whose ids a later save would not reproduce).
    line = f"recycled artifact {j}\n".encode()
    return line * (PACK_FILE_MAX // len(line) + 1 + j)


def _saver(wid: int, base: str, deadline: float, out: mp.Queue) -> None:
    rng = random.Random(wid)
    store = BlobStore(os.path.join(base, "org"))
    scopes = [Scope(os.path.join(base, "model", f"s{i}")) for i in range(SCOPES)]
    stats = {"saves": 0, "written": 0, "orphans": 0, "loads": 0, "load_misses": 0, "max_save_s": 0.0, "errors": []}
    n = 0
    while time.time() < deadline:
        n += 1
        tree = os.path.join(base, "work", f"w{wid}-{n}")
        files = {f"shared/{i}.py": shared(i) for i in rng.sample(range(SHARED), 3)}
        j = rng.randrange(RECYCLED)
        files[f"recycled/{j}.bin"] = recycled(j)
        for m in range(2):
            files[f"w{wid}/{n}/{m}.cubin"] = os.urandom(rng.randint(200, 4000))
        for rel, data in files.items():
            path = os.path.join(tree, rel)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "wb") as fh:
                fh.write(data)
        scope, key = rng.choice(scopes), rng.choice(ENV_KEYS)
        t = time.monotonic()
        try:
            res = save_tree(tree, store, scope, key, threads=2)
            stats["saves"] += 1
            stats["written"] += res.manifest_written
        except Exception as exc:  # counted: the test asserts there are none
            stats["errors"].append(f"save: {type(exc).__name__}: {exc}")
        stats["max_save_s"] = max(stats["max_save_s"], time.monotonic() - t)
        shutil.rmtree(tree, ignore_errors=True)
        if rng.random() < 0.3:  # a save that uploaded and died before committing: garbage, maybe needed later
            store.put_bytes(recycled(rng.randrange(RECYCLED)))
            stats["orphans"] += 1
        if n % 8 == 0:
            dst = os.path.join(base, "work", f"load-w{wid}-{n}")
            try:
                res = load_tree(dst, store, rng.choice(scopes), rng.choice(ENV_KEYS), threads=2)
                stats["loads"] += 1
                stats["load_misses"] += len(res.misses)
                stats["errors"] += [f"load miss {p}: {r}" for p, r in res.misses[:3]]
            except Exception as exc:
                stats["errors"].append(f"load: {type(exc).__name__}: {exc}")
            shutil.rmtree(dst, ignore_errors=True)
    out.put(("saver", stats))


def _collector(base: str, deadline: float, out: mp.Queue) -> None:
    store = BlobStore(os.path.join(base, "org"))
    stats = {"runs": 0, "trashed": 0, "deleted": 0, "restored": 0, "bytes_deleted": 0, "problems": [], "errors": []}
    while time.time() < deadline:
        try:
            res = collect(store, grace=GRACE, lock_wait=10)
        except Exception as exc:
            stats["errors"].append(f"gc: {type(exc).__name__}: {exc}")
            continue
        stats["runs"] += 1
        stats["trashed"] += res.blobs_trashed
        stats["deleted"] += res.blobs_deleted
        stats["bytes_deleted"] += res.bytes_deleted
        stats["restored"] += res.blobs_restored
        stats["problems"] += res.problems
        time.sleep(0.05)
    out.put(("gc", stats))


def _final_violations(base: str) -> tuple[list[str], dict]:
    store = BlobStore(os.path.join(base, "org"))
    manifests = []
    for item in iter_roots(store):
        assert not isinstance(item, tuple), item
        manifests.append((item.path, read_root_manifest(store, item)))
    for i in range(SCOPES):
        scope = Scope(os.path.join(base, "model", f"s{i}"))
        for key in scope.env_keys():
            manifests.append((scope.manifest_path(key), scope.read_manifest(key)))
    violations, checked = [], set()
    packs: dict[str, bytes | None] = {}  # pack id -> its verified content (None: unreadable, already reported)
    for where, manifest in manifests:
        for path, entry in manifest.entries.items():
            stored = entry.stored_id  # the pack of a small file, else the file's own blob
            if stored not in checked:
                checked.add(stored)
                if store.stat(stored) is None:  # in neither blobs/ nor trash/
                    violations.append(f"{where}: {path}: blob {stored} deleted")
                    packs[stored] = None
                    continue
                try:
                    if entry.pack is None:
                        store.verify(stored)
                    else:
                        packs[stored] = store.get_bytes(stored, limits.MAX_PACK_BYTES)
                except (BlobMissing, BlobCorrupt) as exc:
                    violations.append(f"{where}: {path}: {exc}")
                    packs[stored] = None
            if entry.pack is not None and packs.get(stored) is not None:
                try:
                    extract(packs[stored], entry.blob_id, entry.size, entry.offset)
                except PackEntryCorrupt as exc:
                    violations.append(f"{where}: {path}: {exc}")
    return violations, {"manifests": len(manifests), "blobs_checked": len(checked)}


def test_gc_never_deletes_a_referenced_blob(tmp_path):
    base = str(tmp_path)
    BlobStore(os.path.join(base, "org"), freshen_after=FRESHEN)
    os.makedirs(os.path.join(base, "model"))
    for i in range(SCOPES):
        Scope(os.path.join(base, "model", f"s{i}"), create=True)
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    deadline = time.time() + 3 + SECONDS  # spawned interpreters take a moment to start
    procs = [ctx.Process(target=_saver, args=(w, base, deadline, out)) for w in range(SAVERS)]
    procs.append(ctx.Process(target=_collector, args=(base, deadline, out)))
    for p in procs:
        p.start()
    reports = [out.get(timeout=SECONDS + 120) for _ in procs]
    for p in procs:
        p.join(timeout=30)
        assert p.exitcode == 0

    savers = [s for kind, s in reports if kind == "saver"]
    (gc,) = [s for kind, s in reports if kind == "gc"]
    violations, final = _final_violations(base)
    errors = [e for s in savers for e in s["errors"]] + gc["errors"]
    summary = {
        "saves": sum(s["saves"] for s in savers),
        "manifest_writes": sum(s["written"] for s in savers),
        "orphan_uploads": sum(s["orphans"] for s in savers),
        "loads": sum(s["loads"] for s in savers),
        "load_misses": sum(s["load_misses"] for s in savers),
        "max_save_s": round(max(s["max_save_s"] for s in savers), 3),
        "gc_runs": gc["runs"],
        "gc_trashed": gc["trashed"],
        "gc_deleted": gc["deleted"],
        "gc_bytes_deleted": gc["bytes_deleted"],
        "gc_restored": gc["restored"],
        "gc_problems": len(gc["problems"]),
        "violations": len(violations),
        **final,
    }
    print("\nstress:", json.dumps(summary))
    assert not violations, violations[:10]
    assert not gc["problems"], gc["problems"][:10]
    assert not errors, errors[:10]
    assert summary["load_misses"] == 0
    # The run must actually have exercised the collector, or it proves nothing.
    assert summary["saves"] > 0 and gc["runs"] > 0 and gc["trashed"] > 0 and gc["deleted"] > 0
