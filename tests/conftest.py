"""Shared fixtures: a local directory standing in for the b10fs volume, and an environment pointing at it."""

from __future__ import annotations

import os
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
