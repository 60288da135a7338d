"""The object-store side of `python -m tools.bench scale --backend s3` (issue 14 on S3): the server, the delaying
proxy, the bucket the organisation lives in, and the two things set-up needs that S3 does not offer.

Everything listens on 127.0.0.1: a SeaweedFS `weed server` (tests/s3_servers.seaweed_server, telemetry off) or moto
in this process (the CI smoke), and in front of it the delaying TCP proxy of tools/bench/s3bench.py in a process of
its own. The measured operations (saves, no-op checks, loads, the `cas` commands in their own processes) reach the
store through the proxy only, with the standard AWS_* variables set for it (docs/configuration.md); the
organisation is written straight to the server (set-up, not measurement), by the same cas API.

What S3 cannot do: set an object's LastModified. gc judges a root dead by its LastModified (unused for the 30-day
root TTL) and a blob garbage by its own (older than the 6 h grace), so the bench's dead deployments need old ones.
On SeaweedFS they are rewritten in the filer's metadata (`weed shell` fs.meta.save, the entries' mtime changed,
fs.meta.load: the S3 gateway's LastModified is the filer entry's mtime; ETags and contents are unchanged); on moto,
in moto's in-process model.
"""
from __future__ import annotations

import os
import struct
import subprocess
import sys
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
TESTS = REPO / "tests"
for _p in (str(REPO), str(TESTS)):
    if _p not in sys.path:
        sys.path.insert(0, _p)

from s3_servers import AWS_VARS, S3Endpoint, moto_server, seaweed_server  # noqa: E402

BUCKET = "scale-bench"
ORG_PREFIX = "org/b10_cas"
MODEL_PREFIX = "model"
# weed shell's fs.meta.load writes entries in the background and drops what is in flight when the shell exits on
# end of input: a few cheap commands after it keep the shell alive until the last entry is written (seen: the last
# of two entries lost without them). Each backdating is verified afterwards and retried.
_SHELL_TAIL = "fs.ls /buckets\n" * 3
BACKDATE_ATTEMPTS = 3


@dataclass
class S3Site:
    """One run's bucket: where set-up writes (`direct`, the server) and where measurements go (`measured`, the proxy
    in front of it)."""

    server: str  # "seaweedfs" or "moto"
    direct: S3Endpoint
    measured: S3Endpoint
    rtt_ms: float
    weed: Any = None  # the SeaweedServer, for weed shell
    version: str = ""

    def url(self, prefix: str) -> str:
        return f"s3://{BUCKET}/{prefix}"

    def backend(self, prefix: str) -> Any:
        """An S3Backend on the server itself (no added latency), for set-up."""
        from cas.s3 import S3Backend

        return S3Backend(self.url(prefix), credentials=self.direct.credentials())

    def env(self) -> dict[str, str]:
        return self.measured.env()

    # -- what is in the bucket ------------------------------------------------------------------------------------
    def listing(self, prefix: str) -> dict[str, int]:
        """key -> size of every object under `prefix` (recursive; a paginated ListObjectsV2 on the server)."""
        client = self.direct.boto3()
        out: dict[str, int] = {}
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix.rstrip("/") + "/"):
            for obj in page.get("Contents", ()):
                out[obj["Key"]] = obj["Size"]
        return out

    def last_modified(self, keys: list[str]) -> dict[str, float]:
        client = self.direct.boto3()
        return {k: client.head_object(Bucket=BUCKET, Key=k)["LastModified"].timestamp() for k in keys}

    # -- old objects ---------------------------------------------------------------------------------------------
    def backdate(self, mtimes: dict[str, float]) -> None:
        """Give each key (full key in the bucket) the LastModified `mtimes[key]` (unix seconds), then check it."""
        todo = dict(mtimes)
        for _ in range(BACKDATE_ATTEMPTS):
            if self.server == "moto":
                _backdate_moto(todo)
            else:
                _backdate_seaweed(self.weed, todo)
            seen = self.last_modified(sorted(todo))
            todo = {k: t for k, t in todo.items() if abs(seen[k] - t) > 2}  # LastModified has 1 s resolution
            if not todo:
                return
        raise RuntimeError(f"{len(todo)} objects kept their LastModified, e.g. {sorted(todo)[:3]}")


@contextmanager
def s3_site(server: str, rtt_ms: float, work: Path) -> Iterator[S3Site]:
    """The server, the bucket, the proxy, and AWS_* in os.environ pointing at the proxy (so that open_location in
    this process and the `cas` commands in child processes reach the store as a pod would). Restores os.environ."""
    from tools.bench.s3bench import latency_proxy_process

    saved = {k: os.environ.get(k) for k in (*AWS_VARS, "AWS_ALLOW_HTTP")}
    with ExitStack() as stack:
        weed = None
        if server == "moto":
            direct = stack.enter_context(moto_server())
            version = _moto_version()
        else:
            weed = stack.enter_context(seaweed_server(work / "seaweed"))
            direct = weed.endpoint
            version = _weed_version(weed.command[0])
        direct.create_bucket(BUCKET)
        url = stack.enter_context(latency_proxy_process(direct.url, rtt_ms))
        measured = S3Endpoint(direct.kind, url, direct.access_key_id, direct.secret_access_key, direct.region)
        for k in AWS_VARS:
            os.environ.pop(k, None)
        os.environ.update(measured.env())
        from cas.backends import forget_s3_backends

        forget_s3_backends()
        try:
            yield S3Site(server, direct, measured, rtt_ms, weed, version)
        finally:
            forget_s3_backends()
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v


def _moto_version() -> str:
    try:
        import moto

        return f"moto {moto.__version__}"
    except ImportError:
        return "moto"


