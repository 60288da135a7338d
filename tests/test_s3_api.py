"""The public API (b10_transfer.core load/save) and the `cas` command with the org store and the deployment scope in
an S3 bucket (`B10FS_ORG_CACHE_DIR=s3://...`, `B10FS_CACHE_DIR=s3://...`), against moto and SeaweedFS on 127.0.0.1.

Credentials, region and endpoint come from the standard AWS_* variables, as in production. With both locations in a
bucket no volume is used: BASETEN_FS_ENABLED is not set in these tests (docs/configuration.md).
"""
from __future__ import annotations

import os
import random
import time
from collections.abc import Callable
from pathlib import Path

import pytest

pytest.importorskip("obstore")

from cas_helpers import random_tree, read_tree, write_tree
from conftest import _B10_VARS
from s3_servers import AWS_VARS, S3Bucket, fresh_bucket_name, stoppable_moto_server

import cas.backends
import cas.scope
from b10_transfer import core
from b10_transfer.config import read_settings
from b10_transfer.errors import CacheValidationError
from b10_transfer.status import OperationStatus
from cas.faulty import FaultyBackend

ENV = {"test": "s3-api"}  # the environment dict naming the manifest (no torch/CUDA probing)
# A load or save against a dead or refusing endpoint must end within this (cas/s3.py S3Settings: ~0.5 s refused,
# ~6 s hung for a read; the breaker answers the rest at once).
BOUNDED_S = 15.0


@pytest.fixture(autouse=True)
def _clean(monkeypatch):
    """No developer setting leaks in; kept S3 backends and remembered manifests do not cross tests."""
    for name in (*_B10_VARS, *AWS_VARS, "B10_TRANSFER_CACHE_FAMILY"):
        monkeypatch.delenv(name, raising=False)
    cas.backends.forget_s3_backends()
    cas.scope._recent.clear()
    yield
    cas.backends.forget_s3_backends()


def point_at(monkeypatch, bucket: S3Bucket, local: Path, *, org: str | None = None, scope: str | None = None,
             volume: Path | None = None) -> None:
    """The variables of a pod with both locations in `bucket` (or as given) and no volume."""
    for name, value in bucket.endpoint.env().items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("B10FS_ORG_CACHE_DIR", org or f"{bucket.url}/org/b10_cas")
    monkeypatch.setenv("B10FS_CACHE_DIR", scope or f"{bucket.url}/deployments/d1")
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(local))
    monkeypatch.setenv("LOCAL_WORK_DIR", str(local.parent))
    monkeypatch.setenv("MIN_LOCAL_SPACE_MB", "1")
    if volume is not None:
        monkeypatch.setenv("B10FS_VOLUME_ROOT", str(volume))


def make_cache(local: Path, seed: int = 1, n: int = 60) -> dict[str, bytes]:
    files = random_tree(random.Random(seed), n, max_size=12_000)
    files["big/kernel.so"] = random.Random(seed).randbytes(2 << 20)  # > 1 MiB: a blob of its own
    write_tree(local, files)
    old = time.time() - 60  # older than the index's 2 s rule, so a later no-op check can trust it (FORMAT §7)
    for rel in files:
        os.utime(local / rel, (old, old))
    return files


def contents(root: Path) -> dict[str, bytes]:
    return {rel: data for rel, (data, _mode) in read_tree(root).items()}


def counting(monkeypatch) -> dict[str, FaultyBackend]:
    """Make every S3 backend the API opens a counting FaultyBackend (one per URL), returned by URL."""
    made: dict[str, FaultyBackend] = {}
    real: Callable = cas.backends.s3_backend

    def wrapped(url: str, **kwargs) -> FaultyBackend:
        if url not in made:
            made[url] = FaultyBackend(real(url, **kwargs))
        return made[url]

    monkeypatch.setattr(cas.backends, "s3_backend", wrapped)
    return made


