"""Several processes of one pod on one TORCHINDUCTOR_CACHE_DIR (b10_transfer/pod.py), and caches outside it
(TRITON_CACHE_DIR, b10_transfer/side_trees.py).

The multi-process tests start real interpreters (this file run as a script, `child` mode) released together by a
file barrier, with real torch.compile on the CPU. Counters are the assertion: each child reports its load/save stats,
Inductor's hit/miss counters, and what its load call read, from /proc/self/io (`rchar`: bytes returned by read(2)
and friends, all threads) and from an audit hook (files opened under the stand-in volume).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # child mode runs this file as a script

RESULT_MARKER = "B10_POD_RESULT "
RANKS = 4
SEED_SHAPE = 2
# Waiters must proceed because the holder died, not because they gave up on it.
LONG_LOCK_TIMEOUT = "300"
# A SIGKILLed holder's flock is released by the kernel at once; the survivors finish their (tiny) load well within.
AFTER_KILL_BOUND_S = 30.0


@pytest.fixture(autouse=True)
def _no_outside_settings(monkeypatch):
    """The developer's own TRITON_CACHE_DIR or lock timeout must not leak into these tests (conftest: the rest)."""
    monkeypatch.delenv("TRITON_CACHE_DIR", raising=False)
    monkeypatch.delenv("B10_TRANSFER_POD_LOCK_TIMEOUT_S", raising=False)


# --- child mode ----------------------------------------------------------------------------------------------------


def _proc_io() -> dict[str, int]:
    with open("/proc/self/io") as fh:
        return {k: int(v) for k, v in (line.split(": ") for line in fh.read().splitlines())}


def _wait_for(path: Path, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"barrier {path} never opened")
        time.sleep(0.01)


def child(spec: dict) -> dict:
    """One process of the pod: barrier, load (measured), compile `shapes`, optional barrier + save."""
    import torch
    from torch._dynamo.utils import counters

    from b10_transfer import core
    from b10_transfer.demo import _COUNTERS, _WIDTH, _build_model

    sync = Path(spec["sync"])
    name = spec["name"]
    volume = os.path.realpath(spec["volume"])
    opened: list[str] = []
    measuring = [False]

    def audit(event: str, args: tuple) -> None:
        if not (measuring[0] and event == "open" and isinstance(args[0], str)):
            return
        if os.path.realpath(args[0]).startswith(volume + os.sep):
            opened.append(args[0])

    sys.addaudithook(audit)
    if spec.get("hold"):
        # The victim: it takes the pod lock, then stalls inside the load until the test SIGKILLs it.
        def stall(*_a, **_k):
            (sync / f"{name}.holding").touch()
            time.sleep(600)

        core.load_tree = stall
    (sync / f"{name}.ready").touch()
    _wait_for(sync / spec.get("go", "go"))
    (sync / f"{name}.loading").touch()
    result: dict = {"name": name, "pid": os.getpid()}
    before, measuring[0] = _proc_io(), True
    _, stats = core.load()
    measuring[0], after = False, _proc_io()
    result["load"] = stats.as_dict()
    result["load_rchar"] = after["rchar"] - before["rchar"]
    result["load_syscr"] = after["syscr"] - before["syscr"]
    result["load_volume_opens"] = len(opened)

    shapes = spec.get("shapes", [])
    if shapes:
        torch.manual_seed(0)
        compiled = torch.compile(_build_model(_WIDTH).eval())
        with torch.no_grad():
            for batch in shapes:
                compiled(torch.randn(batch, _WIDTH))
        result["counters"] = {k: int(counters[g][c]) for k, (g, c) in _COUNTERS.items()}
    if spec.get("save"):
        (sync / f"{name}.compiled").touch()
        _wait_for(sync / "save-go")
        _, stats = core.save()
        result["save"] = stats.as_dict()
    return result


# --- parent side ---------------------------------------------------------------------------------------------------


