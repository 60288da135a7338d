"""Lock files (FORMAT §6): O_EXCL files naming their holder; a dead local holder is broken at once, a foreign one only
after the waiter itself watched it unchanged for stale_after; save slots bound concurrency across processes."""
from __future__ import annotations

import os
import subprocess
import sys
import time

import msgpack
import pytest

from cas import LockFile, LockTimeout, StoreUnavailable, acquire_slot
from cas import lock as lock_mod

from cas_helpers import run_worker, spawn


class FakeTime:
    """An injectable monotonic clock and sleep: sleeping advances the clock, nothing waits."""

    def __init__(self):
        self.now = 1000.0
        self.slept = 0.0

    def clock(self):
        return self.now

    def sleep(self, s):
        assert s >= 0
        self.now += s
        self.slept += s


def no_sleep(s):
    raise AssertionError("must not wait")


def holder_bytes(host, pid, token="feedfacefeedface"):
    return msgpack.packb({"host": host, "pid": pid, "time": time.time(), "token": token})


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_free_lock_acquire_release(tmp_path):
    path = tmp_path / "x.lock"
    lock = LockFile(path, clock=FakeTime().clock, sleep=no_sleep)
    with lock:
        info = msgpack.unpackb(path.read_bytes())
        assert info["host"] == lock_mod._HOST and info["pid"] == os.getpid()
        assert len(info["token"]) == 16 and lock.still_held()
        assert not LockFile(path, stale_after=30, timeout=0).try_acquire()  # our own live pid: not stale
    assert not path.exists()


def test_dead_local_pid_taken_at_once(tmp_path):
    path = tmp_path / "x.lock"
    path.write_bytes(holder_bytes(lock_mod._HOST, dead_pid()))
    t = FakeTime()
    lock = LockFile(path, stale_after=3600, timeout=0, clock=t.clock, sleep=no_sleep)
    assert lock.try_acquire()
    assert lock.still_held()
    assert msgpack.unpackb(path.read_bytes())["pid"] == os.getpid()
    lock.release()
    assert not path.exists()
    assert os.listdir(tmp_path) == []  # the broken lock was removed, not left aside


def test_killed_holder_process_lock_taken_at_once(tmp_path):
    path = tmp_path / "m.lock"
    rc, _, err = run_worker(["die-holding", "lock", path])
    assert rc == -9, err
    assert path.exists()
    start = time.monotonic()
    with LockFile(path, stale_after=3600, timeout=30):
        pass
    assert time.monotonic() - start < 30  # not a timing threshold on speed: a wait would have raised LockTimeout


def test_killed_but_unreaped_holder_lock_taken_at_once(tmp_path):
    """A SIGKILLed process is a zombie until its parent waits for it: it holds nothing, its lock is dead."""
    path = tmp_path / "m.lock"
    proc = spawn(["die-holding", "lock", path])
    try:
        assert proc.stdout.readline().strip() == "HELD"
        deadline = time.monotonic() + 30
        while _proc_state(proc.pid) != "Z" and time.monotonic() < deadline:
            time.sleep(0.01)
        assert _proc_state(proc.pid) == "Z"
        lock = LockFile(path, stale_after=3600, timeout=0, clock=FakeTime().clock, sleep=no_sleep)
        assert lock.try_acquire()
        lock.release()
    finally:
        proc.communicate()


def _proc_state(pid):
    with open(f"/proc/{pid}/stat") as fh:
        return fh.read().rsplit(")", 1)[1].split()[0]


def test_live_local_pid_not_taken_before_stale_after(tmp_path):
    path = tmp_path / "x.lock"
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        path.write_bytes(holder_bytes(lock_mod._HOST, sleeper.pid))
        t = FakeTime()
        lock = LockFile(path, stale_after=30, clock=t.clock, sleep=no_sleep)
        assert not lock.try_acquire()
        t.now += 29.9
        assert not lock.try_acquire()
        t.now += 0.1
        assert lock.try_acquire()
    finally:
        sleeper.kill()
        sleeper.wait()


