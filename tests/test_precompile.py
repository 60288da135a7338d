"""B10_TRANSFER_PRECOMPILE: real torch.compile on the CPU, each replica a fresh process with a fresh local directory.

Replica A compiles a tiny model on an empty stand-in volume and saves; later replicas load from (a copy of) that
volume. torch's counters decide what a replica did: `dynamo_cache` hit/miss, `stats.unique_graphs` (frames Dynamo
traced), `inductor.fxgraph_cache_*` and `aot_autograd.autograd_cache_*` (graph lookups). Outputs are compared with
eager every time.
"""

from __future__ import annotations

import json
import pickle
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from b10_transfer import core, precompile
from b10_transfer.config import read_settings
from cas import Scope
from conftest import b10_environ, child_environ

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
MAX_ABS_ERR = 1e-4  # float32 on the CPU: rounding only
RESULT = "PRECOMPILE_RESULT "

MODEL_SOURCE = '''
import collections
import dataclasses
import torch


@dataclasses.dataclass
class TinyConfig:
    hidden: int = 32
    scale: float = 1.0


class Block(torch.nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.lin = torch.nn.Linear(cfg.hidden, cfg.hidden)
        self.norm = torch.nn.LayerNorm(cfg.hidden)
        self.cfg = cfg

    def forward(self, x):
        return self.norm(ACTIVATION(self.lin(x)) * self.cfg.scale + x)


class TinyOutput(collections.OrderedDict):
    """Returned like transformers' ModelOutput (an OrderedDict): Dynamo's code that rebuilds it loads the module
    `collections` through a global torch 2.13 does not save in the entry (precompile._record_module_globals)."""

    @property
    def logits(self):
        return self["logits"]


class Tiny(torch.nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.config = cfg
        self.blocks = torch.nn.ModuleList([Block(cfg) for _ in range(2)])
        self.head = torch.nn.Linear(cfg.hidden, 8)

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return TinyOutput(logits=self.head(x))
'''

REPLICA = '''
import json, logging, os, pickle, sys
logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
logging.getLogger("torch").setLevel(logging.ERROR)  # the mode drops guards by design: one warning each
spec = json.loads(sys.argv[1])
sys.path.insert(0, spec["model_dir"])
import torch
import tinymodel
import b10_transfer
from torch._dynamo.utils import counters

torch.manual_seed(0)
model = tinymodel.Tiny(tinymodel.TinyConfig(scale=spec["scale"])).eval()
out = {"load": b10_transfer.load_compile_cache().name}
if spec.get("corrupt_entry"):
    for root, _, names in os.walk(os.path.join(os.environ["TORCHINDUCTOR_CACHE_DIR"], "dynamo")):
        for name in names:
            path = os.path.join(root, name)
            if spec["corrupt_entry"] == "garbage":
                open(path, "wb").write(b"not a pickle")
            else:
                entry = pickle.load(open(path, "rb"))
                if spec["corrupt_entry"] == "no_backends":  # what a writer that compiled from Inductor hits leaves
                    entry.backends.clear()
                else:  # "unsaved_global": as torch 2.13 writes it, without the modules its code loads
                    for code in entry.dynamo.codes:
                        code.import_sources = {k: v for k, v in code.import_sources.items()
                                               if not k.startswith("___module_")}
                open(path, "wb").write(pickle.dumps(entry))
if spec.get("break_guard_pickling"):  # a model whose guards torch cannot serialize
    import torch._dynamo.guards as guards
    def fail(*args, **kwargs):
        raise pickle.PicklingError("planted: cannot pickle the guards")
    guards.pickle_guards_state = fail
compiled = b10_transfer.compile(model)
inputs = [torch.randn(b, 32, generator=torch.Generator().manual_seed(b)) for b in spec["batches"]]
with torch.no_grad():
    got = [compiled(x).logits for x in inputs]
    want = [model(x).logits for x in inputs]
out["max_abs_err"] = max(float((g - w).abs().max()) for g, w in zip(got, want))
if spec.get("drop_backends"):
    from torch._dynamo.precompile_context import PrecompileContext
    PrecompileContext._backend_artifacts_by_key.clear()
if spec.get("save"):
    out["save"] = b10_transfer.save_compile_cache().name
out["counters"] = {k: dict(counters[k]) for k in ("dynamo_cache", "inductor", "aot_autograd", "stats")}
out["flag_after"] = torch._dynamo.config.caching_precompile
print("''' + RESULT + '''" + json.dumps(out), flush=True)
'''


