"""Fused patch embedding: the Triton kernel (interpreter) against the float64 reference,
the reference against plain Conv2d/Conv3d modules, bad inputs, torch.compile."""

from __future__ import annotations

import pytest
import torch

from mmkernels.backend import Backend, recent_decisions
from mmkernels.ops import patch_embed
from mmkernels.ops import patch_embed_reference as reference
from mmkernels.testing import assert_close, assert_deterministic, nan_padded, poison_outputs

CLIP_MEAN = torch.tensor([0.48145466, 0.4578275, 0.40821073])
CLIP_STD = torch.tensor([0.26862954, 0.26130258, 0.27577711])


def run_kernel(*args, **kwargs):
    with poison_outputs():
        out = patch_embed(*args, **kwargs)
    decision = recent_decisions()[-1]
    assert decision.backend is Backend.INTERPRETER, decision
    assert not out.isnan().any()
    return out


def f64(t):
    return None if t is None else t.double()


def check(out, pixels, weight, bias=None, **kw):
    ref = reference(pixels, weight.double(), f64(bias), **{k: f64(v) if k in ("class_embedding", "position_embedding") else v for k, v in kw.items()})
    assert_close(out, ref, dtype=weight.dtype)


@pytest.fixture(params=["packed", "gather", "row_steps"])
def a_source(request, monkeypatch):
    """Every source of the GEMM's A tiles (``EmbedConfig.a_source``): packed by
    ``patch_pack_kernel`` first (the default), gathered per element inside the GEMM, or
    one K step per (channel, patch row) (image form; the flat form reads it as gather)."""
    import dataclasses
    import importlib

    module = importlib.import_module("mmkernels.ops.patch_embed")
    original = module.embed_config
    monkeypatch.setattr(module, "embed_config",
                        lambda *a, **k: dataclasses.replace(original(*a, **k), a_source=request.param))  # fmt: skip
    return request.param


