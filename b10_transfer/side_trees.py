"""Caches that live outside the directory being saved: today Triton's, when TRITON_CACHE_DIR points elsewhere.

Inductor keeps Triton's kernels inside its own cache directory (`<TORCHINDUCTOR_CACHE_DIR>/triton/<device>`) unless
TRITON_CACHE_DIR is set; vLLM sets TRITON_CACHE_DIR to `<VLLM_CACHE_ROOT>/torch_compile_cache/.../triton_cache`, also
inside the directory its companion saves. Only an explicit TRITON_CACHE_DIR outside the saved directory escapes;
it is then loaded and saved as a second tree with a manifest of its own, labelled `triton` (`<label>-triton` for a
labelled cache such as the companion's `vllm-triton`), so its files never mix with the Inductor manifest and an
environment with a different TRITON_CACHE_DIR still finds them. Each tree logs its own summary line.

Not included, and logged once per call with the reason: a TRITON_CACHE_DIR that fails the same path check as
TORCHINDUCTOR_CACHE_DIR (a load writes there), or one that contains the saved directory (saving it would save the
Inductor cache twice, and whatever else lives beside it).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from .config import Settings, _checked_path
from .errors import CacheValidationError

logger = logging.getLogger(__name__)

TRITON_VARIABLE = "TRITON_CACHE_DIR"
TRITON_LABEL = "triton"
# Triton's own home (~/.triton) is where a TRITON_CACHE_DIR is most often pointed, beside the prefixes the peer
# allows for TORCHINDUCTOR_CACHE_DIR.
_EXTRA_PREFIXES = ("~/.triton",)
_LABEL_MAX = 24  # core._LABEL


@dataclass(frozen=True)
class SideTree:
    directory: Path
    label: str


def side_label(label: str | None) -> str:
    return TRITON_LABEL if label is None else f"{label}-{TRITON_LABEL}"


def is_side_label(label: str | None) -> bool:
    return label is not None and (label == TRITON_LABEL or label.endswith(f"-{TRITON_LABEL}"))


def outside_trees(main_dir: Path, label: str | None, s: Settings, environ: Mapping[str, str] | None) -> list[SideTree]:
    """The trees to load/save with `main_dir`: TRITON_CACHE_DIR's if it is set, valid and outside `main_dir`."""
    env = os.environ if environ is None else environ
    raw = env.get(TRITON_VARIABLE, "")
    if not raw or is_side_label(label):
        return []
    try:
        triton = _checked_path(env, TRITON_VARIABLE, raw, _allowed_prefixes(s))
    except CacheValidationError as exc:
        logger.info("triton cache not included: %s (a load would write there)", exc)
        return []
    main = Path(os.path.realpath(main_dir))
    if triton.is_relative_to(main):
        return []  # inside: saved and loaded with the main tree already
    if main.is_relative_to(triton):
        logger.info("triton cache not included: %s %s contains the cache directory %s", TRITON_VARIABLE, triton, main)
        return []
    name = side_label(label)
    if len(name) > _LABEL_MAX:
        logger.info("triton cache %s not included: label %r is too long for a manifest name", triton, name)
        return []
    return [SideTree(triton, name)]


def _allowed_prefixes(s: Settings) -> list[Path]:
    home_cache = Path(os.path.expanduser("~/.cache"))
    extra = [Path(os.path.expanduser(p)) for p in _EXTRA_PREFIXES]
    return [Path("/tmp"), Path("/cache"), home_cache, Path("/bdn/cache"), s.volume_root, *extra]