def _weed_version(binary: str) -> str:
    try:
        out = subprocess.run([binary, "version"], capture_output=True, text=True, timeout=30).stdout
        return "SeaweedFS " + out.split()[1] if out.split()[:1] == ["version"] else out.strip()
    except (OSError, IndexError, subprocess.TimeoutExpired):
        return "SeaweedFS"


# -- moto: its model is in this process ----------------------------------------------------------------------------
def _backdate_moto(mtimes: dict[str, float]) -> None:
    from moto.core import DEFAULT_ACCOUNT_ID
    from moto.s3.models import s3_backends

    bucket = s3_backends[DEFAULT_ACCOUNT_ID]["global"].buckets[BUCKET]
    for key, t in mtimes.items():
        bucket.keys[key].last_modified = datetime.fromtimestamp(t, tz=timezone.utc).replace(tzinfo=None)


# -- SeaweedFS: the filer's entries, through weed shell ------------------------------------------------------------
def _flag(command: list[str], name: str) -> str:
    return next(x.split("=", 1)[1] for x in command if x.startswith(name + "="))


def _shell(weed: Any, script: str) -> str:
    cmd = weed.command
    master = f"127.0.0.1:{_flag(cmd, '-master.port')}.{_flag(cmd, '-master.port.grpc')}"
    filer = f"127.0.0.1:{_flag(cmd, '-filer.port')}.{_flag(cmd, '-filer.port.grpc')}"
    proc = subprocess.run([cmd[0], "shell", f"-master={master}", f"-filer={filer}"], input=script,
                          capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        raise RuntimeError(f"weed shell exited {proc.returncode}: {proc.stderr[-500:]}")
    return proc.stdout


def _backdate_seaweed(weed: Any, mtimes: dict[str, float]) -> None:
    """Save the metadata of the directories holding these keys, change their entries' mtime, load those entries."""
    out = Path(weed.log).parent / "meta"
    out.mkdir(exist_ok=True)
    dirs = sorted({f"/buckets/{BUCKET}/{k.rsplit('/', 1)[0]}" for k in mtimes})
    # One save per common directory: the store's roots/ and blobs/ (fan-out directories inside) cover every key.
    tops = sorted({"/".join(d.split("/")[:6]) for d in dirs})  # /buckets/<bucket>/org/b10_cas/<area>
    wanted = {f"/buckets/{BUCKET}/{k}": t for k, t in mtimes.items()}
    records = []
    for i, top in enumerate(tops):
        saved = out / f"save-{i}.meta"
        saved.unlink(missing_ok=True)
        _shell(weed, f"fs.meta.save -o {saved} {top}\n")
        for rec in _records(saved.read_bytes()):
            full = _full_path(rec)
            if full in wanted:
                records.append(_with_mtime(rec, int(wanted[full])))
    patched = out / "patched.meta"
    patched.write_bytes(b"".join(struct.pack(">I", len(r)) + r for r in records))
    _shell(weed, f"fs.meta.load {patched}\n" + _SHELL_TAIL)


# fs.meta.save's file: records of a 4-byte big-endian length and a filer_pb.FullEntry {1: dir, 2: Entry}; Entry
# {1: name, 2: is_directory, 4: FuseAttributes}; FuseAttributes {2: mtime, unix seconds}. The few protobuf rules
# needed to change that one varint are below.
def _varint(b: bytes, i: int) -> tuple[int, int]:
    x = shift = 0
    while True:
        c = b[i]
        i += 1
        x |= (c & 0x7F) << shift
        shift += 7
        if c < 0x80:
            return x, i


def _enc_varint(x: int) -> bytes:
    out = bytearray()
    while True:
        c, x = x & 0x7F, x >> 7
        out.append(c | 0x80 if x else c)
        if not x:
            return bytes(out)


def _fields(b: bytes) -> list[tuple[int, int, Any]]:
    i, out = 0, []
    while i < len(b):
        tag, i = _varint(b, i)
        num, wt = tag >> 3, tag & 7
        v: Any
        if wt == 0:
            v, i = _varint(b, i)
        elif wt == 2:
            n, i = _varint(b, i)
            v, i = b[i:i + n], i + n
        elif wt == 1:
            v, i = b[i:i + 8], i + 8
        elif wt == 5:
            v, i = b[i:i + 4], i + 4
        else:
            raise ValueError(f"protobuf wire type {wt}")
        out.append((num, wt, v))
    return out


def _encode(fields: list[tuple[int, int, Any]]) -> bytes:
    out = bytearray()
    for num, wt, v in fields:
        out += _enc_varint(num << 3 | wt)
        if wt == 0:
            out += _enc_varint(v)
        elif wt == 2:
            out += _enc_varint(len(v)) + v
        else:
            out += v
    return bytes(out)


def _records(data: bytes) -> Iterator[bytes]:
    i = 0
    while i < len(data):
        (n,) = struct.unpack(">I", data[i:i + 4])
        yield data[i + 4:i + 4 + n]
        i += 4 + n


def _full_path(rec: bytes) -> str:
    fe = _fields(rec)
    d = next(v for num, _, v in fe if num == 1).decode()
    entry = _fields(next(v for num, _, v in fe if num == 2))
    name = next(v for num, _, v in entry if num == 1).decode()
    return f"{d.rstrip('/')}/{name}"


def _with_mtime(rec: bytes, mtime: int) -> bytes:
    out = []
    for num, wt, v in _fields(rec):
        if num == 2:
            entry = []
            for en, ewt, ev in _fields(v):
                if en == 4 and ewt == 2:
                    ev = _encode([(an, awt, mtime if an == 2 and awt == 0 else av) for an, awt, av in _fields(ev)])
                entry.append((en, ewt, ev))
            v = _encode(entry)
        out.append((num, wt, v))
    return _encode(out)

