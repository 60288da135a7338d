"""The vLLM companion process: keep a vLLM server's compile cache on the volume for the whole life of a pod.

    b10-compile-cache & vllm serve ...

Life of one companion (`Companion.run`):
  1. load   restore whatever this environment's manifest has and the local cache lacks (at the inherited priority:
            it races vLLM, which must find the files before it compiles);
  2. lower  its own CPU and I/O priority (nice 19, I/O best-effort level 7), so nothing it does later competes
            with the server;
  3. wait   poll the readiness URL until it answers 200 (never saves before: a server still starting may be in the
            middle of writing its cache files);
  4. save   record everything the server compiled;
  5. watch  every `resave_interval_s`, save again if the directory changed (one walk: file count, total size,
            newest mtime) and has been quiet for a moment; stop when the server is gone (`pid` exited, the
            launcher, i.e. our parent process, exited, or readiness lost for longer than `unready_timeout_s`) or
            on SIGTERM/SIGINT;
  6. final  one last save if anything changed since the previous one, bounded by `final_save_timeout_s`, then exit.

`once=True` is the peer's behaviour: load; if that restored files, stop; else wait, save once and stop.

GPU memory: naming the manifest needs the GPU's name (core's environment key). torch's device query does not create a
CUDA context (checked on an H100 with torch 2.11: the process is not listed by nvidia-smi, while one tensor
allocation makes it 612 MiB), so the companion takes no memory from vLLM's `gpu_memory_utilization` budget.

Every load and save runs on a worker thread while the main thread waits for it *or* a stop request, so a signal is
answered within a bounded time whatever the volume does. A load or save abandoned at exit leaves only complete files
behind (the store writes temp files and renames them), so abandoning is safe. Nothing here raises into the caller:
failures are log lines, and the outcome is an exit code (see `EXIT_*`).
"""

from __future__ import annotations

import ctypes
import dataclasses
import http.client
import logging
import os
import platform
import signal
import stat
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cas.paths import is_transient

from . import core
from .config import read_settings
from .errors import CacheError
from .status import OperationStatus

logger = logging.getLogger("b10_transfer.companion")

# Exit codes. 0-3 are the peer's (`b10-compile-cache` of b10-transfer 0.4): 1 = the readiness wait crashed,
# 2 = readiness timed out, 3 = the save raised. Ours keep those meanings and add the cases the peer did not have.
EXIT_OK = 0  # loaded (--once), or saved and stopped: server gone, signal, or --once done (a save ERROR is logged)
EXIT_ERROR = 1  # the companion itself failed unexpectedly (a bug: the traceback is logged)
EXIT_NOT_READY = 2  # the server never answered ready: timeout, or its --pid exited first
EXIT_SAVE_FAILED = 3  # the last save raised, or did not finish within the final-save budget
EXIT_USAGE = 64  # bad command line (EX_USAGE; argparse's own 2 would read as a timeout)

# Manifest label: the vLLM cache is a different directory from the Inductor cache of `load_compile_cache()`, so it
# gets its own manifest per environment (`vllm.<env-key>`) and the two never overwrite each other's entries.
LABEL = "vllm"

# Threads for saves made while the server runs (the first and the periodic ones): the server is serving, so a save
# takes a few workers, not B10_TRANSFER_IO_THREADS. The final save and the load use the configured number (both race
# a clock: the grace period, and vLLM reaching its compile step).
BACKGROUND_SAVE_THREADS = 4
# One readiness request may take this long; vLLM answers /v1/models in milliseconds, even under load.
PROBE_TIMEOUT_S = 5.0
# A periodic save waits until no file was modified for this long (capped at half the resave interval), so it does
# not record a file vLLM is in the middle of writing; the final save does not wait.
QUIET_S = 10.0
# After a failed periodic save, the next attempt waits up to this many intervals (doubling), so a missing or full
# volume costs one cheap check every so often, not a full re-hash every interval.
MAX_BACKOFF_INTERVALS = 8
# Readiness checks while watching (no --pid): every unready_timeout/4 seconds, within these bounds. Far rarer than
# the start-up polling: every request is a line in vLLM's access log.
HEALTH_INTERVAL_MAX_S = 30.0
# How often a watched --pid is checked (a kill(pid, 0): no cost to the server).
PID_POLL_S = 1.0
NICENESS = 19
IOPRIO_BEST_EFFORT_LOWEST = (2 << 13) | 7  # IOPRIO_PRIO_VALUE(IOPRIO_CLASS_BE, 7)
_IOPRIO_SET = {"x86_64": 251, "aarch64": 30, "ppc64le": 273, "s390x": 282, "i686": 289, "armv7l": 314}


