"""Hugging Face specs for the multimodal merge: one small declaration per family.

Each spec says which inner model (its own ``config.model_type`` and class), which media it
merges, which of its OWN methods computes each medium's features and with which forward
arguments (mirroring the call in its ``forward``), which forward arguments the feature step
consumes, and where the forward's output carries the features. The engine
(:mod:`.engine`) and the generic pre-step (:mod:`.hf_merge`) do the rest.

Read against ``transformers/models/<family>/modeling_<family>.py``, versions 5.17 to 5.24.
Version facts that matter here:

* 5.24 returns the encoder outputs as ``image_outputs`` / ``video_outputs``; up to 5.23 the
  outputs had ``image_hidden_states`` / ``video_hidden_states`` (the cast pooled features).
  Both are listed; the engine fills whichever field the output class has.
* LLaVA-OneVision moved the video newline token into ``get_video_features`` in 5.18; on
  5.17 its forward appends it, so video is covered from 5.18 (5.17 video calls run the
  original forward).
* Since 5.18 the forwards take ``mm_encoder_outputs`` ({kind: encoder output}), and
  ``generate`` encodes the media before the prefill and passes them there: the pre-step
  merges those too (:attr:`MergeSpec.encoder_outputs_input`, on by default).

Qwen3-VL (and its MoE) also adds each image's deepstack features (the vision tower's
early layers, one tensor per level) to the text model's hidden states at the visual
positions: :func:`qwen3_vl_deepstack_inputs` derives those inputs as its forward does, the
pre-step hands them to the text model (:class:`~.hf_merge.LanguageModelInputs`), and the
M-RoPE position ids come from the model's own ``compute_3d_position_ids`` (its forward
refuses ``input_ids`` next to ``inputs_embeds``).

GLM-4.1V, GLM-4.5V and GLM-OCR merge as Qwen2-VL does and take their position ids the same
way as Qwen3-VL; their video frames take the IMAGE token (their ``get_placeholder_mask``
says so), so a call holds images or a video; one with both runs the original forward,
which decides what two kinds in the same rows mean.

Kimi K2.5 merges as Qwen2-VL does; its forward embeds the placeholder ids as id 0 (they
may lie past the table), which changes nothing the merge keeps: their rows are replaced
(the op reads no table row for a placeholder).

Molmo2 adds its image features to the placeholder tokens' own embeddings
(:attr:`~.hf_merge.MergeSpec.adds_to_placeholder_embeddings`); its videos and a call whose
cache already holds tokens (its forward then still treats the call as a prefill because
images came, which dropping them would change) run the original.

Qwen2.5-Omni's thinker merges audio, images and videos in one forward: the audio from
``get_audio_features(...).last_hidden_state`` (:attr:`~.hf_merge.Modality.feature_field`),
images and videos as Qwen2-VL does; one op call takes all three. Its forward accepts
``input_ids`` beside ``inputs_embeds`` and computes its M-RoPE positions from them (with
``use_audio_in_video``, the audio lengths from ``feature_attention_mask``, the seconds
per video grid), so those stay in the call and the original computes the positions. The
placeholders of audio interleaved with video (``use_audio_in_video=True``) are still one
token id per kind, filled in order as ``masked_scatter`` fills them: merged as any other
call. Audio in ``mm_encoder_outputs`` (the forward ignores it) runs the original, as pixels
next to ``mm_encoder_outputs`` do for every family (the forward raises). Qwen3-Omni-MoE's thinker
merges the same way and also hands its images' and videos' deepstack features to its text
model, as Qwen3-VL does (:func:`qwen3_omni_deepstack_inputs`: its audio has none).

MiniCPM-V 4.6 and 4.7 (and MiniCPM-OCR, whose forward is 4.6's) merge images and videos in
one forward, each from its feature method given ``pixel_values[:1]`` /
``pixel_values_videos[:1]``: the processors pack every crop and frame of a call into ONE row
of NaViT patches, ``(1, C, P, L)``, with ``target_sizes`` per crop, so the slice is a no-op
on a processor's output; the spec says the same (:attr:`~.hf_merge.Modality.first_row`),
so a tensor of more rows is encoded from its first row as the forward does. On 5.17 the
4.6 forward also tiles the features once per row (generate's beam expansion copies the row
per beam): :attr:`~.hf_merge.Modality.first_row_repeated`. The features are a list of
per-crop tensors (one per thumbnail, slice or frame), merged as they come; the count check
words its error "Multimodal features and tokens do not match"
(:attr:`~.hf_merge.MergeSpec.count_mismatch_message`). 4.7 computes canvas M-RoPE positions
from ``input_ids``, ``mm_token_type_ids`` and both kinds' ``target_sizes`` and accepts
``input_ids`` beside ``inputs_embeds``, so those stay and the original computes the
positions. Pixels next to ``mm_encoder_outputs`` (the forward raises) run the original.

Qwen2-Audio has no feature method; :func:`qwen2_audio_features` is its short feature
function, built from the model's own submodules, and decides the legacy (unexpanded audio
tokens) path with the one host sync it needs anyway.
"""

