"""SIGKILL at every fault point and at random moments (FORMAT §1 atomicity, §8 what a crash leaves behind): the manifest
is always the old or the new one (a valid merge when saves race), no partial file is ever at a final name in the store
or the target, leftovers are only temp files and stale locks, and the next save/load succeeds at once."""
from __future__ import annotations

import os
import random
import time

import msgpack
import pytest

from cas import BlobStore, Manifest, Scope, load_tree, pack, save_tree
from cas.lock import _HOST, _pid_alive

from cas_helpers import ENV_KEY, blob_id, check_root_names_manifest, entry_bytes, expected_entries, kill_after_ready, \
    manifest_entries, read_tree, run_worker, spawn, temp_files, unexpected_files, verify_all_blobs, write_tree

OLD = {f"old/{i}.py": f"old file {i}\n".encode() * (i * 40) for i in range(12)}
OLD["shared/kernel.cubin"] = bytes(range(256)) * 40
OLD["changes.json"] = b'{"v": 1}'


def _new_tree() -> dict:
    rng = random.Random(7)
    new = {p: d for p, d in OLD.items() if not p.startswith("old/1")}  # a subset of the old files ...
    new["changes.json"] = b'{"v": 2, "more": true}'  # ... one changed ...
    new.update({f"new/{i % 4}/k{i}.ptx": rng.randbytes(rng.randint(0, 30_000)) for i in range(24)})  # ... new ones
    # ... and two above cas.pack.PACK_FILE_MAX, stored as loose blobs (the small ones all go into one pack). A save of
    # NEW over OLD writes four blobs: two loose ones and the pack (in any order), then the manifest's blob.
    new["new/0/big.bin"] = rng.randbytes(pack.PACK_FILE_MAX + 1000)
    new["new/2/huge.bin"] = rng.randbytes(pack.PACK_FILE_MAX + 3000)
    return new


NEW = _new_tree()
OLD_ENTRIES = expected_entries(OLD)
MERGED_ENTRIES = {**OLD_ENTRIES, **expected_entries(NEW)}


def _setup(base):
    """A store and scope holding OLD; NEW written to base/new. Returns (store, scope, old manifest bytes)."""
    base.mkdir(parents=True, exist_ok=True)
    store = BlobStore(base / "store")
    scope = Scope(base / "scope", create=True)
    write_tree(base / "old", OLD)
    write_tree(base / "new", NEW)
    save_tree(base / "old", store, scope, ENV_KEY)
    return store, scope, scope.read_manifest_bytes(ENV_KEY)


def _worker_args(base, *srcs):
    return ["save", *srcs, "--store", base / "store", "--scope", base / "scope", "--threads", 4]


def _check_volume(store, scope):
    """Invariants after any crash: the manifest parses and every blob it names is whole; every blob at a final name
    verifies; nothing but temp files and lock files is left besides the format's own names."""
    m = scope.read_manifest(ENV_KEY)
    for e in m.entries.values():
        assert blob_id(entry_bytes(store, e)) == e.blob_id  # its own blob or its slice of its pack, verified
    verify_all_blobs(store)
    assert unexpected_files(store.root, scope.root) == []
    assert os.listdir(os.path.join(store.root, "quarantine")) == []
    return dict(m.entries)


def _recover_and_check(base, store, scope, srcs=("new",)):
    """The next save (waiting on any lock a dead process left, without a long stale timeout) and load succeed;
    temp files aged past TEMP_EXPIRY are removed by gc; the store is then clean."""
    for src in srcs:
        save_tree(base / src, store, scope, ENV_KEY, lock_timeout=20, stale_after=3600)
    want = dict(OLD_ENTRIES)
    for src in srcs:
        want.update(expected_entries({p: d for p, (d, _) in read_tree(base / src).items()}))
    assert manifest_entries(scope) == want
    check_root_names_manifest(store, scope)
    dst = base / f"dst-after-{time.monotonic_ns()}"
    res = load_tree(dst, store, scope, ENV_KEY)
    assert res.misses == []
    assert {p: blob_id(d) for p, (d, _) in read_tree(dst).items()} == {p: e.blob_id for p, e in want.items()}
    _age_temp_files_and_collect(store, scope)
    assert temp_files(store.root) == [] and temp_files(scope.root) == []
    # A lock may remain only if a saver died after its commit, holding it, and nothing since needed it: then it
    # names a dead process, so the next writer breaks it at once (FORMAT §8: "stale lock").
    for name in os.listdir(scope.manifests):
        if name.endswith(".lock"):
            holder = msgpack.unpackb(open(os.path.join(scope.manifests, name), "rb").read())
            assert holder["host"] == _HOST and not _pid_alive(holder["pid"]), (name, holder)
            lock = scope.lock(ENV_KEY, timeout=0, stale_after=3600)
            assert lock.try_acquire()
            lock.release()


