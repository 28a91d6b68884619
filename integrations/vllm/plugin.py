"""The vLLM plugin: ``vllm serve <model>`` runs mmkernels' kernels with no change to the command.

Installed as the ``vllm.general_plugins`` entry point ``mmkernels`` ->
``mmkernels.integrations.vllm.plugin:register``. vLLM calls :func:`register` in every
process it starts (the CLI / API server, the engine core, each worker; CPU and CUDA
workers are spawned, so everything is registered inside the function, never at import).
Each process logs ONE line that says what was registered, or why nothing was (logger
``vllm.mmkernels``, through vLLM's own handler; straight to stderr, prefixed
``[mmkernels]``, in a process where vLLM has not configured logging yet: the CLI and
``LLM(...)`` load plugins before that)::

    mmkernels vLLM plugin (pid 1234, backend triton-interpreter): registered merge -> vLLM's
    shared _merge_multimodal_embeddings (every architecture that merges through it);
    patch_embed -> Conv2dLayer, Conv3dLayer (kernel == stride); encoder_attention ->
    MMEncoderAttention (varlen)

Replacements (read against vLLM 0.32): the merge by replacing vLLM's one shared merge
function, the others through vLLM's own extension points:

* ``merge``: vLLM's shared merge, ``vllm.model_executor.models.utils.
  _merge_multimodal_embeddings`` (what the interface default
  ``SupportsMultiModal.embed_input_ids`` calls, and every model module that imports it:
  Qwen3-VL's and Qwen3-Omni's deepstack merges, Qwen3.5, Molmo2, MiniCPM-V 4.6, the
  audio LLMs, ...), is replaced once in each process by a function of the same contract
  (:func:`_register_merge`), so every architecture that merges through it is covered,
  not a list. The text embedding stays vLLM's (LoRA, out-of-vocabulary placeholders);
  the merge is :func:`mmkernels.ops.merge_multimodal_embeddings` driven by vLLM's
  host-computed ``is_multimodal`` mask (the mask is the id tensor, placeholder id 1):
  the per-image feature tensors are read where they lie (no concatenation, the cast
  happens in the kernel), only the placeholder rows are written (in place, as vLLM's
  contract says), and the count check is done on the host mask (no device sync).
  Architectures whose ``embed_input_ids`` merges another way keep vLLM's code;
  ``python tools/vllm_merge_coverage.py`` lists, from vLLM's sources, which architectures
  go through the shared merge and which do not.
* ``patch_embed``: ``CustomOp.register_oot`` of subclasses of ``Conv2dLayer`` and
  ``Conv3dLayer`` (keyed by the in-tree class name; registration is guarded, vLLM asserts
  on a duplicate). ``enabled()`` is true and ``forward_cuda`` / ``forward_cpu`` run
  :func:`mmkernels.ops.patch_embed` for convolutions with kernel == stride, square
  spatial patches, no padding, dilation 1, groups 1; for ``Conv3dLayer`` only inputs that
  are exactly one patch each (Qwen2-VL's pre-flattened ``(L, C, T, P, P)``). Anything else
  runs vLLM's own forward.
* ``encoder_attention``: ``CustomOp.register_oot`` of a subclass of ``MMEncoderAttention``
  (the vision towers' attention: Qwen2-VL / Qwen2.5-VL / Qwen3-VL, CLIP, SigLIP, Pixtral,
  ...). ``forward_cuda`` / ``forward_cpu`` run :func:`mmkernels.ops.varlen_attention`
  on the call's ``(B, S, H, D)`` or ``(B, S, H * D)`` tensors as packed
  ``(B * S, H, D)`` views: with ``cu_seqlens`` (only ``B == 1`` and as many keys as
  queries, as vLLM's own paths) those are the sequences; without, each of the ``B`` rows
  is one sequence (queries and keys may differ in length). GQA by head counts, the
  layer's ``scale``. ``max_seqlen`` becomes a Python int without a device sync where
  vLLM's metadata allows it: from host ``cu_seqlens``, else from vLLM's ``max_seqlen``
  where its backend computes one (a device scalar is read once, as vLLM's flash-attn
  wrapper does), else the query count (an upper bound). Not
  covered (vLLM's own forward runs): FP8 attention, the FlashInfer backend (its
  ``cu_seqlens`` are in another layout), head sizes over 256, dtypes the op does not
  take.

Unsupported cases fall through to vLLM's own code path; the first such case per reason
and process is logged. The first call of each replacement per process logs which backend
mmkernels' op took (``triton``, ``triton-interpreter`` or ``reference`` with its reasons):
the debug hook that shows the kernel ran, not a fallback. :func:`stats` counts calls per
(replacement, backend) in the current process.

Environment:

* ``MMKERNELS_DISABLE=1``: register nothing (vLLM runs unchanged); the line says so.
* ``MMKERNELS_KERNELS=merge,patch_embed,encoder_attention,quantized_projector``: register only these
  (default: all of :data:`KERNELS`). Unknown names are reported in the line and ignored.

On a CPU platform the kernels need ``TRITON_INTERPRET=1`` in the environment before
vLLM starts (Triton reads it when kernels are decorated); without it, or on a platform
other than CUDA and CPU, nothing is registered and the line says why.

Quantized projectors: ``quantized_projector`` registers the quantization methods
``mmkernels-w8a16`` / ``mmkernels-w4a16`` / ``mmkernels-fp8``, which a model opts into with
``--quantization`` (:mod:`mmkernels.integrations.vllm.quant`); they quantize only the
multimodal projector's linear layers, at load time, from an ordinary checkpoint.
"""

