"""cas/s3.py beyond the generic contract (tests/test_backend_contract.py runs that on moto and SeaweedFS): URL and
environment parsing, error mapping, retries through a fault-injecting proxy, dead endpoints, large payloads."""
from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

import pytest

pytest.importorskip("obstore")
import obstore
from s3_servers import S3Bucket, blackhole_listener, fault_proxy, refused_endpoint

from cas.errors import StoreReadOnly, StoreUnavailable
from cas.s3 import S3Backend, S3Credentials, S3Location, S3Settings, parse_s3_url
from cas.storage import AlreadyExists, NotFound, ObjectTooLarge, PreconditionFailed

# -- configuration -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("url, loc", [
    ("s3://bucket", S3Location("bucket", "")),
    ("s3://bucket/", S3Location("bucket", "")),
    ("s3://my.bucket-1/org/b10_cas", S3Location("my.bucket-1", "org/b10_cas")),
    ("s3://bucket/a/b/", S3Location("bucket", "a/b")),
])
def test_parse_s3_url(url: str, loc: S3Location) -> None:
    assert parse_s3_url(url) == loc


@pytest.mark.parametrize("url", [
    "/cache/org", "s3:/bucket", "s3://", "s3://B", "s3://Bucket/x", "s3://bucket/a/../b", "s3://bucket/a//b",
    "s3://bucket/./x", "s3://bucket/a b", "s3://user:pw@bucket/x", "s3://bucket/x?versionId=1", "s3://bu..cket",
])
def test_parse_s3_url_rejects(url: str) -> None:
    with pytest.raises(ValueError):
        parse_s3_url(url)


def test_credentials_from_standard_variables() -> None:
    env = {"AWS_ENDPOINT_URL": "http://127.0.0.1:1", "AWS_ENDPOINT_URL_S3": "http://127.0.0.1:2",
           "AWS_ACCESS_KEY_ID": "id", "AWS_SECRET_ACCESS_KEY": "secret", "AWS_SESSION_TOKEN": "tok",
           "AWS_DEFAULT_REGION": "eu-west-1"}
    creds = S3Credentials.from_env(env)
    assert creds == S3Credentials("http://127.0.0.1:2", "eu-west-1", "id", "secret", "tok")
    assert S3Credentials.from_env({"AWS_REGION": "us-east-2", "AWS_DEFAULT_REGION": "x"}).region == "us-east-2"
    assert S3Credentials.from_env({}) == S3Credentials()
    assert S3Credentials.from_env({"AWS_VIRTUAL_HOSTED_STYLE_REQUEST": "true"}).virtual_hosted_style is True


def test_backend_from_url_and_environment(moto_bucket: S3Bucket) -> None:
    backend = S3Backend(f"{moto_bucket.url}/org/b10_cas", environ=moto_bucket.endpoint.env())
    backend.put("blobs/ab/x", b"1")
    assert backend.location == f"{moto_bucket.url}/org/b10_cas"
    assert bytes(obstore.get(moto_bucket.store(), "org/b10_cas/blobs/ab/x").bytes()) == b"1"
    assert backend.exists()


# -- reads -----------------------------------------------------------------------------------------------------------


def test_ranges_limits_and_streams(s3_bucket: S3Bucket) -> None:
    backend = s3_bucket.backend("p")
    backend.put("k", b"0123456789")
    assert backend.get("k", limit=10, offset=3) == b"3456789"
    assert backend.get("k", limit=3, offset=3, length=3) == b"345"
    assert backend.get("k", limit=10, offset=8, length=5) == b"89"  # a range past the end is cut, like pread
    assert backend.get("k", limit=10, offset=10) == b""  # 416 from the server: nothing there
    assert backend.get("k", limit=10, offset=20, length=4) == b""
    assert backend.get("k", limit=0, length=0) == b""
    with pytest.raises(ObjectTooLarge):
        backend.get("k", limit=6, offset=3)  # checked on the response headers, before the body
    with pytest.raises(NotFound):
        backend.get("absent", limit=1, length=0)