from __future__ import annotations

import dataclasses

import torch

from .hf_merge import Call, Features, LanguageModelInputs, MergeSpec, Modality, placeholder_id

__all__ = ["MERGE_SPECS", "qwen2_audio_features", "qwen3_omni_deepstack_inputs", "qwen3_vl_deepstack_inputs"]

IMAGE_TOKEN = ("image_token_id", "image_token_index")
VIDEO_TOKEN = ("video_token_id", "video_token_index")
AUDIO_TOKEN = ("audio_token_id", "audio_token_index")

# Where the unpatched forward puts the features (5.24 fields first, then the older ones).
IMAGE_OUTPUTS = (("image_outputs", "encoder_output"), ("image_hidden_states", "features"))
VIDEO_OUTPUTS = (("video_outputs", "encoder_output"), ("video_hidden_states", "flat_features"))


def _llava_like_image(positional, keywords, consumed, passes_forward_kwargs=False) -> Modality:
    return Modality(
        kind="image",
        placeholder_fields=IMAGE_TOKEN,
        trigger="pixel_values",
        consumed=consumed,
        feature_method="get_image_features",
        positional=positional,
        keywords=keywords,
        passes_forward_kwargs=passes_forward_kwargs,
        output_fields=IMAGE_OUTPUTS,
    )


def _qwen2_vl_modalities() -> tuple[Modality, ...]:
    # image_grid_thw / video_grid_thw stay in the forward call: M-RoPE positions need them.
    return (
        Modality(
            kind="image",
            placeholder_fields=IMAGE_TOKEN,
            trigger="pixel_values",
            consumed=("pixel_values",),
            feature_method="get_image_features",
            positional=("pixel_values", "image_grid_thw"),
            passes_forward_kwargs=True,
            output_fields=(("image_outputs", "encoder_output"),),
        ),
        Modality(
            kind="video",
            placeholder_fields=VIDEO_TOKEN,
            trigger="pixel_values_videos",
            consumed=("pixel_values_videos",),
            feature_method="get_video_features",
            positional=("pixel_values_videos", "video_grid_thw"),
            passes_forward_kwargs=True,
            output_fields=(("video_outputs", "encoder_output"),),
        ),
    )


def _paligemma_prefix_mask_needs_pixels(model, call: Call) -> str | None:
    # PaliGemma builds its bidirectional prefix mask when `pixel_values is not None` even if
    # the cache already holds tokens (prefix caching); dropping pixel_values would change it.
    cache = call.get("cache", call.get("past_key_values"))
    if call.get("token_type_ids") is not None and cache is not None and getattr(cache, "is_initialized", False):
        return "cache already initialized: the prefix mask depends on pixel_values"
    return None