@pytest.mark.parametrize("content", [holder_bytes("another-host", 1), holder_bytes("another-host", 999_999_999),
                                     b"", b"\xc1 not msgpack", msgpack.packb([1, 2])],
                         ids=["foreign-pid-1", "foreign-pid-absent-here", "empty", "garbage", "not-a-map"])
def test_foreign_or_unreadable_lock_waits_exactly_stale_after(tmp_path, content):
    """A foreign pid means nothing on this host: only the waiter's own clock may age the lock. A lock file left
    empty or unreadable (holder killed between create and write) ages the same way."""
    path = tmp_path / "x.lock"
    path.write_bytes(content)
    t = FakeTime()
    lock = LockFile(path, stale_after=30, timeout=3600, clock=t.clock, sleep=no_sleep)
    assert not lock.try_acquire()
    t.now += 29.999
    assert not lock.try_acquire()
    assert path.read_bytes() == content  # untouched
    t.now += 0.001
    assert lock.try_acquire()
    assert lock.still_held()


def test_foreign_lock_acquire_with_injected_sleep(tmp_path):
    path = tmp_path / "x.lock"
    path.write_bytes(holder_bytes("another-host", 1))
    t = FakeTime()
    lock = LockFile(path, stale_after=30, timeout=3600, clock=t.clock, sleep=t.sleep)
    lock.acquire()
    assert 30 <= t.slept <= 30 + 1.5  # polled until stale, at most one maximal backoff more
    t2 = FakeTime()
    path2 = tmp_path / "y.lock"
    content = holder_bytes("another-host", 1)
    path2.write_bytes(content)
    with pytest.raises(LockTimeout, match="another-host"):
        LockFile(path2, stale_after=30, timeout=10, clock=t2.clock, sleep=t2.sleep).acquire()
    assert path2.read_bytes() == content


def test_refreshed_or_changed_foreign_lock_restarts_the_wait(tmp_path):
    path = tmp_path / "x.lock"
    path.write_bytes(holder_bytes("another-host", 1, "a" * 16))
    os.utime(path, (5000, 5000))
    t = FakeTime()
    lock = LockFile(path, stale_after=30, clock=t.clock, sleep=no_sleep)
    assert not lock.try_acquire()
    t.now += 20
    os.utime(path, (5010, 5010))  # the holder's heartbeat
    assert not lock.try_acquire()
    t.now += 20  # 40 s since first seen, 20 s since the refresh
    assert not lock.try_acquire()
    path.write_bytes(holder_bytes("another-host", 1, "b" * 16))  # a new holder took over
    os.utime(path, (5010, 5010))
    t.now += 20
    assert not lock.try_acquire()
    t.now += 30
    assert lock.try_acquire()


def test_real_short_timeout_and_real_short_stale_after(tmp_path):
    path = tmp_path / "x.lock"
    content = holder_bytes("another-host", 1)
    path.write_bytes(content)
    with pytest.raises(LockTimeout):
        LockFile(path, stale_after=60, timeout=0.3).acquire()
    assert path.read_bytes() == content
    with LockFile(path, stale_after=0.3, timeout=30) as lock:
        assert lock.still_held()


def test_break_never_removes_a_lock_taken_meanwhile(tmp_path):
    """The waiter judged content X stale, but by the time it breaks, a new holder wrote Y: Y stays."""
    path = tmp_path / "x.lock"
    stale = holder_bytes("another-host", 1, "a" * 16)
    fresh = holder_bytes("another-host", 2, "b" * 16)
    path.write_bytes(fresh)
    LockFile(path)._break(stale)
    assert path.read_bytes() == fresh
    assert os.listdir(tmp_path) == ["x.lock"]
    LockFile(path)._break(fresh)
    assert os.listdir(tmp_path) == []


