"""Deterministic file contents: every path always holds the same bytes, so any file seen anywhere can be verified.

A path is `<kind>/<h[:2]>/<key>.<h[2:18]>` where `h` is the blake3 of the content of `<key>`: the name alone says
what the file must hold (like Inductor's own content-hashed names). Two trees that share a key share the file, which
gives saves that overlap across workers, scopes and environment keys.
"""
from __future__ import annotations

import os
import random
import stat
from functools import lru_cache

import blake3

KINDS = ("fxgraph", "triton/0", "aotautograd", "inductor")


@lru_cache(maxsize=4096)
def content(key: str) -> bytes:
    rng = random.Random(blake3.blake3(key.encode()).digest())
    r = rng.random()
    if r < 0.05:
        size = 0
    elif r < 0.93:
        size = rng.randint(1, 16_000)
    elif r < 0.99:
        size = rng.randint(16_000, 300_000)
    else:
        size = rng.randint(300_000, 1_000_000)
    if key.startswith("big"):
        size = rng.randint(8_400_000, 9_000_000)  # above the store's whole-file limit: the streaming paths
    if rng.random() < 0.5:
        return rng.randbytes(size)
    unit = f"# {key} kernel line {rng.randint(0, 1 << 30)}\n".encode()
    return (unit * (size // len(unit) + 1))[:size]


def mode_of(key: str) -> int:
    r = blake3.blake3(b"mode" + key.encode()).digest()[0]
    return 0o755 if r < 32 else 0o644


@lru_cache(maxsize=None)
def path_of(key: str) -> str:
    h = blake3.blake3(content(key)).hexdigest()
    kind = KINDS[int(h[20], 16) % len(KINDS)]
    return f"{kind}/{h[:2]}/{key}.{h[2:18]}"


def key_of(rel: str) -> str | None:
    base = rel.rsplit("/", 1)[-1]
    key, dot, _ = base.rpartition(".")
    return key if dot else None


def expected(rel: str) -> bytes | None:
    """What `rel` must hold, or None if it is not a path this generator makes."""
    key = key_of(rel)
    if key is None or path_of(key) != rel:
        return None
    return content(key)


def write_files(root: str, keys) -> list[str]:
    """Write the files of `keys` under `root` (skipping those already there). Returns their paths."""
    rels = []
    for key in keys:
        rel = path_of(key)
        rels.append(rel)
        path = os.path.join(root, rel)
        if os.path.exists(path):
            continue
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = path + ".tmp"  # a name saves never take
        with open(tmp, "wb") as fh:
            fh.write(content(key))
        os.chmod(tmp, mode_of(key))
        os.rename(tmp, path)
    return rels


def verify_tree(root: str, *, skip_temp: bool = True) -> tuple[int, list[str]]:
    """Check every final-name file under `root` against `expected`. Returns (files checked, problems)."""
    bad: list[str] = []
    n = 0
    for directory, dirs, names in os.walk(root):
        for name in names:
            if skip_temp and (name.startswith(".tmp-") or name.endswith(".tmp")):
                continue
            if name == ".cas-index" and directory == root:
                continue
            path = os.path.join(directory, name)
            rel = os.path.relpath(path, root).replace(os.sep, "/")
            try:
                st = os.lstat(path)
                if not stat.S_ISREG(st.st_mode):
                    bad.append(f"{rel}: not a regular file")
                    continue
                with open(path, "rb") as fh:
                    data = fh.read()
            except FileNotFoundError:
                continue
            n += 1
            want = expected(rel)
            if want is None:
                bad.append(f"{rel}: a name no save ever produced")
            elif data != want:
                bad.append(f"{rel}: {len(data)} bytes, expected {len(want)} (partial or wrong content)")
            elif stat.S_IMODE(st.st_mode) & 0o7022:
                bad.append(f"{rel}: restored with dangerous mode {oct(stat.S_IMODE(st.st_mode))}")
    return n, bad