def test_large_callable_payload_spools_and_streams(moto_bucket: S3Bucket) -> None:
    backend = moto_bucket.backend()
    chunk = bytes(range(256)) * 4096  # 1 MiB
    info = backend.put("big", lambda out: [out.write(chunk) for _ in range(20)])  # 20 MiB: past the memory spool
    assert info.size == 20 * len(chunk)
    with backend.open("big", limit=info.size) as fh:
        total, first = 0, fh.read(5)
        total += len(first)
        while block := fh.read(1 << 20):
            total += len(block)
    assert first == chunk[:5] and total == info.size
    with pytest.raises(ObjectTooLarge):
        backend.open("big", limit=info.size - 1)


def test_list_kinds_and_prefix_isolation(s3_bucket: S3Bucket) -> None:
    raw = s3_bucket.store()
    backend = s3_bucket.backend("org/store")
    backend.put("blobs/ab/x", b"1")
    backend.put("blobs/.tmp-host-1-abc", b"2")
    obstore.put(raw, "org/store/blobs/odd name", b"3")  # no key can have this name: listed, never read
    obstore.put(raw, "org/storex/blobs/y", b"4")  # a sibling prefix is not ours
    kinds = {i.key: i.kind for i in backend.list("blobs/")}
    assert kinds == {"blobs/ab/": "prefix", "blobs/.tmp-host-1-abc": "temp", "blobs/odd name": "other"}
    assert [i.key for i in backend.list("")] == ["blobs/"]
    assert list(backend.list("nothing/")) == []


def test_emptied_prefix_lists_nothing(s3_bucket: S3Bucket) -> None:
    """SeaweedFS keeps a prefix whose last object was deleted as a directory and lists it as an object named like
    the prefix: the backend must not report it (cas check called it a foreign file in blobs/<xx>)."""
    backend = s3_bucket.backend("org/store")
    backend.put("blobs/ab/x", b"1")
    backend.put("blobs/cd/y", b"2")
    backend.delete("blobs/ab/x")
    assert list(backend.list("blobs/ab/")) == []
    assert {i.key: i.kind for i in backend.list("blobs/")}.get("blobs/cd/") == "prefix"
    assert all(i.kind == "prefix" for i in backend.list("blobs/"))


def test_many_keys_listed_across_pages(moto_bucket: S3Bucket) -> None:
    backend = moto_bucket.backend("s")
    keys = [f"blobs/ab/{i:064x}" for i in range(1050)]
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda k: backend.put(k, b"x"), keys))
    assert sorted(i.key for i in backend.list("blobs/ab/")) == keys


# -- writes and the clock --------------------------------------------------------------------------------------------


def test_touch_bumps_mtime_and_keeps_content_and_version(s3_bucket: S3Bucket) -> None:
    backend = s3_bucket.backend()
    put = backend.put("roots/a.root", b"root")
    before = backend.stat("roots/a.root")
    time.sleep(1.1)  # LastModified has one-second resolution
    backend.touch("roots/a.root")
    after = backend.stat("roots/a.root")
    assert after.mtime >= before.mtime + 1 and after.version == put.version
    assert backend.get("roots/a.root", limit=10) == b"root"
    assert abs(backend.now() - after.mtime) < 3


def test_if_version_cas_and_conditional_delete(s3_bucket: S3Bucket) -> None:
    backend = s3_bucket.backend()
    first = backend.put("manifests/e.manifest", b"one")
    with pytest.raises(AlreadyExists):
        backend.put("manifests/e.manifest", b"x", if_absent=True)
    with pytest.raises(PreconditionFailed):
        backend.put("manifests/missing", b"x", if_version=first.version)  # If-Match on a missing key
    with pytest.raises(ValueError):
        backend.put("manifests/e.manifest", b"x", if_absent=True, if_version=first.version)
    second = backend.put("manifests/e.manifest", b"two", if_version=first.version)
    with pytest.raises(PreconditionFailed):
        backend.delete("manifests/e.manifest", if_version=first.version)
    backend.delete("manifests/e.manifest", if_version=second.version)
    with pytest.raises(NotFound):
        backend.delete("manifests/e.manifest")


