"""cas gc against a real store on the local filesystem: roots across deployments, TTL, trash, max-size, leftovers.

Age is simulated by setting mtimes back with os.utime (on a local fs the server clock is this clock)."""
from __future__ import annotations

import os
import time

import msgpack
import pytest
from cas_helpers import write_tree

from cas import BlobStore, LockTimeout, Scope, load_tree, save_tree
from cas.gc import GcRefused, collect
from cas.lock import LockFile
from cas.pack import PACK_FILE_MAX
from cas.roots import iter_roots, root_path
from cas.timing import LOCK_EXPIRY

FRESHEN = 1
GRACE = 2
DAY = 86400


def content(tag: str, n: int = 2000) -> bytes:
    return (tag.encode() + b"-") * (n // (len(tag) + 1))


def age_all(store: BlobStore, seconds: float, area: str = "blobs") -> None:
    """Make every blob (or trash item) `seconds` old."""
    t = time.time() - seconds
    for b in store.iter_blobs(area):
        os.utime(b.path, (t, t))


def age(path: str, seconds: float) -> None:
    t = time.time() - seconds
    os.utime(path, (t, t))


def ids_of(scope: Scope, env_key: str) -> set[str]:
    return scope.read_manifest(env_key).blob_ids()


def present(store: BlobStore) -> set[str]:
    return {b.id for b in store.iter_blobs()}


def in_trash(store: BlobStore) -> set[str]:
    return {b.id for b in store.iter_blobs("trash")}


@pytest.fixture
def env(tmp_path):
    store = BlobStore(tmp_path / "org", freshen_after=FRESHEN)
    (tmp_path / "model").mkdir()
    a = Scope(tmp_path / "model" / "a", create=True)
    b = Scope(tmp_path / "model" / "b", create=True)
    return store, a, b, tmp_path


def test_refuses_a_grace_shorter_than_twice_freshen_after(env):
    store, a, _, _ = env
    with pytest.raises(GcRefused, match="2 x freshen_after"):
        collect(store, scope=a, grace=1.5)


def test_gc_from_one_deployment_keeps_the_others_blobs(env):
    store, a, b, tmp = env
    shared = {"common/k.py": content("shared")}
    save_tree(write_tree(tmp / "ta", {**shared, "a/only.py": content("A")}), store, a, "gpu1")
    save_tree(write_tree(tmp / "tb", {**shared, "b/only.py": content("B")}), store, b, "gpu1")
    orphan = store.put_bytes(content("orphan"))  # an upload whose save never committed
    age_all(store, 10 * GRACE)

    res = collect(store, scope=a, grace=GRACE)

    assert res.collected and not res.problems
    assert res.roots_live == 2
    assert ids_of(b, "gpu1") <= present(store)  # b's blobs survive a gc run from a
    assert ids_of(a, "gpu1") <= present(store)
    assert orphan not in present(store) and orphan in in_trash(store)
    assert res.blobs_trashed == 1 and res.blobs_deleted == 0

    # Phase two: the trash item is deleted only once it is itself older than the grace period.
    res = collect(store, scope=a, grace=GRACE)
    assert res.blobs_deleted == 0 and orphan in in_trash(store)
    age_all(store, 10 * GRACE, "trash")
    res = collect(store, scope=a, grace=GRACE)
    assert res.blobs_deleted == 1 and orphan not in in_trash(store)
    assert ids_of(b, "gpu1") | ids_of(a, "gpu1") <= present(store)


def test_young_unreferenced_blobs_are_kept(env):
    store, a, _, _ = env
    fresh = store.put_bytes(content("in-flight upload"))
    res = collect(store, scope=a, grace=GRACE)
    assert fresh in present(store)
    assert res.blobs_young == 1 and res.blobs_trashed == 0


def test_root_past_ttl_releases_its_blobs_and_shared_blobs_stay(env):
    store, a, b, tmp = env
    shared = {"common/k.py": content("shared")}
    save_tree(write_tree(tmp / "ta", {**shared, "a/only.py": content("A")}), store, a, "gpu1")
    save_tree(write_tree(tmp / "tb", {**shared, "b/only.py": content("B")}), store, b, "gpu1")
    age_all(store, 10 * GRACE)
    b_root = root_path(store, b.scope_id, "gpu1")
    age(b_root, 31 * DAY)
    b_only = ids_of(b, "gpu1") - ids_of(a, "gpu1")

    res = collect(store, scope=a, grace=GRACE, root_ttl=30 * DAY)

    assert res.roots_dead == 1 and res.roots_live == 1
    assert not os.path.exists(b_root)
    assert ids_of(a, "gpu1") <= present(store)
    assert b_only and b_only.isdisjoint(present(store))
    # b's manifest blob is garbage too; its entries' blobs minus the shared one are in trash.
    assert b_only <= in_trash(store)


def test_trashed_blob_comes_back_for_a_load_and_for_a_save(env):
    store, a, b, tmp = env
    save_tree(write_tree(tmp / "tb", {"b/x.py": content("X"), "b/y.py": content("Y")}), store, b, "gpu1")
    age_all(store, 10 * GRACE)
    age(root_path(store, b.scope_id, "gpu1"), 31 * DAY)
    collect(store, scope=a, grace=GRACE, root_ttl=30 * DAY)
    wanted = ids_of(b, "gpu1")
    assert wanted <= in_trash(store)

    # A replica of b loads its (still present) manifest: every blob is restored from trash, no miss.
    res = load_tree(tmp / "restore-b", store, b, "gpu1")
    assert not res.misses and res.restored == 2
    assert wanted <= present(store)

    # A save elsewhere whose file's blob sits in trash stores it again (FORMAT §2: a writer does not look in trash):
    # the copy in blobs/ is new and fresh, the one in trash a duplicate that gc then deletes. A large file's blob ...
    big = b"z" * (PACK_FILE_MAX + 5000)
    z = store.put_bytes(big)
    assert z  # id of the raw content, as a loose blob of a file above PACK_FILE_MAX has
    age_all(store, 10 * GRACE)
    collect(store, scope=a, grace=GRACE)
    assert z in in_trash(store) and z not in present(store)
    before = time.time() - 1  # mtimes have one-second resolution on some file systems
    res = save_tree(write_tree(tmp / "ta", {"a/z.bin": big}), store, a, "gpu1")
    assert res.blobs_present == 0 and res.blobs_uploaded == 1 and res.bytes_uploaded > 0
    assert res.packs_written == 0
    assert z in present(store) and os.stat(store.blob_path(z)).st_mtime >= before  # fresh in blobs/
    res = collect(store, scope=a, grace=GRACE)  # a's root makes z live: its trash copy is redundant
    assert res.blobs_restored == 1 and z in present(store) and z not in in_trash(store)

    # ... and a pack: small files whose concatenation is a trashed pack's content make the same pack id, stored again.
    (b_pack,) = wanted
    age_all(store, 10 * GRACE)
    if os.path.exists(root_path(store, b.scope_id, "gpu1")):
        age(root_path(store, b.scope_id, "gpu1"), 31 * DAY)
    collect(store, scope=a, grace=GRACE, root_ttl=30 * DAY)
    assert b_pack in in_trash(store) and b_pack not in present(store) and z in present(store)  # a's root keeps z
    before = time.time() - 1
    res = save_tree(tmp / "tb", store, a, "gpu1")
    assert res.packs_written == 1 and res.bytes_uploaded > 0
    assert {e.pack for p, e in a.read_manifest("gpu1").entries.items() if p.startswith("b/")} == {b_pack}
    assert b_pack in present(store) and os.stat(store.blob_path(b_pack)).st_mtime >= before
    res = load_tree(tmp / "restore-b-from-a", store, a, "gpu1")
    assert not res.misses and res.restored == 3
    res = collect(store, scope=a, grace=GRACE)  # nothing lost: both blobs stay, the duplicate in trash goes
    assert res.collected and {z, b_pack} <= present(store) and b_pack not in in_trash(store)
    res = load_tree(tmp / "restore-again", store, a, "gpu1")
    assert not res.misses and res.restored == 3


def test_live_blob_found_in_trash_is_put_back_not_deleted(env):
    store, a, _, tmp = env
    save_tree(write_tree(tmp / "ta", {"a/x.py": content("X")}), store, a, "gpu1")
    (blob,) = ids_of(a, "gpu1")
    os.makedirs(os.path.dirname(store.trash_path(blob)), exist_ok=True)  # trash fan-out is lazy
    os.rename(store.blob_path(blob), store.trash_path(blob))  # as if a save raced phase one
    age_all(store, 10 * GRACE, "trash")
    res = collect(store, scope=a, grace=GRACE)
    assert res.blobs_restored == 1 and res.blobs_deleted == 0
    assert blob in present(store)


def test_unreadable_root_or_manifest_blob_stops_all_deletion(env):
    store, a, b, tmp = env
    save_tree(write_tree(tmp / "ta", {"a/x.py": content("X")}), store, a, "gpu1")
    save_tree(write_tree(tmp / "tb", {"b/x.py": content("BX")}), store, b, "gpu1")
    orphan = store.put_bytes(content("orphan"))
    age_all(store, 10 * GRACE)
    bad = os.path.join(store.root, "roots", b.scope_id, "gpu2.root")
    with open(bad, "wb") as fh:
        fh.write(b"\xc1 not msgpack")

    res = collect(store, scope=a, grace=GRACE)
    assert not res.collected and any("unreadable root" in p for p in res.problems)
    assert orphan in present(store) and res.blobs_trashed == 0

    # The same for a root whose manifest blob is gone.
    os.unlink(bad)
    root = next(r for r in iter_roots(store) if r.scope_id == b.scope_id)
    os.unlink(store.blob_path(root.manifest))
    res = collect(store, scope=a, grace=GRACE)
    assert not res.collected and any("not in store" in p for p in res.problems)
    assert orphan in present(store)

    # An unreadable root past the TTL protects nothing: it is simply removed.
    with open(bad, "wb") as fh:
        fh.write(b"junk")
    age(bad, 31 * DAY)
    os.unlink(root.path)
    res = collect(store, scope=a, grace=GRACE, root_ttl=30 * DAY)
    assert res.collected and res.roots_dead == 1 and not os.path.exists(bad)
    assert orphan in in_trash(store)


def test_dry_run_changes_nothing(env):
    store, a, _, tmp = env
    save_tree(write_tree(tmp / "ta", {"a/x.py": content("X")}), store, a, "gpu1")
    store.put_bytes(content("orphan"))
    age_all(store, 10 * GRACE)
    before = present(store)
    res = collect(store, scope=a, grace=GRACE, dry_run=True)
    assert res.blobs_trashed == 1 and res.dry_run
    assert present(store) == before and not in_trash(store)


def test_max_size_retires_least_recently_used_roots_but_never_a_recent_one(env):
    store, a, b, tmp = env
    big = {f"f{i}": os.urandom(20000) for i in range(5)}  # incompressible
    save_tree(write_tree(tmp / "ta", {f"a/{k}": v for k, v in big.items()}), store, a, "gpu1")
    save_tree(write_tree(tmp / "tb", {f"b/{k}": os.urandom(20000) for k in big}), store, b, "gpu1")
    save_tree(write_tree(tmp / "tc", {"c/small": content("small")}), store, b, "cpu")
    age_all(store, 10 * GRACE)
    age(root_path(store, a.scope_id, "gpu1"), 3 * DAY)  # least recently used
    age(root_path(store, b.scope_id, "gpu1"), 2 * DAY)
    # b/cpu stays fresh: used within the grace period, so it is never retired.

    res = collect(store, scope=a, grace=GRACE, max_size=150_000)
    assert [r.scope_id + "/" + r.env_key for r in res.roots_retired] == [a.scope_id + "/gpu1"]
    assert res.over_max_size == 0
    assert ids_of(a, "gpu1").isdisjoint(present(store))
    assert ids_of(b, "gpu1") <= present(store)

    res = collect(store, scope=a, grace=GRACE, max_size=10)
    assert [r.env_key for r in res.roots_retired] == ["gpu1"]  # b/gpu1; b/cpu is too recent
    assert res.over_max_size > 0
    assert ids_of(b, "cpu") <= present(store)


def test_old_temp_and_lock_files_go_young_ones_stay(env):
    store, a, _, tmp = env
    save_tree(write_tree(tmp / "ta", {"a/x.py": content("X")}), store, a, "gpu1")
    old_tmp = os.path.join(store.root, "blobs", "ab", ".tmp-host-1-0123456789abcdef")
    young_tmp = os.path.join(store.root, "blobs", "cd", ".tmp-host-2-0123456789abcdef")
    old_scope_tmp = os.path.join(a.manifests, ".tmp-host-3-0123456789abcdef")
    for p in (old_tmp, young_tmp, old_scope_tmp):
        os.makedirs(os.path.dirname(p), exist_ok=True)  # blobs/<xx> are made by the first write into each
        open(p, "wb").close()
    age(old_tmp, 2 * 3600)
    age(old_scope_tmp, 2 * 3600)
    old_lock = os.path.join(a.manifests, "gpu9.lock")
    young_lock = os.path.join(a.slots, "slot-3.lock")
    for p in (old_lock, young_lock):
        with open(p, "wb") as fh:
            fh.write(msgpack.packb({"host": "elsewhere", "pid": 1, "time": 0.0, "token": "00"}))
    age(old_lock, LOCK_EXPIRY + 60)  # past the longest slot stale_after (timing.py): no live holder

    res = collect(store, scope=a, grace=GRACE)
    assert res.temp_deleted == 2 and res.locks_deleted == 1
    assert not os.path.exists(old_tmp) and not os.path.exists(old_scope_tmp) and not os.path.exists(old_lock)
    assert os.path.exists(young_tmp) and os.path.exists(young_lock)


def test_one_gc_at_a_time(env):
    store, a, _, _ = env
    holder = LockFile(os.path.join(store.root, "locks", "gc.lock"), heartbeat=True)
    with holder:
        with pytest.raises(LockTimeout):
            collect(store, scope=a, grace=GRACE, lock_wait=0.3)
    assert collect(store, scope=a, grace=GRACE).collected


def _gc_process(store: BlobStore, scope: Scope, kill_at: str):
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "CAS_KILL_AT"}
    env["CAS_KILL_AT"] = kill_at
    return subprocess.run([sys.executable, "-m", "cas.cli", "gc", "--grace", "2s", "--org", store.root,
                           "--scope", scope.root], env=env, capture_output=True, text=True, timeout=120)


