"""Shared by the model-level tests: build a zoo family, or skip where this transformers
cannot build it offline (5.17 declares Idefics3's PIL image processor torchvision-only;
``zoo.FamilyUnavailable``: Llama 4's 5.17 feature method);
compare two forwards' outputs bit for bit."""

from typing import Any

import pytest
import torch

from mmkernels import zoo


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
