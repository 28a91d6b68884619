"""PaddleOCR-VL's merge (integrations/hf_specs.py): images (pre-cut patches with
``image_grid_thw``) merged into the text by ONE call of
``mmkernels.ops.merge_multimodal_embeddings``, on the zoo's tiny PaddleOCR-VL (Triton's
interpreter on the CPU).

What tests/test_patch_hf.py checks for every spec family (fp32 outputs bit-identical with
the count check on and off, greedy tokens, ``save_pretrained``, ``unpatch``, host syncs,
a count mismatch) and tests/test_patch_embed_hf.py for every wired tower (its bare patch
conv) run on this one too; here what is PaddleOCR-VL's own: the per-image features in one
op call, in float64 as well; M-RoPE positions computed by the original forward from the
``input_ids`` the pre-step keeps; generate; encoder outputs passed by the caller; the count
error in the forward's own words (its feature count is rows x width); ``unpatch``; every
kernel patched (the patch conv too: close, not bit-identical); and specs that merge
wrongly, which must change the logits (so the bit-identical checks can fail).
"""

import dataclasses
import inspect

import pytest
import torch

transformers = pytest.importorskip("transformers")

import mmkernels  # noqa: E402
import mmkernels.ops  # noqa: E402
from mmkernels.integrations.engine import ORIGINALS_ATTR  # noqa: E402
from mmkernels.integrations.hf_merge import Features  # noqa: E402
from mmkernels.integrations.hf_merge_generic import derive_merge_spec  # noqa: E402
from mmkernels.integrations.hf_specs import MERGE_SPECS  # noqa: E402
from mmkernels.testing import relative_error  # noqa: E402
from zoo_helpers import assert_same_output, build_or_skip, patched, patched_by_spec, unpatched_and_patched  # noqa: E402

FAMILY = "paddleocr_vl"
NEW_TOKENS = 4
RTOL = 1e-5  # fp32 with the patch conv replaced: the op's GEMM sums in another order (test_patch_embed_hf.py)
(SPEC,) = [s for s in MERGE_SPECS if s.model_type == FAMILY]


@pytest.fixture(scope="module")
def tiny():
    return build_or_skip(FAMILY)


def image_tokens(tiny, inputs=None) -> int:
    inputs = tiny.inputs if inputs is None else inputs
    return int((inputs["input_ids"] == tiny.placeholder_ids["image"]).sum())


def takes_encoder_outputs(model) -> bool:
    return "mm_encoder_outputs" in inspect.signature(model.model.forward).parameters


# --------------------------------------------------------------------------------------
# Merged


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_images_merge_in_one_op_call(merge_spy, dtype):
    """Three images of 6, 4 and 6 tokens (grids 4x6, 4x4, 6x4 patches, merged 2x2): one op
    call takes each image's rows as the tower gave them (a list, nothing concatenated), and
    the output is bit-identical, the inner model's too."""
    built = build_or_skip(FAMILY, dtype=dtype)
    model, inputs = built.model, built.inputs
    got, want = unpatched_and_patched(model, inputs)
    assert merge_spy.calls == 1 and merge_spy.placeholder_ids() == [built.placeholder_ids["image"]]
    (images,) = merge_spy.features()
    assert [r.shape[0] for r in images] == (inputs["image_grid_thw"].prod(-1) // 4).tolist() == [6, 4, 6]
    assert sum(r.shape[0] for r in images) == image_tokens(built)
    assert got.logits.dtype == dtype
    assert_same_output(got, want)
    got, want = unpatched_and_patched(model.model, inputs)
    assert merge_spy.calls == 2
    assert_same_output(got, want)


def test_positions_come_from_the_kept_input_ids(tiny, merge_spy):
    """The pre-step keeps input_ids (and the grids, mm_token_type_ids) in the call, so the
    original forward computes its M-RoPE positions as unpatched: its rope_deltas agree, and
    they really depend on the images (without mm_token_type_ids it raises, both ways)."""
    model, inputs = tiny.model, tiny.inputs
    with torch.no_grad():
        model(**inputs)
        want = model.model.rope_deltas.clone()
        model.model.rope_deltas = None
        with patched(model):
            model(**inputs)
        assert merge_spy.calls == 1
        assert torch.equal(model.model.rope_deltas, want)
        assert (want != 0).any()  # the images' 2-D positions shorten the sequence's span
    without_types = {k: v for k, v in inputs.items() if k != "mm_token_type_ids"}
    with torch.no_grad():
        with pytest.raises(ValueError) as unpatched:
            model(**without_types)
        with patched(model), pytest.raises(ValueError) as got:
            model(**without_types)
    assert str(got.value) == str(unpatched.value) and "mm_token_type_ids" in str(got.value)


def test_generate_merges_the_prefill_once(tiny, merge_spy):
    """Greedy tokens equal; the prefill merges once, decode steps carry no media."""
    model, inputs = tiny.model, tiny.inputs
    with torch.no_grad():
        want = model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False)
        with patched(model):
            got = model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False)
    assert merge_spy.calls == 1
    assert torch.equal(got, want), f"{got} vs {want}"


