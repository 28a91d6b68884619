"""Quantized projector matmul: ``act(x @ W^T + bias)`` with W in int8, int4 or fp8.

Replaces the multimodal projector's bf16 ``nn.Linear`` (-> activation) with one launch that
reads the weight in its quantized format (:mod:`mmkernels.quant`), dequantizes it in
registers, runs the GEMM on tensor cores with fp32 accumulation and applies the scales,
the bias and the activation in the epilogue.

Public: :func:`quantized_linear` (registered as ``mmkernels::quantized_linear``), its
reference :func:`quantized_linear_reference` (same signature; it defines the op),
:data:`CAPABILITIES` (per scheme), :data:`ACTIVATIONS`, :func:`linear_config`.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from triton.tools.tensor_descriptor import TensorDescriptor

from mmkernels.backend import (
    MISS,
    AotCase,
    Capabilities,
    Needs,
    Op,
    cdiv,
    matmul_tf32,
    compute_capability,
    empty_output,
    is_interpreted,
    launch,
    no_plan,
    plan_key,
    plan_ok,
    next_power_of_2,
)
from mmkernels.ops import _quantized_linear_kernels as kernels
from mmkernels.quant import FP8_MAX, MIN_SCALE, SCHEME_TABLE, SCHEMES, QuantizedWeight, quantize_activations_fp8
from mmkernels.routes import Route

__all__ = [
    "ACTIVATIONS",
    "CAPABILITIES",
    "LinearConfig",
    "apply_activation",
    "linear_config",
    "quantized_linear",
    "quantized_linear_reference",
]

OP_NAME = "quantized_linear"
ACTIVATIONS: dict[str | None, int] = {
    None: kernels.ACT_NONE,
    "gelu": kernels.ACT_GELU,
    "gelu_tanh": kernels.ACT_GELU_TANH,
    "quick_gelu": kernels.ACT_QUICK_GELU,
    "silu": kernels.ACT_SILU,
}
_SCHEME_IDS = {"w8a16": kernels.SCHEME_W8A16, "w4a16": kernels.SCHEME_W4A16, "fp8": kernels.SCHEME_FP8}
_X_DTYPES = frozenset({torch.float16, torch.bfloat16, torch.float32})
# Activation dtypes the kernels compute with (float64 runs the reference); fp8 needs the
# e4m3 tensor-core dot of sm_89+ (Ada, Hopper). Triton 3.9's interpreter loads and
# upcasts float8_e4m3fn exactly, so the fp8 GEMM kernel runs there; its fp32 -> e4m3 cast
# is not round-to-nearest-even (see _triton_impl), so the interpreter path quantizes the
# activations with PyTorch.
CAPABILITIES: dict[str, Capabilities] = {
    name: Capabilities(dtypes=_X_DTYPES, min_compute_capability=info.min_compute_capability)
    for name, info in SCHEME_TABLE.items()
}
# Programs the small-M heuristic aims for: about two waves of an H100 / H200 (132 SMs).
_TARGET_PROGRAMS = 264


# --------------------------------------------------------------------------------------
# Validation


@dataclass
class _LinearArgs:
    x2d: torch.Tensor  # (M, K), unit stride along K (any row stride, 0 included)
    qweight: QuantizedWeight
    bias: torch.Tensor | None  # (N,), unit stride
    activation: str | None
    lead: tuple[int, ...]

    @property
    def out_shape(self) -> tuple[int, ...]:
        return (*self.lead, self.qweight.out_features)


def _check_activation(activation) -> None:
    if activation not in ACTIVATIONS:
        known = [a for a in ACTIVATIONS if a is not None]
        raise ValueError(f"activation: expected None or one of {known}, got {activation!r}")


def _validate(x, qweight, bias, activation) -> _LinearArgs:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x: expected a torch.Tensor, got {type(x).__name__}")
    if not isinstance(qweight, QuantizedWeight):
        raise TypeError(
            f"qweight: expected a mmkernels.quant.QuantizedWeight (from mmkernels.quant.quantize), "
            f"got {type(qweight).__name__}"
        )
    _check_activation(activation)
    if not x.is_floating_point() or x.dtype not in (*_X_DTYPES, torch.float64):
        raise TypeError(f"x: expected float16, bfloat16, float32 or float64, got {x.dtype}")
    if x.dim() < 1:
        raise ValueError("x: expected (..., in_features), got a scalar")
    k = qweight.in_features
    if SCHEME_TABLE[qweight.scheme].grouped and (not isinstance(qweight.group_size, (int, torch.SymInt))
                                                  or k % qweight.group_size):  # fmt: skip
        # QuantizedWeight refuses this when built; a field changed afterwards would make the
        # kernel read the next row's scales for a partial last group.
        raise ValueError(f"qweight: in_features (K={k}) must be a multiple of its group_size={qweight.group_size!r}")
    if x.shape[-1] != k:
        raise ValueError(f"x: expected last dim in_features={k} (that of qweight), got shape {tuple(x.shape)}")
    if qweight.device != x.device:
        raise ValueError(f"qweight: expected device {x.device} (that of x), got {qweight.device}")
    for name in ("scales", "zeros"):
        t = getattr(qweight, name)
        if t is not None and t.device != x.device:
            raise ValueError(f"qweight.{name}: expected device {x.device} (that of x), got {t.device}")
    if bias is not None:
        if not isinstance(bias, torch.Tensor):
            raise TypeError(f"bias: expected a torch.Tensor or None, got {type(bias).__name__}")
        if bias.shape != (qweight.out_features,):
            raise ValueError(f"bias: expected shape ({qweight.out_features},) (out_features), got {tuple(bias.shape)}")
        if not bias.is_floating_point():
            raise TypeError(f"bias: expected a floating dtype, got {bias.dtype}")
        if bias.device != x.device:
            raise ValueError(f"bias: expected device {x.device} (that of x), got {bias.device}")
        if not bias.is_contiguous():
            # The kernels read bias[n] at bias_ptr + n: a strided or expanded view (stride 0,
            # e.g. torch.zeros(1).expand(N)) is copied, N elements.
            bias = bias.contiguous()
    lead = tuple(x.shape[:-1])
    x2d = x.reshape(-1, k)
    if x2d.shape[0] and k and x2d.stride(1) != 1:
        # The kernels take a row stride (any, 0 for rows expanded from one) and read each
        # row's K elements at unit stride: only a strided last dim is copied.
        x2d = x2d.contiguous()
    return _LinearArgs(x2d, qweight, bias, activation, lead)


# --------------------------------------------------------------------------------------
# Reference


def apply_activation(y: torch.Tensor, activation: str | None) -> torch.Tensor:
    """``activation`` (a key of :data:`ACTIVATIONS`) applied to ``y`` in PyTorch: what the
    kernels' epilogue computes, for references and for integrations that check a module's
    activation against it."""
    if activation is None:
        return y
    if activation == "gelu":
        return F.gelu(y)
    if activation == "gelu_tanh":
        return F.gelu(y, approximate="tanh")
    if activation == "quick_gelu":
        return y * torch.sigmoid(1.702 * y)
    return F.silu(y)


def quantized_linear_reference(x, qweight, bias=None, *, activation=None) -> torch.Tensor:
    """PyTorch reference of :func:`quantized_linear` (it defines the op), in float64.

    ``act(x' @ W'^T + bias)`` where ``W' = qweight.kernel_weight(x.dtype)`` (the dequantized
    weight exactly as the kernel multiplies by it) and ``x' = x``, except for fp8, where
    ``x'`` is ``x`` quantized per token (:func:`mmkernels.quant.quantize_activations_fp8`)
    and dequantized (a row holding NaN or inf has scale NaN: that row's outputs are NaN).
    Computed in float64, rounded once to ``x.dtype``.
    """
    args = _validate(x, qweight, bias, activation)
    return _reference_impl(args)


def _reference_impl(args: _LinearArgs) -> torch.Tensor:
    f64 = torch.float64
    qw, x2d = args.qweight, args.x2d
    if qw.info.quantized_activations:
        xq, sx = quantize_activations_fp8(x2d)
        xr = xq.to(f64) * sx.to(f64)[:, None]
    else:
        xr = x2d.to(f64)
    w = qw.kernel_weight(x2d.dtype).to(x2d.device)
    y = xr @ w.t()
    if args.bias is not None:
        y = y + args.bias.to(f64)
    y = apply_activation(y, args.activation)
    return y.to(x2d.dtype).reshape(args.out_shape)


# --------------------------------------------------------------------------------------
# Launcher


@dataclass(frozen=True)
class LinearConfig:
    block_m: int
    block_n: int
    block_k: int
    split_k: int
    k_per_split: int
    group_m: int
    num_warps: int
    num_stages: int
    # w8a16 / w4a16: compute out^T = W x^T, so the weight dequantized in registers is the
    # tensor-core dot's first operand, which may stay in registers (Hopper's wgmma takes
    # only that one from registers; as the second operand it is stored to shared memory
    # every K step, and the wgmma waits for it). Ignored for fp8 (nothing to dequantize).
    # Which layout linear_config picks, and why: its docstring.
    swap_ab: bool = False
    # fp8, large M: both operands read through TMA tensor descriptors
    # (kernels.fp8_linear_tma_kernel; sm_90+), 128 x 256 tiles where that still fills the
    # GPU. Which calls get it: linear_config's ``tma`` argument.
    tma: bool = False


@functools.lru_cache(maxsize=4096)  # pure in its integer arguments; frozen result
def linear_config(m: int, n: int, k: int, scheme: str, group_size: int | None, element_size: int,
                  tma: bool = False) -> LinearConfig:  # fmt: skip
    """Deterministic tiles per M range (the same shapes always get the same config).

    * ``M <= 16`` (decode-like, a few image tokens): 16-row tiles, 64 columns, and split-K
      until about two waves of programs (memory-bound: the weight read must use every SM).
    * ``M <= 64``: 32 x 64 tiles, split-K likewise.
    * ``M <= 256``: 64 x 128 tiles, 8 warps.
    * larger M (576 tokens per image and up): 128 x 128 tiles, 8 warps, 3 stages.

    ``BLOCK_K`` is 64 (128 for fp8's one-byte operands; 32 for fp32 activations), and at
    most the w4a16 group size so that each K tile has one scale and zero per column.

    ``tma``: the device reads tensor descriptors (sm_90+) and the fp8 operands are aligned
    for them (see :func:`_tma_ready`). fp8 with ``M > 256`` then takes
    :func:`~mmkernels.ops._quantized_linear_kernels.fp8_linear_tma_kernel`: 128 x 256 x 128
    tiles, 8 warps, 3 stages, the tile of Triton's own Hopper fp8 matmul tutorials, or
    128 x 128 x 128 and 4 stages where 256-wide tiles would leave the GPU less than one
    program per SM (``_TARGET_PROGRAMS // 2``). The copy engine moves each tile, so the K
    loop has no address arithmetic and no per-thread copies, and needs fewer registers;
    a GELU epilogue over the whole 128 x 256 fp32 accumulator spills, so the TMA kernel
    runs it on the two column halves in turn.

    The tile layout (``swap_ab``) follows the instructions the K loop issues per weight
    element and thread: the swapped layout (``W . x^T``: the dequantized tile is wgmma's
    register operand, no per-step store to shared memory, asynchronous wgmma) pays for
    that in byte shuffles into the operand's layout. Small M is memory-bound, where the
    issue rate caps the weight stream, so the layout with fewer instructions per weight
    wins: w8a16 unswapped at every M (at large M it also needs fewer registers: two CTAs
    per SM) and w4a16 at M <= 16; w4a16 above that keeps the swapped layout (fewer or
    equal instructions, asynchronous wgmma). The instruction counts, the registers
    behind these choices and what has been timed: ``docs/defaults.md``.
    """
    info = SCHEME_TABLE[scheme]
    fp8 = info.quantized_activations  # e4m3 operands: tiles of their own
    if tma and fp8 and m > 256:
        wide = cdiv(m, 128) * cdiv(n, 256) >= _TARGET_PROGRAMS // 2
        return LinearConfig(128, 256 if wide else 128, 128, 1, cdiv(k, 128) * 128, group_m=8, num_warps=8,
                            num_stages=3 if wide else 4, tma=True)  # fmt: skip
    # Integer weights are converted (and w4a16 unpacked) in registers: 8 warps share that
    # work; at 4 warps the 64 x 128 (K x N) tiles spill (kernel report, sm_80 and sm_90).
    small_warps = 4 if fp8 else 8
    if m <= 16:
        bm, bn, bk, warps, stages = 16, 64, 128, small_warps, 4
    elif m <= 64:
        bm, bn, bk, warps, stages = 32, 64, 128, small_warps, 4
    elif m <= 256:
        bm, bn, bk, warps, stages = 64, 128, 64, 8, 3
    else:
        bm, bn, bk, warps, stages = 128, 128, 64, 8, 3
    if fp8 and m > 64:
        bk = 128
    if element_size >= 4:
        bk = min(bk, 32)
    if info.grouped:
        bk = min(bk, group_size)  # a K tile holds one group's scale
    k_steps = max(cdiv(k, bk), 1)
    split = 1
    if m <= 64:
        tiles = cdiv(m, bm) * cdiv(n, bn)
        # Keep at least 4 K steps per split, at most 16 splits.
        while tiles * split < _TARGET_PROGRAMS and k_steps // (split * 2) >= 4 and split < 16:
            split *= 2
    k_per_split = cdiv(k_steps, split) * bk
    split = max(cdiv(k, k_per_split), 1)  # no empty splits
    return LinearConfig(bm, bn, bk, split, k_per_split, group_m=8, num_warps=warps, num_stages=stages,
                        swap_ab=info.grouped and m > 16)


def _launch(args: _LinearArgs, out: torch.Tensor, x_gemm: torch.Tensor, x_scales: torch.Tensor | None,
            partial: torch.Tensor | None, cfg: LinearConfig):  # fmt: skip
    """(args, meta, grid) of the GEMM launch; also used by the AOT report."""
    qw = args.qweight
    m, k = args.x2d.shape
    n = qw.out_features
    dummy = qw.scales  # never read: the matching flag is off
    target = partial if cfg.split_k > 1 else out
    launch_args = (
        x_gemm, qw.packed, qw.scales,
        qw.zeros if qw.zeros is not None else dummy,
        x_scales if x_scales is not None else dummy,
        args.bias if args.bias is not None else dummy,
        target, m, n, k, cfg.k_per_split,
        x_gemm.stride(0), qw.packed.stride(0), n, m * n,
    )  # fmt: skip
    fp32 = args.x2d.dtype == torch.float32
    fp8 = qw.info.quantized_activations
    meta = dict(
        SCHEME=_SCHEME_IDS[qw.scheme],
        GROUP_SIZE=qw.group_size or 1,
        HAS_BIAS=args.bias is not None,
        ACTIVATION=ACTIVATIONS[args.activation],
        SPLIT_K=cfg.split_k,
        UPCAST_DOT=_INTERPRETED and not (fp32 and not fp8),
        DOT_PRECISION="tf32" if fp32 and not fp8 and out.is_cuda and matmul_tf32() else "ieee",
        BLOCK_M=cfg.block_m,
        BLOCK_N=cfg.block_n,
        BLOCK_K=cfg.block_k,
        GROUP_M=cfg.group_m,
        SWAP_AB=cfg.swap_ab and not fp8,
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )
    grid = (cdiv(m, cfg.block_m) * cdiv(n, cfg.block_n), cfg.split_k)
    return launch_args, meta, grid



# Whether the kernels run in the interpreter: fixed when they were decorated.
_INTERPRETED = is_interpreted(kernels.quantized_linear_kernel)


def _tma_launch(args: _LinearArgs, out: torch.Tensor, x_gemm: torch.Tensor, x_scales: torch.Tensor,
                cfg: LinearConfig):  # fmt: skip
    """(args, meta, grid) of the fp8 TMA GEMM launch; also used by the AOT report."""
    qw = args.qweight
    m, k = x_gemm.shape
    n = qw.out_features
    launch_args = (
        TensorDescriptor.from_tensor(x_gemm, [cfg.block_m, cfg.block_k]),
        TensorDescriptor.from_tensor(qw.packed, [cfg.block_n, cfg.block_k]),
        qw.scales, x_scales,
        args.bias if args.bias is not None else qw.scales,  # never read without HAS_BIAS
        out, m, n, k, out.stride(0),
    )  # fmt: skip
    meta = dict(
        HAS_BIAS=args.bias is not None,
        ACTIVATION=ACTIVATIONS[args.activation],
        UPCAST_DOT=is_interpreted(kernels.fp8_linear_tma_kernel),
        BLOCK_M=cfg.block_m,
        BLOCK_N=cfg.block_n,
        BLOCK_K=cfg.block_k,
        GROUP_M=cfg.group_m,
        EPILOGUE_HALVES=2 if cfg.block_n > 128 else 1,
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )
    return launch_args, meta, (cdiv(m, cfg.block_m) * cdiv(n, cfg.block_n),)


def _tma_ready(qw: QuantizedWeight, device: torch.device) -> bool:
    """Whether fp8 operands can be read through TMA descriptors: NVIDIA sm_90+ (or the
    interpreter, which runs them too), and the weight's rows 16-byte aligned, as
    descriptors require (the quantized activations are a fresh contiguous tensor with the
    same row length, so aligned with it)."""
    if not qw.info.quantized_activations or qw.in_features % 16 or qw.packed.data_ptr() % 16:
        return False
    if device.type == "cuda":
        return torch.version.hip is None and compute_capability(device) >= (9, 0)
    return device.type == "cpu"


def _splitk_launch(args: _LinearArgs, out, x_scales, partial, split_k: int):
    qw = args.qweight
    m, n = args.x2d.shape[0], qw.out_features
    block_m, block_n = 16, 128
    launch_args = (
        partial, qw.scales,
        x_scales if x_scales is not None else qw.scales,
        args.bias if args.bias is not None else qw.scales,
        out, m, n, m * n, n, n,
    )  # fmt: skip
    meta = dict(
        SCHEME=_SCHEME_IDS[qw.scheme],
        HAS_BIAS=args.bias is not None,
        ACTIVATION=ACTIVATIONS[args.activation],
        SPLIT_K=split_k,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        num_warps=4,
    )
    return launch_args, meta, (cdiv(m, block_m), cdiv(n, block_n))


def _quantize_rows_launch(x2d, xq, xs):
    k = x2d.shape[1]
    meta = dict(FP8_MAX=FP8_MAX, MIN_SCALE=MIN_SCALE, BLOCK_K=min(2048, next_power_of_2(max(k, 16))), num_warps=4)
    return (x2d, xq, xs, k, x2d.stride(0)), meta, (x2d.shape[0],)


def _triton_impl(args: _LinearArgs, variant: Callable[[LinearConfig], LinearConfig] | None = None) -> torch.Tensor:
    """The kernels with :func:`linear_config`'s tiles, changed by ``variant`` where given (a route)."""
    # Allocations and launches only (operand copies are temporaries a plan refuses).
    plan_ok()
    qw = args.qweight
    # The kernel assumes row-major tensors (checked without building the tensors() dict).
    if not (qw.packed.is_contiguous() and qw.scales.is_contiguous() and (qw.zeros is None or qw.zeros.is_contiguous())):
        qw = dataclasses.replace(qw, **{name: t.contiguous() for name, t in qw.tensors().items()})
        args = dataclasses.replace(args, qweight=qw)
    x2d = args.x2d
    m, k = x2d.shape
    n = qw.out_features
    device = x2d.device
    out = empty_output((m, n), x2d.dtype, device)
    if m == 0:
        return out.reshape(args.out_shape)
    cfg = linear_config(m, n, k, qw.scheme, qw.group_size, x2d.element_size(), _tma_ready(qw, device))
    if variant is not None:
        cfg = variant(cfg)
    x_gemm, x_scales = x2d, None
    fp8 = qw.info.quantized_activations
    if fp8 and device.type == "cpu":
        # Triton 3.9's interpreter rounds fp32 -> e4m3 wrongly (a carry into the exponent
        # gives half the power of two: 126.5 -> 64, not 128; ties are not rounded to even),
        # so under the interpreter the per-token quantization is PyTorch's (the
        # definition); the GEMM kernel still runs there. quantize_rows_fp8_kernel is
        # compiled by the kernel report; tests pin its interpreter run to those two flaws.
        x_gemm, x_scales = quantize_activations_fp8(x2d)
    elif fp8:
        x_gemm = empty_output((m, k), torch.float8_e4m3fn, device)
        x_scales = empty_output((m,), torch.float32, device)
        a, meta, grid = _quantize_rows_launch(x2d, x_gemm, x_scales)
        launch(kernels.quantize_rows_fp8_kernel, grid, a, meta)
    if cfg.tma:
        a, meta, grid = _tma_launch(args, out, x_gemm, x_scales, cfg)
        launch(kernels.fp8_linear_tma_kernel, grid, a, meta)
        return out.reshape(args.out_shape)
    partial = empty_output((cfg.split_k, m, n), torch.float32, device) if cfg.split_k > 1 else None
    a, meta, grid = _launch(args, out, x_gemm, x_scales, partial, cfg)
    launch(kernels.quantized_linear_kernel, grid, a, meta)
    if partial is not None:
        a, meta, grid = _splitk_launch(args, out, x_scales, partial, cfg.split_k)
        launch(kernels.splitk_epilogue_kernel, grid, a, meta)
    return out.reshape(args.out_shape)


# --------------------------------------------------------------------------------------
# The op


def _rebuild(x, packed, scales, zeros, scheme, group_size) -> QuantizedWeight:
    return QuantizedWeight(
        scheme=scheme,
        packed=packed,
        scales=scales,
        zeros=zeros,
        group_size=group_size or None,
        in_features=x.shape[-1],
        out_features=packed.shape[0],
        dtype=x.dtype,
    )


def _validate_op_inputs(x, packed, scales, zeros, bias, scheme, group_size, activation) -> _LinearArgs:
    """The registered op's inputs (the weight's tensors and fields, "none" for no activation) validated."""
    return _validate(x, _rebuild(x, packed, scales, zeros, scheme, group_size), bias,
                     None if activation == "none" else activation)  # fmt: skip


def _needs(args: _LinearArgs) -> Needs:
    x, bias = args.x2d, args.bias
    dtypes = (x.dtype, bias.dtype) if bias is not None and bias.dtype != torch.float64 else (x.dtype,)
    return Needs(x.device, dtypes, variant=args.qweight.scheme)


def _fake(x, packed, scales, zeros, bias, scheme, group_size, activation):
    return x.new_empty((*x.shape[:-1], packed.shape[0]))


def _setup_context(ctx, inputs, output):
    x, packed, scales, zeros, bias, scheme, group_size, activation = inputs
    ctx.save_for_backward(x, packed, scales, zeros, bias)
    ctx.meta = (scheme, group_size, activation)


def _backward(ctx, grad_out):
    """Gradients for ``x`` and ``bias`` from the op's math in PyTorch (the weight is frozen;
    fp8's activation quantization passes gradients straight through)."""
    x, packed, scales, zeros, bias = ctx.saved_tensors
    scheme, group_size, activation = ctx.meta
    qw = _rebuild(x, packed, scales, zeros, scheme, group_size)
    needs_x, needs_b = ctx.needs_input_grad[0], bias is not None and ctx.needs_input_grad[4]
    with torch.enable_grad():
        xl = x.detach().requires_grad_(needs_x)
        bl = bias.detach().requires_grad_(needs_b) if bias is not None else None
        w = qw.kernel_weight(x.dtype).to(device=x.device, dtype=x.dtype)
        y = apply_activation(F.linear(xl, w, None if bl is None else bl.to(x.dtype)), None if activation == "none" else activation)
        leaves = [t for t, need in ((xl, needs_x), (bl, needs_b)) if need]
        grads = list(torch.autograd.grad(y, leaves, grad_out.to(y.dtype))) if leaves else []
    gx = grads.pop(0) if needs_x else None
    gb = grads.pop(0).to(bias.dtype) if needs_b else None
    return gx, None, None, None, gb, None, None, None


def _torch_route(args: _LinearArgs) -> torch.Tensor:
    """The standard PyTorch path (vLLM's AWQ route from 256 tokens): the weight dequantized
    to x's dtype, then cuBLAS (``F.linear`` with the bias) and the activation in x's dtype."""
    no_plan()  # PyTorch ops, not launches a call plan can replay
    x, qw = args.x2d, args.qweight
    bias = args.bias.to(x.dtype) if args.bias is not None else None
    with torch.no_grad():
        y = apply_activation(F.linear(x, qw.dequantize(x.dtype).to(x.device), bias), args.activation)
    return y.reshape(args.out_shape)


def _torch_route_applies(args: _LinearArgs) -> str | None:
    if args.qweight.info.quantized_activations:
        return f"{args.qweight.scheme} quantizes the activations too: no weight-only PyTorch path computes the op"
    return None


def _heuristic_config(args: _LinearArgs) -> LinearConfig:
    qw, x2d = args.qweight, args.x2d
    return linear_config(x2d.shape[0], qw.out_features, qw.in_features, qw.scheme, qw.group_size, x2d.element_size(),
                         _tma_ready(qw, x2d.device))  # fmt: skip


def _swapped(cfg: LinearConfig) -> LinearConfig:
    return dataclasses.replace(cfg, swap_ab=not cfg.swap_ab)


def _swap_applies(args: _LinearArgs) -> str | None:
    if args.qweight.info.quantized_activations:
        return "fp8 dequantizes nothing in registers: one tile layout"
    return None


def _unsplit(cfg: LinearConfig) -> LinearConfig:
    k_steps = cdiv(cfg.k_per_split * cfg.split_k, cfg.block_k)
    return dataclasses.replace(cfg, split_k=1, k_per_split=k_steps * cfg.block_k)


def _unsplit_applies(args: _LinearArgs) -> str | None:
    return None if _heuristic_config(args).split_k > 1 else "the heuristic does not split K here"


# From this many rows a weight-only call takes the standard route (dequantize + cuBLAS)
# until a route table says otherwise: the GEMM is compute-bound there, and on the H200 run
# (benchmarks/results/H200-2026-12-01-9359c97, Qwen2-VL-7B's merger at M = 2304) the
# kernels ran at 0.61x (w8a16) and 0.37x (w4a16) of cuBLAS on the bf16 weight alone, while
# dequantizing adds about a fifth of the GEMM's time there (3 bytes moved per weight
# element against 2 * M FLOPs). vLLM's AWQ takes the same route from 256 tokens.
_STANDARD_FROM_ROWS = 2048


def _default_route(args: _LinearArgs) -> str | None:
    if args.x2d.shape[0] >= _STANDARD_FROM_ROWS and _torch_route_applies(args) is None:
        return "torch"
    return None


# Besides the launcher (its heuristic tiles, split-K and TMA forms: the route "heuristic"):
# the other tile layout (linear_config's swap_ab, chosen from instruction counts, untimed),
# K unsplit where the heuristic splits it, and the standard PyTorch path.
ROUTES = (
    Route("triton-swap_ab", functools.partial(_triton_impl, variant=_swapped), applies=_swap_applies),
    Route("triton-no-split-k", functools.partial(_triton_impl, variant=_unsplit), applies=_unsplit_applies),
    Route("torch", _torch_route, standard=True, applies=_torch_route_applies),
)


def bucket(args: _LinearArgs) -> str:
    """The shape bucket of a call: M as the next power of two (at least 16), N, K, the
    activation dtype and a w4a16 weight's group size (the scheme is in the op's variant)."""
    qw = args.qweight
    group = f"-g{qw.group_size}" if qw.group_size else ""
    return (f"m{max(16, next_power_of_2(args.x2d.shape[0]))}-n{qw.out_features}-k{qw.in_features}-"
            f"{str(args.x2d.dtype).removeprefix('torch.')}{group}")


OP = Op(
    OP_NAME,
    schema="(Tensor x, Tensor packed, Tensor scales, Tensor? zeros, Tensor? bias, str scheme, SymInt group_size, "
    "str activation) -> Tensor",
    validate=_validate_op_inputs,
    needs=_needs,
    kernel=kernels.quantized_linear_kernel,
    capabilities=CAPABILITIES,
    reference=_reference_impl,
    launch=_triton_impl,
    fake=_fake,
    setup_context=_setup_context,
    backward=_backward,
    routes=ROUTES,
    bucket=bucket,
    reduction_length=lambda args: args.qweight.in_features,  # K
    default_route=_default_route,
)


def quantized_linear(x, qweight, bias=None, *, activation=None) -> torch.Tensor:
    """``activation(x @ W^T + bias)`` with ``W`` quantized (int8, int4 or fp8), one GEMM.

    Args:
        x: ``(..., in_features)`` = ``(..., K)`` float16 / bfloat16 / float32 (float64 runs
            the reference), any number of leading dims (flattened to ``M`` rows; any
            strides, a copy is made only if the last dim is not contiguous). ``M`` may be 0.
        qweight: a :class:`mmkernels.quant.QuantizedWeight` from
            :func:`mmkernels.quant.quantize` of an ``(N, K)`` ``nn.Linear`` weight, on
            ``x``'s device. Its scheme picks the kernel:
            ``"w8a16"`` int8 codes, per-output-channel scale;
            ``"w4a16"`` int4 codes packed two per byte, scale and zero per group of 32 / 64 /
            128 K elements, dequantized in registers;
            ``"fp8"`` e4m3 codes with per-channel scale; ``x`` is quantized to e4m3 per
            token (row) on the fly (sm_89+ on CUDA; elsewhere the reference, with the
            reason logged in :func:`mmkernels.backend.recent_decisions`).
        bias: ``(N,)`` float or None, added in fp32 before the activation; any strides
            (an expanded or strided view is copied, ``N`` elements).
        activation: None, ``"gelu"`` (erf), ``"gelu_tanh"``, ``"quick_gelu"``
            (``x * sigmoid(1.702 x)``) or ``"silu"``, applied in fp32 in the epilogue.

    Returns:
        ``(..., out_features)`` = ``(..., N)`` in ``x.dtype``.

    What it computes is :func:`quantized_linear_reference`: the product with
    ``qweight.kernel_weight(x.dtype)`` (w4a16 rounds each dequantized tile to ``x.dtype``;
    w8a16 and fp8 scale the fp32 accumulator), fp32 accumulation, one rounding at the
    store. NaN and inf in ``x`` reach only their own row, as in the reference: w8a16 and
    w4a16 follow IEEE arithmetic as ``F.linear`` on the dequantized weight does (an inf
    times a zero weight is NaN); fp8 has no finite per-token scale for a row holding NaN
    or inf, so every output of that row is NaN. Small ``M`` splits K across programs and
    adds the shares in a fixed order (a second, tiny launch), so results are bit-identical
    run to run. Gradients flow to ``x``
    and ``bias`` (computed in PyTorch from the same dequantized weight); the quantized
    weight itself is frozen. Registered as ``torch.ops.mmkernels.quantized_linear``.
    """
    key = None
    if type(qweight) is QuantizedWeight:
        op_inputs = (x, qweight.packed, qweight.scales, qweight.zeros, bias, qweight.scheme, qweight.group_size or 0,
                     activation or "none")  # fmt: skip
        # The fields the validation reads beyond the op's inputs are part of the key.
        key = plan_key(op_inputs, (qweight.in_features, qweight.out_features, qweight.dtype))
        out = OP.replay(key, op_inputs)
        if out is not MISS:
            return out
    args = _validate(x, qweight, bias, activation)  # here, so errors name the public arguments (a subclass passes)
    if key is None:
        op_inputs = (x, qweight.packed, qweight.scales, qweight.zeros, bias, qweight.scheme, qweight.group_size or 0,
                     activation or "none")  # fmt: skip
    return OP.call(op_inputs, args, key)


# --------------------------------------------------------------------------------------
# Ahead-of-time cases: real projector shapes, bf16 activations.


def aot_cases() -> list[AotCase]:
    """The launches of real models that ``tools/kernel_report.py`` compiles ahead of time for
    sm_80 and sm_90 (made when asked, not when the module is imported)."""
    cases: list[AotCase] = []

    def _aot_gemm_case(name, scheme, m, k, n, *, bias=True, activation=None, group_size=128, notes="", swap_ab=None,
                       tma=False, variant=None):  # fmt: skip
        info = SCHEME_TABLE[scheme]

        def make_launch():
            g = group_size if info.grouped else None
            tensors = {name: torch.empty(shape, dtype=dtype) for name, (shape, dtype) in info.layout(n, k, g).items()}
            qw = QuantizedWeight(scheme, tensors["packed"], tensors["scales"], tensors.get("zeros"), g, k, n, torch.bfloat16)
            x = torch.empty(m, k, dtype=torch.bfloat16)
            args = _validate(x, qw, torch.empty(n, dtype=torch.bfloat16) if bias else None, activation)
            cfg = linear_config(m, n, k, scheme, qw.group_size, 2, tma)
            if swap_ab is not None:
                cfg = dataclasses.replace(cfg, swap_ab=swap_ab)
            if variant is not None:  # a route's form of the heuristic config
                cfg = variant(cfg)
            out = torch.empty(m, n, dtype=torch.bfloat16)
            x_gemm = torch.empty(m, k, dtype=torch.float8_e4m3fn) if info.quantized_activations else x
            x_scales = torch.empty(m) if info.quantized_activations else None
            if cfg.tma:
                launch_args, meta, grid = _tma_launch(args, out, x_gemm, x_scales, cfg)
                meta["UPCAST_DOT"] = False  # compiled for a GPU, never the interpreter
                return launch_args, meta, grid
            partial = torch.empty(cfg.split_k, m, n) if cfg.split_k > 1 else None
            launch_args, meta, grid = _launch(args, out, x_gemm, x_scales, partial, cfg)
            meta["UPCAST_DOT"] = False  # compiled for a GPU, never the interpreter
            return launch_args, meta, grid

        # fp8: Triton refuses e4m3 below sm_89, and the op runs the reference there; TMA
        # descriptors are sm_90+.
        kernel = kernels.fp8_linear_tma_kernel if tma else kernels.quantized_linear_kernel
        cc = info.min_compute_capability
        cases.append(AotCase(name, kernel, make_launch, tensor_cores=True, notes=notes,
                                    min_compute_capability=90 if tma else 0 if cc <= (8, 0) else cc[0] * 10 + cc[1]))

    def _aot_aux_cases():
        def splitk():
            m, n, k = 16, 4096, 7680
            (packed_shape, packed_dtype), (scales_shape, _) = SCHEME_TABLE["w8a16"].layout(n, k, None).values()
            qw = QuantizedWeight("w8a16", torch.empty(packed_shape, dtype=packed_dtype), torch.empty(scales_shape), None, None,
                                 k, n, torch.bfloat16)  # fmt: skip
            args = _validate(torch.empty(m, k, dtype=torch.bfloat16), qw, torch.empty(n, dtype=torch.bfloat16), "gelu")
            split = linear_config(m, n, k, "w8a16", None, 2).split_k
            return _splitk_launch(args, torch.empty(m, n, dtype=torch.bfloat16), None, torch.empty(split, m, n), split)

        def rows():
            m, k = 4096, 5120
            return _quantize_rows_launch(torch.empty(m, k, dtype=torch.bfloat16), torch.empty(m, k, dtype=torch.float8_e4m3fn), torch.empty(m))

        cases.append(AotCase("quantized_linear/splitk-epilogue/mllama-11b/m16", kernels.splitk_epilogue_kernel, splitk))
        cases.append(AotCase("quantized_linear/fp8-quantize-rows/qwen2-vl-7b-merger/m4096", kernels.quantize_rows_fp8_kernel,
                             rows, min_compute_capability=89))

    for scheme_name in SCHEMES:
        # fp8 at M > 256: sm_90 reads the operands through TMA (the default there); the
        # pointer-load kernel is what sm_89 runs, under the /pointer names.
        tma = SCHEME_TABLE[scheme_name].quantized_activations
        # LLaVA-1.5-7B projector linear_1 (CLIP-L 1024 -> 4096, GELU fused), one 336 px image.
        _aot_gemm_case(f"quantized_linear/{scheme_name}/llava-1.5-7b-linear_1/m576", scheme_name, 576, 1024, 4096, activation="gelu",
                       tma=tma)  # fmt: skip
        # Llama-3.2-11B-Vision projector (7680 -> 4096), a few tokens: the split-K path.
        _aot_gemm_case(f"quantized_linear/{scheme_name}/mllama-11b/m16", scheme_name, 16, 7680, 4096)
        # LLaVA-NeXT-34B projector linear_1 (1024 -> 7168), 64 tokens: 32 x 64 tiles + split-K.
        _aot_gemm_case(f"quantized_linear/{scheme_name}/llava-next-34b-linear_1/m64", scheme_name, 64, 1024, 7168, activation="gelu")
        # LLaVA-1.5-7B projector linear_2 (4096 -> 4096), 256 tokens: 64 x 128 tiles.
        _aot_gemm_case(f"quantized_linear/{scheme_name}/llava-1.5-7b-linear_2/m256", scheme_name, 256, 4096, 4096)
        # Qwen2-VL-7B merger linear_2 (5120 -> 3584), 4096 merged tokens: 128 x 128 tiles
        # (fp8 on sm_90: 128 x 256 through TMA, GELU fused to check the two-half epilogue).
        _aot_gemm_case(f"quantized_linear/{scheme_name}/qwen2-vl-7b-merger/m4096", scheme_name, 4096, 5120, 3584,
                       activation="gelu" if tma else None, tma=tma)  # fmt: skip
    _aot_gemm_case("quantized_linear/fp8/llava-1.5-7b-linear_1/m576/pointer", "fp8", 576, 1024, 4096, activation="gelu")
    _aot_gemm_case("quantized_linear/fp8/qwen2-vl-7b-merger/m4096/pointer", "fp8", 4096, 5120, 3584)
    # The other tile layout (LinearConfig.swap_ab) of a default, which the GPU probe times
    # against it: it must stay compilable without spills.
    _aot_gemm_case("quantized_linear/w4a16/qwen2-vl-7b-merger/m4096/unswapped", "w4a16", 4096, 5120, 3584, swap_ab=False)
    _aot_gemm_case("quantized_linear/w4a16/mllama-11b/m16/swapped", "w4a16", 16, 7680, 4096, swap_ab=True)
    _aot_gemm_case("quantized_linear/w8a16/mllama-11b/m16/swapped", "w8a16", 16, 7680, 4096, swap_ab=True)
    _aot_gemm_case("quantized_linear/w8a16/qwen2-vl-7b-merger/m4096/swapped", "w8a16", 4096, 5120, 3584, swap_ab=True)
    # The route "triton-no-split-k" where the heuristic splits K: one program walks all of K.
    for scheme_name in SCHEMES:
        _aot_gemm_case(f"quantized_linear/{scheme_name}/mllama-11b/m16/no-split-k", scheme_name, 16, 7680, 4096,
                       variant=_unsplit)  # fmt: skip
    _aot_gemm_case("quantized_linear/w4a16/llava-next-34b-linear_1/m64/no-split-k", "w4a16", 64, 1024, 7168,
                   activation="gelu", variant=_unsplit)  # fmt: skip
    _aot_aux_cases()
    return cases
