"""The Omni thinkers' merge (integrations/hf_specs.py): audio, images and videos merged into
the text by ONE call of ``mmkernels.ops.merge_multimodal_embeddings``, on the zoo's tiny
Qwen2.5-Omni and Qwen3-Omni-MoE thinkers (Triton's interpreter on the CPU).

What tests/test_patch_hf.py checks for every spec family (fp32 outputs bit-identical with
the count check on and off, greedy tokens, ``save_pretrained``, ``unpatch``, host syncs,
a count mismatch) runs on this one too; here what is the Omni thinker's own: the three
media in one op call without a concatenation, in float64 as well; a call with fewer media;
audio interleaved with a video (``use_audio_in_video=True``); encoder outputs passed by
the caller; the calls that run the original forward and why; the audio count the forward
never checks; towers in different dtypes; and specs that merge the audio wrongly, which
must change the logits (so the bit-identical checks can fail).
"""

import dataclasses

import pytest
import torch

transformers = pytest.importorskip("transformers")

from mmkernels.integrations.engine import ORIGINALS_ATTR  # noqa: E402
from mmkernels.integrations.hf_merge import Call, Features  # noqa: E402
from mmkernels.integrations.hf_specs import MERGE_SPECS  # noqa: E402
from zoo_helpers import assert_same_output, build_or_skip, patched, patched_by_spec, unpatched_and_patched  # noqa: E402

FAMILIES = ["qwen2_5_omni_thinker", "qwen3_omni_moe_thinker"]
NEW_TOKENS = 4


def ids_of(tiny, *kinds) -> list[int]:
    return [tiny.placeholder_ids[kind] for kind in kinds]


@pytest.fixture(scope="module", params=FAMILIES)
def family(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def omni(family):
    return build_or_skip(family)


def spec_of(family: str):
    (found,) = [s for s in MERGE_SPECS if s.model_type == family]
    return found


# --------------------------------------------------------------------------------------
# Merged: one op call for every medium present


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_audio_images_and_video_merge_in_one_op_call(family, merge_spy, dtype):
    """Sample 1 holds two clips, an image and a video, sample 0 a clip and an image: one op
    call takes every kind, each kind's rows as the towers gave them (a list per image and
    per video, the audio tower's one tensor), and the output is bit-identical."""
    tiny = build_or_skip(family, dtype=dtype)
    got, want = unpatched_and_patched(tiny.model, tiny.inputs)
    assert merge_spy.calls == 1
    assert merge_spy.placeholder_ids() == ids_of(tiny, "audio", "image", "video")
    audio, images, videos = merge_spy.features()
    assert [len(audio), len(images), len(videos)] == [1, len(tiny.inputs["image_grid_thw"]), 1]
    ids = tiny.inputs["input_ids"]
    for kind, rows in zip(("audio", "image", "video"), (audio, images, videos)):
        assert sum(r.shape[0] for r in rows) == int((ids == tiny.placeholder_ids[kind]).sum()), kind
    assert got.logits.dtype == dtype
    assert_same_output(got, want)
    # The inner model's own output too: it carries the image encoder's output, and leaves
    # the video's and the audio's fields empty as the forward does.
    got, want = unpatched_and_patched(tiny.model.model, tiny.inputs)
    assert merge_spy.calls == 2
    assert_same_output(got, want)
    assert got.image_outputs is not None and got.video_outputs is None and got.audio_outputs is None


def test_fewer_media_in_the_call(family, merge_spy):
    """Sample 0 alone (a clip and an image, no video), then the clip alone: the op takes the
    kinds present, and M-RoPE (from the model's own positions code) agrees."""
    tiny = build_or_skip(family, batch=1)
    got, want = unpatched_and_patched(tiny.model, tiny.inputs)
    assert merge_spy.calls == 1 and merge_spy.placeholder_ids() == ids_of(tiny, "audio", "image")
    assert_same_output(got, want)

    audio_tokens = int((tiny.inputs["input_ids"] == tiny.placeholder_ids["audio"]).sum())
    text = f"user : <|audio_bos|>{'<|AUDIO|>' * audio_tokens}<|audio_eos|> what is this sound ? assistant :"
    encoded = tiny.tokenizer([text], return_tensors="pt")
    audio_only = {**encoded, "input_features": tiny.inputs["input_features"],
                  "feature_attention_mask": tiny.inputs["feature_attention_mask"]}  # fmt: skip
    got, want = unpatched_and_patched(tiny.model, audio_only)
    assert merge_spy.calls == 2 and merge_spy.placeholder_ids() == ids_of(tiny, "audio")
    assert_same_output(got, want)


def test_generate_merges_the_prefill_once(omni, merge_spy):
    """generate encodes the images and the video before the prefill (mm_encoder_outputs) and
    passes the audio as input_features: the prefill merges all of them in one call; decode
    steps carry no media."""
    model, inputs = omni.model, omni.inputs
    with torch.no_grad():
        want = model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False)
        with patched(model):
            got = model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False)
    assert merge_spy.calls == 1 and merge_spy.placeholder_ids() == ids_of(omni, "audio", "image", "video")
    assert torch.equal(got, want), f"{got} vs {want}"
    assert all(ORIGINALS_ATTR not in m.__dict__ for m in model.modules())


