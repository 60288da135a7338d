"""The companion's parts in-process: change detection, the readiness probe, priorities, configuration, and the exit
codes of failures a real volume cannot produce on demand (a save that raises, a save that outlives its budget)."""

from __future__ import annotations

import http.server
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from b10_transfer import OperationStatus
from b10_transfer.cli import config_from_env, vllm_cache_root
from b10_transfer.companion import (
    EXIT_NOT_READY,
    EXIT_OK,
    EXIT_SAVE_FAILED,
    Companion,
    CompanionConfig,
    Fingerprint,
    fingerprint,
    pid_alive,
    probe,
)


@pytest.fixture
def http_server():
    """An in-process server; `.status` is what GET answers."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(srv.status)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args):
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    srv.status = 200
    srv.url = f"http://127.0.0.1:{srv.server_address[1]}/v1/models"
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield srv
    srv.shutdown()
    srv.server_close()


def test_fingerprint_sees_new_grown_removed_and_rewritten_files_but_not_transient_ones(tmp_path):
    root = tmp_path / "vllm"
    assert fingerprint(root) == Fingerprint(0, 0, 0)  # missing directory: empty, no error
    (root / "torch_compile_cache" / "h" / "rank_0_0").mkdir(parents=True)
    a = root / "torch_compile_cache" / "h" / "rank_0_0" / "graph"
    a.write_bytes(b"x" * 10)
    fp1 = fingerprint(root)
    assert (fp1.files, fp1.bytes) == (1, 10)

    # Lock files, lock directories and temp files are not cache content: a save skips them, so must the check.
    (root / "locks").mkdir()
    (root / "locks" / "k.lock").write_bytes(b"")
    (root / "torch_compile_cache" / "h" / "x.lock").write_bytes(b"")
    (root / "torch_compile_cache" / "h" / "partial.tmp").write_bytes(b"123")
    (root / "torch_compile_cache" / "h" / ".tmp-host-1-abc").write_bytes(b"123")
    os.symlink("/etc/hostname", root / "link")
    assert fingerprint(root) == fp1

    os.utime(a, ns=(fp1.newest_mtime_ns + 10**9, fp1.newest_mtime_ns + 10**9))  # rewritten in place, same size
    fp2 = fingerprint(root)
    assert fp2 != fp1 and (fp2.files, fp2.bytes) == (1, 10)
    (root / "torch_aot_compile").mkdir()
    (root / "torch_aot_compile" / "m").write_bytes(b"y")
    fp3 = fingerprint(root)
    assert (fp3.files, fp3.bytes) == (2, 11)
    a.unlink()
    assert fingerprint(root).files == 1


def test_probe_ready_unready_refused_and_ignores_proxies(http_server, monkeypatch):
    monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:9")  # a proxy that does not exist
    monkeypatch.setenv("http_proxy", "http://127.0.0.1:9")
    assert probe(http_server.url) == (True, "HTTP 200")
    http_server.status = 503
    assert probe(http_server.url) == (False, "HTTP 503")
    ok, why = probe("http://127.0.0.1:9/v1/models", timeout=2)
    assert not ok and "refused" in why.lower()
    assert probe("not a url")[0] is False


def test_lower_priority_applies_to_threads_started_afterwards():
    code = (
        "import os, threading\n"
        "from b10_transfer.companion import lower_priority\n"
        "print(lower_priority())\n"
        "seen = []\n"
        "t = threading.Thread(target=lambda: seen.append(os.getpriority(os.PRIO_PROCESS, 0)))\n"
        "t.start(); t.join()\n"
        "print(os.getpriority(os.PRIO_PROCESS, 0), seen[0])\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.splitlines()
    assert out[0].startswith("nice 19")
    assert out[1] == "19 19"


def test_pid_alive_sees_exit_and_zombies():
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    assert pid_alive(proc.pid)
    proc.kill()
    deadline = time.monotonic() + 60
    while pid_alive(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not pid_alive(proc.pid)  # not reaped yet: a zombie counts as gone
    assert os.path.exists(f"/proc/{proc.pid}")  # (still there, as a zombie)
    proc.wait()
    assert not pid_alive(proc.pid)


def test_cache_root_follows_vllm_rules(tmp_path):
    assert vllm_cache_root({"VLLM_CACHE_ROOT": str(tmp_path / "v")}) == tmp_path / "v"
    assert vllm_cache_root({"XDG_CACHE_HOME": str(tmp_path)}) == tmp_path / "vllm"
    assert vllm_cache_root({}) == Path(os.path.expanduser("~/.cache/vllm"))


def test_config_defaults_are_the_peers(tmp_path):
    class Args:
        once, pid = False, None

    cfg = config_from_env(Args(), {"VLLM_CACHE_ROOT": str(tmp_path)})
    assert (cfg.url, cfg.timeout_s, cfg.interval_s) == ("http://127.0.0.1:8000/v1/models", 1800.0, 2.0)
    assert cfg.resave_interval_s > 0 and cfg.unready_timeout_s > 0 and cfg.final_save_timeout_s > 0
    bad = config_from_env(Args(), {"B10_TRANSFER_INTERVAL_S": "-1", "B10_TRANSFER_RESAVE_INTERVAL_S": "nan"})
    assert (bad.interval_s, bad.resave_interval_s) == (2.0, 300.0)


# --- exit codes of failures injected into load/save ----------------------------------------------------------------


def _ok(*args, **kwargs):
    return OperationStatus.SUCCESS, None


def _missing(*args, **kwargs):
    return OperationStatus.DOES_NOT_EXIST, None


def _raises(*args, **kwargs):
    raise RuntimeError("injected")


def _cfg(tmp_path, url, **kw) -> CompanionConfig:
    (tmp_path / "vllm").mkdir(exist_ok=True)
    (tmp_path / "vllm" / "f").write_bytes(b"1")
    return CompanionConfig(cache_dir=tmp_path / "vllm", url=url, **{"interval_s": 0.05, "timeout_s": 30, **kw})


def test_once_save_that_raises_exits_3(tmp_path, http_server):
    c = Companion(_cfg(tmp_path, http_server.url, once=True), load=_missing, save=_raises)
    assert c.run() == EXIT_SAVE_FAILED


def test_once_successful_load_exits_0_without_waiting(tmp_path):
    c = Companion(_cfg(tmp_path, "http://127.0.0.1:9/", once=True), load=_ok, save=_raises)
    assert c.run() == EXIT_OK


def test_load_that_raises_is_survived(tmp_path, http_server):
    c = Companion(_cfg(tmp_path, http_server.url, once=True), load=_raises, save=_ok)
    assert c.run() == EXIT_OK


def test_watch_retries_a_save_that_raised_and_the_final_save_decides_the_code(tmp_path, http_server):
    calls = []

    def flaky(*args, **kwargs):
        calls.append(time.monotonic())
        if len(calls) < 3:
            raise RuntimeError("injected")
        return OperationStatus.SUCCESS, None

    c = Companion(_cfg(tmp_path, http_server.url, resave_interval_s=0.1, unready_timeout_s=0), load=_missing,
                  save=flaky)
    t = threading.Thread(target=lambda: setattr(c, "code", c.run()))
    t.start()
    deadline = time.monotonic() + 60
    while len(calls) < 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    c.request_stop("test")
    t.join(60)
    assert len(calls) >= 3 and c.code == EXIT_OK


def test_final_save_outliving_its_budget_exits_3_on_time(tmp_path, http_server):
    release = threading.Event()

    def slow(*args, **kwargs):
        release.wait(60)
        return OperationStatus.SUCCESS, None

    c = Companion(_cfg(tmp_path, http_server.url, final_save_timeout_s=0.5, resave_interval_s=0), load=_missing,
                  save=slow)
    t = threading.Thread(target=lambda: setattr(c, "code", c.run()))
    t.start()
    time.sleep(0.5)  # the first save is now running (and blocked)
    c.request_stop("test")
    t.join(30)
    release.set()
    assert not t.is_alive() and c.code == EXIT_SAVE_FAILED


def test_readiness_timeout_exits_2_without_saving(tmp_path, http_server):
    http_server.status = 503
    c = Companion(_cfg(tmp_path, http_server.url, timeout_s=0.3), load=_missing, save=_raises)
    assert c.run() == EXIT_NOT_READY
    assert c.saves == 0


def test_peer_entry_points_exist_and_import_stays_cheap():
    code = (
        "import sys, b10_transfer\n"
        "from b10_transfer.vllm_cache import main, save_vllm_compile_cache\n"
        "from b10_transfer import cli, companion\n"
        "assert b10_transfer.save_vllm_compile_cache is save_vllm_compile_cache is cli.save_vllm_compile_cache\n"
        "assert main is cli.main and cli.EXIT_USAGE == companion.EXIT_USAGE\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
    # `import b10_transfer` alone loads neither the companion nor torch.
    out = subprocess.run(
        [sys.executable, "-c", "import sys, b10_transfer; print('b10_transfer.companion' in sys.modules, 'torch' in sys.modules)"],
        capture_output=True, text=True, check=True,
    ).stdout.split()
    assert out == ["False", "False"]


def test_every_check_off_waits_for_a_stop(tmp_path, http_server):
    c = Companion(_cfg(tmp_path, http_server.url, resave_interval_s=0, unready_timeout_s=0), load=_missing, save=_ok)
    t = threading.Thread(target=lambda: setattr(c, "code", c.run()))
    t.start()
    time.sleep(1.0)
    assert t.is_alive()
    c.request_stop("test")
    t.join(30)
    assert not t.is_alive() and c.code == EXIT_OK
