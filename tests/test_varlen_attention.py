"""Varlen attention: the Triton kernel (interpreter) against the float64 reference under
flash-attn's error rule, NaN-poisoned outputs and NaN-filled memory outside the
sequences, key ranges, rows that see nothing, bad inputs, torch.compile, gradients."""

from __future__ import annotations

import math

import pytest
import torch

from mmkernels.backend import Backend, force_backend, recent_decisions
from mmkernels.ops import varlen_attention
from mmkernels.ops import varlen_attention_reference as reference
from mmkernels.ops.varlen_attention import varlen_attention_torch
from mmkernels.testing import assert_deterministic, poison_outputs, relative_error


def cu(lengths) -> torch.Tensor:
    return torch.tensor([0, *torch.tensor(lengths, dtype=torch.int64).cumsum(0).tolist()], dtype=torch.int32)


def packed_in_nan(total: int, heads: int, d: int, dtype, *, rows_after: int = 3, head_gap: int = 5) -> torch.Tensor:
    """(total, heads, d) random values that live inside a NaN buffer: NaN rows after the
    last sequence, NaN between heads (head stride d + head_gap). Reading anything outside
    the sequences or past the head dim shows up as NaN."""
    buf = torch.full((total + rows_after, heads, d + head_gap), float("nan"), dtype=dtype)
    view = buf[:total, :, :d]
    view.copy_(torch.randn(total, heads, d).to(dtype))
    return view


def random_ranges(lengths_q, lengths_k, kind: str, generator=None) -> torch.Tensor:
    """Per-query [start, end): "full" (whole sequence), "partial" (random sub-interval, some
    starting before 0 or ending past the keys: clipped), "empty" (start >= end), "mixed"."""
    rows = []
    for lq, lk in zip(lengths_q, lengths_k):
        for _ in range(lq):
            pick = kind if kind != "mixed" else ("full", "partial", "empty")[int(torch.randint(3, (1,)))]
            if pick == "full":
                rows.append((0, lk))
            elif pick == "empty":
                s = int(torch.randint(0, lk + 1, (1,)))
                rows.append((s, s - int(torch.randint(0, 3, (1,)))))
            else:
                s = int(torch.randint(-2, max(lk, 1), (1,)))
                rows.append((s, s + int(torch.randint(1, lk + 3, (1,)))))
    return torch.tensor(rows, dtype=torch.int32).reshape(-1, 2)


def run_kernel(*args, **kwargs) -> torch.Tensor:
    with poison_outputs():
        out = varlen_attention(*args, **kwargs)
    decision = recent_decisions()[-1]
    assert decision.backend is Backend.INTERPRETER, decision
    return out


def check_flash_rule(out, q, k, v, cq, ck, mq, mk, **kw) -> tuple[float, float]:
    """flash-attn's rule: the kernel's error against float64 is at most twice that of the
    same math in PyTorch in the inputs' precision (+1e-5)."""
    ref = reference(q, k, v, cq, ck, mq, mk, **kw)
    same = varlen_attention_torch(q, k, v, cq, ck, mq, mk, **kw)
    ref64 = varlen_attention_torch(q, k, v, cq, ck, mq, mk, compute_dtype=torch.float64, **kw)
    assert ref.dtype == q.dtype
    err = relative_error(out, ref64.double())
    base = relative_error(same, ref64.double())
    # The interpreter rounds fp32 -> bf16 toward zero: one more bf16 ulp of slack there.
    slack = 2**-8 if q.dtype == torch.bfloat16 else 0.0
    assert err <= 2 * base + 1e-5 + slack, f"error {err:.3g} vs same-precision PyTorch {base:.3g}"
    return err, base


# Sequences with q_len != k_len, lengths 1 and 0 (keys and queries), one long-ish sequence.
LENGTHS = {
    "cross": ([7, 1, 33, 2], [129, 5, 0, 64]),
    "self": ([17, 65, 1], [17, 65, 1]),
    "empty-q": ([0, 9, 0], [4, 0, 13]),
}


@pytest.mark.parametrize("head_dim", [64, 72, 80, 96, 128])
@pytest.mark.parametrize("gqa", [1, 2, 4, 8])
def test_head_dims_and_gqa(head_dim, gqa):
    lq, lk = LENGTHS["cross"]
    hkv = 1 if gqa == 8 else 2
    q = packed_in_nan(sum(lq), hkv * gqa, head_dim, torch.float16)
    k = packed_in_nan(sum(lk), hkv, head_dim, torch.float16)
    v = packed_in_nan(sum(lk), hkv, head_dim, torch.float16)
    out = run_kernel(q, k, v, cu(lq), cu(lk), max(lq), max(lk))
    assert out.shape == q.shape and out.dtype == q.dtype
    check_flash_rule(out, q, k, v, cu(lq), cu(lk), max(lq), max(lk))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("lengths", list(LENGTHS), ids=list(LENGTHS))
