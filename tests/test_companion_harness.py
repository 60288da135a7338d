"""Real processes for the `b10-compile-cache` tests (no tests here): a readiness server standing in for vLLM, a
compile-artifact writer, the companion itself, and a "pod" (a local cache dir) on a stand-in volume.

Deadlines below are failure guards for a slow machine, never assertions about speed.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from cas.paths import is_transient
from conftest import child_environ

DEADLINE_S = 240.0

# Stands in for vLLM's OpenAI server: GET answers 503 until <ctl>/ready exists, then 200 with a model list.
READY_SERVER = r"""
import http.server, os, sys
ctl = sys.argv[1]
class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        ready = os.path.exists(os.path.join(ctl, "ready"))
        body = b'{"object": "list", "data": [{"id": "tiny"}]}' if ready else b"loading"
        self.send_response(200 if ready else 503)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
        with open(os.path.join(ctl, "requests"), "a") as fh:
            fh.write(f"{200 if ready else 503}\n")
    def log_message(self, *args):
        pass
server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
tmp = os.path.join(ctl, "port.tmp")
with open(tmp, "w") as fh:
    fh.write(str(server.server_address[1]))
os.rename(tmp, os.path.join(ctl, "port"))
server.serve_forever()
"""

# Stands in for vLLM compiling: a small torch.compile on the CPU with TORCHINDUCTOR_CACHE_DIR inside the vLLM cache
# root, one shape per phase; phase i starts when <ctl>/go-<i> exists and ends by writing <ctl>/done-<i> (Inductor's
# counters, JSON). Each phase also writes a file under torch_aot_compile/, as vLLM's AOT compile does.
WRITER = r"""
import json, os, sys, time
ctl, vllm_root, shapes = sys.argv[1], sys.argv[2], [int(s) for s in sys.argv[3].split(",")]
import torch
from torch._dynamo.utils import counters

def block(x, w):
    return torch.nn.functional.gelu(x @ w + 1.0).softmax(dim=-1)

torch.manual_seed(0)
w = torch.randn(16, 16)
compiled = torch.compile(block)
for i, n in enumerate(shapes):
    while not os.path.exists(os.path.join(ctl, f"go-{i}")):
        time.sleep(0.05)
    x = torch.randn(n, 16)
    err = (compiled(x, w) - block(x, w)).abs().max().item()
    aot = os.path.join(vllm_root, "torch_aot_compile", f"shape-{n}")
    os.makedirs(aot, exist_ok=True)
    with open(os.path.join(aot, "model"), "wb") as fh:
        fh.write(f"aot artifact for batch {n}\n".encode() * 64)
    result = {"max_abs_err": err, **{k: int(v) for k, v in counters["inductor"].items() if "cache" in k},
              **{k: int(v) for k, v in counters["aot_autograd"].items() if "cache" in k}}
    with open(os.path.join(ctl, f"done-{i}.tmp"), "w") as fh:
        json.dump(result, fh)
    os.rename(os.path.join(ctl, f"done-{i}.tmp"), os.path.join(ctl, f"done-{i}"))
"""


def wait_for(predicate, what: str, timeout: float = DEADLINE_S, proc: subprocess.Popen | None = None):
    """Poll `predicate` until it returns something truthy; fail with `what` after `timeout` (a guard, not a test)."""
    end = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            value = predicate()
            if value:
                return value
            raise AssertionError(f"process exited ({proc.returncode}) before: {what}")
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for: {what}")
        time.sleep(0.1)


def kill(proc: subprocess.Popen | None) -> None:
    if proc is not None and proc.poll() is None:
        proc.kill()
        proc.wait(timeout=30)


@dataclass
class Volume:
    root: Path  # stands in for /cache: model/ and org/ like the real mounts

    @classmethod
    def create(cls, root: Path) -> "Volume":
        (root / "model").mkdir(parents=True)
        (root / "org").mkdir()
        return cls(root)

    @property
    def scope(self) -> Path:
        return self.root / "model" / "compile_cache"

    def manifest_paths(self) -> set[str]:
        """Entry paths of the vLLM manifest of this environment (empty if there is none)."""
        from b10_transfer import core
        from cas import Scope

        if not self.scope.is_dir():
            return set()
        manifest = Scope(self.scope).read_manifest(core.key_for("vllm"))
        return set(manifest.entries) if manifest else set()


@dataclass
class Pod:
    """One replica's local disk: a vLLM cache root (VLLM_CACHE_ROOT) with the Inductor cache inside it."""

    root: Path
    volume: Volume

    def __post_init__(self):
        self.root.mkdir(parents=True, exist_ok=True)

    @property
    def vllm_root(self) -> Path:
        return self.root / "vllm"

    @property
    def inductor(self) -> Path:
        return self.vllm_root / "torch_compile_cache" / "inductor"

    def env(self, **extra: str) -> dict[str, str]:
        env = child_environ(self.volume.root, self.inductor)
        env.update(
            VLLM_CACHE_ROOT=str(self.vllm_root),
            PYTHONPATH=os.pathsep.join(filter(None, [str(Path(__file__).resolve().parents[1]), env.get("PYTHONPATH")])),
            PYTHONUNBUFFERED="1",
        )
        for name in list(env):
            if name.startswith("B10_TRANSFER_") or name in ("HTTP_PROXY", "http_proxy", "NO_PROXY", "no_proxy"):
                del env[name]
        env.update(extra)
        return env

    def files(self) -> dict[str, bytes]:
        """Relative path -> content of every file a save would take (transient names skipped)."""
        out = {}
        for path in sorted(self.vllm_root.rglob("*")):
            rel = path.relative_to(self.vllm_root)
            if path.is_file() and not path.is_symlink() and not any(is_transient(p) for p in rel.parts):
                out[rel.as_posix()] = path.read_bytes()
        return out


