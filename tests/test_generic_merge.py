"""The generic merge rule (integrations/hf_merge_generic.py) on transformers VLMs that no
merge spec names: the zoo's tiny random-init models of their real classes.

For each: ``patch(kernels=["merge"])`` replaces the inner model's forward through the
generic rule, the merge runs through the op (once per forward), the forward's output
(logits, every field, caches) is bit-identical to the unpatched one in fp32, greedy
generation gives the same tokens and ``unpatch`` restores the instance. Then what the rule
reads: for the spec families whose forward follows the pattern, the derived calls equal
the hand-written specs; forwards that deviate are refused with the place in their code;
every installed model with ``get_placeholder_mask`` is read without an error.
"""

import pytest
import torch

transformers = pytest.importorskip("transformers")

import mmkernels  # noqa: E402
import mmkernels.ops  # noqa: E402
from mmkernels.integrations.engine import ORIGINALS_ATTR  # noqa: E402
from mmkernels.integrations.hf_merge_generic import (  # noqa: E402
    GenericMergeRule,
    derive_merge_spec,
    installed_coverage,
)
from mmkernels.integrations.hf_specs import MERGE_SPECS  # noqa: E402

from mmkernels import zoo  # noqa: E402
from zoo_helpers import assert_same_output, build_or_skip  # noqa: E402

SPEC_MODEL_TYPES = frozenset(spec.model_type for spec in MERGE_SPECS)
# The zoo's families that no spec names: the generic rule patches them.
GENERIC_FAMILIES = sorted(f for f in zoo.FAMILIES if f in {"internvl", "mistral3", "aya_vision", "cohere2_vision", "qwen3_5", "llama4", "janus"})
# Model types whose forward follows the pattern only from some transformers on: before,
# the rule refuses them (Qwen3.5's 5.17 forward takes one of input_ids / inputs_embeds and
# reads input_ids for M-RoPE), and the test checks the refusal instead.
PATTERN_FROM = {"qwen3_5": "5.25", "qwen3_5_moe": "5.25"}


def follows_pattern_here(model_type: str) -> bool:
    from packaging.version import Version

    return Version(transformers.__version__) >= Version(PATTERN_FROM.get(model_type, "0"))


@pytest.mark.parametrize("family", GENERIC_FAMILIES)
def test_generic_rule_patches_with_identical_outputs(family, merge_calls):
    # Two builds of one seed: some models keep state between calls (Qwen3.5's rope_deltas),
    # so the patched model makes the same sequence of calls as the unpatched one.
    reference = build_or_skip(family).model
    tiny = build_or_skip(family)
    model, inputs = tiny.model, tiny.inputs
    # The module that merges: the inner model, or the whole model (Llama 4 has no inner one).
    path, inner = next((p, m) for p, m in model.named_modules() if type(m).__name__ == tiny.inner_model_class)
    assert inner.config.model_type not in SPEC_MODEL_TYPES  # what this file is about
    with torch.no_grad():
        want = reference(**inputs)
        want_tokens = reference.generate(**inputs, max_new_tokens=3, do_sample=False)
    before = dict(inner.__dict__)
    with torch.no_grad():
        report = mmkernels.patch(model, kernels=["merge"])
        if not follows_pattern_here(inner.config.model_type):
            assert report.replaced == [] and derive_merge_spec(type(inner)).reasons[0] in str(report)
            assert_same_output(model(**inputs), want)
            mmkernels.unpatch(model)
            return
        try:
            merged = [r for r in report.replaced if r.method == "forward"]
            assert [(r.module_path, r.family) for r in merged] == [(path, f"{type(inner).__name__} (generic rule)")]
            assert "merge_multimodal_embeddings" in str(report)
            got = model(**inputs)
            assert len(merge_calls) == 1  # the op merged, not the original forward
            assert_same_output(got, want)
            assert torch.equal(model.generate(**inputs, max_new_tokens=3, do_sample=False), want_tokens)
            assert len(merge_calls) == 2  # generate's prefill merged too; decode steps carry no media
        finally:
            mmkernels.unpatch(model)
    # The same instance attributes as before patch (values the model's own calls change,
    # such as Qwen3.5's rope_deltas, aside), and no forward on the instance.
    assert set(inner.__dict__) == set(before) and "forward" not in inner.__dict__
    assert ORIGINALS_ATTR not in inner.__dict__


