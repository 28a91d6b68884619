"""Hugging Face attention through :func:`mmkernels.ops.varlen_attention`.

Two routes, both ending in ONE call of the op per attention layer:

1. **The attention interface** (:func:`register_attention`). transformers looks an
   attention layer's function up by name (``config._attn_implementation``) in
   ``AttentionInterface`` and the mask builder in ``AttentionMaskInterface``. We register
   :func:`mmkernels_attention_forward` and transformers' own ``sdpa_mask`` under
   :data:`ATTN_IMPLEMENTATION` (``"mmkernels"``; no "flash" in the name, so transformers
   treats it as an SDPA-like implementation: padded tensors and a 4-D mask). Then
   ``from_pretrained(..., attn_implementation="mmkernels")``,
   ``model.set_attn_implementation("mmkernels")`` or per sub-config
   ``{"text_config": "mmkernels", "vision_config": "mmkernels"}`` route every layer that
   calls the interface through the op: LLaVA's CLIP and Llama, PaliGemma's SigLIP and
   Gemma, Gemma 3, Qwen2-VL's text model, and the cross-attention of BLIP-2's Q-Former,
   GPT-2 in VisionEncoderDecoder, Whisper's decoder (all tested on the tiny zoo) and
   IDEFICS' gated cross-attention (tests/test_attention_idefics.py).

   The function receives padded ``(B, H, S, d)`` tensors and the mask sdpa would get: a
   boolean (or 0 / -inf float) ``(B|1, 1|H, Sq, Sk)`` tensor, or None with ``is_causal``.
   Every mask transformers builds for these models (causal, padding, sliding window,
   prefix-LM, Gemma 3's bidirectional image blocks) shows each query row ONE contiguous
   interval of keys, which is exactly the op's ``kv_ranges``: the batch is packed as B
   sequences of Sq queries and Sk keys (``cu_seqlens`` ``b * Sq`` / ``b * Sk``) and each
   query row gets ``[first visible key, last visible key + 1)``. A mask that is not of
   that form (a row with a hole, heads with different masks, an additive bias) is
   detected, once per mask object (the check needs one host sync; its result is cached
   for the layers that share the mask), and those calls run transformers' SDPA function
   instead, with the reason logged (logger ``mmkernels``, WARNING once per reason) and
   counted by :func:`record_routes`. So are calls the op does not cover (dropout while
   training, ``softcap``, ``position_bias``, attention sinks, ``output_attentions``).

2. **Engine rules** (:data:`ATTENTION_RULES`) for attention that does not reach the
   interface in one call:

   * Qwen2-VL / Qwen2.5-VL vision attention (``VisionAttention`` /
     ``Qwen2_5_VLVisionAttention``): unless a "flash" implementation is configured,
     transformers splits q/k/v per image with ``cu_seqlens.tolist()`` (a host sync) and
     calls the attention function once per image (per window in Qwen2.5-VL). The rule
     swaps that module's ``forward`` (the attention layer itself: qkv projection, the
     model's own ``apply_rotary_pos_emb_vision``, attention, output projection) for one
     that hands ``cu_seqlens`` (or 2.5's ``cu_window_seqlens``, which the tower passes
     in the same argument) to the op: no loop and no sync. ``max_seqlen`` is the tower's
     value when it has one, else the number of patches (an upper bound known on the
     host: the op's grid gets idle programs, never a wrong answer).
   * Mllama text-to-vision cross-attention: see :func:`_mllama_model_forward`.

   Each is one :class:`AttentionSpec` (the class covered, and the :class:`AttentionRoute`
   its ``forward`` takes) in :data:`ATTENTION_SPECS`, applied by one :class:`AttentionRule`;
   the towers that kept Qwen2-VL's attention layer (Qwen3-VL, Qwen3.5, GLM-4.xV, ...) are
   a line each.

Read against transformers 5.17 and 5.24 (``integrations/sdpa_attention.py``,
``masking_utils.py``, ``models/{qwen2_vl,qwen2_5_vl,mllama}/modeling_*.py``); the other
towers' attention layers against 5.25 (``tests/test_attention_vision_towers.py`` checks
each against its class in every installed release).
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import logging
import sys
import weakref
from typing import Any, Callable, Iterator

import torch

from mmkernels.backend import interpreter_enabled
from mmkernels.ops.varlen_attention import CAPABILITIES as ATTENTION_CAPABILITIES

from .engine import PatchOptions, Rule, SpecRule, backend_note, bind_call, original_method

__all__ = [
    "ATTENTION_KERNEL",
    "ATTENTION_RULES",
    "ATTN_IMPLEMENTATION",
    "ATTENTION_SPECS",
    "AttentionRoute",
    "AttentionRule",
    "AttentionSpec",
    "MllamaCrossMask",
    "is_registered",
    "mask_to_kv_ranges",
    "mllama_cross_mask",
    "mmkernels_attention_forward",
    "record_routes",
    "register_attention",
]

ATTN_IMPLEMENTATION = "mmkernels"
ATTENTION_KERNEL = "attention"
ATTENTION_OP = "varlen_attention"

log = logging.getLogger("mmkernels")

# --------------------------------------------------------------------------------------
# Routes taken (scoped recording, for tests and debugging)

_RECORDERS: list[collections.Counter] = []
_LOGGED_REASONS: set[str] = set()


@contextlib.contextmanager
def record_routes() -> Iterator[collections.Counter]:
    """Count, inside the block, which route each patched attention call took:
    ``"varlen"`` (the op), ``"sdpa: <reason>"`` (transformers' SDPA, and why)."""
    counter: collections.Counter = collections.Counter()
    _RECORDERS.append(counter)
    try:
        yield counter
    finally:
        _RECORDERS.remove(counter)


def _route(name: str) -> None:
    for counter in _RECORDERS:
        counter[name] += 1


def _fallback_reason(reason: str) -> None:
    _route(f"sdpa: {reason}")
    if reason not in _LOGGED_REASONS:
        _LOGGED_REASONS.add(reason)
        log.warning("mmkernels attention: running transformers' SDPA instead of varlen_attention: %s", reason)


# --------------------------------------------------------------------------------------
# Registration


def register_attention() -> str:
    """Register :func:`mmkernels_attention_forward` and transformers' ``sdpa_mask`` under
    ``"mmkernels"`` with ``AttentionInterface`` / ``AttentionMaskInterface``. Idempotent.
    Returns the name to pass as ``attn_implementation``."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTN_IMPLEMENTATION, mmkernels_attention_forward)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, sdpa_mask)
    return ATTN_IMPLEMENTATION


def is_registered() -> bool:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    return (
        AttentionInterface._global_mapping.get(ATTN_IMPLEMENTATION) is mmkernels_attention_forward
        and ATTN_IMPLEMENTATION in AttentionMaskInterface._global_mapping
    )


# --------------------------------------------------------------------------------------
# Masks -> kv_ranges


class _MaskCache:
    """Conversions of the last few mask objects: a model builds its mask(s) once per
    forward and every layer receives the same object, so the check (one host sync) runs
    once per mask, not once per layer. Keyed by identity, the tensor's version counter
    (an in-place change invalidates) and the query batch size."""

    def __init__(self, size: int = 8):
        self.size = size
        self.entries: collections.OrderedDict[tuple, tuple[weakref.ref, Any]] = collections.OrderedDict()

    def get(self, mask: torch.Tensor, key: tuple):
        entry = self.entries.get((id(mask), mask._version) + key)
        if entry is not None and entry[0]() is mask:
            return entry[1]
        return None

    def put(self, mask: torch.Tensor, key: tuple, value) -> None:
        full_key = (id(mask), mask._version) + key
        self.entries[full_key] = (weakref.ref(mask), value)
        self.entries.move_to_end(full_key)
        while len(self.entries) > self.size:
            self.entries.popitem(last=False)


_MASK_CACHE = _MaskCache()


def _visible(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(visible bool, on-device flag "every value is 0 or masked") for a bool or additive float mask."""
    if mask.dtype == torch.bool:
        return mask, None
    visible = mask == 0
    masked = mask <= torch.finfo(mask.dtype).min / 2  # finfo.min or -inf, as transformers writes them
    return visible, (visible | masked).all()


def mask_to_kv_ranges(mask: torch.Tensor, batch: int, q_len: int, k_len: int) -> tuple[torch.Tensor | None, str]:
    """``(kv_ranges (batch * q_len, 2) int32, "")`` for a mask whose every row sees one
    contiguous interval of keys (rows that see nothing get ``[0, 0)``), else
    ``(None, reason)``. ``mask``: ``(batch|1, 1|H, q_len, k_len)`` bool (True = attend) or
    additive float (0 = attend, finfo.min / -inf = masked). Computed on the device; the
    verdict costs one host sync, cached per mask object (see :class:`_MaskCache`)."""
    key = (batch, q_len, k_len)
    cached = _MASK_CACHE.get(mask, key)
    if cached is not None:
        return cached
    result = _mask_to_kv_ranges(mask, batch, q_len, k_len)
    _MASK_CACHE.put(mask, key, result)
    return result


def _mask_to_kv_ranges(mask, batch, q_len, k_len):
    if mask.dim() != 4 or mask.shape[0] not in (1, batch) or tuple(mask.shape[2:]) != (q_len, k_len):
        return None, f"mask of shape {tuple(mask.shape)} for queries ({batch}, {q_len}) and {k_len} keys"
    if not (mask.dtype == torch.bool or mask.is_floating_point()):
        return None, f"mask of dtype {mask.dtype}"
    visible, values_ok = _visible(mask)
    checks = {}  # reason if false -> on-device flag; read together with ONE host sync
    if values_ok is not None:
        checks["additive float mask with values other than 0 and -inf (a bias)"] = values_ok
    if visible.shape[1] != 1:
        checks["per-head masks differ"] = (visible == visible[:, :1]).all()
    visible = visible[:, 0].expand(batch, q_len, k_len)
    count = visible.sum(-1, dtype=torch.int32)
    start = visible.to(torch.uint8).argmax(-1).to(torch.int32)  # first visible key (0 when none)
    end = start + count
    cols = torch.arange(k_len, device=mask.device, dtype=torch.int32)
    interval = (cols >= start[..., None]) & (cols < end[..., None])
    checks["a mask row is not one contiguous interval of keys"] = (interval == visible).all()
    flags = torch.stack(list(checks.values())).tolist()  # the one host sync per mask object
    failed = [reason for reason, flag in zip(checks, flags) if not flag]
    if failed:
        return None, failed[0]
    ranges = torch.stack([start, end], dim=-1).masked_fill_((count == 0)[..., None], 0)
    return ranges.reshape(batch * q_len, 2), ""


# --------------------------------------------------------------------------------------
# The attention function


def _unsupported(module, query, key, value, attention_mask, dropout, kwargs) -> str:
    if dropout and dropout > 0:
        return "attention dropout > 0 (training)"
    if kwargs.get("softcap") is not None:
        return "softcap"
    if kwargs.get("position_bias") is not None:
        return "position_bias"
    if kwargs.get("s_aux") is not None or kwargs.get("sinks") is not None:
        return "attention sinks"
    if kwargs.get("output_attentions"):
        return "output_attentions=True (no weights from a fused kernel)"
    if query.dim() != 4 or key.dim() != 4 or value.shape != key.shape:
        return f"query/key/value shapes {tuple(query.shape)}/{tuple(key.shape)}/{tuple(value.shape)}"
    if query.shape[0] != key.shape[0]:
        # SDPA broadcasts one batch over the other (Granite Speech's Q-Former: its learned
        # queries, batch 1, attend to every window of the audio); the op takes one batch.
        return f"query batch {query.shape[0]} broadcast against key batch {key.shape[0]}"
    if query.shape[-1] != key.shape[-1]:
        return "query and key head dims differ"
    if key.shape[1] == 0 or query.shape[1] % key.shape[1]:
        return f"{query.shape[1]} query heads over {key.shape[1]} key heads"
    if key.dtype != query.dtype or value.dtype != query.dtype:
        return "mixed dtypes"
    if attention_mask is not None and not isinstance(attention_mask, (torch.Tensor, MllamaCrossMask)):
        return f"mask of type {type(attention_mask).__name__}"
    return _kernel_unavailable(query)


def _kernel_unavailable(tensor: torch.Tensor) -> str:
    """Why the op would not run its Triton kernel for ``tensor`` (it would run its float64
    reference, which reads cu_seqlens on the host: slower than transformers' own path)."""
    reasons = ATTENTION_CAPABILITIES.not_supported_reasons(tensor.device, [tensor.dtype])
    if tensor.device.type == "cpu" and not interpreter_enabled():
        reasons.append("CPU tensors without TRITON_INTERPRET=1")
    return "; ".join(reasons)


def _sdpa(module, query, key, value, attention_mask, dropout, scaling, is_causal, kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                  is_causal=is_causal, **kwargs)  # fmt: skip


def _packed(x: torch.Tensor) -> torch.Tensor:
    """(B, H, S, d) -> (B * S, H, d)."""
    b, h, s, d = x.shape
    return x.transpose(1, 2).reshape(b * s, h, d)


def _uniform_cu_seqlens(batch: int, length: int, device) -> torch.Tensor:
    return torch.arange(0, (batch + 1) * length, length, dtype=torch.int32, device=device) if length else (
        torch.zeros(batch + 1, dtype=torch.int32, device=device))  # fmt: skip


def mmkernels_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                                attention_mask=None, dropout: float = 0.0, scaling: float | None = None,
                                is_causal: bool | None = None, **kwargs) -> tuple[torch.Tensor, None]:  # fmt: skip
    """transformers' attention-function contract, computed by :func:`varlen_attention`.

    Args:
        module: the attention layer (``is_causal`` is read from it when not given).
        query: ``(B, Hq, Sq, d)``; key, value: ``(B, Hkv, Sk, d)``, ``Hq % Hkv == 0``.
        attention_mask: None, a ``(B|1, 1|H, Sq, Sk)`` bool or additive float mask (what
            ``sdpa_mask`` / the model builds), or a :class:`MllamaCrossMask`.
        dropout: must be 0 for the op (else SDPA runs).
        scaling: the softmax scale (default ``d ** -0.5``).
        is_causal: as in transformers' SDPA function: applies only without a mask and with
            more than one query; with more keys than queries the first Sq keys are used
            (SDPA's top-left alignment for an empty static cache).

    Returns:
        ``(out (B, Sq, Hq, d), None)``. Query rows that see no key are 0.
    """
    if attention_mask is not None and torch.compiler.is_compiling():
        # A mask's check costs a host sync and its cache keys on the mask object: neither
        # belongs in a compiled graph (a graph break per layer, and guards on the cache
        # that recompile every step). Masked calls in a compiled model run transformers'
        # SDPA, as the unpatched model does; calls without a mask still run the op.
        if isinstance(attention_mask, MllamaCrossMask):
            attention_mask = attention_mask.dense(query.dtype)
        return _sdpa(module, query, key, value, attention_mask, dropout, scaling, is_causal, kwargs)
    reason = _unsupported(module, query, key, value, attention_mask, dropout, kwargs)
    if reason:
        _fallback_reason(reason)
        if isinstance(attention_mask, MllamaCrossMask):  # SDPA needs the tensor mask
            attention_mask = attention_mask.dense(query.dtype)
        return _sdpa(module, query, key, value, attention_mask, dropout, scaling, is_causal, kwargs)
    from mmkernels.ops import varlen_attention

    batch, _, q_len, head_dim = query.shape
    k_len = key.shape[2]
    device = query.device
    if isinstance(attention_mask, MllamaCrossMask):
        return _mllama_cross_attention(attention_mask, query, key, value, scaling), None

    causal, kv_ranges = False, None
    if attention_mask is None:
        is_causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
        causal = bool(is_causal) and q_len > 1
        if causal and k_len > q_len:
            key, value, k_len = key[:, :, :q_len], value[:, :, :q_len], q_len
    else:
        kv_ranges, why = mask_to_kv_ranges(attention_mask, batch, q_len, k_len)
        if kv_ranges is None:
            _fallback_reason(why)
            return _sdpa(module, query, key, value, attention_mask, dropout, scaling, is_causal, kwargs)
    out = varlen_attention(
        _packed(query), _packed(key), _packed(value),
        _uniform_cu_seqlens(batch, q_len, device), _uniform_cu_seqlens(batch, k_len, device), q_len, k_len,
        softmax_scale=scaling, causal=causal, kv_ranges=kv_ranges,
    )  # fmt: skip
    _route("varlen")
    return out.view(batch, q_len, query.shape[1], head_dim), None