def spawn(name: str, spec: dict, env: dict[str, str]) -> subprocess.Popen:
    spec = {**spec, "name": name}
    return subprocess.Popen(
        [sys.executable, str(Path(__file__).resolve()), "child", json.dumps(spec)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def collect(proc: subprocess.Popen, timeout: float = 240) -> dict:
    out, err = proc.communicate(timeout=timeout)
    for line in out.splitlines():
        if line.startswith(RESULT_MARKER):
            result = json.loads(line[len(RESULT_MARKER):])
            result["log"] = [line for line in err.splitlines() if "b10_transfer" in line]
            return result
    raise AssertionError(f"child failed (exit {proc.returncode}):\n{out}\n{err}")


def wait_all(sync: Path, names, suffix: str, timeout: float = 120.0) -> None:
    for n in names:
        _wait_for(sync / f"{n}.{suffix}", timeout)


# 4 ranks on 2 cores: no compile worker pool per rank (its start-up is most of a tiny model's compile time).
QUIET_COMPILE = {"TORCHINDUCTOR_COMPILE_THREADS": "1"}


def pod_env(volume: Path, local: Path, **extra: str) -> dict[str, str]:
    from conftest import child_environ

    env = child_environ(volume, local)
    env.pop("TRITON_CACHE_DIR", None)
    env.update({"B10_TRANSFER_POD_LOCK_TIMEOUT_S": LONG_LOCK_TIMEOUT, **QUIET_COMPILE, **extra})
    return env


def fresh_volume(root: Path) -> Path:
    volume = root / "volume"
    (volume / "model").mkdir(parents=True)
    (volume / "org").mkdir()
    return volume


@pytest.fixture(scope="module")
def seeded(tmp_path_factory):
    """A volume holding one replica's compile of SEED_SHAPE (one process compiled and saved)."""
    from conftest import child_environ

    from b10_transfer.demo import spawn_replica

    root = tmp_path_factory.mktemp("pod-seed")
    volume = fresh_volume(root)
    env = {**child_environ(volume, root / "seed" / "inductor"), **QUIET_COMPILE}
    r = spawn_replica(env, [SEED_SHAPE], load=False, save=True)
    assert r["save"] == "SUCCESS", r["log"]
    return volume


def copy_volume(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def loader_and_waiters(results: list[dict]) -> tuple[dict, list[dict]]:
    loaders = [r for r in results if r["load"]["shared_from"] is None]
    assert len(loaders) == 1, [(r["name"], r["load"]) for r in results]
    return loaders[0], [r for r in results if r is not loaders[0]]


# --- several processes, one pod ------------------------------------------------------------------------------------


@pytest.mark.slow
def test_four_ranks_one_load_from_the_volume(seeded, tmp_path, record_property):
    """4 processes released together on one empty cache directory: one loads from the volume, three wait and return
    its result without a single volume read; every rank's compile is then all cache hits."""
    volume = copy_volume(seeded, tmp_path / "volume")
    local, sync = tmp_path / "pod" / "inductor", tmp_path / "sync"
    sync.mkdir()
    names = [f"r{i}" for i in range(RANKS)]
    # Each restored file takes 50 ms longer (test seam, cas/_faults.py): the load outlasts any scheduling delay of
    # the other ranks' start on a busy 2-core machine, so all of them find it in progress.
    env = pod_env(volume, local, CAS_PAUSE_AT="restored-temp:0.05")
    procs = [spawn(n, {"sync": str(sync), "volume": str(volume), "shapes": [SEED_SHAPE]}, env) for n in names]
    wait_all(sync, names, "ready")
    (sync / "go").touch()
    results = [collect(p) for p in procs]

    loader, waiters = loader_and_waiters(results)
    n = loader["load"]["files"]
    assert loader["load"]["status"] == "SUCCESS" and loader["load"]["files_transferred"] == n > 0, loader["log"]
    assert loader["load_volume_opens"] >= 1
    for w in waiters:
        assert w["load"]["status"] == "SUCCESS", w["log"]
        assert w["load"]["shared_from"] == loader["pid"]
        assert (w["load"]["files"], w["load"]["files_transferred"]) == (n, n)  # the loader's numbers
        assert w["load"]["waited_s"] > 0
        assert w["load_volume_opens"] == 0, w  # the volume saw one load's reads
        assert "shared_from=pid:" in w["log"][-1] and "waited=" in w["log"][-1]
    # What the load calls read (read(2) bytes, all threads): the loader's pack and manifest, the waiters a record.
    assert max(w["load_rchar"] for w in waiters) * 10 < loader["load_rchar"], [r["load_rchar"] for r in results]
    for r in results:
        c = r["counters"]
        assert c["fxgraph_cache_hit"] >= 1 and c["fxgraph_cache_miss"] == 0, (r["name"], c)
    reads = {r["name"]: (r["load_rchar"], r["load_volume_opens"], round(r["load"]["seconds"], 2)) for r in results}
    record_property("pod_load_reads", reads)
    print(f"\npod of {RANKS}: (rchar, volume opens, seconds) per rank {reads}; loader {loader['name']}")
    print("\n".join(line for r in results for line in r["log"]))


@pytest.mark.slow
def test_uncoordinated_baseline_reads_the_volume_four_times(seeded, tmp_path, record_property):
    """The same pod with the lock off (B10_TRANSFER_POD_LOCK_TIMEOUT_S=0): the number the lock saves. No compile."""
    volume = copy_volume(seeded, tmp_path / "volume")
    local, sync = tmp_path / "pod" / "inductor", tmp_path / "sync"
    sync.mkdir()
    names = [f"r{i}" for i in range(RANKS)]
    env = pod_env(volume, local, B10_TRANSFER_POD_LOCK_TIMEOUT_S="0")
    procs = [spawn(n, {"sync": str(sync), "volume": str(volume)}, env) for n in names]
    wait_all(sync, names, "ready")
    (sync / "go").touch()
    results = [collect(p) for p in procs]
    assert all(r["load"]["shared_from"] is None for r in results)
    assert sum(r["load_volume_opens"] > 0 for r in results) >= 2  # at least two of them read the volume
    assert not list(local.parent.glob("*.b10-pod*.lock"))  # off means off: no lock file
    reads = {r["name"]: (r["load_rchar"], r["load_volume_opens"], round(r["load"]["seconds"], 2)) for r in results}
    record_property("pod_load_reads_uncoordinated", reads)
    print(f"\nno lock, {RANKS} ranks: (rchar, volume opens, seconds) per rank {reads}")


@pytest.mark.slow
def test_holder_sigkilled_while_loading_others_proceed(seeded, tmp_path):
    """The first process takes the lock and stalls inside its load; three more start together and wait; SIGKILL the
    holder: the kernel drops its flock, one survivor loads, two share that result, all within a bound far below the
    lock timeout (so it was the kill, not the timeout, that released them)."""
    volume = copy_volume(seeded, tmp_path / "volume")
    local, sync = tmp_path / "pod" / "inductor", tmp_path / "sync"
    sync.mkdir()
    env = pod_env(volume, local)
    base = {"sync": str(sync), "volume": str(volume)}
    victim = spawn("victim", {**base, "hold": True, "go": "go-victim"}, env)
    survivors = [f"r{i}" for i in range(1, RANKS)]
    procs = [spawn(n, base, env) for n in survivors]
    wait_all(sync, ["victim", *survivors], "ready")
    (sync / "go-victim").touch()
    wait_all(sync, ["victim"], "holding")
    (sync / "go").touch()
    wait_all(sync, survivors, "loading")
    time.sleep(1.0)  # they are now polling the held lock
    assert all(p.poll() is None for p in procs)  # nobody got past the held lock
    killed_at = time.monotonic()
    victim.send_signal(signal.SIGKILL)
    victim.wait(timeout=10)
    results = [collect(p, timeout=AFTER_KILL_BOUND_S + 30) for p in procs]
    elapsed = time.monotonic() - killed_at
    assert elapsed < AFTER_KILL_BOUND_S, elapsed

    loader, waiters = loader_and_waiters(results)
    assert loader["load"]["status"] == "SUCCESS" and loader["load"]["files_transferred"] > 0, loader["log"]
    assert loader["load"]["waited_s"] > 0.5  # it too waited for the victim, then loaded itself
    for w in waiters:
        assert w["load"]["shared_from"] == loader["pid"] and w["load_volume_opens"] == 0, w
    print(f"\nholder SIGKILLed: survivors done {elapsed:.2f}s after the kill")
    print("\n".join(line for r in results for line in r["log"]))


@pytest.mark.slow
def test_saves_of_four_ranks_merge(seeded, tmp_path):
    """4 ranks load, each compiles a shape of its own (a miss each: its own static graph), then all save at once:
    the manifest holds every rank's files; a save after them has nothing new."""
    from conftest import b10_environ

    from b10_transfer import OperationStatus, core
    from b10_transfer.config import read_settings
    from cas import Scope
    from cas.tree import scan

    volume = copy_volume(seeded, tmp_path / "volume")
    local, sync = tmp_path / "pod" / "inductor", tmp_path / "sync"
    sync.mkdir()
    names = [f"r{i}" for i in range(RANKS)]
    env = pod_env(volume, local)
    spec = {"sync": str(sync), "volume": str(volume), "save": True}
    procs = [spawn(n, {**spec, "shapes": [3 + i]}, env) for i, n in enumerate(names)]  # a static graph each
    wait_all(sync, names, "ready")
    (sync / "go").touch()
    wait_all(sync, names, "compiled", timeout=200)
    (sync / "save-go").touch()
    results = [collect(p) for p in procs]

    for r in results:
        assert r["counters"]["fxgraph_cache_miss"] >= 1, r  # each compiled its own shape
        assert r["save"]["status"] in ("SUCCESS", "SKIPPED"), r["log"]
    assert any(r["save"]["status"] == "SUCCESS" for r in results)
    settings = read_settings(b10_environ(volume, local))
    entries = set(Scope(settings.b10fs_cache_dir).read_manifest(core.key_for()).entries)
    local_files = {f.rel for f in scan(local)}
    assert local_files <= entries, sorted(local_files - entries)  # every rank's files
    graphs = {e.split("/")[0] for e in entries}
    assert "fxgraph" in graphs
    status, stats = core.save(settings=settings)
    assert status is OperationStatus.SKIPPED and stats.new_entries == 0, stats


# --- the lock itself (in-process, no torch compile) ----------------------------------------------------------------


def test_lock_lives_beside_the_directory_and_is_never_saved(b10_env):
    from b10_transfer import OperationStatus, core, pod
    from cas import Scope

    paths = pod.paths_for(b10_env.local, b10_env.volume.resolve())
    assert paths.lock.parent == b10_env.local.parent and paths.lock.name == ".inductor.b10-pod.lock"
    on_volume = pod.paths_for(b10_env.volume / "inductor", b10_env.volume.resolve())
    assert not on_volume.lock.is_relative_to(b10_env.volume)  # a lock on the volume would couple pods

    # A cache directory inside another saved tree (vLLM's layout): the outer save never takes the lock files.
    inner = b10_env.local / "inner"
    inner.mkdir(parents=True)
    (inner / "kernel.py").write_text("x = 1\n")
    assert core.load(inner)[0] is OperationStatus.DOES_NOT_EXIST
    assert core.save(inner)[0] is OperationStatus.SUCCESS
    assert core.load(inner)[0] is OperationStatus.SKIPPED
    assert {p.name for p in b10_env.local.iterdir()} >= {".inner.b10-pod.lock", ".inner.b10-pod-result.lock"}
    assert core.save(b10_env.local, label="outer")[0] is OperationStatus.SUCCESS
    entries = set(Scope(b10_env.scope).read_manifest(core.key_for("outer")).entries)
    assert entries == {"inner/kernel.py"}


# A process that takes the raw pod lock and keeps it (the lock object must stay referenced: filelock releases on GC).
HOLD = ("from filelock import UnixFileLock; import time; l = UnixFileLock({lock!r}); l.acquire(); "
        "print('held', flush=True); time.sleep(600)")


def test_dead_holder_never_blocks(b10_env, monkeypatch):
    """A process that holds the raw lock is SIGKILLed: the next load takes the lock at once (flock dies with it)."""
    from b10_transfer import OperationStatus, core, pod

    monkeypatch.setenv("B10_TRANSFER_POD_LOCK_TIMEOUT_S", LONG_LOCK_TIMEOUT)
    lock = pod.paths_for(b10_env.local, b10_env.volume).lock
    lock.parent.mkdir(parents=True, exist_ok=True)
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD.format(lock=str(lock))], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    holder.kill()
    holder.wait()
    start = time.monotonic()
    status, stats = core.load()
    assert status is OperationStatus.DOES_NOT_EXIST and time.monotonic() - start < 5
    assert stats.shared_from is None


def test_live_holder_is_waited_for_a_bounded_time(b10_env, monkeypatch, caplog):
    """A holder that never lets go (hung, SIGSTOPped): the waiter goes on without the lock after the bound and says
    so; its own load is a normal one."""
    from b10_transfer import OperationStatus, core, pod

    monkeypatch.setenv("B10_TRANSFER_POD_LOCK_TIMEOUT_S", "1")
    lock = pod.paths_for(b10_env.local, b10_env.volume).lock
    lock.parent.mkdir(parents=True, exist_ok=True)
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD.format(lock=str(lock))], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with caplog.at_level(logging.INFO, logger="b10_transfer"):
            status, stats = core.load()
    finally:
        holder.kill()
        holder.wait()
    assert status is OperationStatus.DOES_NOT_EXIST
    assert 0.9 <= stats.waited_s < 5
    assert "went on without the lock" in stats.reason and "waited=" in caplog.records[-1].getMessage()


def test_threads_of_one_process_share_one_load(b10_env):
    """The lock is per open file, so two threads of one process coordinate like two processes."""
    import threading

    from b10_transfer import OperationStatus, core

    write = {"a/b.py": b"kernel" * 100, "c/d": b"graph" * 100}
    for rel, data in write.items():
        (b10_env.local / rel).parent.mkdir(parents=True, exist_ok=True)
        (b10_env.local / rel).write_bytes(data)
    assert core.save()[0] is OperationStatus.SUCCESS
    import shutil

    shutil.rmtree(b10_env.local)
    real = core.load_tree
    gate = threading.Event()

    def slow_load_tree(*a, **k):
        gate.wait(10)  # hold the lock until the second thread is waiting
        return real(*a, **k)

    results: dict[str, tuple] = {}
    core.load_tree = slow_load_tree
    try:
        first = threading.Thread(target=lambda: results.setdefault("first", core.load()))
        first.start()
        time.sleep(0.3)
        second = threading.Thread(target=lambda: results.setdefault("second", core.load()))
        second.start()
        time.sleep(0.3)
        gate.set()
        first.join(20)
        second.join(20)
    finally:
        core.load_tree = real
    (s1, st1), (s2, st2) = results["first"], results["second"]
    assert s1 is s2 is OperationStatus.SUCCESS
    assert st1.shared_from is None and st2.shared_from == os.getpid()
    assert st2.files_transferred == st1.files_transferred == 2


@pytest.mark.parametrize("failure", [NotImplementedError("no flock here"), PermissionError(13, "Permission denied")])
def test_unusable_lock_means_uncoordinated_not_an_error(b10_env, monkeypatch, caplog, failure):
    """A file system without flock, or a lock file we may not open: load and save work as before, with a WARNING."""
    import filelock

    from b10_transfer import OperationStatus, core

    def refuse(*_a, **_k):
        raise failure

    monkeypatch.setattr(filelock.UnixFileLock, "acquire", refuse)
    (b10_env.local / "k").mkdir(parents=True)
    (b10_env.local / "k" / "kernel.py").write_text("x = 1\n")
    with caplog.at_level(logging.INFO, logger="b10_transfer"):
        assert core.save()[0] is OperationStatus.SUCCESS
        assert core.load()[0] is OperationStatus.SKIPPED
    assert any("going on without it" in r.getMessage() for r in caplog.records)


def test_invalid_pod_lock_timeout_is_an_error(b10_env, monkeypatch):
    from b10_transfer import OperationStatus, core

    monkeypatch.setenv("B10_TRANSFER_POD_LOCK_TIMEOUT_S", "soon")
    status, stats = core.load()
    assert status is OperationStatus.ERROR and "B10_TRANSFER_POD_LOCK_TIMEOUT_S" in stats.reason


# --- TRITON_CACHE_DIR outside the Inductor directory ---------------------------------------------------------------

TRITON_FILES = {"ZXCV/triton_.json": b'{"name": "k"}', "ZXCV/triton_.cubin": os.urandom(3000)}
INDUCTOR_FILES = {"fxgraph/ab/fabc/entry": os.urandom(2000), "ab/cab.py": b"# kernel\n" * 40}


def _write(root: Path, files: dict[str, bytes]) -> None:
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)