def test_gc_killed_mid_phase_leaves_a_consistent_store_and_the_next_run_finishes(env):
    store, a, b, tmp = env
    save_tree(write_tree(tmp / "ta", {"a/x.py": content("X"), "a/y.py": content("Y")}), store, a, "gpu1")
    save_tree(write_tree(tmp / "tb", {"b/x.py": content("BX")}), store, b, "gpu1")
    orphans = {store.put_bytes(content(f"orphan {i}")) for i in range(12)}
    age_all(store, 10 * GRACE)
    live = ids_of(a, "gpu1") | ids_of(b, "gpu1")
    gc_lock = os.path.join(store.root, "locks", "gc.lock")

    r = _gc_process(store, a, "gc-trashed:5")
    assert r.returncode == -9  # SIGKILL after the 5th blob went to trash
    assert os.path.exists(gc_lock)  # the dead collector's lock stays behind
    assert live <= present(store)
    assert len(orphans & in_trash(store)) >= 4

    # A dead local holder's lock is broken at once; the next run finishes phase one. (Blobs the killed run had
    # stamped but not yet moved, in parallel, are merely younger now: age them again, as time would.)
    age_all(store, 10 * GRACE)
    res = collect(store, scope=a, grace=GRACE, lock_wait=5)
    assert res.collected and orphans <= in_trash(store) and live <= present(store)

    age_all(store, 10 * GRACE, "trash")
    r = _gc_process(store, a, "gc-deleted:3")
    assert r.returncode == -9
    res = collect(store, scope=a, grace=GRACE, lock_wait=5)
    assert res.collected and not in_trash(store) and live <= present(store)
    assert not os.path.exists(gc_lock)


