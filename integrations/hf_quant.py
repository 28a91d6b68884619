"""Quantized multimodal projectors for Hugging Face models.

``quantize_projector(model, scheme, *, group_size=128)`` replaces the ``nn.Linear`` layers
of the multimodal projector with :class:`QuantizedLinear` modules that run
:func:`mmkernels.ops.quantized_linear` (int8 / int4 / fp8 weights, bias and activation
fused), and records what it did in ``model.config.quantization_config``
(``quant_method`` "mmkernels", :class:`~.hf_quantizer.MmkernelsConfig`) so that the
checkpoint carries it and every loader reads it:

    model = LlavaForConditionalGeneration.from_pretrained(...)
    mmkernels.quantize_projector(model, "w4a16")       # or mmkernels.patch(model, quantize_projector="w4a16")
    model.save_pretrained(path)                        # config.json: "quantization_config": {"quant_method": "mmkernels", ...}
    model = LlavaForConditionalGeneration.from_pretrained(path)   # with mmkernels imported: quantized and patched
    # vllm serve path                                  # with the plugin: the stored codes (integrations/vllm/quant.py)

Unlike :func:`mmkernels.patch`'s method swaps this changes the module tree and the
``state_dict`` (``linear_1.weight`` becomes ``linear_1.packed`` / ``.scales`` / ``.zeros``,
plain tensors; ``bias`` keeps its key) and cannot be undone: the full-precision weights
are gone. Each replaced layer is recorded as a permanent change
(:func:`~.engine.record_permanent`), so :func:`mmkernels.unpatch` refuses on such a model,
changing nothing.

Where the projectors are (one spec per family, keyed by the ``config.model_type`` of the
sub-model that holds the projector attribute):

* LLaVA, LLaVA-NeXT, LLaVA-OneVision: ``multi_modal_projector.linear_1`` (its activation
  ``act`` fused into it) and ``linear_2``;
* Qwen2-VL, Qwen2.5-VL: the vision tower's ``merger.mlp.0`` (GELU ``mlp.1`` fused) and
  ``merger.mlp.2`` (the LayerNorm / RMSNorm before stays as is); Qwen3-VL, Qwen3.5 (and
  their MoE): ``merger.linear_fc1`` (GELU ``act_fn`` fused) and ``linear_fc2`` (Qwen3-VL's
  deepstack mergers stay as they are);
* Llama 4: ``multi_modal_projector.linear_1``; InternVL: as LLaVA; Mistral 3: ``multi_modal_projector.patch_merger.merging_layer``,
  then as LLaVA; Aya Vision, Command A Vision: ``linear_1`` and ``linear_2`` (their
  SwiGLU takes half of ``linear_1``'s output, so it is not fused);
* Kimi K2.5: ``mm_projector.in_proj`` (GELU ``act`` fused) and ``out_proj``; GLM-4.1V /
  4.5V / OCR: the vision tower's ``merger.proj``, ``gate_proj``, ``up_proj``, ``down_proj``
  (the LayerNorm + GELU after ``proj`` and the SwiGLU stay as they are); Molmo2:
  ``multi_modal_projector.image_projector.{gate,up,down}_proj`` (its attention pooling stays);
* PaliGemma: ``multi_modal_projector.linear``; Idefics3 / SmolVLM:
  ``connector.modality_projection.proj``; Mllama: ``multi_modal_projector`` (a Linear);
* Gemma 3: ``multi_modal_projector.mm_input_projection_weight``, a bare ``(K, N)``
  Parameter that the projector's forward multiplies by with ``torch.matmul`` after its
  average pooling and ``mm_soft_emb_norm`` (see :class:`MatmulWeight`). It becomes a
  :class:`QuantizedLinear` submodule ``mm_input_projection`` holding the ``(N, K)``
  transpose (``state_dict``: ``mm_input_projection_weight`` becomes
  ``mm_input_projection.packed`` / ``.scales`` / ``.zeros``; there is no bias), and the
  projector's ``forward`` is swapped on the instance through :mod:`.engine`
  (:class:`ProjectorForwardRule`: copies and pickles rebuild it; the model refuses
  ``unpatch`` as a whole) for one that runs the projector's own
  ``avg_pool`` and ``mm_soft_emb_norm`` modules and then that submodule. Before anything
  changes, the swap is checked to compute exactly what the original forward does (on a
  random input, with the unquantized weight); where a transformers version computes
  something else the projector is skipped with that reason.

An activation is fused only when it computes exactly one of the op's activations (checked
numerically in float64 on the live module); otherwise it stays a separate module.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import warnings
from pathlib import Path
from typing import Callable, Mapping

import torch

from mmkernels.ops.quantized_linear import CAPABILITIES, apply_activation, quantized_linear
from mmkernels.quant import SCHEME_TABLE, QuantizedWeight, check_group_size, quantize, same_module_path, scheme_info

from .engine import (ORIGINALS_ATTR, PatchOptions, PatchReport, Replacement, Rule, Skip, backend_note, original_method,
                     check_undoable, record_permanent, swap_method)
from .hf_quantizer import QUANT_METHOD, MmkernelsConfig, no_patch_on_load

__all__ = [
    "CONFIG_ATTR",
    "MatmulWeight",
    "PROJECTOR_SPECS",
    "ProjectorForwardRule",
    "ProjectorSpec",
    "QuantizedLinear",
    "check_unpatchable",
    "projector_linears",
    "from_pretrained",
    "is_quantized",
    "quantize_projector",
    "quantization_config",
]

# Format 1's config.json key (read by from_pretrained); format 2 is quantization_config.
CONFIG_ATTR = "mmkernels_quantization"


@dataclasses.dataclass(frozen=True)
class MatmulWeight:
    """A projector weight that is a bare ``(in_features, out_features)`` Parameter used as
    ``torch.matmul(x, weight)`` rather than an ``nn.Linear`` (Gemma 3).

    ``parameter``: its name on the projector. ``module``: the name of the
    :class:`QuantizedLinear` submodule (holding the ``(out_features, in_features)``
    transpose) that replaces it. ``forward``: the projector's new ``forward``, bound to the
    instance; it calls ``module`` where the original called ``torch.matmul``.
    ``not_equivalent(projector, shape=None, device=None, dtype=None)``: why ``forward`` would
    not compute what the projector class's forward does, given a weight (None when it
    does); called before anything changes, and after a quantized checkpoint loads (then
    with the weight's shape, device and dtype: the Parameter is gone).
    """

    parameter: str
    module: str
    forward: Callable
    not_equivalent: Callable[..., str | None]


@dataclasses.dataclass(frozen=True)
class ProjectorSpec:
    """Where one family keeps its projector.

    ``model_type``: the ``config.model_type`` of the sub-model holding ``attribute``.
    ``linears``: ``(linear path, activation path or None)`` inside the projector; the path
    ``""`` is the projector itself (Mllama). ``matmul``: for a projector whose weight is
    a bare Parameter (then ``linears`` is empty).
    """

    family: str
    model_type: str
    attribute: str
    linears: tuple[tuple[str, str | None], ...]
    matmul: MatmulWeight | None = None


class ProjectorForwardRule(Rule):
    """The projector ``forward`` that goes with a :class:`MatmulWeight` (Gemma 3), swapped
    through the engine (:func:`~.engine.swap_method`) so that copies and pickles of the
    quantized model rebuild it. Never applied by :func:`mmkernels.patch` (no kernel
    selects it) and never undone: the Parameter its original forward reads is gone (a
    permanent change, so ``unpatch`` refuses the model)."""

    kernel = "quantize_projector"
    method = "forward"
    op = "mmkernels::quantized_linear"

    def __init__(self, spec: "ProjectorSpec"):
        self.spec = spec
        self.family = spec.family
        self.model_type = spec.model_type

    def __repr__(self) -> str:
        return f"ProjectorForwardRule({self.spec.family}: {self.spec.attribute}.forward)"

    def make_replacement(self, options: PatchOptions):
        return self.spec.matmul.forward


def _quantized_layer(parent: torch.nn.Module, name: str, module: "QuantizedLinear") -> None:
    """Put ``module`` in ``parent`` as ``name`` (the Linear there is dropped) and record the
    change as permanent."""
    parent._modules[name] = module
    record_permanent(parent, name, f"quantized to {module.scheme} (the full-precision weight is gone)")


def _quantized_matmul(projector: torch.nn.Module, spec: "ProjectorSpec", module: "QuantizedLinear") -> None:
    """Replace the projector's :class:`MatmulWeight` Parameter by ``module`` (the quantized
    transpose) and swap its ``forward`` for the one that calls it; the Parameter's removal
    is recorded as permanent."""
    mw = spec.matmul
    delattr(projector, mw.parameter)
    projector.add_module(mw.module, module)
    swap_method(projector, ProjectorForwardRule(spec), PatchOptions())
    record_permanent(projector, mw.parameter, f"replaced by the {module.scheme} {mw.module} (the Parameter is gone)")


def _gemma3_features(projector: torch.nn.Module, vision_outputs: torch.Tensor) -> torch.Tensor:
    """What ``Gemma3MultiModalProjector.forward`` multiplies by ``mm_input_projection_weight``:
    the patch grid average-pooled by the projector's ``avg_pool`` and normalized by its
    ``mm_soft_emb_norm``, ``(B, tokens, K)``. Only the reshapes around the two modules are
    restated here; :func:`_gemma3_not_equivalent` checks them against the original."""
    batch_size, _, hidden_size = vision_outputs.shape
    side = projector.patches_per_image
    grid = vision_outputs.transpose(1, 2).reshape(batch_size, hidden_size, side, side).contiguous()
    pooled = projector.avg_pool(grid).flatten(2).transpose(1, 2)
    return projector.mm_soft_emb_norm(pooled)


def _gemma3_projector_forward(self, vision_outputs: torch.Tensor) -> torch.Tensor:
    """``Gemma3MultiModalProjector.forward`` with ``torch.matmul(normed,
    mm_input_projection_weight)`` run by the quantized ``mm_input_projection``."""
    return self.mm_input_projection(_gemma3_features(self, vision_outputs)).type_as(vision_outputs)


def _gemma3_not_equivalent(projector: torch.nn.Module, shape=None, device=None, dtype=None) -> str | None:
    """Run the projector's forward and ``matmul(_gemma3_features(x), w)`` on one
    random image's worth of vision outputs, with a random weight ``w`` in place of
    ``mm_input_projection_weight`` (which may be all zeros before a checkpoint is loaded
    into it, or gone once quantized): they must be bit-identical (the same ops on the same
    device and dtype). ``shape`` / ``device`` / ``dtype``: the weight's, where the
    Parameter is no longer there (a checkpoint loaded quantized)."""
    missing = [a for a in ("patches_per_image", "avg_pool", "mm_soft_emb_norm") if not hasattr(projector, a)]
    if missing:
        return f"the projector has no {', '.join(missing)} (a transformers version mmkernels does not know)"
    weight = projector._parameters.get("mm_input_projection_weight")
    if weight is not None:
        shape, device, dtype = tuple(weight.shape), weight.device, weight.dtype
    if torch.device(device).type == "meta":
        return "its weight is on the meta device (not loaded)"
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(1, projector.patches_per_image**2, shape[0], generator=generator)
    w = torch.randn(tuple(shape), generator=generator) * shape[0] ** -0.5
    x, w = (t.to(device=device, dtype=dtype) for t in (x, w))
    # The projector's forward (someone else's, if swapped on the instance; what mmkernels'
    # swap wraps once it is there), reading w through an instance attribute, which
    # attribute lookup finds before the module's parameters.
    swap = projector.__dict__.get(ORIGINALS_ATTR, {}).get("forward")
    ours = swap is not None and isinstance(swap.rule, ProjectorForwardRule)
    forward = original_method(projector, "forward") if ours else projector.forward
    projector.__dict__["mm_input_projection_weight"] = w
    try:
        with torch.no_grad():
            want = forward(x)
            got = torch.matmul(_gemma3_features(projector, x), w).type_as(x)
    except Exception as error:  # noqa: BLE001: any failure means the restated glue does not fit
        return f"the projector forward could not be restated ({type(error).__name__}: {error})"
    finally:
        del projector.__dict__["mm_input_projection_weight"]
    if got.shape != want.shape or not torch.equal(got, want):
        return ("its forward does not compute matmul(mm_soft_emb_norm(avg_pool(patch grid)), "
                "mm_input_projection_weight) as mmkernels restates it")  # fmt: skip
    return None


_GEMMA3 = MatmulWeight("mm_input_projection_weight", "mm_input_projection", _gemma3_projector_forward,
                       _gemma3_not_equivalent)  # fmt: skip
_LLAVA = (("linear_1", "act"), ("linear_2", None))
_MERGER = (("mlp.0", "mlp.1"), ("mlp.2", None))
_FC_MERGER = (("linear_fc1", "act_fn"), ("linear_fc2", None))  # Qwen3-VL / Qwen3.5 (deepstack mergers aside)
_SWIGLU_MERGER = (("proj", None), ("gate_proj", None), ("up_proj", None), ("down_proj", None))  # GLM-4.xV
PROJECTOR_SPECS: tuple[ProjectorSpec, ...] = (
    ProjectorSpec("LLaVA", "llava", "multi_modal_projector", _LLAVA),
    ProjectorSpec("LLaVA-NeXT", "llava_next", "multi_modal_projector", _LLAVA),
    ProjectorSpec("LLaVA-OneVision", "llava_onevision", "multi_modal_projector", _LLAVA),
    ProjectorSpec("Qwen2-VL", "qwen2_vl_vision", "merger", _MERGER),
    ProjectorSpec("Qwen2.5-VL", "qwen2_5_vl_vision", "merger", _MERGER),
    ProjectorSpec("PaliGemma", "paligemma", "multi_modal_projector", (("linear", None),)),
    ProjectorSpec("Idefics3", "idefics3", "connector", (("modality_projection.proj", None),)),
    ProjectorSpec("SmolVLM", "smolvlm", "connector", (("modality_projection.proj", None),)),
    ProjectorSpec("Mllama", "mllama", "multi_modal_projector", (("", None),)),
    ProjectorSpec("Gemma 3", "gemma3", "multi_modal_projector", (), matmul=_GEMMA3),
    # The generic merge rule's families (issue 20.3).
    ProjectorSpec("InternVL", "internvl", "multi_modal_projector", _LLAVA),
    ProjectorSpec("Mistral 3", "mistral3", "multi_modal_projector",
                  (("patch_merger.merging_layer", None), *_LLAVA)),  # fmt: skip
    # SwiGLU: the activation takes half of linear_1's output, so nothing is fused.
    ProjectorSpec("Aya Vision", "aya_vision", "multi_modal_projector", (("linear_1", None), ("linear_2", None))),
    ProjectorSpec("Command A Vision", "cohere2_vision", "multi_modal_projector",
                  (("linear_1", None), ("linear_2", None))),  # fmt: skip
    ProjectorSpec("Llama 4", "llama4", "multi_modal_projector", (("linear_1", None),)),
    *(ProjectorSpec(family, model_type, "merger", _FC_MERGER) for family, model_type in (
        ("Qwen3-VL", "qwen3_vl_vision"), ("Qwen3-VL-MoE", "qwen3_vl_moe_vision"),
        ("Qwen3.5", "qwen3_5_vision"), ("Qwen3.5-MoE", "qwen3_5_moe_vision"))),  # fmt: skip
    # Kimi K2.5's projector: LayerNorm, in_proj, GELU (fused), out_proj.
    ProjectorSpec("Kimi K2.5", "kimi_k25", "mm_projector", (("in_proj", "act"), ("out_proj", None))),
    # GLM-4.xV's merger: proj, then LayerNorm and GELU (not fused: the norm is between),
    # then a SwiGLU MLP (nothing fused: the activation's output is multiplied).
    *(ProjectorSpec(family, model_type, "merger", _SWIGLU_MERGER) for family, model_type in (
        ("GLM-4.1V", "glm4v_vision"), ("GLM-4.5V", "glm4v_moe_vision"), ("GLM-OCR", "glm_ocr_vision"))),  # fmt: skip
    # Molmo2's adapter: attention pooling of each token's patches (left as is), then its
    # SwiGLU image projector.
    ProjectorSpec("Molmo2", "molmo2", "multi_modal_projector",
                  tuple((f"image_projector.{name}", None) for name in ("gate_proj", "up_proj", "down_proj"))),  # fmt: skip
)


# --------------------------------------------------------------------------------------
# The module


class QuantizedLinear(torch.nn.Module):
    """An ``nn.Linear`` (optionally followed by its activation) with a quantized weight.

    Buffers (``state_dict`` entries, plain tensors): ``packed``, ``scales`` and, for
    w4a16, ``zeros`` (see :class:`mmkernels.quant.QuantizedWeight`); ``bias`` stays a
    Parameter under its old key. ``forward(x)`` is ``quantized_linear(x, W, bias,
    activation=activation)``. ``.to(dtype)`` / ``.half()`` leave the quantized buffers in
    their own dtypes (they would otherwise be cast and corrupted); devices move as usual.
    """

    def __init__(self, in_features: int, out_features: int, *, scheme: str, group_size: int | None,
                 bias: bool, activation: str | None, dtype: torch.dtype, device=None):  # fmt: skip
        super().__init__()
        info = scheme_info(scheme)
        group_size = check_group_size(group_size, scheme)
        if not info.grouped:
            group_size = None  # per-channel: no groups
        elif in_features % group_size:
            raise ValueError(f"group_size: in_features={in_features} is not a multiple of group_size={group_size}")
        self.in_features, self.out_features = in_features, out_features
        self.scheme, self.group_size, self.activation, self.weight_dtype = scheme, group_size, activation, dtype
        n = out_features
        layout = info.layout(out_features, in_features, group_size)  # packed, scales (and zeros when grouped)
        self.register_buffer("packed", torch.zeros(layout["packed"][0], dtype=layout["packed"][1], device=device))
        self.register_buffer("scales", torch.ones(layout["scales"][0], dtype=torch.float32, device=device))
        if "zeros" in layout:
            self.register_buffer("zeros", torch.zeros(layout["zeros"][0], dtype=torch.float32, device=device))
        else:
            self.zeros = None
        self.bias = torch.nn.Parameter(torch.zeros(n, dtype=dtype, device=device)) if bias else None

    @classmethod
    def from_linear(cls, linear: torch.nn.Linear, scheme: str, *, group_size: int | None,
                    activation: str | None = None) -> "QuantizedLinear":  # fmt: skip
        return cls.from_weight(linear.weight, linear.bias, scheme, group_size=group_size, activation=activation)

    @classmethod
    def from_weight(cls, weight: torch.Tensor, bias: torch.Tensor | None, scheme: str, *, group_size: int | None,
                    activation: str | None = None) -> "QuantizedLinear":  # fmt: skip
        """From an ``nn.Linear``-style weight ``(out_features, in_features)`` and bias."""
        qw = quantize(weight.detach(), scheme, group_size=group_size or 128)
        module = cls(qw.in_features, qw.out_features, scheme=scheme, group_size=qw.group_size,
                     bias=bias is not None, activation=activation, dtype=weight.dtype,
                     device=weight.device)  # fmt: skip
        module.load_quantized(qw)
        if bias is not None:
            with torch.no_grad():
                module.bias.copy_(bias)
            module.bias.requires_grad_(bias.requires_grad)
        return module

    def load_quantized(self, qw: QuantizedWeight) -> None:
        """Copy ``qw``'s tensors into the buffers; ``qw`` must have this module's format
        (scheme, group size, shape): ``ValueError`` naming the field otherwise, never a
        broadcast or a cast."""
        ours = (self.scheme, self.group_size, self.in_features, self.out_features)
        theirs = (qw.scheme, qw.group_size, qw.in_features, qw.out_features)
        if ours != theirs:
            raise ValueError(f"qw: expected (scheme, group_size, in_features, out_features) = {ours} (this module's), "
                             f"got {theirs}")  # fmt: skip
        with torch.no_grad():
            for name, t in qw.tensors().items():
                _check_tensor(name, t, getattr(self, name))
                getattr(self, name).copy_(t)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):  # fmt: skip
        # load_state_dict checks shapes but casts dtypes: an int8 tensor copied into the
        # float8 codes, or float16 scales, would load as a silently different weight.
        for name in ("packed", "scales", "zeros"):
            buf, key = self._buffers.get(name), prefix + name
            if buf is not None and key in state_dict and state_dict[key].dtype != buf.dtype:
                error_msgs.append(f"{key}: expected dtype {buf.dtype} (the {self.scheme} format), "
                                  f"got {state_dict[key].dtype}")  # fmt: skip
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)  # fmt: skip

    def qweight(self) -> QuantizedWeight:
        return QuantizedWeight(self.scheme, self.packed, self.scales, self.zeros, self.group_size,
                               self.in_features, self.out_features, self.weight_dtype)  # fmt: skip

    def _kept_qweight(self) -> QuantizedWeight:
        """The QuantizedWeight of the buffers, built (and its fields validated) once and
        kept while the buffers are the same tensor objects: an in-place update (a
        ``load_state_dict``, a ``copy_``) is seen through them, and anything that replaces
        a buffer (``.to(device)``, assigning a tensor) makes the next forward build anew."""
        buffers = self._buffers
        packed, scales, zeros = buffers["packed"], buffers["scales"], buffers.get("zeros")
        kept = self.__dict__.get("_qweight_kept")
        if kept is not None and kept.packed is packed and kept.scales is scales and kept.zeros is zeros:
            return kept
        kept = QuantizedWeight(self.scheme, packed, scales, zeros, self.group_size, self.in_features,
                               self.out_features, self.weight_dtype)  # fmt: skip
        self.__dict__["_qweight_kept"] = kept
        return kept

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():  # no module state written while Dynamo traces
            return quantized_linear(x, self.qweight(), self.bias, activation=self.activation)
        return quantized_linear(x, self._kept_qweight(), self.bias, activation=self.activation)

    def _apply(self, fn, recurse=True):
        kept = {name: buf for name, buf in self._buffers.items() if buf is not None}
        super()._apply(fn, recurse)
        for name, old in kept.items():
            new = self._buffers[name]
            if new.dtype != old.dtype:  # a dtype cast: keep the format, follow the device
                self._buffers[name] = old.to(new.device)
        return self

    def extra_repr(self) -> str:
        group = f", group_size={self.group_size}" if self.group_size else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, scheme={self.scheme!r}{group}, "
                f"bias={self.bias is not None}, activation={self.activation!r}")  # fmt: skip


# --------------------------------------------------------------------------------------
# Quantizing a model


_CANDIDATE_ACTIVATIONS = ("gelu", "gelu_tanh", "quick_gelu", "silu")


def _fusable_activation(module: torch.nn.Module) -> str | None:
    """The op activation ``module`` computes (compared in float64 on [-8, 8]), or None."""
    x = torch.linspace(-8, 8, 257, dtype=torch.float64)
    try:
        with torch.no_grad():
            y = module(x)
    except Exception:
        return None
    if not isinstance(y, torch.Tensor) or y.shape != x.shape or y.dtype != torch.float64:
        return None
    for name in _CANDIDATE_ACTIVATIONS:
        if torch.allclose(y, apply_activation(x, name), rtol=1e-12, atol=1e-12):
            return name
    return None


def _model_type(module) -> str | None:
    config = getattr(module, "config", None)
    return getattr(config, "model_type", None)


def _projectors(model: torch.nn.Module):
    """(path, holder, spec) for every sub-model that a spec covers."""
    by_type = {spec.model_type: spec for spec in PROJECTOR_SPECS}
    seen: set[int] = set()
    for path, module in model.named_modules():
        spec = by_type.get(_model_type(module))
        if spec is None or spec.attribute not in module._modules or id(module) in seen:
            continue
        seen.add(id(module))
        yield path, module, spec


def _join(*parts: str) -> str:
    return ".".join(p for p in parts if p)


def _linear_slots(holder: torch.nn.Module, spec: ProjectorSpec, proj_path: str):
    """``(path, activation path, module, parent, name in parent)`` of each Linear that
    ``spec`` names in the projector ``holder.<spec.attribute>`` (at ``proj_path``)."""
    projector = holder._modules[spec.attribute]
    for linear_path, act_path in spec.linears:
        target = projector.get_submodule(linear_path) if linear_path else projector
        if linear_path:
            parent_path, _, name = linear_path.rpartition(".")
            parent = projector.get_submodule(parent_path) if parent_path else projector
        else:
            parent, name = holder, spec.attribute
        yield _join(proj_path, linear_path), act_path, target, parent, name


def _make_identity(projector: torch.nn.Module, act_path: str) -> None:
    """The activation at ``act_path`` is fused into the layer before it: it becomes Identity."""
    act_parent_path, _, act_name = act_path.rpartition(".")
    act_parent = projector.get_submodule(act_parent_path) if act_parent_path else projector
    act_parent._modules[act_name] = torch.nn.Identity()


def projector_linears(model: torch.nn.Module) -> list[tuple[str, torch.nn.Linear, str | None]]:
    """``(path, Linear, fused activation or None)`` of every projector Linear that
    :func:`quantize_projector` would quantize in ``model`` (what ``mmkernels tune`` times;
    Gemma 3's bare Parameter is not among them). Works on a model on the meta device."""
    found = []
    for path, holder, spec in _projectors(model):
        projector = holder._modules[spec.attribute]
        for full, act_path, target, _parent, _name in _linear_slots(holder, spec, _join(path, spec.attribute)):
            if type(target) is torch.nn.Linear:
                activation = _fusable_activation(projector.get_submodule(act_path)) if act_path is not None else None
                found.append((full, target, activation))
    return found


def normalize_request(scheme, group_size) -> tuple[str, int | None]:
    if isinstance(scheme, Mapping):
        unknown = set(scheme) - {"scheme", "group_size"}
        if unknown or "scheme" not in scheme:
            raise ValueError(f"quantize_projector: expected a scheme name or a dict with keys scheme (and group_size), "
                             f"got keys {sorted(scheme)}")  # fmt: skip
        group_size = scheme.get("group_size", group_size)
        scheme = scheme["scheme"]
    if scheme not in SCHEME_TABLE:
        raise ValueError(f"quantize_projector: expected one of {list(SCHEME_TABLE)}, got {scheme!r}")
    if not SCHEME_TABLE[scheme].grouped:
        return scheme, None
    return scheme, check_group_size(group_size, scheme)


def quantize_projector(model: torch.nn.Module, scheme, *, group_size: int = 128) -> PatchReport:
    """Quantize the multimodal projector of ``model`` in place (see the module docstring).

    Args:
        model: a Hugging Face model (any level: ``*ForConditionalGeneration``, ``*Model``).
        scheme: ``"w8a16"``, ``"w4a16"`` or ``"fp8"`` (or a dict ``{"scheme": ...,
            "group_size": ...}``).
        group_size: w4a16 only: 32, 64 or 128; every projector Linear's in_features (the
            first dim of Gemma 3's ``(K, N)`` Parameter) must be a multiple of it
            (``ValueError`` naming the layer otherwise).

    Returns:
        A :class:`~mmkernels.integrations.engine.PatchReport`: one replacement per Linear
        (``method`` is ``"module"``; its notes say which activation was fused and which
        backend will run) or Gemma 3 Parameter (``class_name`` ``"Parameter"``; its notes
        say that the projector's forward was swapped), skips with reasons (an already
        quantized model, a projector whose code mmkernels does not recognise). Raises
        ``ValueError`` when the model has no projector a spec covers, and when it was
        already quantized with another scheme.
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    scheme, group_size = normalize_request(scheme, group_size)
    foreign = _foreign_quantization(model)
    if foreign is not None:
        raise ValueError(f"model: its config already holds a quantization_config of quant_method {foreign!r}; one "
                         f"checkpoint carries one quantization method, so mmkernels' projector quantization cannot be "
                         f"recorded beside it (nothing was changed)")  # fmt: skip
    replaced, skipped, plans, matmul_plans = [], [], [], []
    found = []
    for path, holder, spec in _projectors(model):
        found.append(spec.model_type)
        projector = holder._modules[spec.attribute]
        proj_path = _join(path, spec.attribute)
        if spec.matmul is not None:
            plan = _plan_matmul(projector, proj_path, spec, scheme, group_size, skipped)
            if plan is not None:
                matmul_plans.append(plan)
            continue
        for full, act_path, target, parent, name in _linear_slots(holder, spec, proj_path):
            if isinstance(target, QuantizedLinear):
                _already_quantized(target, full, scheme, group_size, skipped)
                continue
            if type(target) is not torch.nn.Linear:
                skipped.append(Skip(full, type(target).__name__, f"{spec.family}: expected an nn.Linear"))
                continue
            if SCHEME_TABLE[scheme].grouped and target.in_features % group_size:
                raise ValueError(
                    f"group_size: {full} has in_features={target.in_features}, not a multiple of "
                    f"group_size={group_size}; pass group_size=32 or 64"
                )
            activation = None
            if act_path is not None:
                activation = _fusable_activation(projector.get_submodule(act_path))
            plans.append((projector, parent, name, act_path if activation else None, full, target, activation, spec))
    if not plans and not matmul_plans and not any(s.code == "already_patched" for s in skipped):
        covered = ", ".join(sorted({s.model_type for s in PROJECTOR_SPECS}))
        why = "; ".join(s.reason for s in skipped)
        raise ValueError(
            f"model: no projector to quantize in {type(model).__name__} (projector model_types found: "
            f"{found or 'none'}; covered: {covered})" + (f". {why}" if why else "")
        )
    records = {}
    for projector, parent, name, act_path, full, linear, activation, spec in plans:
        _quantized_layer(parent, name, QuantizedLinear.from_linear(linear, scheme, group_size=group_size,
                                                                   activation=activation))  # fmt: skip
        if act_path is not None:
            _make_identity(projector, act_path)
        records[full] = {"activation": activation, "fused": act_path}
        notes = [f"{scheme}" + (f", group_size={group_size}" if group_size else "")
                 + (f"; activation {activation!r} fused (the {act_path} module is now Identity)" if act_path else ""),
                 backend_note(CAPABILITIES[scheme], linear.weight, routed=True)]  # fmt: skip
        replaced.append(Replacement(full, "Linear", "module", "mmkernels::quantized_linear", spec.family, tuple(notes)))
    for projector, full, spec in matmul_plans:
        replaced.append(_apply_matmul(projector, full, spec, scheme, group_size, records))
    if records:
        _record_config(model, scheme, group_size, records)
    return PatchReport(type(model).__name__, replaced, skipped, sorted(set(found)),
                       sorted({s.model_type for s in PROJECTOR_SPECS}))  # fmt: skip


def _already_quantized(module: QuantizedLinear, full: str, scheme: str, group_size: int | None, skipped) -> None:
    if module.scheme != scheme or module.group_size != group_size:
        raise ValueError(
            f"model: {full} is already quantized ({module.scheme}, group_size={module.group_size}); "
            f"it cannot be re-quantized to {scheme} (reload the unquantized checkpoint)"
        )
    skipped.append(Skip(full, "QuantizedLinear", f"already quantized ({scheme})", "already_patched"))


def _plan_matmul(projector, proj_path: str, spec: ProjectorSpec, scheme: str, group_size: int | None, skipped):
    """Check a :class:`MatmulWeight` projector before anything changes: ``(projector, path
    of the new module, spec)`` to quantize, or None (a skip recorded, or an error raised)."""
    mw = spec.matmul
    full = _join(proj_path, mw.module)
    existing = projector._modules.get(mw.module)
    if isinstance(existing, QuantizedLinear):
        _already_quantized(existing, full, scheme, group_size, skipped)
        return None
    weight = projector._parameters.get(mw.parameter)
    where = _join(proj_path, mw.parameter)
    if weight is None or weight.dim() != 2 or existing is not None:
        skipped.append(Skip(where, type(projector).__name__,
                            f"{spec.family}: expected a 2-D Parameter {mw.parameter} (in_features, out_features) "
                            f"and no submodule {mw.module}"))  # fmt: skip
        return None
    if SCHEME_TABLE[scheme].grouped and weight.shape[0] % group_size:
        raise ValueError(
            f"group_size: {where} has in_features={weight.shape[0]} (its first dim), not a multiple of "
            f"group_size={group_size}; pass group_size=32 or 64"
        )
    reason = mw.not_equivalent(projector)
    if reason is not None:
        skipped.append(Skip(where, type(projector).__name__, f"{spec.family}: {reason}; not quantized"))
        return None
    return projector, full, spec


def _apply_matmul(projector, full: str, spec: ProjectorSpec, scheme: str, group_size: int | None,
                  records: dict) -> Replacement:  # fmt: skip
    """Replace the Parameter by a :class:`QuantizedLinear` of its transpose and swap the
    projector's ``forward`` (:func:`_quantized_matmul`)."""
    mw = spec.matmul
    weight = projector._parameters[mw.parameter]
    module = QuantizedLinear.from_weight(weight.detach().t().contiguous(), None, scheme, group_size=group_size)
    _quantized_matmul(projector, spec, module)
    records[full] = {"activation": None, "fused": None, "parameter": mw.parameter}
    k, n = weight.shape
    notes = (f"{scheme}" + (f", group_size={group_size}" if group_size else "")
             + f"; replaces the Parameter {mw.parameter} ({k}, {n}) (used with torch.matmul) by a "
             f"QuantizedLinear of its transpose; {type(projector).__name__}.forward swapped on the instance to call it",
             backend_note(CAPABILITIES[scheme], weight, routed=True))  # fmt: skip
    return Replacement(full, "Parameter", "module", "mmkernels::quantized_linear", spec.family, notes)


def _foreign_quantization(model) -> str | None:
    """The ``quant_method`` of a quantization that is not mmkernels' in the model's config."""
    existing = getattr(getattr(model, "config", None), "quantization_config", None)
    if existing is None:
        return None
    method = existing.get("quant_method") if isinstance(existing, Mapping) else getattr(existing, "quant_method", None)
    method = getattr(method, "value", method)
    return None if method == QUANT_METHOD else str(method)


def _record_config(model, scheme, group_size, records) -> None:
    """Write (or extend) ``model.config.quantization_config``: what ``save_pretrained`` stores
    and every loader reads (see :mod:`.hf_quantizer`)."""
    config = getattr(model, "config", None)
    if config is None:
        return
    previous = quantization_config(config) or {}
    modules = dict(previous.get("modules", {}))
    modules.update(records)
    current = getattr(config, "quantization_config", None)
    if isinstance(current, MmkernelsConfig):  # loaded through the quantizer: the same object stays there
        current.scheme, current.group_size, current.modules = scheme, group_size, modules
    else:
        config.quantization_config = MmkernelsConfig(scheme, group_size, modules)
    if hasattr(config, CONFIG_ATTR):  # a format-1 checkpoint's entry: the new one replaces it
        delattr(config, CONFIG_ATTR)


def quantization_config(model_or_config) -> dict | None:
    """What mmkernels quantized in a model (or config): ``{"scheme", "group_size",
    "modules", ...}`` from its ``quantization_config`` (``quant_method`` "mmkernels"), or from
    the ``mmkernels_quantization`` entry of a format-1 checkpoint; None if neither."""
    config = getattr(model_or_config, "config", model_or_config)
    current = getattr(config, "quantization_config", None)
    if current is not None:
        as_dict = dict(current)
        method = as_dict.get("quant_method")
        if getattr(method, "value", method) == QUANT_METHOD:
            return as_dict
    return getattr(config, CONFIG_ATTR, None)


def is_quantized(model: torch.nn.Module) -> bool:
    return any(isinstance(m, QuantizedLinear) for m in model.modules())


def check_unpatchable(model: torch.nn.Module) -> None:
    """Deprecated: :func:`mmkernels.unpatch` refuses by itself (the quantized layers are
    recorded as permanent changes). Raises the ``RuntimeError`` unpatch would
    (:func:`~.engine.check_undoable`), without unpatching."""
    warnings.warn("hf_quant.check_unpatchable is deprecated: mmkernels.unpatch refuses a model with permanent "
                  "changes by itself (engine.check_undoable)", DeprecationWarning, stacklevel=2)  # fmt: skip
    check_undoable(model)


# --------------------------------------------------------------------------------------
# Loading


@contextlib.contextmanager
def _quiet_transformers():
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the quantized keys are "unexpected", the weights "missing": on purpose
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


def _checkpoint_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.exists():
        return sorted({path / f for f in json.loads(index.read_text())["weight_map"].values()})
    single = path / "model.safetensors"
    if not single.exists():
        raise ValueError(f"path: no model.safetensors (or its index) in {path}")
    return [single]


def _checkpoint_tensors(path: Path, keys) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The checkpoint tensors for the model's ``keys``. transformers may write keys in a
    checkpoint layout other than the module tree (LLaVA drops the ``model.`` prefix), so a
    key matches the one checkpoint key equal to it or differing by leading dotted
    components; anything ambiguous or absent is returned as missing."""
    from safetensors import safe_open

    located: dict[str, Path] = {}
    for file in _checkpoint_files(path):
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                located[key] = file
    out, missing = {}, []
    for key in keys:
        found = [c for c in located if same_module_path(c, key)]
        if len(found) != 1:
            missing.append(key if not found else f"{key} (ambiguous: {found})")
            continue
        with safe_open(str(located[found[0]]), framework="pt") as f:
            out[key] = f.get_tensor(found[0])
    return out, missing


def _check_tensor(key: str, got: torch.Tensor, expected: torch.Tensor, *, cast_floats: bool = False,
                  where: str = "") -> None:  # fmt: skip
    """Refuse a tensor that is not exactly the shape and dtype the module holds under
    ``key`` (``copy_`` would broadcast a ``(1,)`` scale over every channel, or cast int8
    codes into float8 ones). ``cast_floats``: a floating tensor may have another floating
    dtype (it is cast)."""
    if tuple(got.shape) != tuple(expected.shape):
        raise ValueError(f"{key}{where}: expected shape {tuple(expected.shape)}, got {tuple(got.shape)}")
    same = got.dtype == expected.dtype or (cast_floats and got.is_floating_point() and expected.is_floating_point())
    if not same:
        raise ValueError(f"{key}{where}: expected dtype {expected.dtype}, got {got.dtype}")


def _recorded_entry(modules: Mapping, path: str) -> tuple[str, dict] | None:
    """The recorded module that is the model's ``path``: equal, or differing by leading
    dotted components (a checkpoint saved from ``LlavaForConditionalGeneration`` loaded into
    ``LlavaModel`` drops ``model.``)."""
    found = [r for r in modules if same_module_path(r, path)]
    if len(found) > 1:
        raise ValueError(f"quantization_config: modules {found} all match the model's {path}")
    return (found[0], modules[found[0]]) if found else None


def prepare_quantized_modules(model: torch.nn.Module, config) -> tuple[str, ...]:
    """Before a mmkernels checkpoint's weights load (:mod:`.hf_quantizer`): turn the
    projector layers its ``quantization_config`` records into empty :class:`QuantizedLinear`
    modules (on the device the model is built on, the meta device in ``from_pretrained``),
    fuse the recorded activations, and for Gemma 3 replace the Parameter and swap the
    projector's forward. Returns the quantized modules' paths. ``ValueError`` when a
    recorded module is not where the model's spec puts a projector layer."""
    qcfg = quantization_config(config) if not isinstance(config, MmkernelsConfig) else dict(config)
    scheme, group_size, recorded = qcfg["scheme"], qcfg.get("group_size"), qcfg.get("modules") or {}
    prepared, matched = [], set()

    def take(full: str) -> dict | None:
        hit = _recorded_entry(recorded, full)
        if hit is None:
            return None
        matched.add(hit[0])
        prepared.append(full)
        return hit[1]

    for path, holder, spec in _projectors(model):
        projector = holder._modules[spec.attribute]
        proj_path = _join(path, spec.attribute)
        if spec.matmul is not None:
            mw = spec.matmul
            entry = take(_join(proj_path, mw.module))
            if entry is None:
                continue
            weight = projector._parameters.get(mw.parameter)
            if weight is None or weight.dim() != 2:
                raise ValueError(f"quantization_config: {_join(proj_path, mw.parameter)} is not a 2-D Parameter in "
                                 f"this model ({type(projector).__name__})")  # fmt: skip
            k, n = weight.shape
            module = QuantizedLinear(k, n, scheme=scheme, group_size=group_size, bias=False, activation=None,
                                     dtype=weight.dtype, device=weight.device)  # fmt: skip
            _quantized_matmul(projector, spec, module)
            # The family's _init_weights would initialise the Parameter that is gone: the
            # projector's own init is only that one (its submodules are initialised apart).
            projector._is_hf_initialized = True
            continue
        for full, act_path, target, parent, name in _linear_slots(holder, spec, proj_path):
            entry = take(full)
            if entry is None:
                continue
            if type(target) is not torch.nn.Linear:
                raise ValueError(f"quantization_config: {full} is a {type(target).__name__} in this model, "
                                 f"expected an nn.Linear")  # fmt: skip
            activation = entry.get("activation")
            if activation is not None:
                if activation not in _CANDIDATE_ACTIVATIONS or entry.get("fused") != act_path:
                    raise ValueError(f"quantization_config: {full} records activation {activation!r} fused from "
                                     f"{entry.get('fused')!r}; this model's spec fuses one of "
                                     f"{list(_CANDIDATE_ACTIVATIONS)} from {act_path!r}")  # fmt: skip
                _make_identity(projector, act_path)
            _quantized_layer(parent, name, QuantizedLinear(
                target.in_features, target.out_features, scheme=scheme, group_size=group_size,
                bias=target.bias is not None, activation=activation, dtype=target.weight.dtype,
                device=target.weight.device))  # fmt: skip
    unmatched = sorted(set(recorded) - matched)
    if unmatched:
        raise ValueError(f"quantization_config: the checkpoint's quantized modules {unmatched} are not projector "
                         f"layers of this {type(model).__name__} (covered model_types: "
                         f"{sorted({s.model_type for s in PROJECTOR_SPECS})})")  # fmt: skip
    return tuple(prepared)


def check_loaded_modules(model: torch.nn.Module, paths) -> None:
    """After a mmkernels checkpoint loaded: every quantized tensor was in the checkpoint,
    with exactly its format's shape and dtype (``ValueError`` naming each key otherwise;
    transformers would leave a missing buffer uninitialised, and a cast code is another
    weight); a Gemma 3 projector still computes what mmkernels restates."""
    problems = []
    for path in paths:
        module = model.get_submodule(path)
        layout = scheme_info(module.scheme).layout(module.out_features, module.in_features, module.group_size)
        for name, (shape, dtype) in layout.items():
            tensor, key = module._buffers.get(name), f"{path}.{name}"
            if tensor is None or tensor.device.type == "meta" or not getattr(tensor, "_is_hf_initialized", False):
                problems.append(f"{key}: missing from the checkpoint")
            elif tuple(tensor.shape) != tuple(shape):
                problems.append(f"{key}: expected shape {tuple(shape)}, got {tuple(tensor.shape)}")
            elif tensor.dtype != dtype:
                problems.append(f"{key}: expected dtype {dtype} (the {module.scheme} format), got {tensor.dtype}")
    if problems:
        raise ValueError("the mmkernels checkpoint's quantized tensors do not load: " + "; ".join(problems))
    for path in paths:
        # transformers < 5.25 loads a pre-quantized checkpoint's renamed keys (LLaVA's
        # legacy names) in their stored dtype: the bias follows the dtype the model was
        # built in, as transformers casts it elsewhere.
        module = model.get_submodule(path)
        if module.bias is not None and module.bias.dtype != module.weight_dtype:
            module.bias.data = module.bias.data.to(module.weight_dtype)
    for path, holder, spec in _projectors(model):
        mw = spec.matmul
        if mw is None or _join(path, spec.attribute, mw.module) not in paths:
            continue
        projector = holder._modules[spec.attribute]
        module = projector._modules[mw.module]
        reason = mw.not_equivalent(projector, (module.in_features, module.out_features), module.packed.device,
                                   module.weight_dtype)  # fmt: skip
        if reason is not None:
            raise ValueError(f"{_join(path, spec.attribute)}: {spec.family}'s projector in this transformers version "
                             f"does not take the stored quantized weight: {reason}")  # fmt: skip


def from_pretrained(model_class, path, *, patch: bool = True, **kwargs):
    """``model_class.from_pretrained(path, **kwargs)`` for a checkpoint written by
    ``save_pretrained`` after :func:`quantize_projector`; since the ``quantization_config``
    format (:mod:`.hf_quantizer`) plain ``from_pretrained`` does the same, and this alias
    remains for ``patch=False`` (quantized, not patched with the other kernels) and for
    format-1 checkpoints (an ``mmkernels_quantization`` config entry), which plain
    ``from_pretrained`` cannot read. ``ValueError`` when the checkpoint holds no mmkernels
    quantization."""
    config_file = Path(path) / "config.json"
    saved = json.loads(config_file.read_text()) if config_file.is_file() else {}
    if CONFIG_ATTR in saved and "quantization_config" not in saved:
        return _from_pretrained_format_1(model_class, Path(path), patch=patch, **kwargs)
    with contextlib.nullcontext() if patch else no_patch_on_load():
        model = model_class.from_pretrained(path, **kwargs)
    if quantization_config(model) is None:
        raise ValueError(
            f"path: {path} has no mmkernels quantization_config: it was not saved after mmkernels.quantize_projector "
            f"(load it with {getattr(model_class, '__name__', model_class)}.from_pretrained)"
        )
    return model


def _from_pretrained_format_1(model_class, path: Path, *, patch: bool = True, **kwargs):
    """Format 1: load everything but the projector, quantize the projector from whatever
    it was initialised with, then fill it from the checkpoint's tensors (each checked
    first: shape and dtype exactly the module's; a bias may follow a ``dtype`` asked of
    transformers)."""
    with _quiet_transformers():
        model = model_class.from_pretrained(path, **kwargs)
    qcfg = getattr(model.config, CONFIG_ATTR)
    quantize_projector(model, qcfg["scheme"], group_size=qcfg["group_size"] or 128)
    own = model.state_dict()
    wanted = [k for k in own if any(k == f"{m}.{t}" for m in qcfg["modules"] for t in ("packed", "scales", "zeros", "bias"))]
    tensors, missing = _checkpoint_tensors(path, wanted)
    if missing:
        raise ValueError(f"path: the checkpoint in {path} lacks the quantized tensors {missing}")
    # A floating bias follows the dtype the caller asked transformers for, as every other
    # floating weight does; the quantized format's tensors never change dtype.
    cast_floats = any(kwargs.get(name) not in (None, "auto") for name in ("dtype", "torch_dtype"))
    for key, value in tensors.items():  # all checked before anything is copied
        _check_tensor(key, value, own[key], cast_floats=cast_floats and key.endswith(".bias"), where=f" in {path}")
    with torch.no_grad():
        for key, value in tensors.items():
            own[key].copy_(value)
    if patch:
        from . import patch as _patch

        _patch(model)
    return model

