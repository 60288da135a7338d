"""Merging saves into one manifest (FORMAT §3 "Merge"): union, idempotent, concurrent saves lose nothing, the newer
save wins a conflict, and a save with nothing new writes nothing on the volume."""
from __future__ import annotations

import os
import threading

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cas import Entry, Manifest, load_tree, save_tree
from cas import _faults
from cas.manifest import loads

from cas_helpers import ENV_KEY, expected_entries, manifest_entries, open_store, read_tree, snapshot, write_tree

paths = st.sampled_from([f"p{i}" for i in range(12)] + ["d/a", "d/b", "d/e/f", "é/ü", "x y"])
entries_st = st.builds(
    Entry,
    blob_id=st.sampled_from(["%02x" % i * 32 for i in range(6)]),
    size=st.integers(0, 5),
    mode=st.sampled_from([0o644, 0o755, 0o600]),
)
entry_maps = st.dictionaries(paths, entries_st, max_size=10)
envs = st.dictionaries(st.sampled_from(["gpu", "cuda", "torch"]), st.text(max_size=5), max_size=3)


def manifest_of(entries, env=None) -> Manifest:
    return Manifest(ENV_KEY, dict(env or {}), dict(entries), 10.0, 20.0)


@settings(max_examples=150, deadline=None)
@given(base=entry_maps, incoming=entry_maps, env=envs)
def test_merged_is_union_where_incoming_wins(base, incoming, env):
    m = manifest_of(base, {"old": "env"})
    merged = m.merged(incoming, env, now=30.0)
    assert set(merged.entries) == set(base) | set(incoming)
    for p, e in merged.entries.items():
        assert e == (incoming[p] if p in incoming else base[p])
    assert merged.created == 10.0 and merged.updated == 30.0
    assert merged.env == (env or {"old": "env"})
    assert m.entries == base  # merging does not modify the current manifest


@settings(max_examples=150, deadline=None)
@given(base=entry_maps, incoming=entry_maps)
def test_merge_idempotent_and_changes_from(base, incoming):
    m = manifest_of(base)
    changes = m.changes_from(incoming)
    assert changes.items() <= incoming.items()
    assert all(base.get(p) != e for p, e in changes.items())
    once = m.merged(incoming, {}, now=1.0)
    assert m.merged(changes, {}, now=1.0).entries == once.entries  # merging only the changes is the same
    assert once.changes_from(incoming) == {}  # nothing new the second time ...
    assert once.merged(incoming, {}, now=2.0).entries == once.entries  # ... and a repeat changes nothing
    assert once.changes_from(base) == {p: e for p, e in base.items() if once.entries[p] != e}
    assert not m.changes_from(base)


@settings(max_examples=150, deadline=None)
@given(base=entry_maps, a=entry_maps, b=entry_maps)
def test_two_saves_in_either_order_lose_nothing(base, a, b):
    """Each save merges its changes into whatever manifest is current when it takes the lock."""
    m = manifest_of(base)
    for first, second in ((a, b), (b, a)):
        after_first = m.merged(m.changes_from(first), {})
        final = after_first.merged(after_first.changes_from(second), {})
        assert set(final.entries) == set(base) | set(a) | set(b)
        for p, e in final.entries.items():
            # The later save wins a conflict; otherwise the entry is whoever had the path.
            want = second.get(p, first.get(p, base.get(p)))
            assert e == want
    ab = m.merged(a, {}).merged(b, {})
    ba = m.merged(b, {}).merged(a, {})
    for p in set(ab.entries) | set(ba.entries):
        if p not in a or p not in b or a[p] == b[p]:
            assert ab.entries[p] == ba.entries[p]  # without a conflict, order does not matter


@settings(max_examples=100, deadline=None)
@given(entries=entry_maps, env=envs, created=st.floats(0, 2e9), updated=st.floats(0, 2e9))
def test_dumps_loads_round_trip(entries, env, created, updated):
    m = Manifest(ENV_KEY, env, entries, created, updated)
    back = loads(m.dumps(), "test")
    assert back == m
    assert loads(back.dumps()).dumps() == m.dumps()  # canonical bytes


# -- through save_tree --------------------------------------------------------------------------------------------
def test_sequential_saves_union_and_newer_wins(tmp_path):
    store, scope = open_store(tmp_path)
    a = {"shared": b"same", "conflict": b"from A", "only-a/x": b"a"}
    b = {"shared": b"same", "conflict": b"from B!", "only-b/y": b"b"}
    write_tree(tmp_path / "a", a)
    write_tree(tmp_path / "b", b)
    save_tree(tmp_path / "a", store, scope, ENV_KEY)
    first = scope.read_manifest(ENV_KEY)
    res = save_tree(tmp_path / "b", store, scope, ENV_KEY)
    assert res.new_entries == 2  # only-b/y and the changed conflict
    m = scope.read_manifest(ENV_KEY)
    assert m.entries == {**expected_entries(a), **expected_entries(b)}
    assert m.created == first.created and m.updated >= first.updated
    # Saving A again: A's content is the newer observation now.
    res = save_tree(tmp_path / "a", store, scope, ENV_KEY)
    assert res.new_entries == 1
    assert manifest_entries(scope)["conflict"] == expected_entries(a)["conflict"]
    assert set(manifest_entries(scope)) == set(a) | set(b)
    load_tree(tmp_path / "dst", store, scope, ENV_KEY)
    assert read_tree(tmp_path / "dst")["conflict"][0] == b"from A"


