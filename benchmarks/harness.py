"""Benchmark harness: GPU-synchronized timing, providers, a roofline measured in the same
run, a device stamp, and a results folder (JSON, Markdown, PNG).

Timing (:func:`time_device`)
    CUDA events around every call, a 256 MB write between calls to flush the L2 cache,
    and the inputs rotated through several independently allocated copies, so neither
    cache nor allocator flatter a kernel. Like ``triton.testing.do_bench``: five calls
    estimate the cost, then warmup and repetitions are sized from ``warmup_ms`` /
    ``rep_ms`` (clamped to ``[min_runs, max_runs]``); the result is the median and the
    20th / 80th percentiles of the per-call times, in ms. Events measure the time the
    GPU spends from the start of a call to its end, so a host sync inside a call shows
    as the bubble it leaves on the GPU.

Device-only timing (:func:`time_graph`, benchmarks with ``graph_timing``)
    The same cells again with the host taken out: each input set's call captured once
    in a CUDA graph and replayed, timed as above (events, L2 flushed, inputs rotated).
    A replay costs the host a few microseconds whatever the op does in Python, so the
    GPU never waits for it: this is the kernel's time (launch gaps between an op's
    kernels included), the number to hold a kernel to its roofline when the eager
    median of a small call is the host's (``tools/gpu_probe.py`` says which). Only
    cells with no host sync are captured (a sync cannot be), and a replay on the
    seed-0 inputs must match the oracle, else the row says why it has no graph time.
    ``triton.testing.do_bench_cudagraph`` measures the same way, without the flush.

Providers (:class:`Provider`)
    One implementation under comparison: a name, a factory that builds the callable
    once (``torch.compile`` happens there or on the first call), and ``skip_reason()``
    that names why it cannot run here (a missing optional baseline such as flash-attn,
    xformers or vLLM, or an op not landed yet). Optional providers that fail to build or
    run are skipped by name; nothing a provider does stops the run.

Benchmarks (:class:`Benchmark`, :func:`run_benchmark`)
    A shape table, the providers (the first is the baseline for speedups), an input
    factory, an independent oracle for the expected output, and the bytes and FLOPs each
    shape declares. Every row reports median / p20 / p80 ms, GB/s and TFLOP/s from the
    declared bytes and FLOPs, the percentage of the copy bandwidth and bf16 matmul rate
    measured on the same device in the same run (:func:`measure_roofline`), the
    percentage of the roofline (:func:`roofline_floor_ms`: the larger of the two floors,
    bytes / bandwidth and FLOPs / matmul rate, over the median), the speedup over the
    baseline, whether the output matched, and the host syncs of one call. A provider
    that moves other bytes than the benchmark declares (uint8 pixels instead of float)
    declares its own (``Provider.bytes_moved``).

Host syncs
    Counted apart from timing, with ``mmkernels.testing.HostSyncCounter`` around one
    call on the scaled-down shape. They are counted on the device being benchmarked: on
    a machine without CUDA that is the CPU; on a GPU it is the GPU, because on the CPU
    mmkernels' ops run their PyTorch reference unless Triton's interpreter is on, and the
    reference's syncs are not the kernel's. Each row records where it counted and which
    mmkernels backend ran.

Without CUDA
    Nothing is timed (the interpreter's speed means nothing). :func:`validate_on_cpu`
    builds every shape, scales it down, runs every provider that can run on the CPU
    once against the oracle, counts host syncs, and the results folder says
    "not timed: no CUDA device" and why.

Timing sources (:class:`CudaEventTiming`)
    What a timed cell calls to time a provider and to measure its peak memory. The
    default is CUDA events (:func:`time_device`) and ``torch.cuda.max_memory_allocated``;
    tests inject a deterministic source so the whole pipeline (rows, speedups, summary,
    plots, compare) is proven without a GPU. Each benchmark result records its source's
    name, and only ``"cuda-events"`` results count as measurements
    (``tools/results_page.py`` shows nothing else).

Registration (:func:`register`, :func:`discover`)
    Each ``benchmarks/bench_*.py`` registers its :class:`Benchmark` once at import
    (``harness.register(BENCH, size_param="tokens")``): its kind (``"kernel"`` or
    ``"model"``) and the ``case.params()`` key that is its main size (the x axis of the
    speedup-vs-size plot). ``python -m mmkernels.bench`` and ``tools/gpu_suite.py`` find
    benchmarks only through :func:`discover`.

Results (:class:`ResultsFolder`)
    One folder: ``results.json`` (stamp, roofline, rows per benchmark, skipped
    baselines, suite steps), ``results.md`` (a summary table, the skipped baselines by
    name, a table per benchmark) and per benchmark three PNGs: ``<benchmark>.png``
    (GB/s per provider and shape), ``<benchmark>-speedup.png`` (speedup over the
    baseline against the main size) and ``<benchmark>-roofline.png`` (each cell's
    position under the roofline measured in the run). Several benchmarks write into the
    same folder; each update merges.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import importlib
import json
import math
import os
import platform
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

__all__ = [
    "Benchmark",
    "BenchmarkResult",
    "BenchSession",
    "CapturedCall",
    "CudaClock",
    "CudaEventTiming",
    "Registration",
    "DEADLINE_ENV",
    "NOT_TIMED",
    "Provider",
    "ResultRow",
    "ResultsFolder",
    "Roofline",
    "Timing",
    "TimingConfig",
    "compare_bitwise",
    "count_host_syncs",
    "cuda_available",
    "deadline_from_env",
    "device_key",
    "device_stamp",
    "discover",
    "git_commit",
    "gpu_stamp",
    "measure_roofline",
    "register",
    "registered",
    "roofline_floor_ms",
    "run_benchmark",
    "run_timed",
    "short_gpu_name",
    "capture_graphs",
    "time_device",
    "time_graph",
    "validate_on_cpu",
]

REPO_ROOT = Path(__file__).resolve().parent.parent
NOT_TIMED = "not timed"
NO_CUDA = "no CUDA device"
# Seconds since the epoch after which a benchmark stops timing new cells (set by the GPU
# suite so a step ends inside its budget with its results written).
DEADLINE_ENV = "MMKERNELS_BENCH_DEADLINE"
L2_FLUSH_BYTES = 256 * 2**20


def cuda_available() -> bool:
    return torch.cuda.is_available()


def deadline_from_env() -> float | None:
    value = os.environ.get(DEADLINE_ENV)
    return float(value) if value else None


# ======================================================================================
# Timing


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


# ======================================================================================
# Roofline measured on the device of the run


@dataclass(frozen=True)
class Roofline:
    """Device-to-device copy bandwidth and bf16 matmul rate, measured in this run.

    ``copy_gbps``: bytes read + written per second by a large ``copy_`` (GB = 1e9 B).
    ``matmul_tflops``: ``2 * n**3`` FLOPs per second of an ``n x n x n`` bf16
    ``torch.matmul``. Both from the median call. ``None`` with ``reason`` when not
    measured (no CUDA device).
    """

    copy_gbps: float | None
    matmul_tflops: float | None
    device_name: str
    copy_bytes: int = 0
    matmul_size: int = 0
    reason: str = ""

    @property
    def measured(self) -> bool:
        return self.copy_gbps is not None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "Roofline":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})

    @classmethod
    def not_measured(cls, reason: str) -> "Roofline":
        return cls(copy_gbps=None, matmul_tflops=None, device_name="", reason=reason)


def roofline_floor_ms(nbytes: int, flops: int, roofline: Roofline) -> float | None:
    """The least time a call moving ``nbytes`` and doing ``flops`` can take on the measured
    device: ``max(nbytes / copy bandwidth, flops / matmul rate)``, in ms. None when the
    roofline was not measured or neither is declared. ``100 * floor / median`` is a row's
    "% of roofline"."""
    if not roofline.measured:
        return None
    floors = []
    if nbytes:
        floors.append(nbytes / (roofline.copy_gbps * 1e9))
    if flops and roofline.matmul_tflops:
        floors.append(flops / (roofline.matmul_tflops * 1e12))
    return max(floors) * 1e3 if floors else None


def _copy_timing(device: torch.device, nbytes: int, clock, config: TimingConfig) -> Timing:
    src = torch.ones(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    return time_device(lambda s: dst.copy_(s), [src], clock=clock, config=config)


def _matmul_timing(device: torch.device, n: int, clock, config: TimingConfig) -> Timing:
    a = torch.randn(n, n, dtype=torch.bfloat16, device=device)
    b = torch.randn(n, n, dtype=torch.bfloat16, device=device)
    return time_device(lambda ab: torch.matmul(*ab), [(a, b)], clock=clock, config=config)


def measure_roofline(device: torch.device | str = "cuda", *, quick: bool = False) -> Roofline:
    """Measure the copy bandwidth and the bf16 matmul rate of ``device`` (CUDA)."""
    device = torch.device(device)
    if device.type != "cuda" or not cuda_available():
        return Roofline.not_measured(f"not measured: {NO_CUDA}")
    clock = CudaClock(device, flush_bytes=0)  # both working sets dwarf the L2
    config = TimingConfig(warmup_ms=20.0, rep_ms=80.0 if quick else 200.0, min_runs=5, max_runs=200, flush_l2=False)
    copy_elems, n = (256 if quick else 1024) * 2**20, 8192
    copy_t = _copy_timing(device, copy_elems, clock, config)
    mm_t = _matmul_timing(device, n, clock, config)
    torch.cuda.empty_cache()
    copy_bytes = 2 * copy_elems  # read + write
    return Roofline(
        copy_gbps=copy_bytes / (copy_t.median_ms * 1e-3) / 1e9,
        matmul_tflops=2 * n**3 / (mm_t.median_ms * 1e-3) / 1e12,
        device_name=torch.cuda.get_device_name(device),
        copy_bytes=copy_bytes,
        matmul_size=n,
    )


# ======================================================================================
# Device stamp


def _nvml_value(fn: Callable, *args, scale: float | None = None):
    try:
        value = fn(*args)
    except Exception as exc:  # NVMLError_NotSupported and friends: record, go on
        return f"unavailable: {exc}"
    if isinstance(value, bytes):
        value = value.decode()
    return value / scale if scale else value


def _nvml_handle(pynvml, device_index: int):
    """The NVML handle of CUDA device ``device_index`` (by PCI bus id when torch knows it,
    since CUDA_VISIBLE_DEVICES may renumber devices)."""
    if cuda_available():
        try:
            props = torch.cuda.get_device_properties(device_index)
        except Exception:
            return pynvml.nvmlDeviceGetHandleByIndex(device_index)
        bus = getattr(props, "pci_bus_id", None)
        domain = getattr(props, "pci_domain_id", 0)
        device = getattr(props, "pci_device_id", None)
        if bus is not None and device is not None:
            try:
                return pynvml.nvmlDeviceGetHandleByPciBusId(f"{domain:08X}:{bus:02X}:{device:02X}.0")
            except Exception:
                pass
    return pynvml.nvmlDeviceGetHandleByIndex(device_index)


def _torch_device_name(device_index: int) -> str:
    if not cuda_available():
        return "no CUDA device"
    try:
        return torch.cuda.get_device_name(device_index)
    except Exception as exc:  # a broken driver must not stop the stamp
        return f"unknown CUDA device ({type(exc).__name__}: {exc})"


def gpu_stamp(device_index: int = 0) -> dict:
    """Name, driver, clocks and power limit of the GPU via nvidia-ml-py (``pynvml``).

    Always returns a dict with ``name`` and ``nvml`` ("ok" or why not).
    """
    fallback_name = _torch_device_name(device_index)
    try:
        import pynvml
    except ImportError as exc:
        return {"name": fallback_name, "nvml": f"unavailable: nvidia-ml-py not installed ({exc})"}
    try:
        pynvml.nvmlInit()
    except Exception as exc:
        return {"name": fallback_name, "nvml": f"unavailable: {exc}"}
    try:
        handle = _nvml_handle(pynvml, device_index)
        stamp = {
            "name": _nvml_value(pynvml.nvmlDeviceGetName, handle),
            "nvml": "ok",
            "driver": _nvml_value(pynvml.nvmlSystemGetDriverVersion),
            "uuid": _nvml_value(pynvml.nvmlDeviceGetUUID, handle),
            "sm_clock_mhz": _nvml_value(pynvml.nvmlDeviceGetClockInfo, handle, pynvml.NVML_CLOCK_SM),
            "memory_clock_mhz": _nvml_value(pynvml.nvmlDeviceGetClockInfo, handle, pynvml.NVML_CLOCK_MEM),
            "max_sm_clock_mhz": _nvml_value(pynvml.nvmlDeviceGetMaxClockInfo, handle, pynvml.NVML_CLOCK_SM),
            "max_memory_clock_mhz": _nvml_value(pynvml.nvmlDeviceGetMaxClockInfo, handle, pynvml.NVML_CLOCK_MEM),
            "power_limit_w": _nvml_value(pynvml.nvmlDeviceGetPowerManagementLimit, handle, scale=1000.0),
            "enforced_power_limit_w": _nvml_value(pynvml.nvmlDeviceGetEnforcedPowerLimit, handle, scale=1000.0),
            "temperature_c": _nvml_value(pynvml.nvmlDeviceGetTemperature, handle, pynvml.NVML_TEMPERATURE_GPU),
        }
        memory = _nvml_value(pynvml.nvmlDeviceGetMemoryInfo, handle)
        stamp["memory_total_gib"] = memory.total / 2**30 if hasattr(memory, "total") else memory
    except Exception as exc:
        return {"name": fallback_name, "nvml": f"unavailable: {exc}"}
    finally:
        try:
            pynvml.nvmlShutdown()
        except Exception:
            pass
    if cuda_available():
        try:
            stamp["compute_capability"] = ".".join(map(str, torch.cuda.get_device_capability(device_index)))
        except Exception as exc:
            stamp["compute_capability"] = f"unavailable: {exc}"
    return stamp


def git_commit() -> str:
    """``git rev-parse HEAD`` of the repository ("unknown" outside a git checkout).

    ``MMKERNELS_GIT_COMMIT`` overrides it (for copies of the tree without ``.git``).
    """
    override = os.environ.get("MMKERNELS_GIT_COMMIT")
    if override:
        return override
    try:
        out = subprocess.run(
            ["git", "-C", str(REPO_ROOT), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else "unknown"


def _package_version(name: str) -> str:
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"


def device_stamp(device_index: int = 0) -> dict:
    """Who measured: GPU (via NVML), versions, git commit, date, host."""
    return {
        "gpu": gpu_stamp(device_index),
        "cuda_available": cuda_available(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda or "none",
        "triton": _package_version("triton"),
        "transformers": _package_version("transformers"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "git_commit": git_commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "hostname": socket.gethostname(),
    }


def short_gpu_name(stamp: dict) -> str:
    """A folder-friendly GPU name: "NVIDIA H100 80GB HBM3" -> "H100"; "nogpu" without one."""
    if not stamp.get("cuda_available"):
        return "nogpu"
    name = str(stamp.get("gpu", {}).get("name", ""))
    words = [w for w in name.replace("NVIDIA", "").split() if w]
    token = "".join(c for c in (words[0] if words else "") if c.isalnum() or c in "-_")
    return token or "gpu"


def device_key(stamp: dict) -> str:
    """What two runs must share to be compared: the GPU's full name (NVML, or torch's
    when NVML was unavailable) and its memory size when known ("NVIDIA H100 80GB HBM3");
    "no CUDA device" for a run without one. Driver, clocks and versions may differ (they
    are reported beside a comparison, not refused)."""
    if not stamp.get("cuda_available"):
        return "no CUDA device"
    gpu = stamp.get("gpu", {})
    key = str(gpu.get("name", "unknown")).strip()
    memory = gpu.get("memory_total_gib")
    if isinstance(memory, (int, float)):
        key += f" ({memory:.0f} GiB)"
    return key


# ======================================================================================
# Providers and benchmarks


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


BENCH_DIR = Path(__file__).resolve().parent
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
            errors[name] = _error_text(exc)
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


def _provider_descriptions(bench: Benchmark) -> list[dict]:
    return [{"name": p.name, "optional": p.optional, "notes": p.notes} for p in bench.providers]


# ======================================================================================
# Host syncs


def _host_sync_counter_class():
    try:
        from mmkernels.testing import HostSyncCounter
    except Exception as exc:  # not landed, or broken: rows say so
        return None, f"mmkernels.testing.HostSyncCounter unavailable ({type(exc).__name__}: {exc})"
    return HostSyncCounter, ""


def _decision_mark():
    """A mark of the newest recorded mmkernels backend decision (its sequence number:
    decisions are cached, so the same object is recorded call after call)."""
    try:
        from mmkernels.backend import decision_mark
    except Exception:
        return None
    return decision_mark()


def _mmkernels_decisions_since(mark) -> str:
    """The distinct backend decisions recorded after ``mark``, joined by "; "."""
    if mark is None:
        return ""
    from mmkernels.backend import decisions_since

    return "; ".join(dict.fromkeys(str(d) for d in decisions_since(mark)))


def _unexpected_backends(decisions: str, expected: str) -> list[str]:
    """The recorded decisions (``"op: backend (reasons)"``) whose backend is not ``expected``."""
    return [d for d in decisions.split("; ") if d and d.split(": ", 1)[-1].split(" (", 1)[0] != expected]


@dataclass(frozen=True)
class SyncCount:
    count: int | None
    ops: dict
    note: str = ""


def count_host_syncs(fn: Callable[[Any], Any], inputs: Any, counter_class=None) -> SyncCount:
    """Host syncs of one ``fn(inputs)`` call, with ``HostSyncCounter`` (or ``counter_class``:
    a context manager with ``.count`` and ``.ops``)."""
    note = ""
    if counter_class is None:
        counter_class, note = _host_sync_counter_class()
        if counter_class is None:
            return SyncCount(None, {}, note)
    try:
        with counter_class() as counter:
            fn(inputs)
    except Exception as exc:
        return SyncCount(None, {}, f"counting raised {type(exc).__name__}: {exc}")
    return SyncCount(int(counter.count), dict(counter.ops))


# ======================================================================================
# Running a benchmark


def _error_text(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}"
    return text if len(text) <= 400 else text[:397] + "..."


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
        if session.device.type != "cuda" or not cuda_available():
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
        row.reason = f"{what}: {_error_text(exc)}"
        return row

    def count_syncs(self, row: ResultRow, provider: Provider, case) -> None:
        """Host syncs of one call on ``case``, on this session's device (the CPU check
        passes the scaled-down case; on CUDA the full case reuses compiled kernels)."""
        try:
            fn = self.built(provider, for_check=True)
            inputs = self.bench.make_inputs(case, self.device, 0)
        except Exception as exc:
            row.host_sync_ops = {}
            row.reason = (row.reason + "; " if row.reason else "") + f"host syncs not counted: {_error_text(exc)}"
            return
        mark = _decision_mark()
        synced = count_host_syncs(fn, inputs, self.counter_class)
        row.host_syncs, row.host_sync_ops, row.host_syncs_device = synced.count, synced.ops, self.device.type
        row.backend = row.backend or _mmkernels_decisions_since(mark)
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
        mark = _decision_mark()
        try:
            with torch.inference_mode():
                out = fn(self.bench.make_inputs(case, self.device, 0))
                mismatch = self.bench.compare(out, state["expected"])
        except Exception as exc:
            return self._skip_or_fail(row, provider, "first call raised", exc)
        row.backend = _mmkernels_decisions_since(mark)
        del out
        wrong_backend = _unexpected_backends(row.backend, provider.timed_backend) if provider.timed_backend else []
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
            row.reason = (row.reason + "; " if row.reason else "") + f"peak memory not measured: {_error_text(exc)}"
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
            row.graph_note = f"not captured: {_error_text(exc)}"
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
        mark = _decision_mark()
        try:
            expected = self.bench.expected_output(self.bench.make_inputs(small, self.device, 0))
            out = fn(self.bench.make_inputs(small, self.device, 0))
            mismatch = self.bench.compare(out, expected)
        except Exception as exc:
            return self._skip_or_fail(row, provider, "CPU check raised", exc)
        row.backend = _mmkernels_decisions_since(mark)
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
    device = torch.device(device) if device is not None else torch.device("cuda" if cuda_available() else "cpu")
    if timing_source is None and (device.type != "cuda" or not cuda_available()):
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


# ======================================================================================
# Results folder


def _fmt(value, spec: str, missing: str = "") -> str:
    return missing if value is None else format(value, spec)


def _stamp_line(stamp: dict) -> str:
    gpu = stamp.get("gpu", {})
    if gpu.get("nvml") == "ok":
        gpu_text = (
            f"{gpu.get('name')} (driver {gpu.get('driver')}, SM {gpu.get('sm_clock_mhz')}/"
            f"{gpu.get('max_sm_clock_mhz')} MHz, memory {gpu.get('memory_clock_mhz')}/"
            f"{gpu.get('max_memory_clock_mhz')} MHz, power limit {gpu.get('power_limit_w')} W)"
        )
    else:
        gpu_text = f"{gpu.get('name', 'unknown')} (NVML {gpu.get('nvml', 'not queried')})"
    return (
        f"- GPU: {gpu_text}\n"
        f"- torch {stamp.get('torch')} (CUDA {stamp.get('torch_cuda')}), triton {stamp.get('triton')}, "
        f"transformers {stamp.get('transformers')}, Python {stamp.get('python')}\n"
        f"- commit `{stamp.get('git_commit')}`, {stamp.get('date')}, host {stamp.get('hostname')}\n"
    )


def _roofline_line(roof: dict | None) -> str:
    if not roof:
        return "- Roofline: not measured\n"
    if roof.get("copy_gbps") is None:
        return f"- Roofline: {roof.get('reason') or 'not measured'}\n"
    return (
        f"- Roofline measured in this run: copy {roof['copy_gbps']:.0f} GB/s "
        f"({roof['copy_bytes'] / 2**30:.1f} GiB moved per copy), bf16 matmul "
        f"{roof['matmul_tflops']:.0f} TFLOP/s ({roof['matmul_size']}^3); % roofline = "
        "max(bytes / copy BW, FLOPs / matmul rate) / median\n"
    )


def _table_header(graph: bool) -> str:
    """The per-benchmark table's header; ``graph``: with the CUDA-graph columns."""
    extra = " graph ms | graph speedup | graph % roofline |" if graph else ""
    return (
        "| case | provider | status | median ms | p20-p80 ms | GB/s | % copy BW | TFLOP/s | % matmul "
        f"| % roofline | speedup |{extra} peak MiB | host syncs | correct | note |\n"
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|" + "---:|" * (3 * graph) + "---:|---:|---|---|\n"
    )


