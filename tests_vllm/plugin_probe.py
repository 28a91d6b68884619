"""Probe the plugin inside one fresh process (vLLM state is per process); prints JSON.

    python tests_vllm/plugin_probe.py MODE        MODE: full | encoder_attention | registry

The environment (MMKERNELS_*, TRITON_INTERPRET) is set by the caller. ``full`` also runs
the replaced conv layers and the merge against vLLM's own code, ``encoder_attention``
the replaced ``MMEncoderAttention``.
"""

from __future__ import annotations

import json
import sys


def registry_facts(plugin) -> dict:
    from vllm import ModelRegistry
    from vllm.model_executor.custom_op import op_registry_oot
    from vllm.model_executor.layers.quantization import QUANTIZATION_METHODS

    import importlib

    # A model module imported before the plugin ran holds vLLM's function by name: the
    # plugin rebinds it. Modules imported after bind the replacement themselves.
    early = importlib.import_module("vllm.model_executor.models.molmo2")
    returned = plugin.register()
    returned_again = plugin.register()  # idempotent: no second registration, no second line
    llava = ModelRegistry._try_load_model_cls("LlavaForConditionalGeneration")
    attn = encoder_attention_layers()["packed"]  # what a vision tower's constructor gets
    utils = importlib.import_module("vllm.model_executor.models.utils")
    late = {name: importlib.import_module(f"vllm.model_executor.models.{name}") for name in ("qwen3_vl", "qwen3_5")}
    onevision2 = importlib.import_module("vllm.model_executor.models.llava_onevision2")

    def ours(fn) -> bool:
        return getattr(fn, "mmkernels_replaces", None) is not None

    return {
        "returned": returned,
        "returned_again": returned_again,
        "oot": {k: f"{v.__module__}.{v.__qualname__}" for k, v in op_registry_oot.items()},
        "llava_class": f"{llava.__module__}.{llava.__qualname__}",
        "shared_merge": {
            "utils": ours(utils._merge_multimodal_embeddings),
            "molmo2 (imported before)": ours(early._merge_multimodal_embeddings),
            **{f"{name} (imported after)": ours(m._merge_multimodal_embeddings) for name, m in late.items()},
            "llava_onevision2 (alias)": ours(onevision2.merge_multimodal_embeddings),
        },
        "encoder_attention_class": f"{type(attn).__module__}.{type(attn).__qualname__}",
        "quantization_methods": sorted(m for m in QUANTIZATION_METHODS if m.startswith("mmkernels")),
    }


def encoder_attention_layers() -> dict:
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.model_executor.layers.attention.mm_encoder_attention import MMEncoderAttention

    with set_current_vllm_config(VllmConfig()):
        return {
            "packed": MMEncoderAttention(4, 16),
            "gqa": MMEncoderAttention(4, 24, scale=0.3, num_kv_heads=2),
            "head_288": MMEncoderAttention(2, 288),  # over the op's 256: vLLM's path
        }


def encoder_attention_runs(plugin) -> dict:
    """MMEncoderAttention against vLLM's own forward_native (SDPA per cu_seqlens chunk),
    in the layouts vision towers call it with."""
    import torch
    from vllm.model_executor.layers.attention.mm_encoder_attention import MMEncoderAttention

    layers = encoder_attention_layers()
    lengths = [1, 13, 7, 64, 3]  # several sequences, one longer than a 32-row block
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    total = int(cu[-1])

    def qkv(b, s, h, hkv, d, kv_len=None, flat=False):
        kv_len = s if kv_len is None else kv_len
        q, k, v = torch.randn(b, s, h, d), torch.randn(b, kv_len, hkv, d), torch.randn(b, kv_len, hkv, d)
        return (q.flatten(2), k.flatten(2), v.flatten(2)) if flat else (q, k, v)

    torch.manual_seed(0)
    cases = {
        # Qwen2-VL's call: (1, S, H, D), cu_seqlens (host), max_seqlen None (vLLM's SDPA backend)
        "packed_cu_seqlens": ("packed", qkv(1, total, 4, 4, 16), {"cu_seqlens": cu}),
        "gqa_cu_seqlens": ("gqa", qkv(1, total, 4, 2, 24), {"cu_seqlens": cu}),
        # Qwen2.5-VL's call on a backend vLLM computes no max_seqlen for: a placeholder 0
        "max_seqlen_placeholder": ("packed", qkv(1, total, 4, 4, 16), {"cu_seqlens": cu, "max_seqlen": torch.tensor(0)}),
        # CLIP's / SigLIP's call: (B, S, H * D), no cu_seqlens: every row one sequence
        "batched_flat": ("packed", qkv(3, 9, 4, 4, 16, flat=True), {}),
        "batched_cross": ("gqa", qkv(2, 5, 4, 2, 24, kv_len=11), {}),
        # not covered: vLLM's own path
        "head_288": ("head_288", qkv(1, 10, 2, 2, 288), {"cu_seqlens": torch.tensor([0, 4, 10], dtype=torch.int32)}),
        "cu_seqlens_batch_2": ("packed", qkv(2, 6, 4, 4, 16), {"cu_seqlens": torch.tensor([0, 2, 6], dtype=torch.int32)}),
    }
    runs = {}
    for name, (layer_name, (q, k, v), kwargs) in cases.items():
        layer = layers[layer_name]
        want = MMEncoderAttention.forward_native(layer, q, k, v, **kwargs)
        before = dict(plugin.stats())
        got = layer(q, k, v, **kwargs)
        after = plugin.stats()
        runs[name] = {
            "shape": list(got.shape),
            "ref_shape": list(want.shape),
            "rel_err": float((got.double() - want.double()).norm() / want.double().norm()),
            "counted": sorted(f"{k[0]}/{k[1]}" for k in after if after[k] != before.get(k, 0)),
        }
    return runs


