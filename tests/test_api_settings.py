"""Settings (defaults, caps, path checks) and the environment key."""

from __future__ import annotations

import getpass
import re
import tempfile
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from b10_transfer import CacheValidationError, core
from b10_transfer.config import read_settings
from b10_transfer.environment import environment, environment_key

KEY_RE = re.compile(r"[A-Za-z0-9._-]{1,128}")


def test_defaults_match_the_peer():
    s = read_settings({})
    assert s.b10fs_enabled is False  # the peer needs BASETEN_FS_ENABLED=1 too
    # /tmp/torchinductor_<user> as the peer, unless TMPDIR moves Inductor's own default (see the next test).
    assert s.torch_cache_dir == (Path(tempfile.gettempdir()) / f"torchinductor_{getpass.getuser()}").resolve()
    assert s.b10fs_cache_dir == Path("/cache/model/compile_cache")
    assert s.org_cache_dir == Path("/cache/org/b10_cas")
    assert s.local_work_dir == Path("/app")
    assert (s.max_cache_size_mb, s.max_cache_size_cap_mb, s.max_concurrent_saves) == (1024, 1024, 50)
    assert (s.cleanup_lock_timeout_s, s.cleanup_incomplete_timeout_s) == (30, 60)
    assert (s.min_local_space_mb, s.min_b10fs_space_mb, s.local_space_multiplier) == (4096, 100_000, 5.0)
    assert s.io_threads == 32
    assert s.required_b10fs_space_bytes == 100_000 * 2**20  # max(50 x 1024, 100000) MB


def test_default_cache_dir_is_inductors_own(monkeypatch, tmp_path):
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setattr("tempfile.tempdir", None)  # gettempdir() caches; make it look at TMPDIR again
    assert read_settings({}).torch_cache_dir == Path(default_cache_dir()).resolve()
    assert read_settings({}).torch_cache_dir.parent == tmp_path.resolve()


@pytest.mark.parametrize(
    "name,value,attr,expected",
    [
        ("MAX_CACHE_SIZE_MB", "5000", "max_cache_size_mb", 1024),
        ("MAX_CONCURRENT_SAVES", "1000", "max_concurrent_saves", 100),
        ("CLEANUP_LOCK_TIMEOUT_SECONDS", "99999", "cleanup_lock_timeout_s", 3600),
        ("CLEANUP_INCOMPLETE_TIMEOUT_SECONDS", "99999", "cleanup_incomplete_timeout_s", 7200),
        ("B10_TRANSFER_IO_THREADS", "100000", "io_threads", 256),
    ],
)
def test_over_cap_values_are_clamped(name, value, attr, expected):
    assert getattr(read_settings({name: value}), attr) == expected


def test_cap_variable_moves_the_cap():
    s = read_settings({"MAX_CACHE_SIZE_CAP_MB": "4096", "MAX_CACHE_SIZE_MB": "3000"})
    assert s.max_cache_size_mb == 3000


@pytest.mark.parametrize("value", ["1", "true", "True"])
def test_enabled_values(value):
    assert read_settings({"BASETEN_FS_ENABLED": value}).b10fs_enabled is True


def test_volume_root_moves_defaults_and_checks(tmp_path):
    root = tmp_path / "vol"
    s = read_settings({"B10FS_VOLUME_ROOT": str(root)})
    assert s.b10fs_cache_dir == root.resolve() / "model" / "compile_cache"
    assert s.org_cache_dir == root.resolve() / "org" / "b10_cas"
    # The deployment scope must still be under <root>/model, exactly as the peer requires /cache/model.
    with pytest.raises(CacheValidationError, match="B10FS_CACHE_DIR"):
        read_settings({"B10FS_VOLUME_ROOT": str(root), "B10FS_CACHE_DIR": str(root / "org" / "x")})
    with pytest.raises(CacheValidationError, match="B10FS_CACHE_DIR"):
        read_settings({"B10FS_CACHE_DIR": str(root / "model" / "x")})  # not under the default /cache/model


def test_sibling_prefix_is_not_inside():
    with pytest.raises(CacheValidationError, match="TORCHINDUCTOR_CACHE_DIR"):
        read_settings({"TORCHINDUCTOR_CACHE_DIR": "/tmpfoo/inductor"})