def _md_cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _row_line(r: dict, graph: bool = False) -> str:
    spread = "" if r.get("p20_ms") is None else f"{r['p20_ms']:.4f}-{r['p80_ms']:.4f}"
    syncs = "" if r.get("host_syncs") is None else f"{r['host_syncs']} ({r.get('host_syncs_device', '')})"
    correct = {True: "yes", False: "NO", None: ""}[r.get("correct")]
    note = r.get("reason", "")
    if r.get("status") == NOT_TIMED and note.startswith(NOT_TIMED):
        note = ""  # said once above the table
    if graph and r.get("graph_note"):
        note = f"{note}; graph: {r['graph_note']}" if note else f"graph: {r['graph_note']}"
    graph_cells = [
        _fmt(r.get("graph_median_ms"), ".4f"), _fmt(r.get("graph_speedup"), ".2f"),
        _fmt(r.get("graph_pct_roofline"), ".1f"),
    ] if graph else []  # fmt: skip
    cells = [
        r["case"], r["provider"], r["status"], _fmt(r.get("median_ms"), ".4f"), spread,
        _fmt(r.get("gbps"), ".1f"), _fmt(r.get("pct_copy_bw"), ".1f"), _fmt(r.get("tflops"), ".2f"),
        _fmt(r.get("pct_matmul"), ".1f"), _fmt(r.get("pct_roofline"), ".1f"), _fmt(r.get("speedup"), ".2f", ""),
        *graph_cells, _fmt(r.get("peak_mem_mib"), ".1f"), syncs, correct, note,
    ]  # fmt: skip
    return "| " + " | ".join(_md_cell(c) for c in cells) + " |\n"