@pytest.mark.parametrize("ranges", [None, "full", "partial", "empty", "mixed"])
def test_masks_against_reference(dtype, causal, lengths, ranges):
    lq, lk = LENGTHS[lengths]
    q = packed_in_nan(sum(lq), 4, 80, dtype)
    k = packed_in_nan(sum(lk), 2, 80, dtype)
    v = packed_in_nan(sum(lk), 2, 80, dtype)
    kv_ranges = None if ranges is None else random_ranges(lq, lk, ranges)
    kw = dict(causal=causal, kv_ranges=kv_ranges)
    out = run_kernel(q, k, v, cu(lq), cu(lk), max(lq), max(lk), **kw)
    check_flash_rule(out, q, k, v, cu(lq), cu(lk), max(lq), max(lk), **kw)


def test_rows_that_see_nothing_are_exactly_zero():
    lq, lk = [5, 3, 4], [6, 0, 2]
    q, k, v = torch.randn(12, 2, 64), torch.randn(8, 2, 64), torch.randn(8, 2, 64)
    kv_ranges = torch.tensor([[0, 6], [3, 3], [4, 1], [-5, 0], [6, 9], [0, 1], [0, 1], [0, 1], [0, 2], [1, 2], [2, 7], [1, 1]], dtype=torch.int32)  # fmt: skip
    out = run_kernel(q, k, v, cu(lq), cu(lk), 5, 6, kv_ranges=kv_ranges)
    blind = torch.tensor([1, 2, 3, 4, 5, 6, 7, 10, 11])  # empty ranges, ranges outside the keys, no keys
    assert torch.equal(out[blind], torch.zeros_like(out[blind]))
    seen = torch.tensor([0, 8, 9])
    assert (out[seen].abs().sum(-1) > 0).all()
    check_flash_rule(out, q, k, v, cu(lq), cu(lk), 5, 6, kv_ranges=kv_ranges)
    # Causal with more queries than keys: the first q_len - k_len rows see nothing (bottom-right).
    q, k, v = torch.randn(9, 2, 64), torch.randn(4, 2, 64), torch.randn(4, 2, 64)
    out = run_kernel(q, k, v, cu([9]), cu([4]), 9, 4, causal=True)
    assert torch.equal(out[:5], torch.zeros_like(out[:5]))
    check_flash_rule(out, q, k, v, cu([9]), cu([4]), 9, 4, causal=True)


def test_ranges_skip_unread_keys():
    """Keys outside the union of a query block's ranges are never read (masked loads): NaN
    there must not reach the output. (Keys inside the union but outside one row's range are
    read and weighted 0, as with any mask in a tiled kernel.)"""
    lq, lk = [70], [300]
    q, k, v = torch.randn(70, 2, 64), torch.randn(300, 2, 64), torch.randn(300, 2, 64)
    kv_ranges = torch.tensor([[130, 190]] * 35 + [[140, 260]] * 35, dtype=torch.int32)
    k[:128], v[:128], k[260:], v[260:] = (float("nan"),) * 4
    out = run_kernel(q, k, v, cu(lq), cu(lk), 70, 300, kv_ranges=kv_ranges)
    assert not out.isnan().any()
    k2, v2 = k.nan_to_num(0.0), v.nan_to_num(0.0)  # the reference reads every key through a dense mask
    check_flash_rule(out, q, k2, v2, cu(lq), cu(lk), 70, 300, kv_ranges=kv_ranges)


def test_rows_outside_every_sequence_are_zero_and_short_max_seqlen_is_nan():
    lq, lk = [100, 3], [50, 7]
    q = torch.randn(103 + 6, 2, 64)  # 6 rows past cu_seqlens_q[-1]
    k, v = torch.randn(57, 2, 64), torch.randn(57, 2, 64)
    out = run_kernel(q, k, v, cu(lq), cu(lk), 100, 50)
    assert torch.equal(out[103:], torch.zeros_like(out[103:]))
    check_flash_rule(out, q, k, v, cu(lq), cu(lk), 100, 50)
    # max_seqlen_q below the real length (a caller bug): uncovered rows come out NaN, not stale memory.
    out = run_kernel(q, k, v, cu(lq), cu(lk), 10, 50)
    covered = 64  # one 64-query block
    assert out[covered:100].isnan().all()
    assert not out[:covered].isnan().any() and not out[100:].isnan().any()
    with pytest.raises(ValueError, match="max_seqlen_q"):
        reference(q, k, v, cu(lq), cu(lk), 10, 50)


