"""The recent-savers record (FORMAT §4a): peer lookup in O(1) of the organisation's size, safe against hostile
writers."""
from __future__ import annotations

import os

import msgpack
import pytest

from cas import BlobStore, Scope, save_tree
from cas import recent
from cas.faulty import FaultyBackend
from cas.posix import PosixBackend

from cas_helpers import ENV_KEY, write_tree

SHARED = {f"k/{i}.py": (f"kernel {i} " * 50).encode() for i in range(20)}


def _deployment(tmp_path, store, n: int, extra: dict | None = None) -> Scope:
    (tmp_path / f"m{n}").mkdir(exist_ok=True)
    scope = Scope(tmp_path / f"m{n}" / "scope", create=True)
    src = tmp_path / f"src{n}"
    write_tree(src, {**SHARED, **(extra or {})})
    save_tree(src, store, scope, ENV_KEY)
    return scope


def _roots_read(backend: FaultyBackend) -> int:
    return sum(1 for verb, key in backend.log if verb == "get" and key.startswith("roots/"))


class _Logged(FaultyBackend):
    def __init__(self, inner):
        super().__init__(inner, before=lambda verb, key: self.log.append((verb, key)))
        self.log: list[tuple[str, str]] = []


@pytest.mark.parametrize("n", [1, 30])
def test_peer_lookup_reads_a_bounded_number_of_roots(tmp_path, n):
    backend = _Logged(PosixBackend(tmp_path / "org", create=True))
    store = BlobStore(backend)
    for i in range(n):
        _deployment(tmp_path, store, i, {f"own{i}": os.urandom(64)})
    backend.log.clear()
    _deployment(tmp_path, store, 999, {"new": b"a new small file"})
    # At most RECENT_MAX peers' roots (plus our own), however many deployments the organisation has.
    assert _roots_read(backend) <= recent.RECENT_MAX + 1
    assert len(recent.read_recent(store, ENV_KEY)) == min(n + 1, recent.RECENT_MAX)


def test_record_is_bounded_newest_first_and_deduplicated(tmp_path):
    store = BlobStore(tmp_path / "org")
    ids = [f"{i:032x}" for i in range(20)]
    for i, sid in enumerate(ids):
        assert recent.note_saver(store, ENV_KEY, sid, now=1000.0 + i)
    assert recent.read_recent(store, ENV_KEY) == ids[::-1][: recent.RECENT_MAX]
    recent.note_saver(store, ENV_KEY, ids[0], now=5000.0)
    assert recent.read_recent(store, ENV_KEY)[0] == ids[0]
    assert len(set(recent.read_recent(store, ENV_KEY))) == recent.RECENT_MAX


@pytest.mark.parametrize("plant", ["garbage", "huge", "fifo", "directory", "bad-ids", "symlink"])
def test_hostile_record_costs_nothing_but_dedup(tmp_path, plant):
    store = BlobStore(tmp_path / "org")
    path = tmp_path / "org" / "recent" / f"{ENV_KEY}.recent"
    path.parent.mkdir(parents=True, exist_ok=True)
    if plant == "garbage":
        path.write_bytes(b"\xc1\xff not msgpack")
    elif plant == "huge":
        path.write_bytes(msgpack.packb([["0" * 32, 1.0]] * 10) + b"x" * (1 << 20))
    elif plant == "fifo":
        os.mkfifo(path)
    elif plant == "directory":
        path.mkdir()
    elif plant == "bad-ids":
        path.write_bytes(msgpack.packb([["../../etc", 1.0], [123, 2.0], ["A" * 32, 3.0], ["0" * 32, True]]))
    elif plant == "symlink":
        (tmp_path / "outside").write_bytes(msgpack.packb([["f" * 32, 1.0]]))
        os.symlink(tmp_path / "outside", path)
    assert recent.read_recent(store, ENV_KEY) == []
    scope = _deployment(tmp_path, store, 1)  # the save goes through and lists itself where it can
    assert scope.read_manifest(ENV_KEY) is not None
    if plant in ("garbage", "huge", "bad-ids", "symlink"):
        assert recent.read_recent(store, ENV_KEY) == [scope.scope_id]
    if plant == "symlink":
        assert msgpack.unpackb((tmp_path / "outside").read_bytes()) == [["f" * 32, 1.0]]  # never written through


@pytest.mark.parametrize("name", ["", ".hidden", "a/b", "../x", "x" * 65, "sp ace", "ünï"])
def test_family_names_are_validated(name):
    with pytest.raises(ValueError):
        recent.record_key(ENV_KEY, name)


def test_family_record_is_separate(tmp_path):
    store = BlobStore(tmp_path / "org")
    recent.note_saver(store, ENV_KEY, "a" * 32, "llama-8b")
    assert recent.read_recent(store, ENV_KEY, "llama-8b") == ["a" * 32]
    assert recent.read_recent(store, ENV_KEY) == []
    assert recent.read_recent(store, ENV_KEY, "other") == []
