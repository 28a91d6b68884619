"""Gemma 4's merge (integrations/hf_specs.py): images, videos and audio merged into the text
by ONE call of ``mmkernels.ops.merge_multimodal_embeddings``, on the zoo's tiny Gemma 4 and
Gemma 4 Unified (their own processors' inputs, Triton's interpreter on the CPU).

What tests/test_patch_hf.py checks for every spec family (fp32 outputs bit-identical with
the count check on and off, greedy tokens, ``save_pretrained``, ``unpatch``, host syncs,
a count mismatch) runs on this one too; here what is Gemma 4's own: the three media in one
op call, in float64 as well; the text rows the op keeps and the per-layer inputs its text
model gets are the forward's, bit for bit (every placeholder looked up as the pad id, of
the kinds in the call or not); calls with one medium; greedy generation (images and videos
encoded by ``generate``, the audio raw); encoder outputs passed by the caller; the count
errors in the forward's words; the calls that run the original forward; and specs that
merge wrongly, which must change the logits (so the bit-identical checks can fail).
"""

import dataclasses
import inspect

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

import mmkernels  # noqa: E402
import mmkernels.ops  # noqa: E402
from mmkernels.integrations.engine import ORIGINALS_ATTR  # noqa: E402
from mmkernels.integrations.hf_merge import Call, Features  # noqa: E402
from mmkernels.integrations.hf_specs import (MERGE_SPECS, gemma4_audio_features, gemma4_per_layer_inputs,  # noqa: E402
                                             gemma4_video_features)  # fmt: skip
from zoo_helpers import assert_same_output, build_or_skip, patched, patched_by_spec, unpatched_and_patched  # noqa: E402

FAMILIES = ("gemma4", "gemma4_unified")
NEW_TOKENS = 4
SPECS = {s.model_type: s for s in MERGE_SPECS if s.model_type in FAMILIES}
VIDEO_INPUTS = ("pixel_values_videos", "video_position_ids", "num_frames_per_video")


@pytest.fixture(scope="module", params=FAMILIES)
def tiny(request):
    return build_or_skip(request.param)


def has_per_layer_inputs(tiny) -> bool:
    """Gemma 4's text model takes per-layer inputs; Gemma 4 Unified's has none."""
    return SPECS[tiny.family].forward_inputs is not None


def ids_of(tiny, *kinds) -> list[int]:
    return [tiny.placeholder_ids[kind] for kind in kinds]


def takes_encoder_outputs(model) -> bool:
    return "mm_encoder_outputs" in inspect.signature(model.model.forward).parameters


def token_id(tiny, token: str) -> int:
    return tiny.tokenizer.convert_tokens_to_ids(token)


def pad_id(model) -> int:
    return model.config.get_text_config().pad_token_id


def without_video(inputs: dict) -> dict:
    """The call without its video inputs: its video placeholders stay in ``input_ids``."""
    return {name: value for name, value in inputs.items() if name not in VIDEO_INPUTS}


def replaced(ids: torch.Tensor, token: int, by: int) -> torch.Tensor:
    """``ids`` with the last ``token`` replaced by ``by``."""
    ids = ids.clone()
    ids[tuple((ids == token).nonzero()[-1])] = by
    return ids


def raised_unpatched_and_patched(model, inputs, errors=(ValueError,)) -> tuple[str, str]:
    """The error texts of the patched and the unpatched forward on ``inputs``."""
    with torch.no_grad():
        with pytest.raises(errors) as unpatched:
            model(**inputs)
        with patched(model), pytest.raises(errors) as got:
            model(**inputs)
    assert type(got.value) is type(unpatched.value)
    return str(got.value), str(unpatched.value)


def language_model_inputs(model, inputs) -> dict[str, torch.Tensor]:
    """The ``inputs_embeds`` and (Gemma 4) ``per_layer_inputs`` the text model receives."""
    seen = {}

    def record(module, args, kwargs):
        seen.update({name: kwargs[name].clone() for name in ("inputs_embeds", "per_layer_inputs")
                     if kwargs.get(name) is not None})  # fmt: skip

    handle = model.model.language_model.register_forward_pre_hook(record, with_kwargs=True)
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        handle.remove()
    return seen