@dataclass(frozen=True)
class CompanionConfig:
    cache_dir: Path  # VLLM_CACHE_ROOT: torch_compile_cache/, torch_aot_compile/, ...
    url: str = "http://127.0.0.1:8000/v1/models"
    timeout_s: float = 1800.0  # readiness wait
    interval_s: float = 2.0  # readiness polling while waiting
    resave_interval_s: float = 300.0  # 0: no periodic saves
    unready_timeout_s: float = 120.0  # readiness lost this long = server gone; 0: never
    final_save_timeout_s: float = 20.0
    pid: int | None = None
    once: bool = False
    watch_launcher: bool = True  # stop when the parent process (the start command's shell) exits

    @property
    def health_interval_s(self) -> float:
        return min(HEALTH_INTERVAL_MAX_S, max(self.interval_s, self.unready_timeout_s / 4))

    @property
    def quiet_s(self) -> float:
        return min(QUIET_S, self.resave_interval_s / 2)


# --- the cache directory -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Fingerprint:
    """What one directory walk says about a cache: enough to tell "changed" from "unchanged" without hashing."""

    files: int = 0
    bytes: int = 0
    newest_mtime_ns: int = 0

    def describe(self) -> str:
        return f"{self.files} files, {self.bytes / 1e6:.1f} MB"


def fingerprint(root: Path) -> Fingerprint:
    """Walk `root` once (lstat only, symlinks not followed, transient names skipped as a save skips them).

    A file rewritten in place with the same size still moves the newest mtime; a file removed changes the count.
    Unreadable parts are skipped: this never raises.
    """
    files = size = newest = 0
    stack = [os.fspath(root)]
    while stack:
        try:
            it = os.scandir(stack.pop())
        except OSError:
            continue
        with it:
            for entry in it:
                if is_transient(entry.name):
                    continue
                try:
                    st = entry.stat(follow_symlinks=False)
                except OSError:
                    continue
                if stat.S_ISDIR(st.st_mode):
                    stack.append(entry.path)
                elif stat.S_ISREG(st.st_mode):
                    files += 1
                    size += st.st_size
                    newest = max(newest, st.st_mtime_ns)
    return Fingerprint(files, size, newest)


# --- the server ------------------------------------------------------------------------------------------------------

# Proxies are for the outside world; the readiness URL is the server next to us (an HTTP_PROXY in the pod must not
# turn a probe of 127.0.0.1 into a request to a proxy).
_opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def probe(url: str, timeout: float = PROBE_TIMEOUT_S) -> tuple[bool, str]:
    """GET `url`: (True, "HTTP 200") when ready, else (False, why). Never raises."""
    try:
        with _opener.open(urllib.request.Request(url, method="GET"), timeout=timeout) as resp:
            return resp.status == 200, f"HTTP {resp.status}"
    except urllib.error.HTTPError as exc:
        return False, f"HTTP {exc.code}"
    except urllib.error.URLError as exc:
        return False, str(exc.reason)
    except (OSError, http.client.HTTPException, ValueError) as exc:
        return False, f"{type(exc).__name__}: {exc}"