# --------------------------------------------------------------------------------------
# Qwen2-VL / Qwen2.5-VL vision attention over cu_seqlens


def _is_flash(config) -> bool:
    implementation = getattr(config, "_attn_implementation", None)
    return isinstance(implementation, str) and "flash" in implementation


def _projections(module: torch.nn.Module) -> tuple[str, ...]:
    """The layer's input projections: one fused ``qkv`` (Qwen2-VL's layer), or ``q``, ``k``
    and ``v`` (Qwen2.5-Omni's tower)."""
    return ("qkv",) if hasattr(module, "qkv") or not hasattr(module, "q") else ("q", "k", "v")


def _cu_seqlens_not_applicable(module: torch.nn.Module, qk_norm: bool = False) -> list[str]:
    name = type(module).__name__
    reasons = [f"{name}.{attr} is not a plain nn.Linear" for attr in (*_projections(module), "proj")
               if not isinstance(getattr(module, attr, None), torch.nn.Linear)]  # fmt: skip
    if qk_norm:
        reasons += [f"{name} has no module {attr}" for attr in ("q_norm", "k_norm")
                    if not isinstance(getattr(module, attr, None), torch.nn.Module)]  # fmt: skip
    if not isinstance(getattr(module, "num_heads", None), int):
        reasons.append(f"{name} has no int num_heads")
    if _rotary_function(module) is None:
        reasons.append(f"{type(module).__module__} has no apply_rotary_pos_emb_vision")
    return reasons