def _read(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()
            and not p.name.startswith(".cas-")}


def test_triton_cache_outside_is_a_second_tree(b10_env, monkeypatch, tmp_path, caplog):
    """Saved and loaded with its own manifest (label `triton`), its own log line before the main one; the call's
    status is the Inductor tree's."""
    import shutil

    from b10_transfer import OperationStatus, core, load_compile_cache, save_compile_cache
    from cas import Scope

    triton = tmp_path / "triton-home" / "cache"
    monkeypatch.setenv("TRITON_CACHE_DIR", str(triton))
    _write(b10_env.local, INDUCTOR_FILES)
    _write(triton, TRITON_FILES)
    with caplog.at_level(logging.INFO, logger="b10_transfer"):
        assert save_compile_cache() is OperationStatus.SUCCESS
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("save ")]
    assert len(lines) == 2 and "env=triton." in lines[0] and "env=triton." not in lines[1]
    scope = Scope(b10_env.scope)
    assert set(scope.read_manifest(core.key_for("triton")).entries) == set(TRITON_FILES)
    assert set(scope.read_manifest(core.key_for()).entries) == set(INDUCTOR_FILES)

    shutil.rmtree(b10_env.local)
    shutil.rmtree(triton)
    assert load_compile_cache() is OperationStatus.SUCCESS
    assert _read(triton) == TRITON_FILES and _read(b10_env.local) == INDUCTOR_FILES
    # Only Triton's files missing: they are restored; the call reports the Inductor tree (all present).
    shutil.rmtree(triton)
    status, _ = core.load()
    assert status is OperationStatus.SKIPPED and _read(triton) == TRITON_FILES
    assert save_compile_cache() is OperationStatus.SKIPPED