# --------------------------------------------------------------------------------------
# Summaries (pure functions of results.json content: also used by mmkernels.bench and
# tools/results_page.py)


def row_size(bench: dict, row: dict) -> float | None:
    """A row's main size: ``params[size_param]`` of its benchmark, else its declared bytes."""
    key = bench.get("size_param") or ""
    value = row.get("params", {}).get(key) if key else row.get("bytes")
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0 else None


def size_label(bench: dict) -> str:
    return bench.get("size_label") or bench.get("size_param") or "declared bytes"


def _geomean(values: Sequence[float]) -> float | None:
    values = [v for v in values if v and v > 0]
    return math.exp(sum(math.log(v) for v in values) / len(values)) if values else None


def _benchmarks_in_order(data: dict) -> list[tuple[str, dict]]:
    """Kernels first, then models; by name within each."""
    items = data.get("benchmarks", {}).items()
    return sorted(items, key=lambda kv: (kv[1].get("kind", "kernel") != "kernel", kv[0]))


def summarize(data: dict) -> list[dict]:
    """One entry per (benchmark, provider): timed cells, speedup over the benchmark's
    baseline (geometric mean, min, max, and at the largest size timed), the best % of
    roofline, the peak memory at the largest size, and how many cells were skipped or
    failed."""
    out = []
    for name, bench in _benchmarks_in_order(data):
        providers = [p["name"] for p in bench.get("providers", [])] or list(
            dict.fromkeys(r["provider"] for r in bench.get("rows", []))
        )
        baseline = providers[0] if providers else ""
        for provider in providers:
            rows = [r for r in bench.get("rows", []) if r["provider"] == provider]
            ok = [r for r in rows if r.get("status") == "ok" and r.get("median_ms") is not None]
            speedups = [r["speedup"] for r in ok if r.get("speedup")]
            graph_speedups = [r["graph_speedup"] for r in ok if r.get("graph_speedup")]
            largest = max(ok, key=lambda r: (row_size(bench, r) or 0.0, r.get("bytes", 0)), default=None)
            pct = [r["pct_roofline"] for r in ok if r.get("pct_roofline") is not None]
            out.append({
                "benchmark": name, "kind": bench.get("kind", "kernel"), "provider": provider,
                "baseline": baseline, "cells": len(rows), "ok": len(ok),
                "skipped": sum(r.get("status") == "skipped" for r in rows),
                "failed": sum(r.get("status") == "failed" for r in rows),
                "not_timed": sum(r.get("status") == NOT_TIMED for r in rows),
                "speedup_geomean": _geomean(speedups),
                "speedup_min": min(speedups) if speedups else None,
                "speedup_max": max(speedups) if speedups else None,
                "largest_case": largest["case"] if largest else "",
                "speedup_at_largest": largest.get("speedup") if largest else None,
                "median_ms_at_largest": largest.get("median_ms") if largest else None,
                "peak_mem_mib_at_largest": largest.get("peak_mem_mib") if largest else None,
                "best_pct_roofline": max(pct) if pct else None,
                "graph_cells": len(graph_speedups),
                "graph_speedup_geomean": _geomean(graph_speedups),
            })  # fmt: skip
    return out


