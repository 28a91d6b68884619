"""Probe the plugin inside one fresh process (vLLM state is per process); prints JSON.

    python tests_vllm/plugin_probe.py MODE        MODE: full | registry

The environment (MMKERNELS_*, TRITON_INTERPRET) is set by the caller. ``full`` also runs
the replaced layers and the merge against vLLM's own code.
"""

from __future__ import annotations

import json
import sys


def registry_facts(plugin) -> dict:
    from vllm import ModelRegistry
    from vllm.model_executor.custom_op import op_registry_oot

    returned = plugin.register()
    returned_again = plugin.register()  # idempotent: no second registration, no second line
    llava = ModelRegistry._try_load_model_cls("LlavaForConditionalGeneration")
    return {
        "returned": returned,
        "returned_again": returned_again,
        "oot": {k: f"{v.__module__}.{v.__qualname__}" for k, v in op_registry_oot.items()},
        "llava_class": f"{llava.__module__}.{llava.__qualname__}",
    }


def full_facts(plugin) -> dict:
    import torch
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.model_executor.layers.conv import Conv2dLayer, Conv3dLayer
    from vllm.model_executor.models import utils as vllm_utils
    from vllm.model_executor.models.interfaces import SupportsMultiModal

    facts = registry_facts(plugin)
    facts["register_again"] = plugin._register_patch_embed()  # guarded: vLLM would assert
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

    # The merge: against vLLM's own _merge_multimodal_embeddings, nested features of
    # several images (3-D and 2-D), a mask with several runs.
    dim, tokens = 48, 40
    mask = torch.zeros(tokens, dtype=torch.bool)
    mask[3:9] = True
    mask[15:23] = True
    mask[30:34] = True
    feats = [torch.randn(2, 3, dim), [torch.randn(8, dim), torch.randn(4, dim)]]
    embeds = torch.randn(tokens, dim)
    want = vllm_utils._merge_multimodal_embeddings(embeds.clone(), feats, mask)
    got = plugin._merge(embeds.clone(), feats, mask, "probe")
    facts["merge_equal"] = bool(torch.equal(got, want))
    errors = []
    for fn in (vllm_utils._merge_multimodal_embeddings, lambda *a: plugin._merge(*a, "probe")):
        try:
            fn(embeds.clone(), [torch.randn(5, dim)], mask)
        except ValueError as e:
            errors.append(str(e))
    facts["merge_errors"] = errors
    cls = plugin._merge_model_class("LlavaForConditionalGeneration")
    base = cls.__mro__[1]
    facts["merge_class"] = {
        "name": cls.__name__,
        "subclass_of": f"{base.__module__}.{base.__qualname__}",
        "methods": sorted(k for k, v in vars(cls).items() if callable(v) and not k.startswith("__")),
        "base_uses_default": base.embed_input_ids is SupportsMultiModal.embed_input_ids,
    }
    facts["qwen3_vl_default_merge"] = plugin._uses_default_merge(
        __import__("vllm.model_executor.models.qwen3_vl", fromlist=["x"]).Qwen3VLForConditionalGeneration
    )
    facts["llava_next_default_merge"] = plugin._uses_default_merge(
        __import__("vllm.model_executor.models.llava_next", fromlist=["x"]).LlavaNextForConditionalGeneration
    )
    # Every listed architecture exists in this vLLM and still merges the default way.
    facts["all_architectures"] = {
        arch: plugin._merge_model_class(arch).__module__ == plugin.__name__ for arch in plugin.MERGE_ARCHITECTURES
    }
    facts["stats"] = {f"{k[0]}/{k[1]}": v for k, v in plugin.stats().items()}
    return facts


if __name__ == "__main__":
    from mmkernels.integrations import vllm_plugin

    mode = sys.argv[1]
    facts = full_facts(vllm_plugin) if mode == "full" else registry_facts(vllm_plugin)
    print("PROBE " + json.dumps(facts))
