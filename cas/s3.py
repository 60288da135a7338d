"""The storage seam on an S3-compatible object store, through obstore (Rust's `object_store`).

`S3Backend("s3://bucket/prefix")` implements `cas.storage.Backend`. Credentials, region and endpoint come from the
standard variables (`AWS_ENDPOINT_URL[_S3]`, `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`,
`AWS_REGION`/`AWS_DEFAULT_REGION`); whatever they leave unset obstore resolves itself (its own `AWS_*` variables, web
identity, container or instance credentials).

How each verb maps (facts measured in docs/object-storage-notes.md, pinned by tests/test_s3_semantics.py):
- `put(if_absent=True)` is `If-None-Match: *`, `put(if_version=etag)` is `If-Match`; both atomic on the server, so
  `atomic_replace` is True. A 409 ConditionalRequestConflict on a create is retried here with backoff (obstore
  reports it as AlreadyExists and does not retry it); 5xx, SlowDown and 429 are retried by obstore.
- `version` is the ETag; `mtime` is LastModified (one-second resolution).
- `touch` is a server-side self-copy with `x-amz-metadata-directive: REPLACE` (no bytes move; the ETag stays).
- `move` is copy + delete (both keys exist for an instant, never neither); `delete` and `delete(if_version=)` check
  with a HEAD first (S3 DELETE of a missing key succeeds, and conditional DELETE is not portable), so they are not
  atomic against a concurrent writer.
- `now()` is the client clock plus an offset calibrated once from the server's `Date` header (one unsigned HEAD;
  a probe object's LastModified if that fails).
- Dead endpoints: connect and read timeouts bound every request; after a transport failure that survived obstore's
  retries, calls fail at once for `dead_for_s` so that a load turns into misses in about one request's timeout.
"""
from __future__ import annotations

import io
import logging
import os
import re
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, BinaryIO, TypeVar

from .atomic import temp_name
from .errors import CasError, StoreReadOnly, StoreUnavailable
from .paths import TEMP_PREFIX
from .storage import (
    AlreadyExists,
    Backend,
    Kind,
    NotFound,
    ObjectInfo,
    ObjectTooLarge,
    Payload,
    PreconditionFailed,
    check_key,
    check_prefix,
    listable,
)

if TYPE_CHECKING:
    from obstore.store import S3Store

logger = logging.getLogger("cas")

T = TypeVar("T")

SCHEME = "s3://"
# Bucket names as S3 allows them (3-63 of lowercase letters, digits, dots and hyphens); prefix components as keys.
_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
_PREFIX_PART = re.compile(r"[A-Za-z0-9_.-]{1,255}")
_STATUS = re.compile(r"status code: (\d{3})")
# A callable payload is spooled in memory up to this size, then to a local temp file.
SPOOL_MEMORY = 16 * 1024 * 1024
# Unconditional payloads above this go up in parallel parts (content-addressed blobs: a plain overwrite is safe).
# Conditional puts are always one PUT (up to S3's 5 GiB limit), so their condition is checked atomically.
MULTIPART_ABOVE = 64 * 1024 * 1024
PART_SIZE = 16 * 1024 * 1024
WRITE_VERBS = frozenset({"put", "delete", "touch", "move"})
# The header that makes a copy of an object onto itself legal (and so bumps its LastModified).
_REPLACE_METADATA = {"x-amz-metadata-directive": "REPLACE"}


def is_s3_url(value: object) -> bool:
    return isinstance(value, str) and value.startswith(SCHEME)


@dataclass(frozen=True)
class S3Location:
    bucket: str
    prefix: str  # "" or "a/b" (no leading or trailing '/')

    @property
    def url(self) -> str:
        return f"{SCHEME}{self.bucket}/{self.prefix}" if self.prefix else f"{SCHEME}{self.bucket}"


