"""Hostile or broken input through the public API (issue 6, point 3): `load_compile_cache()` / `save_compile_cache()`
run in a subprocess with the env vars pointed at temp dirs, as a model server would call them. Each case must give a
clear status and log line, lose nothing (the store verifies, local files stay, a following save heals the
deployment), write nothing outside the target directory, and never crash or exhaust memory.

The subprocess stubs only `b10_transfer.environment.environment()` (a fixed CPU environment) so that it does not
import torch: the environment key is not what is under test here.
"""
from __future__ import annotations

import json
import os
import resource
import stat
import subprocess
import sys
from pathlib import Path

import blake3
import msgpack
import pytest
import zstandard

from conftest import child_environ

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAKE_ENV = {"device_type": "cpu", "cpu_architecture": "x86_64", "torch_version": "hostile", "triton_version": "none"}

_RUNNER = r"""
import json, logging, sys
logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
import b10_transfer, b10_transfer.core as core, b10_transfer.environment as environment
from b10_transfer import report
environment.environment = lambda: dict(FAKE)
core.environment = environment.environment
import os
for arg in sys.argv[1:]:
    op, _, local = arg.partition(":")
    if local:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = local
    status = {"save": b10_transfer.save_compile_cache, "load": b10_transfer.load_compile_cache}[op]()
    print(json.dumps({"op": op, "status": status.name, "stats": report.last(op).as_dict()}), flush=True)
""".replace("FAKE", repr(FAKE_ENV))


def env_key() -> str:
    from b10_transfer.environment import environment_key

    return environment_key(FAKE_ENV)


class World:
    def __init__(self, tmp: Path, existing: bool = False):
        self.tmp = tmp
        self.volume = tmp / "volume"
        if not existing:
            (self.volume / "model").mkdir(parents=True)
            (self.volume / "org").mkdir()
        self.local = tmp / "local" / "inductor"
        self.outside = tmp / "outside"  # must never be written, read into the store, or deleted
        self.outside.mkdir()
        (self.outside / "secret").write_bytes(b"outside secret\n")
        self.environ = child_environ(self.volume, self.local)

    @property
    def scope(self) -> Path:
        return self.volume / "model" / "compile_cache"

    @property
    def store(self) -> Path:
        return self.volume / "org" / "b10_cas"

    @property
    def manifest_path(self) -> Path:
        return self.scope / "manifests" / f"{env_key()}.manifest"

    def api(self, *ops: str, local: Path | None = None, drop_caps: bool = False, limit_as: int | None = None,
            timeout: float = 120) -> tuple[list[dict], str]:
        env = dict(self.environ)
        if local is not None:
            env["TORCHINDUCTOR_CACHE_DIR"] = str(local)
        cmd = [sys.executable, "-c", _RUNNER, *ops]
        if drop_caps:  # root without the capabilities that bypass permission bits: mode bits apply to it
            cmd = ["setpriv", "--bounding-set=-dac_override,-dac_read_search,-fowner", "--", *cmd]

        def limits():
            if limit_as:
                resource.setrlimit(resource.RLIMIT_AS, (limit_as, limit_as))

        proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout,
                              preexec_fn=limits)
        assert proc.returncode == 0, f"the API raised or crashed (rc {proc.returncode}): {proc.stderr[-3000:]}"
        return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")], proc.stderr

    def store_blobs(self) -> dict[str, bytes]:
        out = {}
        for fan in (self.store / "blobs").iterdir():
            for p in fan.iterdir():
                if not p.name.startswith(".tmp-"):
                    out[p.name] = p.read_bytes()
        return out

    def verify_store(self) -> int:
        from cas import BlobStore

        store = BlobStore(self.store, create=False)
        n = 0
        for info in store.iter_blobs():
            store.verify(info.id)
            n += 1
        return n

    def manifest_entries(self) -> dict:
        from cas import Scope

        m = Scope(self.scope).read_manifest(env_key())
        return dict(m.entries) if m else {}

    def outside_intact(self) -> None:
        assert sorted(p.name for p in self.outside.iterdir()) == ["secret"], list(self.outside.iterdir())
        assert (self.outside / "secret").read_bytes() == b"outside secret\n"


def write(root: Path, files: dict[str, bytes]) -> None:
    for rel, data in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)


def tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and not p.is_symlink() and p.name != ".cas-index"}


