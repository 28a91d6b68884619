"""The benchmarks' CUDA-graph timing on a real GPU (run by tools/gpu_suite.py): capture,
replay, rotation, and the real patch_embed / quantized_linear cells graph-timed."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))  # `benchmarks` is a top-level folder, not installed

from benchmarks import bench_patch_embed, bench_quantized_linear, harness  # noqa: E402

pytestmark = pytest.mark.gpu
QUICK = harness.TimingConfig.quick()


def test_time_graph_replays_each_input_set_and_checks_one():
    device = torch.device("cuda")
    arg_sets = [torch.full((1 << 20,), float(i), device=device) for i in range(3)]
    check = torch.arange(1 << 20, dtype=torch.float32, device=device)
    calls = []

    def double(x):
        calls.append(x.data_ptr())
        return x * 2

    clock = harness.CudaClock(device)
    timing, replayed = harness.time_graph(double, arg_sets, check, clock=clock, device=device, config=QUICK)
    torch.testing.assert_close(replayed, check * 2)
    assert QUICK.min_runs <= timing.runs <= QUICK.max_runs and 0 < timing.p20_ms <= timing.median_ms <= timing.p80_ms
    # Python ran once per set on the side stream and once per capture: replays run none.
    assert len(calls) == 2 * 4
    graphs = harness.capture_graphs(double, arg_sets, device)
    for i, captured in enumerate(graphs):
        arg_sets[i].fill_(10.0 + i)  # a replay reads the captured input's memory as it is now
        captured.graph.replay()
        torch.cuda.synchronize()
        assert torch.all(captured.output == 2 * (10.0 + i))


def _one_case(bench, case_name, providers):
    case = next(c for c in bench.cases if c.name == case_name)
    picked = tuple(p for p in bench.providers if p.name in providers)
    return dataclasses.replace(bench, cases=(case,), quick_cases=None, providers=picked)


@pytest.mark.parametrize(
    "bench,case_name,providers",
    [
        (bench_patch_embed.PATCH_EMBED_BENCHMARK, "qwen2-vl-7b/256p", ("hf-eager", "unfold+linear", "mmkernels")),
        (bench_patch_embed.PATCH_EMBED_BENCHMARK, "siglip-so400m-14-384/b1", ("hf-eager", "mmkernels", "mmkernels(uint8)")),
        (bench_quantized_linear.QUANTIZED_LINEAR_BENCHMARK, "llava-1.5-7b/linear_1/m16",
         ("cublas-bf16", "mmkernels(w8a16)", "mmkernels(w4a16)", "mmkernels(fp8)")),
    ],
    ids=["patch_embed-qwen-256p", "patch_embed-siglip-b1", "quantized_linear-m16"],
)  # fmt: skip
def test_real_cells_are_graph_timed(bench, case_name, providers):
    session = harness.BenchSession(_one_case(bench, case_name, providers), "cuda", quick=True,
                                   roofline=harness.Roofline.not_measured("not needed here"))  # fmt: skip
    result = harness.run_timed(session)
    assert result.graph_timing
    for row in result.rows:
        if row.status == "skipped":
            continue
        assert row.status == "ok", (row.provider, row.reason)
        assert row.graph_note == "", (row.provider, row.graph_note)
        assert row.graph_median_ms > 0 and row.graph_speedup is not None
