"""Benchmark of the patch embedding: pixels to position-embedded patch tokens.

What every provider computes (the contract of ``mmkernels.ops.patch_embed``): the Conv2d
with stride == kernel == P of ``(B, C, H, W)`` pixels as ``(B, N, D)`` rows in row-major
patch order, the class token prepended as row 0 when the tower has one, the position
table added (shared ``(rows, D)`` or per image ``(B, rows, D)``), the conv bias when the
tower has one; or, for Qwen2-VL, the Conv3d of pre-flattened ``(N, C*T*P*P)`` patches as
``(N, D)``. Weights and outputs are bf16. Pixels arrive as the processor returns them:
normalized on the host, float32 (``x' = (x / 255 - mean) / std``), or raw uint8 for the
provider that normalizes in the kernel. Shapes: ``benchmarks.shapes.PATCH_EMBED_SHAPES``
(CLIP-L/14-336, SigLIP-so400m/14-384, Qwen2-VL-7B vision, Llama-3.2-11B-Vision tiles).

Providers (the first is the baseline for speedups):

* ``hf-eager``: transformers 5.x ``CLIPVisionEmbeddings`` / ``SiglipVisionEmbeddings``
  / ``MllamaVisionModel`` (patch embedding part) / Qwen2-VL ``PatchEmbed``: the float32
  pixels ``.to(weight dtype)``, ``F.conv2d`` (what ``nn.Conv2d`` calls; cuDNN),
  ``flatten(2).transpose(1, 2)``, ``torch.cat`` of the expanded class token, ``+``
  the shared table looked up with ``position_ids`` (``nn.Embedding``); Qwen2-VL:
  ``view(-1, C, T, P, P)``, ``.to(dtype)``, ``F.conv3d``, ``view(-1, D)``. For Mllama
  the gated position, tile-position and pre-tile embeddings are one precomputed
  per-tile table here (HF adds them in three gated steps, so its real cost is higher).
* ``torch.compile(hf)``: the same functions under ``torch.compile(dynamic=False)``,
  compiled per shape; skipped by name if it does not compile. Its CPU check and its
  host-sync count use dynamo's eager backend (inductor's CPU compile is slow).
* ``unfold+linear``: vLLM's ``Conv2dLayer._forward_mulmat`` / ``Conv3dLayer``
  (stride == kernel): ``.to(dtype)``, ``unfold(2, P, P).unfold(3, P, P)``,
  ``permute(0, 2, 3, 1, 4, 5).reshape(-1, K)`` (a copy), ``F.linear`` with the weight
  viewed as ``(D, K)`` (cuBLAS), then the class concat and the position add as vLLM's
  CLIP embeddings do; Qwen2-VL: ``F.linear`` on the flat patches. (vLLM runs this path
  for Conv3d on CUDA with torch >= 2.9, and for Conv2d off CUDA; on CUDA its Conv2d is
  cuDNN, i.e. ``hf-eager``'s.)
* ``mmkernels``: ``mmkernels.ops.patch_embed`` on the host-normalized float32 pixels
  (one launch: the cast, the GEMM, bias, class row and position add fused).
* ``mmkernels(uint8)``: the same on the raw uint8 pixels with the processor's rescale,
  mean and std applied in the kernel (no host normalization at all).

Work declared per shape (``PatchEmbedShape.flops`` / ``.bytes_moved``):
FLOPs = 2 * M * K * D (M = GEMM rows = B * N patches, or the N flat patches;
K = C * T * P * P). Bytes = read the pixels the patches cover (M * K elements, 4 B each
as float32; 1 B each for ``mmkernels(uint8)``, which declares its own; SigLIP's 384 px
images leave 6 px per edge that no patch covers) + read the weight (D * K) + the
bias and class token (D each, when present) + the position table (rows x D, or
B x rows x D) + write the output (B x rows x D, or N x D), parameters and output bf16.
Providers that materialize intermediates (HF's bf16 copy of the pixels, vLLM's unfolded
patches, the concat) move more than declared and are slower for it. Every row reports
% of roofline = max(bytes / copy bandwidth, FLOPs / bf16 matmul rate) / median.

Correctness: every provider against a float64 oracle (the pixels rounded to bf16 as
every provider does, ``F.conv2d`` / a float64 GEMM, class, position, bias, then rounded
to bf16), within bf16 rounding (:func:`compare_close`).

``run(out_dir, quick=False)`` is what ``tools/gpu_suite.py`` calls; ``test_patch_embed``
is the same work as pytest-benchmark cells.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from benchmarks import harness
from benchmarks.shapes import PATCH_EMBED_SHAPES, QUICK_PATCH_EMBED_SHAPES, PatchEmbedShape

__all__ = [
    "PATCH_EMBED_BENCHMARK",
    "PROVIDERS",
    "PatchEmbedInputs",
    "compare_close",
    "expected_patch_embed",
    "hf_patch_embed",
    "make_patch_embed_inputs",
    "run",
    "unfold_linear_patch_embed",
]

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
# Output check (bf16): norm-wise relative error, and the largest element error relative to
# the largest expected magnitude (4 bf16 ulps: HF rounds twice, after the conv and after
# the position add; a missing row, bias or class token is far beyond either).
REL_TOL = 1e-2
MAX_ERR_TOL = 2.0**-6


# ======================================================================================
# Inputs


@dataclass
class PatchEmbedInputs:
    """One input set for a :class:`PatchEmbedShape` on one device.

    ``pixels``: the processor's output, normalized on the host in the shape's
    ``pixel_dtype`` (float32); ``pixels_uint8``: the same images before normalization;
    ``pixel_mean`` / ``pixel_std`` / ``pixel_scale``: ``(C,)`` float32, what the uint8
    provider normalizes with. ``position_ids``: ``(1, rows)`` for a shared table (HF and
    vLLM look it up through ``nn.Embedding``); None for a per-image table (added as is).
    """

    case: str
    pixels: torch.Tensor
    pixels_uint8: torch.Tensor
    pixel_mean: torch.Tensor
    pixel_std: torch.Tensor
    pixel_scale: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor | None
    class_embedding: torch.Tensor | None
    position_embedding: torch.Tensor | None
    position_ids: torch.Tensor | None

    @property
    def image_form(self) -> bool:
        return self.weight.dim() == 4

    def image_args(self) -> tuple:
        return (self.pixels, self.weight, self.bias, self.class_embedding, self.position_embedding, self.position_ids)


def _normalize(raw: torch.Tensor, scale: torch.Tensor, mean: torch.Tensor, std: torch.Tensor,
               channels: int) -> torch.Tensor:  # fmt: skip
    """The processor's rescale + normalize in float32, per channel: ``(x * scale - mean) / std``."""
    x = raw.to(torch.float32)
    if raw.dim() == 4:
        view = (1, channels, 1, 1)
        return (x * scale.view(view) - mean.view(view)) / std.view(view)
    x = x.view(raw.shape[0], channels, -1)
    return ((x * scale.view(-1, 1) - mean.view(-1, 1)) / std.view(-1, 1)).reshape(raw.shape)


