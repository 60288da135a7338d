"""GPU end to end: time-to-ready of new replicas, ours vs the peer (b10-transfer) vs no cache.

Run ``python -m tools.gpu_e2e --help``; docs/benchmarks.md, section "GPU end to end", says
how it is run on the device machine and what the numbers mean.
"""
