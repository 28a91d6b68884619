"""MiniCPM-V's merge (integrations/hf_specs.py): images and videos merged into the text by
ONE call of ``mmkernels.ops.merge_multimodal_embeddings``, on the zoo's tiny MiniCPM-V 4.6
and 4.7 (Triton's interpreter on the CPU).

What tests/test_patch_hf.py checks for every spec family (fp32 outputs bit-identical with
the count check on and off, greedy tokens, ``save_pretrained``, ``unpatch``, host syncs,
a count mismatch) runs on these too; here what is MiniCPM-V's own: every crop of the
packed ``pixel_values[:1]`` row and every frame of the video in one op call without a
concatenation, in float64 as well; calls with fewer media; crops of several sizes; beam
search; the first row only of a tensor of several (5.17: the features tiled once per row,
as its beam search needs); encoder outputs passed by the caller; the count error in
MiniCPM-V's own words; the calls that run the original forward and why; and specs that
merge wrongly, which must change the logits (so the bit-identical checks can fail).
MiniCPM-OCR's forward is 4.6's (tests/test_patch_hf.py:
test_spec_families_without_a_tiny_model_run_a_tested_forward).
"""

import dataclasses

import pytest
import torch

transformers = pytest.importorskip("transformers")

from mmkernels.integrations.engine import ORIGINALS_ATTR  # noqa: E402
from mmkernels.integrations.hf_merge import Features, _version_covered  # noqa: E402
from mmkernels.integrations.hf_specs import MERGE_SPECS  # noqa: E402
from zoo_helpers import assert_same_output, build_or_skip, patched, patched_by_spec, unpatched_and_patched  # noqa: E402

FAMILIES = ["minicpmv4_6", "minicpmv4_7"]
NEW_TOKENS = 4


def raised_unpatched_and_patched(model, inputs) -> tuple[str, str]:
    """The ValueError texts of the unpatched and the patched forward on ``inputs``."""
    with torch.no_grad():
        with pytest.raises(ValueError) as unpatched:
            model(**inputs)
        with patched(model), pytest.raises(ValueError) as got:
            model(**inputs)
    return str(got.value), str(unpatched.value)


def ids_of(tiny, *kinds) -> list[int]:
    return [tiny.placeholder_ids[kind] for kind in kinds]


def spec_of(family: str):
    (found,) = [s for s in MERGE_SPECS if s.model_type == family]
    return found


def takes_encoder_outputs(model) -> bool:
    import inspect

    return "mm_encoder_outputs" in inspect.signature(model.model.forward).parameters


def repeats_per_row(family: str) -> bool:
    """Whether this transformers' forward tiles the first row's features once per row (5.17)."""
    image = spec_of(family).modalities[0]
    return image.first_row_repeated is not None and _version_covered(image.first_row_repeated)