def pid_alive(pid: int) -> bool:
    """True while process `pid` exists and is not a zombie."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by someone else
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            # state is the field after "(comm)"; comm may contain spaces and parentheses, so split at the last ')'
            return f.read().rpartition(b")")[2].split()[0] not in (b"Z", b"X")
    except (OSError, IndexError):
        return True  # no /proc: kill(0) said it exists


def lower_priority() -> str:
    """Lowest CPU priority and the lowest best-effort I/O priority for this thread and every thread it starts later.

    Best effort: returns what was done, for the log. (Linux applies both per thread, and new threads inherit them,
    which is why this runs on the main thread before the watch phase starts its workers.)
    """
    done = []
    try:
        current = os.nice(0)
        done.append(f"nice {os.nice(max(0, NICENESS - current))}")
    except OSError as exc:
        done.append(f"nice unchanged ({exc.strerror})")
    nr = _IOPRIO_SET.get(platform.machine())
    if sys.platform.startswith("linux") and nr is not None:
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            if libc.syscall(nr, 1, 0, IOPRIO_BEST_EFFORT_LOWEST) == 0:  # IOPRIO_WHO_PROCESS, this thread
                done.append("io best-effort/7")
            else:
                done.append(f"io priority unchanged ({os.strerror(ctypes.get_errno())})")
        except (OSError, AttributeError) as exc:
            done.append(f"io priority unchanged ({exc})")
    else:
        done.append("io priority unchanged (unsupported platform)")
    return ", ".join(done)


# --- loads and saves on a worker thread -------------------------------------------------------------------------------


class _Op:
    """One core.load/core.save on a daemon thread, so the main thread can stop waiting for it."""

    def __init__(self, name: str, fn: Callable[[], tuple[OperationStatus, object]]):
        self.name = name
        self.result: tuple[OperationStatus, object] | None = None
        self.exc: BaseException | None = None
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(fn,), name=f"b10-{name}", daemon=True)
        self._thread.start()

    def _run(self, fn) -> None:
        try:
            self.result = fn()
        except BaseException as exc:  # noqa: BLE001 - reported by whoever reads the result
            self.exc = exc
        finally:
            self._done.set()

    def done(self) -> bool:
        return self._done.is_set()

    def wait(self, timeout: float | None) -> bool:
        return self._done.wait(timeout)


class Companion:
    """One companion run. `run()` returns an exit code; it never raises."""

    def __init__(
        self,
        cfg: CompanionConfig,
        *,
        load: Callable[..., tuple[OperationStatus, object]] | None = None,
        save: Callable[..., tuple[OperationStatus, object]] | None = None,
    ):
        self.cfg = cfg
        self._load = load or core.load
        self._save = save or core.save
        self._stop = threading.Event()
        self._stop_reason: str | None = None
        self._saving: _Op | None = None
        self._saving_fp: Fingerprint | None = None
        self._saved_fp: Fingerprint | None = None  # state recorded by the last successful save
        self._failures = 0
        self.saves = 0  # saves started, for the summary

    # signals ----------------------------------------------------------------------------------------------------

    def install_signal_handlers(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_signal)

    def _on_signal(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if self._stop.is_set():
            logger.info("%s received again: already stopping (final save bounded by %.0fs)", name,
                        self.cfg.final_save_timeout_s)
            return
        self.request_stop(name)

    def request_stop(self, reason: str) -> None:
        if self._stop_reason is None:
            self._stop_reason = reason
        self._stop.set()

    # the run ----------------------------------------------------------------------------------------------------

    def run(self) -> int:
        try:
            return self._run()
        except Exception:
            logger.exception("companion failed unexpectedly")
            return EXIT_ERROR

    def _run(self) -> int:
        cfg = self.cfg
        logger.info(
            "companion for %s: cache %s, %s, resave %s, pid %s",
            cfg.url,
            cfg.cache_dir,
            "once (peer behaviour)" if cfg.once else "watching",
            f"every {cfg.resave_interval_s:g}s" if cfg.resave_interval_s > 0 and not cfg.once else "off",
            cfg.pid if cfg.pid is not None else "-",
        )
        loaded = self._load_phase()
        if loaded is None:
            return self._stopped_early("loading")
        if cfg.once and loaded is OperationStatus.SUCCESS:
            logger.info("compile cache loaded; --once: nothing more to do")
            return EXIT_OK

        logger.info("priority lowered: %s", lower_priority())

        ready = self._wait_ready()
        if ready is None:
            return self._stopped_early("waiting for readiness")
        if not ready:
            return EXIT_NOT_READY

        code = self._save_now("first save after readiness", threads=BACKGROUND_SAVE_THREADS)
        if self._stop.is_set():  # a stop came during the save: _save_now made the final save
            return EXIT_OK if code is None else code
        if cfg.once:
            logger.info("--once: done")
            return EXIT_OK if code is None else code
        return self._watch()  # a first save that raised is retried like any failed save

    def _stopped_early(self, during: str) -> int:
        logger.info("stopping on %s while %s: nothing saved (the server never reported ready)",
                    self._stop_reason, during)
        return EXIT_OK

    # phases -----------------------------------------------------------------------------------------------------

    def _load_phase(self) -> OperationStatus | None:
        """The load's status (ERROR if it raised), or None if a stop came first."""
        op = _Op("load", lambda: self._load(self.cfg.cache_dir, label=LABEL))
        while not op.wait(0.2):
            if self._stop.is_set():
                return None
        if op.exc is not None:
            logger.error("load raised %s: %s; continuing without a cache", type(op.exc).__name__, op.exc)
            return OperationStatus.ERROR
        assert op.result is not None  # the load returned
        status = op.result[0]
        if status is OperationStatus.ERROR:
            logger.warning("load failed (see the line above); vLLM compiles from scratch, saves will still be tried")
        return status

    def _wait_ready(self) -> bool | None:
        """True once the URL answers 200; False on timeout or if the watched pid exits; None on a stop request."""
        cfg = self.cfg
        logger.info("waiting for readiness at %s (timeout %.0fs, every %.1fs)", cfg.url, cfg.timeout_s, cfg.interval_s)
        start = time.monotonic()
        last_why = None
        while True:
            ok, why = probe(cfg.url, min(PROBE_TIMEOUT_S, max(0.5, cfg.timeout_s)))
            waited = time.monotonic() - start
            if ok:
                logger.info("server ready after %.1fs", waited)
                return True
            if why != last_why:
                logger.debug("not ready yet: %s", why)
                last_why = why
            if self._stop.is_set():
                return None
            if cfg.pid is not None and not pid_alive(cfg.pid):
                logger.error("server process %d exited before it reported ready (%.0fs); nothing saved",
                             cfg.pid, waited)
                return False
            if waited > cfg.timeout_s:
                logger.error("timed out after %.0fs waiting for readiness at %s (last answer: %s); nothing saved",
                             waited, cfg.url, why)
                return False
            if self._stop.wait(cfg.interval_s):
                return None

    def _watch(self) -> int:
        cfg = self.cfg
        now = time.monotonic()
        next_resave = now + cfg.resave_interval_s if cfg.resave_interval_s > 0 else float("inf")
        watch_http = cfg.pid is None and cfg.unready_timeout_s > 0
        next_health = now + cfg.health_interval_s if watch_http else float("inf")
        # The process that started us (the shell of `b10-compile-cache & vllm serve`) lives as long as the server
        # in the foreground; once it is gone, so is this pod's server, even if a supervisor already started a new
        # shell, server and companion on the same port (which would keep a readiness probe happy forever).
        # Taken after readiness, so a launcher that exits at once (a double fork) leaves nothing to watch.
        launcher = os.getppid() if cfg.watch_launcher else 1
        next_pid = now + PID_POLL_S if cfg.pid is not None or launcher > 1 else float("inf")
        unready_since: float | None = None
        logger.info(
            "watching: %s; %s%s",
            f"resave every {cfg.resave_interval_s:g}s if the cache changed" if cfg.resave_interval_s > 0
            else "periodic saves off",
            f"server = pid {cfg.pid}" if cfg.pid is not None
            else f"server gone after {cfg.unready_timeout_s:g}s without readiness" if watch_http
            else "until SIGTERM/SIGINT",
            f"; launcher = pid {launcher}" if launcher > 1 else "",
        )
        while True:
            now = time.monotonic()
            wake = min(next_resave, next_health, next_pid, now + 60.0)  # with every check off: wait for a signal
            if self._saving is not None:
                wake = min(wake, now + 0.2)
            if self._stop.wait(max(0.0, wake - now)):
                break
            self._collect_save()
            now = time.monotonic()
            if now >= next_pid:
                next_pid = now + PID_POLL_S
                if cfg.pid is not None and not pid_alive(cfg.pid):
                    self.request_stop(f"server process {cfg.pid} exited")
                    break
                if launcher > 1 and os.getppid() != launcher:
                    self.request_stop(f"launcher process {launcher} exited")
                    break
            if now >= next_health:
                next_health = now + cfg.health_interval_s
                ok, why = probe(cfg.url)
                if ok:
                    if unready_since is not None:
                        logger.info("server ready again after %.0fs", now - unready_since)
                    unready_since = None
                elif unready_since is None:
                    unready_since = now
                    logger.warning("server not ready (%s); gone if this lasts %.0fs", why, cfg.unready_timeout_s)
                elif now - unready_since > cfg.unready_timeout_s:
                    self.request_stop(f"readiness lost for {now - unready_since:.0f}s ({why})")
                    break
            if now >= next_resave:
                next_resave = now + self._periodic_save()
        return self._final_save()

    # saves ------------------------------------------------------------------------------------------------------

    def _settings(self, threads: int | None):
        """Current settings with saves capped at `threads` workers; None if invalid (core then reports why)."""
        try:
            s = read_settings()
        except CacheError:
            return None
        if threads is not None and s.io_threads > threads:
            s = dataclasses.replace(s, io_threads=threads)
        return s

    def _start_save(self, why: str, threads: int | None) -> _Op:
        fp = fingerprint(self.cfg.cache_dir)
        self._saving_fp = fp
        self.saves += 1
        logger.info("saving (%s): %s", why, fp.describe())
        settings = self._settings(threads)
        self._saving = _Op("save", lambda: self._save(self.cfg.cache_dir, label=LABEL, settings=settings))
        return self._saving

    def _collect_save(self) -> int | None:
        """If the running save finished: record its outcome; EXIT_SAVE_FAILED if it raised, else None."""
        op = self._saving
        if op is None or not op.done():
            return None
        self._saving = None
        if op.exc is not None:
            self._failures += 1
            logger.error("save raised %s: %s", type(op.exc).__name__, op.exc, exc_info=op.exc)
            return EXIT_SAVE_FAILED
        assert op.result is not None  # the save returned
        status = op.result[0]
        if status in (OperationStatus.SUCCESS, OperationStatus.SKIPPED):
            self._saved_fp = self._saving_fp
            self._failures = 0
        else:
            self._failures += 1
        return None

    def _save_now(self, why: str, threads: int | None) -> int | None:
        """Save and wait for it: None, or EXIT_SAVE_FAILED if it raised. If a stop request comes meanwhile, this
        becomes the final save (bounded by the final-save budget) and returns the exit code."""
        saving = self._start_save(why, threads)
        while not saving.wait(0.2):
            if self._stop.is_set():
                return self._final_save()
        code = self._collect_save()
        if self._stop.is_set():
            return self._final_save()
        return code

    def _periodic_save(self) -> float:
        """Start a save if the cache changed and is quiet; return seconds until the next check."""
        cfg = self.cfg
        if self._saving is not None:
            return cfg.resave_interval_s
        fp = fingerprint(cfg.cache_dir)
        if fp == self._saved_fp:
            logger.debug("cache unchanged (%s)", fp.describe())
            return cfg.resave_interval_s
        age = time.time() - fp.newest_mtime_ns / 1e9
        if age < cfg.quiet_s:
            logger.debug("cache changed %.1fs ago; saving once quiet for %.0fs", age, cfg.quiet_s)
            return max(0.2, cfg.quiet_s - age)
        if self._failures:
            why = f"retry after {self._failures} failed save{'s' if self._failures > 1 else ''}"
        elif self._saved_fp is None:
            why = "cache changed"
        else:
            why = f"cache changed from {self._saved_fp.describe()}"
        self._start_save(why, threads=BACKGROUND_SAVE_THREADS)
        return cfg.resave_interval_s * min(2 ** self._failures, MAX_BACKOFF_INTERVALS)

    def _final_save(self) -> int:
        """Wait for a save in progress, then save once more if the cache changed since the last successful save."""
        cfg = self.cfg
        deadline = time.monotonic() + cfg.final_save_timeout_s
        if self._saving is not None:
            logger.info("stopping (%s): waiting for the save in progress (up to %.0fs)", self._stop_reason,
                        cfg.final_save_timeout_s)
            if not self._saving.wait(max(0.0, deadline - time.monotonic())):
                return self._abandon()
            self._collect_save()
        fp = fingerprint(cfg.cache_dir)
        if fp == self._saved_fp:
            logger.info("stopped (%s): cache unchanged since the last save (%s); %d saves", self._stop_reason,
                        fp.describe(), self.saves)
            return EXIT_OK
        saving = self._start_save(f"final, {self._stop_reason}", threads=None)
        if not saving.wait(max(0.0, deadline - time.monotonic())):
            return self._abandon()
        code = self._collect_save()
        logger.info("stopped (%s) after %d saves", self._stop_reason, self.saves)
        return EXIT_OK if code is None else code

    def _abandon(self) -> int:
        logger.error(
            "save did not finish within %.0fs of the stop request; exiting without it (the volume keeps only "
            "complete files; its locks expire after CLEANUP_LOCK_TIMEOUT_SECONDS)",
            self.cfg.final_save_timeout_s,
        )
        return EXIT_SAVE_FAILED
