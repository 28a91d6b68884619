"""Quantized multimodal projectors in vLLM: ``vllm serve <checkpoint> --quantization mmkernels-w8a16``.

Three vLLM quantization methods, one per :data:`mmkernels.quant.SCHEMES` entry
(:data:`METHODS`)::

    mmkernels-w8a16   int8 weights, per-output-channel scale
    mmkernels-w4a16   int4 weights, scale and zero per group of 128 K elements (see below)
    mmkernels-fp8     e4m3 weights per channel, activations quantized per token

They quantize ONLY the multimodal projector's linear layers, at load time: the checkpoint
is an ordinary bf16 / fp16 / fp32 one (no ``quantization_config`` needed). Every other
layer (vision tower, language model, LM head, embeddings, attention, MoE) gets vLLM's own
unquantized method, exactly as without ``--quantization``.

A fourth method, ``mmkernels`` (:class:`StoredProjectorConfig`), is the one vLLM picks by
itself for a checkpoint saved after :func:`mmkernels.quantize_projector` (its
``quantization_config`` has ``quant_method`` "mmkernels", :data:`mmkernels.quant.CHECKPOINT_METHOD`):
``vllm serve <that checkpoint>`` loads the stored ``packed`` / ``scales`` / ``zeros`` of the
recorded modules into parameters of exactly their format, sharded by vLLM's own parameter
classes under tensor parallelism (a row-parallel rank takes its slice of K with the whole
row's per-channel scale, or its whole groups: a shard that would split a group is an
error naming the layer), and runs them with :func:`mmkernels.ops.quantized_linear`. No
full-precision weight is created and nothing is requantized. The recorded modules are
matched to vLLM's layers by name (equal, or differing by leading components such as
``model.``); a recorded module that vLLM does not build as a linear layer (Gemma 3's bare
Parameter, PaliGemma's and Mistral 3's ``nn.Linear`` projectors) fails the load in vLLM's
weight loader, naming the tensor. Without the plugin vLLM refuses the checkpoint
("Unknown quantization method: mmkernels").

How it plugs into vLLM (read against vLLM 0.32):

* :func:`register_quantization` registers one :class:`QuantizationConfig` subclass per
  method with ``vllm.model_executor.layers.quantization.register_quantization_config``,
  which adds the name to ``QUANTIZATION_METHODS`` (what ``ModelConfig`` validates
  ``--quantization`` against; ``--quantization`` is a free string on the CLI, no argparse
  choices) and to the platform's ``supported_quantization`` where that list is not empty
  (CUDA's is empty, as is CPU's: every method passes ``verify_quantization``). It must run
  in every vLLM process that builds a config or a model (the plugin's ``register()`` does).
  Idempotent.
* With no ``quantization_config`` in the checkpoint, vLLM's ``get_quant_config`` sees
  ``get_config_filenames() == []`` and builds the config with no arguments: the defaults
  here. A checkpoint (or ``--hf-overrides``) may carry
  ``"quantization_config": {"quant_method": "mmkernels-w4a16", "group_size": 64,
  "prefixes": [...]}``; :meth:`from_config` reads it (``group_size`` an int,
  ``prefixes`` a list of strings: a bare string is refused, not split into characters).
* ``get_quant_method(layer, prefix)``: for a ``LinearBase`` whose prefix is in the
  projector table (:data:`PROJECTOR_PREFIXES`) a :class:`ProjectorLinearMethod`; for any
  other ``LinearBase`` vLLM's ``UnquantizedLinearMethod``; ``None`` for everything else
  (embeddings, LM head, attention, fused MoE then take their unquantized defaults).
* :class:`ProjectorLinearMethod` creates vLLM's normal weight parameter (it delegates
  ``create_weights`` to ``UnquantizedLinearMethod``, and is registered for vLLM's
  ``weight_loader_v2`` like it), so the checkpoint loads unchanged; after loading it
  quantizes the weight with :func:`mmkernels.quant.quantize` into plain buffers
  ``weight_packed`` / ``weight_scales`` (/ ``weight_zeros``), deletes the ``weight``
  parameter, and runs :func:`mmkernels.ops.quantized_linear` (bias included) in ``apply``.
  vLLM applies the projector's activation itself, after the layer: nothing is fused.

Projector prefixes (vLLM module names, not Hugging Face checkpoint names):

=========================  =================================================================
``multi_modal_projector.`` LLaVA, LLaVA-NeXT(-Video), LLaVA-OneVision, Mistral 3 (their
                           ``linear_1`` / ``linear_2``); PaliGemma's and Mistral 3's
                           ``merging_layer`` are plain ``nn.Linear`` in vLLM and Gemma 3's
                           is a bare Parameter: vLLM gives them no quantization method
``visual.merger.``         Qwen2-VL, Qwen2.5-VL (``mlp.0`` / ``mlp.2``); Qwen3-VL, Qwen3.5 and
                           their MoE (``linear_fc1`` / ``linear_fc2``, read against vLLM 0.32's
                           module names; the lane serves Qwen2-VL). Qwen3-VL's deepstack
                           mergers (``visual.deepstack_merger_list.``) are not the projector
                           and stay unquantized; InternVL-Chat's ``mlp1`` is plain
                           ``nn.Linear`` in vLLM (no quantization method)
``model.connector.``       Idefics3, SmolVLM (``modality_projection.proj``)
``mm_projector.``          Kimi K2.5 (``linear_1`` / ``linear_2``, vLLM's names for the
                           checkpoint's ``proj.0`` / ``proj.2``; read against vLLM 0.32)
``vision_backbone.``       Molmo2 (``merged_linear``, its gate and up projections as one
``image_projector.``       layer, and ``down_proj``): vLLM's ``get_mm_mapping`` connector
=========================  =================================================================

GLM-4.1V / 4.5V's merger (``proj``, ``gate_up_proj``, ``down_proj``) is under
``visual.merger.``, and Llama 4's ``multi_modal_projector.linear_1`` under the first row.

A projector layer that the scheme cannot take stays unquantized, with the reason logged:
w4a16 needs ``in_features`` (per tensor-parallel rank) divisible by the group size; when
it is not divisible by the configured one (default 128) the largest of 64 / 32 that
divides it is used (finer groups, more scales, never less accurate), and the log says so.
A projector weight that cannot be quantized (NaN or inf in the checkpoint, or a range
whose format would overflow: :class:`mmkernels.quant.QuantizationError`) leaves that layer
unquantized too, with a warning naming it, rather than failing the model load.

Process-local introspection for tests and debugging: :func:`stats`.
"""

