"""Opt-in Dynamo-level warm start: replicas that skip Dynamo's tracing as well as Inductor's compiling.

    B10_TRANSFER_PRECOMPILE=1                  # off by default
    model = b10_transfer.compile(model, mode="max-autotune-no-cudagraphs")   # instead of torch.compile

With a hot Inductor cache a replica still runs Dynamo over the whole model and looks up every graph. torch's
`caching_precompile` also stores Dynamo's result (`<TORCHINDUCTOR_CACHE_DIR>/dynamo/<key>/entry`, which bundles the
compiled graphs): a replica that finds it traces nothing. torch ships it unsafe for a model server: it drops
identity guards and keys an entry by the entry function's qualname and first line, not by the model. This module
makes it safe enough to turn on:

- The compiled entry is the `forward` of a small wrapper module made per call, whose qualname carries a
  fingerprint of the model (see `fingerprint`) plus the user's version string, so torch's key, and the entry's
  path, change whenever the model's code, configuration, structure or torch.compile arguments change.
- `caching_precompile` is on only while this module's compiled model compiles or runs (and while it saves): other
  `torch.compile` calls of the process keep their guards and never write entries.
- An entry is loaded only if it is good (below); anything else is a normal compile from the hot Inductor cache,
  with a log line saying why. torch's own checks (versions, source lines of inlined functions) still apply.
  Anything that raises through the mode at run time moves the model, once and for good, to a wrapper compiled
  without the entry, then to plain torch.compile, and runs the call again (log line `precompile: ... failed`).
- `save_compile_cache()` writes this process's entries before saving, and only good ones: a process that
  compiled from a hit-filled Inductor cache produces an entry without backends on CUDA, which is never written, so
  it can never replace a good entry in the manifest. `B10_TRANSFER_PRECOMPILE=seed` avoids that for a deployment
  whose Inductor cache is already hot: a miss compiles without the FX-graph cache, so its entry can be written.

A *good* entry: it unpickles; no code entry is bypassed; every backend its codes name is in the entry; it has at
least one backend and one compiled code; and (checked when written) every Dynamo-made global its compiled code
loads is one torch reinstalls (modules are added to the entry's import_sources; see `_record_module_globals`). A
bad one would make its readers recompile (slower than a hot Inductor cache) or fail.

Refused (plain torch.compile, one log line): torch older than 2.11 or without the private APIs used here;
`backend` other than the default inductor; anything but an nn.Module; a model whose classes' source cannot be read
(nothing to fingerprint).
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import inspect
import itertools
import json
import logging
import os
import pickle
import re
import sys
import threading
import types
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

logger = logging.getLogger("b10_transfer")

ENV_VAR = "B10_TRANSFER_PRECOMPILE"
VERSION_ENV_VAR = "B10_TRANSFER_PRECOMPILE_VERSION"
MIN_TORCH = (2, 11)
# Bumped when the fingerprint's recipe changes, so old entries are simply not found.
_RECIPE = "b10-precompile-1"
_FP_HEX = 20
_ENTRY = "entry"
_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")


class Refused(Exception):
    """The mode cannot be used safely for this model or torch; the caller compiles normally."""


@dataclasses.dataclass
class _Compiled:
    """One model compiled in the mode: what save needs to write (only) its entry."""

    name: str  # the model's class, for log lines
    fingerprint: str
    key: str  # torch's key: dynamo/<key>/entry
    loaded_codes: int = -1  # guarded codes of the entry loaded at compile time; -1: none loaded
    cold: bool = False  # seed: compile this model's frames without FX-graph cache lookups


_compiled: dict[str, _Compiled] = {}
_flag_lock = threading.Lock()
_flag_depth = 0
_flag_prior: bool | None = None


def enabled(environ: Mapping[str, str] | None = None) -> bool:
    """True if B10_TRANSFER_PRECOMPILE is 1/true or seed (read at every call, like the other settings)."""
    return _setting(environ) in ("1", "true", "yes", "on", "seed")


def seeding(environ: Mapping[str, str] | None = None) -> bool:
    """B10_TRANSFER_PRECOMPILE=seed: on a miss, compile without Inductor's FX-graph cache, so that this replica
    writes a good entry even where the Inductor cache is hot (an existing deployment). Costs one cold compile."""
    return _setting(environ) == "seed"


def _setting(environ: Mapping[str, str] | None) -> str:
    return (os.environ if environ is None else environ).get(ENV_VAR, "").strip().lower()


def compile(model: Any, *, version: str | None = None, **torch_compile_kwargs: Any) -> Any:
    """`torch.compile(model, **torch_compile_kwargs)`, with a Dynamo-level warm start when B10_TRANSFER_PRECOMPILE=1.

    `version` (or B10_TRANSFER_PRECOMPILE_VERSION) is mixed into the fingerprint: change it whenever something the
    fingerprint cannot see changes what the model computes (globals, environment variables read in forward).
    Call it after `load_compile_cache()` (the entry is looked up here) and with the model in its serving state
    (eval(), dtype, device). Never raises for the mode's sake: a refusal compiles normally.
    """
    import torch

    if not enabled():
        return torch.compile(model, **torch_compile_kwargs)
    try:
        _require_supported_torch()
        _require_supported_kwargs(torch_compile_kwargs)
        if not isinstance(model, torch.nn.Module):
            raise Refused(f"only an nn.Module can be fingerprinted, got {type(model).__name__}")
        user_version = version if version is not None else os.environ.get(VERSION_ENV_VAR, "")
        fp = fingerprint(model, user_version, torch_compile_kwargs)
    except Refused as exc:
        logger.info("precompile: off for %s: %s; compiling normally", type(model).__name__, exc)
        return torch.compile(model, **torch_compile_kwargs)
    except Exception as exc:  # noqa: BLE001 - the boundary: a user's model or config we could not read
        logger.warning("precompile: off for %s: fingerprint failed (%s: %s); compiling normally",
                       type(model).__name__, type(exc).__name__, exc)
        return torch.compile(model, **torch_compile_kwargs)
    record = _Compiled(type(model).__name__, fp, "")
    try:
        compiled = _compile_wrapper(model, record, torch_compile_kwargs, use_entry=True)
    except Exception as exc:  # noqa: BLE001 - torch internals the mode relies on; the model must still compile
        logger.warning("precompile: off for %s: %s: %s; compiling normally", record.name, type(exc).__name__, exc)
        return torch.compile(model, **torch_compile_kwargs)
    key = record.key

    def without_entry() -> tuple[Any, bool]:  # a fresh wrapper compiled normally, still in the mode
        record.loaded_codes = -1
        return _compile_wrapper(model, record, torch_compile_kwargs, use_entry=False), True

    def without_mode() -> tuple[Any, bool]:  # plain torch.compile: nothing of this model is saved
        _compiled.pop(key, None)
        return torch.compile(model, **torch_compile_kwargs), False

    fallbacks = [("the loaded entry", without_entry), ("the mode", without_mode)]
    if record.loaded_codes >= 0:
        _skip_installed_names(compiled)
    else:
        fallbacks.pop(0)
        record.cold = seeding()
    _scope_flag_to_calls(compiled, record, fallbacks)
    _compiled[key] = record
    state = "hit" if record.loaded_codes >= 0 else "miss (compiles, and save_compile_cache() records the entry)"
    if record.cold:
        state = "miss, seeding: compiles without FX-graph cache hits, so that its entry can be saved"
    logger.info("precompile: %s fingerprint %s entry dynamo/%s: %s", record.name, fp, key[:16], state)
    return compiled


# --------------------------------------------------------------------------------------------------------------
# support checks


def unsupported_reason() -> str | None:
    """Why this torch cannot run the mode safely, or None."""
    try:
        _require_supported_torch()
    except Refused as exc:
        return str(exc)
    return None


def _require_supported_torch() -> None:
    import torch

    version = _torch_version(torch.__version__)
    if version < MIN_TORCH:
        raise Refused(f"torch {torch.__version__} is older than {'.'.join(map(str, MIN_TORCH))} (not verified)")
    try:
        from torch._dynamo import config as dynamo_config
        from torch._dynamo.package import CompilePackage, DynamoCache
        from torch._dynamo.precompile_context import PrecompileContext
    except ImportError as exc:
        raise Refused(f"torch {torch.__version__} lacks the precompile API ({exc})") from None
    missing = [name for name, ok in (
        ("caching_precompile", "caching_precompile" in dynamo_config.get_config_copy()),
        ("CompilePackage.source_id_from_fn", hasattr(CompilePackage, "source_id_from_fn")),
        ("DynamoCache.load", hasattr(DynamoCache, "load")),
        ("PrecompileContext.create_cache_entries", hasattr(PrecompileContext, "create_cache_entries")),
    ) if not ok]
    if missing:
        raise Refused(f"torch {torch.__version__} lacks {', '.join(missing)}")


def _torch_version(text: str) -> tuple[int, int]:
    match = re.match(r"(\d+)\.(\d+)", text)
    return (int(match.group(1)), int(match.group(2))) if match else (0, 0)


def _require_supported_kwargs(kwargs: Mapping[str, Any]) -> None:
    backend = kwargs.get("backend", "inductor")
    if backend != "inductor":
        # Only Inductor's bundled AOTAutograd artifacts are verified to serialize into an entry.
        raise Refused(f"backend {backend!r} is not supported (only the default 'inductor')")


# --------------------------------------------------------------------------------------------------------------
# fingerprint


def fingerprint(model: Any, version: str = "", compile_kwargs: Mapping[str, Any] | None = None) -> str:
    """Hex digest of what decides the compiled code, apart from the environment key (GPU, CUDA, torch, triton).

    The source file of every class of every submodule (its whole MRO outside torch and builtins: module-level
    helpers in the same file count too); per submodule its path, class, training flag and plain attributes
    (numbers, strings, dtypes, tuples of them); each parameter's and buffer's name, shape, dtype and device type
    (not values: they are graph inputs); the model's `config` if present; the torch.compile arguments; `version`.
    Raises Refused if a class's source cannot be read.
    """
    h = hashlib.sha256()

    def add(*parts: object) -> None:
        for part in parts:
            h.update(str(part).encode())
            h.update(b"\0")

    add(_RECIPE, version, _stable(dict(compile_kwargs or {})))
    classes: dict[type, None] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        add("module", name, _qualname(type(module)), module.training, _stable(_plain_attributes(module)))
        for cls in type(module).__mro__:
            classes.setdefault(cls, None)
    for name, tensor in [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]:
        add("tensor", name, tuple(tensor.shape), tensor.dtype, tensor.device.type, tensor.requires_grad)
    for path in sorted({_source_file(cls) for cls in classes if _fingerprinted(cls)}):
        add("source", os.path.basename(path), _file_digest(path))
    config = getattr(model, "config", None)
    if config is not None:
        add("config", _config_text(config))
    return h.hexdigest()[:_FP_HEX]


def _qualname(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _fingerprinted(cls: type) -> bool:
    # torch's own classes change only with torch, which is in the environment key; builtins have no source.
    module = cls.__module__ or ""
    return module != "builtins" and module != "torch" and not module.startswith("torch.")


def _source_file(cls: type) -> str:
    try:
        path = inspect.getsourcefile(cls)
    except (TypeError, OSError) as exc:
        raise Refused(f"no source for class {_qualname(cls)} ({exc})") from None
    if not path or not os.path.isfile(path):
        raise Refused(f"no source file for class {_qualname(cls)}")
    return path


_file_digests: dict[str, str] = {}


def _file_digest(path: str) -> str:
    if path not in _file_digests:
        try:
            with open(path, "rb") as f:
                _file_digests[path] = hashlib.sha256(f.read()).hexdigest()
        except OSError as exc:
            raise Refused(f"cannot read {path}: {exc}") from None
    return _file_digests[path]


def _plain_attributes(module: Any) -> dict[str, Any]:
    """The module's own attributes that are plain values (nn.Module keeps tensors and children elsewhere)."""
    return {k: v for k, v in vars(module).items() if not k.startswith("_") and _is_plain(v)}


