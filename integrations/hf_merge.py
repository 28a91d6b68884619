"""The multimodal merge patch for Hugging Face VLM / audio-LLM inner models, written once
for every family: a thin pre-step in front of the model's own ``forward``.

What Hugging Face does (``LlavaModel.forward`` and its siblings)::

    inputs_embeds = self.get_input_embeddings()(input_ids)
    features = self.get_image_features(pixel_values, ...).pooler_output
    mask = self.get_placeholder_mask(input_ids, inputs_embeds, features)  # count check: a host sync
    inputs_embeds = inputs_embeds.masked_scatter(mask, features)         # more syncs, another pass
    ... language model on inputs_embeds ...

What the patched ``forward`` does, when ``input_ids`` and media inputs are given and
``inputs_embeds`` is not:

1. binds the call to the original signature (so positional and keyword calls look alike);
2. computes each modality's features with the model's OWN feature method (the spec names
   it and the forward arguments it takes), or takes them from precomputed encoder outputs
   (``mm_encoder_outputs``: what ``generate`` passes since transformers 5.18), normalized
   to a list of ``(n_i, D)`` tensors;
3. builds the merged embeddings with ONE call of
   :func:`mmkernels.ops.merge_multimodal_embeddings`, all kinds at once; the embedding
   lookup is fused into it when the input embedding is a plain ``nn.Embedding`` whose
   forward is a pure lookup (its ``padding_idx`` goes to the op, whose backward skips
   that row as ``F.embedding`` does); anything else (a subclass such as Gemma's scaled
   embedding, ``max_norm``, ``scale_grad_by_freq``, ``sparse``, hooks on the module) runs
   the module first. A placeholder count mismatch raises Hugging Face's own
   ``ValueError`` text (``Image features and image tokens do not match, tokens: ..,
   features: ..``, or the family's own words: ``MergeSpec.count_mismatch_message``);
4. calls the original ``forward`` with ``inputs_embeds=merged`` and the media inputs
   removed, so everything after the merge (position ids, masks, the language model, the
   output class) is the model's own code; then fills the output fields that carry the
   features, as the unpatched forward does.

The op is differentiable (features, ``inputs_embeds`` and the embedding table get their
gradients), so training runs the merge too. Every other call (text only,
``inputs_embeds`` given, a decode step, media the spec does not cover on this transformers version,
a case a spec marks as the original's) goes to the original ``forward`` untouched.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import torch
from torch.nn.modules import module as nn_module

from mmkernels.ops.merge import CAPABILITIES as MERGE_CAPABILITIES
from mmkernels.ops.merge import PlaceholderCountError

from .engine import (ORIGINALS_ATTR, Call, PatchOptions, SpecRule, backend_note, bind_call, forward_signature,
                     original_method)

__all__ = ["Call", "Features", "LANGUAGE_MODEL_KWARG", "LanguageModelInputs", "LanguageModelInputsRule", "MergeRule",
           "MergeSpec", "Modality", "config_value", "placeholder_id", "placeholders_looked_up_as"]

MERGE_OP = "merge_multimodal_embeddings"
# The keyword that carries the language-model arguments the pre-step derived (Qwen3-VL's
# deepstack inputs) through the inner model's ``**kwargs`` to its language model, whose
# forward's replacement (:class:`LanguageModelInputsRule`) takes it out again.
LANGUAGE_MODEL_KWARG = "mmkernels_language_model_inputs"

# What an output field receives (the unpatched forward's value for it, by version):
#   "encoder_output": what the feature method returned (transformers >= 5.24: image_outputs)
#   "features":       its pooler_output cast to the embedding dtype, a list concatenated
#                     (transformers <= 5.23: image_hidden_states)
#   "flat_features":  the same, reshaped to (N, D)
OUTPUT_VALUE_KINDS = ("encoder_output", "features", "flat_features")

# Hugging Face's count check message, word for word (the get_placeholder_mask of every
# covered family but MiniCPM-V's, whose spec states its own, and Qwen2-Audio's forward, in
# transformers 5.25), so code that catches the unpatched error by its text keeps working.
# "features" is the row count: LLaVA's own message prints rows x D there (shape[0] *
# shape[1] of its (N, D) features).
HF_COUNT_MISMATCH = "{Kind} features and {kind} tokens do not match, tokens: {tokens}, features: {features}"


@dataclasses.dataclass
class Features:
    """One modality's features as the model's own code produced them.

    ``rows``: ``(n_i, D)`` tensors in placeholder order (a list, so nothing is concatenated
    before the merge); ``encoder_output``: what the feature method returned (None for a
    feature function that has no such object); ``pooled``: the pooler output before
    normalization (a tensor or a list), for the output fields of older transformers.
    """

    rows: list[torch.Tensor]
    encoder_output: Any = None
    pooled: Any = None


@dataclasses.dataclass(frozen=True)
class Modality:
    """One kind of media a family merges (image, video, audio), as data.

    ``trigger``: the forward argument whose presence means this kind is in the call.
    ``consumed``: forward arguments only the feature step uses; they are removed from the
    forward call (an argument the rest of the forward also reads, such as Qwen2-VL's
    ``image_grid_thw`` for M-RoPE, is not listed and stays).
    ``feature_method`` is called as ``method(*[call[a] for a in positional],
    **{k: call[k] for k in keywords}, return_dict=True, **forward_kwargs)``, the last only
    with ``passes_forward_kwargs`` (mirroring what the Hugging Face forward passes);
    ``feature_field``: the field of what it returns that the forward merges (``pooler_output``
    for most; the Omni thinkers' audio: ``last_hidden_state``).
    ``feature_function(model, call) -> Features | None`` replaces that call when a family
    has no feature method; returning None sends the call to the original forward.
    ``output_fields``: (field of the forward's output, one of :data:`OUTPUT_VALUE_KINDS`),
    filled where the output class has the field; a third item, a PEP 440 specifier, limits
    the filling to the versions whose forward fills that field (PerceptionLM's
    ``video_hidden_states``: filled up to 5.23, left None from 5.24 on, where the output
    class still has it).
    ``transformers``: the versions this kind is covered on (a PEP 440 specifier, "" = all);
    elsewhere a call carrying it goes to the original forward.
    ``first_row``: the forward hands the feature method only the first row of ``trigger``
    (MiniCPM-V's ``pixel_values[:1]``: its processor packs every image of a call into one
    row of NaViT patches, ``(1, C, P, L)``); the feature method gets ``call[trigger][:1]``
    too, and any further rows are ignored as the forward ignores them.
    ``first_row_repeated``: the versions (a PEP 440 specifier; None: none) on which the
    forward then repeats the features once per row of ``trigger`` (MiniCPM-V on 5.17:
    generate's beam expansion copies the packed row once per beam, and the forward encodes
    one and tiles its features, ``.repeat(rows, 1)``): the rows are repeated as a list, in
    the same order, nothing concatenated.
    ``broadcast_field`` / ``broadcast_ids_field``: the forward also writes one vector at
    every occurrence of each of several token ids (Ovis2's visual indicators: a learned
    row per indicator id, ``inputs_embeds[input_ids == id] = vectors[i]``, a host sync
    each): the encoder output's field holding those rows ``(n, D)`` and the config's field
    listing the ``n`` ids. They are merged in the same op call as broadcast kinds (any
    count, unchecked, as the forward leaves them).
    ``count_mismatch_features(pooled) -> int``: the number the forward's count check prints
    as ``{features}`` for this kind, from the pooled features as the feature method returned
    them (:attr:`Features.pooled`), where that is not the row count (None: the row count).
    LLaVA-NeXT-Video's videos: its forward flattens the first two dimensions of each element
    of the pooler output and prints the first dimension of their concatenation, which is
    rows x width where that output is one ``(videos, rows, D)`` tensor (5.25) and the rows
    where it is a tuple of ``(frames, tokens, D)`` (5.17).
    """

    kind: str
    placeholder_fields: tuple[str, ...]
    trigger: str
    consumed: tuple[str, ...]
    feature_method: str | None = None
    positional: tuple[str, ...] = ()
    keywords: tuple[str, ...] = ()
    passes_forward_kwargs: bool = False
    feature_field: str = "pooler_output"
    feature_function: Callable[[torch.nn.Module, Call], Features | None] | None = None
    output_fields: tuple[tuple[str, str] | tuple[str, str, str], ...] = ()
    transformers: str = ""
    first_row: bool = False
    first_row_repeated: str | None = None
    broadcast_field: str | None = None
    broadcast_ids_field: str | None = None
    count_mismatch_features: Callable[[Any], int] | None = None

    def __post_init__(self):
        if (self.feature_method is None) == (self.feature_function is None):
            raise ValueError(f"{self.kind}: give exactly one of feature_method and feature_function")
        if self.first_row and self.feature_method is None:
            raise ValueError(f"{self.kind}: first_row slices the feature method's input (a feature_function slices "
                             "its own)")  # fmt: skip
        if (self.broadcast_field is None) != (self.broadcast_ids_field is None):
            raise ValueError(f"{self.kind}: broadcast_field and broadcast_ids_field go together")
        if self.first_row_repeated is not None and not self.first_row:
            raise ValueError(f"{self.kind}: first_row_repeated repeats the features of the first row: set first_row")
        for entry in self.output_fields:
            if len(entry) not in (2, 3):
                raise ValueError(f"{self.kind}: output field {entry!r}: expected (field, value kind[, versions])")
            field, value_kind = entry[:2]
            if value_kind not in OUTPUT_VALUE_KINDS:
                raise ValueError(
                    f"{self.kind}: output field {field!r}: value kind {value_kind!r} not in {OUTPUT_VALUE_KINDS}"
                )

    def filled_output_fields(self) -> list[tuple[str, str]]:
        """(field, value kind) of the output fields the forward fills on this transformers."""
        return [(entry[0], entry[1]) for entry in self.output_fields if len(entry) == 2 or _version_covered(entry[2])]


@dataclasses.dataclass(frozen=True)
class LanguageModelInputs:
    """Arguments of the language model that the forward derives from the features besides
    the merged embeddings (Qwen3-VL's deepstack: the visual positions and each level's
    features; Gemma 3n's ``per_layer_inputs``, looked up from ``input_ids``, which its
    forward drops beside ``inputs_embeds`` on every version and cannot take at all on 5.17).
    The pre-step derives them (``derive(model, modalities, features,
    input_ids) -> {argument: value}``, or None: the original forward runs) and hands them to
    the language model (the inner model's ``attribute``, governed by ``model_type``, of
    class ``model_class``) through :data:`LANGUAGE_MODEL_KWARG`; the original forward,
    given no media, passes None for them."""

    attribute: str
    model_type: str
    model_class: str
    derive: Callable[..., dict[str, Any] | None]


@dataclasses.dataclass(frozen=True)
class MergeSpec:
    """The merge patch for one family: which inner model, which media, and the few facts
    about its ``forward`` the pre-step must respect.

    ``keeps_input_ids``: the forward needs ``input_ids`` next to ``inputs_embeds`` (Qwen2-VL
    computes M-RoPE positions from them) and accepts both; otherwise they are dropped.
    ``media_ignored_on_single_token``: the forward skips media when the sequence has one
    token (a decode step), so the pre-step does too.
    ``encoder_outputs_input``: the forward argument carrying already-computed encoder
    outputs as ``{kind: output}`` (``mm_encoder_outputs``; ``generate`` encodes the media
    before the prefill and passes them there since transformers 5.18); their
    ``pooler_output`` (the modality's ``feature_field``) is merged instead of calling the
    feature method. Only where the forward names that parameter (5.18 on): an older
    forward's ``**kwargs`` hand it to the language model unread, and so does the pre-step.
    ``pixels_beside_encoder_outputs``: the forward takes its pixel inputs beside
    ``mm_encoder_outputs`` and encodes from them each kind the dict lacks (PerceptionLM:
    ``generate`` encodes its images with ``get_image_features`` and, as it has no
    ``get_video_features``, passes the videos raw next to them); such a call is merged,
    each kind from the dict or else from its pixels (otherwise the original runs: most
    forwards raise there).
    ``original_inputs``: forward arguments whose presence sends the call to the original
    (other forms of precomputed features).
    ``needs_original(model, call) -> str | None``: a reason this call must run the original
    forward (a case dropping the media inputs would change), or None.
    ``position_ids_method``: the model's own method the forward computes its position ids
    with when none are given (M-RoPE reads ``input_ids``, but the forward refuses
    ``input_ids`` next to ``inputs_embeds``): the pre-step calls it as the forward would,
    with the merged embeddings, and passes the result as ``position_ids``.
    ``language_model_inputs``: see :class:`LanguageModelInputs`.
    ``adds_to_placeholder_embeddings``: the forward ADDS the features to the placeholder
    tokens' own embeddings (Molmo2) instead of replacing them; every placeholder of a
    kind embeds as its one token id, so the pre-step adds that embedding to each feature
    row (same dtype promotion as the forward's sum) and the merge writes the sums.
    ``token_range_embedders``: submodules of the inner model (attribute names, by increasing
    ``vocab_offset``) that embed the ids of their own range of the vocabulary in place of
    the input embedding, as the forward does before it merges (Gemma 3n's ``embed_vision``
    and ``embed_audio``: its image and audio markers and soft tokens). Module i takes the
    ids from its ``vocab_offset`` up to the next module's (the last: every id from its own
    up); it runs as ``module(input_ids=...)`` on the whole ``input_ids``, the ids outside its
    range replaced by its last id (``vocab_offset + vocab_size - 1``), and its rows replace
    the text rows where the range holds (``torch.where``), module after module: the text
    rows the merge keeps are the forward's, bit for bit (the lookup is then never fused).
    ``placeholders_looked_up_as``: the config field (a dotted path) of the token id the
    forward embeds EVERY placeholder as before its text lookup, of the kinds in the call or
    not (Gemma 4: ``text_config.pad_token_id``); the placeholders of the kinds the call does
    not carry keep that id's embedding, and the pre-step looks them up the same way (those
    of the kinds it merges are overwritten either way).
    ``forward_inputs(model, modalities, features, input_ids) -> {argument: value}``: arguments
    of the inner model's OWN forward that it derives from ``input_ids`` (which the pre-step
    does not pass) and takes beside ``inputs_embeds``: the pre-step derives them as the
    forward does and passes them (Gemma 4's ``per_layer_inputs``, which its forward would
    otherwise recover from ``inputs_embeds`` by reversing the embedding, which merged rows do
    not match); None: the original runs.
    ``count_mismatch_message``: the ValueError text of the forward's placeholder count check,
    with ``{Kind}`` / ``{kind}`` (the first kind that mismatches, in the order of
    ``modalities``), ``{tokens}`` and ``{features}`` (its placeholder and feature row
    counts; ``{feature_values}``: the feature rows times their width, which PaddleOCR-VL
    prints as its feature count): Hugging Face's usual words unless the family words it
    otherwise (MiniCPM-V: ``Multimodal features and tokens do not match, ...``).
    """

    family: str
    model_type: str
    model_class: str
    modalities: tuple[Modality, ...]
    keeps_input_ids: bool = False
    media_ignored_on_single_token: bool = False
    encoder_outputs_input: str | None = "mm_encoder_outputs"
    pixels_beside_encoder_outputs: bool = False
    original_inputs: tuple[str, ...] = ()
    needs_original: Callable[[torch.nn.Module, Call], str | None] | None = None
    position_ids_method: str | None = None
    language_model_inputs: LanguageModelInputs | None = None
    adds_to_placeholder_embeddings: bool = False
    token_range_embedders: tuple[str, ...] = ()
    placeholders_looked_up_as: str | None = None
    forward_inputs: Callable[..., dict[str, Any] | None] | None = None
    count_mismatch_message: str = HF_COUNT_MISMATCH


def placeholder_id(config: Any, fields: Sequence[str]) -> int | None:
    """The placeholder token id: the first of ``fields`` the config has (``image_token_id``
    or the older ``image_token_index``, ...)."""
    for field in fields:
        value = getattr(config, field, None)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None


def _transformers_version() -> str | None:
    try:
        import transformers
    except ImportError:
        return None
    return transformers.__version__


def _version_covered(specifier: str) -> bool:
    if not specifier:
        return True
    version = _transformers_version()
    if version is None:
        return False
    from packaging.specifiers import SpecifierSet

    return SpecifierSet(specifier).contains(version, prereleases=True)


def _present(value: Any) -> bool:
    """Media is present: not None and not an empty batch (HF skips ``size(0) == 0``)."""
    if value is None:
        return False
    if isinstance(value, torch.Tensor):
        return value.dim() == 0 or value.shape[0] > 0
    if isinstance(value, (list, tuple)):
        return len(value) > 0
    return True


# --------------------------------------------------------------------------------------
# Features


def _rows(pooled: Any) -> list[torch.Tensor]:
    """Normalize a pooler output (a tensor (N, D) or (B, n, D), or a list of such) to
    (n_i, D) tensors; reshape only (views where the layout allows), no concatenation."""
    if isinstance(pooled, torch.Tensor):
        pooled = [pooled]
    if not isinstance(pooled, (list, tuple)):
        raise TypeError(f"features: expected a tensor or a list of tensors, got {type(pooled).__name__}")
    return [t if t.dim() == 2 else t.reshape(-1, t.shape[-1]) for t in pooled]


def encoder_output_features(result: Any, field: str = "pooler_output") -> Features:
    """Features from what a feature method returned: an output's ``field`` (its
    ``pooler_output`` unless the modality says otherwise), or (older getters) the features
    themselves."""
    if isinstance(result, (torch.Tensor, list, tuple)):
        return Features(rows=_rows(result), encoder_output=None, pooled=result)
    pooled = getattr(result, field)
    return Features(rows=_rows(pooled), encoder_output=result, pooled=pooled)


def method_features(model: torch.nn.Module, modality: Modality, call: Call) -> Features:
    """Call the model's own feature method as its forward would (the trigger's first row
    only, where the modality says the forward slices it; see :attr:`Modality.first_row`)."""
    method = getattr(model, modality.feature_method)

    def argument(name: str) -> Any:
        value = call.get(name)
        return value[:1] if modality.first_row and name == modality.trigger else value

    args = [argument(name) for name in modality.positional]
    kwargs = {name: argument(name) for name in modality.keywords}
    if modality.passes_forward_kwargs:
        kwargs.update(call.extra)
    kwargs["return_dict"] = True
    found = encoder_output_features(method(*args, **kwargs), modality.feature_field)
    if modality.first_row_repeated is not None and _version_covered(modality.first_row_repeated):
        copies = call.get(modality.trigger).shape[0]  # a shape: no host sync
        if copies > 1:
            found = dataclasses.replace(found, rows=found.rows * copies)
    return found


def _output_value(features: Features, value_kind: str, like: torch.Tensor) -> Any:
    if value_kind == "encoder_output":
        return features.encoder_output
    pooled = features.pooled
    if isinstance(pooled, (list, tuple)) or value_kind == "flat_features":
        tensor = torch.cat(features.rows, dim=0)
    else:
        tensor = pooled
    return tensor.to(like.device, like.dtype)


# --------------------------------------------------------------------------------------
# The rule


class MergeRule(SpecRule):
    """The merge patch of one :class:`MergeSpec`: replaces the inner model's ``forward``."""

    kernel = "merge"
    method = "forward"
    op = f"mmkernels.ops.{MERGE_OP}"

    def covered_modalities(self) -> list[Modality]:
        return [m for m in self.spec.modalities if _version_covered(m.transformers)]

    def not_applicable_reasons(self, module: torch.nn.Module) -> list[str]:
        reasons = super().not_applicable_reasons(module)
        if reasons:
            return reasons
        covered = self.covered_modalities()
        if not covered:
            ranges = ", ".join(f"{m.kind} {m.transformers}" for m in self.spec.modalities)
            return [f"transformers {_transformers_version()} is outside the covered versions ({ranges})"]
        if not callable(getattr(module, "get_input_embeddings", None)):
            reasons.append(f"{type(module).__name__} has no get_input_embeddings()")
        signature, _ = forward_signature(original_method(module, "forward"))
        params = signature.parameters
        if any(p.kind is p.VAR_POSITIONAL for p in params.values()):
            reasons.append("forward takes *args; the pre-step binds calls by name")
        for name in ("input_ids", "inputs_embeds"):
            if name not in params:
                reasons.append(f"forward has no {name!r} argument")
        for m in covered:
            if m.trigger not in params:
                reasons.append(f"forward has no {m.trigger!r} argument ({m.kind})")
            if m.feature_method is not None and not callable(getattr(module, m.feature_method, None)):
                reasons.append(f"no {m.feature_method}() ({m.kind})")
            if placeholder_id(module.config, m.placeholder_fields) is None:
                reasons.append(f"config has none of {', '.join(m.placeholder_fields)} ({m.kind} placeholder id)")
        if self.spec.position_ids_method is not None:
            if not callable(getattr(module, self.spec.position_ids_method, None)):
                reasons.append(f"no {self.spec.position_ids_method}() (position ids)")
            if "position_ids" not in params:
                reasons.append("forward has no 'position_ids' argument")
        for name in self.spec.token_range_embedders:
            embedder = getattr(module, name, None)
            if not all(isinstance(getattr(embedder, a, None), int) for a in ("vocab_offset", "vocab_size")):
                reasons.append(f"no {name} submodule with an int vocab_offset and vocab_size (its id range)")
        looked_up_as = self.spec.placeholders_looked_up_as
        if looked_up_as is not None and not isinstance(config_value(module.config, looked_up_as), int):
            reasons.append(f"config has no int {looked_up_as} (the id its placeholders are looked up as)")
        language_model = self.spec.language_model_inputs
        if language_model is not None:
            if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
                reasons.append(f"forward takes no **kwargs to hand {language_model.attribute} its inputs")
            if not isinstance(getattr(module, language_model.attribute, None), torch.nn.Module):
                reasons.append(f"no {language_model.attribute} submodule")
        return reasons

    def notes(self, module: torch.nn.Module, options: PatchOptions) -> list[str]:
        notes = [
            "count check on (1 host sync)"
            if options.check_placeholders
            else "count check off (no host sync; a count mismatch gives NaN rows)"
        ]
        embedding = module.get_input_embeddings()
        unfused = _unfused_reason(embedding)
        if self.spec.token_range_embedders:
            unfused = (f"{type(embedding).__name__} runs first, then {', '.join(self.spec.token_range_embedders)} "
                       "embed their id ranges")  # fmt: skip
        notes.append("embedding lookup fused" if unfused is None else unfused)
        weight = getattr(embedding, "weight", None)
        if isinstance(weight, torch.Tensor):
            notes.append(backend_note(MERGE_CAPABILITIES, weight))
        else:
            notes.append("backend decided per call")
        for m in self.spec.modalities:
            if not _version_covered(m.transformers):
                notes.append(f"{m.kind}: original path (covered on transformers {m.transformers})")
        return notes

    def coverage_row(self) -> dict[str, str]:
        row = super().coverage_row()
        row["modalities"] = "; ".join(
            f"{m.kind} ({' / '.join(f'`{f}`' for f in m.placeholder_fields)})"
            + (f" transformers {m.transformers}" if m.transformers else "")
            for m in self.spec.modalities
        )
        row["features"] = "; ".join(
            (f"`{m.feature_method}`" + ("" if m.feature_field == "pooler_output" else f" (`{m.feature_field}`)"))
            if m.feature_method else f"`{m.feature_function.__name__}` (spec)"
            for m in self.spec.modalities
        )  # fmt: skip
        return row

    def make_replacement(self, options: PatchOptions) -> Callable:
        spec = self.spec
        covered = tuple(self.covered_modalities())
        uncovered = tuple(m for m in spec.modalities if m not in covered)
        check = options.check_placeholders

        def forward(model, *args, **kwargs):
            original = original_method(model, "forward")
            call = bind_call(original, args, kwargs)
            if call is None:
                return original(*args, **kwargs)
            media = _media_to_merge(model, spec, covered, uncovered, call)
            if not media or not _language_model_takes_inputs(model, spec):
                return original(*args, **kwargs)
            features = []
            for modality, encoded in media:
                if encoded is not None:
                    found = encoder_output_features(encoded, modality.feature_field)
                elif modality.feature_function is not None:
                    found = modality.feature_function(model, call)
                else:
                    found = method_features(model, modality, call)
                if found is None:  # the feature function says: the original handles this call
                    return original(*args, **kwargs)
                features.append(found)
            present = [modality for modality, _ in media]
            if spec.adds_to_placeholder_embeddings:
                features = [_added_to_placeholder_embedding(model, m, f, call.get("input_ids"))
                            for m, f in zip(present, features)]  # fmt: skip
            # The merge first: its count check raises Hugging Face's error before anything
            # derived from the placeholder positions could fail on a mismatch.
            merge_ids = call.get("input_ids")
            if spec.placeholders_looked_up_as is not None:
                merge_ids = _absent_placeholders_looked_up_as(model, spec, present, merge_ids)
            merged = _merge(model, present, features, merge_ids, check, spec.count_mismatch_message,
                            spec.token_range_embedders)  # fmt: skip
            derived = None
            if spec.language_model_inputs is not None:
                derived = spec.language_model_inputs.derive(model, present, features, call.get("input_ids"))
                if derived is None:  # the derivation says: the original handles this call
                    return original(*args, **kwargs)
            if spec.forward_inputs is not None:
                own = spec.forward_inputs(model, present, features, call.get("input_ids"))
                if own is None:  # the derivation says: the original handles this call
                    return original(*args, **kwargs)
                call = Call({**call.named, **own}, call.extra)
            return _call_original(model, original, spec, present, features, call, merged, derived)

        forward.__name__ = "forward"
        forward.__qualname__ = f"mmkernels_merge_forward[{spec.family}]"
        forward.__doc__ = (
            f"mmkernels: {spec.model_class}.forward with the multimodal merge done by "
            f"mmkernels.ops.{MERGE_OP} (check={check}); see mmkernels.integrations.hf_merge."
        )
        return forward


