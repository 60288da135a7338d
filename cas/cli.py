"""`cas`: maintenance commands for the org store.

    cas gc     [--dry-run] [--grace 6h] [--root-ttl 30d] [--max-size 500G] [--wait 120]
    cas check  [--read-data] [--subset n/m]
    cas stats | cas du
    cas ls     [ENV_KEY | SCOPE_ID/ENV_KEY]
    cas enable-pack-frames

Every command takes --org PATH (default $B10FS_ORG_CACHE_DIR, else <volume>/org/b10_cas, or <volume>/model/b10_cas
when <volume>/org is not mounted, as the library; <volume> is $B10FS_VOLUME_ROOT, else /cache), --scope PATH
(default $B10FS_CACHE_DIR, else <volume>/model/compile_cache), --json and -v. Either may be an s3://bucket/prefix
URL (credentials, region and endpoint from the AWS_* variables, as the library). Exit status: 0 clean, 1 problems found
(planted links included), 2 usage or I/O error. Progress goes to stderr, and only when stderr is a terminal.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
import time
from collections.abc import Mapping, Sequence
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

from . import layout, limits
from .backends import is_url
from .blobstore import BlobStore
from .check import check, parse_subset
from .errors import CasError, LockTimeout
from .gc import GcRefused, collect
from .manifest import Manifest, loads
from .refs import list_roots
from .scope import Scope, check_env_key
from .stats import compute
from .timing import DEFAULT_GRACE, DEFAULT_LOCK_WAIT, DEFAULT_ROOT_TTL

log = logging.getLogger("cas.cli")

# The same variables and defaults the library's b10_transfer settings use (b10_transfer/config.py: the volume root
# from B10FS_VOLUME_ROOT, and the deployment-volume fallback store when the org mount is absent), so `cas` run in a
# model pod finds the stores that pod writes without any flag. tests/test_cli.py checks they agree.
ORG_ENV, SCOPE_ENV, VOLUME_ENV = "B10FS_ORG_CACHE_DIR", "B10FS_CACHE_DIR", "B10FS_VOLUME_ROOT"
VOLUME_DEFAULT = "/cache"
ORG_DEFAULT = f"{VOLUME_DEFAULT}/org/b10_cas"
SCOPE_DEFAULT = f"{VOLUME_DEFAULT}/model/compile_cache"

EXIT_OK, EXIT_PROBLEMS, EXIT_ERROR = 0, 1, 2

_UNITS = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
_SECONDS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


# Bounds on numeric arguments: far beyond any real store or period, and small enough that every later computation
# stays exact (a 400-digit --max-size is a usage error, not an OverflowError from float()).
MAX_SIZE_ARG = 1 << 70  # 1 ZiB
MAX_DURATION_ARG = 100 * 365 * 86400  # a century
_NUMBER = r"([0-9]{1,30}(?:\.[0-9]{1,30})?)"


def _number(text: str, what: str) -> Decimal:
    try:
        return Decimal(text)
    except InvalidOperation:
        raise argparse.ArgumentTypeError(f"not a {what}: {text!r}") from None


def parse_size(text: str) -> int:
    """'500M', '1.5G', '10GiB', '2048': binary units (a volume quota is in GiB)."""
    m = re.fullmatch(r"\s*" + _NUMBER + r"\s*([kmgtKMGT]?)(?:i?[bB])?\s*", text)
    if not m:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 500M, 10G)")
    value = int(_number(m.group(1), "size") * _UNITS[m.group(2).lower()])
    if value > MAX_SIZE_ARG:
        raise argparse.ArgumentTypeError(f"size {text!r} is absurdly large (at most {MAX_SIZE_ARG} bytes)")
    return value


def parse_duration(text: str) -> float:
    """'90', '90s', '30m', '6h', '30d', '2w'."""
    m = re.fullmatch(r"\s*" + _NUMBER + r"\s*([smhdw]?)\s*", text)
    if not m:
        raise argparse.ArgumentTypeError(f"not a duration: {text!r} (e.g. 90s, 6h, 30d)")
    value = _number(m.group(1), "duration") * _SECONDS[m.group(2)]
    if value > MAX_DURATION_ARG:
        raise argparse.ArgumentTypeError(f"duration {text!r} is longer than a century")
    return float(value)


def default_org(env: Mapping[str, str]) -> str:
    """The store a pod with this environment writes (b10_transfer.config.Settings.store_root): the org store, or the
    deployment volume's fallback store when the org store would lie on an org mount that is absent."""
    if is_url(env.get(ORG_ENV)):  # an object store: no mount to look for
        return env[ORG_ENV]
    volume = Path(env.get(VOLUME_ENV) or VOLUME_DEFAULT)
    org = Path(env.get(ORG_ENV) or volume / "org" / "b10_cas")
    if org.is_relative_to(volume / "org") and not (volume / "org").is_dir():  # the mount point, not the store
        return str(volume / "model" / "b10_cas")
    return str(org)


