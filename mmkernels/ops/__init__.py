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
    "OP_MODULES",
    "PlaceholderCountError",
    "aot_cases",
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

# The op modules: one line per op (see docs/extending.md).
OP_MODULES = ("merge", "patch_embed", "quantized_linear", "varlen_attention")


def aot_cases():
    """Every op's ahead-of-time compile cases (``tools/kernel_report.py``), made now: each
    op module's ``aot_cases()``, then any added with :func:`mmkernels.backend.register_aot`.
    Names are unique."""
    import importlib

    from mmkernels import backend

    # By module path: this package's names patch_embed, quantized_linear and
    # varlen_attention are the op functions, not their modules.
    modules = [importlib.import_module(f"mmkernels.ops.{name}") for name in OP_MODULES]
    cases: dict[str, backend.AotCase] = {}
    for case in [*(c for m in modules for c in m.aot_cases()), *backend.registered_aot_cases()]:
        if case.name in cases:
            raise ValueError(f"AOT case {case.name!r} is defined twice")
        cases[case.name] = case
    return list(cases.values())