def make_patch_embed_inputs(shape: PatchEmbedShape, device: torch.device | str, seed: int) -> PatchEmbedInputs:
    """Deterministic inputs for ``shape`` (same ``seed``, same values) on ``device``."""
    device = torch.device(device)
    dtype = _DTYPES[shape.dtype]
    gen = torch.Generator(device=device).manual_seed(seed)

    def randn(*size, scale=1.0):
        return (torch.randn(*size, generator=gen, device=device, dtype=torch.float32) * scale).to(dtype)

    raw = torch.randint(0, 256, shape.pixels_shape, generator=gen, device=device, dtype=torch.uint8)
    mean = torch.tensor(shape.pixel_mean, dtype=torch.float32, device=device)
    std = torch.tensor(shape.pixel_std, dtype=torch.float32, device=device)
    scale = torch.full((shape.channels,), shape.pixel_scale, dtype=torch.float32, device=device)
    pixels = _normalize(raw, scale, mean, std, shape.channels).to(_DTYPES[shape.pixel_dtype])
    positions = shape.position_shape
    return PatchEmbedInputs(
        case=shape.name,
        pixels=pixels,
        pixels_uint8=raw,
        pixel_mean=mean,
        pixel_std=std,
        pixel_scale=scale,
        weight=randn(*shape.weight_shape, scale=1.0 / math.sqrt(shape.gemm_k)),
        bias=randn(shape.dim, scale=0.5) if shape.bias else None,
        class_embedding=randn(shape.dim) if shape.class_token else None,
        position_embedding=randn(*positions, scale=0.5) if positions else None,
        position_ids=(
            torch.arange(shape.tokens_per_image, device=device).unsqueeze(0) if shape.position == "shared" else None
        ),
    )


