"""Mllama (Llama-3.2-Vision) text-to-vision cross-attention through
:func:`mmkernels.ops.varlen_attention`, fed from the compact cross-attention mask (B, S,
images, tiles) converted on the device (:func:`hf_attention.mllama_cross_mask`), on the
tiny ``mllama`` zoo model (Triton's interpreter on the CPU).

What each test proves:

* patched (``attn_implementation="mmkernels"`` + the engine rules) vs unpatched SDPA:
  fp32 logits within 1e-5 relative error, the same greedy tokens; the cross-attention
  layer and the text self-attention run the op (counted routes), transformers'
  ``_prepare_cross_attention_mask`` (the dense (B, 1, S, images x tiles x tokens) mask) is
  never called, in the forward or in ``generate``; ``unpatch`` restores, ``state_dict``
  keys unchanged;
* the conversion itself: padded tiles are moved behind the seen tiles (a token that sees
  two back-to-back images of 3 and 2 tiles gets ONE interval of 5 tiles), tokens with no
  image attend to every key (what transformers' dense mask does once it is multiplied by
  ``full_text_row_masked_out_mask``; their MLP output is then zeroed by ``row_mask``,
  which equals transformers' ``full_text_row_masked_out_mask``), one host sync;
* a token that sees non-consecutive images cannot be one interval: the dense path runs,
  with the reason, and the output equals the unpatched model's;
* without the "mmkernels" implementation on the text model, the rule is not applied and
  the report says why.
"""

import pytest  # noqa: E402
import torch  # noqa: E402

transformers = pytest.importorskip("transformers")

from mmkernels import zoo  # noqa: E402
from mmkernels.integrations import engine  # noqa: E402
from mmkernels.integrations import hf_attention as ha  # noqa: E402
from mmkernels.testing import HostSyncCounter, relative_error  # noqa: E402

RTOL = 1e-5
NEW_TOKENS = 4


def _forward(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


def _generate(model, inputs):
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False)
    return out[:, inputs["input_ids"].shape[1]:]


def _patch(model):
    return engine.patch_model(model, ha.ATTENTION_RULES, kernels=["attention"], options=engine.PatchOptions())


@pytest.fixture(scope="module")
def mllama():
    ha.register_attention()
    tiny = zoo.build("mllama")
    logits = _forward(tiny.model, tiny.inputs)
    tokens = _generate(tiny.model, tiny.inputs)
    return tiny, logits, tokens


