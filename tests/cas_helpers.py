"""Shared helpers for the tests of the store core (tests/test_cas_*.py).

Also a small command-line worker (`python tests/cas_helpers.py save|load ...`) that the multi-process and crash tests
run as separate processes, so that `CAS_KILL_AT` (read at import of cas._faults) and SIGKILL act on a real process.
"""
from __future__ import annotations

import json
import os
import random
import stat
import subprocess
import sys
import threading
import time

import blake3

HELPER = os.path.abspath(__file__)
ENV_KEY = "test-env"


# -- trees -----------------------------------------------------------------------------------------------------------
def write_tree(root, files: dict) -> str:
    """Create `files` ({rel: bytes | (bytes, mode)}) under `root`, making parent directories; returns `root`."""
    root = os.fspath(root)
    for rel, spec in files.items():
        data, mode = spec if isinstance(spec, tuple) else (spec, 0o644)
        path = os.path.join(root, *rel.split("/"))
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as fh:
            fh.write(data)
        os.chmod(path, mode)
    return root


# Older than the local index's racy window (2 s), so a no-op check trusts the files' stat (cas/index.py).
OLD = time.time() - 3600


def write_aged(root, files: dict[str, bytes], mtime: float | None = OLD) -> None:
    """Write `files` under `root` (parents made), each with mtime `mtime` (None: now)."""
    for rel, data in files.items():
        path = os.path.join(root, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as fh:
            fh.write(data)
        if mtime is not None:
            os.utime(path, (mtime, mtime))


def read_tree(root, *, include_temp: bool = False) -> dict[str, tuple[bytes, int]]:
    """{rel: (content, permission bits incl. setuid/setgid/sticky)} of every regular file under `root`, without
    temp files and the local index (`.cas-index` at the top, FORMAT §7)."""
    root = os.fspath(root)
    out = {}
    for directory, dirs, names in os.walk(root):
        for name in names:
            if name.startswith(".tmp-") and not include_temp:
                continue
            if name == ".cas-index" and directory == root:
                continue
            path = os.path.join(directory, name)
            st = os.lstat(path)
            if not stat.S_ISREG(st.st_mode):
                continue
            rel = os.path.relpath(path, root).replace(os.sep, "/")
            with open(path, "rb") as fh:
                out[rel] = (fh.read(), stat.S_IMODE(st.st_mode))
    return out


def temp_files(root) -> list[str]:
    """Every `.tmp-*` file under `root` (relative paths)."""
    found = []
    for directory, dirs, names in os.walk(os.fspath(root)):
        for name in names:
            if name.startswith(".tmp-"):
                found.append(os.path.relpath(os.path.join(directory, name), root))
    return sorted(found)


def blob_id(data: bytes) -> str:
    return blake3.blake3(data).hexdigest()


def expected_entries(files: dict) -> dict:
    """The manifest entries a save of `files` (as given to write_tree) must produce."""
    from cas import Entry

    out = {}
    for rel, spec in files.items():
        data, mode = spec if isinstance(spec, tuple) else (spec, 0o644)
        out[rel] = Entry(blob_id(data), len(data), mode & 0o777)
    return out


def random_tree(rng: random.Random, n: int, *, prefix: str = "", max_size: int = 4096) -> dict[str, bytes]:
    """`n` files in a few nested directories, compressible and not, some empty."""
    files = {}
    for i in range(n):
        depth = rng.randint(0, 3)
        dirs = "/".join(f"d{rng.randint(0, 3)}" for _ in range(depth))
        rel = f"{prefix}{dirs + '/' if dirs else ''}f{i}.bin"
        kind = rng.random()
        size = rng.randint(0, max_size)
        if kind < 0.1:
            data = b""
        elif kind < 0.5:
            data = rng.randbytes(size)
        else:
            data = (f"line {i} " * (size // 7 + 1)).encode()[:size]
        files[rel] = data
    return files


# -- store -----------------------------------------------------------------------------------------------------------
def open_store(base, *, create: bool = True):
    """(BlobStore, Scope) at `base`/store and `base`/scope."""
    from cas import BlobStore, Scope

    base = os.fspath(base)
    return BlobStore(os.path.join(base, "store"), create=create), Scope(os.path.join(base, "scope"), create=create)


def manifest_entries(scope, env_key: str = ENV_KEY) -> dict | None:
    m = scope.read_manifest(env_key)
    return None if m is None else dict(m.entries)


def entry_bytes(store, entry) -> bytes:
    """The content the store holds for `entry`, verified: its own blob, or its slice of its pack (FORMAT §2).
    Raises BlobMissing/BlobCorrupt (store) or cas.pack.PackEntryCorrupt (a slice that is not the entry's file)."""
    import io

    from cas import limits, pack

    if entry.pack is None:
        out = io.BytesIO()
        store.get_into(entry.blob_id, entry.size, out)
        return out.getvalue()
    return pack.extract(store.get_bytes(entry.pack, limits.MAX_PACK_BYTES), entry.blob_id, entry.size, entry.offset)


def sharing(entries: dict, victim) -> set[str]:
    """The paths whose content is lost with `victim`'s stored blob (its pack, or its own loose blob)."""
    return {p for p, e in entries.items() if e.stored_id == victim.stored_id}


def verify_all_blobs(store) -> int:
    """BlobStore.verify every blob in blobs/ (raises on the first bad one). Returns how many."""
    n = 0
    for info in store.iter_blobs():
        store.verify(info.id)
        n += 1
    return n


def snapshot(*roots) -> dict:
    """path -> (inode, mtime_ns, ctime_ns, size, mode) of every file and directory under `roots`."""
    out = {}
    for root in roots:
        root = os.fspath(root)
        for directory, dirs, names in os.walk(root):
            for name in [*dirs, *names, ""]:
                path = os.path.join(directory, name) if name else directory
                st = os.lstat(path)
                out[path] = (st.st_ino, st.st_mtime_ns, st.st_ctime_ns, st.st_size, st.st_mode)
    return out


def unexpected_files(store_root, scope_root) -> list[str]:
    """Files in the store or scope that are neither a final name the format defines, nor a temp file (.tmp-*), nor
    a lock file where locks live. An empty list means a crash left behind only what FORMAT §7 allows."""
    from cas.blobstore import is_blob_id

    bad = []
    store_root, scope_root = os.fspath(store_root), os.fspath(scope_root)
    for base, allowed in ((store_root, _store_name_ok), (scope_root, _scope_name_ok)):
        for directory, dirs, names in os.walk(base):
            rel_dir = os.path.relpath(directory, base).replace(os.sep, "/")
            for name in names:
                if name.startswith(".tmp-"):
                    continue
                if not allowed(rel_dir, name, is_blob_id):
                    bad.append(os.path.join(directory, name))
    return sorted(bad)


def _store_name_ok(rel_dir: str, name: str, is_blob_id) -> bool:
    parts = rel_dir.split("/")
    if rel_dir == ".":
        return name == "CAS-FORMAT"
    if parts[0] == "blobs" and len(parts) == 2:
        return is_blob_id(name) and name[:2] == parts[1]
    if parts[0] == "roots" and len(parts) == 2:
        return name.endswith(".root")
    if (rel_dir == "recent" or (parts[0] == "families" and len(parts) == 2)) and name.endswith(".recent"):
        return True  # recent-savers records (FORMAT §4a)
    return False  # quarantine/, trash/, locks/ must stay empty in these tests


def _scope_name_ok(rel_dir: str, name: str, is_blob_id) -> bool:
    if rel_dir == ".":
        return name == "scope.id"
    if rel_dir == "manifests":
        return name.endswith(".manifest") or name.endswith(".lock")
    if rel_dir == "slots":
        return name.endswith(".lock")
    return False


def check_root_names_manifest(store, scope, env_key: str = ENV_KEY) -> None:
    """The GC root of (scope, env_key) names a blob holding exactly the manifest's bytes (FORMAT §4)."""
    from cas.roots import iter_roots

    roots = [r for r in iter_roots(store) if not isinstance(r, tuple) and r.env_key == env_key
             and r.scope_id == scope.scope_id]
    assert len(roots) == 1, roots
    data = scope.read_manifest_bytes(env_key)
    assert store.read_bytes(roots[0].manifest, 64 << 20) == data


# -- subprocess workers ----------------------------------------------------------------------------------------------
def spawn(args: list[str], *, kill_at: str | None = None, **kw) -> subprocess.Popen:
    env = dict(os.environ)
    env.pop("CAS_KILL_AT", None)
    if kill_at:
        env["CAS_KILL_AT"] = kill_at
    return subprocess.Popen([sys.executable, HELPER, *map(str, args)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kw)


def run_worker(args: list[str], *, kill_at: str | None = None, timeout: float = 60) -> tuple[int, dict | None, str]:
    """Run a worker to completion: (returncode, its JSON report or None, stderr)."""
    proc = spawn(args, kill_at=kill_at)
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, _report(out), err


def _report(out: str) -> dict | None:
    """A worker's JSON report: its last stdout line that is a JSON object, if any."""
    report = None
    for line in out.splitlines():
        if line.startswith("{"):
            report = json.loads(line)
    return report


def kill_after_ready(args: list[str], delay: float, *, timeout: float = 60) -> tuple[int, dict | None, str]:
    """Start a worker, wait for it to print READY (imports done, about to work), sleep `delay`, SIGKILL it (if it is
    still running). Returns like run_worker."""
    proc = spawn(args + ["--ready"])
    line = proc.stdout.readline()
    assert line.strip() == "READY", (line, proc.stderr.read() if proc.poll() is not None else "")
    time.sleep(delay)
    proc.kill()
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, _report(out), err


def entries_from_json(d: dict) -> dict:
    from cas import Entry

    return {p: Entry(v[0], v[1], v[2]) for p, v in d.items()}


def entries_to_json(entries: dict) -> dict:
    return {p: [e.blob_id, e.size, e.mode] for p, e in entries.items()}


def _cmd_save(argv: list[str]) -> None:
    import argparse

    from cas import BlobStore, Scope, save_tree
    from cas.blobstore import hash_file
    from cas.tree import scan

    ap = argparse.ArgumentParser()
    ap.add_argument("src", nargs="+")
    ap.add_argument("--store", required=True)
    ap.add_argument("--scope", required=True)
    ap.add_argument("--env-key", default=ENV_KEY)
    ap.add_argument("--threads", type=int, default=4)
    ap.add_argument("--ready", action="store_true")
    a = ap.parse_args(argv)
    store = BlobStore(a.store)
    scope = Scope(a.scope, create=True)
    if a.ready:
        print("READY", flush=True)
    saves = []
    for src in a.src:
        res = save_tree(src, store, scope, a.env_key, threads=a.threads, lock_timeout=120)
        entries = {}
        for f in scan(src):
            bid, size = hash_file(f.path)
            entries[f.rel] = [bid, size, f.mode]
        saves.append({"entries": entries, "manifest_written": res.manifest_written, "new": res.new_entries,
                      "seconds": res.seconds})
    print(json.dumps({"saves": saves}), flush=True)


def _cmd_load(argv: list[str]) -> None:
    """Load (repeatedly, with --until) and check that every file that ever appears at a final name in the target,
    while the load runs and after it, is complete: its hash equals the entry of the manifest this load read."""
    import argparse

    from cas import BlobStore, Scope, load_tree
    from cas.blobstore import hash_file

    ap = argparse.ArgumentParser()
    ap.add_argument("dst")
    ap.add_argument("--store", required=True)
    ap.add_argument("--scope", required=True)
    ap.add_argument("--env-key", default=ENV_KEY)
    ap.add_argument("--threads", type=int, default=4)
    ap.add_argument("--verify", action="store_true")
    ap.add_argument("--ready", action="store_true")
    ap.add_argument("--until", help="keep loading (fresh subdirectories) until this file exists")
    ap.add_argument("--max-loads", type=int, default=1, help="with --until: stop after this many manifests loaded")
    ap.add_argument("--same-dir", action="store_true", help="with --until: reload into one directory (verify=True)")
    a = ap.parse_args(argv)
    if a.same_dir:
        a.verify = True

    class RecordingScope(Scope):
        last = None

        def read_manifest(self, env_key):
            m = super().read_manifest(env_key)
            self.last = m
            return m

    store = BlobStore(a.store, create=False) if os.path.exists(os.path.join(a.store, "CAS-FORMAT")) else None
    scope = RecordingScope(a.scope)
    if a.ready:
        print("READY", flush=True)
    bad: list[str] = []
    loads = found = files_checked = 0
    last = None
    while True:
        stopping = bool(a.until) and os.path.exists(a.until)  # savers are done: this load sees the final manifest
        if store is None and os.path.exists(os.path.join(a.store, "CAS-FORMAT")):
            store = BlobStore(a.store, create=False)
        dst = a.dst if not a.until or a.same_dir else os.path.join(a.dst, f"load-{loads}")
        if store is not None:
            scope.last = None
            stop = threading.Event()
            watcher = threading.Thread(target=_watch, args=(dst, scope, stop, bad), daemon=True)
            if not a.same_dir:  # files of an earlier manifest may be in a reused directory until replaced
                watcher.start()
            try:
                res = load_tree(dst, store, scope, a.env_key, threads=a.threads, verify=a.verify)
            finally:
                stop.set()
                if watcher.is_alive() or watcher.ident is not None:
                    watcher.join()
            last = res
            if res.manifest_found:
                found += 1
                entries = scope.last.entries
                if res.misses:
                    bad.append(f"misses in load {loads}: {res.misses[:3]}")
                # After the load: every manifest entry is in the target with the manifest's content.
                for rel, e in entries.items():
                    path = os.path.join(dst, rel)
                    bid, size = hash_file(path)
                    files_checked += 1
                    if bid != e.blob_id or size != e.size:
                        bad.append(f"{path}: hash {bid[:12]}/{size} != entry {e.blob_id[:12]}/{e.size}")
        loads += 1
        if not a.until or stopping or found >= a.max_loads:
            break
        time.sleep(0.01 if found else 0.05)
    print(json.dumps({"loads": loads, "found": found, "files_checked": files_checked, "bad": bad[:20],
                      "restored": last.restored if last else 0,
                      "manifest": entries_to_json(scope.last.entries) if scope.last else None}), flush=True)


def _watch(dst: str, scope, stop: threading.Event, bad: list[str]) -> None:
    """While a load runs into a fresh directory, hash every file that appears at a final name: it must already be
    complete (equal to its entry in the manifest the load read)."""
    from cas.blobstore import hash_file

    seen = set()
    while True:
        finished = stop.is_set()  # one more full pass after the load ends
        m = scope.last
        if m is not None and os.path.isdir(dst):
            for directory, dirs, names in os.walk(dst):
                for name in names:
                    if name.startswith(".tmp-") or (name == ".cas-index" and directory == dst):
                        continue
                    path = os.path.join(directory, name)
                    rel = os.path.relpath(path, dst).replace(os.sep, "/")
                    if rel in seen:
                        continue
                    e = m.entries.get(rel)
                    try:
                        bid, size = hash_file(path)
                    except FileNotFoundError:
                        continue
                    seen.add(rel)
                    if e is None:
                        bad.append(f"{rel}: not in the manifest")
                    elif (bid, size) != (e.blob_id, e.size):
                        bad.append(f"{rel}: partial or wrong content seen ({size} bytes, entry {e.size})")
        if finished:
            return
        time.sleep(0.002)


def _cmd_slot(argv: list[str]) -> None:
    """slot DIR N MARKERS HOLD_S: hold one of N save slots for HOLD_S seconds; while holding, count the holders
    (marker files) to check the limit from the inside."""
    from cas import acquire_slot

    directory, n, markers, hold = argv[0], int(argv[1]), argv[2], float(argv[3])
    lock = acquire_slot(directory, n, timeout=120)
    mine = os.path.join(markers, f"holder-{os.getpid()}")
    open(mine, "w").close()
    holders = len(os.listdir(markers))
    time.sleep(hold)
    holders = max(holders, len(os.listdir(markers)))
    os.unlink(mine)
    lock.release()
    print(json.dumps({"max_holders": holders, "slot": os.path.basename(lock.path)}), flush=True)


def _cmd_die_holding(argv: list[str]) -> None:
    """die-holding lock|slot PATH [N]: take a lock (or one of N slots in directory PATH), then SIGKILL ourselves."""
    import signal

    from cas import LockFile, acquire_slot

    if argv[0] == "lock":
        LockFile(argv[1], timeout=5).acquire()
    else:
        acquire_slot(argv[1], int(argv[2]), timeout=5)
    print("HELD", flush=True)
    os.kill(os.getpid(), signal.SIGKILL)


def _cmd_count(argv: list[str]) -> None:
    """count LOCK COUNTER LOG N [--ready]: N times, under the lock, read the counter, write it + 1 (temp + rename) and
    append the value written to LOG. Two holders at once would write the same value twice."""
    from cas import LockFile

    lock_path, counter, log_path, n = argv[0], argv[1], argv[2], int(argv[3])
    if "--ready" in argv:
        print("READY", flush=True)
    with open(log_path, "a") as log:
        for _ in range(n):
            with LockFile(lock_path, timeout=120, stale_after=3600):
                with open(counter) as fh:
                    value = int(fh.read() or 0) + 1
                tmp = f"{counter}.{os.getpid()}"
                with open(tmp, "w") as fh:
                    fh.write(str(value))
                os.rename(tmp, counter)
                log.write(f"{value}\n")
                log.flush()
    print(json.dumps({"done": n}), flush=True)


if __name__ == "__main__":
    cmd, rest = sys.argv[1], sys.argv[2:]
    {"save": _cmd_save, "load": _cmd_load, "slot": _cmd_slot, "die-holding": _cmd_die_holding,
     "count": _cmd_count}[cmd](rest)
