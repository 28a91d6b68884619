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

Modules
    :mod:`.common` (statuses, :func:`cuda_available`), :mod:`.timing`, :mod:`.roofline`,
    :mod:`.stamp` (device stamp), :mod:`.providers` (providers, benchmarks, registry,
    result rows), :mod:`.syncs` (host syncs), :mod:`.run` (running a benchmark),
    :mod:`.report` (``results.md`` and summaries), :mod:`.plots`, :mod:`.results` (the
    results folder) and :mod:`.pytest_cells`. Everything public is imported here: use
    ``from benchmarks import harness`` and ``harness.<name>``.
"""

from __future__ import annotations

from .common import NO_CUDA, NOT_TIMED, cuda_available
from .plots import PLOTS, plot_benchmark, plot_roofline, plot_speedup
from .providers import (
    BENCH_DIR,
    KINDS,
    Benchmark,
    BenchmarkResult,
    Provider,
    Registration,
    ResultRow,
    compare_bitwise,
    compare_relative,
    discover,
    import_error,
    register,
    registered,
)
from .pytest_cells import NOT_TIMED_SKIP, pytest_session, run_pytest_cell
from .report import render_markdown, row_size, size_label, skipped_baselines, summarize
from .results import ResultsFolder, roofline_from_folder, run_into_folder
from .roofline import Roofline, measure_roofline, roofline_floor_ms
from .run import (
    CUDA_EVENTS,
    DEADLINE_ENV,
    BenchSession,
    CudaEventTiming,
    deadline_from_env,
    run_benchmark,
    run_timed,
    validate_on_cpu,
)
from .stamp import REPO_ROOT, device_key, device_stamp, git_commit, gpu_stamp, short_gpu_name
from .syncs import SyncCount, count_host_syncs
from .timing import (
    L2_FLUSH_BYTES,
    CapturedCall,
    CudaClock,
    Timing,
    TimingConfig,
    capture_graphs,
    time_device,
    time_graph,
)

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
