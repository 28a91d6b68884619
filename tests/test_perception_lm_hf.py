"""PerceptionLM's merge (integrations/hf_specs.py): images (a thumbnail and tiles each) and
video frames, both encoded by the model's own ``get_image_features``, merged into the text
by ONE call of ``mmkernels.ops.merge_multimodal_embeddings``, on the zoo's tiny PerceptionLM
(a timm Perception Encoder tower; Triton's interpreter on the CPU).

What tests/test_patch_hf.py checks for every spec family (fp32 outputs bit-identical with
the count check on and off, greedy tokens, ``save_pretrained``, ``unpatch``, host syncs,
a count mismatch) runs on this one too; here what is PerceptionLM's own: both kinds in one
op call from the one feature method, in float64 as well, and the output fields each
version fills (5.17 to 5.23: both kinds' features; from 5.24: the image encoder's output,
``video_hidden_states`` left None); calls with one kind; generate; encoder outputs passed
by the caller; the count error in the forward's words, per kind; ``unpatch``; every kernel
patched; and specs that merge wrongly, which must change the logits (so the bit-identical
checks can fail).
"""

import dataclasses
import inspect

import pytest
import torch

transformers = pytest.importorskip("transformers")

import mmkernels  # noqa: E402
import mmkernels.ops  # noqa: E402
from mmkernels.integrations.engine import ORIGINALS_ATTR  # noqa: E402
from mmkernels.integrations.hf_merge import Features, _version_covered  # noqa: E402
from mmkernels.integrations.hf_merge_generic import derive_merge_spec  # noqa: E402
from mmkernels.integrations.hf_specs import MERGE_SPECS  # noqa: E402
from zoo_helpers import assert_same_output, build_or_skip, patched, patched_by_spec, unpatched_and_patched  # noqa: E402

FAMILY = "perception_lm"
NEW_TOKENS = 4
(SPEC,) = [s for s in MERGE_SPECS if s.model_type == FAMILY]


@pytest.fixture(scope="module")
def tiny():
    return build_or_skip(FAMILY)


def ids_of(tiny, *kinds) -> list[int]:
    return [tiny.placeholder_ids[kind] for kind in kinds]


def placeholders(inputs, tiny, kind) -> int:
    return int((inputs["input_ids"] == tiny.placeholder_ids[kind]).sum())


def takes_encoder_outputs(model) -> bool:
    return "mm_encoder_outputs" in inspect.signature(model.model.forward).parameters


def raised_unpatched_and_patched(model, inputs) -> tuple[str, str]:
    """The ValueError texts of the patched and the unpatched forward on ``inputs``."""
    with torch.no_grad():
        with pytest.raises(ValueError) as unpatched:
            model(**inputs)
        with patched(model), pytest.raises(ValueError) as got:
            model(**inputs)
    return str(got.value), str(unpatched.value)


# --------------------------------------------------------------------------------------
# Merged: one op call for both kinds


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_images_and_video_merge_in_one_op_call(merge_spy, dtype):
    """Sample 0 holds one image, sample 1 two images and a 3-frame video: every tile of every
    image (3 each: a thumbnail and 2 tiles) and every frame go through get_image_features,
    one op call takes both kinds, and the output is bit-identical."""
    built = build_or_skip(FAMILY, dtype=dtype)
    model, inputs = built.model, built.inputs
    assert inputs["pixel_values"].shape[:2] == (3, 3) and inputs["pixel_values_videos"].shape[:2] == (1, 3)
    got, want = unpatched_and_patched(model, inputs)
    assert merge_spy.calls == 1
    assert merge_spy.placeholder_ids() == ids_of(built, "image", "video")
    images, videos = merge_spy.features()
    # 4 tokens per tile (4x4 patches pooled 2x2): 9 image tiles, 3 frames.
    assert [sum(r.shape[0] for r in images), sum(r.shape[0] for r in videos)] == [9 * 4, 3 * 4]
    for kind, rows in zip(("image", "video"), (images, videos)):
        assert sum(r.shape[0] for r in rows) == placeholders(inputs, built, kind), kind
    assert got.logits.dtype == dtype
    assert_same_output(got, want)
    # The inner model's own output too, with the fields this version fills.
    got, want = unpatched_and_patched(model.model, inputs)
    assert merge_spy.calls == 2
    assert_same_output(got, want)
    if "image_outputs" in got:
        assert got.video_hidden_states is None  # 5.24 on: the forward leaves it empty
    else:
        assert got.image_hidden_states.shape == (9, 4, 64) and got.video_hidden_states.shape == (3, 4, 64)


def test_video_output_field_is_filled_where_the_forward_fills_it():
    """The version-limited output field: filled up to 5.23 (the forward's video features),
    not from 5.24 on (the field stays, the forward leaves it None)."""
    (video,) = [m for m in SPEC.modalities if m.kind == "video"]
    assert video.output_fields == (("video_hidden_states", "features", "<5.24"),)
    filled = video.filled_output_fields()
    assert filled == ([("video_hidden_states", "features")] if _version_covered("<5.24") else [])