def parse_s3_url(url: str) -> S3Location:
    """`s3://bucket[/prefix]` -> S3Location. Raises ValueError for anything else: no query, no credentials in the
    URL, no empty, `.` or `..` prefix components (a prefix is a key prefix, never a path to normalise)."""
    if not is_s3_url(url):
        raise ValueError(f"not an s3:// URL: {url!r}")
    rest = url[len(SCHEME):].rstrip("/")
    bucket, _, prefix = rest.partition("/")
    if not _BUCKET.fullmatch(bucket) or ".." in bucket:
        raise ValueError(f"invalid bucket name in {url!r}")
    if prefix:
        parts = prefix.split("/")
        if any(p in (".", "..") or not _PREFIX_PART.fullmatch(p) for p in parts):
            raise ValueError(f"invalid prefix in {url!r}: components of [A-Za-z0-9_.-], none '.' or '..'")
    return S3Location(bucket, prefix)


@dataclass(frozen=True)
class S3Credentials:
    """Where and as whom to connect; None leaves the item to obstore's own resolution."""

    endpoint: str | None = None
    region: str | None = None
    access_key_id: str | None = None
    secret_access_key: str | None = None
    session_token: str | None = None
    virtual_hosted_style: bool | None = None  # AWS_VIRTUAL_HOSTED_STYLE_REQUEST; else path-style on an endpoint

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> S3Credentials:
        env = os.environ if environ is None else environ

        def get(*names: str) -> str | None:
            return next((env[n] for n in names if env.get(n)), None)

        return cls(
            endpoint=get("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"),
            region=get("AWS_REGION", "AWS_DEFAULT_REGION"),
            access_key_id=get("AWS_ACCESS_KEY_ID"),
            secret_access_key=get("AWS_SECRET_ACCESS_KEY"),
            session_token=get("AWS_SESSION_TOKEN"),
            virtual_hosted_style=_flag(get("AWS_VIRTUAL_HOSTED_STYLE_REQUEST")),
        )


@dataclass(frozen=True)
class S3Settings:
    """Timeouts, retries and parallelism. Worst case for one request against a hung endpoint (accepts, never
    answers): about min((max_retries + 1) x read_timeout_s + backoff, retry_timeout_s + read_timeout_s), measured
    6.1 s for a read and 30 s for a write with these defaults; against a refused one, the backoff sum (0.6 s). The
    breaker then answers every further call at once for dead_for_s, so a load against a dead endpoint costs one
    such wait, not one per request."""

    connect_timeout_s: float = 2.0
    read_timeout_s: float = 3.0  # GET/HEAD/list, per read, resets on progress: bounds a stall, not a large download
    # PUT/copy/DELETE wait longer: a server may hold a conditional write while a concurrent one on the same key
    # finishes (SeaweedFS holds the losers of 16 racing creates for up to ~7 s); a save can wait, a load must not.
    write_read_timeout_s: float = 30.0
    request_timeout_s: float = 600.0  # the whole request, body included (a multi-GB blob on a slow link)
    max_retries: int = 3
    retry_timeout_s: float = 6.0
    backoff_initial_s: float = 0.1
    backoff_max_s: float = 2.0
    conflict_retries: int = 5  # 409 ConditionalRequestConflict on a create: retried here
    max_concurrency: int = 32  # requests in flight per backend
    dead_for_s: float = 10.0  # after a transport failure, fail fast this long (a whole load's worth of requests)

    def client_options(self, *, writes: bool = False) -> dict[str, Any]:
        read_timeout = self.write_read_timeout_s if writes else self.read_timeout_s
        return {
            "connect_timeout": timedelta(seconds=self.connect_timeout_s),
            "read_timeout": timedelta(seconds=read_timeout),
            "timeout": timedelta(seconds=self.request_timeout_s),
        }

    def retry_config(self, *, writes: bool = False) -> dict[str, Any]:
        retry_timeout = max(self.retry_timeout_s, self.write_read_timeout_s) if writes else self.retry_timeout_s
        return {
            "max_retries": self.max_retries,
            "retry_timeout": timedelta(seconds=retry_timeout),
            "backoff": {"init_backoff": timedelta(seconds=self.backoff_initial_s),
                        "max_backoff": timedelta(seconds=self.backoff_max_s), "base": 2},
        }


def _flag(value: str | None) -> bool | None:
    return None if value is None else value.strip().lower() in ("1", "true", "yes", "on")