def test_generic_rule_count_mismatch_raises_hugging_faces_error():
    tiny = zoo.build("internvl")
    model, inputs = tiny.model, tiny.inputs
    ids = inputs["input_ids"].clone()
    ids[0, ids[0].tolist().index(tiny.placeholder_ids["image"])] = 7  # one placeholder fewer
    with torch.no_grad(), pytest.raises(ValueError) as unpatched:
        model(**{**inputs, "input_ids": ids})
    mmkernels.patch(model, kernels=["merge"])
    try:
        with torch.no_grad(), pytest.raises(ValueError, match="Image features and image tokens do not match") as got:
            model(**{**inputs, "input_ids": ids})
    finally:
        mmkernels.unpatch(model)
    assert str(got.value) == str(unpatched.value)  # Hugging Face's own words and counts


def test_generic_rule_never_takes_a_spec_family():
    rule = GenericMergeRule(SPEC_MODEL_TYPES)
    llava = zoo.build("llava")
    assert not rule.matches(llava.model.model)
    report = mmkernels.patch(llava.model, kernels=["merge"])
    try:
        assert [r.family for r in report.replaced] == ["LLaVA"]
    finally:
        mmkernels.unpatch(llava.model)


def _modality_calls(spec):
    return {m.kind: (m.trigger, m.positional, m.keywords, m.passes_forward_kwargs, m.feature_method)
            for m in spec.modalities}  # fmt: skip


@pytest.mark.parametrize("spec", [s for s in MERGE_SPECS if s.modalities[0].feature_method], ids=lambda s: s.model_type)
def test_derived_calls_equal_the_hand_written_specs(spec):
    """Where a spec family's forward follows the pattern, the rule reads the same feature
    calls as the spec states (the spec's triggers and covered media)."""
    cls = getattr(transformers, spec.model_class, None)
    if cls is None:  # a family newer than this transformers (Molmo2 on 5.17)
        pytest.skip(f"transformers {transformers.__version__} has no {spec.model_class}")
    derivation = derive_merge_spec(cls)
    if derivation.spec is None:
        # The spec exists because this forward deviates: say where, never silently.
        assert derivation.reasons
        return
    derived = _modality_calls(derivation.spec)
    for kind, call in _modality_calls(spec).items():
        if kind in derived:
            assert derived[kind][:3] + derived[kind][4:] == call[:3] + call[4:], kind
            # A spec states one forward-kwargs choice for all versions; where the forward
            # passes its **kwargs (LLaVA from 5.18 on), the spec must too.
            assert call[3] or not derived[kind][3], kind
    assert derivation.spec.keeps_input_ids == spec.keeps_input_ids


@pytest.mark.parametrize(
    ("class_name", "why"),
    [
        # Qwen3-VL: M-RoPE positions from input_ids, which its forward refuses beside inputs_embeds
        # (and its deepstack features use the placeholder mask).
        ("Qwen3VLModel", "reads input_ids"),
        # Gemma 3n: per-layer inputs and its markers' embedders read input_ids (its spec covers
        # it: tests/test_gemma3n_hf.py).
        ("Gemma3nModel", "input_ids"),
        # Gemma 4 (and Unified): every placeholder looked up as the pad id, per-layer inputs
        # from those ids (its spec covers both: tests/test_gemma4_hf.py).
        ("Gemma4Model", "reads input_ids"),
        ("Gemma4UnifiedModel", "reads input_ids"),
        # Ovis2: its visual indicators are written by input_ids masks after the scatter (its
        # spec covers it with the op's broadcast kinds: tests/test_ovis2_hf.py).
        ("Ovis2Model", "input_ids"),
        # Granite Speech (and Plus): its text lookup replaces the audio ids by 0, and it merges
        # in get_merged_audio_embeddings after a boolean selection by input_features_mask (its
        # spec covers it, the selection included: tests/test_granite_speech_hf.py).
        ("GraniteSpeechModel", "reads input_ids"),
        ("GraniteSpeechPlusModel", "reads input_ids"),
        ("Qwen2_5OmniThinkerModel", "masked_scatter"),
        # LLaVA-NeXT-Video flattens its video features before the scatter (its spec covers it,
        # the count it prints included: tests/test_llava_next_video_hf.py); 5.17 reads them in
        # a comprehension first, 5.25 the scatter of the flattened features.
        ("LlavaNextVideoModel", ("masked_scatter", "video_features")),
        # GLM-4.6V reads input_ids for M-RoPE (its spec is GLM-4.1V's). (SmolVLM, whose spec
        # is Idefics3's, is refused on 5.25 for its text lookup through text_model; 5.17's
        # has no get_placeholder_mask at all, so the rule does not read it.)
        ("Glm46VModel", "reads input_ids"),
        ("GotOcr2Model", "pixel_values.to("),
        # VipLLaVA defaults vision_feature_layer from its config before passing it on.
        ("VipLlavaModel", "rebinds vision_feature_layer"),
    ],
)
def test_deviating_forwards_are_refused_with_the_place(class_name, why):
    cls = getattr(transformers, class_name, None)
    if cls is None:
        pytest.skip(f"transformers {transformers.__version__} has no {class_name}")
    derivation = derive_merge_spec(cls)
    assert derivation.spec is None and derivation.merges_here
    # why: the words of the reason, or a tuple of the words of each version's reason.
    assert any(w in derivation.reasons[0] for w in (why if isinstance(why, tuple) else (why,)))
    assert "line" in derivation.reasons[0]


