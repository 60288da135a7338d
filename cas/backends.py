"""Which backend holds a location: `s3://bucket/prefix` is an object store (cas/s3.py), anything else a directory on
a volume (cas/posix.py). A Backend given as the location is used as it is.

S3 backends are kept per process, one per (URL, credentials, endpoint, settings): an S3Backend holds connection
pools and the server-clock offset it measured, so a process that saves every few minutes (the companion) or a
model that loads then saves reuses its connections and never measures the clock twice. Its circuit breaker is
shared the same way: after a transport failure that survived the retries, every operation of the process on that
endpoint fails at once for `S3Settings.dead_for_s`, instead of each paying the timeout again.
"""
from __future__ import annotations

import os
import threading
from collections.abc import Mapping
from typing import TYPE_CHECKING

from .posix import PosixBackend
from .storage import Backend

if TYPE_CHECKING:
    from .s3 import S3Settings

SCHEME = "s3://"
_KEPT = 32
_s3: dict[tuple, Backend] = {}
_s3_lock = threading.Lock()


def is_url(location: object) -> bool:
    """True for a location that names an object store rather than a path."""
    return isinstance(location, str) and location.startswith(SCHEME)


def open_location(location: str | os.PathLike | Backend, *, create: bool = False,
                  environ: Mapping[str, str] | None = None, settings: S3Settings | None = None) -> Backend:
    """The backend of `location`. `create` applies to a directory (made one level below an existing parent); an
    object store has nothing to create (a bucket is never created). `environ` and `settings` apply to s3:// only
    (credentials, region and endpoint come from the AWS_* variables, cas/s3.py)."""
    if isinstance(location, Backend):
        return location
    if is_url(location):
        return s3_backend(str(location), environ=environ, settings=settings)
    return PosixBackend(location, create=create)


def s3_backend(url: str, *, environ: Mapping[str, str] | None = None,
               settings: S3Settings | None = None) -> Backend:
    """The process's S3Backend for `url` under these credentials (made on first use). Raises ValueError for a
    malformed URL, StoreUnavailable when obstore is not installed."""
    from .s3 import S3Backend, S3Credentials, parse_s3_url

    loc = parse_s3_url(url)  # ValueError before anything is kept
    creds = S3Credentials.from_env(environ)
    key = (loc.url, creds, settings, os.getpid())
    with _s3_lock:
        found = _s3.get(key)
        if found is not None:
            return found
    backend = S3Backend(loc.url, credentials=creds, settings=settings)
    with _s3_lock:
        if len(_s3) >= _KEPT:
            _s3.clear()
        return _s3.setdefault(key, backend)


def forget_s3_backends() -> None:
    """Drop the kept S3 backends (tests that restart a server on the same port)."""
    with _s3_lock:
        _s3.clear()
