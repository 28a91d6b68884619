"""Granite Speech's merge (integrations/hf_specs.py), and Granite Speech Plus's (the same
forward): the clips' projected rows, selected by ``input_features_mask``, merged into the
text by ONE call of ``mmkernels.ops.merge_multimodal_embeddings``, on the zoo's tiny models
(a 2-layer conformer, a Q-Former projector, Granite; Triton's interpreter on the CPU).

What tests/test_patch_hf.py checks for every spec family (fp32 outputs bit-identical with
the count check on and off, greedy tokens, ``save_pretrained``, ``unpatch``, host syncs, a
count mismatch) runs on these too; here what is Granite Speech's own: the rows the op is
given are the mask's selection of the padded batch's rows (float64 too), a mask that is not
a prefix, a call without a mask (every row merged), the host sync the selection keeps (and
none without a mask), the count errors in the forward's words, calls that run the original,
and a spec that forgets the selection, which must change the logits (so the bit-identical
checks can fail).
"""

import dataclasses

import pytest
import torch

transformers = pytest.importorskip("transformers")

from mmkernels.integrations.hf_merge import Call  # noqa: E402
from mmkernels.integrations.hf_specs import MERGE_SPECS, granite_speech_audio_features  # noqa: E402
from mmkernels.testing import HostSyncCounter  # noqa: E402
from zoo_helpers import assert_same_output, build_or_skip, patched, patched_by_spec, unpatched_and_patched  # noqa: E402

FAMILIES = ("granite_speech", "granite_speech_plus")
SPECS = {s.model_type: s for s in MERGE_SPECS if s.model_type in FAMILIES}


@pytest.fixture(scope="module", params=FAMILIES)
def tiny(request):
    return build_or_skip(request.param)


def audio_id(tiny) -> int:
    return tiny.placeholder_ids["audio"]


def projected(tiny) -> torch.Tensor:
    """The projector's rows of every clip of the padded batch, ``(clips, rows, D)``."""
    with torch.no_grad():
        return tiny.model.model.get_audio_features(tiny.inputs["input_features"]).pooler_output


def raised_unpatched_and_patched(model, inputs) -> tuple[str, str]:
    """The ValueError texts of the patched and the unpatched forward on ``inputs``."""
    with torch.no_grad():
        with pytest.raises(ValueError) as unpatched:
            model(**inputs)
        with patched(model), pytest.raises(ValueError) as got:
            model(**inputs)
    return str(got.value), str(unpatched.value)


def expanded_ids(tiny, counts: list[list[int]]) -> dict:
    """input_ids and attention_mask of the zoo's prompts with each audio placeholder
    repeated by ``counts[sample][clip]`` (left padded, as the zoo's)."""
    texts = []
    for sample, per_clip in zip(("user : <|audio|> what is this sound ? assistant :",
                                 "user : first <|audio|> then <|audio|> , which one is larger ? assistant :"),
                                counts):  # fmt: skip
        head, *tails = sample.split("<|audio|>")
        texts.append(head + "".join("<|audio|>" * n + tail for n, tail in zip(per_clip, tails)))
    encoded = tiny.tokenizer(texts, padding=True, return_tensors="pt")
    return {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}


# --------------------------------------------------------------------------------------
# Merged: one op call, the mask's rows


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("family", FAMILIES)
def test_masked_rows_merge_in_one_op_call(family, dtype, merge_spy):
    """Three clips of 0.45, 0.8 and 0.3 s padded to the longest (9 rows each), the mask
    keeping 6, 9 and 3: one op call gets exactly those rows, clip after clip, and the output
    is bit-identical, the inner model's too (its ``audio_hidden_states``: the projector's
    rows unselected)."""
    tiny = build_or_skip(family, dtype=dtype)
    got, want = unpatched_and_patched(tiny.model, tiny.inputs)
    assert merge_spy.calls == 1
    assert merge_spy.placeholder_ids() == [audio_id(tiny)]
    (rows,) = merge_spy.features()
    mask = tiny.inputs["input_features_mask"]
    assert mask.sum(-1).tolist() == [6, 9, 3] and mask.shape == (3, 9)
    everything = projected(tiny)
    assert len(rows) == 1 and torch.equal(rows[0], torch.cat([everything[i, :n] for i, n in enumerate([6, 9, 3])]))
    assert rows[0].shape[0] == int((tiny.inputs["input_ids"] == audio_id(tiny)).sum())
    assert got.logits.dtype == dtype
    assert_same_output(got, want)

    got, want = unpatched_and_patched(tiny.model.model, tiny.inputs)
    assert merge_spy.calls == 2
    assert got.audio_hidden_states is not None and got.audio_hidden_states.shape[:2] == (3, 9)
    assert_same_output(got, want)


def test_a_mask_that_is_not_a_prefix(tiny, merge_spy):
    """The forward selects whatever rows the mask marks, in row-major order; so does the
    pre-step: each clip's LAST rows instead of its first (the same counts) merge
    bit-identically, and change the logits (the selection reaches the text model)."""
    mask = tiny.inputs["input_features_mask"].flip(-1)
    inputs = {**tiny.inputs, "input_features_mask": mask}
    got, want = unpatched_and_patched(tiny.model, inputs)
    assert merge_spy.calls == 1
    assert_same_output(got, want)
    (rows,) = merge_spy.features()
    assert torch.equal(rows[0], projected(tiny)[mask])
    with torch.no_grad():
        prefix = tiny.model(**tiny.inputs).logits
    assert not torch.equal(got.logits[1], prefix[1])


