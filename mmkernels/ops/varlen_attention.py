"""Variable-length attention over packed sequences, with per-query key ranges.

Replaces what multimodal models run around their images: SDPA with a materialized 4-D
float mask (Mllama's text-to-image cross-attention builds (B, 1, S, images x tiles x
1601)), per-image attention loops over ``cu_seqlens`` with ``.tolist()`` (Qwen2-VL's
vision tower without flash-attn), and padded cross-attention (BLIP-2 Q-Former, GPT-2 in
VisionEncoderDecoder, Whisper's decoder).

Public: :func:`varlen_attention` (registered as ``mmkernels::varlen_attention``), its
reference :func:`varlen_attention_reference` (same signature; it defines the op),
:func:`varlen_attention_torch` (the same math in a chosen precision: flash-attn's "same
precision PyTorch" yardstick, and the differentiable path of the backward), and
:data:`CAPABILITIES`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass

import torch

from mmkernels.backend import (
    MISS,
    AotCase,
    Capabilities,
    Needs,
    Op,
    aligned_elements,
    cdiv,
    matmul_tf32,
    empty_output,
    is_interpreted,
    launch,
    plan_key,
    plan_ok,
    next_power_of_2,
    no_plan,
    resolve_check,
)
from mmkernels.ops import _varlen_attention_kernels as kernels
from mmkernels.routes import Route

__all__ = [
    "CAPABILITIES",
    "MAX_HEAD_DIM",
    "varlen_attention",
    "varlen_attention_reference",
    "varlen_attention_torch",
]

OP_NAME = "varlen_attention"
CAPABILITIES = Capabilities(dtypes=frozenset({torch.float16, torch.bfloat16, torch.float32}), min_compute_capability=(8, 0))
# Head dims run inside the kernel as two power-of-two chunks (see head_chunks).
MAX_HEAD_DIM = 256


@dataclass
class _AttnArgs:
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    cu_seqlens_q: torch.Tensor
    cu_seqlens_k: torch.Tensor
    max_seqlen_q: int
    max_seqlen_k: int
    softmax_scale: float
    causal: bool
    kv_ranges: torch.Tensor | None

    @property
    def batch(self) -> int:
        return self.cu_seqlens_q.shape[0] - 1

    @property
    def head_dim(self) -> int:
        return self.q.shape[-1]


def _validate(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, causal,
              kv_ranges) -> _AttnArgs:  # fmt: skip
    for name, t in (("q", q), ("k", k), ("v", v), ("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 3:
            raise ValueError(f"{name}: expected (total_tokens, heads, head_dim), got shape {tuple(t.shape)}")
        if not t.is_floating_point():
            raise TypeError(f"{name}: expected a floating dtype, got {t.dtype}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        bad = "k" if k.dtype != q.dtype else "v"
        raise TypeError(f"{bad}: expected dtype {q.dtype} (that of q), got {(k if bad == 'k' else v).dtype}")
    device = q.device
    for name, t in (("k", k), ("v", v), ("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k)):
        if t.device != device:
            raise ValueError(f"{name}: expected device {device} (that of q), got {t.device}")
    total_q, hq, d = q.shape
    total_k, hkv, dk = k.shape
    if dk != d:
        raise ValueError(f"k: expected head_dim {d} (that of q), got shape {tuple(k.shape)}")
    if v.shape != k.shape:
        raise ValueError(f"v: expected shape {tuple(k.shape)} (that of k), got {tuple(v.shape)}")
    if hkv == 0 or hq % hkv != 0:
        raise ValueError(f"k: query heads ({hq}) must be a multiple of key/value heads ({hkv}) (GQA)")
    for name, t in (("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k)):
        if t.dtype != torch.int32:
            raise TypeError(f"{name}: expected dtype int32 (flash-attn's contract), got {t.dtype}")
        if t.dim() != 1 or t.shape[0] < 1:
            raise ValueError(f"{name}: expected shape (batch + 1,), got {tuple(t.shape)}")
    if cu_seqlens_k.shape != cu_seqlens_q.shape:
        raise ValueError(
            f"cu_seqlens_k: expected shape {tuple(cu_seqlens_q.shape)} (one entry per sequence, as cu_seqlens_q), "
            f"got {tuple(cu_seqlens_k.shape)}"
        )
    for name, value in (("max_seqlen_q", max_seqlen_q), ("max_seqlen_k", max_seqlen_k)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name}: expected a Python int (no host sync), got {type(value).__name__}")
        if value < 0:
            raise ValueError(f"{name}: expected >= 0, got {value}")
    if softmax_scale is None:
        softmax_scale = 1.0 / math.sqrt(d) if d else 1.0
    elif isinstance(softmax_scale, bool) or not isinstance(softmax_scale, (int, float)):
        raise TypeError(f"softmax_scale: expected a float or None, got {type(softmax_scale).__name__}")
    if not isinstance(causal, bool):
        raise TypeError(f"causal: expected a bool, got {type(causal).__name__}")
    if kv_ranges is not None:
        if not isinstance(kv_ranges, torch.Tensor):
            raise TypeError(f"kv_ranges: expected a torch.Tensor or None, got {type(kv_ranges).__name__}")
        if kv_ranges.dtype != torch.int32:
            raise TypeError(f"kv_ranges: expected dtype int32, got {kv_ranges.dtype}")
        if kv_ranges.shape != (total_q, 2):
            raise ValueError(f"kv_ranges: expected shape ({total_q}, 2) = (total_q, [start, end)), got {tuple(kv_ranges.shape)}")
        if kv_ranges.device != device:
            raise ValueError(f"kv_ranges: expected device {device} (that of q), got {kv_ranges.device}")
    return _AttnArgs(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, float(softmax_scale), causal,
                     kv_ranges)  # fmt: skip


def _check_seqlens(args: _AttnArgs) -> tuple[list[int], list[int]]:
    """Host-side check of cu_seqlens values (the reference reads them anyway)."""
    cq, ck = args.cu_seqlens_q.tolist(), args.cu_seqlens_k.tolist()
    for name, cu, total in (("cu_seqlens_q", cq, args.q.shape[0]), ("cu_seqlens_k", ck, args.k.shape[0])):
        if cu[0] != 0 or any(b < a for a, b in zip(cu, cu[1:])) or cu[-1] > total:
            raise ValueError(f"{name}: expected non-decreasing offsets from 0 to at most {total}, got {cu}")
    for name, cu, given in (("max_seqlen_q", cq, args.max_seqlen_q), ("max_seqlen_k", ck, args.max_seqlen_k)):
        longest = max((b - a for a, b in zip(cu, cu[1:])), default=0)
        if longest > given:
            raise ValueError(f"{name}: expected >= the longest sequence ({longest}), got {given}")
    return cq, ck


def check_values(args: _AttnArgs) -> None:
    """The debug-mode checks of :func:`varlen_attention` (``check=True``): one host sync."""
    cq, ck = args.cu_seqlens_q.tolist(), args.cu_seqlens_k.tolist()
    for name, cu, total, label in (("cu_seqlens_q", cq, args.q.shape[0], "total_q"),
                                   ("cu_seqlens_k", ck, args.k.shape[0], "total_k")):  # fmt: skip
        if cu[0] != 0 or any(b < a for a, b in zip(cu, cu[1:])):
            raise ValueError(f"{name}: expected non-decreasing offsets starting at 0, got {cu}")
        if cu[-1] != total:
            raise ValueError(f"{name}: expected the last offset to be {label} = {total}, got {cu[-1]}")
    _check_seqlens(args)  # max_seqlen_q / max_seqlen_k against the longest sequence
    if args.kv_ranges is None:
        return
    ranges = args.kv_ranges.tolist()
    for b in range(args.batch):
        k_len = ck[b + 1] - ck[b]
        for row in range(cq[b], cq[b + 1]):
            start, end = ranges[row]
            if start < end and (start < 0 or end > k_len):
                raise ValueError(
                    f"kv_ranges: row {row} (sequence {b}) is [{start}, {end}), outside its {k_len} keys [0, {k_len})"
                )


# --------------------------------------------------------------------------------------
# Reference


def _visible(q_len: int, k_len: int, causal: bool, ranges: torch.Tensor | None, device) -> torch.Tensor:
    """(q_len, k_len) bool: which keys each query of one sequence sees."""
    cols = torch.arange(k_len, device=device)
    rows = torch.arange(q_len, device=device)
    mask = torch.ones(q_len, k_len, dtype=torch.bool, device=device)
    if causal:
        mask &= cols[None, :] <= rows[:, None] + (k_len - q_len)
    if ranges is not None:
        ranges = ranges.to(torch.int64)
        mask &= (cols[None, :] >= ranges[:, :1]) & (cols[None, :] < ranges[:, 1:])
    return mask


def varlen_attention_torch(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, *, softmax_scale=None,
                           causal=False, kv_ranges=None, compute_dtype=None) -> torch.Tensor:  # fmt: skip
    """The op's math in PyTorch, one sequence at a time with an explicit mask, computed in
    ``compute_dtype`` (default: q's dtype) and returned in q's dtype. Differentiable.

    With ``compute_dtype=torch.float64`` this is :func:`varlen_attention_reference`; in
    q's own dtype it is the "same-precision PyTorch implementation" of flash-attn's error
    rule. Reads ``cu_seqlens`` on the host (a sync): a yardstick, not a fast path.
    """
    args = _validate(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, causal, kv_ranges)
    cq, ck = _check_seqlens(args)
    dt = compute_dtype or q.dtype
    group = q.shape[1] // k.shape[1]
    out = torch.zeros(q.shape, dtype=dt, device=q.device)
    pieces = []
    for b in range(args.batch):
        qs, qe, ks, ke = cq[b], cq[b + 1], ck[b], ck[b + 1]
        if qe == qs:
            continue
        qb = q[qs:qe].to(dt).transpose(0, 1)  # (H, Lq, d)
        kb = k[ks:ke].to(dt).repeat_interleave(group, dim=1).transpose(0, 1)
        vb = v[ks:ke].to(dt).repeat_interleave(group, dim=1).transpose(0, 1)
        ranges = kv_ranges[qs:qe] if kv_ranges is not None else None
        mask = _visible(qe - qs, ke - ks, causal, ranges, q.device)
        scores = (qb @ kb.transpose(1, 2)) * args.softmax_scale
        scores = scores.masked_fill(~mask, float("-inf"))
        # A query that sees no key: softmax over nothing is defined as 0 (not NaN).
        probs = torch.softmax(scores, dim=-1).nan_to_num(0.0) if ke > ks else scores.new_zeros(scores.shape)
        pieces.append((qs, qe, (probs @ vb).transpose(0, 1)))
    if pieces and torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
        # Out-of-place assembly so autograd sees every piece.
        parts, pos = [], 0
        for qs, qe, piece in pieces:
            parts += [out[pos:qs], piece]
            pos = qe
        parts.append(out[pos:])
        out = torch.cat(parts, dim=0)
    else:
        for qs, qe, piece in pieces:
            out[qs:qe] = piece
    return out.to(q.dtype)


def varlen_attention_reference(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, *, softmax_scale=None,
                               causal=False, kv_ranges=None) -> torch.Tensor:  # fmt: skip
    """PyTorch reference of :func:`varlen_attention` (it defines the op): float64, an
    explicit (q_len, k_len) mask per sequence, rows that see no key are 0; the result is
    rounded once to q's dtype."""
    return varlen_attention_torch(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                  softmax_scale=softmax_scale, causal=causal, kv_ranges=kv_ranges,
                                  compute_dtype=torch.float64)  # fmt: skip


# --------------------------------------------------------------------------------------
# Launcher


@dataclass(frozen=True)
class AttnConfig:
    block_m: int
    block_n: int
    head_pad: int
    num_warps: int
    num_stages: int
    head_a: int = 0  # the head dim as two power-of-two chunks: head_a + head_b >= head_dim
    head_b: int = 0


def head_chunks(head_dim: int) -> tuple[int, int]:
    """Two power-of-two chunks (``tl.dot`` needs powers of two, at least 16) covering the
    head dim with little padding: 64 -> (64, 0), 72 -> (64, 16), 80 -> (64, 16),
    96 -> (64, 32), 128 -> (128, 0); padding everything to the next power of two would
    compute 128 columns for 80 (60% more work in both dots)."""
    if head_dim <= 16:
        return 16, 0
    head_a = 1 << (head_dim.bit_length() - 1)  # the largest power of two <= head_dim
    rest = head_dim - head_a
    return head_a, (0 if rest == 0 else max(16, next_power_of_2(rest)))


@functools.lru_cache(maxsize=4096)  # pure in its integer arguments; frozen result
def attn_config(max_seqlen_q: int, head_dim: int, element_size: int) -> AttnConfig:
    """Deterministic tiles. 128-query blocks for long queries (vision self-attention, long
    prompts), 64 when few queries (BLIP-2's 32 Q-Former queries, short prompts) so less
    of the tile is padding; 64-key blocks. Head dims over 64 (72, 80, 96, 128) count as
    128 wide for warps and stages, and 128-query blocks take 8 warps: with 4 the fp32
    accumulator, the score tile and the Q operand spill on sm_80, or sit at 255 registers
    (``docs/kernel_report.md``). max_seqlen_q only picks between two configs, so
    new lengths every batch never recompile."""
    head_pad = max(16, next_power_of_2(head_dim))
    block_m = 128 if max_seqlen_q > 64 else 64
    if element_size > 2 or head_pad > 128:
        block_m = 64  # fp32 tiles and 256-wide heads: halve the register footprint
    block_n = 64 if head_pad <= 128 else 32
    num_warps = 8 if head_pad >= 128 or block_m == 128 else 4
    num_stages = 3 if (block_m == 128 or head_pad <= 64) else 2
    head_a, head_b = head_chunks(head_dim)
    if head_a + head_b != head_dim:
        # A masked tail chunk (72 = 64 + 16 with 8 masked) keeps its key and value tiles
        # in registers (no async copies) and spills at 64 keys per block: take 32.
        block_n = min(block_n, 32)
    return AttnConfig(block_m, block_n, head_pad, num_warps, num_stages, head_a, head_b)


# Offsets inside a tile are 32-bit (``row * token_stride`` with row < BLOCK_M <= 128): a
# token stride from this many elements up is copied to a packed layout first.
_MAX_TILE_TOKEN_STRIDE = (2**31 - 1) // 256
_MAX_GRID_Y = 65535  # CUDA's limit on grid y (query heads run there)


def _kernel_operand(name: str, t: torch.Tensor) -> torch.Tensor:
    """``t`` as the kernel can address it: last dim contiguous, token stride small enough for
    32-bit offsets inside a tile (a copy otherwise; a strided view of q/k/v out of a fused
    projection, the usual case, passes as it is)."""
    if t.stride(-1) != 1 or t.stride(0) >= _MAX_TILE_TOKEN_STRIDE:
        t = t.contiguous()
    if t.stride(0) >= _MAX_TILE_TOKEN_STRIDE:
        raise ValueError(f"{name}: heads x head_dim = {t.stride(0)} elements per token is too large for the kernel "
                         f"(at most {_MAX_TILE_TOKEN_STRIDE - 1})")  # fmt: skip
    return t


def _launch(args: _AttnArgs, out: torch.Tensor, variant=None):
    """(args, meta, grid) of the one launch; also used by the AOT report. ``variant``: a
    route's change to the heuristic tiles (``AttnConfig -> AttnConfig``)."""
    q, k, v = args.q, args.k, args.v
    # Each tensor's strides read once (every stride() call is a C call and a tuple).
    qs, ks, vs, os_ = q.stride(), k.stride(), v.stride(), out.stride()
    if qs[2] != 1 or qs[0] >= _MAX_TILE_TOKEN_STRIDE:
        q = _kernel_operand("q", q)
        qs = q.stride()
    if ks[2] != 1 or ks[0] >= _MAX_TILE_TOKEN_STRIDE:
        k = _kernel_operand("k", k)
        ks = k.stride()
    if vs[2] != 1 or vs[0] >= _MAX_TILE_TOKEN_STRIDE:
        v = _kernel_operand("v", v)
        vs = v.stride()
    if os_[0] >= _MAX_TILE_TOKEN_STRIDE:
        raise ValueError(f"q: heads x head_dim = {os_[0]} elements per token is too large for the kernel "
                         f"(at most {_MAX_TILE_TOKEN_STRIDE - 1})")  # fmt: skip
    total_q, hq, head_dim = q.shape
    total_k, hkv = k.shape[0], k.shape[1]
    # The kernel clamps every sequence to the rows that exist, so no sequence is longer
    # than total_q: a larger max_seqlen_q (a caller's bound, or garbage) only adds
    # programs with nothing to do.
    max_seqlen_q = min(args.max_seqlen_q, total_q)
    fp32 = q.dtype == torch.float32
    cfg = attn_config(max_seqlen_q, head_dim, q.element_size())
    if variant is not None:
        cfg = variant(cfg)
    n_slots = max(1, cdiv(max_seqlen_q, cfg.block_m))
    ranges = args.kv_ranges
    rs = ranges.stride() if ranges is not None else (0, 0)
    batch = args.cu_seqlens_q.shape[0] - 1
    launch_args = (
        q, k, v, out, args.cu_seqlens_q, args.cu_seqlens_k,
        ranges if ranges is not None else args.cu_seqlens_q,  # never read without HAS_RANGES
        args.softmax_scale * _LOG2E, total_q, total_k, batch, n_slots, hq // hkv,
        qs[0], qs[1], ks[0], ks[1], vs[0], vs[1], os_[0], os_[1], rs[0], rs[1],
    )  # fmt: skip
    strides = (qs[0], qs[1], ks[0], ks[1], vs[0], vs[1], os_[0], os_[1])
    meta = dict(
        HAS_RANGES=ranges is not None,
        CAUSAL=args.causal,
        UPCAST_DOT=_INTERPRETED and not fp32,
        DOT_PRECISION="tf32" if fp32 and q.is_cuda and matmul_tf32() else "ieee",
        HEAD_DIM=head_dim,
        HEAD_PAD=cfg.head_pad,
        HEAD_A=cfg.head_a,
        HEAD_B=cfg.head_b,
        BLOCK_M=cfg.block_m,
        BLOCK_N=cfg.block_n,
        ALIGN=aligned_elements((q, k, v, out), strides),
        WIDE_HEADS=max((hq - 1) * qs[1], (hkv - 1) * ks[1], (hkv - 1) * vs[1], (hq - 1) * os_[1]) >= 2**31,
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )
    # One program per query block, sequence and head; one more sequence writes the rows no
    # block owns (past cu_seqlens_q[-1]: 0; past max_seqlen_q or before cu_seqlens_q[0]:
    # NaN). Blocks and sequences share axis 0: CUDA's y and z stop at 65535.
    grid = (n_slots * (batch + 1), hq)
    if grid[0] >= 2**31:
        raise ValueError(f"cu_seqlens_q: {batch} sequences x {n_slots} query blocks of {cfg.block_m} "
                         f"is more programs than one launch can have (2^31 - 1)")  # fmt: skip
    return launch_args, meta, grid


_LOG2E = math.log2(math.e)

# Whether the kernel object runs in the interpreter: fixed when it was decorated.
_INTERPRETED = is_interpreted(kernels.varlen_attention_fwd_kernel)


def _triton_impl(args: _AttnArgs, variant=None) -> torch.Tensor:
    out = empty_output(args.q.shape, args.q.dtype, args.q.device)
    if args.q.shape[0] == 0 or args.q.shape[1] == 0:
        return out
    if args.head_dim == 0:
        return out.zero_()
    plan_ok()  # an allocation and one launch (operand copies are temporaries a plan refuses)
    launch_args, meta, grid = _launch(args, out, variant)
    launch(kernels.varlen_attention_fwd_kernel, grid, launch_args, meta)
    return out


# --------------------------------------------------------------------------------------
# The op


def _needs(args: _AttnArgs) -> Needs:
    reasons = []
    if args.head_dim > MAX_HEAD_DIM:
        reasons.append(f"head_dim {args.head_dim} > {MAX_HEAD_DIM}")
    if args.q.shape[1] > _MAX_GRID_Y:
        reasons.append(f"{args.q.shape[1]} query heads > {_MAX_GRID_Y} (the launch grid's second axis)")
    return Needs(args.q.device, (args.q.dtype,), tuple(reasons))


def _reference_impl(args: _AttnArgs) -> torch.Tensor:
    return varlen_attention_reference(args.q, args.k, args.v, args.cu_seqlens_q, args.cu_seqlens_k, args.max_seqlen_q,
                                      args.max_seqlen_k, softmax_scale=args.softmax_scale, causal=args.causal,
                                      kv_ranges=args.kv_ranges)  # fmt: skip


def _fake(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, causal, kv_ranges):
    _validate(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, causal, kv_ranges)
    return q.new_empty(q.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, cu_q, cu_k, max_q, max_k, scale, causal, ranges = inputs
    ctx.save_for_backward(q, k, v, cu_q, cu_k, ranges)
    ctx.static = (max_q, max_k, scale, causal)


def _backward(ctx, grad_out):
    """Gradients through :func:`varlen_attention_torch` in the inputs' dtype (recomputed;
    it reads cu_seqlens on the host). Training is not this kernel's hot path: the forward
    is what vision towers and cross-attention run at inference."""
    q, k, v, cu_q, cu_k, ranges = ctx.saved_tensors
    max_q, max_k, scale, causal = ctx.static
    leaves = [t.detach().requires_grad_(ctx.needs_input_grad[i]) for i, t in enumerate((q, k, v))]
    wanted = [t for t in leaves if t.requires_grad]
    with torch.enable_grad():
        out = varlen_attention_torch(*leaves, cu_q, cu_k, max_q, max_k, softmax_scale=scale, causal=causal,
                                     kv_ranges=ranges)  # fmt: skip
        grads = iter(torch.autograd.grad(out, wanted, grad_out.to(out.dtype)) if wanted else ())
    return tuple(next(grads) if t.requires_grad else None for t in leaves) + (None,) * 7


# The standard route materializes a (total_q, total_k) mask and SDPA's scores per head:
# above this many score elements (1 GiB in fp32) it does not take the call.
_MAX_DENSE_SCORES = 2**28


def _torch_route(args: _AttnArgs) -> torch.Tensor:
    """The standard PyTorch path: one ``scaled_dot_product_attention`` over all packed
    tokens with a dense boolean mask built on the device from ``cu_seqlens`` (no host
    sync): a query sees the keys of its own sequence, within ``kv_ranges`` and the causal
    bound; a row that sees no key is 0, as in the op."""
    no_plan()  # PyTorch ops, not launches a call plan can replay
    q, k, v = args.q, args.k, args.v
    batch, device = args.batch, q.device
    cu_q, cu_k = args.cu_seqlens_q.long(), args.cu_seqlens_k.long()
    rows, cols = torch.arange(q.shape[0], device=device), torch.arange(k.shape[0], device=device)
    seq_q = torch.searchsorted(cu_q, rows, right=True) - 1  # -1 before the first sequence, batch after the last
    seq_k = torch.searchsorted(cu_k, cols, right=True) - 1
    inside = (seq_q >= 0) & (seq_q < batch)
    mask = (seq_q[:, None] == seq_k[None, :]) & inside[:, None]
    sq, sk = seq_q.clamp(0, max(batch - 1, 0)), seq_k.clamp(0, max(batch - 1, 0))
    pos_q, pos_k = rows - cu_q[sq], cols - cu_k[sk]
    if args.causal:
        shift = (cu_k[sq + 1] - cu_k[sq]) - (cu_q[sq + 1] - cu_q[sq])  # bottom-right aligned
        mask &= pos_k[None, :] <= (pos_q + shift)[:, None]
    if args.kv_ranges is not None:
        ranges = args.kv_ranges.long()
        mask &= (pos_k[None, :] >= ranges[:, :1]) & (pos_k[None, :] < ranges[:, 1:])
    out = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), attn_mask=mask, scale=args.softmax_scale,
        enable_gqa=q.shape[1] != k.shape[1],
    )  # fmt: skip
    return out.transpose(0, 1).nan_to_num(0.0).contiguous()


