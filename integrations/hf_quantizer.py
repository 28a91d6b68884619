"""mmkernels' quantized projectors as a transformers quantization method (``quant_method
"mmkernels"``), so that plain ``from_pretrained`` reads the checkpoints it writes.

After ``import mmkernels``::

    mmkernels.quantize_projector(model, "w4a16", group_size=64)
    model.save_pretrained(path)         # config.json: "quantization_config": {"quant_method": "mmkernels", ...}
    model = AutoModelForImageTextToText.from_pretrained(path)     # quantized (stored codes) and patched

    # or quantize a full-precision checkpoint while loading it:
    model = LlavaForConditionalGeneration.from_pretrained(bf16_path, quantization_config=MmkernelsConfig("w8a16"))

``vllm serve path`` reads the same ``quantization_config`` (the plugin registers the
vLLM method ``mmkernels``) and serves the stored codes.

How it plugs in: importing this module runs :func:`register`, which adds :class:`MmkernelsConfig` and
:class:`MmkernelsHfQuantizer` to transformers' quantizer registry
(``register_quantization_config`` / ``register_quantizer``, as out-of-tree methods do).
``import mmkernels`` arranges for this module to be imported when transformers imports
``transformers.quantizers.auto`` (or at once if it already has), so importing mmkernels
never imports transformers. This module imports only transformers' quantizer base
classes; the Hugging Face engine loads when a model is actually loaded.

A pre-quantized load: before the weights load, the recorded projector layers are rebuilt
as :class:`~mmkernels.integrations.hf_quant.QuantizedLinear` on the meta device
(:func:`~mmkernels.integrations.hf_quant.prepare_quantized_modules`); transformers then
loads ``packed`` / ``scales`` / ``zeros`` into their buffers in the checkpoint's own dtypes
(never cast) and the bias like any weight; after loading, every quantized tensor must have
been loaded with its format's shape and dtype (``ValueError`` naming the key otherwise),
then the model is patched with mmkernels' other kernels (:func:`mmkernels.patch`).

Without mmkernels, transformers (5.17 to 5.25) does not refuse an unknown
``quant_method``: it logs "Unknown quantization type, got mmkernels ... we will skip the
quantization" and loads the rest, leaving the projector's Linear weights missing (its load
report lists them) and randomly initialised. That warning is the only place it names the
method; mmkernels cannot make plain transformers refuse without changing the format
transformers and vLLM both read.
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Any

from transformers.quantizers.base import HfQuantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from mmkernels.quant import CHECKPOINT_FORMAT_VERSION as FORMAT_VERSION
from mmkernels.quant import CHECKPOINT_METHOD as QUANT_METHOD

__all__ = ["FORMAT_VERSION", "QUANT_METHOD", "MmkernelsConfig", "MmkernelsHfQuantizer", "no_patch_on_load", "register"]

# FORMAT_VERSION 1 was the config key "mmkernels_quantization" (read by
# hf_quant.from_pretrained only); 2 is "quantization_config" with quant_method "mmkernels".

# Whether a load through the quantizer also runs mmkernels.patch (hf_quant.from_pretrained(patch=False)).
_PATCH_ON_LOAD: contextvars.ContextVar[bool] = contextvars.ContextVar("mmkernels_patch_on_load", default=True)


@contextlib.contextmanager
def no_patch_on_load():
    """Within this block, loading a mmkernels-quantized checkpoint quantizes but does not
    run :func:`mmkernels.patch` (the model's other modules stay transformers')."""
    token = _PATCH_ON_LOAD.set(False)
    try:
        yield
    finally:
        _PATCH_ON_LOAD.reset(token)


class MmkernelsConfig(QuantizationConfigMixin):
    """The ``quantization_config`` of a checkpoint whose multimodal projector mmkernels
    quantized (or the request to quantize one while loading).

    Args:
        scheme: ``"w8a16"``, ``"w4a16"`` or ``"fp8"`` (see :mod:`mmkernels.quant`).
        group_size: w4a16's group (32, 64, 128; default 128); None for the per-channel
            schemes.
        modules: what was quantized, by module path in the saved model:
            ``{path: {"activation": fused op activation or None, "fused": path of the
            activation module made Identity or None[, "parameter": the bare Parameter it
            replaced (Gemma 3)]}}``. Empty in a request (nothing is stored yet).
        version: the format's version (:data:`FORMAT_VERSION`).
    """

    def __init__(self, scheme: str = "w8a16", group_size: int | None = None, modules: dict | None = None,
                 version: int = FORMAT_VERSION, **kwargs: Any):  # fmt: skip
        from mmkernels.quant import check_group_size, scheme_info

        self.quant_method = QUANT_METHOD
        if version != FORMAT_VERSION:
            raise ValueError(f"version: this mmkernels reads quantization_config version {FORMAT_VERSION}, got "
                             f"{version!r} (a checkpoint written by another mmkernels)")  # fmt: skip
        grouped = scheme_info(scheme).grouped
        self.scheme = scheme
        self.group_size = check_group_size(128 if group_size is None else group_size, scheme) if grouped else None
        if modules is not None and not (isinstance(modules, dict) and all(
                isinstance(k, str) and isinstance(v, dict) for k, v in modules.items())):  # fmt: skip
            raise ValueError(f"modules: expected {{module path: {{activation, fused}}}}, got {modules!r}")
        self.modules = dict(modules or {})
        self.version = version
        unknown = set(kwargs) - {"quant_method"}
        if unknown:
            raise ValueError(f"quantization_config: unknown keys {sorted(unknown)} for quant_method {QUANT_METHOD!r}")


class MmkernelsHfQuantizer(HfQuantizer):
    """Loads a checkpoint written after :func:`mmkernels.quantize_projector` (its stored
    codes), or quantizes a full-precision one's projector after loading it."""

    requires_calibration = False

    def __init__(self, quantization_config: MmkernelsConfig, **kwargs):
        super().__init__(quantization_config, **kwargs)
        self._quantized_paths: tuple[str, ...] = ()
        self._patch = _PATCH_ON_LOAD.get()

    def _process_model_before_weight_loading(self, model, **kwargs):
        if not self.pre_quantized:
            return model
        from mmkernels.integrations.hf_quant import prepare_quantized_modules

        if not self.quantization_config.modules:
            raise ValueError("quantization_config: a mmkernels checkpoint must list the quantized modules "
                             "(modules is empty)")  # fmt: skip
        self._quantized_paths = prepare_quantized_modules(model, self.quantization_config)
        return model

    def get_new_dtype(self, converter, param, dtype):
        # The quantized format's tensors arrive in the checkpoint's dtypes, never cast (fp8
        # codes or float32 scales rounded to the model dtype would be another weight):
        # _process_model_after_weight_loading checks them by name. (transformers < 5.25
        # has no such hook: it casts floating tensors to the buffer's dtype.)
        for target in getattr(converter, "target_patterns", ()) or ():
            path, _, name = str(target).rpartition(".")
            if name in ("packed", "scales", "zeros") and path in self._quantized_paths:
                return None
        return super().get_new_dtype(converter, param, dtype)

    def _process_model_after_weight_loading(self, model, **kwargs):
        from mmkernels.integrations import hf_quant

        config = self.quantization_config
        if self.pre_quantized:
            hf_quant.check_loaded_modules(model, self._quantized_paths)
            if self._patch:
                from mmkernels.integrations import patch

                patch(model)
        else:
            request = {"scheme": config.scheme, "group_size": config.group_size or 128}
            if self._patch:
                from mmkernels.integrations import patch

                patch(model, quantize_projector=request)
            else:
                hf_quant.quantize_projector(model, request)
        # quantize_projector recorded the modules in model.config.quantization_config (this
        # config, which postprocess_model has set there).
        return model

    def is_serializable(self, safe_serialization=None) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        # The codes are buffers and stay fixed; gradients flow through the projector to
        # its input and to every other parameter (fine-tuning the rest of the model).
        return True

    @property
    def is_compileable(self) -> bool:
        return True


_REGISTERED = False


def register() -> None:
    """Add the ``mmkernels`` quantization method to transformers' registry (idempotent)."""
    global _REGISTERED
    if _REGISTERED:
        return
    from transformers.quantizers import auto

    if auto.AUTO_QUANTIZATION_CONFIG_MAPPING.get(QUANT_METHOD) not in (None, MmkernelsConfig):
        raise RuntimeError(f"transformers already has a quantization method {QUANT_METHOD!r} "
                           f"({auto.AUTO_QUANTIZATION_CONFIG_MAPPING[QUANT_METHOD]!r}) that is not mmkernels'")  # fmt: skip
    if QUANT_METHOD not in auto.AUTO_QUANTIZATION_CONFIG_MAPPING:
        auto.register_quantization_config(QUANT_METHOD)(MmkernelsConfig)
    if QUANT_METHOD not in auto.AUTO_QUANTIZER_MAPPING:
        auto.register_quantizer(QUANT_METHOD)(MmkernelsHfQuantizer)
    _REGISTERED = True


register()  # importing this module registers (mmkernels' import hook imports it when transformers loads its registry)
