"""The no-op check's directory record in `.cas-index` (FORMAT §7, cas/quick.py): once a full walk has recorded each
directory's (mtime, ctime, inode), later checks stat every directory and every indexed file by path instead of
listing the tree. Every change a save must see (or count) has to be seen through the record exactly as through the
walk: each test here records, changes one thing on the real filesystem, and checks the answer.

The directories of a test tree are seconds old, inside the racy window (index.RACY_NS) in which a directory is
recorded only as unsettled (listed by every check), so the `recorded` fixture moves the check's clock
(dircache.clock_ns) past that window; the racy tests move it to the window's edge.
"""
from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import msgpack
import pytest
from cas_helpers import OLD
from cas_helpers import write_aged as write

from cas import BlobStore, Scope, dircache, quick, save_tree
from cas.index import INDEX_NAME, RACY_NS, Index, settled
from cas.tree import walk

KEY = "test-env"
FILES = {
    "top.bin": b"\0" * 100,
    "a/f1.py": b"one\n",
    "a/b/f2.py": b"two\n" * 2,
    "a/b/c/f3.py": b"three\n" * 3,
    "d0/sub/f4.cubin": b"four\n" * 4,
    "d1/sub/f5.cubin": b"five\n" * 5,
    "e/f6.json": b"{}",
}
DIRS = {"a", "a/b", "a/b/c", "d0", "d0/sub", "d1", "d1/sub", "e"}




def later(monkeypatch, seconds: float = 10 * RACY_NS / 1e9) -> None:
    """The check's clock, `seconds` ahead: the tree's directories are then settled."""
    monkeypatch.setattr(dircache, "clock_ns", lambda: time.time_ns() + int(seconds * 1e9))


def check(src, store, scope) -> int | None:
    quick._manifests.clear()
    return quick.nothing_new(src, store.root, scope, KEY)


@pytest.fixture
def saved(tmp_path):
    src = tmp_path / "src"
    write(src, FILES)
    store, scope = BlobStore(tmp_path / "org", create=True), Scope(tmp_path / "scope", create=True)
    assert save_tree(src, store, scope, KEY).new_entries == len(FILES)
    return src, store, scope


@pytest.fixture
def recorded(saved, monkeypatch):
    """A saved tree whose index holds the directory record (written by one check's walk)."""
    src, store, scope = saved
    later(monkeypatch)
    assert Index(src).dirs is None  # save_tree does not record directories
    assert check(src, store, scope) == len(FILES)
    assert set(Index(src).dirs or ()) == DIRS
    return src, store, scope


def no_walk(monkeypatch) -> None:
    def refuse(*_a, **_k):
        raise AssertionError("the tree was walked")

    monkeypatch.setattr(dircache, "walk", refuse)


def walked(src) -> int | None:
    """What the full walk answers for the tree as it is now (the reference for the record's answer)."""
    try:
        return len(dircache._walked(str(src), Index(src))[0])
    except dircache._Changed:
        return None


def test_recorded_check_lists_no_directory(recorded, monkeypatch):
    src, store, scope = recorded
    no_walk(monkeypatch)  # a walk would fail the check (it answers None, never raises)
    assert check(src, store, scope) == len(FILES)
    listed = listed_dirs(monkeypatch)
    assert check(src, store, scope) == len(FILES)
    assert len(listed) == 1 and isinstance(listed[0], int)  # the root only, by its descriptor


def test_new_file_in_a_recorded_directory(recorded):
    src, store, scope = recorded
    write(src, {"a/b/c/new.py": b"new kernel\n"})
    assert check(src, store, scope) is None
    assert walked(src) is None


def test_new_file_at_the_root(recorded):
    src, store, scope = recorded
    write(src, {"new.bin": b"x"})
    assert check(src, store, scope) is None


def test_deleted_file_is_counted(recorded):
    """A save never removes entries, so a deleted file is nothing new, but it is not counted, and the record made
    after it vouches for the smaller tree."""
    src, store, scope = recorded
    (src / "a/b/f2.py").unlink()
    assert check(src, store, scope) == len(FILES) - 1
    assert "a/b/f2.py" not in Index(src).entries()
    assert Index(src).dirs is not None
    assert check(src, store, scope) == len(FILES) - 1