def test_release_does_not_remove_someone_elses_lock(tmp_path):
    path = tmp_path / "x.lock"
    lock = LockFile(path).acquire()
    other = holder_bytes("another-host", 7, "c" * 16)
    path.write_bytes(other)  # broken as stale and taken by someone else while we held it
    assert not lock.still_held()
    lock.release()
    assert path.read_bytes() == other


def test_lock_in_missing_directory(tmp_path):
    with pytest.raises(StoreUnavailable):
        LockFile(tmp_path / "nope" / "x.lock", timeout=0).acquire()


def test_heartbeat_keeps_a_slot_from_going_stale(tmp_path):
    """A held slot is refreshed every stale_after/3; a waiter (on another host, by its own clock) never sees it
    unchanged for stale_after, however long it waits."""
    slot = acquire_slot(tmp_path, 1, timeout=0, stale_after=0.3)
    try:
        t = FakeTime()
        waiter = LockFile(slot.path, stale_after=0.3, clock=t.clock, sleep=no_sleep)
        waiter._is_stale = _foreign(waiter._is_stale)
        for _ in range(3):
            assert not waiter.try_acquire()
            before = os.stat(slot.path).st_mtime_ns
            deadline = time.monotonic() + 10
            while os.stat(slot.path).st_mtime_ns == before and time.monotonic() < deadline:
                time.sleep(0.02)
            assert os.stat(slot.path).st_mtime_ns != before, "heartbeat did not refresh the slot"
            t.now += 100  # long past stale_after by the waiter's clock, but the lock changed meanwhile
            assert not waiter.try_acquire()
        assert slot.still_held()
    finally:
        slot.release()
    assert not os.path.exists(slot.path)


def _foreign(is_stale):
    """Make a waiter in this process judge a lock as a foreign host would (the pid rule cannot apply)."""
    def judge(content, mtime):
        info = msgpack.unpackb(content)
        info["host"] = "another-host"
        return is_stale(msgpack.packb(info), mtime)
    return judge


def test_slots_in_process(tmp_path):
    t = FakeTime()
    held = [acquire_slot(tmp_path, 3, timeout=0, clock=t.clock, sleep=no_sleep) for _ in range(3)]
    try:
        assert sorted(os.path.basename(s.path) for s in held) == ["slot-0.lock", "slot-1.lock", "slot-2.lock"]
        with pytest.raises(LockTimeout):
            acquire_slot(tmp_path, 3, timeout=5, clock=t.clock, sleep=t.sleep)
        held.pop(1).release()
        extra = acquire_slot(tmp_path, 3, timeout=0, clock=t.clock, sleep=no_sleep)
        held.append(extra)
    finally:
        for s in held:
            s.release()
    assert os.listdir(tmp_path) == []


def test_slot_of_killed_holder_is_free_at_once(tmp_path):
    rc, _, err = run_worker(["die-holding", "slot", tmp_path, 1])
    assert rc == -9, err
    assert os.listdir(tmp_path) == ["slot-0.lock"]
    slot = acquire_slot(tmp_path, 1, timeout=30, stale_after=3600)
    slot.release()


@pytest.mark.timeout(180)
def test_slots_limit_concurrency_across_processes(tmp_path):
    slots, workers = 3, 9
    markers = tmp_path / "markers"
    markers.mkdir()
    procs = [spawn(["slot", tmp_path / "slots", slots, markers, 0.3]) for _ in range(workers)]
    reports = []
    for p in procs:
        out, err = p.communicate(timeout=170)
        assert p.returncode == 0, err
        import json
        reports.append(json.loads(out.strip().splitlines()[-1]))
    assert len(reports) == workers
    assert max(r["max_holders"] for r in reports) <= slots
    assert {r["slot"] for r in reports} <= {f"slot-{n}.lock" for n in range(slots)}
    assert os.listdir(markers) == []
    assert os.listdir(tmp_path / "slots") == []  # every slot released


