"""Writers enforce every limit readers enforce (issue 12): a save whose manifest a reader would refuse fails with
TooLarge and leaves the old manifest whole, so loads and gc go on working."""
from __future__ import annotations

import pytest
from cas_helpers import ENV_KEY, read_tree, write_tree

from cas import BlobStore, Scope, TooLarge, limits, load_tree, save_tree
from cas.gc import collect


def test_save_refuses_a_manifest_over_the_readers_limit(tmp_path, monkeypatch):
    store = BlobStore(tmp_path / "org")
    (tmp_path / "m").mkdir()
    scope = Scope(tmp_path / "m" / "scope", create=True)
    write_tree(tmp_path / "src", {f"k/{i}.py": f"kernel {i}".encode() for i in range(10)})
    save_tree(tmp_path / "src", store, scope, ENV_KEY)
    before = (tmp_path / "m" / "scope" / "manifests" / f"{ENV_KEY}.manifest").read_bytes()

    # A limit the first manifest fits and one with 200 more entries does not (as a 64 MiB one would not).
    monkeypatch.setattr(limits, "MAX_MANIFEST_BYTES", len(scope.read_manifest(ENV_KEY).dumps_plain()) + 2000)
    write_tree(tmp_path / "src", {f"more/{i:04d}/file.py": f"x{i}".encode() for i in range(200)})
    with pytest.raises(TooLarge):
        save_tree(tmp_path / "src", store, Scope(tmp_path / "m" / "scope"), ENV_KEY)
    assert (tmp_path / "m" / "scope" / "manifests" / f"{ENV_KEY}.manifest").read_bytes() == before

    monkeypatch.undo()
    res = load_tree(tmp_path / "dst", store, Scope(tmp_path / "m" / "scope"), ENV_KEY)
    assert not res.misses and set(read_tree(tmp_path / "dst")) == {f"k/{i}.py" for i in range(10)}
    assert not collect(store, grace=7200 * 3).problems  # gc still reads every manifest


def test_save_refuses_more_entries_than_readers_accept(tmp_path, monkeypatch):
    store = BlobStore(tmp_path / "org")
    (tmp_path / "m").mkdir()
    scope = Scope(tmp_path / "m" / "scope", create=True)
    monkeypatch.setattr(limits, "MAX_ENTRIES", 5)
    write_tree(tmp_path / "src", {f"f{i}": b"x" * i for i in range(6)})
    with pytest.raises(TooLarge):
        save_tree(tmp_path / "src", store, scope, ENV_KEY)
    assert scope.read_manifest(ENV_KEY) is None
