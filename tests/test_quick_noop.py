"""The no-op save check (cas/quick.py) and the per-process path resolution (b10_transfer/config.py) it relies on.

"Nothing new" must stay exact: every test here changes one thing a real save would record (or must repair) and
checks that the quick answer is "maybe" (None), so save_tree runs. Real filesystem throughout.
"""
from __future__ import annotations

import multiprocessing
import os
from pathlib import Path

import pytest
from cas_helpers import write_aged as write

from b10_transfer import save_compile_cache
from b10_transfer.config import clear_resolved_paths, read_settings
from b10_transfer.errors import CacheValidationError
from b10_transfer.status import OperationStatus
from cas import BlobStore, Scope, quick, save_tree
from cas.index import INDEX_NAME
from cas.manifest import loads
from cas.roots import root_path
from cas.tree import scan

KEY = "test-env"




FILES = {f"d{i}/sub/f{i}.py": f"kernel {i}\n".encode() * (i + 1) for i in range(12)} | {"top.bin": b"\0" * 100}


@pytest.fixture
def saved(tmp_path):
    """A local tree saved once: (src, store, scope)."""
    src = tmp_path / "src"
    write(src, FILES)
    store = BlobStore(tmp_path / "org", create=True)
    scope = Scope(tmp_path / "scope", create=True)
    res = save_tree(src, store, scope, KEY)
    assert res.new_entries == len(FILES)
    return src, store, scope


def test_nothing_new_after_a_save(saved):
    src, store, scope = saved
    assert quick.nothing_new(src, store.root, scope, KEY) == len(FILES)
    assert quick.nothing_new(src, lambda: store.root, scope, KEY) == len(FILES)  # the callable form


def test_changed_file_is_not_skipped(saved):
    src, store, scope = saved
    write(src, {"d3/sub/f3.py": b"recompiled\n"})
    assert quick.nothing_new(src, store.root, scope, KEY) is None
    res = save_tree(src, store, scope, KEY)
    assert res.new_entries == 1
    assert quick.nothing_new(src, store.root, scope, KEY) == len(FILES)


def test_same_size_rewrite_is_not_skipped(saved):
    src, store, scope = saved
    old = (src / "top.bin").read_bytes()
    write(src, {"top.bin": b"\1" * len(old)}, mtime=None)  # same size, new mtime/ctime
    assert quick.nothing_new(src, store.root, scope, KEY) is None


def test_new_file_is_not_skipped(saved):
    src, store, scope = saved
    write(src, {"new/dir/kernel.py": b"new shape\n"})
    assert quick.nothing_new(src, store.root, scope, KEY) is None


def test_mode_change_is_not_skipped(saved):
    src, store, scope = saved
    os.chmod(src / "top.bin", 0o600)
    assert quick.nothing_new(src, store.root, scope, KEY) is None


def test_deleted_local_file_is_still_nothing_new(saved):
    src, store, scope = saved
    (src / "top.bin").unlink()  # a save never removes entries: nothing to record
    assert quick.nothing_new(src, store.root, scope, KEY) == len(FILES) - 1


def test_transient_files_do_not_count(saved):
    src, store, scope = saved
    write(src, {"d1/x.lock": b"", "d1/y.tmp": b"", "locks/z": b"", ".tmp-host-1-abc": b""})
    assert quick.nothing_new(src, store.root, scope, KEY) == len(FILES)


def test_no_index_is_maybe(saved):
    src, store, scope = saved
    (src / INDEX_NAME).unlink()
    assert quick.nothing_new(src, store.root, scope, KEY) is None


def test_manifest_changed_by_another_replica_is_seen(saved, tmp_path):
    src, store, scope = saved
    assert quick.nothing_new(src, store.root, scope, KEY) == len(FILES)  # parsed manifest now kept
    other = tmp_path / "other"
    write(other, {"top.bin": b"another replica's content"})
    save_tree(other, store, scope, KEY)  # same path, other content: the manifest entry changes
    assert quick.nothing_new(src, store.root, scope, KEY) is None


def test_audit_marker_is_maybe(saved):
    src, store, scope = saved
    scope.request_audit(KEY)
    assert quick.nothing_new(src, store.root, scope, KEY) is None


def test_missing_root_is_maybe(saved):
    src, store, scope = saved
    os.unlink(root_path(store, scope.scope_id, KEY))
    assert quick.nothing_new(src, store.root, scope, KEY) is None
    save_tree(src, store, scope, KEY)  # the save repairs the root (FORMAT §3 audit)
    assert quick.nothing_new(src, store.root, scope, KEY) == len(FILES)


def test_root_naming_other_bytes_is_maybe(saved):
    src, store, scope = saved
    data = scope.read_manifest_bytes(KEY)
    m = loads(data)
    m.updated += 1
    scope.write_manifest(m.dumps(), KEY)  # same entries, other bytes: the root no longer names them
    assert quick.nothing_new(src, store.root, scope, KEY) is None


