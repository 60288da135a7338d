"""The hostile-input table (issue 12): for every file the volume holds, every kind of thing a hostile deployment or
a broken volume can plant there, and every operation that touches it. Each case must end within a bounded time as
a miss, a status or a typed error (never a hang, never an exception escaping b10_transfer), must not write or delete
anything outside the store, scope and target, and must not lose a saved entry (the saved tree loads again once the
plant is removed).

Operations run in a worker thread with a deadline, in-process (a hang fails the case, it does not stall the run).
"""
from __future__ import annotations

import os
import shutil
import stat
import threading
from pathlib import Path

import pytest
from cas_helpers import ENV_KEY, read_tree, write_tree

from cas import BlobStore, Scope, layout, load_tree, save_tree
from cas.check import check
from cas.errors import CasError
from cas.faulty import FaultyBackend
from cas.gc import collect
from cas.posix import PosixBackend
from cas.stats import compute

# Far above any case's real duration (milliseconds), far below pytest's own timeout: a case over it is a hang.
DEADLINE_S = 20.0
# A planted "huge" file: larger than every bounded read of the store (64 KiB small files, 64 MiB manifests) would
# take whole, small enough to create instantly (sparse).
HUGE = 80 << 20
FILES = {"fx/a/k0": b"kernel 0 " * 100, "fx/b/k1": b"kernel 1 " * 100, "big.bin": os.urandom(1_100_000)}

# Where each planted path lives: (area, key-or-path builder). Store and scope keys come from cas.layout.
TARGETS = {
    "CAS-FORMAT": ("store", lambda w: layout.FORMAT),
    "root": ("store", lambda w: layout.root(w.scope_id, ENV_KEY)),
    "gc.lock": ("store", lambda w: layout.GC_LOCK),
    "recent": ("store", lambda w: f"recent/{ENV_KEY}.recent"),
    "pack-blob": ("store", lambda w: layout.blob(w.pack_id)),
    "scope.id": ("scope", lambda w: layout.SCOPE_ID),
    "manifest": ("scope", lambda w: layout.manifest(ENV_KEY)),
    "manifest.lock": ("scope", lambda w: layout.manifest_lock(ENV_KEY)),
    "audit": ("scope", lambda w: layout.audit(ENV_KEY)),
    "slot": ("scope", lambda w: layout.slot(0)),
    ".cas-index": ("src", lambda w: ".cas-index"),
}
KINDS = ["fifo", "device", "directory", "symlink-outside", "symlink-into-store", "huge", "garbage"]
OPS = ["load", "save", "gc", "check", "stats"]


class World:
    def __init__(self, base: Path):
        self.base = base
        self.store_dir, self.scope_dir = base / "org", base / "model" / "scope"
        self.src, self.dst, self.outside = base / "src", base / "dst", base / "outside"
        (base / "model").mkdir(parents=True)
        self.outside.mkdir()
        (self.outside / "secret").write_bytes(b"secret")
        write_tree(self.src, FILES)
        store, scope = BlobStore(self.store_dir, freshen_after=1), Scope(self.scope_dir, create=True)
        save_tree(self.src, store, scope, ENV_KEY)
        self.scope_id = scope.scope_id
        entries = scope.read_manifest(ENV_KEY).entries
        self.pack_id = entries["fx/a/k0"].pack
        self.seen: list[tuple[str, str]] = []

    def path(self, target: str) -> Path:
        area, key = TARGETS[target]
        base = {"store": self.store_dir, "scope": self.scope_dir, "src": self.src}[area]
        return base / key(self)

    def outside_state(self) -> dict:
        return {p.name: p.read_bytes() for p in self.outside.iterdir()}


def plant(world: World, target: str, kind: str) -> Path:
    path = world.path(target)
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()
    path.parent.mkdir(parents=True, exist_ok=True)
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "device":
        os.mknod(path, 0o600 | stat.S_IFCHR, os.makedev(1, 5))  # /dev/zero: endless reads
    elif kind == "directory":
        path.mkdir()
        (path / "x").write_bytes(b"x")
    elif kind == "symlink-outside":
        os.symlink(world.outside / "secret", path)
    elif kind == "symlink-into-store":
        os.symlink(world.store_dir / layout.blob(world.pack_id), path)
    elif kind == "huge":
        with open(path, "wb") as fh:
            fh.truncate(HUGE)
    elif kind == "garbage":
        path.write_bytes(b"\xc1garbage\x00" * 64)
    return path


def _seam(root: Path, create: bool, seen: list[tuple[str, str]]) -> FaultyBackend:
    """The hardened POSIX backend behind the test seam: every verb and key an operation uses is recorded."""
    return FaultyBackend(PosixBackend(root, create=create), before=lambda verb, key: seen.append((verb, key)))


def run_op(world: World, op: str):
    create = op == "save"
    store = BlobStore(_seam(world.store_dir, create, world.seen), create=create, freshen_after=1)
    scope = Scope(_seam(world.scope_dir, create, world.seen), create=create)
    if op == "load":
        return load_tree(world.dst, store, scope, ENV_KEY)
    if op == "save":
        write_tree(world.src, {"new/file": os.urandom(100)})
        return save_tree(world.src, store, scope, ENV_KEY, lock_timeout=3, stale_after=1)
    if op == "gc":
        return collect(store, scope=scope, grace=2, lock_wait=3)
    if op == "check":
        return check(store, scope=scope, read_data=True)
    return compute(store)


def bounded(fn, *args):
    box: dict = {}

    def work():
        try:
            box["result"] = fn(*args)
        except CasError as exc:  # a typed error is an allowed ending
            box["error"] = exc
        except BaseException as exc:  # noqa: BLE001 - anything else is a failure of the case
            box["crash"] = exc

    t = threading.Thread(target=work, daemon=True)
    t.start()
    t.join(DEADLINE_S)
    assert not t.is_alive(), f"{fn.__name__}{args[1:]} still running after {DEADLINE_S}s (a hang)"
    assert "crash" not in box, f"untyped exception: {box.get('crash')!r}"
    return box


@pytest.mark.timeout(600)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("target", sorted(TARGETS))
def test_plant_at_every_path_for_every_operation(tmp_path, target, kind):
    world = World(tmp_path)
    before = world.outside_state()
    planted = plant(world, target, kind)
    for op in OPS:
        world.seen.clear()
        bounded(run_op, world, op)
        assert world.outside_state() == before, f"{op} changed something outside the store"
        if op in ("check", "stats"):  # read-only commands: not one write verb, whatever is planted
            assert not [(v, k) for v, k in world.seen if v in ("put", "delete", "move", "touch")], op
    # Nothing saved is lost: with the plant removed, the original files load again.
    if planted.is_dir() and not planted.is_symlink():
        shutil.rmtree(planted)
    elif planted.exists() or planted.is_symlink():
        planted.unlink()
    if target in ("manifest", "scope.id", "root", "pack-blob", "CAS-FORMAT"):
        return  # the plant replaced that very file: losing it is the point of the case (a miss or a re-save)
    shutil.rmtree(world.dst, ignore_errors=True)
    res = load_tree(world.dst, BlobStore(world.store_dir, create=False), Scope(world.scope_dir), ENV_KEY)
    got = read_tree(world.dst)
    for rel, data in FILES.items():
        assert got.get(rel, (None,))[0] == data, (rel, res.misses)
