"""mmkernels' ops. Each has a PyTorch reference of the same signature beside it, declared
capabilities, and a ``torch.library`` registration under ``mmkernels::``."""

from mmkernels.ops.merge import (
    PlaceholderCountError,
    merge_multimodal_embeddings,
    merge_multimodal_embeddings_reference,
)
from mmkernels.ops.patch_embed import patch_embed, patch_embed_reference, pixel_norm_table
from mmkernels.ops.quantized_linear import quantized_linear, quantized_linear_reference
from mmkernels.ops.varlen_attention import varlen_attention, varlen_attention_reference

__all__ = [
    "PlaceholderCountError",
    "merge_multimodal_embeddings",
    "merge_multimodal_embeddings_reference",
    "patch_embed",
    "patch_embed_reference",
    "pixel_norm_table",
    "quantized_linear",
    "quantized_linear_reference",
    "varlen_attention",
    "varlen_attention_reference",
]