def write_model(directory: Path, activation: str = "torch.relu") -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "tinymodel.py").write_text(MODEL_SOURCE.replace("ACTIVATION", activation))
    return directory


def replica(volume: Path, local: Path, model_dir: Path, batches: list[int], *, mode: bool = True,
            save: bool = True, scale: float = 1.0, **options) -> dict:
    env = child_environ(volume, local)
    env.pop(precompile.ENV_VAR, None)
    if mode:
        env[precompile.ENV_VAR] = "seed" if options.pop("seed", False) else "1"
    env["PYTHONPATH"] = str(REPO)
    spec = dict(model_dir=str(model_dir), batches=batches, save=save, scale=scale, **options)
    proc = subprocess.run([sys.executable, "-c", REPLICA, json.dumps(spec)], env=env, cwd=str(REPO),
                          capture_output=True, text=True, timeout=300)
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT):
            result = json.loads(line[len(RESULT):])
            result["log"] = proc.stderr
            return result
    raise AssertionError(f"replica failed (exit {proc.returncode}):\n{proc.stdout}\n{proc.stderr[-6000:]}")


def traced(r: dict) -> int:
    return r["counters"]["stats"].get("unique_graphs", 0)


def graph_lookups(r: dict) -> int:
    c = r["counters"]
    return sum(c["inductor"].get(k, 0) for k in ("fxgraph_cache_hit", "fxgraph_cache_miss")) + sum(
        c["aot_autograd"].get(k, 0) for k in ("autograd_cache_hit", "autograd_cache_miss"))


def dynamo_entries(volume: Path, local: Path) -> dict:
    """The manifest's dynamo/ entries: path -> blob id."""
    s = read_settings(b10_environ(volume, local))
    manifest = Scope(s.b10fs_cache_dir).read_manifest(core.key_for())
    return {p: e.blob_id for p, e in manifest.entries.items() if p.startswith("dynamo/")}


@pytest.fixture(scope="session")
def replica_a(tmp_path_factory):
    """Replica A in the mode on an empty volume: compiles batch 2 and saves. (volume, model dir, result)."""
    root = tmp_path_factory.mktemp("precompile-a")
    volume = root / "volume"
    (volume / "model").mkdir(parents=True)
    (volume / "org").mkdir()
    model_dir = write_model(root / "model")
    a = replica(volume, root / "a" / "inductor", model_dir, [2])
    assert a["load"] == "DOES_NOT_EXIST" and a["save"] == "SUCCESS", a["log"]
    assert a["counters"]["dynamo_cache"] == {"dynamo_cache_miss": 1}, a["log"]
    assert a["max_abs_err"] < MAX_ABS_ERR
    assert "precompile: wrote Tiny entry" in a["log"], a["log"]
    assert len(dynamo_entries(volume, root / "x")) == 1
    return volume, model_dir, a


@pytest.fixture
def volume_after_a(replica_a, tmp_path) -> Path:
    copy = tmp_path / "volume"
    shutil.copytree(replica_a[0], copy)
    return copy


def test_second_replica_traces_nothing_and_matches_eager(replica_a, volume_after_a, tmp_path):
    _, model_dir, _ = replica_a
    b = replica(volume_after_a, tmp_path / "b" / "inductor", model_dir, [2])
    assert b["load"] == "SUCCESS", b["log"]
    assert b["counters"]["dynamo_cache"] == {"dynamo_cache_hit": 1}, b["log"]
    assert traced(b) == 0 and graph_lookups(b) == 0, b["counters"]
    assert b["max_abs_err"] < MAX_ABS_ERR
    assert b["save"] == "SKIPPED", b["log"]  # the loaded entry already holds everything: nothing re-uploaded
    assert b["flag_after"] is False  # the flag is on only inside our model's calls


