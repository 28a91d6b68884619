"""mmkernels: Triton kernels for the multimodal glue of VLMs and audio LLMs.

``mmkernels.ops`` holds the ops (each with a PyTorch reference of the same signature);
``mmkernels.patch(model)`` swaps them into live Hugging Face models.
"""

from __future__ import annotations

__version__ = "0.1.0"

import importlib as _importlib  # noqa: E402
import importlib.abc as _importlib_abc  # noqa: E402
import importlib.machinery as _importlib_machinery  # noqa: E402
import importlib.util as _importlib_util  # noqa: E402
import sys as _sys  # noqa: E402
from pathlib import Path as _Path  # noqa: E402


class _SourceTreeIntegrations(_importlib_abc.MetaPathFinder):
    """Finds ``mmkernels.integrations`` in the repository's top-level ``integrations/``
    when mmkernels runs from a source tree (``PYTHONPATH=<repo>``, as on the GPU
    machines) instead of an install: pyproject's package mapping (``mmkernels.integrations``
    -> ``integrations/``) exists only once installed. Appended last to ``sys.meta_path``, so
    an installed package (editable or not) always wins."""

    def __init__(self, directory: _Path):
        self.directory = directory

    def find_spec(self, fullname, path=None, target=None):
        if fullname != "mmkernels.integrations":
            return None
        return _importlib_util.spec_from_file_location(
            fullname, self.directory / "__init__.py", submodule_search_locations=[str(self.directory)]
        )


_SOURCE_INTEGRATIONS = _Path(__file__).resolve().parent.parent / "integrations"
if (_SOURCE_INTEGRATIONS / "__init__.py").is_file() and not any(
    isinstance(finder, _SourceTreeIntegrations) for finder in _sys.meta_path
):
    _sys.meta_path.append(_SourceTreeIntegrations(_SOURCE_INTEGRATIONS))


class _RegisterWithTransformers(_importlib_abc.MetaPathFinder):
    """Adds mmkernels' quantization method (``quant_method "mmkernels"``,
    ``integrations/hf_quantizer.py``) to transformers' quantizer registry the moment
    transformers imports it (``transformers.quantizers.auto``), so that plain
    ``from_pretrained`` loads the checkpoints :func:`quantize_projector` writes while
    importing mmkernels never imports transformers. First on ``sys.meta_path``; it finds
    nothing itself, it only wraps the loader the path finder gives that one module."""

    target = "transformers.quantizers.auto"

    def find_spec(self, fullname, path=None, target=None):
        if fullname != self.target:
            return None
        spec = _importlib_machinery.PathFinder.find_spec(fullname, path)
        if spec is None or not hasattr(spec.loader, "exec_module"):
            return None
        spec.loader = _RegisteringLoader(spec.loader)
        return spec


class _RegisteringLoader(_importlib_abc.Loader):
    def __init__(self, loader):
        self.loader = loader

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module):
        self.loader.exec_module(module)
        _register_with_transformers()

    def __getattr__(self, name):  # get_source, get_filename, ...: the wrapped loader's
        return getattr(self.loader, name)


def _register_with_transformers() -> None:
    try:
        # Importing it registers (at its end); a partial import (this hook fired while it
        # imported transformers' quantizer base) finishes, and registers, by itself.
        _importlib.import_module("mmkernels.integrations.hf_quantizer")
    except Exception as error:  # noqa: BLE001 - an incompatible transformers must not break its import
        import warnings

        warnings.warn(f"mmkernels: the 'mmkernels' quantization method could not be registered with transformers "
                      f"({type(error).__name__}: {error}); checkpoints saved after quantize_projector will not load "
                      f"quantized", RuntimeWarning, stacklevel=2)  # fmt: skip


if not any(isinstance(finder, _RegisterWithTransformers) for finder in _sys.meta_path):
    _sys.meta_path.insert(0, _RegisterWithTransformers())
if "transformers.quantizers.auto" in _sys.modules:
    _register_with_transformers()

from mmkernels import backend, ops, quant  # noqa: E402
from mmkernels.backend import Backend  # noqa: E402


def patch(model, *, kernels=None, quantize_projector=None, strict=False, check_placeholders=True,
          pixel_normalization=None):
    """Swap mmkernels' ops into a live model; returns a :class:`PatchReport`.

    See :func:`mmkernels.integrations.patch`.
    """
    from mmkernels.integrations import patch as _patch

    return _patch(
        model,
        kernels=kernels,
        quantize_projector=quantize_projector,
        strict=strict,
        check_placeholders=check_placeholders,
        pixel_normalization=pixel_normalization,
    )


def quantize_projector(model, scheme, *, group_size=128):
    """Quantize the multimodal projector's Linear layers of a Hugging Face model in place
    (``"w8a16"``, ``"w4a16"``, ``"fp8"``); returns a report. ``save_pretrained`` writes a
    ``quantization_config`` (``quant_method`` "mmkernels") that plain ``from_pretrained``
    (with mmkernels imported) and ``vllm serve`` (with the plugin) load quantized.

    See :func:`mmkernels.integrations.hf_quant.quantize_projector`.
    """
    from mmkernels.integrations import quantize_projector as _quantize_projector

    return _quantize_projector(model, scheme, group_size=group_size)


def unpatch(model):
    """Restore exactly what :func:`patch` replaced (refuses, changing nothing, on a model
    whose projector was quantized: the full-precision weights are gone)."""
    from mmkernels.integrations import unpatch as _unpatch

    return _unpatch(model)


def clear_caches(model):
    """Drop what patched modules keep between calls (interpolated position tables); needed
    only after an in-place write through ``.data``, which no version counter sees.
    See :func:`mmkernels.integrations.clear_caches`."""
    from mmkernels.integrations import clear_caches as _clear_caches

    return _clear_caches(model)


def supported_models():
    """The coverage table, generated from the patch rules."""
    from mmkernels.integrations import supported_models as _supported

    return _supported()


__all__ = ["Backend", "backend", "clear_caches", "ops", "patch", "quant", "quantize_projector", "unpatch",
           "supported_models", "__version__"]


def __getattr__(name: str):
    # MmkernelsConfig is transformers-side: it loads (with transformers) on first use only.
    if name == "MmkernelsConfig":
        from mmkernels.integrations.hf_quantizer import MmkernelsConfig

        return MmkernelsConfig
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
