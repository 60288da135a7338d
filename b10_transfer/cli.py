"""`b10-compile-cache`: the vLLM companion command (see b10_transfer.companion for what it does).

    b10-compile-cache [--once] [--pid PID] & vllm serve ...

Environment (the first four are the peer's, with the peer's defaults):
  B10_TRANSFER_VLLM_URL              readiness URL, 200 = ready          http://127.0.0.1:8000/v1/models
  B10_TRANSFER_TIMEOUT_S             how long to wait for readiness      1800
  B10_TRANSFER_INTERVAL_S            readiness polling while waiting     2
  B10_TRANSFER_CLI_LOGLEVEL          DEBUG, INFO, WARNING, ERROR         INFO
  B10_TRANSFER_RESAVE_INTERVAL_S     save again if changed; 0 = never    300
  B10_TRANSFER_UNREADY_TIMEOUT_S     readiness lost this long = server gone (without --pid); 0 = never   120
  B10_TRANSFER_FINAL_SAVE_TIMEOUT_S  budget of the last save after SIGTERM/SIGINT or the server's end   20
  VLLM_CACHE_ROOT                    the directory saved and restored    $XDG_CACHE_HOME/vllm or ~/.cache/vllm
plus every variable of b10_transfer itself (BASETEN_FS_ENABLED, B10FS_CACHE_DIR, ...).

Exit codes: 0 done, 1 internal error, 2 the server never reported ready, 3 the last save raised or ran out of time,
64 bad command line. An invalid value of one of the variables above is logged and replaced by its default: a typo
must not cost a deployment its cache.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Mapping
from pathlib import Path

# The companion module (urllib, ctypes, the engine) is imported when the command runs, not when `b10_transfer` is:
# the package re-exports save_vllm_compile_cache() from here, and `import b10_transfer` must stay cheap.

logger = logging.getLogger("b10_transfer.companion")

DEFAULT_URL = "http://127.0.0.1:8000/v1/models"
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

# name -> (default, minimum accepted, maximum accepted)
_FLOATS = {
    "B10_TRANSFER_TIMEOUT_S": (1800.0, 0.0, 7 * 86400.0),
    "B10_TRANSFER_INTERVAL_S": (2.0, 0.05, 3600.0),
    "B10_TRANSFER_RESAVE_INTERVAL_S": (300.0, 0.0, 7 * 86400.0),
    "B10_TRANSFER_UNREADY_TIMEOUT_S": (120.0, 0.0, 7 * 86400.0),
    "B10_TRANSFER_FINAL_SAVE_TIMEOUT_S": (20.0, 0.0, 3600.0),
}


EXIT_USAGE = 64  # = companion.EXIT_USAGE (EX_USAGE): argparse's own 2 would read as "timed out"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def _parser() -> argparse.ArgumentParser:
    from . import __version__

    p = _Parser(
        prog="b10-compile-cache",
        description="Restore vLLM's compile cache from the b10fs volume, then save what the server compiles "
        "for as long as it runs. Start it next to the server: `b10-compile-cache & vllm serve ...`.",
        epilog="Configured by environment variables; see the README's vLLM section. Exit codes: 0 done, "
        "1 internal error, 2 the server never reported ready, 3 the last save failed to run, 64 usage.",
    )
    p.add_argument("--once", action="store_true",
                   help="the peer's behaviour: load; if nothing was loaded, wait for readiness, save once, exit")
    p.add_argument("--pid", type=int, metavar="PID",
                   help="the server's process id: when it exits, save one last time and exit "
                   "(without it, readiness lost for B10_TRANSFER_UNREADY_TIMEOUT_S means the server is gone)")
    p.add_argument("--version", action="version", version=f"%(prog)s (b10-transfer-cas {__version__})")
    return p


def vllm_cache_root(env: Mapping[str, str] | None = None) -> Path:
    """vLLM's own rule: VLLM_CACHE_ROOT, else $XDG_CACHE_HOME/vllm, else ~/.cache/vllm."""
    env = os.environ if env is None else env
    raw = env.get("VLLM_CACHE_ROOT") or os.path.join(
        env.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "vllm"
    )
    return Path(os.path.expanduser(raw)).absolute()


def _float(env: Mapping[str, str], name: str) -> float:
    default, lo, hi = _FLOATS[name]
    raw = env.get(name)
    if raw is None or not raw.strip():
        return default
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not lo <= value <= hi:  # also rejects nan
        logger.warning("%s=%r is not a number in [%g, %g]; using %g", name, raw, lo, hi, default)
        return default
    return value


def config_from_env(args: argparse.Namespace, env: Mapping[str, str] | None = None):
    """The CompanionConfig of this command line and environment."""
    from .companion import CompanionConfig

    env = os.environ if env is None else env
    return CompanionConfig(
        cache_dir=vllm_cache_root(env),
        url=env.get("B10_TRANSFER_VLLM_URL") or DEFAULT_URL,
        timeout_s=_float(env, "B10_TRANSFER_TIMEOUT_S"),
        interval_s=_float(env, "B10_TRANSFER_INTERVAL_S"),
        resave_interval_s=_float(env, "B10_TRANSFER_RESAVE_INTERVAL_S"),
        unready_timeout_s=_float(env, "B10_TRANSFER_UNREADY_TIMEOUT_S"),
        final_save_timeout_s=_float(env, "B10_TRANSFER_FINAL_SAVE_TIMEOUT_S"),
        pid=args.pid,
        once=args.once,
    )


def setup_logging(level_name: str | None) -> None:
    """Plain lines on stderr (no colours: they end up in the platform's log viewer), one handler on the root."""
    name = (level_name or "INFO").strip().upper()
    level = logging.getLevelName(name)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level if isinstance(level, int) else logging.INFO)
    if not isinstance(level, int):
        logger.warning("B10_TRANSFER_CLI_LOGLEVEL=%r is not a log level; using INFO", level_name)


def run(argv: list[str] | None = None, *, own_process: bool = True) -> int:
    """Parse, configure, run; returns the exit code (parse errors exit from argparse).

    own_process: this process is the companion (the command), so it owns the root logger and SIGTERM/SIGINT.
    Called from a library function instead, it adds a handler only if there is none and leaves signals alone.
    """
    from .companion import Companion

    args = _parser().parse_args(argv)
    if own_process or not logging.getLogger().handlers:
        setup_logging(os.environ.get("B10_TRANSFER_CLI_LOGLEVEL"))
    try:
        companion = Companion(config_from_env(args))
        if own_process:
            companion.install_signal_handlers()
    except Exception:
        logger.exception("companion failed to start")
        return 1
    return companion.run()


def save_vllm_compile_cache() -> None:
    """The peer's function of the same name: load, else wait for readiness and save once. Like the peer's, it
    exits the process with the exit code when the wait timed out or the save failed to run."""
    code = run(["--once"], own_process=False)
    if code:
        sys.exit(code)


def main() -> None:
    code = run()
    # A load or save abandoned at a stop request is still running on worker threads that cannot be interrupted and
    # that the interpreter would wait for at exit; leave without waiting (what they wrote so far is complete files).
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


if __name__ == "__main__":
    main()