def test_triton_cache_inside_is_not_a_second_tree(b10_env, monkeypatch):
    from b10_transfer import OperationStatus, core
    from cas import Scope

    monkeypatch.setenv("TRITON_CACHE_DIR", str(b10_env.local / "triton" / "0"))
    _write(b10_env.local, INDUCTOR_FILES)
    _write(b10_env.local / "triton" / "0", TRITON_FILES)
    assert core.save()[0] is OperationStatus.SUCCESS
    scope = Scope(b10_env.scope)
    assert scope.read_manifest(core.key_for("triton")) is None
    assert len(scope.read_manifest(core.key_for()).entries) == len(INDUCTOR_FILES) + len(TRITON_FILES)


@pytest.mark.parametrize("where", ["contains", "outside-prefixes"])
def test_triton_cache_not_included_is_logged(b10_env, monkeypatch, caplog, where):
    from b10_transfer import OperationStatus, core
    from cas import Scope

    triton = b10_env.local.parent if where == "contains" else Path("/var/lib/triton-cache")
    monkeypatch.setenv("TRITON_CACHE_DIR", str(triton))
    _write(b10_env.local, INDUCTOR_FILES)
    with caplog.at_level(logging.INFO, logger="b10_transfer"):
        assert core.save()[0] is OperationStatus.SUCCESS
    assert any("triton cache not included" in r.getMessage() for r in caplog.records)
    assert Scope(b10_env.scope).read_manifest(core.key_for("triton")) is None


def test_companion_label_gets_its_own_triton_manifest(b10_env, monkeypatch, tmp_path):
    from b10_transfer import OperationStatus, core
    from cas import Scope

    triton = tmp_path / "triton"
    monkeypatch.setenv("TRITON_CACHE_DIR", str(triton))
    vllm = tmp_path / "local" / "vllm"
    _write(vllm, INDUCTOR_FILES)
    _write(triton, TRITON_FILES)
    assert core.save(vllm, label="vllm")[0] is OperationStatus.SUCCESS
    assert set(Scope(b10_env.scope).read_manifest(core.key_for("vllm-triton")).entries) == set(TRITON_FILES)


if __name__ == "__main__" and len(sys.argv) == 3 and sys.argv[1] == "child":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    print(RESULT_MARKER + json.dumps(child(json.loads(sys.argv[2]))), flush=True)
