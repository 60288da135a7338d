"""Fault scenarios, each ending with the store's invariants and a following save and load that work.

Every scenario is a function `scenario(base) -> dict of figures` that raises AssertionError on a violation and
`Skip` when the machine cannot stage it (mounting needs root). `run_faults` runs them all; tests/test_torture.py runs
each as a test.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import msgpack

from .content import content, path_of, verify_tree, write_files

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
KEY = "env-a"


class Skip(Exception):
    pass


# -- a small world: org store + one scope, trees from tools/torture/content.py ---------------------------------------
class World:
    def __init__(self, base: str, *, vol: str | None = None, freshen_after: float = 3600):
        from cas import BlobStore, Scope

        self.base = base
        self.vol = vol or os.path.join(base, "vol")
        os.makedirs(self.vol, exist_ok=True)
        self.org = os.path.join(self.vol, "org")
        self.scope_dir = os.path.join(self.vol, "scope")
        self.store = BlobStore(self.org, freshen_after=freshen_after)
        self.scope = Scope(self.scope_dir, create=True)
        self.n = 0

    def tree(self, keys) -> str:
        self.n += 1
        root = os.path.join(self.base, f"src{self.n}")
        write_files(root, keys)
        return root

    def save(self, keys, **kw):
        from cas import save_tree

        return save_tree(self.tree(keys), self.store, self.scope, KEY, threads=4, **kw)

    def load(self, dst: str | None = None, **kw):
        from cas import load_tree

        self.n += 1
        dst = dst or os.path.join(self.base, f"dst{self.n}")
        return dst, load_tree(dst, self.store, self.scope, KEY, threads=4, **kw)

    def entries(self) -> dict:
        m = self.scope.read_manifest(KEY)
        return dict(m.entries) if m else {}

    def temp_files(self) -> list[str]:
        found = []
        for root in (self.org, self.scope_dir):
            for d, _, names in os.walk(root):
                found += [os.path.join(d, n) for n in names if n.startswith(".tmp-")]
        return found

    def invariants(self, want: dict | None = None) -> dict:
        """cas check --read-data clean, no temp file left, the manifest holds `want` and loads complete and
        verified. Returns figures; raises AssertionError."""
        from cas.check import check

        res = check(self.store, scope=self.scope, read_data=True)
        problems = [str(p) for p in res.problems]
        assert not problems, f"cas check: {problems[:5]}"
        have = self.entries()
        if want:
            lost = [p for p, e in want.items() if have.get(p) != e]
            assert not lost, f"entries lost from the manifest: {lost[:5]}"
        dst, lres = self.load()
        n, bad = verify_tree(dst)
        assert not lres.misses and not bad and n == len(have), f"load: misses {lres.misses[:3]} bad {bad[:3]}"
        shutil.rmtree(dst, ignore_errors=True)
        return {"blobs": res.blobs, "entries": len(have)}

    def follow_up(self, tag: str) -> None:
        """A following save of new content and a load of everything work."""
        before = self.entries()
        res = self.save([f"after-{tag}-{i}" for i in range(3)] + ["s1", "s2"])
        assert res.manifest_written, f"follow-up save wrote nothing: {res}"
        self.invariants(before)


def keys(prefix: str, n: int) -> list[str]:
    return [f"{prefix}{i}" for i in range(n)]


# -- mounting ------------------------------------------------------------------------------------------------------
def _run(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True)


@contextlib.contextmanager
def tmpfs(path: str, size: str = "16m", extra: str = ""):
    os.makedirs(path, exist_ok=True)
    opts = f"size={size}" + (f",{extra}" if extra else "")
    r = _run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", path])
    if r.returncode != 0:
        raise Skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    try:
        yield path
    finally:
        _run(["umount", "-l", path])


def _fill(directory: str, leave: int) -> str:
    """Fill the filesystem of `directory` until `leave` bytes are free. Returns the filler's path."""
    path = os.path.join(directory, "filler")
    st = os.statvfs(directory)
    free = st.f_bavail * st.f_frsize
    with open(path, "wb") as fh:
        remaining = max(0, free - leave)
        chunk = b"\xff" * (1 << 20)
        while remaining > 0:
            n = min(remaining, len(chunk))
            try:
                fh.write(chunk[:n])
                fh.flush()
            except OSError:
                break
            remaining -= n
    return path


