"""Benchmark of pixels from host memory to patch embeddings: what the raw uint8 path
(``mmkernels.patch(model, pixel_normalization=processor)`` fed by
:func:`mmkernels.integrations.raw_pixel_inputs`) saves on the way to the GPU.

A processor returns its pixels in pageable host memory, and the model's
``pixel_values.to(device)`` copies them over PCIe before the vision tower runs. Every
provider here starts from such host tensors (not pinned, as Hugging Face leaves them)
and ends with the tower's patch embeddings on the GPU, so each row is the copy plus the
embedding, timed with CUDA events like every benchmark (the copy is on the stream):

* ``hf-eager``: the processor's normalized float32 pixels ``.to(device)`` (4 B per
  pixel), then transformers' embeddings (``bench_patch_embed.hf_patch_embed``).
* ``mmkernels``: the same float32 pixels ``.to(device)``, then
  :func:`mmkernels.ops.patch_embed`.
* ``mmkernels(uint8)``: the raw uint8 pixels ``.to(device)`` (1 B per pixel), then
  :func:`mmkernels.ops.patch_embed` normalizing them in the kernel.

The host's own share (the processor's rescale and normalize, which the raw path skips)
is timed on the CPU by ``benchmarks/bench_pixel_host.py``. Shapes: CLIP-L/14-336 (LLaVA-1.5)
at 1 to 256 images and SigLIP-so400m/14-384 at 8, from
``benchmarks.shapes.PATCH_EMBED_SHAPES``. No bytes are declared: the copy runs at the
bus's speed, which the device roofline of the other benchmarks does not describe; rows
are latency and speedup (each case's ``pixels_shape`` says how many pixels cross).

Correctness: every provider against ``bench_patch_embed``'s float64 oracle.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from benchmarks import harness
from benchmarks.bench_patch_embed import (
    PatchEmbedInputs,
    _mmkernels_caller,
    _mmkernels_import_error,
    compare_close,
    expected_patch_embed,
    hf_patch_embed,
    make_patch_embed_inputs,
)
from benchmarks.shapes import PATCH_EMBED_SHAPES

_CASE_NAMES = ("clip-l-14-336/b1", "clip-l-14-336/b8", "clip-l-14-336/b64", "clip-l-14-336/b256",
               "siglip-so400m-14-384/b8")  # fmt: skip
RAW_PIXEL_SHAPES = tuple(s for s in PATCH_EMBED_SHAPES if s.name in _CASE_NAMES)
QUICK_RAW_PIXEL_SHAPES = tuple(s for s in RAW_PIXEL_SHAPES if s.name in ("clip-l-14-336/b1", "clip-l-14-336/b64"))


@dataclasses.dataclass
class HostPixels:
    """One input set: the tower's parameters (and, for the oracle, the pixels) on the
    device, and the same pixels in pageable host memory as a processor returns them:
    ``float32`` normalized, ``uint8`` raw."""

    on_device: PatchEmbedInputs
    float32: torch.Tensor
    uint8: torch.Tensor


def make_host_pixel_inputs(shape, device: torch.device | str, seed: int) -> HostPixels:
    inputs = make_patch_embed_inputs(shape, device, seed)
    return HostPixels(inputs, inputs.pixels.cpu(), inputs.pixels_uint8.cpu())


def expected_embeddings(inputs: HostPixels) -> torch.Tensor:
    return expected_patch_embed(inputs.on_device)


def _copied_to_device(inputs: HostPixels, uint8: bool) -> PatchEmbedInputs:
    """The device inputs with the pixels a provider reads (float32 or uint8) freshly
    copied from host memory: the copy is part of the timed call."""
    device = inputs.on_device.weight.device
    if uint8:
        return dataclasses.replace(inputs.on_device, pixels_uint8=inputs.uint8.to(device))
    return dataclasses.replace(inputs.on_device, pixels=inputs.float32.to(device))


def hf_from_host(inputs: HostPixels) -> torch.Tensor:
    """Hugging Face: the processor's float32 pixels to the GPU, then its embeddings."""
    return hf_patch_embed(_copied_to_device(inputs, uint8=False))


def _mmkernels_from_host(uint8: bool):
    """``bench_patch_embed``'s mmkernels provider after the copy of its pixels."""
    embed = _mmkernels_caller(uint8)
    return lambda inputs: embed(_copied_to_device(inputs, uint8))


PROVIDERS: tuple[harness.Provider, ...] = (
    harness.Provider(
        name="hf-eager",
        factory=lambda: hf_from_host,
        notes="the processor's normalized float32 pixels (pageable host memory) .to(device), 4 B per pixel; "
        "then transformers' embeddings (conv, class token, position table)",
    ),
    harness.Provider(
        name="mmkernels",
        factory=lambda: _mmkernels_from_host(False),
        requires=_mmkernels_import_error,
        timed_backend="triton",
        notes="the same float32 pixels .to(device), then mmkernels.ops.patch_embed",
    ),
    harness.Provider(
        name="mmkernels(uint8)",
        factory=lambda: _mmkernels_from_host(True),
        requires=_mmkernels_import_error,
        timed_backend="triton",
        notes="raw uint8 pixels (pageable) .to(device), 1 B per pixel; then mmkernels.ops.patch_embed with the "
        "processor's rescale, mean and std in the kernel",
    ),
)

RAW_PIXELS_BENCHMARK = harness.Benchmark(
    name="raw_pixels",
    description=(
        "Pixels in host memory (as a processor returns them) to patch embeddings on the GPU: the PCIe copy of "
        "float32 normalized pixels or raw uint8 pixels, then the embedding; bf16 weights."
    ),
    cases=RAW_PIXEL_SHAPES,
    quick_cases=QUICK_RAW_PIXEL_SHAPES,
    providers=PROVIDERS,
    make_inputs=make_host_pixel_inputs,
    expected_output=expected_embeddings,
    bytes_moved=lambda shape: 0,
    small_case=lambda shape: shape.scaled(),
    compare=compare_close,
    bytes_model="none declared: each row is the host-to-device copy (at the bus's speed) plus the embedding",
)
harness.register(RAW_PIXELS_BENCHMARK, size_param="M", size_label="GEMM rows M (patches)")


def run(out_dir: str | Path, quick: bool = False) -> harness.BenchmarkResult:
    """Run the raw-pixels benchmark into ``out_dir`` (timed on CUDA; validated, not timed,
    on the CPU) and return its result; ``quick`` runs fewer shapes and repetitions."""
    return harness.run_into_folder(RAW_PIXELS_BENCHMARK, out_dir, quick=quick)


# ======================================================================================
# pytest-benchmark cells

raw_pixels_session = pytest.fixture(scope="module")(harness.pytest_session(RAW_PIXELS_BENCHMARK))


@pytest.mark.parametrize("provider", [p.name for p in PROVIDERS])
@pytest.mark.parametrize("shape", RAW_PIXEL_SHAPES, ids=lambda s: s.name.replace("/", "-"))
def test_raw_pixels(benchmark, raw_pixels_session: harness.BenchSession, shape, provider: str):
    harness.run_pytest_cell(benchmark, raw_pixels_session, shape, provider)