def _is_plain(value: Any, depth: int = 0) -> bool:
    import torch

    if value is None or isinstance(value, (bool, int, float, str, bytes, enum.Enum, torch.dtype, torch.device)):
        return True
    if isinstance(value, (tuple, list, frozenset, set)) and depth < 3:
        return all(_is_plain(v, depth + 1) for v in value)
    if isinstance(value, dict) and depth < 3:
        return all(isinstance(k, str) and _is_plain(v, depth + 1) for k, v in value.items())
    return False


def _config_text(config: Any) -> str:
    to_dict = getattr(config, "to_dict", None)
    if callable(to_dict):
        data = to_dict()
    elif dataclasses.is_dataclass(config) and not isinstance(config, type):
        data = dataclasses.asdict(config)
    elif hasattr(config, "__dict__"):
        data = dict(vars(config))
    else:
        data = config
    # transformers keeps e.g. the attention implementation outside to_dict(): add the instance's own fields too.
    extra = {k: v for k, v in getattr(config, "__dict__", {}).items() if _is_plain(v)}
    return _stable({"config": data, "fields": extra, "type": _qualname(type(config))})


def _stable(value: Any) -> str:
    """A text of `value` that is the same in every process (no object addresses)."""

    def default(obj: Any) -> str:
        if isinstance(obj, (set, frozenset)):
            return repr(sorted(map(repr, obj)))
        if callable(obj) and hasattr(obj, "__qualname__"):
            return f"{getattr(obj, '__module__', '')}.{obj.__qualname__}"
        return _ADDRESS.sub("", repr(obj))

    return json.dumps(value, sort_keys=True, default=default)