def qwen2_audio_features(model, call: Call) -> Features | None:
    """Qwen2-Audio's audio features, as ``Qwen2AudioModel.forward`` computes them, per audio.

    Returns None (the original forward runs) for the legacy input format, where each audio
    is one unexpanded ``<|AUDIO|>`` token that the original forward expands itself.
    """
    tower = model.audio_tower
    input_ids = call.get("input_ids")
    input_features = call.get("input_features").to(tower.device)
    feature_attention_mask = call.get("feature_attention_mask").to(tower.device)

    audio_feat_lengths, audio_output_lengths = tower._get_feat_extract_output_lengths(feature_attention_mask.sum(-1))
    audio_tokens = input_ids == placeholder_id(model.config, AUDIO_TOKEN)
    is_legacy = (audio_tokens[:, :-1] & audio_tokens[:, 1:]).sum() == 0
    # The one host sync: the legacy decision and the per-audio lengths together (the
    # original makes three: the legacy test, a boolean-mask select and a count .item()).
    legacy, *lengths = torch.cat([is_legacy.reshape(1).to(audio_output_lengths.dtype), audio_output_lengths]).tolist()
    if legacy:
        return None

    from transformers.masking_utils import create_bidirectional_mask

    batch_size, _, max_mel_seq_len = input_features.shape
    max_seq_len = (max_mel_seq_len - 2) // 2 + 1
    seq_range = torch.arange(max_seq_len, dtype=audio_feat_lengths.dtype, device=audio_feat_lengths.device)
    audio_attention_mask_2d = (seq_range[None, :] < audio_feat_lengths[:, None]).to(torch.long)
    embed_dtype = model.get_input_embeddings().weight.dtype
    dummy_embeds = torch.zeros((batch_size, max_seq_len, 1), dtype=embed_dtype, device=input_ids.device)
    audio_attention_mask = create_bidirectional_mask(
        config=tower.config, inputs_embeds=dummy_embeds, attention_mask=audio_attention_mask_2d
    )
    audio_outputs = tower(input_features, attention_mask=audio_attention_mask)
    audio_features = model.multi_modal_projector(audio_outputs.last_hidden_state)
    # Audio i's valid frames are its first lengths[i] rows: slices, not a boolean select.
    return Features(rows=[audio_features[i, :n] for i, n in enumerate(lengths)])


def qwen3_vl_deepstack_inputs(model, modalities, features: list[Features], input_ids: torch.Tensor) -> dict | None:
    """``visual_pos_masks`` and ``deepstack_visual_embeds`` as ``Qwen3VLModel.forward``
    derives them: the placeholder positions of the kinds present, and per deepstack level
    the features of those positions in order (image and video both present: scattered into
    one tensor by the joint masks, with the one host sync the forward makes there too).
    None (the original forward runs) when an encoder output carries no deepstack features."""
    masks, levels = [], []
    for modality, found in zip(modalities, features):
        deepstack = getattr(found.encoder_output, "deepstack_features", None)
        if deepstack is None:
            return None
        masks.append(input_ids == placeholder_id(model.config, modality.placeholder_fields))
        # 5.25: a list per level of per-image tensors; 5.17: one tensor per level.
        levels.append([torch.cat(level, dim=0) if isinstance(level, (list, tuple)) else level for level in deepstack])
    if len(masks) == 1:
        return {"visual_pos_masks": masks[0], "deepstack_visual_embeds": levels[0]}
    visual = masks[0] | masks[1]
    joint_masks = [mask[visual] for mask in masks]
    embeds = []
    for per_kind in zip(*levels):
        joint = per_kind[0].new_zeros(joint_masks[0].shape[0], per_kind[0].shape[-1])
        for mask, embed in zip(joint_masks, per_kind):
            joint[mask, :] = embed
        embeds.append(joint)
    return {"visual_pos_masks": visual, "deepstack_visual_embeds": embeds}


def _qwen3_vl(family: str, model_type: str, model_class: str, text_model_type: str, text_model_class: str):
    return MergeSpec(
        family=family,
        model_type=model_type,
        model_class=model_class,
        modalities=_qwen2_vl_modalities(),
        position_ids_method="compute_3d_position_ids",
        language_model_inputs=LanguageModelInputs("language_model", text_model_type, text_model_class,
                                                  qwen3_vl_deepstack_inputs),  # fmt: skip
    )