from __future__ import annotations

import collections
import logging
import os
import re
import sys
import threading
from typing import Callable

import torch

__all__ = ["KERNELS", "register", "stats"]

# A child of vLLM's logger: vLLM's handler prints it in every process, with vLLM's prefix.
log = logging.getLogger("vllm.mmkernels")

ENV_DISABLE = "MMKERNELS_DISABLE"
ENV_KERNELS = "MMKERNELS_KERNELS"
KERNELS = ("merge", "patch_embed", "encoder_attention", "quantized_projector")

_LOCK = threading.Lock()
_REGISTERED: dict[str, str] | None = None  # kernel -> summary, once per process
_NOTED: set = set()
_STATS: collections.Counter = collections.Counter()


def stats() -> dict[tuple[str, str], int]:
    """Calls of each replacement in this process, keyed by (replacement, backend);
    ``backend`` is ``fallthrough`` when vLLM's own path ran."""
    return dict(_STATS)


def _emit(level: int, msg: str, *args) -> None:
    """Log through vLLM's handler; before vLLM has configured logging in this process (the
    CLI and ``LLM(...)`` load plugins first), write the line to stderr ourselves."""
    if logging.getLogger("vllm").handlers or os.environ.get("VLLM_CONFIGURE_LOGGING", "1") == "0":
        log.log(level, msg, *args)
    else:
        sys.stderr.write(f"{logging.getLevelName(level)} [mmkernels] {msg % args}\n")
        sys.stderr.flush()


def _note_once(key, msg: str, *args) -> None:
    with _LOCK:
        if key in _NOTED:
            return
        _NOTED.add(key)
    _emit(logging.INFO, msg, *args)


def _record(replacement: str, op: str, where: str) -> None:
    """The debug hook: which backend mmkernels' op just took (from mmkernels.backend)."""
    if torch.compiler.is_compiling():
        return
    from mmkernels.backend import recent_decisions

    decisions = [d for d in recent_decisions()[-4:] if d.op == op]
    if not decisions:
        return
    decision = decisions[-1]
    _STATS[(replacement, decision.backend.value)] += 1
    reasons = f" ({'; '.join(decision.reasons)})" if decision.reasons else ""
    # The route a table chose (mmkernels.routes), for ops that have routes.
    route = f" route={decision.route} ({decision.route_source})" if decision.route is not None else ""
    _note_once(
        ("ran", replacement, decision.backend.value, decision.reasons, decision.route),
        "mmkernels %s ran: backend=%s%s%s [%s, pid %d, first call]",
        replacement, decision.backend.value, route, reasons, where, os.getpid(),
    )  # fmt: skip


