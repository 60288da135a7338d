"""No descriptor on the volume outlives the call that opened it (the POSIX backend works through directory
descriptors): an operator must be able to unmount or remount the volume between calls. Checked with the garbage
collector off, so a reference cycle that only a collection would break shows up as a leak."""
from __future__ import annotations

import gc
import os

from b10_transfer import OperationStatus, core


def _open_under(root) -> list[str]:
    out = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith(str(root)):
            out.append(target)
    return out


def test_no_descriptor_on_the_volume_survives_a_call(b10_env):
    (b10_env.local).mkdir(parents=True, exist_ok=True)
    old = os.stat(b10_env.local).st_mtime - 60  # older than the index's 2 s rule: the no-op check trusts them
    for i in range(5):
        (b10_env.local / f"k{i}").write_bytes(os.urandom(100))
        os.utime(b10_env.local / f"k{i}", (old, old))
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        assert core.save(env={"gpu": "none"})[0] is OperationStatus.SUCCESS
        assert _open_under(b10_env.volume) == []
        status, stats = core.save(env={"gpu": "none"})
        assert status is OperationStatus.SKIPPED and stats.reason == "nothing new to record"
        assert _open_under(b10_env.volume) == []  # the no-op check (cas/quick.py) opened and closed its own
        for path in b10_env.local.iterdir():
            path.unlink()
        assert core.load(env={"gpu": "none"})[0] is OperationStatus.SUCCESS
        assert _open_under(b10_env.volume) == []
    finally:
        if was_enabled:
            gc.enable()
