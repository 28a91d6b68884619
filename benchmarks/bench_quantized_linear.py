"""Benchmark of the quantized projector matmul: ``act(x @ W^T + bias)`` for the multimodal
projectors' Linear layers, bf16 activations and outputs.

Shapes (:data:`PROJECTOR_LAYERS` x :data:`M_VALUES`, kept in this file): the projector
layers of LLaVA-1.5-7B (``linear_1`` 1024 -> 4096 + GELU, ``linear_2`` 4096 -> 4096),
LLaVA-NeXT-34B (``linear_1`` 1024 -> 7168 + GELU), Qwen2-VL-7B's merger (``mlp.0``
5120 -> 5120 + GELU, ``mlp.2`` 5120 -> 3584) and Llama-3.2-11B-Vision (7680 -> 4096, no
activation), each at M in {1, 16, 64, 256, 576, 2304, 9216} image tokens (576 = one
336 px LLaVA image; 2304 = 4 images or one AnyRes grid; 9216 = a 16-image batch).

Providers (the first is the baseline for speedups):

* ``cublas-bf16``: ``F.linear(x, W, bias)`` in bf16 (cuBLAS) then the activation as a
  separate op: what Hugging Face runs today.
* ``torch._scaled_mm(fp8)``: per-token e4m3 quantization of x in PyTorch (amax, divide,
  cast), ``torch._scaled_mm`` with row-wise scales (x) and column-wise scales (W), bias,
  then the activation; sm_89+ CUDA only, skipped by name elsewhere or if the installed
  torch lacks row-wise scaling.
* ``torchao(int8wo)`` / ``torchao(int4wo)``: torchao's ``Int8WeightOnlyConfig`` /
  ``Int4WeightOnlyConfig(group_size=128)`` on an ``nn.Linear``, then the activation;
  skipped by name when torchao is not installed (or a config does not build).
* ``mmkernels(w8a16)``, ``mmkernels(w4a16)``, ``mmkernels(fp8)``:
  :func:`mmkernels.ops.quantized_linear` with the activation and bias fused (fp8: the
  per-token activation quantization is a second, small launch and is timed).

Work declared per shape: FLOPs = 2 * M * K * N. Bytes = read x (M * K * 2) + read the
weight in the provider's format (bf16: 2 B per element; int8 / fp8: 1 B + 4 B scale per
row; int4: 0.5 B + 8 B scale and zero per group of 128 per row) + bias (N * 2) + write the
output (M * N * 2); each quantized provider declares its own weight bytes. % of roofline
= max(bytes / copy bandwidth, FLOPs / bf16 matmul rate) / median (for fp8 the bf16 matmul
rate understates the ceiling by 2x, so fp8 rows can exceed 100%).

Correctness: every provider against the unquantized float64 layer, by SQNR (the quantized
ones cannot match bf16 rounding): at least 18 dB (the w4a16 floor of the op's tests).
The tight check, each mmkernels scheme against its own dequantized weight, is in
``tests/test_quantized_linear.py`` and ``tests/test_bench_quantized_linear.py``.

``run(out_dir, quick=False)`` writes the results folder (timed on CUDA; validated, not
timed, on the CPU); ``test_quantized_linear`` is the same work as pytest-benchmark cells.
Registered with the harness (``python -m mmkernels.bench --kernels quantized_linear``,
and so the GPU suite), its main size being M.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from benchmarks import harness

__all__ = [
    "M_VALUES",
    "PROJECTOR_LAYERS",
    "PROVIDERS",
    "QUANTIZED_LINEAR_BENCHMARK",
    "QUANTIZED_LINEAR_SHAPES",
    "ProjectorShape",
    "make_inputs",
    "run",
]

M_VALUES: tuple[int, ...] = (1, 16, 64, 256, 576, 2304, 9216)
SQNR_FLOOR_DB = 18.0
GROUP_SIZE = 128


@dataclass(frozen=True)
class ProjectorLayer:
    name: str
    model: str
    in_features: int
    out_features: int
    activation: str | None
    bias: bool = True


PROJECTOR_LAYERS: tuple[ProjectorLayer, ...] = (
    ProjectorLayer("llava-1.5-7b/linear_1", "llava-hf/llava-1.5-7b-hf", 1024, 4096, "gelu"),
    ProjectorLayer("llava-1.5-7b/linear_2", "llava-hf/llava-1.5-7b-hf", 4096, 4096, None),
    ProjectorLayer("llava-next-34b/linear_1", "llava-hf/llava-v1.6-34b-hf", 1024, 7168, "gelu"),
    ProjectorLayer("qwen2-vl-7b/merger.mlp.0", "Qwen/Qwen2-VL-7B-Instruct", 5120, 5120, "gelu"),
    ProjectorLayer("qwen2-vl-7b/merger.mlp.2", "Qwen/Qwen2-VL-7B-Instruct", 5120, 3584, None),
    ProjectorLayer("mllama-11b/multi_modal_projector", "meta-llama/Llama-3.2-11B-Vision", 7680, 4096, None),
)


@dataclass(frozen=True)
class ProjectorShape:
    """One cell's problem: ``M`` tokens through one projector layer (bf16)."""

    name: str
    model: str
    m: int
    k: int
    n: int
    activation: str | None
    bias: bool = True

    @property
    def flops(self) -> int:
        return 2 * self.m * self.k * self.n

    def weight_bytes(self, scheme: str | None = None) -> int:
        """The weight as each provider reads it: bf16, or the quantized format with scales."""
        from mmkernels.quant import scheme_info

        n, k = self.n, self.k
        if scheme is None:
            return 2 * n * k
        info = scheme_info(scheme)
        return info.weight_bytes(n, k, GROUP_SIZE if info.grouped else None)

    def bytes_moved(self, scheme: str | None = None) -> int:
        return 2 * self.m * self.k + self.weight_bytes(scheme) + 2 * self.n * self.bias + 2 * self.m * self.n

    def scaled(self) -> "ProjectorShape":
        """A CPU-sized version (the interpreter is slow): same structure, K and N cut to
        256 and 80 (K stays a multiple of the 128-element int4 group), M to at most 7."""
        return ProjectorShape(self.name + "/small", self.model, min(self.m, 7), 256, 80, self.activation, self.bias)

    def params(self) -> dict:
        return {"model": self.model, "M": self.m, "K": self.k, "N": self.n, "activation": self.activation,
                "bias": self.bias, "dtype": "bfloat16"}  # fmt: skip