# --------------------------------------------------------------------------------------------------------------
# the wrapper whose forward is the compiled entry


def _wrapper_forward(self, *args: Any, **kwargs: Any) -> Any:
    return self.inner(*args, **kwargs)


def _make_wrapper(model: Any, fp: str) -> Any:
    """A module holding `model` whose forward has a qualname (so torch's key) carrying the fingerprint.

    A fresh class and code object per call: two models compiled in one process never share Dynamo's per-code
    cache (whose identity guards the mode drops). The entry is not the model's own, possibly decorated, forward
    (transformers' decorators make Dynamo retrace on 2.11 and fail on 2.13)."""
    import torch

    name = f"B10Precompiled_{fp}"
    code = _wrapper_forward.__code__
    code = code.replace(co_name="forward")
    if hasattr(code, "co_qualname"):  # Python 3.11+: Dynamo's key reads the code's own qualname
        code = code.replace(co_qualname=f"{name}.forward")  # type: ignore[call-arg]  # 3.11+, checked above
    forward = types.FunctionType(code, _wrapper_forward.__globals__, "forward")
    forward.__qualname__ = f"{name}.forward"
    forward.__module__ = __name__

    def init(self, inner: Any) -> None:
        torch.nn.Module.__init__(self)
        self.inner = inner

    cls = type(name, (torch.nn.Module,), {"__init__": init, "forward": forward, "__module__": __name__})
    cls.__qualname__ = name
    # torch pickles the guards' state, which names this class: it must be importable here, by the same name, in
    # the writer and in the reader (who makes it before loading the entry).
    setattr(sys.modules[__name__], name, cls)
    wrapper = cls(model)
    wrapper.train(model.training)
    return wrapper