def test_strided_qkv_from_one_projection():
    """Qwen2-VL's vision attention slices q, k, v out of one (S, 3, H, d) projection."""
    lengths = [16, 33]
    qkv = torch.randn(sum(lengths), 3, 4, 80, dtype=torch.float16)
    q, k, v = qkv.unbind(1)
    assert q.stride(0) == 3 * 4 * 80
    out = run_kernel(q, k, v, cu(lengths), cu(lengths), 33, 33)
    check_flash_rule(out, q, k, v, cu(lengths), cu(lengths), 33, 33)


def test_deterministic():
    lq, lk = LENGTHS["cross"]
    q, k, v = torch.randn(sum(lq), 4, 64).half(), torch.randn(sum(lk), 2, 64).half(), torch.randn(sum(lk), 2, 64).half()
    kv_ranges = random_ranges(lq, lk, "mixed")
    assert_deterministic(lambda: run_kernel(q, k, v, cu(lq), cu(lk), max(lq), max(lk), kv_ranges=kv_ranges))


def test_reference_matches_sdpa_with_a_dense_mask():
    """The reference means what models compute: padded SDPA with a boolean mask per sequence."""
    lq, lk = [5, 9], [11, 4]
    q, k, v = torch.randn(14, 4, 32).double(), torch.randn(15, 2, 32).double(), torch.randn(15, 2, 32).double()
    kv_ranges = random_ranges(lq, lk, "partial")
    out = reference(q, k, v, cu(lq), cu(lk), 9, 11, kv_ranges=kv_ranges, causal=True)
    cq, ck = cu(lq), cu(lk)
    for b in range(2):
        qb = q[cq[b] : cq[b + 1]].transpose(0, 1)
        kb = k[ck[b] : ck[b + 1]].repeat_interleave(2, 1).transpose(0, 1)
        vb = v[ck[b] : ck[b + 1]].repeat_interleave(2, 1).transpose(0, 1)
        cols = torch.arange(lk[b])
        r = kv_ranges[cq[b] : cq[b + 1]]
        mask = (cols >= r[:, :1]) & (cols < r[:, 1:]) & (cols[None] <= torch.arange(lq[b])[:, None] + lk[b] - lq[b])
        want = torch.nn.functional.scaled_dot_product_attention(qb, kb, vb, attn_mask=mask).transpose(0, 1)
        want = torch.where(mask.any(-1)[:, None, None], want, 0.0)  # SDPA gives NaN for empty rows
        torch.testing.assert_close(out[cq[b] : cq[b + 1]], want, rtol=1e-12, atol=1e-12)


def test_softmax_scale_and_default():
    q, k, v = torch.randn(9, 2, 64), torch.randn(12, 2, 64), torch.randn(12, 2, 64)
    args = (q, k, v, cu([9]), cu([12]), 9, 12)
    out = run_kernel(*args, softmax_scale=0.3)
    check_flash_rule(out, *args, softmax_scale=0.3)
    default = run_kernel(*args)
    torch.testing.assert_close(default, run_kernel(*args, softmax_scale=1 / math.sqrt(64)), rtol=0, atol=0)


def test_no_sequences_and_empty_tensors():
    q, k, v = torch.randn(3, 2, 64), torch.randn(0, 2, 64), torch.randn(0, 2, 64)
    out = run_kernel(q, k, v, torch.zeros(1, dtype=torch.int32), torch.zeros(1, dtype=torch.int32), 0, 0)
    assert torch.equal(out, torch.zeros_like(out))
    q = torch.randn(0, 2, 64)
    assert run_kernel(q, k, v, cu([0]), cu([0]), 0, 0).shape == (0, 2, 64)


def test_head_dim_over_256_runs_the_reference_with_a_reason():
    q, k, v = torch.randn(3, 1, 320), torch.randn(4, 1, 320), torch.randn(4, 1, 320)
    out = varlen_attention(q, k, v, cu([3]), cu([4]), 3, 4)
    decision = recent_decisions()[-1]
    assert decision.backend is Backend.REFERENCE and "head_dim 320 > 256" in str(decision)
    torch.testing.assert_close(out, reference(q, k, v, cu([3]), cu([4]), 3, 4))


