"""Tiny random-init models of transformers VLMs that no merge spec names, for the generic
merge rule's tests: real transformers classes from configs (no download, no processor).

Each builder returns ``(model, inputs)``: the ``*ForConditionalGeneration`` in eval mode and
a batch whose placeholder counts are what the model's own ``get_image_features`` produces
for its pixels (asked once, so no builder restates a family's token arithmetic).
"""

from __future__ import annotations

from typing import Callable

import pytest
import torch

VOCAB = 256
PLACEHOLDER = {"image": 250, "video": 251, "audio": 252}
TEXT = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
            num_key_value_heads=1, head_dim=32, max_position_embeddings=512, pad_token_id=0)  # fmt: skip
VIT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)


def _config(name: str, **kwargs):
    import transformers

    if not hasattr(transformers, name):
        pytest.skip(f"transformers {transformers.__version__} has no {name}")
    return getattr(transformers, name)(**kwargs)


def _model(class_name: str, config, seed: int):
    import transformers

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return getattr(transformers, class_name)(config).eval()


def _prompts(rows_per_item: list[int], kind: str = "image") -> torch.Tensor:
    """One prompt per media item: text, the item's placeholders, text (equal lengths)."""
    longest = max(rows_per_item)
    ids = []
    for i, rows in enumerate(rows_per_item):
        pad = longest - rows
        ids.append([0] * pad + [1, 5 + i, 7] + [PLACEHOLDER[kind]] * rows + [9, 11, 13])
    return torch.tensor(ids)


def _attention_mask(ids: torch.Tensor) -> torch.Tensor:
    return (ids != 0).long()


def _rows(inner, method: str, *args, **kwargs) -> list[int]:
    out = getattr(inner, method)(*args, return_dict=True, **kwargs).pooler_output
    if isinstance(out, (list, tuple)):
        return [t.reshape(-1, t.shape[-1]).shape[0] for t in out]
    return [out.shape[1]] * out.shape[0] if out.dim() == 3 else [out.shape[0]]


def internvl(seed: int = 0):
    vision = _config("InternVLVisionConfig", image_size=[56, 56], patch_size=[14, 14], **VIT)
    config = _config("InternVLConfig", vision_config=vision, text_config=_config("Qwen2Config", **TEXT),
                     image_token_id=PLACEHOLDER["image"], downsample_ratio=0.5)  # fmt: skip
    model = _model("InternVLForConditionalGeneration", config, seed)
    pixels = torch.randn(2, 3, 56, 56, generator=torch.Generator().manual_seed(seed))
    rows = _rows(model.model, "get_image_features", pixel_values=pixels)
    rows = [sum(rows) // 2] * 2  # one image per prompt
    ids = _prompts(rows)
    return model, {"input_ids": ids, "attention_mask": _attention_mask(ids), "pixel_values": pixels}


def mistral3(seed: int = 0):
    vision = _config("PixtralVisionConfig", image_size=56, patch_size=14, head_dim=16, **VIT)
    config = _config("Mistral3Config", vision_config=vision, text_config=_config("MistralConfig", **TEXT),
                     image_token_index=PLACEHOLDER["image"], spatial_merge_size=2, vision_feature_layer=-1)  # fmt: skip
    model = _model("Mistral3ForConditionalGeneration", config, seed)
    pixels = torch.randn(2, 3, 56, 56, generator=torch.Generator().manual_seed(seed))
    sizes = torch.tensor([[56, 56], [56, 56]])
    rows = _rows(model.model, "get_image_features", pixel_values=pixels, image_sizes=sizes)
    ids = _prompts(rows)
    return model, {"input_ids": ids, "attention_mask": _attention_mask(ids), "pixel_values": pixels,
                   "image_sizes": sizes}  # fmt: skip


def aya_vision(seed: int = 0):
    vision = _config("SiglipVisionConfig", image_size=56, patch_size=14, **VIT)
    config = _config("AyaVisionConfig", vision_config=vision, text_config=_config("Cohere2Config", **TEXT),
                     image_token_index=PLACEHOLDER["image"], downsample_factor=2, adapter_layer_norm_eps=1e-5)  # fmt: skip
    model = _model("AyaVisionForConditionalGeneration", config, seed)
    pixels = torch.randn(2, 3, 56, 56, generator=torch.Generator().manual_seed(seed))
    rows = _rows(model.model, "get_image_features", pixel_values=pixels, vision_feature_layer=-1,
                 vision_feature_select_strategy="full")  # fmt: skip
    ids = _prompts(rows)
    return model, {"input_ids": ids, "attention_mask": _attention_mask(ids), "pixel_values": pixels}


def cohere2_vision(seed: int = 0):
    vision = _config("SiglipVisionConfig", image_size=56, patch_size=14, **VIT)
    config = _config("Cohere2VisionConfig", vision_config=vision, text_config=_config("Cohere2Config", **TEXT),
                     image_token_id=PLACEHOLDER["image"], downsample_factor=2)  # fmt: skip
    model = _model("Cohere2VisionForConditionalGeneration", config, seed)
    pixels = torch.randn(2, 3, 56, 56, generator=torch.Generator().manual_seed(seed))
    rows = _rows(model.model, "get_image_features", pixel_values=pixels)
    ids = _prompts(rows)
    return model, {"input_ids": ids, "attention_mask": _attention_mask(ids), "pixel_values": pixels}


def qwen3_5(seed: int = 0):
    vision = _config("Qwen3_5VisionConfig", depth=1, hidden_size=32, intermediate_size=64, num_heads=2,
                     out_hidden_size=64, patch_size=14, temporal_patch_size=2, spatial_merge_size=2,
                     num_position_embeddings=16)  # fmt: skip
    text = _config("Qwen3_5TextConfig", **{**TEXT, "num_hidden_layers": 2},
                   layer_types=["linear_attention", "full_attention"], linear_num_key_heads=2,
                   linear_num_value_heads=2, linear_key_head_dim=16, linear_value_head_dim=16,
                   rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [4, 6, 6],
                                    "mrope_interleaved": True, "partial_rotary_factor": 1.0})  # fmt: skip
    config = _config("Qwen3_5Config", vision_config=vision, text_config=text, image_token_id=PLACEHOLDER["image"],
                     video_token_id=PLACEHOLDER["video"], vision_start_token_id=248, vision_end_token_id=249)  # fmt: skip
    model = _model("Qwen3_5ForConditionalGeneration", config, seed)
    grid = torch.tensor([[1, 4, 4], [1, 4, 6]])  # (t, h, w) patches per image
    patches = torch.randn(int(grid.prod(-1).sum()), 3 * 2 * 14 * 14, generator=torch.Generator().manual_seed(seed))
    rows = [int(n) // 4 for n in grid.prod(-1)]  # 2x2 spatial merge
    longest = max(rows)
    ids = torch.tensor([[0] * (longest - n) + [1, 5, 248] + [PLACEHOLDER["image"]] * n + [249, 9, 11]
                        for n in rows])  # fmt: skip
    # What the processor returns beside input_ids for M-RoPE: 1 at image tokens.
    token_types = (ids == PLACEHOLDER["image"]).int()
    return model, {"input_ids": ids, "attention_mask": _attention_mask(ids), "pixel_values": patches,
                   "image_grid_thw": grid, "mm_token_type_ids": token_types}  # fmt: skip


BUILDERS: dict[str, Callable] = {
    "internvl": internvl,
    "mistral3": mistral3,
    "aya_vision": aya_vision,
    "cohere2_vision": cohere2_vision,
    "qwen3_5": qwen3_5,
}
