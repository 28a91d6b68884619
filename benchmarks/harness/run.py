"""Running a benchmark: the timing source (:class:`CudaEventTiming`), the session shared by
a run's cells (:class:`BenchSession`), the timed run (:func:`run_timed`), the CPU
self-check (:func:`validate_on_cpu`), :func:`run_benchmark` choosing between them, and
the step deadline (:data:`DEADLINE_ENV`)."""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any, Callable, Sequence

import torch

from . import common
from .common import NO_CUDA, NOT_TIMED, error_text
from .providers import Benchmark, BenchmarkResult, Provider, ResultRow
from .roofline import Roofline, measure_roofline, roofline_floor_ms
from .syncs import count_host_syncs, mmkernels_decision_mark, mmkernels_decisions_since, unexpected_backends
from .timing import L2_FLUSH_BYTES, CudaClock, Timing, TimingConfig, time_device, time_graph

# Seconds since the epoch after which a benchmark stops timing new cells (set by the GPU
# suite so a step ends inside its budget with its results written).
DEADLINE_ENV = "MMKERNELS_BENCH_DEADLINE"


def deadline_from_env() -> float | None:
    value = os.environ.get(DEADLINE_ENV)
    return float(value) if value else None


def _provider_descriptions(bench: Benchmark) -> list[dict]:
    return [{"name": p.name, "optional": p.optional, "notes": p.notes} for p in bench.providers]


CUDA_EVENTS = "cuda-events"


class CudaEventTiming:
    """The timing source of real runs: :func:`time_device` with the session's clock
    (CUDA events and an L2 flush), and the peak memory of one call from
    ``torch.cuda.max_memory_allocated`` (above what was allocated before the call, so
    weights and inputs already resident are not counted; None off CUDA).

    A timing source has ``name``, ``time(session, case, provider, fn, arg_sets) -> Timing``
    and ``peak_memory(session, case, provider, fn, inputs) -> bytes | None``, and may
    have ``time_graph(session, case, provider, fn, arg_sets, check_inputs) -> (Timing,
    output)`` for benchmarks with ``graph_timing``; tests inject a deterministic one.
    """

    name = CUDA_EVENTS

    def time(self, session: "BenchSession", case, provider: "Provider", fn, arg_sets) -> Timing:
        return time_device(fn, arg_sets, clock=session.clock, config=session.timing)

    def time_graph(self, session: "BenchSession", case, provider: "Provider", fn, arg_sets,
                   check_inputs) -> tuple[Timing, Any]:  # fmt: skip
        """:func:`time_graph`: the replays' timing, and what the replay on
        ``check_inputs`` wrote."""
        return time_graph(fn, arg_sets, check_inputs, clock=session.clock, device=session.device, config=session.timing)

    def peak_memory(self, session: "BenchSession", case, provider: "Provider", fn, inputs) -> int | None:
        if session.device.type != "cuda" or not common.cuda_available():
            return None
        torch.cuda.synchronize(session.device)
        before = torch.cuda.memory_allocated(session.device)
        torch.cuda.reset_peak_memory_stats(session.device)
        with torch.inference_mode():
            out = fn(inputs)
        torch.cuda.synchronize(session.device)
        peak = torch.cuda.max_memory_allocated(session.device)
        del out
        return max(0, peak - before)