def test_one_kind_in_the_call(merge_spy):
    """Sample 0 alone (one image), then sample 1's video alone (its image placeholders turned
    into text): the op takes the kind present."""
    single = build_or_skip(FAMILY, batch=1)
    assert "pixel_values_videos" not in single.inputs
    got, want = unpatched_and_patched(single.model, single.inputs)
    assert merge_spy.calls == 1 and merge_spy.placeholder_ids() == ids_of(single, "image")
    assert_same_output(got, want)

    two = build_or_skip(FAMILY)
    ids, text = two.inputs["input_ids"][1:], two.tokenizer.convert_tokens_to_ids("the")
    video_only = {"input_ids": ids.masked_fill(ids == two.placeholder_ids["image"], text),
                  "attention_mask": two.inputs["attention_mask"][1:],
                  "pixel_values_videos": two.inputs["pixel_values_videos"]}  # fmt: skip
    got, want = unpatched_and_patched(two.model, video_only)
    assert merge_spy.calls == 2 and merge_spy.placeholder_ids() == ids_of(two, "video")
    assert_same_output(got, want)


def test_generate_merges_the_prefill_once(tiny, merge_spy):
    """Greedy tokens equal; the prefill merges both kinds in one call (from 5.18 on generate
    encodes the media before the prefill and passes mm_encoder_outputs), decode steps carry
    no media."""
    model, inputs = tiny.model, tiny.inputs
    with torch.no_grad():
        want = model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False)
        with patched(model):
            got = model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False)
    assert merge_spy.calls == 1 and merge_spy.placeholder_ids() == ids_of(tiny, "image", "video")
    assert torch.equal(got, want), f"{got} vs {want}"


def test_encoder_outputs_from_the_caller_are_merged(tiny, merge_spy):
    """Images and videos encoded by the caller (mm_encoder_outputs, as generate passes them):
    merged in one call, and the output carries the caller's image encoder output."""
    model = tiny.model
    if not takes_encoder_outputs(model):
        pytest.skip(f"transformers {transformers.__version__}: the forward takes no mm_encoder_outputs")
    inputs = dict(tiny.inputs)
    with torch.no_grad():
        encoded = {"image": model.model.get_image_features(inputs.pop("pixel_values")),
                   "video": model.model.get_image_features(inputs.pop("pixel_values_videos"))}  # fmt: skip
    # The unpatched forward writes into the dict it is given: each run gets its own.
    with torch.no_grad():
        want = model(**inputs, mm_encoder_outputs=dict(encoded))
        with patched(model):
            got = model(**inputs, mm_encoder_outputs=dict(encoded))
    assert merge_spy.calls == 1 and merge_spy.placeholder_ids() == ids_of(tiny, "image", "video")
    assert_same_output(got, want)
    assert got.image_outputs is encoded["image"]


@pytest.mark.parametrize("given", ["image", "video", "none"])
def test_pixels_beside_encoder_outputs_are_merged(tiny, merge_spy, given):
    """The forward takes pixels beside mm_encoder_outputs and encodes each kind the dict
    lacks (generate's own call: encoded images, raw videos). Merged in one call: the given
    kind from the dict, the other from its pixels, an empty dict like none; where a kind
    comes both ways the forward takes the dict's and the original runs."""
    model = tiny.model
    if not takes_encoder_outputs(model):
        pytest.skip(f"transformers {transformers.__version__}: the forward takes no mm_encoder_outputs")
    pixels = {"image": "pixel_values", "video": "pixel_values_videos"}
    encoded = {}
    if given != "none":
        with torch.no_grad():
            encoded[given] = model.model.get_image_features(tiny.inputs[pixels[given]])
    raw = {k: v for k, v in tiny.inputs.items() if given == "none" or k != pixels[given]}
    with torch.no_grad():
        want = model(**raw, mm_encoder_outputs=dict(encoded))
        with patched(model):
            got = model(**raw, mm_encoder_outputs=dict(encoded))
    assert merge_spy.calls == 1 and merge_spy.placeholder_ids() == ids_of(tiny, "image", "video")
    assert_same_output(got, want)
    if given == "image":
        assert got.image_outputs is encoded["image"]
    if given != "none":  # both ways: the original takes the dict's and ignores the pixels
        with torch.no_grad():
            want = model(**tiny.inputs, mm_encoder_outputs=dict(encoded))
            with patched(model):
                got = model(**tiny.inputs, mm_encoder_outputs=dict(encoded))
        assert merge_spy.calls == 1
        assert_same_output(got, want)