def _fallthrough(replacement: str, reason: str, where: str) -> None:
    if torch.compiler.is_compiling():
        return
    _STATS[(replacement, "fallthrough")] += 1
    _note_once(
        ("fallthrough", replacement, reason, where),
        "mmkernels %s: %s not covered (%s): vLLM's own path runs [pid %d]",
        replacement, where, reason, os.getpid(),
    )  # fmt: skip


# --------------------------------------------------------------------------------------
# merge


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
        _fallthrough("merge", reason, where)
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
    _record("merge", OP_NAME, where)
    return out


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


def _register_merge() -> str:
    """Replace vLLM's shared merge, ``vllm.model_executor.models.utils.
    _merge_multimodal_embeddings``, once: what the interface default
    (``SupportsMultiModal.embed_input_ids``, importing it at call time) and every model
    module that imports it by name (Qwen3-VL's deepstack, Qwen3.5, Molmo2, MiniCPM-V 4.6,
    the audio LLMs, ...) call. Model modules are imported after the plugins run, so they
    bind the replacement; a module already imported holding vLLM's function gets the
    replacement too. Architectures whose ``embed_input_ids`` merges without it keep
    vLLM's path (tools/vllm_merge_coverage.py lists them)."""
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


# --------------------------------------------------------------------------------------
# patch embed


def _conv_reason(layer) -> str | None:
    """Why mmkernels' patch embed cannot stand in for this conv layer (None: it can)."""
    ks = tuple(layer.kernel_size)
    if tuple(layer.stride) != ks:
        return f"stride {tuple(layer.stride)} != kernel {ks}"
    if any(layer.padding):
        return f"padding {tuple(layer.padding)}"
    if any(d != 1 for d in layer.dilation):
        return f"dilation {tuple(layer.dilation)}"
    if layer.groups != 1:
        return f"groups={layer.groups}"
    if ks[-1] != ks[-2]:
        return f"non-square patches {ks}"
    return None


def _conv_input_reason(layer, x: torch.Tensor, rank: int, one_patch: bool = False) -> str | None:
    """Why the patch-embed op cannot take this conv call (None: it can): the layer's own
    reason from construction, or the input's rank, extent (``one_patch``: pre-flattened
    patches, each exactly the kernel), dtype or device."""
    from mmkernels.ops.patch_embed import CAPABILITIES

    if layer._mmk_reason is not None:
        return layer._mmk_reason
    if x.dim() != rank:
        return f"input of rank {x.dim()}"
    if one_patch and tuple(x.shape[2:]) != tuple(layer.kernel_size):
        return "inputs larger than one patch (only pre-flattened (L, C, T, P, P) patches)"
    if x.dtype != layer.weight.dtype or x.dtype not in CAPABILITIES.dtypes:
        return f"input dtype {x.dtype} with weight dtype {layer.weight.dtype}"
    if x.device != layer.weight.device:
        return "input on another device than the weight"
    return None


