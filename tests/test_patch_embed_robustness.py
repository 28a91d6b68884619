"""patch_embed on inputs of any layout and edge size (issue 15): every tensor argument with
strides other than the contiguous ones (channels_last and cropped pixels, views at an
offset inside NaN-filled buffers, expanded and strided vectors and tables), numbers and
one-element tensors as normalization constants, a weight without output channels, and
offsets past 2^31 elements. The Triton kernel (interpreter) is compared against the
float64 reference on contiguous copies of the same values."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from mmkernels.backend import Backend, recent_decisions
from mmkernels.ops import patch_embed
from mmkernels.ops import patch_embed_reference as reference
from mmkernels.testing import assert_close, nan_padded, poison_outputs

B, C, H, W, P, D = 2, 3, 21, 28, 7, 24  # 3 x 4 = 12 patches
N = (H // P) * (W // P)
MEAN = torch.tensor([0.48145466, 0.4578275, 0.40821073])
STD = torch.tensor([0.26862954, 0.26130258, 0.27577711])


def run_kernel(*args, **kwargs):
    with poison_outputs():
        out = patch_embed(*args, **kwargs)
    decision = recent_decisions()[-1]
    assert decision.backend is Backend.INTERPRETER, decision
    assert not out.isnan().any()
    return out


def dense(value):
    """The same values, contiguous and float64 where floating (what the answer is made from)."""
    if not isinstance(value, torch.Tensor):
        return value
    value = value.contiguous()
    return value.double() if value.is_floating_point() else value


def check(pixels, weight, bias=None, **kw):
    out = run_kernel(pixels, weight, bias, **kw)
    want = reference(dense(pixels), dense(weight), dense(bias), **{k: dense(v) for k, v in kw.items()})
    assert out.shape == want.shape
    assert_close(out, want, dtype=weight.dtype)


def in_nan_buffer(t: torch.Tensor, offset: int = 13) -> torch.Tensor:
    """``t``'s values as a contiguous view starting ``offset`` elements into a NaN buffer
    (an odd storage offset: unaligned base)."""
    fill = float("nan") if t.is_floating_point() else 255
    buf = torch.full((offset + t.numel() + 11,), fill, dtype=t.dtype)
    view = buf[offset : offset + t.numel()].view(t.shape)
    view.copy_(t)
    return view


@pytest.fixture(params=["packed", "gather", "row_steps"])
def a_source(request, monkeypatch):
    """Every source of the GEMM's A tiles (``EmbedConfig.a_source``)."""
    import dataclasses
    import importlib

    module = importlib.import_module("mmkernels.ops.patch_embed")
    original = module.embed_config
    monkeypatch.setattr(module, "embed_config",
                        lambda *a, **k: dataclasses.replace(original(*a, **k), a_source=request.param))  # fmt: skip
    return request.param


# --------------------------------------------------------------------------------------
# Strides of every tensor argument


