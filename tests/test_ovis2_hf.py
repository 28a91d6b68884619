"""Ovis2's merge (integrations/hf_specs.py): the image rows and the visual indicator
vectors in ONE call of ``mmkernels.ops.merge_multimodal_embeddings`` (the indicators as
broadcast kinds), on the zoo's tiny Ovis2 (Triton's interpreter on the CPU).

What tests/test_patch_hf.py checks for every spec family (bit-identical outputs with the
count check on and off, greedy tokens, ``save_pretrained``, ``unpatch``, host syncs, a count
mismatch) runs on this one too; here what is Ovis2's own: the indicator ids and rows the op
is given, an indicator with no occurrence, no host sync without the count check (the
forward syncs once per indicator), encoder outputs passed by the caller, float64, and a
spec without the indicators, which must change the logits (so the bit-identical checks
can fail).
"""

import dataclasses
import inspect

import pytest
import torch

transformers = pytest.importorskip("transformers")

from mmkernels.integrations.hf_specs import MERGE_SPECS  # noqa: E402
from mmkernels.testing import HostSyncCounter  # noqa: E402
from zoo_helpers import assert_same_output, build_or_skip, patched, patched_by_spec, unpatched_and_patched  # noqa: E402


@pytest.fixture(scope="module")
def ovis2():
    return build_or_skip("ovis2")


def indicator_ids(tiny) -> list[int]:
    return list(tiny.model.config.visual_indicator_token_ids)


def takes_encoded(model) -> None:
    """Skip where the forward has no ``mm_encoder_outputs`` parameter (before 5.18)."""
    if "mm_encoder_outputs" not in inspect.signature(type(model.model).forward).parameters:
        pytest.skip(f"transformers {transformers.__version__}'s Ovis2 forward takes no mm_encoder_outputs")


def test_images_and_indicators_in_one_op_call(ovis2, merge_spy):
    """One op call: the image kind (a tensor per image, as the tower gave them) and one
    broadcast kind per indicator id, its row the model's own indicator embedding; the
    prompts hold <IMG_START>, <IMG_GRID> and <IMG_END> (twice in the two-image prompt) and
    never <IMG_COL> or <IMG_ROW>."""
    got, want = unpatched_and_patched(ovis2.model, ovis2.inputs)
    assert_same_output(got, want)
    assert merge_spy.calls == 1
    indicators = indicator_ids(ovis2)
    assert merge_spy.placeholder_ids() == [ovis2.placeholder_ids["image"], *indicators]
    _, kwargs = merge_spy.last
    assert list(kwargs["broadcast_ids"]) == indicators
    image_rows, *indicator_rows = merge_spy.features()
    assert sum(r.shape[0] for r in image_rows) == int((ovis2.inputs["input_ids"] == merge_spy.placeholder_ids()[0]).sum())
    with torch.no_grad():
        vectors = ovis2.model.model.get_image_features(pixel_values=ovis2.inputs["pixel_values"][:1]).visual_indicator_features
    assert all(len(rows) == 1 and torch.equal(rows[0], vectors[i : i + 1]) for i, rows in enumerate(indicator_rows))
    ids = ovis2.inputs["input_ids"]
    counts = [int((ids == i).sum()) for i in indicators]
    assert counts[0] == 3 and counts[2] == counts[3] == 0, counts  # several, and none


def test_float64_bit_identical(merge_spy):
    tiny = build_or_skip("ovis2", dtype=torch.float64)
    got, want = unpatched_and_patched(tiny.model, tiny.inputs)
    assert_same_output(got, want)
    assert merge_spy.calls == 1


def test_the_merge_syncs_are_gone_without_the_count_check(ovis2):
    """The forward's merge syncs the host for its count check, once per indicator id
    (``mask.any()``) and once per indicator present (a boolean-mask write); patched without
    the count check none is left: the patched forward syncs exactly as often as its text
    model alone, and the unpatched one at least 1 + 5 + 3 times more."""
    ids = ovis2.inputs["input_ids"]
    indicators = indicator_ids(ovis2)
    merge_syncs = 1 + len(indicators) + sum(bool((ids == i).any()) for i in indicators)
    model = ovis2.model
    with torch.no_grad():
        embeds = model.get_input_embeddings()(ids)
        with HostSyncCounter() as text_model:
            model.model.language_model(inputs_embeds=embeds, attention_mask=ovis2.inputs["attention_mask"])
        with HostSyncCounter() as unpatched:
            model(**ovis2.inputs)
        with patched(model, check_placeholders=False):
            with HostSyncCounter() as syncs:
                model(**ovis2.inputs)
    assert syncs.count == text_model.count, (syncs, text_model)
    assert unpatched.count >= text_model.count + merge_syncs, (unpatched, text_model)


