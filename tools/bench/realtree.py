"""Make a real Inductor cache: torch.compile a small transformer on the CPU, once per input shape.

    python -m tools.bench.realtree DIR      # DIR becomes TORCHINDUCTOR_CACHE_DIR of a fresh process

Run in a subprocess by the benchmark (Inductor reads its cache dir at import); the result is kept under .scratch/
so later runs reuse it.
"""
from __future__ import annotations

import os
import sys

WIDTH = 64
BLOCKS = 4
SHAPES = ((1, 16), (2, 32), (4, 8))


def build(width: int = WIDTH, blocks: int = BLOCKS):
    import torch

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.qkv = torch.nn.Linear(width, 3 * width)
            self.proj = torch.nn.Linear(width, width)
            self.up = torch.nn.Linear(width, 4 * width)
            self.down = torch.nn.Linear(4 * width, width)
            self.n1 = torch.nn.LayerNorm(width)
            self.n2 = torch.nn.LayerNorm(width)

        def forward(self, x):
            q, k, v = self.qkv(self.n1(x)).chunk(3, dim=-1)
            att = torch.softmax(q @ k.transpose(-1, -2) / width**0.5, dim=-1) @ v
            x = x + self.proj(att)
            return x + self.down(torch.nn.functional.gelu(self.up(self.n2(x))))

    return torch.nn.Sequential(*[Block() for _ in range(blocks)])


def main() -> int:
    out = os.path.abspath(sys.argv[1])
    if os.environ.get("TORCHINDUCTOR_CACHE_DIR") != out:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = out
        os.execv(sys.executable, [sys.executable, "-m", "tools.bench.realtree", out])
    import torch

    torch.manual_seed(0)
    model = build().eval()
    with torch.no_grad():
        for shape in SHAPES:
            torch._dynamo.reset()  # a separate compile per shape, as separate server starts would do
            compiled = torch.compile(model, dynamic=False)
            compiled(torch.randn(*shape, WIDTH))
    return 0


if __name__ == "__main__":
    sys.exit(main())