class BenchSession:
    """Device state shared by the cells of one run: the clock, the roofline, built
    providers (``torch.compile`` happens once), the current case's inputs and oracle.

    Used by :func:`run_benchmark` and by the pytest-benchmark cells.
    """

    def __init__(self, bench: Benchmark, device: torch.device | str = "cuda", *, quick: bool = False,
                 roofline: Roofline | None = None, timing: TimingConfig | None = None,
                 counter_class=None, clock=None, timing_source=None):  # fmt: skip
        self.bench = bench
        self.timing_source = timing_source or CudaEventTiming()
        self.device = torch.device(device)
        self.quick = quick
        self.timing = timing or (TimingConfig.quick() if quick else TimingConfig())
        self.counter_class = counter_class
        self._roofline = roofline
        self._clock = clock  # CudaClock unless given (tests pass a stand-in)
        self._built: dict[tuple[str, bool], Callable | BaseException] = {}
        self._case_name: str | None = None
        self._case_state: dict = {}
        self.baseline_ms: dict[str, float] = {}  # case name -> the first provider's median (pytest cells)

    # -- shared state ---------------------------------------------------------------
    @property
    def roofline(self) -> Roofline:
        if self._roofline is None:
            self._roofline = measure_roofline(self.device, quick=self.quick)
        return self._roofline

    @property
    def clock(self):
        if self._clock is None:
            self._clock = CudaClock(self.device, L2_FLUSH_BYTES if self.timing.flush_l2 else 0)
        return self._clock

    def built(self, provider: Provider, *, for_check: bool = False) -> Callable:
        """The provider's callable, built once; raises what the factory raised."""
        key = (provider.name, for_check and provider.check_factory is not None)
        if key not in self._built:
            try:
                self._built[key] = provider.build(for_check=for_check)
            except Exception as exc:
                self._built[key] = exc
        value = self._built[key]
        if isinstance(value, BaseException):
            raise value
        return value

    def _case(self, case) -> dict:
        """Inputs and expected output of ``case`` on the device (one case kept at a time)."""
        if self._case_name != case.name:
            self._case_state = {}
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            self._case_name = case.name
            self._case_state["expected"] = self.bench.expected_output(self.bench.make_inputs(case, self.device, 0))
        return self._case_state

    def arg_sets(self, case) -> list:
        state = self._case(case)
        if "arg_sets" not in state:
            copies = max(1, self.timing.input_copies)
            state["arg_sets"] = [self.bench.make_inputs(case, self.device, 1 + i) for i in range(copies)]
        return state["arg_sets"]

    def release(self) -> None:
        self._case_state = {}
        self._case_name = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    # -- one cell -------------------------------------------------------------------
    def _base_row(self, case, provider: Provider) -> ResultRow:
        return ResultRow(
            benchmark=self.bench.name,
            case=case.name,
            provider=provider.name,
            status="",
            bytes=int((provider.bytes_moved or self.bench.bytes_moved)(case)),
            flops=int(self.bench.flops(case)),
            params=case.params(),
        )

    def _skip_or_fail(self, row: ResultRow, provider: Provider, what: str, exc: BaseException) -> ResultRow:
        row.status = "skipped" if provider.optional else "failed"
        row.reason = f"{what}: {error_text(exc)}"
        return row

    def count_syncs(self, row: ResultRow, provider: Provider, case) -> None:
        """Host syncs of one call on ``case``, on this session's device (the CPU check
        passes the scaled-down case; on CUDA the full case reuses compiled kernels)."""
        try:
            fn = self.built(provider, for_check=True)
            inputs = self.bench.make_inputs(case, self.device, 0)
        except Exception as exc:
            row.host_sync_ops = {}
            row.reason = (row.reason + "; " if row.reason else "") + f"host syncs not counted: {error_text(exc)}"
            return
        mark = mmkernels_decision_mark()
        synced = count_host_syncs(fn, inputs, self.counter_class)
        row.host_syncs, row.host_sync_ops, row.host_syncs_device = synced.count, synced.ops, self.device.type
        row.backend = row.backend or mmkernels_decisions_since(mark)
        if synced.note:
            row.reason = (row.reason + "; " if row.reason else "") + f"host syncs not counted: {synced.note}"

    def run_cell(self, case, provider: Provider) -> ResultRow:
        """Check the provider's output on ``case`` and time it (CUDA)."""
        row = self._base_row(case, provider)
        reason = provider.skip_reason(self.device.type)
        if reason:
            row.status, row.reason = "skipped", reason
            return row
        try:
            fn = self.built(provider)
        except Exception as exc:
            return self._skip_or_fail(row, provider, "could not build", exc)
        state = self._case(case)
        mark = mmkernels_decision_mark()
        try:
            with torch.inference_mode():
                out = fn(self.bench.make_inputs(case, self.device, 0))
                mismatch = self.bench.compare(out, state["expected"])
        except Exception as exc:
            return self._skip_or_fail(row, provider, "first call raised", exc)
        row.backend = mmkernels_decisions_since(mark)
        del out
        wrong_backend = unexpected_backends(row.backend, provider.timed_backend) if provider.timed_backend else []
        if provider.timed_backend and (wrong_backend or not row.backend):
            row.status = "failed"
            row.reason = f"expected backend {provider.timed_backend!r}, ran: {row.backend or 'no recorded decision'}"
            return row
        if mismatch:
            row.status, row.correct, row.reason = "failed", False, f"wrong output: {mismatch}"
            return row
        row.correct = True
        try:
            with torch.inference_mode():
                timing = self.timing_source.time(self, case, provider, fn, self.arg_sets(case))
        except Exception as exc:
            return self._skip_or_fail(row, provider, "timing raised", exc)
        self._fill_metrics(row, timing)
        row.status = "ok"
        try:
            peak = self.timing_source.peak_memory(self, case, provider, fn, self.arg_sets(case)[0])
        except Exception as exc:
            peak = None
            row.reason = (row.reason + "; " if row.reason else "") + f"peak memory not measured: {error_text(exc)}"
        row.peak_mem_mib = None if peak is None else peak / 2**20
        self.count_syncs(row, provider, case)
        if self.bench.graph_timing:
            self._time_from_graphs(row, case, provider, fn)
        return row

    def _time_from_graphs(self, row: ResultRow, case, provider: Provider, fn) -> None:
        """The cell's device-only time (:func:`time_graph`), or ``row.graph_note`` saying
        why there is none. A failure here leaves the eager row as it is."""
        timer = getattr(self.timing_source, "time_graph", None)
        if timer is None:
            row.graph_note = f"not captured: the timing source {self.timing_source.name!r} has no graph timing"
            return
        if row.host_syncs != 0:
            row.graph_note = ("not captured: host syncs could not be counted" if row.host_syncs is None
                              else f"not captured: {row.host_syncs} host sync(s) per call")  # fmt: skip
            return
        try:
            with torch.inference_mode():
                timing, replayed = timer(self, case, provider, fn, self.arg_sets(case),
                                         self.bench.make_inputs(case, self.device, 0))  # fmt: skip
                mismatch = self.bench.compare(replayed, self._case(case)["expected"])
        except Exception as exc:
            row.graph_note = f"not captured: {error_text(exc)}"
            return
        if mismatch:
            row.graph_note = f"WRONG output when replayed from a CUDA graph: {mismatch}"
            return
        row.graph_median_ms, row.graph_p20_ms, row.graph_p80_ms = timing.median_ms, timing.p20_ms, timing.p80_ms
        floor_ms = roofline_floor_ms(row.bytes, row.flops, self.roofline)
        if floor_ms is not None:
            row.graph_pct_roofline = 100.0 * floor_ms / timing.median_ms

    def _fill_metrics(self, row: ResultRow, timing: Timing) -> None:
        seconds = timing.median_ms * 1e-3
        row.median_ms, row.p20_ms, row.p80_ms, row.runs = timing.median_ms, timing.p20_ms, timing.p80_ms, timing.runs
        row.gbps = row.bytes / seconds / 1e9 if row.bytes else None
        row.tflops = row.flops / seconds / 1e12 if row.flops else None
        roof = self.roofline
        if roof.measured and row.gbps is not None:
            row.pct_copy_bw = 100.0 * row.gbps / roof.copy_gbps
        if roof.measured and row.tflops is not None:
            row.pct_matmul = 100.0 * row.tflops / roof.matmul_tflops
        floor_ms = roofline_floor_ms(row.bytes, row.flops, roof)
        if floor_ms is not None:
            row.pct_roofline = 100.0 * floor_ms / timing.median_ms

    def check_cell_on_cpu(self, case, provider: Provider, reason: str) -> ResultRow:
        """The CPU self-check of one cell: run once on the scaled-down case, compare with
        the oracle, count host syncs. Never timed."""
        row = self._base_row(case, provider)
        skip = provider.skip_reason("cpu")
        if skip:
            row.status, row.reason = "skipped", skip
            return row
        small = self.bench.small_case(case)
        try:
            fn = self.built(provider, for_check=True)
        except Exception as exc:
            return self._skip_or_fail(row, provider, "could not build", exc)
        mark = mmkernels_decision_mark()
        try:
            expected = self.bench.expected_output(self.bench.make_inputs(small, self.device, 0))
            out = fn(self.bench.make_inputs(small, self.device, 0))
            mismatch = self.bench.compare(out, expected)
        except Exception as exc:
            return self._skip_or_fail(row, provider, "CPU check raised", exc)
        row.backend = mmkernels_decisions_since(mark)
        if mismatch:
            row.status, row.correct, row.reason = "failed", False, f"wrong output on the CPU check: {mismatch}"
            return row
        row.status, row.correct, row.reason = NOT_TIMED, True, reason
        self.count_syncs(row, provider, small)
        return row