@pytest.fixture
def dense_mask_calls(monkeypatch):
    from transformers.models.mllama import modeling_mllama

    calls = []
    original = modeling_mllama._prepare_cross_attention_mask

    def spy(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(modeling_mllama, "_prepare_cross_attention_mask", spy)
    return calls


def test_zoo_mllama_exercises_padded_tiles_and_rows_without_image(mllama):
    tiny = mllama[0]
    mask = tiny.inputs["cross_attention_mask"]
    tiles_seen = mask.sum(-1)  # (B, S, images)
    assert (tiles_seen.sum(-1) == 0).any(), "some tokens see no image"
    # Sample 1: after the two back-to-back images, tokens see 3 tiles of image 1 and 2 of image 2
    # (image 1's 4th tile is padding, between them in the dense key order).
    assert tiles_seen[1, -1].tolist() == [0, 3, 2]


def test_patched_matches_unpatched(mllama, dense_mask_calls):
    tiny, logits, tokens = mllama
    model = tiny.model
    keys = list(model.state_dict())
    model.set_attn_implementation("mmkernels")
    report = _patch(model)
    try:
        assert sorted((r.module_path, r.class_name) for r in report.replaced) == [
            ("model", "MllamaModel"), ("model.language_model", "MllamaTextModel")]  # fmt: skip
        with ha.record_routes() as routes:
            got = _forward(model, tiny.inputs)
        # 1 text self-attention layer + 1 cross-attention layer through the op; the 3 vision
        # layers' aspect-ratio masks (padding rows see the valid keys of every tile, with
        # holes) run SDPA, with that reason.
        assert routes["varlen"] == 2
        assert set(routes) - {"varlen"} == {"sdpa: a mask row is not one contiguous interval of keys"}
        assert dense_mask_calls == []
        error = relative_error(got, logits)
        assert error <= RTOL, f"logits: relative error {error:.3e}"
        assert torch.equal(_generate(model, tiny.inputs), tokens)
        assert dense_mask_calls == []
        assert list(model.state_dict()) == keys
    finally:
        engine.unpatch_model(model)
        model.set_attn_implementation("sdpa")
    assert not any(engine.is_patched(m) for m in model.modules())
    _forward(model, tiny.inputs)
    assert dense_mask_calls == [1]  # unpatched: transformers builds the dense mask again


def test_conversion_on_the_device(mllama):
    tiny = mllama[0]
    compact = tiny.inputs["cross_attention_mask"]
    tokens_per_tile = tiny.model.model.vision_model.num_patches
    batch, length, images, tiles = compact.shape
    with HostSyncCounter() as syncs:
        mask, why = ha.mllama_cross_mask(compact, tokens_per_tile, torch.float32)
    assert why == "" and syncs.count == 1, syncs
    total = images * tiles * tokens_per_tile
    ranges = mask.kv_ranges.view(batch, length, 2)
    sees = compact.reshape(batch, length, -1).bool()
    for b in range(batch):
        for s in range(length):
            start, end = ranges[b, s].tolist()
            if not sees[b, s].any():
                assert (start, end) == (0, total)  # no image: every key, as transformers
                continue
            # The permuted keys in [start, end) are exactly the tokens of the tiles this row sees.
            tiles_in_range = set((mask.key_order[b, start:end] // tokens_per_tile).tolist())
            assert tiles_in_range == set(torch.nonzero(sees[b, s]).flatten().tolist())
            assert (end - start) == int(sees[b, s].sum()) * tokens_per_tile
    assert mask.permute  # sample 1 needs its padded tile moved
    # row_mask is transformers' full_text_row_masked_out_mask.
    from transformers.models.mllama.modeling_mllama import _prepare_cross_attention_mask

    _, full_row = _prepare_cross_attention_mask(compact, tokens_per_tile, torch.float32)
    assert torch.equal(mask.row_mask, full_row)


def test_non_consecutive_images_run_the_dense_path(mllama, dense_mask_calls):
    tiny, logits, _ = mllama
    model = tiny.model
    inputs = dict(tiny.inputs)
    compact = inputs["cross_attention_mask"].clone()
    # Sample 1, last token: images 0 and 2, not image 1 (which other tokens see).
    compact[1, -1, 0, 0] = 1
    compact[1, -1, 1] = 0
    inputs["cross_attention_mask"] = compact
    model.set_attn_implementation("sdpa")
    want = _forward(model, inputs)
    dense_mask_calls.clear()
    model.set_attn_implementation("mmkernels")
    _patch(model)
    try:
        with ha.record_routes() as routes:
            got = _forward(model, inputs)
    finally:
        engine.unpatch_model(model)
        model.set_attn_implementation("sdpa")
    assert routes["sdpa: a text token sees images that are not consecutive"] == 1
    assert dense_mask_calls == [1]
    assert relative_error(got, want) <= RTOL


def test_rule_needs_the_mmkernels_implementation(mllama):
    model = mllama[0].model
    model.set_attn_implementation("sdpa")
    report = _patch(model)
    try:
        assert [r.class_name for r in report.replaced] == ["MllamaTextModel"]  # inert without the outer rule
        (skip,) = [s for s in report.skipped if s.class_name == "MllamaModel"]
        assert "attn_implementation is 'sdpa'" in skip.reason
    finally:
        engine.unpatch_model(model)


def test_calls_the_op_does_not_cover_get_the_dense_mask(mllama):
    """output_attentions=True and dropout in training fall back to transformers' SDPA, which
    needs a tensor: it gets the dense mask the converted one stands for (it got the
    MllamaCrossMask object: "TypeError: attn_mask must be Tensor"), in the original key
    order, equal to transformers' own (issue 16)."""
    tiny = mllama[0]
    model = tiny.model
    compact = tiny.inputs["cross_attention_mask"]
    tokens_per_tile = model.model.vision_model.num_patches
    mask, _ = ha.mllama_cross_mask(compact, tokens_per_tile, torch.float32)
    from transformers.models.mllama.modeling_mllama import _prepare_cross_attention_mask

    dense, _ = _prepare_cross_attention_mask(compact, tokens_per_tile, torch.float32)
    assert mask.permute and torch.equal(mask.dense(torch.float32), dense)

    model.set_attn_implementation("sdpa")
    with torch.no_grad():
        want = model(**tiny.inputs, output_attentions=True).logits
    model.set_attn_implementation("mmkernels")
    _patch(model)
    try:
        with ha.record_routes() as routes, torch.no_grad():
            got = model(**tiny.inputs, output_attentions=True).logits
        assert any("output_attentions" in route for route in routes), routes
        assert relative_error(got, want) <= RTOL
        # Dropout in training: the attention layers read self.dropout (config.dropout).
        layers = [m for m in model.model.language_model.modules() if isinstance(getattr(m, "dropout", None), float)]
        previous = [layer.dropout for layer in layers]
        assert layers
        for layer in layers:
            layer.dropout = 0.5
        model.train()
        try:
            with ha.record_routes() as routes:
                out = model(**tiny.inputs).logits
            assert torch.isfinite(out).all()
            assert any("dropout" in route for route in routes), routes
        finally:
            model.eval()
            for layer, value in zip(layers, previous):
                layer.dropout = value
    finally:
        engine.unpatch_model(model)
        model.set_attn_implementation("sdpa")