def default_scope(env: Mapping[str, str]) -> str:
    return env.get(SCOPE_ENV) or str(Path(env.get(VOLUME_ENV) or VOLUME_DEFAULT) / "model" / "compile_cache")


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def ago(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f}{unit}"
    return f"{seconds:.0f}s"


class Progress:
    """One self-overwriting status line on a terminal; nothing at all in a pipe or a log file."""

    # Redrawing more often than this costs more than it tells.
    INTERVAL_S = 0.1

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self._last = 0.0
        self._shown = False

    def __call__(self, phase: str, done: int, total: int) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if now - self._last < self.INTERVAL_S and done != total:
            return
        self._last = now
        text = f"{phase}: {done}/{total}" if total else f"{phase}: {done}"
        sys.stderr.write("\r\033[K" + text)
        sys.stderr.flush()
        self._shown = True

    def clear(self) -> None:
        if self._shown:
            sys.stderr.write("\r\033[K")
            sys.stderr.flush()
            self._shown = False


def build_parser() -> argparse.ArgumentParser:
    # Accepted before or after the command. SUPPRESS keeps a subcommand's unset option from overwriting a value
    # given before it (argparse copies sub-parser defaults over the namespace).
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--org", default=argparse.SUPPRESS, metavar="PATH",
                        help=f"org store (default ${ORG_ENV}, else ${VOLUME_ENV}/org/b10_cas as the library: "
                             f"{ORG_DEFAULT})")
    common.add_argument("--scope", default=argparse.SUPPRESS, metavar="PATH",
                        help=f"deployment scope (default ${SCOPE_ENV}, else {SCOPE_DEFAULT})")
    common.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                        help="machine-readable output on stdout")
    common.add_argument("-v", "--verbose", action="count", default=argparse.SUPPRESS,
                        help="log to stderr (-vv: debug)")
    ttl = argparse.ArgumentParser(add_help=False)
    ttl.add_argument("--root-ttl", type=parse_duration, metavar="DURATION", default=float(DEFAULT_ROOT_TTL),
                     help="a root unused for longer is dead (default 30d)")

    parser = argparse.ArgumentParser(prog="cas", description=__doc__.split("\n\n")[0], parents=[common])
    sub = parser.add_subparsers(dest="command", required=True, metavar="{gc,check,stats,du,ls,enable-pack-frames}")

    p = sub.add_parser("gc", parents=[common, ttl], help="collect blobs no live root references")
    p.add_argument("--dry-run", action="store_true", help="say what would be done; change nothing")
    p.add_argument("--grace", type=parse_duration, metavar="DURATION", default=float(DEFAULT_GRACE),
                   help="never collect a blob (or trash) younger than this (default 6h; at least 2 x freshen_after)")
    p.add_argument("--max-size", type=parse_size, metavar="SIZE", default=None,
                   help="retire least recently used roots until the blobs fit in SIZE (e.g. 500G)")
    p.add_argument("--wait", type=parse_duration, metavar="DURATION", default=DEFAULT_LOCK_WAIT,
                   help="wait this long for a running gc to finish (default 120s)")

    p = sub.add_parser("check", parents=[common, ttl], help="verify roots, manifests and blobs")
    p.add_argument("--read-data", action="store_true", help="decompress and re-hash blobs")
    p.add_argument("--subset", default=None, metavar="n/m", help="with --read-data: only the n-th of m slices")

    sub.add_parser("stats", parents=[common, ttl], help="totals and per-deployment usage")
    sub.add_parser("du", parents=[common, ttl], help="per-deployment usage, largest first")

    p = sub.add_parser("ls", parents=[common], help="list roots, or a manifest's entries")
    p.add_argument("name", nargs="?", help="ENV_KEY (this deployment's manifest) or SCOPE_ID/ENV_KEY (any root's)")

    sub.add_parser("enable-pack-frames", parents=[common],
                   help="let saves write packs of independent frames, so that partial loads fetch byte ranges "
                        "(a store made before frames; run it once no older reader uses the store)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    for name, default in (("org", None), ("scope", None), ("json", False), ("verbose", 0)):
        if not hasattr(args, name):
            setattr(args, name, default)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose > 1 else logging.INFO if args.verbose else logging.WARNING,
        format="%(name)s: %(message)s", stream=sys.stderr,
    )
    org = args.org or default_org(os.environ)
    scope_path = args.scope or default_scope(os.environ)
    progress = Progress(sys.stderr.isatty() and not args.verbose)
    try:
        store = BlobStore(org, create=False)
        scope: Scope | None = Scope(scope_path)
        # Its directory is there (what is inside, planted links included, is gc's and check's business).
        scope = scope if scope is not None and scope.backend.exists() else None
        return _COMMANDS[args.command](store, scope, args, progress)
    except (GcRefused, LockTimeout, ValueError) as exc:
        print(f"cas {args.command}: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except (CasError, OSError) as exc:
        print(f"cas {args.command}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        return 130
    finally:
        progress.clear()


def _emit_json(doc) -> None:
    json.dump(doc, sys.stdout, indent=2, sort_keys=True)
    sys.stdout.write("\n")


def cmd_gc(store: BlobStore, scope: Scope | None, args, progress: Progress) -> int:
    res = collect(store, scope=scope, grace=args.grace, root_ttl=args.root_ttl, max_size=args.max_size,
                  dry_run=args.dry_run, lock_wait=args.wait, progress=progress)
    progress.clear()
    failed = bool(res.problems) or bool(res.planted) or res.over_max_size > 0
    if args.json:
        _emit_json(res.to_dict())
        return EXIT_PROBLEMS if failed else EXIT_OK
    would = "would be " if res.dry_run else ""
    for p in res.problems:
        print(f"problem: {p}")
    for path in res.planted:
        print(f"planted: {path} is not a plain object or directory (a link or FIFO?): left alone; remove it")
    if res.problems:
        print(f"gc: {len(res.problems)} problem(s); nothing was deleted")
    print(f"roots:  {res.roots_live} live, {res.roots_dead} dead {would}removed, "
          f"{len(res.roots_retired)} {would}retired")
    for r in res.roots_retired:
        print(f"  retired {r.scope_id}/{r.env_key} ({r.scope_path}), last used {ago(res.now - r.last_used)} ago")
    print(f"blobs:  {res.blobs_kept} kept ({human(res.bytes_kept)}; {res.blobs_live} live ids, "
          f"{res.blobs_young} young), {res.blobs_trashed} {would}trashed ({human(res.bytes_trashed)})")
    print(f"trash:  {res.blobs_deleted} {would}deleted ({human(res.bytes_deleted)}), {res.blobs_restored} "
          f"{would}restored, {res.trash_left} waiting ({human(res.bytes_trash_left)})")
    print(f"other:  {res.temp_deleted} temp files, {res.locks_deleted} stale locks, "
          f"{res.quarantine_deleted} quarantined blobs {would}removed")
    if res.over_max_size:
        print(f"still {human(res.over_max_size)} over --max-size {human(res.max_size or 0)}: every remaining root "
              f"was used within the grace period")
    print(f"done in {res.seconds:.1f}s (grace {ago(res.grace)}{', dry run' if res.dry_run else ''})")
    return EXIT_PROBLEMS if failed else EXIT_OK


def cmd_check(store: BlobStore, scope: Scope | None, args, progress: Progress) -> int:
    if args.subset and not args.read_data:
        raise ValueError("--subset only applies with --read-data")
    subset = parse_subset(args.subset) if args.subset else None
    res = check(store, scope=scope, read_data=args.read_data, subset=subset, root_ttl=args.root_ttl,
                progress=progress)
    progress.clear()
    if args.json:
        _emit_json(res.to_dict())
    else:
        for p in res.problems:
            print(p)
        print(f"{res.blobs} blobs ({human(res.stored_bytes)}), {res.trash} in trash, {res.quarantine} quarantined; "
              f"{res.roots_live} live roots ({res.roots_dead} dead), {res.manifests} manifests, {res.entries} "
              f"entries, {res.referenced_blobs} referenced blobs")
        if args.read_data:
            part = f" subset {res.subset}" if res.subset else ""
            print(f"read {res.blobs_read} blobs ({human(res.bytes_read)}){part}")
        print(f"{len(res.problems)} problem(s) in {res.seconds:.1f}s" if res.problems else
              f"no problems ({res.seconds:.1f}s)")
    return EXIT_PROBLEMS if res.problems else EXIT_OK


def cmd_stats(store: BlobStore, scope: Scope | None, args, progress: Progress) -> int:
    st = compute(store, root_ttl=args.root_ttl, progress=progress)
    progress.clear()
    if args.json:
        _emit_json(st.to_dict())
        return EXIT_PROBLEMS if st.problems else EXIT_OK
    for p in st.problems:
        print(f"problem: {p}")
    if args.command == "stats":
        print(f"blobs:        {st.blobs} ({human(st.stored_bytes)} on disk), trash {st.trash_blobs} "
              f"({human(st.trash_bytes)}), quarantined {st.quarantined}")
        print(f"roots:        {st.roots_live} live, {st.roots_dead} dead")
        print(f"raw:          {human(st.logical_raw_bytes)} in manifests, {human(st.unique_raw_bytes)} distinct "
              f"(dedup {st.dedup_ratio:.2f}x)")
        if st.areas:
            print(f"raw by dir:   {_areas_text(st.areas)}")
        print(f"compressed:   {human(st.referenced_stored_bytes)} referenced "
              f"(compression {st.compression_ratio:.2f}x)")
        print(f"unreferenced: {st.unreferenced_blobs} blobs ({human(st.unreferenced_bytes)}): gc collects them "
              f"once older than the grace period")
        print()
    print(f"{'stored':>10} {'exclusive':>10} {'raw':>10} {'entries':>8} {'used':>7}  deployment/env key")
    for r in st.roots:
        mark = "" if r.live else "  (dead)"
        print(f"{human(r.stored_bytes):>10} {human(r.exclusive_bytes):>10} {human(r.raw_bytes):>10} "
              f"{r.entries:>8} {ago(r.age_s):>7}  {r.scope_id}/{r.env_key}  {r.scope_path}{mark}")
    return EXIT_PROBLEMS if st.problems else EXIT_OK


def _areas_text(areas: dict[str, int]) -> str:
    """Raw bytes per top-level directory, largest first: "aotautograd/ 41 MB, dynamo/ 22 MB, ..."."""
    parts = sorted(areas.items(), key=lambda kv: (-kv[1], kv[0]))
    return ", ".join(f"{name}{'' if name.startswith(('.', '(')) else '/'} {human(size)}" for name, size in parts)


def cmd_ls(store: BlobStore, scope: Scope | None, args, progress: Progress) -> int:
    if not args.name:
        return _ls_roots(store, scope, args)
    manifest = _find_manifest(store, scope, args.name)
    rows = sorted(manifest.entries.items())
    if args.json:
        _emit_json({"env_key": manifest.env_key, "env": manifest.env, "created": manifest.created,
                    "updated": manifest.updated,
                    "entries": [{"path": p, "blob": e.blob_id, "size": e.size, "mode": e.mode} for p, e in rows]})
        return EXIT_OK
    for path, e in rows:
        print(f"{e.mode:04o} {e.size:>12} {e.blob_id[:16]}  {path}")
    print(f"{len(rows)} entries, {human(manifest.total_size)}", file=sys.stderr)
    return EXIT_OK


def _find_manifest(store: BlobStore, scope: Scope | None, name: str) -> Manifest:
    if "/" in name:
        scope_id, env_key = name.split("/", 1)
        if not layout.is_scope_id(scope_id):
            raise ValueError(f"not SCOPE_ID/ENV_KEY: {name!r}")
        for item in list_roots(store).roots:
            if item.scope_id == scope_id and item.env_key == env_key:
                data = store.read_bytes(item.manifest, limits.MAX_MANIFEST_BYTES)
                return loads(data, f"blob {item.manifest}")
        raise ValueError(f"no root {name} in {store.root}")
    check_env_key(name)
    manifest = scope.read_manifest(name) if scope is not None else None
    if manifest is None:
        raise ValueError(f"no manifest {name!r} in {scope.root if scope else 'the deployment scope (missing)'}")
    return manifest


def _ls_roots(store: BlobStore, scope: Scope | None, args) -> int:
    now = store.backend.now()
    listing = list_roots(store)
    roots: list[dict[str, Any]] = [
        {"scope_id": r.scope_id, "env_key": r.env_key, "scope_path": r.scope_path, "manifest": r.manifest,
         "last_used": r.mtime, "age_s": max(0.0, now - r.mtime)} for r in listing.roots]
    problems = [{"path": bad.path, "reason": bad.reason} for bad in listing.unreadable]
    problems += [{"path": os.path.join(store.root, k), "reason": "planted: not a plain object (never read)"}
                 for k in listing.planted]
    problems += [{"path": os.path.join(store.root, "roots"), "reason": p} for p in listing.problems]
    local = scope.env_keys() if scope is not None else []
    if args.json:
        _emit_json({"roots": roots, "local_manifests": local, "problems": problems})
    else:
        for r in roots:
            print(f"{r['scope_id']}/{r['env_key']}  used {ago(r['age_s'])} ago  {r['scope_path']}")
        for key in local:
            print(f"local: {key}")
        for p in problems:
            print(f"problem: unreadable root {p['path']}: {p['reason']}")
    return EXIT_PROBLEMS if problems else EXIT_OK


def cmd_enable_pack_frames(store: BlobStore, scope: Scope | None, args, progress: Progress) -> int:
    changed = store.enable_pack_frames()
    if args.json:
        _emit_json({"pack_frames": True, "changed": changed})
    else:
        print(f"{store.root}: pack_frames {'enabled' if changed else 'already enabled'}")
    return EXIT_OK


_COMMANDS = {"gc": cmd_gc, "check": cmd_check, "stats": cmd_stats, "du": cmd_stats, "ls": cmd_ls,
             "enable-pack-frames": cmd_enable_pack_frames}

if __name__ == "__main__":
    sys.exit(main())
