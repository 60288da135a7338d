"""`b10-compile-cache` over a pod's life, every part a real process: a readiness server standing in for vLLM (503,
then 200), a torch.compile process writing artifacts into the vLLM cache root over time, and the companion.

Pod 1: the companion loads (nothing yet), waits, saves what was compiled before readiness, re-saves what is compiled
later, and saves once more on SIGTERM. Pod 2 (fresh local disk, same volume): `--once` restores all of it, and the
same compiles there hit Inductor's cache instead of compiling.
"""

from __future__ import annotations

import pytest

from test_companion_harness import Companion, Pod, ReadinessServer, Volume, Writer, wait_for

pytestmark = pytest.mark.slow

SHAPES = [4, 8]


def test_pod_lifecycle_then_fresh_pod_restores_everything(tmp_path):
    volume = Volume.create(tmp_path / "volume")
    pod1 = Pod(tmp_path / "pod1", volume)
    server = ReadinessServer(tmp_path / "ready1")
    writer = companion = None
    try:
        writer = Writer(pod1, tmp_path / "writer1", SHAPES)
        companion = Companion.start(
            pod1,
            server.url,
            B10_TRANSFER_RESAVE_INTERVAL_S="1",
            B10_TRANSFER_UNREADY_TIMEOUT_S="0",  # this test ends the companion with SIGTERM
            B10_TRANSFER_FINAL_SAVE_TIMEOUT_S="120",
        )
        companion.wait_log(r"load status=DOES_NOT_EXIST")
        companion.wait_log(r"waiting for readiness")

        # vLLM compiles during start-up, then reports ready.
        first = writer.phase(0)
        assert first["fxgraph_cache_miss"] >= 1, first
        server.set_ready()
        companion.wait_log(r"server ready after")
        companion.wait_log(r"save status=SUCCESS")
        at_ready = set(pod1.files())
        assert at_ready <= volume.manifest_paths()
        assert "torch_aot_compile/shape-4/model" in at_ready
        assert any(p.startswith("torch_compile_cache/inductor/fxgraph/") for p in at_ready), sorted(at_ready)

        # A later shape is compiled while serving: a periodic save records it, no restart or signal needed.
        writer.phase(1)
        writer.finish()
        later = set(pod1.files()) - at_ready
        assert "torch_aot_compile/shape-8/model" in later
        wait_for(lambda: set(pod1.files()) <= volume.manifest_paths(), "the periodic save of the later artifacts",
                 proc=companion.proc)
        assert companion.lines(r"saving \(cache changed")

        # Scale-down: one more artifact lands, SIGTERM comes; the companion saves before it exits.
        late = pod1.vllm_root / "torch_aot_compile" / "late" / "model"
        late.parent.mkdir(parents=True)
        late.write_bytes(b"written just before SIGTERM\n")
        companion.signal()
        assert companion.wait() == 0, companion.log
        assert "torch_aot_compile/late/model" in volume.manifest_paths()
        assert companion.lines(r"stopped \(SIGTERM\)")
        assert not companion.lines(r"Traceback|ERROR")
        # The companion never saved before the server was ready: it could have taken half-written files.
        log = companion.log
        assert log.index("server ready after") < log.index("saving (")
    finally:
        for p in (companion, writer):
            if p is not None:
                p.proc.kill() if p.proc.poll() is None else None
        server.stop()

    # A fresh pod of the same deployment: --once loads everything and stops (the peer's behaviour), before any
    # server exists.
    pod2 = Pod(tmp_path / "pod2", volume)
    restore = Companion.start(pod2, "http://127.0.0.1:9/unused", "--once")
    assert restore.wait() == 0, restore.log
    assert restore.lines(r"load status=SUCCESS")
    assert restore.lines(r"--once: nothing more to do")
    assert pod2.files() == pod1.files()

    # ... and the same compiles in pod 2 are cache hits, not compiles.
    writer2 = Writer(pod2, tmp_path / "writer2", SHAPES)
    try:
        writer2.phase(0)
        result = writer2.phase(1)
        writer2.finish()
    finally:
        writer2.proc.kill() if writer2.proc.poll() is None else None
    assert result.get("fxgraph_cache_miss", 0) == 0, result
    assert result.get("fxgraph_cache_hit", 0) >= 1, result
    assert result["max_abs_err"] < 1e-4, result