def _cu_seqlens_qk_norm_not_applicable(module: torch.nn.Module) -> list[str]:
    return _cu_seqlens_not_applicable(module, qk_norm=True)


def _cu_seqlens_notes(module: torch.nn.Module) -> list[str]:
    return [backend_note(ATTENTION_CAPABILITIES, getattr(module, _projections(module)[0]).weight),
            "one varlen_attention call over cu_seqlens per layer (no per-image loop, no .tolist())"]  # fmt: skip


def _rotary_function(module) -> Callable | None:
    return getattr(sys.modules.get(type(module).__module__), "apply_rotary_pos_emb_vision", None)


def _cu_seqlens_attention_forward(self, hidden_states, cu_seqlens, position_embeddings=None, max_seqlen=None,
                                  **kwargs):  # fmt: skip
    """The vision attention layer (qkv projection, the model's own
    ``apply_rotary_pos_emb_vision``, attention, output projection) with one op call over
    ``cu_seqlens``."""
    return _cu_seqlens_attention(self, False, hidden_states, cu_seqlens, position_embeddings, max_seqlen, kwargs)


def _cu_seqlens_qk_norm_attention_forward(self, hidden_states, cu_seqlens, position_embeddings=None,
                                          max_seqlen=None, **kwargs):  # fmt: skip
    """As :func:`_cu_seqlens_attention_forward`, with the layer's ``q_norm`` / ``k_norm``
    applied per head before the rotary embedding (GLM-OCR's tower)."""
    return _cu_seqlens_attention(self, True, hidden_states, cu_seqlens, position_embeddings, max_seqlen, kwargs)


