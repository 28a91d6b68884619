"""Providers and benchmarks: :class:`Provider`, the output checks (:func:`compare_bitwise`,
:func:`compare_relative`), :class:`Benchmark`, the registry (:func:`register`,
:func:`registered`, :func:`discover`) and the rows of a run (:class:`ResultRow`,
:class:`BenchmarkResult`)."""

from __future__ import annotations

import dataclasses
import functools
import importlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from .common import error_text
from .roofline import Roofline


def _always_available() -> str | None:
    return None


@functools.lru_cache(maxsize=None)
def import_error(*modules: str) -> str | None:
    """Why a provider cannot run here: the first of ``modules`` that does not import (its
    exception, named), or None. For ``Provider.requires``: an optional baseline or an
    mmkernels op missing is a skip with this reason, not a failure."""
    for module in modules:
        try:
            importlib.import_module(module)
        except Exception as exc:
            return f"{module} not importable ({type(exc).__name__}: {exc})"
    return None


@dataclass(frozen=True)
class Provider:
    """One implementation under comparison.

    ``factory()`` builds the callable ``fn(inputs) -> output`` once per run.
    ``requires()`` returns why it cannot run here (an optional package missing, an op
    not available), or None. ``check_factory``: the callable used for the CPU check and
    for counting host syncs when it must differ from the timed one (e.g. ``torch.compile``
    with the eager backend, since inductor's CPU compile is slow); None: ``factory``.
    ``optional``: a baseline whose failure to build or run is a skip, not a failure.
    ``timed_backend``: for mmkernels ops, the backend a timed (CUDA) run must use
    ("triton"); a row whose calls fell back to another backend fails, naming the
    reasons, instead of timing the fallback under the kernel's name.
    ``bytes_moved(case)``: this provider's declared bytes when they differ from the
    benchmark's (e.g. it reads uint8 pixels where the others read float); None: the
    benchmark's.
    """

    name: str
    factory: Callable[[], Callable[[Any], Any]]
    requires: Callable[[], str | None] = _always_available
    check_factory: Callable[[], Callable[[Any], Any]] | None = None
    runs_on_cpu: bool = True
    optional: bool = False
    timed_backend: str | None = None
    notes: str = ""
    bytes_moved: Callable[[Any], int] | None = None

    def skip_reason(self, device_type: str = "cuda") -> str | None:
        try:
            reason = self.requires()
        except Exception as exc:
            reason = f"availability check raised {type(exc).__name__}: {exc}"
        if reason:
            return reason
        if device_type == "cpu" and not self.runs_on_cpu:
            return "runs on CUDA only"
        return None

    def build(self, *, for_check: bool = False) -> Callable[[Any], Any]:
        if for_check and self.check_factory is not None:
            return self.check_factory()
        return self.factory()


def compare_bitwise(out: torch.Tensor, expected: torch.Tensor) -> str | None:
    """None when ``out`` equals ``expected`` exactly (shape, dtype, values); else why not."""
    mismatch = _shape_mismatch(out, expected)
    if mismatch:
        return mismatch
    if not torch.equal(out, expected):
        wrong = int((out != expected).sum())
        return f"{wrong} of {out.numel()} elements differ from the expected output"
    return None


def _shape_mismatch(out, expected: torch.Tensor) -> str | None:
    if not isinstance(out, torch.Tensor):
        return f"returned {type(out).__name__}, expected a Tensor"
    if out.shape != expected.shape or out.dtype != expected.dtype:
        return f"returned {out.dtype}{tuple(out.shape)}, expected {expected.dtype}{tuple(expected.shape)}"
    return None


def compare_relative(out, expected: torch.Tensor, *, rel_tol: float, against: str = "") -> str | None:
    """None when ``out`` is finite and within ``rel_tol`` of ``expected`` in the norm-wise
    relative error ``||out - expected|| / ||expected||`` (float64); else why not."""
    mismatch = _shape_mismatch(out, expected)
    if mismatch:
        return mismatch
    o, e = out.double(), expected.double()
    if not bool(torch.isfinite(o).all()):
        return f"{int((~torch.isfinite(o)).sum())} of {o.numel()} elements are not finite"
    rel = float(torch.linalg.vector_norm(o - e) / max(float(torch.linalg.vector_norm(e)), 1e-30))
    if rel > rel_tol:
        return f"relative error {rel:.2e}{' ' + against if against else ''} (tolerance {rel_tol:.0e})"
    return None


@dataclass(frozen=True)
class Benchmark:
    """A kernel's benchmark: shapes, providers (the first is the baseline) and its model
    of work (declared bytes and FLOPs per shape).

    ``make_inputs(case, device, seed)`` returns one input set (deterministic per seed);
    ``expected_output(inputs)`` is an oracle independent of every provider;
    ``small_case(case)`` is the CPU-scale version of a case. Cases need ``.name`` and
    ``.params()``.
    """

    name: str
    description: str
    cases: Sequence[Any]
    providers: Sequence[Provider]
    make_inputs: Callable[[Any, torch.device, int], Any]
    expected_output: Callable[[Any], torch.Tensor]
    bytes_moved: Callable[[Any], int]
    flops: Callable[[Any], int] = lambda case: 0
    small_case: Callable[[Any], Any] = lambda case: case
    quick_cases: Sequence[Any] | None = None
    compare: Callable[[Any, torch.Tensor], str | None] = compare_bitwise
    bytes_model: str = ""
    # Also time every cell from CUDA graphs (:func:`time_graph`): the device time without
    # the host. For benchmarks whose providers never copy from host memory in a call
    # (a capture would bake in the copy's source buffer).
    graph_timing: bool = False

    def cases_for(self, quick: bool) -> Sequence[Any]:
        return self.quick_cases if quick and self.quick_cases is not None else self.cases