def expected_patch_embed(inputs: PatchEmbedInputs) -> torch.Tensor:
    """The oracle, in float64: the pixels rounded to the weight dtype (as every provider
    rounds them), ``F.conv2d`` (image form) or a GEMM (flat form), bias, class row,
    position table; rounded to the weight dtype once at the end."""
    f64 = torch.float64
    weight = inputs.weight
    x = inputs.pixels.to(weight.dtype).to(f64)
    bias = inputs.bias.to(f64) if inputs.bias is not None else None
    if not inputs.image_form:
        out = x @ weight.reshape(weight.shape[0], -1).to(f64).t()
        return (out if bias is None else out + bias).to(weight.dtype)
    out = F.conv2d(x, weight.to(f64), bias, stride=weight.shape[-1]).flatten(2).transpose(1, 2)
    if inputs.class_embedding is not None:
        out = torch.cat([inputs.class_embedding.to(f64).expand(x.shape[0], 1, -1), out], dim=1)
    if inputs.position_embedding is not None:
        out = out + inputs.position_embedding.to(f64)
    return out.to(weight.dtype)


def compare_close(out, expected: torch.Tensor) -> str | None:
    """None when ``out`` matches ``expected`` within bf16 rounding; else why not."""
    if not isinstance(out, torch.Tensor):
        return f"returned {type(out).__name__}, expected a Tensor"
    if out.shape != expected.shape or out.dtype != expected.dtype:
        return f"returned {out.dtype}{tuple(out.shape)}, expected {expected.dtype}{tuple(expected.shape)}"
    o, e = out.to(torch.float64), expected.to(torch.float64)
    if not bool(torch.isfinite(o).all()):
        return f"{int((~torch.isfinite(o)).sum())} of {o.numel()} elements are not finite"
    err = (o - e).abs()
    scale = float(e.abs().max()) if e.numel() else 0.0
    rel = float(torch.linalg.vector_norm(o - e) / max(float(torch.linalg.vector_norm(e)), 1e-30))
    worst = float(err.max()) if err.numel() else 0.0
    if rel > REL_TOL or worst > MAX_ERR_TOL * max(scale, 1e-30):
        where = tuple(int(i) for i in torch.unravel_index(err.argmax(), err.shape)) if err.numel() else ()
        return (
            f"relative error {rel:.2e} (tolerance {REL_TOL:.0e}), largest error {worst:.3e} at {where} "
            f"(tolerance {MAX_ERR_TOL * scale:.3e})"
        )
    return None


# ======================================================================================
# Providers


def _hf_image_embed(pixels, weight, bias, class_embedding, position_embedding, position_ids):
    """transformers' CLIP / SigLIP / Mllama vision embeddings, as they compute them."""
    batch_size = pixels.shape[0]
    patch = weight.shape[-1]
    patch_embeds = F.conv2d(pixels.to(dtype=weight.dtype), weight, bias, stride=patch)  # nn.Conv2d.forward
    embeddings = patch_embeds.flatten(2).transpose(1, 2)
    if class_embedding is not None:
        class_embeds = class_embedding.expand(batch_size, 1, -1)
        embeddings = torch.cat([class_embeds, embeddings], dim=1)
    if position_embedding is not None:
        if position_ids is not None:
            embeddings = embeddings + F.embedding(position_ids, position_embedding)  # nn.Embedding(position_ids)
        else:
            embeddings = embeddings + position_embedding  # a per-tile table (Mllama)
    return embeddings


def _hf_flat_embed(pixels, weight, bias):
    """transformers' Qwen2-VL ``PatchEmbed.forward``."""
    dim, channels, temporal, patch, _ = weight.shape
    hidden_states = pixels.view(-1, channels, temporal, patch, patch)
    hidden_states = F.conv3d(hidden_states.to(dtype=weight.dtype), weight, bias, stride=(temporal, patch, patch))
    return hidden_states.view(-1, dim)


def hf_patch_embed(inputs: PatchEmbedInputs) -> torch.Tensor:
    """Hugging Face today (see the module docstring)."""
    if inputs.image_form:
        return _hf_image_embed(*inputs.image_args())
    return _hf_flat_embed(inputs.pixels, inputs.weight, inputs.bias)


