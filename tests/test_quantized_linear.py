"""Quantized projector matmul: the Triton kernel (interpreter) against the float64 reference
on the dequantized weight, quantization quality (SQNR) against the unquantized layer, the
block-size heuristic's paths (small tiles + split-K, 128 x 128 tiles), NaN poisoning and
NaN padding, determinism, bad inputs, gradients and torch.compile."""

from __future__ import annotations

import dataclasses
import math
import sys

import pytest
import torch
import torch.nn.functional as F

import mmkernels
from mmkernels.backend import Backend, force_backend, recent_decisions
from mmkernels.ops import quantized_linear
from mmkernels.ops import quantized_linear_reference as reference
from mmkernels.ops.quantized_linear import CAPABILITIES, linear_config
from mmkernels.quant import SCHEMES, QuantizationError, QuantizedWeight, quantize, quantize_activations_fp8
from mmkernels.testing import assert_bitwise_equal, assert_close, assert_deterministic, nan_padded, poison_outputs

ACTIVATIONS = [None, "gelu", "gelu_tanh", "quick_gelu", "silu"]
TORCH_ACT = {
    None: lambda y: y,
    "gelu": F.gelu,
    "gelu_tanh": lambda y: F.gelu(y, approximate="tanh"),
    "quick_gelu": lambda y: y * torch.sigmoid(1.702 * y),
    "silu": F.silu,
}


def run_kernel(x, qw, bias=None, activation=None, *, finite_input=True):
    with poison_outputs():
        out = quantized_linear(x, qw, bias, activation=activation)
    decision = recent_decisions()[-1]
    assert decision.backend is Backend.INTERPRETER, decision
    assert decision.op == f"quantized_linear[{qw.scheme}]"
    if finite_input:
        assert not out.isnan().any()
    return out


@pytest.fixture(params=[True, False], ids=["swapped", "unswapped"])
def gemm_layout(request, monkeypatch):
    """Both tile layouts of the integer schemes: ``acc^T = W . x^T`` (the default) and
    ``acc = x . W^T`` (``LinearConfig.swap_ab``; fp8 ignores it)."""
    import dataclasses
    import importlib

    module = importlib.import_module("mmkernels.ops.quantized_linear")
    original = module.linear_config
    monkeypatch.setattr(module, "linear_config",
                        lambda *a, **k: dataclasses.replace(original(*a, **k), swap_ab=request.param))  # fmt: skip
    return request.param


def make(scheme, n, k, dtype=torch.bfloat16, group_size=64, bias=True):
    w = (torch.randn(n, k) / math.sqrt(k)).to(dtype)
    qw = quantize(w, scheme, group_size=group_size)
    b = (torch.randn(n) * 0.5).to(dtype) if bias else None
    return w, qw, b


def check(out, x, qw, bias, activation):
    ref = reference(x, qw, bias, activation=activation)
    assert out.shape == ref.shape and out.dtype == x.dtype
    return assert_close(out, ref, dtype=x.dtype)


# --------------------------------------------------------------------------------------
# Kernel vs the float64 reference on the dequantized weight


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("m", [1, 7, 129])
@pytest.mark.parametrize("scheme", SCHEMES)
def test_matches_reference(scheme, m, dtype, gemm_layout):
    # K = 192 (three groups of 64, not a multiple of the 128-deep K tile), N = 80 (not a
    # multiple of the 64 / 128-wide N tile).
    _, qw, bias = make(scheme, 80, 192, dtype)
    x = torch.randn(m, 192).to(dtype)
    out = run_kernel(x, qw, bias, "gelu")
    check(out, x, qw, bias, "gelu")


@pytest.mark.parametrize("scheme", SCHEMES)
def test_float32_activations(scheme):
    _, qw, bias = make(scheme, 48, 128, torch.float32)
    x = torch.randn(9, 128)
    check(run_kernel(x, qw, bias, "silu"), x, qw, bias, "silu")


@pytest.mark.parametrize("activation", ACTIVATIONS, ids=[str(a) for a in ACTIVATIONS])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("scheme", SCHEMES)
def test_every_activation_with_and_without_bias(scheme, bias, activation, gemm_layout):
    _, qw, b = make(scheme, 40, 96, torch.float16, group_size=32, bias=bias)
    x = torch.randn(5, 96).to(torch.float16) * 2
    check(run_kernel(x, qw, b, activation), x, qw, b, activation)