@pytest.fixture(scope="module", params=FAMILIES)
def family(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def tiny(family):
    return build_or_skip(family)


def crops(inputs, sizes: str) -> int:
    return len(inputs[sizes])


# --------------------------------------------------------------------------------------
# Merged: one op call for every kind present


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_images_and_video_merge_in_one_op_call(family, merge_spy, dtype):
    """Sample 0 holds one image sliced into a thumbnail and two slices, sample 1 two images
    and a 2-frame video, every crop packed in one row of pixel_values: one op call takes
    both kinds, each crop's and each frame's rows as the towers gave them (a list, nothing
    concatenated), and the output is bit-identical."""
    built = build_or_skip(family, dtype=dtype)
    model, inputs = built.model, built.inputs
    assert inputs["pixel_values"].shape[0] == 1 and inputs["pixel_values_videos"].shape[0] == 1  # the packed row
    got, want = unpatched_and_patched(model, inputs)
    assert merge_spy.calls == 1
    assert merge_spy.placeholder_ids() == ids_of(built, "image", "video")
    images, videos = merge_spy.features()
    assert [len(images), len(videos)] == [crops(inputs, "target_sizes"), crops(inputs, "target_sizes_videos")]
    ids = inputs["input_ids"]
    for kind, rows in zip(("image", "video"), (images, videos)):
        assert sum(r.shape[0] for r in rows) == int((ids == built.placeholder_ids[kind]).sum()), kind
    assert got.logits.dtype == dtype
    assert_same_output(got, want)
    # The inner model's own output too (from 5.18 on it carries both encoders' outputs).
    got, want = unpatched_and_patched(model.model, inputs)
    assert merge_spy.calls == 2
    assert_same_output(got, want)
    if takes_encoder_outputs(model):
        assert got.image_outputs is not None and got.video_outputs is not None


def test_fewer_media_in_the_call(family, merge_spy):
    """Sample 0 alone (one sliced image), then a video alone: the op takes the kinds present."""
    tiny = build_or_skip(family, batch=1)
    assert "pixel_values_videos" not in tiny.inputs
    got, want = unpatched_and_patched(tiny.model, tiny.inputs)
    assert merge_spy.calls == 1 and merge_spy.placeholder_ids() == ids_of(tiny, "image")
    assert_same_output(got, want)

    # Sample 1 with its image placeholders turned into text: the video is the only media left.
    two = build_or_skip(family)
    ids, types = two.inputs["input_ids"][1:], two.inputs.get("mm_token_type_ids")
    text = two.tokenizer.convert_tokens_to_ids("the")
    video_only = {"input_ids": ids.masked_fill(ids == two.placeholder_ids["image"], text),
                  "attention_mask": two.inputs["attention_mask"][1:],
                  "pixel_values_videos": two.inputs["pixel_values_videos"],
                  "target_sizes_videos": two.inputs["target_sizes_videos"]}  # fmt: skip
    if types is not None:
        video_only["mm_token_type_ids"] = types[1:].masked_fill(types[1:] == 1, 0)
    got, want = unpatched_and_patched(two.model, video_only)
    assert merge_spy.calls == 2 and merge_spy.placeholder_ids() == ids_of(two, "video")
    assert_same_output(got, want)


def test_crops_of_several_sizes(tiny, merge_spy):
    """The zoo's crops are all 8x8 patches (5.17's window merger takes one size only); here
    a thumbnail of 4x12 patches with two 8x8 slices beside an 8x12 image, as the processor
    lays them out (3, 4, 4 and 6 tokens): one packed row, merged bit-identically."""
    if repeats_per_row(tiny.family):
        pytest.skip(f"transformers {transformers.__version__}: the window merger takes crops of one size only")
    sizes = torch.tensor([[4, 12], [8, 8], [8, 8], [8, 12]], dtype=torch.int32)
    patches = int(sizes.prod(-1).sum())
    pixels = torch.randn(1, 3, 14, 14 * patches, generator=torch.Generator().manual_seed(2))

    def crop(n: int, start: str = "<image>", end: str = "</image>") -> str:
        return start + "<|image_pad|>" * n + end

    first = crop(3) + crop(4, "<slice>", "</slice>") + crop(4, "<slice>", "</slice>")
    texts = [f"user : <image_id> 0 </image_id> {image} describe the image . assistant :"
             for image in (first, crop(6))]  # fmt: skip
    inputs = {**tiny.tokenizer(texts, padding=True, return_tensors="pt"), "pixel_values": pixels,
              "target_sizes": sizes}  # fmt: skip
    if "mm_token_type_ids" in tiny.inputs:
        inputs["mm_token_type_ids"] = (inputs["input_ids"] == tiny.placeholder_ids["image"]).long()
    got, want = unpatched_and_patched(tiny.model, inputs)
    assert merge_spy.calls == 1
    (images,) = merge_spy.features()
    assert [r.shape[0] for r in images] == [3, 4, 4, 6]
    assert_same_output(got, want)


def test_generate_merges_the_prefill_once(tiny, merge_spy):
    """Greedy and beam search (two beams, one prompt): the prefill merges in one call (from
    5.18 on, generate encodes the media before the prefill and passes mm_encoder_outputs;
    on 5.17 the pixels come expanded to one row per beam), decode steps carry no media."""
    single = build_or_skip(tiny.family, batch=1)
    for options in ({}, {"num_beams": 2}):
        with torch.no_grad():
            want = single.model.generate(**single.inputs, max_new_tokens=NEW_TOKENS, do_sample=False, **options)
            with patched(single.model):
                calls = merge_spy.calls
                got = single.model.generate(**single.inputs, max_new_tokens=NEW_TOKENS, do_sample=False, **options)
        assert merge_spy.calls == calls + 1, options
        assert torch.equal(got, want), f"{options}: {got} vs {want}"
    assert all(ORIGINALS_ATTR not in m.__dict__ for m in single.model.modules())
    # The beams' prefill merged each crop once per beam.
    (images,) = merge_spy.features()
    assert len(images) == 2 * crops(single.inputs, "target_sizes")


def test_rows_past_the_first_are_what_the_forward_makes_of_them(tiny, merge_spy):
    """pixel_values of two rows, the second noise: the forward encodes the first only
    (pixel_values[:1]), and so does the patched merge (the spec's Modality.first_row). From
    5.18 on the second row is ignored (the output is that of the one-row call); on 5.17 the
    forward tiles the features once per row, which here are twice the placeholders: both
    raise the same count error."""
    model, inputs = tiny.model, dict(tiny.inputs)
    noise = torch.randn(inputs["pixel_values"].shape, generator=torch.Generator().manual_seed(1))
    inputs["pixel_values"] = torch.cat([inputs["pixel_values"], noise])
    if repeats_per_row(tiny.family):
        got, want = raised_unpatched_and_patched(model, inputs)
        assert got == want and want.startswith("Multimodal features and tokens do not match"), (got, want)
        assert merge_spy.calls == 1
        return
    got, want = unpatched_and_patched(model, inputs)
    assert merge_spy.calls == 1
    assert_same_output(got, want)
    with torch.no_grad():
        assert_same_output(got.logits, model(**tiny.inputs).logits)


def encoded_media(model, inputs: dict) -> dict:
    """The image and video encoder outputs of ``inputs`` (their pixels popped), as generate
    hands them over in ``mm_encoder_outputs``."""
    with torch.no_grad():
        return {
            "image": model.model.get_image_features(inputs.pop("pixel_values"), inputs["target_sizes"]),
            "video": model.model.get_video_features(inputs.pop("pixel_values_videos"), inputs["target_sizes_videos"]),
        }


def test_encoder_outputs_from_the_caller_are_merged(tiny, merge_spy):
    """Images and videos encoded by the caller (mm_encoder_outputs, as generate passes them):
    merged in one call, and the output carries the caller's encoder outputs."""
    model = tiny.model
    if not takes_encoder_outputs(model):
        pytest.skip(f"transformers {transformers.__version__}: the forward takes no mm_encoder_outputs")
    inputs = dict(tiny.inputs)
    encoded = encoded_media(model, inputs)
    got, want = unpatched_and_patched(model, {**inputs, "mm_encoder_outputs": encoded})
    assert merge_spy.calls == 1 and merge_spy.placeholder_ids() == ids_of(tiny, "image", "video")
    assert_same_output(got, want)
    assert got.image_outputs is encoded["image"] and got.video_outputs is encoded["video"]


@pytest.mark.parametrize("kind", ["image", "video"])
def test_a_count_mismatch_raises_the_forwards_own_words(tiny, merge_spy, kind):
    """One placeholder fewer: the patched merge raises the very text the forward raises
    ("Multimodal features and tokens do not match, tokens: .., features: .."), for the
    kind that mismatches."""
    ids = tiny.inputs["input_ids"].clone()
    row, col = (ids == tiny.placeholder_ids[kind]).nonzero()[-1].tolist()
    ids[row, col] = tiny.tokenizer.convert_tokens_to_ids("the")
    got, want = raised_unpatched_and_patched(tiny.model, {**tiny.inputs, "input_ids": ids})
    assert got == want, (got, want)
    rows = int((tiny.inputs["input_ids"] == tiny.placeholder_ids[kind]).sum())
    assert want == f"Multimodal features and tokens do not match, tokens: {rows - 1}, features: {rows}"
    assert merge_spy.calls == 1


# --------------------------------------------------------------------------------------
# The original forward, and why


def test_pixels_beside_encoder_outputs_raise_the_forwards_error(tiny, merge_spy):
    """Pixels next to mm_encoder_outputs (an empty dict, one holding nothing, or the other
    kind's output): the forward raises; the patched model runs it, so the same error comes."""
    model = tiny.model
    if not takes_encoder_outputs(model):
        pytest.skip(f"transformers {transformers.__version__}: the forward takes no mm_encoder_outputs")
    inputs = dict(tiny.inputs)
    with torch.no_grad():
        video = model.model.get_video_features(inputs["pixel_values_videos"], inputs["target_sizes_videos"])
    without_video = {k: v for k, v in inputs.items() if k != "pixel_values_videos"}
    for call in ({**inputs, "mm_encoder_outputs": {}}, {**inputs, "mm_encoder_outputs": {"video": None}},
                 {**without_video, "mm_encoder_outputs": {"video": video}}):  # fmt: skip
        got, want = raised_unpatched_and_patched(model, call)
        assert got == want and "mm_encoder_outputs" in want
    assert merge_spy.calls == 0  # the original ran (hf_merge sends pixels beside encoder outputs there)


def test_an_encoder_output_of_another_kind_runs_the_original(tiny, merge_spy):
    """mm_encoder_outputs holding a kind the forward does not merge (it ignores it): the
    pre-step covers no such kind, so the original runs, with the same output."""
    model = tiny.model
    if not takes_encoder_outputs(model):
        pytest.skip(f"transformers {transformers.__version__}: the forward takes no mm_encoder_outputs")
    inputs = dict(tiny.inputs)
    encoded = {**encoded_media(model, inputs), "audio": torch.zeros(1)}
    got, want = unpatched_and_patched(model, {**inputs, "mm_encoder_outputs": encoded})
    assert merge_spy.calls == 0
    assert_same_output(got, want)


def test_missing_mm_token_type_ids_raise_the_forwards_error(merge_spy):
    """MiniCPM-V 4.7 places its canvas M-RoPE positions by mm_token_type_ids: without them
    its forward raises after the merge; the patched forward merges and hands input_ids
    and the sizes to the original, which raises the same."""
    tiny = build_or_skip("minicpmv4_7")
    inputs = {k: v for k, v in tiny.inputs.items() if k != "mm_token_type_ids"}
    got, want = raised_unpatched_and_patched(tiny.model, inputs)
    assert got == want and "mm_token_type_ids" in want
    assert merge_spy.calls == 1


# --------------------------------------------------------------------------------------
# The checks can fail: a spec that merges wrongly changes the logits


def _image_crops_reversed(model, call):
    outputs = model.get_image_features(call.get("pixel_values")[:1], call.get("target_sizes"))
    return Features(rows=list(reversed(outputs.pooler_output)), encoder_output=outputs)


def _image_rows_left_as_text(model, call):
    # What a spec that forgot the images would merge: the placeholder token's own embedding.
    count = int((call.get("input_ids") == model.config.image_token_id).sum())
    token = torch.tensor([model.config.image_token_id])
    return Features(rows=[model.get_input_embeddings()(token).expand(count, -1)])


@pytest.mark.parametrize("wrong_images", [_image_crops_reversed, _image_rows_left_as_text],
                         ids=["image-crops-reversed", "images-not-merged"])  # fmt: skip
def test_a_wrong_image_merge_changes_the_logits(tiny, merge_spy, wrong_images):
    """The spec's images swapped for wrong ones (the crops in reverse order, or none merged):
    the logits change, so the bit-identical checks above would catch a spec that merged the
    images wrongly or not at all."""
    model, inputs = tiny.model, tiny.inputs
    right = spec_of(tiny.family)
    image, video = right.modalities
    wrong = dataclasses.replace(right, modalities=(
        dataclasses.replace(image, feature_method=None, feature_function=wrong_images, first_row=False,
                            first_row_repeated=None),
        video,
    ))  # fmt: skip
    with torch.no_grad():
        want = model(**inputs).logits
        with patched_by_spec(model, wrong):
            got = model(**inputs).logits
    assert merge_spy.calls == 1
    assert not torch.equal(got, want)
    # Only the rows after the first image can change: the text before it is the same.
    first = int((inputs["input_ids"][1] == tiny.placeholder_ids["image"]).nonzero()[0])
    assert torch.equal(got[1, :first], want[1, :first])