def test_deployment_revived_after_its_root_died_gets_its_blobs_back(env):
    store, a, _, tmp = env
    tree = write_tree(tmp / "ta", {"a/x.py": content("X"), "a/y.py": content("Y")})
    save_tree(tree, store, a, "gpu1")
    age_all(store, 10 * GRACE)
    age(root_path(store, a.scope_id, "gpu1"), 31 * DAY)
    collect(store, scope=a, grace=GRACE, root_ttl=30 * DAY)
    age_all(store, 10 * GRACE, "trash")
    collect(store, scope=a, grace=GRACE, root_ttl=30 * DAY)
    assert not present(store) and not in_trash(store)
    assert len(load_tree(tmp / "cold", store, a, "gpu1").misses) == 2  # the deployment comes back: all misses

    save_tree(tree, store, a, "gpu1")  # it recompiled the same files and saves them
    assert os.path.exists(root_path(store, a.scope_id, "gpu1"))  # the root is repaired (this part passes)
    assert not load_tree(tmp / "warm", store, a, "gpu1").misses  # but the blobs were never uploaded again


def test_gc_stops_when_another_collector_took_its_lock(env):
    store, a, _, _ = env
    old_trash = store.put_bytes(content("trashed long ago"))
    os.makedirs(os.path.dirname(store.trash_path(old_trash)), exist_ok=True)  # trash fan-out is lazy
    os.rename(store.blob_path(old_trash), store.trash_path(old_trash))
    age_all(store, 10 * GRACE, "trash")
    lock_path = os.path.join(store.root, "locks", "gc.lock")

    def steal(phase, done, total):
        if phase == "trash" and done == 0:  # between phases: another host judged our lock stale and broke it
            os.unlink(lock_path)
            with open(lock_path, "wb") as fh:
                fh.write(msgpack.packb({"host": "other", "pid": 1, "time": 0.0, "token": "ffff"}))

    from cas.gc import GcLockLost

    with pytest.raises(GcLockLost):
        collect(store, scope=a, grace=GRACE, progress=steal)
    assert old_trash in in_trash(store)  # phase two never ran
    assert os.path.exists(lock_path)  # and the new holder's lock is left alone