@contextlib.contextmanager
def reserve(mb: int):
    """Lower cas's free-space reserve (CAS_RESERVE_MB) in this process, to reach the real ENOSPC paths."""
    import cas.space

    old = cas.space.RESERVE_BYTES
    cas.space.RESERVE_BYTES = mb << 20
    try:
        yield
    finally:
        cas.space.RESERVE_BYTES = old


def _snapshot(*roots) -> dict:
    out = {}
    for root in roots:
        for d, dirs, names in os.walk(root):
            for name in names:
                p = os.path.join(d, name)
                with open(p, "rb") as fh:
                    out[p] = fh.read()
    return out


# -- scenarios -----------------------------------------------------------------------------------------------------
def lock_dead_local_holder(base: str) -> dict:
    """A manifest lock, a save slot and the gc lock left by a SIGKILLed process of this host are taken over at once."""
    from cas.gc import collect
    from cas.lock import acquire_slot

    w = World(base)
    w.save(keys("a", 5))
    want = w.entries()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    body = msgpack.packb({"host": socket.gethostname(), "pid": dead.pid, "time": time.time(), "token": "d" * 16})
    lock_path = os.path.join(w.scope.manifests, KEY + ".lock")
    gc_lock = os.path.join(w.org, "locks", "gc.lock")
    os.makedirs(w.scope.slots, exist_ok=True)
    for p in (lock_path, gc_lock, os.path.join(w.scope.slots, "slot-0.lock")):
        with open(p, "wb") as fh:
            fh.write(body)
    t = time.monotonic()
    w.save(keys("b", 3), stale_after=60, lock_timeout=10)
    save_s = time.monotonic() - t
    t = time.monotonic()
    collect(w.store, scope=w.scope, grace=7200, lock_wait=10)
    gc_s = time.monotonic() - t
    t = time.monotonic()
    slot = acquire_slot(w.scope.slots, 1, timeout=10, stale_after=60)
    slot.release()
    slot_s = time.monotonic() - t
    assert max(save_s, gc_s, slot_s) < 5, (save_s, gc_s, slot_s)
    w.invariants(want)
    w.follow_up("dead-lock")
    return {"save_took_s": round(save_s, 2), "gc_took_s": round(gc_s, 2), "slot_took_s": round(slot_s, 2)}


def _foreign_lock(path: str) -> bytes:
    body = msgpack.packb({"host": "another-host.example", "pid": 1, "time": time.time(), "token": "f" * 16})
    with open(path, "wb") as fh:
        fh.write(body)
    return body


def lock_foreign_host(base: str) -> dict:
    """A lock naming another host is never taken early: a save waits the whole staleness timeout while it sits
    unchanged, and never takes it while its holder keeps refreshing it (LockTimeout, lock intact)."""
    from cas.errors import LockTimeout
    from cas.gc import collect

    stale = 2.0
    w = World(base)
    w.save(keys("a", 5))
    want = w.entries()
    lock_path = os.path.join(w.scope.manifests, KEY + ".lock")

    # 1. A live foreign holder refreshing its lock: never stolen.
    body = _foreign_lock(lock_path)
    stop = threading.Event()

    def refresh():
        while not stop.wait(0.4):
            os.utime(lock_path, None)

    beat = threading.Thread(target=refresh, daemon=True)
    beat.start()
    t = time.monotonic()
    timed_out = False
    try:
        w.save(keys("b", 3), stale_after=stale, lock_timeout=3 * stale)
    except LockTimeout:
        timed_out = True
    held_s = time.monotonic() - t
    stop.set()
    beat.join()
    with open(lock_path, "rb") as fh:
        assert fh.read() == body, "a refreshed foreign lock was taken"
    assert timed_out, "save went ahead while a foreign holder kept its lock fresh"
    assert w.entries() == want

    # 2. The holder stops refreshing: taken after stale_after of the waiter's own clock, not before.
    t = time.monotonic()
    w.save(keys("b", 3), stale_after=stale, lock_timeout=30)
    waited = time.monotonic() - t
    assert waited >= stale, f"foreign lock taken after {waited:.2f}s < stale_after {stale}s"

    # 3. The gc lock of a collector on another host: a second gc waits, then gives up; the lock stays.
    gc_lock = os.path.join(w.org, "locks", "gc.lock")
    gbody = _foreign_lock(gc_lock)
    t = time.monotonic()
    try:
        collect(w.store, scope=w.scope, grace=7200, lock_wait=2)
        gc_ran = True
    except LockTimeout:
        gc_ran = False
    gc_wait = time.monotonic() - t
    with open(gc_lock, "rb") as fh:
        assert fh.read() == gbody
    assert not gc_ran, "gc ran while another host's gc held a fresh gc.lock"
    os.unlink(gc_lock)
    w.invariants()
    w.follow_up("foreign-lock")
    return {"stale_after_s": stale, "refreshed_lock_held_off_save_s": round(held_s, 2),
            "waited_for_unrefreshed_lock_s": round(waited, 2), "gc_waited_s": round(gc_wait, 2)}


