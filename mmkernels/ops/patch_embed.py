"""Fused patch embedding: pixels (float or uint8) to position-embedded patch tokens.

Replaces the vision tower's first steps, each a pass over memory in Hugging Face: host-side
normalization, ``Conv2d``/``Conv3d`` with stride == kernel (a GEMM in disguise), class
token concat and position-embedding add: one GEMM with bias, position embedding and class
row in its epilogue, and for large batches a launch before it that packs the patches
(gathered, normalized, converted) into a padded matrix (:func:`embed_config`).

Public: :func:`patch_embed` (registered as ``mmkernels::patch_embed``), its reference
:func:`patch_embed_reference` (same signature; it defines the op), :data:`CAPABILITIES`.

Not fused, by arithmetic: the LayerNorm after the embeddings. Of the wired towers only
CLIP (``pre_layrnorm``) normalizes the op's output directly (Pixtral's ``ln_pre`` and
Mllama's ``layernorm_pre`` come after the per-image crops, tile and position embeddings
their towers add in their own ``forward``; SigLIP, BLIP-2, ViT and Qwen2-VL have none
there). Normalizing in the epilogue needs whole rows of D = 1024 per program. A 64-row
tile, the least Hopper's wgmma takes, holds a 64 x 1024 fp32 accumulator: 256 KB, the
SM's whole register file. 16-row tiles fit only with ``mma.sync`` (a fraction of
Hopper's rate) and make every program read the whole weight: 2304 programs x 1.2 MB =
2.8 GB of L2 traffic for CLIP-L/14-336 x 64, against 151 MB (bf16 read and write) for
the LayerNorm as its own pass. Row statistics from the epilogue plus a second pass over
the output move the same bytes as that pass. At one image the separate LayerNorm is one
more launch over 1.2 MB. None of these pays, so the tower's own LayerNorm runs after
the op.
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
    cudnn_tf32,
    empty_output,
    is_interpreted,
    launch,
    no_plan,
    plan_key,
    plan_ok,
    next_power_of_2,
)
from mmkernels.ops import _patch_embed_kernels as kernels
from mmkernels.routes import Route

__all__ = ["CAPABILITIES", "patch_embed", "patch_embed_reference", "pixel_norm_table"]

OP_NAME = "patch_embed"
# Weight (= output) dtypes the kernel computes with; float64 runs the reference.
CAPABILITIES = Capabilities(dtypes=frozenset({torch.float16, torch.bfloat16, torch.float32}), min_compute_capability=(8, 0))
_PIXEL_DTYPES = (torch.uint8, torch.float16, torch.bfloat16, torch.float32, torch.float64)


@dataclass
class _EmbedArgs:
    pixels: torch.Tensor
    weight: torch.Tensor  # as given: (D, C, P, P) or (D, C, T, P, P)
    weight2d: torch.Tensor  # (D, K)
    bias: torch.Tensor | None
    class_embedding: torch.Tensor | None
    position_embedding: torch.Tensor | None  # (B or 1, positions, D)
    norm: torch.Tensor | None  # (3, C) float32: scale, mean, std
    image_form: bool
    batch: int
    patches: int  # per image (image form) or rows (flat form)
    patches_w: int
    patch: int
    channels: int
    k_per_channel: int
    dim: int

    @property
    def rows(self) -> int:
        """GEMM rows: patches of all images (the flat form has one "image")."""
        return self.batch * self.patches

    @property
    def out_shape(self) -> tuple[int, ...]:
        if not self.image_form:
            return (self.patches, self.dim)
        return (self.batch, self.patches + (self.class_embedding is not None), self.dim)


def _per_channel(value, channels: int, name: str, device) -> torch.Tensor:
    """``(C,)`` float32 from a number, a one-element tensor (``()`` or ``(1,)``: the same
    value for every channel, as broadcasting gives) or a ``(C,)`` tensor of any stride."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return torch.full((channels,), float(value), dtype=torch.float32, device=device)
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name}: expected a float or a tensor of shape ({channels},), got {type(value).__name__}")
    if value.shape not in ((), (1,), (channels,)):
        raise ValueError(
            f"{name}: expected shape ({channels},) (one value per channel), () or (1,), got {tuple(value.shape)}"
        )
    if value.device != device:
        raise ValueError(f"{name}: expected device {device} (that of pixels), got {value.device}")
    if value.is_complex() or value.dtype == torch.bool:
        raise TypeError(f"{name}: expected a real number dtype, got {value.dtype}")
    return value.to(torch.float32).reshape(-1).expand(channels)  # torch.stack copies it


def pixel_norm_table(pixel_mean, pixel_std, pixel_scale=None, *, channels: int, device) -> torch.Tensor:
    """The ``(3, C)`` float32 table ``[scale; mean; std]`` that :func:`patch_embed` takes as
    ``pixel_norm``: what it builds from ``pixel_mean`` / ``pixel_std`` / ``pixel_scale``
    on every call (a stack, and a host-to-device copy for a number), made once. A patched
    module keeps one per device and passes it on every forward."""
    device = torch.device(device)
    return torch.stack(
        [
            _per_channel(1.0 if pixel_scale is None else pixel_scale, channels, "pixel_scale", device),
            _per_channel(0.0 if pixel_mean is None else pixel_mean, channels, "pixel_mean", device),
            _per_channel(1.0 if pixel_std is None else pixel_std, channels, "pixel_std", device),
        ]
    )


