"""The roofline measured on the device of the run: copy bandwidth and bf16 matmul rate
(:class:`Roofline`, :func:`measure_roofline`), and a cell's floor under it
(:func:`roofline_floor_ms`)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from . import common
from .common import NO_CUDA
from .timing import CudaClock, Timing, TimingConfig, time_device


@dataclass(frozen=True)
class Roofline:
    """Device-to-device copy bandwidth and bf16 matmul rate, measured in this run.

    ``copy_gbps``: bytes read + written per second by a large ``copy_`` (GB = 1e9 B).
    ``matmul_tflops``: ``2 * n**3`` FLOPs per second of an ``n x n x n`` bf16
    ``torch.matmul``. Both from the median call. ``None`` with ``reason`` when not
    measured (no CUDA device).
    """

    copy_gbps: float | None
    matmul_tflops: float | None
    device_name: str
    copy_bytes: int = 0
    matmul_size: int = 0
    reason: str = ""

    @property
    def measured(self) -> bool:
        return self.copy_gbps is not None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "Roofline":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})

    @classmethod
    def not_measured(cls, reason: str) -> "Roofline":
        return cls(copy_gbps=None, matmul_tflops=None, device_name="", reason=reason)


def roofline_floor_ms(nbytes: int, flops: int, roofline: Roofline) -> float | None:
    """The least time a call moving ``nbytes`` and doing ``flops`` can take on the measured
    device: ``max(nbytes / copy bandwidth, flops / matmul rate)``, in ms. None when the
    roofline was not measured or neither is declared. ``100 * floor / median`` is a row's
    "% of roofline"."""
    if not roofline.measured:
        return None
    floors = []
    if nbytes:
        floors.append(nbytes / (roofline.copy_gbps * 1e9))
    if flops and roofline.matmul_tflops:
        floors.append(flops / (roofline.matmul_tflops * 1e12))
    return max(floors) * 1e3 if floors else None


def _copy_timing(device: torch.device, nbytes: int, clock, config: TimingConfig) -> Timing:
    src = torch.ones(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    return time_device(lambda s: dst.copy_(s), [src], clock=clock, config=config)


def _matmul_timing(device: torch.device, n: int, clock, config: TimingConfig) -> Timing:
    a = torch.randn(n, n, dtype=torch.bfloat16, device=device)
    b = torch.randn(n, n, dtype=torch.bfloat16, device=device)
    return time_device(lambda ab: torch.matmul(*ab), [(a, b)], clock=clock, config=config)


def measure_roofline(device: torch.device | str = "cuda", *, quick: bool = False) -> Roofline:
    """Measure the copy bandwidth and the bf16 matmul rate of ``device`` (CUDA)."""
    device = torch.device(device)
    if device.type != "cuda" or not common.cuda_available():
        return Roofline.not_measured(f"not measured: {NO_CUDA}")
    clock = CudaClock(device, flush_bytes=0)  # both working sets dwarf the L2
    config = TimingConfig(warmup_ms=20.0, rep_ms=80.0 if quick else 200.0, min_runs=5, max_runs=200, flush_l2=False)
    copy_elems, n = (256 if quick else 1024) * 2**20, 8192
    copy_t = _copy_timing(device, copy_elems, clock, config)
    mm_t = _matmul_timing(device, n, clock, config)
    torch.cuda.empty_cache()
    copy_bytes = 2 * copy_elems  # read + write
    return Roofline(
        copy_gbps=copy_bytes / (copy_t.median_ms * 1e-3) / 1e9,
        matmul_tflops=2 * n**3 / (mm_t.median_ms * 1e-3) / 1e12,
        device_name=torch.cuda.get_device_name(device),
        copy_bytes=copy_bytes,
        matmul_size=n,
    )