def volume_full(base: str, trials: int = 10, seed: int = 0) -> dict:
    """Saves into a nearly full volume (a small tmpfs), free space drawn at random so that ENOSPC strikes blob
    uploads, the manifest and the root write, or the free-space check refuses first: the save fails with NoSpace,
    leaves no temp file and loses nothing stored; after space is freed the same save works. With the default
    reserve a save is refused before writing anything. Inodes exhausted: the same."""
    from cas.errors import NoSpace

    rng = random.Random(seed)
    figures = {"trials": 0, "enospc_mid_write": 0, "refused_up_front": 0, "succeeded": 0}
    mnt = os.path.join(base, "mnt")
    with tmpfs(mnt, "24m"), reserve(0):
        w = World(base, vol=os.path.join(mnt, "vol"))
        w.save(keys("a", 20))
        for i in range(trials):
            want = w.entries()
            before_blobs = {b.id for b in w.store.iter_blobs()}
            filler = _fill(mnt, rng.randint(0, 400_000))
            big = [f"full{i}-{j}" for j in range(rng.randint(3, 40))]
            figures["trials"] += 1
            blind = i % 2 == 1  # every other trial: a volume that cannot report free space
            try:
                with free_space_unknown() if blind else contextlib.nullcontext():
                    w.save(big)
                figures["succeeded"] += 1
            except NoSpace as exc:
                figures["refused_up_front" if "needed at" in str(exc) else "enospc_mid_write"] += 1
            assert not w.temp_files(), f"temp files left: {w.temp_files()[:3]}"
            got = w.entries()
            assert all(got.get(p) == e for p, e in want.items()), "entries lost"
            assert before_blobs <= {b.id for b in w.store.iter_blobs()}, "blobs lost"
            os.unlink(filler)
            w.invariants(want)
            w.save(big)  # the same save, with room again
        # The reserve (256 MiB, far above this volume): refused before writing anything.
        snap = _snapshot(w.org, w.scope_dir)
        with reserve(256):
            try:
                w.save(keys("r", 3))
                raise AssertionError("save into a volume below the reserve went ahead")
            except NoSpace:
                figures["reserve_refusals"] = 1
        assert _snapshot(w.org, w.scope_dir) == snap, "a refused save changed the volume"
        w.invariants()
        w.follow_up("full")
    # Inodes: a volume with room but no free inodes.
    mnt2 = os.path.join(base, "mnt2")
    with tmpfs(mnt2, "32m", "nr_inodes=700"), reserve(0):
        w = World(os.path.join(base, "inodes"), vol=os.path.join(mnt2, "vol"))
        w.save(keys("a", 5))
        want = w.entries()
        n = 0
        with contextlib.suppress(OSError):
            while True:
                open(os.path.join(mnt2, f"i{n}"), "wb").close()
                n += 1
        try:
            w.save(keys("ino", 10))
            figures["inodes_exhausted"] = "saved"
        except NoSpace:
            figures["inodes_exhausted"] = "NoSpace"
        assert not w.temp_files()
        assert all(w.entries().get(p) == e for p, e in want.items())
        for i in range(n):
            os.unlink(os.path.join(mnt2, f"i{i}"))
        w.invariants(want)
        w.follow_up("inodes")
    return figures