def _glm4v_images_and_video(model, call: Call) -> str | None:
    # Images and a video in one call: both kinds' placeholders are the image token rows, and
    # what that means is the original forward's to decide (unpatched, the video's rows
    # overwrite the image's where the counts agree): it runs.
    if call.get("pixel_values") is not None and call.get("pixel_values_videos") is not None:
        return "images and a video in one call (both use the image token)"
    encoded = call.get("mm_encoder_outputs") or {}
    if isinstance(encoded, dict) and encoded.get("image") is not None and encoded.get("video") is not None:
        return "images and a video in one call (both use the image token)"
    return None


def _glm4v(family: str, model_type: str, model_class: str) -> MergeSpec:
    image, video = _qwen2_vl_modalities()
    return MergeSpec(
        family=family,
        model_type=model_type,
        model_class=model_class,
        modalities=(image, dataclasses.replace(video, placeholder_fields=("image_token_id",))),
        position_ids_method="compute_3d_position_ids",
        needs_original=_glm4v_images_and_video,
    )


def _molmo2_needs_original(model, call: Call) -> str | None:
    if call.get("pixel_values_videos") is not None:
        return "video: not covered (its frames take the image token, with their own pooling inputs)"
    # The forward builds its image block mask when the cache is empty OR images came; with
    # the images taken out, a call whose cache already holds tokens would lose it.
    cache = call.get("cache", call.get("past_key_values"))
    if cache is not None and getattr(cache, "is_initialized", False):
        return "cache already holds tokens: the image block mask depends on the images being passed"
    return None


def _omni_modalities() -> tuple[Modality, ...]:
    # In the forward's order: audio, then images and videos as Qwen2-VL's (their grids stay
    # for M-RoPE). feature_attention_mask stays too: the forward turns it into the audio
    # lengths of its M-RoPE positions (with input_features gone it merges no audio).
    image, video = _qwen2_vl_modalities()
    audio = Modality(
        kind="audio",
        placeholder_fields=AUDIO_TOKEN,
        trigger="input_features",
        consumed=("input_features",),
        feature_method="get_audio_features",
        positional=("input_features", "feature_attention_mask", "audio_feature_lengths"),
        passes_forward_kwargs=True,
        feature_field="last_hidden_state",
    )
    # The output carries the image encoder's output only (its video_outputs and
    # audio_outputs stay None).
    return (audio, image, dataclasses.replace(video, output_fields=()))


def qwen3_omni_deepstack_inputs(model, modalities, features: list[Features], input_ids: torch.Tensor) -> dict | None:
    """Qwen3-Omni-MoE's thinker: :func:`qwen3_vl_deepstack_inputs` of its images and videos
    (its audio has no deepstack features); a call with audio alone hands the text model none,
    as its forward does."""
    visual = [(m, f) for m, f in zip(modalities, features) if m.kind != "audio"]
    if not visual:
        return {}
    kinds, found = zip(*visual)
    return qwen3_vl_deepstack_inputs(model, kinds, list(found), input_ids)


def _omni_needs_original(model, call: Call) -> str | None:
    # (Pixels beside mm_encoder_outputs run the original for every family: hf_merge.)
    encoded = call.get("mm_encoder_outputs")
    if isinstance(encoded, dict) and encoded.get("audio") is not None:
        return "audio in mm_encoder_outputs (the forward ignores it: its audio comes from input_features)"
    return None


# MiniCPM-V's count check, word for word (one message for both kinds).
_MINICPMV_COUNT_MISMATCH = "Multimodal features and tokens do not match, tokens: {tokens}, features: {features}"


