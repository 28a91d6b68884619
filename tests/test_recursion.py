"""A patched forward under torch.compile never calls itself (issue 16.2).

A replacement calls the behaviour it wraps through ``engine.original_method``. That used
to bind the class's function with ``function.__get__(module, cls)``, which Dynamo models
as the attribute ``module.forward``: on a patched module, the INSTANCE attribute, i.e. the
replacement. As long as Dynamo inlined the whole original nothing showed; a graph break
anywhere inside it (the ``"mmkernels"`` attention's mask check did one per layer, before
it stepped aside while compiling) made Dynamo resume by reloading ``module.forward`` and
calling it: the replacement called itself until RecursionError, in transformers' own
``test_static_cache_no_recompile_with_smaller_length`` (llava, qwen2_vl, gemma3, mllama).

These tests force a graph break inside the original (a forward pre-hook on the language
model, called from the patched inner model's original forward) so that the binding is
exercised whatever the kernels do under compile today. ``backend="eager"``: only Dynamo's
tracing matters here, not code generation.
"""

from __future__ import annotations

import copy
import sys
import types

import pytest
import torch

pytest.importorskip("transformers")

import mmkernels  # noqa: E402
from mmkernels.integrations import hf_attention  # noqa: E402
from mmkernels.integrations.engine import _SelfBound  # noqa: E402
from mmkernels.testing import relative_error  # noqa: E402
from zoo_helpers import build_or_skip  # noqa: E402

RTOL = 1e-5


@pytest.fixture(scope="module", autouse=True)
def _registered():
    hf_attention.register_attention()


@pytest.fixture
def _low_recursion_limit():
    # A recursing replacement fails in a second instead of walking 1000 frames deep.
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(min(limit, 1000))
    yield
    sys.setrecursionlimit(limit)


def _graph_break(module, args):
    torch._dynamo.graph_break()


@pytest.mark.parametrize(
    "family, attention",
    [("llava", "sdpa"), ("llava", "mmkernels"), ("qwen2_vl", "sdpa"), ("gemma3", "mmkernels"),
     ("mllama", "mmkernels")],  # fmt: skip
)
def test_graph_break_inside_the_wrapped_forward(family, attention, _low_recursion_limit):
    tiny = build_or_skip(family)
    model = tiny.model.eval()
    model.set_attn_implementation(attention)  # Mllama's cross-attention rules need "mmkernels"
    text_only = {k: v for k, v in tiny.inputs.items() if k in ("input_ids", "attention_mask")}
    with torch.no_grad():
        want = [model(**tiny.inputs).logits, model(**text_only).logits]

    report = mmkernels.patch(model)
    assert any(r.method == "forward" and r.module_path == "model" for r in report.replaced), str(report)
    hook = model.model.language_model.register_forward_pre_hook(_graph_break)
    torch._dynamo.reset()
    try:
        compiled = torch.compile(model.__call__, backend="eager", dynamic=False)
        with torch.no_grad():
            # With media: the merge (or Mllama's cross-mask step) calls the original with
            # new arguments; text only: the replacement hands the call straight over.
            got = [compiled(**tiny.inputs).logits, compiled(**text_only).logits]
    finally:
        hook.remove()
        torch._dynamo.reset()
        mmkernels.unpatch(model)
    for g, w in zip(got, want):
        assert relative_error(g, w) <= RTOL


def test_copied_self_bound_original_compiles_fullgraph():
    """A module whose wrapped forward was an instance method bound to itself (another
    library's instance patch) keeps it through ``copy.deepcopy`` as a :class:`_SelfBound`
    record, bound again per call: with ``types.MethodType`` that was a graph break in
    every compiled call (Dynamo cannot call it), so ``fullgraph=True`` failed."""
    tiny = build_or_skip("llava")
    model = tiny.model.eval()
    text_only = {k: v for k, v in tiny.inputs.items() if k in ("input_ids", "attention_mask")}
    with torch.no_grad():
        want = model(**text_only).logits
    inner = model.model
    inner.forward = types.MethodType(type(inner).forward, inner)
    mmkernels.patch(model)
    copied = copy.deepcopy(model)
    assert isinstance(copied.model._mmkernels_originals["forward"].previous, _SelfBound)
    torch._dynamo.reset()
    try:
        compiled = torch.compile(copied.__call__, backend="eager", dynamic=False, fullgraph=True)
        with torch.no_grad():
            got = compiled(**text_only).logits
    finally:
        torch._dynamo.reset()
    assert relative_error(got, want) <= RTOL