def test_deleted_root_file_is_counted(recorded):
    src, store, scope = recorded
    (src / "top.bin").unlink()
    assert check(src, store, scope) == len(FILES) - 1


def test_file_modified_in_place_same_size(recorded):
    src, store, scope = recorded
    path = src / "d0/sub/f4.cubin"
    with open(path, "r+b") as fh:  # same inode, same size, new content: the directory does not change
        fh.write(b"FOUR")
    assert check(src, store, scope) is None


def test_file_modified_in_place_with_its_mtime_put_back(recorded):
    """touch -r / rsync -t style: the old mtime restored after a same-size rewrite; ctime still moves."""
    src, store, scope = recorded
    path = src / "d0/sub/f4.cubin"
    before = os.lstat(path)
    with open(path, "r+b") as fh:
        fh.write(b"FOUR")
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert os.lstat(path).st_mtime_ns == before.st_mtime_ns
    assert check(src, store, scope) is None


def test_file_replaced_by_rename(recorded):
    src, store, scope = recorded
    path = src / "e/f6.json"
    before = os.lstat(path)
    tmp = src / "e/f6.json.part"
    tmp.write_bytes(b"[]")  # same size
    os.utime(tmp, ns=(before.st_atime_ns, before.st_mtime_ns))
    os.replace(tmp, path)
    assert check(src, store, scope) is None


def test_new_subdirectory_with_a_file(recorded):
    src, store, scope = recorded
    write(src, {"a/b/new/kernel.py": b"k"})
    assert check(src, store, scope) is None


def test_new_subdirectory_at_the_root(recorded):
    src, store, scope = recorded
    write(src, {"zz/kernel.py": b"k"})
    assert check(src, store, scope) is None


def test_new_empty_or_transient_subdirectory_is_nothing_new(recorded):
    src, store, scope = recorded
    (src / "a/b/empty").mkdir()
    write(src, {"d1/locks/x": b"", "d1/sub/y.lock": b""})
    assert check(src, store, scope) == len(FILES)
    assert {"a/b/empty", "d1/locks"} & set(Index(src).dirs or ()) == {"a/b/empty"}  # recorded again, not locks


def test_directory_replaced_by_a_symlink(recorded, tmp_path):
    """The same files, now reached through a link: the walk never follows one, so they are not counted; through
    the record they must not be either (the link's lstat is not the directory's)."""
    src, store, scope = recorded
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    os.rename(src / "d0/sub", elsewhere / "sub")  # the files keep their inode and ctime
    os.symlink(elsewhere / "sub", src / "d0/sub")
    assert check(src, store, scope) == len(FILES) - 1
    assert walked(src) == len(FILES) - 1


def test_directory_at_the_root_replaced_by_a_symlink(recorded, tmp_path):
    src, store, scope = recorded
    os.rename(src / "a", tmp_path / "a")
    os.symlink(tmp_path / "a", src / "a")
    assert check(src, store, scope) == len(FILES) - 3


def test_directory_replaced_with_its_mtime_put_back(recorded, tmp_path):
    """A directory swapped for a copy with the old mtime (cp -a, rsync -a): another inode and ctime."""
    src, store, scope = recorded
    before = os.lstat(src / "d1/sub")
    shutil.copytree(src / "d1/sub", tmp_path / "copy", copy_function=shutil.copy2)
    write(tmp_path / "copy", {"extra.cubin": b"extra"})
    shutil.rmtree(src / "d1/sub")
    os.rename(tmp_path / "copy", src / "d1/sub")
    os.utime(src / "d1/sub", ns=(before.st_atime_ns, before.st_mtime_ns))
    os.utime(src / "d1", ns=(os.lstat(src / "d1").st_atime_ns, Index(src).dirs["d1"][0]))
    assert check(src, store, scope) is None


