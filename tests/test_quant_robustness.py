"""Quantized projector matmul under what callers actually pass (issue 15): random valid
layouts of x (row strides, offsets into a larger NaN-filled buffer, expanded rows, a
strided last dim, transposed 3-D views, M = 1, odd M / N / K), of the bias (contiguous,
expanded, strided inside a NaN buffer, another float dtype) and of the quantized
weight's tensors, every scheme and activation, NaN and inf in some rows, against the
reference with the op's own tolerance, outputs NaN-poisoned. Then vLLM's quantization
config (prefixes, group size, projector weights that cannot be quantized), loaded from
integrations/vllm/quant.py over stand-in vLLM modules: vLLM is not installed here
(tests_vllm/test_quant.py runs the same checks against real vLLM)."""

from __future__ import annotations

import dataclasses
import importlib.util
import logging
import math
import random
import sys
import types
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import mmkernels.integrations
from mmkernels.backend import Backend, recent_decisions
from mmkernels.ops import quantized_linear
from mmkernels.ops import quantized_linear_reference as reference
from mmkernels.quant import GROUP_SIZES, SCHEMES, QuantizedWeight, quantize
from mmkernels.testing import assert_close, nan_padded, poison_outputs

# NaN and inf inputs make numpy (the interpreter) warn about the NaN it computes, as asked.
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")

ACTIVATIONS = [None, "gelu", "gelu_tanh", "quick_gelu", "silu"]
X_DTYPES = [torch.bfloat16, torch.float16, torch.float32]


def _in_nan_buffer(t: torch.Tensor, step: int) -> torch.Tensor:
    """``t`` (1-D) as a view with stride ``step`` into a NaN-filled buffer, at an offset."""
    buf = torch.full((3 + t.shape[0] * step,), float("nan"), dtype=t.dtype)
    view = buf[3::step][: t.shape[0]]
    view.copy_(t)
    return view