class LanguageModelInputsRule(SpecRule):
    """The other half of a :class:`MergeSpec` with :class:`LanguageModelInputs`: replaces
    the language model's ``forward`` with one that takes the derived arguments out of
    :data:`LANGUAGE_MODEL_KWARG` and passes them as the arguments they are (the original
    forward, given no media, passed None for them). Any other call: the original."""

    kernel = "merge"
    method = "forward"
    op = f"mmkernels.ops.{MERGE_OP}"

    def __init__(self, spec: MergeSpec):
        self.spec = spec
        self.family = spec.family
        self.model_type = spec.language_model_inputs.model_type
        self.model_class = spec.language_model_inputs.model_class

    def __repr__(self) -> str:
        return f"LanguageModelInputsRule({self.family}: {self.model_class}.forward)"

    def make_replacement(self, options: PatchOptions) -> Callable:
        return _language_model_forward

    def coverage_row(self) -> dict[str, str]:
        row = super().coverage_row()
        row["features"] = f"the inputs the {self.spec.model_class} pre-step derives"
        return row


def _language_model_forward(self, *args, **kwargs):
    original = original_method(self, "forward")
    derived = kwargs.pop(LANGUAGE_MODEL_KWARG, None)
    if derived is None:
        return original(*args, **kwargs)
    call = bind_call(original, args, kwargs)
    if call is None:
        raise TypeError(f"mmkernels {type(self).__name__}.forward: the call does not bind to the original forward")
    for name, value in derived.items():
        if call.get(name) is not None:
            raise ValueError(f"mmkernels {type(self).__name__}.forward: {name} came from the merge pre-step and "
                             f"from the caller")  # fmt: skip
        call.named[name] = value
    return original(**call.named, **call.extra)