def test_new_file_with_its_directory_mtime_put_back(recorded):
    """What a coarse timestamp would do (a file added in the same tick leaves the mtime as it was), driven with
    utime: mtime alone is not trusted, ctime still moves."""
    src, store, scope = recorded
    before = os.lstat(src / "a/b")
    write(src, {"a/b/same_tick.py": b"k"})
    os.utime(src / "a/b", ns=(before.st_atime_ns, before.st_mtime_ns))
    assert os.lstat(src / "a/b").st_mtime_ns == before.st_mtime_ns
    assert check(src, store, scope) is None


def test_change_made_while_the_recording_walk_lists(saved, monkeypatch):
    """Each directory's stat is taken before its listing: a file added just after the listing, which the walk
    missed, shows at the next check as a changed directory."""
    src, store, scope = saved
    later(monkeypatch)
    real = os.scandir
    target = str(src / "a/b")
    added = []

    class Listed(list):
        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    def scandir(path="."):
        with real(path) as it:
            entries = Listed(it)
        if path == target and not added:
            write(src, {"a/b/late.py": b"written after the listing"})
            added.append(path)
        return entries

    monkeypatch.setattr(os, "scandir", scandir)
    assert check(src, store, scope) == len(FILES)  # the listing did not have it
    monkeypatch.setattr(os, "scandir", real)
    assert added and Index(src).dirs is not None
    assert check(src, store, scope) is None


# -- the racy window ---------------------------------------------------------------------------------------------------
def unsettled(src: Path) -> set[str]:
    return {rel for rel, key in (Index(src).dirs or {}).items() if key == dircache.UNSETTLED}


def test_fresh_directories_are_not_recorded(saved, monkeypatch):
    """Without the moved clock the test tree's directories are seconds old, all unsettled: no record is written
    (every check would list them all, and rewrite the index as they settle), each check walks; a file added with
    its directory's mtime put back is found; a check past the window records the tree."""
    src, store, scope = saved
    assert check(src, store, scope) == len(FILES)
    assert Index(src).dirs is None and Index(src).verified is not None
    before = os.lstat(src / "a/b")
    write(src, {"a/b/same_tick.py": b"k"})
    os.utime(src / "a/b", ns=(before.st_atime_ns, before.st_mtime_ns))
    assert check(src, store, scope) is None
    (src / "a/b/same_tick.py").unlink()
    later(monkeypatch)
    assert check(src, store, scope) == len(FILES)
    assert unsettled(src) == set() and set(Index(src).dirs or ()) == DIRS


def test_a_few_unsettled_directories_are_recorded_so(saved, monkeypatch):
    """At most half unsettled: recorded, the unsettled ones as such."""
    src, store, scope = saved
    busy = {"a", "a/b", "a/b/c"}
    newest, _ = _newest(src)
    time.sleep(0.05)  # past the file system's timestamp tick (jiffies), so the touched ones are strictly newer
    for d in busy:
        os.utime(src / d, ns=(newest, newest))  # their ctime: now
    ctime = min(os.lstat(src / d).st_ctime_ns for d in busy)
    assert newest < ctime
    monkeypatch.setattr(dircache, "clock_ns", lambda: newest + RACY_NS + 1)  # the others settled, the three not
    assert check(src, store, scope) == len(FILES)
    assert unsettled(src) == busy and set(Index(src).dirs or ()) == DIRS


def _newest(src: Path) -> tuple[int, set[str]]:
    """The newest mtime/ctime of the tree's directories, and the directories that have it."""
    times = {d: max(st.st_mtime_ns, st.st_ctime_ns) for d, st in ((d, os.lstat(src / d)) for d in DIRS)}
    newest = max(times.values())
    return newest, {d for d, t in times.items() if t == newest}


def test_racy_window_edge(saved, monkeypatch):
    """A directory whose mtime/ctime is not strictly older than the walk's start minus RACY_NS is not trusted;
    one nanosecond older is."""
    src, store, scope = saved
    newest, those = _newest(src)
    monkeypatch.setattr(dircache, "clock_ns", lambda: newest + RACY_NS)
    assert check(src, store, scope) == len(FILES)
    assert unsettled(src) == those and set(Index(src).dirs or ()) == DIRS
    monkeypatch.setattr(dircache, "clock_ns", lambda: newest + RACY_NS + 1)
    assert check(src, store, scope) == len(FILES)
    assert unsettled(src) == set() and set(Index(src).dirs or ()) == DIRS


