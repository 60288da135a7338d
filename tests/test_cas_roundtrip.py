"""Round trips through the store: save a tree, load it elsewhere, get exactly the same files back (FORMAT §2, §3)."""
from __future__ import annotations

import itertools
import os
import random
import stat
import tempfile

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cas import BlobStore, Scope, load_tree, save_tree
from cas.paths import check_entry_path, is_transient

from cas_helpers import ENV_KEY, blob_id, entry_bytes, expected_entries, manifest_entries, open_store, read_tree, \
    temp_files, verify_all_blobs, write_tree

_counter = itertools.count()


def _legal_name(name: str) -> bool:
    return (name not in (".", "..") and not is_transient(name) and len(name.encode("utf-8")) <= 255)


# Odd but legal path components: unicode (no surrogates), spaces, control characters, leading dots and dashes.
names = st.one_of(
    st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="/\\\x00"), min_size=1, max_size=12),
    st.sampled_from([" ", "  lead", "trail ", "-x", ".hidden", "é", "日本語", "a b c", "\t", "new\nline", "x" * 255,
                     "é" * 127, "🙂", "c8d3f.py", "__grp__k.json", "locks_not", "lock", "a.lock.d", "tmp"]),
).filter(_legal_name)

modes = st.sampled_from([0o644, 0o600, 0o755, 0o700, 0o444, 0o400, 0o000, 0o777, 0o666, 0o4755, 0o2755, 0o1777,
                         0o6777, 0o640, 0o750])
contents = st.one_of(st.just(b""), st.binary(max_size=300), st.builds(lambda b, n: b * n, st.binary(min_size=1,
                     max_size=8), st.integers(1, 3000)))


@st.composite
def trees(draw, depth=0):
    """{name: bytes-with-mode | subtree}: a directory tree (names are unique per directory by construction)."""
    keys = draw(st.lists(names, max_size=6 if depth else 8, unique_by=lambda s: s))
    out = {}
    for k in keys:
        if depth < 3 and draw(st.integers(0, 3)) == 0:
            out[k] = draw(trees(depth=depth + 1))
        else:
            out[k] = (draw(contents), draw(modes))
    return out


def flatten(tree: dict, prefix: str = "") -> dict:
    files = {}
    for name, value in tree.items():
        if isinstance(value, dict):
            files.update(flatten(value, prefix + name + "/"))
        else:
            files[prefix + name] = value
    return files


def fresh(base) -> str:
    path = os.path.join(base, f"ex{next(_counter)}")
    os.makedirs(path)
    return path


@pytest.fixture(scope="module")
def shared_store(tmp_path_factory):
    """One store for every hypothesis example (content addressed: sharing it is what production does)."""
    return BlobStore(tmp_path_factory.mktemp("store") / "store")


@settings(max_examples=int(os.environ.get("CAS_HYPOTHESIS_EXAMPLES", "60")), deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                  HealthCheck.too_slow])
@given(tree=trees())
def test_round_trip_random_tree(tmp_path, shared_store, tree):
    files = flatten(tree)
    base = fresh(tmp_path)
    src, dst = os.path.join(base, "src"), os.path.join(base, "dst")
    os.makedirs(src)
    write_tree(src, files)
    scope = Scope(os.path.join(base, "scope"), create=True)

    res = save_tree(src, shared_store, scope, ENV_KEY, threads=4)
    assert res.files == len(files)
    if files:
        assert res.manifest_written
        assert manifest_entries(scope) == expected_entries(files)
    else:
        assert not res.manifest_written

    lres = load_tree(dst, shared_store, scope, ENV_KEY, threads=4)
    assert not lres.misses
    assert lres.restored == len(files)
    got = read_tree(dst) if os.path.isdir(dst) else {}
    want = {rel: (data, (mode & 0o755) | 0o600) for rel, (data, mode) in files.items()}
    assert got == want
    for rel, (data, mode) in got.items():
        assert not mode & (stat.S_ISUID | stat.S_ISGID | stat.S_ISVTX | 0o022), (rel, oct(mode))
        assert mode & 0o600 == 0o600
    if os.path.isdir(dst):
        assert temp_files(dst) == []

    # Loading again changes nothing and restores nothing.
    again = load_tree(dst, shared_store, scope, ENV_KEY, threads=2)
    assert again.restored == 0 and again.present == len(files)
    if files:
        assert read_tree(dst) == want