def test_audio_interleaved_with_a_video(family, merge_spy):
    """use_audio_in_video=True: the processor interleaves a video's tokens with its audio's,
    chunk by chunk of 2 s. Each kind keeps its own placeholder id, filled in order as
    masked_scatter fills it, so the merge is the same; the interleaved M-RoPE positions are
    the model's own (its forward computes them from input_ids, which it keeps)."""
    tiny = build_or_skip(family, batch=1)
    audio_tokens = int((tiny.inputs["input_ids"] == tiny.placeholder_ids["audio"]).sum())
    # A 56x56 video of 3 temporal patches (4 tokens each) at 2 s per patch: its temporal
    # positions are 0, 50, 100 (25 a second), the clip's 0 to its length (under 50). Both
    # processors' layouts (Qwen2.5-Omni's by 2-second chunks, Qwen3-Omni's by position):
    # the video's first patch, the clip, the video's other two patches.
    video = "<|VIDEO|>" * 4
    text = (f"user : <|vision_bos|><|audio_bos|>{video}{'<|AUDIO|>' * audio_tokens}{video}{video}"
            "<|audio_eos|><|vision_eos|> describe the clip . assistant :")  # fmt: skip
    inputs = {
        **tiny.tokenizer([text], return_tensors="pt"),
        "pixel_values_videos": torch.randn(3 * 16, 3 * 2 * 14 * 14, generator=torch.Generator().manual_seed(0)),
        "video_grid_thw": torch.tensor([[3, 4, 4]]),
        "video_second_per_grid": torch.tensor([2.0]),
        "input_features": tiny.inputs["input_features"],
        "feature_attention_mask": tiny.inputs["feature_attention_mask"],
        "use_audio_in_video": True,
    }
    got, want = unpatched_and_patched(tiny.model, inputs)
    assert merge_spy.calls == 1 and merge_spy.placeholder_ids() == ids_of(tiny, "audio", "video")
    assert_same_output(got, want)
    # The positions really interleave: without use_audio_in_video they are others.
    with torch.no_grad():
        plain = tiny.model(**{**inputs, "use_audio_in_video": False})
    assert not torch.equal(plain.logits, want.logits)


def test_encoder_outputs_from_the_caller_are_merged(omni, merge_spy):
    """Images and videos encoded by the caller (mm_encoder_outputs, as generate passes them)
    next to raw audio: merged in one call, and the output carries the caller's image output."""
    model, inputs = omni.model, dict(omni.inputs)
    with torch.no_grad():
        encoded = {
            "image": model.model.get_image_features(inputs.pop("pixel_values"), inputs["image_grid_thw"]),
            "video": model.model.get_video_features(inputs.pop("pixel_values_videos"), inputs["video_grid_thw"]),
        }
    got, want = unpatched_and_patched(model, {**inputs, "mm_encoder_outputs": encoded})
    assert merge_spy.calls == 1 and merge_spy.placeholder_ids() == ids_of(omni, "audio", "image", "video")
    assert_same_output(got, want)
    assert got.image_outputs is encoded["image"]


# --------------------------------------------------------------------------------------
# The original forward, and why


def test_audio_in_encoder_outputs_runs_the_original(family, omni, merge_spy):
    """The forward takes its audio from input_features only and ignores
    mm_encoder_outputs["audio"]: merging it would change the output, so the original runs."""
    model, inputs = omni.model, dict(omni.inputs)
    with torch.no_grad():
        encoded = {
            "audio": model.model.get_audio_features(inputs.pop("input_features"), inputs["feature_attention_mask"]),
            "image": model.model.get_image_features(inputs.pop("pixel_values"), inputs["image_grid_thw"]),
            "video": model.model.get_video_features(inputs.pop("pixel_values_videos"), inputs["video_grid_thw"]),
        }
    got, want = unpatched_and_patched(model, {**inputs, "mm_encoder_outputs": encoded})
    assert merge_spy.calls == 0
    assert_same_output(got, want)
    reason = spec_of(family).needs_original(model.model, Call({"mm_encoder_outputs": encoded}, {}))
    assert "ignores" in reason