QUANTIZED_LINEAR_SHAPES: tuple[ProjectorShape, ...] = tuple(
    ProjectorShape(f"{layer.name}/m{m}", layer.model, m, layer.in_features, layer.out_features, layer.activation, layer.bias)
    for layer in PROJECTOR_LAYERS
    for m in M_VALUES
)
QUICK_SHAPES: tuple[ProjectorShape, ...] = tuple(
    s for s in QUANTIZED_LINEAR_SHAPES
    if (s.name.startswith("llava-1.5-7b/linear_1") and s.m in (16, 576))
    or (s.name.startswith("mllama-11b") and s.m == 16)
    or (s.name.startswith("qwen2-vl-7b/merger.mlp.2") and s.m == 2304)
)  # fmt: skip


@dataclass
class ProjectorInputs:
    """``x`` (M, K) bf16; ``weight`` (N, K) bf16 with ``bias`` (N,); the quantized weights
    per scheme (``quantized[scheme]``, a :class:`mmkernels.quant.QuantizedWeight`, absent
    when mmkernels is not importable)."""

    case: str
    x: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor | None
    activation: str | None
    quantized: dict


def make_inputs(shape: ProjectorShape, device: torch.device | str, seed: int) -> ProjectorInputs:
    """Deterministic inputs for ``shape`` (same ``seed``, same values) on ``device``."""
    device = torch.device(device)
    gen = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(shape.m, shape.k, generator=gen, device=device).to(torch.bfloat16)
    weight = (torch.randn(shape.n, shape.k, generator=gen, device=device) / math.sqrt(shape.k)).to(torch.bfloat16)
    bias = (torch.randn(shape.n, generator=gen, device=device) * 0.1).to(torch.bfloat16) if shape.bias else None
    quantized = {}
    if _mmkernels_import_error() is None:
        from mmkernels.quant import SCHEMES, quantize

        quantized = {s: quantize(weight, s, group_size=GROUP_SIZE) for s in SCHEMES}
    return ProjectorInputs(shape.name, x, weight, bias, shape.activation, quantized)


def _activation(y: torch.Tensor, activation: str | None) -> torch.Tensor:
    if activation is None:
        return y
    if activation == "gelu":
        return F.gelu(y)
    if activation == "gelu_tanh":
        return F.gelu(y, approximate="tanh")
    if activation == "quick_gelu":
        return y * torch.sigmoid(1.702 * y)
    return F.silu(y)


def expected_output(inputs: ProjectorInputs) -> torch.Tensor:
    """The unquantized layer in float64, rounded to bf16 once."""
    f64 = torch.float64
    y = inputs.x.to(f64) @ inputs.weight.to(f64).t()
    if inputs.bias is not None:
        y = y + inputs.bias.to(f64)
    return _activation(y, inputs.activation).to(torch.bfloat16)


