"""The `cas` command as an operator runs it: a real process, store paths from flags or the library's env vars,
exit codes 0 clean / 1 problems / 2 usage or I/O error, --json for machines, no progress noise in a pipe."""
from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
import time

import pytest
import zstandard
from cas_helpers import write_tree

from cas import BlobStore, Scope, save_tree
from cas.cli import main
from cas.roots import root_path


def cas(*args: str, env_extra: dict | None = None, real: bool = False) -> subprocess.CompletedProcess:
    """Run `cas ARGS`: in a real process with `real` (what an operator sees through a pipe), else in-process
    (same code path from argv on, at a fraction of the start-up cost)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("B10FS_")}
    env.update(env_extra or {})
    if real:
        return subprocess.run([sys.executable, "-m", "cas.cli", *args], capture_output=True, text=True, env=env,
                              timeout=120)
    out, err = io.StringIO(), io.StringIO()
    saved = dict(os.environ)
    os.environ.clear()
    os.environ.update(env)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main(list(args))
            except SystemExit as exc:  # argparse usage errors
                code = exc.code
    finally:
        os.environ.clear()
        os.environ.update(saved)
    return subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())


@pytest.fixture
def world(tmp_path):
    store = BlobStore(tmp_path / "org", freshen_after=1)
    (tmp_path / "model").mkdir()
    a = Scope(tmp_path / "model" / "a", create=True)
    b = Scope(tmp_path / "model" / "b", create=True)
    shared = {f"triton/k{i}.cubin": f"kernel {i}\n".encode() * 300 for i in range(4)}
    save_tree(write_tree(tmp_path / "ta", {**shared, "a.py": b"print('a')\n" * 50}), store, a, "gpu1")
    save_tree(write_tree(tmp_path / "tb", {**shared, "b.py": b"print('b')\n" * 50}), store, b, "gpu1")
    # Small files are stored in packs (FORMAT §2): a's pack holds the shared kernels and a.py; b's save finds the
    # kernels in a's pack (through a's root) and packs only b.py. Stored: two packs and two manifest blobs.
    ea, eb = a.read_manifest("gpu1").entries, b.read_manifest("gpu1").entries
    assert len({e.pack for e in ea.values()}) == 1 and None not in {e.pack for e in ea.values()}
    assert {eb[p].pack for p in shared} == {ea["a.py"].pack} and eb["b.py"].pack not in (None, ea["a.py"].pack)
    flags = ["--org", str(store.root), "--scope", a.root]
    return store, a, b, flags


def referenced_blob(scope: Scope, rel: str) -> str:
    """The blob the store keeps for `rel`: its pack (every file of `world` is small)."""
    return scope.read_manifest("gpu1").entries[rel].stored_id


def test_check_clean_store_exits_0(world):
    store, a, b, flags = world
    r = cas("check", "--read-data", *flags, real=True)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "no problems" in r.stdout
    assert r.stderr == ""  # stderr is a pipe: no progress
    doc = json.loads(cas("check", "--json", *flags).stdout)
    assert doc["problems"] == [] and doc["roots_live"] == 2 and doc["referenced_blobs"] == 4


def test_check_finds_a_missing_blob(world):
    store, a, b, flags = world
    blob = referenced_blob(b, "b.py")  # of the *other* deployment: found through its root
    os.unlink(store.blob_path(blob))
    r = cas("check", "--json", *flags)
    assert r.returncode == 1
    kinds = {(p["kind"], p["path"]) for p in json.loads(r.stdout)["problems"]}
    assert ("missing-blob", store.blob_path(blob)) in kinds


def test_check_read_data_finds_a_corrupt_blob_and_leaves_it_in_place(world):
    store, a, b, flags = world
    blob = referenced_blob(a, "a.py")  # a's pack
    data = store.get_bytes(blob, 1 << 20).replace(b"print('a')", b"print('A')")  # same size, other content:
    with open(store.blob_path(blob), "wb") as fh:  # only re-hashing can tell
        fh.write(zstandard.ZstdCompressor(write_content_size=True).compress(data))
    assert cas("check", *flags).returncode == 0  # structure alone is intact
    r = cas("check", "--read-data", "--json", *flags)
    assert r.returncode == 1
    problems = json.loads(r.stdout)["problems"]
    assert [p["kind"] for p in problems] == ["corrupt-blob"] and blob in problems[0]["path"]
    assert os.path.exists(store.blob_path(blob))  # check never changes the store


def test_check_finds_a_stray_temp_file_but_not_a_young_one(world):
    store, a, b, flags = world
    young = os.path.join(store.root, "blobs", "00", ".tmp-host-1-00000000000000aa")
    os.makedirs(os.path.dirname(young), exist_ok=True)  # fan-out directories are made by the first write
    open(young, "wb").close()
    assert cas("check", *flags).returncode == 0  # a live writer's temp file is no problem
    stray = os.path.join(store.root, "blobs", "7f", ".tmp-host-1-00000000000000bb")
    os.makedirs(os.path.dirname(stray), exist_ok=True)
    open(stray, "wb").close()
    old = time.time() - 2 * 3600
    os.utime(stray, (old, old))
    r = cas("check", *flags)
    assert r.returncode == 1
    assert f"stray-temp: {stray}" in r.stdout
    assert young not in r.stdout


def test_check_subsets_partition_the_blobs(world):
    store, a, b, flags = world
    total = json.loads(cas("check", "--read-data", "--json", *flags).stdout)["blobs_read"]
    parts = [json.loads(cas("check", "--read-data", "--subset", f"{n}/3", "--json", *flags).stdout)["blobs_read"]
             for n in (1, 2, 3)]
    assert sum(parts) == total == 4  # a's pack (shared kernels + a.py), b's pack (b.py) + 2 manifest blobs
    assert cas("check", "--read-data", "--subset", "4/3", *flags).returncode == 2


def test_usage_and_io_errors_exit_2(world, tmp_path):
    store, a, b, flags = world
    assert cas("check", "--subset", "1/2", *flags).returncode == 2  # --subset needs --read-data
    assert cas("frobnicate", *flags, real=True).returncode == 2
    assert cas("gc", "--grace", "fast", *flags).returncode == 2
    r = cas("gc", "--grace", "1s", *flags)  # shorter than 2 x freshen_after
    assert r.returncode == 2 and "freshen_after" in r.stderr
    r = cas("check", "--org", str(tmp_path / "nowhere" / "org"), real=True)
    assert r.returncode == 2 and "StoreUnavailable" in r.stderr
    assert cas("ls", "no-such-key", *flags).returncode == 2


def test_store_paths_come_from_the_library_env_vars(world):
    store, a, b, flags = world
    env = {"B10FS_ORG_CACHE_DIR": store.root, "B10FS_CACHE_DIR": a.root}
    r = cas("ls", "gpu1", env_extra=env, real=True)
    assert r.returncode == 0, r.stderr
    assert "a.py" in r.stdout and "b.py" not in r.stdout
    roots = json.loads(cas("ls", "--json", env_extra=env).stdout)["roots"]
    assert {(x["scope_id"], x["env_key"]) for x in roots} == {(a.scope_id, "gpu1"), (b.scope_id, "gpu1")}
    other = json.loads(cas("ls", f"{b.scope_id}/gpu1", "--json", env_extra=env).stdout)
    assert {e["path"] for e in other["entries"]} >= {"b.py", "triton/k0.cubin"}


def test_stats_reports_dedup_and_per_deployment_usage(world):
    store, a, b, flags = world
    orphan = store.put_bytes(b"orphan" * 100)
    r = cas("stats", "--json", *flags)
    assert r.returncode == 0
    st = json.loads(r.stdout)
    assert st["roots_live"] == 2 and st["unreferenced_blobs"] == 1
    assert st["dedup_ratio"] > 1.5  # the 4 shared kernels are stored once for two deployments
    assert st["logical_raw_bytes"] == sum(x["raw_bytes"] for x in st["roots"])
    assert {x["entries"] for x in st["roots"]} == {5}
    assert all(0 < x["exclusive_bytes"] < x["stored_bytes"] for x in st["roots"])
    text = cas("du", *flags).stdout
    assert a.scope_id in text and b.scope_id in text
    assert orphan


def test_stats_sums_raw_bytes_per_top_level_directory(world, tmp_path):
    """A deployment's Dynamo entries (dynamo/<key>/entry, large) show as their own directory, per root and in
    all; a manifest with more top-level names than limits.MAX_STATS_AREAS is summed into a bounded map (names
    past the limit, in path order, go to OTHER_AREA)."""
    from cas import limits
    from cas.refs import OTHER_AREA, TOP_LEVEL_FILES

    store, a, b, flags = world
    c = Scope(tmp_path / "model" / "c", create=True)
    many = {f"zz{i:02d}/f": b"x" * (i + 1) for i in range(limits.MAX_STATS_AREAS + 8)}
    save_tree(write_tree(tmp_path / "tc", {"dynamo/k1/entry": b"e" * 5000, "triton/k.cubin": b"t" * 700, **many}),
              store, c, "gpu1")
    st = json.loads(cas("stats", "--json", *flags).stdout)
    by_scope = {r["scope_id"]: r for r in st["roots"]}
    assert by_scope[a.scope_id]["areas"] == {"triton": 4 * len(b"kernel 0\n") * 300,
                                             TOP_LEVEL_FILES: len(b"print('a')\n") * 50}
    mine = by_scope[c.scope_id]["areas"]
    assert mine["dynamo"] == 5000 and mine["triton"] == 700
    assert len(mine) == limits.MAX_STATS_AREAS + 1 and OTHER_AREA in mine
    assert sum(mine.values()) == by_scope[c.scope_id]["raw_bytes"]
    assert st["areas"]["dynamo"] == 5000 and sum(st["areas"].values()) == st["logical_raw_bytes"]
    text = cas("stats", *flags).stdout
    assert "raw by dir:" in text and "dynamo/" in text


def test_gc_command_prints_what_it_did(world):
    store, a, b, flags = world
    orphan = store.put_bytes(b"orphan" * 100)
    old = time.time() - 3600
    for blob in store.iter_blobs():
        os.utime(blob.path, (old, old))
    os.utime(root_path(store, b.scope_id, "gpu1"), (old - 40 * 86400, old - 40 * 86400))

    r = cas("gc", "--grace", "2s", "--dry-run", *flags)
    assert r.returncode == 0, r.stderr
    assert "would be trashed" in r.stdout and "1 dead would be removed" in r.stdout
    assert os.path.exists(store.blob_path(orphan))

    r = cas("gc", "--grace", "2s", "--json", *flags)
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert res["collected"] and res["roots_live"] == 1 and res["roots_dead"] == 1
    assert res["blobs_trashed"] == 3  # orphan, b's pack (b.py) and b's manifest blob; a's pack stays for a
    assert os.path.exists(store.trash_path(orphan))
    assert cas("check", *flags).returncode == 0


def test_gc_command_exits_1_when_a_root_is_unreadable(world):
    store, a, b, flags = world
    with open(root_path(store, b.scope_id, "gpu1"), "wb") as fh:
        fh.write(b"\x00garbage")
    r = cas("gc", "--grace", "2s", *flags)
    assert r.returncode == 1
    assert "unreadable root" in r.stdout and "nothing was deleted" in r.stdout


def test_check_reports_a_local_manifest_gc_cannot_see(world):
    store, a, b, flags = world
    os.unlink(root_path(store, a.scope_id, "gpu1"))  # as if gc removed it, or a save died before writing it
    assert cas("check", *flags).returncode == 0  # a young manifest may be a save between manifest and root
    old = time.time() - 3600
    os.utime(a.manifest_path("gpu1"), (old, old))
    r = cas("check", "--json", *flags)
    assert r.returncode == 1
    (problem,) = json.loads(r.stdout)["problems"]
    assert problem["kind"] == "unrooted-manifest" and problem["path"] == a.manifest_path("gpu1")


@pytest.mark.parametrize("args", [
    ["gc", "--max-size", "9" * 400],
    ["gc", "--max-size", "1" + "0" * 30 + "T"],
    ["gc", "--grace", "9" * 400],
    ["gc", "--grace", "1e9"],
    ["gc", "--wait", "9" * 400 + "d"],
    ["check", "--root-ttl", "9" * 400],
    ["stats", "--root-ttl", "nan"],
    ["check", "--read-data", "--subset", "1/" + "9" * 400],
])
def test_absurd_numeric_arguments_are_usage_errors_not_tracebacks(world, args):
    """issue 12: `cas gc --max-size` with a 400-digit number ended in a traceback (float overflow)."""
    store, a, b, flags = world
    r = cas(*args, *flags, real=True)
    assert r.returncode == 2, r.stdout + r.stderr
    assert "Traceback" not in r.stderr and ("usage" in r.stderr or "subset" in r.stderr)


def test_cli_defaults_agree_with_the_library(tmp_path):
    """The command's defaults are the library's: the timing constants (cas/timing.py, as collect and check take them)
    and the store and scope b10_transfer's settings pick for the same environment (org mount present or not)."""
    import inspect

    from b10_transfer.config import read_settings
    from cas import timing
    from cas.check import check
    from cas.cli import build_parser, default_org, default_scope
    from cas.gc import collect

    gc_args = build_parser().parse_args(["gc"])
    sig = inspect.signature(collect).parameters
    assert gc_args.grace == timing.DEFAULT_GRACE == sig["grace"].default
    assert gc_args.root_ttl == timing.DEFAULT_ROOT_TTL == sig["root_ttl"].default
    assert gc_args.wait == timing.DEFAULT_LOCK_WAIT == sig["lock_wait"].default
    assert build_parser().parse_args(["check"]).root_ttl == inspect.signature(check).parameters["root_ttl"].default
    volume = tmp_path / "cache"
    (volume / "model").mkdir(parents=True)
    for org_mounted in (False, True):
        if org_mounted:
            (volume / "org").mkdir()
        env = {"B10FS_VOLUME_ROOT": str(volume)}
        settings = read_settings(env)
        assert default_org(env) == str(settings.store_root())
        assert default_scope(env) == str(settings.b10fs_cache_dir)