def test_setuid_and_writable_bits_stripped(tmp_path):
    store, scope = open_store(tmp_path)
    files = {"suid": (b"a", 0o4755), "sgid": (b"b", 0o2711), "sticky": (b"c", 0o1777), "ww": (b"d", 0o666),
             "none": (b"e", 0o000), "ro": (b"f", 0o444)}
    write_tree(tmp_path / "src", files)
    save_tree(tmp_path / "src", store, scope, ENV_KEY)
    recorded = manifest_entries(scope)
    for rel, (_, mode) in files.items():
        assert recorded[rel].mode == mode & 0o777  # only permission bits are recorded
    load_tree(tmp_path / "dst", store, scope, ENV_KEY)
    got = read_tree(tmp_path / "dst")
    assert {rel: m for rel, (_, m) in got.items()} == {
        "suid": 0o755, "sgid": 0o711, "sticky": 0o755, "ww": 0o644, "none": 0o600, "ro": 0o644}


def test_load_into_non_empty_dir_keeps_other_files(tmp_path):
    store, scope = open_store(tmp_path)
    files = random_files(30, seed=1)
    write_tree(tmp_path / "src", files)
    save_tree(tmp_path / "src", store, scope, ENV_KEY)
    dst = tmp_path / "dst"
    local = {"unrelated.txt": b"mine", "d0/also-mine": b"keep me", "deep/er/x": b"x"}
    write_tree(dst, local)
    # A local file at an entry's path with a different size is replaced; one with the same size is kept (by size).
    first = sorted(files)[0]
    write_tree(dst, {first: files[first] + b"longer"})
    res = load_tree(dst, store, scope, ENV_KEY)
    assert not res.misses
    got = read_tree(dst)
    for rel, data in {**files, **local}.items():
        assert got[rel][0] == data, rel
    assert set(got) == set(files) | set(local)


def random_files(n, seed, prefix=""):
    from cas_helpers import random_tree

    return random_tree(random.Random(seed), n, prefix=prefix)


def test_partial_load_restores_exactly_the_missing(tmp_path):
    store, scope = open_store(tmp_path)
    files = random_files(40, seed=2)
    write_tree(tmp_path / "src", files)
    save_tree(tmp_path / "src", store, scope, ENV_KEY)
    dst = tmp_path / "dst"
    load_tree(dst, store, scope, ENV_KEY)
    rng = random.Random(3)
    gone = rng.sample(sorted(files), 9)
    for rel in gone:
        os.unlink(dst / rel)
    before = {rel: os.stat(dst / rel).st_ino for rel in files if rel not in gone}
    res = load_tree(dst, store, scope, ENV_KEY)
    assert res.restored == len(gone)
    assert res.present == len(files) - len(gone)
    assert not res.misses
    assert {rel: d for rel, (d, _) in read_tree(dst).items()} == files
    # The files that were there were not rewritten.
    assert {rel: os.stat(dst / rel).st_ino for rel in before} == before


def test_verify_option_rehashes(tmp_path):
    store, scope = open_store(tmp_path)
    files = {"a/x.py": b"print('hello world')\n" * 50, "b.bin": bytes(range(256)) * 4, "empty": b""}
    write_tree(tmp_path / "src", files)
    save_tree(tmp_path / "src", store, scope, ENV_KEY)
    dst = tmp_path / "dst"
    load_tree(dst, store, scope, ENV_KEY)
    # Same size, different content: a size check keeps it, verify replaces it.
    tampered = bytearray(files["a/x.py"])
    tampered[10] ^= 0xFF
    (dst / "a/x.py").write_bytes(bytes(tampered))
    res = load_tree(dst, store, scope, ENV_KEY)
    assert res.restored == 0
    assert (dst / "a/x.py").read_bytes() == bytes(tampered)
    res = load_tree(dst, store, scope, ENV_KEY, verify=True)
    assert res.restored == 1 and res.present == 2
    assert (dst / "a/x.py").read_bytes() == files["a/x.py"]
    res = load_tree(dst, store, scope, ENV_KEY, verify=True)
    assert res.restored == 0 and res.present == 3