def _cu_seqlens_attention(self, qk_norm, hidden_states, cu_seqlens, position_embeddings, max_seqlen, kwargs):
    original = original_method(self, "forward")
    covered = (
        isinstance(hidden_states, torch.Tensor) and hidden_states.dim() == 2
        and isinstance(cu_seqlens, torch.Tensor) and cu_seqlens.dim() == 1
        and isinstance(position_embeddings, (tuple, list)) and len(position_embeddings) == 2
        and not (self.training and getattr(self, "attention_dropout", 0.0))
        and not kwargs.get("output_attentions")
        and kwargs.get("rotary_pos_emb") is None  # transformers < 5: angles, not (cos, sin)
        and not _is_flash(getattr(self, "config", None))
        and (max_seqlen is None or isinstance(max_seqlen, int))
        and not _kernel_unavailable(hidden_states)
    )  # fmt: skip
    if not covered:
        return original(hidden_states, cu_seqlens, position_embeddings=position_embeddings, max_seqlen=max_seqlen,
                        **kwargs)  # fmt: skip
    from mmkernels.ops import varlen_attention

    n = hidden_states.shape[0]
    if "qkv" in self._modules:
        q, k, v = self.qkv(hidden_states).reshape(n, 3, self.num_heads, -1).unbind(1)
    else:
        q, k, v = (projection(hidden_states).reshape(n, self.num_heads, -1) for projection in (self.q, self.k, self.v))
    if qk_norm:
        q, k = self.q_norm(q), self.k_norm(k)
    cos, sin = position_embeddings
    q, k = _rotary_function(self)(q, k, cos, sin)
    cu = cu_seqlens if cu_seqlens.dtype == torch.int32 else cu_seqlens.to(torch.int32)
    longest = max_seqlen if max_seqlen is not None else n  # an upper bound, known without a sync
    out = varlen_attention(q, k, v, cu, cu, longest, longest, softmax_scale=getattr(self, "scaling", None))
    _route("varlen")
    return self.proj(out.reshape(n, -1))


