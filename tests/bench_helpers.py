"""Shared by the benchmark tests: a stand-in for ``benchmarks.harness.CudaClock`` that
times with ``time.perf_counter`` on the CPU and counts the L2 flushes it was asked for."""

import time


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