def sqnr_db(out: torch.Tensor, expected: torch.Tensor) -> float:
    o, e = out.to(torch.float64), expected.to(torch.float64)
    noise = float((o - e).pow(2).sum())
    signal = float(e.pow(2).sum())
    if noise == 0:
        return math.inf
    return 10 * math.log10(signal / noise) if signal > 0 else -math.inf


def compare_sqnr(out, expected: torch.Tensor) -> str | None:
    """None when ``out`` has the expected shape and dtype, is finite and reaches
    :data:`SQNR_FLOOR_DB` against the unquantized layer; else why not."""
    if not isinstance(out, torch.Tensor):
        return f"returned {type(out).__name__}, expected a Tensor"
    if out.shape != expected.shape or out.dtype != expected.dtype:
        return f"returned {out.dtype}{tuple(out.shape)}, expected {expected.dtype}{tuple(expected.shape)}"
    if not bool(torch.isfinite(out).all()):
        return f"{int((~torch.isfinite(out)).sum())} of {out.numel()} elements are not finite"
    db = sqnr_db(out, expected)
    if db < SQNR_FLOOR_DB:
        return f"SQNR {db:.1f} dB against the unquantized layer < {SQNR_FLOOR_DB} dB"
    return None


# ======================================================================================
# Providers


def cublas_bf16(inputs: ProjectorInputs) -> torch.Tensor:
    """Hugging Face today: ``nn.Linear`` (cuBLAS bf16), then the activation module."""
    return _activation(F.linear(inputs.x, inputs.weight, inputs.bias), inputs.activation)


_mmkernels_import_error = functools.partial(harness.import_error, "mmkernels.ops.quantized_linear", "mmkernels.quant")


def _mmkernels_caller(scheme: str):
    from mmkernels.ops import quantized_linear

    def call(inputs: ProjectorInputs) -> torch.Tensor:
        return quantized_linear(inputs.x, inputs.quantized[scheme], inputs.bias, activation=inputs.activation)

    return call


def _scaled_mm_requires() -> str | None:
    if not torch.cuda.is_available():
        return "torch._scaled_mm needs a CUDA device (sm_89+)"
    if torch.cuda.get_device_capability() < (8, 9):
        cc = ".".join(map(str, torch.cuda.get_device_capability()))
        return f"torch._scaled_mm fp8 needs sm_89+, this device is sm_{cc}"
    if not hasattr(torch, "_scaled_mm"):
        return f"torch {torch.__version__} has no torch._scaled_mm"
    return None


def _scaled_mm_caller():
    cache: dict = {}

    def weight_fp8(inputs: ProjectorInputs):
        key = id(inputs.weight)
        if key not in cache:
            w = inputs.weight.float()
            sw = w.abs().amax(dim=1).clamp(min=1e-12) / 448.0
            wq = (w / sw[:, None]).clamp(-448, 448).to(torch.float8_e4m3fn)
            cache[key] = (inputs.weight, wq, sw)  # keeps the weight alive, so ids stay unique
        return cache[key][1], cache[key][2]

    def call(inputs: ProjectorInputs) -> torch.Tensor:
        wq, sw = weight_fp8(inputs)
        x = inputs.x.float()
        sx = x.abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / 448.0
        xq = (x / sx).clamp(-448, 448).to(torch.float8_e4m3fn)
        y = torch._scaled_mm(xq, wq.t(), scale_a=sx, scale_b=sw[None, :], bias=inputs.bias, out_dtype=torch.bfloat16)
        return _activation(y, inputs.activation)

    return call


_torchao_requires = functools.partial(harness.import_error, "torchao")


def _torchao_caller(kind: str):
    from torchao.quantization import quantize_

    if kind == "int8wo":
        from torchao.quantization import Int8WeightOnlyConfig

        config = Int8WeightOnlyConfig()
    else:
        from torchao.quantization import Int4WeightOnlyConfig

        config = Int4WeightOnlyConfig(group_size=GROUP_SIZE)
    cache: dict = {}

    def call(inputs: ProjectorInputs) -> torch.Tensor:
        key = id(inputs.weight)
        if key not in cache:
            linear = torch.nn.Linear(inputs.weight.shape[1], inputs.weight.shape[0], bias=inputs.bias is not None)
            linear = linear.to(device=inputs.weight.device, dtype=inputs.weight.dtype)
            with torch.no_grad():
                linear.weight.copy_(inputs.weight)
                if inputs.bias is not None:
                    linear.bias.copy_(inputs.bias)
            quantize_(linear, config)
            cache[key] = (inputs.weight, linear)
        return _activation(cache[key][1](inputs.x), inputs.activation)

    return call