# --------------------------------------------------------------------------------------
# Mllama cross-attention from the compact mask

_CROSS_MASK_KWARG = "mmkernels_cross_mask"


class MllamaCrossMask:
    """Mllama's compact cross-attention mask, converted on the device: what
    :func:`mmkernels_attention_forward` receives as ``attention_mask`` in the patched
    text-to-vision cross-attention layers, instead of the dense ``(B, 1, S, images x tiles
    x tokens)`` float mask transformers builds.

    ``kv_ranges``: ``(B * S, 2)`` int32, each text token's keys in the PERMUTED key order
    ``key_order``: ``(B, images x tiles x tokens)`` int64, per sample the original index of
    each key, tiles some token sees first (in image order), the others (padded tiles,
    image slots a sample does not fill) after them. A token that sees images ``i..j`` then
    sees one contiguous interval. ``permute``: whether ``key_order`` is not the identity.
    ``row_mask``: ``(B, 1, S, 1)`` in the model dtype, 1 where a token sees an image: the
    ``full_text_row_masked_out_mask`` transformers derives from the dense mask. A token
    that sees no image attends to every key, as transformers' dense mask (all zeros after
    ``*= full_text_row_masked_out_mask``) makes it do; its MLP output is then zeroed by
    ``row_mask`` in the decoder layer.
    """

    def __init__(self, kv_ranges, key_order, permute, row_mask, num_keys):
        self.kv_ranges = kv_ranges
        self.key_order = key_order
        self.permute = permute
        self.row_mask = row_mask
        self.num_keys = num_keys

    def dense(self, dtype: torch.dtype) -> torch.Tensor:
        """The additive ``(B, 1, S, keys)`` mask in the original key order that transformers
        would have built (0 = attend, ``finfo(dtype).min`` = masked; a token that sees no
        image attends to every key): what a call the op does not cover (dropout in training,
        ``output_attentions``) hands to transformers' SDPA instead of this object."""
        batch = self.key_order.shape[0]
        ranges = self.kv_ranges.view(batch, -1, 1, 2)
        cols = torch.arange(self.num_keys, device=self.kv_ranges.device, dtype=torch.int32)
        visible_permuted = (cols >= ranges[..., 0]) & (cols < ranges[..., 1])  # (B, S, keys), permuted order
        order = self.key_order[:, None, :].expand_as(visible_permuted)
        visible = torch.empty_like(visible_permuted).scatter_(2, order, visible_permuted)
        mask = torch.zeros(visible.shape, dtype=dtype, device=visible.device)
        return mask.masked_fill_(~visible, torch.finfo(dtype).min)[:, None]


