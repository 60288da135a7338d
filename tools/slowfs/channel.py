"""Mount a FUSE channel whose lookups run in parallel, even with libfuse < 3.16.

libfuse before 3.16 never told the kernel FUSE_PARALLEL_DIROPS (libfuse PR #861), so the kernel serializes every
lookup and readdir within one directory: 32 threads opening 32 files of one directory wait for each other's
round trip, which no NFS client does. Debian 12 ships libfuse 3.14. So we mount with fusermount3 ourselves, hand
libfuse one end of a socket pair as its "/dev/fd/N" device, relay the INIT exchange with that flag set, and then
put the real /dev/fuse in place of the socket (dup2) so that everything after INIT goes straight to the kernel.
"""

from __future__ import annotations

import os
import socket
import struct
import subprocess
import threading
import time

FUSE_INIT = 26  # opcodes and flags from <linux/fuse.h>
FUSE_FORGET = 2
FUSE_ROOT_ID = 1
FUSE_PARALLEL_DIROPS = 1 << 18
_IN_HEADER = struct.Struct("=IIQQIIIHH")  # len, opcode, unique, nodeid, uid, gid, pid, total_extlen, padding
_OUT_HEADER = struct.Struct("=IiQ")  # len, error, unique
_INIT_OUT_FLAGS = _OUT_HEADER.size + 12  # fuse_init_out: major, minor, max_readahead, flags, ...
_MAX_MESSAGE = 1 << 21  # an INIT message is a few hundred bytes; libfuse's own buffer is ~1 MiB
# Wakes a libfuse worker and does nothing else: FORGET has no reply, and libfuse never forgets the root.
_NOOP_REQUEST = _IN_HEADER.pack(_IN_HEADER.size + 8, FUSE_FORGET, 0, FUSE_ROOT_ID, 0, 0, 0, 0, 0) + bytes(8)


def mount(mnt: str, options: str) -> int:
    """Mount a FUSE file system at `mnt` through fusermount3 and return the /dev/fuse fd that serves it."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with ours, theirs:
        result = subprocess.run(
            ["fusermount3", "-o", options, "--", mnt],
            env=dict(os.environ, _FUSE_COMMFD=str(theirs.fileno())), pass_fds=(theirs.fileno(),),
            capture_output=True, text=True,
        )
        if result.returncode != 0:
            raise OSError(f"fusermount3 could not mount {mnt}: {result.stderr.strip()}")
        _, fds, _, _ = socket.recv_fds(ours, 1, 1)
    return fds[0]


def libfuse_device(kernel_fd: int) -> int:
    """An fd for libfuse ("/dev/fd/N") that becomes `kernel_fd` itself once INIT has been relayed with the flag."""
    lib_end, relay_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)  # keeps message boundaries
    lib_fd = lib_end.detach()  # a plain fd number that dup2 may replace; no socket object will close it later
    threading.Thread(target=_relay_init, args=(kernel_fd, lib_fd, relay_end), daemon=True).start()
    return lib_fd


def _relay_init(kernel_fd: int, lib_fd: int, relay: socket.socket) -> None:
    with relay:
        request = os.read(kernel_fd, _MAX_MESSAGE)
        assert _IN_HEADER.unpack_from(request)[1] == FUSE_INIT, "the kernel speaks first, with INIT"
        relay.send(request)
        reply = bytearray(relay.recv(_MAX_MESSAGE))
        _, error, _ = _OUT_HEADER.unpack_from(reply)
        if error == 0 and len(reply) >= _INIT_OUT_FLAGS + 4:
            (flags,) = struct.unpack_from("=I", reply, _INIT_OUT_FLAGS)
            struct.pack_into("=I", reply, _INIT_OUT_FLAGS, flags | FUSE_PARALLEL_DIROPS)
        os.write(kernel_fd, reply)
        os.dup2(kernel_fd, lib_fd)
        os.close(kernel_fd)
        # Workers that were already blocked reading the socket still wait there: give each one a no-op request
        # until the socket is gone, which it is once its last reader has moved on to the real device.
        relay.setblocking(False)
        deadline = time.monotonic() + 5.0
        while time.monotonic() < deadline:
            try:
                relay.send(_NOOP_REQUEST)
            except BlockingIOError:
                pass
            except OSError:  # EPIPE / ECONNRESET: no reader is left
                return
            time.sleep(0.01)