def _fill_speedups(rows: list[ResultRow], baseline: str) -> None:
    base = {r.case: r.median_ms for r in rows if r.provider == baseline and r.status == "ok"}
    graph_base = {r.case: r.graph_median_ms for r in rows if r.provider == baseline and r.status == "ok"}
    for r in rows:
        if r.status == "ok" and base.get(r.case):
            r.speedup = base[r.case] / r.median_ms
        if r.status == "ok" and graph_base.get(r.case) and r.graph_median_ms:
            r.graph_speedup = graph_base[r.case] / r.graph_median_ms


def _not_timed_reason(detail: str) -> str:
    return f"{NOT_TIMED}: {NO_CUDA} ({detail})"


def validate_on_cpu(bench: Benchmark, *, quick: bool = False, reason: str | None = None,
                    counter_class=None, on_progress: Callable[[BenchmarkResult], None] | None = None) -> BenchmarkResult:  # fmt: skip
    """The harness's self-check without CUDA: every case scaled down, every provider that
    can run on the CPU run once against the oracle, host syncs counted. Nothing timed.
    ``on_progress`` gets the partial result after every case."""
    reason = reason or _not_timed_reason("harness validated on the CPU: shapes built, outputs checked, syncs counted")
    session = BenchSession(bench, "cpu", quick=quick, counter_class=counter_class)
    result = BenchmarkResult(
        benchmark=bench.name,
        description=bench.description,
        bytes_model=bench.bytes_model,
        timed=False,
        not_timed_reason=reason,
        rows=[],
        roofline=Roofline.not_measured(f"not measured: {NO_CUDA}"),
        providers=_provider_descriptions(bench),
        graph_timing=bench.graph_timing,
    )
    for case in bench.cases_for(quick):
        result.rows += [session.check_cell_on_cpu(case, provider, reason) for provider in bench.providers]
        if on_progress:
            on_progress(result)
    return result


