"""Hugging Face attention through :func:`mmkernels.ops.varlen_attention` (Triton's
interpreter on the CPU): the ``"mmkernels"`` attention implementation registered with
transformers' ``AttentionInterface`` / ``AttentionMaskInterface``, and the engine rule for
Qwen2-VL / Qwen2.5-VL vision attention over ``cu_seqlens``.

What each test proves:

* registration is idempotent, and ``attn_implementation="mmkernels"`` (whole model or per
  sub-config) sends every attention layer of the tiny LLaVA (CLIP + Llama), PaliGemma
  (SigLIP + Gemma, prefix-LM mask), Gemma 3 (SigLIP + Gemma 3, bidirectional image
  blocks) and Qwen2-VL (text) through the op (counted routes: no SDPA fallback), with
  fp32 logits within 1e-5 relative error of "sdpa" and of "eager", on a left-padded
  batch, and the same greedy tokens (decode steps included);
* the mask conversion: masks built by transformers' own ``sdpa_mask`` (causal, padding,
  sliding window, bidirectional) become exact ``kv_ranges`` (the op then matches SDPA),
  float additive masks too; a row with a hole, per-head masks that differ and additive
  biases are detected and run SDPA, with the reason, and the check runs once per mask
  object (a second layer with the same mask makes no host sync);
* Qwen2-VL / Qwen2.5-VL vision attention (window attention included) patched by the
  engine rule: vision tower and logits within 1e-5, greedy tokens equal, no host sync in
  the attention layers (the unpatched ones make one ``.tolist()`` each) and the tower's
  remaining syncs do not grow with the number of images; unpatch restores the instance
  ``__dict__`` exactly, ``state_dict`` keys unchanged.
"""

import pytest  # noqa: E402
import torch  # noqa: E402

transformers = pytest.importorskip("transformers")

from mmkernels import zoo  # noqa: E402
from mmkernels.backend import Backend, recent_decisions  # noqa: E402
from mmkernels.integrations import engine  # noqa: E402
from mmkernels.integrations import hf_attention as ha  # noqa: E402
from mmkernels.testing import HostSyncCounter, relative_error  # noqa: E402
from zoo_helpers import build_or_skip  # noqa: E402

RTOL = 1e-5
NEW_TOKENS = 4
# Attention layers each family's forward runs (vision layers x images do not matter: one
# call per layer): text layers + vision layers.
# Qwen2-VL's vision tower, without the engine rule, calls the interface once per image and
# layer (3 images + a 2-frame-pair video = 5 segments x 2 layers) + 2 text layers.
# BLIP-2: 2 ViT + 2 Q-Former layers x (self + cross to the image) + 2 OPT = 8.
# VisionEncoderDecoder: 2 ViT + 2 GPT-2 layers x (self + cross to the encoder) = 6.
# Whisper: 2 encoder layers + 2 decoder layers x (self + cross to the audio) = 6.
INTERFACE_FAMILIES = {"llava": 4, "paligemma": 4, "gemma3": 4, "qwen2_vl": 12, "blip_2": 8,
                      "vision_encoder_decoder": 6, "whisper": 6}
DECODER_PROMPT = ("vision_encoder_decoder", "whisper")  # the text is the decoder's


@pytest.fixture(scope="module", autouse=True)
def registered():
    ha.register_attention()
    yield


def _forward(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


def _generate(model, inputs):
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False)
    if type(model).__name__ == "WhisperForConditionalGeneration":
        return out  # Whisper's generate returns the new tokens only
    prompt = inputs["input_ids"] if "input_ids" in inputs else inputs["decoder_input_ids"]
    return out[:, prompt.shape[1]:]


def _kernel_ran() -> bool:
    decisions = [d for d in recent_decisions() if d.op == "varlen_attention"]
    return bool(decisions) and decisions[-1].backend in (Backend.INTERPRETER, Backend.TRITON)


# --------------------------------------------------------------------------------------
# Registration


def test_register_is_idempotent():
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    assert ha.register_attention() == "mmkernels"
    assert ha.register_attention() == "mmkernels"
    assert ha.is_registered()
    assert AttentionInterface._global_mapping["mmkernels"] is ha.mmkernels_attention_forward
    assert AttentionMaskInterface._global_mapping["mmkernels"] is sdpa_mask
    assert "flash" not in ha.ATTN_IMPLEMENTATION


