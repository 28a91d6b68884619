"""Shared by the model-level tests: build a zoo family, or skip where this transformers
cannot build it offline (5.17 declares Idefics3's PIL image processor torchvision-only)."""

import pytest

from mmkernels import zoo


def build_or_skip(family: str, **kwargs) -> zoo.TinyModel:
    try:
        return zoo.build(family, **kwargs)
    except ImportError as error:
        if "torchvision" not in str(error).lower():
            raise
        pytest.skip(f"{family} needs torchvision with this transformers: {error}")