def _compile_wrapper(model: Any, record: _Compiled, kwargs: Mapping[str, Any], *, use_entry: bool) -> Any:
    """torch.compile of a fresh wrapper of `model` with the flag on; its entry looked up only if `use_entry`."""
    import torch

    wrapper = _make_wrapper(model, record.fingerprint)
    record.key = _torch_key(wrapper)
    with _precompile_flag(), _checked_entry_load(record, use_entry):
        return torch.compile(wrapper, **kwargs)


def _torch_key(wrapper: Any) -> str:
    from torch._dynamo.package import CompilePackage

    return CompilePackage.source_id_from_fn(wrapper.forward)


# --------------------------------------------------------------------------------------------------------------
# caching_precompile, on only for our models


@contextmanager
def _precompile_flag() -> Iterator[None]:
    """caching_precompile on for the duration; nested and thread-safe for callers of this module."""
    global _flag_depth, _flag_prior
    from torch._dynamo import config as dynamo_config

    with _flag_lock:
        if _flag_depth == 0:
            _flag_prior = dynamo_config.caching_precompile
            dynamo_config.caching_precompile = True
        _flag_depth += 1
    try:
        yield
    finally:
        with _flag_lock:
            _flag_depth -= 1
            if _flag_depth == 0:
                dynamo_config.caching_precompile = bool(_flag_prior)


@contextmanager
def _without_fx_cache(active: bool) -> Iterator[None]:
    """Inductor skips its FX-graph cache while bundled AOTAutograd caching is on (torch 2.11-2.13): the frames
    compile cold, and their graphs, never loaded from that cache, serialize into the entry (a graph loaded from it
    cannot: "pickle should not be called with after make_launchers()" on CUDA)."""
    if not active:
        yield
        return
    from torch._functorch import config as functorch_config

    with functorch_config.patch(bundled_autograd_cache=True):
        yield


