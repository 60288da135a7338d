"""The local side under attack or misconfiguration (docs/FORMAT.md §7, issue 12 point 4), on the real filesystem.

Races are driven deterministically through the test seam `cas.localfs.hook`, which runs before each local file a save
opens and before each file a load restores: the test swaps a parent for a symlink, or a file for a symlink to a
secret, at exactly that point.
"""
from __future__ import annotations

import json
import logging
import os
import secrets
import stat
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import zstandard

from cas import load_tree, localfs, save_tree
from cas.errors import OverlappingDirs
from cas.quick import nothing_new
from cas_helpers import ENV_KEY, manifest_entries, open_store, read_tree, snapshot, write_tree

REPO = Path(__file__).resolve().parents[1]
BIG = 1_500_000  # above pack.PACK_FILE_MAX: stored as its own blob (the upload path), not in a pack


@pytest.fixture
def seam(monkeypatch):
    """Install a hook (event, path) -> None for one test; always removed afterwards."""
    def install(fn):
        monkeypatch.setattr(localfs, "hook", fn)
    yield install
    monkeypatch.setattr(localfs, "hook", None)


def volume(base: Path):
    """(BlobStore, Scope) at `base`/store and `base`/scope; `base` stands in for the mounted volume."""
    base.mkdir(parents=True, exist_ok=True)
    return open_store(base)


def saved_store(tmp_path: Path, files: dict):
    store, scope = volume(tmp_path / "vol")
    src = tmp_path / "src"
    write_tree(src, files)
    save_tree(src, store, scope, ENV_KEY)
    return store, scope


def everything_under(*roots: Path) -> list[bytes]:
    """Raw bytes and, where they decode, decompressed zstd frames of every regular file under `roots`."""
    out = []
    for root in roots:
        for directory, _, names in os.walk(root):
            for name in names:
                path = os.path.join(directory, name)
                if not stat.S_ISREG(os.lstat(path).st_mode):
                    continue
                data = Path(path).read_bytes()
                out.append(data)
                try:
                    out.append(zstandard.ZstdDecompressor().decompressobj().decompress(data))
                except zstandard.ZstdError:
                    pass
    return out


# -- load: a parent swapped for a symlink mid-load -----------------------------------------------------------------
LOAD_FILES = {
    "a/one.py": b"a one" * 50,
    "sub/deep/two.py": b"sub two" * 50,
    "sub/deep/three.py": b"sub three" * 50,
    "sub/big.bin": os.urandom(BIG),
    "z/four.py": b"z four" * 50,
}


def test_parent_appearing_as_a_symlink_mid_load_is_a_miss_and_nothing_is_written_outside(tmp_path, seam):
    store, scope = saved_store(tmp_path, LOAD_FILES)
    sentinel = tmp_path / "outside"
    sentinel.mkdir()
    dst = tmp_path / "dst"
    dst.mkdir()

    def plant(event, rel):
        if event == "restore" and rel.startswith("sub/") and not os.path.lexists(dst / "sub"):
            os.symlink(sentinel, dst / "sub")  # a parent turns into a link just before the load needs it

    seam(plant)
    res = load_tree(dst, store, scope, ENV_KEY, threads=1)
    assert os.listdir(sentinel) == []
    assert sorted(p for p, _ in res.misses) == ["sub/big.bin", "sub/deep/three.py", "sub/deep/two.py"]
    assert all("symlink" in why for _, why in res.misses)
    assert read_tree(dst) == {p: (d, 0o644) for p, d in LOAD_FILES.items() if not p.startswith("sub/")}


