"""Varlen attention under what callers actually pass: offsets that break the contract
(never a read or write outside the buffers, every row defined), head offsets past 2^31
elements, token strides past what 32-bit tile offsets hold, grids past CUDA's y/z limit,
and random valid layouts (strided, expanded and zero-stride views, offsets into a larger
NaN-filled buffer, empty sequences) against the reference."""

from __future__ import annotations

import random
import sys

import pytest
import torch

from mmkernels.backend import Backend, recent_decisions
from mmkernels.ops import varlen_attention
from mmkernels.ops import varlen_attention_reference as reference
from mmkernels.ops.varlen_attention import _launch, _validate
from mmkernels.testing import assert_deterministic, poison_outputs, relative_error


def cu(*offsets) -> torch.Tensor:
    return torch.tensor(offsets, dtype=torch.int32)


def run_kernel(*args, **kwargs) -> torch.Tensor:
    with poison_outputs():
        out = varlen_attention(*args, **kwargs)
    assert recent_decisions()[-1].backend is Backend.INTERPRETER, recent_decisions()[-1]
    return out


SENTINEL = 12345.0


@pytest.fixture
def sentinel_outputs(monkeypatch):
    """Outputs start as 12345 instead of NaN: a row the kernel leaves unwritten shows even
    where the kernel's own marking is NaN."""
    op = sys.modules["mmkernels.ops.varlen_attention"]  # the package exports the function under this name
    monkeypatch.setattr(op, "empty_output", lambda shape, dtype, device: torch.full(shape, SENTINEL, dtype=dtype, device=device))


def inside_nan(values: torch.Tensor, rows_after: int = 64) -> torch.Tensor:
    """``values`` as the first rows of a larger NaN buffer: a read past the last row shows."""
    buf = torch.full((values.shape[0] + rows_after, *values.shape[1:]), float("nan"), dtype=values.dtype)
    buf[: values.shape[0]] = values
    return buf[: values.shape[0]]


# Offsets a caller may pass by mistake (issue 15: segfaults and uninitialised rows before),
# each with the layout the kernel's clamping makes of it: [start, end) of every sequence
# clipped to [0, total] with end >= start.
BAD_OFFSETS = [
    # q offsets far past total_q with a matching max_seqlen_q (segfaulted 3 of 3 runs)
    (cu(0, 5, 4000), cu(0, 4, 8), 4000, cu(0, 5, 8), cu(0, 4, 8)),
    # a negative offset: sequence 0 is empty, sequence 1 takes rows [0, 8)
    (cu(0, -3, 8), cu(0, 4, 8), 8, cu(0, 0, 8), cu(0, 4, 8)),
    # key offsets negative and past total_k
    (cu(0, 5, 8), cu(0, -100, 8), 8, cu(0, 5, 8), cu(0, 0, 8)),
    (cu(0, 5, 8), cu(0, 9, 3), 8, cu(0, 5, 8), cu(0, 8, 8)),
    (cu(0, 5, 8), cu(-7, 3, 2**31 - 1), 8, cu(0, 5, 8), cu(0, 3, 8)),
]


@pytest.mark.parametrize("cq,ck,max_q,cq_clamped,ck_clamped", BAD_OFFSETS, ids=[str(i) for i in range(len(BAD_OFFSETS))])
def test_bad_offsets_stay_inside_the_buffers(cq, ck, max_q, cq_clamped, ck_clamped):
    q, k, v = (inside_nan(torch.randn(8, 2, 16)) for _ in range(3))
    out = run_kernel(q, k, v, cq, ck, max_q, 8)
    # Reading past the buffers would bring NaN (or crash); every row is written.
    assert not out.isnan().any()
    torch.testing.assert_close(out, reference(q, k, v, cq_clamped, ck_clamped, 8, 8), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="cu_seqlens_"):
        varlen_attention(q, k, v, cq, ck, max_q, 8, check=True)