def test_three_way_break_race_keeps_one_holder(tmp_path, monkeypatch):
    path = tmp_path / "m.lock"
    path.write_bytes(holder_bytes(lock_mod._HOST, dead_pid()))
    stale = path.read_bytes()
    a, b, c = (LockFile(path, stale_after=3600, timeout=0) for _ in range(3))
    assert b._is_stale(stale, os.stat(path).st_mtime)  # B judges the dead holder's lock stale ...
    assert a.try_acquire()  # ... but A breaks it first and takes the lock
    real_link = os.link

    fired = []

    def link(src, dst, *args, **kw):
        if os.fspath(dst) == os.fspath(path) and not fired:
            fired.append(dst)
            c.try_acquire()  # C tries the name at the moment B would put a moved lock back
        return real_link(src, dst, *args, **kw)

    monkeypatch.setattr(os, "link", link)
    b._break(stale)  # B breaks what it judged stale: it must not remove or displace A's fresh lock
    monkeypatch.undo()
    believers = [name for name, lk in (("a", a), ("c", c)) if lk._token is not None]
    holders = [name for name, lk in (("a", a), ("c", c)) if lk.still_held()]
    assert believers == holders, f"{believers} believe they hold the lock, only {holders} do"


_KILLED_WHILE_CREATING = """
import sys
from cas import LockFile
LockFile(sys.argv[1], timeout=5).acquire()  # CAS_KILL_AT=temp-written: killed with the record written, not linked
"""


def test_holder_killed_while_creating_the_lock_leaves_no_unattributable_lock(tmp_path):
    """A lock file must never exist without its holder record: one left empty by a process killed between create
    and write could not be broken by the dead-pid rule, and every waiter would wait stale_after."""
    path = tmp_path / "m.lock"
    proc = subprocess.run([sys.executable, "-c", _KILLED_WHILE_CREATING, str(path)], capture_output=True,
                          env={**os.environ, "CAS_KILL_AT": "temp-written"})
    assert proc.returncode == -9, proc.stderr
    lock = LockFile(path, stale_after=3600, timeout=0, clock=FakeTime().clock, sleep=no_sleep)
    assert lock.try_acquire()  # at once
    lock.release()
    assert [n for n in os.listdir(tmp_path) if not n.startswith(".tmp-")] == []


@pytest.mark.timeout(240)
def test_mutual_exclusion_across_processes_with_kills(tmp_path):
    """8 processes increment a shared counter under one lock file; 2 are SIGKILLed at random moments (possibly while
    holding it). No value is ever written twice (no two holders), and the survivors finish (dead holders' locks are
    broken at once: stale_after is an hour)."""
    import random as _random

    rng = _random.Random(5)
    lock, counter = tmp_path / "c.lock", tmp_path / "counter"
    counter.write_text("0")
    procs = [spawn(["count", lock, counter, tmp_path / f"log{i}", 25, "--ready"]) for i in range(8)]
    for p in procs:
        assert p.stdout.readline().strip() == "READY"
    victims = rng.sample(range(8), 2)
    for i in victims:
        time.sleep(rng.uniform(0, 0.3))
        procs[i].kill()
    for i, p in enumerate(procs):
        out, err = p.communicate(timeout=200)
        assert p.returncode == (-9 if i in victims else 0) or (i in victims and p.returncode == 0), err[-2000:]
    values = []
    for i in range(8):
        values += [int(v) for v in (tmp_path / f"log{i}").read_text().split()]
    assert len(values) == len(set(values)), "a value was written twice: two processes held the lock at once"
    final = int(counter.read_text())
    assert max(values) <= final <= max(values) + len(victims)  # a victim may die between rename and log
    survivors = [i for i in range(8) if i not in victims]
    for i in survivors:
        assert len((tmp_path / f"log{i}").read_text().split()) == 25