def mllama_cross_mask(compact: torch.Tensor, tokens_per_tile: int, dtype: torch.dtype):
    """``(MllamaCrossMask, "")`` from the compact mask ``(B, S, images, tiles)`` (nonzero =
    the token sees that tile), computed on the device with ONE host sync (is every row's
    tile set contiguous after the permutation, and is a permutation needed); ``(None,
    reason)`` when some row is not (the caller then runs transformers' dense path)."""
    batch, length, images, tiles = compact.shape
    device = compact.device
    sees = compact.to(torch.bool).reshape(batch, length, images * tiles)
    slots = images * tiles
    used = sees.any(1)  # (B, slots): some token sees this tile
    order = torch.sort((~used).to(torch.uint8), dim=1, stable=True).indices  # new position -> tile slot
    arange = torch.arange(slots, device=device)
    rank = torch.empty_like(order).scatter_(1, order, arange.expand(batch, slots))  # tile slot -> new position
    pos = rank[:, None, :].expand(batch, length, slots)
    count = sees.sum(-1)
    first = torch.where(sees, pos, slots).amin(-1)
    last = torch.where(sees, pos, -1).amax(-1)
    contiguous = ((count == 0) | (last - first + 1 == count)).all()
    permute = (order != arange).any()
    ok, needs_permutation = torch.stack([contiguous, permute]).tolist()  # the one host sync
    if not ok:
        return None, "a text token sees images that are not consecutive"
    seen = count > 0
    total = slots * tokens_per_tile
    start = torch.where(seen, first * tokens_per_tile, 0)
    end = torch.where(seen, (last + 1) * tokens_per_tile, total)
    kv_ranges = torch.stack([start, end], dim=-1).reshape(batch * length, 2).to(torch.int32)
    tokens = torch.arange(tokens_per_tile, device=device)
    key_order = (order[:, :, None] * tokens_per_tile + tokens).reshape(batch, total)
    row_mask = seen.to(dtype)[:, None, :, None]
    return MllamaCrossMask(kv_ranges, key_order, needs_permutation, row_mask, total), ""


def _mllama_cross_attention(mask: MllamaCrossMask, query, key, value, scaling):
    from mmkernels.ops import varlen_attention

    batch, heads, q_len, head_dim = query.shape
    k_len = key.shape[2]
    if k_len != mask.num_keys or mask.kv_ranges.shape[0] != batch * q_len:
        raise ValueError(
            f"mmkernels Mllama cross-attention: the compact mask describes {mask.num_keys} keys and "
            f"{mask.kv_ranges.shape[0]} query rows, the layer got {k_len} keys and {batch} x {q_len} queries"
        )
    if mask.permute:
        index = mask.key_order[:, None, :, None].expand(batch, key.shape[1], k_len, head_dim)
        key, value = key.gather(2, index), value.gather(2, index)
    device = query.device
    out = varlen_attention(
        _packed(query), _packed(key), _packed(value),
        _uniform_cu_seqlens(batch, q_len, device), _uniform_cu_seqlens(batch, k_len, device), q_len, k_len,
        softmax_scale=scaling, kv_ranges=mask.kv_ranges,
    )  # fmt: skip
    _route("varlen")
    return out.view(batch, q_len, heads, head_dim)


def _text_implementation(config) -> str | None:
    text = getattr(config, "text_config", None) or config
    return getattr(text, "_attn_implementation", None)


