"""The varlen attention kernel compiled on a GPU at real model sizes (run by
tools/gpu_suite.py): flash-attn's error rule against float64, key ranges, determinism,
CUDA-graph capture."""

from __future__ import annotations

import pytest
import torch

from mmkernels.backend import Backend, recent_decisions
from mmkernels.ops import varlen_attention
from mmkernels.ops.varlen_attention import varlen_attention_torch
from mmkernels.testing import assert_deterministic, poison_outputs, relative_error

pytestmark = pytest.mark.gpu


def cu(lengths) -> torch.Tensor:
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device="cuda")


def compiled(*args, **kwargs):
    with poison_outputs():
        out = varlen_attention(*args, **kwargs)
    assert recent_decisions()[-1].backend is Backend.TRITON
    assert not out.isnan().any()
    return out


def image_ranges(lq: int, images: int, keys_per_image: int) -> torch.Tensor:
    """Mllama-style: text token t sees the images that came before it (image i starts at
    token i * lq // images), as one key range [0, (i + 1) * keys_per_image)."""
    t = torch.arange(lq, device="cuda")
    seen = torch.clamp((t * images) // max(lq, 1) + 1, max=images)
    seen[: lq // (2 * images)] = 0  # text before the first image sees nothing
    return torch.stack([torch.zeros_like(seen), seen * keys_per_image], dim=1).to(torch.int32)


CASES = {
    # name: (query lengths, key lengths, Hq, Hkv, d, causal, ranges)
    "mllama-cross": ([1024, 257], [4 * 1601, 2 * 1601], 32, 8, 128, False, "images"),
    "qwen2-vl-vision": ([1024, 256, 4096], [1024, 256, 4096], 16, 16, 80, False, None),
    "blip2-qformer": ([32] * 8, [257] * 8, 12, 12, 64, False, None),
    "whisper-cross": ([448, 17], [1500, 1500], 20, 20, 64, False, None),
    "causal-gqa": ([2048, 777, 1], [2048, 777, 1], 32, 4, 128, True, None),
    "d96": ([333, 129], [700, 1], 8, 2, 96, False, None),
    "d72": ([577, 577], [577, 577], 16, 16, 72, False, None),
}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", list(CASES))
def test_real_sizes_flash_rule(name, dtype):
    lq, lk, hq, hkv, d, causal, ranges = CASES[name]
    q = torch.randn(sum(lq), hq, d, device="cuda", dtype=dtype)
    k = torch.randn(sum(lk), hkv, d, device="cuda", dtype=dtype)
    v = torch.randn(sum(lk), hkv, d, device="cuda", dtype=dtype)
    kv_ranges = None
    if ranges == "images":
        kv_ranges = torch.cat([image_ranges(n, m // 1601, 1601) for n, m in zip(lq, lk)])
    args = (q, k, v, cu(lq), cu(lk), max(lq), max(lk))
    out = compiled(*args, causal=causal, kv_ranges=kv_ranges)
    ref = varlen_attention_torch(*args, causal=causal, kv_ranges=kv_ranges, compute_dtype=torch.float64)
    same = varlen_attention_torch(*args, causal=causal, kv_ranges=kv_ranges)
    err, base = relative_error(out, ref), relative_error(same, ref)
    assert err <= 2 * base + 1e-5, f"{name}: error {err:.3g} vs same-precision PyTorch {base:.3g}"
    assert_deterministic(lambda: compiled(*args, causal=causal, kv_ranges=kv_ranges))


def test_cuda_graph_capture():
    lq, lk = [100, 33], [257, 1]
    q = torch.randn(133, 8, 64, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(258, 8, 64, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    cq, ck = cu(lq), cu(lk)
    expected = varlen_attention(q, k, v, cq, ck, 100, 257)
    graph = torch.cuda.CUDAGraph()
    torch.cuda.synchronize()
    with torch.cuda.graph(graph):
        out = varlen_attention(q, k, v, cq, ck, 100, 257)
    q.copy_(torch.randn_like(q))
    graph.replay()
    torch.testing.assert_close(out, varlen_attention(q, k, v, cq, ck, 100, 257), rtol=0, atol=0)
    assert not torch.equal(out, expected)