def test_live_manifest_in_trash_is_read_back_and_manifests_are_read_without_a_stat(env):
    """gc reads each live manifest blob with one get, and only on a miss stats it (which brings it back from trash):
    a root whose manifest blob a racing phase one trashed keeps everything, the manifest is back in blobs/."""
    from cas import layout
    from cas.faulty import FaultyBackend
    from cas.posix import PosixBackend

    store, a, _, tmp_path = env
    save_tree(write_tree(tmp_path / "ta", {"a/x.py": content("X"), "a/y.py": content("Y")}), store, a, "gpu1")
    save_tree(write_tree(tmp_path / "tb", {"b/x.py": content("BX")}), store, a, "gpu2")
    age_all(store, 10 * GRACE)
    roots = {r.env_key: r for r in iter_roots(store)}
    trashed = roots["gpu1"].manifest
    os.makedirs(os.path.dirname(store.trash_path(trashed)), exist_ok=True)
    os.rename(store.blob_path(trashed), store.trash_path(trashed))
    live = present(store) | {trashed}

    faulty = FaultyBackend(PosixBackend(store.root))
    stats: list[str] = []
    faulty.before = lambda verb, key: stats.append(key) if verb == "stat" and key.startswith("blobs/") else None
    res = collect(BlobStore(faulty, create=False), grace=GRACE)
    assert res.collected and not res.problems and res.blobs_trashed == 0
    assert trashed in present(store) and live <= present(store)
    # Only the trashed manifest was stat'ed (its miss), not the one read at once.
    assert layout.blob(roots["gpu2"].manifest) not in stats and layout.blob(trashed) in stats


