"""Gemma 3n's merge (integrations/hf_specs.py): images and audio merged into the text by ONE
call of ``mmkernels.ops.merge_multimodal_embeddings``, on the zoo's tiny Gemma 3n (timm's
test ConvNeXt through TimmWrapperModel, a 2-layer conformer, Triton's interpreter on the
CPU).

What tests/test_patch_hf.py checks for every spec family (fp32 outputs bit-identical with
the count check on and off, greedy tokens, ``save_pretrained``, ``unpatch``, host syncs,
a count mismatch) runs on this one too; here what is Gemma 3n's own: both media in one op
call, in float64 as well, the audio rows padded as the forward pads them; the text rows the
op keeps are the forward's (its image and audio markers embedded by ``embed_vision`` /
``embed_audio``), and the per-layer inputs its text model gets are looked up from the ids
as the forward does; calls with one medium; greedy generation (images encoded by
``generate``, the audio raw); encoder outputs passed by the caller; the count errors in
the forward's words; the calls that run the original forward and why; and specs that merge
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
from mmkernels.integrations.hf_merge import Call, Features  # noqa: E402
from mmkernels.integrations.hf_specs import MERGE_SPECS, gemma3n_audio_features, gemma3n_per_layer_inputs  # noqa: E402
from zoo_helpers import assert_same_output, build_or_skip, patched, patched_by_spec, unpatched_and_patched  # noqa: E402

FAMILY = "gemma3n"
NEW_TOKENS = 4
(SPEC,) = [s for s in MERGE_SPECS if s.model_type == FAMILY]


@pytest.fixture(scope="module")
def tiny():
    return build_or_skip(FAMILY)


def ids_of(tiny, *kinds) -> list[int]:
    return [tiny.placeholder_ids[kind] for kind in kinds]


def takes_encoder_outputs(model) -> bool:
    return "mm_encoder_outputs" in inspect.signature(model.model.forward).parameters


def token_id(tiny, token: str) -> int:
    return tiny.tokenizer.convert_tokens_to_ids(token)


def replaced(ids: torch.Tensor, token: int, by: int, *, last: bool = True) -> torch.Tensor:
    """``ids`` with the last (or first) ``token`` replaced by ``by``."""
    ids = ids.clone()
    positions = (ids == token).nonzero()
    ids[tuple(positions[-1 if last else 0])] = by
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


# --------------------------------------------------------------------------------------
# Merged: one op call for both media


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_images_and_audio_merge_in_one_op_call(merge_spy, dtype):
    """Sample 0 holds an image and a clip, sample 1 two clips and two images: one op call
    takes both kinds (the images' rows as the tower gave them, the clips' padded to the
    processor's 8 placeholders each), and the output is bit-identical, the inner model's
    own output too (its image and audio encoder outputs included)."""
    tiny = build_or_skip(FAMILY, dtype=dtype)
    got, want = unpatched_and_patched(tiny.model, tiny.inputs)
    assert merge_spy.calls == 1
    assert merge_spy.placeholder_ids() == ids_of(tiny, "image", "audio")
    images, audio = merge_spy.features()
    ids = tiny.inputs["input_ids"]
    clips = tiny.inputs["input_features"].shape[0]
    per_clip = tiny.model.config.audio_soft_tokens_per_image
    per_image = tiny.model.config.vision_soft_tokens_per_image
    assert [r.shape[0] for r in images] == [len(tiny.inputs["pixel_values"]) * per_image]
    assert [r.shape[0] for r in audio] == [clips * per_clip] == [int((ids == tiny.placeholder_ids["audio"]).sum())]
    assert got.logits.dtype == dtype
    assert_same_output(got, want)

    got, want = unpatched_and_patched(tiny.model.model, tiny.inputs)
    assert merge_spy.calls == 2
    assert_same_output(got, want)
    if hasattr(got, "audio_outputs"):  # the encoder outputs (5.24 on)
        assert got.image_outputs is not None and got.audio_outputs is not None
    else:  # the cast features, the audio padded (5.17)
        assert got.image_hidden_states is not None and got.audio_hidden_states.shape[:2] == (clips, per_clip)


def test_audio_rows_are_padded_as_the_forward_pads_them(tiny):
    """Each clip's rows past its end, and the rows up to audio_soft_tokens_per_image, are the
    embedding of the last audio id: the clips of the batch end at different rows, and the
    longest ends before the 8th, so both kinds of padding are there."""
    model, inputs = tiny.model.model, tiny.inputs
    with torch.no_grad():
        found = gemma3n_audio_features(model, Call(dict(inputs), {}))
        encoder = model.get_audio_features(inputs["input_features"], ~inputs["input_features_mask"])
        last_id = torch.tensor([[model.vocab_size - 1]])
        padding = model.embed_audio(input_ids=last_id)[0, 0]
    per_clip = model.config.audio_soft_tokens_per_image
    rows = found.rows[0].reshape(-1, per_clip, padding.shape[-1])
    valid = (~encoder.audio_mel_mask).sum(-1).tolist()
    assert len(set(valid)) > 1 and max(valid) < per_clip, valid
    for clip, n in enumerate(valid):
        assert torch.equal(rows[clip, :n], encoder.pooler_output[clip, :n])
        assert all(torch.equal(row, padding) for row in rows[clip, n:])
    assert torch.equal(found.encoder_output.audio_mel_mask, encoder.audio_mel_mask)
    assert torch.equal(found.pooled, rows)  # what 5.17's output field carries: the padded clips


def test_the_text_rows_the_op_keeps_are_the_forwards(tiny, merge_spy, monkeypatch):
    """The text rows handed to the op are the forward's own before its scatter, bit for bit:
    its image and audio markers (<end_of_image>, <end_of_audio>) embedded by embed_vision /
    embed_audio, not by the text table (which would give other rows there)."""
    model, inputs = tiny.model, tiny.inputs
    inner = model.model
    seen = []
    original = inner.get_placeholder_mask

    def recording(input_ids, inputs_embeds=None, **kwargs):
        seen.append(inputs_embeds.clone())
        return original(input_ids, inputs_embeds=inputs_embeds, **kwargs)

    with monkeypatch.context() as scope, torch.no_grad():  # (merge_spy's patch stays)
        scope.setattr(inner, "get_placeholder_mask", recording)
        model(**inputs)
    forwards = seen[0]  # the first check: before any scatter
    with torch.no_grad(), patched(model):
        model(**inputs)
    args, _ = merge_spy.last
    kept = args[1]
    ids = inputs["input_ids"]
    text = (ids != tiny.placeholder_ids["image"]) & (ids != tiny.placeholder_ids["audio"])
    assert torch.equal(kept[text], forwards[text])
    table = inner.get_input_embeddings()
    with torch.no_grad():
        for marker in ("<end_of_image>", "<end_of_audio>"):
            at = ids == token_id(tiny, marker)
            assert at.any(), marker
            assert not torch.equal(kept[at], table(ids[at])), f"{marker}: the text table's rows"


def test_one_medium_in_the_call(tiny, merge_spy):
    """Images alone, then audio alone: the op takes the kind present."""
    model, inputs = tiny.model, tiny.inputs
    images, clips = model.config.vision_soft_tokens_per_image, model.config.audio_soft_tokens_per_image
    expanded = {"image": "<start_of_image>" + "<image_soft_token>" * images + "<end_of_image>",
                "audio": "<start_of_audio>" + "<audio_soft_token>" * clips + "<end_of_audio>"}  # fmt: skip
    for kind, media in (("image", {"pixel_values": inputs["pixel_values"][:1]}),
                        ("audio", {"input_features": inputs["input_features"][:1],
                                   "input_features_mask": inputs["input_features_mask"][:1]})):  # fmt: skip
        text = f"user : {expanded[kind]} describe it . assistant :"
        call = {**tiny.tokenizer([text], return_tensors="pt"), **media}
        merge_spy.reset()
        got, want = unpatched_and_patched(model, call)
        assert merge_spy.calls == 1 and merge_spy.placeholder_ids() == ids_of(tiny, kind), kind
        assert_same_output(got, want)


def test_generate_merges_the_prefill_once(tiny, merge_spy):
    """generate encodes the images before the prefill (mm_encoder_outputs, from 5.18) and
    passes the audio raw: the prefill merges both in one call; decode steps carry no media.
    The same greedy tokens; unpatch leaves no trace."""
    model, inputs = tiny.model, tiny.inputs
    with torch.no_grad():
        want = model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False)
        with patched(model):
            got = model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False)
    assert merge_spy.calls == 1 and merge_spy.placeholder_ids() == ids_of(tiny, "image", "audio")
    assert torch.equal(got, want), f"{got} vs {want}"
    assert all(ORIGINALS_ATTR not in m.__dict__ for m in model.modules())


def test_unpatch_restores_the_original_forwards(tiny, merge_spy):
    """Both replaced forwards (the inner model's and its text model's) go back to the
    class's, and the model runs its own merge again."""
    model, inputs = tiny.model, tiny.inputs
    with torch.no_grad():
        want = model(**inputs)
        report = mmkernels.patch(model, kernels=["merge"])
        assert [(r.module_path, r.class_name) for r in report.replaced] == [
            ("model", "Gemma3nModel"), ("model.language_model", "Gemma3nTextModel")
        ]
        model(**inputs)
        mmkernels.unpatch(model)
        assert merge_spy.calls == 1
        for module in (model.model, model.model.language_model):
            assert "forward" not in module.__dict__ and ORIGINALS_ATTR not in module.__dict__
            assert module.forward.__func__ is type(module).forward
        assert_same_output(model(**inputs), want)
    assert merge_spy.calls == 1


def test_encoder_outputs_from_the_caller_are_merged(tiny, merge_spy):
    """Images encoded by the caller (mm_encoder_outputs, as generate passes them) next to
    raw audio: merged in one call, and the output carries the caller's image output."""
    model, inputs = tiny.model, dict(tiny.inputs)
    if not takes_encoder_outputs(model):
        pytest.skip(f"transformers {transformers.__version__}'s forward takes no mm_encoder_outputs")
    with torch.no_grad():
        encoded = {"image": model.model.get_image_features(inputs.pop("pixel_values"))}
    got, want = unpatched_and_patched(model, {**inputs, "mm_encoder_outputs": encoded})
    assert merge_spy.calls == 1 and merge_spy.placeholder_ids() == ids_of(tiny, "image", "audio")
    assert_same_output(got, want)
    assert got.image_outputs is encoded["image"]


# --------------------------------------------------------------------------------------
# Count errors in the forward's words


@pytest.mark.parametrize("dropped", [("image",), ("audio",), ("image", "audio")], ids="+".join)
def test_a_count_mismatch_raises_the_forwards_error(tiny, merge_spy, dropped):
    """One placeholder fewer of a kind (or of both: the forward checks the images first):
    the patched merge raises the forward's ValueError, word for word and count for count."""
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
    placeholders keep their own embeddings), so the original runs: the same output, or
    where the forward fails on it (5.17 reads its never-assigned audio features for its
    output), the same error."""
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


def test_audio_in_encoder_outputs_runs_the_original(tiny, merge_spy):
    """The forward takes its audio from input_features only and ignores
    mm_encoder_outputs["audio"]: merging it would change the output, so the original runs."""
    model, inputs = tiny.model, dict(tiny.inputs)
    if not takes_encoder_outputs(model):
        pytest.skip(f"transformers {transformers.__version__}'s forward takes no mm_encoder_outputs")
    with torch.no_grad():
        encoded = {
            "image": model.model.get_image_features(inputs.pop("pixel_values")),
            "audio": model.model.get_audio_features(inputs["input_features"], ~inputs["input_features_mask"]),
        }
    got, want = unpatched_and_patched(model, {**inputs, "mm_encoder_outputs": encoded})
    assert merge_spy.calls == 0
    assert_same_output(got, want)
    assert "ignores" in SPEC.needs_original(model.model, Call({"mm_encoder_outputs": encoded}, {}))


def test_per_layer_inputs_beside_input_ids_raise_the_forwards_error(tiny, merge_spy):
    """per_layer_inputs next to input_ids: the forward refuses them (5.25) or cannot take
    them twice (5.17); the patched model runs it, so the same error comes."""
    model, inputs = tiny.model, tiny.inputs
    with torch.no_grad():
        per_layer = gemma3n_per_layer_inputs(model.model, (), [], inputs["input_ids"])["per_layer_inputs"]
    call = {**inputs, "per_layer_inputs": per_layer}
    got, want = raised_unpatched_and_patched(model.model, call, (ValueError, TypeError))
    assert got == want and "per_layer_inputs" in want
    assert merge_spy.calls == 0


# --------------------------------------------------------------------------------------
# The checks can fail: a spec that merges wrongly changes the logits


# (Each keeps its encoder output and pooled tensor: 5.17's output fields carry the latter.)
def _images_swapped(model, call):
    outputs = model.get_image_features(call.get("pixel_values"), return_dict=True)
    swapped = outputs.pooler_output.flip(0)
    return Features(rows=[swapped.reshape(-1, swapped.shape[-1])], encoder_output=outputs, pooled=swapped)


def _audio_padded_with_zeros(model, call):
    found = gemma3n_audio_features(model, call)
    rows = found.rows[0].clone()
    padding = model.embed_audio(input_ids=torch.full((1, 1), model.vocab_size - 1))[0, 0]
    rows[(rows == padding).all(-1)] = 0
    return dataclasses.replace(found, rows=[rows])


WRONG_SPECS = {
    # The images' rows in reverse image order (sample 1's two images swapped, sample 0's
    # image given sample 1's last).
    "images-swapped": lambda spec: dataclasses.replace(spec, modalities=(
        dataclasses.replace(spec.modalities[0], feature_method=None, feature_function=_images_swapped),
        spec.modalities[1],
    )),
    # The clips' padding rows left as zeros instead of the last audio id's embedding.
    "audio-padding-zeros": lambda spec: dataclasses.replace(spec, modalities=(
        spec.modalities[0],
        dataclasses.replace(spec.modalities[1], feature_function=_audio_padded_with_zeros),
    )),
    # The markers embedded by the text table, not by embed_vision / embed_audio.
    "text-table-markers": lambda spec: dataclasses.replace(spec, token_range_embedders=()),
    # No per-layer inputs from the ids (what calling the forward with inputs_embeds alone gives).
    "no-per-layer-inputs": lambda spec: dataclasses.replace(spec, language_model_inputs=None),
}  # fmt: skip


@pytest.mark.parametrize("wrong", list(WRONG_SPECS))
def test_a_wrong_merge_changes_the_logits(tiny, merge_spy, wrong):
    """The spec changed in one point: the logits change, so the bit-identical checks above
    would catch a spec that merged that point wrongly."""
    model, inputs = tiny.model, tiny.inputs
    spec = WRONG_SPECS[wrong](SPEC)
    with torch.no_grad():
        want = model(**inputs).logits
        with patched_by_spec(model, spec):
            got = model(**inputs).logits
    assert merge_spy.calls == 1
    assert not torch.equal(got, want)
    if wrong == "images-swapped":
        # Only the rows from the first image on can change: the text before it is the same.
        first = int((inputs["input_ids"][1] == tiny.placeholder_ids["image"]).nonzero()[0])
        assert torch.equal(got[1, :first], want[1, :first])