def test_encoder_outputs_from_the_caller_are_merged(tiny, merge_spy):
    """Images encoded by the caller (mm_encoder_outputs, as generate passes them): merged,
    and the output carries the caller's encoder output; pixels beside them raise the
    forward's own error (the original runs)."""
    model = tiny.model
    if not takes_encoder_outputs(model):
        pytest.skip(f"transformers {transformers.__version__}: the forward takes no mm_encoder_outputs")
    inputs = {k: v for k, v in tiny.inputs.items() if k != "pixel_values"}
    with torch.no_grad():
        encoded = {"image": model.model.get_image_features(tiny.inputs["pixel_values"], inputs["image_grid_thw"])}
        want = model(**inputs, mm_encoder_outputs=dict(encoded))
        with patched(model):
            got = model(**inputs, mm_encoder_outputs=dict(encoded))
    assert merge_spy.calls == 1
    assert_same_output(got, want)
    assert got.image_outputs is encoded["image"]
    with torch.no_grad():
        with pytest.raises(ValueError) as unpatched:
            model(**tiny.inputs, mm_encoder_outputs=dict(encoded))
        with patched(model), pytest.raises(ValueError) as raised:
            model(**tiny.inputs, mm_encoder_outputs=dict(encoded))
    assert str(raised.value) == str(unpatched.value)
    assert merge_spy.calls == 1


def test_a_count_mismatch_raises_the_forwards_own_words(tiny, merge_spy):
    """One placeholder fewer: the patched merge raises the very text the forward raises,
    "Image features and image tokens do not match: tokens: .., features ..", its feature
    count being rows x width."""
    ids = tiny.inputs["input_ids"].clone()
    row, col = (ids == tiny.placeholder_ids["image"]).nonzero()[-1].tolist()
    ids[row, col] = tiny.tokenizer.convert_tokens_to_ids("the")
    inputs = {**tiny.inputs, "input_ids": ids}
    with torch.no_grad():
        with pytest.raises(ValueError) as unpatched:
            tiny.model(**inputs)
        with patched(tiny.model), pytest.raises(ValueError) as got:
            tiny.model(**inputs)
    rows = image_tokens(tiny)
    width = tiny.model.config.text_config.hidden_size
    assert str(unpatched.value) == (f"Image features and image tokens do not match: tokens: {rows - 1}, "
                                    f"features {rows * width}")  # fmt: skip
    assert str(got.value) == str(unpatched.value)
    assert merge_spy.calls == 1


