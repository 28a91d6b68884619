"""Drop-in fidelity: every zoo family, unpatched against ``mmkernels.patch(model)`` with
every kernel on, with the ``"mmkernels"`` attention implementation off and on, on the
zoo's left-padded batches (pad tokens included), as a user's existing code meets it:

* forward outputs within the ops' tolerances (fp32);
* the gradient of EVERY parameter of a training step (a fixed random projection of the
  logits as the loss), each within the same tolerance; in particular the text embedding
  table's pad row (``nn.Embedding.padding_idx``) gets none;
* ``inspect.signature`` of every patched method equals the original's (Trainer's
  ``remove_unused_columns`` and transformers' own tests read it);
* ``output_attentions=True`` works and gives the same logits;
* dropout in train mode runs (the attention falls back to SDPA; same seed, same result).

What the README calls "drop-in" is checked here; torch.compile with a static cache is in
tests/test_attention_hf.py (one compiled model: tracing costs minutes per family).
"""

from __future__ import annotations

import inspect

import pytest
import torch

transformers = pytest.importorskip("transformers")

import mmkernels  # noqa: E402
from mmkernels import integrations, zoo  # noqa: E402
from mmkernels.integrations import hf_attention  # noqa: E402
from mmkernels.integrations.engine import original_method  # noqa: E402
from mmkernels.testing import relative_error  # noqa: E402
from zoo_helpers import build_or_skip  # noqa: E402

PATCHED_TYPES = {rule.model_type for rule in integrations.rules()}
# Every zoo family with a spec (Whisper and VisionEncoderDecoder patch their ViT / nothing
# but the attention implementation: they are here for the "mmkernels" attention).
FAMILIES = list(zoo.FAMILIES)
# fp32 outputs and gradients: the kernels compute in fp32 (exact fp32 dots in the
# interpreter) in another order than PyTorch's; 1e-5 is the logits tolerance of the
# attention and patch-embed model tests.
RTOL = 1e-5
GRAD_RTOL = 1e-4  # gradients pass through two more products per layer
# Parameters a model multiplies into activations its code computes in float32 whatever its
# dtype (``.float()``): kept float32 in the float64 reference, where the product would mix
# float64 and float32 operands and fail (Gemma 4's audio attention scales its float32
# queries by ``softplus(per_dim_scale)``; its keys stay float32).
FLOAT32_IN_FLOAT64 = {"gemma4": ("per_dim_scale",)}


@pytest.fixture(scope="module", autouse=True)
def _registered():
    hf_attention.register_attention()


def _eager_only(model, config_key: str) -> bool:
    """The sub-model of ``config_key`` declares no attention but eager (Gemma 4's audio
    conformer: its chunked attention builds a float mask from what it gets)."""
    config = getattr(model.config, config_key, None)
    sub = [m for m in model.modules() if isinstance(m, transformers.PreTrainedModel) and m.config is config]
    flags = ("_supports_sdpa", "_supports_flash_attn", "_supports_flex_attn", "_supports_attention_backend")
    return bool(sub) and not any(getattr(sub[0], flag, False) for flag in flags)


def _set_attention(model, name: str) -> bool:
    keys = list(getattr(model.config, "sub_configs", {}))
    eager_only = [key for key in keys if _eager_only(model, key)]
    try:
        # A tower that takes eager attention only keeps it; the other sub-models get ``name``.
        model.set_attn_implementation({key: name for key in keys if key not in eager_only} if eager_only else name)
    except (ValueError, TypeError, NotImplementedError) as error:  # a family without the interface
        if name == "mmkernels":
            pytest.skip(f"{type(model).__name__} cannot take the mmkernels attention: {error}")
        raise
    return True


def _loss(logits: torch.Tensor) -> torch.Tensor:
    weights = torch.randn(logits.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float32)
    return (logits.float() * weights).sum()


def _logits(output) -> torch.Tensor:
    return output.logits if hasattr(output, "logits") else output[0]


