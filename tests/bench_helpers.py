"""Shared by the benchmark tests: a stand-in for ``benchmarks.harness.CudaClock`` that
times with ``time.perf_counter`` on the CPU and counts the L2 flushes it was asked for,
and the environment of a benchmark command run as a subprocess."""

import os
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def env_without_cuda_or_interpreter() -> dict:
    """This environment with CUDA hidden, TRITON_INTERPRET unset and the repository on
    PYTHONPATH (``benchmarks`` is a top-level folder, not installed)."""
    env = dict(os.environ)
    env["CUDA_VISIBLE_DEVICES"] = ""
    env.pop("TRITON_INTERPRET", None)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
    return env


class _WallEvent:
    def __init__(self):
        self.t = None

    def record(self):
        self.t = time.perf_counter()


class WallClock:
    """Stand-in for CudaClock: perf_counter events, counts L2 flushes."""

    def __init__(self):
        self.flushes = 0

    def event(self):
        return _WallEvent()

    @staticmethod
    def elapsed_ms(start, end):
        return (end.t - start.t) * 1e3

    def synchronize(self):
        pass

    def flush_l2(self):
        self.flushes += 1