def test_rows_before_the_first_offset_are_nan(sentinel_outputs):
    """cu_seqlens_q starting at 2 left rows 0-1 uninitialised: now NaN, so the mistake
    shows, and the sequences after them are right."""
    q, k, v = (inside_nan(torch.randn(8, 2, 16)) for _ in range(3))
    out = varlen_attention(q, k, v, cu(2, 5, 8), cu(0, 4, 8), 3, 4)
    assert out[:2].isnan().all()
    want = reference(q[2:], k, v, cu(0, 3, 6), cu(0, 4, 8), 3, 4)
    torch.testing.assert_close(out[2:], want, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="cu_seqlens_q: expected non-decreasing offsets starting at 0"):
        varlen_attention(q, k, v, cu(2, 5, 8), cu(0, 4, 8), 3, 4, check=True)


def test_decreasing_offsets_write_every_row_inside_the_output(sentinel_outputs):
    """Overlapping sequences (offsets that go down): no defined values, but nothing read or
    written outside the buffers and no row left unwritten."""
    q, k, v = (inside_nan(torch.randn(8, 2, 16)) for _ in range(3))
    for cq, ck in ((cu(0, 6, 2, 8), cu(0, 3, 5, 8)), (cu(0, 4, 5, 6, 1, 2, 3, 8), cu(0, 1, 2, 3, 4, 5, 6, 8)),
                   (cu(0, 6, 2, 5), cu(0, 3, 5, 8))):
        out = varlen_attention(q, k, v, cq, ck, 8, 8)
        assert not out.isnan().any() and not (out == SENTINEL).any()


def test_head_offset_past_2_31_elements():
    """head * head_stride is 64-bit: three heads 2^30 + 16 elements apart (the storage is
    reserved, not touched: only the rows used are written)."""
    tokens, heads, d, head_stride = 5, 3, 16, 2**30 + 16
    tensors = []
    for _ in range(3):
        storage = torch.empty(head_stride * (heads - 1) + tokens * d, dtype=torch.float16)
        view = storage.as_strided((tokens, heads, d), (d, head_stride, 1))
        view.copy_(torch.randn(tokens, heads, d).half())
        tensors.append(view)
    q, k, v = tensors
    out = run_kernel(q, k, v, cu(0, 2, 5), cu(0, 3, 5), 3, 3)
    want = reference(q, k, v, cu(0, 2, 5), cu(0, 3, 5), 3, 3)
    assert relative_error(out, want.double()) < 2e-3


def test_token_stride_too_large_for_tile_offsets_is_copied():
    """A token stride from 2^31 / 256 elements up would overflow 32-bit offsets inside a
    128-row tile: the launcher packs such an operand first."""
    tokens, d = 6, 16
    storage = torch.empty(2**23 * (tokens - 1) + 2 * d, dtype=torch.float16)
    q = storage.as_strided((tokens, 2, d), (2**23, d, 1))
    q.copy_(torch.randn(tokens, 2, d).half())
    k, v = torch.randn(4, 2, d).half(), torch.randn(4, 2, d).half()
    args = _validate(q, k, v, cu(0, 6), cu(0, 4), 6, 4, None, False, None)
    launch_args, _, _ = _launch(args, torch.empty(tokens, 2, d, dtype=torch.float16))
    assert launch_args[0].stride(0) == 2 * d  # copied to a packed layout
    out = run_kernel(q, k, v, cu(0, 6), cu(0, 4), 6, 4)
    assert relative_error(out, reference(q, k, v, cu(0, 6), cu(0, 4), 6, 4).double()) < 2e-3


def test_grid_keeps_sequences_off_cudas_65535_axes():
    """70,000 sequences (CUDA's grid y and z stop at 65535): sequences share axis 0 with
    the query blocks; heads past 65535 run the reference, with the reason."""
    batch = 70_000
    q = torch.empty(batch, 2, 16)
    offsets = torch.arange(batch + 1, dtype=torch.int32)
    args = _validate(q, q, q, offsets, offsets, 1, 1, None, False, None)
    _, _, grid = _launch(args, torch.empty_like(q))
    assert len(grid) == 2 and grid[0] == batch + 1 and grid[1] <= 65535
    q = torch.randn(1, 65536, 16)
    out = varlen_attention(q, q, q, cu(0, 1), cu(0, 1), 1, 1)
    decision = recent_decisions()[-1]
    assert decision.backend is Backend.REFERENCE and "65536 query heads > 65535" in str(decision)
    torch.testing.assert_close(out, q)  # one key: the output is its value