def _torch_route_applies(args: _AttnArgs) -> str | None:
    total_q, hq, d = args.q.shape
    if total_q == 0 or hq == 0 or d == 0 or args.k.shape[0] == 0:
        return "an empty problem (the launcher's result)"
    if total_q * args.k.shape[0] * hq > _MAX_DENSE_SCORES:
        return f"{total_q} x {args.k.shape[0]} x {hq} heads of dense scores (more than {_MAX_DENSE_SCORES})"
    return None


def _heuristic_config(args: _AttnArgs) -> AttnConfig:
    return attn_config(min(args.max_seqlen_q, args.q.shape[0]), args.head_dim, args.q.element_size())


def _query_blocks_of_64(cfg: AttnConfig) -> AttnConfig:
    """64-query tiles where the heuristic takes 128: twice the programs (more SMs busy for
    a few short images, a small batch of heads), half the registers per program."""
    return dataclasses.replace(cfg, block_m=64, num_warps=8 if cfg.head_pad >= 128 else 4,
                               num_stages=3 if cfg.head_pad <= 64 else 2)  # fmt: skip


def _query_blocks_of_64_apply(args: _AttnArgs) -> str | None:
    return None if _heuristic_config(args).block_m == 128 else "the heuristic already takes 64-query tiles"


def _key_blocks_of_128(cfg: AttnConfig) -> AttnConfig:
    """128-key tiles for heads at most 64 wide (Whisper, BLIP-2, CLIP-B): half the trips
    through the key loop, each with twice the score tile (flash-attention's forward tile
    for d = 64); two stages keep the K and V buffers in shared memory."""
    return dataclasses.replace(cfg, block_n=128, num_warps=max(cfg.num_warps, 4 if cfg.block_m == 64 else 8),
                               num_stages=2)  # fmt: skip


