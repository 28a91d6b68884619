"""The Hugging Face side of mmkernels' integrations: patch the ops into live models,
report what was done, undo it. Its public names are those of :mod:`mmkernels.integrations`,
which loads this module on first use of one of them.

* :func:`patch` / :func:`unpatch`: swap methods on the live sub-models that a spec covers
  (matched by their own ``config.model_type`` and class), and restore them exactly.
* :func:`supported_models`: the coverage table (Markdown), generated from the specs.
* :func:`clear_caches`: drop what patched modules keep between calls (interpolated
  position tables), e.g. after writing a weight in place through ``.data``.

One generic engine (:mod:`.engine`), the generic merge pre-step (:mod:`.hf_merge`) and a
short declarative spec per model family (:mod:`.hf_specs`); the patch-embed rule and its
specs (:mod:`.hf_patch_embed`). transformers is never imported here; the specs only name
classes, methods and config fields.
"""

from __future__ import annotations

from typing import Iterable

import torch

from .engine import (
    NO_MATCH,
    PatchOptions,
    PatchReport,
    Replacement,
    Rule,
    Skip,
    coverage_table,
    patch_model,
    unpatch_model,
)
from .hf_attention import ATTENTION_RULES, register_attention
from .hf_merge import LanguageModelInputsRule, MergeRule
from .hf_merge_generic import GenericMergeRule, coverage_tables, installed_coverage
from .hf_patch_embed import (CONV_PATCH_SPECS, PATCH_EMBED_SPECS, UNFOLD_PATCH_SPECS, ConvPatchRule, PatchEmbedRule,
                             UnfoldPatchRule, clear_position_caches)
from .hf_specs import MERGE_SPECS
from . import hf_versions

from . import __all__  # noqa: E402,F401  (the package lists the public names it forwards here)

# Every kernel a model can be patched with; ``patch(kernels=None)`` applies all of them.
KERNELS: tuple[str, ...] = ("merge", "patch_embed", "attention")

_SPEC_MODEL_TYPES = frozenset(spec.model_type for spec in MERGE_SPECS)
_RULES: tuple[Rule, ...] = (
    tuple(MergeRule(spec) for spec in MERGE_SPECS)
    + tuple(LanguageModelInputsRule(spec) for spec in MERGE_SPECS if spec.language_model_inputs is not None)
    # After the specs, and never for a model_type one of them names.
    + (GenericMergeRule(_SPEC_MODEL_TYPES),)
    + tuple(PatchEmbedRule(spec) for spec in PATCH_EMBED_SPECS)
    + tuple(ConvPatchRule(spec) for spec in CONV_PATCH_SPECS)
    + tuple(UnfoldPatchRule(spec) for spec in UNFOLD_PATCH_SPECS)
    + ATTENTION_RULES
)


def rules() -> tuple[Rule, ...]:
    """The patch rules, in the coverage table's order."""
    return _RULES


def _kernel_names(kernels: Iterable[str] | None) -> tuple[str, ...]:
    if kernels is None:
        return KERNELS
    if isinstance(kernels, str):
        # A bare string would iterate by characters; one name is still a valid choice.
        kernels = (kernels,)
    try:
        names = tuple(kernels)
    except TypeError:
        raise TypeError(
            f"kernels: expected None or an iterable of kernel names, got {type(kernels).__name__}"
        ) from None
    unknown = [name for name in names if name not in KERNELS]
    if unknown:
        raise ValueError(f"kernels: unknown kernel name(s) {unknown}; known: {list(KERNELS)}")
    return names