def _scope_flag_to_calls(compiled: Any, record: _Compiled,
                         fallbacks: list[tuple[str, Callable[[], tuple[Any, bool]]]]) -> None:
    """Run the compiled module's forward with the flag on: torch reads it when it compiles a frame (guards it
    drops, bundled autograd artifacts, the package it records), which happens at the first calls.

    An exception raised through it moves, for good, to the next of `fallbacks` (what failed, a maker of (compiled
    module, still in the mode)) and runs the call again there: a loaded entry torch accepted can still fail when
    run (a global it did not save: NameError), and the mode itself can fail to compile a model (guards torch
    cannot serialize). A genuine error of the model raises again from the plain torch.compile at the end."""
    state: dict[str, Any] = {"forward": compiled.forward, "in_mode": True}

    def forward(*args: Any, **kwargs: Any) -> Any:
        while True:
            try:
                if not state["in_mode"]:
                    return state["forward"](*args, **kwargs)
                with _precompile_flag(), _without_fx_cache(record.cold):
                    return state["forward"](*args, **kwargs)
            except Exception as exc:  # whatever the mode broke: compile without it, then retry
                if not fallbacks:
                    raise
                what, make = fallbacks.pop(0)
                logger.warning("precompile: %s failed for %s (entry dynamo/%s) at run time (%s: %s); compiling "
                               "without it", what, record.name, record.key[:16], type(exc).__name__, exc)
                state["module"], state["in_mode"] = make()  # keeps the new compiled module alive
                state["forward"] = state["module"].forward

    compiled.forward = forward


# --------------------------------------------------------------------------------------------------------------
# reading: only good entries


def entry_problem(entry: Any) -> str | None:
    """Why a PrecompileCacheEntry is not good (module docstring), or None if it is."""
    dynamo = getattr(entry, "dynamo", None)
    backends = getattr(entry, "backends", None)
    if dynamo is None or not isinstance(backends, dict):
        return f"not a precompile entry ({type(entry).__name__})"
    codes = list(getattr(dynamo, "codes", []))
    bypassed = [c for c in codes if getattr(c, "bypassed", False)]
    if bypassed:
        return f"{len(bypassed)} of {len(codes)} code entries bypassed (backends not serialized)"
    needed = {b for c in codes for b in getattr(c, "backend_ids", [])}
    missing = needed - set(backends)
    if missing:
        return f"{len(missing)} of {len(needed)} backends missing"
    if not backends or not any(getattr(c, "guarded_codes", None) for c in codes):
        return "no compiled code in it"
    return None


def _guarded_codes(entry: Any) -> int:
    return sum(len(getattr(c, "guarded_codes", []) or []) for c in entry.dynamo.codes)


@contextmanager
def _checked_entry_load(record: _Compiled, use_entry: bool = True) -> Iterator[None]:
    """While torch.compile looks up the entry: take it only if good; otherwise compile normally, saying why."""
    from torch._dynamo.package import DynamoCache

    original: Callable[..., Any] = DynamoCache.load

    def load(fn: Any) -> Any:
        if _torch_key_of(fn) != record.key:
            return original(fn)
        if not use_entry:
            return None
        entry = original(fn)  # None on a miss, or when torch could not read it (it logs why)
        if entry is None:
            if (Path(DynamoCache.path_prefix()) / record.key / _ENTRY).exists():
                logger.warning("precompile: %s entry dynamo/%s could not be loaded (see torch's warning); "
                               "compiling normally", record.name, record.key[:16])
            return None
        problem = entry_problem(entry)
        if problem:
            logger.warning("precompile: %s entry dynamo/%s is not good (%s); compiling normally",
                           record.name, record.key[:16], problem)
            return None
        record.loaded_codes = _guarded_codes(entry)
        return entry

    DynamoCache.load = load  # type: ignore[method-assign]  # an instance attribute shadowing the method, this call only
    try:
        yield
    finally:
        del DynamoCache.load


def _torch_key_of(fn: Any) -> str | None:
    try:
        from torch._dynamo.package import CompilePackage

        return CompilePackage.source_id_from_fn(fn)
    except (AttributeError, TypeError):
        return None


