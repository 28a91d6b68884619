"""Timing: CUDA events around every call with the L2 flushed between calls and the
inputs rotated (:func:`time_device`), and the device-only time of calls replayed from
CUDA graphs (:func:`capture_graphs`, :func:`time_graph`)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

L2_FLUSH_BYTES = 256 * 2**20


@dataclass(frozen=True)
class Timing:
    """Per-call device time in ms over ``runs`` timed calls (after ``warmup_runs``)."""

    median_ms: float
    p20_ms: float
    p80_ms: float
    runs: int
    warmup_runs: int


@dataclass(frozen=True)
class TimingConfig:
    """How long to warm up and measure; see :func:`time_device`."""

    warmup_ms: float = 25.0
    rep_ms: float = 100.0
    min_runs: int = 10
    max_runs: int = 300
    flush_l2: bool = True
    input_copies: int = 3  # distinct input sets rotated through

    @classmethod
    def quick(cls) -> "TimingConfig":
        return cls(warmup_ms=10.0, rep_ms=40.0, min_runs=5, max_runs=100, input_copies=2)


class CudaClock:
    """CUDA events on the current stream, and an L2 flush (a write of ``flush_bytes``)."""

    def __init__(self, device: torch.device | str = "cuda", flush_bytes: int = L2_FLUSH_BYTES):
        self.device = torch.device(device)
        self._flush_buffer = (
            torch.empty(flush_bytes, dtype=torch.int8, device=self.device) if flush_bytes > 0 else None
        )

    def event(self):
        return torch.cuda.Event(enable_timing=True)

    @staticmethod
    def elapsed_ms(start, end) -> float:
        return start.elapsed_time(end)

    def synchronize(self) -> None:
        torch.cuda.synchronize(self.device)

    def flush_l2(self) -> None:
        if self._flush_buffer is not None:
            self._flush_buffer.zero_()


def _quantile(sorted_values: Sequence[float], q: float) -> float:
    """Linear interpolation between closest ranks (as ``torch.quantile``)."""
    if not sorted_values:
        raise ValueError("sorted_values: expected at least one value")
    pos = q * (len(sorted_values) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def _clamp(value: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, value))


@dataclass
class CapturedCall:
    """One call captured in a CUDA graph; ``output`` lives in the graph's memory pool and
    is rewritten by every replay."""

    graph: Any
    output: Any


def capture_graphs(fn: Callable[[Any], Any], arg_sets: Sequence[Any], device: torch.device) -> list[CapturedCall]:
    """One CUDA graph per input set, each holding one call of ``fn`` in its own memory pool
    (a shared pool would let one graph's temporaries overlay another's output). The calls
    run once on a side stream first, as ``torch.cuda.graphs`` asks (lazy initialization,
    cuBLAS workspaces, JIT compilation happen outside the capture)."""
    current = torch.cuda.current_stream(device)
    side = torch.cuda.Stream(device)
    side.wait_stream(current)
    with torch.cuda.stream(side):
        for args in arg_sets:
            fn(args)
    current.wait_stream(side)
    torch.cuda.synchronize(device)
    captured = []
    for args in arg_sets:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            output = fn(args)
        captured.append(CapturedCall(graph, output))
    return captured


def _copied(value):
    """A copy of a call's output that outlives its graph."""
    if isinstance(value, torch.Tensor):
        return value.clone()
    if isinstance(value, (list, tuple)):
        return type(value)(_copied(v) for v in value)
    return value


def time_graph(fn: Callable[[Any], Any], arg_sets: Sequence[Any], check_inputs: Any, *, clock, device,
               config: TimingConfig = TimingConfig()) -> tuple[Timing, Any]:  # fmt: skip
    """Device-only time of ``fn``: one CUDA graph per input set (:func:`capture_graphs`),
    replays timed by :func:`time_device` (events, L2 flush, rotation). Also captures
    ``fn(check_inputs)`` and returns what its replay wrote, for the caller to check."""
    check, *timed = capture_graphs(fn, [check_inputs, *arg_sets], device)
    check.graph.replay()
    clock.synchronize()
    replayed = _copied(check.output)
    del check
    timing = time_device(lambda call: call.graph.replay(), timed, clock=clock, config=config)
    return timing, replayed


def time_device(fn: Callable[[Any], Any], arg_sets: Sequence[Any], *, clock, config: TimingConfig = TimingConfig()) -> Timing:
    """Time ``fn(arg_sets[i % len(arg_sets)])`` with device events, rotating inputs.

    ``clock`` provides ``event()`` (objects with ``record()``), ``elapsed_ms(a, b)``,
    ``synchronize()`` and ``flush_l2()``: :class:`CudaClock` on a GPU.
    """
    if not arg_sets:
        raise ValueError("arg_sets: expected at least one input set")
    n_sets = len(arg_sets)

    def call(i: int):
        return fn(arg_sets[i % n_sets])

    call(0)
    clock.synchronize()
    est_calls = 5
    est_start, est_end = clock.event(), clock.event()
    est_start.record()
    for i in range(est_calls):
        if config.flush_l2:
            clock.flush_l2()
        call(i)
    est_end.record()
    clock.synchronize()
    per_call_ms = max(clock.elapsed_ms(est_start, est_end) / est_calls, 1e-4)

    warmup_runs = _clamp(int(config.warmup_ms / per_call_ms), 1, config.max_runs)
    runs = _clamp(int(config.rep_ms / per_call_ms), config.min_runs, config.max_runs)
    for i in range(warmup_runs):
        call(i)
    starts = [clock.event() for _ in range(runs)]
    ends = [clock.event() for _ in range(runs)]
    for i in range(runs):
        if config.flush_l2:
            clock.flush_l2()
        starts[i].record()
        call(i)
        ends[i].record()
    clock.synchronize()
    times = sorted(clock.elapsed_ms(s, e) for s, e in zip(starts, ends))
    return Timing(
        median_ms=_quantile(times, 0.5),
        p20_ms=_quantile(times, 0.2),
        p80_ms=_quantile(times, 0.8),
        runs=runs,
        warmup_runs=warmup_runs,
    )
