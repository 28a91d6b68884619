"""Tiny random-init multimodal models, built from configs in code: the model zoo.

Each family is a real Hugging Face ``*ForConditionalGeneration`` class with a config
shrunk to a few layers of width 64 (head_dim 32, which vLLM's CPU attention accepts), a
~256-word vocabulary, 28-112 pixel images and sub-second audio, so that a forward pass
takes milliseconds on a CPU. Nothing is downloaded: tokenizers are made with the
``tokenizers`` library (a WordLevel vocabulary with the family's placeholder tokens as
special tokens) and image processors / feature extractors from constructor arguments.

``build(family)`` returns the model together with a batch of *valid* inputs: the number
of placeholder tokens in ``input_ids`` equals the number of features the vision or audio
tower produces, because the counts come from the family's own processor (or, where that
processor cannot be built offline, from the model's own helpers; see
:func:`_qwen_vl_inputs` and :func:`_llava_onevision_inputs`). The batch is left padded
and mixes prompts: text before, between and after the media, several images of
different token counts in one sample.

``save(family, path)`` writes a folder that ``AutoConfig``, the model class's
``from_pretrained`` and ``AutoProcessor`` load offline. The processors of Qwen2-VL,
Qwen2.5-VL, LLaVA-OneVision, the Omni thinkers and MiniCPM-V hold a video processor, which
transformers builds only with torchvision; without it their folders load through
``AutoTokenizer`` and ``AutoImageProcessor``.

Aria is left out: its processor defaults to 980-pixel crops (4900 patches) whatever its
image processor says, so a tiny Aria would need every caller to pass ``max_image_size``.

    >>> tiny = build("llava")
    >>> logits = tiny.model(**tiny.inputs).logits
"""

from __future__ import annotations

import copy
import importlib.util
import inspect
import itertools
import json
import math
import pathlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

__all__ = ["FAMILIES", "FamilyUnavailable", "TinyModel", "build", "save"]

# Shared sizes. head_dim 32: vLLM's CPU attention takes 32/64/80 (16 fails).
HIDDEN = 64
INTERMEDIATE = 128
HEADS = 2
KV_HEADS = 1  # GQA ratio 2, so merges and attention see grouped heads
HEAD_DIM = HIDDEN // HEADS
LAYERS = 2
PATCH = 14
VOCAB_SIZE = 256
MAX_POSITIONS = 2048

PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"

# Ordinary words of the tiny vocabulary (prompts use only these, so no <unk> appears).
_WORDS = tuple(
    """user assistant system describe the image images video audio picture pictures
    photo frame frames clip sound what is are in this these and compare two which one
    brighter larger left right show me a an of on with hear listen first second then
    after before color red green blue cat dog tree sky car house person scene say
    about do you see how many there here it its caption answer question please briefly
    detail details more less same different between both""".split()
)
_PUNCTUATION = tuple(":?.,!;'\"()-")


# ----------------------------------------------------------------------------- API


class FamilyUnavailable(ImportError):
    """The installed transformers cannot build this family's tiny model (its classes or
    methods differ in a way the recipe names)."""


@dataclass
class TinyModel:
    """A tiny model and a batch of valid inputs for it."""

    family: str
    model: torch.nn.Module  # the *ForConditionalGeneration, in eval mode, on the CPU
    inputs: dict[str, torch.Tensor]  # model(**inputs) and model.generate(**inputs) run as is
    placeholder_ids: dict[str, int]  # modality ("image", "video", "audio") -> token id
    inner_model_class: str  # class name of the module that merges features into the text
    tokenizer: Any = field(default=None, repr=False)
    processor: Any = field(default=None, repr=False)  # None where it needs torchvision


def build(family: str, *, seed: int = 0, dtype: torch.dtype = torch.float32, batch: int = 2) -> TinyModel:
    """Build the tiny model of ``family`` with random weights and ``batch`` prompts.

    The same ``seed`` gives the same weights and the same pixels / audio.
    """
    return _build(family, _recipe(family), seed=seed, dtype=dtype, batch=batch)


def save(family: str, path, *, seed: int = 0) -> pathlib.Path:
    """Write the tiny model of ``family`` (weights, config, tokenizer, processor) to ``path``."""
    recipe = _recipe(family)
    tiny = _build(family, recipe, seed=seed, dtype=torch.float32, batch=1)
    path = pathlib.Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tiny.model.save_pretrained(path)
    if recipe.processor is not None:
        recipe.processor.save_pretrained(path)
    else:
        recipe.tokenizer.save_pretrained(path)
        if recipe.processor_config is not None:  # none for the families built without a processor
            (path / "processor_config.json").write_text(json.dumps(recipe.processor_config, indent=2) + "\n")
    return path


# ------------------------------------------------------------------ shared pieces


def _build(family: str, recipe: _Recipe, *, seed: int, dtype: torch.dtype, batch: int) -> TinyModel:
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    spec = recipe.spec
    # Weight init draws from torch's global generator: seed it, and leave the caller's
    # generator state as it was.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = recipe.model_class(recipe.config).eval()
        if spec.init_weights is not None:
            with torch.no_grad():
                spec.init_weights(model)
    if not any(type(module).__name__ == spec.inner_model_class for module in model.modules()):
        import transformers

        # The Omni thinkers where they have no *ThinkerModel yet (5.17): the ForConditionalGeneration merged.
        raise FamilyUnavailable(
            f"transformers {transformers.__version__}'s {spec.model_class} has no {spec.inner_model_class} "
            "(the module the family's merge is patched on)"
        )
    _set_generation_ids(model, recipe.tokenizer)
    samples = [spec.samples[i % len(spec.samples)] for i in range(batch)]
    inputs = spec.make_inputs(recipe, model, samples, np.random.default_rng(seed))
    # Floating tensors only: Module.to(dtype) also casts complex buffers to the real dtype,
    # dropping their imaginary part (Llama 4's vision rotary table).
    for tensor in itertools.chain(model.parameters(), model.buffers()):
        if tensor.is_floating_point() and tensor.dtype != dtype:
            tensor.data = tensor.data.to(dtype)
    inputs = {name: value.to(dtype) if value.is_floating_point() else value for name, value in inputs.items()}
    return TinyModel(
        family=family,
        model=model,
        inputs=inputs,
        placeholder_ids={
            modality: recipe.tokenizer.convert_tokens_to_ids(token) for modality, token in spec.placeholders.items()
        },
        inner_model_class=spec.inner_model_class,
        tokenizer=recipe.tokenizer,
        processor=recipe.processor,
    )


@dataclass(frozen=True)
class _Sample:
    """One prompt and the media its placeholders stand for."""

    text: str
    image_sizes: tuple[tuple[int, int], ...] = ()  # (height, width) per image
    videos: tuple[tuple[int, int, int], ...] = ()  # (frames, height, width) per video
    audio_seconds: tuple[float, ...] = ()


@dataclass(frozen=True, init=False)
class _Part:
    """A transformers object of a family (a config, an image processor, a feature extractor,
    a processor), kept as data until the family is built: the name of its class in
    ``transformers`` and its keyword arguments (see :func:`_arguments` for the ones that
    are made or looked up then)."""

    class_name: str
    kwargs: dict[str, Any]

    def __init__(self, class_name: str, /, **kwargs: Any) -> None:
        object.__setattr__(self, "class_name", class_name)
        object.__setattr__(self, "kwargs", kwargs)


@dataclass(frozen=True)
class _TokenId:
    """A config argument: the id of ``token`` in the family's tokenizer."""

    token: str


class _TokenizerLength:
    """A config argument: ``len(tokenizer)`` of the family's tokenizer."""

    def __repr__(self) -> str:
        return "_TOKENIZER_LENGTH"


_TOKENIZER_LENGTH = _TokenizerLength()


@dataclass(frozen=True)
class _UnbuiltProcessor:
    """A processor that cannot be built here (its video processor needs torchvision): what
    :func:`save` writes for it to processor_config.json (see :func:`_processor_config`)."""

    processor_class: str
    video_processor_type: str
    options: dict[str, Any] = field(default_factory=dict)  # the processor's own arguments


def _tokenizer(
    special_tokens: Sequence[str] = (),
    *,
    named_tokens: dict[str, str] | None = None,
    add_bos: bool = True,
    extra_words: Sequence[str] = (),
    vocab_size: int = VOCAB_SIZE,
    trailing_tokens: Sequence[str] = (),
):
    """A WordLevel tokenizer: special tokens first, then words, filled to ``vocab_size``,
    then ``trailing_tokens`` (special too) as the last ids, in order.

    ``named_tokens`` become tokenizer attributes (``image_token`` -> ``tokenizer.image_token``
    and ``tokenizer.image_token_id``), which the families' processors look up; a named token
    listed in ``trailing_tokens`` takes its id there.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    named_tokens = named_tokens or {}
    trailing = list(dict.fromkeys(trailing_tokens))
    specials = [t for t in dict.fromkeys([PAD, BOS, EOS, UNK, *special_tokens, *named_tokens.values()])
                if t not in trailing]  # fmt: skip
    words = list(dict.fromkeys([*_PUNCTUATION, *_WORDS, *extra_words]))
    fillers = [f"w{i}" for i in range(max(0, vocab_size - len(specials) - len(words)))]
    vocab = {token: i for i, token in enumerate(specials + words + fillers + trailing)}

    backend = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    backend.add_special_tokens(specials + trailing)  # matched before splitting, even when repeated back to back
    if add_bos:
        backend.post_processor = processors.TemplateProcessing(
            single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, vocab[BOS])]
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=PAD,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        padding_side="left",
        extra_special_tokens=named_tokens,
    )


# A text config's vocabulary and pad/bos/eos ids: the tokenizer's.
_TEXT_TOKEN_IDS = dict(
    vocab_size=_TOKENIZER_LENGTH, pad_token_id=_TokenId(PAD), bos_token_id=_TokenId(BOS), eos_token_id=_TokenId(EOS)
)


def _set_generation_ids(model, tokenizer) -> None:
    # Composite configs do not always carry the text config's ids up to the generation
    # config; generate() needs pad_token_id for the left-padded batch.
    generation_config = model.generation_config
    generation_config.pad_token_id = tokenizer.pad_token_id
    generation_config.bos_token_id = tokenizer.bos_token_id
    generation_config.eos_token_id = tokenizer.eos_token_id


# What every tiny transformer stack (decoder, ViT, Q-Former) is: 2 layers of width 64, 2 heads.
_STACK_SIZES = dict(
    hidden_size=HIDDEN, intermediate_size=INTERMEDIATE, num_hidden_layers=LAYERS, num_attention_heads=HEADS
)


def _text_config(config_class_name: str, **overrides) -> _Part:
    """A 2-layer decoder config of width 64 (2 query heads, 1 KV head, head_dim 32)."""
    kwargs = dict(
        **_STACK_SIZES,
        num_key_value_heads=KV_HEADS,
        max_position_embeddings=MAX_POSITIONS,
        **_TEXT_TOKEN_IDS,
    )
    kwargs.update(overrides)
    return _Part(config_class_name, **kwargs)


def _vision_config(config_class_name: str, image_size, **overrides) -> _Part:
    """A 2-layer ViT config (CLIP, SigLIP, Idefics3, ...) of width 64 with 14-pixel patches."""
    kwargs = dict(**_STACK_SIZES, image_size=image_size, patch_size=PATCH)
    kwargs.update(overrides)
    return _Part(config_class_name, **kwargs)


def _square(side: int) -> dict[str, int]:
    """An image processor's ``size`` / ``crop_size`` of ``side`` x ``side`` pixels."""
    return {"height": side, "width": side}


def _image_processor(class_name: str, **kwargs):
    """The family's image processor, PIL backend when it exists.

    The PIL backend needs no torchvision and gives the same pixels on every machine.
    """
    import transformers

    pil_class = getattr(transformers, f"{class_name}Pil", None)
    return (pil_class or _transformers_class(class_name))(**kwargs)


def _random_image(rng: np.random.Generator, height: int, width: int):
    from PIL import Image

    return Image.fromarray(rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8))


def _images(samples: Sequence[_Sample], rng: np.random.Generator) -> list[list]:
    return [[_random_image(rng, h, w) for h, w in sample.image_sizes] for sample in samples]


def _as_tensors(batch) -> dict[str, torch.Tensor]:
    # Processors also return bookkeeping (labels for training, num_audio_tokens): keep
    # only tensors the forward consumes.
    dropped = {"labels", "num_audio_tokens", "num_crops"}
    return {
        name: value if isinstance(value, torch.Tensor) else torch.as_tensor(value)
        for name, value in batch.items()
        if name not in dropped
    }


def _processor_inputs(recipe: _Recipe, model, samples: list[_Sample], rng) -> dict:
    """Inputs through the family's own processor: its token expansion is the real one."""
    call: dict[str, Any] = {"text": [sample.text for sample in samples]}
    if any(sample.image_sizes for sample in samples):
        call["images"] = _images(samples, rng)
    if any(sample.videos for sample in samples):
        call["videos"] = [rng.integers(0, 256, size=(frames, height, width, 3), dtype=np.uint8)
                          for sample in samples for frames, height, width in sample.videos]  # fmt: skip
    if any(sample.audio_seconds for sample in samples):
        rate = call["sampling_rate"] = recipe.processor.feature_extractor.sampling_rate
        call["audio"] = [
            (0.1 * rng.standard_normal(int(seconds * rate))).astype(np.float32)
            for sample in samples
            for seconds in sample.audio_seconds
        ]
    # NumPy out: PaliGemma's processor builds labels with np.array(input_ids), which warns on tensors.
    return _as_tensors(recipe.processor(**call, padding=True, return_tensors="np"))


# What the video processors of Qwen2-VL, LLaVA-OneVision and MiniCPM-V share with their
# image processor.
_VIDEO_PROCESSOR_KEYS = (
    "do_resize", "size", "resample", "do_rescale", "rescale_factor", "do_normalize", "image_mean",
    "image_std", "do_convert_rgb", "patch_size", "temporal_patch_size", "merge_size",
    "scale_resolution", "max_slice_nums", "slice_mode", "downsample_mode", "use_image_id",
)  # fmt: skip


def _processor_config(processor_class: str, image_processor, video_processor_type: str, feature_extractor=None,
                      **options) -> dict:  # fmt: skip
    """processor_config.json for a processor that cannot be built here (it needs torchvision
    for its video processor), in the nested form ``ProcessorMixin.save_pretrained`` writes;
    the video processor resizes and normalizes as the image processor does. The feature
    extractor, where the processor has one (the Omni thinkers' audio), as it is."""
    image = json.loads(image_processor.to_json_string())
    video = {key: image[key] for key in _VIDEO_PROCESSOR_KEYS if key in image}
    video.update(video_processor_type=video_processor_type, do_sample_frames=False)
    config = {"processor_class": processor_class, **options, "image_processor": image, "video_processor": video}
    if feature_extractor is not None:
        config["feature_extractor"] = json.loads(feature_extractor.to_json_string())
    return config