def max_seqlen_facts(adapter) -> dict:
    """The launch's max_seqlen from what vision towers pass (cu_seqlens on the host, or on
    a device: "meta" here), per attention backend."""
    import types

    import torch
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    sdpa = types.SimpleNamespace(attn_backend=AttentionBackendEnum.TORCH_SDPA)
    flash = types.SimpleNamespace(attn_backend=AttentionBackendEnum.FLASH_ATTN)
    cu = torch.tensor([0, 5, 69, 70], dtype=torch.int32)
    return {
        "host_cu_seqlens": adapter._max_seqlen(sdpa, cu, torch.tensor(0), 70),
        "device_sdpa_placeholder": adapter._max_seqlen(sdpa, cu.to("meta"), torch.tensor(0), 70),
        "device_sdpa_none": adapter._max_seqlen(sdpa, cu.to("meta"), None, 70),
        "device_flash_host_scalar": adapter._max_seqlen(flash, cu.to("meta"), torch.tensor(64), 70),
        "device_flash_int": adapter._max_seqlen(flash, cu.to("meta"), 64, 70),
    }


def full_facts(plugin) -> dict:
    import torch
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.model_executor.layers.conv import Conv2dLayer, Conv3dLayer
    from vllm.model_executor.models import utils as vllm_utils

    from mmkernels.integrations.vllm import merge as merge_adapter
    from mmkernels.integrations.vllm import patch_embed as patch_embed_adapter

    facts = registry_facts(plugin)
    facts["register_again"] = patch_embed_adapter.register()  # guarded: vLLM would assert
    torch.manual_seed(0)
    with set_current_vllm_config(VllmConfig()):
        layers = {
            "conv2d_patch": Conv2dLayer(3, 24, kernel_size=7, stride=7),
            "conv2d_strided": Conv2dLayer(3, 24, kernel_size=4, stride=2),
            "conv3d_patch": Conv3dLayer(3, 40, kernel_size=(2, 7, 7), stride=(2, 7, 7), bias=False),
        }
    inputs = {
        "conv2d_patch": torch.randn(2, 3, 29, 22),  # 4x3 patches, ragged edges dropped
        "conv2d_strided": torch.randn(1, 3, 12, 12),
        "conv3d_patch": torch.randn(11, 3, 2, 7, 7),  # Qwen2-VL's pre-flattened patches
        "conv3d_video": torch.randn(1, 3, 4, 14, 14),  # not one patch per row: vLLM's path
    }
    runs = {}
    for name, x in inputs.items():
        layer = layers["conv3d_patch" if name.startswith("conv3d") else name]
        for p in layer.parameters():
            torch.nn.init.normal_(p)
        conv = torch.nn.functional.conv3d if x.dim() == 5 else torch.nn.functional.conv2d
        ref = conv(x.double(), layer.weight.double(), None if layer.bias is None else layer.bias.double(),
                   stride=layer.stride)  # fmt: skip
        before = dict(plugin.stats())
        out = layer(x)
        after = plugin.stats()
        runs[name] = {
            "class": type(layer).__name__,
            "shape": list(out.shape),
            "ref_shape": list(ref.shape),
            "rel_err": float((out.double() - ref).norm() / ref.norm()),
            "counted": sorted(f"{k[0]}/{k[1]}" for k in after if after[k] != before.get(k, 0)),
        }
    facts["layers"] = runs

    # The merge: against vLLM's own _merge_multimodal_embeddings (which the plugin keeps as
    # its fall-through), nested features of several images (3-D and 2-D), a mask with
    # several runs; first through the replaced shared function, as a model's
    # embed_input_ids calls it (its class names the call in the log), then directly.
    shared = vllm_utils._merge_multimodal_embeddings
    vllm_merge = shared.mmkernels_replaces
    dim, tokens = 48, 40
    mask = torch.zeros(tokens, dtype=torch.bool)
    mask[3:9] = True
    mask[15:23] = True
    mask[30:34] = True
    feats = [torch.randn(2, 3, dim), [torch.randn(8, dim), torch.randn(4, dim)]]
    embeds = torch.randn(tokens, dim)
    want = vllm_merge(embeds.clone(), feats, mask)

    class ProbeModel:
        def embed_input_ids(self, embeds, feats, mask):
            return vllm_utils._merge_multimodal_embeddings(embeds, feats, mask)

    facts["shared_merge_equal"] = bool(torch.equal(ProbeModel().embed_input_ids(embeds.clone(), feats, mask), want))
    got = merge_adapter._merge(embeds.clone(), feats, mask, "probe")
    facts["merge_equal"] = bool(torch.equal(got, want))
    errors = []
    for fn in (vllm_merge, lambda *a: merge_adapter._merge(*a, "probe")):
        try:
            fn(embeds.clone(), [torch.randn(5, dim)], mask)
        except ValueError as e:
            errors.append(str(e))
    facts["merge_errors"] = errors
    facts["stats"] = {f"{k[0]}/{k[1]}": v for k, v in plugin.stats().items()}
    return facts


if __name__ == "__main__":
    from mmkernels.integrations.vllm import plugin as vllm_plugin

    mode = sys.argv[1]
    if mode == "full":
        facts = full_facts(vllm_plugin)
    elif mode == "encoder_attention":
        from mmkernels.integrations.vllm import encoder_attention as encoder_attention_adapter

        facts = {
            **registry_facts(vllm_plugin),
            "encoder_attention": encoder_attention_runs(vllm_plugin),
            "max_seqlen": max_seqlen_facts(encoder_attention_adapter),
        }
    else:
        facts = registry_facts(vllm_plugin)
    print("PROBE " + json.dumps(facts))