# --------------------------------------------------------------------------------------
# Model level through the interface


@pytest.fixture(scope="module", params=sorted(INTERFACE_FAMILIES))
def family_baseline(request):
    tiny = build_or_skip(request.param)
    model = tiny.model
    prefix = "decoder_" if tiny.family in DECODER_PROMPT else ""
    assert not tiny.inputs[f"{prefix}attention_mask"].all(), "the zoo batch is left padded"
    reference = {impl: None for impl in ("sdpa", "eager")}
    for impl in reference:
        model.set_attn_implementation(impl)
        reference[impl] = _forward(model, tiny.inputs)
    model.set_attn_implementation("sdpa")
    tokens = _generate(model, tiny.inputs)
    return tiny, reference, tokens


def test_interface_logits_match_sdpa_and_eager(family_baseline):
    tiny, reference, _ = family_baseline
    model = tiny.model
    model.set_attn_implementation("mmkernels")
    try:
        with ha.record_routes() as routes:
            logits = _forward(model, tiny.inputs)
        assert _kernel_ran()
    finally:
        model.set_attn_implementation("sdpa")
    assert dict(routes) == {"varlen": INTERFACE_FAMILIES[tiny.family]}
    error = relative_error(logits, reference["sdpa"])
    assert error <= RTOL, f"{tiny.family} vs sdpa: relative error {error:.3e}"
    # Left-padding rows see no key: eager and SDPA themselves disagree there (eager
    # averages every value, SDPA and the op give 0), so eager is compared on real tokens.
    prefix = "decoder_" if tiny.family in DECODER_PROMPT else ""
    real = tiny.inputs[f"{prefix}attention_mask"].bool()
    error = relative_error(logits[real], reference["eager"][real])
    assert error <= RTOL, f"{tiny.family} vs eager: relative error {error:.3e}"


def test_interface_greedy_tokens(family_baseline):
    tiny, _, tokens = family_baseline
    model = tiny.model
    model.set_attn_implementation("mmkernels")
    try:
        with ha.record_routes() as routes:
            got = _generate(model, tiny.inputs)
    finally:
        model.set_attn_implementation("sdpa")
    assert got.shape[1] == NEW_TOKENS and torch.equal(got, tokens)
    assert set(routes) == {"varlen"} and routes["varlen"] > INTERFACE_FAMILIES[tiny.family]  # decode steps too


def test_per_sub_config_dict():
    tiny = zoo.build("llava")
    model = tiny.model
    want = _forward(model, tiny.inputs)
    model.set_attn_implementation({"text_config": "mmkernels", "vision_config": "mmkernels"})
    assert model.config.text_config._attn_implementation == "mmkernels"
    assert model.config.vision_config._attn_implementation == "mmkernels"
    with ha.record_routes() as routes:
        got = _forward(model, tiny.inputs)
    assert routes["varlen"] == 4
    assert relative_error(got, want) <= RTOL
    # Only the text model: the 2 CLIP layers go back to SDPA, the 2 Llama layers stay.
    model.set_attn_implementation({"text_config": "mmkernels", "vision_config": "sdpa"})
    with ha.record_routes() as routes:
        got = _forward(model, tiny.inputs)
    assert routes["varlen"] == 2
    assert relative_error(got, want) <= RTOL


# --------------------------------------------------------------------------------------
# Mask conversion, against transformers' SDPA function


def _qkv(batch, hq, hkv, sq, sk, d=32, dtype=torch.float32):
    g = torch.Generator().manual_seed(1)
    q = torch.randn(batch, hq, sq, d, generator=g, dtype=dtype)
    k = torch.randn(batch, hkv, sk, d, generator=g, dtype=dtype)
    v = torch.randn(batch, hkv, sk, d, generator=g, dtype=dtype)
    return q, k, v


class _Layer(torch.nn.Module):
    def __init__(self, groups: int, is_causal: bool = True):
        super().__init__()
        self.num_key_value_groups = groups
        self.is_causal = is_causal


