"""The demo's set-up (the compile part runs in tests/test_torch_compile_cache.py through the same replica code)."""

from __future__ import annotations

import pytest

from b10_transfer.config import read_settings
from b10_transfer.demo import VOLUME_MARKER, demo_env, prepare_volume


def test_prepare_volume_creates_mounts_and_only_wipes_its_own(tmp_path):
    vol = tmp_path / "demo-volume"
    prepare_volume(vol)
    assert (vol / "model").is_dir() and (vol / "org").is_dir() and (vol / VOLUME_MARKER).is_file()
    (vol / "model" / "leftover").write_text("from the last run")
    prepare_volume(vol)  # a demo volume is emptied for a cold start
    assert not (vol / "model" / "leftover").exists()

    foreign = tmp_path / "someone-elses"
    foreign.mkdir()
    (foreign / "precious").write_text("keep me")
    with pytest.raises(SystemExit):
        prepare_volume(foreign)
    assert (foreign / "precious").read_text() == "keep me"


def test_demo_env_points_every_setting_at_the_stand_in(tmp_path):
    vol, local = tmp_path / "vol", tmp_path / "local" / "inductor"
    base = {"PATH": "/usr/bin", "B10FS_CACHE_DIR": "/cache/model/x", "MIN_LOCAL_SPACE_MB": "7"}
    env = demo_env(vol, local, base)
    s = read_settings(env)
    assert s.b10fs_enabled
    assert s.b10fs_cache_dir == vol.resolve() / "model" / "compile_cache"  # the caller's real-volume path is dropped
    assert s.store_root().is_relative_to(vol.resolve())
    assert s.torch_cache_dir == local.resolve()
    assert s.min_local_space_mb == 7  # the caller's own choice is kept
    assert env["PATH"] == "/usr/bin"