def _expand(text: str, token: str, counts: Iterator[int]) -> str:
    """Repeat each ``token`` in ``text`` by the next count (what processors do)."""
    head, *rest = text.split(token)
    return head + "".join(token * next(counts) + tail for tail in rest)


def _tokenize_expanded(recipe: _Recipe, samples, counts: dict[str, list[int]]) -> dict:
    """Tokenize prompts after expanding each modality's placeholder by its counts.

    Also returns ``mm_token_type_ids`` (0 text, 1 image, 2 video), as
    ``ProcessorMixin.create_mm_token_type_ids`` does.
    """
    placeholders = recipe.spec.placeholders
    texts = []
    iterators = {modality: iter(values) for modality, values in counts.items()}
    for sample in samples:
        text = sample.text
        for modality, iterator in iterators.items():
            text = _expand(text, placeholders[modality], iterator)
        texts.append(text)
    encoded = recipe.tokenizer(texts, padding=True, return_tensors="pt")
    return {**encoded, "mm_token_type_ids": _mm_token_type_ids(recipe, encoded["input_ids"])}


def _mm_token_type_ids(recipe: _Recipe, input_ids: torch.Tensor) -> torch.Tensor:
    """0 text, 1 image, 2 video placeholder, as ``ProcessorMixin.create_mm_token_type_ids``
    gives them."""
    placeholders = recipe.spec.placeholders
    type_ids = torch.zeros_like(input_ids)
    for type_id, modality in ((1, "image"), (2, "video")):
        if modality in placeholders:
            placeholder = recipe.tokenizer.convert_tokens_to_ids(placeholders[modality])
            type_ids[input_ids == placeholder] = type_id
    return type_ids


# ------------------------------------------------------------- one row, one builder


@dataclass(frozen=True, kw_only=True)
class _FamilySpec:
    """A family's row of the table :data:`_SPECS`: what differs between families.
    :func:`_recipe` makes the tokenizer, image processor / feature extractor, processor
    and config from it, the same way for every family."""

    model_class: str  # transformers' name of the *ForConditionalGeneration (or encoder-decoder) class
    inner_model_class: str  # class name of the module that merges features into the text
    # The composite config, or a function of the tokenizer that makes it where it is not
    # one constructor call.
    config: _Part | Callable[[Any], Any]
    placeholders: dict[str, str] = field(default_factory=dict)  # modality -> placeholder token string
    samples: tuple[_Sample, ...]
    # The tokenizer (see :func:`_tokenizer`): its special tokens, the named ones, BOS or not.
    special_tokens: tuple[str, ...] = ()
    named_tokens: dict[str, str] = field(default_factory=dict)
    add_bos: bool = True
    # Special tokens given the last ids, in order (Gemma 3n embeds the ids from its image
    # and audio offsets up with their own embedders: its soft tokens top the vocabulary).
    trailing_tokens: tuple[str, ...] = ()
    # Words beyond the VOCAB_SIZE ones, from a function: they come from transformers, which
    # is imported when the family is built, not with this module.
    extra_words: Callable[[], Sequence[str]] | None = None
    image_processor: _Part | None = None  # made by _image_processor (its PIL backend where one exists)
    feature_extractor: _Part | None = None
    # The family's own processor, where it builds without torchvision: its arguments besides
    # the image processor / feature extractor and the tokenizer.
    processor: _Part | None = None
    unbuilt_processor: _UnbuiltProcessor | None = None  # where the processor needs torchvision
    make_inputs: Callable[[_Recipe, Any, list[_Sample], np.random.Generator], dict] = _processor_inputs
    # Fills weights that transformers initialises to zero and that would hide the images
    # (seeded with the model's weights).
    init_weights: Callable[[Any], None] | None = None
    # Python packages the family needs besides transformers (timm for a TimmWrapperModel
    # tower): where one is missing, building it raises FamilyUnavailable naming it.
    needs: tuple[str, ...] = ()


@dataclass
class _Recipe:
    """A family's row and what :func:`_recipe` made from it: what :func:`build`, :func:`save`
    and the input makers use."""

    spec: _FamilySpec
    tokenizer: Any
    config: Any
    model_class: type
    processor: Any = None  # the family's own processor, where it builds without torchvision
    image_processor: Any = None  # used directly where ``processor`` is None
    feature_extractor: Any = None  # likewise
    processor_config: dict | None = None  # processor_config.json to save where ``processor`` is None


def _recipe(family: str) -> _Recipe:
    """The one builder: tokenizer, image processor / feature extractor, processor and
    config of ``family``, made from its row of :data:`_SPECS`."""
    try:
        spec = _SPECS[family]
    except KeyError:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}") from None
    missing = [package for package in spec.needs if importlib.util.find_spec(package) is None]
    if missing:
        raise FamilyUnavailable(f"{family} needs {', '.join(missing)}, not installed")
    extra_words = tuple(spec.extra_words()) if spec.extra_words is not None else ()
    tokenizer = _tokenizer(
        spec.special_tokens,
        named_tokens=dict(spec.named_tokens),  # a copy: the table's own dict is not handed out
        add_bos=spec.add_bos,
        extra_words=extra_words,
        vocab_size=VOCAB_SIZE + len(extra_words),
        trailing_tokens=spec.trailing_tokens,
    )
    media = {}  # the processor's image processor or feature extractor
    if spec.image_processor is not None:
        part = spec.image_processor
        media["image_processor"] = _image_processor(part.class_name, **_arguments(part, tokenizer))
    if spec.feature_extractor is not None:
        media["feature_extractor"] = _make(spec.feature_extractor, tokenizer)
    processor = _make(spec.processor, tokenizer, **media, tokenizer=tokenizer) if spec.processor is not None else None
    processor_config = None
    if spec.unbuilt_processor is not None:
        unbuilt = spec.unbuilt_processor
        processor_config = _processor_config(
            unbuilt.processor_class, media["image_processor"], unbuilt.video_processor_type,
            media.get("feature_extractor"), **unbuilt.options,
        )  # fmt: skip
    return _Recipe(
        spec=spec,
        tokenizer=tokenizer,
        config=_make(spec.config, tokenizer) if isinstance(spec.config, _Part) else spec.config(tokenizer),
        model_class=_transformers_class(spec.model_class),
        processor=processor,
        image_processor=media.get("image_processor"),
        feature_extractor=media.get("feature_extractor"),
        processor_config=processor_config,
    )


def _make(part: _Part, tokenizer, /, **made):
    """``part``'s object, given its arguments (see :func:`_arguments`) and ``made`` ones."""
    return _transformers_class(part.class_name)(**made, **_arguments(part, tokenizer))


def _transformers_class(name: str):
    """transformers' class ``name``; :class:`FamilyUnavailable` naming it where the
    installed release has none (the tests then skip the family by name)."""
    import transformers

    try:
        return getattr(transformers, name)
    except AttributeError:
        raise FamilyUnavailable(f"transformers {transformers.__version__} has no {name}") from None


def _arguments(part: _Part, tokenizer) -> dict[str, Any]:
    """``part``'s arguments as its class takes them: a ``_Part`` made, a ``_TokenId`` or
    ``_TOKENIZER_LENGTH`` looked up in ``tokenizer``, any other value copied (the table's
    own lists and dicts are not handed to transformers, which may change them in place)."""

    def argument(value):
        if isinstance(value, _Part):
            return _make(value, tokenizer)
        if isinstance(value, _TokenId):
            return tokenizer.convert_tokens_to_ids(value.token)
        if isinstance(value, _TokenizerLength):
            return len(tokenizer)
        if isinstance(value, list) and any(isinstance(item, _TokenId) for item in value):
            return [argument(item) for item in value]  # Ovis2's visual indicator ids
        return copy.deepcopy(value)

    return {name: argument(value) for name, value in part.kwargs.items()}


# ------------------------------------------------------------------------ families
#
# What the table's rows refer to: input makers and init hooks where a family really differs,
# and the parts several rows share.


def _qwen_vl_inputs(recipe: _Recipe, model, samples: list[_Sample], rng) -> dict:
    """Qwen2(.5)-VL inputs without Qwen2VLProcessor.

    The processor cannot be built without torchvision (its video processor slot is
    type-checked against a class that only exists with torchvision), so: images go
    through the real image processor, video frames through the same image processor
    (laid out as the video processor does: temporal pairs of frames per patch), and the
    placeholder counts are the processor's own formula, grid_t*grid_h*grid_w / merge**2.
    """
    inputs, counts = _qwen_vision_inputs(recipe, samples, rng)
    if "pixel_values_videos" in inputs and "second_per_grid_ts" in inspect.signature(model.forward).parameters:
        # Qwen2.5-VL: seconds per temporal patch = temporal_patch_size / fps, here 2 frames at 2 fps
        inputs["second_per_grid_ts"] = torch.ones(len(inputs["video_grid_thw"]))
    return {**_tokenize_expanded(recipe, samples, counts), **inputs}