def _key_blocks_of_128_apply(args: _AttnArgs) -> str | None:
    cfg = _heuristic_config(args)
    if cfg.head_pad > 64 or args.q.element_size() > 2:
        return f"heads {args.head_dim} wide in {str(args.q.dtype).removeprefix('torch.')}: 128-key tiles spill"
    return None


# Besides the launcher (its heuristic tiles: the route "heuristic"): the other query tile,
# wider key tiles for narrow heads (both compiled ahead of time without spills: see
# aot_cases), and the standard PyTorch path.
ROUTES = (
    Route("triton-block_m64", functools.partial(_triton_impl, variant=_query_blocks_of_64),
          applies=_query_blocks_of_64_apply),  # fmt: skip
    Route("triton-block_n128", functools.partial(_triton_impl, variant=_key_blocks_of_128),
          applies=_key_blocks_of_128_apply),  # fmt: skip
    Route("torch", _torch_route, standard=True, applies=_torch_route_applies),
)


def bucket(args: _AttnArgs) -> str:
    """The shape bucket of a call: sequences, the longest query and all keys as powers of
    two, heads, head dim, dtype, mask kind."""
    q, k = args.q, args.k
    mask = ("-causal" if args.causal else "") + ("-ranges" if args.kv_ranges is not None else "")
    return (f"b{next_power_of_2(max(args.batch, 1))}-q{next_power_of_2(max(args.max_seqlen_q, 1))}-"
            f"tk{next_power_of_2(max(k.shape[0], 1))}-h{q.shape[1]}x{k.shape[1]}-d{q.shape[2]}-"
            f"{str(q.dtype).removeprefix('torch.')}{mask}")  # fmt: skip


