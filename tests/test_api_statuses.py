"""Statuses of load/save for every situation of the API contract, on synthetic cache directories (no compile).

Each test sets up a real situation on a real filesystem (a local directory standing in for the volume) and checks
the status, what is (not) on the volume afterwards, and the single summary log line.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

import b10_transfer
from b10_transfer import OperationStatus, core
from cas import BlobStore, Scope

SUCCESS, ERROR, SKIPPED, DOES_NOT_EXIST = (
    OperationStatus.SUCCESS,
    OperationStatus.ERROR,
    OperationStatus.SKIPPED,
    OperationStatus.DOES_NOT_EXIST,
)


def write_tree(root: Path, files: dict[str, bytes]) -> None:
    for rel, data in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)


def read_tree(root: Path) -> dict[str, bytes]:
    """Files under `root`, leaving out the store's own bookkeeping (`.cas-*`, e.g. its local index)."""
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and not p.name.startswith(".cas-")
    }


def manifest(env) -> object:
    return Scope(env.scope).read_manifest(core.key_for())


def snapshot(root: Path) -> dict[str, tuple[int, float]]:
    return {str(p): (p.stat().st_size, p.stat().st_mtime) for p in root.rglob("*")}


CACHE = {
    "ab/cabc.py": b"# generated kernel\n" * 50,
    "fxgraph/xy/fxykey/entry0": os.urandom(2000),
    "aotautograd/akey/entry": b"aot" * 300,
}


# --- the ordinary life cycle -------------------------------------------------------------------------------------


def test_lifecycle_statuses(b10_env):
    assert b10_transfer.load_compile_cache() is DOES_NOT_EXIST  # nothing saved yet
    assert b10_transfer.save_compile_cache() is SKIPPED  # no local cache to save

    write_tree(b10_env.local, CACHE)
    assert b10_transfer.save_compile_cache() is SUCCESS
    assert set(manifest(b10_env).entries) == set(CACHE)
    assert b10_transfer.save_compile_cache() is SKIPPED  # nothing new

    assert b10_transfer.clear_local_cache() is True
    assert not b10_env.local.exists()
    assert b10_transfer.load_compile_cache() is SUCCESS
    assert read_tree(b10_env.local) == CACHE
    assert b10_transfer.load_compile_cache() is SKIPPED  # everything already local


def test_save_after_existing_manifest_records_new_files(b10_env):
    """Unlike the peer, an existing manifest does not make a save skip: a newly compiled shape reaches the store."""
    write_tree(b10_env.local, CACHE)
    assert b10_transfer.save_compile_cache() is SUCCESS
    write_tree(b10_env.local, {"fxgraph/zz/fzzkey/entry0": b"second shape"})
    status, stats = core.save()
    assert status is SUCCESS
    assert stats.new_entries == 1 and stats.files_transferred == 1
    assert "fxgraph/zz/fzzkey/entry0" in manifest(b10_env).entries


def test_partial_local_cache_is_completed(b10_env):
    write_tree(b10_env.local, CACHE)
    assert b10_transfer.save_compile_cache() is SUCCESS
    (b10_env.local / "ab" / "cabc.py").unlink()
    status, stats = core.load()
    assert status is SUCCESS
    assert (stats.files, stats.files_transferred, stats.files_skipped) == (3, 1, 2)
    assert read_tree(b10_env.local) == CACHE


def test_transient_files_are_never_saved(b10_env):
    write_tree(
        b10_env.local,
        {
            **CACHE,
            "locks/cabc.lock": b"",
            "ab/cabc.py.lock": b"",
            "ab/.tmp-12345": b"half-written",
            "fxgraph/xy/fxykey/entry1.tmp": b"half-written",
        },
    )
    assert b10_transfer.save_compile_cache() is SUCCESS
    assert set(manifest(b10_env).entries) == set(CACHE)


# --- the volume --------------------------------------------------------------------------------------------------


def test_disabled_b10fs_is_an_error(b10_env, monkeypatch):
    write_tree(b10_env.local, CACHE)
    monkeypatch.setenv("BASETEN_FS_ENABLED", "0")
    assert b10_transfer.save_compile_cache() is ERROR
    assert b10_transfer.load_compile_cache() is ERROR
    assert not b10_env.scope.exists()


