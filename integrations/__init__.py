"""mmkernels' integrations, installed as ``mmkernels.integrations`` (see pyproject's
``package-dir``):

* the Hugging Face side (:mod:`.hf`): :func:`patch` / :func:`unpatch`,
  :func:`quantize_projector`, :func:`supported_models`, :func:`clear_caches`,
  :func:`register_attention`, ... on the generic engine (:mod:`.engine`) and one small
  spec per model family;
* the vLLM side (:mod:`.vllm`): the ``vllm.general_plugins`` entry point and the
  ``--quantization mmkernels-*`` methods.

The two share nothing but mmkernels' ops and :mod:`mmkernels.quant`. The Hugging Face
side loads on first use of one of its names here (``from mmkernels.integrations import
patch`` as before), so a vLLM process, which imports only :mod:`.vllm`, never loads it.
"""

from __future__ import annotations

import importlib

__all__ = [
    "KERNELS",
    "PatchReport",
    "Replacement",
    "Skip",
    "clear_caches",
    "normalization_constants",
    "patch",
    "quantize_projector",
    "raw_pixel_inputs",
    "register_attention",
    "rules",
    "supported_models",
    "unpatch",
]


def __getattr__(name: str):
    # Any name of the Hugging Face side (its public ones and the rest it always exposed
    # here); a submodule's name falls through to the import system.
    if name.startswith("__"):
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    hf = importlib.import_module(f"{__name__}.hf")
    try:
        return getattr(hf, name)
    except AttributeError:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None


def __dir__():
    return sorted(set(globals()) | set(__all__))