# Three small files, stored together in one pack (FORMAT §2), and one above cas.pack.PACK_FILE_MAX (1 MiB), stored as
# its own loose blob: the store tests damage either kind of stored blob.
BIG = "triton/1/big/k.cubin"
CACHE = {"ab/cabc.py": b"# kernel\n" * 200, "fxgraph/xy/key/0": os.urandom(3000), "triton/0/h/k.cubin": b"\x7fELF" * 500,
         BIG: os.urandom((1 << 20) + 3000)}


@pytest.fixture(scope="module")
def _saved_template(tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("hostile-template")
    w = World(base)
    write(w.local, CACHE)
    (out,), _ = w.api("save")
    assert out["status"] == "SUCCESS"
    return base


@pytest.fixture
def world(tmp_path, _saved_template) -> World:
    """A volume where CACHE was saved through the API, and the replica's local cache (a copy of one saved once)."""
    import shutil

    for name in ("volume", "local", "outside"):
        shutil.copytree(_saved_template / name, tmp_path / name, symlinks=True)
    shutil.rmtree(tmp_path / "outside")
    return World(tmp_path, existing=True)


def status_of(results, op) -> tuple[str, str]:
    r = [x for x in results if x["op"] == op][-1]
    return r["status"], r["stats"].get("reason") or ""


# -- manifests -----------------------------------------------------------------------------------------------------
def _valid_doc(entries: dict | None = None) -> dict:
    ident = bytes.fromhex("ab" * 32)
    return {"format": 1, "env_key": env_key(), "env": {}, "created": 1.0, "updated": 1.0,
            "entries": entries if entries is not None else {"ok/file": [ident, 10, 0o644]}}


def _entry_doc(path: str, mode: int = 0o644, size: int = 10) -> bytes:
    return msgpack.packb(_valid_doc({"ok/file": [bytes(32), 10, 0o644], path: [bytes(32), size, mode]}),
                         use_bin_type=True)


def _dup_keys() -> bytes:
    # A map of 2 entries whose keys are the same path: msgpack allows it, a dict would silently keep one.
    entry = msgpack.packb([bytes(32), 10, 0o644], use_bin_type=True)
    body = b"\x82" + msgpack.packb("a/b") + entry + msgpack.packb("a/b") + entry
    doc = _valid_doc()
    doc["entries"] = {}
    packed = msgpack.packb(doc, use_bin_type=True)
    return packed.replace(msgpack.packb("entries") + b"\x80", msgpack.packb("entries") + body)


def _valid_bytes() -> bytes:
    return msgpack.packb(_valid_doc(), use_bin_type=True)


HOSTILE_MANIFESTS = {
    "truncated": lambda: _valid_bytes()[: len(_valid_bytes()) // 2],
    "garbage": lambda: os.urandom(4096),
    "empty": lambda: b"",
    "not-a-map": lambda: msgpack.packb([1, 2, 3]),
    "map32-claims-4G-entries": lambda: b"\xdf\xff\xff\xff\xff" + b"\xa1a\x01" * 10,
    "str32-claims-4GiB": lambda: b"\x81\xdb\xff\xff\xff\xff" + b"x" * 100,
    "bin32-claims-4GiB": lambda: b"\x81\xa1k\xc6\xff\xff\xff\xff" + b"x" * 100,
    "array32-claims-4G-items": lambda: b"\xdd\xff\xff\xff\xff" + b"\x01" * 100,
    "deeply-nested": lambda: b"\x91" * 200_000 + b"\xc0",
    "deeply-nested-maps": lambda: b"\x81\xa1k" * 100_000 + b"\xc0",
    "dotdot": lambda: _entry_doc("../../outside/secret"),
    "dotdot-inside": lambda: _entry_doc("a/../../outside/x"),
    "absolute": lambda: _entry_doc("/tmp/absolute-escape"),
    "nul-byte": lambda: _entry_doc("a/b\x00c"),
    "backslash": lambda: _entry_doc("a\\..\\b"),
    "component-over-255": lambda: _entry_doc("a/" + "x" * 256),
    "path-over-4096": lambda: _entry_doc("/".join(["d" * 200] * 21)),
    "empty-component": lambda: _entry_doc("a//b"),
    "dot-component": lambda: _entry_doc("a/./b"),
    "duplicate-paths": _dup_keys,
    "setuid-mode": lambda: _entry_doc("a/b", mode=0o4755),
    "negative-size": lambda: _entry_doc("a/b", size=-1),
    "size-over-64GiB": lambda: _entry_doc("a/b", size=(64 << 30) + 1),
    "wrong-env-key": lambda: msgpack.packb({**_valid_doc(), "env_key": "other"}, use_bin_type=True),
    "format-99": lambda: msgpack.packb({**_valid_doc(), "format": 99}, use_bin_type=True),
}


@pytest.mark.parametrize("kind", sorted(HOSTILE_MANIFESTS))
def test_hostile_manifest_is_an_error_that_loses_nothing(world, kind):
    blobs_before = world.store_blobs()
    world.manifest_path.write_bytes(HOSTILE_MANIFESTS[kind]())
    (world.local / "mine.txt").write_bytes(b"a file of this replica")
    local_before = tree(world.local)
    fresh = world.tmp / "fresh"
    results, log = world.api("load", local=fresh)
    status, reason = status_of(results, "load")
    assert status == "ERROR", (status, reason)
    assert "ManifestError" in reason and str(world.manifest_path) in reason, reason
    assert "load failed: ManifestError" in log or "status=ERROR" in log, log[-2000:]
    assert not fresh.exists() or tree(fresh) == {}, "a rejected manifest restored files"
    world.outside_intact()
    assert not Path("/tmp/absolute-escape").exists()
    # Nothing lost: the store is intact, the replica's files are untouched, and a save heals the deployment.
    assert world.store_blobs() == blobs_before
    world.verify_store()
    assert tree(world.local) == local_before
    healed = world.tmp / "healed"
    results, log = world.api("save", f"load:{healed}", local=world.local)
    assert status_of(results, "save")[0] == "SUCCESS", results
    assert status_of(results, "load")[0] == "SUCCESS"
    assert tree(healed) == local_before


def test_oversized_manifest_file_is_refused_without_reading_it(world):
    """A 1 GiB (sparse) manifest: rejected on its size, in a process whose address space is capped at 1 GiB."""
    with open(world.manifest_path, "wb") as fh:
        fh.truncate(1 << 30)
    results, log = world.api("load", local=world.tmp / "fresh", limit_as=1 << 30)
    status, reason = status_of(results, "load")
    assert status == "ERROR" and "exceeds" in reason, reason


def test_manifest_that_is_a_symlink_to_an_outside_file(world):
    good = world.manifest_path.read_bytes()
    (world.outside / "m").write_bytes(good)
    world.manifest_path.unlink()
    world.manifest_path.symlink_to(world.outside / "m")
    results, _ = world.api("load", local=world.tmp / "fresh")
    status, reason = status_of(results, "load")
    assert status == "ERROR" and "symlink" in reason, reason
    (world.outside / "m").unlink()
    world.outside_intact()


# -- the local cache directory -------------------------------------------------------------------------------------
def test_symlinks_in_the_local_cache_are_never_saved_or_followed(tmp_path):
    w = World(tmp_path)
    write(w.local, CACHE)
    (w.outside / "dir").mkdir()
    (w.outside / "dir" / "inner").write_bytes(b"outside dir content")
    (w.local / "fxgraph" / "leak").symlink_to(w.outside / "secret")
    (w.local / "triton" / "linkdir").symlink_to(w.outside / "dir")
    (w.local / "dangling").symlink_to(tmp_path / "nowhere")
    results, log = w.api("save")
    assert status_of(results, "save")[0] == "SUCCESS"
    assert set(w.manifest_entries()) == set(CACHE)
    stored = b"".join(zstandard.ZstdDecompressor().decompress(b) for b in w.store_blobs().values())
    assert b"outside secret" not in stored and b"outside dir content" not in stored
    (w.outside / "dir" / "inner").unlink()
    (w.outside / "dir").rmdir()
    w.outside_intact()


def test_symlinked_directory_in_the_target_is_not_written_through(world):
    """The replica's cache dir has `fxgraph` -> a directory outside: the entries under it are misses, nothing is
    written outside, the rest is restored."""
    target = world.tmp / "target"
    target.mkdir()
    (target / "fxgraph").symlink_to(world.outside)
    (target / "ab").mkdir()
    (target / "ab" / "cabc.py").symlink_to(world.outside / "secret")  # a symlink at a final name
    results, log = world.api("load", local=target)
    status, reason = status_of(results, "load")
    assert status == "SUCCESS" and "1 entries not restored" in reason and "symlink" in reason, reason
    world.outside_intact()
    assert not (target / "ab" / "cabc.py").is_symlink()  # replaced by the real file, not written through
    assert (target / "ab" / "cabc.py").read_bytes() == CACHE["ab/cabc.py"]
    assert (target / "triton/0/h/k.cubin").read_bytes() == CACHE["triton/0/h/k.cubin"]


def test_setuid_and_odd_modes_are_restored_without_dangerous_bits(tmp_path):
    w = World(tmp_path)
    modes = {"suid": 0o4755, "sgid": 0o2775, "sticky-world": 0o1777, "none": 0o000, "write-only": 0o222,
             "world-writable": 0o666, "plain": 0o644, "exec": 0o700}
    for name, mode in modes.items():
        p = w.local / "m" / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(name.encode() * 10)
        os.chmod(p, mode)
    results, _ = w.api("save")
    assert status_of(results, "save")[0] == "SUCCESS"
    assert all(e.mode <= 0o777 for e in w.manifest_entries().values())
    fresh = tmp_path / "fresh"
    results, _ = w.api("load", local=fresh)
    assert status_of(results, "load")[0] == "SUCCESS"
    for name, mode in modes.items():
        got = stat.S_IMODE(os.lstat(fresh / "m" / name).st_mode)
        assert got == (mode & 0o755) | 0o600, (name, oct(got))
        assert not got & (stat.S_ISUID | stat.S_ISGID | stat.S_ISVTX | 0o022)


def _setpriv_works() -> bool:
    p = subprocess.run(["setpriv", "--bounding-set=-dac_override", "--", "true"], capture_output=True)
    return p.returncode == 0 and os.geteuid() == 0


needs_setpriv = pytest.mark.skipif(not _setpriv_works(), reason="needs root and setpriv to drop DAC capabilities")


@needs_setpriv
def test_unreadable_local_file_is_skipped_and_the_rest_saved(tmp_path):
    """Root ignores mode bits; the API runs here as root *without* CAP_DAC_OVERRIDE/READ_SEARCH/FOWNER, so a file
    of mode 000 is really unreadable to it, as it would be to a non-root model server."""
    w = World(tmp_path)
    write(w.local, CACHE)
    (w.local / "private").write_bytes(b"not for us")
    os.chmod(w.local / "private", 0)
    (w.local / "closed").mkdir()
    (w.local / "closed" / "inner").write_bytes(b"in an unreadable directory")
    os.chmod(w.local / "closed", 0)
    results, log = w.api("save", drop_caps=True)
    assert status_of(results, "save")[0] == "SUCCESS", results
    assert set(w.manifest_entries()) == set(CACHE)
    assert "Permission denied" in log and "private" in log, log[-2000:]
    os.chmod(w.local / "closed", 0o755)


@needs_setpriv
def test_unwritable_local_directory_is_a_miss_not_a_failure(world):
    target = world.tmp / "target"
    (target / "fxgraph").mkdir(parents=True)
    os.chmod(target / "fxgraph", 0o555)
    results, log = world.api("load", local=target, drop_caps=True)
    status, reason = status_of(results, "load")
    assert status == "SUCCESS" and "1 entries not restored" in reason and "Permission denied" in reason, reason
    assert (target / "ab" / "cabc.py").read_bytes() == CACHE["ab/cabc.py"]
    assert list((target / "fxgraph").iterdir()) == []
    os.chmod(target / "fxgraph", 0o755)
    closed = world.tmp / "closed"
    closed.mkdir(mode=0o555)  # the whole cache dir unwritable: nothing restorable, an ERROR that says why
    os.chmod(closed, 0o555)
    results, log = world.api("load", local=closed, drop_caps=True)
    status, reason = status_of(results, "load")
    assert status == "ERROR" and "Permission denied" in reason, reason
    assert list(closed.iterdir()) == []
    os.chmod(closed, 0o755)


# -- the org store -------------------------------------------------------------------------------------------------
def _entry(world, rel: str):
    return world.manifest_entries()[rel]


def _blob_path(world, blob_id: str) -> Path:
    return world.store / "blobs" / blob_id[:2] / blob_id


def _quarantined(world) -> list[str]:
    return sorted(os.listdir(world.store / "quarantine"))


def _lost_with(world, rel: str) -> set[str]:
    """The entries whose content goes with `rel`'s stored blob: its pack's files, or `rel` alone if loose."""
    entries = world.manifest_entries()
    return {p for p, x in entries.items() if x.stored_id == entries[rel].stored_id}


def test_cache_is_one_pack_and_one_loose_blob(world):
    entries = world.manifest_entries()
    assert entries[BIG].pack is None
    assert _lost_with(world, "fxgraph/xy/key/0") == set(CACHE) - {BIG}
    manifest_blob = blake3.blake3(world.manifest_path.read_bytes()).hexdigest()
    assert set(world.store_blobs()) == {e.stored_id for e in entries.values()} | {manifest_blob}


@pytest.mark.parametrize("victim", ["fxgraph/xy/key/0", BIG], ids=["pack", "loose"])
@pytest.mark.parametrize("kind", ["symlink-outside-right-content", "symlink-outside-secret", "hardlink-outside",
                                  "wrong-content", "zstd-bomb-header"])
def test_planted_or_corrupt_blob_is_a_quarantined_miss(world, kind, victim):
    e = _entry(world, victim)
    lost = _lost_with(world, victim)
    path = _blob_path(world, e.stored_id)
    good = path.read_bytes()
    path.unlink()
    if kind == "symlink-outside-right-content":
        (world.outside / "copy").write_bytes(good)
        path.symlink_to(world.outside / "copy")
    elif kind == "symlink-outside-secret":
        path.symlink_to(world.outside / "secret")
    elif kind == "hardlink-outside":
        os.link(world.outside / "secret", path)
    elif kind == "wrong-content":  # the right size, other bytes
        size = len(zstandard.ZstdDecompressor().decompress(good))
        path.write_bytes(zstandard.ZstdCompressor(write_content_size=True).compress(os.urandom(size)))
    else:  # a tiny frame claiming 1 TiB
        sink = zstandard.ZstdCompressor(write_content_size=True).compressobj(size=1 << 40)
        path.write_bytes(sink.compress(b"\0" * 10000) + sink.flush(zstandard.COMPRESSOBJ_FLUSH_BLOCK))
    fresh = world.tmp / "fresh"
    results, log = world.api("load", local=fresh)
    status, reason = status_of(results, "load")
    assert status == "SUCCESS" and f"{len(lost)} entries not restored" in reason, reason
    assert "quarantined" in reason or "symlink" in reason, reason
    assert tree(fresh) == {k: v for k, v in CACHE.items() if k not in lost}
    assert not path.exists() and not path.is_symlink(), "the bad blob is still where readers look"
    assert len(_quarantined(world)) == 1
    if kind == "symlink-outside-right-content":
        (world.outside / "copy").unlink()
    world.outside_intact()  # quarantine renamed the link; the file it pointed to is untouched
    # Nothing else lost: a second load restores the same files, the store verifies.
    fresh2 = world.tmp / "fresh2"
    results, _ = world.api(f"load:{fresh2}")
    assert tree(fresh2) == tree(fresh)
    world.verify_store()


@pytest.mark.parametrize("victim", ["fxgraph/xy/key/0", BIG], ids=["pack", "loose"])
def test_quarantined_blob_is_uploaded_again_by_the_next_save(world, victim):
    e = _entry(world, victim)
    _blob_path(world, e.stored_id).write_bytes(b"garbage")
    fresh, fresh2 = world.tmp / "fresh", world.tmp / "fresh2"
    results, _ = world.api(f"load:{fresh}", f"save:{world.local}", f"load:{fresh2}")
    assert tree(fresh) == {k: v for k, v in CACHE.items() if k not in _lost_with(world, victim)}
    assert tree(fresh2) == CACHE


def _zeros_frame(size: int) -> bytes:
    cctx = zstandard.ZstdCompressor(level=3, write_content_size=True)
    chunks = []
    obj = cctx.compressobj(size=size)
    block = bytes(1 << 24)
    for _ in range(size // len(block)):
        chunks.append(obj.compress(block))
    chunks.append(obj.flush())
    return b"".join(chunks)


@pytest.mark.timeout(300)
def test_zstd_bomb_with_a_matching_manifest_entry_streams_in_bounded_memory(world):
    """A 100 KB blob that really decodes to 2 GiB of zeros, under an entry claiming 2 GiB but another blob id: the
    loader (address space capped at 1.5 GiB) must stream it, find the hash wrong, quarantine it and leave no temp
    file; the other entries load."""
    size = 2 << 30
    bomb = _zeros_frame(size)
    assert len(bomb) < 1 << 20
    fake_id = "cd" * 32
    _blob_path(world, fake_id).parent.mkdir(exist_ok=True)  # fan-out directories are made by the first write
    _blob_path(world, fake_id).write_bytes(bomb)
    m = world.manifest_entries()
    doc = msgpack.unpackb(_plain(world.manifest_path.read_bytes()), raw=False)
    doc["entries"]["fxgraph/bomb/0"] = [bytes.fromhex(fake_id), size, 0o644]
    world.manifest_path.write_bytes(msgpack.packb(doc, use_bin_type=True))
    fresh = world.tmp / "fresh"
    results, log = world.api("load", local=fresh, limit_as=3 << 29)
    status, reason = status_of(results, "load")
    assert status == "SUCCESS" and "1 entries not restored" in reason and "bomb" in reason, reason
    assert tree(fresh) == CACHE
    assert not any(p.name.startswith(".tmp-") for p in fresh.rglob("*")), "temp file of the bomb left behind"
    assert len(_quarantined(world)) == 1 and len(m) == len(CACHE)


def _plain(manifest: bytes) -> bytes:
    """A manifest file's msgpack (written as a zstd frame, FORMAT §3); edited manifests are written back plain."""
    return zstandard.ZstdDecompressor().decompress(manifest) if manifest[:4] == b"\x28\xb5\x2f\xfd" else manifest


def test_zstd_bomb_larger_than_the_local_disk_is_refused_up_front(world):
    """An entry claiming 60 GiB: refused before writing anything (free-space check), an ERROR naming the need."""
    fake_id = "ef" * 32
    sink = zstandard.ZstdCompressor(write_content_size=True).compressobj(size=60 << 30)
    _blob_path(world, fake_id).parent.mkdir(exist_ok=True)
    _blob_path(world, fake_id).write_bytes(sink.compress(b"\0" * 1000) + sink.flush(zstandard.COMPRESSOBJ_FLUSH_BLOCK))
    doc = msgpack.unpackb(_plain(world.manifest_path.read_bytes()), raw=False)
    doc["entries"]["fxgraph/huge/0"] = [bytes.fromhex(fake_id), 60 << 30, 0o644]
    world.manifest_path.write_bytes(msgpack.packb(doc, use_bin_type=True))
    fresh = world.tmp / "fresh"
    results, log = world.api("load", local=fresh)
    status, reason = status_of(results, "load")
    assert status == "ERROR" and "space" in reason and "need" in reason, reason
    assert not fresh.exists() or tree(fresh) == {}


def test_symlinked_fanout_directory_in_the_store(world):
    """`blobs/<xx>` replaced by a symlink to a directory outside the store: a load of a blob under it is a miss, a
    save of a new blob under it is an ERROR that writes nothing there (it used to write the blob through the link,
    outside the store: fixed in cas/blobstore.py), and gc neither lists nor deletes what the link points to."""
    from cas import BlobStore
    from cas.gc import collect

    e = _entry(world, "ab/cabc.py")
    prefix = e.stored_id[:2]  # the fan-out directory of the small files' pack
    lost = {p for p, x in world.manifest_entries().items() if x.stored_id[:2] == prefix}
    fan = world.store / "blobs" / prefix
    os.rename(fan, world.tmp / "moved-fan")
    fan.symlink_to(world.outside)
    fresh = world.tmp / "fresh"
    results, log = world.api("load", local=fresh)
    status, reason = status_of(results, "load")
    # The large file's blob shares the pack's fan-out directory once in 256 templates (random ids): then nothing
    # is restored, which is an ERROR, not a SUCCESS with misses.
    want = "ERROR" if lost == set(world.manifest_entries()) else "SUCCESS"
    assert status == want and f"{len(lost)} entries not restored" in reason, (status, reason)
    assert tree(fresh) == {k: v for k, v in CACHE.items() if k not in lost}
    world.outside_intact()

    # A new file whose blob falls in that fan-out directory: large, so that it is stored as its own blob (the
    # re-packed small files make the same pack, in that directory too).
    n = 0
    while True:
        data = b"new artifact %d " % n + bytes(1 << 20)
        if blake3.blake3(data).hexdigest()[:2] == prefix:
            break
        n += 1
    (world.local / "fxgraph" / "new").write_bytes(data)
    results, log = world.api("save")
    status, reason = status_of(results, "save")
    assert status == "ERROR" and "planted symlink" in reason, reason
    world.outside_intact()

    # gc: an outside file named like a garbage blob of that fan-out, old, under a symlinked trash fan-out too.
    victim_id = prefix + "0" * 62
    (world.outside / victim_id).write_bytes(b"not ours")
    os.utime(world.outside / victim_id, (1, 1))
    tfan = world.store / "trash" / prefix
    if tfan.exists():  # trash fan-out directories are made by gc on first use
        tfan.rmdir()
    tfan.symlink_to(world.outside)
    res = collect(BlobStore(world.store, create=False), grace=7200)
    assert (world.outside / victim_id).read_bytes() == b"not ours"
    (world.outside / victim_id).unlink()
    world.outside_intact()