def test_transient_files_never_saved(tmp_path):
    store, scope = open_store(tmp_path)
    keep = {"a/real.py": b"1", "b/c/real.bin": b"2", "lockless/x": b"3", "x.locked": b"4", "tmpdir/y": b"5",
            "a.tmpfile": b"6", "tmp-x": b"7"}
    transient = {"locks/abc.lock": b"l", "locks/sub/deeper": b"l", "a/foo.lock": b"l", "triton/0/x.lock": b"l",
                 ".tmp-host-1-abcdef": b"t", "a/.tmp-other": b"t", "fxgraph/k/entry.tmp": b"t", "x.tmp": b"t",
                 "dir.lock/inside": b"t"}
    write_tree(tmp_path / "src", {**keep, **transient})
    os.symlink("/etc/passwd", tmp_path / "src" / "link-out")  # symlinks are not saved either
    os.mkfifo(tmp_path / "src" / "fifo")
    res = save_tree(tmp_path / "src", store, scope, ENV_KEY)
    assert res.files == len(keep)
    assert set(manifest_entries(scope)) == set(keep)
    load_tree(tmp_path / "dst", store, scope, ENV_KEY)
    assert {rel: d for rel, (d, _) in read_tree(tmp_path / "dst").items()} == keep


def test_illegal_local_names_are_skipped_not_fatal(tmp_path):
    """A local file whose name cannot be an entry path (backslash, not UTF-8) must not make the save crash or
    produce a manifest every reader rejects: it is skipped and the rest is saved."""
    store, scope = open_store(tmp_path)
    src = tmp_path / "src"
    write_tree(src, {"ok/a": b"a", "ok/b": b"b"})
    with open(os.path.join(os.fsencode(src), b"ok", b"bad\\name"), "wb") as fh:
        fh.write(b"backslash")
    with open(os.path.join(os.fsencode(src), b"not-utf8-\xff\xfe"), "wb") as fh:
        fh.write(b"bytes")
    os.makedirs(os.path.join(os.fsencode(src), b"dir-\xff"))
    with open(os.path.join(os.fsencode(src), b"dir-\xff", b"inner"), "wb") as fh:
        fh.write(b"inner")
    res = save_tree(src, store, scope, ENV_KEY)
    assert res.manifest_written
    entries = manifest_entries(scope)  # parses: the manifest is legal
    assert set(entries) == {"ok/a", "ok/b"}
    for rel in entries:
        check_entry_path(rel)
    lres = load_tree(tmp_path / "dst", store, scope, ENV_KEY)
    assert lres.restored == 2 and not lres.misses