def test_garbage_root_and_manifest_are_maybe(saved):
    src, store, scope = saved
    rp = root_path(store, scope.scope_id, KEY)
    good = Path(rp).read_bytes()
    Path(rp).write_bytes(b"\xc1 not msgpack")
    assert quick.nothing_new(src, store.root, scope, KEY) is None
    Path(rp).write_bytes(good)
    Path(scope.manifest_path(KEY)).write_bytes(b"\x93garbage")
    assert quick.nothing_new(src, store.root, scope, KEY) is None


def test_missing_scope_id_is_maybe_and_not_created(saved):
    src, store, scope = saved
    sid = Path(scope.root) / "scope.id"
    sid.unlink()
    assert quick.nothing_new(src, store.root, scope, KEY) is None
    assert not sid.exists()  # the check never writes


def test_changed_scope_id_answers_only_from_a_root_that_names_this_manifest(saved):
    """The id this process last used is trusted for finding the root, not for what the root says: a root under it
    naming exactly this manifest's bytes proves them rooted whatever scope.id now holds; one naming anything else
    is a "maybe"; a process that used no id yet reads scope.id."""
    from cas.roots import write_root

    src, store, scope = saved
    old = scope.scope_id
    assert quick.nothing_new(src, store.root, scope, KEY) == len(FILES)  # remembers the id
    (Path(scope.root) / "scope.id").write_text("ab" * 16 + "\n")
    assert quick.nothing_new(src, store.root, scope, KEY) == len(FILES)  # the old root still names this manifest
    write_root(store, old, KEY, "0" * 64, scope.root)  # now it names another manifest (say a clone's)
    assert quick.nothing_new(src, store.root, scope, KEY) is None
    save_tree(src, store, Scope(scope.root), KEY)  # audits and writes the root under the new id
    assert os.path.exists(root_path(store, "ab" * 16, KEY))
    quick.remember_scope_id(scope.root, "ab" * 16)  # as b10_transfer does after every load and save
    assert quick.nothing_new(src, store.root, scope, KEY) == len(FILES)
    quick._last_scope_id.clear()  # a fresh process
    assert quick.nothing_new(src, store.root, scope, KEY) == len(FILES)
    assert quick.remembered_scope_id(scope.root) == "ab" * 16


def test_no_store_no_scope_is_maybe(tmp_path):
    src = tmp_path / "src"
    write(src, FILES)
    assert quick.nothing_new(src, tmp_path / "nostore", Scope(tmp_path / "noscope"), KEY) is None
    assert quick.nothing_new(tmp_path / "nosrc", tmp_path / "nostore", Scope(tmp_path / "noscope"), KEY) is None


def test_local_walk_takes_what_scan_takes(tmp_path):
    """_local_entries and tree.scan agree on which files a save takes: transient names, symlinks, nested dirs."""
    src = tmp_path / "src"
    write(src, FILES | {"a/b/c/d/deep.py": b"deep", "a/x.lock": b"", "a/y.tmp": b"", "locks/l": b"",
                        "a/.tmp-h-1-0": b"", "weird name with spaces.txt": b"ok", "a/back\\slash": b"bad"})
    os.symlink(src / "top.bin", src / "a" / "link_to_file")
    os.symlink(src / "d1", src / "link_to_dir")
    os.symlink("/etc", src / "a" / "outside")
    save_tree(src, BlobStore(tmp_path / "org", create=True), Scope(tmp_path / "scope", create=True), KEY)
    entries = quick._local_entries(str(src))
    assert entries is not None
    taken = {f.rel: f for f in scan(src)}
    assert set(entries) == set(taken)
    for rel, e in entries.items():
        assert (e.size, e.mode) == (taken[rel].size, taken[rel].mode)


def test_read_limits(tmp_path):
    from cas.posix import PosixBackend

    b = PosixBackend(tmp_path)
    (tmp_path / "f").write_bytes(b"x" * 100)
    assert quick._read(b, "f", 100) == b"x" * 100
    assert quick._read(b, "f", 99) is None
    (tmp_path / "d").mkdir()
    assert quick._read(b, "d", 100) is None  # a directory
    assert quick._read(b, "absent", 100) is None
    os.symlink(tmp_path / "f", tmp_path / "link")
    assert quick._read(b, "link", 100) is None  # never followed
    os.mkfifo(tmp_path / "fifo")
    assert quick._read(b, "fifo", 100) is None  # never blocks
    big = tmp_path / "big"
    big.write_bytes(os.urandom(3 * (1 << 20) + 5))
    assert quick._read(b, "big", 1 << 30) == big.read_bytes()
    assert quick._read(b, "big", 3 * (1 << 20) + 4) is None


def _child_check(args, out):
    src, store, scope_root = args
    out.put(quick.nothing_new(src, store, Scope(scope_root), KEY))