def test_directory_mtime_set_to_the_walk_time_is_listed_every_time(saved, monkeypatch):
    """A directory whose mtime equals the clock of the walk (set with utime) is recorded unsettled: each check
    lists it, so a file added to it in the same tick (its mtime put back) is never missed; the others are not
    listed."""
    src, store, scope = saved
    now = time.time_ns() + 10 * RACY_NS
    monkeypatch.setattr(dircache, "clock_ns", lambda: now)
    os.utime(src / "a/b", ns=(now, now))
    assert check(src, store, scope) == len(FILES)
    assert unsettled(src) == {"a/b"}
    listed = listed_dirs(monkeypatch)
    assert check(src, store, scope) == len(FILES)
    assert sorted(p for p in listed if not isinstance(p, int)) == [str(src), str(src / "a/b")]
    write(src, {"a/b/same_tick.py": b"k"})
    os.utime(src / "a/b", ns=(now, now))
    assert check(src, store, scope) is None


def test_settled():
    st = os.lstat("/")
    edge = max(st.st_mtime_ns, st.st_ctime_ns) + RACY_NS
    assert not settled(st, edge)
    assert settled(st, edge + 1)


# -- the record and the entries it was made with -----------------------------------------------------------------------
def listed_dirs(monkeypatch) -> list:
    """The directories the check lists from now on (the root is listed by its descriptor: an int)."""
    listed: list = []
    real = os.scandir
    monkeypatch.setattr(os, "scandir", lambda p=".": listed.append(p) or real(p))
    return listed


def test_a_save_of_a_new_file_keeps_the_record_and_only_its_directory_is_listed(recorded, monkeypatch):
    """The record survives a save that adds entries (their directories' keys changed); the next check lists the
    root and the changed directory only, and records again."""
    src, store, scope = recorded
    write(src, {"a/b/new.py": b"new"})
    assert save_tree(src, store, scope, KEY).new_entries == 1
    assert Index(src).dirs is not None
    listed = listed_dirs(monkeypatch)
    assert check(src, store, scope) == len(FILES) + 1
    assert sorted(p for p in listed if not isinstance(p, int)) == [str(src), str(src / "a/b")]
    del listed[:]
    assert check(src, store, scope) == len(FILES) + 1
    assert [p for p in listed if not isinstance(p, int)] == []  # recorded again: no directory but the root


def test_a_changed_directory_is_listed_alone(recorded, monkeypatch):
    """Through the record, a directory whose key changed (a transient file came and went) is listed, the others
    are not, and the answer is the walk's."""
    src, store, scope = recorded
    write(src, {"d0/sub/x.lock": b""})
    (src / "d0/sub/x.lock").unlink()
    listed = listed_dirs(monkeypatch)
    assert check(src, store, scope) == len(FILES)
    assert sorted(p for p in listed if not isinstance(p, int)) == [str(src), str(src / "d0/sub")]


def test_a_save_of_a_rewritten_file_keeps_the_record(recorded, monkeypatch):
    """A file rewritten in place and saved: its entry's stat changes, its directory's listing does not."""
    src, store, scope = recorded
    write(src, {"a/b/c/f3.py": b"THREE\n" * 3})
    assert save_tree(src, store, scope, KEY).new_entries == 1
    assert Index(src).dirs is not None
    no_walk(monkeypatch)
    assert check(src, store, scope) == len(FILES)


def test_index_changes_that_drop_the_record(recorded):
    src, _, _ = recorded
    index = Index(src)
    index.retain(set(FILES) - {"top.bin"})  # a dropped name: the file may still be there
    assert index.dirs is None
    index = Index(src)
    index.record("top.bin", os.lstat(src / "top.bin"), "cd" * 32)  # a known name, another blob: kept
    write(src, {"a/g.py": b"g"})
    index.record("a/g.py", os.lstat(src / "a/g.py"), "ab" * 32)  # a new name (its directory changed): kept
    assert index.dirs is not None
    write(src, {"a/f1.py": b"rewritten"}, mtime=None)
    index.record("a/f1.py", os.lstat(src / "a/f1.py"), "ef" * 32)  # too recent to keep: dropped, so is the record
    assert "a/f1.py" not in index.entries() and index.dirs is None