@pytest.mark.parametrize("command", ["gc", "check"])
def test_a_just_written_root_whose_manifest_blob_lands_a_moment_later_is_no_problem(tmp_path, command):
    """On an object store a save puts its root alongside its manifest's blob (FORMAT §3a): gc or check can read the
    root first. A root that young naming a missing blob is read again, with its manifest, after a moment: here the blob
    lands during that wait (the hook on the root's second read puts it). An old root naming a missing blob stays a
    problem."""
    from cas.check import check
    from cas.faulty import FaultyBackend
    from cas.posix import PosixBackend

    src = tmp_path / "src"
    write_tree(src, {"a.bin": content("a"), "b.bin": content("b", 3 << 20)})
    store = BlobStore(tmp_path / "org", freshen_after=FRESHEN)
    scope = Scope(tmp_path / "scope", create=True)
    save_tree(src, store, scope, "e")
    root = next(iter_roots(store))
    held = store.read_bytes(root.manifest, 1 << 26)
    os.remove(store.blob_path(root.manifest))  # as if the manifest blob's put had not landed yet
    stats: list[str] = []

    def lands_on_second_read(verb: str, key: str) -> None:
        if verb == "stat" and key == root.key:
            stats.append(key)
            if len(stats) == 2:  # the first is the listing's read of the root
                store.put_bytes(held)  # the blob's put lands while gc or check waits

    watched = BlobStore(FaultyBackend(PosixBackend(tmp_path / "org"), before=lands_on_second_read),
                        freshen_after=FRESHEN)
    res = collect(watched, grace=GRACE) if command == "gc" else check(watched)
    assert len(stats) == 2, "the young root was not read again"
    assert not res.problems, res.problems

    os.remove(store.blob_path(root.manifest))
    age(root_path(store, scope.scope_id, "e"), 3600)  # an hour old: no save is in flight, a missing blob is real
    res = collect(store, grace=GRACE) if command == "gc" else check(store)
    assert res.problems
