"""The varlen-attention benchmark, checked on the CPU: its shapes (unmasked work counted
exactly, sizes spanning two orders of magnitude), its providers against the oracle on
scaled-down cases, host syncs per provider. Nothing is timed."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))  # `benchmarks` is a top-level folder, not installed

from benchmarks import bench_varlen_attention as bench  # noqa: E402
from benchmarks import harness  # noqa: E402


def brute_force_pairs(shape: bench.AttentionShape) -> int:
    inputs = bench.make_attention_inputs(shape, "cpu", 0)
    return int((inputs.padded["mask"] == 0).sum())  # the dense mask is 0 exactly where a key is visible


@pytest.mark.parametrize("shape", bench.ATTENTION_SHAPES, ids=lambda s: s.name)
def test_unmasked_work_is_counted_exactly(shape):
    small = shape.scaled()
    assert small.pairs == brute_force_pairs(small)
    assert shape.flops == 4 * shape.head_dim * shape.heads_q * shape.pairs
    assert (small.head_dim, small.causal, small.images) == (shape.head_dim, shape.causal, shape.images)


def test_full_size_mllama_mask_and_ranges_agree():
    shape = next(s for s in bench.ATTENTION_SHAPES if s.name == "mllama-11b/b2-2img")
    assert shape.pairs == brute_force_pairs(shape)
    inputs = bench.make_attention_inputs(shape, "cpu", 0)
    seen = inputs.padded["row_seen"][:, 0, :, 0]
    assert not seen[0, : 1536 // 4].any() and seen[0, 1536 // 4 :].all()  # text before the first image sees nothing


def test_models_and_sizes_span_two_orders_of_magnitude():
    by_model: dict[str, list[int]] = {}
    for s in bench.ATTENTION_SHAPES:
        by_model.setdefault(s.model, []).append(s.pairs)
    spans = {m: max(p) / min(p) for m, p in by_model.items()}
    assert spans["Salesforce/blip2-opt-2.7b"] >= 100 and spans["Qwen/Qwen2-VL-7B-Instruct"] >= 100
    assert max(s.pairs for s in bench.ATTENTION_SHAPES) / min(s.pairs for s in bench.ATTENTION_SHAPES) >= 1000
    mllama = [s for s in bench.ATTENTION_SHAPES if s.model.startswith("meta-llama")]
    assert {s.heads_q // s.heads_kv for s in mllama} == {4} and {s.head_dim for s in mllama} == {128}


def test_providers_agree_with_the_oracle_on_the_cpu():
    result = harness.validate_on_cpu(bench.ATTENTION_BENCHMARK, quick=True)
    rows = {(r.case, r.provider): r for r in result.rows}
    assert {c for c, _ in rows} == {s.name for s in bench.QUICK_ATTENTION_SHAPES}
    for (case, provider), row in rows.items():
        if provider in ("flex_attention", "flash-attn varlen", "xformers"):
            assert row.status == "skipped" and row.reason, (case, provider)
            continue
        assert row.status == harness.NOT_TIMED and row.correct, (case, provider, row.reason)
        assert row.median_ms is None
    for case in {c for c, _ in rows}:
        assert rows[(case, "mmkernels")].host_syncs == 0
        assert rows[(case, "sdpa(padded, dense mask)")].host_syncs == 0
        assert rows[(case, "sdpa(loop)")].host_syncs >= 1  # lengths read on the host, as HF does


def test_compare_flags_wrong_outputs():
    shape = bench.ATTENTION_SHAPES[0].scaled()
    inputs = bench.make_attention_inputs(shape, "cpu", 0)
    expected = bench.expected_attention(inputs)
    assert bench.compare_close(expected.clone(), expected) is None
    wrong = expected.clone()
    wrong[: shape.q_lens[0] // 2] += 1.0
    assert "relative error" in bench.compare_close(wrong, expected)
    nan = expected.clone()
    nan[0, 0, 0] = float("nan")
    assert "not finite" in bench.compare_close(nan, expected)
    # The padded provider zeroes rows that see nothing (HF's full_text_row_masked_out_mask).
    out = bench.sdpa_padded(inputs)
    blind = shape.q_lens[0] // (2 * shape.images)
    assert blind > 0 and torch.equal(out[:blind], torch.zeros_like(out[:blind]))