@contextlib.contextmanager
def free_space_unknown():
    """The local filesystem cannot report free space (f_blocks 0, as some FUSE mounts): the up-front check is
    skipped and the real ENOSPC path is all there is."""
    import cas.space

    real = os.statvfs

    class Unknown:
        f_blocks = 0
        f_bavail = 0
        f_frsize = 4096

    cas.space.os = type("os_shim", (), {"statvfs": staticmethod(lambda p: Unknown())})
    try:
        yield
    finally:
        cas.space.os = os
        assert os.statvfs is real


def local_full(base: str) -> dict:
    """A load into a local disk too small for it. (a) Free space known: refused up front, nothing written. (b) Free
    space unknown: ENOSPC mid-load, NoSpace, no temp or partial file left, files already there untouched. After space
    is freed the load completes."""
    from cas.errors import NoSpace

    w = World(base)
    w.save([f"lf{i}" for i in range(60)] + ["big0"])
    want = w.entries()
    figures = {}
    mnt = os.path.join(base, "local")
    with tmpfs(mnt, "8m"):
        dst = os.path.join(mnt, "cache")
        write_files(dst, ["lf1", "lf2", "mine"])  # already there, one of them not in the manifest
        mine = os.path.join(dst, path_of("mine"))
        before = verify_tree(dst)[0]
        with reserve(0):
            try:
                w.load(dst)
                raise AssertionError("load bigger than the disk went ahead")
            except NoSpace as exc:
                figures["known_free_space"] = str(exc)[:70]
        assert verify_tree(dst, skip_temp=False) == (before, [])
        with reserve(0), free_space_unknown():
            try:
                w.load(dst)
                raise AssertionError("load into a full disk did not report NoSpace")
            except NoSpace as exc:
                figures["unknown_free_space"] = str(exc)[:70]
        n, bad = verify_tree(dst, skip_temp=False)
        assert not bad, f"partial or temp files left: {bad[:3]}"
        assert open(mine, "rb").read() == content("mine")
        figures["complete_files_before_enospc"] = n
    dst2 = os.path.join(base, "local2")
    _, res = w.load(dst2)
    assert not res.misses and verify_tree(dst2)[0] == len(want)
    w.invariants(want)
    w.follow_up("local-full")
    return figures


def volume_read_only(base: str) -> dict:
    """The volume remounted read-only: loads work, saves and gc fail cleanly (StoreReadOnly) and change nothing;
    remounted read-write, saving works again."""
    from cas.errors import StoreReadOnly
    from cas.gc import collect

    mnt = os.path.join(base, "mnt")
    with tmpfs(mnt, "32m"), reserve(0):
        w = World(base, vol=os.path.join(mnt, "vol"))
        w.save(keys("a", 20))
        want = w.entries()
        r = _run(["mount", "-o", "remount,ro", mnt])
        if r.returncode != 0:
            raise Skip(f"cannot remount read-only: {r.stderr.strip()}")
        try:
            snap = _snapshot(w.org, w.scope_dir)
            dst, res = w.load()
            assert res.restored == len(want) and not res.misses
            errors = []
            for what, fn in (("save", lambda: w.save(keys("ro", 3))),
                             ("gc", lambda: collect(w.store, scope=w.scope, grace=7200, lock_wait=1))):
                try:
                    fn()
                    raise AssertionError(f"{what} on a read-only volume went ahead")
                except StoreReadOnly as exc:
                    errors.append(f"{what}: {type(exc).__name__}")
            assert _snapshot(w.org, w.scope_dir) == snap
        finally:
            _run(["mount", "-o", "remount,rw", mnt])
        w.invariants(want)
        w.follow_up("ro")
    return {"errors": errors}


_LOADER = r"""
import json, os, sys, time
sys.path.insert(0, sys.argv[1])
from cas import BlobStore, Scope, load_tree
from cas.errors import CasError
from tools.torture.content import verify_tree
org, scope, dst, n = sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5])
out = []
print("STARTED", flush=True)
for i in range(n):
    d = os.path.join(dst, str(i))
    try:
        res = load_tree(d, BlobStore(org, create=False), Scope(scope), "env-a", threads=4)
        out.append({"restored": res.restored, "misses": len(res.misses), "found": res.manifest_found})
    except (CasError, OSError) as exc:
        out.append({"error": type(exc).__name__})
    out[-1]["bad"] = verify_tree(d)[1][:3] if os.path.isdir(d) else []
print(json.dumps(out), flush=True)
"""