from __future__ import annotations

import collections
import logging
import os
import threading
from typing import Any, ClassVar

import torch
from vllm.model_executor.layers.linear import (
    LinearBase,
    LinearMethodBase,
    UnquantizedLinearMethod,
    register_weight_loader_v2_supported_method,
)
from vllm.model_executor.layers.quantization import register_quantization_config
from vllm.model_executor.layers.quantization.base_config import QuantizationConfig
from vllm.model_executor.parameter import ChannelQuantScaleParameter, GroupQuantScaleParameter, ModelWeightParameter

from mmkernels.quant import (
    CHECKPOINT_FORMAT_VERSION,
    CHECKPOINT_METHOD,
    GROUP_SIZES,
    SCHEME_TABLE,
    SCHEMES,
    QuantizationError,
    QuantizedWeight,
    check_group_size,
    quantize,
    same_module_path,
    scheme_info,
)

__all__ = [
    "CHECKPOINT_METHOD",
    "METHODS",
    "StoredProjectorConfig",
    "StoredProjectorLinearMethod",
    "PROJECTOR_PREFIXES",
    "ProjectorLinearMethod",
    "is_projector",
    "register_quantization",
    "stats",
]

log = logging.getLogger("vllm.mmkernels.quant")

# vLLM quantization name -> mmkernels scheme.
METHODS: dict[str, str] = {f"mmkernels-{scheme}": scheme for scheme in SCHEMES}
# CHECKPOINT_METHOD (mmkernels.quant): the quant_method of a checkpoint saved after
# mmkernels.quantize_projector, whose stored codes load as they are.