def _unfold_linear_image(pixels, weight, bias, class_embedding, position_embedding, position_ids):
    """vLLM: ``Conv2dLayer._forward_mulmat`` inside its CLIP-style embeddings."""
    x = pixels.to(dtype=weight.dtype)
    batch_size = x.shape[0]
    dim, patch = weight.shape[0], weight.shape[-1]
    input_size = weight[0].numel()
    x = x.unfold(2, patch, patch).unfold(3, patch, patch)
    x = x.permute(0, 2, 3, 1, 4, 5).reshape(-1, input_size)
    x = F.linear(x, weight.view(dim, input_size), bias)
    embeddings = x.view(batch_size, -1, dim)  # = view(B, H, W, D).permute(0, 3, 1, 2).flatten(2).transpose(1, 2)
    if class_embedding is not None:
        embeddings = torch.cat([class_embedding.expand(batch_size, 1, -1), embeddings], dim=1)
    if position_embedding is not None:
        if position_ids is not None:
            embeddings = embeddings + F.embedding(position_ids, position_embedding)
        else:
            embeddings = embeddings + position_embedding
    return embeddings


def _unfold_linear_flat(pixels, weight, bias):
    """vLLM: Qwen2-VL's patch embed through ``Conv3dLayer._forward_mulmat`` (the unfolds
    of an already-flat patch are views: one ``F.linear``)."""
    dim = weight.shape[0]
    return F.linear(pixels.to(dtype=weight.dtype), weight.view(dim, -1), bias)


def unfold_linear_patch_embed(inputs: PatchEmbedInputs) -> torch.Tensor:
    """vLLM's unfold + ``F.linear`` (see the module docstring)."""
    if inputs.image_form:
        return _unfold_linear_image(*inputs.image_args())
    return _unfold_linear_flat(inputs.pixels, inputs.weight, inputs.bias)


# Distinct code objects per backend: dynamo caches compiled graphs per code object, so the
# inductor build and the eager-backend build (CPU check, host-sync count) do not share
# one cache or one recompile count.
def _inductor_image_target(*args):
    return _hf_image_embed(*args)


def _inductor_flat_target(*args):
    return _hf_flat_embed(*args)


def _eager_image_target(*args):
    return _hf_image_embed(*args)


def _eager_flat_target(*args):
    return _hf_flat_embed(*args)


_COMPILE_TARGETS = {
    "inductor": (_inductor_image_target, _inductor_flat_target),
    "eager": (_eager_image_target, _eager_flat_target),
}
# One graph per shape (dynamic=False); a full run compiles 6 image-form and 3 flat shapes
# per backend, over dynamo's default of 8 recompiles per code object counted together.
_RECOMPILE_LIMIT = 64


def _compiled_hf_caller(backend: str = "inductor"):
    image_target, flat_target = _COMPILE_TARGETS[backend]
    image = torch.compile(image_target, backend=backend, dynamic=False)
    flat = torch.compile(flat_target, backend=backend, dynamic=False)
    compiled_cases: set[str] = set()

    def call(inputs: PatchEmbedInputs):
        if inputs.image_form:
            return image(*inputs.image_args())
        return flat(inputs.pixels, inputs.weight, inputs.bias)

    def embed(inputs: PatchEmbedInputs) -> torch.Tensor:
        if inputs.case in compiled_cases:
            return call(inputs)
        # The first call of a shape compiles it. Past the recompile limit dynamo would run
        # the function eagerly and the row would time eager code under this name: raise
        # instead (the provider is optional, so the row is skipped, naming why).
        with torch._dynamo.config.patch(recompile_limit=_RECOMPILE_LIMIT, fail_on_recompile_limit_hit=True):
            out = call(inputs)
        compiled_cases.add(inputs.case)
        return out

    return embed


_mmkernels_import_error = functools.partial(harness.import_error, "mmkernels.ops.patch_embed")


def _mmkernels_caller(uint8: bool):
    from mmkernels.ops import patch_embed

    def embed(inputs: PatchEmbedInputs) -> torch.Tensor:
        extra = {}
        if uint8:
            extra = dict(pixel_mean=inputs.pixel_mean, pixel_std=inputs.pixel_std, pixel_scale=inputs.pixel_scale)
        return patch_embed(
            inputs.pixels_uint8 if uint8 else inputs.pixels,
            inputs.weight,
            inputs.bias,
            class_embedding=inputs.class_embedding,
            position_embedding=inputs.position_embedding,
            **extra,
        )

    return embed