def test_parent_swapped_for_a_symlink_after_it_was_opened_keeps_writes_inside(tmp_path, seam):
    """The directory the load opened is the one it writes into: renamed inside the target and replaced by a link
    to the outside, it still receives the files; the link's target receives nothing."""
    store, scope = saved_store(tmp_path, LOAD_FILES)
    sentinel = tmp_path / "outside"
    sentinel.mkdir()
    dst = tmp_path / "dst"
    seen: list[str] = []

    def swap(event, rel):
        seen.append(rel)
        if rel.startswith("sub/") and sum(p.startswith("sub/") for p in seen) == 2:  # one sub/ file already written
            os.rename(dst / "sub", dst / "sub.moved")
            os.symlink(sentinel, dst / "sub")

    seam(swap)
    res = load_tree(dst, store, scope, ENV_KEY, threads=1)
    assert os.listdir(sentinel) == []
    assert res.restored + len(res.misses) == len(LOAD_FILES)
    restored = read_tree(dst)
    for rel in LOAD_FILES:
        if rel.startswith("sub/") and rel not in dict(res.misses):
            moved = "sub.moved/" + rel[len("sub/"):]
            assert restored[moved][0] == LOAD_FILES[rel]  # written where the opened directory now is: inside


def test_ancestor_swapped_while_its_fd_was_evicted_is_a_miss(tmp_path, seam, monkeypatch):
    """With one directory fd cached, every parent is reopened from the nearest open ancestor (here the root): a
    grandparent swapped for a symlink is then refused, never followed."""
    monkeypatch.setattr(localfs, "MAX_OPEN_DIRS", 1)
    files = {f"a/b/c{i}/f.py": f"file {i}".encode() * 20 for i in range(6)} | {"a/x/g.py": b"g" * 30}
    store, scope = saved_store(tmp_path, files)
    sentinel = tmp_path / "outside"
    (sentinel / "b").mkdir(parents=True)
    dst = tmp_path / "dst"

    def swap(event, rel):
        if rel == "a/b/c3/f.py":
            os.rename(dst / "a", dst / "a.moved")
            os.symlink(sentinel, dst / "a")

    seam(swap)
    res = load_tree(dst, store, scope, ENV_KEY, threads=1)
    assert os.listdir(sentinel / "b") == []
    assert {p for p, _ in res.misses} >= {"a/b/c3/f.py", "a/b/c4/f.py", "a/b/c5/f.py", "a/x/g.py"}


def test_directory_fds_stay_bounded_and_every_file_arrives(tmp_path, seam, monkeypatch):
    """400 files in 800 directories with at most 8 directory fds cached: the load never holds more fds than that
    (plus its fixed few), and every file arrives through the reopen-from-ancestor path."""
    monkeypatch.setattr(localfs, "MAX_OPEN_DIRS", 8)
    files = {f"k{i:03d}/sub/f{i}.py": f"kernel {i}".encode() * 10 for i in range(400)}
    files |= {"k000/sub/g.py": b"g", "k000/other/h.py": b"h"}
    store, scope = saved_store(tmp_path, files)
    dst = tmp_path / "dst"
    baseline = len(os.listdir("/proc/self/fd"))
    peak = [0]

    def count(event, rel):
        peak[0] = max(peak[0], len(os.listdir("/proc/self/fd")))

    seam(count)
    res = load_tree(dst, store, scope, ENV_KEY, threads=2)
    assert res.restored == len(files) and not res.misses
    assert read_tree(dst) == {p: (d, 0o644) for p, d in files.items()}
    assert peak[0] - baseline <= 8 + 6  # cached dirs + root fd, temp file, listing, store reads


def test_killed_loads_temp_files_are_cleaned_without_following_links(tmp_path):
    store, scope = saved_store(tmp_path, {"keep/f.py": b"f"})
    outside = tmp_path / "outside"
    outside.mkdir()
    old = 1_000_000_000  # 2001: far older than any expiry
    (outside / ".tmp-host-1-deadbeefdeadbeef").write_bytes(b"not ours")
    os.utime(outside / ".tmp-host-1-deadbeefdeadbeef", (old, old))
    dst = tmp_path / "dst"
    (dst / "real").mkdir(parents=True)
    (dst / "real" / ".tmp-host-2-0000000000000000").write_bytes(b"a dead load's")
    os.utime(dst / "real" / ".tmp-host-2-0000000000000000", (old, old))
    (dst / "real" / ".tmp-host-3-1111111111111111").write_bytes(b"a live load's")  # fresh: kept
    os.symlink(outside, dst / "link")
    load_tree(dst, store, scope, ENV_KEY, temp_expiry=60)
    assert sorted(os.listdir(dst / "real")) == [".tmp-host-3-1111111111111111"]
    assert os.listdir(outside) == [".tmp-host-1-deadbeefdeadbeef"]


