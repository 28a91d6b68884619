"""The patch-embed benchmark, checked on the CPU: its shape table (N, K, D, FLOPs, bytes),
its providers against ``torch.nn.functional.conv2d`` / ``conv3d`` and against
transformers' own modules, its output check, the harness's "% of roofline" and
per-provider bytes, and ``run()`` writing "not timed" without CUDA. Nothing is timed."""

from __future__ import annotations

import dataclasses
import json
import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))  # `benchmarks` is a top-level folder, not installed

from benchmarks import bench_patch_embed as bench  # noqa: E402
from benchmarks import harness  # noqa: E402
from bench_helpers import WallClock  # noqa: E402
from benchmarks.shapes import (  # noqa: E402
    PATCH_EMBED_SHAPES,
    QUICK_PATCH_EMBED_SHAPES,
    SHAPE_TABLES,
    PatchEmbedShape,
)

SHAPES = {s.name: s for s in PATCH_EMBED_SHAPES}
PROVIDERS = {p.name: p for p in bench.PROVIDERS}


def _mmkernels_available() -> bool:
    return bench._mmkernels_import_error() is None


# --------------------------------------------------------------------------------------
# Shape table


# name: (N patches per image or flat rows, K, D, M GEMM rows, output shape)
_EXPECTED = {
    "clip-l-14-336/b1": (576, 588, 1024, 576, (1, 577, 1024)),
    "clip-l-14-336/b8": (576, 588, 1024, 8 * 576, (8, 577, 1024)),
    "clip-l-14-336/b64": (576, 588, 1024, 64 * 576, (64, 577, 1024)),
    "clip-l-14-336/b256": (576, 588, 1024, 256 * 576, (256, 577, 1024)),
    "siglip-so400m-14-384/b1": (729, 588, 1152, 729, (1, 729, 1152)),
    "siglip-so400m-14-384/b8": (729, 588, 1152, 8 * 729, (8, 729, 1152)),
    "qwen2-vl-7b/256p": (256, 1176, 1280, 256, (256, 1280)),
    "qwen2-vl-7b/1024p": (1024, 1176, 1280, 1024, (1024, 1280)),
    "qwen2-vl-7b/4096p": (4096, 1176, 1280, 4096, (4096, 1280)),
    "qwen2-vl-7b/16384p": (16384, 1176, 1280, 16384, (16384, 1280)),
    "mllama-11b/4tiles": (1600, 588, 1280, 4 * 1600, (4, 1601, 1280)),
}


def test_shape_table_covers_the_models():
    assert set(SHAPES) == set(_EXPECTED)
    assert SHAPE_TABLES["patch_embed"] is PATCH_EMBED_SHAPES
    assert set(QUICK_PATCH_EMBED_SHAPES) <= set(PATCH_EMBED_SHAPES) and len(QUICK_PATCH_EMBED_SHAPES) == 4
    assert {s.model.split("/")[0] for s in QUICK_PATCH_EMBED_SHAPES} == {"openai", "google", "Qwen", "meta-llama"}
    assert all(s.dtype == "bfloat16" and s.pixel_dtype == "float32" for s in PATCH_EMBED_SHAPES)
    clip, siglip, qwen, mllama = (SHAPES[n] for n in ("clip-l-14-336/b8", "siglip-so400m-14-384/b8",
                                                       "qwen2-vl-7b/4096p", "mllama-11b/4tiles"))  # fmt: skip
    assert (clip.class_token, clip.bias, clip.position_shape) == (True, False, (577, 1024))
    assert (siglip.class_token, siglip.bias, siglip.position_shape) == (False, True, (729, 1152))
    assert (qwen.image_form, qwen.weight_shape, qwen.position_shape) == (False, (1280, 3, 2, 14, 14), None)
    assert (mllama.batch, mllama.position_shape) == (4, (4, 1601, 1280)) and not mllama.bias