def test_mode_change_is_a_new_entry(tmp_path):
    store, scope = open_store(tmp_path)
    write_tree(tmp_path / "a", {"f": (b"x", 0o644)})
    save_tree(tmp_path / "a", store, scope, ENV_KEY)
    os.chmod(tmp_path / "a" / "f", 0o755)
    res = save_tree(tmp_path / "a", store, scope, ENV_KEY)
    assert res.new_entries == 1 and res.blobs_uploaded == 0
    assert manifest_entries(scope)["f"].mode == 0o755


@pytest.fixture
def pause_at_uploaded(monkeypatch):
    """pause(thread_name) -> (reached, go): the save running in that thread stops at checkpoint 'uploaded' (blobs
    durable, manifest lock not yet taken) until `go` is set."""
    gates = {}
    real = _faults.checkpoint

    def checkpoint(point):
        gate = gates.get(threading.current_thread().name)
        if gate and point == "uploaded":
            gate[0].set()
            assert gate[1].wait(30)
        real(point)

    monkeypatch.setattr(_faults, "checkpoint", checkpoint)

    def pause(name):
        gates[name] = (threading.Event(), threading.Event())
        return gates[name]

    return pause


@pytest.mark.parametrize("late", ["a", "b"])
def test_interleaved_saves_lose_nothing_and_last_commit_wins(tmp_path, pause_at_uploaded, late):
    """Save `late` reads the manifest and uploads first, then stalls; the other save commits; `late` commits last.
    It must re-read the manifest under the lock: the union survives and `late`, the newer commit, wins."""
    store, scope = open_store(tmp_path)
    base = {"base": b"base", "conflict": b"from base"}
    trees = {"a": {"conflict": b"from A", "a1": b"a1", "sh": b"shared"},
             "b": {"conflict": b"from B..", "b1": b"b1", "sh": b"shared", "base": b"base"}}
    write_tree(tmp_path / "base", base)
    save_tree(tmp_path / "base", store, scope, ENV_KEY)
    for name, files in trees.items():
        write_tree(tmp_path / name, files)
    early = "b" if late == "a" else "a"
    reached, go = pause_at_uploaded(f"saver-{late}")
    errors = []

    def run(name):
        try:
            save_tree(tmp_path / name, store, scope, ENV_KEY, threads=2)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    t_late = threading.Thread(target=run, args=(late,), name=f"saver-{late}")
    t_late.start()
    assert reached.wait(30)
    run(early)
    go.set()
    t_late.join(30)
    assert not errors
    m = manifest_entries(scope)
    assert set(m) == set(base) | set(trees["a"]) | set(trees["b"])
    assert m["conflict"] == expected_entries(trees[late])["conflict"]
    for name in ("a", "b"):
        for p, e in expected_entries(trees[name]).items():
            if p != "conflict":
                assert m[p] == e


def test_save_with_nothing_new_writes_nothing(tmp_path):
    store, scope = open_store(tmp_path)
    files = {f"d{i % 3}/f{i}": os.urandom(100 + i) for i in range(30)}
    write_tree(tmp_path / "src", files)
    save_tree(tmp_path / "src", store, scope, ENV_KEY)
    load_tree(tmp_path / "dst", store, scope, ENV_KEY)
    before = snapshot(store.root, scope.root)

    # The same tree, unchanged; the same tree re-hashed without the index; a replica's restored copy; a subset;
    # the same content with new mtimes.
    assert not save_tree(tmp_path / "src", store, scope, ENV_KEY).manifest_written
    assert not save_tree(tmp_path / "src", store, scope, ENV_KEY, use_index=False).manifest_written
    res = save_tree(tmp_path / "dst", store, scope, ENV_KEY)
    assert not res.manifest_written and res.blobs_uploaded == 0 and res.new_entries == 0
    subset = {p: d for i, (p, d) in enumerate(sorted(files.items())) if i % 2}
    write_tree(tmp_path / "subset", subset)
    assert not save_tree(tmp_path / "subset", store, scope, ENV_KEY).manifest_written
    for p in files:
        os.utime(tmp_path / "src" / p, (1, 1))
    assert not save_tree(tmp_path / "src", store, scope, ENV_KEY).manifest_written

    after = snapshot(store.root, scope.root)
    assert after == before  # no file or directory created, replaced, modified or removed

    # And the check can fail: one changed file writes the manifest and one blob.
    write_tree(tmp_path / "src", {"d0/f0": b"changed"})
    res = save_tree(tmp_path / "src", store, scope, ENV_KEY)
    assert res.manifest_written and res.new_entries == 1 and res.blobs_uploaded == 1
    assert snapshot(store.root, scope.root) != before


def test_empty_tree_writes_nothing(tmp_path):
    store, scope = open_store(tmp_path)
    (tmp_path / "src").mkdir()
    before = snapshot(store.root, scope.root)
    res = save_tree(tmp_path / "src", store, scope, ENV_KEY)
    assert not res.manifest_written and scope.read_manifest(ENV_KEY) is None
    assert snapshot(store.root, scope.root) == before