def test_store_falls_back_when_org_mount_absent(tmp_path):
    root = tmp_path / "vol"
    (root / "model").mkdir(parents=True)
    s = read_settings({"B10FS_VOLUME_ROOT": str(root)})
    assert s.store_root() == root.resolve() / "model" / "b10_cas"
    (root / "org").mkdir()
    assert s.store_root() == root.resolve() / "org" / "b10_cas"


def test_environment_of_this_process():
    import torch

    env = environment()
    assert env["torch_version"] == torch.__version__
    assert "triton_version" in env
    if torch.cuda.is_available():
        assert env["device_type"] == "cuda" and env["device_name"] and env["cuda_version"]
    else:
        assert env["device_type"] == "cpu" and env["cpu_architecture"]
    key = environment_key(env)
    assert KEY_RE.fullmatch(key)
    assert key == environment_key()  # deterministic


GPU_ENV = {
    "device_type": "cuda",
    "device_name": "NVIDIA H100 80GB HBM3",
    "cuda_version": "12.8",
    "torch_version": "2.11.0+cu128",
    "triton_version": "3.6.0",
}


def test_key_is_readable_and_distinguishes_every_field():
    key = environment_key(GPU_ENV)
    assert KEY_RE.fullmatch(key)
    assert key.startswith("NVIDIA-H100-80GB-HBM3_cuda12.8_torch2.11.0-cu128_triton3.6.0-")
    for field, other in [
        ("device_name", "NVIDIA A10G"),
        ("cuda_version", "12.4"),
        ("torch_version", "2.11.1+cu128"),
        ("triton_version", "3.6.1"),
    ]:
        assert environment_key({**GPU_ENV, field: other}) != key


def test_key_stays_valid_for_hostile_or_long_values():
    env = {**GPU_ENV, "device_name": "Ünïcode / GPU " * 40, "cuda_version": "../../etc"}
    key = environment_key(env)
    assert KEY_RE.fullmatch(key)
    assert not key.startswith(".")


def test_label_prefixes_the_key_and_keeps_its_hash():
    assert core.key_for("vllm", GPU_ENV) == "vllm." + environment_key(GPU_ENV)
    long_env = {**GPU_ENV, "device_name": "G" * 300}
    labelled = core.key_for("x" * 24, long_env)
    assert KEY_RE.fullmatch(labelled) and len(labelled) == 128
    assert labelled.endswith(environment_key(long_env)[-16:])  # the unique part survives
    for bad in ("../x", ".hidden", "é", "x" * 25, ""):
        with pytest.raises(ValueError):
            core.key_for(bad, GPU_ENV)


_VARS = [
    "BASETEN_FS_ENABLED", "TORCHINDUCTOR_CACHE_DIR", "B10FS_CACHE_DIR", "B10FS_ORG_CACHE_DIR", "B10FS_VOLUME_ROOT",
    "LOCAL_WORK_DIR", "MAX_CACHE_SIZE_MB", "MAX_CACHE_SIZE_CAP_MB", "MAX_CONCURRENT_SAVES",
    "CLEANUP_LOCK_TIMEOUT_SECONDS", "CLEANUP_INCOMPLETE_TIMEOUT_SECONDS", "MIN_LOCAL_SPACE_MB", "MIN_B10FS_SPACE_MB",
    "LOCAL_SPACE_ARCHIVE_MULTIPLIER", "B10_TRANSFER_IO_THREADS",
]

_value = st.one_of(
    st.text(max_size=40),
    st.integers(min_value=-(10**6), max_value=10**12).map(str),
    st.sampled_from(["/tmp/x", "/cache/model/a", "/cache/org/b", "~/.cache/x", "/app/w", "/", "..", "nan", "1e400"]),
    st.text(alphabet="/.abc~ \t", max_size=30),
)


@hsettings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(_VARS), _value, max_size=6))
def test_any_environment_gives_settings_or_a_validation_error(environ):
    try:
        s = read_settings(environ)
    except CacheValidationError as exc:
        assert str(exc)
        return
    assert 1 <= s.max_cache_size_mb <= s.max_cache_size_cap_mb
    assert 1 <= s.max_concurrent_saves <= 100 and 1 <= s.io_threads <= 256
    assert s.b10fs_cache_dir.is_relative_to(s.volume_root / "model")
    assert s.org_cache_dir.is_relative_to(s.volume_root)
    assert s.volume_root != Path("/")