def _bytes_for(scheme: str):
    return lambda shape: shape.bytes_moved(scheme)


PROVIDERS: tuple[harness.Provider, ...] = (
    harness.Provider(
        name="cublas-bf16",
        factory=lambda: cublas_bf16,
        notes="F.linear in bf16 (cuBLAS) + the activation as a separate op (Hugging Face's projector)",
    ),
    harness.Provider(
        name="torch._scaled_mm(fp8)",
        factory=_scaled_mm_caller,
        requires=_scaled_mm_requires,
        optional=True,
        bytes_moved=_bytes_for("fp8"),
        notes="per-token e4m3 quantization of x in PyTorch + torch._scaled_mm (row-wise x, column-wise W "
        "scales, bias) + the activation",
    ),
    harness.Provider(
        name="torchao(int8wo)",
        factory=functools.partial(_torchao_caller, "int8wo"),
        requires=_torchao_requires,
        optional=True,
        bytes_moved=_bytes_for("w8a16"),
        notes="torchao Int8WeightOnlyConfig on nn.Linear + the activation",
    ),
    harness.Provider(
        name="torchao(int4wo)",
        factory=functools.partial(_torchao_caller, "int4wo"),
        requires=_torchao_requires,
        optional=True,
        bytes_moved=_bytes_for("w4a16"),
        notes="torchao Int4WeightOnlyConfig(group_size=128) on nn.Linear + the activation",
    ),
    *(
        harness.Provider(
            name=f"mmkernels({scheme})",
            factory=functools.partial(_mmkernels_caller, scheme),
            requires=_mmkernels_import_error,
            timed_backend="triton",
            bytes_moved=_bytes_for(scheme),
            notes=f"mmkernels.ops.quantized_linear, scheme {scheme}, bias and activation fused"
            + ("; per-token activation quantization is a second launch" if scheme == "fp8" else ""),
        )
        for scheme in ("w8a16", "w4a16", "fp8")
    ),
)

QUANTIZED_LINEAR_BENCHMARK = harness.Benchmark(
    name="quantized_linear",
    description=(
        "Projector Linear (+ activation) of LLaVA-1.5-7B, LLaVA-NeXT-34B, Qwen2-VL-7B's merger and "
        "Llama-3.2-11B-Vision at 1 to 9216 image tokens: bf16 cuBLAS against int8 / int4 / fp8 weights."
    ),
    cases=QUANTIZED_LINEAR_SHAPES,
    quick_cases=QUICK_SHAPES,
    providers=PROVIDERS,
    make_inputs=make_inputs,
    expected_output=expected_output,
    bytes_moved=lambda shape: shape.bytes_moved(),
    flops=lambda shape: shape.flops,
    small_case=lambda shape: shape.scaled(),
    compare=compare_sqnr,
    # Small calls wait for the host (0.1-0.2 ms on the H200 where the kernels need microseconds): the
    # CUDA-graph columns time the device alone. No provider copies from host memory in a call.
    graph_timing=True,
    bytes_model=(
        "read x (M x K, bf16) + read the weight in the provider's format (bf16 2 B; int8 / fp8 1 B + a 4 B scale "
        "per row; int4 0.5 B + 8 B per group of 128) + bias (N, bf16) + write out (M x N, bf16); "
        "FLOPs = 2 x M x K x N"
    ),
)


def run(out_dir: str | Path, quick: bool = False) -> harness.BenchmarkResult:
    """Run the quantized-linear benchmark into ``out_dir`` (timed on CUDA; validated, not
    timed, on the CPU) and return its result; ``quick`` runs fewer shapes and repetitions."""
    return harness.run_into_folder(QUANTIZED_LINEAR_BENCHMARK, out_dir, quick=quick)


# ======================================================================================
# pytest-benchmark cells

quantized_linear_session = pytest.fixture(scope="module")(harness.pytest_session(QUANTIZED_LINEAR_BENCHMARK))


@pytest.mark.parametrize("provider", [p.name for p in PROVIDERS])
@pytest.mark.parametrize("shape", QUANTIZED_LINEAR_SHAPES, ids=lambda s: s.name.replace("/", "-"))
def test_quantized_linear(benchmark, quantized_linear_session: harness.BenchSession, shape, provider: str):
    harness.run_pytest_cell(benchmark, quantized_linear_session, shape, provider)


harness.register(QUANTIZED_LINEAR_BENCHMARK, size_param="M", size_label="tokens M (rows of x)")