class ReadinessServer:
    def __init__(self, ctl: Path):
        self.ctl = ctl
        ctl.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen([sys.executable, "-c", READY_SERVER, str(ctl)])
        port = wait_for(lambda: (ctl / "port").exists() and (ctl / "port").read_text(), "readiness server port",
                        timeout=60, proc=self.proc)
        self.url = f"http://127.0.0.1:{port}/v1/models"

    def set_ready(self, ready: bool = True) -> None:
        if ready:
            (self.ctl / "ready").touch()
        else:
            (self.ctl / "ready").unlink(missing_ok=True)

    def answers(self) -> list[int]:
        path = self.ctl / "requests"
        return [int(x) for x in path.read_text().split()] if path.exists() else []

    def stop(self) -> None:
        kill(self.proc)


def closed_port_url() -> str:
    """A URL nobody listens on (connection refused), like vLLM before it binds its port."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/v1/models"


class Writer:
    """The torch.compile process: compiles one shape per phase when told to."""

    def __init__(self, pod: Pod, ctl: Path, shapes: list[int]):
        self.ctl = ctl
        ctl.mkdir(parents=True, exist_ok=True)
        env = pod.env(TORCHINDUCTOR_CACHE_DIR=str(pod.inductor))
        self.log = ctl / "writer.log"
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", WRITER, str(ctl), str(pod.vllm_root), ",".join(map(str, shapes))],
                env=env, stdout=out, stderr=subprocess.STDOUT,
            )

    def phase(self, i: int) -> dict:
        (self.ctl / f"go-{i}").touch()
        done = self.ctl / f"done-{i}"
        wait_for(done.exists, f"writer phase {i}\n{self.log.read_text() if self.log.exists() else ''}",
                 proc=self.proc)
        return json.loads(done.read_text())

    def finish(self) -> None:
        self.proc.wait(timeout=DEADLINE_S)
        assert self.proc.returncode == 0, self.log.read_text()


def companion_command() -> list[str]:
    script = Path(sys.executable).parent / "b10-compile-cache"  # the console script pyproject declares
    return [str(script)] if script.exists() else [sys.executable, "-m", "b10_transfer.cli"]


@dataclass
class Companion:
    pod: Pod
    env: dict[str, str]
    args: list[str] = field(default_factory=list)
    log_path: Path | None = None
    launcher: bool = False  # start it as `sh -c 'b10-compile-cache & wait'`: proc is the shell, pid the companion

    def __post_init__(self):
        n = len(list(self.pod.root.glob("companion-*.log")))
        self.log_path = self.pod.root / f"companion-{n}.log"
        cmd = companion_command() + self.args
        if self.launcher:
            pid_file = self.pod.root / f"companion-{n}.pid"
            cmd = ["sh", "-c", f'"$@" & echo $! > {pid_file}; wait', "sh", *cmd]
        with open(self.log_path, "wb") as out:
            self.proc = subprocess.Popen(cmd, env=self.env, stdout=out, stderr=subprocess.STDOUT)
        self.pid = self.proc.pid
        if self.launcher:
            self.pid = int(wait_for(lambda: pid_file.exists() and pid_file.read_text().strip(), "companion pid",
                                    proc=self.proc))

    @classmethod
    def start(cls, pod: Pod, url: str, *args: str, launcher: bool = False, **env: str) -> "Companion":
        defaults = {
            "B10_TRANSFER_VLLM_URL": url,
            "B10_TRANSFER_INTERVAL_S": "0.2",
            "B10_TRANSFER_TIMEOUT_S": "300",
            "B10_TRANSFER_CLI_LOGLEVEL": "INFO",
        }
        defaults.update(env)
        return cls(pod, pod.env(**defaults), list(args), launcher=launcher)

    @property
    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def lines(self, pattern: str) -> list[str]:
        return [line for line in self.log.splitlines() if re.search(pattern, line)]

    def wait_log(self, pattern: str, count: int = 1, timeout: float = DEADLINE_S) -> list[str]:
        return wait_for(lambda: len(self.lines(pattern)) >= count and self.lines(pattern),
                        f"{count}x /{pattern}/ in the companion log:\n{self.log}", timeout=timeout, proc=self.proc)

    def signal(self, sig=signal.SIGTERM) -> None:
        self.proc.send_signal(sig)

    def wait(self, timeout: float = DEADLINE_S) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            kill(self.proc)
            raise AssertionError(f"companion did not exit:\n{self.log}") from None

    def stop(self) -> None:
        kill(self.proc)