def test_float64_runs_the_reference():
    q, k, v = torch.randn(3, 2, 64).double(), torch.randn(4, 2, 64).double(), torch.randn(4, 2, 64).double()
    varlen_attention(q, k, v, cu([3]), cu([4]), 3, 4)
    assert recent_decisions()[-1].backend is Backend.REFERENCE


def test_forced_reference_equals_reference():
    q, k, v = torch.randn(7, 2, 64), torch.randn(5, 1, 64), torch.randn(5, 1, 64)
    with force_backend(Backend.REFERENCE):
        out = varlen_attention(q, k, v, cu([7]), cu([5]), 7, 5, causal=True)
    torch.testing.assert_close(out, reference(q, k, v, cu([7]), cu([5]), 7, 5, causal=True), rtol=0, atol=0)


BAD = [
    (dict(q=torch.randn(4, 64)), ValueError, r"q: expected \(total_tokens, heads, head_dim\)"),
    (dict(k=torch.randn(5, 2, 64).half()), TypeError, "k: expected dtype torch.float32"),
    (dict(k=torch.randn(5, 2, 32), v=torch.randn(5, 2, 32)), ValueError, "k: expected head_dim 64"),
    (dict(v=torch.randn(6, 2, 64)), ValueError, r"v: expected shape \(5, 2, 64\)"),
    (dict(k=torch.randn(5, 3, 64), v=torch.randn(5, 3, 64)), ValueError, r"query heads \(4\) must be a multiple"),
    (dict(cu_seqlens_q=torch.tensor([0, 4])), TypeError, "cu_seqlens_q: expected dtype int32"),
    (dict(cu_seqlens_k=torch.tensor([0, 2, 5], dtype=torch.int32)), ValueError, r"cu_seqlens_k: expected shape \(2,\)"),
    (dict(max_seqlen_q=torch.tensor(4)), TypeError, "max_seqlen_q: expected a Python int"),
    (dict(max_seqlen_k=-1), ValueError, "max_seqlen_k: expected >= 0"),
    (dict(kv_ranges=torch.zeros(4, 2)), TypeError, "kv_ranges: expected dtype int32"),
    (dict(kv_ranges=torch.zeros(3, 2, dtype=torch.int32)), ValueError, r"kv_ranges: expected shape \(4, 2\)"),
    (dict(causal=1), TypeError, "causal: expected a bool"),
    (dict(softmax_scale="0.1"), TypeError, "softmax_scale: expected a float"),
    (dict(q=torch.randint(0, 3, (4, 4, 64))), TypeError, "q: expected a floating dtype"),
]


@pytest.mark.parametrize("override,error,match", BAD, ids=[m.split(":")[0] + str(i) for i, (_, _, m) in enumerate(BAD)])
def test_bad_input_names_the_argument(override, error, match):
    args = dict(q=torch.randn(4, 4, 64), k=torch.randn(5, 2, 64), v=torch.randn(5, 2, 64),
                cu_seqlens_q=cu([4]), cu_seqlens_k=cu([5]), max_seqlen_q=4, max_seqlen_k=5)  # fmt: skip
    kwargs = {key: override.pop(key) for key in ("causal", "softmax_scale", "kv_ranges") if key in override}
    args.update(override)
    with pytest.raises(error, match=match):
        varlen_attention(**args, **kwargs)


def test_reference_rejects_bad_offsets():
    q, k, v = torch.randn(4, 2, 64), torch.randn(5, 2, 64), torch.randn(5, 2, 64)
    with pytest.raises(ValueError, match="cu_seqlens_k: expected non-decreasing offsets"):
        reference(q, k, v, cu([4]), torch.tensor([0, 9], dtype=torch.int32), 4, 9)


def test_torch_compile_fullgraph():
    lq, lk = [3, 6], [5, 2]
    q, k, v = torch.randn(9, 2, 64), torch.randn(7, 2, 64), torch.randn(7, 2, 64)
    cq, ck = cu(lq), cu(lk)

    def f(q, k, v):
        return varlen_attention(q * 2, k, v, cq, ck, 6, 5, causal=True) + 1

    out = torch.compile(f, fullgraph=True, backend="aot_eager")(q, k, v)
    torch.testing.assert_close(out, reference(q * 2, k, v, cq, ck, 6, 5, causal=True) + 1, rtol=1e-5, atol=1e-5)