def _skip_installed_names(compiled: Any) -> None:
    """After a hit: move Dynamo's name counter past the globals the entry installed (`__compiled_fn_3`, ...).

    The names were numbered in the writer's process; this process's counter starts at 0, so the first frame it
    compiles for a new shape would install a name the entry already took ("Name '__builtins_dict___0' already
    exists in scope", torch 2.13)."""
    try:
        from torch._dynamo import bytecode_transformation as bt

        installed = compiled.dynamo_ctx._package._installed_globals
        numbers = [int(n) for names in installed.values() for name in names for n in re.findall(r"_(\d+)", name)]
        if numbers:
            start = max(next(bt._unique_id_counter), max(numbers) + 1)
            bt._unique_id_counter = itertools.count(start)
    except (AttributeError, ImportError, TypeError) as exc:
        logger.info("precompile: could not renumber Dynamo's globals (%s); a new shape may fail to compile", exc)


# --------------------------------------------------------------------------------------------------------------
# writing: before save_compile_cache() records the directory


def write_entries(cache_dir: Path) -> int:
    """Write the good entries of the models compiled in the mode into `cache_dir`/dynamo; return how many.

    Called by save before it scans the directory. An entry is written only if it is good and adds to what was
    loaded (a replica that got a hit and compiled nothing new leaves the loaded file alone, so its save uploads
    nothing). A bad entry is never written: the local file, hence the manifest's, stays as it was. Never raises.
    """
    if not _compiled or not enabled():
        return 0
    try:
        from torch._dynamo.precompile_context import PrecompileContext

        with _precompile_flag():
            entries, _ = PrecompileContext.create_cache_entries()
    except Exception as exc:  # noqa: BLE001 - torch internals; the save goes on without entries
        logger.warning("precompile: could not collect entries (%s: %s); saving the Inductor cache only",
                       type(exc).__name__, exc)
        return 0
    written = 0
    for key, record in list(_compiled.items()):
        entry = entries.get(key)
        if entry is None:
            continue  # never run, or torch dropped it (it logged why)
        problem = entry_problem(entry)
        if problem:
            logger.warning("precompile: not saving %s entry dynamo/%s: %s (this process compiled from Inductor "
                           "cache hits, which torch cannot serialize); the stored entry, if any, stays",
                           record.name, key[:16], problem)
            continue
        problem = _record_module_globals(entry)
        if problem:
            logger.warning("precompile: not saving %s entry dynamo/%s: %s; the stored entry, if any, stays",
                           record.name, key[:16], problem)
            continue
        codes = _guarded_codes(entry)
        if 0 <= record.loaded_codes and codes <= record.loaded_codes:
            continue  # the loaded entry already holds all of it
        try:
            _write_atomic(cache_dir / "dynamo" / key / _ENTRY, pickle.dumps(entry))
        except (OSError, pickle.PicklingError, TypeError, AttributeError) as exc:
            logger.warning("precompile: could not write %s entry dynamo/%s: %s", record.name, key[:16], exc)
            continue
        record.loaded_codes = codes
        written += 1
        logger.info("precompile: wrote %s entry dynamo/%s (%d compiled codes)", record.name, key[:16], codes)
    return written


def _record_module_globals(entry: Any) -> str | None:
    """Make the entry name every module its compiled bytecode loads as a Dynamo-made global; None if it does.

    Dynamo loads a module the frame's globals lack through a global it installs by id (`___module_collections_
    <id>_c0`, e.g. for transformers' ModelOutput), which torch 2.13 does not record in the entry: a reader's
    compiled code then fails with a NameError. The writer still has those globals, so they are added to the
    entry's import_sources, which the reader installs. Any other such global makes the entry unusable."""
    for code in entry.dynamo.codes:
        module = sys.modules.get(code.python_module)
        if module is None:
            return f"module {code.python_module} of a compiled frame is not imported"
        for name in _global_names(code):
            if not name.startswith("___") or name in code.import_sources:
                continue
            value = module.__dict__.get(name)
            if isinstance(value, types.ModuleType):
                code.import_sources[name] = value.__name__
            elif name not in code.backend_ids and name not in code.function_names:
                return f"its compiled code loads {name}, a global of this process that torch does not save"
    return None


def _global_names(code: Any) -> set[str]:
    """Names the compiled bytecode of one code entry (all its guarded codes, nested code objects too) loads."""
    from torch._dynamo.package import SerializedCode

    names: set[str] = set()
    stack = [SerializedCode.to_code_object(g.dynamo_code) for g in code.guarded_codes]
    while stack:
        co = stack.pop()
        names.update(co.co_names)
        stack.extend(c for c in co.co_consts if isinstance(c, types.CodeType))
    return names


def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{path.name}-{os.getpid()}")  # a transient name: a concurrent save skips it
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