# The arguments the forwards name in their "not both pixels and mm_encoder_outputs" check.
_PIXELS = ("pixel_values", "pixel_values_videos")


def _media_to_merge(model, spec: MergeSpec, covered, uncovered, call: Call) -> list[tuple[Modality, Any]]:
    """The modalities the pre-step merges for this call, each with its precomputed encoder
    output (None: compute the features). Empty sends the call to the original."""
    input_ids = call.get("input_ids")
    if not isinstance(input_ids, torch.Tensor) or call.get("inputs_embeds") is not None:
        return []
    if any(call.get(name) is not None for name in spec.original_inputs):
        return []
    # Only a parameter the forward names: before 5.18 the forwards take none, and a
    # mm_encoder_outputs in their **kwargs goes on to the language model, unread.
    encoded = call.named.get(spec.encoder_outputs_input) if spec.encoder_outputs_input else None
    if encoded is not None and not spec.pixels_beside_encoder_outputs and any(
        call.get(name) is not None for name in _PIXELS
    ):
        # Pixels beside encoder outputs (even an empty dict, or another kind's): 83 of the 89
        # forwards of transformers 5.25 that take mm_encoder_outputs raise their own error
        # then; the original runs, which raises it, or merges as it does where it takes both.
        # (Raw audio beside encoded images is the Omni thinkers' usual call: merged; so is a
        # raw video beside encoded images where the spec says the forward takes both.)
        return []
    if encoded is None:
        encoded = {}
    elif not isinstance(encoded, dict) or any(
        value is not None and kind not in {m.kind for m in covered} for kind, value in encoded.items()
    ):
        return []  # a form or a kind the pre-step does not cover
    if any(_present(call.get(m.trigger)) for m in uncovered):
        return []
    media = []
    for m in covered:
        given, raw = encoded.get(m.kind), _present(call.get(m.trigger))
        if given is not None and raw:
            return []  # both: the original raises its own error
        if given is not None or raw:
            media.append((m, given))
    if not media:
        return []
    if spec.media_ignored_on_single_token and input_ids.shape[-1] == 1:
        return []
    if spec.needs_original is not None and spec.needs_original(model, call) is not None:
        return []
    return media


