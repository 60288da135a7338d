"""`b10-compile-cache` exit codes and failure cases, each with the companion as a real process and a real readiness
server (no torch.compile here: plain files stand in for compile artifacts).

Exit codes: 0 done, 2 the server never reported ready (timeout, or its --pid exited first), 3 the last save failed to
run (covered in-process in test_companion_units.py), 64 usage.
"""

from __future__ import annotations

import signal
import subprocess
import sys

import pytest

from test_companion_harness import Companion, Pod, ReadinessServer, Volume, closed_port_url, wait_for


def artifact(pod: Pod, rel: str, data: bytes = b"kernel\n") -> str:
    path = pod.vllm_root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return rel


@pytest.fixture
def volume(tmp_path) -> Volume:
    return Volume.create(tmp_path / "volume")


@pytest.fixture
def server(tmp_path):
    srv = ReadinessServer(tmp_path / "ready")
    yield srv
    srv.stop()


@pytest.fixture
def sleeper():
    """A process standing in for the vLLM server process (for --pid)."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    yield proc
    if proc.poll() is None:
        proc.kill()
    proc.wait()


@pytest.mark.parametrize("answer", ["503", "refused"])
def test_readiness_timeout_exits_2_and_saves_nothing(tmp_path, volume, server, answer):
    pod = Pod(tmp_path / "pod", volume)
    artifact(pod, "torch_compile_cache/abc/rank_0_0/half-written")
    url = server.url if answer == "503" else closed_port_url()
    c = Companion.start(pod, url, B10_TRANSFER_TIMEOUT_S="1")
    assert c.wait() == 2, c.log
    assert c.lines(r"timed out after \d+s waiting for readiness")
    assert not c.lines(r"saving")
    assert volume.manifest_paths() == set()
    if answer == "503":
        assert set(server.answers()) == {503}


def test_once_is_the_peer_flow_wait_save_exit_0(tmp_path, volume, server):
    pod = Pod(tmp_path / "pod", volume)
    rel = artifact(pod, "torch_compile_cache/abc/rank_0_0/graph")
    server.set_ready()
    c = Companion.start(pod, server.url, "--once")
    assert c.wait() == 0, c.log
    assert c.lines(r"save status=SUCCESS")
    assert volume.manifest_paths() == {rel}


def test_sigterm_after_readiness_saves_what_changed_and_exits_0(tmp_path, volume, server):
    pod = Pod(tmp_path / "pod", volume)
    first = artifact(pod, "torch_compile_cache/abc/rank_0_0/graph")
    server.set_ready()
    c = Companion.start(pod, server.url, B10_TRANSFER_RESAVE_INTERVAL_S="0")  # only the final save can take it
    c.wait_log(r"watching: periodic saves off")
    assert volume.manifest_paths() == {first}
    late = artifact(pod, "torch_aot_compile/abc/rank_0_0/model")
    c.signal(signal.SIGTERM)
    assert c.wait() == 0, c.log
    assert c.lines(r"saving \(final, SIGTERM\)")
    assert volume.manifest_paths() == {first, late}


def test_sigint_with_nothing_new_exits_0_without_saving(tmp_path, volume, server):
    pod = Pod(tmp_path / "pod", volume)
    artifact(pod, "torch_compile_cache/abc/rank_0_0/graph")
    server.set_ready()
    c = Companion.start(pod, server.url, B10_TRANSFER_RESAVE_INTERVAL_S="0")
    c.wait_log(r"watching:")
    c.signal(signal.SIGINT)
    assert c.wait() == 0, c.log
    assert c.lines(r"stopped \(SIGINT\): cache unchanged since the last save")
    assert len(c.lines(r"save status=")) == 1


def test_sigterm_while_waiting_exits_0_without_saving(tmp_path, volume, server):
    pod = Pod(tmp_path / "pod", volume)
    artifact(pod, "torch_compile_cache/abc/rank_0_0/half-written")
    c = Companion.start(pod, server.url)
    c.wait_log(r"waiting for readiness")
    c.signal(signal.SIGTERM)
    assert c.wait() == 0, c.log
    assert c.lines(r"stopping on SIGTERM while waiting for readiness: nothing saved")
    assert volume.manifest_paths() == set()


def test_pid_exit_before_ready_exits_2(tmp_path, volume, server, sleeper):
    pod = Pod(tmp_path / "pod", volume)
    c = Companion.start(pod, server.url, "--pid", str(sleeper.pid))
    c.wait_log(r"waiting for readiness")
    sleeper.kill()
    sleeper.wait()
    assert c.wait() == 2, c.log
    assert c.lines(rf"server process {sleeper.pid} exited before it reported ready")


def test_pid_exit_after_ready_last_save_exits_0(tmp_path, volume, server, sleeper):
    pod = Pod(tmp_path / "pod", volume)
    first = artifact(pod, "torch_compile_cache/abc/rank_0_0/graph")
    server.set_ready()
    c = Companion.start(pod, server.url, "--pid", str(sleeper.pid), B10_TRANSFER_RESAVE_INTERVAL_S="0")
    c.wait_log(rf"server = pid {sleeper.pid}")
    late = artifact(pod, "torch_compile_cache/abc/rank_0_0/late")
    sleeper.kill()
    sleeper.wait()
    assert c.wait() == 0, c.log
    assert c.lines(rf"saving \(final, server process {sleeper.pid} exited\)")
    assert volume.manifest_paths() == {first, late}
    assert set(server.answers()) == {200}  # with --pid, no readiness polling after the wait


def test_launcher_exit_means_server_gone_last_save(tmp_path, volume, server):
    """`sh -c "b10-compile-cache & vllm serve ..."`: when that shell is gone, so is the pod's server, even if a
    supervisor restarted both and a new server answers on the same port (as here: the readiness server stays up)."""
    from b10_transfer.companion import pid_alive

    pod = Pod(tmp_path / "pod", volume)
    first = artifact(pod, "torch_compile_cache/abc/rank_0_0/graph")
    server.set_ready()
    c = Companion.start(pod, server.url, launcher=True, B10_TRANSFER_RESAVE_INTERVAL_S="0")
    c.wait_log(r"launcher = pid \d+")
    late = artifact(pod, "torch_compile_cache/abc/rank_0_0/late")
    c.proc.kill()  # the shell
    c.proc.wait()
    wait_for(lambda: not pid_alive(c.pid), f"the orphaned companion to exit:\n{c.log}")
    assert c.lines(rf"saving \(final, launcher process {c.proc.pid} exited\)")
    assert c.lines(r"stopped \(launcher process")
    assert volume.manifest_paths() == {first, late}


def test_readiness_lost_means_server_gone_last_save_exits_0(tmp_path, volume, server):
    pod = Pod(tmp_path / "pod", volume)
    first = artifact(pod, "torch_compile_cache/abc/rank_0_0/graph")
    server.set_ready()
    c = Companion.start(pod, server.url, B10_TRANSFER_RESAVE_INTERVAL_S="0", B10_TRANSFER_UNREADY_TIMEOUT_S="1")
    c.wait_log(r"server gone after 1s without readiness")
    late = artifact(pod, "torch_compile_cache/abc/rank_0_0/late")
    server.stop()  # vLLM exits: connection refused from now on
    assert c.wait() == 0, c.log
    assert c.lines(r"server not ready \(.*\); gone if this lasts 1s")
    assert c.lines(r"saving \(final, readiness lost for \d+s")
    assert volume.manifest_paths() == {first, late}


@pytest.mark.parametrize("trouble", ["missing", "full"])
def test_missing_or_full_volume_never_stops_server_or_companion(tmp_path, server, trouble):
    """No volume (feature off or not mounted) or a full one: every load/save fails cleanly, the companion keeps
    watching and retrying, the server keeps serving; when the volume comes back, the next periodic save works."""
    volume_root = tmp_path / "volume"
    pod = Pod(tmp_path / "pod", Volume(volume_root))
    env = {"B10_TRANSFER_RESAVE_INTERVAL_S": "0.5"}
    if trouble == "missing":
        volume_root.mkdir()  # the root exists, but nothing is mounted under it: no model/ nor org/
    else:
        (volume_root / "model").mkdir(parents=True)
        (volume_root / "org").mkdir()
        env["MIN_B10FS_SPACE_MB"] = str(1 << 40)  # more than any disk has: the volume reads as full
    rel = artifact(pod, "torch_compile_cache/abc/rank_0_0/graph")
    server.set_ready()
    c = Companion.start(pod, server.url, **env)
    # Loading needs no free space on the volume: with a full one it finds nothing saved yet.
    c.wait_log(r"load status=ERROR" if trouble == "missing" else r"load status=DOES_NOT_EXIST")
    c.wait_log(r"save status=ERROR", count=2)  # the first save and at least one periodic retry
    assert c.proc.poll() is None, c.log
    assert server.proc.poll() is None
    assert c.lines(r"not mounted" if trouble == "missing" else r"not enough free space")

    if trouble == "missing":
        (volume_root / "model").mkdir()
        (volume_root / "org").mkdir()
        c.wait_log(r"save status=SUCCESS")
        assert Volume(volume_root).manifest_paths() == {rel}
    c.signal(signal.SIGTERM)
    assert c.wait() == 0, c.log
    assert not c.lines(r"Traceback")


def test_usage_error_exits_64(tmp_path, volume):
    pod = Pod(tmp_path / "pod", volume)
    c = Companion.start(pod, closed_port_url(), "--no-such-flag")
    assert c.wait() == 64, c.log
    assert "usage: b10-compile-cache" in c.log


def test_invalid_variables_fall_back_to_defaults(tmp_path, volume, server):
    pod = Pod(tmp_path / "pod", volume)
    c = Companion.start(pod, server.url, "--once", B10_TRANSFER_TIMEOUT_S="soon", B10_TRANSFER_CLI_LOGLEVEL="loud")
    c.wait_log(r"waiting for readiness at .* \(timeout 1800s")
    assert c.lines(r"B10_TRANSFER_TIMEOUT_S='soon' is not a number")
    assert c.lines(r"B10_TRANSFER_CLI_LOGLEVEL='loud' is not a log level")
    c.signal(signal.SIGTERM)
    assert c.wait() == 0, c.log
