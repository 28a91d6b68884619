"""Shape tables taken from real models, one table per kernel.

The merge and patch-embed tables have entries so far; the attention and projector tables
are declared (empty) so their benchmarks have one obvious place to put theirs.

Merge shapes
------------
A :class:`MergeShape` is a batch of token sequences, each a run of :class:`Segment` s:
text tokens, or the placeholder tokens of one multimodal item (an image, a video, an
audio clip) of a given *kind*. ``placeholder_ids[kind]`` is the model's real token id
for that kind and ``hidden`` its language model's width, so the benchmark moves exactly
the bytes the model moves. Token counts per item follow the models' processors:

* LLaVA-1.5-7B: CLIP-L/14 at 336 px -> 24 x 24 = 576 tokens per image, D = 4096.
* LLaVA-NeXT-34B: "anyres": a 336 px base image plus up to 2 x 2 tiles of 576 tokens,
  up to 2880 tokens per image (fewer after unpadding), D = 7168.
* Qwen2-VL-7B: dynamic resolution, (H / 28) x (W / 28) tokens per image (14 px patches,
  2 x 2 merge): 448 x 448 -> 256, 980 x 644 -> 805, 1344 x 1008 -> 1728,
  224 x 224 -> 64; video: 16 frames of 448 x 252 -> 8 temporal steps x 144 = 1152.
  D = 3584; separate image and video placeholder ids (two kinds in one batch).
* PaliGemma-3B (224 px): 256 image tokens, then the prompt, D = 2048.
* Gemma-3-27B: 256 soft tokens per image (pan & scan adds crops), D = 5376.
* Qwen2-Audio-7B: 30 s of audio -> 1500 encoder frames pooled to 750 tokens, shorter
  clips proportionally fewer, D = 4096.

Layouts: ``"batch"`` is Hugging Face's padded ``(B, S)`` ``input_ids`` (sequences padded
on the right with ``pad_id``); ``"packed"`` is vLLM's flat ``(T,)`` token stream of all
requests. The goal shape (``goal=True``) is LLaVA-1.5-7B with 16 images of 576 tokens,
D = 4096, bf16, and 16 text tokens around each image (9472 tokens in all).

Patch-embed shapes
------------------
A :class:`PatchEmbedShape` is the first layer of a vision tower: a Conv2d with stride ==
kernel == P over ``(B, C, H, W)`` images (the *image form*), or Qwen2-VL's Conv3d over
pre-flattened ``(N, C*T*P*P)`` patches (the *flat form*, ``temporal`` set), plus the
class token and the position table the tower adds. The GEMM behind it has M rows
(``gemm_rows``: B * N patches, or the N flat patches), K = C * T * P * P
(``gemm_k``) and D columns. From each checkpoint's config and processor:

* CLIP-L/14-336 (LLaVA-1.5's tower): 336 x 336, P = 14 -> 24 x 24 = 576 patches,
  D = 1024, no conv bias, class token, 577 positions; batch 1, 8, 64, 256.
* SigLIP-so400m/14-384 (PaliGemma, Idefics3, LLaVA-OneVision): 384 x 384, P = 14 ->
  27 x 27 = 729 patches (Conv2d floors: the last 6 px of each row and column are never
  read), D = 1152, conv bias, no class token, 729 positions; batch 1, 8.
* Qwen2-VL-7B vision: pre-flattened 3 x 2 x 14 x 14 patches (K = 1176), D = 1280, no
  bias, no class token or position table (rotary positions come later); 256, 1024, 4096
  and 16384 patches (one 224 x 224, 448 x 448, 896 x 896 and 1792 x 1792 image).
* Llama-3.2-11B-Vision (Mllama): 4 tiles of 560 x 560, P = 14 -> 40 x 40 = 1600
  patches per tile, D = 1280, no bias, class token, and a position table per tile
  ((4, 1601, 1280): the gated position, tile-position and pre-tile embeddings of the
  tile's aspect ratio folded into one table).

Scaling: each table sweeps its main size over more than two orders of magnitude so the
speedup-vs-size plots show how cost grows with work: merge tokens T from 94 (one
224 x 224 Qwen2-VL image) through 1, 4, 16 and 64 LLaVA-1.5 prompts to 37,888; patch
embed GEMM rows M from 256 (one 224 x 224 Qwen2-VL image) to 147,456 (256 CLIP images).
``tests/test_bench_harness.py`` checks both spans.

Weights, class token and position tables are bf16. Pixels arrive either normalized on
the host in float32 (what the processors return: ``pixel_dtype``) or as uint8 with the
processor's rescale (1/255), mean and std (``pixel_mean`` / ``pixel_std``) applied in the
kernel.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Sequence

__all__ = [
    "ATTENTION_SHAPES",
    "MERGE_SHAPES",
    "MergeShape",
    "PATCH_EMBED_SHAPES",
    "PROJECTOR_SHAPES",
    "PatchEmbedShape",
    "QUICK_MERGE_SHAPES",
    "QUICK_PATCH_EMBED_SHAPES",
    "SHAPE_TABLES",
    "Segment",
    "audio",
    "goal_merge_shape",
    "image",
    "text",
    "video",
]


@dataclass(frozen=True)
class Segment:
    """``tokens`` consecutive tokens: text (``kind is None``) or the placeholders of one
    multimodal item of kind ``kind`` (an index into ``MergeShape.placeholder_ids``)."""

    tokens: int
    kind: int | None = None

    @property
    def is_text(self) -> bool:
        return self.kind is None


def text(tokens: int) -> Segment:
    return Segment(tokens)


def image(tokens: int) -> Segment:
    """An item of kind 0 (image, or audio for audio models)."""
    return Segment(tokens, kind=0)


def audio(tokens: int) -> Segment:
    """An item of kind 0 for audio models (their only kind)."""
    return Segment(tokens, kind=0)


def video(tokens: int) -> Segment:
    """An item of kind 1 (video)."""
    return Segment(tokens, kind=1)


@dataclass(frozen=True)
class MergeShape:
    """One merge workload from a real model (see the module docstring)."""

    name: str
    model: str
    hidden: int
    placeholder_ids: tuple[int, ...]
    kind_names: tuple[str, ...]
    sequences: tuple[tuple[Segment, ...], ...]
    vocab_size: int
    layout: str = "batch"  # "batch": (B, S) padded; "packed": (T,)
    dtype: str = "bfloat16"
    id_dtype: str = "int64"
    pad_id: int = 0
    goal: bool = False
    notes: str = ""

    def __post_init__(self):
        if self.layout not in ("batch", "packed"):
            raise ValueError(f"layout: expected 'batch' or 'packed', got {self.layout!r}")
        if len(self.kind_names) != len(self.placeholder_ids):
            raise ValueError("kind_names: expected one name per placeholder id")
        for seq in self.sequences:
            for seg in seq:
                if seg.kind is not None and not 0 <= seg.kind < len(self.placeholder_ids):
                    raise ValueError(f"{self.name}: segment kind {seg.kind} has no placeholder id")

    # -- sizes ---------------------------------------------------------------------
    @property
    def batch_size(self) -> int:
        return len(self.sequences)

    @property
    def sequence_lengths(self) -> tuple[int, ...]:
        return tuple(sum(seg.tokens for seg in seq) for seq in self.sequences)

    @property
    def ids_shape(self) -> tuple[int, ...]:
        if self.layout == "packed":
            return (sum(self.sequence_lengths),)
        return (self.batch_size, max(self.sequence_lengths, default=0))

    @property
    def num_tokens(self) -> int:
        """T: every position of ``input_ids`` (padding included for the batch layout)."""
        return math.prod(self.ids_shape)

    @property
    def items(self) -> tuple[Segment, ...]:
        """The multimodal items in row-major (position) order."""
        return tuple(seg for seq in self.sequences for seg in seq if not seg.is_text)

    @property
    def rows_per_kind(self) -> tuple[int, ...]:
        """Placeholder tokens (= feature rows) per kind."""
        return tuple(sum(s.tokens for s in self.items if s.kind == k) for k in range(len(self.placeholder_ids)))

    @property
    def num_placeholders(self) -> int:
        """N: placeholder tokens of all kinds."""
        return sum(self.rows_per_kind)

    def params(self) -> dict:
        """What a results row records about this shape."""
        return {
            "model": self.model,
            "layout": self.layout,
            "ids_shape": list(self.ids_shape),
            "hidden": self.hidden,
            "dtype": self.dtype,
            "tokens": self.num_tokens,
            "placeholders": self.num_placeholders,
            "items": len(self.items),
            "kinds": list(self.kind_names),
            "goal": self.goal,
        }

    def scaled(self, *, token_divisor: int = 32, hidden: int = 40, max_sequences: int = 3) -> "MergeShape":
        """A small version for CPU checks: same structure (kinds, item order, layout,
        placeholder ids), token counts divided by ``token_divisor`` (at least 1 per item
        and per non-empty text run), D = ``hidden``, at most ``max_sequences`` sequences."""

        def shrink(seg: Segment) -> Segment:
            return replace(seg, tokens=max(1, seg.tokens // token_divisor) if seg.tokens else 0)

        sequences = tuple(tuple(shrink(seg) for seg in seq) for seq in self.sequences[:max_sequences])
        return replace(self, name=f"{self.name}[small]", hidden=hidden, sequences=sequences)


def _repeat(seq: Sequence[Segment], times: int) -> tuple[tuple[Segment, ...], ...]:
    return tuple(tuple(seq) for _ in range(times))


# Real token ids and vocabularies (from each checkpoint's config.json).
_LLAVA_15 = dict(model="llava-hf/llava-1.5-7b-hf", hidden=4096, placeholder_ids=(32000,),
                 kind_names=("image",), vocab_size=32064)  # fmt: skip
_LLAVA_NEXT_34B = dict(model="llava-hf/llava-v1.6-34b-hf", hidden=7168, placeholder_ids=(64000,),
                       kind_names=("image",), vocab_size=64064)  # fmt: skip
_QWEN2_VL_7B = dict(model="Qwen/Qwen2-VL-7B-Instruct", hidden=3584, placeholder_ids=(151655, 151656),
                    kind_names=("image", "video"), vocab_size=152064)  # fmt: skip
_PALIGEMMA_3B = dict(model="google/paligemma-3b-pt-224", hidden=2048, placeholder_ids=(257152,),
                     kind_names=("image",), vocab_size=257216)  # fmt: skip
_GEMMA3_27B = dict(model="google/gemma-3-27b-it", hidden=5376, placeholder_ids=(262144,),
                   kind_names=("image",), vocab_size=262208)  # fmt: skip
_QWEN2_AUDIO_7B = dict(model="Qwen/Qwen2-Audio-7B-Instruct", hidden=4096, placeholder_ids=(151646,),
                       kind_names=("audio",), vocab_size=156032)  # fmt: skip


def goal_merge_shape() -> MergeShape:
    """16 images x 576 tokens, D = 4096, bf16, 5 text tokens before and 11 after each."""
    return MergeShape(
        name="llava-1.5-7b/16x1img",
        sequences=_repeat([text(5), image(576), text(11)], 16),
        goal=True,
        notes="goal shape: a batch of 16 single-image prompts",
        **_LLAVA_15,
    )


def _packed_llava_requests() -> tuple[tuple[Segment, ...], ...]:
    # 16 requests of different prompt lengths in one token stream (vLLM's layout).
    return tuple((text(5 + (3 * i) % 11), image(576), text(9 + (7 * i) % 23)) for i in range(16))


MERGE_SHAPES: tuple[MergeShape, ...] = (
    MergeShape(
        name="qwen2-vl-7b/1x1img-224",
        sequences=((text(20), image(64), text(10)),),
        notes="the smallest real merge: one 224x224 image (64 tokens), a short prompt",
        **_QWEN2_VL_7B,
    ),
    MergeShape(
        name="llava-1.5-7b/1x1img",
        sequences=((text(35), image(576), text(24)),),
        notes="one prompt, one image (latency)",
        **_LLAVA_15,
    ),
    MergeShape(
        name="llava-1.5-7b/4x1img",
        sequences=_repeat([text(5), image(576), text(11)], 4),
        notes="scaling sweep: 4 single-image prompts",
        **_LLAVA_15,
    ),
    goal_merge_shape(),
    MergeShape(
        name="llava-1.5-7b/64x1img",
        sequences=_repeat([text(5), image(576), text(11)], 64),
        notes="scaling sweep: 64 single-image prompts (37,888 tokens)",
        **_LLAVA_15,
    ),
    MergeShape(
        name="llava-1.5-7b/packed-16img",
        sequences=_packed_llava_requests(),
        layout="packed",
        id_dtype="int32",
        notes="16 requests packed into one (T,) stream, as vLLM schedules them",
        **_LLAVA_15,
    ),
    MergeShape(
        name="llava-next-34b/4x1img-anyres",
        sequences=tuple(
            (text(12), image(n), text(30)) for n in (2880, 2880, 2304, 1728)
        ),
        notes="anyres images of different sizes (base + tiles after unpadding)",
        **_LLAVA_NEXT_34B,
    ),
    MergeShape(
        name="qwen2-vl-7b/2x2img-mixed",
        sequences=(
            (text(20), image(1728), text(8), image(805), text(30)),
            (text(15), image(256), text(5), image(64), text(40)),
        ),
        notes="dynamic resolution: 1344x1008, 980x644, 448x448 and 224x224 images",
        **_QWEN2_VL_7B,
    ),
    MergeShape(
        name="qwen2-vl-7b/image+video",
        sequences=(
            (text(14), image(805), text(10), video(1152), text(25)),
            (text(9), video(1152), text(31)),
        ),
        notes="two placeholder kinds (image and video) in one batch",
        **_QWEN2_VL_7B,
    ),
    MergeShape(
        name="paligemma-3b/16x1img",
        sequences=_repeat([image(256), text(24)], 16),
        notes="image tokens first, then the prompt",
        **_PALIGEMMA_3B,
    ),
    MergeShape(
        name="gemma-3-27b/8x1img",
        sequences=_repeat([text(10), image(256), text(40)], 8),
        **_GEMMA3_27B,
    ),
    MergeShape(
        name="gemma-3-27b/1x4img-panscan",
        sequences=((text(20),) + (image(256), text(4)) * 4 + (text(60),),),
        notes="one prompt, an image and three pan & scan crops",
        **_GEMMA3_27B,
    ),
    MergeShape(
        name="qwen2-audio-7b/8x1audio",
        sequences=tuple(
            (text(20), audio(n), text(15)) for n in (750, 750, 750, 600, 500, 375, 250, 750)
        ),
        notes="30 s clips (750 tokens) and shorter ones",
        **_QWEN2_AUDIO_7B,
    ),
)

# What `--quick` runs: the goal shape, vLLM's packed layout, the widest D with the
# longest items, two placeholder kinds, and the two ends of the token sweep (94 and
# 37,888 tokens: the quick plots still span more than two orders of magnitude).
QUICK_MERGE_SHAPES: tuple[MergeShape, ...] = tuple(
    s
    for s in MERGE_SHAPES
    if s.name
    in ("qwen2-vl-7b/1x1img-224", "llava-1.5-7b/16x1img", "llava-1.5-7b/packed-16img", "llava-next-34b/4x1img-anyres",
        "qwen2-vl-7b/image+video", "llava-1.5-7b/64x1img")
)  # fmt: skip

# ======================================================================================
# Patch embedding

_ITEMSIZE = {"bfloat16": 2, "float16": 2, "float32": 4, "uint8": 1}
# The processors' normalization constants (rescale 1/255 first).
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
SIGLIP_MEAN = (0.5, 0.5, 0.5)
SIGLIP_STD = (0.5, 0.5, 0.5)


@dataclass(frozen=True)
class PatchEmbedShape:
    """One patch-embed workload from a real model (see the module docstring).

    Image form (``temporal is None``): ``batch`` images of ``image_size`` (H, W), a
    ``(dim, channels, patch, patch)`` Conv2d weight. Flat form (``temporal`` = T):
    ``flat_patches`` rows of C * T * P * P pixels, a ``(dim, channels, T, patch, patch)``
    Conv3d weight. ``position``: ``"none"``, ``"shared"`` (one ``(rows, D)`` table for
    every image) or ``"per_image"`` (``(batch, rows, D)``, e.g. Mllama's per-tile tables).
    """

    name: str
    model: str
    dim: int
    patch: int
    channels: int = 3
    batch: int = 1
    image_size: tuple[int, int] = (0, 0)
    temporal: int | None = None
    flat_patches: int = 0
    class_token: bool = False
    position: str = "none"
    bias: bool = False
    dtype: str = "bfloat16"
    pixel_dtype: str = "float32"
    pixel_mean: tuple[float, ...] = OPENAI_CLIP_MEAN
    pixel_std: tuple[float, ...] = OPENAI_CLIP_STD
    pixel_scale: float = 1.0 / 255.0
    notes: str = ""

    def __post_init__(self):
        if self.position not in ("none", "shared", "per_image"):
            raise ValueError(f"position: expected 'none', 'shared' or 'per_image', got {self.position!r}")
        if self.temporal is not None and (self.class_token or self.position != "none"):
            raise ValueError(f"{self.name}: the flat form has no class token or position table")
        if len(self.pixel_mean) != self.channels or len(self.pixel_std) != self.channels:
            raise ValueError(f"{self.name}: expected one pixel mean and std per channel ({self.channels})")

    # -- sizes ---------------------------------------------------------------------
    @property
    def image_form(self) -> bool:
        return self.temporal is None

    @property
    def grid(self) -> tuple[int, int]:
        """Patches along H and W (image form; floor division, as Conv2d)."""
        return (self.image_size[0] // self.patch, self.image_size[1] // self.patch)

    @property
    def patches_per_image(self) -> int:
        """N: patches of one image (image form) or all flat patches (flat form)."""
        return math.prod(self.grid) if self.image_form else self.flat_patches

    @property
    def gemm_rows(self) -> int:
        """M: rows of the GEMM (every patch of every image)."""
        return self.batch * self.patches_per_image if self.image_form else self.flat_patches

    @property
    def gemm_k(self) -> int:
        """K = C * T * P * P (T = 1 for the image form)."""
        return self.channels * (self.temporal or 1) * self.patch * self.patch

    @property
    def tokens_per_image(self) -> int:
        """Output rows per image: N, or 1 + N with the class token."""
        return self.patches_per_image + int(self.class_token)

    @property
    def pixels_shape(self) -> tuple[int, ...]:
        if self.image_form:
            return (self.batch, self.channels, *self.image_size)
        return (self.flat_patches, self.gemm_k)

    @property
    def weight_shape(self) -> tuple[int, ...]:
        if self.image_form:
            return (self.dim, self.channels, self.patch, self.patch)
        return (self.dim, self.channels, self.temporal, self.patch, self.patch)

    @property
    def position_shape(self) -> tuple[int, ...] | None:
        if self.position == "shared":
            return (self.tokens_per_image, self.dim)
        if self.position == "per_image":
            return (self.batch, self.tokens_per_image, self.dim)
        return None

    @property
    def output_shape(self) -> tuple[int, ...]:
        if self.image_form:
            return (self.batch, self.tokens_per_image, self.dim)
        return (self.flat_patches, self.dim)

    @property
    def flops(self) -> int:
        """2 * M * K * D: the GEMM's multiply-adds (the epilogue's adds are not counted)."""
        return 2 * self.gemm_rows * self.gemm_k * self.dim

    def bytes_moved(self, pixel_dtype: str | None = None) -> int:
        """Bytes one call must move: read the pixels the patches cover (M * K, in
        ``pixel_dtype``, default the shape's; SigLIP's 384 px leave 6 px per row and column
        that Conv2d never reads), the weight, the bias and class token when present, the
        position table; write the output. Every parameter in the model dtype."""
        size = _ITEMSIZE[self.dtype]
        params = self.dim * self.gemm_k + self.dim * (int(self.bias) + int(self.class_token))
        position = math.prod(self.position_shape) if self.position_shape else 0
        return (
            self.gemm_rows * self.gemm_k * _ITEMSIZE[pixel_dtype or self.pixel_dtype]
            + (params + position + math.prod(self.output_shape)) * size
        )

    def params(self) -> dict:
        """What a results row records about this shape."""
        return {
            "model": self.model,
            "form": "image" if self.image_form else "flat",
            "pixels_shape": list(self.pixels_shape),
            "weight_shape": list(self.weight_shape),
            "output_shape": list(self.output_shape),
            "M": self.gemm_rows,
            "K": self.gemm_k,
            "D": self.dim,
            "class_token": self.class_token,
            "position": self.position,
            "bias": self.bias,
            "dtype": self.dtype,
            "pixel_dtype": self.pixel_dtype,
        }

    def scaled(self, *, patch: int = 4, grid: int = 3, dim: int = 40, max_batch: int = 2,
               flat_patches: int = 21) -> "PatchEmbedShape":  # fmt: skip
        """A small version for CPU checks: same form, class token, position layout, bias
        and normalization; P = ``patch``, a ``grid`` x (``grid`` + 1) patch grid (not
        square, to catch a swapped H and W), D = ``dim``, at most ``max_batch`` images,
        ``flat_patches`` rows in the flat form."""
        return replace(
            self,
            name=f"{self.name}[small]",
            dim=dim,
            patch=patch,
            batch=min(self.batch, max_batch),
            image_size=(grid * patch, (grid + 1) * patch) if self.image_form else self.image_size,
            flat_patches=flat_patches if not self.image_form else 0,
        )


_CLIP_L_336 = dict(model="openai/clip-vit-large-patch14-336", dim=1024, patch=14, image_size=(336, 336),
                   class_token=True, position="shared")  # fmt: skip
_SIGLIP_SO400M_384 = dict(model="google/siglip-so400m-patch14-384", dim=1152, patch=14, image_size=(384, 384),
                          position="shared", bias=True, pixel_mean=SIGLIP_MEAN, pixel_std=SIGLIP_STD)  # fmt: skip
_QWEN2_VL_7B_VISION = dict(model="Qwen/Qwen2-VL-7B-Instruct", dim=1280, patch=14, temporal=2)
_MLLAMA_11B = dict(model="meta-llama/Llama-3.2-11B-Vision", dim=1280, patch=14, image_size=(560, 560),
                   class_token=True, position="per_image")  # fmt: skip

PATCH_EMBED_SHAPES: tuple[PatchEmbedShape, ...] = (
    PatchEmbedShape(name="clip-l-14-336/b1", batch=1, notes="one image (latency)", **_CLIP_L_336),
    PatchEmbedShape(name="clip-l-14-336/b8", batch=8, **_CLIP_L_336),
    PatchEmbedShape(name="clip-l-14-336/b64", batch=64, notes="a large batch: the GEMM dominates", **_CLIP_L_336),
    PatchEmbedShape(name="clip-l-14-336/b256", batch=256, notes="scaling sweep: 147,456 patches", **_CLIP_L_336),
    PatchEmbedShape(name="siglip-so400m-14-384/b1", batch=1, notes="one image (latency)", **_SIGLIP_SO400M_384),
    PatchEmbedShape(name="siglip-so400m-14-384/b8", batch=8, **_SIGLIP_SO400M_384),
    PatchEmbedShape(name="qwen2-vl-7b/256p", flat_patches=256, notes="one 224x224 image (the smallest M)",
                    **_QWEN2_VL_7B_VISION),  # fmt: skip
    PatchEmbedShape(name="qwen2-vl-7b/1024p", flat_patches=1024, notes="one 448x448 image",
                    **_QWEN2_VL_7B_VISION),  # fmt: skip
    PatchEmbedShape(name="qwen2-vl-7b/4096p", flat_patches=4096, notes="one 896x896 image",
                    **_QWEN2_VL_7B_VISION),  # fmt: skip
    PatchEmbedShape(name="qwen2-vl-7b/16384p", flat_patches=16384, notes="one 1792x1792 image",
                    **_QWEN2_VL_7B_VISION),  # fmt: skip
    PatchEmbedShape(name="mllama-11b/4tiles", batch=4, notes="one image as 4 tiles of 560x560, a position "
                    "table per tile", **_MLLAMA_11B),  # fmt: skip
)

# What `--quick` runs: one shape per tower, chosen so M still spans two orders of
# magnitude (256 to 36,864 rows): one small Qwen2-VL image, one SigLIP image, Mllama's
# 4 tiles, a CLIP batch of 64.
QUICK_PATCH_EMBED_SHAPES: tuple[PatchEmbedShape, ...] = tuple(
    s
    for s in PATCH_EMBED_SHAPES
    if s.name in ("qwen2-vl-7b/256p", "siglip-so400m-14-384/b1", "mllama-11b/4tiles", "clip-l-14-336/b64")
)

# Later issues fill these (Llama-3.2-11B-Vision attention, LLaVA-1.5-7B and -NeXT-34B
# projectors; see DESIGN.md).
ATTENTION_SHAPES: tuple = ()
PROJECTOR_SHAPES: tuple = ()

SHAPE_TABLES: dict[str, tuple] = {
    "merge": MERGE_SHAPES,
    "patch_embed": PATCH_EMBED_SHAPES,
    "attention": ATTENTION_SHAPES,
    "projector": PROJECTOR_SHAPES,
}