def requests(backends: dict[str, FaultyBackend]) -> dict[str, dict[str, int]]:
    return {url: dict(b.calls) for url, b in backends.items() if b.calls}


def total(backends: dict[str, FaultyBackend]) -> int:
    return sum(sum(b.calls.values()) for b in backends.values())


# -- settings ---------------------------------------------------------------------------------------------------


def test_settings_carry_urls_and_need_no_volume(monkeypatch, tmp_path):
    env = {"B10FS_ORG_CACHE_DIR": "s3://org-bucket/cas/", "B10FS_CACHE_DIR": "s3://org-bucket/deploy/m1",
           "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor")}
    s = read_settings(env)
    assert s.org_cache_dir == "s3://org-bucket/cas" and s.b10fs_cache_dir == "s3://org-bucket/deploy/m1"
    assert not s.needs_volume and not s.b10fs_enabled and s.store_root() == "s3://org-bucket/cas"
    mixed = read_settings({**env, "B10FS_CACHE_DIR": "/cache/model/compile_cache"})
    assert mixed.needs_volume and mixed.scope_on_volume and not mixed.store_on_volume
    # a URL is checked as a URL, never against the volume's path prefixes
    for bad in ("s3://UPPER/x", "s3://b/../x", "s3://b//x", "s3://b/x?y=1"):
        with pytest.raises(CacheValidationError, match="B10FS_ORG_CACHE_DIR"):
            read_settings({**env, "B10FS_ORG_CACHE_DIR": bad})


def test_a_scope_url_with_the_store_on_a_disabled_volume_is_an_error(monkeypatch, moto_bucket, tmp_path):
    """Only the org store on the volume (default path) and BASETEN_FS_ENABLED unset: the volume gate still holds."""
    local = tmp_path / "local" / "inductor"
    make_cache(local)
    point_at(monkeypatch, moto_bucket, local)
    monkeypatch.delenv("B10FS_ORG_CACHE_DIR")
    status, stats = core.save(env=ENV)
    assert status is OperationStatus.ERROR and "BASETEN_FS_ENABLED" in stats.reason


# -- load and save through the API ------------------------------------------------------------------------------


def test_save_then_load_in_a_fresh_directory_restores_every_file(monkeypatch, s3_bucket, tmp_path):
    local = tmp_path / "pod1" / "inductor"
    files = make_cache(local)
    point_at(monkeypatch, s3_bucket, local)

    status, stats = core.save(env=ENV)
    assert status is OperationStatus.SUCCESS, stats.reason
    assert stats.new_entries == len(files)
    status, stats = core.save(env=ENV)
    assert status is OperationStatus.SKIPPED and stats.reason == "nothing new to record"

    fresh = tmp_path / "pod2" / "inductor"
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(fresh))
    cas.scope._recent.clear()  # another pod remembers nothing
    status, stats = core.load(env=ENV)
    assert status is OperationStatus.SUCCESS, stats.reason
    assert stats.files_transferred == len(files) and stats.misses == 0
    assert contents(fresh) == files
    status, stats = core.load(env=ENV)
    assert status is OperationStatus.SKIPPED


def test_store_in_a_bucket_scope_on_the_volume(monkeypatch, moto_bucket, b10_env):
    """The common first step: the org store moves to S3 (shared across clusters), scopes stay on each volume."""
    files = make_cache(b10_env.local)
    monkeypatch.setenv("B10FS_ORG_CACHE_DIR", f"{moto_bucket.url}/org/b10_cas")
    for name, value in moto_bucket.endpoint.env().items():
        monkeypatch.setenv(name, value)
    status, stats = core.save(env=ENV)
    assert status is OperationStatus.SUCCESS, stats.reason
    assert (b10_env.scope / "manifests").is_dir() and not (b10_env.volume / "org" / "b10_cas").exists()
    fresh = b10_env.local.parent / "fresh"
    status, stats = core.load(fresh, env=ENV)
    assert status is OperationStatus.SUCCESS and contents(fresh) == files


