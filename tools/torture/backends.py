"""Where the torture's org store and scopes live: directories on the volume (posix) or prefixes of a bucket on a
SeaweedFS server started on 127.0.0.1 for the run (`--backend s3`, tests/s3_servers.py).

With `--backend s3` the supervisor exports the server's endpoint and credentials as the standard AWS_* variables, so
every worker process (and `cas.s3.S3Backend.from_env`-style resolution) reaches the same bucket; locations are then
`s3://bucket/org/b10_cas` and `s3://bucket/model/scope<i>`. Timeouts are longer than the defaults: the torture asks
whether anything is lost or corrupted while 12-64 processes and the server share 2 cores, not how fast a dead
endpoint is noticed (tests/test_s3_store.py covers that), so a slow answer must not turn into a miss.
"""
from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
BUCKET_ENV = "TORTURE_S3_BUCKET"


def is_s3(loc) -> bool:
    return isinstance(loc, str) and loc.startswith("s3://")


def open_backend(loc):
    """A backend for `loc`: an S3Backend (torture timeouts) for an s3:// URL, else the path itself (BlobStore and
    Scope make their PosixBackend)."""
    if not is_s3(loc):
        return loc
    from cas.s3 import S3Backend, S3Settings

    settings = S3Settings(read_timeout_s=30.0, retry_timeout_s=60.0, write_read_timeout_s=60.0, max_retries=5,
                          dead_for_s=2.0, max_concurrency=16)
    return S3Backend(loc, settings=settings)


@contextmanager
def seaweed_bucket(work: str, say=print):
    """A SeaweedFS server under `work` with one fresh bucket; its AWS_* variables exported to this process (and so to
    every child) for the duration; the server is stopped afterwards."""
    sys.path.insert(0, str(REPO / "tests"))
    from s3_servers import AWS_VARS, fresh_bucket_name, seaweed_server

    os.makedirs(work, exist_ok=True)
    saved = {k: os.environ.get(k) for k in AWS_VARS + ("AWS_ALLOW_HTTP", BUCKET_ENV)}
    with seaweed_server(Path(work) / "seaweed") as server:
        bucket = fresh_bucket_name("torture")
        server.endpoint.create_bucket(bucket)
        for k in AWS_VARS:
            os.environ.pop(k, None)
        os.environ.update(server.endpoint.env())
        os.environ[BUCKET_ENV] = bucket
        say(f"s3: SeaweedFS on {server.endpoint.url}, bucket {bucket}")
        try:
            yield f"s3://{bucket}"
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