def _import_obstore() -> Any:
    try:
        import obstore
    except ImportError as exc:  # the optional extra: pip install 'b10-transfer-cas[s3]'
        raise StoreUnavailable("s3:// stores need obstore: pip install 'b10-transfer-cas[s3]'") from exc
    return obstore


# obstore clients are made once per process for each bucket, endpoint, credentials and settings, and shared by every
# backend on that bucket (the org store and a deployment's scope, a load and the later save): making one costs ~5 ms
# of CPU with the GIL held (measured: 5.0 ms serially, no faster in threads), a first save needed four, and a shared
# client keeps its connections open between operations. Bounded: rotated session tokens make new keys.
_SHARED_CLIENTS_MAX = 16
_shared_clients: dict[tuple[Any, ...], S3Store] = {}
_shared_clients_lock = threading.Lock()


def shared_client(bucket: str, creds: S3Credentials, settings: S3Settings, *, writes: bool = False,
                  extra_headers: Mapping[str, str] | None = None) -> S3Store:
    """The process's obstore client for `bucket` (no prefix: the backend prefixes its keys) with these
    credentials, settings, timeouts and headers, made on first use."""
    key = (bucket, creds, settings, writes, tuple(sorted((extra_headers or {}).items())))
    with _shared_clients_lock:
        client = _shared_clients.get(key)
        if client is None:
            if len(_shared_clients) >= _SHARED_CLIENTS_MAX:
                del _shared_clients[next(iter(_shared_clients))]  # the oldest
            client = _shared_clients[key] = make_store(S3Location(bucket, ""), creds, settings, writes=writes,
                                                       extra_headers=extra_headers)
        return client


def make_store(loc: S3Location, creds: S3Credentials, settings: S3Settings, *, writes: bool = False,
               extra_headers: Mapping[str, str] | None = None) -> S3Store:
    """An obstore S3Store for `loc` (read or write timeouts); explicit values override the AWS_* variables obstore
    would read itself."""
    _import_obstore()
    from obstore.store import S3Store

    client: dict[str, Any] = settings.client_options(writes=writes)
    config: dict[str, Any] = {}
    if creds.endpoint:
        config["endpoint"] = creds.endpoint
        # a custom endpoint is path-style unless told otherwise (MinIO, SeaweedFS, moto, Ceph RGW all take it)
        config["virtual_hosted_style_request"] = bool(creds.virtual_hosted_style)
        if creds.endpoint.startswith("http://"):
            client["allow_http"] = True
    for name in ("region", "access_key_id", "secret_access_key", "session_token"):
        value = getattr(creds, name)
        if value:
            config[name] = value
    if extra_headers:
        client["default_headers"] = dict(extra_headers)
    return S3Store(loc.bucket, prefix=loc.prefix or None, client_options=client,  # type: ignore[arg-type]
                   retry_config=settings.retry_config(writes=writes), **config)  # type: ignore[arg-type]


# -- errors --------------------------------------------------------------------------------------------------------


def http_status(exc: BaseException) -> int | None:
    """The HTTP status obstore put in the message, if any (list errors and 409s are only told apart by it)."""
    match = _STATUS.search(str(exc))
    return int(match.group(1)) if match else None


def _short(exc: BaseException) -> str:
    text = str(exc).split("\n", 1)[0]
    return text[:300] or type(exc).__name__


def is_transport_failure(exc: BaseException) -> bool:
    """Connection refused/reset or a timeout: no HTTP answer at all (obstore has retried already)."""
    from obstore.exceptions import GenericError

    return isinstance(exc, GenericError) and http_status(exc) is None


