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

GLM-4.1V, GLM-4.5V, GLM-4.6V and GLM-OCR merge as Qwen2-VL does and take their position ids the same
way as Qwen3-VL; their video frames take the IMAGE token (their ``get_placeholder_mask``
says so), so a call holds images or a video; one with both runs the original forward,
which decides what two kinds in the same rows mean.

SmolVLM2 (``smolvlm``; the first SmolVLM checkpoints are ``idefics3``) merges as Idefics3
does, from ``get_image_features(pixel_values, pixel_attention_mask)``; the generic rule
refuses its forward because it embeds the text with ``self.text_model.get_input_embeddings()``,
the very module its ``get_input_embeddings()`` returns (which the pre-step uses). Its videos
are frames its processor lays out as images (image tokens, ``pixel_values``). On 5.17 its
forward merged with its own ``inputs_merger``, whose only check was that each prompt's image
tokens are a multiple of one image's token count ("At least one sample has <image> tokens not
divisible by patch_size."); the pre-step checks the count itself and raises Hugging Face's
later words, as it does for Idefics3 up to 5.23, whose forward checked nothing.

LLaVA-NeXT-Video merges images as LLaVA-NeXT does and videos (frames through the same tower,
average-pooled) from ``get_video_features``, one op call for both. The generic rule refuses
its forward because it reshapes the video features before the scatter (each element of the
pooler output flattened over its first two dimensions: on 5.25, where that output is one
``(videos, rows, D)`` tensor, to one dimension), which changes no value or order the merge
writes, but changes the number its count check prints (rows x width on 5.25, rows on 5.17):
:attr:`~.hf_merge.Modality.count_mismatch_features`.

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

PerceptionLM encodes images (a thumbnail and tiles each) and video frames with the same
``get_image_features``, once per kind (which the generic rule refuses: one feature method
called twice); its video kind names that method with ``pixel_values_videos``. Up to 5.23 its
output carries both kinds' cast features (``image_hidden_states``, ``video_hidden_states``);
from 5.24 the image encoder's output only, and ``video_hidden_states``, still a field, stays
None: a version-limited output field (:attr:`~.hf_merge.Modality.output_fields`). As it has
no ``get_video_features``, ``generate`` (5.18 on) encodes its images only and passes the videos
raw beside them in ``mm_encoder_outputs``; its forward takes pixels beside that dict and
encodes the kinds it lacks, and so does the pre-step
(:attr:`~.hf_merge.MergeSpec.pixels_beside_encoder_outputs`).

PaddleOCR-VL merges images as Qwen2-VL does (``get_image_features(pixel_values,
image_grid_thw, **kwargs)``, a tuple of per-image features); the generic rule refuses its
forward because it embeds the text with ``self.language_model.embed_tokens``, the very
module its ``get_input_embeddings()`` returns (which the pre-step uses). It accepts
``input_ids`` beside ``inputs_embeds`` and computes its M-RoPE positions from them, the
grids and ``mm_token_type_ids``: those stay and the original computes the positions. Its
count check prints the feature count as rows x width
(:attr:`~.hf_merge.MergeSpec.count_mismatch_message`).

Ovis2 writes, after its image scatter, one learned vector at every occurrence of each
visual indicator id (``visual_indicator_features``, one row per id of
``visual_indicator_token_ids``; a host sync per id): the same op call writes them as
broadcast kinds (:attr:`~.hf_merge.Modality.broadcast_field`), no sync.

Qwen2-Audio has no feature method; :func:`qwen2_audio_features` is its short feature
function, built from the model's own submodules, and decides the legacy (unexpanded audio
tokens) path with the one host sync it needs anyway.

Granite Speech and Granite Speech Plus (the same forward, a different encoder) embed the
text with the audio ids looked up as id 0, which changes nothing the merge keeps (the op
reads no table row for a placeholder), and merge through their own
``get_merged_audio_embeddings``: the projected rows of every clip of the padded batch, cast
to the embeddings' dtype, then a boolean selection of each clip's own rows
(``audio_features[input_features_mask]``), then the placeholder mask and
``masked_scatter``; the generic rule refuses that forward (it reads ``input_ids`` past the
lookup). :func:`granite_speech_audio_features` computes the rows as
it does, the selection included: that boolean selection is the one host sync the pre-step
keeps (the number of rows it keeps is data; with ``check_placeholders=False`` it is the
only one), where the forward makes several (the id-0 lookup's boolean write, the
selection, its count check). Its count check prints the first dimension of what it
checked (the selected rows, or the clips where no mask came):
:attr:`~.hf_merge.Modality.count_mismatch_features`. Its output's ``audio_hidden_states``
is the projector's output as it came, unselected.