def volume_vanishes(base: str) -> dict:
    """Loaders running while the volume is lazily unmounted (and, second, while the store directory is renamed
    away): every load ends (no hang) with misses or an error, never a partial file; when the volume is back, a load
    is complete and the store checks clean."""
    real = os.path.join(base, "real")
    mnt = os.path.join(base, "mnt")
    os.makedirs(real, exist_ok=True)
    os.makedirs(mnt, exist_ok=True)
    r = _run(["mount", "--bind", real, mnt])
    if r.returncode != 0:
        raise Skip(f"cannot bind-mount: {r.stderr.strip()}")
    outcomes: dict[str, int] = {}
    try:
        w = World(base, vol=os.path.join(mnt, "vol"))
        w.save([f"v{i}" for i in range(250)] + ["big0", "big1"])
        want = w.entries()
        for how in ("unmount", "rename"):
            procs = [subprocess.Popen([sys.executable, "-c", _LOADER, REPO, w.org, w.scope_dir,
                                       os.path.join(base, f"{how}-dst{k}"), "3"], stdout=subprocess.PIPE, text=True)
                     for k in range(3)]
            for p in procs:
                assert p.stdout.readline().strip() == "STARTED"
            time.sleep(random.uniform(0.05, 0.3))  # inside the first load of each
            if how == "unmount":
                _run(["umount", "-l", mnt])
            else:
                os.rename(w.org, w.org + ".away")
            t = time.monotonic()
            for p in procs:
                out, _ = p.communicate(timeout=120)
                for res in json.loads(out.strip().splitlines()[-1]):
                    assert not res["bad"], f"partial file after the volume vanished: {res['bad']}"
                    kind = res.get("error") or ("complete" if not res["misses"] and res["found"] else
                                                "missed" if res["found"] else "no-manifest")
                    outcomes[f"{how}:{kind}"] = outcomes.get(f"{how}:{kind}", 0) + 1
            outcomes[f"{how}:max_wait_s"] = round(time.monotonic() - t, 1)
            if how == "unmount":
                r = _run(["mount", "--bind", real, mnt])
                assert r.returncode == 0, r.stderr
            else:
                os.rename(w.org + ".away", w.org)
            w.invariants(want)
        w.follow_up("vanish")
    finally:
        _run(["umount", "-l", mnt])
    return outcomes


_SKEWED_GC = r"""
import sys, time
sys.path.insert(0, sys.argv[1])
skew = float(sys.argv[4])
real = time.time
time.time = lambda: real() + skew
from cas import BlobStore, Scope
from cas.gc import collect
res = collect(BlobStore(sys.argv[2], create=False), scope=Scope(sys.argv[3]), grace=float(sys.argv[5]))
print(res.blobs_trashed, res.blobs_deleted)
"""