def _age_temp_files_and_collect(store, scope):
    from cas import gc

    old = time.time() - 2 * 3600
    for root in (store.root, scope.root):
        for rel in temp_files(root):
            os.utime(os.path.join(root, rel), (old, old))
    gc.collect(store, scope=scope, lock_wait=10)
    for e in scope.read_manifest(ENV_KEY).entries.values():
        entry_bytes(store, e)  # gc removed leftovers, never a live blob (verified: loose or through its pack)


# blob-written fires four times in a save of NEW (see _new_tree): 1 and 3 are uploads (the first, and the last but
# one, with blobs already at final names), 4 is the manifest's own blob, stored under the lock before the manifest's
# rename (FORMAT §3), so a save killed there leaves the old manifest and a stale lock.
SAVE_POINTS = [("hashed", 1, "old"), ("blob-written", 1, "old"), ("blob-written", 3, "old"),
               ("uploaded", 1, "old"), ("locked", 1, "old"), ("manifest-renamed", 1, "new"),
               ("blob-written", 4, "old")]


@pytest.mark.parametrize("point,nth,expect", SAVE_POINTS, ids=[f"{p}:{n}" for p, n, _ in SAVE_POINTS])
def test_saver_killed_at_fault_point(tmp_path, point, nth, expect):
    store, scope, old_bytes = _setup(tmp_path)
    rc, report, err = run_worker(_worker_args(tmp_path, tmp_path / "new"), kill_at=f"{point}:{nth}")
    assert rc == -9, f"worker was not killed at {point}:{nth}: rc={rc} {err[-2000:]}"
    assert report is None

    entries = _check_volume(store, scope)
    assert entries == (OLD_ENTRIES if expect == "old" else MERGED_ENTRIES)
    if expect == "old":
        assert scope.read_manifest_bytes(ENV_KEY) == old_bytes  # not rewritten at all
    lock = os.path.join(scope.manifests, ENV_KEY + ".lock")
    if point in ("locked", "manifest-renamed") or expect == "new" or (point, nth) == ("blob-written", 4):
        holder = msgpack.unpackb(open(lock, "rb").read())
        assert holder["host"] == _HOST and holder["pid"] != os.getpid()  # the dead saver's, left stale
    else:
        assert not os.path.exists(lock)
    if point == "blob-written":
        assert temp_files(os.path.join(store.root, "blobs"))  # the interrupted upload's temp file
    if point == "manifest-renamed":
        # Crash between manifest rename and root: the root still names the old manifest (FORMAT §8).
        from cas.roots import iter_roots

        (root,) = [r for r in iter_roots(store)]
        assert store.read_bytes(root.manifest, 1 << 20) == old_bytes
    _recover_and_check(tmp_path, store, scope)


LOAD_POINTS = [1, 4, 15]


@pytest.mark.parametrize("nth", LOAD_POINTS)
def test_loader_killed_at_restored_temp(tmp_path, nth):
    store, scope, _ = _setup(tmp_path)
    save_tree(tmp_path / "new", store, scope, ENV_KEY)
    dst = tmp_path / "dst"
    local = {"mine/notes.txt": b"unrelated local file", "old/0.py": b"stale local copy, other size"}
    write_tree(dst, local)
    write_tree(dst, {p: NEW[p] for p in sorted(NEW)[:5]})  # a few already in place
    rc, _, err = run_worker(["load", dst, "--store", store.root, "--scope", scope.root, "--threads", 4],
                            kill_at=f"restored-temp:{nth}")
    assert rc == -9, err[-2000:]
    _check_target_after_crash(dst, local)
    assert temp_files(dst)  # the killed load's temp file(s)

    res = load_tree(dst, store, scope, ENV_KEY)
    assert res.misses == []
    got = read_tree(dst)
    want = {p: OLD.get(p) for p in OLD} | {p: d for p, d in NEW.items()} | {"mine/notes.txt": local["mine/notes.txt"]}
    assert {p: d for p, (d, _) in got.items()} == want
    leftovers = temp_files(dst)
    assert leftovers  # young temp files stay: a live load could own them ...
    old = time.time() - 2 * 3600
    for rel in leftovers:
        os.utime(dst / rel, (old, old))
    load_tree(dst, store, scope, ENV_KEY)
    assert temp_files(dst) == []  # ... once older than TEMP_EXPIRY the next load removes them


def _check_target_after_crash(dst, local):
    """Every file at a final name in the target is whole: either untouched local content or exactly an entry."""
    merged = {**OLD, **NEW}
    for p, (data, _) in read_tree(dst).items():
        if p in local and data == local[p]:
            continue
        assert p in merged, p
        assert data == merged[p], f"{p}: {len(data)} bytes, not the entry's {len(merged[p])}"
    for rel in temp_files(dst):
        assert os.path.basename(rel).startswith(".tmp-")