def test_deviating_model_is_skipped_in_the_report():
    """A deviating model is not patched, and the report says why (here by a stand-in
    subclass whose forward scales the features before the scatter)."""
    model = zoo.build("internvl").model
    inner = model.model

    class ScaledInternVLModel(type(inner)):
        def forward(self, input_ids=None, pixel_values=None, inputs_embeds=None, **kwargs):
            if inputs_embeds is None:
                inputs_embeds = self.get_input_embeddings()(input_ids)
            if pixel_values is not None:
                image_features = self.get_image_features(pixel_values=pixel_values, return_dict=True).pooler_output
                image_features = image_features * 2
                mask = self.get_placeholder_mask(input_ids, inputs_embeds=inputs_embeds, image_features=image_features)
                inputs_embeds = inputs_embeds.masked_scatter(mask, image_features)
            return self.language_model(inputs_embeds=inputs_embeds, **kwargs)

    inner.__class__ = ScaledInternVLModel
    report = mmkernels.patch(model, kernels=["merge"])
    assert report.replaced == []
    assert any("image_features" in s.reason and "line" in s.reason for s in report.skipped), str(report)


def test_every_installed_model_with_the_pattern_is_read():
    rows = installed_coverage(SPEC_MODEL_TYPES)
    assert rows, "transformers has models with get_placeholder_mask"
    patched = {model_type for model_type, _, d in rows if d.spec is not None}
    for model_type, name, derivation in rows:
        assert (derivation.spec is None) == bool(derivation.reasons), name
    for model_type in ("internvl", "mistral3", "aya_vision", "cohere2_vision", "qwen3_5", "qwen3_5_moe", "janus"):
        if model_type in {m for m, _, _ in rows}:
            assert (model_type in patched) == follows_pattern_here(model_type), model_type
    table = mmkernels.supported_models()
    assert "Merged by the generic rule" in table and "| internvl | InternVLModel |" in table


def test_a_generic_patched_model_copies_patched(merge_calls):
    """deepcopy (pickle takes the same __reduce_ex__ path, tests/test_patch_hf.py; an
    InternVL whose vision tower has run does not pickle, patched or not: transformers'
    output-capturing hooks are local functions)."""
    import copy

    tiny = zoo.build("internvl")
    model, inputs = tiny.model, tiny.inputs
    mmkernels.patch(model, kernels=["merge"])
    try:
        with torch.no_grad():
            want = model(**inputs).logits
            clone = copy.deepcopy(model)
            calls = len(merge_calls)
            assert torch.equal(clone(**inputs).logits, want)
            assert len(merge_calls) == calls + 1  # the copy merges through the op too
            assert clone.model.forward.__self__ is clone.model
            mmkernels.unpatch(clone)
            assert "forward" not in clone.model.__dict__ and ORIGINALS_ATTR not in clone.model.__dict__
    finally:
        mmkernels.unpatch(model)