def _deadline_rows(session: BenchSession, case, reason: str) -> list[ResultRow]:
    rows = []
    for provider in session.bench.providers:
        row = session._base_row(case, provider)
        row.status, row.reason = NOT_TIMED, reason
        rows.append(row)
    return rows


def run_benchmark(bench: Benchmark, *, quick: bool = False, device: torch.device | str | None = None,
                  roofline: Roofline | None = None, deadline: float | None = None,
                  on_progress: Callable[[BenchmarkResult], None] | None = None,
                  counter_class=None, timing_source=None, cases: Sequence[Any] | None = None) -> BenchmarkResult:  # fmt: skip
    """Run ``bench``: timed on CUDA (:func:`run_timed`), else :func:`validate_on_cpu`.

    ``deadline`` (seconds since the epoch; default from ``$MMKERNELS_BENCH_DEADLINE``):
    cases not started by then are recorded as not timed. ``on_progress`` is called with
    the partial result after every case (so a killed run leaves its results written).
    ``timing_source``: time with it on ``device`` whatever the device (tests pass a
    deterministic one with ``device="cpu"``); default: CUDA events, on CUDA only.
    ``cases``: run these instead of ``bench.cases_for(quick)`` (a ``--shapes`` filter).
    """
    if cases is not None:
        bench = dataclasses.replace(bench, cases=tuple(cases), quick_cases=None)
    device = torch.device(device) if device is not None else torch.device("cuda" if common.cuda_available() else "cpu")
    if timing_source is None and (device.type != "cuda" or not common.cuda_available()):
        result = validate_on_cpu(bench, quick=quick, counter_class=counter_class, on_progress=on_progress)
        if on_progress and not result.rows:
            on_progress(result)  # no case: the folder still records the benchmark
        return result
    session = BenchSession(bench, device, quick=quick, roofline=roofline, counter_class=counter_class,
                           timing_source=timing_source)  # fmt: skip
    deadline = deadline if deadline is not None else deadline_from_env()
    return run_timed(session, deadline=deadline, on_progress=on_progress)


def run_timed(session: BenchSession, *, deadline: float | None = None,
              on_progress: Callable[[BenchmarkResult], None] | None = None) -> BenchmarkResult:  # fmt: skip
    """Check and time every (case, provider) cell of ``session.bench``, case by case."""
    bench = session.bench
    result = BenchmarkResult(
        benchmark=bench.name,
        description=bench.description,
        bytes_model=bench.bytes_model,
        timed=True,
        not_timed_reason="",
        rows=[],
        roofline=session.roofline,
        providers=_provider_descriptions(bench),
        graph_timing=bench.graph_timing,
        timing_source=session.timing_source.name,
    )
    for case in bench.cases_for(session.quick):
        if deadline is not None and time.time() > deadline:
            result.rows += _deadline_rows(session, case, f"{NOT_TIMED}: the step's time budget ran out")
            continue
        result.rows += [session.run_cell(case, provider) for provider in bench.providers]
        session.release()
        _fill_speedups(result.rows, bench.providers[0].name)
        if on_progress:
            on_progress(result)
    if on_progress:
        on_progress(result)
    return result