def translate(exc: BaseException, verb: str, where: str) -> CasError:
    """The storage seam's narrow error for what obstore raised during `verb` at `where`."""
    from obstore.exceptions import (
        AlreadyExistsError,
        NotFoundError,
        PermissionDeniedError,
        PreconditionError,
        UnauthenticatedError,
    )

    text = str(exc)
    status = http_status(exc)
    if "NoSuchBucket" in text or (verb == "list" and status == 404):
        return StoreUnavailable(f"{where}: the bucket does not exist")
    if isinstance(exc, (FileNotFoundError, NotFoundError)):
        return NotFound(f"{where}: no such object")
    if isinstance(exc, AlreadyExistsError):
        return AlreadyExists(f"{where}: already exists")
    if isinstance(exc, PreconditionError):
        return PreconditionFailed(f"{where}: another version is there (or none)")
    if isinstance(exc, (PermissionDeniedError, UnauthenticatedError)) or status in (401, 403):
        kind = StoreReadOnly if verb in WRITE_VERBS else StoreUnavailable
        return kind(f"{where}: access denied ({status or type(exc).__name__}): check credentials and bucket policy")
    return StoreUnavailable(f"cannot {verb} {where}: {_short(exc)}")


# -- streaming reads -----------------------------------------------------------------------------------------------


class _StreamReader(io.RawIOBase):
    """A read-only file over a GET's body stream; errors mid-stream are StoreUnavailable."""

    def __init__(self, chunks: Iterator[Any], where: str):
        self._chunks = chunks
        self._where = where
        self._buf = memoryview(b"")

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        while not self._buf:
            try:
                self._buf = memoryview(bytes(next(self._chunks)))
            except StopIteration:
                return 0
            except Exception as exc:
                raise translate(exc, "get", self._where) from exc
        n = min(len(b), len(self._buf))
        b[:n] = self._buf[:n]
        self._buf = self._buf[n:]
        return n


# -- the backend ---------------------------------------------------------------------------------------------------


@dataclass
class _Breaker:
    """Fail fast after a transport failure: one dead-endpoint timeout per load, not one per request."""

    dead_for_s: float
    _until: float = 0.0
    _why: str = ""
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def check(self) -> None:
        if time.monotonic() < self._until:
            raise StoreUnavailable(f"endpoint unreachable (failing fast): {self._why}")

    def trip(self, why: str) -> None:
        with self._lock:
            self._until = time.monotonic() + self.dead_for_s
            self._why = why