def test_works_in_a_forked_child(saved):
    """The pool is kept per process: a child forked after a call must not wait on its parent's threads."""
    src, store, scope = saved
    assert quick.nothing_new(src, store.root, scope, KEY) == len(FILES)
    ctx = multiprocessing.get_context("fork")
    out = ctx.Queue()
    child = ctx.Process(target=_child_check, args=((str(src), store.root, scope.root), out))
    child.start()
    child.join(30)
    assert child.exitcode == 0, "child hung or failed"
    assert out.get(timeout=5) == len(FILES)


# -- through b10_transfer ----------------------------------------------------------------------------------------------
def test_save_compile_cache_noop_then_change(b10_env):
    write(b10_env.local, FILES)
    assert save_compile_cache() is OperationStatus.SUCCESS
    assert save_compile_cache() is OperationStatus.SKIPPED
    write(b10_env.local, {"d2/sub/f2.py": b"changed kernel\n"})
    assert save_compile_cache() is OperationStatus.SUCCESS  # not skipped
    m = Scope(b10_env.scope).read_manifest(_key())
    assert m.entries["d2/sub/f2.py"].size == len(b"changed kernel\n")
    assert save_compile_cache() is OperationStatus.SKIPPED


def _key() -> str:
    from b10_transfer.core import key_for

    return key_for()


def test_env_var_change_between_calls_is_honoured(b10_env, monkeypatch, tmp_path):
    """The resolved paths are kept per process, keyed on the raw values: a changed variable is a new key."""
    write(b10_env.local, FILES)
    assert save_compile_cache() is OperationStatus.SUCCESS
    assert save_compile_cache() is OperationStatus.SKIPPED
    other_scope = b10_env.volume / "model" / "other_deployment"
    monkeypatch.setenv("B10FS_CACHE_DIR", str(other_scope))
    assert save_compile_cache() is OperationStatus.SUCCESS  # a new scope: recorded there, not skipped
    assert Scope(other_scope).read_manifest(_key()) is not None
    other_local = tmp_path / "other_local"
    write(other_local, {"x/y.py": b"other tree"})
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(other_local))
    assert save_compile_cache() is OperationStatus.SUCCESS
    assert "x/y.py" in Scope(other_scope).read_manifest(_key()).entries


def test_path_checks_still_reject_after_cached_calls(b10_env, monkeypatch, tmp_path):
    write(b10_env.local, FILES)
    assert save_compile_cache() is OperationStatus.SUCCESS  # the allowed paths are now resolved and kept
    outside = tmp_path / "outside"
    outside.mkdir()
    # Not under <root>/model.
    with pytest.raises(CacheValidationError):
        read_settings({**os.environ, "B10FS_CACHE_DIR": str(b10_env.volume / "org" / "x")})
    # Under <root>/model by name, outside by a symlink.
    link = b10_env.volume / "model" / "escape"
    os.symlink(outside, link)
    with pytest.raises(CacheValidationError):
        read_settings({**os.environ, "B10FS_CACHE_DIR": str(link)})
    monkeypatch.setenv("B10FS_CACHE_DIR", str(link))
    assert save_compile_cache() is OperationStatus.ERROR
    assert not any(outside.iterdir())


def test_path_created_as_symlink_after_first_call_is_checked(b10_env, tmp_path):
    """A path that did not exist when first resolved is not kept: created later as a symlink leading outside, it is
    seen and refused."""
    later = b10_env.volume / "model" / "later"
    env = {**os.environ, "B10FS_CACHE_DIR": str(later)}
    assert read_settings(env).b10fs_cache_dir == later.resolve()
    outside = tmp_path / "outside"
    outside.mkdir()
    os.symlink(outside, later)
    with pytest.raises(CacheValidationError):
        read_settings(env)


def test_changed_home_is_a_new_key(b10_env, monkeypatch, tmp_path):
    home = tmp_path / "home"
    (home / ".cache" / "torch").mkdir(parents=True)
    monkeypatch.setenv("HOME", str(home))
    s = read_settings({**os.environ, "TORCHINDUCTOR_CACHE_DIR": "~/.cache/torch"})
    assert s.torch_cache_dir == (home / ".cache" / "torch").resolve()
    home2 = tmp_path / "home2"
    (home2 / ".cache" / "torch").mkdir(parents=True)
    monkeypatch.setenv("HOME", str(home2))
    assert read_settings({**os.environ, "TORCHINDUCTOR_CACHE_DIR": "~/.cache/torch"}).torch_cache_dir == (
        home2 / ".cache" / "torch").resolve()


def test_clear_resolved_paths(b10_env):
    read_settings()
    clear_resolved_paths()
    assert read_settings().b10fs_cache_dir == b10_env.scope.resolve()


def test_reader_threads_are_daemons(saved):
    """A read hanging on a dead volume must not keep the process from exiting."""
    import threading

    src, store, scope = saved
    quick.nothing_new(src, store.root, scope, KEY)
    readers = [t for t in threading.enumerate() if t.name.startswith("cas-quick")]
    assert readers and all(t.daemon for t in readers)
