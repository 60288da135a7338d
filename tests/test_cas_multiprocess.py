"""Many processes at once on one store and one manifest: 16 savers of overlapping trees (each saving twice) while
loaders keep loading and checking every file they see against the manifest they loaded."""
from __future__ import annotations

import os
import random

import pytest

from cas import BlobStore, Scope, load_tree

from cas_helpers import ENV_KEY, blob_id, check_root_names_manifest, entries_from_json, entry_bytes, read_tree, \
    spawn, temp_files, unexpected_files, verify_all_blobs, write_tree

SAVERS = 16
LOADERS = 4


def _trees(tmp_path):
    """Per saver: two trees (the second a superset of the first, with one conflicting path changed). They overlap:
    a shared pool of identical files, a few paths every saver writes with its own content, and files of its own."""
    rng = random.Random(1234)
    pool = {f"triton/{i % 7}/k{i}/kernel.cubin": rng.randbytes(rng.randint(0, 20_000)) for i in range(40)}
    pool.update({f"fxgraph/g{i}/entry": (f"graph {i} " * rng.randint(1, 900)).encode() for i in range(10)})
    conflicts = [f"conflict/c{i}.best_config" for i in range(4)]
    out = []
    for s in range(SAVERS):
        shared = dict(rng.sample(sorted(pool.items()), 25))
        own = {f"own/{s}/f{i}.py": f"saver {s} file {i}\n".encode() * rng.randint(1, 300) for i in range(6)}
        mine = {c: f"saver {s} says {c}".encode() for c in rng.sample(conflicts, 2)}
        first = {**shared, **own, **mine}
        second = dict(first)
        second.update({f"own/{s}/later{i}.py": f"later {s} {i}".encode() for i in range(3)})
        second.update(dict(rng.sample(sorted(pool.items()), 5)))
        c = rng.choice(conflicts)
        second[c] = f"saver {s} later says {c}".encode()
        out.append((first, second))
    return out, set(conflicts)


@pytest.mark.timeout(300)
def test_concurrent_savers_and_loaders(tmp_path):
    store_root, scope_root = tmp_path / "store", tmp_path / "scope"
    BlobStore(store_root)
    Scope(scope_root, create=True)
    trees, conflicts = _trees(tmp_path)
    srcs = []
    for s, (first, second) in enumerate(trees):
        write_tree(tmp_path / "src" / f"{s}a", first)
        write_tree(tmp_path / "src" / f"{s}b", second)
        srcs.append((tmp_path / "src" / f"{s}a", tmp_path / "src" / f"{s}b"))

    stop = tmp_path / "stop"
    common = ["--store", store_root, "--scope", scope_root]
    loaders = [spawn(["load", tmp_path / f"loader{i}", *common, "--until", stop, "--max-loads", 15,
                      *(["--same-dir"] if i % 2 else [])]) for i in range(LOADERS)]
    savers = [spawn(["save", a, b, *common, "--threads", 4]) for a, b in srcs]
    reports = []
    try:
        for p in savers:
            out, err = p.communicate(timeout=240)
            assert p.returncode == 0, err[-3000:]
            reports.append(_last_json(out))
    finally:
        stop.touch()
        loader_out = []
        for p in loaders:
            out, err = p.communicate(timeout=120)
            loader_out.append((p.returncode, out, err))

    # Every loader ran, saw no partial or foreign file, and every load restored the whole manifest it read.
    found = 0
    for rc, out, err in loader_out:
        assert rc == 0, err[-3000:]
        rep = _last_json(out)
        assert rep["bad"] == [], rep["bad"]
        assert rep["found"] >= 1  # each loader's last load starts after every saver finished
        found += rep["found"]
        print(f"loader: {rep['loads']} loads, {rep['found']} with a manifest, {rep['files_checked']} files checked")

    print("save seconds:", sorted(round(sv["seconds"], 1) for rep in reports for sv in rep["saves"]))
    scope = Scope(scope_root)
    store = BlobStore(store_root, create=False)
    manifest = scope.read_manifest(ENV_KEY).entries
    every = {}
    for rep in reports:
        assert len(rep["saves"]) == 2
        for save in rep["saves"]:
            for p, e in entries_from_json(save["entries"]).items():
                every.setdefault(p, set()).add(e)
    assert set(manifest) == set(every)  # nothing lost, nothing invented
    for p, candidates in every.items():
        if p in conflicts:
            assert manifest[p] in candidates
        else:
            assert candidates == {manifest[p]}, p  # identical content wherever a path is not a conflict
    # Every save's later conflicting write is the newest observation of its saver: the final value of each
    # conflict path is the content of *some* save that wrote it, and the savers' own paths are all present.
    for s, (first, second) in enumerate(trees):
        for p in second:
            assert p in manifest

    for e in manifest.values():
        assert blob_id(entry_bytes(store, e)) == e.blob_id  # its loose blob or its slice of its pack, verified
    stored = {info.id for info in store.iter_blobs()}
    assert {e.stored_id for e in manifest.values()} <= stored  # packs other saves superseded may be there too
    assert verify_all_blobs(store) == len(stored)
    assert os.listdir(store_root / "quarantine") == []
    assert temp_files(store_root) == [] and temp_files(scope_root) == []
    assert unexpected_files(store_root, scope_root) == []
    assert not [n for n in os.listdir(scope_root / "manifests") if n.endswith(".lock")]  # all released
    check_root_names_manifest(store, scope)

    # A final load reproduces the manifest exactly.
    res = load_tree(tmp_path / "final", store, scope, ENV_KEY, verify=True)
    assert res.misses == [] and res.restored == len(manifest)
    got = read_tree(tmp_path / "final")
    assert set(got) == set(manifest)


def _last_json(out: str) -> dict:
    import json

    lines = [ln for ln in out.splitlines() if ln.startswith("{")]
    assert lines, out[-2000:]
    return json.loads(lines[-1])
