"""The patch-embed kernel compiled on a GPU at real tower sizes (run by tools/gpu_suite.py)."""

from __future__ import annotations

import pytest
import torch

from mmkernels.backend import Backend, recent_decisions
from mmkernels.ops import patch_embed
from mmkernels.ops import patch_embed_reference as reference
from mmkernels.testing import assert_close, assert_deterministic, poison_outputs

pytestmark = pytest.mark.gpu
MEAN = torch.tensor([0.48145466, 0.4578275, 0.40821073])
STD = torch.tensor([0.26862954, 0.26130258, 0.27577711])


def compiled(*args, **kwargs):
    with poison_outputs():
        out = patch_embed(*args, **kwargs)
    assert recent_decisions()[-1].backend is Backend.TRITON
    assert not out.isnan().any()
    return out


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize(
    "batch,size,patch,dim,cls",
    [(8, 336, 14, 1024, True), (2, 384, 14, 1152, False), (4, 560, 14, 1280, True), (5, (337, 451), 14, 1280, True)],
    ids=["clip-l-336", "siglip-384", "mllama-tiles", "odd-337x451"],
)
def test_image_form_real_sizes(batch, size, patch, dim, cls, dtype):
    h, w = size if isinstance(size, tuple) else (size, size)
    n = (h // patch) * (w // patch)
    pixels = torch.randn(batch, 3, h, w, device="cuda")
    weight = (torch.randn(dim, 3, patch, patch, device="cuda") * 0.02).to(dtype)
    bias = None if cls else torch.randn(dim, device="cuda").to(dtype)
    cls_emb = torch.randn(dim, device="cuda").to(dtype) if cls else None
    pos = torch.randn(n + cls, dim, device="cuda").to(dtype)
    out = compiled(pixels, weight, bias, class_embedding=cls_emb, position_embedding=pos)
    ref = reference(pixels.double(), weight.double(), None if bias is None else bias.double(),
                    class_embedding=None if cls_emb is None else cls_emb.double(), position_embedding=pos.double())
    # fp32 may run TF32 where torch allows it for convolutions (cudnn.allow_tf32).
    assert_close(out, ref, dtype=torch.float16 if dtype == torch.float32 else dtype)


def test_uint8_and_qwen2_vl_forms():
    pixels = torch.randint(0, 256, (8, 3, 336, 336), dtype=torch.uint8, device="cuda")
    weight = (torch.randn(1024, 3, 14, 14, device="cuda") * 0.02).to(torch.bfloat16)
    kw = dict(pixel_mean=MEAN.cuda(), pixel_std=STD.cuda(), pixel_scale=1 / 255)
    out = assert_deterministic(lambda: compiled(pixels, weight, **kw))
    assert_close(out, reference(pixels, weight.double(), **kw), dtype=torch.bfloat16)
    flat = torch.randn(4096, 1176, device="cuda")
    w3 = (torch.randn(1280, 3, 2, 14, 14, device="cuda") * 0.02).to(torch.bfloat16)
    assert_close(compiled(flat, w3), reference(flat, w3.double()), dtype=torch.bfloat16)


@pytest.mark.parametrize("a_source", ["packed", "gather", "row_steps"])
def test_every_a_source_compiled(a_source, monkeypatch):
    """The three A sources (EmbedConfig.a_source) on CLIP-L/14-336 x 8 from float32 pixels:
    what the GPU probe times against each other must first be right."""
    import dataclasses
    import importlib

    module = importlib.import_module("mmkernels.ops.patch_embed")
    original = module.embed_config
    monkeypatch.setattr(module, "embed_config", lambda *a, **k: dataclasses.replace(original(*a, **k), a_source=a_source))
    pixels = torch.randn(8, 3, 336, 336, device="cuda")
    weight = (torch.randn(1024, 3, 14, 14, device="cuda") * 0.02).to(torch.bfloat16)
    cls_emb = torch.randn(1024, device="cuda").to(torch.bfloat16)
    pos = torch.randn(577, 1024, device="cuda").to(torch.bfloat16)
    out = compiled(pixels, weight, class_embedding=cls_emb, position_embedding=pos)
    ref = reference(pixels.double(), weight.double(), class_embedding=cls_emb.double(), position_embedding=pos.double())
    assert_close(out, ref, dtype=torch.bfloat16)
