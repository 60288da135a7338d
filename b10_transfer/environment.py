"""The environment key: which compiled artifacts can be reused by this process.

The key names the manifest a replica reads and writes. Inductor's own cache keys already include the torch version,
GPU and CUDA/Triton versions, so artifacts of different environments never collide; keying manifests by environment
keeps one deployment's manifests for different hardware (or after a torch upgrade) apart, so a replica never
downloads files it cannot use.

The key is `<readable slug>-<hash>`: the slug is for people listing the volume, the hash (of the full environment
dict) is what makes it unique. The full dict is recorded in the manifest.
"""

from __future__ import annotations

import hashlib
import json
import platform
import re
from importlib import metadata

# Key alphabet and length accepted by the store (cas) for manifest names.
_KEY_MAX = 128
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
# 16 hex digits = 64 bits: collisions between environments of one deployment are not a practical concern.
_HASH_HEX = 16
# Distributions that ship the `triton` module: upstream, and the one PyTorch nightlies/ROCm builds depend on.
_TRITON_DISTS = ("triton", "pytorch-triton", "pytorch-triton-rocm", "triton-xpu")


def environment() -> dict[str, str]:
    """The facts compiled artifacts depend on, as strings.

    GPU: device name and CUDA version (as the peer), plus torch and triton versions.
    CPU only: CPU architecture and OS (as the peer), plus torch and triton versions.
    """
    import torch  # imported lazily: `import b10_transfer` must stay cheap

    env: dict[str, str] = {
        "torch_version": str(torch.__version__),
        "triton_version": _triton_version(),
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        env.update(
            device_type="cuda",
            device_name=str(props.name),
            # torch.version.cuda is None on ROCm builds; HIP's version plays the same role there.
            cuda_version=str(torch.version.cuda or getattr(torch.version, "hip", None) or "unknown"),
        )
    else:
        env.update(
            device_type="cpu",
            cpu_architecture=platform.machine() or "unknown",
            platform_system=platform.system() or "unknown",
        )
    return env


def environment_key(env: dict[str, str] | None = None, *, max_len: int = _KEY_MAX) -> str:
    """A filesystem-safe key ([A-Za-z0-9._-], at most `max_len` <= 128 chars) unique to `env` (default: this
    process)."""
    env = environment() if env is None else env
    digest = hashlib.sha256(json.dumps(env, sort_keys=True).encode()).hexdigest()[:_HASH_HEX]
    if env.get("device_type") == "cuda":
        parts = [env.get("device_name", ""), "cuda" + env.get("cuda_version", "")]
    else:
        parts = [env.get("device_type", ""), env.get("cpu_architecture", "")]
    parts += ["torch" + env.get("torch_version", ""), "triton" + env.get("triton_version", "")]
    slug = _UNSAFE.sub("-", "_".join(p for p in parts if p)).strip("-._")
    slug = slug[: min(max_len, _KEY_MAX) - _HASH_HEX - 1].rstrip("-._")
    return f"{slug}-{digest}" if slug else digest


def _triton_version() -> str:
    for dist in _TRITON_DISTS:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return "none"


def get_environment_key() -> str:
    """The peer's name for `environment_key()` of this process."""
    return environment_key()