def test_unpatch_restores_the_original_forward(tiny, merge_spy):
    """After unpatch, the inner model's forward is its class's again (nothing left on the
    instance), the op is no longer called and the output is the unpatched one."""
    model, inputs = tiny.model, tiny.inputs
    with torch.no_grad():
        want = model(**inputs)
        report = mmkernels.patch(model, kernels=["merge"])
        assert [(r.module_path, r.method) for r in report.replaced] == [("model", "forward")]
        mmkernels.unpatch(model)
        assert "forward" not in model.model.__dict__ and ORIGINALS_ATTR not in model.model.__dict__
        got = model(**inputs)
    assert merge_spy.calls == 0
    assert_same_output(got, want)


def test_every_kernel_patched(tiny, merge_spy):
    """patch(model) with every kernel: the merge and the tower's bare patch conv
    (integrations/hf_patch_embed.py's ConvPatchSpec); the logits are within the patch-embed
    tests' fp32 tolerance, and the greedy tokens are the same."""
    model, inputs = tiny.model, tiny.inputs
    with torch.no_grad():
        want = model(**inputs)
        want_tokens = model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False)
        with patched(model, kernels=None) as report:
            assert sorted((r.module_path, r.op) for r in report.replaced) == [
                ("model", "mmkernels.ops.merge_multimodal_embeddings"),
                ("model.visual.vision_model.embeddings.patch_embedding", "mmkernels.ops.patch_embed"),
            ]
            got = model(**inputs)
            tokens = model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False)
    assert merge_spy.calls == 2
    assert relative_error(got.logits, want.logits) <= RTOL
    assert torch.equal(tokens, want_tokens)


def test_the_generic_rule_refuses_the_forward_and_the_spec_takes_it(tiny):
    """The generic rule still refuses PaddleOCR-VL's forward (its text lookup goes through
    language_model.embed_tokens), although that is the module get_input_embeddings() returns,
    which the pre-step uses; the spec patches it."""
    derivation = derive_merge_spec(type(tiny.model.model))
    assert derivation.spec is None and derivation.merges_here
    assert "language_model.embed_tokens" in derivation.reasons[0]
    assert tiny.model.model.get_input_embeddings() is tiny.model.model.language_model.embed_tokens
    with patched(tiny.model) as report:
        assert [(r.module_path, r.family) for r in report.replaced] == [("model", "PaddleOCR-VL")]


# --------------------------------------------------------------------------------------
# The checks can fail: a spec that merges wrongly changes the logits


def _images_in_reverse(model, call):
    outputs = model.get_image_features(call.get("pixel_values"), call.get("image_grid_thw"))
    # Same row counts (6, 4, 6), so the count check passes: the first and last images swapped.
    return Features(rows=list(reversed(outputs.pooler_output)), encoder_output=outputs)


def _images_left_as_text(model, call):
    count = int((call.get("input_ids") == model.config.image_token_id).sum())
    token = torch.tensor([model.config.image_token_id])
    return Features(rows=[model.get_input_embeddings()(token).expand(count, -1)])


@pytest.mark.parametrize("wrong", [_images_in_reverse, _images_left_as_text],
                         ids=["images-reversed", "images-not-merged"])  # fmt: skip
def test_a_wrong_merge_changes_the_logits(tiny, merge_spy, wrong):
    """The spec's images swapped for wrong ones: the logits change, so the bit-identical
    checks above would catch a spec that merged them wrongly or not at all."""
    model, inputs = tiny.model, tiny.inputs
    (image,) = SPEC.modalities
    wrong_spec = dataclasses.replace(SPEC, modalities=(
        dataclasses.replace(image, feature_method=None, positional=(), feature_function=wrong),
    ))  # fmt: skip
    with torch.no_grad():
        want = model(**inputs).logits
        with patched_by_spec(model, wrong_spec):
            got = model(**inputs).logits
    assert merge_spy.calls == 1
    assert not torch.equal(got, want)
    # Only the rows from the first image of sample 1 on can change.
    first = int((inputs["input_ids"][1] == tiny.placeholder_ids["image"]).nonzero()[0])
    assert torch.equal(got[1, :first], want[1, :first])
