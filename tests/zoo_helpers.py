"""Shared by the model-level tests: build a zoo family, or skip where this transformers
cannot build it offline (5.17 declares Idefics3's PIL image processor torchvision-only;
``zoo.FamilyUnavailable``: Llama 4's 5.17 feature method);
compare two forwards' outputs bit for bit; patch for a block; spy on the merge op."""

from contextlib import contextmanager
from typing import Any

import pytest
import torch

import mmkernels
import mmkernels.ops
from mmkernels import zoo


class MergeSpy:
    """Counts calls of ``mmkernels.ops.merge_multimodal_embeddings`` (the patch imports it
    from there at call time) and keeps the arguments of the last one."""

    def __init__(self, monkeypatch):
        self.calls = 0
        self.last: tuple[tuple, dict] | None = None
        self._op = mmkernels.ops.merge_multimodal_embeddings
        monkeypatch.setattr(mmkernels.ops, "merge_multimodal_embeddings", self)

    def __call__(self, *args, **kwargs):
        self.calls += 1
        self.last = (args, kwargs)
        return self._op(*args, **kwargs)

    def reset(self):
        self.calls = 0
        self.last = None

    def placeholder_ids(self) -> list[int]:
        """The placeholder ids of the last call, one per kind."""
        args, _ = self.last
        return list(args[3])

    def features(self) -> list[list[torch.Tensor]]:
        """The feature tensors of the last call, per kind."""
        args, _ = self.last
        return args[2]


@contextmanager
def patched(model, **options):
    """``model`` patched (the merge only, unless ``kernels`` says otherwise) for the block."""
    options.setdefault("kernels", ["merge"])
    report = mmkernels.patch(model, **options)
    try:
        yield report
    finally:
        mmkernels.unpatch(model)


@contextmanager
def patched_by_spec(model, spec):
    """``model``'s merge patched by ``spec`` alone (a deliberately wrong spec, in the tests
    that check a wrong merge changes the logits) for the block; the inner model is the
    module replaced first. Yields the patch report."""
    from mmkernels.integrations.engine import PatchOptions, patch_model
    from mmkernels.integrations.hf_merge import LanguageModelInputsRule, MergeRule

    rules = (MergeRule(spec),) + ((LanguageModelInputsRule(spec),) if spec.language_model_inputs else ())
    report = patch_model(model, rules, kernels=("merge",), options=PatchOptions())
    try:
        assert report.replaced and report.replaced[0].module_path == "model", report
        yield report
    finally:
        mmkernels.unpatch(model)


def unpatched_and_patched(model, inputs, **options):
    """(patched output, unpatched output) of ``model(**inputs)`` under no_grad."""
    with torch.no_grad():
        want = model(**inputs)
        with patched(model, **options):
            got = model(**inputs)
    return got, want


def build_or_skip(family: str, **kwargs) -> zoo.TinyModel:
    try:
        return zoo.build(family, **kwargs)
    except zoo.FamilyUnavailable as error:
        pytest.skip(f"{family}: {error}")
    except ImportError as error:
        if "torchvision" not in str(error).lower():
            raise
        pytest.skip(f"{family} needs torchvision with this transformers: {error}")


def assert_same_output(got: Any, want: Any, where: str = "output") -> None:
    """Bit-identical: tensors with torch.equal, ModelOutputs field by field (same keys in
    the same order), sequences element by element; caches by their key/value tensors."""
    if isinstance(want, torch.Tensor):
        assert isinstance(got, torch.Tensor), f"{where}: {type(got).__name__} instead of a tensor"
        assert (got.dtype, got.shape) == (want.dtype, want.shape), (
            f"{where}: {got.dtype}{tuple(got.shape)} vs {want.dtype}{tuple(want.shape)}"
        )
        assert torch.equal(got, want), f"{where}: values differ (max abs diff {(got - want).abs().max().item()})"
    elif isinstance(want, _transformers().utils.ModelOutput):
        assert type(got) is type(want), f"{where}: {type(got).__name__} vs {type(want).__name__}"
        assert list(got.keys()) == list(want.keys()), f"{where}: keys {list(got.keys())} vs {list(want.keys())}"
        for key in want.keys():
            assert_same_output(got[key], want[key], f"{where}.{key}")
    elif isinstance(want, (list, tuple)):
        assert isinstance(got, (list, tuple)) and len(got) == len(want), f"{where}: length differs"
        for i, (g, w) in enumerate(zip(got, want)):
            assert_same_output(g, w, f"{where}[{i}]")
    elif isinstance(want, _transformers().Cache):
        assert type(got) is type(want), f"{where}: {type(got).__name__} vs {type(want).__name__}"
        for i, (g, w) in enumerate(zip(got.layers, want.layers)):
            assert_same_output(getattr(g, "keys", None), getattr(w, "keys", None), f"{where}.layers[{i}].keys")
            assert_same_output(getattr(g, "values", None), getattr(w, "values", None), f"{where}.layers[{i}].values")
    else:
        assert got == want, f"{where}: {got!r} vs {want!r}"


def _transformers():
    import transformers

    return transformers
