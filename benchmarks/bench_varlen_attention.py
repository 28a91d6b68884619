"""Benchmark of varlen attention: packed sequences with different query and key lengths,
and per-query key ranges (image masks).

What every provider computes (the contract of ``mmkernels.ops.varlen_attention``): for
each sequence ``b`` of a batch, ``softmax(q_b k_b^T * d^-1/2 + mask) v_b`` per query head
(GQA: query head ``h`` reads key/value head ``h // (Hq / Hkv)``), where the mask lets
query ``i`` see keys ``[start_i, end_i)`` of its own sequence (``kv_ranges``) and, for
causal cases, keys ``j <= i + Lk - Lq``; a query that sees nothing outputs 0. Inputs and
outputs are bf16, packed ``(total, heads, d)``. Shapes (``ATTENTION_SHAPES``):

* Llama-3.2-11B-Vision (Mllama) text-to-image cross-attention: 32 query heads, 8 KV heads,
  d = 128; 1-4 images of 4 tiles x 1601 tokens; 1024 or 2048 text tokens, each seeing the
  images that came before it (tokens before the first image see nothing; HF zeroes them
  with ``full_text_row_masked_out_mask``).
* BLIP-2 Q-Former cross-attention: 32 learned queries x 257 ViT-g tokens, 12 heads,
  d = 64; 1, 16 and 256 images (each image is one sequence).
* Qwen2-VL-7B vision self-attention: 16 heads, d = 80, over ``cu_seqlens`` of images of
  256-4096 patches (1, 4 and 16 images).
* Whisper-large-v3 decoder cross-attention: 20 heads, d = 64, 1500 encoder frames, 448
  decoder tokens (prefill of a full window) and short prompts.

Providers (the first is the baseline for speedups):

* ``sdpa(padded, dense mask)``: what Hugging Face runs for cross-attention: q/k/v padded
  to ``(B, H, S, d)`` and a dense additive bf16 mask ``(B, 1, Sq, Sk)`` with the dtype's
  minimum where masked (Mllama's ``_prepare_cross_attention_mask``), SDPA with
  ``enable_gqa``, rows that see nothing multiplied by 0, then the padding dropped. The
  padded tensors and the mask are built in setup, not timed (HF builds the mask once per
  forward and reuses it in every layer).
* ``sdpa(loop)``: Hugging Face's eager vision path without flash-attn (Qwen2-VL): the
  lengths read on the host with ``.tolist()``, ``torch.split`` per sequence, one SDPA
  call per sequence (with that sequence's mask when there are key ranges).
* ``flex_attention``: ``torch.nn.attention.flex_attention`` compiled, over the packed
  sequences with a block mask from document ids, key ranges and causality; the block
  mask is built in setup, not timed (a real batch rebuilds it: that cost is not counted).
  CUDA only, optional.
* ``flash-attn varlen`` / ``xformers``: ``flash_attn_varlen_func`` and xformers'
  ``memory_efficient_attention`` with a ``BlockDiagonalMask``, when installed; neither
  takes per-query key ranges, so those cases are skipped by name.
* ``mmkernels``: ``mmkernels.ops.varlen_attention`` (one launch; key blocks outside a
  query block's ranges are skipped, not masked).

Work declared per shape: FLOPs = 4 x d x Hq x (visible query-key pairs): only unmasked
work counts (``AttentionShape.pairs``). Bytes = read q, k, v and write the output once
(bf16) + the key ranges (8 B per query) when present. Every row reports TFLOP/s and % of
roofline = max(bytes / copy bandwidth, FLOPs / bf16 matmul rate) / median.

Correctness: every provider against a float32 oracle computed one sequence and a few
heads at a time with an explicit mask (bf16 outputs: relative error <= 1e-2, all finite).

``run(out_dir, quick=False)`` is what the GPU suite calls; ``test_varlen_attention`` is
the same work as pytest-benchmark cells.
"""