def _qwen_vision_inputs(recipe: _Recipe, samples: list[_Sample], rng) -> tuple[dict, dict[str, list[int]]]:
    """The image and video inputs of :func:`_qwen_vl_inputs` and their placeholder counts."""
    image_processor = recipe.image_processor
    merge_length = image_processor.merge_size**2
    inputs: dict[str, torch.Tensor] = {}
    counts: dict[str, list[int]] = {"image": [], "video": []}

    images = [image for per_sample in _images(samples, rng) for image in per_sample]
    if images:
        processed = image_processor(images=images, return_tensors="pt")
        inputs["pixel_values"] = processed["pixel_values"]
        inputs["image_grid_thw"] = processed["image_grid_thw"]
        counts["image"] = (processed["image_grid_thw"].prod(-1) // merge_length).tolist()

    videos = [video for sample in samples for video in sample.videos]
    if videos:
        patches, grids = zip(
            *(_qwen_video_patches(image_processor, shape, rng) for shape in videos), strict=True
        )
        inputs["pixel_values_videos"] = torch.cat(patches)
        inputs["video_grid_thw"] = torch.tensor(grids, dtype=torch.long)
        counts["video"] = (inputs["video_grid_thw"].prod(-1) // merge_length).tolist()
    return inputs, counts


def _qwen_video_patches(image_processor, shape: tuple[int, int, int], rng) -> tuple[torch.Tensor, list[int]]:
    """(grid_t*grid_h*grid_w, C*T*P*P) patches of a random video and its grid (t, h, w)."""
    frames, height, width = shape
    temporal = image_processor.temporal_patch_size
    if frames % temporal:
        raise ValueError(f"video frames ({frames}) must be a multiple of temporal_patch_size ({temporal})")
    processed = image_processor(
        images=[_random_image(rng, height, width) for _ in range(frames)], return_tensors="pt"
    )
    _, grid_h, grid_w = processed["image_grid_thw"][0].tolist()
    # The image processor repeats each frame over the temporal axis; keep one copy per
    # frame and put consecutive frames on that axis instead.
    per_frame = processed["pixel_values"].view(frames, grid_h * grid_w, 3, temporal, -1)[:, :, :, 0]
    pairs = per_frame.view(frames // temporal, temporal, grid_h * grid_w, 3, -1).permute(0, 2, 3, 1, 4)
    return pairs.reshape(frames // temporal * grid_h * grid_w, -1), [frames // temporal, grid_h, grid_w]


def _gemma3_projector_init(model) -> None:
    """transformers initialises Gemma 3's ``mm_input_projection_weight`` (K, N) to zeros:
    every image feature would be 0 and a merge writing them to the wrong rows would go
    unseen. Random, scaled like a Linear's."""
    weight = model.model.multi_modal_projector.mm_input_projection_weight
    weight.normal_(0.0, weight.shape[0] ** -0.5)


def _blip_2_query_init(model) -> None:
    """transformers initialises BLIP-2's learned ``query_tokens`` to zeros: the 8 query rows
    are then one row repeated through the whole Q-Former (every feature row the same, so a
    merge writing them in the wrong order goes unseen, and the gradients of its attention's
    query and key projections are exactly zero: only rounding noise to compare). Random,
    as the other weights."""
    model.query_tokens.normal_(0.0, model.config.initializer_range)


def _gemma3n_init(model) -> None:
    """Two of Gemma 3n's init-time zeros that a trained checkpoint replaces:

    * each decoder layer's ``altup.correct_output_scale``, which zeroes the product with
      that layer's per-layer input: the per-layer inputs (looked up from the token ids)
      would change nothing, and a merge that lost them would go unseen. Around 1 here;
    * the text table's padding row (``nn.Embedding`` zeroes it at init only; a checkpoint
      loads its own): on a left-padded batch the AltUp magnitude ``sqrt(mean(x**2))`` of a
      zero row has an infinite derivative, and every gradient of a training step is NaN,
      patched or not. Random, like the other rows.
    """
    text = model.model.language_model
    for layer in text.layers:
        layer.altup.correct_output_scale.uniform_(0.5, 1.5)
    table = text.embed_tokens
    table.weight[table.padding_idx].normal_(0.0, table.weight.std().item())


def _gemma4_init(model) -> None:
    """The padding rows of Gemma 4's text tables (``nn.Embedding`` zeroes them at init only;
    a checkpoint loads its own): its forward embeds every placeholder as the pad id, in the
    text table and (Gemma 4, not Unified) the per-layer one, so with zero rows a merge that
    wrote zeros at the placeholders of a kind the call lacks (or lost their per-layer
    inputs) would go unseen. Random, like the other rows."""
    text = model.model.language_model
    for table in (text.embed_tokens, getattr(text, "embed_tokens_per_layer", None)):
        if table is not None:
            table.weight[table.padding_idx].normal_(0.0, table.weight.std().item())


def _gemma4(prefix: str, inner_model_class: str, *, text: dict, vision: dict, audio: dict, image_processor: dict,
            feature_extractor: dict) -> _FamilySpec:  # fmt: skip
    """Gemma 4 and Gemma 4 Unified: the same processor layout, tokens and prompts; the
    ``text`` / ``vision`` / ``audio`` config arguments and the processors' own beside them."""
    video = dict(patch_size=PATCH, max_soft_tokens=70, pooling_kernel_size=2, do_sample_frames=False)
    return _FamilySpec(
        model_class=f"{prefix}ForConditionalGeneration",
        inner_model_class=inner_model_class,
        needs=("torchvision",),  # the video processor
        special_tokens=("<|video|>",),
        named_tokens={"image_token": "<|image|>", "boi_token": "<|image>", "eoi_token": "<image|>",
                      "audio_token": "<|audio|>", "boa_token": "<|audio>", "eoa_token": "<audio|>"},
        extra_words=lambda: ("00",),  # the frames' timestamps (00:00)
        image_processor=_Part(f"{prefix}ImageProcessor", patch_size=PATCH, max_soft_tokens=70, pooling_kernel_size=2,
                              **image_processor),
        feature_extractor=_Part(f"{prefix}AudioFeatureExtractor", **feature_extractor),
        processor=_Part(f"{prefix}Processor", video_processor=_Part(f"{prefix}VideoProcessor", **video)),
        config=_Part(
            f"{prefix}Config",
            text_config=_text_config(
                f"{prefix}TextConfig", head_dim=HEAD_DIM, global_head_dim=HEAD_DIM,
                layer_types=["sliding_attention", "full_attention"], sliding_window=32,
                use_bidirectional_attention="vision", **text,
            ),
            vision_config=_Part(f"{prefix}VisionConfig", patch_size=PATCH, pooling_kernel_size=2, **vision),
            audio_config=_Part(f"{prefix}AudioConfig", **audio),
            image_token_id=_TokenId("<|image|>"),
            video_token_id=_TokenId("<|video|>"),
            audio_token_id=_TokenId("<|audio|>"),
            boi_token_id=_TokenId("<|image>"),
            eoi_token_id=_TokenId("<image|>"),
            boa_token_id=_TokenId("<|audio>"),
            eoa_token_index=_TokenId("<audio|>"),
        ),
        # Image first: the tests that drop one placeholder drop one of the first kind.
        placeholders={"image": "<|image|>", "video": "<|video|>", "audio": "<|audio|>"},
        samples=(
            _Sample("user : <|image|> describe the image and <|audio|> what is this sound ? assistant :",
                    ((40, 60),), audio_seconds=(0.3,)),
            _Sample("user : first <|audio|> then <|audio|> , with <|image|> and the clip <|video|> , which one is "
                    "larger ? assistant :", ((70, 50),), videos=((2, 50, 70),), audio_seconds=(0.5, 0.25)),
        ),
        init_weights=_gemma4_init,
    )  # fmt: skip


def _llava_onevision_inputs(recipe: _Recipe, model, samples: list[_Sample], rng) -> dict:
    """LLaVA-OneVision inputs without LlavaOnevisionProcessor.

    The processor cannot be built without torchvision (see :func:`_qwen_vl_inputs`), so
    images go through the real image processor (which also decides anyres vs. base tile
    per prompt via ``batch_num_images``) and frames through the same processor, one tile
    each. Image placeholder counts are the lengths of the packed features the model's own
    ``get_image_features`` returns (anyres unpadding is too long to restate); video counts
    are the processor's formula, frames * ceil(side / 2)**2 + 1 newline token (the
    model's ``get_video_features`` includes that newline from 5.2x on, not in 5.17).
    """
    inputs: dict[str, torch.Tensor] = {}
    counts: dict[str, list[int]] = {"image": [], "video": []}
    images = [per_sample for per_sample in _images(samples, rng) if per_sample]
    if images:
        processed = recipe.image_processor(images=images, return_tensors="pt")
        inputs.update(_as_tensors(processed))
        with torch.no_grad():
            features = model.model.get_image_features(
                inputs["pixel_values"], inputs["image_sizes"], batch_num_images=inputs["batch_num_images"]
            )
        counts["image"] = [len(feature) for feature in getattr(features, "pooler_output", features)]

    videos = [video for sample in samples for video in sample.videos]
    if videos:
        frames = {frame_count for frame_count, _, _ in videos}
        if len(frames) != 1:
            raise ValueError("videos of one batch are stacked, so they need the same frame count")
        # Frames of a video: a multi-image prompt for the image processor, one tile each.
        inputs["pixel_values_videos"] = torch.stack(
            [
                recipe.image_processor(
                    images=[[_random_image(rng, h, w) for _ in range(n)]], return_tensors="pt"
                )["pixel_values"][:, 0]
                for n, h, w in videos
            ]
        )
        side = model.config.vision_config.image_size // model.config.vision_config.patch_size
        counts["video"] = [n * math.ceil(side / 2) ** 2 + 1 for n, _, _ in videos]

    encoded = _tokenize_expanded(recipe, samples, counts)
    del encoded["mm_token_type_ids"]  # LLaVA-OneVision places features by token id only
    return {**encoded, **inputs}


def _mllama_open_gates(model) -> None:
    """The cross-attention gates are zero at init, so the text would not depend on the
    images at all: 0.5 and 0.8, as a trained checkpoint's are open."""
    for name, parameter in model.named_parameters():
        if name.endswith("cross_attn_attn_gate"):
            parameter.fill_(0.5)
        elif name.endswith("cross_attn_mlp_gate"):
            parameter.fill_(0.8)


def _left_pad(rows: Sequence[torch.Tensor], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, attention_mask) of 1-D id rows, left-padded to the longest."""
    length = max(len(row) for row in rows)
    ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, length - len(row) :] = row
        mask[i, length - len(row) :] = 1
    return ids, mask


def _blip_2_inputs(recipe: _Recipe, model, samples: list[_Sample], rng) -> dict:
    """One image per prompt through ``Blip2Processor`` one prompt at a time (it expands the
    query tokens), then left padding of whole rows (see the ``blip_2`` row of :data:`_SPECS`)."""
    rows, pixels = [], []
    for sample in samples:
        if len(sample.image_sizes) != 1:
            raise ValueError(f"BLIP-2 takes one image per prompt, got {len(sample.image_sizes)}")
        (height, width), = sample.image_sizes
        out = recipe.processor(images=[_random_image(rng, height, width)], text=sample.text, return_tensors="pt")
        rows.append(out["input_ids"][0])
        pixels.append(out["pixel_values"])
    ids, mask = _left_pad(rows, recipe.tokenizer.pad_token_id)
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": torch.cat(pixels)}


def _vision_encoder_decoder_inputs(recipe: _Recipe, model, samples: list[_Sample], rng) -> dict:
    """Pixels through the image processor (one image per prompt), the decoder prompts
    through the tokenizer (BOS first, the decoder's start token), left-padded."""
    if any(len(sample.image_sizes) != 1 for sample in samples):
        raise ValueError("VisionEncoderDecoder takes one image per prompt")
    images = [_random_image(rng, *sample.image_sizes[0]) for sample in samples]
    pixels = recipe.processor(images=images, return_tensors="pt")["pixel_values"]
    encoded = recipe.tokenizer([sample.text for sample in samples], padding=True, return_tensors="pt")
    return {
        "pixel_values": pixels,
        "decoder_input_ids": encoded["input_ids"],
        "decoder_attention_mask": encoded["attention_mask"],
    }


def _whisper_inputs(recipe: _Recipe, model, samples: list[_Sample], rng) -> dict:
    """One clip per prompt through the feature extractor (padded to the 1-second window),
    the decoder prompts through the tokenizer (BOS first, the decoder's start token),
    left-padded."""
    if any(len(sample.audio_seconds) != 1 for sample in samples):
        raise ValueError("Whisper takes one clip per prompt")
    extractor = recipe.processor.feature_extractor
    rate = extractor.sampling_rate
    clips = [(0.1 * rng.standard_normal(int(s.audio_seconds[0] * rate))).astype(np.float32) for s in samples]
    features = extractor(clips, sampling_rate=rate, return_tensors="pt")["input_features"]
    encoded = recipe.tokenizer([sample.text for sample in samples], padding=True, return_tensors="pt")
    return {
        "input_features": features,
        "decoder_input_ids": encoded["input_ids"],
        "decoder_attention_mask": encoded["attention_mask"],
    }


# Granite Speech's feature extractor: 16 kHz audio, a mel frame every 160 samples.
_GRANITE_SPEECH_RATE, _GRANITE_SPEECH_HOP = 16000, 160


def _granite_speech_inputs(recipe: _Recipe, model, samples: list[_Sample], rng) -> dict:
    """What ``GraniteSpeechProcessor`` gives (its feature extractor needs torchaudio, so it
    is not built here): every clip of the batch in one ``input_features`` tensor, padded to
    the longest clip, of log-mel-like values (random: the model does not care how they
    were made), each frame two stacked mel frames (``torchaudio``'s centred spectrogram
    makes ``samples // hop + 1`` of them, the extractor drops an odd last one); each
    clip's placeholder count the rows the model's own ``get_audio_features`` gives for its
    frames alone (the projector's windows of that clip: what the extractor's
    ``audio_embed_sizes`` count), and ``input_features_mask`` as the extractor builds it
    from those counts (``arange(max) < count`` per clip), which selects each clip's rows of
    the padded batch's features."""
    width = model.config.encoder_config.input_dim
    frames = [(int(seconds * _GRANITE_SPEECH_RATE) // _GRANITE_SPEECH_HOP + 1) // 2
              for sample in samples for seconds in sample.audio_seconds]  # fmt: skip
    features = torch.from_numpy(rng.standard_normal((len(frames), max(frames), width)).astype(np.float32))
    inner = next(m for m in model.modules() if type(m).__name__ == recipe.spec.inner_model_class)
    with torch.no_grad():
        counts = [inner.get_audio_features(features[i : i + 1, :n]).pooler_output.shape[1]
                  for i, n in enumerate(frames)]  # fmt: skip
    mask = torch.arange(max(counts)).view(1, -1) < torch.tensor(counts).view(-1, 1)
    encoded = _tokenize_expanded(recipe, samples, {"audio": counts})
    encoded.pop("mm_token_type_ids")  # not a Granite Speech input
    return {**encoded, "input_features": features, "input_features_mask": mask}


def _granite_speech(prefix: str, **encoder) -> _FamilySpec:
    """Granite Speech (``prefix`` "GraniteSpeech") and Granite Speech Plus, whose encoder
    also hands the projector the hidden states of its ``cat_hidden_layers`` (``encoder``),
    concatenated: the projector reads ``hidden_dim`` times one more than their number."""
    concatenated = len(encoder.get("cat_hidden_layers") or ()) + 1
    return _FamilySpec(
        model_class=f"{prefix}ForConditionalGeneration",
        inner_model_class=f"{prefix}Model",
        named_tokens={"audio_token": "<|audio|>"},
        config=_Part(
            f"{prefix}Config",
            text_config=_text_config("GraniteConfig"),
            encoder_config=_Part(
                f"{prefix}EncoderConfig", input_dim=32, num_layers=LAYERS, hidden_dim=HIDDEN, feedforward_mult=2,
                num_heads=HEADS, dim_head=HEAD_DIM, output_dim=8, context_size=16, max_pos_emb=16,
                conv_kernel_size=5, **encoder,
            ),
            projector_config=_Part("Blip2QFormerConfig", **_STACK_SIZES, encoder_hidden_size=HIDDEN * concatenated,
                                   cross_attention_frequency=1),
            window_size=15,
            downsample_rate=5,
            audio_token_index=_TokenId("<|audio|>"),
            has_lora_adapter=False,  # no LoRA in a random model (peft would be asked for)
        ),
        placeholders={"audio": "<|audio|>"},
        samples=(
            _Sample("user : <|audio|> what is this sound ? assistant :", audio_seconds=(0.45,)),
            _Sample("user : first <|audio|> then <|audio|> , which one is larger ? assistant :",
                    audio_seconds=(0.8, 0.3)),
        ),
        make_inputs=_granite_speech_inputs,
    )  # fmt: skip


def _paligemma_extra_tokens() -> Sequence[str]:
    """PaliGemma's processor adds 1024 <locXXXX> and 128 <segXXX> tokens to the tokenizer;
    they are put in the vocabulary up front so that len(tokenizer) == vocab_size."""
    from transformers.models.paligemma.processing_paligemma import EXTRA_TOKENS

    return EXTRA_TOKENS


def _vision_encoder_decoder_config(tokenizer):
    """VisionEncoderDecoder's config: the ViT encoder's and the GPT-2 decoder's joined by
    ``from_encoder_decoder_configs`` (which makes the decoder cross-attend), then the
    decoder's start, pad and eos ids set on it."""
    from transformers import VisionEncoderDecoderConfig

    encoder = _make(_vision_config("ViTConfig", 56), tokenizer)  # 4x4 patches + the class row
    decoder = _make(
        _Part(
            "GPT2Config",
            n_embd=HIDDEN,
            n_inner=INTERMEDIATE,
            n_layer=LAYERS,
            n_head=HEADS,
            n_positions=MAX_POSITIONS,
            **_TEXT_TOKEN_IDS,
        ),
        tokenizer,
    )
    config = VisionEncoderDecoderConfig.from_encoder_decoder_configs(encoder, decoder)
    config.decoder_start_token_id = tokenizer.bos_token_id
    config.pad_token_id = tokenizer.pad_token_id
    config.eos_token_id = tokenizer.eos_token_id
    return config


# Qwen2-Audio's and Whisper's log-mel features: 16 bins over 1-second windows.
_MEL_FEATURES = dict(feature_size=16, sampling_rate=16000, chunk_length=1, hop_length=160, n_fft=400)
# Their audio encoders' positions: the feature extractor's nb_max_frames (100 mel frames a
# window) halved by the stride-2 conv.
_MEL_POSITIONS = _MEL_FEATURES["chunk_length"] * _MEL_FEATURES["sampling_rate"] // _MEL_FEATURES["hop_length"] // 2
# Whisper's audio encoder, which Qwen2-Audio's is, over those features.
_WHISPER_ENCODER = dict(
    num_mel_bins=_MEL_FEATURES["feature_size"],
    d_model=HIDDEN,
    encoder_layers=LAYERS,
    encoder_attention_heads=HEADS,
    encoder_ffn_dim=INTERMEDIATE,
    max_source_positions=_MEL_POSITIONS,
)

# The vision tokens of the Qwen families: image / video pads between start / end markers.
_QWEN_TOKENIZER = dict(
    special_tokens=("<|vision_start|>", "<|vision_end|>"),
    named_tokens={"image_token": "<|image_pad|>", "video_token": "<|video_pad|>"},
    add_bos=False,
)
_QWEN_TOKEN_IDS = dict(
    image_token_id=_TokenId("<|image_pad|>"),
    video_token_id=_TokenId("<|video_pad|>"),
    vision_start_token_id=_TokenId("<|vision_start|>"),
    vision_end_token_id=_TokenId("<|vision_end|>"),
)


# Qwen2-VL's image processor (Qwen2.5-VL and the Omni thinkers ship the same): each 28x28
# pixel unit is one token after the 2x2 merge, 4 to 16 tokens per image.
_QWEN_IMAGE_PROCESSOR = _Part(
    "Qwen2VLImageProcessor",
    min_pixels=4 * (PATCH * 2) ** 2,
    max_pixels=16 * (PATCH * 2) ** 2,
    patch_size=PATCH,
    temporal_patch_size=2,
    merge_size=2,
)
# The Omni thinkers' tokens: audio, image and video pads, audio between audio_bos / eos,
# images and videos between vision_bos / eos (the names their processors look up).
_OMNI_TOKENS = {
    "audio_token": "<|AUDIO|>",
    "image_token": "<|IMAGE|>",
    "video_token": "<|VIDEO|>",
    "audio_bos_token": "<|audio_bos|>",
    "audio_eos_token": "<|audio_eos|>",
    "vision_bos_token": "<|vision_bos|>",
    "vision_eos_token": "<|vision_eos|>",
}


def _qwen_vl(prefix: str, vision: dict[str, Any]) -> _FamilySpec:
    """Qwen2-VL / Qwen2.5-VL (transformers' class names start with ``prefix``):
    dynamic-resolution ViT over pre-flattened patches, 2x2 patch merger, multimodal RoPE
    (mrope) in the text model; images and video. ``vision``: the version's own vision
    config arguments."""
    merge = 2
    image = "<|vision_start|><|image_pad|><|vision_end|>"
    video = "<|vision_start|><|video_pad|><|vision_end|>"
    # mrope splits head_dim/2 rotary frequencies into (temporal, height, width) sections.
    rope = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [4, 6, 6]}
    return _FamilySpec(
        model_class=f"{prefix}ForConditionalGeneration",
        inner_model_class=f"{prefix}Model",
        **_QWEN_TOKENIZER,
        image_processor=_QWEN_IMAGE_PROCESSOR,
        unbuilt_processor=_UnbuiltProcessor(f"{prefix}Processor", "Qwen2VLVideoProcessor"),  # both versions use it
        config=_Part(
            f"{prefix}Config",
            vision_config=_Part(
                f"{prefix}VisionConfig",
                depth=LAYERS,
                num_heads=HEADS,
                patch_size=PATCH,
                spatial_merge_size=merge,
                temporal_patch_size=2,
                **vision,
            ),
            text_config=_text_config(f"{prefix}TextConfig", rope_parameters=rope),
            **_QWEN_TOKEN_IDS,
        ),
        placeholders={"image": "<|image_pad|>", "video": "<|video_pad|>"},
        samples=(
            _Sample(
                f"user : {image} describe the image , then the clip {video} . assistant :",
                image_sizes=((50, 80),),
                videos=((4, 56, 56),),
            ),
            _Sample(
                f"user : compare {image} and {image} , which one is brighter ? assistant :",
                ((56, 56), (90, 60)),
            ),
        ),
        make_inputs=_qwen_vl_inputs,
    )


def _samples(
    image: str,
    single: tuple[int, int] = (56, 56),
    pair: tuple[tuple[int, int], tuple[int, int]] = ((56, 56), (56, 56)),
    *,
    compare: str = "brighter",
) -> tuple[_Sample, ...]:
    """The image prompts most rows share (``image``: the placeholder text in them): one
    image described (``single``: its height and width), then two compared (``pair``: their
    sizes; which one is ``compare``?)."""
    return (
        _Sample(f"user : {image} describe the image . assistant :", (single,)),
        _Sample(f"user : compare {image} and {image} , which one is {compare} ? assistant :", pair),
    )


# --------------------------------------------------- families of the generic merge rule
#
# Transformers VLMs that no merge spec names (mmkernels.integrations.hf_merge_generic
# reads their forward). No processor is built: each image is one fixed-size random image,
# and its placeholder count is what the model's own get_image_features gives for it
# (asked once), so no recipe restates a family's token arithmetic.


def _counted_image_inputs(image_size: int, extra: Callable[[int], dict] | None = None, *, token_types: bool = False):
    """make_inputs: ``image_size`` square images, ``extra(n_images)`` more image inputs
    (image_sizes, ...), prompts expanded by the counts get_image_features gives."""

    def make(recipe: _Recipe, model, samples: list[_Sample], rng) -> dict:
        images = sum(len(sample.image_sizes) for sample in samples)
        pixels = torch.from_numpy(rng.standard_normal((images, 3, image_size, image_size)).astype(np.float32))
        kwargs = extra(images) if extra is not None else {}
        inner_model_class = recipe.spec.inner_model_class
        merging = next(m for m in model.modules() if type(m).__name__ == inner_model_class)
        # Arguments a version requires (Llama 4 on 5.17: vision_feature_select_strategy) from the config.
        required = {
            name: getattr(model.config, name, getattr(model.config.vision_config, name, None))
            for name, p in inspect.signature(merging.get_image_features).parameters.items()
            if p.default is p.empty and p.kind is p.POSITIONAL_OR_KEYWORD and name != "pixel_values" and name not in kwargs
        }  # fmt: skip
        with torch.no_grad():
            pooled = merging.get_image_features(pixel_values=pixels, return_dict=True, **kwargs, **required).pooler_output
        if pooled is None:
            import transformers

            raise FamilyUnavailable(
                f"{inner_model_class}.get_image_features of transformers {transformers.__version__} returns no "
                "pooled features (its forward projects them itself): the zoo counts placeholders from them"
            )
        if isinstance(pooled, (list, tuple)):
            rows = [t.reshape(-1, t.shape[-1]).shape[0] for t in pooled]
        else:
            rows = [pooled.reshape(-1, pooled.shape[-1]).shape[0] // images] * images
        encoded = _tokenize_expanded(recipe, samples, {"image": rows})
        if not token_types:
            encoded.pop("mm_token_type_ids")
        return {**encoded, "pixel_values": pixels, **kwargs}

    return make


def _qwen3_5_inputs(recipe: _Recipe, model, samples: list[_Sample], rng) -> dict:
    """Pre-flattened patches of 56x56 images (4x4 patches, 4 tokens after the 2x2 merge)
    with their image_grid_thw, and mm_token_type_ids for M-RoPE, as the processor gives;
    videos likewise (56x56 frames, pairs of frames on the temporal axis) with video_grid_thw."""
    images = sum(len(sample.image_sizes) for sample in samples)
    grid = torch.tensor([[1, 4, 4]] * images)
    patches = torch.from_numpy(rng.standard_normal((int(grid.prod(-1).sum()), 3 * 2 * PATCH * PATCH)).astype(np.float32))
    counts = {"image": [int(n) // 4 for n in grid.prod(-1)]}
    inputs = {"pixel_values": patches, "image_grid_thw": grid}
    videos = [video for sample in samples for video in sample.videos]
    if videos:
        video_grid = torch.tensor([[frames // 2, 4, 4] for frames, _, _ in videos])
        inputs["pixel_values_videos"] = torch.from_numpy(
            rng.standard_normal((int(video_grid.prod(-1).sum()), 3 * 2 * PATCH * PATCH)).astype(np.float32))
        inputs["video_grid_thw"] = video_grid
        counts["video"] = [int(n) // 4 for n in video_grid.prod(-1)]
    return {**_tokenize_expanded(recipe, samples, counts), **inputs}


def _kimi_k25_inputs(recipe: _Recipe, model, samples: list[_Sample], rng) -> dict:
    """Kimi K2.5's MoonViT inputs for 56x56 images: 16 patches of (3, 14, 14) each, grid
    (1, 4, 4), 4 tokens after the 2x2 merge (as its processor gives; the processor is not
    built here)."""
    images = sum(len(sample.image_sizes) for sample in samples)
    grid = torch.tensor([[1, 4, 4]] * images)
    patches = torch.from_numpy(rng.standard_normal((int(grid.prod(-1).sum()), 3, PATCH, PATCH)).astype(np.float32))
    encoded = _tokenize_expanded(recipe, samples, {"image": [int(n) // 4 for n in grid.prod(-1)]})
    encoded.pop("mm_token_type_ids")  # no M-RoPE: its forward takes none
    return {**encoded, "pixel_values": patches, "image_grid_thw": grid}


def _molmo2_inputs(recipe: _Recipe, model, samples: list[_Sample], rng) -> dict:
    """What Molmo2's processor gives (it needs torchvision, so it is not built here) for
    56x56 images of one crop each: 4x4 patches, pre-flattened; each 2x2 block of patches
    pooled into one token (``image_token_pooling``: the block's patch indices within its
    image), so 4 placeholders per image; ``image_grids`` rows ``(2, 2, 0, 0)`` (the pooled
    grid, no low-resolution view); ``mm_token_type_ids`` 1 on the placeholders (image tokens
    attend to each other both ways)."""
    images = sum(len(sample.image_sizes) for sample in samples)
    side = 56 // PATCH
    pixels = torch.from_numpy(rng.standard_normal((images, side * side, 3 * PATCH * PATCH)).astype(np.float32))
    blocks = [[(2 * i + di) * side + 2 * j + dj for di in (0, 1) for dj in (0, 1)] for i in range(side // 2)
              for j in range(side // 2)]  # fmt: skip
    pooling = torch.tensor(blocks * images)
    encoded = _tokenize_expanded(recipe, samples, {"image": [len(blocks)] * images})
    return {**encoded, "pixel_values": pixels, "image_token_pooling": pooling,
            "image_grids": torch.tensor([[side // 2, side // 2, 0, 0]] * images), "image_num_crops": torch.ones(images, dtype=torch.long)}  # fmt: skip


def _qwen_omni_inputs(seconds_per_temporal_patch: float):
    """make_inputs: what an Omni processor gives (its video processor needs torchvision, so
    it is not built here): images and video frames as for Qwen2-VL
    (:func:`_qwen_vision_inputs`) with ``video_second_per_grid`` (the processor's
    temporal_patch_size / fps); audio through the Whisper feature extractor padded to its
    window, with the mask the processor renames ``feature_attention_mask``; each clip's
    placeholders counted by the rows the model's own ``get_audio_features`` gives for it
    (asked once per clip), so no recipe restates an audio encoder's length arithmetic."""

    def make(recipe: _Recipe, model, samples: list[_Sample], rng) -> dict:
        inputs, counts = _qwen_vision_inputs(recipe, samples, rng)
        if "pixel_values_videos" in inputs:
            inputs["video_second_per_grid"] = torch.full((len(inputs["video_grid_thw"]),), seconds_per_temporal_patch)
        extractor = recipe.feature_extractor
        rate = extractor.sampling_rate
        clips = [(0.1 * rng.standard_normal(int(seconds * rate))).astype(np.float32)
                 for sample in samples for seconds in sample.audio_seconds]  # fmt: skip
        if clips:
            audio = extractor(clips, sampling_rate=rate, padding="max_length", return_attention_mask=True,
                              return_tensors="pt")  # fmt: skip
            features, mask = audio["input_features"], audio["attention_mask"]
            inputs["input_features"], inputs["feature_attention_mask"] = features, mask
            inner = next(m for m in model.modules() if type(m).__name__ == recipe.spec.inner_model_class)
            with torch.no_grad():
                counts["audio"] = [
                    inner.get_audio_features(features[i : i + 1], mask[i : i + 1]).last_hidden_state.shape[0]
                    for i in range(len(clips))
                ]
        encoded = _tokenize_expanded(recipe, samples, counts)
        encoded.pop("mm_token_type_ids")  # its forward takes none (M-RoPE reads the vision start tokens)
        return {**encoded, **inputs}

    return make


def _qwen_omni(prefix: str, *, audio: dict, vision: dict, text: _Part, seconds_per_temporal_patch: float,
               token_ids: dict, **config) -> _FamilySpec:  # fmt: skip
    """An Omni thinker (transformers' class names start with ``prefix``): audio, images and
    videos merged in one forward, M-RoPE over all three. ``audio`` / ``vision`` / ``text``:
    the version's own encoder arguments and text config; ``token_ids``: the placeholder ids
    under the version's argument names; ``config``: further thinker config arguments. Sample
    0 holds a clip and an image; sample 1 two clips, an image and a video."""
    clip = "<|audio_bos|><|AUDIO|><|audio_eos|>"
    image = "<|vision_bos|><|IMAGE|><|vision_eos|>"
    video = "<|vision_bos|><|VIDEO|><|vision_eos|>"
    return _FamilySpec(
        model_class=f"{prefix}ThinkerForConditionalGeneration",
        inner_model_class=f"{prefix}ThinkerModel",
        named_tokens=_OMNI_TOKENS,
        add_bos=False,
        image_processor=_QWEN_IMAGE_PROCESSOR,
        feature_extractor=_Part("WhisperFeatureExtractor", **_MEL_FEATURES),
        unbuilt_processor=_UnbuiltProcessor(f"{prefix}Processor", "Qwen2VLVideoProcessor"),
        config=_Part(
            f"{prefix}ThinkerConfig",
            # n_window: the encoder attends within chunks of 2 * n_window mel frames, one window here.
            audio_config=_Part(f"{prefix}AudioEncoderConfig", n_window=_MEL_POSITIONS, output_dim=HIDDEN, **audio),
            vision_config=_Part(
                f"{prefix}VisionEncoderConfig", depth=LAYERS, hidden_size=HIDDEN, intermediate_size=INTERMEDIATE,
                num_heads=HEADS, out_hidden_size=HIDDEN, patch_size=PATCH, spatial_merge_size=2,
                temporal_patch_size=2, **vision,
            ),
            text_config=text,
            audio_start_token_id=_TokenId("<|audio_bos|>"),
            vision_start_token_id=_TokenId("<|vision_bos|>"),
            vision_end_token_id=_TokenId("<|vision_eos|>"),
            **token_ids,
            **config,
        ),
        # Image first: the tests that drop one placeholder drop one of the first kind, whose
        # count the forward checks (it checks no audio count).
        placeholders={"image": "<|IMAGE|>", "video": "<|VIDEO|>", "audio": "<|AUDIO|>"},
        samples=(
            _Sample(f"user : {clip} what is this sound ? and {image} describe the image . assistant :",
                    ((56, 56),), audio_seconds=(0.45,)),
            _Sample(f"user : first {clip} then {clip} , with {image} and the clip {video} , which one is larger ? "
                    "assistant :", ((50, 80),), videos=((4, 56, 56),), audio_seconds=(0.8, 0.3)),
        ),
        make_inputs=_qwen_omni_inputs(seconds_per_temporal_patch),
    )  # fmt: skip


def _smolvlm_inputs(recipe: _Recipe, model, samples: list[_Sample], rng) -> dict:
    """What SmolVLMProcessor gives (it needs num2words for its video prompts, so it is not
    built here): the images through the real image processor (crops plus a global view,
    images padded per prompt with all-zero ones, ``pixel_attention_mask``), each ``<image>``
    of a prompt expanded by the processor module's own ``get_image_prompt_string`` for that
    image's rows and columns of crops."""
    from transformers.models.smolvlm.processing_smolvlm import get_image_prompt_string

    processed = recipe.image_processor(images=_images(samples, rng), return_row_col_info=True, return_tensors="pt")
    image_seq_len = (model.config.vision_config.image_size // PATCH) ** 2 // model.config.scale_factor**2
    texts = []
    for sample, rows, cols in zip(samples, processed["rows"], processed["cols"], strict=True):
        head, *tails = sample.text.split("<image>")
        prompts = [get_image_prompt_string(r, c, image_seq_len, fake_token_around_image="<fake_token_around_image>",
                                           image_token="<image>", global_image_token="<global-img>")
                   for r, c in zip(rows, cols, strict=True)]  # fmt: skip
        texts.append(head + "".join(prompt + tail for prompt, tail in zip(prompts, tails, strict=True)))
    encoded = recipe.tokenizer(texts, padding=True, return_tensors="pt")
    return {**encoded, "pixel_values": processed["pixel_values"],
            "pixel_attention_mask": processed["pixel_attention_mask"]}  # fmt: skip


def _glm4v_family(prefix: str) -> _FamilySpec:
    """GLM-4.1V and GLM-4.6V (transformers' class names start with ``prefix``; 4.6V's config
    holds 4.1V's vision and text configs, its model builds their towers): Qwen2-VL's layout
    (pre-flattened patches, 2x2 merge, M-RoPE) with its own ViT (a learned position table
    interpolated to each image's grid, post-conv downsample), placeholders between begin /
    end tokens."""
    return _FamilySpec(
        model_class=f"{prefix}ForConditionalGeneration",
        inner_model_class=f"{prefix}Model",
        special_tokens=("<|begin_of_image|>", "<|end_of_image|>", "<|begin_of_video|>", "<|end_of_video|>"),
        named_tokens={"image_token": "<|image|>", "video_token": "<|video|>"},
        add_bos=False,
        config=_Part(
            f"{prefix}Config",
            vision_config=_Part(
                "Glm4vVisionConfig",
                depth=LAYERS, hidden_size=HIDDEN, intermediate_size=INTERMEDIATE, num_heads=HEADS,
                out_hidden_size=HIDDEN, patch_size=PATCH, temporal_patch_size=2, spatial_merge_size=2,
                image_size=56,
            ),
            text_config=_text_config(
                "Glm4vTextConfig", head_dim=HEAD_DIM,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3],
                                 "partial_rotary_factor": 0.5},
            ),
            image_token_id=_TokenId("<|image|>"),
            video_token_id=_TokenId("<|video|>"),
            image_start_token_id=_TokenId("<|begin_of_image|>"),
            image_end_token_id=_TokenId("<|end_of_image|>"),
            video_start_token_id=_TokenId("<|begin_of_video|>"),
            video_end_token_id=_TokenId("<|end_of_video|>"),
        ),
        # Video frames take the image token too (the forward's own mask says so), so a call
        # holds images or a video, never both: images here.
        placeholders={"image": "<|image|>"},
        samples=_samples("<|begin_of_image|><|image|><|end_of_image|>"),
        make_inputs=_qwen3_5_inputs,
    )  # fmt: skip


def _generic(
    model_class: str,
    inner_model_class: str,
    *,
    named_tokens: dict[str, str],
    config: _Part,
    add_bos: bool = True,
    extra: Callable[[int], dict] | None = None,
) -> _FamilySpec:
    """The row of such a family: 56x56 images, the tokenizer's ``image_token`` as placeholder;
    ``extra`` as for :func:`_counted_image_inputs`."""
    token = named_tokens["image_token"]
    return _FamilySpec(
        model_class=model_class,
        inner_model_class=inner_model_class,
        named_tokens=named_tokens,
        add_bos=add_bos,
        config=config,
        placeholders={"image": token},
        samples=_samples(token),
        make_inputs=_counted_image_inputs(56, extra),
    )


def _siglip_cohere(prefix: str, token_argument: str) -> _FamilySpec:
    """Aya Vision / Command A Vision (transformers' class names start with ``prefix``; the
    config takes the image token's id as ``token_argument``): SigLIP, pixel-shuffle 2,
    SwiGLU adapter, Cohere 2."""
    return _generic(
        f"{prefix}ForConditionalGeneration",
        f"{prefix}Model",
        named_tokens={"image_token": "<image>"},
        config=_Part(
            f"{prefix}Config",
            vision_config=_vision_config("SiglipVisionConfig", 56),
            text_config=_text_config("Cohere2Config"),
            downsample_factor=2,
            alignment_intermediate_size=INTERMEDIATE,
            **{token_argument: _TokenId("<image>")},
        ),
    )


# Qwen3.5's text model (MiniCPM-V 4.6 / 4.7 use it too): hybrid linear / full attention,
# interleaved M-RoPE.
_QWEN3_5_TEXT = _text_config(
    "Qwen3_5TextConfig", head_dim=HEAD_DIM,
    rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [4, 6, 6],
                     "mrope_interleaved": True, "partial_rotary_factor": 1.0},
    layer_types=["linear_attention", "full_attention"], linear_num_key_heads=HEADS, linear_num_value_heads=HEADS,
    linear_key_head_dim=128, linear_value_head_dim=128,  # what vLLM's CPU GDN kernel takes
)  # fmt: skip

# MiniCPM-V's tokens: image and video pads; each crop (a thumbnail or a frame) between
# <image> / </image>, each slice between <slice> / </slice>, an image's (and on 4.6 a
# video's) local index between <image_id> / </image_id> (the names its processor looks up).
_MINICPMV_TOKENS = {
    "image_token": "<|image_pad|>",
    "video_token": "<|video_pad|>",
    "image_start_token": "<image>",
    "image_end_token": "</image>",
    "slice_start_token": "<slice>",
    "slice_end_token": "</slice>",
    "image_id_start_token": "<image_id>",
    "image_id_end_token": "</image_id>",
}


def _minicpmv_inputs(*, video_ids: bool):
    """make_inputs: what MiniCPM-V's processor gives (its video processor needs torchvision,
    so it is not built here). Images through the real image processor: each image a
    thumbnail, and above 112x112 pixels also a row of slices, every crop's patches packed
    into ONE row, ``pixel_values`` ``(1, 3, 14, L)``, with ``target_sizes`` per crop; video
    frames through it too with slicing off (the video processor resizes a frame as an
    unsliced image and packs the frames the same way), ``pixel_values_videos`` and
    ``target_sizes_videos``. The prompt text as the processor lays it out: per crop
    ``<image>`` + pads + ``</image>``, per slice ``<slice>`` + pads + ``</slice>``, pads =
    the crop's patches / 16 (the 16x merge), each image (and with ``video_ids``, 4.6's,
    each video) prefixed by its index in the sample; ``mm_token_type_ids`` (1 image, 2
    video) where the forward takes them (4.7's M-RoPE)."""

    def crops(recipe: _Recipe, kind: str, sizes: torch.Tensor, grids, per_item) -> Iterator[str]:
        """Each image's (or frame's) text: its thumbnail, then its one row of slices."""
        tokens = recipe.spec.named_tokens
        pad = tokens[f"{kind}_token"]
        counts = iter((sizes.prod(-1) // 16).tolist())
        for (rows, cols), n in zip(grids, per_item):
            if rows > 1:
                raise ValueError("a tiny MiniCPM-V image slices into one row (the vocabulary has no newline)")
            thumbnail, *slices = [next(counts) for _ in range(n)]
            crop = tokens["image_start_token"] + pad * thumbnail + tokens["image_end_token"]
            yield crop + "".join(tokens["slice_start_token"] + pad * k + tokens["slice_end_token"] for k in slices)

    def make(recipe: _Recipe, model, samples: list[_Sample], rng) -> dict:
        tokens = recipe.spec.named_tokens
        inputs: dict[str, torch.Tensor] = {}
        texts = [sample.text for sample in samples]
        images = [image for per_sample in _images(samples, rng) for image in per_sample]
        if images:
            processed = recipe.image_processor(images, return_tensors="pt")
            inputs["pixel_values"], inputs["target_sizes"] = processed["pixel_values"], processed["target_sizes"]
            replacements = crops(recipe, "image", processed["target_sizes"], processed["grids"],
                                 processed["num_patches_per_image"])  # fmt: skip
            texts = [_replace_each(text, tokens["image_token"], replacements, tokens) for text in texts]
        videos = [video for sample in samples for video in sample.videos]
        if videos:
            frames = [_random_image(rng, h, w) for n, h, w in videos for _ in range(n)]
            processed = recipe.image_processor(frames, slice_mode=False, return_tensors="pt")
            inputs["pixel_values_videos"] = processed["pixel_values"]
            inputs["target_sizes_videos"] = processed["target_sizes"]
            per_frame = iter(crops(recipe, "video", processed["target_sizes"], [(0, 0)] * len(frames),
                                   [1] * len(frames)))  # fmt: skip
            replacements = ("".join(next(per_frame) for _ in range(n)) for n, _, _ in videos)
            texts = [_replace_each(text, tokens["video_token"], replacements, tokens if video_ids else None)
                     for text in texts]  # fmt: skip
        encoded = recipe.tokenizer(texts, padding=True, return_tensors="pt")
        if "mm_token_type_ids" in inspect.signature(model.model.forward).parameters:
            encoded["mm_token_type_ids"] = _mm_token_type_ids(recipe, encoded["input_ids"])
        return {**encoded, **inputs}

    return make


def _replace_each(text: str, token: str, replacements: Iterator[str], id_tokens: dict[str, str] | None) -> str:
    """``text`` with each ``token`` replaced by the next replacement, prefixed by its index
    in ``text`` between ``<image_id>`` / ``</image_id>`` where ``id_tokens`` are given."""
    head, *rest = text.split(token)
    pieces = [head]
    for i, tail in enumerate(rest):
        if id_tokens is not None:
            pieces.append(f"{id_tokens['image_id_start_token']}{i}{id_tokens['image_id_end_token']}")
        pieces += [next(replacements), tail]
    return "".join(pieces)


def _minicpmv(prefix: str, *, video_ids: bool, **config) -> _FamilySpec:
    """MiniCPM-V (transformers' class names start with ``prefix``): a SigLIP-style ViT over
    NaViT-packed crops whose window-attention merger (2x2, after layer 0 here) and MLP
    merger (2x2) make one token per 4x4 patches, Qwen3.5's text model; images (thumbnail
    plus slices) and videos (one crop per frame). ``video_ids``: its processor prefixes each
    video by its index (4.6); ``config``: further config arguments (4.7's canvas markers).
    Sample 0 holds one sliced image (a thumbnail and two slices); sample 1 two unsliced
    images and a 2-frame video. Every crop is 112x112 pixels (8x8 patches, 4 tokens):
    5.17's window merger takes crops of one size only (tests/test_minicpmv_hf.py merges
    crops of several sizes where the forward takes them)."""
    image, video = "<|image_pad|>", "<|video_pad|>"
    return _FamilySpec(
        model_class=f"{prefix}ForConditionalGeneration",
        inner_model_class=f"{prefix}Model",
        named_tokens=_MINICPMV_TOKENS,
        add_bos=False,
        extra_words=lambda: ("0", "1"),  # the image ids of a sample
        # 112-pixel crops: up to 8x8 patches, 4 tokens; larger images slice into 112-pixel tiles.
        image_processor=_Part("MiniCPMV4_6ImageProcessor", scale_resolution=112, patch_size=PATCH, max_slice_nums=2),
        unbuilt_processor=_UnbuiltProcessor(f"{prefix}Processor", "MiniCPMV4_6VideoProcessor"),
        config=_Part(
            f"{prefix}Config",
            vision_config=_vision_config(f"{prefix}VisionConfig", 112),
            text_config=_QWEN3_5_TEXT,
            insert_layer_id=0,
            image_token_id=_TokenId(image),
            video_token_id=_TokenId(video),
            **config,
        ),
        placeholders={"image": image, "video": video},
        samples=(
            _Sample(f"user : {image} describe the image . assistant :", ((104, 144),)),
            _Sample(f"user : compare {image} and {image} with the clip {video} , which one is brighter ? assistant :",
                    ((56, 56), (96, 96)), videos=((2, 56, 56),)),
        ),
        make_inputs=_minicpmv_inputs(video_ids=video_ids),
    )  # fmt: skip


# LLaVA-1.5's and LLaVA-NeXT's processor and config arguments: CLIP's second-to-last layer
# without its CLS token (the 'default' strategy), Llama.
_LLAVA_PROCESSOR = dict(
    patch_size=PATCH,
    vision_feature_select_strategy="default",
    num_additional_image_tokens=1,  # the CLS token, dropped by the 'default' strategy
)
_LLAVA_CONFIG = dict(
    text_config=_text_config("LlamaConfig"),
    image_token_index=_TokenId("<image>"),
    vision_feature_layer=-2,
    vision_feature_select_strategy="default",
)

# Ovis2's visual indicator tokens, in its config's order.
_OVIS2_INDICATORS = ("<IMG_START>", "<IMG_GRID>", "<IMG_COL>", "<IMG_ROW>", "<IMG_END>")

# The anyres grids (height, width in pixels) of LLaVA-NeXT's 28-pixel and LLaVA-OneVision's
# 56-pixel tiles: the image processor picks from them and the model unpads by them.
_LLAVA_NEXT_PINPOINTS = [[28, 56], [56, 28], [56, 56]]
_LLAVA_ONEVISION_PINPOINTS = [[56, 56], [56, 112], [112, 56], [112, 112]]


# -------------------------------------------------------------------------- the table
#
# One row per family (FAMILIES keeps this order), built by _recipe. Samples: sample 0 is
# the simple one (batch=1 gets only it); sample 1 has several media with text before,
# between and after them; a shorter/longer pair gives left padding.

_SPECS: dict[str, _FamilySpec] = {
    # LLaVA-1.5: CLIP (CLS dropped, 'default' strategy), 2-layer MLP projector, Llama.
    # 56-pixel images: 4x4 patches -> 16 tokens per image.
    "llava": _FamilySpec(
        model_class="LlavaForConditionalGeneration",
        inner_model_class="LlavaModel",
        named_tokens={"image_token": "<image>"},
        image_processor=_Part("CLIPImageProcessor", size={"shortest_edge": 56}, crop_size=_square(56)),
        processor=_Part("LlavaProcessor", **_LLAVA_PROCESSOR),
        config=_Part(
            "LlavaConfig",
            vision_config=_vision_config("CLIPVisionConfig", 56, projection_dim=HIDDEN),
            **_LLAVA_CONFIG,
            image_seq_length=(56 // PATCH) ** 2,
        ),
        placeholders={"image": "<image>"},
        samples=_samples("<image>", (40, 60), ((56, 56), (70, 50))),
    ),
    # LLaVA-NeXT anyres: base tile + grid tiles, unpadded, with a newline per row.
    # 28-pixel tiles (2x2 patches); grids of up to 2x2 tiles.
    "llava_next": _FamilySpec(
        model_class="LlavaNextForConditionalGeneration",
        inner_model_class="LlavaNextModel",
        named_tokens={"image_token": "<image>"},
        image_processor=_Part(
            "LlavaNextImageProcessor",
            size={"shortest_edge": 28},
            crop_size=_square(28),
            image_grid_pinpoints=_LLAVA_NEXT_PINPOINTS,
        ),
        processor=_Part("LlavaNextProcessor", **_LLAVA_PROCESSOR),
        config=_Part(
            "LlavaNextConfig",
            vision_config=_vision_config("CLIPVisionConfig", 28, projection_dim=HIDDEN),
            **_LLAVA_CONFIG,
            image_grid_pinpoints=_LLAVA_NEXT_PINPOINTS,
            image_seq_length=(28 // PATCH) ** 2,
        ),
        placeholders={"image": "<image>"},
        # wide, tall and square images pick different grids -> different token counts
        samples=_samples("<image>", (30, 50), ((50, 24), (44, 44)), compare="larger"),
    ),
    # LLaVA-NeXT-Video: LLaVA-NeXT's anyres images, and video frames through the same tower,
    # 2x2 average-pooled. 56-pixel tiles and frames (the tower's one image size): 16 tokens
    # per tile, 4 per frame.
    "llava_next_video": _FamilySpec(
        model_class="LlavaNextVideoForConditionalGeneration",
        inner_model_class="LlavaNextVideoModel",
        needs=("torchvision",),  # the video processor
        named_tokens={"image_token": "<image>", "video_token": "<video>"},
        image_processor=_Part(
            "LlavaNextImageProcessor", size={"shortest_edge": 56}, crop_size=_square(56),
            image_grid_pinpoints=_LLAVA_ONEVISION_PINPOINTS,
        ),
        processor=_Part(
            "LlavaNextVideoProcessor", **_LLAVA_PROCESSOR,
            video_processor=_Part("LlavaNextVideoVideoProcessor", size={"shortest_edge": 56}, crop_size=_square(56)),
        ),
        config=_Part(
            "LlavaNextVideoConfig",
            vision_config=_vision_config("CLIPVisionConfig", 56, projection_dim=HIDDEN),
            **_LLAVA_CONFIG,
            video_token_index=_TokenId("<video>"),
            image_grid_pinpoints=_LLAVA_ONEVISION_PINPOINTS,
            image_seq_length=(56 // PATCH) ** 2,
            video_seq_length=(56 // PATCH // 2) ** 2,
        ),
        placeholders={"image": "<image>", "video": "<video>"},
        samples=(
            _Sample("user : <image> describe the image , then the clip <video> . assistant :", ((40, 70),),
                    videos=((3, 50, 60),)),
            _Sample("user : compare <image> and <image> , which one is larger ? assistant :", ((70, 40), (56, 56))),
        ),
    ),  # fmt: skip
    # LLaVA-OneVision: SigLIP + Qwen2; anyres for a single image, base tile only for each
    # image of a multi-image prompt, 2x2-pooled frames for video. 56-pixel tiles: 4x4
    # patches = 16 tokens per tile.
    "llava_onevision": _FamilySpec(
        model_class="LlavaOnevisionForConditionalGeneration",
        inner_model_class="LlavaOnevisionModel",
        named_tokens={"image_token": "<image>", "video_token": "<video>"},
        add_bos=False,
        image_processor=_Part(
            "LlavaOnevisionImageProcessor",
            size=_square(56),
            image_grid_pinpoints=_LLAVA_ONEVISION_PINPOINTS,
        ),
        unbuilt_processor=_UnbuiltProcessor(
            "LlavaOnevisionProcessor",
            "LlavaOnevisionVideoProcessor",
            dict(
                num_image_tokens=(56 // PATCH) ** 2,
                vision_feature_select_strategy="full",
                vision_aspect_ratio="anyres_max_9",
                image_token="<image>",
                video_token="<video>",
            ),
        ),
        config=_Part(
            "LlavaOnevisionConfig",
            vision_config=_vision_config("SiglipVisionConfig", 56, vision_use_head=False),
            text_config=_text_config("Qwen2Config"),
            image_token_index=_TokenId("<image>"),
            video_token_index=_TokenId("<video>"),
            image_grid_pinpoints=_LLAVA_ONEVISION_PINPOINTS,
            vision_feature_layer=-1,
            vision_feature_select_strategy="full",
            vision_aspect_ratio="anyres_max_9",
        ),
        placeholders={"image": "<image>", "video": "<video>"},
        samples=(
            _Sample(
                "user : <image> describe the image , then the clip <video> . assistant :",
                image_sizes=((40, 90),),
                videos=((4, 56, 56),),
            ),
            _Sample(
                "user : compare <image> and <image> , which one is brighter ? assistant :",
                ((56, 56), (70, 50)),
            ),
        ),
        make_inputs=_llava_onevision_inputs,
    ),
    # Qwen2-VL / Qwen2.5-VL: see _qwen_vl for what they share.
    "qwen2_vl": _qwen_vl("Qwen2VL", vision=dict(embed_dim=HIDDEN, hidden_size=HIDDEN, mlp_ratio=2)),
    "qwen2_5_vl": _qwen_vl(
        "Qwen2_5_VL",
        # window_size 56 = 2x2 merged units per window, so window attention and the
        # window reordering really happen; the last block attends fully.
        vision=dict(
            hidden_size=HIDDEN,
            out_hidden_size=HIDDEN,
            intermediate_size=INTERMEDIATE,
            window_size=2 * PATCH * 2,
            fullatt_block_indexes=[LAYERS - 1],
            tokens_per_second=2,
        ),
    ),
    # PaliGemma: SigLIP (no CLS), linear projector, Gemma with a bidirectional prefix.
    "paligemma": _FamilySpec(
        model_class="PaliGemmaForConditionalGeneration",
        inner_model_class="PaliGemmaModel",
        named_tokens={"image_token": "<image>"},
        extra_words=_paligemma_extra_tokens,
        add_bos=False,  # the processor writes BOS after the image tokens itself
        image_processor=_Part("SiglipImageProcessor", size=_square(56), image_seq_length=(56 // PATCH) ** 2),
        processor=_Part("PaliGemmaProcessor"),
        config=_Part(
            "PaliGemmaConfig",
            vision_config=_vision_config("SiglipVisionConfig", 56, vision_use_head=False),
            text_config=_text_config("GemmaConfig", head_dim=HEAD_DIM),
            image_token_index=_TokenId("<image>"),
            projection_dim=HIDDEN,
            hidden_size=HIDDEN,
            vocab_size=_TOKENIZER_LENGTH,
        ),
        placeholders={"image": "<image>"},
        samples=(
            # PaliGemma prompts are images first, then BOS and the prefix text
            _Sample("<image> caption the image", ((40, 60),)),
            _Sample(
                "<image><image> answer : which one of these two pictures is brighter ?", ((56, 56), (70, 50))
            ),
        ),
    ),
    # Gemma 3: SigLIP, 2x2 average pooling to mm_tokens_per_image, soft image tokens between
    # <start_of_image> / <end_of_image>, bidirectional attention inside an image.
    # 112-pixel images: 8x8 patches, average-pooled 2x2 -> 16 tokens per image.
    "gemma3": _FamilySpec(
        model_class="Gemma3ForConditionalGeneration",
        inner_model_class="Gemma3Model",
        named_tokens={
            "boi_token": "<start_of_image>",
            "eoi_token": "<end_of_image>",
            "image_token": "<image_soft_token>",
        },
        image_processor=_Part("Gemma3ImageProcessor", size=_square(112)),
        processor=_Part("Gemma3Processor", image_seq_length=16),
        config=_Part(
            "Gemma3Config",
            vision_config=_vision_config("SiglipVisionConfig", 112, vision_use_head=False),
            text_config=_text_config(
                "Gemma3TextConfig",
                head_dim=HEAD_DIM,
                query_pre_attn_scalar=HEAD_DIM,
                # one local (sliding) and one global layer, the window shorter than the prompts
                layer_types=["sliding_attention", "full_attention"],
                sliding_window=32,
            ),
            mm_tokens_per_image=16,
            boi_token_index=_TokenId("<start_of_image>"),
            eoi_token_index=_TokenId("<end_of_image>"),
            image_token_index=_TokenId("<image_soft_token>"),
        ),
        placeholders={"image": "<image_soft_token>"},
        samples=_samples("<start_of_image>", (40, 60), ((56, 56), (70, 50))),
        init_weights=_gemma3_projector_init,
    ),
    # Gemma 3n: a timm CNN through TimmWrapperModel (timm's test ConvNeXt: stride 32, 64
    # channels, so a 96-pixel image is a 3x3 grid, 9 soft tokens; Gemma 3n's own is a
    # MobileNetV5 with a 16x16 grid), a conformer audio encoder over log-mel frames (4x
    # subsampled by two convs, then every 4th frame kept: 77 frames, 5 rows for 0.8 s), each
    # tower's rows normalized and projected by its embedder; AltUp / Laurel text model with
    # per-layer inputs looked up from the token ids (made to count: see _gemma3n_init). The
    # processor writes a fixed count of placeholders per image (9) and per clip (8); the
    # forward pads each clip's rows to 8 with the embedding of the last audio id (the
    # shorter clips of the batch from their end: 3 and 4 rows of 5). Its image and audio
    # markers and soft tokens top the vocabulary (trailing_tokens), each range of three ids
    # (marker, soft token, an unused last id) embedded by its tower's embedder, as Gemma
    # 3n's ranges of 128 ids are.
    "gemma3n": _FamilySpec(
        model_class="Gemma3nForConditionalGeneration",
        inner_model_class="Gemma3nModel",
        needs=("timm",),
        named_tokens={
            "boi_token": "<start_of_image>",
            "eoi_token": "<end_of_image>",
            "image_token": "<image_soft_token>",
            "boa_token": "<start_of_audio>",
            "eoa_token": "<end_of_audio>",
            "audio_token": "<audio_soft_token>",
        },
        trailing_tokens=("<end_of_image>", "<image_soft_token>", "<image_unused>",
                         "<end_of_audio>", "<audio_soft_token>", "<audio_unused>"),  # fmt: skip
        image_processor=_Part("SiglipImageProcessor", size=_square(96)),
        feature_extractor=_Part("Gemma3nAudioFeatureExtractor", feature_size=16),
        processor=_Part("Gemma3nProcessor", image_seq_length=9, audio_seq_length=8),
        config=_Part(
            "Gemma3nConfig",
            text_config=_text_config(
                "Gemma3nTextConfig", head_dim=HEAD_DIM, layer_types=["sliding_attention", "full_attention"],
                sliding_window=32, hidden_size_per_layer_input=16, laurel_rank=8, num_kv_shared_layers=0,
                vocab_size_per_layer_input=_TokenId("<end_of_image>"),  # the text ids: below the image range
            ),
            vision_config=_Part("Gemma3nVisionConfig", architecture="test_convnext", hidden_size=HIDDEN,
                                vocab_size=3, vocab_offset=_TokenId("<end_of_image>")),
            audio_config=_Part(
                "Gemma3nAudioConfig", input_feat_size=16, hidden_size=HIDDEN, conf_num_attention_heads=HEADS,
                conf_num_hidden_layers=LAYERS, sscp_conv_channel_size=[8, 8], vocab_size=3,
                vocab_offset=_TokenId("<end_of_audio>"),
            ),
            vision_soft_tokens_per_image=9,
            audio_soft_tokens_per_image=8,
            boi_token_id=_TokenId("<start_of_image>"),
            eoi_token_id=_TokenId("<end_of_image>"),
            image_token_id=_TokenId("<image_soft_token>"),
            boa_token_id=_TokenId("<start_of_audio>"),
            eoa_token_id=_TokenId("<end_of_audio>"),
            audio_token_id=_TokenId("<audio_soft_token>"),
        ),
        # Image first: the tests that drop one placeholder drop one of the first kind.
        placeholders={"image": "<image_soft_token>", "audio": "<audio_soft_token>"},
        # Clips of 0.45 to 0.8 s: with one much shorter than the longest (0.3 s), some of
        # the conformer's padded queries see no valid key, and in float64 (the fidelity
        # lane's reference) its masked softmax then gives NaN gradients (its mask value,
        # float64's min, becomes -inf in its float32 softmax).
        samples=(
            _Sample("user : <image_soft_token> describe the image and <audio_soft_token> what is this sound ? "
                    "assistant :", ((40, 60),), audio_seconds=(0.45,)),
            _Sample("user : first <audio_soft_token> then <audio_soft_token> , with <image_soft_token> and "
                    "<image_soft_token> , which one is larger ? assistant :", ((56, 56), (70, 50)),
                    audio_seconds=(0.8, 0.5)),
        ),
        init_weights=_gemma3n_init,
    ),  # fmt: skip
    # Gemma 4: a ViT over pre-cut 14-pixel patches with 2-D positions, average-pooled 2x2 by
    # position (its processor resizes each image to fill a budget of 280 patches, the smallest
    # it takes: 63 to 70 soft tokens), video frames through the same tower (70 tokens each,
    # after a timestamp), a conformer audio encoder over log-mel frames (4x subsampled by two
    # convs: 8 rows for 0.3 s), each tower's rows normalized and projected by its embedder; a
    # text model with per-layer inputs looked up from the ids, every placeholder as the pad id
    # (its pad rows made to count: see _gemma4_init), and a bidirectional mask over each
    # image's and frame's tokens (from the processor's mm_token_type_ids).
    "gemma4": _gemma4(
        "Gemma4", "Gemma4Model",
        text=dict(hidden_size_per_layer_input=16, vocab_size_per_layer_input=_TOKENIZER_LENGTH),
        vision=dict(**_STACK_SIZES, num_key_value_heads=HEADS, head_dim=HEAD_DIM, position_embedding_size=128),
        audio=dict(hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                   subsampling_conv_channels=[16, 8], output_proj_dims=HIDDEN),
        image_processor={},
        feature_extractor=dict(feature_size=16),
    ),  # fmt: skip
    # Gemma 4 Unified: no towers. Each image's 14-pixel patches, grouped 2x2 by position,
    # through a patch embedder (LayerNorms, a Dense, factorized 2-D positions) to one token
    # per group (63 to 70 per image and per frame, as Gemma 4's); each audio token a raw
    # frame of 640 samples (40 ms) through an RMSNorm and a projection (8 for 0.3 s); the
    # same text model without per-layer inputs, the same prompts, every placeholder as the
    # pad id (its pad row made to count).
    "gemma4_unified": _gemma4(
        "Gemma4Unified", "Gemma4UnifiedModel",
        text={},
        vision=dict(mm_embed_dim=HIDDEN, mm_posemb_size=128, output_proj_dims=HIDDEN),
        audio=dict(audio_embed_dim=640),
        image_processor={},
        feature_extractor={},
    ),  # fmt: skip
    # Granite Speech: a conformer CTC encoder (Shaw relative positions in blocks of 16
    # frames, a mid-stack CTC head fed back) over stacked log-mel frames (50 a second), a
    # Q-Former projector that reads each window of 15 frames with 3 queries, Granite. The
    # clips of a batch are padded to the longest (0.8 s: 40 frames, 3 windows, 9 rows) and
    # input_features_mask keeps each clip's own rows (0.45 s: 6, 0.3 s: 3); built without
    # its processor, whose feature extractor needs torchaudio (see _granite_speech_inputs).
    "granite_speech": _granite_speech("GraniteSpeech"),
    # Granite Speech Plus: the same, its encoder's input layer output concatenated to its
    # last layer's for the projector.
    "granite_speech_plus": _granite_speech("GraniteSpeechPlus", cat_hidden_layers=[0]),
    # Qwen2-Audio: Whisper-style encoder (two convs, stride 2, then 2x average pooling) over
    # log-mel features padded to a fixed length, linear projector, Qwen2. 1-second windows:
    # 100 mel frames -> 50 encoder positions -> at most 25 audio tokens.
    "qwen2_audio": _FamilySpec(
        model_class="Qwen2AudioForConditionalGeneration",
        inner_model_class="Qwen2AudioModel",
        named_tokens={
            "audio_token": "<|AUDIO|>",
            "audio_bos_token": "<|audio_bos|>",
            "audio_eos_token": "<|audio_eos|>",
        },
        add_bos=False,
        feature_extractor=_Part("WhisperFeatureExtractor", **_MEL_FEATURES),
        processor=_Part("Qwen2AudioProcessor"),
        config=_Part(
            "Qwen2AudioConfig",
            audio_config=_Part("Qwen2AudioEncoderConfig", **_WHISPER_ENCODER),
            text_config=_text_config("Qwen2Config"),
            audio_token_index=_TokenId("<|AUDIO|>"),
        ),
        placeholders={"audio": "<|AUDIO|>"},
        samples=(
            _Sample(
                "user : <|audio_bos|><|AUDIO|><|audio_eos|> what is this sound ? assistant :", audio_seconds=(0.45,)
            ),
            _Sample(
                "user : first <|audio_bos|><|AUDIO|><|audio_eos|> then <|audio_bos|><|AUDIO|><|audio_eos|> , "
                "which one is larger ? assistant :",
                audio_seconds=(0.8, 0.3),
            ),
        ),
    ),
    # Idefics3 (SmolVLM's architecture): SigLIP-like encoder over crops of a split image plus
    # a global view, pixel shuffle by scale_factor, linear connector, Llama. 56-pixel crops:
    # 4x4 patches, pixel-shuffled 2x2 -> 4 tokens per crop.
    "idefics3": _FamilySpec(
        model_class="Idefics3ForConditionalGeneration",
        inner_model_class="Idefics3Model",
        special_tokens=(
            "<fake_token_around_image>",
            "<end_of_utterance>",
            "<global-img>",
            *(f"<row_{row}_col_{col}>" for row in range(1, 7) for col in range(1, 7)),
        ),
        named_tokens={"image_token": "<image>"},
        image_processor=_Part(
            "Idefics3ImageProcessor",
            size={"longest_edge": 2 * 56},  # at most 2x2 crops plus the global view
            max_image_size={"longest_edge": 56},
        ),
        processor=_Part("Idefics3Processor", image_seq_len=(56 // PATCH) ** 2 // 2**2),  # scale_factor 2, squared
        config=_Part(
            "Idefics3Config",
            vision_config=_vision_config("Idefics3VisionConfig", 56),
            text_config=_text_config("LlamaConfig"),
            image_token_id=_TokenId("<image>"),
            scale_factor=2,
        ),
        placeholders={"image": "<image>"},
        samples=_samples("<image>", (40, 90), ((50, 50), (112, 70))),
    ),
    # SmolVLM (2): Idefics3's design under its own classes (crops plus a global view, pixel
    # shuffle 2, linear connector, Llama); its videos are frames laid out as images, merged
    # as images. Same sizes as the idefics3 row.
    "smolvlm": _FamilySpec(
        model_class="SmolVLMForConditionalGeneration",
        inner_model_class="SmolVLMModel",
        special_tokens=(
            "<fake_token_around_image>",
            "<end_of_utterance>",
            "<global-img>",
            *(f"<row_{row}_col_{col}>" for row in range(1, 7) for col in range(1, 7)),
        ),
        named_tokens={"image_token": "<image>"},
        image_processor=_Part("SmolVLMImageProcessor", size={"longest_edge": 2 * 56},
                              max_image_size={"longest_edge": 56}),
        config=_Part(
            "SmolVLMConfig",
            vision_config=_vision_config("SmolVLMVisionConfig", 56),
            text_config=_text_config("LlamaConfig"),
            image_token_id=_TokenId("<image>"),
            scale_factor=2,
        ),
        placeholders={"image": "<image>"},
        samples=_samples("<image>", (40, 90), ((50, 50), (112, 70))),
        make_inputs=_smolvlm_inputs,
    ),  # fmt: skip
    # BLIP-2: a ViT with a class row (``Blip2VisionEmbeddings``: conv with bias, class token,
    # learned position table), a Q-Former whose ``num_query_tokens`` query outputs are
    # projected into OPT's embedding space and replace as many ``<image>`` tokens in front of
    # the text (before BOS), as ``Blip2Processor`` lays them out.
    #
    # ``Blip2Processor`` builds offline and expands the tokens; it pads the text *before* it
    # prepends the query tokens (padding would land between the image tokens and the text),
    # so each prompt goes through the processor alone and the rows are left-padded by
    # _blip_2_inputs.
    "blip_2": _FamilySpec(
        model_class="Blip2ForConditionalGeneration",
        inner_model_class="Blip2ForConditionalGeneration",
        # <image> in the vocabulary but not as tokenizer.image_token: Blip2Processor adds it as an
        # AddedToken itself (already there, so the vocabulary does not grow) and reads its
        # .content, which a named token (a str) lacks.
        special_tokens=("<image>",),
        image_processor=_Part("BlipImageProcessor", size=_square(56)),  # 4x4 patches + the class row
        processor=_Part("Blip2Processor", num_query_tokens=8),
        config=_Part(
            "Blip2Config",
            vision_config=_vision_config("Blip2VisionConfig", 56),
            qformer_config=_Part(
                "Blip2QFormerConfig",
                **_STACK_SIZES,
                cross_attention_frequency=1,
                encoder_hidden_size=HIDDEN,
                vocab_size=VOCAB_SIZE,
            ),
            text_config=_Part(
                "OPTConfig",
                hidden_size=HIDDEN,
                word_embed_proj_dim=HIDDEN,
                ffn_dim=INTERMEDIATE,
                num_hidden_layers=LAYERS,
                num_attention_heads=HEADS,
                max_position_embeddings=MAX_POSITIONS,
                **_TEXT_TOKEN_IDS,
            ),
            num_query_tokens=8,
            image_token_index=_TokenId("<image>"),
        ),
        init_weights=_blip_2_query_init,
        placeholders={"image": "<image>"},
        samples=(
            # The processor puts the query tokens in front; prompts carry no <image>.
            _Sample("question : what is in the picture ? answer :", ((40, 60),)),
            _Sample("describe the image in more detail , please .", ((70, 50),)),
        ),
        make_inputs=_blip_2_inputs,
    ),
    # VisionEncoderDecoder (TrOCR / ViT-GPT2 captioning): a ViT encoder (``ViTEmbeddings``:
    # conv with bias, class row, learned position table) and a GPT-2 decoder that reads it
    # through cross-attention. No placeholder tokens: the decoder prompt
    # (``decoder_input_ids``, left-padded) is text only; ``TrOCRProcessor`` pairs the image
    # processor and the tokenizer.
    "vision_encoder_decoder": _FamilySpec(
        model_class="VisionEncoderDecoderModel",
        inner_model_class="VisionEncoderDecoderModel",
        image_processor=_Part("ViTImageProcessor", size=_square(56)),
        processor=_Part("TrOCRProcessor"),
        config=_vision_encoder_decoder_config,
        samples=(
            _Sample("a photo of", ((40, 60),)),
            _Sample("the picture is a red car on the left and", ((70, 50),)),
        ),
        make_inputs=_vision_encoder_decoder_inputs,
    ),
    # Llama-3.2-Vision (Mllama): a tiled ViT (28-pixel tiles of 2x2 patches + a class row:
    # 5 vision tokens per tile, up to 4 tiles per image, gated tile and position embeddings)
    # whose hidden states the text model reads through gated cross-attention layers
    # (layer 1 of 2), masked by the compact ``cross_attention_mask`` (B, S, images, tiles)
    # that ``MllamaProcessor`` builds (it builds offline). Sample 1 has an image of 1 tile,
    # text, then two images of 3 and 2 tiles back to back, so the tokens after them see both
    # images with a padded tile between them; tokens before the first image see none.
    #
    # The cross-attention gates (``cross_attn_attn_gate`` / ``cross_attn_mlp_gate``) are
    # zero-initialized by transformers, which would make the cross-attention layer inert in a
    # random-init model; the row sets them to 0.5 and 0.8 (see :func:`_mllama_open_gates`).
    "mllama": _FamilySpec(
        model_class="MllamaForConditionalGeneration",
        inner_model_class="MllamaModel",
        named_tokens={"image_token": "<|image|>"},
        image_processor=_Part("MllamaImageProcessor", size=_square(2 * PATCH), max_image_tiles=4),
        processor=_Part("MllamaProcessor"),
        config=_Part(
            "MllamaConfig",
            vision_config=_Part(
                "MllamaVisionConfig",
                hidden_size=HIDDEN,
                intermediate_size=INTERMEDIATE,
                num_hidden_layers=LAYERS,
                num_global_layers=1,
                attention_heads=HEADS,
                image_size=2 * PATCH,
                patch_size=PATCH,
                max_num_tiles=4,
                intermediate_layers_indices=[0],
                vision_output_dim=2 * HIDDEN,  # hidden_size x (1 + len(intermediate_layers_indices))
                supported_aspect_ratios=[[1, 1], [1, 2], [1, 3], [1, 4], [2, 1], [2, 2], [3, 1], [4, 1]],
            ),
            # Layer 0 self-attention, layer 1 cross-attention to the image tiles.
            text_config=_text_config("MllamaTextConfig", cross_attention_layers=[1]),
            image_token_index=_TokenId("<|image|>"),
        ),
        placeholders={"image": "<|image|>"},
        samples=(
            _Sample("user : <|image|> describe the image . assistant :", ((40, 30),)),
            _Sample(
                "user : <|image|> is the first , then <|image|><|image|> compare these , which one is brighter ?",
                ((28, 28), (28, 84), (56, 28)),
            ),
        ),
        init_weights=_mllama_open_gates,
    ),
    # Whisper: an audio encoder (two convs, stride 2, over 1-second log-mel windows: 100
    # frames -> 50 positions) and a decoder that reads it through cross-attention. No
    # placeholder tokens: the decoder prompt (``decoder_input_ids``, left-padded) is text
    # only, as for VisionEncoderDecoder; ``WhisperProcessor`` pairs the feature extractor and
    # the tokenizer. ``generate`` here is Whisper's own (it needs no language or task tokens
    # when the generation config names none).
    "whisper": _FamilySpec(
        model_class="WhisperForConditionalGeneration",
        inner_model_class="WhisperModel",
        feature_extractor=_Part("WhisperFeatureExtractor", **_MEL_FEATURES),
        processor=_Part("WhisperProcessor"),
        config=_Part(
            "WhisperConfig",
            **_WHISPER_ENCODER,
            decoder_layers=LAYERS,
            decoder_attention_heads=HEADS,
            decoder_ffn_dim=INTERMEDIATE,
            max_target_positions=64,
            decoder_start_token_id=_TokenId(BOS),
            begin_suppress_tokens=None,
            suppress_tokens=None,
            **_TEXT_TOKEN_IDS,
        ),
        samples=(
            _Sample("what is", audio_seconds=(0.45,)),
            _Sample("the sound is a dog and then a car on the left", audio_seconds=(0.8,)),
        ),
        make_inputs=_whisper_inputs,
    ),
    # The generic merge rule's (no spec names them).
    #
    # InternVL 3: InternViT, pixel-shuffle 0.5 (4x4 patches -> 4 tokens), MLP, Qwen2.
    "internvl": _generic(
        "InternVLForConditionalGeneration",
        "InternVLModel",
        # InternVLProcessor's names for its tokens (what a server builds the processor from).
        named_tokens={"image_token": "<IMG_CONTEXT>", "context_image_token": "<IMG_CONTEXT>",
                      "start_image_token": "<img>", "end_image_token": "</img>", "video_token": "<video>"},
        add_bos=False,
        config=_Part(
            "InternVLConfig",
            vision_config=_vision_config("InternVLVisionConfig", [56, 56], patch_size=[PATCH, PATCH]),
            text_config=_text_config("Qwen2Config"),
            image_token_id=_TokenId("<IMG_CONTEXT>"),
            downsample_ratio=0.5,
        ),
    ),  # fmt: skip
    # Mistral 3 (Small 3.1): Pixtral ViT, 2x2 patch merger, Mistral.
    "mistral3": _generic(
        "Mistral3ForConditionalGeneration",
        "Mistral3Model",
        named_tokens={"image_token": "[IMG]"},
        config=_Part(
            "Mistral3Config",
            vision_config=_vision_config("PixtralVisionConfig", 56, head_dim=HEAD_DIM),
            text_config=_text_config("MistralConfig", head_dim=HEAD_DIM),
            image_token_index=_TokenId("[IMG]"),
            spatial_merge_size=2,
            vision_feature_layer=-1,
        ),
        extra=lambda n: {"image_sizes": torch.tensor([[56, 56]] * n)},
    ),
    "aya_vision": _siglip_cohere("AyaVision", "image_token_index"),
    "cohere2_vision": _siglip_cohere("Cohere2Vision", "image_token_id"),
    # Qwen3.5: natively multimodal; Qwen3-VL-style ViT over pre-flattened patches, 2x2
    # merger, interleaved M-RoPE, hybrid linear / full attention text model.
    "qwen3_5": _FamilySpec(
        model_class="Qwen3_5ForConditionalGeneration",
        inner_model_class="Qwen3_5Model",
        **_QWEN_TOKENIZER,
        config=_Part(
            "Qwen3_5Config",
            vision_config=_Part(
                "Qwen3_5VisionConfig",
                depth=LAYERS, hidden_size=HIDDEN, intermediate_size=INTERMEDIATE, num_heads=HEADS,
                out_hidden_size=HIDDEN, patch_size=PATCH, temporal_patch_size=2, spatial_merge_size=2,
                num_position_embeddings=16,
            ),
            text_config=_QWEN3_5_TEXT,
            **_QWEN_TOKEN_IDS,
        ),
        placeholders={"image": "<|image_pad|>"},  # images only here (video: the same merge)
        samples=_samples("<|vision_start|><|image_pad|><|vision_end|>"),
        make_inputs=_qwen3_5_inputs,
    ),  # fmt: skip
    # Qwen3-VL: Qwen3.5's ViT (learned position table interpolated, 2x2 merger) whose layer
    # 0 also feeds a deepstack merger: its features are added to the text model's hidden
    # states at the visual positions after decoder layer 0. Sample 2 holds two images and a
    # video (2 frames: one temporal patch), so the batch takes the forward's joint
    # image + video deepstack path.
    "qwen3_vl": _FamilySpec(
        model_class="Qwen3VLForConditionalGeneration",
        inner_model_class="Qwen3VLModel",
        **_QWEN_TOKENIZER,
        config=_Part(
            "Qwen3VLConfig",
            vision_config=_Part(
                "Qwen3VLVisionConfig",
                depth=LAYERS, hidden_size=HIDDEN, intermediate_size=INTERMEDIATE, num_heads=HEADS,
                out_hidden_size=HIDDEN, patch_size=PATCH, temporal_patch_size=2, spatial_merge_size=2,
                num_position_embeddings=16, deepstack_visual_indexes=[0],
            ),
            text_config=_text_config(
                "Qwen3VLTextConfig", head_dim=HEAD_DIM,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [4, 6, 6],
                                 "mrope_interleaved": True},
            ),
            **_QWEN_TOKEN_IDS,
        ),
        placeholders={"image": "<|image_pad|>", "video": "<|video_pad|>"},
        samples=(
            _Sample("user : <|vision_start|><|image_pad|><|vision_end|> describe the image . assistant :", ((56, 56),)),
            _Sample("user : compare <|vision_start|><|image_pad|><|vision_end|> and "
                    "<|vision_start|><|image_pad|><|vision_end|> with the clip "
                    "<|vision_start|><|video_pad|><|vision_end|> , which one is brighter ? assistant :",
                    ((56, 56), (56, 56)), videos=((2, 56, 56),)),
        ),
        make_inputs=_qwen3_5_inputs,
    ),  # fmt: skip
    # GLM-4.1V (see _glm4v_family).
    "glm4v": _glm4v_family("Glm4v"),
    # GLM-4.6V: GLM-4.1V's towers under its own config and model classes.
    "glm46v": _glm4v_family("Glm46V"),
    # Molmo2: SigLIP-style ViT whose last two layers' features are pooled by an attention
    # adapter over each token's block of patches (image_token_pooling), Qwen3-style text
    # model; the image features are ADDED to the placeholder tokens' own embeddings.
    "molmo2": _FamilySpec(
        model_class="Molmo2ForConditionalGeneration",
        inner_model_class="Molmo2Model",
        special_tokens=("<im_start>", "<low_res_im_start>", "<im_end>", "<frame_start>", "<frame_end>"),
        named_tokens={"image_token": "<im_patch>"},
        config=_Part(
            "Molmo2Config",
            vision_config=_Part(
                "Molmo2VisionConfig", **_STACK_SIZES, num_key_value_heads=HEADS, head_dim=HEAD_DIM, image_size=[56, 56],
                patch_size=PATCH, num_position_embeddings=16,
            ),
            adapter_config=_Part(
                "Molmo2AdapterConfig", vision_feature_layer=[-1, -2], hidden_size=HIDDEN, num_attention_heads=HEADS,
                num_key_value_heads=HEADS, head_dim=HEAD_DIM, intermediate_size=INTERMEDIATE, text_hidden_size=HIDDEN,
            ),
            text_config=_text_config("Molmo2TextConfig", head_dim=HEAD_DIM),
            image_start_token_id=_TokenId("<im_start>"),
            low_res_image_start_token_id=_TokenId("<low_res_im_start>"),
            image_end_token_id=_TokenId("<im_end>"),
            image_patch_id=_TokenId("<im_patch>"),
            frame_start_token_id=_TokenId("<frame_start>"),
            frame_end_token_id=_TokenId("<frame_end>"),
        ),
        placeholders={"image": "<im_patch>"},
        samples=_samples("<im_start><im_patch><im_end>"),
        make_inputs=_molmo2_inputs,
    ),  # fmt: skip
    # Kimi K2.5: MoonViT (pre-flattened 14-pixel patches with image_grid_thw, learned
    # 2-D position table, 2x2 merge in the projector), DeepSeek-V3 text model (MLA, MoE);
    # placeholder ids are embedded as id 0 (they may lie past the table).
    "kimi_k25": _FamilySpec(
        model_class="Kimi_K25ForConditionalGeneration",
        inner_model_class="Kimi_K25Model",
        **_QWEN_TOKENIZER,
        config=_Part(
            "Kimi_K25Config",
            vision_config=_Part(
                "Kimi_K25VisionConfig", **_STACK_SIZES, patch_size=PATCH, pos_emb_height=8, pos_emb_width=8,
                pos_emb_time=2,
            ),
            text_config=_text_config(
                "DeepseekV3Config", num_key_value_heads=HEADS, n_routed_experts=4, num_experts_per_tok=2, kv_lora_rank=16, q_lora_rank=32,
                qk_rope_head_dim=32, qk_nope_head_dim=32, v_head_dim=32, first_k_dense_replace=1,
                moe_intermediate_size=INTERMEDIATE, n_group=1, topk_group=1,
            ),
            projection_hidden_size=HIDDEN,
            # The experts as plain matmuls: torch's grouped_mm takes no float64 (the
            # fidelity lane's exact model); the model passes its choice to the text config.
            experts_implementation="eager",
            **_QWEN_TOKEN_IDS,
        ),
        placeholders={"image": "<|image_pad|>"},
        samples=_samples("<|vision_start|><|image_pad|><|vision_end|>"),
        make_inputs=_kimi_k25_inputs,
    ),  # fmt: skip
    # Qwen2.5-Omni's thinker (what reads and writes text; the talker and token2wav that speak
    # are not built): a Whisper-style audio encoder (two 1-D convs, 2x average pooling, a
    # projection to the text width), Qwen2.5-VL's windowed ViT (window 56: 2x2 merged units),
    # Qwen2.5's text model with M-RoPE over audio, image and video positions.
    "qwen2_5_omni_thinker": _qwen_omni(
        "Qwen2_5Omni",
        audio=dict(**_WHISPER_ENCODER),
        vision=dict(window_size=2 * PATCH * 2, fullatt_block_indexes=[LAYERS - 1]),
        text=_text_config(
            "Qwen2_5OmniTextConfig",
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [4, 6, 6]},
        ),
        seconds_per_temporal_patch=1.0,  # its processor's 2 fps
        token_ids=dict(audio_token_index=_TokenId("<|AUDIO|>"), image_token_index=_TokenId("<|IMAGE|>"),
                       video_token_index=_TokenId("<|VIDEO|>"), audio_end_token_id=_TokenId("<|audio_eos|>")),
    ),  # fmt: skip
    # Qwen3-Omni's thinker: an audio encoder of three stride-2 2-D convs (13 positions per
    # 100-frame window), Qwen3-VL's ViT whose layer 0 feeds deepstack features to the text
    # model at the visual positions, a Qwen3 MoE text model (4 experts, 2 per token) with
    # interleaved M-RoPE.
    "qwen3_omni_moe_thinker": _qwen_omni(
        "Qwen3OmniMoe",
        audio=dict(**_WHISPER_ENCODER, downsample_hidden_size=32),  # the convs' channels (480 by default)
        vision=dict(num_position_embeddings=16, deepstack_visual_indexes=[0]),
        text=_text_config(
            "Qwen3OmniMoeTextConfig", head_dim=HEAD_DIM, moe_intermediate_size=INTERMEDIATE, num_experts=4,
            num_experts_per_tok=2,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [4, 6, 6],
                             "interleaved": True},
        ),
        seconds_per_temporal_patch=2.0,  # its processor's 1 fps
        token_ids=dict(audio_token_id=_TokenId("<|AUDIO|>"), image_token_id=_TokenId("<|IMAGE|>"),
                       video_token_id=_TokenId("<|VIDEO|>")),
        # The experts as plain matmuls: torch's grouped_mm takes no float64 (the fidelity
        # lane's exact model); the model passes its choice to the text config.
        experts_implementation="eager",
    ),  # fmt: skip
    # MiniCPM-V 4.6: NaViT-packed crops of every image (and every video frame) in one row of
    # pixel_values, which its forward slices as pixel_values[:1].
    "minicpmv4_6": _minicpmv("MiniCPMV4_6", video_ids=True),
    # MiniCPM-V 4.7: 4.6 with canvas M-RoPE: each image's thumbnail and slices laid on one
    # canvas, located by the marker tokens' ids in its config and by mm_token_type_ids.
    "minicpmv4_7": _minicpmv(
        "MiniCPMV4_7", video_ids=False, image_start_id=_TokenId("<image>"), image_end_id=_TokenId("</image>"),
        slice_start_id=_TokenId("<slice>"), slice_end_id=_TokenId("</slice>"),
    ),
    # PerceptionLM: a Perception Encoder ViT (timm's Eva through TimmWrapperModel: 2-D
    # rotary positions, a class token the model drops), a GELU MLP projector with 2x2
    # average pooling, Llama. 56-pixel tiles: 4x4 patches pooled to 4 tokens. Each image is a
    # thumbnail and up to 2 tiles (3 for these non-square images: the processor stacks the
    # images of a batch, so they share one tile count); each video frame is one tile.
    "perception_lm": _FamilySpec(
        model_class="PerceptionLMForConditionalGeneration",
        inner_model_class="PerceptionLMModel",
        needs=("timm", "torchvision"),  # the tower; the image and video processors
        named_tokens={"image_token": "<|image|>", "video_token": "<|video|>"},
        image_processor=_Part("PerceptionLMImageProcessor", tile_size=56, max_num_tiles=2),
        processor=_Part("PerceptionLMProcessor", video_processor=_Part("PerceptionLMVideoProcessor", size=_square(56)),
                        patch_size=PATCH, pooling_ratio=2),
        config=_Part(
            "PerceptionLMConfig",
            vision_config=_Part(
                "TimmWrapperConfig", architecture="vit_pe_core_large_patch14_336",
                model_args=dict(embed_dim=HIDDEN, depth=LAYERS, num_heads=HEADS, img_size=(56, 56),
                                ref_feat_shape=(56 // PATCH, 56 // PATCH), global_pool="",
                                use_post_transformer_norm=False, init_values=0.1),
            ),
            text_config=_text_config("LlamaConfig"),
            projector_pooling_ratio=2,
            image_token_id=_TokenId("<|image|>"),
            video_token_id=_TokenId("<|video|>"),
        ),
        placeholders={"image": "<|image|>", "video": "<|video|>"},
        samples=(
            _Sample("user : <|image|> describe the image . assistant :", ((40, 60),)),
            _Sample("user : compare <|image|> and <|image|> , then the clip <|video|> . assistant :",
                    ((70, 50), (30, 100)), videos=((3, 50, 70),)),
        ),
    ),  # fmt: skip
    # PaddleOCR-VL: a SigLIP-style NaViT (pre-cut 14-pixel patches with image_grid_thw, 2-D
    # rotary positions), a 2x2 merging projector, an Ernie-4.5-style text model with M-RoPE
    # (from input_ids, the grids and mm_token_type_ids, which its processor gives). Images
    # resized to 56x56 ... 112x112 pixels (4x4 to 8x8 patches: 4 to 16 tokens each).
    "paddleocr_vl": _FamilySpec(
        model_class="PaddleOCRVLForConditionalGeneration",
        inner_model_class="PaddleOCRVLModel",
        special_tokens=("<|IMAGE_START|>", "<|IMAGE_END|>"),
        named_tokens={"image_token": "<|IMAGE_PLACEHOLDER|>"},
        image_processor=_Part("PaddleOCRVLImageProcessor", size={"shortest_edge": 56 * 56, "longest_edge": 112 * 112},
                              patch_size=PATCH, merge_size=2),
        processor=_Part("PaddleOCRVLProcessor"),
        config=_Part(
            "PaddleOCRVLConfig",
            vision_config=_vision_config("PaddleOCRVisionConfig", 56, spatial_merge_size=2),
            text_config=_text_config("PaddleOCRTextConfig", head_dim=HEAD_DIM,
                                     rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                      "mrope_section": [4, 6, 6]}),
            image_token_id=_TokenId("<|IMAGE_PLACEHOLDER|>"),
            vision_start_token_id=_TokenId("<|IMAGE_START|>"),
            vision_end_token_id=_TokenId("<|IMAGE_END|>"),
        ),
        placeholders={"image": "<|IMAGE_PLACEHOLDER|>"},
        samples=_samples("<|IMAGE_START|><|IMAGE_PLACEHOLDER|><|IMAGE_END|>", (40, 60), ((56, 56), (90, 60))),
    ),  # fmt: skip
    # Llama 4 (Scout / Maverick): unfold-linear ViT, pixel-shuffle 0.5 MLP, one Linear
    # projector, MoE text model with chunked attention; merged in the ForConditionalGeneration.
    "llama4": _generic(
        "Llama4ForConditionalGeneration",
        "Llama4ForConditionalGeneration",
        named_tokens={"image_token": "<|patch|>"},
        config=_Part(
            "Llama4Config",
            vision_config=_vision_config("Llama4VisionConfig", 56, intermediate_size=4 * HIDDEN,
                                         vision_output_dim=HIDDEN, projector_input_dim=HIDDEN,
                                         projector_output_dim=HIDDEN, pixel_shuffle_ratio=0.5),
            text_config=_text_config("Llama4TextConfig", head_dim=HEAD_DIM, intermediate_size_mlp=INTERMEDIATE,
                                     num_local_experts=2),
            image_token_index=_TokenId("<|patch|>"),
        ),
    ),  # fmt: skip
    # Janus: SigLIP-style ViT + aligner for understanding (what is merged), a VQ-VAE for
    # image generation (built, not used by the forward), Llama.
    "janus": _generic(
        "JanusForConditionalGeneration",
        "JanusModel",
        named_tokens={"image_token": "<image_placeholder>"},
        config=_Part(
            "JanusConfig",
            vision_config=_vision_config("JanusVisionConfig", 56, projection_dim=HIDDEN, mlp_ratio=2.0, depth=1,
                                         num_image_tokens=(56 // PATCH) ** 2),
            # The generation VQ-VAE at its smallest (GroupNorm needs 32 channels).
            vq_config=_Part("JanusVQVAEConfig", embed_dim=8, num_embeddings=64, latent_channels=32, base_channels=32,
                            channel_multiplier=[1, 1], num_res_blocks=1, num_patches=4, projection_dim=HIDDEN,
                            image_token_embed_dim=HIDDEN, num_hidden_layers=1),
            text_config=_text_config("LlamaConfig"),
            image_token_id=_TokenId("<image_placeholder>"),
        ),
    ),  # fmt: skip
    # Ovis2: its ViT with a 2x2 hidden stride (4 tokens per 56x56 image), a visual
    # vocabulary (a softmax over 64 visual words, then their embedding table), Qwen2. After
    # the image scatter its forward writes one learned vector at each visual indicator id
    # (its processor's <IMG_START>, <IMG_GRID>, <IMG_COL>, <IMG_ROW>, <IMG_END>): the merge's
    # broadcast kinds. A one-crop image is <IMG_START> atoms <IMG_GRID> <IMG_END>, so the
    # column and row separators never occur (a kind with no placeholder).
    "ovis2": _FamilySpec(
        model_class="Ovis2ForConditionalGeneration",
        inner_model_class="Ovis2Model",
        named_tokens={"image_token": "<image>"},
        special_tokens=_OVIS2_INDICATORS,
        config=_Part(
            "Ovis2Config",
            vision_config=_vision_config("Ovis2VisionConfig", 56, vocab_size=64, hidden_stride=2),
            text_config=_text_config("Qwen2Config"),
            image_token_id=_TokenId("<image>"),
            visual_indicator_token_ids=[_TokenId(token) for token in _OVIS2_INDICATORS],
            vocab_size=_TOKENIZER_LENGTH,
            hidden_size=HIDDEN,
        ),
        placeholders={"image": "<image>"},
        samples=_samples("<IMG_START> <image> <IMG_GRID> <IMG_END>"),
        make_inputs=_counted_image_inputs(56),
    ),
}

FAMILIES: tuple[str, ...] = tuple(_SPECS)
