"""A saver in a process of its own, on S3: `python tests/s3_worker.py save SRC --store s3://... --scope s3://...`.

Endpoint and credentials come from the AWS_* variables (as in production); `CAS_KILL_AT=<point>[:<n>]` SIGKILLs it at
a checkpoint (cas/_faults.py). Prints READY (with --ready) before saving and one JSON line when done.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from cas import BlobStore, Scope, save_tree
from cas.faulty import FaultyBackend
from cas.s3 import S3Backend


def main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("command", choices=["save"])
    ap.add_argument("src")
    ap.add_argument("--store", required=True)
    ap.add_argument("--scope", required=True)
    ap.add_argument("--env-key", default="test-env")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--stale-after", type=float, default=30.0)
    ap.add_argument("--ready", action="store_true")
    a = ap.parse_args(argv)
    store = BlobStore(S3Backend(a.store), create=True)
    puts: list[str] = []
    scope_backend = FaultyBackend(S3Backend(a.scope),
                                  before=lambda verb, key: puts.append(key) if verb == "put" else None)
    scope = Scope(scope_backend, create=True)
    if a.ready:
        print("READY", flush=True)
    res = save_tree(a.src, store, scope, a.env_key, threads=a.threads, lock_timeout=120, stale_after=a.stale_after)
    # lock_puts: lock objects this saver created in the scope (a lock-free manifest commit on S3 creates none, only
    # its save slot when the caller takes one: save_tree itself takes none).
    print(json.dumps({"manifest_written": res.manifest_written, "new": res.new_entries, "files": res.files,
                      "lock_puts": [k for k in puts if k.endswith(".lock")]}), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