def _pixels(layout: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(B, C, H, W) pixels laid out as ``layout``; past them NaN (255 for uint8)."""
    if dtype == torch.uint8:
        x = torch.randint(0, 200, (B, C, H, W), dtype=torch.uint8)
    else:
        x = torch.randn(B, C, H, W, dtype=dtype)
    fill = 255 if dtype == torch.uint8 else float("nan")
    if layout == "contiguous":
        return x
    if layout == "channels_last":
        return x.contiguous(memory_format=torch.channels_last)
    if layout == "crop":  # a window of a larger image: row stride 40, offset rows and columns
        big = torch.full((B, C, H + 9, W + 12), fill, dtype=dtype)
        big[:, :, 4 : 4 + H, 5 : 5 + W] = x
        return big[:, :, 4 : 4 + H, 5 : 5 + W]
    if layout == "channel_slice":  # channels 1..3 of a 5-channel buffer
        big = torch.full((B, 5, H, W), fill, dtype=dtype)
        big[:, 1:4] = x
        return big[:, 1:4]
    if layout == "offset":
        return in_nan_buffer(x)
    if layout == "transposed_hw":  # stride 1 along H
        return x.transpose(2, 3).contiguous().transpose(2, 3)
    if layout == "expanded_batch":  # stride 0 along B
        return x[:1].expand(B, C, H, W)
    raise AssertionError(layout)


PIXEL_LAYOUTS = ["contiguous", "channels_last", "crop", "channel_slice", "offset", "transposed_hw", "expanded_batch"]


@pytest.mark.parametrize("layout", PIXEL_LAYOUTS)
@pytest.mark.usefixtures("a_source")
def test_pixel_layouts(layout):
    pixels = _pixels(layout)
    weight, cls, pos = torch.randn(D, C, P, P) * 0.05, torch.randn(D), torch.randn(1 + N, D)
    check(pixels, weight, torch.randn(D), class_embedding=cls, position_embedding=pos)


@pytest.mark.parametrize("layout", ["channels_last", "crop", "offset"])
@pytest.mark.usefixtures("a_source")
def test_uint8_pixel_layouts_normalized(layout):
    pixels = _pixels(layout, torch.uint8)
    weight = (torch.randn(D, C, P, P) * 0.05).to(torch.bfloat16)
    check(pixels, weight, pixel_mean=MEAN, pixel_std=STD, pixel_scale=1 / 255)


@pytest.mark.parametrize("layout", ["columns_strided", "transposed", "offset"])
@pytest.mark.parametrize("normalized", [False, True], ids=["float", "uint8-normalized"])
@pytest.mark.usefixtures("a_source")
def test_flat_pixel_layouts(layout, normalized):
    rows, k = 9, C * 2 * 4 * 4
    x = torch.randint(0, 256, (rows, k), dtype=torch.uint8) if normalized else torch.randn(rows, k)
    if layout == "columns_strided":  # every other column of a wider buffer
        big = torch.full((rows, 2 * k), 255 if normalized else float("nan"), dtype=x.dtype)
        big[:, ::2] = x
        x = big[:, ::2]
    elif layout == "transposed":  # column-major rows
        x = x.t().contiguous().t()
    else:
        x = in_nan_buffer(x)
    weight = torch.randn(40, C, 2, 4, 4) * 0.05
    kw = dict(pixel_mean=MEAN, pixel_std=STD, pixel_scale=1 / 255) if normalized else {}
    check(x, weight, torch.randn(40), **kw)


@pytest.mark.parametrize("layout", ["channels_last", "permuted", "offset", "expanded"])
def test_weight_layouts(layout):
    w = torch.randn(D, C, P, P) * 0.05
    if layout == "channels_last":
        w = w.contiguous(memory_format=torch.channels_last)
    elif layout == "permuted":  # D innermost
        w = w.permute(1, 2, 3, 0).contiguous().permute(3, 0, 1, 2)
    elif layout == "offset":
        w = in_nan_buffer(w)
    else:  # every output channel the same filter
        w = w[:1].expand(D, C, P, P)
    check(torch.randn(B, C, H, W), w, torch.randn(D), position_embedding=torch.randn(N, D))
    flat = torch.randn(40, C, 2, P, P).permute(1, 2, 3, 4, 0).contiguous().permute(4, 0, 1, 2, 3)
    check(torch.randn(5, C * 2 * P * P), flat)


def _vector(layout: str, size: int = D) -> torch.Tensor:
    if layout == "strided":  # the torch.randn(32)[::2]
        return torch.randn(2 * size)[::2]
    if layout == "expanded_zero":  # the torch.zeros(1).expand(D) (gave 1.5e27)
        return torch.zeros(1).expand(size)
    if layout == "expanded":
        return torch.randn(1).expand(size)
    if layout == "offset":
        return in_nan_buffer(torch.randn(size), offset=5)
    raise AssertionError(layout)


VECTOR_LAYOUTS = ["strided", "expanded_zero", "expanded", "offset"]


@pytest.mark.parametrize("layout", VECTOR_LAYOUTS)
@pytest.mark.parametrize("argument", ["bias", "class_embedding"])
def test_bias_and_class_embedding_layouts(argument, layout):
    weight = torch.randn(D, C, P, P) * 0.05
    vector = _vector(layout)
    kw = {argument: vector, "position_embedding": torch.randn(N + (argument == "class_embedding"), D)}
    check(torch.randn(B, C, H, W), weight, **kw)
    if argument == "bias":
        check(torch.randn(7, C * 2 * 4 * 4), torch.randn(D, C, 2, 4, 4) * 0.05, vector)


def test_class_row_alone_from_strided_vectors():
    """No whole patch: only the class row (written without the GEMM)."""
    cls, pos = torch.randn(2 * D)[::2], torch.randn(D).expand(1, D)
    out = patch_embed(torch.randn(B, C, 5, W), torch.randn(D, C, P, P), class_embedding=cls, position_embedding=pos)
    torch.testing.assert_close(out, (cls + pos[0]).expand(B, 1, D))


def _table(layout: str, rows: int) -> torch.Tensor:
    t = torch.randn(B, rows, D)
    if layout == "rows_strided":  # (rows, D) rows 7 elements apart inside NaN
        return nan_padded(t[0])
    if layout == "transposed":  # (rows, D) with stride 1 along rows
        return t[0].t().contiguous().t()
    if layout == "expanded_rows":  # one row for every position
        return t[0, :1].expand(rows, D)
    if layout == "expanded_columns":  # one value per row (stride 0 along D)
        return t[0, :, :1].expand(rows, D)
    if layout == "offset":
        return in_nan_buffer(t[0])
    if layout == "per_image_expanded":  # (B, rows, D), stride 0 along B
        return t[0].expand(B, rows, D)
    if layout == "per_image_strided":
        return nan_padded(t)
    if layout == "per_image_transposed":
        return t.transpose(0, 2).contiguous().transpose(0, 2)
    if layout == "per_image_sliced":  # (B, rows, D): every other table of a larger batch
        return torch.randn(2 * B, rows, D)[::2]
    raise AssertionError(layout)


TABLE_LAYOUTS = ["rows_strided", "transposed", "expanded_rows", "expanded_columns", "offset", "per_image_expanded",
                 "per_image_strided", "per_image_transposed", "per_image_sliced"]  # fmt: skip


@pytest.mark.parametrize("layout", TABLE_LAYOUTS)
@pytest.mark.parametrize("with_class", [False, True], ids=["siglip", "clip"])
def test_position_embedding_layouts(layout, with_class):
    weight = torch.randn(D, C, P, P) * 0.05
    cls = torch.randn(D) if with_class else None
    check(torch.randn(B, C, H, W), weight, class_embedding=cls, position_embedding=_table(layout, N + with_class))


@pytest.mark.parametrize("layout", ["strided", "expanded", "offset"])
@pytest.mark.parametrize("pixel_dtype", [torch.float32, torch.uint8])
def test_normalization_constant_layouts(layout, pixel_dtype):
    def constant(values):
        if layout == "strided":
            return torch.stack([values, torch.full_like(values, float("nan"))], 1).reshape(-1)[::2]
        if layout == "expanded":
            return values[:1].expand(C)
        return in_nan_buffer(values, offset=3)

    pixels = torch.randint(0, 256, (B, C, H, W), dtype=torch.uint8)
    pixels = pixels if pixel_dtype == torch.uint8 else pixels.float()
    weight = torch.randn(D, C, P, P) * 0.05
    scale = constant(torch.full((C,), 1 / 255))
    check(pixels, weight, pixel_mean=constant(MEAN), pixel_std=constant(STD), pixel_scale=scale)


# --------------------------------------------------------------------------------------
# Normalization constants given as one number


@pytest.mark.parametrize("fn", [patch_embed, reference], ids=["op", "reference"])
@pytest.mark.parametrize("form", ["number", "0-dim", "(1,)"])
def test_scalar_normalization_constants_broadcast_to_every_channel(fn, form):
    """A number or a one-element tensor is that value for every channel, in the op and in
    the reference alike (the reference took a float, the op refused it)."""
    make = {"number": float, "0-dim": torch.tensor, "(1,)": lambda v: torch.tensor([v])}[form]
    pixels = torch.randint(0, 256, (B, C, H, W), dtype=torch.uint8)
    weight = torch.randn(D, C, P, P) * 0.05
    got = fn(pixels, weight, pixel_mean=make(0.5), pixel_std=make(0.25), pixel_scale=make(1 / 255))
    want = reference(pixels, weight.double(), pixel_mean=torch.full((C,), 0.5), pixel_std=torch.full((C,), 0.25),
                     pixel_scale=torch.full((C,), 1 / 255))  # fmt: skip
    assert_close(got, want, dtype=torch.float32)


@pytest.mark.parametrize("fn", [patch_embed, reference], ids=["op", "reference"])
def test_normalization_constant_of_another_length_names_the_argument(fn):
    pixels, weight = torch.randn(1, C, 14, 14), torch.randn(8, C, P, P)
    message = r"pixel_mean: expected shape \(3,\) \(one value per channel\), \(\) or \(1,\), got \(2,\)"
    with pytest.raises(ValueError, match=message):
        fn(pixels, weight, pixel_mean=torch.zeros(2), pixel_std=STD)
    with pytest.raises(TypeError, match="pixel_std: expected a float or a tensor of shape"):
        fn(pixels, weight, pixel_mean=MEAN, pixel_std=[0.2, 0.2, 0.2])


# --------------------------------------------------------------------------------------
# Zero sizes


@pytest.mark.parametrize("fn", [patch_embed, reference], ids=["op", "reference"])
def test_weight_without_output_channels_gives_the_empty_result(fn):
    pixels = torch.randn(B, C, H, W)
    out = fn(pixels, torch.randn(0, C, P, P))
    assert out.shape == (B, N, 0) and out.dtype == torch.float32
    out = fn(pixels, torch.randn(0, C, P, P), torch.zeros(0), class_embedding=torch.zeros(0),
             position_embedding=torch.zeros(1 + N, 0))  # fmt: skip
    assert out.shape == (B, 1 + N, 0)
    assert fn(torch.randn(5, C * 2 * 16), torch.randn(0, C, 2, 4, 4, dtype=torch.bfloat16)).shape == (5, 0)


@pytest.mark.parametrize("fn", [patch_embed, reference], ids=["op", "reference"])
@pytest.mark.parametrize("shape", [(8, 0, P, P), (8, C, 0, 0), (8, C, 0, 4, 4)], ids=["C=0", "P=0", "T=0"])
def test_weight_with_an_empty_reduction_names_the_argument(fn, shape):
    pixels = torch.randn(B, 0 if shape[1] == 0 else C, H, W) if len(shape) == 4 else torch.randn(5, 0)
    with pytest.raises(ValueError, match=r"weight: expected C, T and P of at least 1, got shape"):
        fn(pixels, torch.randn(shape))


# --------------------------------------------------------------------------------------
# Offsets past 2^31 elements


_LARGE_OFFSETS = textwrap.dedent(
    """
    import dataclasses, importlib, sys
    import torch
    from mmkernels.ops import patch_embed, patch_embed_reference as reference
    from mmkernels.testing import assert_close

    module = importlib.import_module("mmkernels.ops.patch_embed")
    original = module.embed_config
    P = 14
    # uint8 pixels whose image rows lie 2^31 / 13 elements apart: the patch's last pixel row
    # starts past 2^31 elements (a view into a large decoded buffer; pages never touched
    # are never allocated).
    row_stride = 2**31 // (P - 1) + 7
    pixels = torch.empty((P - 1) * row_stride + P, dtype=torch.uint8).as_strided((1, 1, P, P), (0, 0, row_stride, 1))
    for i in range(P):
        pixels[0, 0, i] = torch.randint(0, 256, (P,), dtype=torch.uint8)
    weight = torch.randn(16, 1, P, P) * 0.05
    norm = dict(pixel_mean=0.5, pixel_std=0.25, pixel_scale=1 / 255)
    # A position table whose 4 rows lie 2^31 / 3 elements apart (float16: 4.3 GB of
    # address space, four rows touched).
    row_stride = 2**31 // 3 + 16
    table = torch.empty(3 * row_stride + 16, dtype=torch.float16).as_strided((4, 16), (row_stride, 1))
    for i in range(4):
        table[i] = torch.randn(16)
    images, weight16 = torch.randn(2, 3, 28, 28), (torch.randn(16, 3, P, P) * 0.05).half()
    for a_source in ("packed", "gather", "row_steps"):
        module.embed_config = lambda *a, **k: dataclasses.replace(original(*a, **k), a_source=a_source)
        out = patch_embed(pixels, weight, **norm)
        assert_close(out, reference(pixels, weight.double(), **norm), dtype=torch.float32, name=a_source + " pixels")
        out = patch_embed(images, weight16, position_embedding=table)
        want = reference(images, weight16.double(), position_embedding=table.double())
        assert_close(out, want, dtype=torch.float16, name=a_source + " position table")
    print("ok")
    """
)


def test_offsets_past_2_31_elements():
    """Pixel and position-table offsets of more than 2^31 elements are computed in int64
    (int32 products wrapped around and read outside the buffers: the interpreter
    crashed). In a subprocess: such a read kills the process."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    result = subprocess.run([sys.executable, "-c", _LARGE_OFFSETS], env=env, capture_output=True, text=True,
                            timeout=600)  # fmt: skip
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), (
        f"exit {result.returncode} (negative: killed by that signal)\n{result.stdout}\n{result.stderr[-3000:]}"
    )