def _uint8_bytes(shape: PatchEmbedShape) -> int:
    return shape.bytes_moved(pixel_dtype="uint8")


PROVIDERS: tuple[harness.Provider, ...] = (
    harness.Provider(
        name="hf-eager",
        factory=lambda: hf_patch_embed,
        notes="transformers 5.x embeddings: float32 pixels .to(bf16), Conv2d (cuDNN), flatten/transpose, "
        "cat class token, + nn.Embedding(position_ids); Qwen2-VL: view + Conv3d",
    ),
    harness.Provider(
        name="torch.compile(hf)",
        factory=_compiled_hf_caller,
        check_factory=functools.partial(_compiled_hf_caller, backend="eager"),
        optional=True,
        notes="the hf-eager functions under torch.compile(dynamic=False), one graph per shape; its CPU check "
        "and host-sync count use dynamo's eager backend",
    ),
    harness.Provider(
        name="unfold+linear",
        factory=lambda: unfold_linear_patch_embed,
        notes="vLLM's Conv2dLayer/Conv3dLayer mulmat path: .to(bf16), unfold, permute+reshape (a copy), "
        "F.linear with the weight viewed as (D, K), cat class token, + position table",
    ),
    harness.Provider(
        name="mmkernels",
        factory=functools.partial(_mmkernels_caller, False),
        requires=_mmkernels_import_error,
        timed_backend="triton",
        notes="mmkernels.ops.patch_embed on host-normalized float32 pixels (one launch)",
    ),
    harness.Provider(
        name="mmkernels(uint8)",
        factory=functools.partial(_mmkernels_caller, True),
        requires=_mmkernels_import_error,
        timed_backend="triton",
        bytes_moved=_uint8_bytes,
        notes="mmkernels.ops.patch_embed on raw uint8 pixels, rescale/mean/std in the kernel; its bytes count "
        "1 B per pixel",
    ),
)

PATCH_EMBED_BENCHMARK = harness.Benchmark(
    name="patch_embed",
    description=(
        "Patch embedding: Conv2d (stride == kernel) of images, or Qwen2-VL's Conv3d of pre-flattened "
        "patches, with the class token, position table and bias of the tower; bf16 weights."
    ),
    cases=PATCH_EMBED_SHAPES,
    quick_cases=QUICK_PATCH_EMBED_SHAPES,
    providers=PROVIDERS,
    make_inputs=make_patch_embed_inputs,
    expected_output=expected_patch_embed,
    bytes_moved=lambda shape: shape.bytes_moved(),
    flops=lambda shape: shape.flops,
    small_case=lambda shape: shape.scaled(),
    compare=compare_close,
    # Small calls wait for the host (0.1-0.2 ms on the H200 where the kernels need microseconds): the
    # CUDA-graph columns time the device alone. No provider copies from host memory in a call.
    graph_timing=True,
    bytes_model=(
        "read the pixels patches cover (M x K: float32, 4 B; mmkernels(uint8): 1 B) + read weight (D x K) + bias and "
        "class token (D each, when present) + position table (rows x D, or B x rows x D) + write output "
        "(B x rows x D, or N x D), bf16; FLOPs = 2 x M x K x D (M = GEMM rows, K = C x T x P x P)"
    ),
)
harness.register(PATCH_EMBED_BENCHMARK, size_param="M", size_label="GEMM rows M (patches)")


def run(out_dir: str | Path, quick: bool = False) -> harness.BenchmarkResult:
    """Run the patch-embed benchmark into ``out_dir`` (timed on CUDA; validated, not
    timed, on the CPU) and return its result; ``quick`` runs fewer shapes and repetitions."""
    return harness.run_into_folder(PATCH_EMBED_BENCHMARK, out_dir, quick=quick)


# ======================================================================================
# pytest-benchmark cells

patch_embed_session = pytest.fixture(scope="module")(harness.pytest_session(PATCH_EMBED_BENCHMARK))


@pytest.mark.parametrize("provider", [p.name for p in PROVIDERS])
@pytest.mark.parametrize("shape", PATCH_EMBED_SHAPES, ids=lambda s: s.name.replace("/", "-"))
def test_patch_embed(benchmark, patch_embed_session: harness.BenchSession, shape, provider: str):
    harness.run_pytest_cell(benchmark, patch_embed_session, shape, provider)