def _check_pixel_norm(pixel_norm, channels: int, device, others) -> torch.Tensor:
    if any(v is not None for v in others):
        raise ValueError("pixel_norm: pass either pixel_norm or pixel_mean / pixel_std / pixel_scale, not both")
    if not isinstance(pixel_norm, torch.Tensor):
        raise TypeError(f"pixel_norm: expected a torch.Tensor of shape (3, {channels}), got {type(pixel_norm).__name__}")
    if pixel_norm.dtype != torch.float32:
        raise TypeError(f"pixel_norm: expected dtype float32 (from pixel_norm_table), got {pixel_norm.dtype}")
    if pixel_norm.shape != (3, channels):
        raise ValueError(f"pixel_norm: expected shape (3, {channels}) = ([scale, mean, std], C), got {tuple(pixel_norm.shape)}")
    if pixel_norm.device != device:
        raise ValueError(f"pixel_norm: expected device {device} (that of pixels), got {pixel_norm.device}")
    return pixel_norm if pixel_norm.is_contiguous() else pixel_norm.contiguous()


def _validate(pixels, weight, bias, class_embedding, position_embedding, pixel_mean, pixel_std, pixel_scale,
              pixel_norm=None) -> _EmbedArgs:  # fmt: skip
    for name, t in (("pixels", pixels), ("weight", weight)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if pixels.dtype not in _PIXEL_DTYPES:
        raise TypeError(f"pixels: expected uint8 or a float dtype, got {pixels.dtype}")
    if not weight.is_floating_point():
        raise TypeError(f"weight: expected a floating dtype, got {weight.dtype}")
    device = pixels.device
    if weight.device != device:
        raise ValueError(f"weight: expected device {device} (that of pixels), got {weight.device}")
    if weight.dim() in (4, 5) and 0 in weight.shape[1:]:
        # Conv2d/Conv3d reject these too; D = 0 (no output channels) is an empty result.
        raise ValueError(f"weight: expected C, T and P of at least 1, got shape {tuple(weight.shape)}")
    if weight.dim() == 4:
        dim, channels, p, p2 = weight.shape
        if p != p2:
            raise ValueError(f"weight: expected square patches (D, C, P, P), got {tuple(weight.shape)}")
        if pixels.dim() != 4:
            raise ValueError(f"pixels: with a (D, C, P, P) weight expected (B, C, H, W), got {tuple(pixels.shape)}")
        batch, c, height, width = pixels.shape
        if c != channels:
            raise ValueError(f"pixels: expected {channels} channels (weight has C={channels}), got {c}")
        image_form, patches_w, patches = True, width // p, (height // p) * (width // p)
        k_per_channel = p * p
    elif weight.dim() == 5:
        dim, channels, frames, p, p2 = weight.shape
        if p != p2:
            raise ValueError(f"weight: expected square patches (D, C, T, P, P), got {tuple(weight.shape)}")
        k = channels * frames * p * p
        if pixels.dim() != 2 or pixels.shape[1] != k:
            raise ValueError(
                f"pixels: with a (D, C, T, P, P) weight expected pre-flattened patches (N, {k}) = (N, C*T*P*P), "
                f"got {tuple(pixels.shape)}"
            )
        image_form, batch, patches, patches_w = False, 1, pixels.shape[0], 0
        k_per_channel = frames * p * p
    else:
        raise ValueError(f"weight: expected (D, C, P, P) or (D, C, T, P, P), got {tuple(weight.shape)}")

    def vector(t, name):
        if t is None:
            return None
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
        if t.shape != (dim,):
            raise ValueError(f"{name}: expected shape ({dim},) (D of weight), got {tuple(t.shape)}")
        if t.device != device:
            raise ValueError(f"{name}: expected device {device} (that of pixels), got {t.device}")
        if not t.is_floating_point():
            raise TypeError(f"{name}: expected a floating dtype, got {t.dtype}")
        # The kernel reads these at unit stride: a strided or expanded (stride 0) vector is
        # copied (D elements; parameters are contiguous and go as they are).
        return t if t.is_contiguous() else t.contiguous()

    bias = vector(bias, "bias")
    class_embedding = vector(class_embedding, "class_embedding")
    if not image_form and (class_embedding is not None or position_embedding is not None):
        bad = "class_embedding" if class_embedding is not None else "position_embedding"
        raise ValueError(f"{bad}: only the image form (B, C, H, W) takes a class or position embedding")
    rows = patches + (class_embedding is not None)
    if position_embedding is not None:
        if not isinstance(position_embedding, torch.Tensor):
            raise TypeError(f"position_embedding: expected a torch.Tensor, got {type(position_embedding).__name__}")
        pe = position_embedding
        ok_shape = (pe.dim() == 2 and pe.shape == (rows, dim)) or (pe.dim() == 3 and pe.shape == (batch, rows, dim))
        if not ok_shape:
            raise ValueError(
                f"position_embedding: expected ({rows}, {dim}) or ({batch}, {rows}, {dim}) "
                f"({patches} patches{' + class row' if class_embedding is not None else ''}), got {tuple(pe.shape)}"
            )
        if pe.device != device:
            raise ValueError(f"position_embedding: expected device {device} (that of pixels), got {pe.device}")
        if not pe.is_floating_point():
            raise TypeError(f"position_embedding: expected a floating dtype, got {pe.dtype}")
        if pe.dim() == 2:
            pe = pe.unsqueeze(0)
        position_embedding = pe if pe.stride(-1) == 1 else pe.contiguous()

    if pixel_norm is not None:
        norm = _check_pixel_norm(pixel_norm, channels, device, (pixel_mean, pixel_std, pixel_scale))
        pixel_mean = pixel_std = pixel_scale = None
    else:
        norm = None
    given = [v is not None for v in (pixel_mean, pixel_std)]
    if pixels.dtype == torch.uint8 and norm is None and not all(given):
        raise ValueError("pixels: uint8 pixels need pixel_mean and pixel_std (normalization happens in the kernel)")
    if any(given) or pixel_scale is not None:
        if any(given) and not all(given):
            missing = "pixel_std" if given[0] else "pixel_mean"
            raise ValueError(f"{missing}: pixel_mean and pixel_std come together")
        norm = pixel_norm_table(pixel_mean, pixel_std, pixel_scale, channels=channels, device=device)
    return _EmbedArgs(
        pixels=pixels,
        weight=weight,
        weight2d=weight.reshape(dim, math.prod(weight.shape[1:])),  # (-1 is ambiguous when D = 0)
        bias=bias,
        class_embedding=class_embedding,
        position_embedding=position_embedding,
        norm=norm,
        image_form=image_form,
        batch=batch,
        patches=patches,
        patches_w=patches_w,
        patch=p,
        channels=channels,
        k_per_channel=k_per_channel,
        dim=dim,
    )


# --------------------------------------------------------------------------------------
# Reference


def patch_embed_reference(pixels, weight, bias=None, *, class_embedding=None, position_embedding=None,
                          pixel_mean=None, pixel_std=None, pixel_scale=None, pixel_norm=None) -> torch.Tensor:  # fmt: skip
    """PyTorch reference of :func:`patch_embed` (it defines the op), in float64.

    The only roundings are the ones the op defines: normalized pixels are converted to the
    weight dtype (as Hugging Face converts ``pixel_values``), and the result to the weight
    dtype at the end. The projection is ``F.conv2d`` / ``F.conv3d`` with stride == kernel.
    """
    args = _validate(pixels, weight, bias, class_embedding, position_embedding, pixel_mean, pixel_std, pixel_scale,
                     pixel_norm)  # fmt: skip
    return _reference_impl(args)


def _reference_impl(args: _EmbedArgs) -> torch.Tensor:
    f64, weight = torch.float64, args.weight
    if args.dim == 0:  # no output channels (F.conv2d rejects such a weight): nothing to compute
        return weight.new_empty(args.out_shape)
    x = args.pixels.to(f64)
    if args.norm is not None:
        scale, mean, std = args.norm.to(f64)
        shape = (1, -1, 1, 1) if args.image_form else (-1, 1)
        if args.image_form:
            x = (x * scale.view(shape) - mean.view(shape)) / std.view(shape)
        else:
            x = x.view(args.patches, args.channels, -1)
            x = ((x * scale.view(-1, 1) - mean.view(-1, 1)) / std.view(-1, 1)).reshape(args.patches, -1)
    x = x.to(weight.dtype).to(f64)
    w = weight.to(f64)
    bias = args.bias.to(f64) if args.bias is not None else None
    if args.image_form:
        out = torch.nn.functional.conv2d(x, w, bias, stride=args.patch).flatten(2).transpose(1, 2)
        if args.class_embedding is not None:
            cls = args.class_embedding.to(f64).expand(args.batch, 1, -1)
            out = torch.cat([cls, out], dim=1)
        if args.position_embedding is not None:
            out = out + args.position_embedding.to(f64)
    else:
        frames = args.k_per_channel // (args.patch * args.patch)
        x = x.view(-1, args.channels, frames, args.patch, args.patch)
        out = torch.nn.functional.conv3d(x, w, bias, stride=(frames, args.patch, args.patch)).view(-1, args.dim)
    return out.to(weight.dtype).contiguous()


# --------------------------------------------------------------------------------------
# Launcher


A_SOURCES = ("packed", "gather", "row_steps")


@dataclass(frozen=True)
class EmbedConfig:
    block_m: int
    block_n: int
    block_k: int  # K step of the GEMM; with row_steps, next_power_of_2(P) (at least 16)
    group_m: int
    num_warps: int
    num_stages: int
    # Where the GEMM's A tiles come from when pixels need gathering (image form) or
    # normalizing (flat form):
    # * "packed": patch_pack_kernel writes them as a zero-padded (M, K_pad) matrix first,
    #   which the GEMM reads with 16-byte async copies (two launches);
    # * "gather": gathered and normalized inside the GEMM's K loop (one launch; one narrow
    #   copy or load per element, plus its address arithmetic and conversion);
    # * "row_steps": image form, one K step per (channel, patch row) with contiguous pixel
    #   loads (one launch; 16-deep K steps, 2 of 16 columns idle at P = 14). The flat
    #   form reads it as "gather".
    # Flat patches without normalization are read directly by all (converted to the
    # weight dtype in the loop when theirs differs).
    a_source: str = "packed"

    def with_a_source(self, a_source: str, element_size: int = 2) -> "EmbedConfig":
        """The same tiles reading A from ``a_source``, with that source's K step."""
        return dataclasses.replace(self, a_source=a_source, block_k=_block_k(a_source, element_size))


def _block_k(a_source: str, element_size: int) -> int:
    # Packed rows: 64-deep steps (32-deep ones spilled on sm_80 for SigLIP: docs/defaults.md);
    # the gathers: 32, their A tile is converted in registers. Four-byte weights: 16.
    return (64 if a_source == "packed" else 32) if element_size <= 2 else 16


_PACK_MIN_ROWS = 4096  # fewer GEMM rows (one or two images): one launch


@functools.lru_cache(maxsize=4096)  # pure in its integer arguments; frozen result
def embed_config(rows: int, dim: int, k: int, element_size: int) -> EmbedConfig:
    """Deterministic tiles: 128x128 output tiles for large problems, 64-row tiles when
    there are few patches so more SMs get work.

    From ``_PACK_MIN_ROWS`` rows (8 CLIP images, 3 Mllama tiles) images are packed
    first (``a_source="packed"``), with 64-deep K steps (K = 588 in P = 14 towers: 10
    steps, the last 12 deep): the gather's K loop issues about three times the
    instructions of a GEMM over packed rows (per-element copies, im2col address
    arithmetic, the conversion, against 16-byte copies straight to the tensor cores),
    which pays for packing's extra pass over M x K_pad elements and second launch.

    Below it the gather stays in the GEMM (one launch, 32-deep K steps): there the GPU
    work is a few microseconds and the call waits for the host, so a launch saved counts
    more than the loop. The measurements behind both choices, and what is not timed yet
    (``tools/gpu_probe.py`` sweeps all three sources): ``docs/defaults.md``."""
    a_source = "packed" if rows >= _PACK_MIN_ROWS else "gather"
    block_m = 128 if rows >= 4096 else 64
    block_n = 128 if dim >= 128 else max(16, next_power_of_2(dim))
    num_warps = 8 if block_m * block_n >= 128 * 128 else 4
    return EmbedConfig(block_m, block_n, _block_k(a_source, element_size), group_m=8, num_warps=num_warps,
                       num_stages=3, a_source=a_source)  # fmt: skip


_PACK_BLOCK_M, _PACK_BLOCK_K = 32, 64


def _packs(a_source: str, image_form: bool, normalized: bool) -> bool:
    """Whether a call packs its A tiles first (see :class:`EmbedConfig`)."""
    if a_source not in A_SOURCES:
        raise ValueError(f"a_source: expected one of {A_SOURCES}, got {a_source!r}")
    # Flat rows that need no normalization are read directly, converted after the async
    # copy if their dtype differs (Qwen2-VL's float32 patches: 16-byte copies, a
    # pipelined loop); only per-element gathers and normalization are worth a pack pass.
    return a_source == "packed" and (image_form or normalized)


def _packed_shape(args: _EmbedArgs) -> tuple[int, int]:
    # Rows of whole 16-element groups: the JIT sees the stride's alignment.
    return args.rows, cdiv(args.weight2d.shape[1], 16) * 16


def _pack_launch(args: _EmbedArgs, packed: torch.Tensor):
    """(args, meta, grid) of :func:`patch_pack_kernel` into ``packed`` (:func:`_packed_shape`)."""
    pix = args.pixels
    strides = pix.stride() if args.image_form else (pix.stride(0), pix.stride(1), 0, 0)
    rows, k_pad = packed.shape
    launch_args = (
        pix, args.norm if args.norm is not None else packed, packed,
        rows, max(args.patches, 1), args.weight2d.shape[1], k_pad, max(args.patches_w, 1), args.channels,
        args.k_per_channel, *strides, packed.stride(0),
    )  # fmt: skip
    meta = dict(P=args.patch, IMAGE_FORM=args.image_form, NORMALIZE=args.norm is not None,
                BLOCK_M=_PACK_BLOCK_M, BLOCK_K=_PACK_BLOCK_K, num_warps=4)  # fmt: skip
    return launch_args, meta, (cdiv(rows, _PACK_BLOCK_M), cdiv(k_pad, _PACK_BLOCK_K))


def _spans_int32(table: torch.Tensor) -> bool:
    """Whether an offset inside ``table`` (through its strides) can reach 2^31 elements."""
    return sum((size - 1) * stride for size, stride in zip(table.shape, table.stride()) if size) >= 2**31


def _launch(args: _EmbedArgs, out: torch.Tensor, cfg: EmbedConfig | None = None, packed: torch.Tensor | None = None):
    """(args, meta, grid) of the GEMM launch (``cfg``: :func:`embed_config`'s unless
    given; ``packed``: the A matrix :func:`patch_pack_kernel` wrote, read instead of the
    pixels); also used by the AOT report."""
    w = args.weight2d if args.weight2d.is_contiguous() else args.weight2d.contiguous()
    rows = args.rows
    k = w.shape[1]
    cfg = cfg if cfg is not None else embed_config(rows, args.dim, k, w.element_size())
    image_form = args.image_form and packed is None  # how A is addressed
    row_steps = cfg.a_source == "row_steps" and image_form
    pix = args.pixels if packed is None else packed
    a_cols = k if packed is None else packed.shape[1]
    if image_form:
        strides = pix.stride()
    else:
        strides = (pix.stride(0), pix.stride(1), 0, 0)
    pe = args.position_embedding
    dummy = w  # never read: the matching HAS_* flag is off
    launch_args = (
        pix, w,
        args.bias if args.bias is not None else dummy,
        args.class_embedding if args.class_embedding is not None else dummy,
        pe if pe is not None else dummy,
        args.norm if args.norm is not None and packed is None else dummy,
        out, rows, max(args.patches, 1), args.dim, k, a_cols,
        max(args.patches_w, 1), args.channels, args.k_per_channel,
        *strides,
        (pe.stride(0) if pe.shape[0] > 1 else 0) if pe is not None else 0,
        pe.stride(1) if pe is not None else 0,
        out.stride(0) if args.image_form else 0,
        out.stride(1) if args.image_form else out.stride(0),
    )  # fmt: skip
    fp32 = w.dtype == torch.float32
    meta = dict(
        P=args.patch,
        IMAGE_FORM=image_form,
        HAS_BIAS=args.bias is not None,
        HAS_CLASS=args.class_embedding is not None,
        HAS_POS=pe is not None,
        POS_INT64=pe is not None and _spans_int32(pe[0]),
        NORMALIZE=args.norm is not None and packed is None,
        UPCAST_DOT=_INTERPRETED and not fp32,
        # fp32 weights: exact fp32 products unless torch itself allows TF32 convolutions.
        DOT_PRECISION="tf32" if fp32 and w.is_cuda and cudnn_tf32() else "ieee",
        BLOCK_M=cfg.block_m,
        BLOCK_N=cfg.block_n,
        BLOCK_K=max(16, next_power_of_2(args.patch)) if row_steps else cfg.block_k,
        GROUP_M=cfg.group_m,
        W_ALIGN=aligned_elements([w], [k]),
        # Image form: a patch row is P pixels, runs the JIT could not vectorize anyway.
        PIX_ALIGN=1 if image_form else aligned_elements([pix], [pix.stride(0), a_cols]),
        ROW_STEPS=row_steps,
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )
    grid = (cdiv(rows, cfg.block_m) * cdiv(args.dim, cfg.block_n),)
    return launch_args, meta, grid



# Whether the kernel runs in the interpreter: fixed when it was decorated.
_INTERPRETED = is_interpreted(kernels.patch_embed_kernel)


def _triton_impl(args: _EmbedArgs, a_source: str | None = None) -> torch.Tensor:
    """The kernel with the heuristic's tiles (:func:`embed_config`), reading A from
    ``a_source`` where given (a route), else from the heuristic's choice."""
    out = empty_output(args.out_shape, args.weight2d.dtype, args.pixels.device)
    if args.rows == 0 or args.dim == 0:
        if args.image_form and args.class_embedding is not None and args.dim:
            # No patches: only the class row (nothing for the GEMM to do).
            cls = args.class_embedding.to(torch.float32).expand(args.batch, 1, -1)
            if args.position_embedding is not None:
                cls = cls + args.position_embedding[:, :1].to(torch.float32)
            out.copy_(cls)
        else:
            plan_ok()
        return out
    # Allocations and launches only from here (a weight copy is a temporary a plan refuses).
    plan_ok()
    cfg = embed_config(args.rows, args.dim, args.weight2d.shape[1], args.weight2d.element_size())
    if a_source is not None:
        cfg = cfg.with_a_source(a_source, args.weight2d.element_size())
    packed = None
    if _packs(cfg.a_source, args.image_form, args.norm is not None):
        packed = empty_output(_packed_shape(args), args.weight2d.dtype, args.pixels.device)
        launch_args, meta, grid = _pack_launch(args, packed)
        launch(kernels.patch_pack_kernel, grid, tuple(launch_args), meta)
    launch_args, meta, grid = _launch(args, out, cfg, packed)
    launch(kernels.patch_embed_kernel, grid, tuple(launch_args), meta)
    return out


# --------------------------------------------------------------------------------------
# The op


def _needs(args: _EmbedArgs) -> Needs:
    pdt = args.pixels.dtype
    dtypes = (args.weight.dtype, pdt) if pdt.is_floating_point and pdt != torch.float64 else (args.weight.dtype,)
    return Needs(args.pixels.device, dtypes)


def _fake(pixels, weight, bias, class_embedding, position_embedding, pixel_mean, pixel_std, pixel_scale,
          pixel_norm=None):  # fmt: skip
    args = _validate(pixels, weight, bias, class_embedding, position_embedding, pixel_mean, pixel_std, pixel_scale,
                     pixel_norm)  # fmt: skip
    return weight.new_empty(args.out_shape)


def _normalized_pixels(args: _EmbedArgs, dtype: torch.dtype) -> torch.Tensor:
    """The pixels as the GEMM reads them: normalized where the call asks, in ``dtype``."""
    x = args.pixels
    if args.norm is not None:
        scale, mean, std = args.norm
        if args.image_form:
            x = (x.to(torch.float32) * scale.view(1, -1, 1, 1) - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1)
        else:
            x = x.to(torch.float32).view(args.patches, args.channels, -1)
            x = ((x * scale.view(-1, 1) - mean.view(-1, 1)) / std.view(-1, 1)).reshape(args.patches, -1)
    return x.to(dtype)


def _differentiable_forward(args: _EmbedArgs, weight, bias, class_embedding, position_embedding):
    """The op's math in PyTorch, in the weight dtype, differentiable in the parameters: the
    backward takes its gradients from here (training is not the kernel's hot path)."""
    x = _normalized_pixels(args, weight.dtype)
    if not args.image_form:
        return torch.nn.functional.linear(x, weight.reshape(args.dim, -1), bias)
    out = torch.nn.functional.conv2d(x, weight, bias, stride=args.patch).flatten(2).transpose(1, 2)
    if class_embedding is not None:
        out = torch.cat([class_embedding.to(out.dtype).expand(args.batch, 1, -1), out], dim=1)
    if position_embedding is not None:
        out = out + position_embedding
    return out


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _backward(ctx, grad_out):
    pixels, weight, bias, cls, pos, mean, std, scale, norm = ctx.saved_tensors
    args = _validate(pixels, weight, bias, cls, pos, mean, std, scale, norm)
    wanted = {"pixels": pixels, "weight": weight, "bias": bias, "class_embedding": cls, "position_embedding": pos}
    leaves = {k: v.detach().requires_grad_(True) for k, v in wanted.items()
              if v is not None and v.is_floating_point() and ctx.needs_input_grad[list(wanted).index(k)]}  # fmt: skip
    with torch.enable_grad():
        if "pixels" in leaves:
            args.pixels = leaves["pixels"]
        out = _differentiable_forward(
            args,
            leaves.get("weight", weight),
            leaves.get("bias", bias),
            leaves.get("class_embedding", cls),
            leaves.get("position_embedding", pos),
        )
        grads = torch.autograd.grad(out, list(leaves.values()), grad_out.to(out.dtype)) if leaves else ()
    found = dict(zip(leaves, grads))
    return tuple(found.get(k) for k in wanted) + (None, None, None, None)


def _torch_route(args: _EmbedArgs) -> torch.Tensor:
    """The standard PyTorch path: cuDNN's convolution (cuBLAS for pre-flattened patches)
    in the weight dtype, then the class row and position table added as Hugging Face does."""
    no_plan()  # PyTorch ops, not launches a call plan can replay
    with torch.no_grad():
        out = _differentiable_forward(args, args.weight, args.bias, args.class_embedding, args.position_embedding)
    return out.to(args.weight.dtype).contiguous()  # the op's dtype (a float32 table promotes) and layout


def _torch_route_applies(args: _EmbedArgs) -> str | None:
    return "no patches or no output channels (the launcher's empty result)" if args.rows == 0 or args.dim == 0 else None


def _unfold_route(args: _EmbedArgs) -> torch.Tensor:
    """unfold + cuBLAS (how vLLM's and Llama 4's patch embeddings compute it): the patches
    cut out as one ``(B*N, C*P*P)`` matrix (a copy), one GEMM with the bias, then the class
    row and the position table. On the first H200 run it beat cuDNN's convolution by 2.8x
    at CLIP-L/14-336 x 64 images, and the Triton kernel of then."""
    no_plan()  # PyTorch ops, not launches a call plan can replay
    weight = args.weight2d
    p, n, d = args.patch, args.patches, args.dim
    with torch.no_grad():
        x = _normalized_pixels(args, weight.dtype)
        h, w = n // args.patches_w, args.patches_w
        x = x[:, :, : h * p, : w * p]  # the rows and columns a conv with stride P reads
        cols = x.unfold(2, p, p).unfold(3, p, p).permute(0, 2, 3, 1, 4, 5).reshape(args.batch * n, -1)
        out = torch.nn.functional.linear(cols, weight, args.bias).view(args.batch, n, d)
        if args.class_embedding is not None:
            out = torch.cat([args.class_embedding.to(out.dtype).expand(args.batch, 1, -1), out], dim=1)
        if args.position_embedding is not None:
            out = out + args.position_embedding
    return out.to(weight.dtype).contiguous()


def _unfold_route_applies(args: _EmbedArgs) -> str | None:
    if not args.image_form:
        return "pre-flattened patches: the standard route is already one cuBLAS GEMM"
    return _torch_route_applies(args)


def _a_source_route(a_source: str) -> Route:
    return Route(f"triton-{a_source}", functools.partial(_triton_impl, a_source=a_source))


ROUTES = (
    *(_a_source_route(a_source) for a_source in A_SOURCES),
    Route("torch-unfold", _unfold_route, applies=_unfold_route_applies),
    Route("torch", _torch_route, standard=True, applies=_torch_route_applies),
)


def bucket(args: _EmbedArgs) -> str:
    """The shape bucket of a call (what a route table is keyed by): the form, GEMM rows as
    the next power of two, K, D, the weight dtype and whether pixels are uint8 (float
    pixels share a bucket: processors give float32, and ``.to(bf16)`` on their output is
    as common)."""
    form = "image" if args.image_form else "flat"
    pixels = "uint8" if args.pixels.dtype == torch.uint8 else "float"
    return (f"{form}-m{max(16, next_power_of_2(args.rows))}-k{args.weight2d.shape[1]}-n{args.dim}-"
            f"{str(args.weight.dtype).removeprefix('torch.')}-{pixels}")  # fmt: skip


OP = Op(
    OP_NAME,
    schema="(Tensor pixels, Tensor weight, Tensor? bias, Tensor? class_embedding, Tensor? position_embedding, "
    "Tensor? pixel_mean, Tensor? pixel_std, Tensor? pixel_scale, Tensor? pixel_norm=None) -> Tensor",
    validate=_validate,
    needs=_needs,
    kernel=kernels.patch_embed_kernel,
    capabilities=CAPABILITIES,
    reference=_reference_impl,
    launch=_triton_impl,
    fake=_fake,
    setup_context=_setup_context,
    backward=_backward,
    routes=ROUTES,
    bucket=bucket,
    reduction_length=lambda args: args.weight2d.shape[1],  # K
)


def _as_tensor(value, device) -> torch.Tensor | None:
    # The registered op takes tensors: a number becomes a 0-dim tensor, which _validate
    # broadcasts to (C,) as it does the number itself (the reference takes both).
    if value is None or isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return torch.tensor(float(value), dtype=torch.float32, device=device)
    return value  # wrong types are reported by _validate with the argument's name


def patch_embed(pixels, weight, bias=None, *, class_embedding=None, position_embedding=None,
                pixel_mean=None, pixel_std=None, pixel_scale=None, pixel_norm=None) -> torch.Tensor:  # fmt: skip
    """Patch embedding of images (or pre-flattened patches).

    Args:
        pixels: ``(B, C, H, W)`` float32/float16/bfloat16, or uint8 (then ``pixel_mean``
            and ``pixel_std`` are required); or pre-flattened patches ``(N, C*T*P*P)``
            with a Conv3d weight (Qwen2-VL's ``PatchEmbed``).
        weight: ``(D, C, P, P)``: a Conv2d with stride == kernel size == P and no padding;
            ``H`` and ``W`` are floor-divided by ``P`` as Conv2d does (non-square images
            work). Or ``(D, C, T, P, P)`` for the pre-flattened form. Its dtype is the
            compute and output dtype; normalized pixels are converted to it first.
        bias: ``(D,)`` or None.
        class_embedding: ``(D,)``, prepended as row 0 of every image (image form only).
        position_embedding: ``(N, D)`` / ``(1+N, D)`` shared by all images, or
            ``(B, N|1+N, D)`` per image (interpolated or tile-gated tables); added to
            every output row, the class row included.
        pixel_mean, pixel_std, pixel_scale: ``(C,)``, or one value for every channel (a
            number or a ``()`` / ``(1,)`` tensor): normalize in the kernel,
            ``x' = (x * scale - mean) / std`` (the CLIP/SigLIP processor's rescale +
            normalize), so uint8 pixels skip the host entirely.
        pixel_norm: instead of those three, the ``(3, C)`` float32 table ``[scale; mean;
            std]`` on ``pixels``' device, made once by :func:`pixel_norm_table`: the call
            then builds nothing from them (a caller that normalizes on every call, such as
            a patched module, keeps one per device).

    Returns:
        ``(B, N, D)``, ``(B, 1+N, D)`` with a class embedding, or ``(N, D)`` for the
        pre-flattened form; dtype of ``weight``; N = (H // P) * (W // P) in row-major
        patch order (what ``conv(x).flatten(2).transpose(1, 2)`` gives). A weight with
        D = 0 gives the empty result of that shape.

    Every tensor may have any strides (channels_last or cropped pixels, views into larger
    buffers, expanded position tables): pixels and position tables are read through their
    strides; bias, class embedding, normalization constants and a non-contiguous weight
    are copied first (a contiguous weight, as ``nn.Conv2d`` holds it, is read in place).

    Triton on CUDA (and on CPU under ``TRITON_INTERPRET=1``): one GEMM on tensor cores
    with fp32 accumulation, bias and position embedding in the epilogue, the class row
    written by the same launch. From 4096 patches, images and normalized flat patches
    are first packed (gathered, normalized, converted to the weight dtype) into a
    zero-padded ``(M, K_pad)`` scratch matrix of the weight dtype by a second launch;
    fewer are gathered inside the GEMM (see :func:`embed_config`). Otherwise the
    reference. Registered as ``torch.ops.mmkernels.patch_embed``.
    """
    if pixel_mean is None and pixel_std is None and pixel_scale is None:
        mean = std = scale = None
    else:
        device = pixels.device if isinstance(pixels, torch.Tensor) else None
        mean, std, scale = _as_tensor(pixel_mean, device), _as_tensor(pixel_std, device), _as_tensor(pixel_scale, device)
    # Validated here too: a tensor on another device would route the op by that device.
    op_inputs = (pixels, weight, bias, class_embedding, position_embedding, mean, std, scale, pixel_norm)
    key = plan_key(op_inputs)
    out = OP.replay(key, op_inputs)
    if out is not MISS:
        return out
    return OP.call(op_inputs, _validate(*op_inputs), key)


# --------------------------------------------------------------------------------------
# Ahead-of-time cases: real towers, bf16.


def aot_cases() -> list[AotCase]:
    """The launches of real models that ``tools/kernel_report.py`` compiles ahead of time for
    sm_80 and sm_90 (made when asked, not when the module is imported)."""
    cases: list[AotCase] = []

    def _aot_case(name, pixels_shape, weight_shape, *, uint8=False, cls=False, pos=False, bias=False, a_source="packed",
                  pixel_dtype=torch.bfloat16):  # fmt: skip
        """Adds the GEMM launch as ``name`` and, when the call packs first, the pack
        launch as ``name + "/pack"``. ``a_source``: forced (None: :func:`embed_config`'s)."""

        image_form = len(pixels_shape) == 4
        dim, k = weight_shape[0], math.prod(weight_shape[1:])
        n = (pixels_shape[2] // weight_shape[-1]) * (pixels_shape[3] // weight_shape[-1]) if image_form else 0
        cfg = embed_config(pixels_shape[0] * n if image_form else pixels_shape[0], dim, k, 2)
        if a_source is not None and a_source != cfg.a_source:  # the other loops as the GPU probe times them
            cfg = cfg.with_a_source(a_source)
        packs = _packs(cfg.a_source, image_form, uint8)

        def prepare():
            weight = torch.empty(weight_shape, dtype=torch.bfloat16)
            pixels = torch.empty(pixels_shape, dtype=torch.uint8 if uint8 else pixel_dtype)
            args = _validate(
                pixels, weight,
                torch.empty(dim, dtype=torch.bfloat16) if bias else None,
                torch.empty(dim, dtype=torch.bfloat16) if cls else None,
                torch.empty(n + cls, dim, dtype=torch.bfloat16) if pos else None,
                torch.empty(weight_shape[1]) if uint8 else None,
                torch.empty(weight_shape[1]) if uint8 else None,
                torch.empty(weight_shape[1]) if uint8 else None,
            )  # fmt: skip
            return args, torch.empty(_packed_shape(args), dtype=torch.bfloat16) if packs else None

        def make_gemm_launch():
            args, packed = prepare()
            launch_args, meta, grid = _launch(args, torch.empty(args.out_shape, dtype=torch.bfloat16), cfg, packed)
            meta["UPCAST_DOT"] = False  # compiled for a GPU, never the interpreter
            return launch_args, meta, grid

        def make_pack_launch():
            args, packed = prepare()
            return _pack_launch(args, packed)

        cases.append(AotCase(name, kernels.patch_embed_kernel, make_gemm_launch, tensor_cores=True))
        if packs:
            cases.append(AotCase(name + "/pack", kernels.patch_pack_kernel, make_pack_launch))

    # CLIP-L/14-336, batch 8: 576 patches, D=1024, class token and 577 positions; packed
    # first (the default), from float32 pixels as Hugging Face passes them.
    _aot_case("patch_embed/clip-l-14-336/fp32-pixels", (8, 3, 336, 336), (1024, 3, 14, 14), cls=True, pos=True,
              pixel_dtype=torch.float32)  # fmt: skip
    # The same from uint8 pixels, normalized by the pack kernel.
    _aot_case("patch_embed/clip-l-14-336/uint8", (8, 3, 336, 336), (1024, 3, 14, 14), uint8=True, cls=True, pos=True)
    # The one-launch K loops the GPU probe times against it: the per-element gather and one
    # step per (channel, patch row).
    _aot_case("patch_embed/clip-l-14-336/fp32-pixels-gather", (8, 3, 336, 336), (1024, 3, 14, 14), cls=True, pos=True,
              a_source="gather", pixel_dtype=torch.float32)  # fmt: skip
    _aot_case("patch_embed/clip-l-14-336/fp32-pixels-row-steps", (8, 3, 336, 336), (1024, 3, 14, 14), cls=True,
              pos=True, a_source="row_steps", pixel_dtype=torch.float32)  # fmt: skip
    _aot_case("patch_embed/clip-l-14-336/uint8-gather", (8, 3, 336, 336), (1024, 3, 14, 14), uint8=True, cls=True,
              pos=True, a_source="gather")  # fmt: skip
    # SigLIP-so400m/14-384: bias, 729 positions, no class token.
    _aot_case("patch_embed/siglip-so400m-14-384/bf16", (8, 3, 384, 384), (1152, 3, 14, 14), pos=True, bias=True)
    # One image (729 rows): the one-launch gather with 64-row tiles, from float32 pixels.
    _aot_case("patch_embed/siglip-so400m-14-384/b1-fp32-pixels", (1, 3, 384, 384), (1152, 3, 14, 14), pos=True, bias=True,
              a_source=None, pixel_dtype=torch.float32)  # fmt: skip
    # Qwen2-VL-7B vision: 4096 pre-flattened 2x14x14 patches, D=1280, read directly: bf16,
    # and float32 (what its processor gives; converted in the loop after 16-byte copies).
    _aot_case("patch_embed/qwen2-vl-7b/bf16", (4096, 1176), (1280, 3, 2, 14, 14))
    _aot_case("patch_embed/qwen2-vl-7b/fp32-patches", (4096, 1176), (1280, 3, 2, 14, 14), pixel_dtype=torch.float32)
    # Flat uint8 patches with normalization: packed first.
    _aot_case("patch_embed/qwen2-vl-7b/uint8-patches", (4096, 1176), (1280, 3, 2, 14, 14), uint8=True)
    return cases