def _unfused_reason(embedding: torch.nn.Module) -> str | None:
    """Why the embedding module must run itself instead of the op's fused lookup, or None.

    The fused lookup is ``F.embedding(ids, weight, padding_idx)`` in values and gradients
    (the op takes ``padding_idx``); every other ``nn.Embedding`` option changes one of them,
    and so does anything that runs around the module's forward. Checked per call: hooks
    come and go (``enable_input_require_grads``, NEFTune's noise)."""
    # Only the exact class: a subclass (Gemma's scaled embedding) changes what forward computes.
    if type(embedding) is not torch.nn.Embedding:
        return f"{type(embedding).__name__} runs first (not a plain nn.Embedding)"
    options = [
        ("max_norm", embedding.max_norm is not None),  # renormalizes the table inside forward
        ("scale_grad_by_freq", embedding.scale_grad_by_freq),  # scales the table's gradient
        ("sparse", embedding.sparse),  # a sparse gradient for the table
    ]
    used = [option for option, on in options if on]
    if used:
        return f"nn.Embedding runs first (its {', '.join(used)} changes the lookup or its gradient)"
    hooks = (embedding._forward_hooks, embedding._forward_pre_hooks, embedding._backward_hooks,
             embedding._backward_pre_hooks, nn_module._global_forward_hooks, nn_module._global_forward_pre_hooks,
             nn_module._global_backward_hooks, nn_module._global_backward_pre_hooks)  # fmt: skip
    if any(hooks):
        return "nn.Embedding runs first (hooks run around its forward)"
    return None