def _patch_embed_conv2d(layer, x: torch.Tensor) -> torch.Tensor | None:
    where = type(layer).name
    reason = _conv_input_reason(layer, x, 4)
    if reason is not None:
        _fallthrough("patch_embed", reason, where)
        return None
    from mmkernels.ops.patch_embed import OP_NAME, patch_embed

    p = layer.kernel_size[0]
    b, _, h, w = x.shape
    rows = patch_embed(x, layer.weight, layer.bias)  # (B, N, D)
    _record("patch_embed", OP_NAME, where)
    # Conv2d's (B, D, H/P, W/P) as a view, the layout vLLM's own matmul path returns.
    return rows.transpose(1, 2).unflatten(2, (h // p, w // p))


def _patch_embed_conv3d(layer, x: torch.Tensor) -> torch.Tensor | None:
    where = type(layer).name
    reason = _conv_input_reason(layer, x, 5, one_patch=True)
    if reason is not None:
        _fallthrough("patch_embed", reason, where)
        return None
    from mmkernels.ops.patch_embed import OP_NAME, patch_embed

    n = x.shape[0]
    rows = patch_embed(x.reshape(n, -1), layer.weight, layer.bias)  # (L, D)
    _record("patch_embed", OP_NAME, where)
    return rows.view(n, -1, 1, 1, 1)


def _conv_subclass(base, run):
    class _MMKernelsConv(base):
        """``{base}`` with mmkernels' patch embed where kernel == stride (mmkernels vLLM plugin)."""

        mmkernels_replaced = ("patch_embed",)

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self._mmk_reason = _conv_reason(self)

        @classmethod
        def enabled(cls) -> bool:
            return True

        def forward_cuda(self, x):
            out = run(self, x)
            return super().forward_cuda(x) if out is None else out

        def forward_cpu(self, x):
            out = run(self, x)
            return super().forward_cpu(x) if out is None else out

    _MMKernelsConv.__name__ = _MMKernelsConv.__qualname__ = f"MMKernels{base.__name__}"
    _MMKernelsConv.__doc__ = _MMKernelsConv.__doc__.format(base=base.__name__)
    return _MMKernelsConv


def _register_oot(base, subclass) -> str:
    """``CustomOp.register_oot`` under the in-tree name, once (vLLM asserts on duplicates)."""
    from vllm.model_executor.custom_op import CustomOp, op_registry_oot

    name = base.__name__
    current = op_registry_oot.get(name)
    if current is not None:
        if getattr(current, "mmkernels_replaced", None):
            return f"{name} (already registered)"
        return f"{name} NOT replaced: {current.__module__}.{current.__qualname__} already registered for it"
    CustomOp.register_oot(subclass, name=name)
    return name


def _register_patch_embed() -> str:
    from vllm.model_executor.layers.conv import Conv2dLayer, Conv3dLayer

    names = [
        _register_oot(Conv2dLayer, _conv_subclass(Conv2dLayer, _patch_embed_conv2d)),
        _register_oot(Conv3dLayer, _conv_subclass(Conv3dLayer, _patch_embed_conv3d)),
    ]
    return f"patch_embed -> {', '.join(names)} (kernel == stride)"


# --------------------------------------------------------------------------------------
# encoder attention


# The backends vLLM computes ``max_seqlen`` for; for the others the models pass None or
# a placeholder 0 (Qwen2.5-VL on TORCH_SDPA), which must not size the launch.
_MAX_SEQLEN_BACKENDS = ("FLASH_ATTN", "ROCM_AITER_FA", "TRITON_ATTN")


def _max_seqlen(layer, cu_seqlens: torch.Tensor, max_seqlen, bound: int) -> int:
    """The longest sequence as a Python int, without a device sync where vLLM's metadata
    allows it; ``bound`` (every query row, a valid upper bound) when nothing says more."""
    compiling = torch.compiler.is_compiling()
    if cu_seqlens.device.type == "cpu" and not compiling:
        return int((cu_seqlens[1:] - cu_seqlens[:-1]).max()) if cu_seqlens.numel() > 1 else 0
    if max_seqlen is not None and getattr(layer.attn_backend, "name", None) in _MAX_SEQLEN_BACKENDS:
        if isinstance(max_seqlen, int):
            return max_seqlen
        if not compiling:
            return int(max_seqlen)  # free on the host; on the device one sync, as vLLM's flash-attn wrapper
    return bound


def _encoder_attention_reason(layer, query, key, value, cu_seqlens, sequence_lengths) -> str | None:
    """Why mmkernels' varlen attention cannot stand in for this call (None: it can)."""
    from mmkernels.ops.varlen_attention import CAPABILITIES, MAX_HEAD_DIM
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    h, hkv, d = layer.num_heads, layer.num_kv_heads, layer.head_size
    if getattr(layer, "fp8_enabled", False):
        return "FP8 attention"
    if layer.attn_backend == AttentionBackendEnum.FLASHINFER or sequence_lengths is not None:
        return "FlashInfer backend (cu_seqlens in its own layout)"
    if d > MAX_HEAD_DIM:
        return f"head size {d} > {MAX_HEAD_DIM}"
    # (Reasons name no lengths: one log line per reason, not one per image size.)
    if (
        query.dim() not in (3, 4)
        or key.dim() != query.dim()
        or value.shape != key.shape
        or query.shape[2:] not in ((h * d,), (h, d))
        or key.shape[2:] not in ((hkv * d,), (hkv, d))
        or query.shape[0] != key.shape[0]
    ):
        return f"query/key/value not (B, S, H, D) or (B, S, H * D) for {h}/{hkv} heads of {d}"
    if query.dtype not in CAPABILITIES.dtypes or key.dtype != query.dtype or value.dtype != query.dtype:
        return f"dtypes {query.dtype}, {key.dtype}, {value.dtype}"
    if key.device != query.device or value.device != query.device:
        return "query, key and value on different devices"
    if cu_seqlens is not None:
        if query.shape[0] != 1:
            return "cu_seqlens with a batch dimension > 1"
        if key.shape[1] != query.shape[1]:
            return "cu_seqlens with fewer or more keys than queries"
        if cu_seqlens.dim() != 1 or cu_seqlens.dtype not in (torch.int32, torch.int64):
            return f"cu_seqlens of shape {tuple(cu_seqlens.shape)}, dtype {cu_seqlens.dtype}"
    return None


def _encoder_attention(layer, query, key, value, cu_seqlens, max_seqlen, sequence_lengths) -> torch.Tensor | None:
    """``MMEncoderAttention``'s call by :func:`mmkernels.ops.varlen_attention`; None when
    not covered (the caller runs vLLM's own forward)."""
    where = type(layer).name
    reason = _encoder_attention_reason(layer, query, key, value, cu_seqlens, sequence_lengths)
    if reason is not None:
        _fallthrough("encoder_attention", reason, where)
        return None
    from mmkernels.ops.varlen_attention import OP_NAME, varlen_attention

    bsz, q_len, kv_len = query.shape[0], query.shape[1], key.shape[1]
    d = layer.head_size
    # Packed views (a copy only where the strides do not allow one).
    q = query.reshape(bsz * q_len, layer.num_heads, d)
    k = key.reshape(bsz * kv_len, layer.num_kv_heads, d)
    v = value.reshape(bsz * kv_len, layer.num_kv_heads, d)
    if cu_seqlens is None:  # each batch row is one sequence
        rows = torch.arange(bsz + 1, dtype=torch.int32, device=q.device)
        cu_q, cu_k, max_q, max_k = rows * q_len, rows * kv_len, q_len, kv_len
    else:
        max_q = max_k = _max_seqlen(layer, cu_seqlens, max_seqlen, q_len)
        cu_q = cu_k = cu_seqlens.to(device=q.device, dtype=torch.int32, non_blocking=True)
    out = varlen_attention(q, k, v, cu_q, cu_k, max_q, max_k, softmax_scale=layer.scale)
    _record("encoder_attention", OP_NAME, where)
    return out.view(query.shape)


def _encoder_attention_subclass(base):
    class MMKernelsMMEncoderAttention(base):
        """``MMEncoderAttention`` by mmkernels' varlen attention where covered (mmkernels vLLM plugin)."""

        mmkernels_replaced = ("encoder_attention",)

        def forward_cuda(self, query, key, value, cu_seqlens=None, max_seqlen=None, sequence_lengths=None):
            out = _encoder_attention(self, query, key, value, cu_seqlens, max_seqlen, sequence_lengths)
            if out is None:
                return super().forward_cuda(query, key, value, cu_seqlens, max_seqlen, sequence_lengths)
            return out

        def forward_cpu(self, query, key, value, cu_seqlens=None, max_seqlen=None, sequence_lengths=None):
            out = _encoder_attention(self, query, key, value, cu_seqlens, max_seqlen, sequence_lengths)
            if out is None:
                return super().forward_cpu(query, key, value, cu_seqlens, max_seqlen, sequence_lengths)
            return out

    MMKernelsMMEncoderAttention.__qualname__ = MMKernelsMMEncoderAttention.__name__
    return MMKernelsMMEncoderAttention


def _register_encoder_attention() -> str:
    from vllm.model_executor.layers.attention.mm_encoder_attention import MMEncoderAttention

    name = _register_oot(MMEncoderAttention, _encoder_attention_subclass(MMEncoderAttention))
    return f"encoder_attention -> {name} (varlen)"


def _register_quantized_projector() -> str:
    """The ``--quantization mmkernels-w8a16|w4a16|fp8`` methods (opt-in per model: nothing
    is quantized unless asked for); see :mod:`mmkernels.integrations.vllm.quant`."""
    from mmkernels.integrations.vllm.quant import register_quantization

    return register_quantization()


# kernel name -> function that registers it with vLLM and returns a summary for the log.
_REGISTRARS: dict[str, Callable[[], str]] = {
    "merge": _register_merge,
    "patch_embed": _register_patch_embed,
    "encoder_attention": _register_encoder_attention,
    "quantized_projector": _register_quantized_projector,
}


# --------------------------------------------------------------------------------------
# entry point


def _selected() -> tuple[list[str], list[str]]:
    """(kernels selected by MMKERNELS_KERNELS, entries that name no kernel). Names are
    case-insensitive and separated by commas, semicolons or spaces (``MERGE``,
    ``merge;patch_embed`` and ``merge patch_embed`` all select what they say)."""
    raw = os.environ.get(ENV_KERNELS, "").strip()
    if not raw or raw.lower() == "all":
        return list(KERNELS), []
    names = [n.lower() for n in re.split(r"[,;\s]+", raw) if n]
    return [n for n in KERNELS if n in names], [n for n in names if n not in KERNELS]


def _platform_backend() -> tuple[str | None, str]:
    """(backend the kernels will take, or None if they cannot run here; description)."""
    from mmkernels.backend import interpreter_enabled
    from vllm.platforms import current_platform

    if current_platform.is_cuda():
        return "triton", "triton"
    if current_platform.is_cpu():
        if interpreter_enabled():
            return "triton-interpreter", "triton-interpreter"
        return None, "CPU platform without TRITON_INTERPRET=1 (set it before vLLM starts)"
    return None, f"platform {current_platform.device_type!r} has no mmkernels backend"


def register() -> dict[str, str]:
    """The ``vllm.general_plugins`` entry point. Idempotent per process; never raises
    (a failure is logged as an error and vLLM runs unchanged). Returns what it registered
    (kernel -> summary)."""
    global _REGISTERED
    with _LOCK:
        if _REGISTERED is not None:
            return dict(_REGISTERED)
        _REGISTERED = {}
    pid = os.getpid()
    if os.environ.get(ENV_DISABLE, "").strip().lower() not in ("", "0", "false", "no", "off"):
        _emit(logging.INFO, "mmkernels vLLM plugin (pid %d): disabled by %s=%s; registered nothing", pid,
              ENV_DISABLE, os.environ[ENV_DISABLE])  # fmt: skip
        return {}
    try:
        backend, why = _platform_backend()
    except Exception as exc:  # noqa: BLE001 - a plugin must not take vLLM down
        _emit(logging.ERROR, "mmkernels vLLM plugin (pid %d): registered nothing: %s: %s", pid, type(exc).__name__, exc)
        return {}
    if backend is None:
        _emit(logging.INFO, "mmkernels vLLM plugin (pid %d): registered nothing: %s", pid, why)
        return {}
    selected, unknown = _selected()
    done, failed = {}, []
    for name in selected:
        try:
            done[name] = _REGISTRARS[name]()
        except Exception as exc:  # noqa: BLE001
            failed.append(f"{name} FAILED ({type(exc).__name__}: {exc})")
    _REGISTERED.update(done)
    parts = list(done.values()) + failed
    if unknown:
        parts.append(f"ignored unknown {ENV_KERNELS} entries {unknown} (known: {', '.join(KERNELS)})")
    skipped = [n for n in KERNELS if n not in selected]
    if skipped:
        parts.append(f"not selected by {ENV_KERNELS}: {', '.join(skipped)}")
    line = "mmkernels vLLM plugin (pid %d, backend %s): registered %s"
    # A setting that selects nothing or names an unknown kernel is a mistake: say so above INFO.
    level = logging.ERROR if failed else logging.WARNING if unknown or not selected else logging.INFO
    _emit(level, line, pid, backend, "; ".join(parts) if parts else "nothing")
    return dict(done)