def test_encoder_outputs_from_the_caller(ovis2, merge_spy):
    """``mm_encoder_outputs`` (what generate passes since 5.18): its indicator rows are the
    ones merged, as the forward reads them."""
    model = ovis2.model
    takes_encoded(model)
    inputs = {k: v for k, v in ovis2.inputs.items() if k != "pixel_values"}
    with torch.no_grad():
        encoded = model.model.get_image_features(pixel_values=ovis2.inputs["pixel_values"], return_dict=True)
    encoded.visual_indicator_features = encoded.visual_indicator_features * 3  # not the model's own: visible
    with torch.no_grad():
        want = model(**inputs, mm_encoder_outputs={"image": encoded})
        with patched(model):
            got = model(**inputs, mm_encoder_outputs={"image": encoded})
    assert_same_output(got, want)
    assert merge_spy.calls == 1


def test_a_spec_without_the_indicators_changes_the_logits(ovis2, merge_spy):
    """The indicator rows matter: patched by a spec without the broadcast kinds, the
    indicator tokens keep their text embeddings and the logits change, from the first
    indicator on (the text before it is the same)."""
    (spec,) = [s for s in MERGE_SPECS if s.model_type == "ovis2"]
    image = dataclasses.replace(spec.modalities[0], broadcast_field=None, broadcast_ids_field=None)
    wrong = dataclasses.replace(spec, modalities=(image,))
    model, inputs = ovis2.model, ovis2.inputs
    with torch.no_grad():
        want = model(**inputs).logits
        with patched_by_spec(model, wrong):
            got = model(**inputs).logits
    assert merge_spy.calls == 1
    assert not torch.equal(got, want)
    first = int((inputs["input_ids"][1] == indicator_ids(ovis2)[0]).nonzero()[0])
    assert torch.equal(got[1, :first], want[1, :first])


def test_indicator_rows_of_the_wrong_shape_are_refused(ovis2):
    """An encoder output whose indicator rows do not match the config's ids: a clear error,
    never a silent partial merge."""
    model = ovis2.model
    takes_encoded(model)
    inputs = {k: v for k, v in ovis2.inputs.items() if k != "pixel_values"}
    with torch.no_grad():
        encoded = model.model.get_image_features(pixel_values=ovis2.inputs["pixel_values"], return_dict=True)
    encoded.visual_indicator_features = encoded.visual_indicator_features[:2]
    with torch.no_grad(), patched(model), pytest.raises(ValueError) as error:
        model(**inputs, mm_encoder_outputs={"image": encoded})
    assert "visual_indicator_features" in str(error.value) and "visual_indicator_token_ids" in str(error.value)


def test_encoder_outputs_in_the_kwargs_of_an_older_forward_stay_unread(ovis2, merge_spy):
    """Before 5.18 the forward names no ``mm_encoder_outputs``: one passed anyway goes
    through its ``**kwargs`` to the language model, unread, and the pixels are encoded. The
    patched forward does the same (it does not merge the dict's features instead)."""
    model = ovis2.model
    if "mm_encoder_outputs" in inspect.signature(type(model.model).forward).parameters:
        pytest.skip(f"transformers {transformers.__version__}'s Ovis2 forward takes mm_encoder_outputs")
    with torch.no_grad():
        encoded = model.model.get_image_features(pixel_values=ovis2.inputs["pixel_values"], return_dict=True)
    encoded.pooler_output = encoded.pooler_output * 3
    got, want = unpatched_and_patched(model, {**ovis2.inputs, "mm_encoder_outputs": {"image": encoded}})
    assert_same_output(got, want)
    assert merge_spy.calls == 1