def test_without_a_mask_every_row_merges(tiny, merge_spy):
    """No ``input_features_mask``: the forward merges every row of the padded batch (9 per
    clip); the pre-step too, with no host sync for a selection."""
    inputs = {**expanded_ids(tiny, [[9], [9, 9]]), "input_features": tiny.inputs["input_features"]}
    got, want = unpatched_and_patched(tiny.model, inputs)
    assert merge_spy.calls == 1
    assert_same_output(got, want)
    (rows,) = merge_spy.features()
    assert torch.equal(rows[0], projected(tiny).reshape(-1, rows[0].shape[-1]))


def test_host_syncs(tiny):
    """Without the count check the patched forward syncs as often as its text model alone
    plus the mask's selection (one boolean index, whose row count is data), and without a
    mask exactly as often as its text model; the unpatched forward syncs more (its id-0
    lookup's boolean write, the selection, its count check)."""
    model = tiny.model
    ids, attention = tiny.inputs["input_ids"], tiny.inputs["attention_mask"]
    no_mask = {**expanded_ids(tiny, [[9], [9, 9]]), "input_features": tiny.inputs["input_features"]}
    with torch.no_grad():
        embeds = model.get_input_embeddings()(ids.masked_fill(ids == audio_id(tiny), 0))
        with HostSyncCounter() as text_model:
            model.model.language_model(inputs_embeds=embeds, attention_mask=attention)
        with HostSyncCounter() as unpatched:
            model(**tiny.inputs)
        with patched(model, check_placeholders=False):
            with HostSyncCounter() as syncs:
                model(**tiny.inputs)
            with HostSyncCounter() as syncs_no_mask:
                model(**no_mask)
    assert syncs.count == text_model.count + 1, (syncs, text_model)
    assert syncs.ops.get("aten.index (boolean mask)") == 1, syncs
    assert syncs_no_mask.count == text_model.count, (syncs_no_mask, text_model)
    assert unpatched.count >= text_model.count + 3, (unpatched, text_model)


# --------------------------------------------------------------------------------------
# Count errors: the forward's words


def test_one_placeholder_fewer_or_more_raises_the_forwards_error(tiny, merge_spy):
    """Its count check prints the placeholder count and the selected rows (18 of them)."""
    ids = tiny.inputs["input_ids"]
    positions = (ids == audio_id(tiny)).nonzero()
    fewer = ids.clone()
    fewer[tuple(positions[-1])] = tiny.tokenizer.convert_tokens_to_ids(".")
    got, want = raised_unpatched_and_patched(tiny.model, {**tiny.inputs, "input_ids": fewer})
    assert got == want == "Audio features and audio tokens do not match, tokens: 17, features: 18"
    assert merge_spy.calls == 1

    more = ids.clone()
    row, column = positions[-1].tolist()
    more[row, column + 1] = audio_id(tiny)  # the text token after the last clip
    got, want = raised_unpatched_and_patched(tiny.model, {**tiny.inputs, "input_ids": more})
    assert got == want == "Audio features and audio tokens do not match, tokens: 19, features: 18"


def test_without_a_mask_the_error_prints_the_clips(tiny):
    """Without a mask its count check compares every row (27) and prints the first
    dimension of the unselected features: the clips (3)."""
    inputs = {**tiny.inputs}
    del inputs["input_features_mask"]
    got, want = raised_unpatched_and_patched(tiny.model, inputs)
    assert got == want == "Audio features and audio tokens do not match, tokens: 18, features: 3"


# --------------------------------------------------------------------------------------
# The original forward


def test_calls_that_run_the_original(tiny, merge_spy):
    """Text only, and embeddings given (with the audio the forward raises its own error):
    the original forward, no op call."""
    model = tiny.model
    text = {"input_ids": tiny.inputs["input_ids"], "attention_mask": tiny.inputs["attention_mask"]}
    got, want = unpatched_and_patched(model, text)
    assert_same_output(got, want)
    with torch.no_grad():
        embeds = model.get_input_embeddings()(text["input_ids"])
    inputs = {"inputs_embeds": embeds, "attention_mask": text["attention_mask"],
              "input_features": tiny.inputs["input_features"]}  # fmt: skip
    got, want = raised_unpatched_and_patched(model, inputs)
    assert got == want and "input_features and inputs_embeds" in got
    assert merge_spy.calls == 0


# --------------------------------------------------------------------------------------
# A wrong spec: the checks can fail


def test_a_spec_that_forgets_the_selection_changes_the_logits(tiny, merge_spy):
    """Patched by a spec that merges the first rows of the padded batch as they come (the
    count right, the mask ignored), the second prompt's clips take the first clip's
    padding rows: its logits change from its first clip on, and the first prompt's (whose
    clip is the batch's first) do not."""
    spec = SPECS[tiny.family]

    def unselected(model, call: Call):
        found = granite_speech_audio_features(model, Call({**call.named, "input_features_mask": None}, call.extra))
        kept = int(call.get("input_features_mask").sum())
        return dataclasses.replace(found, rows=[found.rows[0][:kept]])

    wrong = dataclasses.replace(spec, modalities=(dataclasses.replace(spec.modalities[0], feature_function=unselected),))
    model, inputs = tiny.model, tiny.inputs
    with torch.no_grad():
        want = model(**inputs).logits
        with patched_by_spec(model, wrong) as report:
            assert [(r.module_path, r.class_name) for r in report.replaced] == [("model", spec.model_class)]
            got = model(**inputs).logits
    assert merge_spy.calls == 1
    assert torch.equal(got[0], want[0])
    first = int((inputs["input_ids"][1] == audio_id(tiny)).nonzero()[0])
    assert torch.equal(got[1, :first], want[1, :first])
    assert not torch.equal(got[1, first:], want[1, first:])