def _minicpmv(family: str, model_type: str, model_class: str, *, sizes_for_positions: bool) -> MergeSpec:
    """MiniCPM-V: images, then videos, each from its feature method as the forward calls it,
    ``get_image_features(pixel_values[:1], target_sizes, downsample_mode=...)``.
    ``sizes_for_positions``: the forward also reads ``target_sizes`` /
    ``target_sizes_videos`` (4.7's M-RoPE positions, from ``input_ids``), so they stay in
    the call with ``input_ids``; else the feature step consumes them."""

    def kind(kind: str, pixels: str, sizes: str, placeholder_fields: tuple[str, ...]) -> Modality:
        return Modality(
            kind=kind,
            placeholder_fields=placeholder_fields,
            trigger=pixels,
            consumed=(pixels,) if sizes_for_positions else (pixels, sizes),
            feature_method=f"get_{kind}_features",
            positional=(pixels, sizes),
            keywords=("downsample_mode",),
            first_row=True,
            first_row_repeated="<5.18",  # 5.17: .repeat(pixel_values.shape[0], 1)
            output_fields=((f"{kind}_outputs", "encoder_output"),),  # 5.17's output has neither
        )

    return MergeSpec(
        family=family,
        model_type=model_type,
        model_class=model_class,
        modalities=(
            # The forward reads image_token_id / video_token_id only.
            kind("image", "pixel_values", "target_sizes", ("image_token_id",)),
            kind("video", "pixel_values_videos", "target_sizes_videos", ("video_token_id",)),
        ),
        keeps_input_ids=sizes_for_positions,
        count_mismatch_message=_MINICPMV_COUNT_MISMATCH,
    )


