"""Every vision attention layer an :class:`~mmkernels.integrations.hf_attention.AttentionSpec`
covers with a cu_seqlens route, checked against the class's own ``forward``.

For each spec whose class the installed transformers has: one layer of that class, built
from its own vision config (tiny, random weights, its norms too), run on two sequences of
different lengths packed along ``cu_seqlens``; the engine patches it, the op runs (counted
route, the kernel's decision), the output matches the original within float32 rounding,
and ``unpatch`` restores the instance exactly. This is what makes a line in the spec table
a claim: the layer computes what the replacement restates.
"""

from __future__ import annotations

import importlib
import inspect
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("transformers")

from mmkernels.backend import Backend, recent_decisions  # noqa: E402
from mmkernels.integrations import engine  # noqa: E402
from mmkernels.integrations import hf_attention as ha  # noqa: E402
from mmkernels.testing import relative_error  # noqa: E402

RTOL = 1e-5
HIDDEN, HEADS = 64, 2
SEQUENCES = (4, 7)  # two images of different lengths, packed

CU_SEQLENS_SPECS = [spec for spec in ha.ATTENTION_SPECS if spec.route in (ha.CU_SEQLENS, ha.CU_SEQLENS_QK_NORM)]


def _attention_class(spec):
    """The spec's class from the model package its model_type names (``qwen3_vl_vision`` ->
    ``transformers.models.qwen3_vl``), or skip where the installed transformers lacks it."""
    package = spec.model_type.removesuffix("_encoder").removesuffix("_vision")
    try:
        module = importlib.import_module(f"transformers.models.{package}.modeling_{package}")
    except ImportError as exc:
        pytest.skip(f"transformers has no {package}: {exc}")
    cls = getattr(module, spec.model_class, None)
    if cls is None:
        pytest.skip(f"transformers.models.{package} has no {spec.model_class}")
    return module, cls


def _layer(spec):
    module, cls = _attention_class(spec)
    annotation = inspect.signature(cls.__init__).parameters["config"].annotation
    config_class = getattr(module, annotation) if isinstance(annotation, str) else annotation
    config = config_class()
    assert config.model_type == spec.model_type, "the spec's model_type is its config's"
    for name, value in (("hidden_size", HIDDEN), ("embed_dim", HIDDEN), ("num_heads", HEADS),
                        ("num_attention_heads", HEADS), ("attention_bias", True)):  # fmt: skip
        if hasattr(config, name):
            setattr(config, name, value)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    layer = cls(config).eval()
    with torch.no_grad():
        for parameter in layer.parameters():  # norms start at ones / zeros: make them count
            parameter.normal_(0.0, HIDDEN**-0.5 if parameter.dim() > 1 else 1.0)
    return layer


@pytest.mark.parametrize("spec", CU_SEQLENS_SPECS, ids=lambda spec: spec.model_class)
def test_cu_seqlens_route_matches_the_layer(spec):
    layer = _layer(spec)
    head_dim = HIDDEN // HEADS
    total = sum(SEQUENCES)
    generator = torch.Generator().manual_seed(1)
    hidden = torch.randn(total, HIDDEN, generator=generator)
    cu_seqlens = torch.tensor([0, SEQUENCES[0], total], dtype=torch.int32)
    angles = torch.randn(total, head_dim, generator=generator)
    rotary = (angles.cos(), angles.sin())
    with torch.no_grad():
        expected = layer(hidden, cu_seqlens, position_embeddings=rotary)
    before = dict(layer.__dict__)

    report = engine.patch_model(layer, ha.ATTENTION_RULES, kernels=["attention"], options=engine.PatchOptions())
    try:
        assert [(r.module_path, r.class_name, r.family) for r in report.replaced] == [
            ("", spec.model_class, spec.family)
        ], str(report)
        with ha.record_routes() as routes, torch.no_grad():
            got = layer(hidden, cu_seqlens, position_embeddings=rotary, max_seqlen=max(SEQUENCES))
        assert routes == {"varlen": 1}
        decision = [d for d in recent_decisions() if d.op == "varlen_attention"][-1]
        assert decision.backend in (Backend.INTERPRETER, Backend.TRITON)
        error = relative_error(got, expected)
        assert error <= RTOL, f"{spec.model_class}: {error:.3e}"
    finally:
        engine.unpatch_model(layer)
    assert layer.__dict__.keys() == before.keys()
    assert all(layer.__dict__[name] is value for name, value in before.items())


def test_qk_norm_route_refuses_a_layer_without_the_norms():
    """A class the QK-norm route covers that has lost its norms (another transformers
    version) is skipped with the reason, not patched into a layer that reads them."""
    spec = next(s for s in CU_SEQLENS_SPECS if s.route is ha.CU_SEQLENS_QK_NORM)
    layer = _layer(spec)
    del layer.q_norm
    report = engine.patch_model(layer, ha.ATTENTION_RULES, kernels=["attention"], options=engine.PatchOptions())
    assert report.replaced == []
    assert any("has no module q_norm" in skip.reason for skip in report.skipped), str(report)


def test_attention_specs_pickle_as_the_same_data():
    """A patched model pickles its rules (engine: copies rebuild their replacements), so a
    spec must come back equal: its route's functions travel by name."""
    import pickle

    for rule in ha.ATTENTION_RULES:
        assert pickle.loads(pickle.dumps(rule)).spec == rule.spec, rule