def skipped_baselines(data: dict) -> list[dict]:
    """Every (benchmark, provider) with skipped cells, by name, with the distinct reasons."""
    out = []
    for name, bench in _benchmarks_in_order(data):
        by_provider: dict[str, list[dict]] = {}
        for r in bench.get("rows", []):
            if r.get("status") == "skipped":
                by_provider.setdefault(r["provider"], []).append(r)
        for provider, rows in by_provider.items():
            reasons = list(dict.fromkeys(r.get("reason", "") for r in rows))
            out.append({"benchmark": name, "provider": provider, "cells": len(rows), "reasons": reasons})
    return out


def _summary_markdown(data: dict) -> str:
    summary = summarize(data)
    if not summary:
        return ""
    out = [
        "\n## Summary\n\nSpeedup = the baseline's median / the provider's median, per cell (> 1: faster than "
        "the baseline); geometric mean over the cells timed. \"At largest\": the timed cell of the largest "
        "main size. Graph speedup: the same from CUDA-graph replays (device time only), over the cells "
        "with one.\n\n",
        "| benchmark | kind | provider | baseline | timed cells | speedup (geomean) | min-max | largest case "
        "| median ms there | speedup there | peak MiB there | best % roofline | graph speedup (geomean) "
        "| skipped | failed |\n",
        "|---|---|---|---|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|\n",
    ]
    for s in summary:
        spread = "" if s["speedup_min"] is None else f"{s['speedup_min']:.2f}-{s['speedup_max']:.2f}"
        cells = [
            s["benchmark"], s["kind"], s["provider"], s["baseline"], f"{s['ok']}/{s['cells']}",
            _fmt(s["speedup_geomean"], ".2f"), spread, s["largest_case"], _fmt(s["median_ms_at_largest"], ".4f"),
            _fmt(s["speedup_at_largest"], ".2f"), _fmt(s["peak_mem_mib_at_largest"], ".1f"),
            _fmt(s["best_pct_roofline"], ".1f"),
            "" if not s["graph_cells"] else f"{s['graph_speedup_geomean']:.2f} ({s['graph_cells']})",
            s["skipped"], s["failed"],
        ]  # fmt: skip
        out.append("| " + " | ".join(_md_cell(c) for c in cells) + " |\n")
    skipped = skipped_baselines(data)
    if skipped:
        out.append("\n## Skipped baselines\n\n| benchmark | provider | cells | why |\n|---|---|---:|---|\n")
        for s in skipped:
            out.append(f"| {s['benchmark']} | {_md_cell(s['provider'])} | {s['cells']} | "
                       f"{_md_cell('; '.join(s['reasons']))} |\n")  # fmt: skip
    return "".join(out)