def normalization_constants(source) -> tuple[tuple[float, ...], tuple[float, ...], float]:
    """``(mean, std, scale)`` per channel from a Hugging Face image processor (or a processor
    holding one: ``image_mean``, ``image_std``, ``rescale_factor``) or a dict with keys
    ``mean``, ``std`` and optional ``scale`` (default 1/255)."""
    if isinstance(source, dict):
        unknown = set(source) - {"mean", "std", "scale"}
        if unknown or not {"mean", "std"} <= set(source):
            raise ValueError(
                f"pixel_normalization: expected a dict with keys mean, std (and scale), got keys {sorted(source)}"
            )
        mean, std, scale = source["mean"], source["std"], source.get("scale", 1 / 255)
    else:
        processor = getattr(source, "image_processor", source)
        mean, std = getattr(processor, "image_mean", None), getattr(processor, "image_std", None)
        if mean is None or std is None:
            raise TypeError(
                "pixel_normalization: expected an image processor (with image_mean and image_std) or a dict, "
                f"got {type(source).__name__}"
            )
        scale = getattr(processor, "rescale_factor", 1 / 255) if getattr(processor, "do_rescale", True) else 1.0
    mean = tuple(float(v) for v in (mean if isinstance(mean, (list, tuple)) else [mean]))
    std = tuple(float(v) for v in (std if isinstance(std, (list, tuple)) else [std]))
    if len(mean) != len(std):
        raise ValueError(f"pixel_normalization: mean has {len(mean)} channels but std has {len(std)}")
    if any(v == 0 for v in std):
        raise ValueError(f"pixel_normalization: std must be non-zero, got {std}")
    return mean, std, float(scale)


def raw_pixel_inputs(processor, **call) -> dict:
    """Run a Hugging Face processor without its rescale and normalize steps and return its
    outputs with ``pixel_values`` as uint8: what a model patched with
    ``pixel_normalization=processor`` takes (4x fewer bytes to the GPU than float32, and
    no normalization pass on the host)."""
    outputs = processor(**call, do_rescale=False, do_normalize=False, return_tensors="pt")
    pixels = outputs["pixel_values"]
    outputs["pixel_values"] = pixels.round().clamp(0, 255).to(torch.uint8)
    return outputs


def patch(model: torch.nn.Module, *, kernels: Iterable[str] | None = None, quantize_projector=None,
          strict: bool = False, check_placeholders: bool = True, pixel_normalization=None) -> PatchReport:  # fmt: skip
    """Swap mmkernels' ops into the live sub-models of ``model`` that a spec covers.

    Args:
        model: a Hugging Face model (``LlavaForConditionalGeneration``, ``Qwen2VLModel``,
            ...); sub-models are found by their own ``config.model_type`` and class.
        kernels: None for every known kernel, else an iterable of names from
            :data:`KERNELS` (``"merge"``: the multimodal token merge; ``"patch_embed"``:
            the vision embeddings' patch projection, class row and position add;
            ``"attention"``: Qwen2-VL / Qwen2.5-VL vision attention over ``cu_seqlens`` and
            Mllama's cross-attention from its compact mask, through
            :func:`mmkernels.ops.varlen_attention`; Mllama's needs the model loaded with
            ``attn_implementation="mmkernels"``, see :func:`register_attention`).
        quantize_projector: None, or ``"w8a16"`` / ``"w4a16"`` / ``"fp8"`` (or a dict
            ``{"scheme": ..., "group_size": ...}``): also quantize the multimodal
            projector's Linear layers in place with :func:`quantize_projector` (not undone
            by :func:`unpatch`, which then refuses; see :mod:`.hf_quant`).
        strict: raise ``ValueError`` when nothing in the model could be patched (the
            message lists the model types found, the supported ones and the reasons).
        check_placeholders: the merge checks that each placeholder count equals the
            feature rows (one host sync, as Hugging Face's own check); False makes the
            merge sync-free, and a mismatch then yields NaN rows instead of an error.
        pixel_normalization: an image processor (or ``dict(mean=, std=, scale=)``): the
            patched patch embeddings then take RAW pixels (uint8, e.g. from
            :func:`raw_pixel_inputs`) and normalize them in the kernel,
            ``(x * scale - mean) / std``, instead of receiving normalized floats.

    Returns:
        A :class:`PatchReport`: what was replaced (module path, class, method, op) and what
        was skipped and why. Patching a patched model again changes nothing and the report
        says "already patched"; :func:`unpatch` restores the original methods exactly.
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    names = _kernel_names(kernels)
    if quantize_projector is not None:
        from .hf_quant import normalize_request

        normalize_request(quantize_projector, 128)  # a bad request fails before anything changes
    if not isinstance(check_placeholders, bool):
        raise TypeError(f"check_placeholders: expected a bool, got {type(check_placeholders).__name__}")
    normalization = None if pixel_normalization is None else normalization_constants(pixel_normalization)
    options = PatchOptions(check_placeholders=check_placeholders, pixel_normalization=normalization)
    if "attention" in names:
        register_attention()  # idempotent; the "mmkernels" attention implementation the rules feed
    quantized = None
    if quantize_projector is not None:  # first: it raises before changing anything on a bad fit
        from .hf_quant import quantize_projector as _quantize_projector

        quantized = _quantize_projector(model, quantize_projector)
    report = patch_model(model, _RULES, kernels=names, options=options)
    if quantized is not None:
        report.replaced += quantized.replaced
        report.skipped += quantized.skipped
    if strict and not report.replaced and not report.already_patched:
        reasons = "; ".join(
            f"{s.module_path or '<root>'} ({s.class_name}): {s.reason}" for s in report.skipped if s.code != NO_MATCH
        )
        raise ValueError(
            f"model: strict=True and nothing in {type(model).__name__} was patched. "
            f"model_types found: {report.model_types or 'none'}; supported: {report.supported_model_types}"
            + (f". Skipped: {reasons}" if reasons else "")
        )
    return report


def unpatch(model: torch.nn.Module) -> None:
    """Restore every method :func:`patch` replaced on ``model`` (exactly: the instance
    ``__dict__`` is as before patching). A no-op on an unpatched model. Refuses with
    ``RuntimeError``, changing nothing, on a model that holds a change that cannot be undone
    (a quantized projector: its full-precision weights are gone)."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    unpatch_model(model)