@pytest.mark.parametrize("kind", ["image", "video"])
def test_a_count_mismatch_raises_the_forwards_own_words(tiny, merge_spy, kind):
    """One placeholder fewer: the patched merge raises the very text the forward raises
    ("Image features and image tokens do not match, tokens: .., features: .." and the same
    for the video), for the kind that mismatches."""
    ids = tiny.inputs["input_ids"].clone()
    row, col = (ids == tiny.placeholder_ids[kind]).nonzero()[-1].tolist()
    ids[row, col] = tiny.tokenizer.convert_tokens_to_ids("the")
    got, want = raised_unpatched_and_patched(tiny.model, {**tiny.inputs, "input_ids": ids})
    assert got == want, (got, want)
    rows = placeholders(tiny.inputs, tiny, kind)
    assert want == f"{kind.capitalize()} features and {kind} tokens do not match, tokens: {rows - 1}, features: {rows}"
    assert merge_spy.calls == 1


def test_unpatch_restores_the_original_forward(tiny, merge_spy):
    """After unpatch, the inner model's forward is its class's again (nothing left on the
    instance), the op is no longer called and the output is the unpatched one."""
    model, inputs = tiny.model, tiny.inputs
    with torch.no_grad():
        want = model(**inputs)
        report = mmkernels.patch(model, kernels=["merge"])
        assert [(r.module_path, r.method) for r in report.replaced] == [("model", "forward")]
        assert "forward" in model.model.__dict__
        mmkernels.unpatch(model)
        assert "forward" not in model.model.__dict__ and ORIGINALS_ATTR not in model.model.__dict__
        got = model(**inputs)
    assert merge_spy.calls == 0
    assert_same_output(got, want)


def test_every_kernel_patched(tiny, merge_spy):
    """patch(model) with every kernel: the merge is the only rule that applies (no patch
    embed, attention or projector rule covers the timm tower or this projector), so the
    logits stay bit-identical."""
    model, inputs = tiny.model, tiny.inputs
    with torch.no_grad():
        want = model(**inputs)
        report = mmkernels.patch(model)
        try:
            assert [(r.module_path, r.method, r.op) for r in report.replaced] == [
                ("model", "forward", "mmkernels.ops.merge_multimodal_embeddings")]
            got = model(**inputs)
        finally:
            mmkernels.unpatch(model)
    assert merge_spy.calls == 1
    assert_same_output(got, want)


def test_the_generic_rule_refuses_the_forward_and_the_spec_takes_it(tiny):
    """The generic rule still refuses PerceptionLM's forward (one feature method called for
    two kinds); the spec patches it."""
    derivation = derive_merge_spec(type(tiny.model.model))
    assert derivation.spec is None and derivation.merges_here
    assert derivation.reasons == ("calls get_image_features more than once",)
    with patched(tiny.model) as report:
        assert [(r.module_path, r.family) for r in report.replaced] == [("model", "PerceptionLM")]


# --------------------------------------------------------------------------------------
# The checks can fail: a spec that merges wrongly changes the logits


def _video_frames_reversed(model, call):
    outputs = model.get_image_features(call.get("pixel_values_videos").flip(1))
    return Features(rows=[outputs.pooler_output.reshape(-1, outputs.pooler_output.shape[-1])],
                    encoder_output=outputs, pooled=outputs.pooler_output)  # fmt: skip


def _video_left_as_text(model, call):
    # What a spec that forgot the video would merge: the placeholder token's own embedding.
    count = int((call.get("input_ids") == model.config.video_token_id).sum())
    token = torch.tensor([model.config.video_token_id])
    rows = model.get_input_embeddings()(token).expand(count, -1)
    return Features(rows=[rows], pooled=rows)  # pooled: 5.17's output carries it


def _image_tiles_of_the_next_image(model, call):
    # Each image's rows from the next image's tiles (the images rolled by one).
    outputs = model.get_image_features(call.get("pixel_values").roll(1, 0))
    return Features(rows=[outputs.pooler_output.reshape(-1, outputs.pooler_output.shape[-1])],
                    encoder_output=outputs, pooled=outputs.pooler_output)  # fmt: skip


@pytest.mark.parametrize(("kind", "wrong"), [("video", _video_frames_reversed), ("video", _video_left_as_text),
                                             ("image", _image_tiles_of_the_next_image)],
                         ids=["video-frames-reversed", "video-not-merged", "images-rolled"])  # fmt: skip
def test_a_wrong_merge_changes_the_logits(tiny, merge_spy, kind, wrong):
    """The spec's video (or images) swapped for a wrong one: the logits change, so the
    bit-identical checks above would catch a spec that merged them wrongly or not at all."""
    model, inputs = tiny.model, tiny.inputs
    wrong_spec = dataclasses.replace(SPEC, modalities=tuple(
        dataclasses.replace(m, feature_method=None, positional=(), feature_function=wrong) if m.kind == kind else m
        for m in SPEC.modalities
    ))  # fmt: skip
    with torch.no_grad():
        want = model(**inputs).logits
        with patched_by_spec(model, wrong_spec):
            got = model(**inputs).logits
    assert merge_spy.calls == 1
    assert not torch.equal(got, want)
    # Only the rows from the first wrongly merged placeholder on can change.
    first = int((inputs["input_ids"][1] == tiny.placeholder_ids[kind]).nonzero()[0])
    assert torch.equal(got[1, :first], want[1, :first])
