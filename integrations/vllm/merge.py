"""The vLLM plugin's ``merge`` adapter: vLLM's one shared merge function, replaced (read against vLLM 0.32).

vLLM's shared merge, ``vllm.model_executor.models.utils._merge_multimodal_embeddings``
(what the interface default ``SupportsMultiModal.embed_input_ids`` calls, and every model
module that imports it: Qwen3-VL's and Qwen3-Omni's deepstack merges, Qwen3.5, Molmo2,
MiniCPM-V 4.6, the audio LLMs, ...), is replaced once in each process by a function of
the same contract (:func:`register`), so every architecture that merges through it is
covered, not a list. The text embedding stays vLLM's (LoRA, out-of-vocabulary
placeholders); the merge is :func:`mmkernels.ops.merge_multimodal_embeddings` driven by
vLLM's host-computed ``is_multimodal`` mask (the mask is the id tensor, placeholder id 1):
the per-image feature tensors are read where they lie (no concatenation, the cast happens
in the kernel), only the placeholder rows are written (in place, as vLLM's contract says),
and the count check is done on the host mask (no device sync). Architectures whose
``embed_input_ids`` merges another way keep vLLM's code; ``python
tools/vllm_merge_coverage.py`` lists, from vLLM's sources, which architectures go through
the shared merge and which do not.

What the op does not cover runs vLLM's own function (the first call per reason is logged,
:func:`.plugin.fallthrough`). Registered by the plugin (:mod:`.plugin`, kernel name
``merge``); vLLM is imported only inside the functions.
"""

from __future__ import annotations

import sys
import threading
from typing import Callable

import torch

from mmkernels.integrations.vllm.plugin import fallthrough, record

__all__ = ["register"]


def _flat_features(embeddings, dim: int) -> list[torch.Tensor] | None:
    """vLLM's NestedTensors as a list of (n_i, D) views, in order (no concatenation)."""
    if isinstance(embeddings, torch.Tensor):
        if embeddings.dim() < 1 or embeddings.shape[-1] != dim:
            return None
        return [embeddings.reshape(-1, dim)] if embeddings.dim() != 2 else [embeddings]
    if isinstance(embeddings, (list, tuple)):
        out = []
        for e in embeddings:
            flat = _flat_features(e, dim)
            if flat is None:
                return None
            out.extend(flat)
        return out
    return None


def _merge(inputs_embeds: torch.Tensor, multimodal_embeddings, is_multimodal: torch.Tensor, where: str,
           original: Callable | None = None):  # fmt: skip
    """vLLM's ``_merge_multimodal_embeddings`` contract (same errors, ``inputs_embeds``
    updated in place and returned), by mmkernels' op; ``original`` (vLLM's own function)
    runs what the op does not cover. ``where``: the caller, for the log."""
    from mmkernels.ops.merge import CAPABILITIES, OP_NAME, merge_multimodal_embeddings
    from vllm.model_executor.models import utils as vllm_utils

    if original is None:
        original = _ORIGINAL_MERGE[0] if _ORIGINAL_MERGE else vllm_utils._merge_multimodal_embeddings
    if len(multimodal_embeddings) == 0:
        return inputs_embeds
    reason = None
    feats = None
    if inputs_embeds.dim() != 2:
        reason = f"inputs_embeds of rank {inputs_embeds.dim()}"
    elif is_multimodal.dtype != torch.bool or is_multimodal.shape != inputs_embeds.shape[:1]:
        reason = "is_multimodal is not a (T,) bool mask"
    elif inputs_embeds.dtype not in CAPABILITIES.dtypes:
        reason = f"dtype {inputs_embeds.dtype}"
    else:
        feats = _flat_features(multimodal_embeddings, inputs_embeds.shape[1])
        if feats is None:
            reason = "multimodal embeddings that are not (..., D) tensors"
        elif any(f.device != inputs_embeds.device for f in feats):
            reason = "features on another device than inputs_embeds"
        elif len({f.dtype for f in feats}) > 1 or not all(f.is_floating_point() for f in feats):
            reason = "features of mixed or non-float dtypes"
    if reason is not None:
        fallthrough("merge", reason, where)
        return original(inputs_embeds=inputs_embeds, multimodal_embeddings=multimodal_embeddings,
                        is_multimodal=is_multimodal)  # fmt: skip
    rows = sum(f.shape[0] for f in feats)
    # The count check, with vLLM's own error (its message, ValueError). vLLM builds the
    # mask on the host, where counting costs no device sync; a mask on the GPU costs one,
    # as vLLM's own boolean-index assignment does (it syncs for the nonzero count), and
    # without it a mismatch would leave NaN rows instead of vLLM's error.
    expected = int(is_multimodal.sum())
    if expected != rows:
        expr = vllm_utils._embedding_count_expression(multimodal_embeddings)
        raise ValueError(f"Attempted to assign {expr} = {rows} multimodal tokens to {expected} placeholders")
    # The mask is the id tensor (placeholder id 1): every modality's positions, in order,
    # exactly the rows vLLM would overwrite. check=False: no device sync in the op.
    # In place, as vLLM's contract says ("updates inputs_embeds in place"): the caller owns
    # the buffer, so only the placeholder rows are written (no copy of the text rows).
    ids = is_multimodal.to(device=inputs_embeds.device, non_blocking=True).to(torch.int32)
    out = merge_multimodal_embeddings(ids, inputs_embeds, feats, 1, check=False, inplace=True)
    record("merge", OP_NAME, where)
    return out