# --------------------------------------------------------------------------------------
# Merged: one op call for the three media


def test_images_videos_and_audio_merge_in_one_op_call(tiny, merge_spy):
    """Sample 0 holds an image and a clip, sample 1 two clips, an image and a two-frame
    video: one op call takes the three kinds (each image's and each video's rows as the tower
    gave them, the clips' valid rows in one tensor), and the output is bit-identical, the
    inner model's own output too (its image and audio encoder outputs included)."""
    got, want = unpatched_and_patched(tiny.model, tiny.inputs)
    assert merge_spy.calls == 1
    assert merge_spy.placeholder_ids() == ids_of(tiny, "image", "video", "audio")
    images, videos, audio = merge_spy.features()
    ids = tiny.inputs["input_ids"]
    assert [r.shape[0] for r in images] == (ids == tiny.placeholder_ids["image"]).sum(-1).tolist()
    assert [r.shape[0] for r in videos] == [int((ids == tiny.placeholder_ids["video"]).sum())]
    assert [r.shape[0] for r in audio] == [int((ids == tiny.placeholder_ids["audio"]).sum())]
    assert_same_output(got, want)

    got, want = unpatched_and_patched(tiny.model.model, tiny.inputs)
    assert merge_spy.calls == 2
    assert_same_output(got, want)
    if "audio_outputs" in [f.name for f in dataclasses.fields(got)]:  # the encoder outputs (5.24 on)
        assert got.image_outputs is not None and got.audio_outputs is not None
    else:  # the cast features (5.17)
        assert got.image_hidden_states is not None and got.audio_hidden_states.shape[0] == audio[0].shape[0]


@pytest.mark.parametrize("family", FAMILIES)
def test_float64(merge_spy, family):
    """In float64 too, bit-identical, the media in one op call. Gemma 4 without its audio:
    its audio attention computes in float32 (``.float()`` on its projections) but scales by
    its float64 ``per_dim_scale``, and fails on float64 weights, patched or not; the audio
    placeholders then keep the pad embedding, as the forward leaves them."""
    tiny = build_or_skip(family, dtype=torch.float64)
    kinds = ("image", "video") if family == "gemma4" else ("image", "video", "audio")
    inputs = tiny.inputs if "audio" in kinds else {
        k: v for k, v in tiny.inputs.items() if k not in ("input_features", "input_features_mask")
    }  # fmt: skip
    got, want = unpatched_and_patched(tiny.model, inputs)
    assert merge_spy.calls == 1 and merge_spy.placeholder_ids() == ids_of(tiny, *kinds)
    assert got.logits.dtype == torch.float64
    assert_same_output(got, want)


def test_the_text_rows_and_per_layer_inputs_are_the_forwards(tiny, merge_spy):
    """What the text model receives, patched and not, is the same bit for bit: the merged
    embeddings and the per-layer inputs (looked up from the ids with every placeholder as the
    pad id: the forward's, not its text model's own lookup from the raw ids). Gemma 4 Unified
    has no per-layer inputs."""
    model, inputs = tiny.model, tiny.inputs
    want = language_model_inputs(model, inputs)
    with patched(model):
        got = language_model_inputs(model, inputs)
    assert merge_spy.calls == 1
    assert got.keys() == want.keys() == ({"inputs_embeds", "per_layer_inputs"} if has_per_layer_inputs(tiny)
                                         else {"inputs_embeds"})  # fmt: skip
    for name in want:
        assert torch.equal(got[name], want[name]), name
    if not has_per_layer_inputs(tiny):
        return
    with torch.no_grad():
        raw = model.model.language_model.get_per_layer_inputs(inputs["input_ids"], None)
    assert not torch.equal(raw, want["per_layer_inputs"]), "the placeholders' own per-layer rows would do"