# --------------------------------------------------------------------------------------
# Random valid layouts of every argument at once


@pytest.mark.parametrize("seed", range(12))
def test_random_layouts_of_every_argument(seed):
    """Each argument in a layout drawn at random (pixels, weight, bias, class row, position
    table, normalization constants), all in one call, against the reference."""
    import random

    rng = random.Random(seed)
    torch.manual_seed(seed)
    pixel_dtype = rng.choice([torch.float32, torch.uint8])
    pixels = _pixels(rng.choice(PIXEL_LAYOUTS), pixel_dtype)
    weight = torch.randn(D, C, P, P) * 0.05
    weight_layout = rng.choice(["contiguous", "channels_last", "offset", "permuted"])
    if weight_layout == "channels_last":
        weight = weight.contiguous(memory_format=torch.channels_last)
    elif weight_layout == "offset":
        weight = in_nan_buffer(weight)
    elif weight_layout == "permuted":
        weight = weight.permute(1, 2, 3, 0).contiguous().permute(3, 0, 1, 2)
    kw = {}
    with_class = rng.random() < 0.5
    if with_class:
        kw["class_embedding"] = _vector(rng.choice(VECTOR_LAYOUTS))
    if rng.random() < 0.7:
        kw["position_embedding"] = _table(rng.choice(TABLE_LAYOUTS), N + with_class)
    bias = _vector(rng.choice(VECTOR_LAYOUTS)) if rng.random() < 0.7 else None
    if pixel_dtype == torch.uint8 or rng.random() < 0.3:
        kw.update(pixel_mean=in_nan_buffer(MEAN, offset=rng.randint(0, 5)), pixel_std=STD[[0, 1, 2]],
                  pixel_scale=rng.choice([1 / 255, torch.tensor(1 / 255)]))  # fmt: skip
    check(pixels, weight, bias, **kw)
