"""Host cost of preparing pixels: the processor's normalized float32 pixels against the
raw uint8 pixels of :func:`mmkernels.integrations.raw_pixel_inputs` (which a model
patched with ``pixel_normalization=processor`` normalizes in its patch-embed kernel).

A CPU benchmark (pytest-benchmark; nothing here needs a GPU): the image processor of
LLaVA-1.5 / CLIP-L/14-336 (resize the shortest edge to 336, center crop 336 x 336) on
VGA-sized photos (640 x 480, what COCO images are), one image and a batch of 16, both
ways. What it shows is what the raw path leaves out on the host: the rescale and
normalize passes over float32 arrays, and three quarters of the bytes the pixels take
to the GPU (``extra_info["pixel_bytes"]``). Which backend the processor used (the
torchvision one, or the PIL one where torchvision is missing) is in
``extra_info["processor"]``: the two cost differently.

    pytest benchmarks/bench_pixel_host.py -p no:xdist        # timed (xdist disables timing)

Under xdist (the CI test run) each cell runs once as a test: the raw pixels must be the
uint8 values that normalize to the processor's own output.
"""

from __future__ import annotations

import pytest
import torch

CLIP_L_336 = dict(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336})
PHOTO_HW = (480, 640)


def _processor():
    import warnings

    from transformers import CLIPImageProcessor

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "requires torchvision ... falling back to the PIL backend"
        return CLIPImageProcessor(**CLIP_L_336)


def _photos(count: int) -> list:
    from PIL import Image

    gen = torch.Generator().manual_seed(count)
    # Smooth content plus noise, as photos are (pure noise would be the worst case for
    # nothing here: the cost is per pixel).
    ramp = torch.linspace(0, 200, PHOTO_HW[1]).view(1, -1, 1).expand(*PHOTO_HW, 3)
    return [
        Image.fromarray((ramp + torch.randint(0, 56, (*PHOTO_HW, 3), generator=gen)).to(torch.uint8).numpy())
        for _ in range(count)
    ]


@pytest.fixture(scope="module")
def processor():
    pytest.importorskip("transformers")
    pytest.importorskip("PIL")
    return _processor()


@pytest.mark.parametrize("images", [1, 16], ids=lambda n: f"{n}img")
@pytest.mark.parametrize("path", ["normalized-float32", "raw-uint8"])
def test_clip_processor_host_time(benchmark, processor, path, images):
    from mmkernels.integrations import normalization_constants, raw_pixel_inputs

    photos = _photos(images)
    if path == "raw-uint8":
        run = lambda: raw_pixel_inputs(processor, images=photos)  # noqa: E731
    else:
        run = lambda: processor(images=photos, return_tensors="pt")  # noqa: E731
    pixels = benchmark(run)["pixel_values"]
    assert pixels.shape == (images, 3, 336, 336)
    benchmark.extra_info.update(processor=type(processor).__name__, pixel_dtype=str(pixels.dtype).replace("torch.", ""),
                                pixel_bytes=pixels.numel() * pixels.element_size())  # fmt: skip
    if path == "raw-uint8":
        # Like for like: the raw pixels are what the processor normalized.
        assert pixels.dtype == torch.uint8
        mean, std, scale = normalization_constants(processor)
        normalized = processor(images=photos, return_tensors="pt")["pixel_values"].double()
        host = (pixels.double() * scale - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
        assert (host - normalized).abs().max() < 1e-5
    else:
        assert pixels.dtype == torch.float32
