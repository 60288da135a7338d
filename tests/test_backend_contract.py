"""The storage seam's contract (cas/storage.py), checked against every backend.

`backend` is parametrised: the POSIX backend on a real directory here; object-store backends add themselves to
BACKEND_FACTORIES (tests/conftest.py fixtures start their servers on 127.0.0.1).
"""
from __future__ import annotations

import os
import threading

import pytest

from cas.errors import StoreUnavailable
from cas.faulty import FaultyBackend
from cas.posix import PosixBackend
from cas.storage import AlreadyExists, BadObject, NotFound, ObjectTooLarge, PreconditionFailed, check_key


@pytest.fixture(params=["posix", "moto", "seaweedfs"])
def backend(request, tmp_path):
    if request.param == "posix":
        b = PosixBackend(tmp_path / "root", create=True)
    else:  # pragma: no cover - object-store params come with their fixtures
        b = request.getfixturevalue(f"{request.param}_backend")
    yield b
    b.close()


def test_put_get_roundtrip_and_ranges(backend):
    info = backend.put("a/b/c", b"hello world")
    assert info.size == 11
    assert backend.get("a/b/c", limit=100) == b"hello world"
    assert backend.get("a/b/c", limit=5, offset=6, length=5) == b"world"
    with pytest.raises(ObjectTooLarge):
        backend.get("a/b/c", limit=10)
    with backend.open("a/b/c", limit=11) as fh:
        assert fh.read() == b"hello world"
    with pytest.raises(ObjectTooLarge):
        backend.open("a/b/c", limit=10)


def test_missing_is_not_found(backend):
    for call in (lambda: backend.get("x/y", limit=1), lambda: backend.stat("x/y"), lambda: backend.delete("x/y"),
                 lambda: backend.touch("x/y"), lambda: backend.move("x/y", "x/z"), lambda: backend.open("x/y", limit=1)):
        with pytest.raises(NotFound):
            call()
    assert list(backend.list("nothing/")) == []


