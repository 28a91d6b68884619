"""The vLLM plugin's ``encoder_attention`` adapter: ``MMEncoderAttention`` by varlen attention (read against vLLM 0.32).

``CustomOp.register_oot`` of a subclass of ``MMEncoderAttention`` (the vision towers'
attention: Qwen2-VL / Qwen2.5-VL / Qwen3-VL, CLIP, SigLIP, Pixtral, ...; registration is
guarded, vLLM asserts on a duplicate: :func:`.plugin.register_oot`). ``forward_cuda`` /
``forward_cpu`` run :func:`mmkernels.ops.varlen_attention` on the call's ``(B, S, H, D)``
or ``(B, S, H * D)`` tensors as packed ``(B * S, H, D)`` views: with ``cu_seqlens`` (only
``B == 1`` and as many keys as queries, as vLLM's own paths) those are the sequences;
without, each of the ``B`` rows is one sequence (queries and keys may differ in length).
GQA by head counts, the layer's ``scale``. ``max_seqlen`` becomes a Python int without a
device sync where vLLM's metadata allows it: from host ``cu_seqlens``, else from vLLM's
``max_seqlen`` where its backend computes one (a device scalar is read once, as vLLM's
flash-attn wrapper does), else the query count (an upper bound). Not covered (vLLM's own
forward runs; the first call per reason is logged, :func:`.plugin.fallthrough`): FP8
attention, the FlashInfer backend (its ``cu_seqlens`` are in another layout), head sizes
over 256, dtypes the op does not take.

Registered by the plugin (:mod:`.plugin`, kernel name ``encoder_attention``); vLLM is
imported only inside the functions.
"""

from __future__ import annotations

import torch

from mmkernels.integrations.vllm.plugin import fallthrough, record, register_oot

__all__ = ["register"]

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
        fallthrough("encoder_attention", reason, where)
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
    record("encoder_attention", OP_NAME, where)
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


def register() -> str:
    """Register the subclass of ``MMEncoderAttention``; returns the summary for the
    plugin's log line."""
    from vllm.model_executor.layers.attention.mm_encoder_attention import MMEncoderAttention

    name = register_oot(MMEncoderAttention, _encoder_attention_subclass(MMEncoderAttention))
    return f"encoder_attention -> {name} (varlen)"