def clock_skew(base: str) -> dict:
    """Writers and collectors whose clocks are off by hours or days, and blob mtimes in the far past or future:
    gc never trashes a live blob, nor the fresh blobs of a save in flight; a live blob with an ancient mtime stays."""
    w = World(base, freshen_after=30)
    grace = 60.0  # the four gc runs below must all start within it of the in-flight upload, even on a loaded host
    w.save(keys("a", 20))
    want = w.entries()
    # Live blobs with mtimes a year in the past or a day in the future: the packs of the entries (small files are
    # stored in packs, FORMAT §2) and the manifest's own blob, which the root names.
    import blake3

    ids = sorted({e.stored_id for e in want.values()} | {blake3.blake3(w.scope.read_manifest_bytes(KEY)).hexdigest()})
    for i, bid in enumerate(ids):
        t = time.time() + (-365 * 86400 if i % 2 else 86400)
        os.utime(w.store.blob_path(bid), (t, t))
    # A save in flight: uploaded its blobs, not yet committed (killed at the `uploaded` point). Its small files make
    # a pack; the big one is a loose blob, which a later save relies on through ensure_fresh and the server's clock.
    src = w.tree(keys("inflight", 8) + ["big-inflight"])
    stored_before = {b.id for b in w.store.iter_blobs()}
    p = subprocess.run([sys.executable, "-c", "import sys; sys.path.insert(0, sys.argv[1]);"
                        "from cas import BlobStore, Scope, save_tree;"
                        "save_tree(sys.argv[2], BlobStore(sys.argv[3]), Scope(sys.argv[4]), 'env-a')",
                        REPO, src, w.org, w.scope_dir], env={**os.environ, "CAS_KILL_AT": "uploaded"})
    assert p.returncode == -signal.SIGKILL, p.returncode
    uploaded_at = time.monotonic()
    inflight = {b.id for b in w.store.iter_blobs()} - stored_before  # what the killed save had stored
    assert blake3.blake3(content("big-inflight")).hexdigest() in inflight and len(inflight) >= 2, inflight
    trashed = {}
    for skew in (86400.0, 3600.0, -3600.0, -86400.0):
        out = subprocess.run([sys.executable, "-c", _SKEWED_GC, REPO, w.org, w.scope_dir, str(skew), str(grace)],
                             capture_output=True, text=True)
        assert out.returncode == 0, out.stderr[-800:]
        trashed[f"gc clock {skew:+.0f}s"] = out.stdout.split()
        present = {b.id for b in w.store.iter_blobs()}
        if time.monotonic() - uploaded_at < grace - 5:  # else they are old by the server's clock too: fair game
            assert inflight <= present, f"gc with clock {skew:+}s trashed blobs of a save in flight"
        assert set(ids) <= present, f"gc with clock {skew:+}s trashed live blobs"
    # A writer whose clock is a day behind commits a save relying on the in-flight blobs, after they aged.
    for b in w.store.iter_blobs():  # the in-flight blobs age past the grace period (the save stalled)
        if b.id in inflight:
            os.utime(b.path, (b.mtime - 3 * grace, b.mtime - 3 * grace))
    from cas import BlobStore, save_tree

    skewed = BlobStore(w.org, clock=lambda: time.time() - 86400)
    save_tree(src, skewed, w.scope, KEY)
    stale = [b.id for b in w.store.iter_blobs() if b.id in inflight and b.mtime < time.time() - grace]
    assert not stale, "a writer whose clock is a day behind did not freshen the old blobs it relied on"
    for skew in (86400.0, -86400.0):
        out = subprocess.run([sys.executable, "-c", _SKEWED_GC, REPO, w.org, w.scope_dir, str(skew), str(grace)],
                             capture_output=True, text=True)
        assert out.returncode == 0, out.stderr[-800:]
    w.invariants({**want, **_entries_of(src)})
    w.follow_up("skew")
    return {"live_blobs_with_shifted_mtimes": len(ids), "inflight_blobs": len(inflight), "gc_trashed_deleted": trashed}


def _entries_of(root: str) -> dict:
    from cas import Entry
    from cas.blobstore import hash_file
    from cas.tree import scan

    return {f.rel: Entry(hash_file(f.path)[0], f.size, f.mode) for f in scan(root)}


_KILLED = r"""
import sys
sys.path.insert(0, sys.argv[1])
from cas import BlobStore, Scope, save_tree, load_tree
from cas.gc import collect
op, org, scope, path = sys.argv[2:6]
store, sc = BlobStore(org), Scope(scope, create=True)
print("READY", flush=True)
if op == "save":
    save_tree(path, store, sc, "env-a", threads=4)
elif op == "load":
    load_tree(path, store, sc, "env-a", threads=4)
else:
    collect(store, scope=sc, grace=float(path))
"""