def _random_layout(rng: random.Random, rows: int, heads: int, d: int, dtype) -> torch.Tensor:
    """(rows, heads, d) random values in one of the layouts callers pass."""
    values = torch.randn(rows, heads, d).to(dtype)
    kind = rng.choice(["contiguous", "fused", "head-major", "offset", "expanded-heads", "zero-stride-rows"])
    if kind == "fused":  # a slice of a fused QKV projection: token stride 3 x heads x d
        buf = torch.full((rows, 3, heads, d), float("nan"), dtype=dtype)
        buf[:, 1] = values
        return buf[:, 1]
    if kind == "head-major":  # (heads, rows, d) transposed: head stride rows x d
        return values.transpose(0, 1).contiguous().transpose(0, 1)
    if kind == "offset":  # inside a NaN buffer, rows and columns around it
        buf = torch.full((rows + 5, heads, d + 3), float("nan"), dtype=dtype)
        view = buf[3 : 3 + rows, :, 1 : 1 + d]
        view.copy_(values)
        return view
    if kind == "expanded-heads":  # one head broadcast to all (stride 0 on heads)
        return values[:, :1].expand(rows, heads, d)
    if kind == "zero-stride-rows" and rows > 0:  # one token repeated (stride 0 on tokens)
        return values[:1].expand(rows, heads, d)
    return values


@pytest.mark.parametrize("seed", range(10))
def test_random_valid_layouts_match_the_reference(seed):
    rng = random.Random(seed)
    dtype = rng.choice([torch.float32, torch.float16])
    d = rng.choice([16, 40, 64, 72])
    hkv = rng.choice([1, 2])
    hq = hkv * rng.choice([1, 2, 3])
    batch = rng.randint(1, 4)
    lengths_q = [rng.choice([0, 1, 2, 7, 19]) for _ in range(batch)]
    lengths_k = [rng.choice([0, 1, 5, 33]) for _ in range(batch)]
    tail = rng.choice([0, 0, 3])  # rows past cu_seqlens_q[-1]: output 0
    cq = cu(0, *torch.tensor(lengths_q).cumsum(0).tolist())
    ck = cu(0, *torch.tensor(lengths_k).cumsum(0).tolist())
    total_q, total_k = int(cq[-1]) + tail, int(ck[-1])
    q = _random_layout(rng, total_q, hq, d, dtype)
    k = _random_layout(rng, total_k, hkv, d, dtype)
    v = _random_layout(rng, total_k, hkv, d, dtype)
    causal = rng.random() < 0.5
    kv_ranges = None
    if rng.random() < 0.5:
        starts = torch.randint(-2, 8, (total_q,))
        kv_ranges = torch.stack([starts, starts + torch.randint(-1, 40, (total_q,))], 1).to(torch.int32)
        if rng.random() < 0.5:  # strided rows inside a buffer of out-of-range values
            buf = torch.full((total_q, 4), 2**30, dtype=torch.int32)
            buf[:, 1:3] = kv_ranges
            kv_ranges = buf[:, 1:3]
    max_q, max_k = max(lengths_q), max(lengths_k)
    out = run_kernel(q, k, v, cq, ck, max_q, max_k, causal=causal, kv_ranges=kv_ranges)
    want = reference(q, k, v, cq, ck, max_q, max_k, causal=causal, kv_ranges=kv_ranges)
    assert not out.isnan().any()
    if want.abs().sum() == 0:
        assert (out == 0).all()
    else:
        assert relative_error(out, want.double()) < (2e-3 if dtype == torch.float16 else 2e-6)
    assert_deterministic(lambda: run_kernel(q, k, v, cq, ck, max_q, max_k, causal=causal, kv_ranges=kv_ranges))