@pytest.mark.timeout(240)
def test_random_kills_of_savers_and_loaders(tmp_path):
    """Kill at random moments (after start-up, during the work). Bounded: 10 savers, 10 loaders."""
    rng = random.Random(int(os.environ.get("CAS_CRASH_SEED", "20261127")))
    outcomes = {"old": 0, "new": 0}
    for i in range(10):
        base = tmp_path / f"s{i}"
        store, scope, old_bytes = _setup(base)
        rc, _, err = kill_after_ready(_worker_args(base, base / "new"), rng.uniform(0, 0.12))
        assert rc in (0, -9), err[-2000:]
        entries = _check_volume(store, scope)
        if entries == OLD_ENTRIES:
            outcomes["old"] += 1
            assert scope.read_manifest_bytes(ENV_KEY) == old_bytes
        else:
            assert entries == MERGED_ENTRIES
            outcomes["new"] += 1
        if rc == 0:
            assert entries == MERGED_ENTRIES
        _recover_and_check(base, store, scope)

    base = tmp_path / "loads"
    store, scope, _ = _setup(base)
    save_tree(base / "new", store, scope, ENV_KEY)
    for i in range(10):
        dst = base / f"dst{i}"
        local = {"mine/x": b"local"}
        write_tree(dst, local)
        rc, _, err = kill_after_ready(["load", dst, "--store", store.root, "--scope", scope.root, "--threads", 4],
                                      rng.uniform(0, 0.08))
        assert rc in (0, -9), err[-2000:]
        _check_target_after_crash(dst, local)
        res = load_tree(dst, store, scope, ENV_KEY)
        assert res.misses == []
        assert {p: d for p, (d, _) in read_tree(dst).items()} == {**OLD, **NEW, **local}
    print("random saver kills:", outcomes)


@pytest.mark.timeout(240)
@pytest.mark.parametrize("round_", [0, 1])
def test_concurrent_savers_some_killed(tmp_path, round_):
    """Six savers race on one manifest; some are killed at fault points or at random. The manifest is a valid
    merge: the old entries, every surviving saver's entries, and each killed saver's entries all or none."""
    rng = random.Random(round_)
    store, scope, _ = _setup(tmp_path)
    # blob-written:1 is this saver's first upload (its pack, or new/0/big.bin if no other saver stored it yet),
    # always before its commit; its second can be the manifest's blob, after the commit.
    fates = [None, "locked:1", "manifest-renamed:1", "blob-written:1", "random", None] if round_ == 0 else \
        ["random", "random", "locked:1", None, "hashed:1", "random"]
    trees = []
    for s in range(len(fates)):
        tree = {f"own/{s}/{i}.py": f"saver {s} file {i}".encode() * (i + 1) for i in range(8)}
        tree.update({p: d for p, d in NEW.items() if p.startswith("new/0")})  # identical content across savers
        write_tree(tmp_path / f"t{s}", tree)
        trees.append(tree)
    procs = []
    for s, fate in enumerate(fates):
        args = _worker_args(tmp_path, tmp_path / f"t{s}")
        if fate == "random":
            procs.append(("random", spawn(args + ["--ready"])))
        else:
            procs.append((fate, spawn(args, kill_at=fate)))
    for fate, p in procs:
        if fate == "random":
            assert p.stdout.readline().strip() == "READY"
            time.sleep(rng.uniform(0, 0.15))
            p.kill()
    results = []
    for fate, p in procs:
        out, err = p.communicate(timeout=120)
        results.append(p.returncode)
        assert p.returncode in (0, -9), err[-2000:]
        if fate not in (None, "random"):
            assert p.returncode == -9, f"{fate} was not reached: {err[-1000:]}"
        if fate is None:
            assert p.returncode == 0, err[-2000:]

    entries = _check_volume(store, scope)
    for p, e in OLD_ENTRIES.items():
        assert entries[p] == e
    for s, tree in enumerate(trees):
        want = expected_entries(tree)
        own = {p for p in want if p.startswith(f"own/{s}/")}
        present = {p for p in own if entries.get(p) == want[p]}
        assert present in (set(), own), f"saver {s} ({fates[s]}) committed partially"
        if results[s] == 0 or fates[s] == "manifest-renamed:1":
            assert present == own
        elif fates[s] in ("locked:1", "hashed:1", "blob-written:1"):
            assert present == set()
    allowed = dict(OLD_ENTRIES)
    for tree in trees:
        allowed.update(expected_entries(tree))
    assert entries.items() <= allowed.items()
    _recover_and_check(tmp_path, store, scope, srcs=[f"t{s}" for s in range(len(fates))])
