"""Warm start from sibling deployments (opt-in: `B10_TRANSFER_CACHE_FAMILY=<name>`).

Deployments that name the same family are versions, copies or regions of one model. Inductor's cache keys are
content hashes of the graph and its config, so a sibling's files are exact hits or are never looked up: a new
deployment can start from them instead of compiling. Its own manifest always wins; sibling entries only fill
paths it lacks.

Siblings are found through the family's recent-savers record in the org store (cas/recent.py, FORMAT §4a), never
by scanning deployments: at most SIBLINGS of them, each through its gc root and manifest for this environment key.
What a hostile member of the family can do (FORMAT §4a): cause misses (entries that fail verification are skipped
and recompile) and make a load read and write at most the byte budget (`MAX_CACHE_SIZE_MB`) of files nobody uses.
It cannot make a load write wrong content (every file is checked against its blake3), write outside the cache
directory (paths are validated as for any manifest), or change this deployment's manifest (a load writes none).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

from cas import BlobStore, layout
from cas.manifest import Entry, Manifest, loads
from cas.recent import read_recent
from cas.roots import read_root

logger = logging.getLogger("b10_transfer.family")

# Siblings read per load: the most recent few carry what a new deployment of the model compiles; each costs a root
# and a manifest read on every load of a family member, so the number stays small.
SIBLINGS = 4
# A sibling's manifest is read and decompressed only up to this size (a real one is ~300 KB for thousands of files,
# ~3 MB at 20,000): four hostile manifests at the 64 MiB format limit would otherwise cost every family load a
# quarter GB.
SIBLING_MANIFEST_BYTES = 16 << 20


@dataclass
class SiblingFiles:
    entries: dict[str, Entry] = field(default_factory=dict)
    siblings: list[str] = field(default_factory=list)  # scope ids whose entries were used
    skipped: list[str] = field(default_factory=list)  # "scope id: why"


def sibling_files(store: BlobStore, own_scope_id: str | None, env_key: str, family: str,
                  own: Manifest | None, budget_bytes: int) -> SiblingFiles:
    """Entries the siblings' manifests hold and `own` lacks, most recent sibling first, at most `budget_bytes` of
    file content in all."""
    out = SiblingFiles()
    have = set(own.entries) if own is not None else set()
    total = 0
    for scope_id in [s for s in read_recent(store, env_key, family) if s != own_scope_id][:SIBLINGS]:
        manifest = _sibling_manifest(store, scope_id, env_key, out)
        if manifest is None:
            continue
        used = False
        for path, entry in sorted(manifest.entries.items()):
            if path in have or path in out.entries:
                continue
            if total + entry.size > budget_bytes:
                out.skipped.append(f"{scope_id}: over the {budget_bytes >> 20} MiB budget")
                break
            out.entries[path] = entry
            total += entry.size
            used = True
        if used:
            out.siblings.append(scope_id)
    return out


def _sibling_manifest(store: BlobStore, scope_id: str, env_key: str, out: SiblingFiles) -> Manifest | None:
    try:
        root = read_root(store, layout.root(scope_id, env_key))
        if root.env_key != env_key or root.scope_id != scope_id:
            raise ValueError(f"root names {root.scope_id}/{root.env_key}")
        data = store.read_bytes(root.manifest, SIBLING_MANIFEST_BYTES)
        manifest = loads(data, f"blob {root.manifest}", SIBLING_MANIFEST_BYTES)  # bounds the plain size too
        if manifest.env_key != env_key:
            raise ValueError(f"manifest of another environment ({manifest.env_key})")
        return manifest
    except Exception as exc:  # noqa: BLE001 - absent, unreadable, oversized or hostile: a sibling we do without
        out.skipped.append(f"{scope_id}: {type(exc).__name__}: {exc}")
        logger.debug("family sibling %s skipped: %s", scope_id, exc)
        return None