class S3Backend(Backend):
    """One bucket + prefix. Thread-safe; at most `settings.max_concurrency` requests in flight."""

    atomic_replace = True
    check_alive_first = False  # see Backend: a PUT into a deleted bucket fails, or makes a new bucket (SeaweedFS)

    def __init__(self, url: str, *, environ: Mapping[str, str] | None = None,
                 credentials: S3Credentials | None = None, settings: S3Settings | None = None):
        self.loc = parse_s3_url(url)
        self.location = self.loc.url
        self.settings = settings or S3Settings()
        self.credentials = credentials or S3Credentials.from_env(environ)
        self._obstore = _import_obstore()
        self._base = self.loc.prefix + "/" if self.loc.prefix else ""  # every key's path in the bucket starts so
        self._store = shared_client(self.loc.bucket, self.credentials, self.settings)  # reads: short timeouts
        self._slots = threading.BoundedSemaphore(self.settings.max_concurrency)
        self._breaker = _Breaker(self.settings.dead_for_s)
        self._clock_offset: float | None = None

    @property
    def _writer(self) -> S3Store:
        # Write clients are made on first use: a load never needs them.
        return shared_client(self.loc.bucket, self.credentials, self.settings, writes=True)

    @property
    def _toucher(self) -> S3Store:
        return shared_client(self.loc.bucket, self.credentials, self.settings, writes=True,
                             extra_headers=_REPLACE_METADATA)

    def _path(self, key: str) -> str:
        """The object's path in the bucket (the shared client has no prefix)."""
        return self._base + key

    def __repr__(self) -> str:
        return f"S3Backend({self.location!r}, endpoint={self.credentials.endpoint!r})"

    def _where(self, key: str) -> str:
        return f"{self.location}/{key}" if key else self.location

    def _call(self, verb: str, key: str, fn: Callable[[], T]) -> T:
        """Run one request under the concurrency bound, translating obstore's errors."""
        self._breaker.check()
        with self._slots:
            try:
                return fn()
            except CasError:
                raise
            except Exception as exc:
                if is_transport_failure(exc):
                    self._breaker.trip(_short(exc))
                    logger.warning("s3 %s %s: endpoint unreachable: %s", verb, self._where(key), _short(exc))
                raise translate(exc, verb, self._where(key)) from exc

    # -- reading ---------------------------------------------------------------------------------------------------
    def get(self, key: str, *, limit: int, offset: int = 0, length: int | None = None) -> bytes:
        check_key(key)
        if offset < 0 or (length is not None and length < 0):
            raise ValueError(f"invalid range offset={offset} length={length}")
        if length is not None and length > limit:
            raise ObjectTooLarge(f"{self._where(key)}: {length} bytes asked, limit {limit}")
        if length == 0:
            self.stat(key)  # NotFound still applies to an empty read
            return b""
        return self._call("get", key, lambda: self._get_range(key, limit, offset, length))

    def _get_range(self, key: str, limit: int, offset: int, length: int | None) -> bytes:
        from obstore.exceptions import GenericError

        options: dict[str, Any] = {}
        if length is not None:
            options["range"] = (offset, offset + length)
        elif offset:
            options["range"] = {"offset": offset}
        try:
            result = self._obstore.get(self._store, self._path(key), options=options or None)
        except GenericError as exc:
            if http_status(exc) == 416:  # the range starts at or past the end: nothing there, like a short pread
                return b""
            raise
        start, end = result.range
        if end - start > limit:  # checked on the response headers, before the body is read
            raise ObjectTooLarge(f"{self._where(key)}: {end - start} bytes, limit {limit}")
        return bytes(result.bytes())

    def get_versioned(self, key: str, *, limit: int) -> tuple[bytes, str]:
        """One GET: the ETag in its response headers is the version of exactly the body it carries."""
        check_key(key)

        def one() -> tuple[bytes, str]:
            result = self._obstore.get(self._store, self._path(key))
            size = result.meta["size"]
            if size > limit:  # checked on the response headers, before the body is read
                raise ObjectTooLarge(f"{self._where(key)}: {size} bytes, limit {limit}")
            return bytes(result.bytes()), result.meta.get("e_tag") or ""

        return self._call("get", key, one)

    def open(self, key: str, *, limit: int) -> BinaryIO:
        check_key(key)

        def start() -> BinaryIO:
            result = self._obstore.get(self._store, self._path(key))
            size = result.meta["size"]
            if size > limit:
                raise ObjectTooLarge(f"{self._where(key)}: {size} bytes, limit {limit}")
            raw = _StreamReader(iter(result.stream(min_chunk_size=1 << 20)), self._where(key))
            return io.BufferedReader(raw, buffer_size=1 << 20)

        return self._call("get", key, start)

    def stat(self, key: str) -> ObjectInfo:
        check_key(key)
        meta = self._call("stat", key, lambda: self._obstore.head(self._store, self._path(key)))
        return _info(key, meta)

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        check_prefix(prefix)
        path = self._path(prefix)[:-1] or None
        # One call follows every continuation token (pages of 1,000); a prefix holds at most a fan-out's blobs.
        found = self._call("list", prefix, lambda: self._obstore.list_with_delimiter(self._store, prefix=path))
        strip = len(self._base)
        for common in found["common_prefixes"]:
            if not common.startswith(self._base):
                continue  # not under our prefix: no server answers so, and nothing of ours
            key = common[strip:].rstrip("/")
            yield ObjectInfo(key + "/", 0, 0.0, "", "prefix") if listable(key) else ObjectInfo(key, 0, 0.0, "", "other")
        for meta in found["objects"]:
            full = str(meta["path"])
            if (path is not None and full.rstrip("/") == path) or not full.startswith(self._base):
                # The listed prefix itself: SeaweedFS keeps a prefix whose last object was deleted as a directory
                # entry and lists it as an object of that name. It is no object of ours (found by the torture run).
                continue
            yield _listed(meta, full[strip:])

    # -- writing ---------------------------------------------------------------------------------------------------
    def put(self, key: str, data: Payload, *, if_absent: bool = False,
            if_version: str | None = None) -> ObjectInfo:
        check_key(key)
        if if_absent and if_version is not None:
            raise ValueError("put: if_absent and if_version are exclusive")
        mode: Any = "create" if if_absent else ({"e_tag": if_version} if if_version is not None else "overwrite")
        body, size, spool = _materialise(data)  # a payload function's own error propagates before any request
        try:
            multipart = mode == "overwrite" and size > MULTIPART_ABOVE
            result = self._put_retrying(key, body, mode, multipart)
        finally:
            if spool is not None:
                spool.close()
        return ObjectInfo(key, size, self._estimated_now(), result["e_tag"] or "")

    def _put_retrying(self, key: str, body: Any, mode: Any, multipart: bool) -> Any:
        """One put; a create refused with 409 ConditionalRequestConflict (a concurrent conditional write was in
        flight; its outcome is unknown) is tried again with backoff, so the answer is a real 200 or 412."""
        delay = self.settings.backoff_initial_s
        for attempt in range(self.settings.conflict_retries + 1):
            if hasattr(body, "seek"):
                body.seek(0)
            try:
                return self._call("put", key, lambda: self._obstore.put(
                    self._writer, self._path(key), body, mode=mode, use_multipart=multipart, chunk_size=PART_SIZE,
                    max_concurrency=4))
            except AlreadyExists as exc:
                conflict = http_status(exc.__cause__) == 409 if exc.__cause__ else False
                if isinstance(mode, dict):  # If-Match never "exists": obstore's retried 409s end up here
                    raise PreconditionFailed(f"{self._where(key)}: conflicting conditional write") from exc
                if not conflict or attempt == self.settings.conflict_retries:
                    raise
                logger.debug("s3 put %s: 409 conflict, retry %d", self._where(key), attempt + 1)
                time.sleep(delay)
                delay = min(delay * 2, self.settings.backoff_max_s)
        raise AssertionError("unreachable")

    def delete(self, key: str, *, if_version: str | None = None) -> None:
        info = self.stat(key)  # NotFound; S3's DELETE alone succeeds on a missing key
        if if_version is not None and info.version != if_version:
            raise PreconditionFailed(f"{self._where(key)}: version {info.version}, expected {if_version}")
        self._call("delete", key, lambda: self._obstore.delete(self._writer, self._path(key)))

    def touch(self, key: str) -> None:
        check_key(key)
        self._call("touch", key, lambda: self._obstore.copy(self._toucher, self._path(key), self._path(key)))

    def move(self, src: str, dst: str) -> None:
        check_key(src)
        check_key(dst)
        self._call("move", src, lambda: self._obstore.copy(self._writer, self._path(src), self._path(dst),
                                                                  overwrite=True))
        try:
            self._call("delete", src, lambda: self._obstore.delete(self._writer, self._path(src)))
        except NotFound:
            pass  # a concurrent mover took it: the copy at dst is what counts

    # -- the server ------------------------------------------------------------------------------------------------
    def now(self) -> float:
        if self._clock_offset is None:
            self._clock_offset = self._measure_clock_offset()
        return time.time() + self._clock_offset

    def _estimated_now(self) -> float:
        return time.time() + (self._clock_offset or 0.0)

    def _measure_clock_offset(self) -> float:
        """Server minus client clock: from the `Date` header of one unsigned HEAD (any answer carries it, even a
        403, so read-only credentials work too), else from the LastModified of a probe object."""
        offset = self._date_header_offset()
        if offset is None:
            offset = self._probe_object_offset()
        logger.debug("s3 %s: server clock offset %.2f s", self.location, offset)
        return offset

    def _date_header_offset(self) -> float | None:
        import http.client
        from email.utils import parsedate_to_datetime
        from urllib.parse import urlsplit

        region = self.credentials.region or "us-east-1"
        url = urlsplit(self.credentials.endpoint or f"https://s3.{region}.amazonaws.com")
        cls = http.client.HTTPSConnection if url.scheme == "https" else http.client.HTTPConnection
        timeout = self.settings.connect_timeout_s + self.settings.read_timeout_s
        try:
            self._breaker.check()
            conn = cls(url.hostname or "", url.port, timeout=timeout)
            try:
                before = time.time()
                conn.request("HEAD", f"/{self.loc.bucket}")
                date = conn.getresponse().getheader("Date")
                after = time.time()
            finally:
                conn.close()
            if not date:
                return None
            # Date has one-second resolution: the server stamped it at date + 0.5 s on average.
            return parsedate_to_datetime(date).timestamp() + 0.5 - (before + after) / 2
        except (OSError, ValueError, TypeError, http.client.HTTPException, StoreUnavailable) as exc:
            logger.debug("s3 %s: no Date header (%s)", self.location, exc)
            return None

    def _probe_object_offset(self) -> float:
        """From the LastModified of a probe object (put, head, delete); LastModified is truncated to the second."""
        probe = temp_name()
        try:
            before = time.time()
            self._call("put", probe, lambda: self._obstore.put(self._writer, self._path(probe), b"",
                                                                       mode="create"))
            after = time.time()
            meta = self._call("stat", probe, lambda: self._obstore.head(self._store, self._path(probe)))
            offset = meta["last_modified"].timestamp() + 0.5 - (before + after) / 2
        except (StoreUnavailable, AlreadyExists) as exc:  # unreachable or read-only: nothing of ours will be aged
            logger.info("s3 %s: cannot read the server clock (%s); using the local clock", self.location, exc)
            return 0.0
        try:
            self._call("delete", probe, lambda: self._obstore.delete(self._writer, self._path(probe)))
        except CasError:
            pass  # a temp name: gc expires it by age
        return float(offset)

    def free_bytes(self) -> int | None:
        return None

    def exists(self) -> bool:
        """The bucket is there: a GET of a key nobody writes answers NoSuchKey (yes) or NoSuchBucket (no). Other
        failures (credentials, endpoint) raise StoreUnavailable."""
        probe = TEMP_PREFIX + "exists-probe"
        try:
            self._call("get", probe, lambda: self._obstore.get(self._store, self._path(probe)))
        except NotFound:
            return True
        except StoreReadOnly:
            raise
        except StoreUnavailable as exc:
            if "bucket does not exist" in str(exc):
                return False
            raise
        return True

    def check_alive(self) -> None:
        if not self.exists():
            raise StoreUnavailable(f"{self.location}: the bucket vanished mid-operation")