def test_16_if_match_savers_lose_nothing(s3_bucket: S3Bucket) -> None:
    """The manifest commit in miniature: read, merge, put If-Match, retry on PreconditionFailed."""
    backend = s3_bucket.backend()
    backend.put("m", b"")

    def add(i: int) -> int:
        attempts = 0
        while True:
            attempts += 1
            info = backend.stat("m")
            lines = set(backend.get("m", limit=1 << 20).split())
            lines.add(f"entry-{i}".encode())
            try:
                backend.put("m", b"\n".join(sorted(lines)), if_version=info.version)
                return attempts
            except PreconditionFailed:
                continue

    with ThreadPoolExecutor(16) as pool:
        list(pool.map(add, range(16)))
    assert set(backend.get("m", limit=1 << 20).split()) == {f"entry-{i}".encode() for i in range(16)}


def test_move_copies_then_deletes(s3_bucket: S3Bucket) -> None:
    backend = s3_bucket.backend()
    backend.put("blobs/ab/x", b"blob")
    backend.move("blobs/ab/x", "trash/ab/x")
    assert backend.get("trash/ab/x", limit=4) == b"blob"
    with pytest.raises(NotFound):
        backend.stat("blobs/ab/x")
    with pytest.raises(NotFound):
        backend.move("blobs/ab/x", "trash/ab/x")


# -- failures --------------------------------------------------------------------------------------------------------


def test_wrong_credentials_are_unavailable_and_read_only(seaweed_bucket: S3Bucket) -> None:
    seaweed_bucket.backend().put("k", b"x")
    wrong = replace(seaweed_bucket.endpoint, secret_access_key="wrong")
    backend = S3Bucket(wrong, seaweed_bucket.name).backend()
    with pytest.raises(StoreUnavailable, match="access denied"):
        backend.get("k", limit=1)
    with pytest.raises(StoreReadOnly):
        backend.put("k2", b"x")
    with pytest.raises(StoreUnavailable):
        list(backend.list(""))


def test_missing_bucket(s3_bucket: S3Bucket) -> None:
    backend = S3Bucket(s3_bucket.endpoint, "absent-" + s3_bucket.name[-12:]).backend()
    assert not backend.exists()
    with pytest.raises(StoreUnavailable, match="bucket does not exist"):
        backend.get("k", limit=1)
    with pytest.raises(StoreUnavailable, match="bucket does not exist"):
        list(backend.list("blobs/"))
    with pytest.raises(StoreUnavailable):
        backend.check_alive()


def test_409_conflict_on_create_is_retried(s3_bucket: S3Bucket) -> None:
    with fault_proxy(s3_bucket.endpoint) as (proxy, through):
        backend = S3Bucket(through, s3_bucket.name).backend()
        proxy.inject("PUT", "/locks/gc.lock", 409, "ConditionalRequestConflict", times=2)
        backend.put("locks/gc.lock", b"mine", if_absent=True)  # two 409s, then the real 200
        assert backend.get("locks/gc.lock", limit=10) == b"mine"
        assert [s for m, p, s in proxy.requests if m == "PUT"] == [409, 409, 200]
        proxy.inject("PUT", "/locks/gc.lock", 409, "ConditionalRequestConflict", times=1)
        with pytest.raises(AlreadyExists):  # after the 409 retry, the true answer: 412
            backend.put("locks/gc.lock", b"other", if_absent=True)


def test_409_on_if_match_is_a_precondition_failure(moto_bucket: S3Bucket) -> None:
    with fault_proxy(moto_bucket.endpoint) as (proxy, through):
        backend = S3Bucket(through, moto_bucket.name).backend(max_retries=1)
        first = backend.put("m", b"one")
        proxy.inject("PUT", "/m", 409, "ConditionalRequestConflict", times=5)
        with pytest.raises(PreconditionFailed):
            backend.put("m", b"two", if_version=first.version)
        assert backend.get("m", limit=3) == b"one"


