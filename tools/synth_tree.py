"""A synthetic tree shaped like a measured Inductor cache (shared/notes: H100, Llama-shaped model, default mode):
680 files, 56.6 MB, median 13 KB, p90 116 KB, largest 11 MB, 608 under triton/, a few under fxgraph/ and
aotautograd/, top-level <2 chars>/c<hash>.py files. Text artifacts compress ~4x, binaries ~1.5x, like the real ones.

    python -m tools.synth_tree DIR [--files 680] [--total-mb 56.6] [--seed 0]
"""
from __future__ import annotations

import argparse
import math
import os
import random

MEDIAN = 13_000
P90 = 116_000
LARGEST = 11_000_000
_WORDS = ("tl.load tl.store tl.program_id xindex xmask tmp0 tmp1 triton_poi_fused_add_mul_0 rsqrt float32 "
          "bf16 %0 = arith.addf %1 : tensor<128xf32> ld.global.v4.b32 mov.u32 @%p1 bra $L__BB0_2 def kernel "
          "num_warps=4 num_stages=3 XBLOCK: tl.constexpr YBLOCK r0_numel return torch.ops.aten.mm.default").split()
_TEXT_EXT = [".ttir", ".ttgir", ".llir", ".ptx", ".json", ".source"]
_BIN_EXT = [".cubin"]


def _text(rng: random.Random, size: int) -> bytes:
    out = bytearray()
    while len(out) < size:
        line = " ".join(rng.choice(_WORDS) for _ in range(rng.randint(3, 12)))
        out += f"{line} {rng.getrandbits(32):08x}\n".encode()
    return bytes(out[:size])


def _binary(rng: random.Random, size: int) -> bytes:
    # Half random, half structured: real cubins compress about 1.5x.
    out = bytearray(rng.randbytes(size // 2))
    out += bytes(size - len(out))
    return bytes(out)


def sizes(rng: random.Random, n: int, total: int, median: int = MEDIAN, p90: int = P90,
          largest: int = LARGEST) -> list[int]:
    sigma = (math.log(p90) - math.log(median)) / 1.2816
    raw = sorted(int(rng.lognormvariate(math.log(median), sigma)) for _ in range(n - 1))
    raw = [min(s, largest // 2) for s in raw]
    rest = total - sum(raw)
    raw.append(max(min(rest, largest), 1))
    # Spread any remainder over the big files so the total matches without changing the median.
    remainder = total - sum(raw)
    for i in range(n - 2, n - 12, -1):
        if remainder <= 0:
            break
        add = min(remainder, largest - raw[i])
        raw[i] += add
        remainder -= add
    rng.shuffle(raw)
    return raw


def make_tree(root: str, files: int = 680, total_mb: float = 56.6, seed: int = 0, *, median: int = MEDIAN,
              p90: int = P90, largest: int = LARGEST, per_dir: int = 1) -> list[str]:
    """`median`, `p90`, `largest`: the size law (defaults: the measured H100 cache; tools/bench scale uses a
    max-autotune-like law of many tiny files for its 5,000 and 20,000 file trees). `per_dir`: triton files per
    kernel directory (default 1, one directory per file, the worst case for a walk; Triton itself writes each
    kernel's .source/.ttir/.ttgir/.llir/.ptx/.cubin/.json side by side, about 7)."""
    rng = random.Random(seed)
    made = []
    kernel_dir = ""
    n_triton = int(files * 608 / 680)
    n_graph = max(1, files // 40)
    for i, size in enumerate(sizes(rng, files, int(total_mb * 1e6), median, p90, largest)):
        h = f"{rng.getrandbits(128):032x}"
        if i < n_triton:
            if i % max(1, per_dir) == 0:
                kernel_dir = f"triton/0/{h[:26].upper()}"
            binary = i % 5 == 0
            ext = rng.choice(_BIN_EXT if binary else _TEXT_EXT)
            rel = f"{kernel_dir}/triton_{i}{ext}"
        elif i < n_triton + n_graph:
            rel, binary = f"fxgraph/{h[1:3]}/f{h}/{i}", True
        elif i < n_triton + 2 * n_graph:
            rel, binary = f"aotautograd/a{h}/entry", True
        else:
            rel, binary = f"{h[:2]}/c{h}.py", False
        path = os.path.join(root, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as fh:
            fh.write(_binary(rng, size) if binary else _text(rng, size))
        made.append(rel)
    return made


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dir")
    ap.add_argument("--files", type=int, default=680)
    ap.add_argument("--total-mb", type=float, default=56.6)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    made = make_tree(a.dir, a.files, a.total_mb, a.seed)
    print(f"{len(made)} files in {a.dir}")


if __name__ == "__main__":
    main()