MERGE_SPECS: tuple[MergeSpec, ...] = (
    MergeSpec(
        family="LLaVA",
        model_type="llava",
        model_class="LlavaModel",
        modalities=(
            _llava_like_image(
                positional=(),
                keywords=("pixel_values", "vision_feature_layer", "vision_feature_select_strategy", "image_sizes"),
                consumed=("pixel_values", "image_sizes"),
                passes_forward_kwargs=True,
            ),
        ),
    ),
    MergeSpec(
        family="LLaVA-NeXT",
        model_type="llava_next",
        model_class="LlavaNextModel",
        modalities=(
            _llava_like_image(
                positional=("pixel_values", "image_sizes"),
                keywords=("vision_feature_layer", "vision_feature_select_strategy"),
                consumed=("pixel_values", "image_sizes"),
            ),
        ),
    ),
    MergeSpec(
        family="LLaVA-OneVision",
        model_type="llava_onevision",
        model_class="LlavaOnevisionModel",
        modalities=(
            _llava_like_image(
                positional=("pixel_values", "image_sizes"),
                keywords=("vision_feature_layer", "vision_feature_select_strategy", "batch_num_images"),
                consumed=("pixel_values", "image_sizes", "batch_num_images"),
            ),
            Modality(
                kind="video",
                placeholder_fields=VIDEO_TOKEN,
                trigger="pixel_values_videos",
                consumed=("pixel_values_videos", "image_sizes_videos"),
                feature_method="get_video_features",
                positional=("pixel_values_videos",),
                keywords=("vision_feature_layer", "vision_feature_select_strategy"),
                output_fields=VIDEO_OUTPUTS,
                transformers=">=5.18",
            ),
        ),
    ),
    MergeSpec(
        family="Qwen2-VL",
        model_type="qwen2_vl",
        model_class="Qwen2VLModel",
        modalities=_qwen2_vl_modalities(),
        keeps_input_ids=True,
    ),
    MergeSpec(
        family="Qwen2.5-VL",
        model_type="qwen2_5_vl",
        model_class="Qwen2_5_VLModel",
        modalities=_qwen2_vl_modalities(),
        keeps_input_ids=True,
    ),
    _qwen3_vl("Qwen3-VL", "qwen3_vl", "Qwen3VLModel", "qwen3_vl_text", "Qwen3VLTextModel"),
    _qwen3_vl("Qwen3-VL-MoE", "qwen3_vl_moe", "Qwen3VLMoeModel", "qwen3_vl_moe_text", "Qwen3VLMoeTextModel"),
    _glm4v("GLM-4.1V", "glm4v", "Glm4vModel"),
    _glm4v("GLM-4.5V", "glm4v_moe", "Glm4vMoeModel"),
    _glm4v("GLM-OCR", "glm_ocr", "GlmOcrModel"),
    MergeSpec(family="Kimi K2.5", model_type="kimi_k25", model_class="Kimi_K25Model",
              modalities=_qwen2_vl_modalities()),
    MergeSpec(
        family="Molmo2",
        model_type="molmo2",
        model_class="Molmo2Model",
        modalities=(
            _llava_like_image(
                positional=("pixel_values", "image_token_pooling", "image_grids", "image_num_crops"),
                keywords=(),
                consumed=("pixel_values", "image_token_pooling", "image_grids", "image_num_crops"),
            ),
        ),
        adds_to_placeholder_embeddings=True,
        needs_original=_molmo2_needs_original,
    ),
    MergeSpec(
        family="PaliGemma",
        model_type="paligemma",
        model_class="PaliGemmaModel",
        modalities=(_llava_like_image(positional=("pixel_values",), keywords=(), consumed=("pixel_values",)),),
        needs_original=_paligemma_prefix_mask_needs_pixels,
    ),
    MergeSpec(
        family="Gemma 3",
        model_type="gemma3",
        model_class="Gemma3Model",
        modalities=(_llava_like_image(positional=("pixel_values",), keywords=(), consumed=("pixel_values",)),),
    ),
    MergeSpec(
        family="Idefics3 / SmolVLM",
        model_type="idefics3",
        model_class="Idefics3Model",
        modalities=(
            _llava_like_image(
                positional=("pixel_values", "pixel_attention_mask"),
                keywords=(),
                consumed=("pixel_values", "pixel_attention_mask"),
            ),
        ),
        # 5.17 took precomputed features as image_hidden_states.
        original_inputs=("image_hidden_states",),
    ),
    MergeSpec(
        family="Aria",
        model_type="aria",
        model_class="AriaModel",
        modalities=(
            _llava_like_image(
                positional=(),
                keywords=("pixel_values", "pixel_mask"),
                consumed=("pixel_values", "pixel_mask"),
                passes_forward_kwargs=True,
            ),
        ),
        media_ignored_on_single_token=True,
    ),
    MergeSpec(
        family="Qwen2.5-Omni (thinker)",
        model_type="qwen2_5_omni_thinker",
        model_class="Qwen2_5OmniThinkerModel",
        modalities=_omni_modalities(),
        keeps_input_ids=True,
        needs_original=_omni_needs_original,
    ),
    MergeSpec(
        family="Qwen3-Omni-MoE (thinker)",
        model_type="qwen3_omni_moe_thinker",
        model_class="Qwen3OmniMoeThinkerModel",
        modalities=_omni_modalities(),
        keeps_input_ids=True,
        needs_original=_omni_needs_original,
        language_model_inputs=LanguageModelInputs("language_model", "qwen3_omni_moe_text",
                                                  "Qwen3OmniMoeThinkerTextModel", qwen3_omni_deepstack_inputs),  # fmt: skip
    ),
    _minicpmv("MiniCPM-V 4.6", "minicpmv4_6", "MiniCPMV4_6Model", sizes_for_positions=False),
    _minicpmv("MiniCPM-V 4.7", "minicpmv4_7", "MiniCPMV4_7Model", sizes_for_positions=True),
    _minicpmv("MiniCPM-OCR", "minicpm_ocr", "MiniCPMOcrModel", sizes_for_positions=False),
    MergeSpec(
        family="Qwen2-Audio",
        model_type="qwen2_audio",
        model_class="Qwen2AudioModel",
        modalities=(
            Modality(
                kind="audio",
                placeholder_fields=AUDIO_TOKEN,
                trigger="input_features",
                consumed=("input_features", "feature_attention_mask"),
                feature_function=qwen2_audio_features,
            ),
        ),
        media_ignored_on_single_token=True,
        encoder_outputs_input=None,
    ),
)