def test_noop_save_makes_at_most_three_requests(monkeypatch, moto_bucket, tmp_path):
    """Issue 13's goal: a save with nothing new costs at most 3 requests on S3: one LIST of manifests/ (manifest
    version and audit marker), scope.id and the gc root (FORMAT §3a). Also for the first save of a pod that has
    just loaded (the manifest bytes the load read are recognised by their ETag)."""
    local = tmp_path / "pod1" / "inductor"
    make_cache(local)
    point_at(monkeypatch, moto_bucket, local)
    backends = counting(monkeypatch)
    assert core.save(env=ENV)[0] is OperationStatus.SUCCESS

    for backend in backends.values():
        backend.calls.clear()
    status, _ = core.save(env=ENV)
    assert status is OperationStatus.SKIPPED
    assert total(backends) <= 3, requests(backends)
    for backend in backends.values():
        backend.calls.clear()
    assert core.save(env=ENV)[0] is OperationStatus.SKIPPED  # periodic saves (the companion): the same
    assert total(backends) <= 3, requests(backends)

    # Another pod: load, then save with nothing new.
    cas.scope._recent.clear()
    fresh = tmp_path / "pod2" / "inductor"
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(fresh))
    assert core.load(env=ENV)[0] is OperationStatus.SUCCESS
    for backend in backends.values():
        backend.calls.clear()
    status, _ = core.save(env=ENV)
    assert status is OperationStatus.SKIPPED
    assert total(backends) <= 3, requests(backends)


def test_audit_marker_makes_the_noop_check_say_maybe(monkeypatch, moto_bucket, tmp_path):
    """The LIST stands for the marker's stat: a loader's audit request is still seen by a save with nothing new."""
    from cas import Scope, layout

    local = tmp_path / "pod1" / "inductor"
    make_cache(local)
    point_at(monkeypatch, moto_bucket, local)
    assert core.save(env=ENV)[0] is OperationStatus.SUCCESS
    scope = Scope(f"{moto_bucket.url}/deployments/d1")
    key = core.key_for(None, ENV)
    scope.request_audit(key)
    status, stats = core.save(env=ENV)  # not a no-op: the audit re-checks every entry, re-packs, clears the marker
    assert status is OperationStatus.SUCCESS, stats.reason
    with pytest.raises(cas.storage.NotFound):
        scope.backend.stat(layout.audit(key))
    assert core.save(env=ENV)[1].reason == "nothing new to record"


def test_wrong_credentials_are_a_clear_error_in_bounded_time(monkeypatch, seaweed_bucket, tmp_path):
    """SeaweedFS checks signatures (moto accepts any key): a wrong secret is ERROR naming the refusal."""
    local = tmp_path / "pod1" / "inductor"
    make_cache(local)
    point_at(monkeypatch, seaweed_bucket, local)
    assert core.save(env=ENV)[0] is OperationStatus.SUCCESS
    write_tree(local, {"new/file.bin": b"compiled later"})  # so the save has something to write
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    for call, where in ((core.load, tmp_path / "other" / "inductor"), (core.save, local)):
        started = time.monotonic()
        status, stats = call(where, env=ENV)
        assert status is OperationStatus.ERROR
        assert "access denied" in stats.reason and "credentials" in stats.reason, stats.reason
        assert time.monotonic() - started < BOUNDED_S