OP = Op(
    OP_NAME,
    schema="(Tensor q, Tensor k, Tensor v, Tensor cu_seqlens_q, Tensor cu_seqlens_k, SymInt max_seqlen_q, "
    "SymInt max_seqlen_k, float softmax_scale, bool causal, Tensor? kv_ranges) -> Tensor",
    validate=_validate,
    needs=_needs,
    kernel=kernels.varlen_attention_fwd_kernel,
    capabilities=CAPABILITIES,
    reference=_reference_impl,
    launch=_triton_impl,
    fake=_fake,
    setup_context=_setup_context,
    backward=_backward,
    routes=ROUTES,
    bucket=bucket,
    reduction_length=lambda args: max(args.max_seqlen_k, 1),  # the keys each row sums over
)


def varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, *, softmax_scale=None,
                     causal=False, kv_ranges=None, check=None) -> torch.Tensor:  # fmt: skip
    """Attention over packed variable-length sequences (flash-attn's varlen contract), with
    optional per-query key ranges.

    Args:
        q: ``(total_q, Hq, d)``: the queries of all sequences, packed one after another.
        k, v: ``(total_k, Hkv, d)``; ``Hq % Hkv == 0`` (grouped-query attention: query head
            ``h`` reads key/value head ``h // (Hq // Hkv)``). Same dtype as ``q``
            (float16, bfloat16 or float32). Any strides, with the last dim contiguous.
        cu_seqlens_q, cu_seqlens_k: ``(B + 1,)`` int32, the cumulative lengths: sequence
            ``b`` owns query rows ``[cu_seqlens_q[b], cu_seqlens_q[b+1])`` and key rows
            ``[cu_seqlens_k[b], cu_seqlens_k[b+1])``. Query and key lengths may differ
            (cross-attention), and either may be 0.
        max_seqlen_q, max_seqlen_k: Python ints, the longest query / key sequence. Python
            ints so no host sync reads them from the device. ``max_seqlen_q`` sizes the
            launch grid and must be >= every query length, as in flash-attn; rows past it
            come out NaN (never silently stale memory). ``max_seqlen_k`` is not needed by
            the kernel (it reads the key lengths from ``cu_seqlens_k``) and is validated
            for the contract.
        softmax_scale: scale of ``q @ k^T`` before the softmax; default ``1 / sqrt(d)``.
        causal: bottom-right aligned causal mask, as flash-attn: query ``i`` of a sequence
            with ``Lq`` queries and ``Lk`` keys sees keys ``j <= i + Lk - Lq``.
        kv_ranges: ``(total_q, 2)`` int32 or None: query row ``i`` sees only the keys
            ``[start, end)`` of its own sequence (indices relative to the sequence's first
            key, clipped to ``[0, Lk)``); combined with ``causal`` by intersection. This
            expresses image masks such as Mllama's (text token t sees the tiles of the
            images before it) without a dense mask; key blocks outside every query's range
            are skipped, not masked.
        check: as for every op (:func:`mmkernels.backend.resolve_check`): True validates
            the VALUES of the index tensors, which needs one host sync (so it is off by
            default, as in flash-attn): ``cu_seqlens`` start
            at 0, never decrease and end at ``total_q`` / ``total_k``; ``max_seqlen_*`` >=
            every length; every ``kv_ranges`` row lies inside its sequence's keys
            (``0 <= start``, ``end <= Lk``; ``start >= end`` is an empty range). Each
            violation raises ``ValueError`` naming the argument. None (default): off, or on
            under the environment variable ``MMKERNELS_DEBUG_CHECKS=1``. Without the check, offsets
            that break the contract never make the kernel read or write outside q, k, v,
            kv_ranges or the output (it clamps each sequence to ``[0, total]`` with
            ``end >= start``) and every output row is written, but the rows of such a
            layout are not meaningful: rows before ``cu_seqlens_q[0]`` are NaN, and
            sequences that overlap through decreasing offsets may write a row twice.

    Returns:
        ``(total_q, Hq, d)`` in q's dtype. A query that sees no key (empty range, no keys,
        causal rows before the first key) is exactly 0, never NaN; rows past
        ``cu_seqlens_q[-1]`` are 0 (as in the reference).

    One Triton launch on CUDA (and on CPU under ``TRITON_INTERPRET=1``): online softmax in
    fp32, tensor-core dots in fp16/bf16 (fp32 inputs: exact fp32 dots, or TF32 where
    ``torch.backends.cuda.matmul.allow_tf32``), head dims up to 256 as two power-of-two
    chunks (80 = 64 + 16, 96 = 64 + 32; 72 = 64 + 16 with 8 columns masked). Otherwise the reference. Gradients are
    available through a PyTorch recomputation (see :func:`varlen_attention_torch`).
    Registered as ``torch.ops.mmkernels.varlen_attention``.
    """
    check = resolve_check(check, default=False)
    key = None
    if not check:  # the check reads values on the host: never replayed
        # Keyed by the arguments as given (softmax_scale None or a number); the plan takes
        # only the tensors from them, at the same positions as in the op's inputs.
        given = (q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, causal, kv_ranges)
        key = plan_key(given)
        out = OP.replay(key, given)
        if out is not MISS:
            return out
    args = _validate(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, causal, kv_ranges)
    if check:
        check_values(args)
    op_inputs = (q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, args.softmax_scale, causal, kv_ranges)
    return OP.call(op_inputs, args, key)