# -- helpers -------------------------------------------------------------------------------------------------------


def _materialise(data: Payload) -> tuple[Any, int, Any]:
    """(body for obstore, size, spool to close or None). A payload function writes into a spooled temp file (memory
    up to SPOOL_MEMORY, then local disk); nothing is sent until it has returned."""
    if isinstance(data, (bytes, bytearray, memoryview)):
        body = bytes(data)
        return body, len(body), None
    spool = tempfile.SpooledTemporaryFile(max_size=SPOOL_MEMORY)  # noqa: SIM115 - returned, closed by put()
    try:
        data(spool)  # type: ignore[arg-type]
        size = spool.tell()
        spool.seek(0)
        if size <= SPOOL_MEMORY:
            body = spool.read()
            spool.close()
            return body, size, None
    except BaseException:
        spool.close()
        raise
    return spool, size, spool


def _timestamp(value: datetime) -> float:
    return value.timestamp()


def _info(key: str, meta: Mapping[str, Any]) -> ObjectInfo:
    return ObjectInfo(key, int(meta["size"]), _timestamp(meta["last_modified"]), meta.get("e_tag") or "")


def _listed(meta: Mapping[str, Any], path: str) -> ObjectInfo:
    """A listed object at `path` (its key): `temp` for a writer's temp name, `other` for a name no key can have
    (never read)."""
    name = path.rsplit("/", 1)[-1]
    kind: Kind = "other" if not listable(path) else ("temp" if name.startswith(TEMP_PREFIX) else "object")
    return ObjectInfo(path, int(meta["size"]), _timestamp(meta["last_modified"]), meta.get("e_tag") or "", kind)


def open_backend(location: str, *, environ: Mapping[str, str] | None = None,
                 settings: S3Settings | None = None) -> S3Backend:
    """The backend for an `s3://` location (the caller dispatches paths to PosixBackend)."""
    return S3Backend(location, environ=environ, settings=settings)


__all__ = ("S3Backend", "S3Credentials", "S3Location", "S3Settings", "is_s3_url", "open_backend",
                          "parse_s3_url", "translate")