def test_pixels_beside_encoder_outputs_raise_the_forwards_error(omni, merge_spy):
    """Pixels next to mm_encoder_outputs (even an empty dict, or one holding nothing): the
    forward raises; the patched model runs it, so the same error comes."""
    model, inputs = omni.model, omni.inputs
    for encoded in ({}, {"video": None}):
        with torch.no_grad(), pytest.raises(ValueError) as unpatched:
            model(**inputs, mm_encoder_outputs=encoded)
        with torch.no_grad(), patched(model), pytest.raises(ValueError) as got:
            model(**inputs, mm_encoder_outputs=encoded)
        assert str(got.value) == str(unpatched.value)
    assert merge_spy.calls == 0


def test_an_audio_count_mismatch_raises_where_the_forward_shifts_rows(family, merge_spy):
    """The forward never checks its audio count: with a placeholder missing, masked_scatter
    fills the ones it finds from the first rows and the last row is lost, silently. The
    patched merge checks every kind in its one host sync and raises, in the words Hugging
    Face uses for the kinds it checks (the one documented difference from the unpatched
    model: an error where it merged wrongly)."""
    tiny = build_or_skip(family)
    ids = tiny.inputs["input_ids"].clone()
    audio = tiny.placeholder_ids["audio"]
    row, col = (ids == audio).nonzero()[-1].tolist()
    ids[row, col] = tiny.tokenizer.convert_tokens_to_ids("the")
    inputs = {**tiny.inputs, "input_ids": ids}
    tokens = int((ids == audio).sum())
    with torch.no_grad():
        tiny.model(**inputs)  # unpatched: no error (a silent shift)
        with patched(tiny.model):
            with pytest.raises(ValueError, match=rf"^Audio features and audio tokens do not match, "
                                                 rf"tokens: {tokens}, features: {tokens + 1}$"):  # fmt: skip
                tiny.model(**inputs)
    assert merge_spy.calls == 1


def test_towers_in_different_dtypes(family, merge_spy):
    """The audio tower in float64 beside a float32 vision tower (a checkpoint may keep one
    tower in higher precision): the forward casts each kind's features to the embeddings'
    dtype; the patched merge does the same, bit for bit."""
    tiny = build_or_skip(family)
    tiny.model.model.audio_tower.double()
    got, want = unpatched_and_patched(tiny.model, tiny.inputs)
    assert merge_spy.calls == 1
    assert_same_output(got, want)


# --------------------------------------------------------------------------------------
# The checks can fail: a spec that merges the audio wrongly changes the logits


def _audio_rows_reversed(model, call):
    outputs = model.get_audio_features(call.get("input_features"), call.get("feature_attention_mask"))
    return Features(rows=[outputs.last_hidden_state.flip(0)])


def _audio_rows_left_as_text(model, call):
    # What a spec that forgot the audio would merge: the placeholder token's own embedding.
    count = int((call.get("input_ids") == model.config.audio_token_id).sum())
    token = torch.tensor([model.config.audio_token_id])
    return Features(rows=[model.get_input_embeddings()(token).expand(count, -1)])


@pytest.mark.parametrize("wrong_audio", [_audio_rows_reversed, _audio_rows_left_as_text],
                         ids=["audio-rows-reversed", "audio-not-merged"])  # fmt: skip
def test_a_wrong_audio_merge_changes_the_logits(family, omni, merge_spy, wrong_audio):
    """The spec's audio swapped for a wrong one (the clips' rows reversed, or none merged):
    the logits change, so the bit-identical checks above would catch a spec that merged the
    audio wrongly or not at all."""
    model, inputs = omni.model, omni.inputs
    right = spec_of(family)
    audio, *visual = right.modalities
    wrong = dataclasses.replace(right, modalities=(
        dataclasses.replace(audio, feature_method=None, feature_function=wrong_audio),
        *visual,
    ))  # fmt: skip
    with torch.no_grad():
        want = model(**inputs).logits
        with patched_by_spec(model, wrong):
            got = model(**inputs).logits
    assert merge_spy.calls == 1
    assert not torch.equal(got, want)
    # Only the rows after the audio can change: the text before the first clip is the same.
    first = int((inputs["input_ids"][1] == omni.placeholder_ids["audio"]).nonzero()[0])
    assert torch.equal(got[1, :first], want[1, :first])