def test_added_shape_is_merged_and_the_next_replica_traces_nothing(replica_a, volume_after_a, tmp_path):
    _, model_dir, _ = replica_a
    before = dynamo_entries(volume_after_a, tmp_path / "x")
    b = replica(volume_after_a, tmp_path / "b" / "inductor", model_dir, [2, 5])
    assert b["counters"]["dynamo_cache"] == {"dynamo_cache_hit": 1} and traced(b) >= 1, b["counters"]
    assert b["save"] == "SUCCESS" and "precompile: wrote Tiny entry" in b["log"], b["log"]
    after = dynamo_entries(volume_after_a, tmp_path / "x")
    assert after.keys() == before.keys() and after != before  # the same key, now with both shapes

    c = replica(volume_after_a, tmp_path / "c" / "inductor", model_dir, [2, 5], save=False)
    assert c["counters"]["dynamo_cache"] == {"dynamo_cache_hit": 1}, c["log"]
    assert traced(c) == 0 and graph_lookups(c) == 0, c["counters"]
    assert c["max_abs_err"] < MAX_ABS_ERR


@pytest.mark.parametrize("change", ["code", "config"])
def test_changed_model_is_not_served_the_stale_entry(replica_a, volume_after_a, tmp_path, change):
    """The changed model gets its own key (a miss, then its own compile), never A's entry; it matches its eager."""
    _, model_dir, _ = replica_a
    if change == "code":
        model_dir = write_model(tmp_path / "model", activation="torch.nn.functional.gelu")
    r = replica(volume_after_a, tmp_path / "r" / "inductor", model_dir, [2],
                scale=2.0 if change == "config" else 1.0)
    assert r["load"] == "SUCCESS", r["log"]  # A's entry is on the local disk ...
    assert r["counters"]["dynamo_cache"] == {"dynamo_cache_miss": 1}, r["log"]  # ... and not looked at
    assert traced(r) >= 1
    assert r["max_abs_err"] < MAX_ABS_ERR
    assert r["save"] == "SUCCESS"
    assert len(dynamo_entries(volume_after_a, tmp_path / "x")) == 2  # one entry per model version


@pytest.mark.parametrize("damage", ["garbage", "no_backends", "unsaved_global"])
def test_bad_entry_falls_back_to_the_hot_inductor_cache(replica_a, volume_after_a, tmp_path, damage):
    _, model_dir, _ = replica_a
    r = replica(volume_after_a, tmp_path / "r" / "inductor", model_dir, [2], corrupt_entry=damage, save=False)
    key = next(iter(dynamo_entries(volume_after_a, tmp_path / "x"))).split("/")[1][:16]
    why = {"garbage": f"Tiny entry dynamo/{key} could not be loaded",
           "no_backends": f"Tiny entry dynamo/{key} is not good",
           "unsaved_global": f"the loaded entry failed for Tiny (entry dynamo/{key}) at run time (NameError"}[damage]
    assert f"precompile: {why}" in r["log"], r["log"]
    assert traced(r) >= 1  # torch counts a read entry as a hit; it was not used: Dynamo traced the model
    assert r["counters"]["inductor"].get("fxgraph_cache_hit", 0) >= 1  # the normal hot path
    assert r["counters"]["inductor"].get("fxgraph_cache_miss", 0) == 0
    assert r["max_abs_err"] < MAX_ABS_ERR


def test_a_model_the_mode_cannot_compile_runs_on_plain_torch_compile(replica_a, volume_after_a, tmp_path):
    _, model_dir, _ = replica_a
    before = dynamo_entries(volume_after_a, tmp_path / "x")
    r = replica(volume_after_a, tmp_path / "r" / "inductor", model_dir, [2], scale=3.0, break_guard_pickling=True)
    assert "precompile: the mode failed for Tiny" in r["log"] and "planted" in r["log"], r["log"]
    assert r["max_abs_err"] < MAX_ABS_ERR
    assert r["save"] == "SUCCESS" and dynamo_entries(volume_after_a, tmp_path / "x") == before  # no entry
    assert r["flag_after"] is False


def test_writer_without_backends_never_replaces_a_good_entry(replica_a, volume_after_a, tmp_path):
    """A replica whose new entry lacks backends (as after Inductor cache hits on the GPU) does not save it."""
    _, model_dir, _ = replica_a
    before = dynamo_entries(volume_after_a, tmp_path / "x")
    r = replica(volume_after_a, tmp_path / "r" / "inductor", model_dir, [2, 5], drop_backends=True)
    assert traced(r) >= 1  # it did compile the new shape: torch has an entry to write
    assert "precompile: not saving Tiny entry" in r["log"], r["log"]
    assert dynamo_entries(volume_after_a, tmp_path / "x") == before
    assert r["max_abs_err"] < MAX_ABS_ERR