def test_directory_swapped_during_the_temp_sweep_never_loses_a_file_outside(tmp_path, seam):
    """The sweep found an old temp file in dst/real by listing it; before it removes it, dst/real becomes a link to
    a directory outside holding a file of the same name. The removal goes through O_NOFOLLOW dir fds: refused."""
    store, scope = saved_store(tmp_path, {"keep/f.py": b"f"})
    name = ".tmp-host-2-0000000000000000"
    old = 1_000_000_000
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / name).write_bytes(b"someone else's file")
    os.utime(outside / name, (old, old))
    dst = tmp_path / "dst"
    (dst / "real").mkdir(parents=True)
    (dst / "real" / name).write_bytes(b"a dead load's")
    os.utime(dst / "real" / name, (old, old))

    def swap(event, rel):
        if event == "sweep" and rel == f"real/{name}":
            os.rename(dst / "real", dst / "real.moved")
            os.symlink(outside, dst / "real")

    seam(swap)
    load_tree(dst, store, scope, ENV_KEY, temp_expiry=60)
    assert (outside / name).read_bytes() == b"someone else's file"


# -- save: a file swapped after the scan -----------------------------------------------------------------------------
def _swap(kind: str, victim: Path, secret_dir: Path) -> None:
    """Replace `victim` (after the scan saw it) according to `kind`; the secret lies in `secret_dir`."""
    st = victim.stat()
    if kind == "symlink":
        victim.unlink()
        os.symlink(secret_dir / victim.name, victim)
    elif kind == "other-file":  # a regular file with the secret, same size and mtime: only the inode differs
        replacement = victim.with_name(".replacement")
        replacement.write_bytes((secret_dir / victim.name).read_bytes())
        os.utime(replacement, ns=(st.st_atime_ns, st.st_mtime_ns))
        os.rename(replacement, victim)
    elif kind == "parent-symlink":  # the directory becomes a link to one holding a same-named secret
        os.rename(victim.parent, victim.parent.with_name("moved"))
        os.symlink(secret_dir, victim.parent)
    elif kind == "fifo":
        victim.unlink()
        os.mkfifo(victim)