# The projector's linear layers, by vLLM module prefix (see the module docstring).
PROJECTOR_PREFIXES: tuple[str, ...] = (
    "multi_modal_projector.",
    "visual.merger.",
    "model.connector.",
    "mm_projector.",
    "vision_backbone.image_projector.",
)

_DEFAULT_GROUP_SIZE = 128
_ACT_DTYPES = [torch.bfloat16, torch.float16, torch.float32]

_LOCK = threading.Lock()
_REGISTERED: str | None = None
# Process-local record (see stats()).
_QUANTIZED: dict[str, dict[str, Any]] = {}
_SKIPPED: dict[str, str] = {}
_UNQUANTIZED: list[str] = []
_CALLS: collections.Counter = collections.Counter()
_NOTED: set = set()


def stats() -> dict[str, Any]:
    """What this process did: ``quantized`` (prefix -> scheme, shape, group size),
    ``skipped`` (projector prefix -> why it stayed unquantized), ``unquantized`` (the
    other linear layers' prefixes, given vLLM's unquantized method), ``calls``
    ("prefix/backend" -> count of ``apply`` calls)."""
    return {
        "quantized": {k: dict(v) for k, v in _QUANTIZED.items()},
        "skipped": dict(_SKIPPED),
        "unquantized": list(_UNQUANTIZED),
        "calls": {f"{p}/{b}": n for (p, b), n in _CALLS.items()},
    }


def is_projector(prefix: str, prefixes: tuple[str, ...] = PROJECTOR_PREFIXES) -> bool:
    """Whether the layer named ``prefix`` belongs to a multimodal projector."""
    return any(prefix.startswith(p) or prefix == p.rstrip(".") for p in prefixes)


def _tensor_parallel_note() -> str:
    """Under tensor parallelism, which rank this is: each quantizes its own shard (the
    sizes logged are the shard's), with scales of its own."""
    try:
        from vllm.distributed import get_tensor_model_parallel_rank, get_tensor_model_parallel_world_size

        world = get_tensor_model_parallel_world_size()
        rank = get_tensor_model_parallel_rank()
    except Exception:  # noqa: BLE001 - no parallel state (a layer built outside an engine)
        return ""
    return f", tensor-parallel rank {rank} of {world}: this rank's shard" if world > 1 else ""


def _note_once(key, level: int, msg: str, *args) -> None:
    with _LOCK:
        if key in _NOTED:
            return
        _NOTED.add(key)
    log.log(level, msg, *args)


# --------------------------------------------------------------------------------------
# The linear method


