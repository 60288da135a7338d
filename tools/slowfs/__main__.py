"""python -m tools.slowfs SRC MNT [--delay-ms 2] [--bandwidth-mbps N] [--foreground] ..."""

from __future__ import annotations

import argparse
import os
import sys
import time

from .mount import (DEFAULT_ATTR_TIMEOUT_S, DEFAULT_DELAY_MS, DEFAULT_ENTRY_TIMEOUT_S, DEFAULT_NEGATIVE_TIMEOUT_S,
                    MOUNT_TIMEOUT_S, is_mounted)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tools.slowfs",
        description="Mount SRC at MNT through FUSE, adding a delay to every metadata/open/close/fsync request, "
                    "like a network volume. Unmount with `fusermount3 -u MNT`.",
    )
    parser.add_argument("src")
    parser.add_argument("mnt")
    parser.add_argument("--delay-ms", type=float, default=DEFAULT_DELAY_MS,
                        help="round trip added to each request other than read/write (default %(default)s)")
    parser.add_argument("--bandwidth-mbps", type=float, default=None, metavar="MB_PER_S",
                        help="cap on read+write data, shared by all requests, in megabytes (10**6 bytes, not "
                             "megabits) per second (default: none)")
    parser.add_argument("--foreground", action="store_true", help="stay in the foreground instead of daemonizing")
    cache = parser.add_argument_group(
        "kernel caching", "NFS-like defaults: every stat, open and 'no such file' reaches the server; names found are "
        "trusted for --entry-timeout seconds; file data is dropped at each open.")
    cache.add_argument("--entry-timeout", type=float, default=DEFAULT_ENTRY_TIMEOUT_S, metavar="S",
                       help="seconds the kernel trusts a name lookup (default %(default)s)")
    cache.add_argument("--attr-timeout", type=float, default=DEFAULT_ATTR_TIMEOUT_S, metavar="S",
                       help="seconds the kernel trusts file attributes (default %(default)s)")
    cache.add_argument("--negative-timeout", type=float, default=DEFAULT_NEGATIVE_TIMEOUT_S, metavar="S",
                       help="seconds the kernel trusts a 'no such file' (default %(default)s)")
    cache.add_argument("--kernel-cache", action="store_true",
                       help="keep file data in the page cache across opens (default: dropped at each open)")
    cache.add_argument("--direct-io", action="store_true",
                       help="bypass the page cache: each read/write call becomes requests of its own size")
    parser.add_argument("--stats", metavar="FILE", help="write request counts per operation as JSON on unmount")
    parser.add_argument("--exit-on-stdin-eof", action="store_true",
                        help="unmount when stdin closes (used by tools.slowfs.mounted to outlive no parent)")
    args = parser.parse_args(argv)
    if args.exit_on_stdin_eof and not args.foreground:
        parser.error("--exit-on-stdin-eof needs --foreground")

    from .fs import serve  # needs libfuse; imported late so that --help works without it

    if not args.foreground and _daemonize(args.mnt):
        return 0
    try:
        serve(
            args.src, args.mnt,
            delay_s=args.delay_ms / 1000,
            bytes_per_s=args.bandwidth_mbps * 1e6 if args.bandwidth_mbps else None,
            entry_timeout=args.entry_timeout,
            attr_timeout=args.attr_timeout,
            negative_timeout=args.negative_timeout,
            kernel_cache=args.kernel_cache,
            direct_io=args.direct_io,
            stats_path=args.stats,
            exit_on_stdin_eof=args.exit_on_stdin_eof,
        )
    except RuntimeError as e:  # mfusepy raises libfuse's exit status; SIGTERM/SIGINT also end in status 8
        sys.exit(f"slowfs: libfuse exited with status {e}")
    return 0


def _daemonize(mnt: str) -> bool:
    """Fork; the parent returns True once the child has mounted (or exits 1 if it died), the child False."""
    pid = os.fork()
    if pid == 0:
        os.setsid()
        devnull = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(devnull, fd)
        return False
    deadline = time.monotonic() + MOUNT_TIMEOUT_S
    while not is_mounted(mnt):
        if os.waitpid(pid, os.WNOHANG) != (0, 0) or time.monotonic() > deadline:
            sys.exit(f"slowfs did not mount {mnt} (run with --foreground to see why)")
        time.sleep(0.01)
    return True


if __name__ == "__main__":
    sys.exit(main())