@pytest.mark.parametrize("size", ["packed", "loose"])
@pytest.mark.parametrize("when", [1, 2])  # the first local read (hashing) or the second (packing / uploading)
@pytest.mark.parametrize("kind", ["symlink", "other-file", "parent-symlink", "fifo"])
def test_file_swapped_after_the_scan_is_skipped_and_the_secret_never_stored(tmp_path, seam, kind, when, size):
    n = 64 if size == "packed" else BIG
    token = secrets.token_hex(16).encode()
    secret = (b"SECRET-" + token + b"\n") * (n // 40 + 1)
    secret = secret[:n]
    secret_dir = tmp_path / "outside"
    secret_dir.mkdir()
    (secret_dir / "victim.bin").write_bytes(secret)
    store, scope = volume(tmp_path / "vol")
    src = tmp_path / "src"
    write_tree(src, {"kern/victim.bin": os.urandom(n), "other/ok.py": b"fine" * 10})
    victim = src / "kern" / "victim.bin"
    reads: list[str] = []

    def swap_at_read(event, path):
        reads.append(path)
        if path == str(victim) and reads.count(path) == when:
            _swap(kind, victim, secret_dir)

    seam(swap_at_read)
    done: list = []
    worker = threading.Thread(target=lambda: done.append(save_tree(src, store, scope, ENV_KEY, use_index=False)),
                              daemon=True)
    worker.start()
    worker.join(60)
    assert done, "save hung"
    res = done[0]
    assert res.skipped_changed == 1
    assert set(manifest_entries(scope)) == {"other/ok.py"}
    assert not any(token in data for data in everything_under(tmp_path / "vol"))


def test_file_swapped_with_the_index_trusting_it_is_caught_at_the_upload(tmp_path, seam):
    """An index hit skips hashing: the first read is the upload's, and it still checks the file against the scan."""
    store, scope = volume(tmp_path / "vol")
    src = tmp_path / "src"
    write_tree(src, {"big.bin": os.urandom(BIG)})
    old = 1_000_000_000
    os.utime(src / "big.bin", (old, old))  # old enough for the index to record it
    other_store, other_scope = volume(tmp_path / "other")
    save_tree(src, other_store, other_scope, ENV_KEY)  # fills src/.cas-index
    secret_dir = tmp_path / "outside"
    secret_dir.mkdir()
    (secret_dir / "big.bin").write_bytes(b"TOPSECRET" * (BIG // 9 + 1))
    seam(lambda event, path: _swap("symlink", src / "big.bin", secret_dir) if path.endswith("big.bin") else None)
    res = save_tree(src, store, scope, ENV_KEY)
    assert res.skipped_changed == 1 and not manifest_entries(scope)
    assert not any(b"TOPSECRET" in data for data in everything_under(tmp_path / "vol"))


# -- a FIFO planted at the local index -----------------------------------------------------------------------------------
def _bounded(fn, seconds: float = 30):
    out: list = []
    t = threading.Thread(target=lambda: out.append(fn()), daemon=True)
    t.start()
    t.join(seconds)
    assert out, f"{fn} did not finish within {seconds}s"
    return out[0]


def test_fifo_at_the_local_index_does_not_hang_save_noop_check_or_load(tmp_path):
    store, scope = volume(tmp_path / "vol")
    src = tmp_path / "src"
    write_tree(src, {"a.py": b"a" * 100, "d/b.py": b"b" * 100})
    os.mkfifo(src / ".cas-index")
    assert _bounded(lambda: nothing_new(src, store.root, scope, ENV_KEY)) is None
    res = _bounded(lambda: save_tree(src, store, scope, ENV_KEY))
    assert set(manifest_entries(scope)) == {"a.py", "d/b.py"}
    assert res.manifest_written
    dst = tmp_path / "dst"
    dst.mkdir()
    os.mkfifo(dst / ".cas-index")
    res = _bounded(lambda: load_tree(dst, store, scope, ENV_KEY))
    assert res.restored == 2
    assert stat.S_ISREG(os.lstat(dst / ".cas-index").st_mode)  # replaced by a real index, not written through


# -- over-deep and unreadable subtrees ---------------------------------------------------------------------------------
def _make_deep(base: Path, levels: int) -> None:
    """`base`/deep/ddd.../ddd.../leaf: a relative path over 4096 bytes, built through dir fds (PATH_MAX applies to
    each syscall's path argument, not to a tree's depth)."""
    fd = os.open(base, os.O_RDONLY | os.O_DIRECTORY)
    for name in ["deep"] + ["d" * 255] * levels:
        os.mkdir(name, dir_fd=fd)
        child = os.open(name, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
        os.close(fd)
        fd = child
    leaf = os.open("leaf.py", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd)
    os.write(leaf, b"too deep to save")
    os.close(leaf)
    os.close(fd)


def test_over_deep_subtree_is_skipped_with_a_warning_and_the_rest_saved(tmp_path, caplog):
    store, scope = volume(tmp_path / "vol")
    src = tmp_path / "src"
    write_tree(src, {"top.py": b"top", "ok/mid.py": b"mid"})
    _make_deep(src, 17)
    with caplog.at_level(logging.WARNING, logger="cas.tree"):
        res = save_tree(src, store, scope, ENV_KEY)
    assert res.manifest_written
    assert set(manifest_entries(scope)) == {"top.py", "ok/mid.py"}
    assert any("skipping directory" in r.getMessage() for r in caplog.records)
    assert nothing_new(src, store.root, scope, ENV_KEY) is None  # "maybe": save_tree says why, and saves the rest


def test_over_deep_subtree_through_the_api_is_success(b10_env):
    from b10_transfer import OperationStatus, core

    write_tree(b10_env.local, {"top.py": b"top", "ok/mid.py": b"mid"})
    _make_deep(b10_env.local, 17)
    status, stats = core.save()
    assert status is OperationStatus.SUCCESS, stats.reason
    assert stats.new_entries == 2


def _setpriv_works() -> bool:
    try:
        p = subprocess.run(["setpriv", "--bounding-set=-dac_override", "--", "true"], capture_output=True)
    except FileNotFoundError:
        return False
    return p.returncode == 0 and os.geteuid() == 0


_SAVE_CHILD = """
import json, logging, sys
logging.basicConfig(level=logging.WARNING)
from cas import BlobStore, Scope, save_tree
res = save_tree(sys.argv[1], BlobStore(sys.argv[2]), Scope(sys.argv[3], create=True), "test-env")
print(json.dumps({"written": res.manifest_written, "files": res.files}))
"""


@pytest.mark.skipif(not _setpriv_works(), reason="needs root and setpriv to drop DAC capabilities")
def test_unreadable_subtree_is_skipped_with_a_warning_and_the_rest_saved(tmp_path):
    store, scope = volume(tmp_path / "vol")
    src = tmp_path / "src"
    write_tree(src, {"top.py": b"top", "locked/inner/secret.py": b"unreadable", "ok/mid.py": b"mid"})
    os.chmod(src / "locked", 0)
    try:
        cmd = ["setpriv", "--bounding-set=-dac_override,-dac_read_search,-fowner", "--", sys.executable, "-c",
               _SAVE_CHILD, str(src), store.root, scope.root]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=REPO,
                              env={**os.environ, "PYTHONPATH": str(REPO)})
    finally:
        os.chmod(src / "locked", 0o755)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.splitlines()[-1])["written"]
    assert "skipping directory" in proc.stderr and "locked" in proc.stderr
    assert set(manifest_entries(scope)) == {"top.py", "ok/mid.py"}


# -- overlapping directories -----------------------------------------------------------------------------------------
OVERLAPS = ["is-scope", "inside-scope", "contains-scope", "is-store", "inside-store", "link-to-scope"]


def _overlapping(case: str, scope_root: Path, store_root: Path, tmp_path: Path) -> Path:
    if case == "is-scope":
        return scope_root
    if case == "inside-scope":
        write_tree(scope_root / "inner", {"x.py": b"x"})
        return scope_root / "inner"
    if case == "contains-scope":
        return scope_root.parent
    if case == "is-store":
        return store_root
    if case == "inside-store":
        return store_root / "blobs"
    link = tmp_path / "link-to-scope"
    link.symlink_to(scope_root)
    return link


@pytest.mark.parametrize("case", OVERLAPS)
def test_overlapping_cache_dir_is_refused_by_cas_and_nothing_written(tmp_path, case):
    store, scope = saved_store(tmp_path, {"a.py": b"a" * 100, "d/b.py": b"b" * 100})
    bad = _overlapping(case, Path(scope.root), Path(store.root), tmp_path)
    before = snapshot(scope.root, store.root)
    with pytest.raises(OverlappingDirs, match="cache directory"):
        save_tree(bad, store, scope, ENV_KEY)
    with pytest.raises(OverlappingDirs, match="cache directory"):
        load_tree(bad, store, scope, ENV_KEY)
    assert snapshot(scope.root, store.root) == before


@pytest.mark.parametrize("case", OVERLAPS)
def test_overlapping_cache_dir_is_an_error_from_the_api_and_nothing_written(b10_env, tmp_path, case):
    from b10_transfer import OperationStatus, core

    write_tree(b10_env.local, {"a.py": b"a" * 100})
    assert core.save()[0] is OperationStatus.SUCCESS
    localfs.forget_real_paths()
    bad = _overlapping(case, b10_env.scope, b10_env.store, tmp_path)
    before = snapshot(b10_env.volume)
    for op in (core.save, core.load):
        status, stats = op(bad)
        assert status is OperationStatus.ERROR, (op, stats.reason)
        assert "OverlappingDirs" in stats.reason
    assert snapshot(b10_env.volume) == before