def x_layout(x: torch.Tensor, layout: str) -> torch.Tensor:
    """A view equal to ``x`` (M, K) (or its (3, M/3, K) reshape) in the given layout."""
    m, k = x.shape
    if layout == "contiguous":
        return x
    if layout == "nan-padded-rows":  # rows strided inside a NaN buffer, at an offset
        return nan_padded(x, rows_before=2, rows_after=3, extra_cols=5)
    if layout == "expanded-rows":  # row stride 0: one row read M times
        return x[:1].expand(m, k)
    if layout == "strided-last-dim":  # K elements 3 apart, NaN between: copied by the op
        buf = nan_padded(torch.full((m, 3 * k), float("nan"), dtype=x.dtype), extra_cols=1)
        view = buf[:, ::3]
        view.copy_(x)
        return view
    if layout == "transposed-3d":  # (3, M / 3, K) whose leading dims are swapped in memory
        return x.reshape(3, m // 3, k).transpose(0, 1).contiguous().transpose(0, 1)
    raise AssertionError(layout)


def bias_layout(b: torch.Tensor, layout: str) -> torch.Tensor | None:
    if layout == "none":
        return None
    if layout == "contiguous":
        return b
    if layout == "expanded":  # torch.zeros(1).expand(N): stride 0
        return b[:1].expand(b.shape[0])
    if layout == "strided":
        return _in_nan_buffer(b, 2)
    if layout == "float32":  # another float dtype than x
        return b.float()
    raise AssertionError(layout)


def weight_layout(qw: QuantizedWeight, layout: str) -> QuantizedWeight:
    """The same weight with its tensors as column-major views (the op copies them)."""
    if layout == "contiguous":
        return qw
    odd = {name: t.t().contiguous().t() if t.dim() == 2 else _in_nan_buffer(t, 2) for name, t in qw.tensors().items()}
    return dataclasses.replace(qw, **odd)


def make_case(rng: random.Random, index: int) -> dict:
    scheme = SCHEMES[index % len(SCHEMES)]
    group_size = rng.choice(GROUP_SIZES) if scheme == "w4a16" else None
    if scheme == "w4a16":
        k = group_size * rng.choice([1, 2, 3])
    else:
        k = rng.choice([8, 40, 64, 72, 100, 208, 264])  # fp8 at M > 256: TMA where K % 16 == 0
    m = rng.choice([1, 1, 2, 7, 9, 33, 65, 129, 300])
    x_layouts = ["contiguous", "nan-padded-rows", "expanded-rows", "strided-last-dim"]
    if m % 3 == 0:
        x_layouts.append("transposed-3d")
    return dict(
        scheme=scheme,
        group_size=group_size,
        m=m,
        n=rng.choice([1, 3, 24, 40, 77, 136]),
        k=k,
        dtype=rng.choice(X_DTYPES),
        activation=rng.choice(ACTIVATIONS),
        x_layout=rng.choice(x_layouts),
        bias_layout=rng.choice(["none", "contiguous", "expanded", "strided", "float32"]),
        weight_layout=rng.choice(["contiguous", "contiguous", "column-major"]),
        # NaN or inf in one row (not with expanded rows: every row is the first)
        non_finite=rng.choice([None, None, None, float("nan"), float("inf"), -float("inf")]),
        seed=rng.randrange(2**31),
    )


_RNG = random.Random(15)
CASES = [make_case(_RNG, i) for i in range(72)]
# Paths that chance may miss: fp8 at M > 256 through TMA descriptors (K % 16 == 0) and
# with pointer loads (K = 100), each with a non-finite row; M = 1 split-K, expanded bias.
CASES += [
    {**CASES[2], "m": 300, "k": 208, "x_layout": "nan-padded-rows", "bias_layout": "strided", "non_finite": float("nan")},
    {**CASES[2], "m": 257, "k": 100, "x_layout": "strided-last-dim", "bias_layout": "expanded", "non_finite": float("inf")},
    {**CASES[0], "m": 1, "k": 1152, "x_layout": "contiguous", "bias_layout": "expanded", "non_finite": None},
]
assert CASES[-3]["scheme"] == CASES[-2]["scheme"] == "fp8" and CASES[-1]["scheme"] == "w8a16"


def _case_id(c: dict) -> str:
    v = c["non_finite"]
    nf = "" if v is None else "-nan" if v != v else "-inf" if v > 0 else "-neginf"
    return (f"{c['scheme']}{c['group_size'] or ''}-m{c['m']}n{c['n']}k{c['k']}-{str(c['dtype'])[6:]}-{c['activation']}"
            f"-x:{c['x_layout']}-b:{c['bias_layout']}-w:{c['weight_layout']}{nf}")  # fmt: skip


def assert_same_non_finite(out: torch.Tensor, ref: torch.Tensor) -> None:
    """NaN where the reference has NaN, +-inf where it has +-inf, nowhere else."""
    assert torch.equal(out.isnan(), ref.isnan()), (int(out.isnan().sum()), int(ref.isnan().sum()))
    assert torch.equal(out.isinf() & (out > 0), ref.isinf() & (ref > 0))
    assert torch.equal(out.isinf() & (out < 0), ref.isinf() & (ref < 0))


@pytest.mark.parametrize("case", CASES, ids=[_case_id(c) for c in CASES])
def test_random_layouts_match_the_reference(case):
    gen = torch.Generator().manual_seed(case["seed"])
    m, n, k, dtype = case["m"], case["n"], case["k"], case["dtype"]
    w = (torch.randn(n, k, generator=gen) / math.sqrt(k)).to(dtype)
    qw = weight_layout(quantize(w, case["scheme"], group_size=case["group_size"] or 128), case["weight_layout"])
    b = (torch.randn(n, generator=gen) * 0.5).to(dtype)
    x = torch.randn(m, k, generator=gen).to(dtype)
    if case["non_finite"] is not None and case["x_layout"] != "expanded-rows":
        x[m // 2, k // 3] = case["non_finite"]
    x = x_layout(x, case["x_layout"])
    bias = bias_layout(b, case["bias_layout"])

    with poison_outputs():
        out = quantized_linear(x, qw, bias, activation=case["activation"])
    decision = recent_decisions()[-1]
    assert decision.backend is Backend.INTERPRETER and decision.op == f"quantized_linear[{case['scheme']}]", decision
    ref = reference(x, qw, bias, activation=case["activation"])
    assert out.shape == ref.shape == (*x.shape[:-1], n) and out.dtype == dtype
    # Every element written (poisoned NaN shows), non-finite exactly where the reference
    # has it (a NaN / inf activation reaches its own row only), the rest within tolerance.
    assert_same_non_finite(out, ref)
    assert_close(out, ref, dtype=dtype)
    if case["non_finite"] is None or case["x_layout"] == "expanded-rows":
        assert torch.isfinite(out).all()
    else:
        rows = out.reshape(m, n)
        assert torch.isfinite(torch.cat([rows[: m // 2], rows[m // 2 + 1 :]])).all()
        if case["scheme"] == "fp8":  # no finite per-token scale for that row
            assert rows[m // 2].isnan().all()


# --------------------------------------------------------------------------------------
# vLLM's quantization config, over stand-in vLLM modules


def _vllm_stand_ins() -> dict[str, types.ModuleType]:
    """The few vLLM names integrations/vllm/quant.py imports, with the behaviour it relies
    on (vLLM 0.32): the unquantized method creates and runs an (N, K) ``weight``."""

    class LinearBase(torch.nn.Module):
        pass

    class LinearMethodBase:
        pass

    class UnquantizedLinearMethod(LinearMethodBase):
        def create_weights(self, layer, input_size_per_partition, output_partition_sizes, input_size, output_size,
                           params_dtype, **extra_weight_attrs):  # fmt: skip
            weight = torch.empty(sum(output_partition_sizes), input_size_per_partition, dtype=params_dtype)
            layer.register_parameter("weight", torch.nn.Parameter(weight, requires_grad=False))

        def process_weights_after_loading(self, layer):
            pass

        def apply(self, layer, x, bias=None):
            return F.linear(x, layer.weight, bias)

    class QuantizationConfig:
        def __init__(self):
            self.packed_modules_mapping = {}

        @staticmethod
        def get_from_keys_or(config, keys, default):
            for key in keys:
                if key in config:
                    return config[key]
            return default

    registered = {}

    def register_quantization_config(name):
        def register(cls):
            registered[name] = cls
            return cls

        return register

    def module(name, **attrs):
        mod = types.ModuleType(name)
        mod.__dict__.update(attrs)
        return mod

    layers = "vllm.model_executor.layers"
    return {
        "vllm": module("vllm"),
        "vllm.model_executor": module("vllm.model_executor"),
        layers: module(layers),
        f"{layers}.linear": module(f"{layers}.linear", LinearBase=LinearBase, LinearMethodBase=LinearMethodBase,
                                   UnquantizedLinearMethod=UnquantizedLinearMethod,
                                   register_weight_loader_v2_supported_method=lambda cls: cls),  # fmt: skip
        f"{layers}.quantization": module(f"{layers}.quantization", register_quantization_config=register_quantization_config,
                                         _CUSTOMIZED_METHOD_TO_QUANT_CONFIG=registered),  # fmt: skip
        f"{layers}.quantization.base_config": module(f"{layers}.quantization.base_config",
                                                     QuantizationConfig=QuantizationConfig),  # fmt: skip
        # (the stored-checkpoint method's parameters; not used by these tests)
        "vllm.model_executor.parameter": module("vllm.model_executor.parameter", **{
            name: type(name, (torch.nn.Parameter,), {})
            for name in ("ChannelQuantScaleParameter", "GroupQuantScaleParameter", "ModelWeightParameter")}),  # fmt: skip
    }


@pytest.fixture
def vllm_quant(monkeypatch):
    """integrations/vllm/quant.py executed over the stand-ins, as a private module (the
    stand-ins leave sys.modules after the test; mmkernels.integrations.vllm.quant is not
    touched)."""
    for name, mod in _vllm_stand_ins().items():
        monkeypatch.setitem(sys.modules, name, mod)
    path = Path(mmkernels.integrations.__file__).parent / "vllm" / "quant.py"
    spec = importlib.util.spec_from_file_location("_mmkernels_vllm_quant_over_stand_ins", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_vllm_prefixes_must_be_a_list_of_strings(vllm_quant):
    """``"prefixes": "model.connector."`` was split into its characters: the prefix "m"
    made nearly every Linear of a model a "projector"."""
    config_cls = vllm_quant.W8A16ProjectorConfig
    with pytest.raises(TypeError, match=r"prefixes: expected a list of module-name prefixes .*got str 'model.connector.'"):
        config_cls.from_config({"prefixes": "model.connector."})
    for bad in ([], ["model.connector.", ""], ["model.connector.", 3]):
        with pytest.raises(ValueError, match="prefixes: expected a non-empty list of non-empty strings"):
            config_cls.from_config({"prefixes": bad})
    config = config_cls.from_config({"prefixes": ["model.connector."]})
    assert config.prefixes == ("model.connector.",)
    layer = sys.modules["vllm.model_executor.layers.linear"].LinearBase()
    assert type(config.get_quant_method(layer, "model.connector.modality_projection.proj")) is vllm_quant.ProjectorLinearMethod
    assert type(config.get_quant_method(layer, "model.language_model.layers.0.mlp.gate_up_proj")) is not (
        vllm_quant.ProjectorLinearMethod
    )


def test_vllm_group_size_must_be_an_int(vllm_quant):
    for cls in (vllm_quant.W4A16ProjectorConfig, vllm_quant.W8A16ProjectorConfig):
        with pytest.raises(TypeError, match=r"group_size \(mmkernels-w\da16\): expected an int"):
            cls.from_config({"group_size": 64.0})
    assert vllm_quant.W4A16ProjectorConfig.from_config({"group_size": 64}).group_size == 64
    with pytest.raises(ValueError, match=r"group_size \(mmkernels-w4a16\): expected one of"):
        vllm_quant.W4A16ProjectorConfig(group_size=100)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_vllm_projector_weight_that_cannot_be_quantized_stays_unquantized(vllm_quant, caplog, scheme):
    """A NaN in the checkpoint's projector weight failed the model load (quantize raised in
    process_weights_after_loading). The layer now stays unquantized, computing what it
    would without --quantization, with a warning naming it; its neighbour is quantized."""
    config = vllm_quant.CONFIGS[f"mmkernels-{scheme}"]()
    linear_base = sys.modules["vllm.model_executor.layers.linear"].LinearBase
    gen = torch.Generator().manual_seed(0)
    layers, weights = {}, {}
    for name, poison in (("multi_modal_projector.linear_1", float("nan")), ("multi_modal_projector.linear_2", None)):
        layer = linear_base()
        method = config.get_quant_method(layer, name)
        assert type(method) is vllm_quant.ProjectorLinearMethod
        method.create_weights(layer, 64, [32], 64, 32, torch.float32)
        w = torch.randn(32, 64, generator=gen) / 8
        if poison is not None:
            w[3, 5] = poison
        layer.weight.data.copy_(w)
        with caplog.at_level(logging.WARNING, logger="vllm.mmkernels.quant"):
            method.process_weights_after_loading(layer)
        layers[name], weights[name] = (layer, method), w
    stats = vllm_quant.stats()
    assert list(stats["quantized"]) == ["multi_modal_projector.linear_2"]
    assert "its weight cannot be quantized (weight: expected finite values" in stats["skipped"]["multi_modal_projector.linear_1"]
    assert "projector layer multi_modal_projector.linear_1 stays unquantized" in caplog.text
    x = torch.randn(5, 64, generator=gen)
    bias = torch.randn(32, generator=gen)
    layer, method = layers["multi_modal_projector.linear_1"]
    assert isinstance(layer.weight, torch.nn.Parameter)  # kept: vLLM's unquantized layer
    torch.testing.assert_close(method.apply(layer, x, bias), F.linear(x, weights["multi_modal_projector.linear_1"], bias),
                               equal_nan=True)  # fmt: skip
    layer, method = layers["multi_modal_projector.linear_2"]
    assert not hasattr(layer, "weight") and hasattr(layer, "weight_packed")
    want = quantize(weights["multi_modal_projector.linear_2"], scheme, group_size=64)
    assert torch.equal(method.apply(layer, x, bias), quantized_linear(x, want, bias))


# --------------------------------------------------------------------------------------
# The scheme table: one description of each format that every caller reads


def test_scheme_table_describes_what_quantize_makes():
    from mmkernels.quant import SCHEME_TABLE, SCHEMES, scheme_info

    assert tuple(SCHEME_TABLE) == SCHEMES
    w = torch.randn(48, 128)
    for name, info in SCHEME_TABLE.items():
        qw = quantize(w, name, group_size=64)
        assert qw.info is info
        layout = info.layout(48, 128, qw.group_size)
        assert set(layout) == set(qw.tensors())
        for buffer, (shape, dtype) in layout.items():
            t = qw.tensors()[buffer]
            assert (tuple(t.shape), t.dtype) == (shape, dtype), (name, buffer)
        assert info.weight_bytes(48, 128, qw.group_size) == sum(t.numel() * t.element_size() for t in qw.tensors().values())
        assert float(qw.codes().abs().max()) <= info.levels
    with pytest.raises(ValueError, match=r"scheme: expected one of \['w8a16', 'w4a16', 'fp8'\], got 'int3'"):
        scheme_info("int3")
    with pytest.raises(ValueError, match="mode: expected one of"):
        scheme_info(None, "mode")


def test_no_scheme_name_is_compared_outside_the_table():
    """Callers read SCHEME_TABLE's fields (grouped, quantized_activations, layout, ...);
    a comparison with a scheme name is the drift the table exists to end."""
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    pattern = re.compile(r"""(==|!=)\s*["'](w8a16|w4a16|fp8)["']|["'](w8a16|w4a16|fp8)["']\s*(==|!=)|in \(["'](w8a16|w4a16|fp8)""")
    found = []
    for folder in ("mmkernels", "integrations"):
        for path in (root / folder).rglob("*.py"):
            for number, line in enumerate(path.read_text().splitlines(), 1):
                if pattern.search(line):
                    found.append(f"{path.relative_to(root)}:{number}: {line.strip()}")
    assert not found, "\n".join(found)
