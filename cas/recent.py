"""Recent savers: a small, bounded record per environment key (and per family) of the deployments that saved it
most recently (FORMAT §4a). It replaces a scan of every deployment's roots, so finding peers costs one read
whatever the organisation's size.

`recent/<env-key>.recent` (every deployment of the organisation) and `families/<family>/<env-key>.recent` (the
deployments that named that family) are msgpack lists of `[scope id (str, 32 hex), unix time (float)]`, newest
first, at most RECENT_MAX long. Anyone in the organisation can write them, so a reader trusts nothing in one: it keeps
only well-formed scope ids, reads at most RECORD_LIMIT bytes, and uses a listed scope only through that scope's own
gc root and manifest, each verified as every read is. A hostile record can therefore cost misses and the bounded
reads of at most RECENT_MAX roots and manifests, never wrong content.
"""
from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass

import msgpack

from . import layout
from .blobstore import BlobStore
from .errors import CasError
from .storage import AlreadyExists, NotFound, PreconditionFailed

log = logging.getLogger("cas.recent")

# Peers a saver may dedup against, and siblings a family load may restore from: the 8 most recent carry the files a
# new deployment of a known model needs; more would only add reads to every save.
RECENT_MAX = 8
# 8 entries are ~400 bytes; a record larger than this is not ours and is read as empty.
RECORD_LIMIT = 4096
# A saver already listed within this long is not written again: one write per deployment-hour at most, so a
# thousand replicas saving do not turn the record into a hot spot.
REFRESH_AFTER = 3600
# Writers race on one object: a conditional replace that loses is retried a few times, then given up (the record
# is an optimisation; the next save writes it).
WRITE_ATTEMPTS = 3
_FAMILY = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,63}")


def check_family(name: str) -> str:
    if not isinstance(name, str) or not _FAMILY.fullmatch(name):
        raise ValueError(f"invalid family name {name!r}: must match [A-Za-z0-9._-]{{1,64}}, not start with '.'")
    return name


def record_key(env_key: str, family: str | None = None) -> str:
    layout.check_env_key(env_key)
    if family is None:
        return f"recent/{env_key}.recent"
    return f"families/{check_family(family)}/{env_key}.recent"


def _parse(data: bytes) -> list[tuple[str, float]]:
    try:
        doc = msgpack.unpackb(data, raw=False, max_array_len=64, max_str_len=64, max_map_len=0, max_bin_len=0)
    except Exception:  # noqa: BLE001 - garbage written by anyone: an empty record
        return []
    out: list[tuple[str, float]] = []
    if not isinstance(doc, list):
        return out
    for item in doc:
        if (isinstance(item, list) and len(item) == 2 and layout.is_scope_id(item[0])
                and isinstance(item[1], (int, float)) and not isinstance(item[1], bool)
                and item[0] not in {s for s, _ in out}):
            out.append((item[0], float(item[1])))
    return out[:RECENT_MAX]


@dataclass(frozen=True)
class Seen:
    """A record as one read found it, so a saver that read it early (to find peers) can note itself later without
    reading it again: its entries, and whether there was no record at all (then the note is a create-if-absent)."""

    entries: list[tuple[str, float]]
    absent: bool


def read_seen(store: BlobStore, env_key: str, family: str | None = None) -> Seen | None:
    """The record as it is now; None when it cannot be read (unreachable: not the same as absent)."""
    try:
        data = store.backend.get(record_key(env_key, family), limit=RECORD_LIMIT)
    except NotFound:
        return Seen([], True)
    except CasError:
        return None
    return Seen(_parse(data), False)


def read_recent(store: BlobStore, env_key: str, family: str | None = None) -> list[str]:
    """The scope ids listed, newest first (at most RECENT_MAX); [] when there is no record or it is garbage."""
    seen = read_seen(store, env_key, family)
    return [s for s, _ in seen.entries] if seen is not None else []


def note_saver(store: BlobStore, env_key: str, scope_id: str, family: str | None = None,
               now: float | None = None, seen: Seen | None = None) -> bool:
    """Put `scope_id` at the head of the record (unless it is there, refreshed within REFRESH_AFTER). Best effort:
    returns False when it could not (read-only store, a lost race after WRITE_ATTEMPTS). `seen`: the record as this
    saver read it earlier in the save (read_seen): nothing to write if it already lists this saver fresh at its head,
    one create-if-absent if there was none; otherwise the record is read again for its version."""
    key = record_key(env_key, family)
    now = time.time() if now is None else now
    if seen is not None:
        if _fresh_head(seen.entries, scope_id, now):
            return True
        if seen.absent:
            try:
                store.backend.put(key, _body(seen.entries, scope_id, now), if_absent=True)
                return True
            except AlreadyExists:
                pass  # another saver created it since: merge with theirs below
            except CasError as exc:
                log.debug("recent savers %s not created: %s", key, exc)
                return False
    for _ in range(WRITE_ATTEMPTS):
        try:
            absent = False
            version: str | None = None
            try:
                data, version = store.backend.get_versioned(key, limit=RECORD_LIMIT)  # one request, bytes + version
                current = _parse(data)
            except NotFound:
                current, absent = [], True
            except CasError:
                current = []  # something planted or oversized: replaced below
            if _fresh_head(current, scope_id, now):
                return True
            body = _body(current, scope_id, now)
            if version is not None:
                store.backend.put(key, body, if_version=version)
            else:
                store.backend.put(key, body, if_absent=absent)  # a create races other creators; garbage is replaced
            return True
        except (PreconditionFailed, AlreadyExists):
            continue
        except CasError as exc:
            log.debug("recent savers %s not updated: %s", key, exc)
            return False
    return False


def _fresh_head(entries: list[tuple[str, float]], scope_id: str, now: float) -> bool:
    return bool(entries) and entries[0][0] == scope_id and now - entries[0][1] < REFRESH_AFTER


def _body(current: list[tuple[str, float]], scope_id: str, now: float) -> bytes:
    entries = [(scope_id, now)] + [(s, t) for s, t in current if s != scope_id]
    return msgpack.packb([[s, t] for s, t in entries[:RECENT_MAX]])