def _rewrite_index(src: Path, change) -> None:
    path = src / INDEX_NAME
    doc = msgpack.unpackb(path.read_bytes(), raw=False)
    change(doc)
    path.write_bytes(msgpack.packb(doc, use_bin_type=True))


def test_an_index_without_the_record_is_walked_then_recorded(recorded):
    """An index written before the record existed (or by an older writer, which drops it): a full walk."""
    src, store, scope = recorded
    _rewrite_index(src, lambda doc: doc.pop("dirs"))
    write(src, {"a/b/c/new.py": b"new"})
    assert check(src, store, scope) is None
    (src / "a/b/c/new.py").unlink()
    assert check(src, store, scope) == len(FILES)
    assert set(Index(src).dirs or ()) == DIRS


@pytest.mark.parametrize("dirs", [
    "not a map",
    {"a": "not a key"},
    {"a": [1, 2]},
    {"a\0b": [1, 2, 3]},
    {"a": [1, 2, 3], "a/b/c": [1, 2, 3]},  # a/b is not recorded
    {"../outside": [1, 2, 3]},
])
def test_a_record_not_as_written_means_a_walk(recorded, dirs):
    """Never trusted, never a "maybe" by itself: the walk's answer, then a good record."""
    src, store, scope = recorded
    _rewrite_index(src, lambda doc: doc.update(dirs=dirs))
    assert check(src, store, scope) == len(FILES)
    assert set(Index(src).dirs or ()) == DIRS
    _rewrite_index(src, lambda doc: doc.update(dirs=dirs))
    write(src, {"a/b/c/new.py": b"new"})
    assert check(src, store, scope) is None


def test_an_older_reader_reads_an_index_with_the_record(recorded):
    """The record is one more key of the format-1 map, within the limits an older reader unpacks with (arrays of
    at most 5 items, binaries of at most 32 bytes): that reader keeps using the entries."""
    src, _, _ = recorded
    doc = msgpack.unpackb((src / INDEX_NAME).read_bytes(), raw=False, max_array_len=5, max_bin_len=32,
                          max_str_len=4096, max_map_len=1_000_000)
    assert doc["format"] == 1 and len(doc["entries"]) == len(FILES) and set(doc["dirs"]) == DIRS


def test_record_and_walk_agree_after_every_change(recorded, tmp_path):
    """One change after another on the same tree: the record's answer is always the walk's."""
    src, store, scope = recorded
    changes = [
        lambda: write(src, {"a/x.lock": b""}),
        lambda: (src / "e/f6.json").unlink(),
        lambda: shutil.rmtree(src / "a/b/c"),
        lambda: os.mkdir(src / "d0/sub/deeper"),
        lambda: os.symlink("/etc", src / "d1/etc"),
        lambda: write(src, {"d0/sub/deeper/k.py": b"k"}),
    ]
    for change in changes:
        change()
        expected = walked(src)
        assert check(src, store, scope) == expected
        if expected is None:
            save_tree(src, store, scope, KEY)
            assert check(src, store, scope) == sum(1 for _ in walk(src))


def test_a_directory_named_in_no_utf8_is_walked(saved, monkeypatch):
    """Its files are never taken, and the index cannot hold its name: no record, the same answer as the walk."""
    src, store, scope = saved
    os.mkdir(os.fsencode(src) + b"/bad\xff")
    (Path(os.fsdecode(os.fsencode(src) + b"/bad\xff")) / "f.py").write_bytes(b"never taken")
    later(monkeypatch)
    assert check(src, store, scope) == len(FILES)
    assert Index(src).dirs is None
    assert check(src, store, scope) == len(FILES)