@pytest.mark.parametrize("name", list(_EXPECTED))
def test_shape_sizes_flops_and_bytes(name):
    shape = SHAPES[name]
    n, k, d, m, out_shape = _EXPECTED[name]
    assert (shape.patches_per_image, shape.gemm_k, shape.dim, shape.gemm_rows) == (n, k, d, m)
    assert shape.output_shape == out_shape
    assert shape.flops == 2 * m * k * d
    # Bytes written out by hand: float32 pixels the patches cover, bf16 parameters and output.
    pixels = m * k
    if shape.image_form:
        assert shape.pixels_shape == (shape.batch, 3, *shape.image_size)
        h, w = shape.grid
        assert (h * shape.patch, w * shape.patch) == ((378, 378) if "siglip" in name else shape.image_size)
        assert pixels == shape.batch * 3 * h * w * shape.patch**2
    else:
        assert math.prod(shape.pixels_shape) == pixels
    pos = math.prod(shape.position_shape) if shape.position_shape else 0
    params = d * k + d * shape.bias + d * shape.class_token
    expected = pixels * 4 + (params + pos + math.prod(out_shape)) * 2
    assert shape.bytes_moved() == expected
    assert shape.bytes_moved("uint8") == expected - 3 * pixels
    assert bench.PATCH_EMBED_BENCHMARK.bytes_moved(shape) == expected
    assert bench.PATCH_EMBED_BENCHMARK.flops(shape) == shape.flops
    assert PROVIDERS["mmkernels(uint8)"].bytes_moved(shape) == expected - 3 * pixels
    assert all(p.bytes_moved is None for n_, p in PROVIDERS.items() if n_ != "mmkernels(uint8)")


def test_clip_b8_bytes_by_the_numbers():
    shape = SHAPES["clip-l-14-336/b8"]
    assert shape.bytes_moved() == 8 * 3 * 336 * 336 * 4 + (1024 * 588 + 1024 + 577 * 1024 + 8 * 577 * 1024) * 2
    assert shape.flops == 2 * 4608 * 588 * 1024


@pytest.mark.parametrize("name", list(_EXPECTED))
def test_scaled_shape_keeps_structure_and_inputs_match_it(name):
    shape = SHAPES[name]
    small = shape.scaled()
    assert (small.image_form, small.class_token, small.position, small.bias) == (
        shape.image_form, shape.class_token, shape.position, shape.bias)  # fmt: skip
    inputs = bench.make_patch_embed_inputs(small, "cpu", 0)
    assert tuple(inputs.pixels.shape) == small.pixels_shape and inputs.pixels.dtype == torch.float32
    assert inputs.pixels_uint8.shape == inputs.pixels.shape and inputs.pixels_uint8.dtype == torch.uint8
    assert tuple(inputs.weight.shape) == small.weight_shape and inputs.weight.dtype == torch.bfloat16
    assert (inputs.bias is not None) == small.bias and (inputs.class_embedding is not None) == small.class_token
    pos = inputs.position_embedding
    assert (tuple(pos.shape) if pos is not None else None) == small.position_shape
    assert (inputs.position_ids is not None) == (small.position == "shared")
    assert tuple(bench.expected_patch_embed(inputs).shape) == small.output_shape
    # Same seed, same values; another seed, other values.
    again = bench.make_patch_embed_inputs(small, "cpu", 0)
    assert torch.equal(again.pixels_uint8, inputs.pixels_uint8) and torch.equal(again.weight, inputs.weight)
    assert not torch.equal(bench.make_patch_embed_inputs(small, "cpu", 1).pixels_uint8, inputs.pixels_uint8)