def test_placeholders_of_a_kind_the_call_lacks_keep_the_pad_embedding(tiny, merge_spy):
    """The video inputs left out, the video placeholders kept: the forward merges the images
    and the audio and leaves the pad id's embedding at the video placeholders (its lookup
    replaces every placeholder by the pad id); the patched merge does the same in one call."""
    model, inputs = tiny.model, without_video(tiny.inputs)
    got, want = unpatched_and_patched(model, inputs)
    assert merge_spy.calls == 1 and merge_spy.placeholder_ids() == ids_of(tiny, "image", "audio")
    assert_same_output(got, want)
    args, _ = merge_spy.last
    at_video = inputs["input_ids"] == tiny.placeholder_ids["video"]
    assert at_video.any()
    with torch.no_grad():
        pad = model.model.get_input_embeddings()(torch.tensor([pad_id(model)]))[0]
    assert all(torch.equal(row, pad) for row in args[1][at_video])


def _processed(tiny, text: str, **media) -> dict:
    batch = tiny.processor(text=[text], padding=True, return_tensors="pt", **media)
    return {name: value for name, value in batch.items() if isinstance(value, torch.Tensor)}


def test_one_medium_in_the_call(tiny, merge_spy):
    """An image alone, a video alone, a clip alone (each through the processor): the op takes
    the kind present, and the other kinds' ids are in no placeholder."""
    from PIL import Image

    rng = np.random.default_rng(1)
    calls = {
        "image": _processed(tiny, "user : <|image|> describe it . assistant :",
                            images=[[Image.fromarray(rng.integers(0, 256, (50, 40, 3), dtype=np.uint8))]]),
        "video": _processed(tiny, "user : <|video|> describe it . assistant :",
                            videos=[rng.integers(0, 256, (3, 40, 60, 3), dtype=np.uint8)]),
        "audio": _processed(tiny, "user : <|audio|> describe it . assistant :",
                            audio=[(0.1 * rng.standard_normal(6000)).astype(np.float32)], sampling_rate=16000),
    }  # fmt: skip
    for kind, call in calls.items():
        merge_spy.reset()
        got, want = unpatched_and_patched(tiny.model, call)
        assert merge_spy.calls == 1 and merge_spy.placeholder_ids() == ids_of(tiny, kind), kind
        assert_same_output(got, want)


def test_generate_merges_the_prefill_once(tiny, merge_spy):
    """generate encodes the images and the video before the prefill (mm_encoder_outputs, from
    5.18) and passes the audio raw: the prefill merges the three in one call; decode steps
    carry no media. The same greedy tokens; unpatch leaves no trace."""
    model, inputs = tiny.model, tiny.inputs
    with torch.no_grad():
        want = model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False)
        with patched(model):
            got = model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False)
    assert merge_spy.calls == 1 and merge_spy.placeholder_ids() == ids_of(tiny, "image", "video", "audio")
    assert torch.equal(got, want), f"{got} vs {want}"
    assert all(ORIGINALS_ATTR not in m.__dict__ for m in model.modules())


def test_unpatch_restores_the_original_forward(tiny, merge_spy):
    """One replaced forward (the inner model's: the per-layer inputs go to its own forward,
    not its text model's), back to the class's after unpatch; the model merges itself again."""
    model, inputs = tiny.model, tiny.inputs
    with torch.no_grad():
        want = model(**inputs)
        report = mmkernels.patch(model, kernels=["merge"])
        assert [(r.module_path, r.class_name) for r in report.replaced] == [("model", tiny.inner_model_class)]
        model(**inputs)
        mmkernels.unpatch(model)
        assert merge_spy.calls == 1
        assert "forward" not in model.model.__dict__ and ORIGINALS_ATTR not in model.model.__dict__
        assert model.model.forward.__func__ is type(model.model).forward
        assert_same_output(model(**inputs), want)
    assert merge_spy.calls == 1


def test_encoder_outputs_from_the_caller_are_merged(tiny, merge_spy):
    """Images and the video encoded by the caller (mm_encoder_outputs, as generate passes
    them) next to raw audio: merged in one call; the output carries the caller's image output."""
    model, inputs = tiny.model, dict(tiny.inputs)
    if not takes_encoder_outputs(model):
        pytest.skip(f"transformers {transformers.__version__}'s forward takes no mm_encoder_outputs")
    with torch.no_grad():
        encoded = {
            "image": model.model.get_image_features(inputs.pop("pixel_values"), inputs.pop("image_position_ids")),
            "video": model.model.get_video_features(inputs.pop("pixel_values_videos"), inputs.pop("video_position_ids"),
                                                    num_frames_per_video=inputs.pop("num_frames_per_video")),
        }  # fmt: skip
    got, want = unpatched_and_patched(model, {**inputs, "mm_encoder_outputs": encoded})
    assert merge_spy.calls == 1 and merge_spy.placeholder_ids() == ids_of(tiny, "image", "video", "audio")
    assert_same_output(got, want)
    assert got.image_outputs is encoded["image"]