def _sdpa(layer, q, k, v, mask, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward(layer, q, k, v, mask, **kwargs)[0]


def _hf_mask(kind: str, batch: int, length: int, padding: torch.Tensor):
    from transformers import masking_utils as mu

    functions = {
        "causal": mu.causal_mask_function,
        "sliding": mu.sliding_window_causal_mask_function(3),
        "bidirectional": mu.bidirectional_mask_function,
        # Gemma 3-style: causal, plus bidirectional inside the block of rows 3..6.
        "image_block": mu.or_masks(mu.causal_mask_function, _block(3, 7)),
    }
    return mu.sdpa_mask(batch_size=batch, q_length=length, kv_length=length, mask_function=functions[kind],
                        attention_mask=padding, allow_is_causal_skip=False, use_vmap=True)  # fmt: skip


def _block(start, end):
    def inner(b, h, q, k):
        return (q >= start) & (q < end) & (k >= start) & (k < end)

    return inner


@pytest.mark.parametrize("kind", ["causal", "sliding", "bidirectional", "image_block"])
def test_transformers_masks_become_exact_ranges(kind):
    batch, length = 3, 11
    padding = torch.ones(batch, length, dtype=torch.bool)
    padding[1, :4] = False  # left padding
    padding[2, :1] = False
    mask = _hf_mask(kind, batch, length, padding)
    assert mask is not None and mask.dtype == torch.bool
    ranges, why = ha.mask_to_kv_ranges(mask, batch, length, length)
    assert why == ""
    rebuilt = torch.zeros(batch * length, length, dtype=torch.bool)
    cols = torch.arange(length)
    rebuilt = (cols >= ranges[:, :1]) & (cols < ranges[:, 1:])
    assert torch.equal(rebuilt.view(batch, length, length), mask[:, 0])
    q, k, v = _qkv(batch, 4, 2, length, length)
    layer = _Layer(groups=2)
    with ha.record_routes() as routes:
        got, _ = ha.mmkernels_attention_forward(layer, q, k, v, mask, scaling=0.3)
    assert routes == {"varlen": 1}
    want = _sdpa(layer, q, k, v, mask, scaling=0.3)
    seen = mask[:, 0].any(-1)  # rows that see nothing: SDPA gives NaN or 0, the op 0
    assert torch.all(got[~seen] == 0)
    assert relative_error(got[seen], want[seen]) <= RTOL


def test_float_mask_and_broadcast_batch():
    batch, sq, sk = 2, 5, 9
    visible = torch.zeros(1, 1, sq, sk, dtype=torch.bool)
    for i in range(sq):
        visible[..., i, i : i + 4] = True
    mask = torch.zeros(1, 1, sq, sk).masked_fill(~visible, torch.finfo(torch.float32).min)
    q, k, v = _qkv(batch, 2, 2, sq, sk)
    layer = _Layer(groups=1)
    with ha.record_routes() as routes:
        got, _ = ha.mmkernels_attention_forward(layer, q, k, v, mask)
    assert routes == {"varlen": 1}
    assert relative_error(got, _sdpa(layer, q, k, v, mask)) <= RTOL


def test_no_mask_causal_and_not_causal():
    q, k, v = _qkv(2, 4, 1, 7, 7)
    for causal in (True, False):
        layer = _Layer(groups=4, is_causal=causal)
        got, _ = ha.mmkernels_attention_forward(layer, q, k, v, None)
        assert relative_error(got, _sdpa(layer, q, k, v, None)) <= RTOL
    # More keys than queries without a mask: SDPA's top-left causal over the first Sq keys.
    q, k, v = _qkv(1, 2, 2, 4, 9)
    layer = _Layer(groups=1)
    got, _ = ha.mmkernels_attention_forward(layer, q, k, v, None)
    assert relative_error(got, _sdpa(layer, q, k, v, None)) <= RTOL


@pytest.mark.parametrize("case", ["hole", "per_head", "bias"])
def test_unrepresentable_masks_run_sdpa_with_reason(case, caplog):
    batch, length = 2, 6
    q, k, v = _qkv(batch, 2, 2, length, length)
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    if case == "hole":
        mask = causal.expand(batch, 1, length, length).clone()
        mask[1, 0, 5, 2] = False  # row 5 of sample 1 sees keys 0-1 and 3-5
        expected = "not one contiguous interval"
    elif case == "per_head":
        mask = causal.expand(batch, 2, length, length).clone()
        mask[:, 1, :, 0] = False
        expected = "per-head masks differ"
    else:
        mask = torch.zeros(batch, 1, length, length).masked_fill(~causal, float("-inf"))
        mask[..., 0] = -0.5  # an ALiBi-like bias, not a mask
        expected = "bias"
    layer = _Layer(groups=1)
    with ha.record_routes() as routes, caplog.at_level("WARNING", logger="mmkernels"):
        got, _ = ha.mmkernels_attention_forward(layer, q, k, v, mask)
    assert sum(routes.values()) == 1 and next(iter(routes)).startswith("sdpa: ")
    assert expected in next(iter(routes))
    assert torch.equal(got, _sdpa(layer, q, k, v, mask))


def test_mask_checked_once_per_mask_object():
    batch, length = 2, 8
    padding = torch.ones(batch, length, dtype=torch.bool)
    padding[0, :3] = False
    mask = _hf_mask("causal", batch, length, padding)
    q, k, v = _qkv(batch, 2, 1, length, length)
    layer = _Layer(groups=2)
    with HostSyncCounter() as first:
        a, _ = ha.mmkernels_attention_forward(layer, q, k, v, mask)
    with HostSyncCounter() as second:  # the next layer, same mask object
        b, _ = ha.mmkernels_attention_forward(layer, q, k, v, mask)
    assert first.count == 1, first
    assert second.count == 0, second
    assert torch.equal(a, b)
    mask[0, 0, 7, 0] = True  # in place: a hole in row 7; the version counter invalidates the cache
    with ha.record_routes() as routes:
        ha.mmkernels_attention_forward(layer, q, k, v, mask)
    assert next(iter(routes)).startswith("sdpa: ")


def test_cases_the_op_does_not_cover_run_sdpa():
    q, k, v = _qkv(1, 2, 2, 5, 5)
    layer = _Layer(groups=1)
    for kwargs, reason in (({"dropout": 0.1}, "dropout"), ({"softcap": 30.0}, "softcap"),
                           ({"output_attentions": True}, "output_attentions")):  # fmt: skip
        with ha.record_routes() as routes:
            try:
                ha.mmkernels_attention_forward(layer, q, k, v, None, **kwargs)
            except ValueError:
                pass  # SDPA raises on softcap, as transformers does without mmkernels
        assert reason in next(iter(routes))


def test_a_query_batch_broadcast_against_the_keys_runs_sdpa():
    """One query batch against several key batches (Granite Speech's Q-Former: its learned
    queries attend to every audio window) is SDPA's broadcast, which the op does not do:
    SDPA runs, with the reason, and the output has the keys' batch."""
    q, _, _ = _qkv(1, 2, 2, 3, 15)
    _, k, v = _qkv(9, 2, 2, 3, 15)
    layer = _Layer(groups=1, is_causal=False)
    with ha.record_routes() as routes:
        got, _ = ha.mmkernels_attention_forward(layer, q, k, v, None)
    assert "broadcast" in next(iter(routes)) and next(iter(routes)).startswith("sdpa: ")
    want = _sdpa(layer, q, k, v, None)
    assert got.shape == want.shape == (9, 3, 2, 32) and torch.equal(got, want)


# --------------------------------------------------------------------------------------
# Qwen2-VL / Qwen2.5-VL vision attention (engine rule)


def _patch(model):
    return engine.patch_model(model, ha.ATTENTION_RULES, kernels=["attention"], options=engine.PatchOptions())


def _vision(tiny):
    with torch.no_grad():
        return tiny.model.model.visual(tiny.inputs["pixel_values"], grid_thw=tiny.inputs["image_grid_thw"])


@pytest.fixture(scope="module", params=["qwen2_vl", "qwen2_5_vl"])
def qwen(request):
    tiny = zoo.build(request.param)
    vision = _vision(tiny).last_hidden_state
    logits = _forward(tiny.model, tiny.inputs)
    tokens = _generate(tiny.model, tiny.inputs)
    return tiny, vision, logits, tokens


def test_qwen_vision_patched_close(qwen):
    tiny, vision, logits, tokens = qwen
    model = tiny.model
    attn_paths = [f"model.visual.blocks.{i}.attn" for i in range(len(model.model.visual.blocks))]
    before = {path: dict(model.get_submodule(path).__dict__) for path in attn_paths}
    keys = list(model.state_dict())
    report = _patch(model)
    try:
        depth = len(model.model.visual.blocks)
        assert [r.module_path for r in report.replaced] == [f"model.visual.blocks.{i}.attn" for i in range(depth)]
        with ha.record_routes() as routes:
            got = _vision(tiny).last_hidden_state
        assert routes == {"varlen": depth}
        assert _kernel_ran()
        error = relative_error(got, vision)
        assert error <= RTOL, f"vision tower: {error:.3e}"
        error = relative_error(_forward(model, tiny.inputs), logits)
        assert error <= RTOL, f"logits: {error:.3e}"
        assert torch.equal(_generate(model, tiny.inputs), tokens)
        assert list(model.state_dict()) == keys
    finally:
        engine.unpatch_model(model)
    after = {path: dict(model.get_submodule(path).__dict__) for path in attn_paths}
    assert not any(engine.is_patched(m) for m in model.modules())
    for path in before:
        assert after[path].keys() == before[path].keys(), path
        assert all(after[path][n] is v for n, v in before[path].items()), path


def test_qwen_vision_attention_makes_no_host_sync(qwen):
    tiny = qwen[0]
    model = tiny.model
    attn_syncs = {}
    for state in ("unpatched", "patched"):
        if state == "patched":
            _patch(model)
        try:
            calls = []
            hooks = [blk.attn.register_forward_pre_hook(lambda m, a, k: calls.append(HostSyncCounter().__enter__()),
                                                        with_kwargs=True)
                     for blk in model.model.visual.blocks]  # fmt: skip
            post = [blk.attn.register_forward_hook(lambda m, a, o: calls[-1].__exit__(None, None, None))
                    for blk in model.model.visual.blocks]  # fmt: skip
            try:
                _vision(tiny)
            finally:
                for h in hooks + post:
                    h.remove()
            attn_syncs[state] = sum(c.count for c in calls)
        finally:
            engine.unpatch_model(model)
    depth = len(model.model.visual.blocks)
    assert attn_syncs["unpatched"] >= depth  # one cu_seqlens.tolist() per layer at least
    assert attn_syncs["patched"] == 0


def test_qwen2_vl_tower_syncs_do_not_grow_with_images():
    """Measured: unpatched 9 syncs (3 per attention layer + 3 in the tower), patched 3 (the
    tower's own position ids and cu_seqlens), for 1 and for 3 images. (Qwen2.5-VL's tower
    also computes its window index with per-image syncs outside attention: 13 -> 7 for 1
    image, 17 -> 11 for 3.)"""
    counts = {}
    for batch in (1, 2):  # 1 image, then 3 images of different sizes
        tiny = zoo.build("qwen2_vl", batch=batch)
        with HostSyncCounter() as unpatched:
            _vision(tiny)
        _patch(tiny.model)
        with HostSyncCounter() as patched:
            _vision(tiny)
        counts[int(tiny.inputs["image_grid_thw"].shape[0])] = (unpatched.count, patched.count)
    assert sorted(counts) == [1, 3]
    depth = zoo.LAYERS
    for images, (unpatched, patched) in counts.items():
        assert patched <= unpatched - depth, counts
    assert counts[1][1] == counts[3][1], counts


def test_qwen_rule_keeps_flash_and_training_on_the_original(qwen, monkeypatch):
    tiny = qwen[0]
    attn = tiny.model.model.visual.blocks[0].attn
    _patch(tiny.model)
    try:
        calls = []
        monkeypatch.setattr(type(attn), "forward", lambda self, *a, **k: calls.append(1) or "original")
        attn.attention_dropout = 0.1
        attn.train()
        assert attn(torch.zeros(4, attn.qkv.in_features), torch.tensor([0, 4]),
                    position_embeddings=(torch.ones(4, 16), torch.zeros(4, 16))) == "original"  # fmt: skip
        assert calls == [1]
    finally:
        attn.eval()
        attn.attention_dropout = 0.0
        engine.unpatch_model(tiny.model)


def test_rules_do_not_match_other_families():
    tiny = zoo.build("llava")
    report = _patch(tiny.model)
    assert report.replaced == []


def test_without_the_kernel_the_interface_runs_sdpa(monkeypatch):
    """CPU tensors without TRITON_INTERPRET=1: the op would run its float64 reference (and
    read cu_seqlens on the host), so transformers' SDPA runs instead, with the reason; the
    Qwen vision rule runs the original layer."""
    monkeypatch.setattr(ha, "interpreter_enabled", lambda: False)
    q, k, v = _qkv(1, 2, 2, 5, 5)
    layer = _Layer(groups=1)
    with ha.record_routes() as routes:
        got, _ = ha.mmkernels_attention_forward(layer, q, k, v, None)
    assert list(routes) == ["sdpa: CPU tensors without TRITON_INTERPRET=1"]
    assert torch.equal(got, _sdpa(layer, q, k, v, None))
    tiny = zoo.build("qwen2_vl", batch=1)
    _patch(tiny.model)
    with ha.record_routes() as routes:
        _vision(tiny)
    assert "varlen" not in routes


def test_gradients_through_the_interface():
    """The op's backward (a PyTorch recomputation): parameter gradients of a left-padded
    LLaVA batch match SDPA's within 1e-5."""
    tiny = zoo.build("llava")
    model = tiny.model
    real = tiny.inputs["attention_mask"].bool()
    params = dict(model.named_parameters())
    names = [next(n for n in params if n.endswith(suffix)) for suffix in (
        "language_model.layers.0.self_attn.q_proj.weight", "encoder.layers.0.self_attn.k_proj.weight")]  # fmt: skip
    grads = {}
    for impl in ("sdpa", "mmkernels"):
        model.set_attn_implementation(impl)
        model.zero_grad()
        with ha.record_routes() as routes:
            model(**tiny.inputs).logits[real].square().mean().backward()
        grads[impl] = [params[name].grad.clone() for name in names]
        if impl == "mmkernels":
            assert routes == {"varlen": 4}
    model.set_attn_implementation("sdpa")
    for name, got, want in zip(names, grads["mmkernels"], grads["sdpa"]):
        error = relative_error(got, want)
        assert error <= RTOL, f"{name}: {error:.3e}"


def test_compiled_model_fullgraph_without_recompiles():
    """A model on the "mmkernels" attention under torch.compile(fullgraph=True): it traced
    no graph (the mask check's host sync, Mllama's .tolist()) and without fullgraph it
    recompiled every step (guards on the mask cache keyed by object identity), so even a
    text-only Gemma3ForCausalLM failed transformers' no-recompile test (issue 16). Masked
    calls in a compiled model run SDPA, as unpatched; a new batch of the same shapes
    reuses the graph, and the logits equal the eager model's."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    config = Gemma3TextConfig(vocab_size=64, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                              num_attention_heads=2, num_key_value_heads=1, head_dim=32, sliding_window=4,
                              max_position_embeddings=64)  # fmt: skip
    config._attn_implementation = "mmkernels"
    torch.manual_seed(0)
    model = Gemma3ForCausalLM(config).eval()
    ids = torch.randint(1, 64, (2, 9))
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, :3] = 0  # left padding: a padding mask, converted to kv_ranges in eager mode
    with torch.no_grad():
        eager = model(input_ids=ids, attention_mask=mask).logits
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    try:
        with torch.no_grad(), torch._dynamo.config.patch(error_on_recompile=True):
            first = compiled(input_ids=ids, attention_mask=mask).logits
            second = compiled(input_ids=ids.flip(1), attention_mask=mask.flip(1)).logits
    finally:
        torch._dynamo.reset()
    assert relative_error(first, eager) <= RTOL
    with torch.no_grad():
        assert relative_error(second, model(input_ids=ids.flip(1), attention_mask=mask.flip(1)).logits) <= RTOL