def test_seed_compiles_without_fx_cache_hits_and_saves_its_entry(replica_a, tmp_path):
    """B10_TRANSFER_PRECOMPILE=seed on a hot volume without an entry (the mode turned on for an existing
    deployment): no FX-graph lookups, so the entry is one torch can serialize on the GPU too; it is saved."""
    volume, model_dir, _ = replica_a
    hot = tmp_path / "volume"
    shutil.copytree(volume, hot)
    r0 = replica(hot, tmp_path / "r0" / "inductor", model_dir, [2], mode=False)  # a normal replica: hot files
    assert r0["counters"]["inductor"].get("fxgraph_cache_hit", 0) >= 1
    s = read_settings(b10_environ(hot, tmp_path / "x"))
    scope = Scope(s.b10fs_cache_dir)
    manifest = scope.read_manifest(core.key_for())
    for path in [p for p in manifest.entries if p.startswith("dynamo/")]:
        del manifest.entries[path]  # as before the mode was turned on
    scope.write_manifest(manifest.dumps(), core.key_for())

    r = replica(hot, tmp_path / "r" / "inductor", model_dir, [2], seed=True)
    assert "seeding" in r["log"], r["log"]
    c = r["counters"]
    assert c["dynamo_cache"] == {"dynamo_cache_miss": 1}
    assert c["inductor"].get("fxgraph_cache_hit", 0) == 0 and c["inductor"].get("fxgraph_cache_miss", 0) == 0
    assert r["save"] == "SUCCESS" and "precompile: wrote Tiny entry" in r["log"], r["log"]
    assert r["max_abs_err"] < MAX_ABS_ERR
    c2 = replica(hot, tmp_path / "c" / "inductor", model_dir, [2], save=False)
    assert c2["counters"]["dynamo_cache"] == {"dynamo_cache_hit": 1} and traced(c2) == 0


def test_mode_is_off_by_default(monkeypatch, b10_env):
    import torch

    monkeypatch.delenv(precompile.ENV_VAR, raising=False)
    model = torch.nn.Linear(4, 4)
    compiled = precompile.compile(model)
    assert compiled._orig_mod is model  # plain torch.compile: no wrapper, no flag
    assert torch._dynamo.config.caching_precompile is False
    assert precompile.write_entries(b10_env.local) == 0
    monkeypatch.setenv(precompile.ENV_VAR, "0")
    assert not precompile.enabled()


def test_fingerprint_sees_code_config_structure_kwargs_and_version():
    import torch

    def fp(model, **kw):
        return precompile.fingerprint(model, kw.pop("version", ""), kw)

    base = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    same = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    assert fp(base) == fp(same)  # weights are not in it: they are graph inputs
    assert fp(base) != fp(torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4, eps=1e-3)))
    assert fp(base) != fp(torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.LayerNorm(8)))
    assert fp(base) != fp(base.to(torch.float64))
    assert fp(base) != fp(base, mode="max-autotune")
    assert fp(base) != fp(base, version="2")


def test_refuses_what_it_cannot_fingerprint(monkeypatch, caplog):
    import torch

    monkeypatch.setenv(precompile.ENV_VAR, "1")
    namespace: dict = {"__name__": "generated_without_source"}
    exec("import torch\nclass NoSource(torch.nn.Module):\n    def forward(self, x):\n        return x + 1\n",
         namespace)
    caplog.set_level("INFO", logger="b10_transfer")
    compiled = precompile.compile(namespace["NoSource"]())
    assert type(compiled._orig_mod).__name__ == "NoSource"  # plain torch.compile
    assert "precompile: off for NoSource: no source" in caplog.text
    compiled = precompile.compile(torch.nn.Linear(2, 2), backend="eager")
    assert "backend 'eager' is not supported" in caplog.text


def test_refuses_torch_older_than_2_11(monkeypatch, caplog):
    import torch

    monkeypatch.setenv(precompile.ENV_VAR, "1")
    monkeypatch.setattr(torch, "__version__", "2.10.0+cu128")
    assert "older than 2.11" in precompile.unsupported_reason()
    caplog.set_level("INFO", logger="b10_transfer")
    model = torch.nn.Linear(2, 2)
    assert precompile.compile(model)._orig_mod is model
    assert "precompile: off for Linear: torch 2.10.0+cu128 is older than 2.11" in caplog.text