def test_if_absent_has_one_winner(backend):
    wins, errors = [], []

    def create(i: int) -> None:
        try:
            backend.put("locks/one", str(i).encode(), if_absent=True)
            wins.append(i)
        except AlreadyExists:
            errors.append(i)

    threads = [threading.Thread(target=create, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(wins) == 1 and len(errors) == 15
    assert backend.get("locks/one", limit=10) == str(wins[0]).encode()


def test_if_version_compare_and_swap(backend):
    first = backend.put("m/x", b"one")
    second = backend.put("m/x", b"two", if_version=first.version)
    with pytest.raises(PreconditionFailed):
        backend.put("m/x", b"three", if_version=first.version)
    assert backend.get("m/x", limit=10) == b"two"
    with pytest.raises(PreconditionFailed):
        backend.delete("m/x", if_version=first.version)
    backend.delete("m/x", if_version=second.version)
    with pytest.raises(NotFound):
        backend.stat("m/x")
    # Gone: a conditional delete is NotFound, a conditional replace PreconditionFailed, and neither creates it.
    with pytest.raises(NotFound):
        backend.delete("m/x", if_version=second.version)
    with pytest.raises(PreconditionFailed):
        backend.put("m/x", b"four", if_version=second.version)
    with pytest.raises(NotFound):
        backend.stat("m/x")


def test_get_versioned_gives_the_version_of_the_bytes_it_returns(backend):
    with pytest.raises(NotFound):
        backend.get_versioned("m/x", limit=10)
    first = backend.put("m/x", b"one")
    data, version = backend.get_versioned("m/x", limit=10)
    assert (data, version) == (b"one", backend.stat("m/x").version) and version == first.version
    with pytest.raises(ObjectTooLarge):
        backend.get_versioned("m/x", limit=2)
    backend.put("m/x", b"two, longer")  # replaced since the read: a put conditioned on the read fails
    with pytest.raises(PreconditionFailed):
        backend.put("m/x", b"three", if_version=version)
    data, version = backend.get_versioned("m/x", limit=100)
    assert data == b"two, longer"
    backend.put("m/x", b"three", if_version=version)
    assert backend.get("m/x", limit=100) == b"three"
    counted = FaultyBackend(backend)
    counted.get_versioned("m/x", limit=100)
    assert counted.calls == {"get": 1}  # one request where the backend can (S3: the GET's ETag; a volume: fstat)


def test_callable_payload_aborts_cleanly(backend):
    class Boom(Exception):
        pass

    def fill(out):
        out.write(b"partial")
        raise Boom()

    with pytest.raises(Boom):
        backend.put("p/q", fill)
    with pytest.raises(NotFound):
        backend.stat("p/q")
    assert [i for i in backend.list("p/") if i.kind == "object"] == []


def test_list_move_touch(backend):
    backend.put("blobs/ab/x1", b"1")
    backend.put("blobs/cd/x2", b"22")
    tops = {i.key: i.kind for i in backend.list("blobs/")}
    assert tops == {"blobs/ab/": "prefix", "blobs/cd/": "prefix"}
    assert {(i.key, i.size) for i in backend.list("blobs/cd/")} == {("blobs/cd/x2", 2)}
    backend.move("blobs/cd/x2", "trash/cd/x2")
    assert backend.get("trash/cd/x2", limit=2) == b"22"
    with pytest.raises(NotFound):
        backend.stat("blobs/cd/x2")
    before = backend.stat("trash/cd/x2").mtime
    backend.touch("trash/cd/x2")
    assert backend.stat("trash/cd/x2").mtime >= before
    assert abs(backend.now() - backend.stat("trash/cd/x2").mtime) < 60


def test_keys_are_validated(backend):
    for bad in ("", "/abs", "a/../b", "a//b", "a/./b", "a\\b", "a/b c", "x" * 600, "a/\x00"):
        with pytest.raises(ValueError):
            check_key(bad)
        with pytest.raises(ValueError):
            backend.put(bad, b"")


# -- POSIX hardening: planted things are never followed or read ---------------------------------------------------
def test_posix_planted_fifo_symlink_dir_device(tmp_path):
    root = tmp_path / "root"
    b = PosixBackend(root, create=True)
    b.put("d/ok", b"fine")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_bytes(b"secret")
    os.mkfifo(root / "d" / "fifo")
    os.symlink(outside / "secret", root / "d" / "link")
    os.mkdir(root / "d" / "dir")
    os.symlink(outside, root / "linkdir")
    for key in ("d/fifo", "d/link", "d/dir"):
        with pytest.raises(BadObject):
            b.get(key, limit=100)
        with pytest.raises(BadObject):
            b.stat(key)
    with pytest.raises(BadObject):
        b.put("linkdir/x", b"redirected")
    with pytest.raises(BadObject):
        list(b.list("linkdir/"))
    kinds = {i.key: i.kind for i in b.list("d/")}
    assert kinds == {"d/ok": "object", "d/fifo": "other", "d/link": "other", "d/dir/": "prefix"}
    assert {i.key: i.kind for i in b.list("")}["linkdir"] == "other"
    assert sorted(os.listdir(outside)) == ["secret"]


def test_posix_missing_root_is_unavailable_and_never_created(tmp_path):
    with pytest.raises(StoreUnavailable):
        PosixBackend(tmp_path / "nope").get("a", limit=1)
    with pytest.raises(StoreUnavailable):
        PosixBackend(tmp_path / "no" / "parent", create=True).put("a", b"")
    assert not (tmp_path / "no").exists()


def test_posix_root_replaced_mid_operation(tmp_path):
    root = tmp_path / "root"
    b = PosixBackend(root, create=True)
    b.put("blobs/x", b"1")
    os.rename(root, tmp_path / "moved")
    with pytest.raises(StoreUnavailable):
        b.check_alive()
    assert not root.exists()


def test_faulty_backend_counts_and_fails(tmp_path):
    seen = []
    b = FaultyBackend(PosixBackend(tmp_path / "r", create=True), before=lambda verb, key: seen.append((verb, key)))
    b.put("a/b", b"x")
    b.fail("get", "a/", StoreUnavailable("gone"), times=1)
    with pytest.raises(StoreUnavailable):
        b.get("a/b", limit=1)
    assert b.get("a/b", limit=1) == b"x"
    assert b.calls["get"] == 2 and ("put", "a/b") in seen
