"""tools.slowfs: a passthrough that a store and tar can use, whose requests are delayed and served in parallel.

Timing checks are lower bounds only (a loaded machine can only make things slower); overlap is checked by the
server's own count of requests in flight at once, not by a wall-clock upper bound.
"""

import contextlib
import errno
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import textwrap
import threading
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _why_no_fuse():
    if not os.path.exists("/dev/fuse"):
        return "/dev/fuse is missing"
    if not os.access("/dev/fuse", os.R_OK | os.W_OK):
        return "/dev/fuse is not readable and writable"
    if not shutil.which("fusermount3"):
        return "no fusermount3 (apt-get install fuse3)"
    try:
        import mfusepy  # noqa: F401  (raises OSError without libfuse)
    except (ImportError, OSError) as e:
        return f"mfusepy unusable: {e}"
    return None


pytestmark = pytest.mark.skipif(_why_no_fuse() is not None, reason=str(_why_no_fuse()))

from tools.slowfs import is_mounted, mounted  # noqa: E402

DELAY_MS = 2.0


@pytest.fixture
def dirs(tmp_path):
    src, mnt = tmp_path / "src", tmp_path / "mnt"
    src.mkdir()
    mnt.mkdir()
    return src, mnt


@pytest.fixture
def vol(dirs):
    src, mnt = dirs
    with mounted(src, mnt, delay_ms=DELAY_MS):
        yield src, mnt
    assert not is_mounted(mnt)


def test_round_trip_of_what_a_store_does(vol):
    src, mnt = vol
    (mnt / "objects" / "ab").mkdir(parents=True)
    tmp = mnt / "objects" / "ab" / "tmp-1"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    os.write(fd, b"blob" * 10_000)
    os.fsync(fd)
    os.close(fd)
    with pytest.raises(FileExistsError):
        os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)

    blob = mnt / "objects" / "ab" / "abcdef"
    os.link(tmp, blob)
    assert os.stat(blob).st_ino == os.stat(tmp).st_ino and os.stat(blob).st_nlink == 2
    with pytest.raises(FileExistsError):
        os.link(tmp, blob)
    os.unlink(tmp)
    assert blob.read_bytes() == b"blob" * 10_000
    assert (src / "objects" / "ab" / "abcdef").read_bytes() == b"blob" * 10_000  # it is a passthrough

    (mnt / "manifest.tmp").write_text("new")
    (mnt / "manifest").write_text("old")
    os.rename(mnt / "manifest.tmp", mnt / "manifest")  # over an existing file
    assert (mnt / "manifest").read_text() == "new"
    assert sorted(os.listdir(mnt)) == ["manifest", "objects"]

    os.symlink("objects/ab/abcdef", mnt / "latest")
    assert os.readlink(mnt / "latest") == "objects/ab/abcdef" and (mnt / "latest").read_bytes()[:4] == b"blob"
    os.chmod(blob, 0o444)
    os.utime(blob, ns=(1_000_000_123, 2_000_000_456))
    st = os.stat(blob)
    assert (st.st_mode & 0o777, st.st_atime_ns, st.st_mtime_ns) == (0o444, 1_000_000_123, 2_000_000_456)
    os.utime(blob)  # "now", as a store refreshes a blob it found already present
    assert abs(os.stat(blob).st_mtime - time.time()) < 60
    os.truncate(mnt / "manifest", 1)
    assert (mnt / "manifest").read_text() == "n"
    assert os.statvfs(mnt).f_bsize > 0 and os.access(blob, os.R_OK)

    os.unlink(mnt / "latest")
    shutil.rmtree(mnt / "objects")
    with pytest.raises(FileNotFoundError):
        os.stat(blob)
    assert os.listdir(src) == ["manifest"]