def clear_caches(model: torch.nn.Module) -> int:
    """Drop what the patched modules of ``model`` keep between calls: the interpolated
    position tables of patched vision embeddings (made once per image size and reused
    while their sources' version counters are unchanged) and the check that their
    ``position_ids`` are arange. Needed only after an in-place write that bypasses the
    version counter, i.e. through ``.data`` (``emb.position_embedding.weight.data.mul_(2)``):
    updates through the parameters themselves are seen. The plain position table is never
    kept (it is read from the weight on every call). ``unpatch`` drops them too. Returns
    how many entries were dropped."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    return sum(clear_position_caches(module) for module in model.modules())


_COLUMNS = (
    ("family", "family"),
    ("model_type", "HF `model_type`"),
    ("class", "patched class"),
    ("method", "method"),
    ("op", "op"),
    ("features", "features from"),
    ("modalities", "modalities (placeholder config fields)"),
    ("transformers", "transformers (class defined)"),
)


def quantize_projector(model: torch.nn.Module, scheme, *, group_size: int = 128) -> PatchReport:
    """Quantize the multimodal projector's Linear layers in place; see
    :func:`.hf_quant.quantize_projector`."""
    from .hf_quant import quantize_projector as _quantize_projector

    return _quantize_projector(model, scheme, group_size=group_size)


def coverage_facts() -> dict[str, list[str]]:
    """What the installed transformers gives the coverage table: the rules whose class it
    defines and the model types the generic rule merges (see :mod:`.hf_versions`)."""
    merged = [model_type for model_type, _, derivation in installed_coverage(_SPEC_MODEL_TYPES) if derivation.spec]
    return hf_versions.installed_facts(_RULES, merged)


def supported_models() -> str:
    """The coverage as Markdown (deterministic, README-ready): one row per rule, then the
    model types of the installed transformers that the generic merge rule patches, and
    those it refuses with the reason (read from their forwards; the first call imports
    the modeling modules that define ``get_placeholder_mask``, ~10 s)."""
    return (coverage_table(_RULES, _COLUMNS, lambda rule: {"transformers": hf_versions.cell_for_rule(rule)})
            + "\n" + coverage_tables(_SPEC_MODEL_TYPES, hf_versions.cell_for_merged))  # fmt: skip
