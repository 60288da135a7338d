"""gc, check and stats on a hostile or broken store (issue 12): planted directory symlinks at every directory they
touch, FIFOs where they read, many roots naming one huge manifest, and races driven through the test seam.

Each planted link points outside the store at files gc would delete or move if it followed the link (old blobs,
temp files, stale locks, quarantine evidence, a dead root). After gc (with a grace short enough that it would
collect), check and stats: nothing outside the store changed, every live manifest still loads fully, gc reported the
link and left it alone, and `cas check` exits 1 naming it as `planted`."""
from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import time
import tracemalloc

import msgpack
import pytest

from cas import BlobStore, Scope, layout, limits, load_tree, save_tree
from cas.check import check
from cas.faulty import FaultyBackend
from cas.gc import GcRefused, collect
from cas.manifest import Entry, Manifest
from cas.pack import PACK_FILE_MAX
from cas.posix import PosixBackend
from cas.roots import write_root
from cas.stats import compute
from cas.timing import LOCK_EXPIRY, MAX_STALE_AFTER, TimingError, check_relations, heartbeat_interval

GRACE = 2
OLD = 10 * GRACE
DAY = 86400


# -- helpers -----------------------------------------------------------------------------------------------------------
def write(path, data: bytes = b"x", age: float = 0.0) -> str:
    path = os.fspath(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as fh:
        fh.write(data)
    if age:
        set_age(path, age)
    return path


def set_age(path, seconds: float) -> None:
    t = time.time() - seconds
    os.utime(path, (t, t), follow_symlinks=False)


def age_store(store: BlobStore, seconds: float = OLD) -> None:
    for area in ("blobs", "trash"):
        for b in store.iter_blobs(area):
            set_age(os.path.join(store.root, b.key), seconds)


def snapshot(root) -> dict[str, tuple[int, int, bytes]]:
    """Every file under `root` with its size, mtime and content: what a planted link must protect."""
    out = {}
    for directory, _, names in os.walk(root):
        for name in names:
            path = os.path.join(directory, name)
            st = os.lstat(path)
            with open(path, "rb") as fh:
                out[os.path.relpath(path, root)] = (st.st_size, st.st_mtime_ns, fh.read())
    return out


def live_manifests_load(store: BlobStore, scopes, tmp) -> None:
    """Every deployment loads every file, and every blob its manifest needs sits in blobs/ (none lost to trash)."""
    for i, scope in enumerate(scopes):
        manifest = scope.read_manifest("gpu1")
        for entry in manifest.entries.values():
            assert os.path.isfile(store.blob_path(entry.stored_id)), f"live blob {entry.stored_id} left blobs/"
        res = load_tree(tmp / f"verify-{i}-{secrets.token_hex(4)}", store, scope, "gpu1")
        assert not res.misses and res.restored == len(manifest.entries)


def victims(outside, fan: str) -> None:
    """Files a link-following gc would take: old blob-named files, temp files, stale locks, quarantine evidence."""
    for _i in range(3):
        blob = fan + secrets.token_hex(31)
        write(outside / blob, b"not ours", 30 * DAY)
        write(outside / fan / blob, b"not ours either", 30 * DAY)
    write(outside / ".tmp-host-1-0123456789abcdef", b"t", 30 * DAY)
    write(outside / "victim.lock", msgpack.packb({"host": "x", "pid": 1, "time": 0.0, "token": "00"}), 30 * DAY)
    write(outside / f"{secrets.token_hex(32)}.1000", b"quarantined long ago", 30 * DAY)
    write(outside / "gpu1.root", b"\x00 not a root", 60 * DAY)


@pytest.fixture
def world(tmp_path):
    store = BlobStore(tmp_path / "org", freshen_after=1)
    (tmp_path / "model").mkdir()
    a = Scope(tmp_path / "model" / "a", create=True)
    b = Scope(tmp_path / "model" / "b", create=True)
    big = b"L" * (PACK_FILE_MAX + 1000)  # a loose blob, beside the packs of the small files
    save_tree(_tree(tmp_path / "ta", {"k.py": b"shared\n" * 300, "a.py": b"a\n" * 300, "big.bin": big}), store, a,
              "gpu1")
    save_tree(_tree(tmp_path / "tb", {"k.py": b"shared\n" * 300, "b.py": b"b\n" * 300}), store, b, "gpu1")
    orphan = store.put_bytes(b"orphan upload\n" * 100)
    age_store(store)
    outside = tmp_path / "outside"
    outside.mkdir()
    return store, a, b, orphan, outside, tmp_path


def _tree(root, files: dict[str, bytes]) -> str:
    for rel, data in files.items():
        write(os.path.join(root, rel), data)
    return str(root)


def _replace_with_link(path, target) -> None:
    """Swap directory `path` (moved aside, out of the store) for a symlink to `target`."""
    path = os.fspath(path)
    if os.path.isdir(path) and not os.path.islink(path):
        os.rename(path, os.fspath(target) + ".moved-aside")
    os.symlink(target, path)


def reopen(store: BlobStore, *scopes: Scope) -> tuple:
    """Fresh backends, as a new `cas` process has: a backend keeps the descriptors of directories it opened, so one
    opened before the plant still reads the directory moved aside."""
    return (BlobStore(store.root, create=False), *(Scope(s.root) for s in scopes))


def _unused_fan(store: BlobStore) -> str:
    used = {b.id[:2] for b in store.iter_blobs()}
    return next(f for f in layout.FANOUT if f not in used)


# -- planted directory symlinks ----------------------------------------------------------------------------------------
# (where, how to plant it): each returns the planted link's path.
def _plant_trash(store, a, b, outside):
    victims(outside, "ab")
    link = os.path.join(store.root, "trash")
    _replace_with_link(link, outside)
    return link


def _plant_trash_fan(store, a, b, outside):
    victims(outside, "cd")
    os.makedirs(os.path.join(store.root, "trash"), exist_ok=True)
    link = os.path.join(store.root, "trash", "cd")
    _replace_with_link(link, outside / "cd")
    return link


def _plant_blobs_fan(store, a, b, outside):
    fan = _unused_fan(store)
    victims(outside, fan)
    link = os.path.join(store.root, "blobs", fan)
    os.symlink(outside, link)
    return link


def _plant_quarantine(store, a, b, outside):
    victims(outside, "ef")
    link = os.path.join(store.root, "quarantine")
    _replace_with_link(link, outside)
    return link


def _plant_roots_scope(store, a, b, outside):
    victims(outside, "01")
    link = os.path.join(store.root, "roots", secrets.token_hex(16))
    os.symlink(outside, link)
    return link


def _plant_manifests(store, a, b, outside):
    victims(outside, "23")
    link = a.manifests
    _replace_with_link(link, outside)
    return link


def _plant_slots(store, a, b, outside):
    victims(outside, "45")
    link = a.slots
    _replace_with_link(link, outside)
    return link


PLANTS = {
    "trash": _plant_trash,
    "trash-fan": _plant_trash_fan,
    "blobs-fan": _plant_blobs_fan,
    "quarantine": _plant_quarantine,
    "roots-scope": _plant_roots_scope,
    "manifests": _plant_manifests,
    "slots": _plant_slots,
}


@pytest.mark.parametrize("where", sorted(PLANTS))
def test_planted_directory_link_is_reported_and_never_followed(world, where):
    store, a, b, orphan, outside, tmp = world
    link = PLANTS[where](store, a, b, outside)
    store, a, b = reopen(store, a, b)
    before = snapshot(outside)

    res = collect(store, scope=a, grace=GRACE)
    assert link in res.planted, res.planted
    assert res.collected and not res.problems
    res2 = check(store, scope=a)
    st = compute(store)

    assert snapshot(outside) == before  # nothing outside the store was deleted, moved or touched
    assert os.path.islink(link)  # left alone
    assert ("planted", link) in {(p.kind, p.path) for p in res2.problems}
    if where not in ("manifests", "slots"):  # stats reads the store only, never a scope
        assert any(link in p for p in st.problems)
    live_manifests_load(store, [b] if where == "manifests" else [a, b], tmp)
    if where not in ("trash",):  # with trash/ planted nothing can be trashed, which is right
        assert not os.path.exists(store.blob_path(orphan)), "gc still collects what it can reach"


def test_relative_trash_fan_link_into_blobs_never_unlinks_live_blobs(world):
    """trash/<xx> -> ../blobs/<xx>: gc used to see the live blobs of blobs/<xx> as old trash and unlink them."""
    store, a, b, _orphan, _outside, tmp = world
    live = a.read_manifest("gpu1").entries["big.bin"].stored_id
    fan = live[:2]
    os.makedirs(os.path.join(store.root, "trash"), exist_ok=True)
    link = os.path.join(store.root, "trash", fan)
    if os.path.isdir(link):
        os.rmdir(link)
    os.symlink(os.path.join("..", "blobs", fan), link)
    age_store(store)
    store, a, b = reopen(store, a, b)

    for _ in range(2):  # a second run is where phase two would have deleted "old trash"
        res = collect(store, scope=a, grace=GRACE)
        assert link in res.planted
    assert os.path.isfile(store.blob_path(live))
    live_manifests_load(store, [a, b], tmp)
    r = _cas("check", "--json", "--org", store.root, "--scope", a.root)
    assert r.returncode == 1
    assert {"kind": "planted", "path": link} in [{k: p[k] for k in ("kind", "path")}
                                                 for p in json.loads(r.stdout)["problems"]]


def test_planted_locks_dir_makes_gc_refuse_at_once_and_check_report_it(world):
    store, a, b, _orphan, outside, tmp = world
    victims(outside, "67")
    link = os.path.join(store.root, "locks")
    _replace_with_link(link, outside)
    store, a, b = reopen(store, a, b)
    before = snapshot(outside)
    t = time.monotonic()
    with pytest.raises(GcRefused, match="planted"):
        collect(store, scope=a, grace=GRACE, lock_wait=30)
    assert time.monotonic() - t < 10  # refused at once, not after the lock timeout
    res = check(store, scope=a)
    compute(store)
    assert snapshot(outside) == before
    assert ("planted", link) in {(p.kind, p.path) for p in res.problems}
    r = _cas("gc", "--grace", "2s", "--org", store.root, "--scope", a.root)
    assert r.returncode == 2 and "planted" in r.stderr and "Traceback" not in r.stderr
    live_manifests_load(store, [a, b], tmp)


def test_planted_roots_dir_stops_all_deletion(world):
    """With roots/ unlistable no root can be read: every blob would look like garbage. gc must stop instead."""
    store, a, b, orphan, _outside, tmp = world
    moved = tmp / "roots-moved"
    os.rename(os.path.join(store.root, "roots"), moved)
    os.symlink(moved, os.path.join(store.root, "roots"))
    store, a, b = reopen(store, a, b)
    res = collect(store, scope=a, grace=GRACE)
    assert not res.collected and res.problems and res.blobs_trashed == 0
    assert os.path.isfile(store.blob_path(orphan))
    os.unlink(os.path.join(store.root, "roots"))
    os.rename(moved, os.path.join(store.root, "roots"))
    store, a, b = reopen(store, a, b)
    live_manifests_load(store, [a, b], tmp)


# -- FIFOs: every command ends, within a bounded time, with a clear status --------------------------------------------
def _cas(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("B10FS_")}
    return subprocess.run([sys.executable, "-m", "cas.cli", *args], capture_output=True, text=True, env=env,
                          timeout=timeout)


@pytest.mark.parametrize("where", ["locks/x.lock", "roots/x.root", "CAS-FORMAT", "locks/gc.lock"])
def test_fifo_never_hangs_gc_check_or_stats(world, where):
    store, a, b, _orphan, _outside, _tmp = world
    if where == "roots/x.root":
        where = f"roots/{b.scope_id}/x.root"
    path = os.path.join(store.root, where)
    if where == "CAS-FORMAT":
        os.unlink(path)
    os.mkfifo(path)
    flags = ["--org", store.root, "--scope", a.root]
    for cmd in (["gc", "--grace", "2s", "--wait", "5"], ["check"], ["stats"]):
        t = time.monotonic()
        r = _cas(*cmd, *flags)
        assert time.monotonic() - t < 30
        assert "Traceback" not in r.stderr, r.stderr
        if where == "CAS-FORMAT":
            assert r.returncode == 2 and "CAS-FORMAT" in r.stderr
        elif where == "locks/gc.lock" and cmd[0] == "gc":
            assert r.returncode == 2 and "planted" in r.stderr
        elif where.startswith("locks/") and cmd[0] == "stats":
            assert r.returncode == 0  # stats never reads locks/
        else:
            assert r.returncode == 1, (cmd, r.stdout, r.stderr)
            assert path in r.stdout
    assert os.path.exists(path)  # never deleted: a FIFO is not ours to remove


# -- many roots naming one huge manifest -------------------------------------------------------------------------------
def _huge_org(tmp, roots: int, entries: int = 20_000) -> tuple[BlobStore, FaultyBackend, str]:
    tmp.mkdir()
    plain = BlobStore(tmp / "org", freshen_after=1)
    packs = [plain.put_bytes(secrets.token_bytes(64)) for _ in range(16)]
    files = {f"d{i // 100}/f{i}.py": Entry(secrets.token_hex(32), 100, 0o644, packs[i % 16], i % 1000 * 100)
             for i in range(entries)}
    manifest_id = plain.put_bytes(Manifest("gpu1", {}, files, 1.0, 2.0).dumps())
    for _ in range(roots):
        write_root(plain, secrets.token_hex(16), "gpu1", manifest_id, "/cache/model/x")
    faulty = FaultyBackend(PosixBackend(tmp / "org"))
    return BlobStore(faulty, create=False), faulty, manifest_id


def _count_reads(faulty: FaultyBackend, key: str) -> list[int]:
    reads = [0]

    def before(verb: str, k: str) -> None:
        if verb in ("get", "open") and k == key:
            reads[0] += 1

    faulty.before = before
    return reads


@pytest.mark.parametrize("command", ["gc", "check", "stats"])
def test_many_roots_one_manifest_parsed_once_memory_bounded(tmp_path, command):
    run = {"gc": lambda s: collect(s, grace=GRACE), "check": lambda s: check(s), "stats": lambda s: compute(s)}[command]
    peaks = {}
    for n in (1, 200):
        store, faulty, manifest_id = _huge_org(tmp_path / str(n), n)
        reads = _count_reads(faulty, layout.blob(manifest_id))
        tracemalloc.start()
        res = run(store)
        peaks[n] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert not res.problems, res.problems[:3]
        assert reads[0] == 1, f"{command} read the manifest blob {reads[0]} times for {n} roots"
    # Roots x entries would be 200 x 20,000 ids (hundreds of MB); distinct blobs keep it where one root has it.
    assert peaks[200] < 1.5 * peaks[1] + (4 << 20), peaks


def test_gc_fast_path_still_refuses_garbage_manifests(tmp_path):
    store = BlobStore(tmp_path / "org", freshen_after=1)
    good = Manifest("gpu1", {}, {"a": Entry("11" * 32, 1, 0o644)}, 1.0, 2.0).dumps_plain()
    doc = msgpack.unpackb(good, raw=False)
    bad_docs = [
        b"\xc1garbage",
        msgpack.packb({**doc, "entries": {"a": [b"short", 1, 0o644]}}, use_bin_type=True),
        msgpack.packb({**doc, "entries": {"a": "not an array"}}, use_bin_type=True),
        msgpack.packb({**doc, "entries": {"a": {"x": 1, "y": 2, "z": 3}}}, use_bin_type=True),
        msgpack.packb({**doc, "entries": {"a": 7}}, use_bin_type=True),
        msgpack.packb({**doc, "entries": {"a": [b"\x11" * 32, "1", 0o644]}}, use_bin_type=True),
        msgpack.packb({**doc, "entries": {"a": [b"\x11" * 32, 1, 0o644, b"\x22" * 32]}}, use_bin_type=True),
        msgpack.packb({**doc, "entries": []}, use_bin_type=True),
        msgpack.packb({**doc, "env_key": None}, use_bin_type=True),
        msgpack.packb({**doc, "format": 99}, use_bin_type=True),
        good + b"trailing",
    ]
    for data in bad_docs:
        manifest_id = store.put_bytes(data)
        root_scope = secrets.token_hex(16)
        write_root(store, root_scope, "gpu1", manifest_id, "/x")
        res = collect(store, grace=GRACE)
        assert not res.collected and res.problems, data[:20]
        os.unlink(os.path.join(store.root, layout.root(root_scope, "gpu1")))
    assert limits.MAX_MANIFEST_BYTES  # the same limits as a load's parser


# -- races through the test seam ---------------------------------------------------------------------------------------
def _seamed(store: BlobStore) -> tuple[BlobStore, FaultyBackend]:
    faulty = FaultyBackend(PosixBackend(store.root))
    return BlobStore(faulty, create=False), faulty


def test_save_freshening_a_blob_between_listing_and_second_stat_keeps_it(world):
    store, a, _b, orphan, _outside, _tmp = world
    seamed, faulty = _seamed(store)
    key = layout.blob(orphan)

    def before(verb: str, k: str) -> None:
        if verb == "stat" and k == key:  # gc's second stat: a save freshened the blob just before it
            os.utime(store.blob_path(orphan))

    faulty.before = before
    res = collect(seamed, scope=a, grace=GRACE)
    assert res.blobs_trashed == 0 and os.path.isfile(store.blob_path(orphan))


def test_freshen_between_second_stat_and_move_then_commit_is_put_back(world):
    """FORMAT §5's narrow window: the freshen lands after gc's second stat; the blob goes to trash with a new trash
    time, the save commits a root naming it, and the next run puts it back (never deletes it)."""
    store, a, _b, orphan, _outside, _tmp = world
    seamed, faulty = _seamed(store)
    key = layout.blob(orphan)

    def before(verb: str, k: str) -> None:
        if verb == "move" and k == key:
            os.utime(store.blob_path(orphan))  # the saver's freshen, too late for the stat

    faulty.before = before
    res = collect(seamed, scope=a, grace=GRACE)
    assert res.blobs_trashed == 1 and os.path.isfile(store.trash_path(orphan))
    assert time.time() - os.stat(store.trash_path(orphan)).st_mtime < 60  # stamped with the trash time
    faulty.before = None
    # The save commits: a manifest naming the blob, and its root.
    data = Manifest("gpu1", {}, {"o": Entry(orphan, 1400, 0o644)}, 1.0, 2.0).dumps()
    write_root(store, secrets.token_hex(16), "gpu1", store.put_bytes(data), "/x")
    set_age(store.trash_path(orphan), OLD)  # even once older than the grace period
    res = collect(store, scope=a, grace=GRACE)
    assert res.blobs_restored == 1 and res.blobs_deleted == 0
    assert os.path.isfile(store.blob_path(orphan))


def test_dead_root_refreshed_before_its_delete_is_kept(world):
    store, a, b, _orphan, _outside, tmp = world
    seamed, faulty = _seamed(store)
    root_key = layout.root(b.scope_id, "gpu1")
    set_age(os.path.join(store.root, root_key), 31 * DAY)

    def before(verb: str, k: str) -> None:
        if verb == "delete" and k == root_key:
            os.utime(os.path.join(store.root, root_key))  # a load refreshed it after gc judged it dead

    faulty.before = before
    res = collect(seamed, scope=a, grace=GRACE, root_ttl=30 * DAY)
    assert res.roots_dead == 1 and os.path.isfile(os.path.join(store.root, root_key))
    # Its blobs went to trash this run (judged dead); the next run sees the root live and puts them back.
    faulty.before = None
    age_store(store)
    res = collect(store, scope=a, grace=GRACE, root_ttl=30 * DAY)
    # b's pack put back by phase two; its manifest blob already by the manifest read (it is live); only the orphan
    # goes.
    assert res.roots_dead == 0 and res.blobs_restored >= 1 and res.blobs_deleted == 1
    live_manifests_load(store, [a, b], tmp)


def test_stale_lock_retaken_before_its_delete_survives(world):
    store, a, _b, _orphan, _outside, _tmp = world
    lock = write(os.path.join(a.manifests, "gpu1.lock"), b"old holder", LOCK_EXPIRY + 60)
    faulty = FaultyBackend(PosixBackend(a.root))
    seamed_scope = Scope(faulty)

    def before(verb: str, k: str) -> None:
        if verb == "delete" and k == "manifests/gpu1.lock":
            os.unlink(lock)
            write(lock, b"new holder")  # a saver broke the stale lock and took it meanwhile

    faulty.before = before
    res = collect(store, scope=seamed_scope, grace=GRACE)
    assert res.locks_deleted == 0
    with open(lock, "rb") as fh:
        assert fh.read() == b"new holder"


# -- timing relations (issue 12 point 7) -------------------------------------------------------------------------------
def test_timing_relations_hold_and_a_broken_one_is_caught(monkeypatch):
    check_relations()
    assert LOCK_EXPIRY > MAX_STALE_AFTER + heartbeat_interval(MAX_STALE_AFTER)
    from b10_transfer import config

    assert config.LOCK_TIMEOUT_CAP_S <= MAX_STALE_AFTER  # the library's cap on CLEANUP_LOCK_TIMEOUT_SECONDS
    import cas.timing as timing

    monkeypatch.setattr(timing, "LOCK_EXPIRY", 600)  # the old value: shorter than a slot's heartbeat at the cap
    with pytest.raises(TimingError, match="LOCK_EXPIRY"):
        timing.check_relations()


def test_a_live_slot_at_the_stale_after_cap_is_not_swept(world):
    """A slot held with stale_after at the cap (3600 s) is refreshed every 1200 s: its lock may be that old."""
    store, a, _b, _orphan, _outside, _tmp = world
    slot = write(os.path.join(a.slots, "slot-0.lock"), b"live holder", heartbeat_interval(MAX_STALE_AFTER) + 60)
    res = collect(store, scope=a, grace=GRACE)
    assert res.locks_deleted == 0 and os.path.exists(slot)


def test_gc_dying_between_stamp_and_move_keeps_the_second_grace_period(world):
    """The trash time is stamped before the move: a gc that dies in between leaves a blob that is merely younger,
    never one in trash with its old mtime that the next run would delete at once."""
    from cas.errors import StoreUnavailable

    store, a, _b, orphan, _outside, _tmp = world
    seamed, faulty = _seamed(store)
    faulty.fail("move", layout.blob(orphan), StoreUnavailable("gc killed here"), times=1)
    with pytest.raises(StoreUnavailable):
        collect(seamed, scope=a, grace=GRACE)
    res = collect(store, scope=a, grace=GRACE)
    assert res.blobs_deleted == 0
    assert os.path.isfile(store.blob_path(orphan)) or os.path.isfile(store.trash_path(orphan))


def test_old_temp_objects_in_the_saver_records_are_swept(world):
    store, a, _b, _orphan, _outside, _tmp = world
    old = [write(os.path.join(store.root, d, ".tmp-host-9-0123456789abcdef"), b"t", 2 * 3600)
           for d in ("recent", "families/llama")]
    young = write(os.path.join(store.root, "recent", ".tmp-host-9-fedcba9876543210"), b"t")
    res = collect(store, scope=a, grace=GRACE)
    assert res.temp_deleted >= 2 and not any(map(os.path.exists, old)) and os.path.exists(young)


def test_fast_parse_is_never_stricter_than_a_load_and_raises_only_manifest_error():
    """Mutated manifests: whatever a load accepts, gc's parser accepts with the same stored ids (it is never stricter
    than safety needs), and whatever it refuses it refuses with ManifestError (never a traceback in gc)."""
    import random

    from cas.errors import ManifestError
    from cas.manifest import loads
    from cas.refs import stored_refs

    rng = random.Random(12)
    entries = {f"d/{i}": Entry(secrets.token_hex(32), i, 0o644, secrets.token_hex(32) if i % 2 else None, 0)
               for i in range(20)}
    plain = Manifest("gpu1", {"k": "v"}, entries, 1.0, 2.0).dumps_plain()
    for _ in range(400):
        data = bytearray(plain)
        for _ in range(rng.randint(1, 4)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        try:
            full = loads(bytes(data))
        except ManifestError:
            full = None
        try:
            fast = stored_refs(bytes(data), "mutant")
        except ManifestError:
            assert full is None, "gc's parser refused a manifest a load accepts"
            continue
        if full is not None:
            assert fast.stored == full.blob_ids()