def _as(inputs: dict, dtype: torch.dtype) -> dict:
    return {k: v.to(dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v for k, v in inputs.items()}


def _forward_and_grads(model, inputs) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    logits = _logits(model(**inputs))
    _loss(logits).backward()
    grads = {name: p.grad.detach().double() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return logits.detach(), grads


def _assert_grads_close(got: dict, want: dict, exact: dict) -> None:
    """flash-attn's rule per parameter, against the float64 model's gradients: the patched
    model's error is at most twice the unpatched fp32 model's, plus GRAD_RTOL of the
    gradient (a gradient that is zero in exact arithmetic, such as a key bias under
    softmax, is fp32 noise in both: only its size can be compared)."""
    assert got.keys() == want.keys(), f"parameters with gradients differ: {sorted(got.keys() ^ want.keys())}"
    bad = []
    for name, w in want.items():
        g, e = got[name].double(), exact[name]
        error, baseline = (g - e).norm().item(), (w.double() - e).norm().item()
        limit = 2 * baseline + GRAD_RTOL * e.norm().item()
        if not error <= limit:
            bad.append(f"{name}: error {error:.3g} > {limit:.3g} (unpatched fp32: {baseline:.3g}, |grad| {e.norm().item():.3g})")
    assert not bad, "\n".join(bad)


@pytest.fixture(params=["sdpa", "mmkernels"], ids=["attention-sdpa", "attention-mmkernels"])
def attention(request):
    return request.param


@pytest.mark.parametrize("family", FAMILIES)
def test_forward_and_every_gradient(family, attention):
    tiny = build_or_skip(family)
    model = tiny.model
    model.requires_grad_(True)
    _set_attention(model, "sdpa")
    want_logits, want_grads = _forward_and_grads(model, tiny.inputs)
    model.double()
    for name, parameter in model.named_parameters():
        if name.rsplit(".", 1)[-1] in FLOAT32_IN_FLOAT64.get(family, ()):
            parameter.data = parameter.data.float()
    _, exact_grads = _forward_and_grads(model, _as(tiny.inputs, torch.float64))
    model.float()
    _set_attention(model, attention)
    report = mmkernels.patch(model)
    try:
        assert report.replaced or attention == "mmkernels" or family not in PATCHED_TYPES, str(report)
        got_logits, got_grads = _forward_and_grads(model, tiny.inputs)
    finally:
        mmkernels.unpatch(model)
    assert relative_error(got_logits, want_logits.double()) <= RTOL
    _assert_grads_close(got_grads, want_grads, exact_grads)


def test_pad_row_of_the_embedding_gets_no_gradient():
    """Qwen2-VL sets ``padding_idx`` on ``embed_tokens`` and its batch has pad tokens: the
    fused lookup gave that row gradient from every pad token (0.199 against 0.074)."""
    tiny = build_or_skip("qwen2_vl")
    model = tiny.model
    embed = model.get_input_embeddings()
    assert embed.padding_idx is not None and (tiny.inputs["input_ids"] == embed.padding_idx).any()
    model.requires_grad_(True)
    mmkernels.patch(model)
    try:
        _, grads = _forward_and_grads(model, tiny.inputs)
    finally:
        mmkernels.unpatch(model)
    (name,) = [n for n, p in model.named_parameters() if p is embed.weight]
    assert grads[name][embed.padding_idx].abs().max() == 0


@pytest.mark.parametrize("family", FAMILIES)
def test_signatures_and_output_attentions(family, attention):
    tiny = build_or_skip(family)
    model = tiny.model
    _set_attention(model, "sdpa")
    with torch.no_grad():
        want = _logits(model(**tiny.inputs, output_attentions=True))
    _set_attention(model, attention)
    report = mmkernels.patch(model)
    try:
        modules = dict(model.named_modules())
        for replaced in report.replaced:
            module = modules[replaced.module_path]
            patched, original = getattr(module, replaced.method), original_method(module, replaced.method)
            where = f"{replaced.module_path}.{replaced.method}"
            assert inspect.signature(patched) == inspect.signature(original), where
        with torch.no_grad():
            got = _logits(model(**tiny.inputs, output_attentions=True))
    finally:
        mmkernels.unpatch(model)
    assert relative_error(got, want.double()) <= RTOL


@pytest.mark.parametrize("family", ["llava", "qwen2_vl", "mllama"])
def test_dropout_in_train_mode(family):
    """Attention dropout in train mode: the op does not cover it, transformers' SDPA runs
    (with the tensor mask it needs); the same seed gives the unpatched model's output."""
    tiny = build_or_skip(family)
    model = tiny.model
    layers = [m for m in model.modules() if isinstance(getattr(m, "attention_dropout", None), float)
              or (isinstance(getattr(m, "dropout", None), float) and hasattr(m, "num_heads"))]  # fmt: skip
    assert layers, "no attention layer with a dropout probability"
    for layer in layers:
        if isinstance(getattr(layer, "attention_dropout", None), float):
            layer.attention_dropout = 0.3
        if isinstance(getattr(layer, "dropout", None), float):
            layer.dropout = 0.3
    model.train()
    _set_attention(model, "sdpa")
    torch.manual_seed(3)
    want = _logits(model(**tiny.inputs)).detach()
    _set_attention(model, "mmkernels")
    mmkernels.patch(model)
    try:
        torch.manual_seed(3)
        got = _logits(model(**tiny.inputs)).detach()
    finally:
        mmkernels.unpatch(model)
        model.eval()
    assert relative_error(got, want.double()) <= RTOL


@pytest.mark.parametrize("family", FAMILIES)
def test_compiled_static_cache_generate_without_recompiles(family, attention):
    """``generate`` with a static cache and the decode step under torch.compile, as
    transformers compiles it, twice: the same tokens as the unpatched compiled model, and
    no more graphs compiled than it compiles (the mask cache's identity guards recompiled
    every step; the patched forward recursed). Some families recompile unpatched too (a
    sliding-window cache's length guard): the count, not zero, is what must match."""
    from torch._dynamo.utils import counters
    from transformers import CompileConfig

    tiny = build_or_skip(family)
    model = tiny.model
    config = CompileConfig(fullgraph=False, dynamic=False, backend="eager")
    config._compile_all_devices = True  # CPU: transformers compiles only on accelerators by default

    def two_compiled_generates():
        torch._dynamo.reset()
        counters.clear()
        with torch.no_grad():
            tokens = [model.generate(**tiny.inputs, max_new_tokens=3, do_sample=False, cache_implementation="static",
                                     compile_config=config) for _ in range(2)]  # fmt: skip
        graphs = counters["stats"]["unique_graphs"]
        torch._dynamo.reset()
        return tokens, graphs

    _set_attention(model, "sdpa")
    want, want_graphs = two_compiled_generates()
    _set_attention(model, attention)
    mmkernels.patch(model)
    try:
        got, got_graphs = two_compiled_generates()
    finally:
        mmkernels.unpatch(model)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert got_graphs <= want_graphs, f"{got_graphs} graphs compiled patched, {want_graphs} unpatched"
