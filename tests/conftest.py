"""Shared fixtures: a local directory standing in for the b10fs volume, and an environment pointing at it."""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

# Variables the b10_transfer settings read; cleared so the developer's own environment cannot leak into a test.
_B10_VARS = (
    "TORCHINDUCTOR_CACHE_DIR", "B10FS_CACHE_DIR", "B10FS_ORG_CACHE_DIR", "B10FS_VOLUME_ROOT", "LOCAL_WORK_DIR",
    "MAX_CACHE_SIZE_MB", "MAX_CACHE_SIZE_CAP_MB", "MAX_CONCURRENT_SAVES", "CLEANUP_LOCK_TIMEOUT_SECONDS",
    "CLEANUP_INCOMPLETE_TIMEOUT_SECONDS", "MIN_LOCAL_SPACE_MB", "MIN_B10FS_SPACE_MB",
    "LOCAL_SPACE_ARCHIVE_MULTIPLIER", "B10_TRANSFER_IO_THREADS", "BASETEN_FS_ENABLED",
)


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: runs real torch.compile in subprocesses (still runs by default)")


@dataclass
class B10Env:
    volume: Path  # stands in for /cache; holds model/ and org/ like the real mounts
    local: Path  # the replica's TORCHINDUCTOR_CACHE_DIR

    @property
    def scope(self) -> Path:
        return self.volume / "model" / "compile_cache"

    @property
    def store(self) -> Path:
        return self.volume / "org" / "b10_cas"


def b10_environ(volume: Path, local: Path) -> dict[str, str]:
    """The variables that point b10_transfer at `volume` and `local`, with space floors a test machine can meet."""
    return {
        "BASETEN_FS_ENABLED": "1",
        "B10FS_VOLUME_ROOT": str(volume),
        "TORCHINDUCTOR_CACHE_DIR": str(local),
        "LOCAL_WORK_DIR": str(local.parent),
        "MIN_LOCAL_SPACE_MB": "1",
        "MIN_B10FS_SPACE_MB": "1",
    }


def child_environ(volume: Path, local: Path) -> dict[str, str]:
    """A full environment for a child process: ours minus any b10 settings, plus `b10_environ(volume, local)`."""
    env = {k: v for k, v in os.environ.items() if k not in _B10_VARS}
    env.update(b10_environ(volume, local))
    return env


@pytest.fixture
def b10_env(tmp_path, monkeypatch) -> B10Env:
    """A fresh stand-in volume (with model/ and org/ mounts) and local cache dir, exported to os.environ."""
    volume = tmp_path / "volume"
    (volume / "model").mkdir(parents=True)
    (volume / "org").mkdir()
    local = tmp_path / "local" / "inductor"
    for name in _B10_VARS:
        monkeypatch.delenv(name, raising=False)
    for name, value in b10_environ(volume, local).items():
        monkeypatch.setenv(name, value)
    return B10Env(volume, local)


# --- S3-compatible servers on 127.0.0.1 (tests/s3_servers.py): session-scoped servers, a fresh bucket per test ---

from s3_servers import S3Bucket, S3Endpoint, ServerUnavailable, SeaweedServer  # noqa: E402
from s3_servers import fresh_bucket_name, moto_server, seaweed_server  # noqa: E402


@pytest.fixture(scope="session")
def moto_endpoint() -> Iterator[S3Endpoint]:
    """moto's ThreadedMotoServer on a random port of 127.0.0.1 (skipped only when moto[server] is not installed)."""
    try:
        with moto_server() as endpoint:
            yield endpoint
    except ServerUnavailable as exc:
        pytest.skip(str(exc))


@pytest.fixture(scope="session")
def seaweed(tmp_path_factory) -> Iterator[SeaweedServer]:
    """A SeaweedFS `weed server` (master, volume, filer, S3) on 127.0.0.1; skipped only when `weed` is absent."""
    from s3_servers import weed_binary

    try:
        weed_binary()
    except ServerUnavailable as exc:
        pytest.skip(str(exc))
    with seaweed_server(tmp_path_factory.mktemp("seaweedfs")) as server:  # a failed start is an error, not a skip
        yield server


@pytest.fixture
def moto_bucket(moto_endpoint) -> S3Bucket:
    name = fresh_bucket_name("moto")
    moto_endpoint.create_bucket(name)
    return S3Bucket(moto_endpoint, name)


@pytest.fixture
def seaweed_bucket(seaweed) -> S3Bucket:
    name = fresh_bucket_name("weed")
    seaweed.endpoint.create_bucket(name)
    return S3Bucket(seaweed.endpoint, name)


@pytest.fixture(params=["moto", "seaweedfs"])
def s3_bucket(request) -> S3Bucket:
    """A fresh bucket on each server in turn: endpoint URL, credentials and name."""
    return request.getfixturevalue("moto_bucket" if request.param == "moto" else "seaweed_bucket")


@pytest.fixture
def moto_backend(moto_bucket):
    """cas.s3.S3Backend on a fresh moto bucket, under a prefix (as a store inside a shared bucket would be)."""
    return moto_bucket.backend("org/b10_cas")


@pytest.fixture
def seaweedfs_backend(seaweed_bucket):
    return seaweed_bucket.backend("org/b10_cas")