def test_large_file_streams_and_round_trips(tmp_path):
    """Files above the whole-file limit take the streaming paths of put and get."""
    from cas import blobstore

    store, scope = open_store(tmp_path)
    rng = random.Random(4)
    big = rng.randbytes(blobstore.WHOLE_FILE_LIMIT // 2) + bytes(blobstore.WHOLE_FILE_LIMIT // 2 + 12345)
    write_tree(tmp_path / "src", {"big.cubin": big, "small": b"s"})
    save_tree(tmp_path / "src", store, scope, ENV_KEY)
    assert verify_all_blobs(store) == 3  # two files and the manifest
    load_tree(tmp_path / "dst", store, scope, ENV_KEY)
    assert (tmp_path / "dst" / "big.cubin").read_bytes() == big
    assert manifest_entries(scope)["big.cubin"].blob_id == blob_id(big)


def test_identical_files_stored_once(tmp_path):
    from cas import limits, pack

    store, scope = open_store(tmp_path)
    files = {f"d{i}/same.bin": b"identical content" * 100 for i in range(10)}
    files["other"] = b"different"
    big = b"big identical content " * (pack.PACK_FILE_MAX // 22 + 1)  # above PACK_FILE_MAX: a loose blob
    files.update({f"b{i}/big.bin": big for i in range(3)})
    write_tree(tmp_path / "src", files)
    res = save_tree(tmp_path / "src", store, scope, ENV_KEY)
    assert res.blobs_uploaded == 3  # three distinct contents
    assert res.packs_written == 1
    # One pack for the two small contents, one loose blob for the big one, the manifest's own blob.
    assert len(list(store.iter_blobs())) == 3
    entries = manifest_entries(scope)
    small = [e for p, e in entries.items() if not p.endswith("big.bin")]
    assert len({(e.pack, e.offset) for e in small if e.blob_id == blob_id(b"identical content" * 100)}) == 1
    (pack_id,) = {e.pack for e in small}
    assert len(store.get_bytes(pack_id, limits.MAX_PACK_BYTES)) == 1700 + 9  # each small content once
    assert {e.stored_id for p, e in entries.items() if p.endswith("big.bin")} == {blob_id(big)}
    load_tree(tmp_path / "dst", store, scope, ENV_KEY)
    assert {rel: d for rel, (d, _) in read_tree(tmp_path / "dst").items()} == files


def test_env_keys_are_separate(tmp_path):
    store, scope = open_store(tmp_path)
    write_tree(tmp_path / "a", {"x": b"from a"})
    write_tree(tmp_path / "b", {"x": b"from b!"})
    save_tree(tmp_path / "a", store, scope, "gpu-a")
    save_tree(tmp_path / "b", store, scope, "gpu-b")
    load_tree(tmp_path / "da", store, scope, "gpu-a")
    load_tree(tmp_path / "db", store, scope, "gpu-b")
    assert (tmp_path / "da" / "x").read_bytes() == b"from a"
    assert (tmp_path / "db" / "x").read_bytes() == b"from b!"
    assert scope.env_keys() == ["gpu-a", "gpu-b"]
    for bad in ("", ".hidden", "a/b", "x" * 129, "spa ce"):
        with pytest.raises(ValueError):
            save_tree(tmp_path / "a", store, scope, bad)


def test_load_without_manifest_is_a_miss(tmp_path):
    store, scope = open_store(tmp_path)
    res = load_tree(tmp_path / "dst", store, scope, ENV_KEY)
    assert not res.manifest_found and res.restored == 0


def test_file_changed_while_saving_is_not_published(tmp_path, monkeypatch):
    """A file modified between hashing and uploading: its upload is discarded, its entry is left for the next save,
    and the manifest never names a blob that does not hold the entry's content."""
    from cas import localfs

    store, scope = open_store(tmp_path)
    src = tmp_path / "src"
    write_tree(src, {"stable": b"stable", "moving.py": b"version 1" * 100})
    reads: list[str] = []

    def modify_before_second_read(event, path):  # the test seam: runs before each local read of a save
        reads.append(path)
        if path.endswith("moving.py") and reads.count(path) == 2:  # hashed once; now about to be packed
            with open(path, "wb") as fh:
                fh.write(b"version 2" * 100)  # same size, different content

    monkeypatch.setattr(localfs, "hook", modify_before_second_read)
    res = save_tree(src, store, scope, ENV_KEY, use_index=False)
    assert res.skipped_changed == 1
    entries = manifest_entries(scope)
    assert set(entries) == {"stable"}
    for e in entries.values():
        assert blob_id(entry_bytes(store, e)) == e.blob_id  # through its pack
    assert {e.stored_id for e in entries.values()} == {entries["stable"].pack}
    assert verify_all_blobs(store) == 2  # the pack of 'stable' and the manifest: no blob under a wrong id
    monkeypatch.setattr(localfs, "hook", None)
    save_tree(src, store, scope, ENV_KEY, use_index=False)
    assert manifest_entries(scope)["moving.py"].blob_id == blob_id(b"version 2" * 100)