@register_weight_loader_v2_supported_method  # loads like UnquantizedLinearMethod (same parameter)
class ProjectorLinearMethod(LinearMethodBase):
    """One projector linear layer: vLLM's unquantized weight while loading, then
    :func:`mmkernels.quant.quantize` and :func:`mmkernels.ops.quantized_linear`."""

    def __init__(self, scheme: str, group_size: int, prefix: str, method: str) -> None:
        scheme_info(scheme)  # a ValueError naming the known schemes
        self.scheme = scheme
        self.requested_group_size = group_size
        self.prefix = prefix
        self.method = method
        self.group_size: int | None = None  # w4a16: the group size actually used
        self.reason: str | None = None  # why this layer stays unquantized (None: it is quantized)
        self._meta: dict[str, Any] | None = None  # QuantizedWeight's non-tensor fields
        self._unquantized = UnquantizedLinearMethod()

    # -- loading -------------------------------------------------------------------------
    def create_weights(self, layer, input_size_per_partition, output_partition_sizes, input_size, output_size,
                       params_dtype, **extra_weight_attrs):  # fmt: skip
        # vLLM's own (N, K) weight parameter and loader: ordinary checkpoints load unchanged.
        self._unquantized.create_weights(layer, input_size_per_partition, output_partition_sizes, input_size,
                                         output_size, params_dtype, **extra_weight_attrs)  # fmt: skip
        k = input_size_per_partition
        if params_dtype not in _ACT_DTYPES:
            self.reason = f"params dtype {params_dtype}"
        elif SCHEME_TABLE[self.scheme].grouped:
            sizes = sorted((g for g in GROUP_SIZES if g <= self.requested_group_size), reverse=True)
            fits = [g for g in sizes if k % g == 0]
            if not fits:
                self.reason = f"in_features {k} not divisible by any w4a16 group size {sorted(GROUP_SIZES)}"
            else:
                self.group_size = fits[0]
                if self.group_size != self.requested_group_size:
                    _note_once(("group", self.prefix), logging.INFO,
                               "%s: %s has in_features %d, not divisible by group_size %d: using group_size %d",
                               self.method, self.prefix, k, self.requested_group_size, self.group_size)  # fmt: skip
        if self.reason is not None:
            _SKIPPED[self.prefix] = self.reason
            _note_once(("skip", self.prefix), logging.WARNING, "%s: projector layer %s stays unquantized: %s",
                       self.method, self.prefix, self.reason)  # fmt: skip

    def process_weights_after_loading(self, layer) -> None:
        if self.reason is None:
            weight = layer.weight
            try:
                qw = quantize(weight.data, self.scheme, group_size=self.group_size or _DEFAULT_GROUP_SIZE)
            except QuantizationError as error:
                # NaN / inf in the checkpoint's projector, or a range the format cannot hold:
                # the layer runs as it would without --quantization (its own weights, NaN
                # included), not a failed model load.
                self.reason = f"its weight cannot be quantized ({error})"
                _SKIPPED[self.prefix] = self.reason
                _note_once(("skip", self.prefix), logging.WARNING, "%s: projector layer %s stays unquantized: %s",
                           self.method, self.prefix, self.reason)  # fmt: skip
        if self.reason is not None:
            self._unquantized.process_weights_after_loading(layer)
            return
        # Free the full-precision weight: the parameter goes, the codes stay as plain buffers.
        del layer.weight
        del weight
        for name, tensor in qw.tensors().items():
            layer.register_buffer(f"weight_{name}", tensor)
        self._meta = {
            "scheme": qw.scheme,
            "group_size": qw.group_size,
            "in_features": qw.in_features,
            "out_features": qw.out_features,
            "dtype": qw.dtype,
        }
        _QUANTIZED[self.prefix] = {
            "scheme": qw.scheme,
            "group_size": qw.group_size,
            "shape": [qw.out_features, qw.in_features],
            "dtype": str(qw.dtype).replace("torch.", ""),
            "method": self.method,
        }
        _note_once(("quantized", self.prefix), logging.INFO,
                   "%s: quantized projector layer %s (%d -> %d, %s%s)%s [pid %d]", self.method, self.prefix,
                   qw.in_features, qw.out_features, qw.scheme,
                   f", group_size {qw.group_size}" if qw.group_size else "", _tensor_parallel_note(),
                   os.getpid())  # fmt: skip

    def qweight(self, layer) -> QuantizedWeight:
        """The layer's :class:`QuantizedWeight` (views of its buffers)."""
        if self._meta is None:
            raise RuntimeError(f"{self.prefix}: the weight has not been quantized (process_weights_after_loading)")
        return QuantizedWeight(
            packed=layer.weight_packed,
            scales=layer.weight_scales,
            zeros=getattr(layer, "weight_zeros", None),
            **self._meta,
        )

    # -- running -------------------------------------------------------------------------
    def apply(self, layer, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        if self.reason is not None:
            return self._unquantized.apply(layer, x, bias)
        from mmkernels.ops.quantized_linear import quantized_linear

        out = quantized_linear(x, self.qweight(layer), bias)
        self._record()
        return out

    def _record(self) -> None:
        """Count the call by the backend mmkernels' op took; log the first per process."""
        if torch.compiler.is_compiling():
            return
        from mmkernels.backend import recent_decisions

        op = f"quantized_linear[{self.scheme}]"
        decisions = [d for d in recent_decisions()[-4:] if d.op == op]
        backend = decisions[-1].backend.value if decisions else "unknown"
        _CALLS[(self.prefix, backend)] += 1
        reasons = f" ({'; '.join(decisions[-1].reasons)})" if decisions and decisions[-1].reasons else ""
        # The route a table chose (mmkernels.routes), if any: one line per route.
        route = decisions[-1].route if decisions else None
        route_text = f" route={route} ({decisions[-1].route_source})" if route is not None else ""
        _note_once(("ran", self.prefix, backend, route), logging.INFO, "%s: %s ran mmkernels quantized_linear: "
                   "backend=%s%s%s [pid %d, first call]", self.method, self.prefix, backend, route_text, reasons,
                   os.getpid())  # fmt: skip


@register_weight_loader_v2_supported_method  # its parameters carry vLLM's sharding loaders
class StoredProjectorLinearMethod(ProjectorLinearMethod):
    """One projector linear layer of a mmkernels checkpoint: the stored ``packed`` /
    ``scales`` (/ ``zeros``) load into parameters of exactly their format (vLLM's
    parameter classes shard them under tensor parallelism: a column-parallel layer takes
    its output rows, a row-parallel one its slice of K with the whole row's per-channel
    scale, or its groups), then :func:`mmkernels.ops.quantized_linear` runs them. No
    requantization: the codes served are the codes saved."""

    def __init__(self, scheme: str, group_size: int | None, prefix: str, method: str) -> None:
        super().__init__(scheme, group_size or _DEFAULT_GROUP_SIZE, prefix, method)
        self.group_size = group_size  # the checkpoint's (None: per channel)

    def create_weights(self, layer, input_size_per_partition, output_partition_sizes, input_size, output_size,
                       params_dtype, **extra_weight_attrs):  # fmt: skip
        info, k, n = SCHEME_TABLE[self.scheme], input_size_per_partition, sum(output_partition_sizes)
        if len(output_partition_sizes) != 1:
            raise ValueError(f"{self.method}: {self.prefix} merges {len(output_partition_sizes)} layers "
                             f"(sizes {list(output_partition_sizes)}); a stored projector layer is one Linear")  # fmt: skip
        if params_dtype not in _ACT_DTYPES:
            raise ValueError(f"{self.method}: {self.prefix} has params dtype {params_dtype}; the stored projector "
                             f"serves in {_ACT_DTYPES}")  # fmt: skip
        if info.grouped and k % self.group_size:
            raise ValueError(
                f"{self.method}: {self.prefix} has in_features {k} per tensor-parallel rank (of {input_size}), not a "
                f"multiple of the checkpoint's group_size {self.group_size}: serve with a tensor_parallel_size that "
                f"keeps whole groups per rank, or quantize with a smaller group_size")  # fmt: skip
        loader = extra_weight_attrs["weight_loader"]
        layout = info.layout(n, k, self.group_size if info.grouped else None)
        for name, (shape, dtype) in layout.items():
            data = torch.empty(shape, dtype=dtype)
            if name == "packed":
                param = ModelWeightParameter(data=data, input_dim=1, output_dim=0, weight_loader=loader)
            elif info.grouped:
                param = GroupQuantScaleParameter(data=data, input_dim=1, output_dim=0, weight_loader=loader)
            else:  # one scale per output channel, whatever slice of K a rank holds
                param = ChannelQuantScaleParameter(data=data, output_dim=0, weight_loader=loader)
            layer.register_parameter(name, param)
        self._dtype = params_dtype

    def process_weights_after_loading(self, layer) -> None:
        # The parameters become the plain buffers ProjectorLinearMethod runs from.
        tensors = {}
        for name in ("packed", "scales", "zeros"):
            if name in layer._parameters:
                tensors[name] = layer._parameters.pop(name).data
        qw = QuantizedWeight(self.scheme, tensors["packed"], tensors["scales"], tensors.get("zeros"), self.group_size,
                             tensors["packed"].shape[1] * SCHEME_TABLE[self.scheme].codes_per_byte,
                             tensors["packed"].shape[0], self._dtype)  # fmt: skip
        if not bool(torch.isfinite(qw.scales).all()) or (qw.zeros is not None and not bool(torch.isfinite(qw.zeros).all())):
            raise ValueError(f"{self.method}: {self.prefix}: the checkpoint's scales or zero points are not finite")
        for name, tensor in qw.tensors().items():
            layer.register_buffer(f"weight_{name}", tensor)
        self._meta = {"scheme": qw.scheme, "group_size": qw.group_size, "in_features": qw.in_features,
                      "out_features": qw.out_features, "dtype": qw.dtype}  # fmt: skip
        _QUANTIZED[self.prefix] = {"scheme": qw.scheme, "group_size": qw.group_size,
                                   "shape": [qw.out_features, qw.in_features],
                                   "dtype": str(qw.dtype).replace("torch.", ""), "method": self.method,
                                   "stored": True}  # fmt: skip
        _note_once(("quantized", self.prefix), logging.INFO,
                   "%s: loaded the stored quantized projector layer %s (%d -> %d, %s%s, no requantization)%s [pid %d]",
                   self.method, self.prefix, qw.in_features, qw.out_features, qw.scheme,
                   f", group_size {qw.group_size}" if qw.group_size else "", _tensor_parallel_note(),
                   os.getpid())  # fmt: skip


# --------------------------------------------------------------------------------------
# The configs


def _check_prefixes(prefixes) -> tuple[str, ...]:
    """``prefixes`` from a config: None (the projector table) or a list / tuple of
    non-empty strings. A bare string is refused: ``tuple("model.connector.")`` is its
    characters, and the prefix "m" matches nearly every layer of a model."""
    if prefixes is None:
        return PROJECTOR_PREFIXES
    if not isinstance(prefixes, (list, tuple)):
        raise TypeError(f"prefixes: expected a list of module-name prefixes (strings, e.g. [\"model.connector.\"]), "
                        f"got {type(prefixes).__name__} {prefixes!r}")  # fmt: skip
    if not prefixes or not all(isinstance(p, str) and p for p in prefixes):
        raise ValueError(f"prefixes: expected a non-empty list of non-empty strings, got {list(prefixes)!r}")
    return tuple(prefixes)


class _ProjectorConfig(QuantizationConfig):
    """Quantize only the multimodal projector's linear layers with mmkernels (one scheme
    per subclass, vLLM looks configs up by name)."""

    scheme: ClassVar[str]
    method: ClassVar[str]

    def __init__(self, group_size: int = _DEFAULT_GROUP_SIZE, prefixes: tuple[str, ...] | None = None) -> None:
        super().__init__()
        # An int (64.0 from a JSON config is refused: it would reach the kernel as a float);
        # for w4a16 one of GROUP_SIZES, for the per-channel schemes unused.
        self.group_size = check_group_size(group_size, self.scheme, name=f"group_size ({self.method})")
        if self.group_size is None:
            self.group_size = _DEFAULT_GROUP_SIZE
        self.prefixes = _check_prefixes(prefixes)

    def __repr__(self) -> str:
        group = f", group_size={self.group_size}" if SCHEME_TABLE[self.scheme].grouped else ""
        return f"{type(self).__name__}(scheme={self.scheme!r}{group}, prefixes={list(self.prefixes)})"

    def get_name(self) -> str:
        return self.method

    def get_supported_act_dtypes(self) -> list[torch.dtype]:
        return list(_ACT_DTYPES)

    @classmethod
    def get_min_capability(cls) -> int:
        from mmkernels.ops.quantized_linear import CAPABILITIES

        major, minor = CAPABILITIES[cls.scheme].min_compute_capability
        return 10 * major + minor

    @staticmethod
    def get_config_filenames() -> list[str]:
        return []  # nothing to read: vLLM builds the config with its defaults

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "_ProjectorConfig":
        group_size = cls.get_from_keys_or(config, ["group_size"], _DEFAULT_GROUP_SIZE)
        prefixes = cls.get_from_keys_or(config, ["prefixes"], None)
        return cls(group_size=group_size, prefixes=prefixes)

    def get_quant_method(self, layer: torch.nn.Module, prefix: str):
        if not isinstance(layer, LinearBase):
            return None  # embeddings, LM head, attention, MoE: vLLM's unquantized defaults
        if is_projector(prefix, self.prefixes):
            return ProjectorLinearMethod(self.scheme, self.group_size, prefix, self.method)
        _UNQUANTIZED.append(prefix)
        return UnquantizedLinearMethod()


class W8A16ProjectorConfig(_ProjectorConfig):
    scheme = "w8a16"
    method = "mmkernels-w8a16"


class W4A16ProjectorConfig(_ProjectorConfig):
    scheme = "w4a16"
    method = "mmkernels-w4a16"


class FP8ProjectorConfig(_ProjectorConfig):
    scheme = "fp8"
    method = "mmkernels-fp8"


CONFIGS: dict[str, type[_ProjectorConfig]] = {
    c.method: c for c in (W8A16ProjectorConfig, W4A16ProjectorConfig, FP8ProjectorConfig)
}
assert set(CONFIGS) == set(METHODS)


class StoredProjectorConfig(QuantizationConfig):
    """A checkpoint whose projector mmkernels quantized (``quantization_config``:
    ``{"quant_method": "mmkernels", "scheme", "group_size", "modules", "version"}``, written
    by ``save_pretrained`` after :func:`mmkernels.quantize_projector`). vLLM picks it from
    the checkpoint by its ``quant_method``; the recorded modules get
    :class:`StoredProjectorLinearMethod`, every other linear layer vLLM's unquantized one."""

    def __init__(self, scheme: str, group_size: int | None, modules: dict) -> None:
        super().__init__()
        self.scheme = scheme_info(scheme).name
        self.group_size = check_group_size(group_size, scheme, name=f"group_size ({CHECKPOINT_METHOD})")
        if not isinstance(modules, dict) or not modules:
            raise ValueError(f"modules ({CHECKPOINT_METHOD}): expected the checkpoint's quantized modules "
                             f"{{path: {{...}}}}, got {modules!r}")  # fmt: skip
        self.modules = dict(modules)

    def __repr__(self) -> str:
        group = f", group_size={self.group_size}" if self.group_size else ""
        return f"{type(self).__name__}(scheme={self.scheme!r}{group}, modules={sorted(self.modules)})"

    def get_name(self) -> str:
        return CHECKPOINT_METHOD

    def get_supported_act_dtypes(self) -> list[torch.dtype]:
        return list(_ACT_DTYPES)

    def get_min_capability(self) -> int:  # noqa: D102 - the scheme's (an instance's: the checkpoint says which)
        from mmkernels.ops.quantized_linear import CAPABILITIES

        major, minor = CAPABILITIES[self.scheme].min_compute_capability
        return 10 * major + minor

    @staticmethod
    def get_config_filenames() -> list[str]:
        return []  # vLLM passes the checkpoint's quantization_config to from_config

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "StoredProjectorConfig":
        version = config.get("version")
        if version != CHECKPOINT_FORMAT_VERSION:
            raise ValueError(f"version ({CHECKPOINT_METHOD}): this mmkernels reads quantization_config version "
                             f"{CHECKPOINT_FORMAT_VERSION}, got {version!r}")  # fmt: skip
        return cls(config.get("scheme"), config.get("group_size"), config.get("modules"))

    def get_quant_method(self, layer: torch.nn.Module, prefix: str):
        if not isinstance(layer, LinearBase):
            return None
        # Hugging Face paths against vLLM's prefixes (leading components such as "model." differ)
        if any(same_module_path(saved, prefix) for saved in self.modules):
            return StoredProjectorLinearMethod(self.scheme, self.group_size, prefix, CHECKPOINT_METHOD)
        _UNQUANTIZED.append(prefix)
        return UnquantizedLinearMethod()


def register_quantization() -> str:
    """Register the ``mmkernels-*`` quantization methods with vLLM, once per process.
    Returns a one-line summary for the plugin's log line."""
    global _REGISTERED
    from vllm.model_executor.layers import quantization as vq

    with _LOCK:
        if _REGISTERED is None:
            for name, cls in {**CONFIGS, CHECKPOINT_METHOD: StoredProjectorConfig}.items():
                if vq._CUSTOMIZED_METHOD_TO_QUANT_CONFIG.get(name) is not cls:
                    register_quantization_config(name)(cls)
            _REGISTERED = (f"quantized_projector -> --quantization {', '.join(CONFIGS)} (projector Linears only); "
                           f"checkpoints of quant_method {CHECKPOINT_METHOD!r} serve their stored codes")  # fmt: skip
    return _REGISTERED