def _timing_source_line(data: dict) -> str:
    sources = sorted({b.get("timing_source") for b in data.get("benchmarks", {}).values() if b.get("timing_source")})
    if not sources:
        return ""
    if sources == [CUDA_EVENTS]:
        return "- Timing: CUDA events (median of many calls, L2 flushed between calls, inputs rotated)\n"
    return f"- **Timing source: {', '.join(sources)}. These numbers are not measurements of a GPU.**\n"


def render_markdown(data: dict) -> str:
    """``results.md`` from the ``results.json`` content."""
    out = ["# mmkernels benchmark results\n\n"]
    if not data.get("timed", False):
        out.append(f"**{data.get('not_timed_reason') or NOT_TIMED}**\n\n")
    out.append(_stamp_line(data.get("stamp", {})))
    out.append(_roofline_line(data.get("roofline")))
    out.append(_timing_source_line(data))
    out.append(_summary_markdown(data))
    for name, bench in _benchmarks_in_order(data):
        out.append(f"\n## {name}\n\n{bench.get('description', '')}\n\n")
        if bench.get("bytes_model"):
            out.append(f"Bytes counted for GB/s: {bench['bytes_model']}\n\n")
        if not bench.get("timed"):
            out.append(f"**{bench.get('not_timed_reason') or NOT_TIMED}**\n\n")
        for p in bench.get("providers", []):
            if p.get("notes"):
                out.append(f"- `{p['name']}`: {p['notes']}\n")
        graph = bool(bench.get("graph_timing"))
        if graph:
            out.append(
                "\nGraph columns: the device time alone, each call replayed from a CUDA graph (no host "
                "work, so no wait for it); the eager median includes whatever the GPU waited for the host.\n"
            )
        out.append("\n" + _table_header(graph))
        out.extend(_row_line(r, graph) for r in bench.get("rows", []))
        for key, title in (("plot", "effective bandwidth"), ("speedup_plot", "speedup vs size"),
                           ("roofline_plot", "roofline position")):  # fmt: skip
            plot = bench.get(key, "")
            if plot:
                out.append(f"\n![{name}: {title}]({plot})\n" if plot.endswith(".png") else f"\n{plot}\n")
    suite = data.get("suite")
    if suite:
        out.append("\n## GPU suite steps\n\n| step | status | seconds | budget s | detail |\n|---|---|---:|---:|---|\n")
        for step in suite.get("steps", []):
            out.append(
                f"| {step['name']} | {step['status']} | {step['seconds']:.1f} | {step['budget_s']:.0f} "
                f"| {_md_cell(step.get('detail', ''))} |\n"
            )
    return "".join(out)


