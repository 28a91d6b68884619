"""The benchmark harness, the merge benchmark and the GPU suite, checked on the CPU.

Nothing here times anything on the CPU: the timed code path is exercised with a
stand-in clock (wall-clock events) only to check its bookkeeping (rotation, flushes,
quantiles, GB/s, % of roofline, speedups, failed and skipped rows, results files).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))  # `benchmarks` is a top-level folder, not installed

from benchmarks import bench_merge, harness  # noqa: E402
from bench_helpers import WallClock, env_without_cuda_or_interpreter  # noqa: E402
from benchmarks.shapes import MERGE_SHAPES, QUICK_MERGE_SHAPES, SHAPE_TABLES, goal_merge_shape  # noqa: E402

GPU_SUITE = REPO_ROOT / "tools" / "gpu_suite.py"


def _has(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def _mmkernels_merge_available() -> bool:
    return bench_merge._mmkernels_import_error() is None


def _load_gpu_suite():
    name = "gpu_suite_under_test"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, GPU_SUITE)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses look their module up while the file runs
        spec.loader.exec_module(module)
    return sys.modules[name]


# --------------------------------------------------------------------------------------
# Shape tables


@pytest.mark.parametrize("shape", MERGE_SHAPES, ids=lambda s: s.name)
def test_merge_shape_placeholder_counts_are_consistent(shape):
    ids, positions = bench_merge._token_ids(shape, torch.Generator().manual_seed(0))
    assert ids.numel() == shape.num_tokens
    assert shape.num_placeholders == sum(shape.rows_per_kind) > 0
    for kind, pid in enumerate(shape.placeholder_ids):
        where = torch.cat(positions[kind]) if positions[kind] else torch.zeros(0, dtype=torch.int64)
        assert int((ids == pid).sum()) == shape.rows_per_kind[kind] == where.numel()
        assert bool((ids[where] == pid).all())
    is_text = ~torch.isin(ids, torch.tensor(shape.placeholder_ids))
    assert bool((ids[is_text] < min(shape.placeholder_ids)).all())
    assert max(shape.placeholder_ids) < shape.vocab_size
    assert shape.hidden % 128 == 0 and shape.batch_size >= 1


@pytest.mark.parametrize("shape", MERGE_SHAPES, ids=lambda s: s.name)
def test_scaled_merge_shape_keeps_structure(shape):
    small = shape.scaled()
    assert [s.kind for s in small.items] == [s.kind for s in shape.items][: len(small.items)]
    assert small.placeholder_ids == shape.placeholder_ids and small.layout == shape.layout
    inputs = bench_merge.make_merge_inputs(small, "cpu", 0)
    assert tuple(inputs.input_ids.shape) == small.ids_shape
    assert inputs.inputs_embeds.shape == (*small.ids_shape, small.hidden)
    for kind, items in enumerate(inputs.items_per_kind):
        assert sum(f.shape[0] for f in items) == small.rows_per_kind[kind]
        assert int((inputs.input_ids == small.placeholder_ids[kind]).sum()) == small.rows_per_kind[kind]


def test_shape_tables_cover_the_models_and_the_goal_shape():
    hidden_by_model = {s.model.split("/")[-1].lower(): s.hidden for s in MERGE_SHAPES}
    expected = {"llava-1.5-7b-hf": 4096, "llava-v1.6-34b-hf": 7168, "qwen2-vl-7b-instruct": 3584,
                "paligemma-3b-pt-224": 2048, "gemma-3-27b-it": 5376, "qwen2-audio-7b-instruct": 4096}  # fmt: skip
    assert hidden_by_model == expected
    goal = goal_merge_shape()
    assert [s for s in MERGE_SHAPES if s.goal] == [goal]
    assert goal.hidden == 4096 and goal.dtype == "bfloat16"
    assert [seg.tokens for seg in goal.items] == [576] * 16
    assert goal.num_tokens == 9472 and goal.num_placeholders == 16 * 576
    assert any(len(s.placeholder_ids) == 2 and all(s.rows_per_kind) for s in MERGE_SHAPES)
    assert any(s.layout == "packed" for s in MERGE_SHAPES)
    assert max(seg.tokens for s in MERGE_SHAPES for seg in s.items) == 2880
    assert set(QUICK_MERGE_SHAPES) <= set(MERGE_SHAPES) and goal in QUICK_MERGE_SHAPES
    assert set(SHAPE_TABLES) == {"merge", "patch_embed", "attention", "projector"}


def test_merge_bytes_of_the_goal_shape():
    goal = goal_merge_shape()
    T, N, D = 9472, 9216, 4096
    assert bench_merge.merge_bytes(goal) == T * 8 + (T - N) * D * 2 + N * D * 2 + T * D * 2


@pytest.mark.parametrize("name", ["merge", "patch_embed"])
def test_each_microbenchmark_sweeps_its_main_size_over_two_orders(name):
    harness.discover()
    reg = harness.registered()[name]
    for quick in (False, True):
        sizes = [case.params()[reg.size_param] for case in reg.benchmark.cases_for(quick)]
        assert max(sizes) / min(sizes) >= 100, (name, quick, min(sizes), max(sizes))
    if name == "merge":
        sizes = {c.name: c.num_tokens for c in reg.benchmark.cases}
        assert sizes["qwen2-vl-7b/1x1img-224"] == 94 and sizes["llava-1.5-7b/64x1img"] == 64 * 592


# --------------------------------------------------------------------------------------
# Providers against the oracle


@pytest.mark.parametrize("shape", MERGE_SHAPES, ids=lambda s: s.name)
def test_baseline_providers_match_the_oracle(shape):
    small = shape.scaled()
    expected = bench_merge.expected_merge(bench_merge.make_merge_inputs(small, "cpu", 0))
    for fn in (bench_merge.hf_merge, bench_merge.vllm_style_merge):
        assert harness.compare_bitwise(fn(bench_merge.make_merge_inputs(small, "cpu", 0)), expected) is None
    if _mmkernels_merge_available():
        from mmkernels.ops.merge import merge_multimodal_embeddings_reference

        inputs = bench_merge.make_merge_inputs(small, "cpu", 0)
        out = merge_multimodal_embeddings_reference(
            inputs.input_ids, inputs.inputs_embeds, inputs.op_features(), inputs.op_placeholder_id()
        )
        assert harness.compare_bitwise(out, expected) is None


def test_oracle_disagrees_with_a_wrong_merge():
    inputs = bench_merge.make_merge_inputs(goal_merge_shape().scaled(), "cpu", 0)
    expected = bench_merge.expected_merge(inputs)
    assert harness.compare_bitwise(inputs.inputs_embeds, expected) is not None  # text rows only
    assert "differ" in harness.compare_bitwise(expected + 1, expected)


def test_provider_skip_reasons_name_the_cause():
    def boom():
        raise RuntimeError("no flash-attn")

    assert "no flash-attn" in harness.Provider("fa", lambda: None, requires=boom).skip_reason()
    assert harness.Provider("x", lambda: None, requires=lambda: "xformers not installed").skip_reason() == (
        "xformers not installed"
    )
    cuda_only = harness.Provider("c", lambda: None, runs_on_cpu=False)
    assert cuda_only.skip_reason("cuda") is None and cuda_only.skip_reason("cpu") == "runs on CUDA only"


@pytest.fixture(scope="module")
def quick_cpu_run(tmp_path_factory):
    """`bench_merge.run()` without CUDA (quick shapes), and its folder."""
    out = tmp_path_factory.mktemp("merge-cpu")
    return bench_merge.run(out, quick=True), out


def test_cpu_run_checks_every_provider_and_counts_syncs(quick_cpu_run):
    result, _ = quick_cpu_run
    assert not result.timed and result.not_timed_reason.startswith("not timed: no CUDA device")
    assert {r.case for r in result.rows} == {s.name for s in QUICK_MERGE_SHAPES}
    assert not result.failed_rows, [(r.case, r.provider, r.reason) for r in result.failed_rows]
    by_provider: dict[str, list] = {}
    for row in result.rows:
        by_provider.setdefault(row.provider, []).append(row)
        assert row.median_ms is None and row.bytes > 0
    for name in ("hf", "vllm-style"):
        assert all(r.status == harness.NOT_TIMED and r.correct for r in by_provider[name])
    mm_names = ("torch.compile(reference)", "mmkernels", "mmkernels(check)")
    if _mmkernels_merge_available():
        for name in mm_names:
            assert all(r.status == harness.NOT_TIMED and r.correct for r in by_provider[name]), name
    else:
        for name in mm_names:
            assert all(r.status == "skipped" and "not importable" in r.reason for r in by_provider[name])
    if harness.syncs._host_sync_counter_class()[0] is not None:
        one_kind = [s.name for s in QUICK_MERGE_SHAPES if len(s.placeholder_ids) == 1]
        syncs = {(r.case, r.provider): r.host_syncs for r in result.rows}
        for case in one_kind:
            assert syncs[(case, "hf")] == 2  # .sum() formatted into the message + the check
            assert syncs[(case, "vllm-style")] == 1  # boolean-index assignment
            if _mmkernels_merge_available() and "triton-interpreter" in next(
                r.backend for r in result.rows if r.case == case and r.provider == "mmkernels"
            ):
                assert syncs[(case, "mmkernels")] == 0 and syncs[(case, "mmkernels(check)")] == 1


def test_cpu_run_writes_not_timed_results(quick_cpu_run):
    _, out = quick_cpu_run
    data = json.loads((out / "results.json").read_text())
    assert data["timed"] is False
    assert data["not_timed_reason"].startswith("not timed: no CUDA device")
    assert data["benchmarks"]["merge"]["rows"] and data["roofline"]["copy_gbps"] is None
    for key in ("gpu", "torch", "triton", "transformers", "python", "git_commit", "date", "hostname"):
        assert key in data["stamp"], key
    md = (out / "results.md").read_text()
    assert "not timed: no CUDA device" in md and "## merge" in md and "| hf |" in md
    if _has("matplotlib"):
        assert (out / "merge.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    else:
        assert "matplotlib not installed" in data["benchmarks"]["merge"]["plot"]


# --------------------------------------------------------------------------------------
# The timed path, with a stand-in clock


def test_time_device_rotates_inputs_and_flushes_between_calls():
    used = []
    clock = WallClock()
    config = harness.TimingConfig(warmup_ms=1.0, rep_ms=3.0, min_runs=7, max_runs=20)
    timing = harness.time_device(lambda i: used.append(i) or time.sleep(1e-4), [0, 1, 2], clock=clock, config=config)
    assert 7 <= timing.runs <= 20 and timing.warmup_runs >= 1
    assert len(used) == 1 + 5 + timing.warmup_runs + timing.runs
    assert used[-timing.runs :] == [i % 3 for i in range(timing.runs)]
    assert clock.flushes == 5 + timing.runs
    assert 0 < timing.p20_ms <= timing.median_ms <= timing.p80_ms


def test_quantile_interpolates():
    assert harness.timing._quantile([1.0, 2.0, 3.0, 4.0, 5.0], 0.5) == 3.0
    assert harness.timing._quantile([1.0, 2.0], 0.2) == pytest.approx(1.2)


def _stand_in_session(providers, *, cases):
    bench = dataclasses.replace(
        bench_merge.MERGE_BENCHMARK, cases=cases, quick_cases=None, providers=tuple(providers)
    )
    roofline = harness.Roofline(copy_gbps=100.0, matmul_tflops=10.0, device_name="stand-in", copy_bytes=2, matmul_size=8)
    timing = harness.TimingConfig(warmup_ms=0.5, rep_ms=2.0, min_runs=3, max_runs=6, input_copies=2)
    return harness.BenchSession(bench, "cpu", roofline=roofline, timing=timing, clock=WallClock())


def test_timed_rows_report_bandwidth_roofline_speedup_and_failures(tmp_path):
    def wrong_merge(inputs):
        return inputs.inputs_embeds.clone()

    def broken_merge(inputs):
        raise RuntimeError("inductor failed")

    providers = [
        bench_merge.PROVIDERS[0],
        bench_merge.PROVIDERS[1],
        harness.Provider("wrong", lambda: wrong_merge),
        harness.Provider("optional-broken", lambda: broken_merge, optional=True),
        harness.Provider("absent", lambda: None, requires=lambda: "flash-attn not installed"),
        bench_merge.PROVIDERS[3],  # mmkernels: must run the compiled kernel when timed
    ]
    small = tuple(s.scaled() for s in QUICK_MERGE_SHAPES[:2])
    result = harness.run_timed(_stand_in_session(providers, cases=small))
    rows = {(r.case, r.provider): r for r in result.rows}
    for shape in small:
        hf, vllm = rows[(shape.name, "hf")], rows[(shape.name, "vllm-style")]
        for row in (hf, vllm):
            assert row.status == "ok" and row.correct and row.median_ms > 0
            assert row.gbps == pytest.approx(row.bytes / (row.median_ms * 1e-3) / 1e9)
            assert row.pct_copy_bw == pytest.approx(row.gbps)  # copy_gbps = 100
            assert row.tflops is None and row.pct_matmul is None
            assert row.host_syncs_device in ("cpu", "")
        assert hf.speedup == pytest.approx(1.0)
        assert vllm.speedup == pytest.approx(hf.median_ms / vllm.median_ms)
        assert rows[(shape.name, "wrong")].status == "failed" and rows[(shape.name, "wrong")].correct is False
        broken = rows[(shape.name, "optional-broken")]
        assert broken.status == "skipped" and "inductor failed" in broken.reason
        assert rows[(shape.name, "absent")].reason == "flash-attn not installed"
        mm = rows[(shape.name, "mmkernels")]
        if _mmkernels_merge_available():
            assert mm.status == "failed" and "expected backend 'triton'" in mm.reason
        else:
            assert mm.status == "skipped"

    folder = harness.ResultsFolder(tmp_path)
    data = folder.update(benchmark=result, roofline=result.roofline)
    assert data["timed"] is True and data["roofline"]["copy_gbps"] == 100.0
    md = (tmp_path / "results.md").read_text()
    assert "copy 100 GB/s" in md and "| ok |" in md and "| failed |" in md
    if _has("matplotlib"):
        assert (tmp_path / "merge.png").stat().st_size > 1000


@dataclasses.dataclass(frozen=True)
class _ToyCase:
    name: str
    n: int

    def params(self) -> dict:
        return {"n": self.n}


def _toy_double(x):
    return x * 2


def _toy_double_after_sync(x):
    x.sum().item()  # one host sync: cannot be captured
    return x * 2


class _GraphStandIn(harness.CudaEventTiming):
    """``time_graph`` without CUDA: the wall clock times the calls themselves, ``time``
    x 0.5 stands in for the replays, and the "replay" on the check inputs is a plain call
    (wrong or raising for the providers named)."""

    name = "graph stand-in (test)"

    def __init__(self, *, wrong=(), raising=()):
        self.wrong, self.raising = set(wrong), set(raising)
        self.captured: list[str] = []

    def time(self, session, case, provider, fn, arg_sets):
        return harness.Timing(median_ms=2.0 * case.n, p20_ms=1.8 * case.n, p80_ms=2.2 * case.n, runs=5, warmup_runs=1)

    def time_graph(self, session, case, provider, fn, arg_sets, check_inputs):
        self.captured.append(provider.name)
        if provider.name in self.raising:
            raise RuntimeError("operation not permitted when stream is capturing")
        replayed = fn(check_inputs)
        if provider.name in self.wrong:
            replayed = replayed + 1
        factor = {"double": 1.0, "double-too": 0.25}.get(provider.name, 0.5)
        ms = factor * case.n
        return harness.Timing(median_ms=ms, p20_ms=0.9 * ms, p80_ms=1.1 * ms, runs=5, warmup_runs=1), replayed

    def peak_memory(self, session, case, provider, fn, inputs):
        return None


def test_graph_timing_rows_speedups_and_reasons(tmp_path):
    bench = harness.Benchmark(
        name="toy",
        description="x * 2",
        cases=(_ToyCase("n1000", 1000), _ToyCase("n4000", 4000)),
        providers=(
            harness.Provider("double", lambda: _toy_double),
            harness.Provider("double-too", lambda: _toy_double),
            harness.Provider("syncs", lambda: _toy_double_after_sync),
            harness.Provider("wrong-replay", lambda: _toy_double),
            harness.Provider("capture-raises", lambda: _toy_double),
        ),
        make_inputs=lambda case, device, seed: torch.arange(case.n, dtype=torch.float32, device=device) + seed,
        expected_output=lambda x: x * 2,
        bytes_moved=lambda case: 8 * case.n,
        flops=lambda case: case.n,
        graph_timing=True,
    )
    roofline = harness.Roofline(copy_gbps=100.0, matmul_tflops=10.0, device_name="stand-in", copy_bytes=2, matmul_size=8)
    source = _GraphStandIn(wrong={"wrong-replay"}, raising={"capture-raises"})
    session = harness.BenchSession(bench, "cpu", roofline=roofline, clock=WallClock(), timing_source=source)
    result = harness.run_timed(session)
    assert result.graph_timing and result.to_dict()["graph_timing"] is True
    rows = {(r.case, r.provider): r for r in result.rows}
    for case in bench.cases:
        double, too = rows[(case.name, "double")], rows[(case.name, "double-too")]
        assert double.status == too.status == "ok" and double.graph_note == too.graph_note == ""
        assert (double.graph_median_ms, double.graph_p20_ms, double.graph_p80_ms) == pytest.approx(
            (case.n, 0.9 * case.n, 1.1 * case.n))  # fmt: skip
        assert double.graph_speedup == pytest.approx(1.0) and too.graph_speedup == pytest.approx(4.0)
        assert too.speedup == pytest.approx(1.0)  # the eager times are equal
        floor_ms = 8 * case.n / 100e9 * 1e3  # bytes over the copy bandwidth (the FLOPs floor is lower)
        assert double.graph_pct_roofline == pytest.approx(100 * floor_ms / case.n)
        assert double.pct_roofline == pytest.approx(100 * floor_ms / (2.0 * case.n))
        # Eager rows stay timed whatever happens to their graph.
        syncs = rows[(case.name, "syncs")]
        assert syncs.status == "ok" and syncs.host_syncs == 1 and syncs.graph_median_ms is None
        assert syncs.graph_note == "not captured: 1 host sync(s) per call"
        wrong = rows[(case.name, "wrong-replay")]
        assert wrong.status == "ok" and wrong.graph_median_ms is None and wrong.graph_speedup is None
        assert wrong.graph_note.startswith("WRONG output when replayed from a CUDA graph")
        raised = rows[(case.name, "capture-raises")]
        assert raised.status == "ok" and raised.graph_median_ms is None
        assert raised.graph_note == "not captured: RuntimeError: operation not permitted when stream is capturing"
    assert "syncs" not in source.captured  # never handed to the capture

    folder = harness.ResultsFolder(tmp_path)
    data = folder.update(benchmark=result, roofline=result.roofline)
    summary = {s["provider"]: s for s in harness.summarize(data)}
    assert summary["double-too"]["graph_speedup_geomean"] == pytest.approx(4.0)
    assert summary["double-too"]["graph_cells"] == 2 and summary["syncs"]["graph_cells"] == 0
    md = (tmp_path / "results.md").read_text()
    assert "| graph ms | graph speedup | graph % roofline |" in md
    assert "| 4.00 (2) |" in md  # the summary's graph speedup, over two cells
    table = [line for line in md.splitlines() if line.startswith("| n1000 | double-too |")]
    assert len(table) == 1 and "| 250.0000 | 4.00 |" in table[0]
    header = next(line for line in md.splitlines() if line.startswith("| case | provider |"))
    assert all(line.count(" | ") == header.count(" | ") for line in md.splitlines() if line.startswith("| n1000 |"))
    assert "graph: not captured: 1 host sync(s) per call" in md


def test_graph_timing_needs_a_source_that_has_it():
    class EagerOnly(_GraphStandIn):
        time_graph = None

    bench = harness.Benchmark(
        name="toy", description="", cases=(_ToyCase("n8", 8),), providers=(harness.Provider("double", lambda: _toy_double),),
        make_inputs=lambda case, device, seed: torch.ones(case.n), expected_output=lambda x: x * 2,
        bytes_moved=lambda case: 8, graph_timing=True,
    )  # fmt: skip
    session = harness.BenchSession(bench, "cpu", roofline=harness.Roofline.not_measured("none"), clock=WallClock(),
                                   timing_source=EagerOnly())  # fmt: skip
    (row,) = harness.run_timed(session).rows
    assert row.status == "ok" and row.graph_median_ms is None
    assert row.graph_note == "not captured: the timing source 'graph stand-in (test)' has no graph timing"


def test_deadline_leaves_cases_not_timed():
    session = _stand_in_session(bench_merge.PROVIDERS[:2], cases=(goal_merge_shape().scaled(),))
    result = harness.run_timed(session, deadline=time.time() - 1)
    assert [r.status for r in result.rows] == [harness.NOT_TIMED] * 2
    assert "time budget" in result.rows[0].reason


# --------------------------------------------------------------------------------------
# Results folder and stamp


def test_results_folder_merges_benchmarks_and_stamps(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)  # nvidia-ml-py missing
    stamp = harness.device_stamp()
    assert "nvidia-ml-py not installed" in stamp["gpu"]["nvml"] and stamp["gpu"]["name"]
    assert stamp["git_commit"] and stamp["python"] and stamp["torch"] == torch.__version__
    first = harness.BenchmarkResult("alpha", "A.", "", False, "not timed: no CUDA device (test)", rows=[])
    second = harness.BenchmarkResult("beta", "B.", "", False, "not timed: no CUDA device (test)", rows=[])
    folder = harness.ResultsFolder(tmp_path / "out")
    folder.update(stamp=stamp, benchmark=first)
    data = folder.update(benchmark=second, suite={"steps": [], "status": "ok"})
    assert set(data["benchmarks"]) == {"alpha", "beta"} and data["timed"] is False
    reloaded = json.loads((tmp_path / "out" / "results.json").read_text())
    assert reloaded["stamp"]["gpu"]["nvml"] == stamp["gpu"]["nvml"]
    assert "NVML unavailable" in (tmp_path / "out" / "results.md").read_text()


def _fake_pynvml():
    def not_supported(*args):
        raise RuntimeError("Not Supported")

    clocks = {1: 1980, 2: 2619}
    return types.SimpleNamespace(
        NVML_CLOCK_SM=1, NVML_CLOCK_MEM=2, NVML_TEMPERATURE_GPU=0,
        nvmlInit=lambda: None, nvmlShutdown=lambda: None,
        nvmlDeviceGetHandleByIndex=lambda i: ("handle", i),
        nvmlDeviceGetHandleByPciBusId=not_supported,
        nvmlDeviceGetName=lambda h: b"NVIDIA H100 80GB HBM3",
        nvmlSystemGetDriverVersion=lambda: "580.65.06",
        nvmlDeviceGetUUID=lambda h: "GPU-0000",
        nvmlDeviceGetClockInfo=lambda h, kind: clocks[kind],
        nvmlDeviceGetMaxClockInfo=lambda h, kind: clocks[kind],
        nvmlDeviceGetPowerManagementLimit=lambda h: 700000,
        nvmlDeviceGetEnforcedPowerLimit=not_supported,
        nvmlDeviceGetTemperature=lambda h, sensor: 41,
        nvmlDeviceGetMemoryInfo=lambda h: types.SimpleNamespace(total=80 * 2**30),
    )  # fmt: skip


def test_stamp_reads_nvml_fields(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", _fake_pynvml())
    gpu = harness.gpu_stamp()
    assert gpu["nvml"] == "ok" and gpu["name"] == "NVIDIA H100 80GB HBM3" and gpu["driver"] == "580.65.06"
    assert (gpu["sm_clock_mhz"], gpu["memory_clock_mhz"], gpu["power_limit_w"]) == (1980, 2619, 700.0)
    assert gpu["enforced_power_limit_w"] == "unavailable: Not Supported" and gpu["memory_total_gib"] == 80.0
    line = harness.report._stamp_line({"gpu": gpu, "torch": "2.11"})
    assert "driver 580.65.06" in line and "power limit 700.0 W" in line


def test_roofline_helpers_and_cpu_refusal():
    assert harness.measure_roofline("cpu").reason == "not measured: no CUDA device"
    config = harness.TimingConfig(warmup_ms=0.1, rep_ms=0.5, min_runs=2, max_runs=3, flush_l2=False)
    clock = WallClock()
    assert harness.roofline._copy_timing(torch.device("cpu"), 4096, clock, config).runs >= 2
    assert harness.roofline._matmul_timing(torch.device("cpu"), 16, clock, config).median_ms > 0
    assert clock.flushes == 0


def test_stamp_without_a_driver_says_so():
    gpu = harness.gpu_stamp()
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert gpu["nvml"] != "ok" and gpu["nvml"].startswith("unavailable") and gpu["name"] == "no CUDA device"


def test_short_gpu_name():
    assert harness.short_gpu_name({"cuda_available": True, "gpu": {"name": "NVIDIA H100 80GB HBM3"}}) == "H100"
    assert harness.short_gpu_name({"cuda_available": True, "gpu": {"name": "NVIDIA H200"}}) == "H200"
    assert harness.short_gpu_name({"cuda_available": False, "gpu": {"name": "no CUDA device"}}) == "nogpu"


# --------------------------------------------------------------------------------------
# GPU suite


def test_gpu_suite_budget_and_naming(tmp_path):
    suite = _load_gpu_suite()
    stamp = {"cuda_available": True, "gpu": {"name": "NVIDIA H100 80GB HBM3"}, "date": "2026-11-24T10:00:00+00:00",
             "git_commit": "abc1234def5678"}  # fmt: skip
    name = suite.default_out_dir(stamp, dry_run=False).name
    assert name.startswith("H100-2026-11-24-abc1234")
    assert suite.default_out_dir(stamp, dry_run=True).name.startswith("H100-2026-11-24-abc1234-dryrun")
    budget = suite.Budget(total_s=100.0, margin_s=10.0)
    assert budget.allot(50.0, reserve_s=60.0) == pytest.approx(30.0, abs=0.5)
    assert budget.allot(20.0) == 20.0
    assert suite.TOTAL_BUDGET_S == 540.0
    assert suite.bench_reserve_s(2, 510.0) == 180.0  # 90 s each
    assert suite.bench_reserve_s(7, 510.0) == pytest.approx(306.0)  # capped: the GPU tests still run
    names = suite.discover_benchmarks()
    kinds = [harness.registered()[n].kind for n in names]
    assert kinds == sorted(kinds, key=lambda k: k != "kernel")  # kernels first, then models
    assert {"merge", "patch_embed", "llava-1.5-7b", "qwen2-vl-7b"} <= set(names)
    junit = tmp_path / "j.xml"
    junit.write_text(
        '<testsuites><testsuite tests="3" failures="1" errors="0" skipped="1">'
        '<testcase classname="t" name="a"/><testcase classname="t" name="b"><failure/></testcase>'
        '<testcase classname="t" name="c"><skipped/></testcase></testsuite></testsuites>'
    )
    assert suite.junit_summary(junit) == {"tests": 3, "failures": 1, "errors": 0, "skipped": 1, "failing": ["t::b"]}


def test_gpu_suite_refuses_without_cuda(tmp_path):
    out = tmp_path / "never"
    proc = subprocess.run([sys.executable, str(GPU_SUITE), "--out", str(out)], capture_output=True, text=True,
                          env=env_without_cuda_or_interpreter(), timeout=120)  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert "no CUDA device" in proc.stderr and "--dry-run" in proc.stderr
    assert not out.exists()


def test_gpu_suite_dry_run_validates_and_writes_not_timed(tmp_path):
    out = tmp_path / "suite"
    proc = subprocess.run([sys.executable, str(GPU_SUITE), "--dry-run", "--quick", "--benchmarks", "merge",
                           "--out", str(out)],
                          capture_output=True, text=True, env=env_without_cuda_or_interpreter(),
                          timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    data = json.loads((out / "results.json").read_text())
    assert data["timed"] is False and "not timed: no CUDA device" in data["not_timed_reason"]
    steps = {s["name"]: s for s in data["suite"]["steps"]}
    assert list(steps) == ["stamp", "roofline", "gpu-tests", "bench:merge", "plots"]
    assert all(s["status"] == "ok" for s in steps.values()), steps
    assert data["suite"]["dry_run"] is True and data["suite"]["status"] == "ok"
    assert data["roofline"]["copy_gbps"] is None
    rows = data["benchmarks"]["merge"]["rows"]
    assert rows and all(r["status"] in (harness.NOT_TIMED, "skipped") for r in rows)
    md = (out / "results.md").read_text()
    assert "not timed: no CUDA device" in md and "GPU suite steps" in md
    assert (out / "bench-merge.log").exists() and (out / "gpu-tests.log").exists()
    assert "python -m mmkernels.bench" in (out / "bench-merge.log").read_text().splitlines()[0].replace(
        sys.executable, "python")  # the suite runs the same command line as a user
    for png in ("merge.png", "merge-speedup.png", "merge-roofline.png"):
        if _has("matplotlib"):
            assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png



def test_gpu_suite_steps_record_failures_and_timeouts(tmp_path):
    suite = _load_gpu_suite()
    env = dict(os.environ)
    failed, rc = suite.run_process_step("crash", [sys.executable, "-c", "print('boom'); raise SystemExit(4)"],
                                        budget_s=60.0, out_dir=tmp_path, env=env)  # fmt: skip
    assert rc == 4 and failed.status == "failed" and "exit code 4" in failed.detail and "boom" in failed.detail
    started = time.monotonic()
    slow, rc = suite.run_process_step("slow", [sys.executable, "-c", "import time; time.sleep(60)"],
                                      budget_s=2.0, out_dir=tmp_path, env=env)  # fmt: skip
    assert rc is None and slow.status == "timeout" and time.monotonic() - started < 30
    assert (tmp_path / "slow.log").exists()
    skipped, _ = suite.run_process_step("late", [sys.executable, "-c", "pass"], budget_s=0.0, out_dir=tmp_path, env=env)
    assert skipped.status == "skipped"


def test_serve_vllm_step_is_skipped_by_name(tmp_path, monkeypatch):
    import importlib.util

    suite = _load_gpu_suite()
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "vllm" else real_find_spec(name, *a))
    step = suite.serve_vllm_step(tmp_path, budget=suite.Budget(), dry_run=False)
    assert (step.name, step.status, step.detail) == ("serve-vllm", "skipped", "vLLM is not installed")
    # vLLM present but no local model to serve (GPU machines reach no hub): skipped, saying how.
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "vllm" else real_find_spec(name, *a))
    monkeypatch.delenv("MMK_SERVE_MODEL", raising=False)
    step = suite.serve_vllm_step(tmp_path, budget=suite.Budget(), dry_run=False)
    assert step.status == "skipped" and "MMK_SERVE_MODEL" in step.detail
    monkeypatch.setenv("MMK_SERVE_MODEL", str(tmp_path))
    assert suite.serve_vllm_step(tmp_path, budget=suite.Budget(), dry_run=True).detail == "dry run: nothing is served"


def test_gpu_suite_step_budgets_from_the_command_line():
    suite = _load_gpu_suite()
    budget = suite.Budget(total_s=330.0, margin_s=30.0)  # 300 s to share
    # Not asked: the cap, and never into what the benchmarks are promised.
    assert budget.allot_step(None, 60.0, 0.0) == pytest.approx(60.0, abs=1)
    assert budget.allot_step(None, 60.0, 270.0) == pytest.approx(30.0, abs=1)
    # Asked (--tests-budget / --probe-budget): taken as given, within what is left; 0 skips.
    assert budget.allot_step(150.0, 60.0, 270.0) == pytest.approx(150.0, abs=1)
    assert budget.allot_step(900.0, 60.0, 0.0) == pytest.approx(300.0, abs=1)
    assert budget.allot_step(0.0, 60.0, 0.0) == 0.0

def test_gpu_suite_takes_step_budgets_on_the_command_line(tmp_path):
    suite = _load_gpu_suite()
    # Parsed (argparse would exit on an unknown option), then refused here: no CUDA.
    argv = ["--out", str(tmp_path), "--probe-budget", "150", "--tests-budget", "0"]
    assert suite.main(argv) == suite.EXIT_NO_CUDA
    with pytest.raises(SystemExit):
        suite.main(["--out", str(tmp_path), "--probe-budgets", "150"])


def test_gpu_suite_test_command_and_probe_choice(tmp_path, monkeypatch):
    suite = _load_gpu_suite()
    junit = tmp_path / "j.xml"
    cmd = suite.gpu_tests_command(junit, dry_run=False, workers=8)
    assert cmd[cmd.index("-m") + 1 :][:3] == ["pytest", "-m", "gpu"]
    assert "-v" in cmd and f"--junitxml={junit}" in cmd and cmd[-2:] == ["-n", "8"]
    assert "-n" not in suite.gpu_tests_command(junit, dry_run=False, workers=1)
    dry = suite.gpu_tests_command(junit, dry_run=True, workers=8)
    assert "--collect-only" in dry and "-n" not in dry and not any(a.startswith("--junitxml") for a in dry)
    monkeypatch.setattr(suite.os, "cpu_count", lambda: 16)
    assert suite._xdist_workers() == (8 if importlib.util.find_spec("xdist") else 1)
    monkeypatch.setattr(suite.os, "cpu_count", lambda: 2)
    assert suite._xdist_workers() == 1
    assert suite.runs_probe(None, None) and suite.runs_probe(["patch_embed"], 120.0)
    assert not suite.runs_probe(["patch_embed"], None)


def test_gpu_suite_probe_step(tmp_path):
    suite = _load_gpu_suite()
    assert suite.probe_step(tmp_path, budget_s=30, dry_run=True).status == "skipped"
    # Without CUDA the probe refuses (exit 2): recorded as a failed step with its reason.
    step = suite.probe_step(tmp_path, budget_s=60, dry_run=False)
    assert step.status == "failed" and "needs a CUDA device" in step.detail
    assert (tmp_path / step.log).exists()


def test_a_tuned_route_is_not_an_unexpected_backend():
    """Rows keep each decision's text; a route a table chose ("via torch (measured)") is the
    same backend, the reference with its reasons is not."""
    from benchmarks.harness.syncs import unexpected_backends

    from mmkernels.backend import Backend, Decision

    routed = str(Decision("quantized_linear[w8a16]", Backend.TRITON, route="torch", route_source="measured"))
    fallback = str(Decision("patch_embed", Backend.REFERENCE, ("dtype float64 not supported",)))
    assert unexpected_backends(f"{routed}; merge_multimodal_embeddings: triton", "triton") == []
    assert unexpected_backends(f"{routed}; {fallback}", "triton") == [fallback]


def test_the_results_table_names_the_route_a_table_chose():
    from benchmarks.harness.report import _row_line

    row = {"case": "c", "provider": "mmkernels", "status": "ok", "median_ms": 0.1, "p20_ms": 0.1, "p80_ms": 0.1,
           "backend": "quantized_linear[w8a16]: triton via torch (measured)"}  # fmt: skip
    assert "route torch (measured)" in _row_line(row)
    assert "route" not in _row_line({**row, "backend": "quantized_linear[w8a16]: triton"})