_LOCK = threading.Lock()
_ORIGINAL_MERGE: list[Callable] = []  # vLLM's _merge_multimodal_embeddings, once replaced
_SHARED_MERGE = "_merge_multimodal_embeddings"
_SHARED_MERGE_MODULE = "vllm.model_executor.models.utils"


def _shared_merge(original: Callable) -> Callable:
    def _merge_multimodal_embeddings(inputs_embeds, multimodal_embeddings, is_multimodal):
        # The log names the model: the caller's ``self`` (the interface default and the
        # models' own embed_input_ids are its methods), else the calling function.
        frame = sys._getframe(1)
        owner = frame.f_locals.get("self")
        where = type(owner).__name__ if owner is not None else getattr(frame.f_code, "co_qualname", frame.f_code.co_name)
        del frame
        return _merge(inputs_embeds, multimodal_embeddings, is_multimodal, where, original)

    _merge_multimodal_embeddings.__doc__ = (
        f"mmkernels: vLLM's {_SHARED_MERGE} (same contract) by mmkernels.ops.merge_multimodal_embeddings; "
        "vLLM's own function runs what it does not cover."
    )
    _merge_multimodal_embeddings.mmkernels_replaces = original
    return _merge_multimodal_embeddings


def register() -> str:
    """Replace vLLM's shared merge, ``vllm.model_executor.models.utils.
    _merge_multimodal_embeddings``, once: what the interface default
    (``SupportsMultiModal.embed_input_ids``, importing it at call time) and every model
    module that imports it by name (Qwen3-VL's deepstack, Qwen3.5, Molmo2, MiniCPM-V 4.6,
    the audio LLMs, ...) call. Model modules are imported after the plugins run, so they
    bind the replacement; a module already imported holding vLLM's function gets the
    replacement too. Architectures whose ``embed_input_ids`` merges without it keep
    vLLM's path (tools/vllm_merge_coverage.py lists them). Returns the summary for the
    plugin's log line."""
    import importlib

    utils = importlib.import_module(_SHARED_MERGE_MODULE)
    current = getattr(utils, _SHARED_MERGE)
    original = getattr(current, "mmkernels_replaces", current)
    replacement = current if original is not current else _shared_merge(original)
    with _LOCK:
        if not _ORIGINAL_MERGE:
            _ORIGINAL_MERGE.append(original)
    setattr(utils, _SHARED_MERGE, replacement)
    rebound = []
    for name, module in list(sys.modules.items()):
        if module is None or module is utils or not name.startswith("vllm."):
            continue
        for attr, value in list(vars(module).items()):
            if value is original:
                setattr(module, attr, replacement)
                rebound.append(f"{name.rsplit('.', 1)[-1]}.{attr}")
    summary = f"merge -> vLLM's shared {_SHARED_MERGE} (every architecture that merges through it)"
    if rebound:
        summary += f", rebound in already imported {', '.join(sorted(rebound))}"
    return summary
