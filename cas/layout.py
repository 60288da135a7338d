"""Every key name of the org store and of a deployment scope (docs/FORMAT.md §2-§4), in one place.

Backends map keys to paths or object names; the rest of `cas` asks this module which key holds what. Nothing else
builds a key by hand, so a layout change is one edit here plus its FORMAT section.
"""
from __future__ import annotations

import re

# -- org store ------------------------------------------------------------------------------------------------------
FORMAT = "CAS-FORMAT"
BLOBS = "blobs/"
TRASH = "trash/"
QUARANTINE = "quarantine/"
ROOTS = "roots/"
LOCKS = "locks/"
GC_LOCK = "locks/gc.lock"
# Top-level prefixes a store's first writer creates (a volume needs the directories; an object store nothing).
STORE_AREAS = ("blobs", "trash", "quarantine", "roots", "locks")
FANOUT = tuple(f"{i:02x}" for i in range(256))
ROOT_SUFFIX = ".root"

# -- deployment scope ---------------------------------------------------------------------------------------------
SCOPE_ID = "scope.id"
MANIFESTS = "manifests/"
SLOTS = "slots/"
MANIFEST_SUFFIX = ".manifest"
SCOPE_AREAS = ("manifests", "slots")

_ID = re.compile(r"[0-9a-f]{64}")
_SCOPE_ID = re.compile(r"[0-9a-f]{32}")
_ENV_KEY = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}")


def is_blob_id(value: object) -> bool:
    return isinstance(value, str) and _ID.fullmatch(value) is not None


def is_scope_id(value: object) -> bool:
    return isinstance(value, str) and _SCOPE_ID.fullmatch(value) is not None


def is_env_key(value: object) -> bool:
    return isinstance(value, str) and _ENV_KEY.fullmatch(value) is not None


def check_env_key(env_key: str) -> str:
    if not is_env_key(env_key):
        raise ValueError(f"invalid environment key {env_key!r}: must match [A-Za-z0-9._-]{{1,128}}, not start with '.'")
    return env_key


def _blob_id(blob_id: str) -> str:
    if not is_blob_id(blob_id):
        raise ValueError(f"invalid blob id {blob_id!r}")
    return blob_id


def blob(blob_id: str) -> str:
    return f"{BLOBS}{_blob_id(blob_id)[:2]}/{blob_id}"


def trash(blob_id: str) -> str:
    return f"{TRASH}{_blob_id(blob_id)[:2]}/{blob_id}"


def fan_prefix(area: str, fan: str) -> str:
    """`blobs/<xx>/` or `trash/<xx>/`."""
    return f"{area}{fan}/"


def quarantine(blob_id: str, ns: int) -> str:
    return f"{QUARANTINE}{_blob_id(blob_id)}.{int(ns)}"


def root(scope_id: str, env_key: str) -> str:
    if not is_scope_id(scope_id):
        raise ValueError(f"invalid scope id {scope_id!r}")
    return f"{ROOTS}{scope_id}/{check_env_key(env_key)}{ROOT_SUFFIX}"


def root_prefix(scope_id: str) -> str:
    return f"{ROOTS}{scope_id}/"


def manifest(env_key: str) -> str:
    return f"{MANIFESTS}{check_env_key(env_key)}{MANIFEST_SUFFIX}"


def manifest_lock(env_key: str) -> str:
    return f"{MANIFESTS}{check_env_key(env_key)}.lock"


def audit(env_key: str) -> str:
    return f"{MANIFESTS}{check_env_key(env_key)}.audit"


def slot(n: int) -> str:
    return f"{SLOTS}slot-{int(n)}.lock"


def env_key_of_manifest(name: str) -> str | None:
    """The environment key of a name listed in `manifests/`, or None if it is not a manifest's name."""
    if not name.endswith(MANIFEST_SUFFIX):
        return None
    key = name[: -len(MANIFEST_SUFFIX)]
    return key if is_env_key(key) else None


def name_of(key: str) -> str:
    """The last component of a key (a listed entry's name)."""
    return key.rstrip("/").rpartition("/")[2]
