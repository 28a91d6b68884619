"""The raw-pixel path: ``patch(model, pixel_normalization=processor)`` lets a model take
uint8 pixels straight from the decoder; the kernel normalizes them. Checked against the
unpatched model fed the processor's own normalized pixels."""

from __future__ import annotations

import pytest
import torch

import mmkernels
from mmkernels.integrations import normalization_constants, raw_pixel_inputs
from mmkernels.testing import relative_error
from zoo_helpers import build_or_skip


@pytest.fixture(scope="module")
def llava():
    return build_or_skip("llava", batch=1)


def test_processor_without_rescale_and_normalize_gives_uint8_that_normalizes_to_the_same(llava):
    from PIL import Image

    image = Image.fromarray(torch.randint(0, 256, (40, 52, 3), dtype=torch.uint8).numpy())
    processor = llava.processor.image_processor
    normalized = processor(images=[image], return_tensors="pt")["pixel_values"]
    raw = raw_pixel_inputs(processor, images=[image])["pixel_values"]
    assert raw.dtype == torch.uint8 and raw.shape == normalized.shape
    mean, std, scale = normalization_constants(processor)
    host = (raw.double() * scale - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    assert relative_error(host, normalized.double()) < 1e-6


def test_llava_on_uint8_pixels_matches_the_normalized_model(llava):
    model, inputs = llava.model, dict(llava.inputs)
    mean, std, scale = normalization_constants(llava.processor)
    raw = torch.randint(0, 256, inputs["pixel_values"].shape, dtype=torch.uint8)
    normalized = (raw.float() * scale - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    with torch.no_grad():
        want = model(**{**inputs, "pixel_values": normalized}).logits
        report = mmkernels.patch(model, pixel_normalization=llava.processor)
        try:
            assert "raw pixels normalized in the kernel" in str(report)
            got = model(**{**inputs, "pixel_values": raw}).logits
        finally:
            mmkernels.unpatch(model)
    assert relative_error(got, want) <= 1e-5


def test_qwen2_vl_flat_patches_from_raw_values():
    """Qwen2-VL's processor flattens patches after normalizing; raw flattened patches are
    normalized per channel block (C, T, P, P) in the kernel. Its get_image_features casts
    the pixels to the tower dtype first: raw values in 0..255 survive that exactly."""
    tiny = build_or_skip("qwen2_vl", batch=1)
    model, inputs = tiny.model, dict(tiny.inputs)
    mean, std, scale = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3), 1 / 255
    raw, normalized = {}, {}
    for key in ("pixel_values", "pixel_values_videos"):  # images and video frames alike
        flat = inputs[key]
        raw[key] = torch.randint(0, 256, flat.shape, dtype=torch.uint8)
        view = raw[key].double().view(flat.shape[0], 3, -1)
        normalized[key] = ((view * scale - torch.tensor(mean).view(1, 3, 1)) / torch.tensor(std).view(1, 3, 1)).view_as(flat).float()
    with torch.no_grad():
        want = model(**{**inputs, **normalized}).logits
        mmkernels.patch(model, kernels=["patch_embed"], pixel_normalization=dict(mean=mean, std=std, scale=scale))
        try:
            got = model(**{**inputs, **raw}).logits
        finally:
            mmkernels.unpatch(model)
    assert relative_error(got, want) <= 1e-5


def test_bad_normalization_sources_raise(llava):
    with pytest.raises(ValueError, match="pixel_normalization: expected a dict with keys mean, std"):
        mmkernels.patch(llava.model, pixel_normalization={"mean": [0.5]})
    with pytest.raises(TypeError, match="pixel_normalization: expected an image processor"):
        mmkernels.patch(llava.model, pixel_normalization=object())
    with pytest.raises(ValueError, match="mean has 3 channels but std has 2"):
        mmkernels.patch(llava.model, pixel_normalization=dict(mean=[0, 0, 0], std=[1, 1]))
    assert all("_mmkernels_originals" not in m.__dict__ for m in llava.model.modules())