def _hf_count_error(error: PlaceholderCountError, present: Sequence[Modality],
                    message: str = HF_COUNT_MISMATCH, width: int = 0,
                    features: Sequence[Features] = ()) -> ValueError:  # fmt: skip
    """The op's count error restated as the unpatched forward words it (``message``: the
    spec's :attr:`MergeSpec.count_mismatch_message`): the first kind that mismatches, in
    the order the forward checks them (its modalities' order); ``width``: the features'
    last dimension (for ``{feature_values}``); ``features``: each present kind's, for its
    :attr:`Modality.count_mismatch_features`."""
    index_of = {pid: i for i, pid in enumerate(error.kind_ids[: len(present)])}
    for pid, tokens, rows in zip(error.kind_ids, error.placeholders, error.rows):
        if tokens != rows and pid in index_of:  # (broadcast kinds, unchecked, come after)
            modality = present[index_of[pid]]
            printed = rows
            if modality.count_mismatch_features is not None and features:
                printed = modality.count_mismatch_features(features[index_of[pid]].pooled)
            kind = modality.kind
            return ValueError(message.format(Kind=kind.capitalize(), kind=kind, tokens=tokens, features=printed,
                                             feature_values=rows * width))  # fmt: skip
    return ValueError(str(error))


def _merge(model, present: Sequence[Modality], features: Sequence[Features], input_ids: torch.Tensor,
           check: bool, count_mismatch_message: str = HF_COUNT_MISMATCH,
           token_range_embedders: Sequence[str] = ()) -> torch.Tensor:  # fmt: skip
    from mmkernels.ops import merge_multimodal_embeddings

    ids = [placeholder_id(model.config, m.placeholder_fields) for m in present]
    device = input_ids.device
    rows = [[r if r.device == device else r.to(device) for r in f.rows] for f in features]
    broadcast_ids = _add_broadcast_kinds(model, present, features, ids, rows, device)
    embedding = model.get_input_embeddings()
    try:
        if not token_range_embedders and _unfused_reason(embedding) is None and embedding.weight.device == device:
            rows = _one_dtype(rows, embedding.weight.dtype)
            return merge_multimodal_embeddings(input_ids, None, rows, ids, embedding_weight=embedding.weight,
                                               check=check, padding_idx=embedding.padding_idx,
                                               broadcast_ids=broadcast_ids)  # fmt: skip
        text_embeds = _text_embeds(embedding, input_ids, ids, device)
        if token_range_embedders:
            text_embeds = _range_embedded(model, token_range_embedders, input_ids, text_embeds)
        return merge_multimodal_embeddings(input_ids, text_embeds, _one_dtype(rows, text_embeds.dtype), ids,
                                           check=check, broadcast_ids=broadcast_ids)  # fmt: skip
    except PlaceholderCountError as error:
        width = next((r.shape[-1] for kind in rows for r in kind), 0)
        raise _hf_count_error(error, present, count_mismatch_message, width, features) from error