def test_o_excl_has_one_winner_among_racing_threads(vol):
    _, mnt = vol
    winners, barrier = [], threading.Barrier(16)

    def race():
        barrier.wait()
        try:
            os.close(os.open(mnt / "lock", os.O_WRONLY | os.O_CREAT | os.O_EXCL))
            winners.append(1)
        except FileExistsError:
            pass

    threads = [threading.Thread(target=race) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(winners) == 1


def test_tar_extraction_round_trip(vol, tmp_path):
    _, mnt = vol
    tree = tmp_path / "tree"
    (tree / "triton" / "0").mkdir(parents=True)
    (tree / "triton" / "0" / "k.cubin").write_bytes(os.urandom(50_000))
    (tree / "fx.py").write_text("print(1)\n" * 1000)
    os.chmod(tree / "fx.py", 0o755)
    os.utime(tree / "fx.py", (1_600_000_000, 1_600_000_000))
    os.link(tree / "fx.py", tree / "fx-link.py")
    with tarfile.open(tmp_path / "t.tar.gz", "w:gz") as tar:
        tar.add(tree, arcname="tree")
    with tarfile.open(tmp_path / "t.tar.gz") as tar:
        tar.extractall(mnt, filter="tar")

    out = mnt / "tree"
    assert (out / "triton" / "0" / "k.cubin").read_bytes() == (tree / "triton" / "0" / "k.cubin").read_bytes()
    assert (out / "fx.py").read_text() == (tree / "fx.py").read_text()
    assert os.stat(out / "fx.py").st_mode & 0o777 == 0o755 and os.stat(out / "fx.py").st_mtime == 1_600_000_000
    assert os.stat(out / "fx.py").st_ino == os.stat(out / "fx-link.py").st_ino


def test_every_stat_pays_the_delay(dirs):
    src, mnt = dirs
    (src / "f").write_text("x")
    n, delay_ms = 20, 10.0
    with mounted(src, mnt, delay_ms=delay_ms) as m:
        os.stat(mnt / "f")  # the lookup; from here on the kernel knows the name but never trusts attributes
        start = time.perf_counter()
        for _ in range(n):
            os.stat(mnt / "f")
        elapsed = time.perf_counter() - start
    assert elapsed >= n * delay_ms / 1000  # a lower bound: each stat is at least one request
    assert m.op_counts["getattr"] >= n + 1


def test_concurrent_requests_are_served_in_parallel(dirs):
    src, mnt = dirs
    threads = 32
    for i in range(threads):
        (src / f"f{i}").write_text("x")
    # Long enough that requests released by one barrier overlap even on a loaded 2-core machine.
    delay_ms = 500.0
    barrier = threading.Barrier(threads)

    def stat(i):
        barrier.wait()
        os.stat(mnt / f"f{i}")

    with mounted(src, mnt, delay_ms=delay_ms) as m:
        workers = [threading.Thread(target=stat, args=(i,)) for i in range(threads)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
    # A single-threaded server never has more than one request in flight; a loaded machine may start the 32
    # threads late, so ask only for clear overlap, not all 32 at once.
    assert m.op_counts["in_flight_max"] >= 4


def test_bandwidth_cap_is_a_floor_on_transfer_time(dirs):
    src, mnt = dirs
    size, mb_per_s = 2_000_000, 10.0
    with mounted(src, mnt, delay_ms=0, bandwidth_mbps=mb_per_s) as m:
        start = time.perf_counter()
        (mnt / "big").write_bytes(b"\0" * size)
        written = time.perf_counter()
        assert len((mnt / "big").read_bytes()) == size
        read = time.perf_counter()
    assert written - start >= size / (mb_per_s * 1e6)
    assert read - written >= size / (mb_per_s * 1e6)
    assert m.op_counts["write_bytes"] == size and m.op_counts["read_bytes"] >= size


def test_unmounted_and_stopped_after_an_exception(dirs):
    src, mnt = dirs
    with pytest.raises(RuntimeError, match="boom"):
        with mounted(src, mnt) as m:
            assert is_mounted(mnt)
            raise RuntimeError("boom")
    assert not is_mounted(mnt)
    assert not _alive(m.pid)


def test_unmounted_while_files_are_open(dirs):
    src, mnt = dirs
    with mounted(src, mnt) as m:
        fd = os.open(mnt / "open", os.O_WRONLY | os.O_CREAT)  # keeps the mount busy: a lazy unmount takes over
    try:
        assert not is_mounted(mnt) and not _alive(m.pid)
    finally:
        with contextlib.suppress(OSError):  # ENOTCONN: its server is gone
            os.close(fd)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGKILL])
def test_unmounted_when_the_parent_is_signalled(dirs, sig):
    src, mnt = dirs
    parent = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(f"""
            import signal, sys, time
            # A shell that starts its job in the background without job control leaves SIGINT ignored, which
            # Python would inherit: give the parent the default disposition a terminal's Ctrl-C meets.
            signal.signal(signal.SIGINT, signal.default_int_handler)
            from tools.slowfs import mounted
            with mounted({str(src)!r}, {str(mnt)!r}) as m:
                print(m.pid, flush=True)
                time.sleep(600)
        """)],
        cwd=REPO, stdout=subprocess.PIPE, text=True,
    )
    server_pid = int(parent.stdout.readline())
    assert is_mounted(mnt)
    parent.send_signal(sig)
    # Its cleanup may try several unmount commands, 5 s each, before the server stops: on a loaded 2-core CI machine
    # 30 s was seen to be too short once (a SIGINT case); the bound only has to catch a parent that never exits.
    parent.wait(timeout=90)
    # After SIGKILL nobody runs cleanup code in the parent: the server sees its stdin close and unmounts itself.
    _wait_for(lambda: not is_mounted(mnt) and not _alive(server_pid), timeout=30)


def test_unmounted_after_a_directory_above_it_was_renamed(tmp_path):
    (tmp_path / "a" / "src").mkdir(parents=True)
    (tmp_path / "a" / "mnt").mkdir()
    with mounted(tmp_path / "a" / "src", tmp_path / "a" / "mnt") as m:
        os.rename(tmp_path / "a", tmp_path / "b")  # what pytest does to old temporary directories
    assert not is_mounted(tmp_path / "b" / "mnt") and not _alive(m.pid)


def test_refuses_a_mount_point_in_use(vol):
    src, mnt = vol
    with pytest.raises(RuntimeError, match="already a mount point"):
        with mounted(src, mnt):
            pass
    assert is_mounted(mnt)  # the first mount is untouched


def _alive(pid):
    try:
        os.kill(pid, 0)
    except OSError as e:
        return e.errno != errno.ESRCH
    try:  # a zombie (exited, not yet reaped by whoever inherited it) counts as dead
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _wait_for(condition, timeout):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)
