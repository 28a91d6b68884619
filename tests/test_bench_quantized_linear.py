"""The quantized-linear benchmark, checked on the CPU: its shape table (K, N, M, FLOPs,
bytes per weight format), its providers against the unquantized layer and the mmkernels
providers against the op's own reference, its SQNR check, the harness's "% of roofline"
with per-provider bytes, and ``run()`` writing "not timed" without CUDA. Nothing is timed."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))  # `benchmarks` is a top-level folder, not installed

from benchmarks import bench_quantized_linear as bench  # noqa: E402
from benchmarks import harness  # noqa: E402
from bench_helpers import WallClock  # noqa: E402
from mmkernels.ops import quantized_linear_reference  # noqa: E402
from mmkernels.testing import assert_close  # noqa: E402

SHAPES = {s.name: s for s in bench.QUANTIZED_LINEAR_SHAPES}
PROVIDERS = {p.name: p for p in bench.PROVIDERS}

# layer: (K, N, activation)
_LAYERS = {
    "llava-1.5-7b/linear_1": (1024, 4096, "gelu"),
    "llava-1.5-7b/linear_2": (4096, 4096, None),
    "llava-next-34b/linear_1": (1024, 7168, "gelu"),
    "qwen2-vl-7b/merger.mlp.0": (5120, 5120, "gelu"),
    "qwen2-vl-7b/merger.mlp.2": (5120, 3584, None),
    "mllama-11b/multi_modal_projector": (7680, 4096, None),
}


def test_shape_table_covers_the_projectors_and_token_counts():
    assert set(SHAPES) == {f"{layer}/m{m}" for layer in _LAYERS for m in (1, 16, 64, 256, 576, 2304, 9216)}
    for shape in SHAPES.values():
        layer = shape.name.rsplit("/", 1)[0]
        assert (shape.k, shape.n, shape.activation) == _LAYERS[layer] and shape.bias
    assert set(bench.QUICK_SHAPES) <= set(bench.QUANTIZED_LINEAR_SHAPES) and len(bench.QUICK_SHAPES) == 4


def test_flops_and_bytes_by_the_numbers():
    s = SHAPES["mllama-11b/multi_modal_projector/m16"]
    assert s.flops == 2 * 16 * 7680 * 4096
    x, out, bias = 16 * 7680 * 2, 16 * 4096 * 2, 4096 * 2
    assert s.bytes_moved() == x + 4096 * 7680 * 2 + bias + out
    assert s.bytes_moved("w8a16") == s.bytes_moved("fp8") == x + 4096 * 7680 + 4096 * 4 + bias + out
    assert s.bytes_moved("w4a16") == x + 4096 * 7680 // 2 + 4096 * (7680 // 128) * 8 + bias + out
    assert bench.QUANTIZED_LINEAR_BENCHMARK.bytes_moved(s) == s.bytes_moved()
    assert PROVIDERS["mmkernels(w4a16)"].bytes_moved(s) == s.bytes_moved("w4a16")
    assert PROVIDERS["cublas-bf16"].bytes_moved is None
    with pytest.raises(ValueError, match="scheme"):
        s.weight_bytes("int3")


@pytest.mark.parametrize("name", ["llava-1.5-7b/linear_1/m576", "mllama-11b/multi_modal_projector/m1"])
def test_inputs_are_deterministic_and_scaled_keeps_structure(name):
    small = SHAPES[name].scaled()
    assert small.k % 128 == 0 and small.m <= 7 and small.activation == SHAPES[name].activation
    a, b = bench.make_inputs(small, "cpu", 0), bench.make_inputs(small, "cpu", 0)
    assert torch.equal(a.x, b.x) and torch.equal(a.weight, b.weight) and torch.equal(a.bias, b.bias)
    assert not torch.equal(bench.make_inputs(small, "cpu", 1).x, a.x)
    assert set(a.quantized) == {"w8a16", "w4a16", "fp8"}
    assert a.x.shape == (small.m, small.k) and a.weight.shape == (small.n, small.k) and a.x.dtype == torch.bfloat16


@pytest.mark.parametrize("name", ["llava-1.5-7b/linear_1/m16", "qwen2-vl-7b/merger.mlp.2/m2304"])
def test_providers_reach_the_sqnr_floor_and_mmkernels_matches_its_reference(name):
    small = SHAPES[name].scaled()
    inputs = bench.make_inputs(small, "cpu", 0)
    expected = bench.expected_output(inputs)
    assert bench.compare_sqnr(bench.cublas_bf16(inputs), expected) is None
    assert bench.sqnr_db(bench.cublas_bf16(inputs), expected) > 40  # bf16 rounding only
    for scheme in ("w8a16", "w4a16", "fp8"):
        out = bench._mmkernels_caller(scheme)(inputs)
        assert bench.compare_sqnr(out, expected) is None, scheme
        ref = quantized_linear_reference(inputs.x, inputs.quantized[scheme], inputs.bias, activation=inputs.activation)
        assert_close(out, ref, dtype=torch.bfloat16, name=scheme)


def test_sqnr_check_rejects_wrong_outputs():
    inputs = bench.make_inputs(SHAPES["llava-1.5-7b/linear_2/m64"].scaled(), "cpu", 0)
    expected = bench.expected_output(inputs)
    noisy = (expected.float() + expected.float().std() * torch.randn_like(expected.float())).to(torch.bfloat16)
    assert "SQNR" in bench.compare_sqnr(noisy, expected)
    nan = expected.clone()
    nan[0, 0] = float("nan")
    assert "not finite" in bench.compare_sqnr(nan, expected)
    assert "expected torch.bfloat16" in bench.compare_sqnr(expected.float(), expected)
    assert "expected a Tensor" in bench.compare_sqnr(None, expected)


def test_timed_rows_use_each_providers_bytes():
    """The timed bookkeeping with a stand-in clock on the CPU (not a measurement)."""
    providers = [PROVIDERS["cublas-bf16"]] + [
        dataclasses.replace(PROVIDERS[f"mmkernels({s})"], timed_backend=None) for s in ("w8a16", "w4a16")
    ]
    small = (SHAPES["llava-1.5-7b/linear_1/m16"].scaled(),)
    bench_def = dataclasses.replace(bench.QUANTIZED_LINEAR_BENCHMARK, cases=small, quick_cases=None, providers=providers)
    roof = harness.Roofline(copy_gbps=100.0, matmul_tflops=10.0, device_name="stand-in", copy_bytes=2, matmul_size=8)
    timing = harness.TimingConfig(warmup_ms=0.5, rep_ms=2.0, min_runs=3, max_runs=6, input_copies=2)
    session = harness.BenchSession(bench_def, "cpu", roofline=roof, timing=timing, clock=WallClock())
    result = harness.run_timed(session)
    rows = {r.provider: r for r in result.rows}
    shape = small[0]
    for provider, scheme in (("cublas-bf16", None), ("mmkernels(w8a16)", "w8a16"), ("mmkernels(w4a16)", "w4a16")):
        row = rows[provider]
        assert row.status == "ok" and row.correct, (provider, row.reason)
        assert row.bytes == shape.bytes_moved(scheme) and row.flops == shape.flops
        floor_ms = max(row.bytes / 100e9, shape.flops / 10e12) * 1e3
        assert row.pct_roofline == pytest.approx(100.0 * floor_ms / row.median_ms)
    assert rows["mmkernels(w4a16)"].bytes < rows["mmkernels(w8a16)"].bytes < rows["cublas-bf16"].bytes


def test_cpu_run_validates_every_provider_and_writes_not_timed(tmp_path, monkeypatch):
    monkeypatch.setattr(harness.common, "cuda_available", lambda: False)
    result = bench.run(tmp_path, quick=True)
    assert not result.timed and result.not_timed_reason.startswith("not timed: no CUDA device")
    assert {r.case for r in result.rows} == {s.name for s in bench.QUICK_SHAPES}
    assert not result.failed_rows, [(r.case, r.provider, r.reason) for r in result.failed_rows]
    for row in result.rows:
        assert row.median_ms is None and row.bytes > 0 and row.flops > 0
        if row.provider.startswith("mmkernels") or row.provider == "cublas-bf16":
            assert row.status == harness.NOT_TIMED and row.correct, (row.case, row.provider, row.reason)
        else:  # torch._scaled_mm needs CUDA sm_89+; torchao may be absent: skipped by name
            assert row.status in ("skipped", harness.NOT_TIMED), (row.provider, row.reason)
            if row.status == "skipped":
                assert row.reason
    data = json.loads((tmp_path / "results.json").read_text())
    assert [p["name"] for p in data["benchmarks"]["quantized_linear"]["providers"]] == list(PROVIDERS)
    assert "## quantized_linear" in (tmp_path / "results.md").read_text()