def test_gradients_match_float64_autograd():
    lq, lk = [4, 7], [6, 3]
    kv_ranges = random_ranges(lq, lk, "mixed")
    leaves = [torch.randn(11, 4, 64), torch.randn(9, 2, 64), torch.randn(9, 2, 64)]
    grad_out = torch.randn(11, 4, 64)
    q, k, v = (t.clone().requires_grad_() for t in leaves)
    out = varlen_attention(q, k, v, cu(lq), cu(lk), 7, 6, causal=True, kv_ranges=kv_ranges)
    out.backward(grad_out)
    q64, k64, v64 = (t.double().requires_grad_() for t in leaves)
    ref = reference(q64, k64, v64, cu(lq), cu(lk), 7, 6, causal=True, kv_ranges=kv_ranges)
    ref.backward(grad_out.double())
    for name, got, want in (("q", q.grad, q64.grad), ("k", k.grad, k64.grad), ("v", v.grad, v64.grad)):
        assert relative_error(got, want) < 1e-5, name


CHECKED = [
    (dict(cu_seqlens_q=torch.tensor([0, 4, 3], dtype=torch.int32), cu_seqlens_k=cu([2, 3])), "cu_seqlens_q: expected non-decreasing"),
    (dict(cu_seqlens_q=torch.tensor([1, 4], dtype=torch.int32)), "cu_seqlens_q: expected non-decreasing offsets starting at 0"),
    (dict(cu_seqlens_q=cu([3])), r"cu_seqlens_q: expected the last offset to be total_q = 4, got 3"),
    (dict(cu_seqlens_k=cu([6])), r"cu_seqlens_k: expected the last offset to be total_k = 5, got 6"),
    (dict(max_seqlen_q=3), r"max_seqlen_q: expected >= the longest sequence \(4\), got 3"),
    (dict(kv_ranges=torch.tensor([[0, 5], [0, 6], [1, 2], [2, 2]], dtype=torch.int32)), r"kv_ranges: row 1 \(sequence 0\) is \[0, 6\)"),
    (dict(kv_ranges=torch.tensor([[-1, 3], [0, 5], [1, 2], [2, 2]], dtype=torch.int32)), r"kv_ranges: row 0 .* is \[-1, 3\)"),
]


@pytest.mark.parametrize("override,match", CHECKED, ids=[str(i) for i in range(len(CHECKED))])
def test_debug_checks_name_the_argument(override, match, monkeypatch):
    args = dict(q=torch.randn(4, 2, 64), k=torch.randn(5, 2, 64), v=torch.randn(5, 2, 64),
                cu_seqlens_q=cu([4]), cu_seqlens_k=cu([5]), max_seqlen_q=4, max_seqlen_k=5)  # fmt: skip
    kwargs = {"kv_ranges": override.pop("kv_ranges")} if "kv_ranges" in override else {}
    args.update(override)
    with pytest.raises(ValueError, match=match):
        varlen_attention(**args, **kwargs, check=True)
    monkeypatch.setenv("MMKERNELS_DEBUG_CHECKS", "1")  # the same through the environment
    from mmkernels.backend import refresh_environment

    refresh_environment()  # read at import; a changed environment is read again here
    try:
        with pytest.raises(ValueError, match=match):
            varlen_attention(**args, **kwargs)
    finally:
        monkeypatch.delenv("MMKERNELS_DEBUG_CHECKS")
        refresh_environment()


def test_debug_checks_pass_valid_inputs_and_allow_empty_ranges():
    q, k, v = torch.randn(4, 2, 64), torch.randn(5, 2, 64), torch.randn(5, 2, 64)
    kv_ranges = torch.tensor([[0, 5], [3, 3], [4, 1], [2, 4]], dtype=torch.int32)  # two empty rows
    out = varlen_attention(q, k, v, cu([4]), cu([5]), 4, 5, kv_ranges=kv_ranges, check=True)
    torch.testing.assert_close(out, reference(q, k, v, cu([4]), cu([5]), 4, 5, kv_ranges=kv_ranges), rtol=1e-5, atol=1e-5)


def test_head_dims_run_as_two_power_of_two_chunks():
    from mmkernels.ops.varlen_attention import attn_config, head_chunks

    assert {d: head_chunks(d) for d in (8, 16, 64, 72, 80, 96, 128, 200, 256)} == {
        8: (16, 0), 16: (16, 0), 64: (64, 0), 72: (64, 16), 80: (64, 16), 96: (64, 32), 128: (128, 0),
        200: (128, 128), 256: (256, 0),
    }
    # A masked tail chunk takes 32-key blocks (register pressure: see attn_config).
    assert attn_config(577, 72, 2).block_n == 32 and attn_config(577, 80, 2).block_n == 64