def kill_points(base: str, per_point: int = 3, seed: int = 0) -> dict:
    """Each kill point of cas/_faults.py reached several times (different n), and gc killed at random moments:
    after each kill, the invariants hold and a following save and load work."""
    from cas.gc import collect

    from .load import KILL_POINTS

    rng = random.Random(seed)
    w = World(base, freshen_after=1)
    w.save(keys("k", 30))
    hit: dict[str, int] = {}
    for point, most in KILL_POINTS + [("gc-random", 0)]:
        for rep in range(per_point):
            want = w.entries()
            if point.startswith("gc-"):
                # gc runs with work to do: orphans of a save killed after uploading, aged past the grace period
                # (and, for gc-deleted, already in trash and aged again).
                orphans = w.tree([f"g{point}{rep}-{i}" for i in range(150)])
                stored_before = {b.id for b in w.store.iter_blobs()}
                subprocess.run([sys.executable, "-c", _KILLED, REPO, "save", w.org, w.scope_dir, orphans],
                               env={**os.environ, "CAS_KILL_AT": "uploaded"}, stdout=subprocess.DEVNULL)
                # Its files went into a pack or a few (FORMAT §2): gc trashes at least these, and the manifest blobs
                # earlier follow-up saves superseded.
                garbage = len({b.id for b in w.store.iter_blobs()} - stored_before)
                assert garbage >= 1
                _age(w.store, "blobs")
                if point == "gc-deleted":
                    collect(w.store, scope=w.scope, grace=2)
                    _age(w.store, "trash")
                    garbage = sum(1 for _ in w.store.iter_blobs("trash"))
                op, arg = "gc", "2"
                if point == "gc-random":  # no checkpoint: a random moment of the run
                    env, delay = {}, rng.uniform(0.0, 0.12)
                else:
                    env, delay = {"CAS_KILL_AT": f"{point}:{rng.randint(1, min(20, garbage))}"}, None
            else:
                n = rng.randint(1, 6) if most > 4 else 1  # one save per process passes these once
                if point == "blob-written":  # this save's small files make one pack; then the manifest's own blob
                    n = rng.randint(1, 2)
                env = {"CAS_KILL_AT": f"{point}:{n}"}
                delay = None
                if point == "restored-temp":
                    op, arg = "load", os.path.join(base, f"kdst-{point}-{rep}")
                else:
                    op, arg = "save", w.tree([f"kp-{point}-{rep}-{i}" for i in range(10)] + ["k1"])
            proc = subprocess.Popen([sys.executable, "-c", _KILLED, REPO, op, w.org, w.scope_dir, arg],
                                    env={**os.environ, **env}, stdout=subprocess.PIPE, text=True)
            assert proc.stdout.readline().strip() == "READY"
            if delay is not None:
                time.sleep(delay)
                proc.kill()
            proc.wait(60)
            if proc.returncode == -signal.SIGKILL:
                hit[point] = hit.get(point, 0) + 1
            if op == "load":
                n_files, bad = verify_tree(arg)
                assert not bad, f"partial file after a kill at {point}: {bad[:3]}"
            w.invariants(want)
            w.follow_up(f"{point}-{rep}")
    assert all(hit.get(p, 0) for p, _ in KILL_POINTS), f"kill points never reached: {hit}"
    return {"kills": sum(hit.values()), "by_point": hit}


def _age(store, area: str, seconds: float = 10) -> None:
    for b in store.iter_blobs(area):
        os.utime(b.path, (b.mtime - seconds, b.mtime - seconds))


SCENARIOS = [lock_dead_local_holder, lock_foreign_host, volume_full, local_full, volume_read_only, volume_vanishes,
             clock_skew, kill_points]


def run_faults(base: str, *, seed: int = 0, say=print) -> dict:
    import inspect

    shutil.rmtree(base, ignore_errors=True)
    results = []
    for fn in SCENARIOS:
        d = os.path.join(base, fn.__name__)
        os.makedirs(d)
        t = time.monotonic()
        kw = {"seed": seed} if "seed" in inspect.signature(fn).parameters else {}
        try:
            figs = fn(d, **kw)
            result = "PASS"
        except Skip as exc:
            figs, result = {"skipped": str(exc)}, "SKIP"
        except AssertionError as exc:
            figs, result = {"violation": str(exc)[:400]}, "FAIL"
        except Exception as exc:  # an unexpected exception is a failure too
            figs, result = {"error": f"{type(exc).__name__}: {exc}"[:400]}, "FAIL"
        entry = {"name": fn.__name__, "result": result, "seconds": round(time.monotonic() - t, 1), **figs}
        results.append(entry)
        say(f"faults: {fn.__name__}: {result} {json.dumps(figs, default=str)[:300]}")
    return {"scenarios": results}
