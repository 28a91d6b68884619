"""Shape tables taken from real models, one table per kernel.

Only the merge table has entries so far; the patch-embed, attention and projector tables
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
    "QUICK_MERGE_SHAPES",
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
        name="llava-1.5-7b/1x1img",
        sequences=((text(35), image(576), text(24)),),
        notes="one prompt, one image (latency)",
        **_LLAVA_15,
    ),
    goal_merge_shape(),
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
# longest items, and two placeholder kinds.
QUICK_MERGE_SHAPES: tuple[MergeShape, ...] = tuple(
    s
    for s in MERGE_SHAPES
    if s.name
    in ("llava-1.5-7b/16x1img", "llava-1.5-7b/packed-16img", "llava-next-34b/4x1img-anyres", "qwen2-vl-7b/image+video")
)

# Later issues fill these (CLIP-L/14-336, SigLIP-so400m/14-384, Qwen2-VL-7B vision,
# Llama-3.2-11B-Vision, LLaVA-1.5-7B and -NeXT-34B projectors; see DESIGN.md).
PATCH_EMBED_SHAPES: tuple = ()
ATTENTION_SHAPES: tuple = ()
PROJECTOR_SHAPES: tuple = ()

SHAPE_TABLES: dict[str, tuple] = {
    "merge": MERGE_SHAPES,
    "patch_embed": PATCH_EMBED_SHAPES,
    "attention": ATTENTION_SHAPES,
    "projector": PROJECTOR_SHAPES,
}
