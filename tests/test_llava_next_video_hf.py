"""LLaVA-NeXT-Video's merge (integrations/hf_specs.py): anyres images and pooled video
frames in ONE call of ``mmkernels.ops.merge_multimodal_embeddings``, on the zoo's tiny
LLaVA-NeXT-Video (Triton's interpreter on the CPU).

What tests/test_patch_hf.py checks for every spec family (bit-identical outputs with the
count check on and off, greedy tokens, ``save_pretrained``, ``unpatch``, host syncs, an image
count mismatch) runs on this one too; here what is its own: both kinds in one op call, a
video alone, the forward's own words for each kind's count mismatch (its video count is
printed as rows x width where its pooler output is one tensor), and the feature call's
keywords, which a spec that drops one gets wrong (so the bit-identical checks can fail).
"""

import dataclasses

import pytest
import torch

transformers = pytest.importorskip("transformers")

import mmkernels  # noqa: E402
from mmkernels.integrations.engine import PatchOptions, patch_model  # noqa: E402
from mmkernels.integrations.hf_merge import MergeRule  # noqa: E402
from mmkernels.integrations.hf_specs import MERGE_SPECS  # noqa: E402
from zoo_helpers import assert_same_output, build_or_skip, patched, unpatched_and_patched  # noqa: E402


@pytest.fixture(scope="module")
def tiny():
    return build_or_skip("llava_next_video")


def spec():
    (found,) = [s for s in MERGE_SPECS if s.model_type == "llava_next_video"]
    return found


def patched_by(model, merge_spec):
    return patch_model(model, (MergeRule(merge_spec),), kernels=("merge",), options=PatchOptions())


def without_one(tiny, kind: str) -> dict:
    """The inputs with the first placeholder of ``kind`` made a text token."""
    ids = tiny.inputs["input_ids"].clone()
    row, col = (ids == tiny.placeholder_ids[kind]).nonzero()[0].tolist()
    ids[row, col] = tiny.tokenizer.convert_tokens_to_ids("the")
    return {**tiny.inputs, "input_ids": ids}


def test_images_and_video_in_one_op_call(tiny, merge_spy):
    got, want = unpatched_and_patched(tiny.model, tiny.inputs)
    assert_same_output(got, want)
    assert merge_spy.calls == 1
    assert merge_spy.placeholder_ids() == [tiny.placeholder_ids["image"], tiny.placeholder_ids["video"]]
    ids = tiny.inputs["input_ids"]
    for rows, placeholder in zip(merge_spy.features(), merge_spy.placeholder_ids()):
        assert sum(r.shape[0] for r in rows) == int((ids == placeholder).sum()) > 0


def test_video_alone(tiny, merge_spy):
    """A prompt with a video and no image (the image placeholders made text, the image
    inputs dropped): merged, bit-identical."""
    ids = tiny.inputs["input_ids"]
    inputs = {name: value for name, value in tiny.inputs.items() if name not in ("pixel_values", "image_sizes")}
    text = tiny.tokenizer.convert_tokens_to_ids("a")
    inputs["input_ids"] = ids.masked_fill(ids == tiny.placeholder_ids["image"], text)
    got, want = unpatched_and_patched(tiny.model, inputs)
    assert_same_output(got, want)
    assert merge_spy.calls == 1
    assert merge_spy.placeholder_ids() == [tiny.placeholder_ids["video"]]


@pytest.mark.parametrize("kind", ["image", "video"])
def test_count_mismatch_in_the_forwards_words(tiny, merge_spy, kind):
    """One placeholder fewer: the patched forward raises the unpatched forward's ValueError,
    word for word and number for number (its video count is the rows on 5.17, rows x width
    on 5.25)."""
    inputs = without_one(tiny, kind)
    with torch.no_grad():
        with pytest.raises(ValueError) as unpatched:
            tiny.model(**inputs)
        with patched(tiny.model), pytest.raises(ValueError) as got:
            tiny.model(**inputs)
    assert merge_spy.calls == 1
    assert str(got.value) == str(unpatched.value)
    assert str(got.value).startswith(f"{kind.capitalize()} features and {kind} tokens do not match")


def test_the_video_count_words_need_the_printed_features(tiny):
    """Without ``count_mismatch_features`` the video mismatch prints the row count: the
    forward's words exactly where its pooler output is a tuple of per-video tensors (5.17),
    and not where it is one (videos, rows, D) tensor (5.25, rows x width)."""
    image, video = spec().modalities
    plain = dataclasses.replace(spec(), modalities=(image, dataclasses.replace(video, count_mismatch_features=None)))
    inputs = without_one(tiny, "video")
    model = tiny.model
    with torch.no_grad():
        with pytest.raises(ValueError) as unpatched:
            model(**inputs)
        pooled = model.model.get_video_features(tiny.inputs["pixel_values_videos"], return_dict=True).pooler_output
        patched_by(model, plain)
        try:
            with pytest.raises(ValueError) as got:
                model(**inputs)
        finally:
            mmkernels.unpatch(model)
    one_tensor = isinstance(pooled, torch.Tensor)
    assert (str(got.value) == str(unpatched.value)) == (not one_tensor), (str(got.value), str(unpatched.value))


def test_feature_keywords_reach_both_feature_methods(tiny, merge_spy):
    """A call with a non-default ``vision_feature_layer``: merged bit-identical (both
    feature methods take it); a spec whose video call drops it encodes the frames from the
    config's layer, and the logits change from the video's placeholders on (the text before
    them is the same)."""
    inputs = {**tiny.inputs, "vision_feature_layer": -1}
    got, want = unpatched_and_patched(tiny.model, inputs)
    assert_same_output(got, want)
    assert merge_spy.calls == 1

    image, video = spec().modalities
    wrong = dataclasses.replace(
        spec(), modalities=(image, dataclasses.replace(video, keywords=("vision_feature_select_strategy",)))
    )
    model = tiny.model
    with torch.no_grad():
        patched_by(model, wrong)
        try:
            wrong_logits = model(**inputs).logits
        finally:
            mmkernels.unpatch(model)
    assert not torch.equal(wrong_logits, want.logits)
    first = int((inputs["input_ids"][0] == tiny.placeholder_ids["video"]).nonzero()[0])
    assert torch.equal(wrong_logits[0, :first], want.logits[0, :first])