def _add_broadcast_kinds(model, present: Sequence[Modality], features: Sequence[Features], ids: list[int],
                         rows: list[list[torch.Tensor]], device: torch.device) -> list[int]:  # fmt: skip
    """Append each present modality's broadcast kinds (:attr:`Modality.broadcast_field`) to
    ``ids`` and ``rows``: id ``i`` of the config's list, row ``i`` of the encoder output's
    field. Returns their ids (the op's ``broadcast_ids``)."""
    broadcast_ids = []
    for modality, found in zip(present, features):
        if modality.broadcast_field is None:
            continue
        vectors = getattr(found.encoder_output, modality.broadcast_field, None)
        kind_ids = list(getattr(model.config, modality.broadcast_ids_field))
        if not isinstance(vectors, torch.Tensor) or vectors.dim() != 2 or vectors.shape[0] != len(kind_ids):
            raise ValueError(f"{modality.kind} encoder output: expected {modality.broadcast_field} of shape "
                             f"({len(kind_ids)}, D), one row per id of config.{modality.broadcast_ids_field}, got "
                             f"{tuple(vectors.shape) if isinstance(vectors, torch.Tensor) else type(vectors).__name__}")  # fmt: skip
        vectors = vectors.to(device)
        for i, kind_id in enumerate(kind_ids):
            ids.append(kind_id)
            rows.append([vectors[i : i + 1]])
            broadcast_ids.append(kind_id)
    return broadcast_ids


