"""Mount slowfs from Python: `with mounted(src, mnt) as m: ...` — no libfuse needed in the calling process."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_DELAY_MS = 2.0  # the shared volume's per-file metadata operations cost milliseconds (notes: 2 ms measured)

# Kernel caching, modelled on an NFS client (see README.md): names found stay known for a while, like NFS's dentry
# cache (acdirmin 30 s; libfuse's own default of 1 s is shorter and still spares a lookup per path component on
# every access); attributes are never trusted, like close-to-open revalidation, so every stat and open reaches the
# server; a "no such file" is never trusted, so a blob that another pod just wrote is found at once.
DEFAULT_ENTRY_TIMEOUT_S = 1.0
DEFAULT_ATTR_TIMEOUT_S = 0.0
DEFAULT_NEGATIVE_TIMEOUT_S = 0.0

# Starting the server is a Python start, an import and a mount: ~0.3 s here; 10 s leaves room for a loaded CI box.
MOUNT_TIMEOUT_S = 10.0
# After unmounting, the server only has to write its op counts and exit.
EXIT_TIMEOUT_S = 5.0

_REPO_ROOT = str(Path(__file__).resolve().parents[2])  # so that `python -m tools.slowfs` imports from any cwd

# Tried in order until the mount point is gone: a clean unmount first; a lazy one if something still has files
# open there (the mount vanishes from the namespace at once and is torn down when they are closed).
_UNMOUNT_COMMANDS = (
    ("fusermount3", "-u"), ("fusermount", "-u"), ("umount",),
    ("fusermount3", "-uz"), ("fusermount", "-uz"), ("umount", "-l"),
)


@dataclass
class Mount:
    src: str
    mountpoint: str
    pid: int
    device: str | None = None  # "major:minor" of the mount, which survives a rename of a directory above it
    op_counts: dict[str, int] = field(default_factory=dict)  # filled in when the `with` block is left


_OCTAL_ESCAPE = re.compile(rb"\\([0-7]{3})")  # mountinfo writes space, tab, newline and backslash as \ooo


def _mounts():
    """(device, mount point) of every mount, from /proc/self/mountinfo: no stat, so a dead server cannot hang us."""
    with open("/proc/self/mountinfo", "rb") as f:
        for line in f:
            fields = line.split(b" ")
            point = _OCTAL_ESCAPE.sub(lambda m: bytes([int(m[1], 8)]), fields[4])
            yield fields[2].decode(), os.fsdecode(point)


def is_mounted(mnt: str) -> bool:
    return device_of(mnt) is not None


def device_of(mnt: str) -> str | None:
    mnt = os.path.abspath(mnt)
    return next((device for device, point in _mounts() if point == mnt), None)


def unmount(mnt: str, device: str | None = None) -> None:
    """Unmount `mnt`; given its `device`, unmount that mount wherever it is now (someone may have renamed a
    directory above it, as pytest does to old temporary directories while another run still uses them)."""
    def where():
        if device is None:
            return mnt if is_mounted(mnt) else None
        return next((point for dev, point in _mounts() if dev == device), None)

    for command in _UNMOUNT_COMMANDS:
        if (point := where()) is None:
            return
        try:
            subprocess.run([*command, point], capture_output=True, timeout=EXIT_TIMEOUT_S)
        except (FileNotFoundError, subprocess.TimeoutExpired):
            continue
    if where() is not None:
        raise RuntimeError(f"could not unmount {mnt}")


@contextmanager
def mounted(src, mnt, delay_ms: float = DEFAULT_DELAY_MS, bandwidth_mbps: float | None = None, *,
            entry_timeout: float = DEFAULT_ENTRY_TIMEOUT_S, attr_timeout: float = DEFAULT_ATTR_TIMEOUT_S,
            negative_timeout: float = DEFAULT_NEGATIVE_TIMEOUT_S,
            kernel_cache: bool = False, direct_io: bool = False, python: str = sys.executable):
    """Serve `src` at `mnt` from a subprocess for the duration of the block; see `python -m tools.slowfs --help`.

    Yields a `Mount`; its `op_counts` (requests per operation, read/write bytes) are there after the block.
    The mount is always removed: on exceptions, KeyboardInterrupt, SIGTERM (turned into SystemExit while the
    block runs in the main thread), and, should this process be killed outright, by the server itself when
    its stdin (a pipe from here) reaches EOF.
    """
    src, mnt = os.path.abspath(src), os.path.abspath(mnt)
    if is_mounted(mnt):
        raise RuntimeError(f"{mnt} is already a mount point")
    options = [f"--delay-ms={delay_ms}", f"--entry-timeout={entry_timeout}", f"--attr-timeout={attr_timeout}",
               f"--negative-timeout={negative_timeout}"]
    options += [f"--bandwidth-mbps={bandwidth_mbps}"] if bandwidth_mbps else []
    options += ["--kernel-cache"] if kernel_cache else []
    options += ["--direct-io"] if direct_io else []
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [_REPO_ROOT, os.environ.get("PYTHONPATH")])))

    with tempfile.TemporaryDirectory(prefix="slowfs-") as tmp, _sigterm_raises_systemexit():
        stats_path, log_path = os.path.join(tmp, "op_counts.json"), os.path.join(tmp, "server.log")
        with open(log_path, "wb") as log:
            server = subprocess.Popen(
                [python, "-m", "tools.slowfs", src, mnt, "--foreground", "--exit-on-stdin-eof",
                 f"--stats={stats_path}", *options],
                stdin=subprocess.PIPE, stdout=log, stderr=subprocess.STDOUT, env=env,
                start_new_session=True,  # a terminal's Ctrl-C reaches only us; we unmount in order
            )
        mount = Mount(src, mnt, server.pid)
        try:
            _wait_until_mounted(server, mnt, log_path)
            mount.device = device_of(mnt)
            yield mount
        finally:
            try:
                unmount(mnt, mount.device)  # ends the server's loop; it writes its op counts and exits
            finally:
                _stop(server)
                if os.path.exists(stats_path):
                    with open(stats_path) as f:
                        mount.op_counts = json.load(f)


def _wait_until_mounted(server: subprocess.Popen, mnt: str, log_path: str) -> None:
    deadline = time.monotonic() + MOUNT_TIMEOUT_S
    while not is_mounted(mnt):
        if server.poll() is not None or time.monotonic() > deadline:
            log = Path(log_path).read_text(errors="replace").strip()
            raise RuntimeError(f"slowfs did not mount {mnt} (exit status {server.poll()}): {log}")
        time.sleep(0.01)


def _stop(server: subprocess.Popen) -> None:
    server.stdin.close()
    try:
        server.wait(EXIT_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        server.kill()
        server.wait()


@contextmanager
def _sigterm_raises_systemexit():
    """SIGTERM kills a Python process without running `finally` blocks unless someone handles it."""
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGTERM) != signal.SIG_DFL:
        yield  # signals can only be handled in the main thread; a handler that is already there stays in charge
        return

    def handler(signum, frame):
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
