"""Copied scopes (issue: a cloned volume gives two deployments one scope.id): the roots they would overwrite in turn
must not let gc delete blobs either one needs. The newcomer - the first of the two to save after the other did -
takes a fresh identity (FORMAT §4)."""
from __future__ import annotations

import os
import shutil
import time

from cas import BlobStore, Scope, load_tree, save_tree
from cas.gc import collect
from cas.roots import iter_roots
from cas.scope import read_scope_id

from cas_helpers import ENV_KEY, read_tree, run_worker, write_tree

FRESHEN = 1
GRACE = 2


def _age_everything(store: BlobStore, seconds: float) -> None:
    t = time.time() - seconds
    for area in ("blobs", "trash"):
        for b in store.iter_blobs(area):
            os.utime(b.path, (t, t))


def _big(tag: str) -> bytes:
    return (tag * 700_000).encode()[: 1_200_000]  # above the pack limit: a loose blob each, easy to count


def test_clone_gets_fresh_identity_and_gc_keeps_both(tmp_path):
    store = BlobStore(tmp_path / "org", freshen_after=FRESHEN)
    a_dir, b_dir = tmp_path / "a" / "scope", tmp_path / "b" / "scope"
    a_dir.parent.mkdir()
    b_dir.parent.mkdir()
    a = Scope(a_dir, create=True)
    write_tree(tmp_path / "src-a", {"common": _big("c"), "only-a": _big("a")})
    save_tree(tmp_path / "src-a", store, a, ENV_KEY)
    shutil.copytree(a_dir, b_dir)  # the cloned volume: same scope.id, same manifest
    assert read_scope_id(a_dir) == read_scope_id(b_dir)

    write_tree(tmp_path / "src-a", {"more-a": _big("m")})
    save_tree(tmp_path / "src-a", store, Scope(a_dir), ENV_KEY)  # A moves the shared root to its new manifest
    write_tree(tmp_path / "src-b", {"common": _big("c"), "only-a": _big("a"), "only-b": _big("b")})
    save_tree(tmp_path / "src-b", store, Scope(b_dir), ENV_KEY)  # B finds a root it never wrote

    assert read_scope_id(a_dir) != read_scope_id(b_dir)
    named = {(r.scope_id, r.env_key) for r in iter_roots(store) if not isinstance(r, tuple)}
    assert named == {(read_scope_id(a_dir), ENV_KEY), (read_scope_id(b_dir), ENV_KEY)}

    _age_everything(store, 3600)
    res = collect(store, grace=GRACE)
    assert not res.problems
    for scope_dir, src in ((a_dir, tmp_path / "src-a"), (b_dir, tmp_path / "src-b")):
        dst = tmp_path / ("dst-" + scope_dir.parent.name)
        out = load_tree(dst, store, Scope(scope_dir), ENV_KEY)
        assert not out.misses, out.misses
        assert read_tree(dst) == read_tree(src)


def test_own_stale_root_after_a_killed_save_keeps_identity(tmp_path):
    """A save killed between manifest and root leaves a root naming the manifest it replaced: not a copy."""
    store = BlobStore(tmp_path / "org")
    (tmp_path / "m").mkdir()
    scope_dir = tmp_path / "m" / "scope"
    scope = Scope(scope_dir, create=True)
    write_tree(tmp_path / "src", {"f1": b"one"})
    save_tree(tmp_path / "src", store, scope, ENV_KEY)
    before = read_scope_id(scope_dir)
    write_tree(tmp_path / "src", {"f2": b"two"})
    code, _, err = run_worker(["save", tmp_path / "src", "--store", tmp_path / "org", "--scope", scope_dir],
                              kill_at="manifest-renamed")
    assert code == -9, err
    write_tree(tmp_path / "src", {"f3": b"three"})
    save_tree(tmp_path / "src", store, Scope(scope_dir), ENV_KEY)
    assert read_scope_id(scope_dir) == before
    out = load_tree(tmp_path / "dst", store, Scope(scope_dir), ENV_KEY)
    assert not out.misses and read_tree(tmp_path / "dst") == read_tree(tmp_path / "src")