def test_missing_volume(b10_env, monkeypatch, tmp_path):
    write_tree(b10_env.local, CACHE)
    absent = tmp_path / "not-mounted"
    monkeypatch.setenv("B10FS_VOLUME_ROOT", str(absent))
    assert b10_transfer.load_compile_cache() is ERROR
    assert b10_transfer.save_compile_cache() is ERROR
    assert not absent.exists()  # nothing created where the mount should be


def test_unreadable_volume_dir(b10_env, monkeypatch):
    """B10FS_CACHE_DIR exists but is not a directory: load and save are errors, the file is left alone."""
    write_tree(b10_env.local, CACHE)
    bogus = b10_env.volume / "model" / "compile_cache"
    bogus.write_bytes(b"not a directory")
    assert b10_transfer.load_compile_cache() is ERROR
    assert b10_transfer.save_compile_cache() is ERROR
    assert bogus.read_bytes() == b"not a directory"


@contextlib.contextmanager
def read_only(path: Path):
    """Make `path` read-only for real, also for root (tests run as root in CI): a read-only bind mount onto itself.
    As non-root, removing write permission is enough. Skips if neither works here."""
    if os.geteuid() != 0:
        dirs = [path, *[p for p in path.rglob("*") if p.is_dir()]]
        for d in dirs:
            d.chmod(0o555)
        try:
            yield
        finally:
            for d in dirs:
                d.chmod(0o755)
        return
    bind = subprocess.run(["mount", "--bind", str(path), str(path)], capture_output=True)
    if bind.returncode != 0:
        pytest.skip(f"cannot bind-mount as root here: {bind.stderr.decode().strip()}")
    try:
        ro = subprocess.run(["mount", "-o", "remount,ro,bind", str(path)], capture_output=True)
        if ro.returncode != 0:
            pytest.skip(f"cannot remount read-only here: {ro.stderr.decode().strip()}")
        probe = path / "write-probe"
        with pytest.raises(OSError) as exc:
            probe.write_bytes(b"x")
        assert exc.value.errno == errno.EROFS
        yield
    finally:
        subprocess.run(["umount", str(path)], check=True)


def test_read_only_volume(b10_env):
    """Loading from a read-only volume works; saving to it is an error that leaves the volume untouched."""
    write_tree(b10_env.local, CACHE)
    assert b10_transfer.save_compile_cache() is SUCCESS
    assert b10_transfer.clear_local_cache()
    with read_only(b10_env.volume):
        before = snapshot(b10_env.volume)
        assert b10_transfer.load_compile_cache() is SUCCESS
        assert read_tree(b10_env.local) == CACHE
        write_tree(b10_env.local, {"fxgraph/zz/fzzkey/entry0": b"new shape"})
        assert b10_transfer.save_compile_cache() is ERROR
        assert snapshot(b10_env.volume) == before


def test_org_mount_missing_falls_back_to_deployment_store(b10_env):
    (b10_env.volume / "org").rmdir()
    write_tree(b10_env.local, CACHE)
    assert b10_transfer.save_compile_cache() is SUCCESS
    assert (b10_env.volume / "model" / "b10_cas" / "CAS-FORMAT").exists()
    assert not (b10_env.volume / "org").exists()
    assert b10_transfer.clear_local_cache()
    assert b10_transfer.load_compile_cache() is SUCCESS
    assert read_tree(b10_env.local) == CACHE


# --- damaged data on the volume ------------------------------------------------------------------------------------


# One file above cas.pack.PACK_FILE_MAX: stored as its own (loose) blob; the three of CACHE share one pack.
BIG = "fxgraph/zz/bigkey/entry0"