def _mllama_not_applicable(module: torch.nn.Module) -> list[str]:
    reasons = []
    if not isinstance(getattr(getattr(module, "vision_model", None), "num_patches", None), int):
        reasons.append("vision_model.num_patches is not an int")
    if _text_implementation(module.config) != ATTN_IMPLEMENTATION:
        reasons.append(
            f"the text model's attn_implementation is {_text_implementation(module.config)!r}: load the model "
            f"with attn_implementation={ATTN_IMPLEMENTATION!r} (after mmkernels.integrations.register_attention())"
        )
    return reasons


def _mllama_notes(module: torch.nn.Module) -> list[str]:
    return [backend_note(ATTENTION_CAPABILITIES, next(module.parameters())),
            "compact cross_attention_mask -> kv_ranges on the device; no dense 4-D mask"]  # fmt: skip


def _mllama_model_forward(self, *args, **kwargs):
    """``MllamaModel.forward``: converts the compact ``cross_attention_mask`` into a
    :class:`MllamaCrossMask` on the device and calls the original forward WITHOUT the
    compact mask (so the dense 4-D mask is never built), handing the converted mask to the
    text model through a keyword the text model's replacement (:func:`_mllama_text_forward`)
    takes out again. Runs the original, dense path when: no compact mask, a mask that does
    not match the tokens (a plain forward with a cache and the whole mask), the text model
    not on the ``"mmkernels"`` attention implementation, or a token that sees
    non-consecutive images (logged)."""
    original = original_method(self, "forward")
    if torch.compiler.is_compiling():  # the conversion's verdict is a host sync: the dense path
        return original(*args, **kwargs)
    call = bind_call(original, args, kwargs)
    if call is None:
        return original(*args, **kwargs)
    named = call.named
    compact = named.get("cross_attention_mask")
    ids = named.get("input_ids")
    embeds = named.get("inputs_embeds")
    tokens = ids if ids is not None else embeds
    covered = (
        isinstance(compact, torch.Tensor) and compact.dim() == 4 and tokens is not None
        and _text_implementation(self.config) == ATTN_IMPLEMENTATION
        and _CROSS_MASK_KWARG not in call.extra
        and not _kernel_unavailable(compact.new_empty((), dtype=self.dtype))
    )  # fmt: skip
    if not covered:
        return original(*args, **kwargs)
    length = tokens.shape[1]
    if compact.shape[1] != length:
        # The whole mask with a cache (what generate passes on transformers <= 5.17, and a
        # plain forward may pass): the rows of the tokens being processed, as transformers
        # slices them (5.24: the compact mask; 5.17: the dense one).
        cache = named.get("cache", named.get("past_key_values"))
        past = int(cache.get_seq_length()) if cache is not None and hasattr(cache, "get_seq_length") else None
        if past is None or past + length > compact.shape[1]:
            return original(*args, **kwargs)
        compact = compact[:, past : past + length]
    mask, why = mllama_cross_mask(compact, self.vision_model.num_patches, self.dtype)
    if mask is None:
        _fallback_reason(why)
        return original(*args, **kwargs)
    named = dict(named, cross_attention_mask=None)
    return original(**named, **call.extra, **{_CROSS_MASK_KWARG: mask})


def _mllama_text_forward(self, *args, **kwargs):
    """``MllamaTextModel.forward``: takes the :class:`MllamaCrossMask` that the patched
    ``MllamaModel.forward`` passes and gives it to the decoder layers as their
    ``cross_attention_mask`` (which they hand, untouched, to the attention function) and
    its ``row_mask`` as ``full_text_row_masked_out_mask``. Any other call: the original."""
    original = original_method(self, "forward")
    mask = kwargs.pop(_CROSS_MASK_KWARG, None)
    if mask is None:
        return original(*args, **kwargs)
    if kwargs.get("cross_attention_mask") is not None or kwargs.get("full_text_row_masked_out_mask") is not None:
        raise ValueError("mmkernels Mllama: a converted cross-attention mask and a dense one were both given")
    kwargs["cross_attention_mask"] = mask
    kwargs["full_text_row_masked_out_mask"] = mask.row_mask
    return original(*args, **kwargs)


# --------------------------------------------------------------------------------------
# The specs and the rule


def _no_reasons(module: torch.nn.Module) -> list[str]:
    return []


def _no_notes(module: torch.nn.Module) -> list[str]:
    return []


@dataclasses.dataclass(frozen=True)
class AttentionRoute:
    """How one kind of attention layer reaches the op: the replacement of the covered
    class's ``forward``, why an instance cannot take it (beyond having a ``forward``), the
    report's notes, and the coverage table's features cell."""

    name: str
    forward: Callable
    not_applicable: Callable[[torch.nn.Module], list[str]]
    notes: Callable[[torch.nn.Module], list[str]]
    features: str