# --------------------------------------------------------------------------------------
# Plots


def _pyplot():
    try:
        import matplotlib
    except ImportError as exc:
        return None, f"plot not written: matplotlib not installed ({exc})"
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt, ""


def _empty_figure(plt, title: str, text: str):
    fig, ax = plt.subplots(figsize=(8.0, 2.5))
    ax.axis("off")
    ax.text(0.5, 0.5, text, ha="center", va="center", wrap=True)
    ax.set_title(title)
    return fig


def _save(fig, plt, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_benchmark(bench: dict, roofline: dict | None, path: Path) -> str | None:
    """Bars of GB/s per provider, grouped by case; the measured copy bandwidth as a line.
    Without timings the figure says why. Returns None, or why no plot was written."""
    plt, problem = _pyplot()
    if plt is None:
        return problem
    metric, ylabel, what = "gbps", "GB/s (declared bytes / median time)", "effective bandwidth"
    rows = [r for r in bench.get("rows", []) if r.get(metric) is not None]
    if not rows and any(r.get("median_ms") is not None for r in bench.get("rows", [])):
        # no declared bytes (a model-level benchmark, a bus-speed copy): the latency itself
        metric, ylabel, what = "median_ms", "median latency, ms", "median latency"
        rows = [r for r in bench.get("rows", []) if r.get(metric) is not None]
    cases = list(dict.fromkeys(r["case"] for r in bench.get("rows", [])))
    providers = [p["name"] for p in bench.get("providers", [])] or list(dict.fromkeys(r["provider"] for r in rows))
    title = f"{bench.get('benchmark', '')}: {what}"
    if not rows:
        fig = _empty_figure(plt, title, f"{bench.get('benchmark', '')}\n{bench.get('not_timed_reason') or NOT_TIMED}")
        _save(fig, plt, path)
        return None
    fig, ax = plt.subplots(figsize=(max(8.0, 1.2 * len(cases) + 3), 5.0))
    width = 0.8 / max(len(providers), 1)
    by_cell = {(r["case"], r["provider"]): r[metric] for r in rows}
    for j, provider in enumerate(providers):
        xs = [i + (j - (len(providers) - 1) / 2) * width for i in range(len(cases))]
        ys = [by_cell.get((c, provider), 0.0) for c in cases]
        ax.bar(xs, ys, width=width, label=provider)
    if metric == "gbps" and roofline and roofline.get("copy_gbps"):
        ax.axhline(roofline["copy_gbps"], color="black", linestyle="--", linewidth=1, label="measured copy BW")
    ax.set_xticks(range(len(cases)))
    ax.set_xticklabels(cases, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=8)
    ax.set_title(title)
    _save(fig, plt, path)
    return None


def plot_speedup(bench: dict, path: Path) -> str | None:
    """Speedup over the baseline against the benchmark's main size (log x), a line per
    provider through its timed cells in size order; the baseline as a dashed line at 1."""
    plt, problem = _pyplot()
    if plt is None:
        return problem
    name = bench.get("benchmark", "")
    title = f"{name}: speedup vs {size_label(bench)}"
    points: dict[str, list[tuple[float, float]]] = {}
    for r in bench.get("rows", []):
        size = row_size(bench, r)
        if r.get("status") == "ok" and r.get("speedup") and size:
            points.setdefault(r["provider"], []).append((size, r["speedup"]))
    if not points:
        fig = _empty_figure(plt, title, f"{name}\n{bench.get('not_timed_reason') or 'no timed cells'}")
        _save(fig, plt, path)
        return None
    providers = [p["name"] for p in bench.get("providers", [])]
    fig, ax = plt.subplots(figsize=(8.0, 5.0))
    for provider in [p for p in providers if p in points] + [p for p in points if p not in providers]:
        xy = sorted(points[provider])
        ax.plot([x for x, _ in xy], [y for _, y in xy], marker="o", label=provider)
    ax.axhline(1.0, color="black", linestyle="--", linewidth=1)
    ax.set_xscale("log")
    ax.set_yscale("log")
    from matplotlib.ticker import FormatStrFormatter

    ax.yaxis.set_major_formatter(FormatStrFormatter("%g"))
    ax.yaxis.set_minor_formatter(FormatStrFormatter("%g"))
    ax.set_xlabel(size_label(bench) + " (log)")
    ax.set_ylabel(f"speedup over {providers[0] if providers else 'the baseline'} (log)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title)
    _save(fig, plt, path)
    return None


def plot_roofline(bench: dict, roofline: dict | None, path: Path) -> str | None:
    """Each timed cell under the roofline measured in the run. With declared FLOPs: a
    classic roofline (TFLOP/s against FLOPs per byte, log-log; the roof is
    min(matmul rate, copy BW x intensity)); without (a pure data-movement kernel):
    GB/s against the bytes moved, under the measured copy bandwidth."""
    plt, problem = _pyplot()
    if plt is None:
        return problem
    name = bench.get("benchmark", "")
    rows = [r for r in bench.get("rows", []) if r.get("status") == "ok" and r.get("median_ms")]
    roof = roofline or {}
    measured = roof.get("copy_gbps") is not None
    title = f"{name}: roofline position"
    if rows and not any(r.get("bytes") or r.get("flops") for r in rows):
        fig = _empty_figure(plt, title, f"{name}\nno declared bytes or FLOPs: no roofline")
        _save(fig, plt, path)
        return None
    if not rows or not measured:
        why = bench.get("not_timed_reason") or ("" if measured else roof.get("reason") or "roofline not measured")
        fig = _empty_figure(plt, title, f"{name}\n{why or 'no timed cells'}")
        _save(fig, plt, path)
        return None
    providers = list(dict.fromkeys([p["name"] for p in bench.get("providers", [])] + [r["provider"] for r in rows]))
    fig, ax = plt.subplots(figsize=(8.0, 5.0))
    with_flops = any(r.get("flops") for r in rows)
    if with_flops:
        xs_all = [r["flops"] / r["bytes"] for r in rows if r.get("flops") and r.get("bytes")]
        knee = roof["matmul_tflops"] * 1e3 / roof["copy_gbps"]  # FLOPs per byte where the roof turns flat
        lo, hi = min(min(xs_all), knee) / 4, max(max(xs_all), knee) * 4
        grid = [lo * (hi / lo) ** (i / 200) for i in range(201)]
        ax.plot(grid, [min(roof["matmul_tflops"], roof["copy_gbps"] * x / 1e3) for x in grid], color="black",
                linewidth=1.5, label="measured roof")  # fmt: skip
        for provider in providers:
            pts = [(r["flops"] / r["bytes"], r["tflops"]) for r in rows
                   if r["provider"] == provider and r.get("flops") and r.get("bytes") and r.get("tflops")]  # fmt: skip
            if pts:
                ax.scatter([x for x, _ in pts], [y for _, y in pts], label=provider, s=30)
        ax.set_xlabel("arithmetic intensity (declared FLOPs / declared bytes, log)")
        ax.set_ylabel("TFLOP/s (log)")
    else:
        ax.axhline(roof["copy_gbps"], color="black", linewidth=1.5, label="measured copy BW")
        for provider in providers:
            pts = [(r["bytes"], r["gbps"]) for r in rows if r["provider"] == provider and r.get("gbps")]
            if pts:
                ax.scatter([x for x, _ in pts], [y for _, y in pts], label=provider, s=30)
        ax.set_xlabel("declared bytes moved (log)")
        ax.set_ylabel("GB/s (log)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title)
    _save(fig, plt, path)
    return None


def _declares_work(bench: dict) -> bool:
    """Whether a benchmark's cells declare bytes or FLOPs (model benchmarks and raw_pixels'
    bus-speed copies do not): only then has it a roofline plot."""
    rows = bench.get("rows", [])
    if bench.get("kind") == "model":
        return False
    return not rows or any(r.get("bytes") or r.get("flops") for r in rows)


PLOTS = (
    ("plot", "{name}.png", lambda bench, roof, path: plot_benchmark(bench, roof, path)),
    ("speedup_plot", "{name}-speedup.png", lambda bench, roof, path: plot_speedup(bench, path)),
    ("roofline_plot", "{name}-roofline.png", lambda bench, roof, path: plot_roofline(bench, roof, path)),
)


def _file_stem(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


class ResultsFolder:
    """One results folder: ``results.json``, ``results.md`` and per benchmark
    ``<benchmark>.png``, ``<benchmark>-speedup.png``, ``<benchmark>-roofline.png``.

    Every update re-reads ``results.json``, merges, and rewrites the JSON and the
    Markdown (and the benchmark's plots unless ``plot=False``), so several benchmarks
    (run in separate processes) share one folder.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    @property
    def json_path(self) -> Path:
        return self.path / "results.json"

    @property
    def md_path(self) -> Path:
        return self.path / "results.md"

    def load(self) -> dict:
        if self.json_path.exists():
            return json.loads(self.json_path.read_text())
        return {"timed": False, "not_timed_reason": "", "benchmarks": {}}

    def update(self, *, stamp: dict | None = None, roofline: Roofline | None = None,
               benchmark: BenchmarkResult | None = None, suite: dict | None = None, plot: bool = True) -> dict:  # fmt: skip
        """Merge what is given into the folder; a stamp is taken if the folder has none."""
        self.path.mkdir(parents=True, exist_ok=True)
        data = self.load()
        if stamp is not None or "stamp" not in data:
            data["stamp"] = stamp if stamp is not None else device_stamp()
        if roofline is not None:
            data["roofline"] = roofline.to_dict()
        elif benchmark is not None and benchmark.roofline is not None and not (data.get("roofline") or {}).get("copy_gbps"):
            data["roofline"] = benchmark.roofline.to_dict()
        if benchmark is not None:
            data.setdefault("benchmarks", {})[benchmark.benchmark] = benchmark.to_dict()
        if suite is not None:
            data["suite"] = suite
        self._set_timed(data)
        self._write(data, [benchmark.benchmark] if benchmark is not None and plot else [])
        return data

    def render(self) -> dict:
        """Rewrite every benchmark's plots, the JSON and the Markdown from ``results.json``."""
        data = self.load()
        self._set_timed(data)
        self._write(data, list(data.get("benchmarks", {})))
        return data

    @staticmethod
    def _set_timed(data: dict) -> None:
        benches = list(data.get("benchmarks", {}).values())
        data["timed"] = bool(benches) and all(b.get("timed") for b in benches)
        reasons = list(dict.fromkeys(b["not_timed_reason"] for b in benches if not b.get("timed")))
        if not benches:
            reasons = [data.get("not_timed_reason") or f"{NOT_TIMED}: no benchmark has run yet"]
        data["not_timed_reason"] = "; ".join(r for r in reasons if r)
        data["timing_sources"] = sorted({b.get("timing_source") for b in benches if b.get("timing_source")})
        data["skipped_baselines"] = skipped_baselines(data)

    def _write(self, data: dict, plotted: Sequence[str]) -> None:
        for name in plotted:
            bench = data["benchmarks"][name]
            for key, pattern, draw in PLOTS:
                if key == "roofline_plot" and not _declares_work(bench):
                    continue  # no declared bytes or FLOPs: latency, speedup and memory only
                filename = pattern.format(name=_file_stem(name))
                problem = draw(bench, data.get("roofline"), self.path / filename)
                bench[key] = problem or filename
        tmp = self.json_path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")
        tmp.replace(self.json_path)
        self.md_path.write_text(render_markdown(data))


def roofline_from_folder(out_dir: str | os.PathLike, device: torch.device | str = "cuda") -> Roofline | None:
    """The roofline already measured into ``out_dir`` in this run on this device, if any."""
    data = ResultsFolder(out_dir).load()
    roof = data.get("roofline")
    if not roof or roof.get("copy_gbps") is None or not cuda_available():
        return None
    if roof.get("device_name") != torch.cuda.get_device_name(torch.device(device)):
        return None
    return Roofline.from_dict(roof)


def run_into_folder(bench: Benchmark, out_dir: str | os.PathLike, *, quick: bool = False,
                    counter_class=None, on_case: Callable[[BenchmarkResult], None] | None = None,
                    **kwargs) -> BenchmarkResult:  # fmt: skip
    """What each ``benchmarks/bench_*.py`` module's ``run()`` does: run ``bench`` (timed
    on CUDA, validated on the CPU otherwise) and merge its rows into ``out_dir`` after
    every case (JSON and Markdown; the plots once, at the end). Reuses a roofline the
    folder already holds for this device. ``on_case`` also gets the partial result after
    every case (a progress bar); ``kwargs`` go to :func:`run_benchmark`."""
    folder = ResultsFolder(out_dir)
    if kwargs.get("roofline") is None and kwargs.get("timing_source") is None:
        kwargs["roofline"] = roofline_from_folder(out_dir) if cuda_available() else None

    def progress(partial: BenchmarkResult) -> None:
        folder.update(benchmark=partial, plot=False)
        if on_case is not None:
            on_case(partial)

    result = run_benchmark(bench, quick=quick, on_progress=progress, counter_class=counter_class, **kwargs)
    folder.update(benchmark=result)
    return result


# --------------------------------------------------------------------------------------
# pytest-benchmark cells (shared by every benchmarks/bench_*.py)

NOT_TIMED_SKIP = "no CUDA device: harness validated, not timed"


def pytest_session(bench: Benchmark):
    """A module-scoped session for a benchmark's cells: on CUDA it times them; without
    CUDA each cell runs the CPU self-check (scaled-down case, output against the oracle,
    host syncs). Use as ``session = pytest.fixture(scope="module")(pytest_session(BENCH))``."""

    def session():
        s = BenchSession(bench, "cuda" if cuda_available() else "cpu")
        yield s
        s.release()

    return session


def run_pytest_cell(benchmark, session: BenchSession, case, provider_name: str) -> None:
    """One pytest-benchmark cell: the harness's CUDA-event numbers go to
    ``benchmark.extra_info``; pytest-benchmark's own statistics are wall-clock of
    synchronized calls (host overhead included). Skips with the reason on a CPU."""
    import pytest

    provider = next(p for p in session.bench.providers if p.name == provider_name)
    if session.device.type != "cuda":
        row = session.check_cell_on_cpu(case, provider, NOT_TIMED_SKIP)
        if row.status == "failed":
            pytest.fail(f"CPU check of {provider_name} on {case.name}: {row.reason}")
        detail = f" ({provider_name} skipped on the CPU: {row.reason})" if row.status == "skipped" else ""
        pytest.skip(NOT_TIMED_SKIP + detail)

    row = session.run_cell(case, provider)
    if row.status == "skipped":
        pytest.skip(f"{provider_name}: {row.reason}")
    if row.status == "failed":
        pytest.fail(f"{provider_name} on {case.name}: {row.reason}")
    if provider is session.bench.providers[0]:
        session.baseline_ms[case.name] = row.median_ms
    if case.name in session.baseline_ms:
        row.speedup = session.baseline_ms[case.name] / row.median_ms
    benchmark.extra_info.update({k: v for k, v in row.to_dict().items() if k not in ("params", "host_sync_ops")})
    benchmark.extra_info["shape"] = case.params()
    fn = session.built(provider)
    inputs = session.arg_sets(case)[0]

    def synchronized_call():
        with torch.inference_mode():
            fn(inputs)
        torch.cuda.synchronize()

    benchmark.pedantic(synchronized_call, rounds=10, warmup_rounds=2, iterations=1)