@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_w4a16_group_sizes(group_size):
    _, qw, bias = make("w4a16", 72, 256, group_size=group_size)
    assert qw.scales.shape == (72, 256 // group_size) and qw.packed.shape == (72, 128)
    x = torch.randn(33, 256).to(torch.bfloat16)
    check(run_kernel(x, qw, bias, "quick_gelu"), x, qw, bias, "quick_gelu")


@pytest.mark.parametrize("scheme", SCHEMES)
def test_split_k_path_real_k(scheme, gemm_layout):
    """M = 1 on a SigLIP-width K (1152): small tiles and split-K (ragged last share), added
    back in a fixed order by the epilogue launch."""
    k, n = 1152, 64
    cfg = linear_config(1, n, k, scheme, 128, 2)
    assert (cfg.block_m, cfg.split_k) == (16, 2) and cfg.k_per_split * cfg.split_k >= k > cfg.k_per_split
    _, qw, bias = make(scheme, n, k, group_size=128)
    x = torch.randn(1, k).to(torch.bfloat16)
    out = assert_deterministic(lambda: run_kernel(x, qw, bias, "gelu_tanh"))
    check(out, x, qw, bias, "gelu_tanh")


@pytest.mark.parametrize("scheme", SCHEMES)
def test_large_m_tiles(scheme, gemm_layout):
    """M > 256 takes the 128 x 128 tiles; M = 300 leaves a ragged last row tile."""
    k, n = 128, 136
    cfg = linear_config(300, n, k, scheme, 64, 2)
    assert (cfg.block_m, cfg.block_n, cfg.split_k) == (128, 128, 1)
    _, qw, bias = make(scheme, n, k)
    x = torch.randn(300, k).to(torch.bfloat16)
    check(run_kernel(x, qw, bias, None), x, qw, bias, None)


@pytest.fixture
def gemm_launches(monkeypatch):
    """Counts the GEMM launches each path builds: ``{"tma": n, "pointer": n}``."""
    ql = sys.modules["mmkernels.ops.quantized_linear"]
    counts = {"tma": 0, "pointer": 0}

    def counted(path, build):
        def wrapper(*args, **kwargs):
            counts[path] += 1
            return build(*args, **kwargs)

        return wrapper

    monkeypatch.setattr(ql, "_tma_launch", counted("tma", ql._tma_launch))
    monkeypatch.setattr(ql, "_launch", counted("pointer", ql._launch))
    return counts


@pytest.mark.parametrize("block_n", [128, 256], ids=["128-wide", "256-wide-two-halves"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("m,k,n", [(300, 208, 136), (257, 512, 300)])
def test_fp8_tma_path(m, k, n, bias, block_n, gemm_launches, monkeypatch):
    """fp8 at M > 256 reads both operands through TMA descriptors (sm_90+; the interpreter
    runs them too): ragged row, column and K tiles (208 = 128 + 80) come from the
    descriptors' zero fill, not masks; the 256-wide tile's epilogue runs in two halves."""
    ql = sys.modules["mmkernels.ops.quantized_linear"]
    original = ql.linear_config
    monkeypatch.setattr(ql, "linear_config", lambda *a, **kw: dataclasses.replace(original(*a, **kw), block_n=block_n))
    cfg = original(m, n, k, "fp8", None, 2, True)
    assert cfg.tma and (cfg.block_m, cfg.block_k, cfg.split_k) == (128, 128, 1)
    _, qw, b = make("fp8", n, k, bias=bias)
    x = nan_padded(torch.randn(m, k).to(torch.bfloat16))  # rows strided inside a NaN-filled buffer
    check(run_kernel(x, qw, b, "gelu"), x, qw, b, "gelu")
    assert gemm_launches == {"tma": 1, "pointer": 0}


def test_fp8_pointer_path_where_descriptors_cannot_run(gemm_launches):
    """No TMA below sm_90 (Ada runs fp8 with pointer loads), on ROCm, or for operands a
    descriptor cannot address (row length not a multiple of 16 bytes, misaligned weight):
    those calls take the pointer kernel and compute the same."""
    ql = sys.modules["mmkernels.ops.quantized_linear"]
    cuda = torch.device("cuda", 0)
    _, qw, bias = make("fp8", 136, 208)
    with pytest.MonkeyPatch.context() as patch:
        for cc, want in (((8, 9), False), ((9, 0), True), ((10, 0), True)):
            patch.setattr(ql, "compute_capability", lambda device, cc=cc: cc)
            assert ql._tma_ready(qw, cuda) is want, cc
        patch.setattr(torch.version, "hip", "6.4")
        assert not ql._tma_ready(qw, cuda)
    assert ql._tma_ready(qw, torch.device("cpu"))
    assert not ql._tma_ready(make("w8a16", 136, 208)[1], torch.device("cpu"))

    # K = 200: 200-byte rows; a weight view starting 8 bytes into its storage.
    _, qw200, b200 = make("fp8", 136, 200)
    storage = torch.empty(136 * 208 + 8, dtype=torch.float8_e4m3fn)
    shifted = storage[8:].view(136, 208)
    shifted.copy_(qw.packed)
    qw_shifted = dataclasses.replace(qw, packed=shifted)
    assert not ql._tma_ready(qw200, torch.device("cpu")) and not ql._tma_ready(qw_shifted, torch.device("cpu"))
    for weight, b in ((qw200, b200), (qw_shifted, bias)):
        x = torch.randn(300, weight.in_features).to(torch.bfloat16)
        check(run_kernel(x, weight, b, "silu"), x, weight, b, "silu")
    assert gemm_launches == {"tma": 0, "pointer": 2}


@pytest.mark.parametrize("scheme", SCHEMES)
def test_3d_input_and_nan_padded_strided_rows(scheme):
    """x (B, S, K) as a strided view inside a NaN-filled buffer: the kernel reads only
    its own elements (an out-of-bounds read would put NaN in the output)."""
    _, qw, bias = make(scheme, 48, 128)
    x = nan_padded(torch.randn(3, 7, 128).to(torch.bfloat16))
    assert not x.is_contiguous()
    out = run_kernel(x, qw, bias, "gelu")
    assert out.shape == (3, 7, 48)
    check(out, x, qw, bias, "gelu")


def test_empty_rows():
    _, qw, bias = make("w8a16", 16, 64)
    out = quantized_linear(torch.randn(0, 64).to(torch.bfloat16), qw, bias)
    assert out.shape == (0, 16)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_deterministic(scheme):
    _, qw, bias = make(scheme, 64, 128)
    x = torch.randn(21, 128).to(torch.bfloat16)
    assert_deterministic(lambda: run_kernel(x, qw, bias, "silu"))


def test_fp8_activation_scales_reach_the_output():
    """Rows of very different magnitude: per-token scales, not one per tensor."""
    _, qw, _ = make("fp8", 32, 64, torch.float32, bias=False)
    x = torch.randn(4, 64) * torch.tensor([1e-3, 1.0, 1e3, 0.0])[:, None]
    out = run_kernel(x, qw)
    check(out, x, qw, None, None)
    assert torch.equal(out[3], torch.zeros(32))
    xq, sx = quantize_activations_fp8(x)
    assert sx[3] == 1 and torch.equal(xq[3].float(), torch.zeros(64))


# --------------------------------------------------------------------------------------
# The reference and the format


@pytest.mark.parametrize("scheme", SCHEMES)
def test_reference_is_the_dequantized_linear(scheme):
    w, qw, bias = make(scheme, 24, 64, torch.float32)
    x = torch.randn(6, 64)
    xr = x.double()
    if scheme == "fp8":
        xq, sx = quantize_activations_fp8(x)
        xr = xq.double() * sx.double()[:, None]
    want = F.gelu(F.linear(xr, qw.dequantize(torch.float64), bias.double())).float()
    torch.testing.assert_close(reference(x, qw, bias, activation="gelu"), want, rtol=1e-6, atol=1e-6)


def test_w4a16_dequantize_rounds_like_the_kernel_and_packs_two_per_byte():
    w = torch.randn(8, 64)
    qw = quantize(w, "w4a16", group_size=32)
    codes = qw.codes()
    assert codes.min() >= 0 and codes.max() <= 15
    assert torch.equal(qw.packed, (codes[:, 0::2] + 16 * codes[:, 1::2]).to(torch.uint8))
    assert torch.equal(qw.kernel_weight(torch.bfloat16), qw.dequantize(torch.bfloat16).double())
    # Quantization error of each element is at most half a step (the zero point is exact).
    step = qw.scales.repeat_interleave(32, dim=1)
    assert ((qw.dequantize(torch.float32) - w).abs() <= step / 2 + 1e-6).all()


@pytest.mark.parametrize("scheme", SCHEMES)
def test_quantized_weight_round_trips_through_plain_tensors(scheme):
    _, qw, _ = make(scheme, 16, 64, group_size=32)
    state = {k: v.clone() for k, v in qw.tensors().items()}
    assert all(type(v) is torch.Tensor for v in state.values())
    again = QuantizedWeight.from_tensors(qw.config(), state)
    assert again.config() == qw.config() and again.shape == (16, 64)
    assert_bitwise_equal(again.dequantize(), qw.dequantize())


def test_zero_rows_dequantize_to_zero():
    w = torch.randn(4, 64)
    w[1] = 0
    for scheme in SCHEMES:
        qw = quantize(w, scheme, group_size=32)
        assert torch.equal(qw.dequantize(torch.float32)[1], torch.zeros(64)), scheme


# --------------------------------------------------------------------------------------
# Quality: SQNR of the quantized layer against the unquantized one (float64, no kernel)


def sqnr_db(out, ref):
    return float(10 * torch.log10(ref.pow(2).sum() / (out - ref).pow(2).sum()))


@pytest.mark.parametrize("scheme,group_size,floor_db", [("w8a16", 128, 38.0), ("fp8", 128, 25.0), ("w4a16", 128, 18.0)])
def test_sqnr_against_the_unquantized_layer(scheme, group_size, floor_db):
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(512, 1024, generator=gen, dtype=torch.float64) / 32
    x = torch.randn(64, 1024, generator=gen, dtype=torch.float64)
    qw = quantize(w, scheme, group_size=group_size)
    got = reference(x, qw)  # float64 activations: exact float64 math
    want = x @ w.t()
    db = sqnr_db(got, want)
    assert db >= floor_db, f"{scheme}: SQNR {db:.1f} dB < {floor_db} dB"
    # And the weight alone, for the record of where the error comes from.
    assert sqnr_db(qw.dequantize(torch.float64), w) >= floor_db


# --------------------------------------------------------------------------------------
# Heuristic


def test_block_config_per_m_range_on_real_shapes():
    # Mllama-11B projector at 16 tokens: small tiles, split-K up to ~2 waves.
    small = linear_config(16, 4096, 7680, "w4a16", 128, 2)
    assert (small.block_m, small.block_n) == (16, 64) and small.split_k > 1
    assert (4096 // 64) * small.split_k >= 264 // 2
    # LLaVA linear_1 at 576 tokens and Qwen2-VL merger at 9216: 128 x 128 tiles, no split.
    for m, k, n in ((576, 1024, 4096), (9216, 5120, 3584)):
        cfg = linear_config(m, n, k, "w8a16", None, 2)
        assert (cfg.block_m, cfg.block_n, cfg.split_k, cfg.num_warps) == (128, 128, 1, 8)
    assert linear_config(64, 4096, 1024, "fp8", None, 2).block_m == 32
    assert linear_config(200, 4096, 1024, "fp8", None, 2).block_m == 64
    # w4a16: a K tile never straddles two groups.
    for g in (32, 64, 128):
        for m in (1, 64, 256, 4096):
            cfg = linear_config(m, 4096, 3584, "w4a16", g, 2)
            assert g % cfg.block_k == 0 and cfg.k_per_split % cfg.block_k == 0
    # Tile layout (see linear_config): w8a16 unswapped at every M, w4a16 unswapped up to 16
    # rows and swapped above; fp8 has nothing to dequantize.
    for m in (1, 16, 64, 576, 9216):
        assert not linear_config(m, 4096, 7680, "w8a16", None, 2).swap_ab
        assert linear_config(m, 4096, 7680, "w4a16", 128, 2).swap_ab == (m > 16)
        assert not linear_config(m, 4096, 7680, "fp8", None, 2).swap_ab
    # fp8 with TMA (sm_90+), M > 256: 128 x 256 x 128 tiles where they still give a program
    # per SM (Qwen2-VL merger at 2304 tokens: 18 x 14 = 252), else 128 x 128 x 128 (LLaVA
    # linear_1 at 576: 5 x 16 = 80 programs of 128 x 256). Other schemes and M <= 256
    # ignore it.
    merger = linear_config(2304, 3584, 5120, "fp8", None, 2, True)
    assert merger.tma and (merger.block_m, merger.block_n, merger.block_k, merger.num_stages) == (128, 256, 128, 3)
    llava = linear_config(576, 4096, 1024, "fp8", None, 2, True)
    assert llava.tma and (llava.block_m, llava.block_n, llava.block_k, llava.num_stages) == (128, 128, 128, 4)
    assert not linear_config(576, 4096, 1024, "fp8", None, 2).tma
    assert not linear_config(256, 4096, 1024, "fp8", None, 2, True).tma
    assert not linear_config(2304, 3584, 5120, "w8a16", None, 2, True).tma
    # Deterministic: the same shape always gets the same config.
    assert linear_config(7, 5120, 5120, "fp8", None, 2) == linear_config(7, 5120, 5120, "fp8", None, 2)


def test_fp8_needs_sm89_on_cuda():
    assert CAPABILITIES["fp8"].min_compute_capability == (8, 9)
    assert CAPABILITIES["w8a16"].min_compute_capability == (8, 0)


def test_reference_backend_when_forced_states_why():
    _, qw, bias = make("w8a16", 16, 64)
    x = torch.randn(3, 64).to(torch.bfloat16)
    with force_backend(Backend.REFERENCE):
        out = quantized_linear(x, qw, bias)
    decision = recent_decisions()[-1]
    assert decision.backend is Backend.REFERENCE and "forced" in str(decision)
    assert_bitwise_equal(out, reference(x, qw, bias))


def test_float64_runs_the_reference_with_a_reason():
    _, qw, bias = make("w4a16", 16, 64, torch.float64)
    x = torch.randn(3, 64, dtype=torch.float64)
    quantized_linear(x, qw, bias)
    decision = recent_decisions()[-1]
    assert decision.backend is Backend.REFERENCE and "float64 not supported" in str(decision)


# --------------------------------------------------------------------------------------
# Bad input


def test_quantize_bad_inputs_name_the_argument():
    with pytest.raises(ValueError, match=r"scheme: expected one of \['w8a16', 'w4a16', 'fp8'\], got 'int3'"):
        quantize(torch.randn(8, 64), "int3")
    with pytest.raises(ValueError, match=r"weight: in_features \(K=96\) must be divisible by group_size=64"):
        quantize(torch.randn(8, 96), "w4a16", group_size=64)
    with pytest.raises(ValueError, match="weight: int4 packing needs an even in_features"):
        quantize(torch.randn(8, 63), "w4a16", group_size=32)
    with pytest.raises(ValueError, match=r"group_size: expected one of \(32, 64, 128\)"):
        quantize(torch.randn(8, 64), "w4a16", group_size=16)
    with pytest.raises(TypeError, match="weight: expected a float dtype"):
        quantize(torch.zeros(8, 64, dtype=torch.int32), "w8a16")
    with pytest.raises(ValueError, match=r"weight: expected \(out_features, in_features\)"):
        quantize(torch.randn(8, 4, 16), "w8a16")
    with pytest.raises(ValueError, match="weight: expected finite values"):
        quantize(torch.full((8, 64), float("nan")), "fp8")
    with pytest.raises(TypeError, match="weight: expected a torch.Tensor"):
        quantize([[1.0]], "w8a16")


_, _QW, _ = make("w8a16", 8, 64, torch.float32)
BAD = [
    ("x dtype", dict(x=torch.zeros(2, 64, dtype=torch.int32)), TypeError, "x: expected float16, bfloat16, float32"),
    ("x width", dict(x=torch.zeros(2, 63)), ValueError, r"x: expected last dim in_features=64"),
    ("x scalar", dict(x=torch.tensor(1.0)), ValueError, "x: expected \\(..., in_features\\)"),
    ("x type", dict(x=[[1.0]]), TypeError, "x: expected a torch.Tensor"),
    ("qweight type", dict(qweight=torch.zeros(8, 64)), TypeError, "qweight: expected a mmkernels.quant.QuantizedWeight"),
    ("bias shape", dict(bias=torch.zeros(9)), ValueError, r"bias: expected shape \(8,\)"),
    ("bias dtype", dict(bias=torch.zeros(8, dtype=torch.int64)), TypeError, "bias: expected a floating dtype"),
    ("bias device", dict(bias=torch.zeros(8, device="meta")), ValueError, "bias: expected device cpu"),
    ("x device", dict(x=torch.zeros(2, 64, device="meta")), ValueError, "qweight: expected device meta"),
    ("activation", dict(activation="relu"), ValueError, r"activation: expected None or one of \['gelu'"),
]


@pytest.mark.parametrize("fn", [quantized_linear, reference], ids=["op", "reference"])
@pytest.mark.parametrize("name,override,error,message", BAD, ids=[b[0] for b in BAD])
def test_bad_inputs_name_the_argument(fn, name, override, error, message):
    args = dict(x=torch.randn(2, 64), qweight=_QW, bias=None, activation=None)
    args.update(override)
    with pytest.raises(error, match=message):
        fn(args["x"], args["qweight"], args["bias"], activation=args["activation"])


def test_malformed_quantized_weight_is_refused():
    _, qw, _ = make("w4a16", 8, 64, group_size=32)
    with pytest.raises(ValueError, match=r"packed: expected torch.uint8 of shape \(8, 32\)"):
        QuantizedWeight("w4a16", qw.packed[:, :16], qw.scales, qw.zeros, 32, 64, 8, torch.bfloat16)
    with pytest.raises(ValueError, match="zeros: expected float32"):
        QuantizedWeight("w4a16", qw.packed, qw.scales, None, 32, 64, 8, torch.bfloat16)
    with pytest.raises(ValueError, match="scheme: expected one of"):
        QuantizedWeight("w2", qw.packed, qw.scales, qw.zeros, 32, 64, 8, torch.bfloat16)


@pytest.mark.parametrize("bad,error", [(64.0, TypeError), (True, TypeError), ("64", TypeError), (0, ValueError),
                                       (-32, ValueError), (48, ValueError)])  # fmt: skip
def test_group_size_must_be_an_int_from_the_list(bad, error):
    """64.0 == 64 passed the membership test and failed later (a float K // group_size in
    the shapes, a float constexpr for the kernel); True == 1 likewise."""
    _, qw, _ = make("w4a16", 8, 64, group_size=64)
    with pytest.raises(error, match=r"group_size: expected (an int|a positive int|one of)"):
        quantize(torch.randn(8, 64), "w4a16", group_size=bad)
    with pytest.raises(error, match=r"group_size: expected (an int|a positive int|one of)"):
        QuantizedWeight("w4a16", qw.packed, qw.scales, qw.zeros, bad, 64, 8, torch.bfloat16)
    if error is TypeError:  # an int is required whatever the scheme, though only w4a16 uses it
        with pytest.raises(TypeError, match="group_size: expected an int"):
            quantize(torch.randn(8, 64), "w8a16", group_size=bad)


def test_in_features_not_a_multiple_of_the_group_size_is_refused():
    """K = 96 with groups of 64: the kernel read the next row's scale for the partial second
    group while the reference failed. Refused where the weight is built, in the op for a
    weight changed afterwards, and in the registered op called with raw tensors."""
    n = 8
    packed, scales = torch.zeros(n, 48, dtype=torch.uint8), torch.ones(n, 1)
    with pytest.raises(ValueError, match=r"group_size: in_features \(K=96\) must be a multiple of group_size=64"):
        QuantizedWeight("w4a16", packed, scales, torch.zeros(n, 1), 64, 96, n, torch.bfloat16)
    _, qw, bias = make("w4a16", n, 192, group_size=64)
    qw.group_size = 128  # 192 = 128 + a partial group
    x = torch.randn(3, 192).to(torch.bfloat16)
    for fn in (quantized_linear, reference):
        with pytest.raises(ValueError, match=r"qweight: in_features \(K=192\) must be a multiple of its group_size=128"):
            fn(x, qw, bias)
    x96 = torch.randn(3, 96).to(torch.bfloat16)
    with pytest.raises(ValueError, match=r"group_size: in_features \(K=96\) must be a multiple of group_size=64"):
        torch.ops.mmkernels.quantized_linear(x96, packed, scales, torch.zeros(n, 1), None, "w4a16", 64, "none")


def test_quantized_weight_fields_are_checked():
    _, qw, _ = make("w8a16", 8, 64)
    with pytest.raises(TypeError, match="in_features: expected a positive int, got float 64.0"):
        QuantizedWeight("w8a16", qw.packed, qw.scales, None, None, 64.0, 8, torch.bfloat16)
    with pytest.raises(ValueError, match=r"group_size: scheme 'w8a16' is per-channel \(None\), got 128"):
        QuantizedWeight("w8a16", qw.packed, qw.scales, None, 128, 64, 8, torch.bfloat16)


# --------------------------------------------------------------------------------------
# Scales at the ends of the float range (issue 15)

FP32 = torch.finfo(torch.float32)


def _dequantization_bound(qw, w):
    """Largest error each element may have: half a step (w8a16, w4a16) or half an e4m3
    ulp of the code times the scale (fp8: 3 mantissa bits, subnormal spacing 2^-9), plus
    float32's rounding of the dequantized product."""
    if qw.scheme == "w4a16":
        step = qw.scales.repeat_interleave(qw.group_size, dim=1)
        bound = step / 2
    elif qw.scheme == "w8a16":
        bound = qw.scales[:, None].expand_as(w) / 2
    else:
        bound = w.abs() * 2.0**-4 + qw.scales[:, None] * 2.0**-10
    return bound * (1 + 2.0**-16) + w.abs() * 2.0**-23


@pytest.mark.parametrize("magnitude", [1e-44, 1e-40, 1e-37, 3e38], ids=["1e-44", "1e-40", "1e-37", "3e38"])
@pytest.mark.parametrize("scheme", SCHEMES)
def test_extreme_ranges_dequantize_finite_and_close(scheme, magnitude):
    """Ranges whose scale underflowed (1e-44 / 15 is 0 in float32: w / s gave inf and NaN)
    or overflowed (3e38 - (-3e38) is inf in float32: scale inf, weights NaN) now have
    well-defined scales: float64 arithmetic, a floor at float32's smallest normal."""
    gen = torch.Generator().manual_seed(3)
    w = torch.rand(6, 64, generator=gen) * 2 - 1
    w[0, 0], w[0, 1] = 1.0, -1.0  # every group spans [-m, m]
    w = w * magnitude
    w[5] = 0.0  # a zero row stays exact
    qw = quantize(w, scheme, group_size=32)
    got = qw.dequantize(torch.float32)
    assert torch.isfinite(got).all() and torch.isfinite(qw.scales).all() and (qw.scales > 0).all()
    assert (qw.scales >= FP32.tiny).all()  # no subnormal scale for a GPU to flush
    assert ((got - w).abs() <= _dequantization_bound(qw, w)).all()
    assert torch.equal(got[5], torch.zeros(64))


def test_w4a16_tiny_ranges_at_the_floor_are_exact():
    """Values that are multiples of the floor scale (float32's smallest normal) within
    fifteen steps: the floor makes them exact codes."""
    w = torch.arange(-7, 8, dtype=torch.float32).repeat(2, 3)[:, :32].contiguous() * FP32.tiny
    qw = quantize(w, "w4a16", group_size=32)
    assert torch.equal(qw.scales, torch.full_like(qw.scales, FP32.tiny))
    assert torch.equal(qw.dequantize(torch.float32), w)


def test_w4a16_group_beyond_the_representable_grid_is_refused():
    """A group spanning [-max, max] of float32 has no finite int4 grid: its lowest code
    dequantizes to -8 * (2 max / 15) = -inf. Refused, naming the weight and the row."""
    w = torch.randn(3, 64)
    w[2, 5], w[2, 6] = FP32.max, -FP32.max
    with pytest.raises(QuantizationError, match=r"weight: row 2 .* cannot be quantized to w4a16: its dequantized "
                                                r"values overflow torch.float32"):  # fmt: skip
        quantize(w, "w4a16", group_size=32)
    assert issubclass(QuantizationError, ValueError)
    with pytest.raises(QuantizationError, match="weight: expected finite values"):
        quantize(torch.tensor([[1e300, 0.0]], dtype=torch.float64), "w8a16")


# --------------------------------------------------------------------------------------
# Layouts of bias and x (issue 15)


def _in_nan_buffer(t: torch.Tensor, step: int = 2) -> torch.Tensor:
    """A 1-D view with stride ``step`` into a NaN-filled buffer: reading past an element
    (as a kernel assuming unit stride does) brings NaN."""
    buf = torch.full((t.shape[0] * step,), float("nan"), dtype=t.dtype)
    buf[::step] = t
    return buf[::step]


BIAS_LAYOUTS = {
    "expanded": lambda b: b[:1].expand(b.shape[0]),  # stride 0 (torch.zeros(1).expand(N))
    "strided": lambda b: _in_nan_buffer(b),
}


@pytest.mark.parametrize("m", [5, 300], ids=["m5-splitk", "m300"])
@pytest.mark.parametrize("layout", list(BIAS_LAYOUTS))
@pytest.mark.parametrize("scheme", SCHEMES)
def test_bias_of_any_strides(scheme, layout, m):
    """The epilogue read bias[n] at bias_ptr + n: an expanded bias gave 1.7e38, a strided
    one was off by 3.3 (the neighbours), every scheme. Copied now when not unit-stride."""
    _, qw, b = make(scheme, 40, 128)
    bias = BIAS_LAYOUTS[layout](b)
    assert not bias.is_contiguous()
    x = torch.randn(m, 128).to(torch.bfloat16)
    out = run_kernel(x, qw, bias, "gelu")
    check(out, x, qw, bias, "gelu")
    assert_bitwise_equal(out, run_kernel(x, qw, bias.contiguous(), "gelu"))


X_LAYOUTS = {
    # every K element a stride 2 apart, NaN in between: copied to unit stride
    "last-dim-strided": lambda x: nan_padded(torch.stack([x, torch.full_like(x, float("nan"))], -1).flatten(-2))[..., ::2],
    # one row read M times (row stride 0): no copy
    "expanded-rows": lambda x: x[:1].expand_as(x),
    # (S, B, K) seen through a transpose: rows not evenly spaced, reshaped by a copy
    "transposed-3d": lambda x: x.reshape(3, -1, x.shape[-1]).transpose(0, 1).contiguous().transpose(0, 1),
}


@pytest.mark.parametrize("layout", list(X_LAYOUTS))
@pytest.mark.parametrize("scheme", SCHEMES)
def test_x_of_any_strides(scheme, layout):
    _, qw, bias = make(scheme, 24, 96, group_size=32)
    x = X_LAYOUTS[layout](torch.randn(9, 96).to(torch.bfloat16))
    assert not x.is_contiguous()
    out = run_kernel(x, qw, bias, "silu")
    check(out, x, qw, bias, "silu")
    assert_bitwise_equal(out, run_kernel(x.contiguous(), qw, bias, "silu"))


# --------------------------------------------------------------------------------------
# NaN and inf in the activations (issue 15)


def assert_same_non_finite(out: torch.Tensor, ref: torch.Tensor) -> None:
    """NaN where the reference has NaN, +-inf where it has +-inf, nowhere else."""
    assert torch.equal(out.isnan(), ref.isnan()), (out.isnan().sum(), ref.isnan().sum())
    assert torch.equal(out.isinf() & (out > 0), ref.isinf() & (ref > 0))
    assert torch.equal(out.isinf() & (out < 0), ref.isinf() & (ref < 0))


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("m", [6, 300], ids=["m6-splitk", "m300"])
@pytest.mark.parametrize("scheme", SCHEMES)
def test_non_finite_activations_reach_their_row_as_in_the_reference(scheme, m, value):
    """fp8 made a NaN activation finite (its per-token scale ignored the NaN, and the
    interpreter upcasts the NaN code to 480). The reference defines it: w8a16 / w4a16 follow
    IEEE arithmetic as F.linear does (an inf times a zero weight is NaN); fp8 has no finite
    per-token scale for a row holding NaN or inf, so every output of that row is NaN.
    Other rows are untouched."""
    _, qw, bias = make(scheme, 40, 128)
    x = torch.randn(m, 128).to(torch.bfloat16)
    x[1, 5] = value
    x[m - 2, 127] = value
    out = run_kernel(x, qw, bias, "gelu", finite_input=False)
    ref = reference(x, qw, bias, activation="gelu")
    assert_same_non_finite(out, ref)
    bad = torch.zeros(m, dtype=torch.bool)
    bad[[1, m - 2]] = True
    assert not out[bad].isfinite().any() and out[~bad].isfinite().all()
    if scheme == "fp8":
        assert out[bad].isnan().all()
    assert_close(out[~bad], ref[~bad], dtype=x.dtype)
    if scheme != "fp8" and value != value:  # NaN: as F.linear on the dequantized weight
        want = F.gelu(F.linear(x.double(), qw.kernel_weight(x.dtype), bias.double()))
        assert torch.equal(out.isnan(), want.isnan())


def test_tiny_activation_rows_get_the_floor_scale():
    """A row whose largest value is 1e-44 had scale 1e-44 / 448 = 0 in float32: its zeros
    became 0 / 0 = NaN codes and NaN outputs. The floor keeps the row finite."""
    _, qw, _ = make("fp8", 16, 64, torch.float32, bias=False)
    x = torch.randn(3, 64)
    x[1] = 0.0
    x[1, 7] = 1e-44
    xq, sx = quantize_activations_fp8(x)
    assert sx[1] == FP32.tiny and torch.isfinite(xq.float()).all()
    out = run_kernel(x, qw)
    check(out, x, qw, None, None)


# --------------------------------------------------------------------------------------
# Autograd and torch.compile


@pytest.mark.parametrize("scheme", ["w8a16", "w4a16"])
def test_gradients_for_x_and_bias(scheme):
    _, qw, bias = make(scheme, 24, 64, torch.float32)
    x = torch.randn(5, 64, requires_grad=True)
    bias.requires_grad_(True)
    out = quantized_linear(x, qw, bias, activation="gelu")
    upstream = torch.randn_like(out)
    gx, gb = torch.autograd.grad((out * upstream).sum(), [x, bias])
    xd = x.detach().double().requires_grad_(True)
    bd = bias.detach().double().requires_grad_(True)
    want = F.gelu(F.linear(xd, qw.kernel_weight(torch.float32), bd))
    wx, wb = torch.autograd.grad((want * upstream.double()).sum(), [xd, bd])
    torch.testing.assert_close(gx, wx.float(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(gb, wb.float(), rtol=1e-4, atol=1e-5)


def test_torch_compile_fullgraph():
    _, qw, bias = make("w4a16", 32, 64, torch.float32, group_size=32)
    x = torch.randn(2, 5, 64)

    def f(x, bias):
        return quantized_linear(x, qw, bias, activation="gelu").relu()

    compiled = torch.compile(f, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(x, bias), f(x, bias), rtol=0, atol=0)
    assert hasattr(torch.ops.mmkernels, "quantized_linear")


def test_public_names():
    assert mmkernels.quant.quantize is quantize
    assert mmkernels.ops.quantized_linear is quantized_linear


def test_fp8_row_quantization_kernel_in_the_interpreter():
    """quantize_rows_fp8_kernel (the GPU path's per-token quantization) against PyTorch's
    definition. Its scales are exact; its codes too, except where Triton 3.9's interpreter
    casts fp32 -> e4m3 wrongly: when rounding carries into the exponent it returns half the
    right power of two (126.5 -> 64, not 128), and exact ties are not rounded to even
    (21 -> 22, not 20). That is why the op quantizes activations with PyTorch under the
    interpreter; here every mismatch must be one of those two."""
    ql = sys.modules["mmkernels.ops.quantized_linear"]
    x = torch.randn(9, 200).to(torch.bfloat16) * torch.logspace(-3, 3, 9)[:, None].to(torch.bfloat16)
    xq = torch.empty(9, 200, dtype=torch.float8_e4m3fn)
    xs = torch.empty(9)
    args, meta, grid = ql._quantize_rows_launch(x, xq, xs)
    ql.kernels.quantize_rows_fp8_kernel[grid](*args, **meta)
    want_q, want_s = quantize_activations_fp8(x)
    assert_bitwise_equal(xs, want_s)
    got, want = xq.float(), want_q.float()
    bad = got != want
    assert bad.float().mean() < 0.1
    v = x.float() / want_s[:, None]  # what both cast to e4m3
    carry = (got == want / 2) & (torch.log2(want.abs()).frac() == 0)
    tie = (v - want).abs() == (v - got).abs()  # exactly halfway: PyTorch rounds to even, the interpreter not
    assert bool((carry | tie)[bad].all()), list(zip(v[bad & ~carry & ~tie].tolist(), got[bad & ~carry & ~tie].tolist()))


def _non_finite_rows(device="cpu", k=300):
    # float32: the interpreter's bf16 -> fp32 upcast mangles subnormals (9.2e-41 -> 0)
    x = torch.randn(6, k, device=device)
    x[1, 3] = float("nan")
    x[2, k - 1] = float("inf")  # the last element: past the last full 16-element vector
    x[3, 0] = -float("inf")
    x[4, 7], x[4, 8] = float("nan"), float("inf")
    x[5] = 0
    x[5, 11] = 1e-40  # a subnormal amax: the floor scale, not amax / 448
    return x


def test_fp8_row_quantization_kernel_non_finite_rows():
    """quantize_rows_fp8_kernel gives a row holding NaN or inf the scale NaN, as the
    definition does: tl.maximum / tl.max / tl.minimum drop a NaN operand by default (fmax
    semantics, in the interpreter as on a GPU), which made the NaN row's scale finite and
    its NaN -448. (Its NaN codes are not checked here: the interpreter's fp32 -> e4m3 cast
    does not produce NaN; the GPU test checks them.)"""
    ql = sys.modules["mmkernels.ops.quantized_linear"]
    x = _non_finite_rows()
    xq = torch.empty(6, 300, dtype=torch.float8_e4m3fn)
    xs = torch.empty(6)
    args, meta, grid = ql._quantize_rows_launch(x, xq, xs)
    ql.kernels.quantize_rows_fp8_kernel[grid](*args, **meta)
    want_q, want_s = quantize_activations_fp8(x)
    assert want_s[1:5].isnan().all() and want_q[1:5].float().isnan().all()
    assert want_s[5] == torch.finfo(torch.float32).tiny
    assert_bitwise_equal(xs, want_s)
    assert torch.equal(xq[5].float(), want_q[5].float())  # (finite rows' codes: the test above)


# --------------------------------------------------------------------------------------
# Compiled on a GPU at real projector sizes (tools/gpu_suite.py runs `pytest -m gpu`;
# skipped elsewhere by tests/conftest.py). Not run on the CPU machines.

GPU_SHAPES = [(1024, 4096, "gelu"), (7680, 4096, None), (5120, 3584, None), (1152, 2048, "gelu_tanh")]


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 16, 129, 576, 2304])
@pytest.mark.parametrize("k,n,activation", GPU_SHAPES, ids=[f"{k}x{n}" for k, n, _ in GPU_SHAPES])
@pytest.mark.parametrize("scheme", SCHEMES)
def test_gpu_real_shapes(scheme, k, n, activation, m):
    w = (torch.randn(n, k, device="cuda") / math.sqrt(k)).to(torch.bfloat16)
    qw = quantize(w, scheme, group_size=128)
    bias = (torch.randn(n, device="cuda") * 0.1).to(torch.bfloat16)
    x = torch.randn(m, k, device="cuda").to(torch.bfloat16)
    with poison_outputs():
        out = quantized_linear(x, qw, bias, activation=activation)
    decision = recent_decisions()[-1]
    if scheme == "fp8" and torch.cuda.get_device_capability() < (8, 9):
        assert decision.backend is Backend.REFERENCE and "compute capability" in str(decision)
    else:
        assert decision.backend is Backend.TRITON, decision
    assert not out.isnan().any()
    check(out, x, qw, bias, activation)
    again = quantized_linear(x, qw, bias, activation=activation)
    assert_bitwise_equal(again, out)


@pytest.mark.gpu
@pytest.mark.parametrize("m", [16, 2304])
@pytest.mark.parametrize("scheme", ["w8a16", "w4a16"])
def test_gpu_both_tile_layouts(scheme, m, gemm_layout):
    """Both tile layouts (LinearConfig.swap_ab), which the GPU probe times against each
    other, compiled at the Qwen2-VL merger's second linear (5120 -> 3584)."""
    w = (torch.randn(3584, 5120, device="cuda") / math.sqrt(5120)).to(torch.bfloat16)
    qw = quantize(w, scheme, group_size=128)
    x = torch.randn(m, 5120, device="cuda").to(torch.bfloat16)
    with poison_outputs():
        out = quantized_linear(x, qw, None, activation="gelu")
    assert recent_decisions()[-1].backend is Backend.TRITON
    check(out, x, qw, None, "gelu")


@pytest.mark.gpu
@pytest.mark.parametrize("m", [300, 2304])  # 128-wide and 256-wide TMA tiles
@pytest.mark.parametrize("tma", [True, False], ids=["tma", "pointer"])
def test_gpu_fp8_both_load_paths(m, tma, gemm_launches, monkeypatch):
    """fp8 at large M through TMA descriptors (sm_90+ default) and with pointer loads (what
    sm_89 runs), both compiled at the Qwen2-VL merger's second linear (5120 -> 3584)."""
    cc = torch.cuda.get_device_capability()
    if cc < (8, 9) or (tma and cc < (9, 0)):
        pytest.skip(f"needs sm_{'90' if tma else '89'}+")
    ql = sys.modules["mmkernels.ops.quantized_linear"]
    original = ql.linear_config
    monkeypatch.setattr(ql, "linear_config", lambda *a: original(*a[:6], tma))
    w = (torch.randn(3584, 5120, device="cuda") / math.sqrt(5120)).to(torch.bfloat16)
    qw = quantize(w, "fp8")
    bias = (torch.randn(3584, device="cuda") * 0.1).to(torch.bfloat16)
    x = torch.randn(m, 5120, device="cuda").to(torch.bfloat16)
    with poison_outputs():
        out = quantized_linear(x, qw, bias, activation="gelu")
    assert recent_decisions()[-1].backend is Backend.TRITON
    assert gemm_launches == ({"tma": 1, "pointer": 0} if tma else {"tma": 0, "pointer": 1})
    check(out, x, qw, bias, "gelu")
    assert_bitwise_equal(quantized_linear(x, qw, bias, activation="gelu"), out)


@pytest.mark.gpu
def test_gpu_fp8_row_quantization_matches_pytorch():
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("fp8 e4m3 kernels need sm_89+")
    ql = sys.modules["mmkernels.ops.quantized_linear"]
    x = torch.randn(300, 5120, device="cuda").to(torch.bfloat16)
    xq = torch.empty(300, 5120, dtype=torch.float8_e4m3fn, device="cuda")
    xs = torch.empty(300, device="cuda")
    args, meta, grid = ql._quantize_rows_launch(x, xq, xs)
    ql.kernels.quantize_rows_fp8_kernel[grid](*args, **meta)
    want_q, want_s = quantize_activations_fp8(x)
    torch.testing.assert_close(xs, want_s, rtol=1e-6, atol=0)
    # Triton's fp32 division may differ from PyTorch's by an ulp: a code at a rounding
    # boundary can flip, rarely.
    assert (xq.float() != want_q.float()).float().mean() < 1e-4


@pytest.mark.gpu
def test_gpu_fp8_non_finite_rows():
    """On the GPU the row quantizer's NaN handling is the compiled max.NaN / min.NaN: the
    codes of a non-finite row are NaN too, and the op's rows are NaN."""
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("fp8 e4m3 kernels need sm_89+")
    ql = sys.modules["mmkernels.ops.quantized_linear"]
    x = _non_finite_rows("cuda", k=320)  # K % 16 == 0: the TMA kernel's operand alignment
    xq = torch.empty(6, 320, dtype=torch.float8_e4m3fn, device="cuda")
    xs = torch.empty(6, device="cuda")
    args, meta, grid = ql._quantize_rows_launch(x, xq, xs)
    ql.kernels.quantize_rows_fp8_kernel[grid](*args, **meta)
    want_q, want_s = quantize_activations_fp8(x)
    assert_bitwise_equal(xs.isnan(), want_s.isnan())
    assert xq[1:5].float().isnan().all() and xs[5] == torch.finfo(torch.float32).tiny
    qw = quantize(torch.randn(64, 320, device="cuda"), "fp8")
    for m in (6, 600):  # pointer kernel (split-K) and, on sm_90, the TMA kernel
        xm = x.repeat(m // 6, 1)
        out = quantized_linear(xm, qw, None, activation="gelu")
        assert_bitwise_equal(out.isnan(), reference(xm, qw, None, activation="gelu").isnan())


def test_non_contiguous_quantized_tensors():
    """A QuantizedWeight whose tensors are views with other strides (e.g. loaded from a
    transposed store) computes the same."""
    _, qw, bias = make("w4a16", 48, 128, group_size=32)
    odd = QuantizedWeight("w4a16", qw.packed.t().contiguous().t(), qw.scales.t().contiguous().t(),
                          qw.zeros.t().contiguous().t(), 32, 128, 48, torch.bfloat16)  # fmt: skip
    assert not odd.packed.is_contiguous() and not odd.scales.is_contiguous()
    x = torch.randn(5, 128).to(torch.bfloat16)
    assert_bitwise_equal(run_kernel(x, odd, bias), run_kernel(x, qw, bias))


def test_w4a16_nibbles_to_float_by_exponent_bits_is_exact():
    """The kernel turns a nibble q into the float 2^23 + q by OR-ing in the exponent bits of
    2^23 (no int-to-float conversion instruction) and subtracts 2^23 before the zero point:
    bit for bit the (q - z) * s of the format, for integer and non-integer z alike."""
    q = torch.arange(16, dtype=torch.int32).repeat_interleave(6 * 5)
    z = torch.tensor([0.0, 3.0, 15.0, 7.5, 2.25, 14.999]).repeat(16 * 5)
    s = torch.tensor([1e-3, 0.0173, 2.5, 1e-8, 123.0]).repeat_interleave(6).repeat(16)
    from_bits = ((q | 0x4B000000).view(torch.float32) - 8388608.0 - z) * s
    assert torch.equal(from_bits, (q.to(torch.float32) - z) * s)