Gemma 3n merges images and audio in one forward, and its text rows are not one table
lookup: the ids from its vision offset up (the image markers and soft tokens) are embedded
by ``embed_vision``, those from its audio offset up by ``embed_audio``
(:attr:`~.hf_merge.MergeSpec.token_range_embedders`). Its audio rows come from
:func:`gemma3n_audio_features` (the encoder's rows past each clip's end, and the rows up to
``audio_soft_tokens_per_image``, are the embedding of the last audio id, as its forward
pads them), merged with the images in one op call. Its forward refuses ``per_layer_inputs``
beside ``input_ids`` and looks them up from ``input_ids`` (5.17's forward takes none at
all), so :func:`gemma3n_per_layer_inputs` looks them up the same way and the pre-step hands
them to its text model (:class:`~.hf_merge.LanguageModelInputs`), on every version. Audio
in ``mm_encoder_outputs`` (the forward ignores it) runs the original, as for the Omni
thinkers.

Gemma 4 merges images, videos (frames through the same tower, one tuple of per-video rows)
and audio in one forward, each from its own feature method, the audio rows being those its
encoder marks valid (:func:`gemma4_audio_features`; its count check prints rows x width); one
op call takes all three. The generic rule refuses its forward because it reads
``input_ids`` twice more: it looks every placeholder up as the text pad id, of the kinds in
the call or not (:attr:`~.hf_merge.MergeSpec.placeholders_looked_up_as`: the placeholders of
a kind the call lacks keep the pad embedding), and it looks its ``per_layer_inputs`` up from
those ids, which it takes beside ``inputs_embeds`` but would otherwise recover from them by
reversing the embedding (:func:`gemma4_per_layer_inputs`, passed to its own forward:
:attr:`~.hf_merge.MergeSpec.forward_inputs`). Its ``get_video_features`` takes
``num_frames_per_video`` on 5.25, none on 5.17 (:func:`gemma4_video_features` passes it
where the call carries it). Its output carries the image and audio encoder outputs, no
video's. ``per_layer_inputs`` beside ``input_ids`` (the forward raises) and audio in
``mm_encoder_outputs`` (ignored by the forward) run the original. Gemma 4 Unified (no
towers: patches and audio frames through embedders) merges the same way, without
per-layer inputs.
"""

from __future__ import annotations

import dataclasses

import torch

from .hf_merge import (Call, Features, LanguageModelInputs, MergeSpec, Modality, config_value,
                       encoder_output_features, placeholder_id, placeholders_looked_up_as)  # fmt: skip

__all__ = ["MERGE_SPECS", "gemma3n_audio_features", "gemma3n_per_layer_inputs", "gemma4_audio_features",
           "gemma4_per_layer_inputs", "gemma4_video_features", "granite_speech_audio_features", "qwen2_audio_features",
           "qwen3_omni_deepstack_inputs", "qwen3_vl_deepstack_inputs"]  # fmt: skip

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


def granite_speech_audio_features(model, call: Call) -> Features:
    """Granite Speech's (and Granite Speech Plus's) audio rows as its forward merges them:
    its own ``get_audio_features`` on ``input_features`` (cast to the model's dtype first,
    as the forward casts them), the projected rows cast to the text embeddings' device and
    dtype, then ``input_features_mask``'s boolean selection, as the forward selects them
    (each clip's own rows of the padded batch, clip after clip; any mask, not only the
    prefixes its feature extractor writes). That selection is the one host sync kept here:
    how many rows it keeps is data. Without a mask, every row, clip after clip.

    ``encoder_output``: the projected rows as the feature method returned them (uncast,
    unselected): what the forward's output carries as ``audio_hidden_states``. ``pooled``:
    the rows its count check reads; its error prints their first dimension (the selected
    rows, or, without a mask, the clips)."""
    input_features = call.get("input_features")
    if input_features.dtype != model.dtype:
        input_features = input_features.to(model.dtype)
    projected = model.get_audio_features(input_features, return_dict=True).pooler_output
    weight = model.get_input_embeddings().weight
    features = projected.to(weight.device, weight.dtype)
    mask = call.get("input_features_mask")
    if mask is not None:
        features = features[mask]
    return Features(rows=[features.reshape(-1, features.shape[-1])], encoder_output=projected, pooled=features)


def _leading_dimension(pooled: torch.Tensor) -> int:
    # Granite Speech's count check prints its features' shape[0].
    return pooled.shape[0]


def _granite_speech(family: str, model_type: str, model_class: str) -> MergeSpec:
    """Granite Speech and Granite Speech Plus (the same forward; only their encoders
    differ): audio from :func:`granite_speech_audio_features`."""
    return MergeSpec(
        family=family,
        model_type=model_type,
        model_class=model_class,
        modalities=(
            Modality(
                kind="audio",
                placeholder_fields=AUDIO_TOKEN,
                trigger="input_features",
                consumed=("input_features", "input_features_mask"),
                feature_function=granite_speech_audio_features,
                output_fields=(("audio_hidden_states", "encoder_output"),),
                count_mismatch_features=_leading_dimension,
            ),
        ),
        encoder_outputs_input=None,  # its forward takes no mm_encoder_outputs (5.17 to 5.25)
    )


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


def _idefics3(family: str, model_type: str, model_class: str) -> MergeSpec:
    """Idefics3 and SmolVLM: images (crops and a global view, padded per prompt with
    all-zero images, which the feature method drops) from
    ``get_image_features(pixel_values, pixel_attention_mask)``."""
    return MergeSpec(
        family=family,
        model_type=model_type,
        model_class=model_class,
        modalities=(
            _llava_like_image(
                positional=("pixel_values", "pixel_attention_mask"),
                keywords=(),
                consumed=("pixel_values", "pixel_attention_mask"),
            ),
        ),
        # 5.17 took precomputed features as image_hidden_states (5.25's SmolVLM still takes
        # them as a tensor in mm_encoder_outputs: not a dict, so the original runs).
        original_inputs=("image_hidden_states",),
    )


def _llava_next_video_printed_features(pooled) -> int:
    # The forward's count check prints cat([f.flatten(0, 1) for f in pooled]).shape[0].
    return sum(f.shape[0] * f.shape[1] for f in pooled)


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


def gemma3n_audio_features(model, call: Call) -> Features | None:
    """Gemma 3n's audio rows as ``Gemma3nModel.forward`` merges them: its own
    ``get_audio_features(input_features, ~input_features_mask)``, the rows past each clip's
    end (the encoder's ``audio_mel_mask``) replaced by the embedding of the last audio id
    (``vocab_size - 1``), and each clip padded with that embedding to
    ``audio_soft_tokens_per_image`` rows (its processor writes that many placeholders per
    clip, whatever its length). None (the original runs) without ``input_features_mask``:
    the forward then merges no audio."""
    mask = call.get("input_features_mask")
    if mask is None:
        return None
    outputs = model.get_audio_features(call.get("input_features"), ~mask, return_dict=True)
    features = outputs.pooler_output
    # The forward's (1, 1) id, filled on the device (it copies it from the host).
    padding_id = torch.full((1, 1), model.vocab_size - 1, dtype=torch.long, device=features.device)
    padding = model.embed_audio(input_ids=padding_id)
    features = torch.where(outputs.audio_mel_mask.unsqueeze(-1), padding, features)
    clips, length, width = features.shape
    extra = padding.expand(clips, model.config.audio_soft_tokens_per_image - length, width)
    padded = torch.cat((features, extra), dim=1)  # the forward's tensor: 5.17's output field holds it
    return Features(rows=[padded.reshape(-1, width)], encoder_output=outputs, pooled=padded)


def gemma3n_per_layer_inputs(model, modalities, features: list[Features], input_ids: torch.Tensor) -> dict:
    """``per_layer_inputs`` as ``Gemma3nModel.forward`` looks them up from ``input_ids``, the
    ids outside the per-layer table (the image and audio ranges) as id 0: 5.25's
    ``get_per_layer_inputs`` replaces them itself, 5.17's forward before calling it; done here
    for both (the same ids either way)."""
    text_model = model.language_model
    in_table = torch.logical_and(input_ids >= 0, input_ids < text_model.config.vocab_size_per_layer_input)
    return {"per_layer_inputs": text_model.get_per_layer_inputs(torch.where(in_table, input_ids, 0))}


# Gemma 4 embeds every placeholder (of its three kinds, in the call or not) as its text pad id.
_GEMMA4_PLACEHOLDERS = ("image_token_id", "video_token_id", "audio_token_id")
_GEMMA4_LOOKUP_ID = "text_config.pad_token_id"


def gemma4_video_features(model, call: Call) -> Features:
    """Gemma 4's video rows from its own ``get_video_features(pixel_values_videos,
    video_position_ids)``, given ``num_frames_per_video`` where the call carries it: 5.25's
    forward passes it (without it, the feature method raises its own error, as it does
    unpatched); 5.17's forward has no such argument and passes none (its feature method
    flattens ``(videos, frames)`` itself)."""
    frames = call.get("num_frames_per_video")
    keywords = {} if frames is None else {"num_frames_per_video": frames}
    outputs = model.get_video_features(call.get("pixel_values_videos"), call.get("video_position_ids"),
                                       return_dict=True, **keywords)  # fmt: skip
    return encoder_output_features(outputs)


def gemma4_audio_features(model, call: Call) -> Features | None:
    """Gemma 4's (and Gemma 4 Unified's) audio rows as its forward merges them: its own
    ``get_audio_features(input_features, input_features_mask)``, the rows its output's
    ``attention_mask`` marks valid, in order (one boolean select: the forward's, and its one
    host sync). None (the original runs) without ``input_features_mask``: the forward then
    merges no audio."""
    mask = call.get("input_features_mask")
    if mask is None:
        return None
    outputs = model.get_audio_features(call.get("input_features"), mask, return_dict=True)
    features = outputs.pooler_output
    valid = features[outputs.attention_mask.to(features.device)]
    return Features(rows=[valid], encoder_output=outputs, pooled=valid)


def _rows_times_width(pooled: torch.Tensor) -> int:
    # Gemma 4's audio count check prints its (N, D) features' shape[0] * shape[1].
    return pooled.shape[0] * pooled.shape[1]


def gemma4_per_layer_inputs(model, modalities, features: list[Features], input_ids: torch.Tensor) -> dict:
    """``per_layer_inputs`` as ``Gemma4Model.forward`` looks them up: from ``input_ids`` with
    every placeholder (image, video, audio; of the kinds in the call or not) as the text pad
    id; none where the text model has no per-layer inputs (the forward then computes none)."""
    if not model.config.get_text_config().hidden_size_per_layer_input:
        return {}
    ids = [i for i in (getattr(model.config, field, None) for field in _GEMMA4_PLACEHOLDERS) if i is not None]
    lookup = placeholders_looked_up_as(input_ids, ids, config_value(model.config, _GEMMA4_LOOKUP_ID))
    return {"per_layer_inputs": model.language_model.get_per_layer_inputs(lookup, None)}


def _gemma4(family: str, model_type: str, model_class: str, *, per_layer_inputs: bool) -> MergeSpec:
    """Gemma 4 and Gemma 4 Unified (the same merge; only the former has per-layer inputs)."""
    return MergeSpec(
        family=family,
        model_type=model_type,
        model_class=model_class,
        modalities=(
            # In the order its forward merges and checks them: images, videos, audio.
            _llava_like_image(positional=("pixel_values", "image_position_ids"), keywords=(),
                              consumed=("pixel_values", "image_position_ids")),  # fmt: skip
            Modality(
                kind="video",
                placeholder_fields=("video_token_id",),
                trigger="pixel_values_videos",
                consumed=("pixel_values_videos", "video_position_ids", "num_frames_per_video"),
                feature_function=gemma4_video_features,  # (its output carries no video features)
            ),
            Modality(
                kind="audio",
                placeholder_fields=("audio_token_id",),
                trigger="input_features",
                consumed=("input_features", "input_features_mask"),
                feature_function=gemma4_audio_features,
                output_fields=(("audio_outputs", "encoder_output"), ("audio_hidden_states", "features")),
                count_mismatch_features=_rows_times_width,
            ),
        ),
        # Given beside input_ids, the forward raises: it runs.
        original_inputs=("per_layer_inputs",) if per_layer_inputs else (),
        needs_original=_omni_needs_original,  # its audio too comes from input_features only
        placeholders_looked_up_as=_GEMMA4_LOOKUP_ID,
        forward_inputs=gemma4_per_layer_inputs if per_layer_inputs else None,
    )


# PaddleOCR-VL's count check, word for word: its feature count is rows x width (the
# numel of its (N, D) features).
_PADDLEOCR_VL_COUNT_MISMATCH = (
    "Image features and image tokens do not match: tokens: {tokens}, features {feature_values}"
)

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
        family="LLaVA-NeXT-Video",
        model_type="llava_next_video",
        model_class="LlavaNextVideoModel",
        modalities=(
            _llava_like_image(
                positional=("pixel_values", "image_sizes"),
                keywords=("vision_feature_layer", "vision_feature_select_strategy"),
                consumed=("pixel_values", "image_sizes"),
            ),
            Modality(
                kind="video",
                placeholder_fields=VIDEO_TOKEN,
                trigger="pixel_values_videos",
                consumed=("pixel_values_videos",),
                feature_method="get_video_features",
                positional=("pixel_values_videos",),
                keywords=("vision_feature_layer", "vision_feature_select_strategy"),
                output_fields=VIDEO_OUTPUTS,
                count_mismatch_features=_llava_next_video_printed_features,
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
    _glm4v("GLM-4.6V", "glm46v", "Glm46VModel"),
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
        family="Gemma 3n",
        model_type="gemma3n",
        model_class="Gemma3nModel",
        modalities=(
            # In the order its forward merges and checks them: images, then audio.
            _llava_like_image(positional=("pixel_values",), keywords=(), consumed=("pixel_values",)),
            Modality(
                kind="audio",
                placeholder_fields=("audio_token_id",),
                trigger="input_features",
                consumed=("input_features", "input_features_mask"),
                feature_function=gemma3n_audio_features,
                output_fields=(("audio_outputs", "encoder_output"), ("audio_hidden_states", "features")),
            ),
        ),
        # Given beside input_ids, the forward raises (5.25; 5.17 takes none): it runs.
        original_inputs=("per_layer_inputs",),
        needs_original=_omni_needs_original,  # its audio too comes from input_features only
        token_range_embedders=("embed_vision", "embed_audio"),
        language_model_inputs=LanguageModelInputs("language_model", "gemma3n_text", "Gemma3nTextModel",
                                                  gemma3n_per_layer_inputs),  # fmt: skip
    ),
    _gemma4("Gemma 4", "gemma4", "Gemma4Model", per_layer_inputs=True),
    _gemma4("Gemma 4 Unified", "gemma4_unified", "Gemma4UnifiedModel", per_layer_inputs=False),
    _idefics3("Idefics3 / SmolVLM", "idefics3", "Idefics3Model"),
    _idefics3("SmolVLM2", "smolvlm", "SmolVLMModel"),
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
        family="PerceptionLM",
        model_type="perception_lm",
        model_class="PerceptionLMModel",
        modalities=(
            _llava_like_image(positional=("pixel_values",), keywords=(), consumed=("pixel_values",)),
            # Frames are tiles to it: the forward calls get_image_features(pixel_values=pixel_values_videos).
            Modality(
                kind="video",
                placeholder_fields=VIDEO_TOKEN,
                trigger="pixel_values_videos",
                consumed=("pixel_values_videos",),
                feature_method="get_image_features",
                positional=("pixel_values_videos",),
                # Up to 5.23 the output carries the cast video features; from 5.24 it leaves them None.
                output_fields=(("video_hidden_states", "features", "<5.24"),),
            ),
        ),
        # generate encodes the images only (there is no get_video_features) and passes the
        # videos raw beside them; the forward encodes what mm_encoder_outputs lacks.
        pixels_beside_encoder_outputs=True,
    ),
    MergeSpec(
        family="PaddleOCR-VL",
        model_type="paddleocr_vl",
        model_class="PaddleOCRVLModel",
        modalities=_qwen2_vl_modalities()[:1],  # images only
        keeps_input_ids=True,
        count_mismatch_message=_PADDLEOCR_VL_COUNT_MISMATCH,
    ),
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
    _granite_speech("Granite Speech", "granite_speech", "GraniteSpeechModel"),
    _granite_speech("Granite Speech Plus", "granite_speech_plus", "GraniteSpeechPlusModel"),
    MergeSpec(
        family="Ovis2",
        model_type="ovis2",
        model_class="Ovis2Model",
        modalities=(
            Modality(
                kind="image",
                placeholder_fields=IMAGE_TOKEN,
                trigger="pixel_values",
                consumed=("pixel_values",),
                feature_method="get_image_features",
                keywords=("pixel_values",),
                output_fields=IMAGE_OUTPUTS,
                broadcast_field="visual_indicator_features",
                broadcast_ids_field="visual_indicator_token_ids",
            ),
        ),
    ),
)