# --------------------------------------------------------------------------------------
# Count errors in the forward's words


@pytest.mark.parametrize("dropped", [("image",), ("video",), ("audio",), ("video", "audio")], ids="+".join)
def test_a_count_mismatch_raises_the_forwards_error(tiny, merge_spy, dropped):
    """One placeholder fewer of a kind (or of two: the forward checks images, videos, then
    audio): the patched merge raises the forward's ValueError, word for word and count for
    count (the audio's feature count printed as rows x width, as its forward prints it)."""
    ids = tiny.inputs["input_ids"]
    for kind in dropped:
        ids = replaced(ids, tiny.placeholder_ids[kind], token_id(tiny, "the"))
    got, want = raised_unpatched_and_patched(tiny.model, {**tiny.inputs, "input_ids": ids})
    assert got == want
    kind = dropped[0]
    assert want.startswith(f"{kind.capitalize()} features and {kind} tokens do not match"), want
    assert merge_spy.calls == 1


# --------------------------------------------------------------------------------------
# The original forward, and why


def test_audio_without_its_mask_runs_the_original(tiny, merge_spy):
    """input_features without input_features_mask: the forward merges no audio (its
    placeholders keep the pad embedding), so the original runs: the same output, or where
    the forward fails on it (5.17 reads its never-assigned audio features for its output),
    the same error."""
    inputs = {k: v for k, v in tiny.inputs.items() if k != "input_features_mask"}
    try:
        with torch.no_grad():
            tiny.model(**inputs)
    except UnboundLocalError:
        got, want = raised_unpatched_and_patched(tiny.model, inputs, UnboundLocalError)
        assert got == want
    else:
        got, want = unpatched_and_patched(tiny.model, inputs)
        assert_same_output(got, want)
    assert merge_spy.calls == 0
    assert gemma4_audio_features(tiny.model.model, Call(inputs, {})) is None


def test_audio_in_encoder_outputs_runs_the_original(tiny, merge_spy):
    """The forward takes its audio from input_features only and ignores
    mm_encoder_outputs["audio"]: merging it would change the output, so the original runs."""
    model, inputs = tiny.model, dict(tiny.inputs)
    if not takes_encoder_outputs(model):
        pytest.skip(f"transformers {transformers.__version__}'s forward takes no mm_encoder_outputs")
    with torch.no_grad():
        encoded = {
            "image": model.model.get_image_features(inputs.pop("pixel_values"), inputs.pop("image_position_ids")),
            "audio": model.model.get_audio_features(inputs["input_features"], inputs["input_features_mask"]),
        }
    inputs = without_video(inputs)
    got, want = unpatched_and_patched(model, {**inputs, "mm_encoder_outputs": encoded})
    assert merge_spy.calls == 0
    assert_same_output(got, want)
    assert "ignores" in SPECS[tiny.family].needs_original(model.model, Call({"mm_encoder_outputs": encoded}, {}))


def test_per_layer_inputs_beside_input_ids_raise_the_forwards_error(tiny, merge_spy):
    """per_layer_inputs next to input_ids: the forward refuses them; the patched model runs
    it, so the same error comes. (Gemma 4 Unified's forward has no such argument.)"""
    model, inputs = tiny.model, tiny.inputs
    if not has_per_layer_inputs(tiny):
        pytest.skip(f"{tiny.inner_model_class} takes no per_layer_inputs")
    with torch.no_grad():
        per_layer = gemma4_per_layer_inputs(model.model, (), [], inputs["input_ids"])["per_layer_inputs"]
    got, want = raised_unpatched_and_patched(model.model, {**inputs, "per_layer_inputs": per_layer})
    assert got == want and "per_layer_inputs" in want
    assert merge_spy.calls == 0