def test_5xx_and_slowdown_are_retried(s3_bucket: S3Bucket) -> None:
    with fault_proxy(s3_bucket.endpoint) as (proxy, through):
        backend = S3Bucket(through, s3_bucket.name).backend(backoff_initial_s=0.01)
        proxy.inject("PUT", "/k", 503, "SlowDown", times=2)
        proxy.inject("GET", "/k", 500, "InternalError", times=1)
        backend.put("k", b"v", if_absent=True)
        assert backend.get("k", limit=1) == b"v"
        assert [s for _, _, s in proxy.requests] == [503, 503, 200, 500, 200]
        proxy.inject("GET", "/k", 503, "SlowDown", times=10)
        with pytest.raises(StoreUnavailable):  # max_retries (3) exhausted
            backend.get("k", limit=1)


def _timed(fn) -> float:  # type: ignore[no-untyped-def]
    started = time.monotonic()
    with pytest.raises(StoreUnavailable):
        fn()
    return time.monotonic() - started


def test_refused_endpoint_fails_fast_then_breaker_answers_at_once() -> None:
    settings = S3Settings(connect_timeout_s=1, max_retries=2, backoff_initial_s=0.05, dead_for_s=5)
    creds = S3Credentials(refused_endpoint(), "us-east-1", "k", "s")
    backend = S3Backend("s3://bucket/p", credentials=creds, settings=settings)
    assert _timed(lambda: backend.get("k", limit=1)) < 1.5
    assert _timed(lambda: backend.stat("k")) < 0.05  # the breaker: no request at all
    assert _timed(lambda: list(backend.list("blobs/"))) < 0.05


def test_hung_endpoint_bounded_by_read_timeout() -> None:
    sock, url = blackhole_listener()
    try:
        settings = S3Settings(connect_timeout_s=1, read_timeout_s=1, max_retries=1, retry_timeout_s=5,
                              backoff_initial_s=0.05)
        backend = S3Backend("s3://bucket", credentials=S3Credentials(url, "us-east-1", "k", "s"), settings=settings)
        elapsed = _timed(lambda: backend.get("k", limit=1))
        assert 1.9 < elapsed < 3.5  # 2 attempts x 1 s
        threads_done = []

        def load(i: int) -> None:  # 8 more requests of a load: the breaker answers them without waiting
            with pytest.raises(StoreUnavailable):
                backend.get(f"blobs/ab/{i}", limit=1)
            threads_done.append(i)

        started = time.monotonic()
        workers = [threading.Thread(target=load, args=(i,)) for i in range(8)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        assert len(threads_done) == 8 and time.monotonic() - started < 0.5
    finally:
        sock.close()


def test_stopped_seaweedfs_mid_load_fails_bounded(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A private SeaweedFS, stopped (SIGKILL) between two reads: the next read is StoreUnavailable within the
    connect/retry bound, not a hang."""
    from s3_servers import fresh_bucket_name, seaweed_server

    with seaweed_server(tmp_path / "weed") as server:
        name = fresh_bucket_name()
        server.endpoint.create_bucket(name)
        backend = S3Bucket(server.endpoint, name).backend(read_timeout_s=1, max_retries=2, backoff_initial_s=0.05)
        backend.put("blobs/ab/x", b"x" * 1000)
        assert backend.get("blobs/ab/x", limit=1000) == b"x" * 1000
        server.kill()
        assert _timed(lambda: backend.get("blobs/ab/x", limit=1000)) < 4


def test_now_is_the_servers_clock_from_one_request(s3_bucket: S3Bucket) -> None:
    with fault_proxy(s3_bucket.endpoint) as (proxy, through):
        backend = S3Bucket(through, s3_bucket.name).backend()
        assert abs(backend.now() - time.time()) < 2  # same machine: same clock, within Date's 1 s resolution
        assert len(proxy.requests) == 1  # one HEAD, whatever it answers
        backend.now()
        assert len(proxy.requests) == 1  # calibrated once


def test_now_falls_back_to_a_probe_object(s3_bucket: S3Bucket, monkeypatch: pytest.MonkeyPatch) -> None:
    backend = s3_bucket.backend()
    monkeypatch.setattr(backend, "_date_header_offset", lambda: None)
    assert abs(backend.now() - time.time()) < 2
    assert [i for i in backend.list("") if i.kind == "temp"] == []  # the probe is deleted