def _one_dtype(rows: list[list[torch.Tensor]], out_dtype: torch.dtype) -> list[list[torch.Tensor]]:
    """The feature rows as the op takes them: in one dtype. Towers in different dtypes (an
    Omni thinker's audio tower kept in float32 beside a bfloat16 vision tower) give rows of
    several; the forward casts each to the embeddings' dtype before its scatter, and so do
    these (the same rounding). Rows of one dtype are left to the op, which casts in the
    kernel."""
    if len({r.dtype for kind in rows for r in kind}) <= 1:
        return rows
    return [[r.to(out_dtype) for r in kind] for kind in rows]


def _text_embeds(embedding: torch.nn.Module, input_ids: torch.Tensor, ids: Sequence[int], device) -> torch.Tensor:
    """The embedding module run on the text: what the unfused merge reads."""
    lookup_ids = input_ids
    vocab = getattr(embedding, "num_embeddings", None)
    if vocab is not None and any(not 0 <= i < vocab for i in ids):
        # A placeholder id outside the table (PaliGemma, Gemma 3 do this) would fail the
        # lookup; its rows are overwritten by the merge, so look up row 0 there instead.
        is_placeholder = torch.zeros_like(input_ids, dtype=torch.bool)
        for i in ids:
            is_placeholder |= input_ids == i
        lookup_ids = input_ids.masked_fill(is_placeholder, 0)
    return embedding(lookup_ids).to(device)


def _range_embedded(model, names: Sequence[str], input_ids: torch.Tensor, text_embeds: torch.Tensor) -> torch.Tensor:
    """``text_embeds`` with the ids of each :attr:`MergeSpec.token_range_embedders` range
    embedded by its own module, as the forward builds them (see there)."""
    modules = [getattr(model, name) for name in names]
    for i, module in enumerate(modules):
        in_range = input_ids >= module.vocab_offset
        if i + 1 < len(modules):
            in_range = torch.logical_and(in_range, input_ids < modules[i + 1].vocab_offset)
        outside = module.vocab_offset + module.vocab_size - 1  # an id of the range: its rows are dropped
        rows = module(input_ids=torch.where(in_range, input_ids, outside).to(text_embeds.device))
        rows = rows.to(text_embeds.device, text_embeds.dtype)
        text_embeds = torch.where(in_range.unsqueeze(-1).to(text_embeds.device), rows, text_embeds)
    return text_embeds