@pytest.mark.parametrize("server", ["moto", "seaweedfs"])
def test_missing_bucket_is_an_error(monkeypatch, request, server, tmp_path):
    """A bucket is never created by the library. SeaweedFS's gateway would create one on the first PUT into it, but a
    save reads the store's CAS-FORMAT (and a load the manifest) before writing anything, and that GET says
    NoSuchBucket on both servers: ERROR naming the missing bucket, nothing written."""
    bucket: S3Bucket = request.getfixturevalue("moto_bucket" if server == "moto" else "seaweed_bucket")
    local = tmp_path / "pod1" / "inductor"
    make_cache(local)
    gone = fresh_bucket_name("gone")
    point_at(monkeypatch, bucket, local, org=f"s3://{gone}/org", scope=f"s3://{gone}/d1")
    for call in (core.save, core.load):
        started = time.monotonic()
        status, stats = call(env=ENV)
        assert status is OperationStatus.ERROR and "bucket does not exist" in stats.reason, stats.reason
        assert time.monotonic() - started < BOUNDED_S
    assert gone not in [b["Name"] for b in bucket.endpoint.boto3().list_buckets()["Buckets"]]


def test_endpoint_stopped_load_and_save_end_in_bounded_time(monkeypatch, tmp_path):
    """The server goes away: a load is ERROR (nothing restorable) within a bounded time, never a hang; the next
    calls fail at once (the backend's breaker); a save is ERROR too, and nothing local is damaged."""
    with stoppable_moto_server() as (endpoint, stop):
        endpoint.create_bucket("stopped")
        bucket = S3Bucket(endpoint, "stopped")
        local = tmp_path / "pod1" / "inductor"
        files = make_cache(local)
        point_at(monkeypatch, bucket, local)
        assert core.save(env=ENV)[0] is OperationStatus.SUCCESS
        stop()
        fresh = tmp_path / "pod2" / "inductor"
        for call, where in ((core.load, fresh), (core.load, fresh), (core.save, local)):
            started = time.monotonic()
            status, stats = call(where, env=ENV)
            took = time.monotonic() - started
            assert status is OperationStatus.ERROR, (call, stats)
            assert took < BOUNDED_S, (call, took, stats.reason)
        assert contents(local) == files
        restored = contents(fresh) if fresh.exists() else {}
        assert all(files[rel] == data for rel, data in restored.items())


# -- the cas command --------------------------------------------------------------------------------------------


def test_cas_commands_take_s3_urls(monkeypatch, moto_bucket, tmp_path, capsys):
    from cas.cli import main

    local = tmp_path / "pod1" / "inductor"
    files = make_cache(local)
    point_at(monkeypatch, moto_bucket, local)
    assert core.save(env=ENV)[0] is OperationStatus.SUCCESS
    org, scope = f"{moto_bucket.url}/org/b10_cas", f"{moto_bucket.url}/deployments/d1"
    key = core.key_for(None, ENV)
    for argv in (["gc", "--dry-run"], ["gc"], ["check"], ["check", "--read-data"], ["stats"], ["du"], ["ls"],
                 ["ls", key]):
        capsys.readouterr()
        assert main([*argv, "--org", org, "--scope", scope]) == 0, (argv, capsys.readouterr())
    out = capsys.readouterr()
    assert f"{len(files)} entries" in out.err
    # from the environment, as in a pod
    assert main(["ls", key]) == 0
    # usage and I/O errors: exit 2
    assert main(["stats", "--org", "s3://Bad_Bucket/x"]) == 2
    assert main(["stats", "--org", f"s3://{fresh_bucket_name('gone')}/org"]) == 2
    assert "bucket does not exist" in capsys.readouterr().err


def test_cache_info_reads_an_s3_scope(monkeypatch, moto_bucket, tmp_path):
    from b10_transfer.info import get_cache_info, list_available_caches

    local = tmp_path / "pod1" / "inductor"
    files = make_cache(local)
    point_at(monkeypatch, moto_bucket, local)
    monkeypatch.setattr("b10_transfer.info.environment", lambda: ENV)
    assert core.save(env=ENV)[0] is OperationStatus.SUCCESS
    info = get_cache_info()
    assert "error" not in info, info
    assert info["b10fs_cache_exists"] and info["manifest_files"] == len(files)
    listed = list_available_caches()
    assert "error" not in listed and [c["environment_key"] for c in listed["caches"]] == [core.key_for(None, ENV)]
