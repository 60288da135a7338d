"""The no-op check's "verified" note in `.cas-index` (FORMAT §7, cas/quick.py): after one full comparison, later
checks skip the manifest parse; any change the note does not cover sends them back to the full comparison."""
from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from cas import BlobStore, Scope, quick, save_tree
from cas.index import Index

KEY = "test-env"
OLD = time.time() - 3600
FILES = {f"k{i}/triton_{i}.llir": f"kernel {i}\n".encode() * (i + 1) for i in range(10)}


def write(root: Path, files: dict[str, bytes]) -> None:
    for rel, data in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
        os.utime(p, (OLD, OLD))


@pytest.fixture
def saved(tmp_path):
    src = tmp_path / "src"
    write(src, FILES)
    store, scope = BlobStore(tmp_path / "org", create=True), Scope(tmp_path / "scope", create=True)
    assert save_tree(src, store, scope, KEY).manifest_written
    quick._manifests.clear()
    return src, store, scope


def _no_parse(monkeypatch):
    def refuse(*_a, **_k):
        raise AssertionError("the manifest was parsed")

    monkeypatch.setattr(quick, "_parsed", refuse)


def test_second_check_skips_the_parse(saved, monkeypatch):
    src, store, scope = saved
    assert Index(src).verified is None
    assert quick.nothing_new(src, store.root, scope, KEY) == len(FILES)
    assert Index(src).verified is not None
    quick._manifests.clear()
    _no_parse(monkeypatch)  # a parse would fail the check (it answers None, never raises)
    assert quick.nothing_new(src, store.root, scope, KEY) == len(FILES)


def test_an_indexed_file_the_manifest_lacks_is_new(saved, monkeypatch):
    """A save that hashed a new file, wrote the index and died before its commit: the note is gone with it."""
    src, store, scope = saved
    assert quick.nothing_new(src, store.root, scope, KEY) == len(FILES)
    write(src, {"k0/new.cubin": b"new kernel"})
    index = Index(src)
    index.record("k0/new.cubin", os.lstat(src / "k0/new.cubin"), "ab" * 32)
    index.write()
    assert Index(src).verified is None
    assert quick.nothing_new(src, store.root, scope, KEY) is None


def test_another_manifest_is_compared_again(saved, tmp_path):
    """Another replica saved more files: other manifest bytes, so the note does not apply; still nothing new here."""
    src, store, scope = saved
    assert quick.nothing_new(src, store.root, scope, KEY) == len(FILES)
    other = tmp_path / "other"
    write(other, {**FILES, "k9/more.json": b"{}"})
    assert save_tree(other, store, scope, KEY).manifest_written
    before = Index(src).verified
    assert quick.nothing_new(src, store.root, scope, KEY) == len(FILES)
    assert Index(src).verified not in (None, before)


def test_a_changed_file_is_new_despite_the_note(saved):
    src, store, scope = saved
    assert quick.nothing_new(src, store.root, scope, KEY) == len(FILES)
    (src / "k1/triton_1.llir").write_bytes(b"recompiled")
    os.utime(src / "k1/triton_1.llir", (OLD, OLD))
    assert quick.nothing_new(src, store.root, scope, KEY) is None
    os.chmod(src / "k2/triton_2.llir", 0o600)  # mode is content too: ctime moves, the index misses
    assert quick.nothing_new(src, store.root, scope, KEY) is None


def test_gc_pause_nests_and_restores():
    """cas/nogc.py: only the caller that found the collector on turns it back on."""
    import gc

    from cas import nogc

    assert gc.isenabled()
    with nogc.paused():
        assert not gc.isenabled()
        with nogc.paused():
            assert not gc.isenabled()
        assert not gc.isenabled()
    assert gc.isenabled()
    gc.disable()
    try:
        with nogc.paused():
            pass
        assert not gc.isenabled()  # the process's own choice stays
    finally:
        gc.enable()