def config_value(config: Any, path: str) -> Any:
    """The config's field at the dotted ``path`` (``text_config.pad_token_id``), or None."""
    value = config
    for name in path.split("."):
        value = getattr(value, name, None)
    return value


def placeholders_looked_up_as(input_ids: torch.Tensor, placeholder_ids: Sequence[int], token_id: int) -> torch.Tensor:
    """``input_ids`` with every id of ``placeholder_ids`` replaced by ``token_id``: what a
    forward that embeds its placeholders as another id (Gemma 4: the text pad id) looks up."""
    is_placeholder = torch.zeros_like(input_ids, dtype=torch.bool)
    for i in placeholder_ids:
        is_placeholder |= input_ids == i
    return torch.where(is_placeholder, token_id, input_ids)


def _absent_placeholders_looked_up_as(model, spec: MergeSpec, present: Sequence[Modality],
                                      input_ids: torch.Tensor) -> torch.Tensor:  # fmt: skip
    """The ids the merge reads (see :attr:`MergeSpec.placeholders_looked_up_as`): the
    placeholders of the kinds the call does not carry replaced by the spec's id, those of
    the kinds it merges kept (the op finds its positions by them)."""
    merged = {placeholder_id(model.config, m.placeholder_fields) for m in present}
    absent = {placeholder_id(model.config, m.placeholder_fields) for m in spec.modalities} - merged - {None}
    if not absent:
        return input_ids
    token = config_value(model.config, spec.placeholders_looked_up_as)
    return placeholders_looked_up_as(input_ids, sorted(absent), token)


def _added_to_placeholder_embedding(model, modality: Modality, found: Features, input_ids: torch.Tensor) -> Features:
    """``found`` with the placeholder token's own embedding added to every row (what a
    forward that adds the features to the placeholders' embeddings writes there). The
    embedding module runs on the one id, as the forward runs it on every token."""
    # A fill on the device, not a host-to-device copy of a Python list.
    token = torch.full((1,), placeholder_id(model.config, modality.placeholder_fields), device=input_ids.device)
    own = model.get_input_embeddings()(token)[0]
    return dataclasses.replace(found, rows=[row.to(own.device) + own for row in found.rows])


def _language_model_takes_inputs(model, spec: MergeSpec) -> bool:
    """The spec derives no language-model inputs, or the language model's forward is
    replaced by the rule that takes them (else they would reach a forward that does not
    know the keyword: the original runs instead)."""
    if spec.language_model_inputs is None:
        return True
    language_model = getattr(model, spec.language_model_inputs.attribute, None)
    swap = getattr(language_model, "__dict__", {}).get(ORIGINALS_ATTR, {}).get("forward")
    return swap is not None and isinstance(swap.rule, LanguageModelInputsRule)


def _position_ids(model, method_name: str, call: Call, merged: torch.Tensor) -> Any:
    """The position ids the forward would compute with its own ``method_name`` (given by
    name what the call passed, and the merged embeddings)."""
    method = getattr(model, method_name)
    signature, _ = forward_signature(method)
    arguments = {}
    for name, parameter in signature.parameters.items():
        if parameter.kind in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD):
            continue
        value = merged if name == "inputs_embeds" else call.get(name)
        if value is None and name == "cache":  # the deprecated name a caller may still pass
            value = call.get("past_key_values")
        arguments[name] = value
    return method(**arguments)


def _call_original(model, original: Callable, spec: MergeSpec, present: Sequence[Modality],
                   features: Sequence[Features], call: Call, merged: torch.Tensor,
                   language_model_inputs: dict[str, Any] | None = None) -> Any:  # fmt: skip
    named, extra = dict(call.named), dict(call.extra)
    if spec.position_ids_method is not None and call.get("position_ids") is None:
        named["position_ids"] = _position_ids(model, spec.position_ids_method, call, merged)
    if language_model_inputs is not None:
        extra[LANGUAGE_MODEL_KWARG] = language_model_inputs
    named["inputs_embeds"] = merged
    if not spec.keeps_input_ids:
        named["input_ids"] = None
    if spec.encoder_outputs_input in named:
        named[spec.encoder_outputs_input] = None
    for modality in present:
        for name in modality.consumed:
            if name in named:
                named[name] = None
            else:
                extra.pop(name, None)

    fills = [(field, kind, f) for m, f in zip(present, features) for field, kind in m.filled_output_fields()]
    if not fills:
        return original(**named, **extra)

    # The output must be an object to fill; HF's can_return_tuple turns it into a tuple when
    # return_dict is False, so ask for the object and make the tuple here, as it would.
    requested = call.get("return_dict")
    wants_object = requested if requested is not None else getattr(model.config, "return_dict", True)
    if "return_dict" in named:
        named["return_dict"] = True
    else:
        extra["return_dict"] = True
    output = original(**named, **extra)
    if dataclasses.is_dataclass(output):
        names = [f.name for f in dataclasses.fields(output)]
        updates = {
            field: _output_value(f, kind, merged)
            for field, kind, f in fills
            if field in names and getattr(output, field, None) is None
        }
        if updates:
            # Rebuilt in field order, as the unpatched forward builds it (tuple order too).
            output = type(output)(**{name: updates.get(name, getattr(output, name)) for name in names})
    if not wants_object and hasattr(output, "to_tuple"):
        return output.to_tuple()
    return output
