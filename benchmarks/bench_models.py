"""Model-level benchmarks: the multimodal prefill of real VLM architectures at real widths.

Each benchmark builds a Hugging Face model from its transformers config class with
random weights (no download) and times one prefill forward of its multimodal part, per
provider:

* ``hf-eager``: the model as transformers runs it (``attn_implementation="sdpa"``).
* ``torch.compile``: ``torch.compile(model, dynamic=False)`` of the same model (same
  weights), one graph set per case; skipped by name if it does not compile. Its CPU
  check and its host-sync count on the CPU use dynamo's eager backend (inductor's CPU
  compile is slow); on CUDA they use the compiled model itself.
* ``mmkernels``: a copy of the same model after ``mmkernels.patch(model)`` (the patch
  report must name at least one replacement, else the row fails and says why).

Benchmarks (``size_param`` is the x axis of the speedup plot):

* ``llava-1.5-7b``: ``LlavaModel`` of llava-hf/llava-1.5-7b-hf: the CLIP-L/14-336 vision
  tower (24 layers, D = 1024, 336 px -> 576 patches + class token; LLaVA reads layer -2,
  all 24 run), the 2-layer GELU projector (1024 -> 4096 -> 4096), the merge of 576 image
  features per prompt into the Llama embeddings (vocab 32064, D = 4096), and **one**
  Llama-2-7B decoder layer (of 32) with the final norm: the LLM's input and the first
  layer's work. One image per prompt, batch of 1, 4 and 16 prompts
  (5 text tokens, the image, 11 text tokens). Size: images.
* ``qwen2-vl-7b``: ``Qwen2VLModel`` of Qwen/Qwen2-VL-7B-Instruct: the full vision
  tower (32 layers, D = 1280, 16 heads, Conv3d 2 x 14 x 14 patch embed, 2 x 2 patch
  merger to 3584), the merge into the Qwen2 embeddings (vocab 152064, D = 3584), the
  multimodal RoPE index and **one** Qwen2-7B decoder layer (of 28). One image per
  prompt, 1, 4 and 16 prompts of varied resolution (448 x 448, 224 x 336, 672 x 448,
  336 x 336 in turn), right-padded. Size: vision patches.

* ``llama-3.2-11b-vision``: ``MllamaModel`` of meta-llama/Llama-3.2-11B-Vision: the
  tiled vision tower (32 local + 8 global layers, D = 1280, 560 px tiles -> 1600 patches
  + a class token each, gated tile and position embeddings, 5 intermediate layers
  concatenated to 7680), the projector (7680 -> 4096), and **one** gated
  cross-attention decoder layer (the real model has 8 among its 40 layers) whose text
  tokens, from the ``<|image|>`` token on, read every tile (``cross_attention_mask`` as
  MllamaProcessor builds it). One image of 4 tiles (aspect ratio 2 x 2) per prompt, 1,
  2 and 4 prompts. Size: images. transformers zero-initializes the cross-attention
  gates; they are opened (0.5 / 0.8) so the output check sees the vision path. Its
  ``mmkernels`` provider is optional: while ``mmkernels.patch`` replaces nothing in
  Mllama, the row is skipped and its reason quotes the patch report.

Every layer count above is the one timed: only the LLM is cut (to one layer), so the
vision towers, projector and merge are the real models' work and the LLM part is the
same for every provider. Speedups are of that prefill slice, not of time-to-first-token
(which adds 31, 27 or 39 more decoder layers, identical across providers).

Metrics per cell (the harness): median latency (CUDA events), speedup over
``hf-eager``, peak memory of one forward above what was resident before it
(``torch.cuda.max_memory_allocated``: activations and workspace, not weights), host
syncs. Correctness: every provider's ``last_hidden_state`` against ``hf-eager``'s on the
same inputs, norm-wise relative error under 5e-2 in bf16 (26 to 34 bf16 layers; a
missing image, position embedding or wrong row is an error of order 1), 1e-4 in fp32.

Without CUDA: every case is scaled down to tiny widths (2 vision layers of width 64, a
width-64 LLM layer, the real vocabularies and token ids, 28-px-aligned small images) in
float32 and each provider runs once against ``hf-eager``; nothing is timed.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import threading
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
import torch

from benchmarks import harness

__all__ = [
    "LLAVA_BENCHMARK",
    "MLLAMA_BENCHMARK",
    "ModelCase",
    "ModelInputs",
    "PROVIDERS",
    "QWEN2_VL_BENCHMARK",
    "build_model",
    "clear_models",
    "compare_hidden",
    "make_model_inputs",
    "run",
]

_DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}
REL_TOL = {torch.bfloat16: 5e-2, torch.float32: 1e-4}

# Real token ids (from each checkpoint's config.json).
LLAVA_IMAGE_TOKEN = 32000
LLAVA_VOCAB = 32064
QWEN_IMAGE_TOKEN, QWEN_VIDEO_TOKEN = 151655, 151656
QWEN_VISION_START, QWEN_VISION_END, QWEN_PAD = 151652, 151653, 151643
QWEN_VOCAB = 152064
MLLAMA_IMAGE_TOKEN = 128256
MLLAMA_VOCAB = 128256  # the text model adds 8 rows for the special tokens
MLLAMA_ASPECT_2X2 = 6  # 1 + the index of [2, 2] in supported_aspect_ratios (0 is padding)
MLLAMA_TILES = 4
# Qwen2-VL resolutions cycled through the images of a case (multiples of 28 px).
QWEN_RESOLUTIONS = ((448, 448), (224, 336), (672, 448), (336, 336))


# ======================================================================================
# Cases


@dataclass(frozen=True)
class ModelCase:
    """One prefill: ``family`` ("llava" or "qwen2_vl"), one image per prompt of the
    given (H, W) sizes, ``text_before`` / ``text_after`` text tokens around each image;
    ``scale`` "real" (the checkpoint's widths) or "tiny" (CPU checks)."""

    name: str
    family: str
    image_sizes: tuple[tuple[int, int], ...]
    text_before: int = 5
    text_after: int = 11
    scale: str = "real"
    dtype: str = "bfloat16"

    @property
    def images(self) -> int:
        return len(self.image_sizes)

    @property
    def patch(self) -> int:
        return 14

    def patches(self, size: tuple[int, int]) -> int:
        """Vision-tower patches of one image (CLIP adds a class token; Mllama's
        ``size`` is one tile's, and each image has 4 tiles with a class token each)."""
        per_tile = (size[0] // self.patch) * (size[1] // self.patch)
        return per_tile * (MLLAMA_TILES if self.family == "mllama" else 1)

    def image_tokens(self, size: tuple[int, int]) -> int:
        """Placeholder tokens of one image in the prompt."""
        if self.family == "llava":
            return self.patches(size)  # the class token is dropped ('default' strategy)
        if self.family == "mllama":
            return 1  # one <|image|>; the text reads the tiles through cross-attention
        return self.patches(size) // 4  # Qwen2-VL: 2 x 2 merge

    def prompt_lengths(self) -> list[int]:
        extra = 2 if self.family == "qwen2_vl" else 0  # <|vision_start|>, <|vision_end|>
        return [self.text_before + self.image_tokens(s) + extra + self.text_after for s in self.image_sizes]

    def params(self) -> dict:
        config = model_config(self.family, self.scale)
        vision, text = _vision_and_text(config)
        return {
            "model": _CHECKPOINTS[self.family],
            "scale": self.scale,
            "dtype": self.dtype,
            "images": self.images,
            "image_sizes": [list(s) for s in self.image_sizes],
            "patches": sum(self.patches(s) for s in self.image_sizes),
            "image_tokens": sum(self.image_tokens(s) for s in self.image_sizes),
            "tokens": self.images * max(self.prompt_lengths()),
            "vision_layers": (getattr(vision, "num_hidden_layers", None) or getattr(vision, "depth", None))
            + getattr(vision, "num_global_layers", 0),
            "vision_width": vision.embed_dim if self.family == "qwen2_vl" else vision.hidden_size,
            "llm_layers": text.num_hidden_layers,
            "llm_width": text.hidden_size,
        }

    def scaled(self) -> "ModelCase":
        """The CPU version: tiny widths in float32, at most 2 images, small 28-px-aligned images."""
        if self.family == "llava":
            sizes = ((56, 56),) * min(self.images, 2)
        elif self.family == "mllama":
            sizes = ((28, 28),) * min(self.images, 2)  # tiles of 2 x 2 patches
        else:
            small = ((56, 56), (28, 56), (84, 56), (56, 28))
            sizes = tuple(small[i % len(small)] for i in range(min(self.images, 2)))
        return replace(self, name=f"{self.name}[small]", image_sizes=sizes, scale="tiny", dtype="float32")


def _llava_case(n: int) -> ModelCase:
    return ModelCase(name=f"llava-1.5-7b/{n}img", family="llava", image_sizes=((336, 336),) * n)


def _qwen_case(n: int) -> ModelCase:
    sizes = tuple(QWEN_RESOLUTIONS[i % len(QWEN_RESOLUTIONS)] for i in range(n))
    return ModelCase(name=f"qwen2-vl-7b/{n}img-mixed", family="qwen2_vl", image_sizes=sizes, text_before=10,
                     text_after=20)  # fmt: skip


def _mllama_case(n: int) -> ModelCase:
    return ModelCase(name=f"llama-3.2-11b-vision/{n}img-4tiles", family="mllama", image_sizes=((560, 560),) * n,
                     text_before=5, text_after=40)  # fmt: skip


LLAVA_CASES = tuple(_llava_case(n) for n in (1, 4, 16))
MLLAMA_CASES = tuple(_mllama_case(n) for n in (1, 2, 4))
QWEN2_VL_CASES = tuple(_qwen_case(n) for n in (1, 4, 16))


# ======================================================================================
# Models (from transformers config classes, random weights)

_CHECKPOINTS = {"llava": "llava-hf/llava-1.5-7b-hf", "qwen2_vl": "Qwen/Qwen2-VL-7B-Instruct",
                "mllama": "meta-llama/Llama-3.2-11B-Vision"}  # fmt: skip


@functools.lru_cache(maxsize=None)
def model_config(family: str, scale: str):
    """The transformers config of ``family`` at ``scale`` ("real": the checkpoint's
    config.json widths with one LLM layer; "tiny": width 64, 2 vision layers)."""
    import transformers

    real = scale == "real"
    if family == "llava":
        vision = transformers.CLIPVisionConfig(
            hidden_size=1024 if real else 64, intermediate_size=4096 if real else 128,
            num_hidden_layers=24 if real else 2, num_attention_heads=16 if real else 2,
            image_size=336 if real else 56, patch_size=14, projection_dim=768 if real else 64,
            hidden_act="quick_gelu", layer_norm_eps=1e-5,
        )  # fmt: skip
        text = transformers.LlamaConfig(
            hidden_size=4096 if real else 64, intermediate_size=11008 if real else 128, num_hidden_layers=1,
            num_attention_heads=32 if real else 2, num_key_value_heads=32 if real else 2, vocab_size=LLAVA_VOCAB,
            max_position_embeddings=4096, rms_norm_eps=1e-5, pad_token_id=0,
        )  # fmt: skip
        return transformers.LlavaConfig(
            vision_config=vision, text_config=text, image_token_index=LLAVA_IMAGE_TOKEN,
            projector_hidden_act="gelu", vision_feature_layer=-2, vision_feature_select_strategy="default",
            image_seq_length=576 if real else 16,
        )  # fmt: skip
    if family == "qwen2_vl":
        vision = transformers.Qwen2VLVisionConfig(
            depth=32 if real else 2, embed_dim=1280 if real else 64, hidden_size=3584 if real else 64,
            mlp_ratio=4 if real else 2, num_heads=16 if real else 2, in_channels=3, patch_size=14,
            spatial_merge_size=2, temporal_patch_size=2,
        )  # fmt: skip
        rope = {"rope_type": "default", "rope_theta": 1000000.0,
                "mrope_section": [16, 24, 24] if real else [4, 6, 6]}  # fmt: skip
        text = transformers.Qwen2VLTextConfig(
            hidden_size=3584 if real else 64, intermediate_size=18944 if real else 128, num_hidden_layers=1,
            num_attention_heads=28 if real else 2, num_key_value_heads=4 if real else 1, vocab_size=QWEN_VOCAB,
            max_position_embeddings=32768, rms_norm_eps=1e-6, rope_parameters=rope, pad_token_id=QWEN_PAD,
        )  # fmt: skip
        return transformers.Qwen2VLConfig(
            vision_config=vision, text_config=text, image_token_id=QWEN_IMAGE_TOKEN,
            video_token_id=QWEN_VIDEO_TOKEN, vision_start_token_id=QWEN_VISION_START,
            vision_end_token_id=QWEN_VISION_END,
        )  # fmt: skip
    if family == "mllama":
        vision = transformers.MllamaVisionConfig(
            hidden_size=1280 if real else 64, intermediate_size=5120 if real else 128,
            num_hidden_layers=32 if real else 2, num_global_layers=8 if real else 1,
            attention_heads=16 if real else 2, image_size=560 if real else 28, patch_size=14, max_num_tiles=4,
            intermediate_layers_indices=[3, 7, 15, 23, 30] if real else [0],
            vision_output_dim=7680 if real else 128, norm_eps=1e-5,
        )  # fmt: skip
        text = transformers.MllamaTextConfig(
            hidden_size=4096 if real else 64, intermediate_size=14336 if real else 128, num_hidden_layers=1,
            cross_attention_layers=[0], num_attention_heads=32 if real else 2, num_key_value_heads=8 if real else 1,
            vocab_size=MLLAMA_VOCAB, rms_norm_eps=1e-5, pad_token_id=0,
        )  # fmt: skip
        return transformers.MllamaConfig(vision_config=vision, text_config=text, image_token_index=MLLAMA_IMAGE_TOKEN)
    raise ValueError(f"family: expected 'llava', 'qwen2_vl' or 'mllama', got {family!r}")


def _vision_and_text(config):
    return config.vision_config, config.text_config


def _model_class(family: str):
    import transformers

    return {"llava": transformers.LlavaModel, "qwen2_vl": transformers.Qwen2VLModel,
            "mllama": transformers.MllamaModel}[family]  # fmt: skip


_MODELS: dict[tuple, torch.nn.Module] = {}
_LOCK = threading.Lock()


def build_model(family: str, scale: str, dtype: torch.dtype, device: torch.device, variant: str = "eager"):
    """The model of ``family`` / ``scale`` on ``device`` in ``dtype``, built once (seed 0)
    and cached per variant: "eager" (the model), "compile" / "compile-eager"
    (``torch.compile`` of the eager model with inductor / dynamo's eager backend: same
    weights), "mmkernels" (a deep copy after ``mmkernels.patch``)."""
    key = (family, scale, dtype, str(device), variant)
    with _LOCK:
        if key in _MODELS:
            return _MODELS[key]
    if variant == "eager":
        torch.manual_seed(0)
        with torch.device(device):
            model = _model_class(family)._from_config(model_config(family, scale), attn_implementation="sdpa")
        model = model.to(dtype).eval()
        if family == "mllama":
            _open_cross_attention_gates(model)
    elif variant in ("compile", "compile-eager"):
        base = build_model(family, scale, dtype, device)
        model = torch.compile(base, dynamic=False, backend="inductor" if variant == "compile" else "eager")
    elif variant == "mmkernels":
        import mmkernels

        model = copy.deepcopy(build_model(family, scale, dtype, device))
        report = mmkernels.patch(model)
        if not report.replaced:
            why = "; ".join(f"{skip.class_name}: {skip.reason}" for skip in getattr(report, "skipped", ())) or str(report)
            raise RuntimeError(f"mmkernels.patch replaced nothing in {type(model).__name__} ({why})")
        model.mmkernels_report = str(report)
    else:
        raise ValueError(f"variant: expected eager, compile, compile-eager or mmkernels, got {variant!r}")
    with _LOCK:
        _MODELS[key] = model
    return model


def _open_cross_attention_gates(model) -> None:
    """transformers zero-initializes Mllama's cross-attention gates (tanh(0) = 0: the text
    would not depend on the images and the output check could not see a wrong vision
    path); a trained checkpoint's gates are open. Set them to 0.5 / 0.8 (no cost change)."""
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("cross_attn_attn_gate"):
                parameter.fill_(0.5)
            elif name.endswith("cross_attn_mlp_gate"):
                parameter.fill_(0.8)


def clear_models() -> None:
    """Drop every cached model (and free its device memory)."""
    with _LOCK:
        _MODELS.clear()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ======================================================================================
# Inputs


@dataclass
class ModelInputs:
    """One input set: the case, its device and dtype, and the forward's keyword arguments."""

    case: ModelCase
    device: torch.device
    kwargs: dict


@functools.lru_cache(maxsize=None)
def _takes_mm_token_type_ids() -> bool:
    """Whether this transformers' ``Qwen2VLModel.forward`` takes ``mm_token_type_ids``
    (newer releases require it with images; older ones find the images by token id)."""
    import inspect

    import transformers

    return "mm_token_type_ids" in inspect.signature(transformers.Qwen2VLModel.forward).parameters


def _text_ids(n: int, high: int, gen: torch.Generator) -> torch.Tensor:
    return torch.randint(1, high, (n,), generator=gen)


def make_model_inputs(case: ModelCase, device: torch.device | str, seed: int) -> ModelInputs:
    """Deterministic inputs for ``case``: ``input_ids`` (one prompt per image, right
    padded, with ``attention_mask``) and the processor-style float32 pixels."""
    device = torch.device(device)
    gen = torch.Generator().manual_seed(seed)
    lengths = case.prompt_lengths()
    seq = max(lengths)
    if case.family == "llava":
        text_high, pad = LLAVA_IMAGE_TOKEN, 0
    elif case.family == "mllama":
        text_high, pad = 128000, 0  # below Llama 3's special tokens
    else:
        text_high, pad = QWEN_PAD, QWEN_PAD  # every Qwen2 special token id is above the text ids
    ids = torch.full((case.images, seq), pad, dtype=torch.long)
    mask = torch.zeros((case.images, seq), dtype=torch.long)
    for i, size in enumerate(case.image_sizes):
        parts = [_text_ids(case.text_before, text_high, gen)]
        if case.family == "llava":
            parts.append(torch.full((case.image_tokens(size),), LLAVA_IMAGE_TOKEN))
        elif case.family == "mllama":
            parts.append(torch.tensor([MLLAMA_IMAGE_TOKEN]))
        else:
            parts += [torch.tensor([QWEN_VISION_START]), torch.full((case.image_tokens(size),), QWEN_IMAGE_TOKEN),
                      torch.tensor([QWEN_VISION_END])]  # fmt: skip
        parts.append(_text_ids(case.text_after, text_high, gen))
        row = torch.cat(parts)
        ids[i, : row.numel()] = row
        mask[i, : row.numel()] = 1
    kwargs = {"input_ids": ids.to(device), "attention_mask": mask.to(device), "use_cache": False}
    if case.family == "llava":
        h, w = case.image_sizes[0]
        kwargs["pixel_values"] = torch.randn(case.images, 3, h, w, generator=gen).to(device)
    elif case.family == "mllama":
        # one image of 4 tiles (aspect ratio 2 x 2) per prompt; the text from the
        # <|image|> token on reads all its tiles (MllamaProcessor's cross_attention_mask)
        h, w = case.image_sizes[0]
        kwargs["pixel_values"] = torch.randn(case.images, 1, MLLAMA_TILES, 3, h, w, generator=gen).to(device)
        kwargs["aspect_ratio_ids"] = torch.full((case.images, 1), MLLAMA_ASPECT_2X2, dtype=torch.long, device=device)
        kwargs["aspect_ratio_mask"] = torch.ones(case.images, 1, MLLAMA_TILES, dtype=torch.long, device=device)
        cross = torch.zeros(case.images, seq, 1, MLLAMA_TILES, dtype=torch.long)
        for i in range(case.images):
            cross[i, case.text_before : int(mask[i].sum()), 0, :] = 1
        kwargs["cross_attention_mask"] = cross.to(device)
    else:
        grids = [(1, h // case.patch, w // case.patch) for h, w in case.image_sizes]
        rows = sum(t * gh * gw for t, gh, gw in grids)
        kwargs["pixel_values"] = torch.randn(rows, 3 * 2 * case.patch * case.patch, generator=gen).to(device)
        kwargs["image_grid_thw"] = torch.tensor(grids, dtype=torch.long, device=device)
        if _takes_mm_token_type_ids():
            # what the processor returns beside input_ids (0 text, 1 image): mRoPE reads it
            kwargs["mm_token_type_ids"] = (ids == QWEN_IMAGE_TOKEN).to(torch.long).to(device)
    return ModelInputs(case=case, device=device, kwargs=kwargs)


# ======================================================================================
# Providers


def _forward(variant: str):
    def forward(inputs: ModelInputs) -> torch.Tensor:
        case = inputs.case
        model = build_model(case.family, case.scale, _DTYPES[case.dtype], inputs.device, variant)
        with torch.inference_mode():
            return model(**inputs.kwargs).last_hidden_state

    return forward


def expected_hidden(inputs: ModelInputs) -> torch.Tensor:
    """The reference: ``hf-eager``'s ``last_hidden_state`` on the same inputs."""
    return _forward("eager")(inputs)


def compare_hidden(out, expected: torch.Tensor) -> str | None:
    """None when ``out`` is ``expected`` within the dtype's norm-wise relative tolerance."""
    tol = REL_TOL.get(getattr(expected, "dtype", None), 5e-2)
    return harness.compare_relative(out, expected, rel_tol=tol, against="against hf-eager")


_RECOMPILE_LIMIT = 64


def _compiled_forward():
    """``torch.compile`` on CUDA inputs; dynamo's eager backend on CPU inputs (CPU checks
    and host-sync counts; inductor's CPU compile is slow). Past the recompile limit dynamo
    would run eagerly under this provider's name: raise instead (the row is skipped)."""
    inductor, eager = _forward("compile"), _forward("compile-eager")

    def forward(inputs: ModelInputs) -> torch.Tensor:
        with torch._dynamo.config.patch(recompile_limit=_RECOMPILE_LIMIT, fail_on_recompile_limit_hit=True):
            return (inductor if inputs.device.type == "cuda" else eager)(inputs)

    return forward


_mmkernels_import_error = functools.partial(harness.import_error, "mmkernels.integrations")
_transformers_error = functools.partial(harness.import_error, "transformers")


PROVIDERS: tuple[harness.Provider, ...] = (
    harness.Provider(
        name="hf-eager",
        factory=lambda: _forward("eager"),
        requires=_transformers_error,
        notes="the transformers model as is (sdpa attention)",
    ),
    harness.Provider(
        name="torch.compile",
        factory=_compiled_forward,
        requires=_transformers_error,
        optional=True,
        notes="torch.compile(model, dynamic=False), same weights; one graph set per case (compile time not "
        "timed); CPU check with dynamo's eager backend",
    ),
    harness.Provider(
        name="mmkernels",
        factory=lambda: _forward("mmkernels"),
        requires=lambda: _transformers_error() or _mmkernels_import_error(),
        notes="a copy of the model after mmkernels.patch(model) (merge and patch embed swapped in)",
    ),
)


# Mllama is not wired into mmkernels.patch (or only in part): its mmkernels provider is
# optional, so a patch that replaces nothing is a skip that quotes the patch report.
MLLAMA_PROVIDERS: tuple[harness.Provider, ...] = PROVIDERS[:2] + (
    dataclasses.replace(
        PROVIDERS[2],
        optional=True,
        notes="a copy of the model after mmkernels.patch(model); skipped, quoting the patch report, while "
        "mmkernels.patch replaces nothing in Mllama",
    ),
)


def _benchmark(name: str, description: str, cases: tuple[ModelCase, ...], quick: tuple[ModelCase, ...],
               providers: tuple[harness.Provider, ...] = PROVIDERS) -> harness.Benchmark:  # fmt: skip
    return harness.Benchmark(
        name=name,
        description=description,
        cases=cases,
        quick_cases=quick,
        providers=providers,
        make_inputs=make_model_inputs,
        expected_output=expected_hidden,
        bytes_moved=lambda case: 0,
        small_case=lambda case: case.scaled(),
        compare=compare_hidden,
    )


LLAVA_BENCHMARK = harness.register(
    _benchmark(
        "llava-1.5-7b",
        "LLaVA-1.5-7B multimodal prefill (random weights, real widths): CLIP-L/14-336 tower (24 layers), "
        "projector, merge into the Llama embeddings, one Llama decoder layer (of 32); one 336 px image per prompt.",
        LLAVA_CASES,
        (LLAVA_CASES[0], LLAVA_CASES[-1]),
    ),
    kind="model",
    size_param="images",
    size_label="images (one per prompt)",
)
QWEN2_VL_BENCHMARK = harness.register(
    _benchmark(
        "qwen2-vl-7b",
        "Qwen2-VL-7B multimodal prefill (random weights, real widths): vision tower (32 layers, D = 1280) over "
        "images of varied resolution, 2x2 merger, merge into the Qwen2 embeddings, mRoPE index, one Qwen2 "
        "decoder layer (of 28).",
        QWEN2_VL_CASES,
        (QWEN2_VL_CASES[0], QWEN2_VL_CASES[-1]),
    ),
    kind="model",
    size_param="patches",
    size_label="vision patches (all images)",
)
MLLAMA_BENCHMARK = harness.register(
    _benchmark(
        "llama-3.2-11b-vision",
        "Llama-3.2-11B-Vision (Mllama) multimodal prefill (random weights, real widths): the tiled vision tower "
        "(32 local + 8 global layers, D = 1280, 4 tiles of 560 px per image, 1601 tokens per tile), the "
        "projector (7680 -> 4096), and one gated cross-attention decoder layer (of the 8 in 40) reading every "
        "tile from the <|image|> token on; one image per prompt.",
        MLLAMA_CASES,
        (MLLAMA_CASES[0], MLLAMA_CASES[-1]),
        MLLAMA_PROVIDERS,
    ),
    kind="model",
    size_param="images",
    size_label="images (4 tiles each, one per prompt)",
)
BENCHMARKS = (LLAVA_BENCHMARK, QWEN2_VL_BENCHMARK, MLLAMA_BENCHMARK)


def run(out_dir: str | Path, quick: bool = False) -> list[harness.BenchmarkResult]:
    """Run every model benchmark into ``out_dir`` (timed on CUDA; validated, not timed,
    on the CPU)."""
    results = []
    for bench in BENCHMARKS:
        results.append(harness.run_into_folder(bench, out_dir, quick=quick))
        clear_models()
    return results


# ======================================================================================
# pytest-benchmark cells (the quick cases: a full model per provider is heavy on a CPU)

llava_session = pytest.fixture(scope="module")(harness.pytest_session(LLAVA_BENCHMARK))
qwen2_vl_session = pytest.fixture(scope="module")(harness.pytest_session(QWEN2_VL_BENCHMARK))


@pytest.mark.parametrize("provider", [p.name for p in PROVIDERS])
@pytest.mark.parametrize("case", LLAVA_BENCHMARK.quick_cases, ids=lambda c: c.name.replace("/", "-"))
def test_llava(benchmark, llava_session: harness.BenchSession, case, provider: str):
    harness.run_pytest_cell(benchmark, llava_session, case, provider)


@pytest.mark.parametrize("provider", [p.name for p in PROVIDERS])
@pytest.mark.parametrize("case", QWEN2_VL_BENCHMARK.quick_cases, ids=lambda c: c.name.replace("/", "-"))
def test_qwen2_vl(benchmark, qwen2_vl_session: harness.BenchSession, case, provider: str):
    harness.run_pytest_cell(benchmark, qwen2_vl_session, case, provider)


mllama_session = pytest.fixture(scope="module")(harness.pytest_session(MLLAMA_BENCHMARK))


@pytest.mark.parametrize("provider", [p.name for p in MLLAMA_PROVIDERS])
@pytest.mark.parametrize("case", MLLAMA_BENCHMARK.quick_cases, ids=lambda c: c.name.replace("/", "-"))
def test_mllama(benchmark, mllama_session: harness.BenchSession, case, provider: str):
    harness.run_pytest_cell(benchmark, mllama_session, case, provider)