@pytest.mark.parametrize("victim", ["fxgraph/xy/fxykey/entry0", BIG], ids=["pack", "loose"])
def test_corrupt_blob_is_a_miss_and_the_rest_loads(b10_env, victim):
    from cas import pack

    files = {**CACHE, BIG: os.urandom(pack.PACK_FILE_MAX + 4096)}
    write_tree(b10_env.local, files)
    assert b10_transfer.save_compile_cache() is SUCCESS
    entries = manifest(b10_env).entries
    assert entries[BIG].pack is None and all(entries[p].pack is not None for p in CACHE)
    assert len({entries[p].stored_id for p in CACHE}) == 1  # one pack
    lost = {p for p, e in entries.items() if e.stored_id == entries[victim].stored_id}
    assert lost == (set(CACHE) if victim != BIG else {BIG})
    blob = Path(BlobStore(b10_env.store, create=False).blob_path(entries[victim].stored_id))
    data = bytearray(blob.read_bytes())
    data[len(data) // 2] ^= 0xFF
    blob.write_bytes(bytes(data))
    assert b10_transfer.clear_local_cache()

    status, stats = core.load()
    assert status is SUCCESS
    assert (stats.files_transferred, stats.misses, stats.corrupt) == (len(files) - len(lost), len(lost), len(lost))
    restored = read_tree(b10_env.local)
    assert not lost & set(restored)  # Inductor will simply compile them again
    assert restored == {k: v for k, v in files.items() if k not in lost}


def test_every_blob_missing_is_an_error(b10_env):
    write_tree(b10_env.local, CACHE)
    assert b10_transfer.save_compile_cache() is SUCCESS
    store = BlobStore(b10_env.store, create=False)
    stored = {entry.stored_id for entry in manifest(b10_env).entries.values()}
    assert len(stored) == 1  # the three small files share one pack
    for blob_id in stored:
        Path(store.blob_path(blob_id)).unlink()
    assert b10_transfer.clear_local_cache()
    status, stats = core.load()
    assert status is ERROR
    assert stats.misses == 3
    assert read_tree(b10_env.local) == {}


def test_garbage_manifest(b10_env):
    """Load reports ERROR (the model still starts); the next save replaces the garbage, so the deployment heals."""
    write_tree(b10_env.local, CACHE)
    assert b10_transfer.save_compile_cache() is SUCCESS
    path = Path(Scope(b10_env.scope).manifest_path(core.key_for()))
    path.write_bytes(b"\x93garbage" + os.urandom(64))
    assert b10_transfer.clear_local_cache()
    assert b10_transfer.load_compile_cache() is ERROR
    assert not b10_env.local.exists()

    write_tree(b10_env.local, CACHE)
    assert b10_transfer.save_compile_cache() is SUCCESS
    assert set(manifest(b10_env).entries) == set(CACHE)


# --- limits --------------------------------------------------------------------------------------------------------


def test_cache_over_size_cap_is_refused(b10_env, monkeypatch):
    monkeypatch.setenv("MAX_CACHE_SIZE_MB", "1")
    write_tree(b10_env.local, {"big/incompressible.so": os.urandom(3 << 20)})
    status, stats = core.save()
    assert status is ERROR
    assert "TooLarge" in stats.reason
    assert manifest(b10_env) is None
    assert [p for p in b10_env.store.rglob("*") if p.is_file() and "blobs" in p.parts] == []


def test_cache_under_size_cap_is_saved(b10_env, monkeypatch):
    monkeypatch.setenv("MAX_CACHE_SIZE_MB", "4")
    write_tree(b10_env.local, {"big/incompressible.so": os.urandom(3 << 20)})
    assert b10_transfer.save_compile_cache() is SUCCESS


_HOLD_SLOT = """
import sys, time
from cas.lock import acquire_slot
slot = acquire_slot(sys.argv[1], int(sys.argv[2]), timeout=5, stale_after=1)
print("held", flush=True)
time.sleep(600)
"""


def test_all_save_slots_busy_skips_then_a_dead_holders_slot_is_reused(b10_env, monkeypatch):
    monkeypatch.setenv("MAX_CONCURRENT_SAVES", "1")
    # The holder refreshes its slot every 1/3 s; we call it stale only after 3 s unchanged, so a loaded CI machine
    # would have to stall the holder for 9 beats in a row to make this test take the slot of a live holder.
    monkeypatch.setenv("CLEANUP_LOCK_TIMEOUT_SECONDS", "3")
    write_tree(b10_env.local, CACHE)
    slots = Scope(b10_env.scope, create=True).slots
    holder = subprocess.Popen([sys.executable, "-c", _HOLD_SLOT, slots, "1"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"  # another live replica is uploading
        status, stats = core.save()
        assert status is SKIPPED
        assert "slots busy" in stats.reason
        assert manifest(b10_env) is None
    finally:
        holder.kill()  # the replica dies without releasing its slot
        holder.wait()
    assert b10_transfer.save_compile_cache() is SUCCESS
    assert set(manifest(b10_env).entries) == set(CACHE)


def test_local_space_floor_refuses_load(b10_env, monkeypatch):
    write_tree(b10_env.local, CACHE)
    assert b10_transfer.save_compile_cache() is SUCCESS
    assert b10_transfer.clear_local_cache()
    monkeypatch.setenv("MIN_LOCAL_SPACE_MB", str(1 << 40))  # more than any disk has
    status, stats = core.load()
    assert status is ERROR
    assert "free space" in stats.reason
    assert not b10_env.local.exists()


def test_volume_space_floor_refuses_save(b10_env, monkeypatch):
    write_tree(b10_env.local, CACHE)
    monkeypatch.setenv("MIN_B10FS_SPACE_MB", str(1 << 40))
    assert b10_transfer.save_compile_cache() is ERROR
    assert manifest(b10_env) is None


# --- invalid settings ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name,value",
    [
        ("MAX_CACHE_SIZE_MB", "lots"),
        ("MAX_CACHE_SIZE_MB", "-5"),
        ("MAX_CACHE_SIZE_CAP_MB", "0"),
        ("MAX_CONCURRENT_SAVES", "0"),
        ("MAX_CONCURRENT_SAVES", "1.5"),
        ("CLEANUP_LOCK_TIMEOUT_SECONDS", "soon"),
        ("CLEANUP_INCOMPLETE_TIMEOUT_SECONDS", "-1"),
        ("MIN_LOCAL_SPACE_MB", "x"),
        ("MIN_B10FS_SPACE_MB", "-1"),
        ("LOCAL_SPACE_ARCHIVE_MULTIPLIER", "nan"),
        ("B10_TRANSFER_IO_THREADS", "0"),
        ("BASETEN_FS_ENABLED", "maybe"),
        ("B10FS_CACHE_DIR", "/etc/compile_cache"),
        ("B10FS_ORG_CACHE_DIR", "/etc/store"),
        ("TORCHINDUCTOR_CACHE_DIR", "/etc/inductor"),
        ("TORCHINDUCTOR_CACHE_DIR", "/tmp/../etc/inductor"),
        ("TORCHINDUCTOR_CACHE_DIR", " /tmp/x"),
        ("LOCAL_WORK_DIR", "/root/work"),
        ("B10FS_VOLUME_ROOT", "/"),
    ],
)
def test_invalid_setting_is_an_error_status_naming_the_variable(b10_env, monkeypatch, caplog, name, value):
    write_tree(b10_env.local, CACHE)
    monkeypatch.setenv(name, value)
    caplog.set_level(logging.INFO, logger="b10_transfer")
    assert b10_transfer.load_compile_cache() is ERROR
    assert b10_transfer.save_compile_cache() is ERROR
    summaries = [r.getMessage() for r in caplog.records if r.name == "b10_transfer"]
    assert len(summaries) == 2
    assert all(name in line and "status=ERROR" in line for line in summaries)
    assert not b10_env.scope.exists()


# --- never raises, one log line --------------------------------------------------------------------------------------


def test_unexpected_failure_inside_is_an_error_not_an_exception(b10_env, monkeypatch):
    write_tree(b10_env.local, CACHE)
    assert b10_transfer.save_compile_cache() is SUCCESS
    write_tree(b10_env.local, {"new/file.py": b"new"})
    assert b10_transfer.clear_local_cache()

    def boom(*args, **kwargs):
        raise RuntimeError("store exploded")

    monkeypatch.setattr(core, "save_tree", boom)
    monkeypatch.setattr(core, "load_tree", boom)
    write_tree(b10_env.local, {"new/file.py": b"new"})
    status, stats = core.save()
    assert status is ERROR and "store exploded" in stats.reason
    status, stats = core.load()
    assert status is ERROR and "store exploded" in stats.reason


def test_one_plain_info_line_per_call(b10_env, caplog):
    caplog.set_level(logging.DEBUG, logger="b10_transfer")
    write_tree(b10_env.local, CACHE)
    calls = [
        (b10_transfer.load_compile_cache, "load status=DOES_NOT_EXIST"),
        (b10_transfer.save_compile_cache, "save status=SUCCESS"),
        (b10_transfer.clear_local_cache, None),
        (b10_transfer.load_compile_cache, "load status=SUCCESS"),
    ]
    for call, expected in calls:
        caplog.clear()
        call()
        if expected is None:
            continue
        infos = [r for r in caplog.records if r.name == "b10_transfer" and r.levelno == logging.INFO]
        assert len(infos) == 1
        line = infos[0].getMessage()
        assert line.startswith(expected)
        assert "\x1b" not in line
        for field in ("files=", "seconds=", "skipped=", "env="):
            assert field in line
    assert "restored=3" in line


# --- info, listing, transfer ---------------------------------------------------------------------------------------


def test_get_cache_info_reports_manifest_and_last_calls(b10_env):
    write_tree(b10_env.local, CACHE)
    assert b10_transfer.save_compile_cache() is SUCCESS
    assert b10_transfer.load_compile_cache() is SKIPPED
    info = b10_transfer.get_cache_info()
    assert "error" not in info
    assert info["environment_key"] == core.key_for()
    assert info["local_cache_exists"] is True and info["b10fs_cache_exists"] is True
    assert info["manifest_files"] == 3
    assert info["manifest_size_bytes"] == sum(len(v) for v in CACHE.values())
    assert info["manifest_environment"] == info["environment"]
    assert info["last_save"]["status"] == "SUCCESS" and info["last_save"]["files_transferred"] == 3
    assert info["last_load"]["status"] == "SKIPPED" and info["last_load"]["files_skipped"] == 3


def test_get_cache_info_never_raises(b10_env, monkeypatch):
    monkeypatch.setenv("MAX_CONCURRENT_SAVES", "many")
    info = b10_transfer.get_cache_info()
    assert "MAX_CONCURRENT_SAVES" in info["error"]


def test_list_available_caches(b10_env):
    assert b10_transfer.list_available_caches()["total_caches"] == 0
    write_tree(b10_env.local, CACHE)
    assert b10_transfer.save_compile_cache() is SUCCESS
    # Another environment's manifest in the same deployment (e.g. another GPU type).
    other_env = {"device_type": "cuda", "device_name": "NVIDIA H100 80GB HBM3", "cuda_version": "12.8",
                 "torch_version": "2.11.0", "triton_version": "3.6.0"}
    other = core.key_for(None, other_env)
    from cas import save_tree

    save_tree(b10_env.local, BlobStore(b10_env.store), Scope(b10_env.scope), other, env=other_env)
    listing = b10_transfer.list_available_caches()
    assert listing["total_caches"] == 2
    assert listing["current_cache_exists"] is True
    by_key = {c["environment_key"]: c for c in listing["caches"]}
    assert by_key[other]["is_current_environment"] is False
    assert by_key[other]["environment"]["device_name"] == "NVIDIA H100 80GB HBM3"
    assert by_key[core.key_for()]["files"] == 3


def test_transfer_copies_atomically(b10_env, tmp_path):
    src = tmp_path / "src.bin"
    src.write_bytes(os.urandom(10000))
    dest = b10_env.volume / "model" / "files" / "copy.bin"
    assert b10_transfer.transfer(str(src), str(dest)) is SUCCESS
    assert dest.read_bytes() == src.read_bytes()
    assert b10_transfer.transfer(str(tmp_path / "absent"), str(dest)) is ERROR


def test_transfer_refuses_without_space_and_leaves_nothing(b10_env, tmp_path, monkeypatch):
    src = tmp_path / "src.bin"
    src.write_bytes(b"x" * 1000)
    dest = tmp_path / "out" / "copy.bin"
    monkeypatch.setenv("MIN_LOCAL_SPACE_MB", str(1 << 40))
    assert b10_transfer.transfer(str(src), str(dest)) is ERROR
    assert not dest.exists()
    assert list(dest.parent.iterdir()) == []


def test_clear_local_cache_with_invalid_dir_returns_false(b10_env, monkeypatch):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", "/etc")
    assert b10_transfer.clear_local_cache() is False
    assert Path("/etc").is_dir()


def test_summary_line_is_visible_without_any_logging_setup(b10_env, tmp_path):
    """Like the peer's prints, the line reaches stderr when the application configured no logging."""
    env = {k: v for k, v in os.environ.items()}
    proc = subprocess.run(
        [sys.executable, "-c", "import b10_transfer; b10_transfer.load_compile_cache()"],
        env=env, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    lines = [l for l in proc.stderr.splitlines() if "b10_transfer" in l and "status=" in l]
    assert len(lines) == 1 and "load status=DOES_NOT_EXIST" in lines[0]
    assert "\x1b" not in proc.stderr


def test_peer_module_paths_still_import():
    from b10_transfer.cache import clear_local_cache, load_compile_cache, save_compile_cache  # noqa: F401
    from b10_transfer.core import transfer  # noqa: F401
    from b10_transfer.environment import get_environment_key
    from b10_transfer.info import get_cache_info, list_available_caches  # noqa: F401

    assert get_environment_key() == core.key_for()


def test_concurrent_replicas_with_one_slot_all_get_recorded(b10_env, tmp_path, monkeypatch):
    """Three replicas save at once through a single slot: they queue, and every one's new files reach the manifest."""
    monkeypatch.setenv("MAX_CONCURRENT_SAVES", "1")
    procs, expected = [], set(CACHE)
    for n in range(3):
        local = tmp_path / f"replica{n}" / "inductor"
        own = {f"fxgraph/r{n}/fr{n}key/entry0": os.urandom(5000)}
        write_tree(local, {**CACHE, **own})
        expected |= set(own)
        env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(local)}
        procs.append(
            subprocess.Popen(
                [sys.executable, "-c", "import b10_transfer; print(b10_transfer.save_compile_cache().name)"],
                env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            )
        )
    results = [p.communicate(timeout=300) for p in procs]
    assert [out.strip() for out, _ in results] == ["SUCCESS"] * 3, [err for _, err in results]
    assert set(manifest(b10_env).entries) == expected
    assert os.listdir(Scope(b10_env.scope).slots) == []  # every slot released


def test_companion_label_and_explicit_environment(b10_env, tmp_path):
    """core.load/save with another directory, a label and a given environment keep a separate manifest."""
    env = {"device_type": "cuda", "device_name": "NVIDIA H100 80GB HBM3", "cuda_version": "12.8",
           "torch_version": "2.11.0", "triton_version": "3.6.0"}
    other_dir = tmp_path / "vllm-cache"
    write_tree(other_dir, {"torch_compile_cache/abc/rank_0_0/model.py": b"graph"})
    status, stats = core.save(other_dir, label="vllm", env=env)
    assert status is SUCCESS
    assert stats.env_key == core.key_for("vllm", env)
    scope = Scope(b10_env.scope)
    assert scope.env_keys() == [stats.env_key]
    assert scope.read_manifest(stats.env_key).env == env
    assert b10_transfer.load_compile_cache() is DOES_NOT_EXIST  # the Inductor manifest is a different one
    status, _ = core.load(tmp_path / "restored", label="vllm", env=env)
    assert status is SUCCESS
    assert read_tree(tmp_path / "restored") == read_tree(other_dir)


def test_peer_top_level_names_exist():
    import b10_transfer as b

    for name in ("load_compile_cache", "save_compile_cache", "clear_local_cache", "OperationStatus", "CacheError",
                 "CacheValidationError", "CacheOperationInterrupted", "get_cache_info", "list_available_caches",
                 "transfer", "get_b10_logger", "save_vllm_compile_cache", "__version__"):
        assert hasattr(b, name), name
    assert {s.name for s in b.OperationStatus} == {"SUCCESS", "ERROR", "DOES_NOT_EXIST", "SKIPPED"}
    assert issubclass(b.CacheValidationError, b.CacheError) and issubclass(b.CacheOperationInterrupted, b.CacheError)