BENCH_DIR = Path(__file__).resolve().parent.parent
KINDS = ("kernel", "model")


@dataclass(frozen=True)
class Registration:
    """A registered benchmark: ``kind`` ("kernel" or "model"), ``size_param`` (the key
    of ``case.params()`` that is the main size: the speedup plot's x axis; "" plots
    against the declared bytes), ``size_label`` (the axis label) and the module that
    registered it."""

    benchmark: Benchmark
    kind: str = "kernel"
    size_param: str = ""
    size_label: str = ""
    module: str = ""

    @property
    def name(self) -> str:
        return self.benchmark.name


_REGISTRY: dict[str, Registration] = {}


def register(bench: Benchmark, *, kind: str = "kernel", size_param: str = "", size_label: str = "",
             module: str | None = None) -> Benchmark:  # fmt: skip
    """Register ``bench`` so ``python -m mmkernels.bench`` and the GPU suite run it; returns
    it. A ``benchmarks/bench_<name>.py`` module calls this once at import. Registering a
    second, different benchmark under a taken name raises (re-importing the same module
    re-registers it)."""
    if kind not in KINDS:
        raise ValueError(f"kind: expected one of {KINDS}, got {kind!r}")
    if not isinstance(bench, Benchmark):
        raise TypeError(f"bench: expected a harness.Benchmark, got {type(bench).__name__}")
    if module is None:
        import inspect

        caller = inspect.currentframe().f_back
        module = caller.f_globals.get("__name__", "") if caller else ""
    old = _REGISTRY.get(bench.name)
    if old is not None and old.module != module:
        raise ValueError(f"benchmark {bench.name!r} is already registered by {old.module}")
    _REGISTRY[bench.name] = Registration(bench, kind, size_param, size_label or size_param, module)
    return bench


def registered() -> dict[str, Registration]:
    """The benchmarks registered so far (name -> :class:`Registration`), in name order."""
    return dict(sorted(_REGISTRY.items()))


def discover(bench_dir: str | os.PathLike | None = None) -> tuple[dict[str, Registration], dict[str, str]]:
    """Import every ``bench_*.py`` of ``benchmarks/`` and return (the registry, the
    modules that failed to import -> why). A broken module costs its own benchmarks only."""
    errors: dict[str, str] = {}
    for path in sorted(Path(bench_dir or BENCH_DIR).glob("bench_*.py")):
        name = f"benchmarks.{path.stem}"
        try:
            importlib.import_module(name)
        except Exception as exc:  # record, go on
            errors[name] = error_text(exc)
    return registered(), errors


def _registration_fields(name: str) -> dict:
    reg = _REGISTRY.get(name)
    if reg is None:
        return {"kind": "kernel", "size_param": "", "size_label": ""}
    return {"kind": reg.kind, "size_param": reg.size_param, "size_label": reg.size_label}


@dataclass
class ResultRow:
    """One (case, provider) cell. ``status``: "ok" (timed, output correct), "not timed"
    (validated on the CPU), "skipped" (provider unavailable), "failed" (raised or wrong)."""

    benchmark: str
    case: str
    provider: str
    status: str
    reason: str = ""
    median_ms: float | None = None
    p20_ms: float | None = None
    p80_ms: float | None = None
    runs: int | None = None
    bytes: int = 0
    flops: int = 0
    gbps: float | None = None
    tflops: float | None = None
    pct_copy_bw: float | None = None
    pct_matmul: float | None = None
    speedup: float | None = None
    correct: bool | None = None
    host_syncs: int | None = None
    host_sync_ops: dict = field(default_factory=dict)
    host_syncs_device: str = ""
    backend: str = ""
    params: dict = field(default_factory=dict)
    pct_roofline: float | None = None
    peak_mem_mib: float | None = None  # peak memory of one call above what was allocated before it
    # Device-only time from CUDA graph replays (benchmarks with graph_timing), its speedup
    # over the baseline's and % roofline; graph_note: why a timed cell has none.
    graph_median_ms: float | None = None
    graph_p20_ms: float | None = None
    graph_p80_ms: float | None = None
    graph_speedup: float | None = None
    graph_pct_roofline: float | None = None
    graph_note: str = ""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class BenchmarkResult:
    """Rows of one benchmark run, and whether (and why not) they were timed."""

    benchmark: str
    description: str
    bytes_model: str
    timed: bool
    not_timed_reason: str
    rows: list[ResultRow]
    roofline: Roofline | None = None
    providers: list[dict] = field(default_factory=list)
    timing_source: str = ""  # "cuda-events" for measurements; anything else is not one
    graph_timing: bool = False

    def to_dict(self) -> dict:
        return {
            "benchmark": self.benchmark,
            "description": self.description,
            "bytes_model": self.bytes_model,
            "timed": self.timed,
            "not_timed_reason": self.not_timed_reason,
            "timing_source": self.timing_source,
            "graph_timing": self.graph_timing,
            **_registration_fields(self.benchmark),
            "providers": self.providers,
            "rows": [r.to_dict() for r in self.rows],
        }

    @property
    def failed_rows(self) -> list[ResultRow]:
        return [r for r in self.rows if r.status == "failed"]