# Vision towers that call their attention layer with cu_seqlens (Qwen2-VL's layer: qkv, or
# q, k and v, the module's apply_rotary_pos_emb_vision, attention per image, proj).
CU_SEQLENS = AttentionRoute("cu_seqlens", _cu_seqlens_attention_forward, _cu_seqlens_not_applicable,
                            _cu_seqlens_notes, "cu_seqlens (and Qwen2.5-VL's cu_window_seqlens)")  # fmt: skip
# The same layer with per-head q_norm / k_norm before the rotary embedding.
CU_SEQLENS_QK_NORM = AttentionRoute("cu_seqlens, q/k norm", _cu_seqlens_qk_norm_attention_forward,
                                    _cu_seqlens_qk_norm_not_applicable, _cu_seqlens_notes,
                                    "cu_seqlens, q_norm / k_norm")  # fmt: skip
MLLAMA_COMPACT_MASK = AttentionRoute("Mllama compact mask", _mllama_model_forward, _mllama_not_applicable,
                                     _mllama_notes, "cross_attention_mask (B, S, images, tiles)")  # fmt: skip
MLLAMA_TEXT_MASK = AttentionRoute("Mllama converted mask", _mllama_text_forward, _no_reasons, _no_notes,
                                  "the converted cross-attention mask")  # fmt: skip


@dataclasses.dataclass(frozen=True)
class AttentionSpec:
    """One attention patch as data: the class it covers (within its governing
    ``config.model_type``) and the :class:`AttentionRoute` its ``forward`` takes."""

    family: str
    model_type: str
    model_class: str
    route: AttentionRoute


class AttentionRule(SpecRule):
    """The attention patch of one :class:`AttentionSpec`: replaces the covered module's
    ``forward`` on the live instance with its route's."""

    kernel = ATTENTION_KERNEL
    method = "forward"
    op = f"mmkernels.ops.{ATTENTION_OP}"

    def not_applicable_reasons(self, module: torch.nn.Module) -> list[str]:
        return super().not_applicable_reasons(module) + self.spec.route.not_applicable(module)

    def notes(self, module: torch.nn.Module, options: PatchOptions) -> list[str]:
        return self.spec.route.notes(module)

    def make_replacement(self, options: PatchOptions) -> Callable:
        return self.spec.route.forward

    def coverage_row(self) -> dict[str, str]:
        row = super().coverage_row()
        row["features"] = self.spec.route.features
        return row


ATTENTION_SPECS: tuple[AttentionSpec, ...] = (
    *(
        AttentionSpec(family, model_type, model_class, CU_SEQLENS)
        for family, model_type, model_class in (
            ("Qwen2-VL", "qwen2_vl_vision", "VisionAttention"),
            ("Qwen2.5-VL", "qwen2_5_vl_vision", "Qwen2_5_VLVisionAttention"),
            # The towers that kept Qwen2-VL's attention layer (read against transformers 5.25).
            ("Qwen3-VL", "qwen3_vl_vision", "Qwen3VLVisionAttention"),
            ("Qwen3-VL-MoE", "qwen3_vl_moe_vision", "Qwen3VLMoeVisionAttention"),
            ("Qwen3.5", "qwen3_5_vision", "Qwen3_5VisionAttention"),
            ("Qwen3.5-MoE", "qwen3_5_moe_vision", "Qwen3_5MoeVisionAttention"),
            ("Qwen2.5-Omni", "qwen2_5_omni_vision_encoder", "Qwen2_5OmniVisionAttention"),  # q, k, v apart
            ("Qwen3-Omni-MoE", "qwen3_omni_moe_vision_encoder", "Qwen3OmniMoeVisionAttention"),
            ("GLM-4.1V", "glm4v_vision", "Glm4vVisionAttention"),
            ("GLM-4.5V", "glm4v_moe_vision", "Glm4vMoeVisionAttention"),
            ("ERNIE 4.5 VL MoE", "ernie4_5_vl_moe_vision", "Ernie4_5_VLMoeVisionAttention"),
            ("LLaVA-OneVision-1.5", "llava_onevision1_5_vision", "LlavaOnevision15VisionAttention"),
        )
    ),
    AttentionSpec("GLM-OCR", "glm_ocr_vision", "GlmOcrVisionAttention", CU_SEQLENS_QK_NORM),
    AttentionSpec("Mllama", "mllama", "MllamaModel", MLLAMA_COMPACT_MASK),
    AttentionSpec("Mllama", "mllama_text_model", "MllamaTextModel", MLLAMA_TEXT_MASK),
)

ATTENTION_RULES: tuple[Rule, ...] = tuple(AttentionRule(spec) for spec in ATTENTION_SPECS)