def test_video_without_its_frame_counts_raises_the_feature_methods_error(tiny, merge_spy):
    """pixel_values_videos without num_frames_per_video (which 5.25's feature method needs to
    split the frames per video): the patched model calls the same method the same way, so the
    same error comes, before any merge."""
    model = tiny.model
    if "num_frames_per_video" not in inspect.signature(model.model.forward).parameters:
        pytest.skip(f"transformers {transformers.__version__}'s forward takes no num_frames_per_video")
    inputs = {k: v for k, v in tiny.inputs.items() if k != "num_frames_per_video"}
    got, want = raised_unpatched_and_patched(model, inputs)
    assert got == want and "num_frames_per_video" in want
    assert merge_spy.calls == 0


# --------------------------------------------------------------------------------------
# The checks can fail: a spec that merges wrongly changes the logits


def _images_swapped(model, call):
    outputs = model.get_image_features(call.get("pixel_values"), call.get("image_position_ids"), return_dict=True)
    return Features(rows=list(reversed(outputs.pooler_output)), encoder_output=outputs, pooled=outputs.pooler_output)


def _video_frames_swapped(model, call):
    found = gemma4_video_features(model, call)
    (rows,) = found.rows  # one video: its two frames' rows
    return dataclasses.replace(found, rows=[rows.roll(rows.shape[0] // 2, dims=0)])


def _audio_clips_reversed(model, call):
    found = gemma4_audio_features(model, call)
    return dataclasses.replace(found, rows=[found.rows[0].flip(0)])


def _per_layer_inputs_from_the_raw_ids(model, modalities, features, input_ids):
    return {"per_layer_inputs": model.language_model.get_per_layer_inputs(input_ids, None)}


def _with_kind(spec, kind: str, **changes):
    return dataclasses.replace(spec, modalities=tuple(
        dataclasses.replace(m, **changes) if m.kind == kind else m for m in spec.modalities
    ))  # fmt: skip


# (the wrong spec, and whether the call keeps its video inputs)
WRONG_SPECS = {
    # The two images' rows in reverse order (sample 1's image rows in sample 0, and back).
    "images-swapped": (lambda spec: _with_kind(spec, "image", feature_method=None, feature_function=_images_swapped),
                       True),
    # The video's two frames in reverse order.
    "video-frames-swapped": (lambda spec: _with_kind(spec, "video", feature_function=_video_frames_swapped), True),
    # The audio rows in reverse order.
    "audio-reversed": (lambda spec: _with_kind(spec, "audio", feature_function=_audio_clips_reversed), True),
    # The per-layer inputs looked up from the raw ids (the placeholders' own rows).
    "per-layer-inputs-from-raw-ids": (lambda spec: dataclasses.replace(
        spec, forward_inputs=_per_layer_inputs_from_the_raw_ids), True),
    # The placeholders of the kind the call lacks (its videos) embedded as their own id.
    "absent-placeholders-as-their-own-id": (lambda spec: dataclasses.replace(spec, placeholders_looked_up_as=None),
                                            False),
}  # fmt: skip


@pytest.mark.parametrize("wrong", list(WRONG_SPECS))
def test_a_wrong_merge_changes_the_logits(tiny, merge_spy, wrong):
    """The spec changed in one point: the logits change, so the bit-identical checks above
    would catch a spec that merged that point wrongly."""
    make, with_video = WRONG_SPECS[wrong]
    spec = SPECS[tiny.family]
    if wrong == "per-layer-inputs-from-raw-ids" and not has_per_layer_inputs(tiny):
        pytest.skip(f"{tiny.inner_model_class} takes no per-layer inputs")
    model, inputs = tiny.model, tiny.inputs if with_video else without_video(tiny.inputs)
    with torch.no_grad():
        want = model(**inputs).logits
        with patched_by_spec(model, make(spec)) as report:
            assert [r.module_path for r in report.replaced] == ["model"]
            got = model(**inputs).logits
    assert merge_spy.calls == 1
    assert not torch.equal(got, want)