# --------------------------------------------------------------------------------------
# Ahead-of-time cases: real models, bf16.


def aot_cases() -> list[AotCase]:
    """The launches of real models that ``tools/kernel_report.py`` compiles ahead of time for
    sm_80 and sm_90 (made when asked, not when the module is imported)."""
    cases: list[AotCase] = []

    def _aot_case(name, lengths_q, lengths_k, hq, hkv, d, *, causal=False, ranges=False, wide_heads=False,
                  variant=None):  # fmt: skip
        def make_launch():
            cu_q = torch.tensor([0] + list(torch.tensor(lengths_q).cumsum(0)), dtype=torch.int32)
            cu_k = torch.tensor([0] + list(torch.tensor(lengths_k).cumsum(0)), dtype=torch.int32)
            q = torch.empty(int(cu_q[-1]), hq, d, dtype=torch.bfloat16)
            k = torch.empty(int(cu_k[-1]), hkv, d, dtype=torch.bfloat16)
            kv_ranges = torch.zeros(q.shape[0], 2, dtype=torch.int32) if ranges else None
            args = _validate(q, k, torch.empty_like(k), cu_q, cu_k, max(lengths_q), max(lengths_k), None, causal, kv_ranges)
            out = torch.empty_like(q)
            launch_args, meta, grid = _launch(args, out, variant)
            meta["UPCAST_DOT"] = False  # compiled for a GPU, never the interpreter
            meta["WIDE_HEADS"] = meta["WIDE_HEADS"] or wide_heads  # the real layout would need > 4 GB here
            return launch_args, meta, grid

        cases.append(AotCase(name, kernels.varlen_attention_fwd_kernel, make_launch, tensor_cores=True))

    # Llama-3.2-11B-Vision cross-attention: 1024 text tokens x (2 images x 4 tiles x 1601) keys,
    # GQA 32/8, d=128, per-token image ranges.
    _aot_case("varlen_attention/mllama-11b-cross/bf16", [1024], [2 * 4 * 1601], 32, 8, 128, ranges=True)
    # Qwen2-VL-7B vision self-attention: images of 1024 and 256 patches, 16 heads, d=80.
    _aot_case("varlen_attention/qwen2-vl-7b-vision/bf16", [1024, 256], [1024, 256], 16, 16, 80)
    # BLIP-2 Q-Former cross-attention: 32 queries x 257 image tokens, d=64.
    _aot_case("varlen_attention/blip2-qformer-cross/bf16", [32] * 8, [257] * 8, 12, 12, 64)
    # Mllama cross-attention from a short prompt (64-query blocks, d=128).
    _aot_case("varlen_attention/mllama-11b-cross-short/bf16", [40, 17], [4 * 1601, 2 * 1601], 32, 8, 128, ranges=True)
    # Whisper-large-v3 decoder cross-attention: 448 tokens x 1500 frames, d=64.
    _aot_case("varlen_attention/whisper-large-v3-cross/bf16", [448], [1500], 20, 20, 64)
    # Head dims 72 and 96 (64 + 16 with 8 masked, 64 + 32): ViT-style towers with 72- and
    # 96-wide heads (e.g. SigLIP-so400m: 1152 / 16 = 72), one image of 729 patches each.
    _aot_case("varlen_attention/siglip-so400m-d72/bf16", [729, 729], [729, 729], 16, 16, 72)
    _aot_case("varlen_attention/siglip-so400m-d72-short/bf16", [40, 17], [729, 729], 16, 16, 72)
    _aot_case("varlen_attention/d96/bf16", [577, 257], [577, 257], 16, 16, 96)
    # The same with 64-bit head offsets: q/k/v head-major with a head stride past 2^31 / 16
    # elements (a long video's vision tower through the "mmkernels" attention after RoPE).
    _aot_case("varlen_attention/qwen2-vl-7b-vision-wide-heads/bf16", [1024, 256], [1024, 256], 16, 16, 80, wide_heads=True)
    # Causal text self-attention with d=128 (decoder prefill through the same op).
    _aot_case("varlen_attention/causal-d128/bf16", [2048, 777], [2048, 777], 32, 8, 128, causal=True)
    # The tile routes (mmkernels tune times them against the heuristic), at the shapes above
    # where they apply: 64-query tiles for every head width the towers have, and 128-key
    # tiles for 64-wide heads (long and short queries).
    for name, lengths, hq, hkv, d, ranges in (
        ("mllama-11b-cross", ([1024], [2 * 4 * 1601]), 32, 8, 128, True),
        ("qwen2-vl-7b-vision", ([1024, 256], [1024, 256]), 16, 16, 80, False),
        ("siglip-so400m-d72", ([729, 729], [729, 729]), 16, 16, 72, False),
        ("d96", ([577, 257], [577, 257]), 16, 16, 96, False),
        ("whisper-large-v3-cross", ([448], [1500]), 20, 20, 64, False),
    ):
        _aot_case(f"varlen_attention/{name}/block_m64/bf16", *lengths, hq, hkv, d, ranges=ranges,
                  variant=_query_blocks_of_64)  # fmt: skip
    _aot_case("varlen_attention/whisper-large-v3-cross/block_n128/bf16", [448], [1500], 20, 20, 64,
              variant=_key_blocks_of_128)  # fmt: skip
    _aot_case("varlen_attention/blip2-qformer-cross/block_n128/bf16", [32] * 8, [257] * 8, 12, 12, 64,
              variant=_key_blocks_of_128)  # fmt: skip
    return cases