def test_an_index_too_large_with_the_record_is_written_without_it(recorded, monkeypatch):
    from cas import limits

    src, _, _ = recorded
    index = Index(src)
    size = (src / INDEX_NAME).stat().st_size
    monkeypatch.setattr(limits, "MAX_MANIFEST_BYTES", size - 1)  # the same index, one byte over what is read
    index._dirty = True  # written again as it is
    index.write()
    monkeypatch.undo()
    assert Index(src).dirs is None and len(Index(src).entries()) == len(FILES)


def test_walk_of_a_subtree_names_paths_from_the_tree_root(saved):
    src, _, _ = saved
    met: dict = {}
    got = {rel for rel, _, _ in walk(src / "a/b", dirs=met, start="a/b/")}
    assert got == {"a/b/f2.py", "a/b/c/f3.py"}
    assert set(met) == {"a/b", "a/b/c"}


def _random_change(rng, src: Path, tmp: Path, step: int) -> str:
    """One change of the kinds a pod makes (and a few it should not), on the real tree."""
    files = sorted(rel for rel, _, _ in walk(src))
    dirs = sorted({os.path.dirname(f) for f in files} - {""})
    kind = rng.choice(["add", "add_dir", "delete", "rewrite", "rewrite_keep_mtime", "replace", "transient",
                       "rmtree", "symlink_dir", "move_dir", "empty_dir", "nothing"])
    if kind == "add" or (not files and kind != "nothing"):
        where = rng.choice([*dirs, ""])
        write(src, {os.path.join(where, f"n{step}.py"): b"new %d" % step})
    elif kind == "add_dir":
        write(src, {os.path.join(rng.choice([*dirs, ""]), f"nd{step}", "k.py"): b"k %d" % step})
    elif kind == "delete":
        (src / rng.choice(files)).unlink()
    elif kind in ("rewrite", "rewrite_keep_mtime"):
        path = src / rng.choice(files)
        before = os.lstat(path)
        data = path.read_bytes()
        path.write_bytes(bytes([data[0] ^ 1]) + data[1:] if data else b"x")
        if kind == "rewrite_keep_mtime":
            os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    elif kind == "replace":
        path = src / rng.choice(files)
        tmp_file = path.with_name(path.name + ".part")
        tmp_file.write_bytes(path.read_bytes())
        os.utime(tmp_file, ns=(os.lstat(path).st_atime_ns, os.lstat(path).st_mtime_ns))
        os.replace(tmp_file, path)  # same bytes, same mtime, another inode
    elif kind == "transient":
        write(src, {os.path.join(rng.choice([*dirs, ""]), f"t{step}.lock"): b""})
    elif kind == "rmtree" and dirs:
        shutil.rmtree(src / rng.choice(dirs))
    elif kind == "symlink_dir" and dirs:
        d = rng.choice(dirs)
        os.rename(src / d, tmp / f"moved{step}")
        os.symlink(tmp / f"moved{step}", src / d)
    elif kind == "move_dir" and len(dirs) > 1:
        d = rng.choice(dirs)
        target = src / f"mv{step}"
        if not str(target).startswith(str(src / d) + "/"):
            os.rename(src / d, target)
    elif kind == "empty_dir":
        os.makedirs(src / rng.choice([*dirs, ""]) / f"e{step}", exist_ok=True)
    return kind


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_random_changes_answer_as_the_walk_does(recorded, tmp_path, seed):
    """Random changes, one at a time: the check (through the record, repaired or rebuilt as it goes) always gives
    the full walk's answer; when that answer is "maybe", a save brings the tree back to nothing new."""
    import random

    src, store, scope = recorded
    rng = random.Random(seed)
    side = tmp_path / "side"
    side.mkdir()
    for step in range(40):
        kind = _random_change(rng, src, side, step)
        expected = walked(src)
        assert check(src, store, scope) == expected, (step, kind)
        if expected is None:
            save_tree(src, store, scope, KEY)
            # Files written just now are too recent for the index: the walk answers "maybe" until they are old.
            for rel, _, _ in walk(src):
                os.utime(src / rel, (OLD, OLD))
            save_tree(src, store, scope, KEY)
            assert check(src, store, scope) == walked(src) == sum(1 for _ in walk(src)), (step, kind)