from __future__ import annotations

import functools
import itertools
import math
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from benchmarks import harness

__all__ = [
    "ATTENTION_BENCHMARK",
    "ATTENTION_SHAPES",
    "PROVIDERS",
    "QUICK_ATTENTION_SHAPES",
    "AttentionInputs",
    "AttentionShape",
    "expected_attention",
    "make_attention_inputs",
    "run",
]

REL_TOL = 1e-2


# ======================================================================================
# Shapes


@dataclass(frozen=True)
class AttentionShape:
    """One attention workload: per sequence a query and a key length, heads, head dim,
    causal or not, and ``images`` > 0 for Mllama-style key ranges (the keys of a sequence
    are ``images`` equal blocks; query ``t`` of ``Lq`` sees the first
    ``min(images, t * images // Lq + 1)`` blocks, and queries before ``Lq // (2 * images)``
    see none)."""

    name: str
    model: str
    q_lens: tuple[int, ...]
    k_lens: tuple[int, ...]
    heads_q: int
    heads_kv: int
    head_dim: int
    causal: bool = False
    images: int = 0
    dtype: str = "bfloat16"

    def __post_init__(self):
        if len(self.q_lens) != len(self.k_lens):
            raise ValueError(f"{self.name}: q_lens and k_lens need one entry per sequence")
        if self.heads_q % self.heads_kv:
            raise ValueError(f"{self.name}: heads_q must be a multiple of heads_kv")
        if self.images and any(k % self.images for k in self.k_lens):
            raise ValueError(f"{self.name}: each key length must split into {self.images} equal image blocks")

    @property
    def total_q(self) -> int:
        return sum(self.q_lens)

    @property
    def total_k(self) -> int:
        return sum(self.k_lens)

    def ranges_of(self, lq: int, lk: int) -> list[tuple[int, int]]:
        """[start, end) per query of one sequence (the whole sequence without images)."""
        if not self.images:
            return [(0, lk)] * lq
        block = lk // self.images
        blind = lq // (2 * self.images)
        return [(0, 0 if t < blind else min(self.images, t * self.images // lq + 1) * block) for t in range(lq)]

    @functools.cached_property
    def pairs(self) -> int:
        """Visible (query, key) pairs of one head: the unmasked work."""
        total = 0
        for lq, lk in zip(self.q_lens, self.k_lens):
            for t, (lo, hi) in enumerate(self.ranges_of(lq, lk)):
                if self.causal:
                    hi = min(hi, t + lk - lq + 1)
                total += max(0, hi - max(lo, 0))
        return total

    @property
    def flops(self) -> int:
        return 4 * self.head_dim * self.heads_q * self.pairs

    def bytes_moved(self) -> int:
        elem = 2 if self.dtype in ("bfloat16", "float16") else 4
        q_and_out = 2 * self.total_q * self.heads_q * self.head_dim * elem
        kv = 2 * self.total_k * self.heads_kv * self.head_dim * elem
        ranges = 8 * self.total_q if self.images else 0
        return q_and_out + kv + ranges + 8 * (len(self.q_lens) + 1)

    def params(self) -> dict:
        return {
            "model": self.model,
            "sequences": len(self.q_lens),
            "total_q": self.total_q,
            "total_k": self.total_k,
            "max_q": max(self.q_lens),
            "max_k": max(self.k_lens),
            "heads_q": self.heads_q,
            "heads_kv": self.heads_kv,
            "head_dim": self.head_dim,
            "causal": self.causal,
            "images": self.images,
            "pairs": self.pairs,
            "dtype": self.dtype,
        }

    def scaled(self, *, divisor: int = 32, max_sequences: int = 3) -> "AttentionShape":
        """A small version for CPU checks: same heads ratio, head dim, causality and image
        structure; lengths divided by ``divisor`` (keys stay a multiple of ``images``),
        at most ``max_sequences`` sequences, at most 4 query heads."""
        n = min(len(self.q_lens), max_sequences)
        images = max(self.images, 1)
        q = tuple(max(1, x // divisor) for x in self.q_lens[:n])
        k = tuple(max(images, (x // divisor) // images * images) for x in self.k_lens[:n])
        group = self.heads_q // self.heads_kv
        heads_kv = max(1, 4 // group)
        return replace(self, name=f"{self.name}[small]", q_lens=q, k_lens=k, heads_q=heads_kv * min(group, 4),
                       heads_kv=heads_kv)  # fmt: skip


_MLLAMA = dict(model="meta-llama/Llama-3.2-11B-Vision", heads_q=32, heads_kv=8, head_dim=128)
_BLIP2 = dict(model="Salesforce/blip2-opt-2.7b", heads_q=12, heads_kv=12, head_dim=64)
_QWEN2_VL = dict(model="Qwen/Qwen2-VL-7B-Instruct", heads_q=16, heads_kv=16, head_dim=80)
_WHISPER = dict(model="openai/whisper-large-v3", heads_q=20, heads_kv=20, head_dim=64)
_TILE_TOKENS = 4 * 1601  # Mllama: 4 tiles of 1600 patches + a class token, per image

ATTENTION_SHAPES: tuple[AttentionShape, ...] = (
    AttentionShape("mllama-11b/1img-1k", q_lens=(1024,), k_lens=(_TILE_TOKENS,), images=1, **_MLLAMA),
    AttentionShape("mllama-11b/4img-2k", q_lens=(2048,), k_lens=(4 * _TILE_TOKENS,), images=4, **_MLLAMA),
    AttentionShape("mllama-11b/b2-2img", q_lens=(1536, 700), k_lens=(2 * _TILE_TOKENS,) * 2, images=2, **_MLLAMA),
    AttentionShape("blip2-qformer/b1", q_lens=(32,), k_lens=(257,), **_BLIP2),
    AttentionShape("blip2-qformer/b16", q_lens=(32,) * 16, k_lens=(257,) * 16, **_BLIP2),
    AttentionShape("blip2-qformer/b256", q_lens=(32,) * 256, k_lens=(257,) * 256, **_BLIP2),
    AttentionShape("qwen2-vl-7b-vision/1x256", q_lens=(256,), k_lens=(256,), **_QWEN2_VL),
    AttentionShape("qwen2-vl-7b-vision/4-mixed", q_lens=(256, 1024, 805, 1728), k_lens=(256, 1024, 805, 1728), **_QWEN2_VL),
    AttentionShape("qwen2-vl-7b-vision/16-mixed", q_lens=(256, 1024, 4096, 1728) * 4,
                   k_lens=(256, 1024, 4096, 1728) * 4, **_QWEN2_VL),  # fmt: skip
    AttentionShape("whisper-large-v3/cross-448", q_lens=(448,), k_lens=(1500,), **_WHISPER),
    AttentionShape("whisper-large-v3/cross-b8-short", q_lens=(17, 40, 3, 96, 5, 64, 1, 33), k_lens=(1500,) * 8,
                   **_WHISPER),  # fmt: skip
)
QUICK_ATTENTION_SHAPES: tuple[AttentionShape, ...] = tuple(
    s for s in ATTENTION_SHAPES
    if s.name in ("mllama-11b/4img-2k", "blip2-qformer/b16", "qwen2-vl-7b-vision/4-mixed", "whisper-large-v3/cross-448")
)  # fmt: skip


# ======================================================================================
# Inputs


@dataclass
class AttentionInputs:
    """Packed inputs for one shape plus what the padded and block-mask providers need
    (built here, in setup, so they are not timed)."""

    shape: AttentionShape
    q: torch.Tensor  # (total_q, Hq, d)
    k: torch.Tensor  # (total_k, Hkv, d)
    v: torch.Tensor
    cu_seqlens_q: torch.Tensor
    cu_seqlens_k: torch.Tensor
    kv_ranges: torch.Tensor | None  # (total_q, 2) int32
    device: torch.device

    @functools.cached_property
    def padded(self) -> dict:
        """(B, H, S, d) tensors, the dense additive mask, the rows that see something, and
        the index that drops the padding from (B * Sq) rows."""
        s = self.shape
        b, sq, sk = len(s.q_lens), max(s.q_lens), max(s.k_lens)
        dt = self.q.dtype
        q = self.q.new_zeros(b, sq, s.heads_q, s.head_dim)
        k = self.k.new_zeros(b, sk, s.heads_kv, s.head_dim)
        v = self.v.new_zeros(b, sk, s.heads_kv, s.head_dim)
        visible = torch.zeros(b, sq, sk, dtype=torch.bool, device=self.device)
        rows = []
        cq, ck = self.cu_seqlens_q.tolist(), self.cu_seqlens_k.tolist()
        for i, (lq, lk) in enumerate(zip(s.q_lens, s.k_lens)):
            q[i, :lq], k[i, :lk], v[i, :lk] = self.q[cq[i] : cq[i + 1]], self.k[ck[i] : ck[i + 1]], self.v[ck[i] : ck[i + 1]]
            visible[i, :lq, :lk] = _visible(s, lq, lk, self.kv_ranges[cq[i] : cq[i + 1]] if self.kv_ranges is not None else None, self.device)
            rows.append(torch.arange(lq, device=self.device) + i * sq)
        mask = torch.zeros(b, 1, sq, sk, dtype=dt, device=self.device)
        mask.masked_fill_(~visible[:, None], torch.finfo(dt).min)
        return dict(q=q.transpose(1, 2), k=k.transpose(1, 2), v=v.transpose(1, 2), mask=mask,
                    row_seen=visible.any(-1)[:, None, :, None].to(dt), index=torch.cat(rows))  # fmt: skip


def _visible(shape: AttentionShape, lq: int, lk: int, ranges: torch.Tensor | None, device) -> torch.Tensor:
    cols = torch.arange(lk, device=device)
    mask = torch.ones(lq, lk, dtype=torch.bool, device=device)
    if ranges is not None:
        ranges = ranges.to(torch.int64)
        mask &= (cols[None] >= ranges[:, :1]) & (cols[None] < ranges[:, 1:])
    if shape.causal:
        mask &= cols[None] <= torch.arange(lq, device=device)[:, None] + (lk - lq)
    return mask


def _cu(lengths, device) -> torch.Tensor:
    return torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32, device=device)


def make_attention_inputs(shape: AttentionShape, device: torch.device | str, seed: int) -> AttentionInputs:
    """Deterministic inputs for ``shape`` (same ``seed``, same values) on ``device``."""
    device = torch.device(device)
    dtype = getattr(torch, shape.dtype)
    gen = torch.Generator(device=device).manual_seed(seed)

    def randn(*size):
        return torch.randn(*size, generator=gen, device=device, dtype=torch.float32).to(dtype)

    ranges = None
    if shape.images:
        rows = [r for lq, lk in zip(shape.q_lens, shape.k_lens) for r in shape.ranges_of(lq, lk)]
        ranges = torch.tensor(rows, dtype=torch.int32, device=device).reshape(-1, 2)
    inputs = AttentionInputs(
        shape=shape,
        q=randn(shape.total_q, shape.heads_q, shape.head_dim),
        k=randn(shape.total_k, shape.heads_kv, shape.head_dim),
        v=randn(shape.total_k, shape.heads_kv, shape.head_dim),
        cu_seqlens_q=_cu(shape.q_lens, device),
        cu_seqlens_k=_cu(shape.k_lens, device),
        kv_ranges=ranges,
        device=device,
    )
    inputs.padded  # noqa: B018  (built here, in setup: the padded provider's timing excludes it)
    return inputs


def expected_attention(inputs: AttentionInputs, heads_per_step: int = 8) -> torch.Tensor:
    """The oracle, in float32 (float64 on the CPU): one sequence and ``heads_per_step``
    heads at a time with an explicit mask; rows that see nothing are 0."""
    s = inputs.shape
    f = torch.float64 if inputs.device.type == "cpu" else torch.float32
    out = torch.zeros(inputs.q.shape, dtype=f, device=inputs.device)
    group = s.heads_q // s.heads_kv
    cq, ck = inputs.cu_seqlens_q.tolist(), inputs.cu_seqlens_k.tolist()
    for i, (lq, lk) in enumerate(zip(s.q_lens, s.k_lens)):
        if lq == 0 or lk == 0:
            continue
        ranges = inputs.kv_ranges[cq[i] : cq[i + 1]] if inputs.kv_ranges is not None else None
        mask = _visible(s, lq, lk, ranges, inputs.device)
        for h0 in range(0, s.heads_q, heads_per_step):
            heads = torch.arange(h0, min(h0 + heads_per_step, s.heads_q), device=inputs.device)
            q = inputs.q[cq[i] : cq[i + 1], heads].to(f).transpose(0, 1)
            k = inputs.k[ck[i] : ck[i + 1], heads // group].to(f).transpose(0, 1)
            v = inputs.v[ck[i] : ck[i + 1], heads // group].to(f).transpose(0, 1)
            scores = (q @ k.transpose(1, 2)) / math.sqrt(s.head_dim)
            probs = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1).nan_to_num(0.0)
            out[cq[i] : cq[i + 1], heads] = (probs @ v).transpose(0, 1)
    return out.to(inputs.q.dtype)


def compare_close(out, expected: torch.Tensor) -> str | None:
    """None when ``out`` matches ``expected`` within bf16 rounding; else why not."""
    return harness.compare_relative(out, expected, rel_tol=REL_TOL)


# ======================================================================================
# Providers


def sdpa_padded(inputs: AttentionInputs) -> torch.Tensor:
    """Hugging Face's cross-attention: padded SDPA with a dense additive mask."""
    p = inputs.padded
    out = F.scaled_dot_product_attention(p["q"], p["k"], p["v"], attn_mask=p["mask"], enable_gqa=True)
    out = out * p["row_seen"]  # HF: attn_output * full_text_row_masked_out_mask
    return out.transpose(1, 2).flatten(0, 1)[p["index"]]


def sdpa_loop(inputs: AttentionInputs) -> torch.Tensor:
    """Hugging Face's vision attention without flash-attn: one SDPA call per sequence."""
    s = inputs.shape
    q_lens = (inputs.cu_seqlens_q[1:] - inputs.cu_seqlens_q[:-1]).tolist()
    k_lens = (inputs.cu_seqlens_k[1:] - inputs.cu_seqlens_k[:-1]).tolist()
    qs, ks, vs = (torch.split(t, lens) for t, lens in ((inputs.q, q_lens), (inputs.k, k_lens), (inputs.v, k_lens)))
    ranges = torch.split(inputs.kv_ranges, q_lens) if inputs.kv_ranges is not None else [None] * len(q_lens)
    outs = []
    for q, k, v, r in zip(qs, ks, vs, ranges):
        mask = None
        if r is not None or s.causal:
            mask = _visible(s, q.shape[0], k.shape[0], r, inputs.device)
        o = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), attn_mask=mask,
                                           enable_gqa=True)  # fmt: skip
        if mask is not None:
            o = torch.where(mask.any(-1)[None, :, None], o, 0.0)  # SDPA gives NaN for rows that see nothing
        outs.append(o.transpose(0, 1))
    return torch.cat(outs)


def _flex_caller():
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    compiled = torch.compile(flex_attention, dynamic=False)

    def block_mask(inputs: AttentionInputs):
        # Kept on the input set: built on its first call (the warm-up), not timed.
        if "flex_block_mask" not in inputs.__dict__:
            s, dev = inputs.shape, inputs.device
            doc_q = torch.repeat_interleave(torch.arange(len(s.q_lens), device=dev), torch.tensor(s.q_lens, device=dev))
            doc_k = torch.repeat_interleave(torch.arange(len(s.k_lens), device=dev), torch.tensor(s.k_lens, device=dev))
            q_pos = torch.arange(s.total_q, device=dev) - inputs.cu_seqlens_q[doc_q]
            k_pos = torch.arange(s.total_k, device=dev) - inputs.cu_seqlens_k[doc_k]
            q_len, k_len = torch.tensor(s.q_lens, device=dev), torch.tensor(s.k_lens, device=dev)
            lo = inputs.kv_ranges[:, 0] if inputs.kv_ranges is not None else torch.zeros_like(q_pos)
            hi = inputs.kv_ranges[:, 1] if inputs.kv_ranges is not None else k_len[doc_q]

            def mask_mod(b, h, qi, ki):
                ok = (doc_q[qi] == doc_k[ki]) & (k_pos[ki] >= lo[qi]) & (k_pos[ki] < hi[qi])
                if s.causal:
                    ok = ok & (k_pos[ki] <= q_pos[qi] + k_len[doc_q[qi]] - q_len[doc_q[qi]])
                return ok

            inputs.__dict__["flex_block_mask"] = create_block_mask(mask_mod, None, None, s.total_q, s.total_k, device=dev)
        return inputs.__dict__["flex_block_mask"]

    def attend(inputs: AttentionInputs) -> torch.Tensor:
        q, k, v = (t.transpose(0, 1).unsqueeze(0) for t in (inputs.q, inputs.k, inputs.v))
        out = compiled(q, k, v, block_mask=block_mask(inputs), enable_gqa=True)
        return out[0].transpose(0, 1)

    return attend


def _flash_attn_caller():
    from flash_attn import flash_attn_varlen_func

    def attend(inputs: AttentionInputs) -> torch.Tensor:
        if inputs.kv_ranges is not None:
            raise NotImplementedError("flash-attn varlen takes no per-query key ranges")
        s = inputs.shape
        return flash_attn_varlen_func(inputs.q, inputs.k, inputs.v, inputs.cu_seqlens_q, inputs.cu_seqlens_k,
                                      max(s.q_lens), max(s.k_lens), causal=s.causal)  # fmt: skip

    return attend


def _xformers_caller():
    from xformers.ops import fmha

    def attend(inputs: AttentionInputs) -> torch.Tensor:
        if inputs.kv_ranges is not None:
            raise NotImplementedError("xformers' block-diagonal masks take no per-query key ranges")
        s = inputs.shape
        cls = fmha.attn_bias.BlockDiagonalCausalFromBottomRightMask if s.causal else fmha.attn_bias.BlockDiagonalMask
        bias = cls.from_seqlens(list(s.q_lens), list(s.k_lens))
        group = s.heads_q // s.heads_kv
        q = inputs.q.view(1, s.total_q, s.heads_kv, group, s.head_dim)
        k = inputs.k[:, :, None].expand(-1, -1, group, -1).unsqueeze(0)
        v = inputs.v[:, :, None].expand(-1, -1, group, -1).unsqueeze(0)
        return fmha.memory_efficient_attention_forward(q, k, v, attn_bias=bias)[0].reshape(inputs.q.shape)

    return attend


def _mmkernels_caller():
    from mmkernels.ops import varlen_attention

    def attend(inputs: AttentionInputs) -> torch.Tensor:
        s = inputs.shape
        return varlen_attention(inputs.q, inputs.k, inputs.v, inputs.cu_seqlens_q, inputs.cu_seqlens_k,
                                max(s.q_lens), max(s.k_lens), causal=s.causal, kv_ranges=inputs.kv_ranges)  # fmt: skip

    return attend




PROVIDERS: tuple[harness.Provider, ...] = (
    harness.Provider(
        name="sdpa(padded, dense mask)",
        factory=lambda: sdpa_padded,
        notes="HF cross-attention: padded (B, H, S, d), dense additive bf16 mask (B, 1, Sq, Sk) built in setup, "
        "F.scaled_dot_product_attention(enable_gqa=True), rows that see nothing zeroed, padding dropped",
    ),
    harness.Provider(
        name="sdpa(loop)",
        factory=lambda: sdpa_loop,
        notes="HF vision attention without flash-attn: lengths .tolist(), torch.split, one SDPA per sequence",
    ),
    harness.Provider(
        name="flex_attention",
        factory=_flex_caller,
        requires=functools.partial(harness.import_error, "torch.nn.attention.flex_attention"),
        runs_on_cpu=False,
        optional=True,
        notes="torch.compile(flex_attention) over the packed sequences; block mask (documents, key ranges, causal) "
        "built in setup, not timed",
    ),
    harness.Provider(
        name="flash-attn varlen",
        factory=_flash_attn_caller,
        requires=functools.partial(harness.import_error, "flash_attn"),
        runs_on_cpu=False,
        optional=True,
        notes="flash_attn_varlen_func (no per-query key ranges: those cases are skipped)",
    ),
    harness.Provider(
        name="xformers",
        factory=_xformers_caller,
        requires=functools.partial(harness.import_error, "xformers.ops"),
        runs_on_cpu=False,
        optional=True,
        notes="xformers memory_efficient_attention with a BlockDiagonalMask (no per-query key ranges)",
    ),
    harness.Provider(
        name="mmkernels",
        factory=_mmkernels_caller,
        requires=functools.partial(harness.import_error, "mmkernels.ops.varlen_attention"),
        timed_backend="triton",
        notes="mmkernels.ops.varlen_attention: one launch, key blocks outside the ranges skipped",
    ),
)

ATTENTION_BENCHMARK = harness.Benchmark(
    name="varlen_attention",
    description=(
        "Varlen cross / encoder attention over packed sequences with per-query key ranges (Mllama image masks), "
        "BLIP-2 Q-Former, Qwen2-VL vision cu_seqlens, Whisper cross-attention; bf16."
    ),
    cases=ATTENTION_SHAPES,
    quick_cases=QUICK_ATTENTION_SHAPES,
    providers=PROVIDERS,
    make_inputs=make_attention_inputs,
    expected_output=expected_attention,
    bytes_moved=lambda shape: shape.bytes_moved(),
    flops=lambda shape: shape.flops,
    small_case=lambda shape: shape.scaled(),
    compare=compare_close,
    bytes_model=(
        "read q, k, v and write the output once (bf16) + key ranges (8 B per query) + cu_seqlens; "
        "FLOPs = 4 x d x Hq x visible (query, key) pairs (unmasked work only)"
    ),
)
harness.register(ATTENTION_BENCHMARK, size_param="pairs", size_label="visible query-key pairs per head")


def run(out_dir: str | Path, quick: bool = False) -> harness.BenchmarkResult:
    """Run the attention benchmark into ``out_dir`` (timed on CUDA; validated, not timed,
    on the CPU) and return its result; ``quick`` runs fewer shapes and repetitions."""
    return harness.run_into_folder(ATTENTION_BENCHMARK, out_dir, quick=quick)


# ======================================================================================
# pytest-benchmark cells

attention_session = pytest.fixture(scope="module")(harness.pytest_session(ATTENTION_BENCHMARK))


@pytest.mark.parametrize("provider", [p.name for p in PROVIDERS])
@pytest.mark.parametrize("shape", ATTENTION_SHAPES, ids=lambda s: s.name.replace("/", "-"))
def test_varlen_attention(benchmark, attention_session: harness.BenchSession, shape, provider: str):
    harness.run_pytest_cell(benchmark, attention_session, shape, provider)