def with_poisoned_remainder(pixels, patch):
    """Pixels past the last whole patch (Conv2d drops them) set to NaN: must not be read."""
    h, w = pixels.shape[-2:]
    pixels = pixels.clone()
    pixels[..., (h // patch) * patch :, :] = float("nan")
    pixels[..., (w // patch) * patch :] = float("nan")
    return pixels


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("batch", [1, 5])
@pytest.mark.usefixtures("a_source")
def test_clip_style_class_token_and_positions(dtype, batch):
    patch, dim = 7, 72
    pixels = with_poisoned_remainder(torch.randn(batch, 3, 30, 45), patch)  # 4 x 6 patches, ragged edges
    weight = (torch.randn(dim, 3, patch, patch) * 0.05).to(dtype)
    cls, pos = torch.randn(dim).to(dtype), torch.randn(1 + 24, dim).to(dtype)
    out = run_kernel(pixels, weight, class_embedding=cls, position_embedding=pos)
    assert out.shape == (batch, 25, dim) and out.dtype == dtype
    check(out, pixels, weight, class_embedding=cls, position_embedding=pos)


@pytest.mark.usefixtures("a_source")
def test_odd_real_image_size():
    """337 x 451 at P=14: 24 x 32 patches, the last 1 and 3 pixel rows/columns dropped."""
    pixels = with_poisoned_remainder(torch.randn(1, 3, 337, 451), 14)
    weight = torch.randn(64, 3, 14, 14) * 0.02
    bias, pos = torch.randn(64), torch.randn(768, 64)
    out = run_kernel(pixels, weight, bias, position_embedding=pos)
    assert out.shape == (1, 768, 64)
    check(out, pixels, weight, bias, position_embedding=pos)


@pytest.mark.parametrize("dim", [64, 72 * 16, 1280])
@pytest.mark.usefixtures("a_source")
def test_siglip_style_bias_and_positions_across_widths(dim):
    pixels = torch.randn(2, 3, 28, 42)  # 2 x 3 patches of 14
    weight = (torch.randn(dim, 3, 14, 14) * 0.02).to(torch.bfloat16)
    bias, pos = torch.randn(dim).to(torch.bfloat16), torch.randn(6, dim).to(torch.bfloat16)
    out = run_kernel(pixels, weight, bias, position_embedding=pos)
    check(out, pixels, weight, bias, position_embedding=pos)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.usefixtures("a_source")
def test_uint8_pixels_normalized_in_the_kernel(dtype):
    pixels = torch.randint(0, 256, (3, 3, 21, 28), dtype=torch.uint8)
    weight = (torch.randn(48, 3, 7, 7) * 0.05).to(dtype)
    kw = dict(pixel_mean=CLIP_MEAN, pixel_std=CLIP_STD, pixel_scale=1 / 255)
    out = run_kernel(pixels, weight, **kw)
    check(out, pixels, weight, **kw)
    # Same as normalizing on the host (the processor's rescale + normalize) then embedding.
    host = ((pixels.double() / 255 - CLIP_MEAN.double().view(1, 3, 1, 1)) / CLIP_STD.double().view(1, 3, 1, 1)).float()
    assert_close(out, reference(host, weight.double()), dtype=dtype)


@pytest.mark.usefixtures("a_source")
def test_per_image_position_embedding_and_strided_pixels():
    """Mllama-style per-tile tables; pixels as a strided view inside a NaN-filled buffer."""
    pixels = nan_padded(torch.randn(4, 3, 14, 21))
    assert not pixels.is_contiguous()
    weight, cls = torch.randn(32, 3, 7, 7) * 0.05, torch.randn(32)
    pos = torch.randn(4, 1 + 6, 32)
    out = run_kernel(pixels, weight, class_embedding=cls, position_embedding=pos)
    check(out, pixels, weight, class_embedding=cls, position_embedding=pos)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.usefixtures("a_source")
def test_qwen2_vl_preflattened_conv3d(dtype):
    channels, frames, patch, rows = 3, 2, 14, 37
    pixels = torch.randn(rows, channels * frames * patch * patch)
    weight = (torch.randn(80, channels, frames, patch, patch) * 0.02).to(dtype)
    out = run_kernel(pixels, weight)
    assert out.shape == (rows, 80)
    check(out, pixels, weight)


@pytest.mark.usefixtures("a_source")
def test_preflattened_uint8_normalized_from_strided_rows():
    """Flat patches that must be converted and normalized, rows strided inside a NaN-filled
    buffer (row stride not a multiple of 16 elements); K = 3 * 2 * 7 * 7 = 294."""
    buffer = torch.full((23, 301), 7, dtype=torch.uint8)
    buffer[:, 294:] = 255  # past each row: would change the result if read
    pixels = buffer[:, :294]
    pixels.copy_(torch.randint(0, 256, pixels.shape, dtype=torch.uint8))
    weight = (torch.randn(40, 3, 2, 7, 7) * 0.05).to(torch.bfloat16)
    kw = dict(pixel_mean=CLIP_MEAN, pixel_std=CLIP_STD, pixel_scale=1 / 255)
    out = run_kernel(pixels, weight, **kw)
    check(out, pixels, weight, **kw)


def test_config_packs_images_from_a_few_thousand_rows():
    import importlib

    module = importlib.import_module("mmkernels.ops.patch_embed")
    k = 3 * 14 * 14
    # CLIP-L/14-336 x 64 and x 8 (4608 rows), Mllama's 4 tiles: packed, 64-deep K steps.
    for rows in (64 * 576, 8 * 576, 4 * 1600):
        cfg = module.embed_config(rows, 1024, k, 2)
        assert (cfg.a_source, cfg.block_k) == ("packed", 64), rows
    # One SigLIP image (729 rows): one launch, the gather in the GEMM.
    cfg = module.embed_config(729, 1152, k, 2)
    assert (cfg.a_source, cfg.block_m, cfg.block_k) == ("gather", 64, 32)


def test_reference_matches_the_modules_it_replaces():
    conv = torch.nn.Conv2d(3, 16, 7, stride=7).double()
    pixels = torch.randn(2, 3, 22, 29, dtype=torch.float64)
    want = conv(pixels).flatten(2).transpose(1, 2)
    torch.testing.assert_close(reference(pixels, conv.weight, conv.bias), want)
    conv3 = torch.nn.Conv3d(3, 16, (2, 4, 4), stride=(2, 4, 4), bias=False).double()
    flat = torch.randn(9, 3 * 2 * 4 * 4, dtype=torch.float64)
    torch.testing.assert_close(reference(flat, conv3.weight), conv3(flat.view(-1, 3, 2, 4, 4)).view(9, 16))


@pytest.mark.usefixtures("a_source")
def test_deterministic():
    pixels, weight, bias = torch.randn(2, 3, 21, 21), torch.randn(40, 3, 7, 7), torch.randn(40)
    assert_deterministic(lambda: run_kernel(pixels, weight, bias))


def test_no_whole_patch_gives_only_the_class_row():
    pixels, weight, cls, pos = torch.randn(2, 3, 5, 30), torch.randn(8, 3, 7, 7), torch.randn(8), torch.randn(1, 8)
    out = patch_embed(pixels, weight, class_embedding=cls, position_embedding=pos)
    assert out.shape == (2, 1, 8)
    torch.testing.assert_close(out[0, 0], cls + pos[0])


BAD = [
    ("channels", dict(pixels=torch.randn(1, 4, 14, 14)), ValueError, "pixels: expected 3 channels"),
    ("pixel dims", dict(pixels=torch.randn(3, 14, 14)), ValueError, r"pixels: with a \(D, C, P, P\) weight expected \(B, C, H, W\)"),
    ("pixel dtype", dict(pixels=torch.zeros(1, 3, 14, 14, dtype=torch.int32)), TypeError, "pixels: expected uint8 or a float"),
    ("uint8 without mean", dict(pixels=torch.zeros(1, 3, 14, 14, dtype=torch.uint8)), ValueError, "uint8 pixels need pixel_mean and pixel_std"),
    ("mean without std", dict(pixel_mean=CLIP_MEAN), ValueError, "pixel_std: pixel_mean and pixel_std come together"),
    ("mean shape", dict(pixel_mean=torch.zeros(4), pixel_std=CLIP_STD), ValueError, r"pixel_mean: expected shape \(3,\)"),
    ("weight dtype", dict(weight=torch.zeros(8, 3, 7, 7, dtype=torch.int8)), TypeError, "weight: expected a floating dtype"),
    ("weight dims", dict(weight=torch.zeros(8, 3, 7)), ValueError, r"weight: expected \(D, C, P, P\) or \(D, C, T, P, P\)"),
    ("bias shape", dict(bias=torch.zeros(9)), ValueError, r"bias: expected shape \(8,\)"),
    ("position length", dict(position_embedding=torch.zeros(5, 8)), ValueError, r"position_embedding: expected \(4, 8\) or \(1, 4, 8\)"),
    ("position with class", dict(class_embedding=torch.zeros(8), position_embedding=torch.zeros(4, 8)), ValueError, r"expected \(5, 8\)"),
    ("flat width", dict(pixels=torch.randn(5, 100), weight=torch.zeros(8, 3, 2, 7, 7)), ValueError, r"pre-flattened patches \(N, 294\)"),
    ("flat with class", dict(pixels=torch.randn(5, 294), weight=torch.zeros(8, 3, 2, 7, 7), class_embedding=torch.zeros(8)), ValueError, "class_embedding: only the image form"),
    ("device", dict(bias=torch.zeros(8, device="meta")), ValueError, "bias: expected device cpu"),
]


@pytest.mark.parametrize("fn", [patch_embed, reference], ids=["op", "reference"])
@pytest.mark.parametrize("name,override,error,message", BAD, ids=[b[0] for b in BAD])
def test_bad_inputs_name_the_argument(fn, name, override, error, message):
    args = dict(pixels=torch.randn(1, 3, 14, 14), weight=torch.zeros(8, 3, 7, 7), bias=None)
    args.update(override)
    pixels, weight, bias = args.pop("pixels"), args.pop("weight"), args.pop("bias")
    with pytest.raises(error, match=message):
        fn(pixels, weight, bias, **args)


def test_torch_compile_fullgraph():
    pixels, weight, pos = torch.randn(2, 3, 14, 21), torch.randn(16, 3, 7, 7), torch.randn(6, 16)

    def f(pixels, weight, pos):
        return patch_embed(pixels, weight, position_embedding=pos).relu()

    compiled = torch.compile(f, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(pixels, weight, pos), f(pixels, weight, pos), rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("form", ["image", "flat"])
def test_gradients_match_the_conv_modules(form, dtype):
    if form == "image":
        pixels = torch.randn(2, 3, 21, 28, dtype=torch.float64)
        weight = torch.randn(16, 3, 7, 7, dtype=torch.float64, requires_grad=True)
        extra = dict(class_embedding=torch.randn(16, dtype=torch.float64, requires_grad=True),
                     position_embedding=torch.randn(13, 16, dtype=torch.float64, requires_grad=True))
    else:
        pixels = torch.randn(11, 3 * 2 * 4 * 4, dtype=torch.float64)
        weight = torch.randn(16, 3, 2, 4, 4, dtype=torch.float64, requires_grad=True)
        extra = {}
    bias = torch.randn(16, dtype=torch.float64, requires_grad=True)
    leaves = [weight, bias, *extra.values()]
    upstream = None

    def grads(fn):
        nonlocal upstream
        out = fn(pixels, weight, bias, **extra)
        upstream = torch.randn_like(out) if upstream is None else upstream
        return torch.autograd.grad((out * upstream).sum(), leaves)

    if dtype == torch.float32:  # the forward runs the kernel (interpreter); same backward
        pixels, weight, bias = pixels.float(), weight.detach().float().requires_grad_(), bias.detach().float().requires_grad_()
        extra = {k: v.detach().float().requires_grad_() for k, v in extra.items()}
        leaves[:] = [weight, bias, *extra.values()]
    for got, want in zip(grads(patch_embed), grads(reference)):
        torch.testing.assert_close(got, want.to(got.dtype))