def test_host_normalized_pixels_are_the_processors():
    small = SHAPES["siglip-so400m-14-384/b1"].scaled()
    inputs = bench.make_patch_embed_inputs(small, "cpu", 0)
    want = (inputs.pixels_uint8.float() / 255.0 - 0.5) / 0.5
    torch.testing.assert_close(inputs.pixels, want, rtol=1e-6, atol=1e-6)
    flat = bench.make_patch_embed_inputs(SHAPES["qwen2-vl-7b/1024p"].scaled(), "cpu", 0)
    mean = torch.tensor((0.48145466, 0.4578275, 0.40821073)).repeat_interleave(flat.pixels.shape[1] // 3)
    std = torch.tensor((0.26862954, 0.26130258, 0.27577711)).repeat_interleave(flat.pixels.shape[1] // 3)
    torch.testing.assert_close(flat.pixels, (flat.pixels_uint8.float() / 255.0 - mean) / std, rtol=1e-6, atol=1e-6)


def test_shape_validation():
    with pytest.raises(ValueError, match="position"):
        PatchEmbedShape(name="x", model="m", dim=8, patch=2, position="tiles")
    with pytest.raises(ValueError, match="flat form"):
        PatchEmbedShape(name="x", model="m", dim=8, patch=2, temporal=2, class_token=True)


# --------------------------------------------------------------------------------------
# Providers against conv2d / conv3d


def _conv_expected(inputs: bench.PatchEmbedInputs) -> torch.Tensor:
    """Independent of the module's oracle: F.conv2d / F.conv3d in float32 on the pixels
    rounded to bf16, class row, position table, rounded to bf16."""
    w = inputs.weight.float()
    x = inputs.pixels.to(torch.bfloat16).float()
    b = inputs.bias.float() if inputs.bias is not None else None
    if not inputs.image_form:
        d, c, t, p, _ = w.shape
        return F.conv3d(x.view(-1, c, t, p, p), w, b, stride=(t, p, p)).view(-1, d).to(torch.bfloat16)
    out = F.conv2d(x, w, b, stride=w.shape[-1]).flatten(2).transpose(1, 2)
    if inputs.class_embedding is not None:
        out = torch.cat([inputs.class_embedding.float().expand(x.shape[0], 1, -1), out], dim=1)
    if inputs.position_embedding is not None:
        out = out + inputs.position_embedding.float()
    return out.to(torch.bfloat16)


def _provider_fns():
    fns = {
        "hf-eager": bench.hf_patch_embed,
        "torch.compile(hf)": bench._compiled_hf_caller(backend="eager"),
        "unfold+linear": bench.unfold_linear_patch_embed,
    }
    if _mmkernels_available():
        fns["mmkernels"] = bench._mmkernels_caller(False)
        fns["mmkernels(uint8)"] = bench._mmkernels_caller(True)
    return fns


@pytest.mark.parametrize("name", list(_EXPECTED))
def test_providers_agree_with_conv(name):
    small = SHAPES[name].scaled()
    inputs = bench.make_patch_embed_inputs(small, "cpu", 0)
    want = _conv_expected(inputs)
    oracle = bench.expected_patch_embed(inputs)
    assert bench.compare_close(oracle, want) is None
    assert bench.compare_close(want, oracle) is None
    for provider, fn in _provider_fns().items():
        out = fn(bench.make_patch_embed_inputs(small, "cpu", 0))
        assert out.shape == want.shape and out.dtype == torch.bfloat16, provider
        err = bench.compare_close(out, want)
        assert err is None, f"{provider}: {err}"
        torch.testing.assert_close(out.float(), want.float(), rtol=2e-2, atol=2e-2, msg=provider)


@pytest.mark.skipif(not _mmkernels_available(), reason="mmkernels.ops.patch_embed not importable")
@pytest.mark.parametrize("name", [s.name for s in QUICK_PATCH_EMBED_SHAPES])
def test_oracle_agrees_with_the_ops_reference(name):
    from mmkernels.ops import patch_embed_reference

    inputs = bench.make_patch_embed_inputs(SHAPES[name].scaled(), "cpu", 0)
    kwargs = dict(class_embedding=inputs.class_embedding, position_embedding=inputs.position_embedding)
    oracle = bench.expected_patch_embed(inputs)
    from_float = patch_embed_reference(inputs.pixels, inputs.weight, inputs.bias, **kwargs)
    assert bench.compare_close(from_float, oracle) is None
    norm = dict(pixel_mean=inputs.pixel_mean, pixel_std=inputs.pixel_std, pixel_scale=inputs.pixel_scale)
    from_uint8 = patch_embed_reference(inputs.pixels_uint8, inputs.weight, inputs.bias, **norm, **kwargs)
    assert bench.compare_close(from_uint8, oracle) is None


def _hf_module_output(shape_name: str, inputs: bench.PatchEmbedInputs):
    """transformers' own embeddings module, loaded with the inputs' parameters."""
    small = SHAPES[shape_name].scaled()
    d, p = small.dim, small.patch
    if shape_name.startswith("clip"):
        from transformers import CLIPVisionConfig
        from transformers.models.clip.modeling_clip import CLIPVisionEmbeddings

        module = CLIPVisionEmbeddings(CLIPVisionConfig(hidden_size=d, num_attention_heads=4, patch_size=p,
                                                     image_size=small.image_size[0]))
        state = {"patch_embedding.weight": inputs.weight, "class_embedding": inputs.class_embedding,
                 "position_embedding.weight": inputs.position_embedding}  # fmt: skip
    elif shape_name.startswith("siglip"):
        from transformers import SiglipVisionConfig
        from transformers.models.siglip.modeling_siglip import SiglipVisionEmbeddings

        module = SiglipVisionEmbeddings(SiglipVisionConfig(hidden_size=d, num_attention_heads=4, patch_size=p,
                                                         image_size=small.image_size[0]))
        state = {"patch_embedding.weight": inputs.weight, "patch_embedding.bias": inputs.bias,
                 "position_embedding.weight": inputs.position_embedding}  # fmt: skip
    else:
        from transformers.models.qwen2_vl.modeling_qwen2_vl import PatchEmbed

        module = PatchEmbed(patch_size=p, temporal_patch_size=small.temporal, in_channels=3, embed_dim=d)
        state = {"proj.weight": inputs.weight}
    module = module.to(torch.bfloat16)
    module.load_state_dict(state, strict=False)
    with torch.no_grad():
        return module(inputs.pixels)


@pytest.mark.parametrize("name", ["clip-l-14-336/b8", "siglip-so400m-14-384/b8", "qwen2-vl-7b/1024p"])
def test_hf_eager_is_what_transformers_computes(name):
    pytest.importorskip("transformers")
    small = SHAPES[name].scaled(grid=3)
    # HF's CLIP / SigLIP embeddings take square images of config.image_size.
    square = dataclasses.replace(small, image_size=(small.image_size[0],) * 2) if small.image_form else small
    inputs = bench.make_patch_embed_inputs(square, "cpu", 0)
    try:
        want = _hf_module_output(name, inputs)
    except Exception as exc:  # a transformers version whose modules differ: say so
        pytest.skip(f"transformers module not constructible here ({type(exc).__name__}: {exc})")
    assert torch.equal(bench.hf_patch_embed(inputs), want)


def test_compare_rejects_wrong_outputs():
    small = SHAPES["clip-l-14-336/b8"].scaled()
    inputs = bench.make_patch_embed_inputs(small, "cpu", 0)
    expected = bench.expected_patch_embed(inputs)
    zero_class = torch.zeros_like(inputs.class_embedding)
    no_class = bench.hf_patch_embed(dataclasses.replace(inputs, class_embedding=zero_class))
    zero_pos = torch.zeros_like(inputs.position_embedding)
    no_pos = bench.hf_patch_embed(dataclasses.replace(inputs, position_embedding=zero_pos))
    h, w = small.grid
    swapped = expected.clone()
    swapped[:, 1:] = expected[:, 1:].reshape(small.batch, h, w, -1).transpose(1, 2).reshape(small.batch, h * w, -1)
    for wrong in (no_class, no_pos, swapped):
        assert "relative error" in bench.compare_close(wrong, expected)
    assert "expected" in bench.compare_close(expected[:, 1:], expected)
    assert "expected" in bench.compare_close(expected.float(), expected)
    nan = expected.clone()
    nan[0, 0, 0] = float("nan")
    assert "not finite" in bench.compare_close(nan, expected)
    siglip = bench.make_patch_embed_inputs(SHAPES["siglip-so400m-14-384/b1"].scaled(), "cpu", 0)
    no_bias = bench.hf_patch_embed(dataclasses.replace(siglip, bias=None))
    assert bench.compare_close(no_bias, bench.expected_patch_embed(siglip)) is not None


def test_compiled_provider_fails_loudly_past_the_recompile_limit(monkeypatch):
    monkeypatch.setattr(bench, "_RECOMPILE_LIMIT", 1)
    fn = bench._compiled_hf_caller(backend="eager")
    first, second = (bench.make_patch_embed_inputs(SHAPES[n].scaled(), "cpu", 0)
                     for n in ("qwen2-vl-7b/1024p", "qwen2-vl-7b/4096p"))  # fmt: skip
    second = dataclasses.replace(second, case="other", pixels=second.pixels[:7])  # another shape
    torch._dynamo.reset()
    try:
        fn(first)
        with pytest.raises(Exception, match="(?i)recompil"):
            fn(second)
    finally:
        torch._dynamo.reset()


# --------------------------------------------------------------------------------------
# Harness: % of roofline, per-provider bytes


def test_roofline_floor_is_the_larger_of_the_two_floors():
    roof = harness.Roofline(copy_gbps=1000.0, matmul_tflops=500.0, device_name="stand-in")
    assert harness.roofline_floor_ms(10**9, 0, roof) == pytest.approx(1.0)  # 1 GB at 1000 GB/s
    assert harness.roofline_floor_ms(0, 10**12, roof) == pytest.approx(2.0)  # 1 TFLOP at 500 TFLOP/s
    assert harness.roofline_floor_ms(10**9, 10**12, roof) == pytest.approx(2.0)
    assert harness.roofline_floor_ms(0, 0, roof) is None
    assert harness.roofline_floor_ms(10**9, 10**12, harness.Roofline.not_measured("no CUDA")) is None
    shape = SHAPES["clip-l-14-336/b64"]
    floor = harness.roofline_floor_ms(shape.bytes_moved(), shape.flops, roof)
    assert floor == pytest.approx(max(shape.bytes_moved() / 1e12, shape.flops / 5e14) * 1e3)


def test_timed_rows_report_percent_of_roofline_and_uint8_bytes(tmp_path):
    """The timed bookkeeping with a stand-in clock on the CPU (not a measurement)."""
    providers = [PROVIDERS["hf-eager"], PROVIDERS["unfold+linear"]]
    if _mmkernels_available():  # its backend check is for CUDA; here only its bytes matter
        providers.append(dataclasses.replace(PROVIDERS["mmkernels(uint8)"], timed_backend=None))
    small = (SHAPES["clip-l-14-336/b8"].scaled(), SHAPES["qwen2-vl-7b/4096p"].scaled())
    bench_def = dataclasses.replace(bench.PATCH_EMBED_BENCHMARK, cases=small, quick_cases=None, providers=providers)
    roof = harness.Roofline(copy_gbps=100.0, matmul_tflops=10.0, device_name="stand-in", copy_bytes=2, matmul_size=8)
    timing = harness.TimingConfig(warmup_ms=0.5, rep_ms=2.0, min_runs=3, max_runs=6, input_copies=2)
    session = harness.BenchSession(bench_def, "cpu", roofline=roof, timing=timing, clock=WallClock())
    result = harness.run_timed(session)
    rows = {(r.case, r.provider): r for r in result.rows}
    for shape in small:
        for provider in providers:
            row = rows[(shape.name, provider.name)]
            assert row.status == "ok" and row.correct, (row.provider, row.reason)
            assert row.flops == shape.flops
            want_bytes = shape.bytes_moved("uint8") if "uint8" in provider.name else shape.bytes_moved()
            assert row.bytes == want_bytes
            floor_ms = max(want_bytes / 100e9, shape.flops / 10e12) * 1e3
            assert row.pct_roofline == pytest.approx(100.0 * floor_ms / row.median_ms)
            assert row.pct_roofline == pytest.approx(max(row.pct_copy_bw, row.pct_matmul))
    data = harness.ResultsFolder(tmp_path).update(benchmark=result, roofline=roof)
    assert data["benchmarks"]["patch_embed"]["rows"][0]["pct_roofline"] is not None
    md = (tmp_path / "results.md").read_text()
    assert "| % roofline |" in md and "max(bytes / copy BW, FLOPs / matmul rate)" in md


# --------------------------------------------------------------------------------------
# run() without CUDA


def test_cpu_run_validates_every_provider_and_writes_not_timed(tmp_path, monkeypatch):
    monkeypatch.setattr(harness.common, "cuda_available", lambda: False)  # also on a machine with a GPU
    result = bench.run(tmp_path, quick=True)
    assert not result.timed and result.not_timed_reason.startswith("not timed: no CUDA device")
    assert {r.case for r in result.rows} == {s.name for s in QUICK_PATCH_EMBED_SHAPES}
    assert not result.failed_rows, [(r.case, r.provider, r.reason) for r in result.failed_rows]
    for row in result.rows:
        assert row.median_ms is None and row.pct_roofline is None and row.bytes > 0 and row.flops > 0
        if row.provider.startswith("mmkernels") and not _mmkernels_available():
            assert row.status == "skipped" and "not importable" in row.reason
        else:
            assert row.status == harness.NOT_TIMED and row.correct, (row.case, row.provider, row.reason)
            if harness.syncs._host_sync_counter_class()[0] is not None:
                assert row.host_syncs == 0, (row.case, row.provider, row.host_sync_ops)
    by_cell = {(r.case, r.provider): r for r in result.rows}
    for shape in QUICK_PATCH_EMBED_SHAPES:
        assert by_cell[(shape.name, "mmkernels(uint8)")].bytes < by_cell[(shape.name, "mmkernels")].bytes
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["timed"] is False and "not timed: no CUDA device" in data["not_timed_reason"]
    assert [p["name"] for p in data["benchmarks"]["patch_embed"]["providers"]] == list(PROVIDERS)
    md = (tmp_path / "results.md").read_text()
    assert "## patch_embed" in md and "not timed: no CUDA device" in md and "| hf-eager |" in md


# --------------------------------------------------------------------------------------
# The raw-pixels benchmark: the same towers, pixels starting in host memory


def test_raw_pixels_inputs_start_in_pageable_host_memory_and_match_the_oracle():
    from benchmarks import bench_raw_pixels as raw

    assert [s.name for s in raw.QUICK_RAW_PIXEL_SHAPES] == ["clip-l-14-336/b1", "clip-l-14-336/b64"]
    sizes = [s.gemm_rows for s in raw.RAW_PIXEL_SHAPES]
    assert max(sizes) / min(sizes) >= 100  # 1 to 256 images
    shape = SHAPES["clip-l-14-336/b8"].scaled()
    inputs = raw.make_host_pixel_inputs(shape, "cpu", 0)
    for host in (inputs.float32, inputs.uint8):
        assert host.device.type == "cpu" and not host.is_pinned()  # what a processor returns
    assert inputs.float32.dtype == torch.float32 and inputs.uint8.dtype == torch.uint8
    torch.testing.assert_close(inputs.float32, inputs.on_device.pixels, rtol=0, atol=0)
    expected = raw.expected_embeddings(inputs)
    assert bench.compare_close(raw.hf_from_host(inputs), expected) is None
    if _mmkernels_available():
        for provider in raw.PROVIDERS[1:]:
            assert bench.compare_close(provider.factory()(inputs), expected) is None, provider.name
    # No bytes declared: rows are latency (the copy runs at the bus's speed).
    assert raw.RAW_PIXELS_BENCHMARK.bytes_moved(shape) == 0 and raw.RAW_PIXELS_BENCHMARK.flops(shape) == 0
    assert harness.registered()["raw_pixels"].size_param == "M"
