"""The vLLM plugin's ``patch_embed`` adapter: vLLM's conv layers with kernel == stride (read against vLLM 0.32).

``CustomOp.register_oot`` of subclasses of ``Conv2dLayer`` and ``Conv3dLayer`` (keyed by
the in-tree class name; registration is guarded, vLLM asserts on a duplicate:
:func:`.plugin.register_oot`). ``enabled()`` is true and ``forward_cuda`` /
``forward_cpu`` run :func:`mmkernels.ops.patch_embed` for convolutions with kernel ==
stride, square spatial patches, no padding, dilation 1, groups 1; for ``Conv3dLayer``
only inputs that are exactly one patch each (Qwen2-VL's pre-flattened ``(L, C, T, P,
P)``). Anything else runs vLLM's own forward (the first call per reason is logged,
:func:`.plugin.fallthrough`).

Registered by the plugin (:mod:`.plugin`, kernel name ``patch_embed``); vLLM is imported
only inside the functions.
"""

from __future__ import annotations

import torch

from mmkernels.integrations.vllm.plugin import fallthrough, record, register_oot

__all__ = ["register"]


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
        fallthrough("patch_embed", reason, where)
        return None
    from mmkernels.ops.patch_embed import OP_NAME, patch_embed

    p = layer.kernel_size[0]
    b, _, h, w = x.shape
    rows = patch_embed(x, layer.weight, layer.bias)  # (B, N, D)
    record("patch_embed", OP_NAME, where)
    # Conv2d's (B, D, H/P, W/P) as a view, the layout vLLM's own matmul path returns.
    return rows.transpose(1, 2).unflatten(2, (h // p, w // p))


def _patch_embed_conv3d(layer, x: torch.Tensor) -> torch.Tensor | None:
    where = type(layer).name
    reason = _conv_input_reason(layer, x, 5, one_patch=True)
    if reason is not None:
        fallthrough("patch_embed", reason, where)
        return None
    from mmkernels.ops.patch_embed import OP_NAME, patch_embed

    n = x.shape[0]
    rows = patch_embed(x.reshape(n, -1), layer.weight, layer.bias)  # (L, D)
    record("patch_embed", OP_NAME, where)
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


def register() -> str:
    """Register the subclasses of ``Conv2dLayer`` and ``Conv3dLayer``; returns the summary
    for the plugin's log line."""
    from vllm.model_executor.layers.conv import Conv2dLayer, Conv3dLayer

    names = [
        register_oot(Conv2dLayer, _conv_subclass(Conv2dLayer, _patch_embed_conv2d)),
        register_oot(Conv3dLayer, _conv_subclass(Conv3dLayer, _patch_embed_conv3d)),
    ]
    return f"patch_embed -> {', '.join(names)} (kernel == stride)"
