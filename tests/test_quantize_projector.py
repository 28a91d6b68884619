"""Quantized projectors in tiny Hugging Face models (mmkernels.zoo, random weights, no
downloads): logits close to the unquantized model, the kernel (interpreter) doing the
projector's work, save_pretrained -> hf_quant.from_pretrained giving bit-identical
outputs with the config carried in the checkpoint, unpatch refusing, bad requests.
Gemma 3's projector weight is a bare (K, N) Parameter used with torch.matmul, not a
Linear: it becomes the QuantizedLinear ``mm_input_projection`` (see hf_quant)."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F

import mmkernels
from mmkernels import zoo
from mmkernels.backend import Backend, recent_decisions
from mmkernels.integrations import hf_quant
from mmkernels.integrations.engine import ORIGINALS_ATTR
from mmkernels.integrations.hf_quant import QuantizedLinear
from mmkernels.ops.quantized_linear import quantized_linear_reference
from zoo_helpers import build_or_skip

# family -> the projector Linears quantize_projector must replace (paths in the model), and
# the one whose activation it fuses.
EXPECTED = {
    "llava": (["model.multi_modal_projector.linear_1", "model.multi_modal_projector.linear_2"], "linear_1"),
    "llava_next": (["model.multi_modal_projector.linear_1", "model.multi_modal_projector.linear_2"], "linear_1"),
    "llava_onevision": (["model.multi_modal_projector.linear_1", "model.multi_modal_projector.linear_2"], "linear_1"),
    "qwen2_vl": (["model.visual.merger.mlp.0", "model.visual.merger.mlp.2"], "mlp.0"),
    "qwen2_5_vl": (["model.visual.merger.mlp.0", "model.visual.merger.mlp.2"], "mlp.0"),
    "paligemma": (["model.multi_modal_projector.linear"], None),
    "idefics3": (["model.connector.modality_projection.proj"], None),
    "mllama": (["model.multi_modal_projector"], None),
    "gemma3": (["model.multi_modal_projector.mm_input_projection"], None),
    "internvl": (["model.multi_modal_projector.linear_1", "model.multi_modal_projector.linear_2"], "linear_1"),
    "mistral3": (["model.multi_modal_projector.patch_merger.merging_layer", "model.multi_modal_projector.linear_1",
                  "model.multi_modal_projector.linear_2"], "linear_1"),
    "aya_vision": (["model.multi_modal_projector.linear_1", "model.multi_modal_projector.linear_2"], None),
    "cohere2_vision": (["model.multi_modal_projector.linear_1", "model.multi_modal_projector.linear_2"], None),
    "qwen3_5": (["model.visual.merger.linear_fc1", "model.visual.merger.linear_fc2"], "linear_fc1"),
    "llama4": (["multi_modal_projector.linear_1"], None),
}
FAMILIES = [f for f in EXPECTED if f in zoo.FAMILIES]
# The tiny models are 64 wide: w4a16 needs a group that divides K = 64.
REQUESTS = {"w8a16": "w8a16", "w4a16": {"scheme": "w4a16", "group_size": 32}, "fp8": "fp8"}


@pytest.fixture(scope="module")
def tiny_models():
    cache = {}

    def get(family):
        if family not in cache:
            cache[family] = build_or_skip(family, batch=1)
            if family == "gemma3":
                # transformers initialises this weight to zeros; the zoo fills it, else a
                # quantized projector would change nothing the logits could show.
                assert cache[family].model.model.multi_modal_projector.mm_input_projection_weight.abs().min() > 0
        return cache[family]

    return get


def quantize(model, scheme):
    request = REQUESTS[scheme]
    if isinstance(request, dict):
        return mmkernels.quantize_projector(model, request["scheme"], group_size=request["group_size"])
    return mmkernels.quantize_projector(model, request)


def logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


@pytest.mark.parametrize("scheme", list(REQUESTS))
@pytest.mark.parametrize("family", FAMILIES)
def test_quantized_projector_logits_match_the_unquantized_model(tiny_models, family, scheme):
    tiny = tiny_models(family)
    want = logits(tiny.model, tiny.inputs)
    model = copy.deepcopy(tiny.model)
    report = quantize(model, scheme)
    paths, fused = EXPECTED[family]
    assert [r.module_path for r in report.replaced] == paths
    for path in paths:
        module = model.get_submodule(path)
        assert isinstance(module, QuantizedLinear) and module.scheme == scheme
        assert module.activation == ("gelu" if fused and path.endswith(fused) else None)
    got = logits(model, tiny.inputs)
    ours = [d for d in recent_decisions() if d.op == f"quantized_linear[{scheme}]"]
    assert ours and ours[-1].backend is Backend.INTERPRETER, ours[-1:]
    cos = F.cosine_similarity(got.flatten().double(), want.flatten().double(), dim=0)
    assert cos >= 0.99, f"{family}/{scheme}: cosine {float(cos):.4f}"
    assert not torch.equal(got, want)  # the quantized projector did run


def test_fused_activation_and_state_dict_keys(tiny_models):
    model = copy.deepcopy(tiny_models("llava").model)
    before = set(model.state_dict())
    mmkernels.quantize_projector(model, "w4a16", group_size=32)
    projector = model.model.multi_modal_projector
    assert isinstance(projector.act, torch.nn.Identity)
    after = model.state_dict()
    for name in ("linear_1", "linear_2"):
        prefix = f"model.multi_modal_projector.{name}"
        assert f"{prefix}.weight" in before and f"{prefix}.weight" not in after
        assert {f"{prefix}.{t}" for t in ("packed", "scales", "zeros", "bias")} <= set(after)
        assert after[f"{prefix}.packed"].dtype == torch.uint8 and type(after[f"{prefix}.packed"]) is torch.Tensor
    assert set(after) - before == {f"model.multi_modal_projector.{n}.{t}" for n in ("linear_1", "linear_2")
                                   for t in ("packed", "scales", "zeros")}  # fmt: skip
    assert model.config.mmkernels_quantization["scheme"] == "w4a16"
    assert model.config.mmkernels_quantization["modules"]["model.multi_modal_projector.linear_1"]["activation"] == "gelu"


@pytest.mark.parametrize("family,scheme", [("llava", "w4a16"), ("qwen2_vl", "fp8"), ("idefics3", "w8a16"),
                                           ("paligemma", "fp8"), ("mllama", "w4a16"), ("gemma3", "w8a16"),
                                           ("gemma3", "w4a16"), ("gemma3", "fp8"), ("internvl", "w4a16"),
                                           ("mistral3", "w8a16"), ("qwen3_5", "fp8")])  # fmt: skip
def test_save_pretrained_then_from_pretrained_is_bit_identical(tiny_models, tmp_path, family, scheme):
    if family not in zoo.FAMILIES:
        pytest.skip(f"{family} is not in mmkernels.zoo")
    tiny = tiny_models(family)
    model = copy.deepcopy(tiny.model)
    report = mmkernels.patch(model, quantize_projector=REQUESTS[scheme])
    assert any(r.op == "mmkernels::quantized_linear" for r in report.replaced)
    want = logits(model, tiny.inputs)
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["mmkernels_quantization"]["scheme"] == scheme
    loaded = hf_quant.from_pretrained(type(tiny.model), tmp_path)
    assert type(loaded) is type(tiny.model)
    assert [n for n, m in loaded.named_modules() if isinstance(m, QuantizedLinear)] == EXPECTED[family][0]
    # Patched with the other kernels too, where the family has any (Mllama's have no spec yet).
    def patched(m):
        return sorted(n for n, sub in m.named_modules() if ORIGINALS_ATTR in sub.__dict__)

    assert patched(loaded) == patched(model)
    got = logits(loaded, tiny.inputs)
    assert torch.equal(got, want)


def test_from_pretrained_refuses_an_unquantized_checkpoint(tiny_models, tmp_path):
    tiny = tiny_models("paligemma")
    tiny.model.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="has no 'mmkernels_quantization' in its config"):
        hf_quant.from_pretrained(type(tiny.model), tmp_path)


@pytest.mark.parametrize("family", ["llava", "gemma3"])
def test_unpatch_refuses_on_a_quantized_model_and_changes_nothing(tiny_models, family):
    tiny = tiny_models(family)
    model = copy.deepcopy(tiny.model)
    mmkernels.patch(model, quantize_projector="w8a16")
    want = logits(model, tiny.inputs)
    patched = {n for n, m in model.named_modules() if ORIGINALS_ATTR in m.__dict__}
    assert patched
    with pytest.raises(RuntimeError, match="projector of this model was quantized .*cannot be restored"):
        mmkernels.unpatch(model)
    assert {n for n, m in model.named_modules() if ORIGINALS_ATTR in m.__dict__} == patched
    assert torch.equal(logits(model, tiny.inputs), want)


def test_bad_requests_fail_before_changing_anything(tiny_models):
    model = copy.deepcopy(tiny_models("llava").model)
    with pytest.raises(ValueError, match=r"quantize_projector: expected one of \['w8a16', 'w4a16', 'fp8'\], got 'int2'"):
        mmkernels.patch(model, quantize_projector="int2")
    with pytest.raises(ValueError, match=r"group_size: model.multi_modal_projector.linear_1 has in_features=64, "
                                         r"not a multiple of group_size=128"):  # fmt: skip
        mmkernels.patch(model, quantize_projector="w4a16")
    with pytest.raises(ValueError, match=r"group_size: expected one of \(32, 64, 128\)"):
        mmkernels.quantize_projector(model, "w4a16", group_size=48)
    assert not hf_quant.is_quantized(model)
    assert all(ORIGINALS_ATTR not in m.__dict__ for m in model.modules())
    assert hf_quant.quantization_config(model) is None


def test_requantizing(tiny_models):
    model = copy.deepcopy(tiny_models("paligemma").model)
    mmkernels.quantize_projector(model, "fp8")
    report = mmkernels.quantize_projector(model, "fp8")
    assert not report.replaced and [s.reason for s in report.skipped] == ["already quantized (fp8)"]
    with pytest.raises(ValueError, match="already quantized \\(fp8, group_size=None\\); it cannot be re-quantized to w8a16"):
        mmkernels.quantize_projector(model, "w8a16")


@pytest.mark.parametrize("scheme", list(REQUESTS))
def test_gemma3_parameter_becomes_a_quantized_linear(tiny_models, scheme):
    """The documented state_dict change (mm_input_projection_weight (K, N) -> the
    QuantizedLinear mm_input_projection of its (N, K) transpose, no bias), the forward
    swapped on the instance only, and the projector computing matmul by the weight the
    kernel holds (K == N in the tiny model: a transpose mistake shows only in values)."""
    tiny = tiny_models("gemma3")
    model = copy.deepcopy(tiny.model)
    projector = model.model.multi_modal_projector
    before = set(model.state_dict())
    weight = projector.mm_input_projection_weight.detach().clone()
    report = quantize(model, scheme)
    assert not report.skipped
    assert [(r.module_path, r.class_name, r.family) for r in report.replaced] == [
        ("model.multi_modal_projector.mm_input_projection", "Parameter", "Gemma 3")
    ]
    assert any("Gemma3MultiModalProjector.forward swapped on the instance" in n for n in report.replaced[0].notes)
    prefix = "model.multi_modal_projector.mm_input_projection"
    tensors = {"packed", "scales"} | ({"zeros"} if scheme == "w4a16" else set())
    after = model.state_dict()
    assert before - set(after) == {"model.multi_modal_projector.mm_input_projection_weight"}
    assert set(after) - before == {f"{prefix}.{t}" for t in tensors}
    assert all(type(after[f"{prefix}.{t}"]) is torch.Tensor for t in tensors)
    assert model.config.mmkernels_quantization["modules"] == {
        prefix: {"activation": None, "fused": None, "parameter": "mm_input_projection_weight"}
    }
    qlinear = projector.mm_input_projection
    assert isinstance(qlinear, QuantizedLinear) and qlinear.bias is None
    assert (qlinear.in_features, qlinear.out_features) == tuple(weight.shape)
    assert "mm_input_projection_weight" not in dict(projector.named_parameters())
    # the class and isinstance untouched; not recorded for unpatch (which refuses instead)
    assert type(projector).__name__ == "Gemma3MultiModalProjector"
    assert "forward" in projector.__dict__ and ORIGINALS_ATTR not in projector.__dict__
    clone = copy.deepcopy(model).model.multi_modal_projector
    assert clone.forward.__self__ is clone

    # The swapped forward: the op's float64 reference on the pooled, normed features, and
    # close to the unquantized matmul (the projector's own forward before quantization).
    generator = torch.Generator().manual_seed(0)
    vision = torch.randn(2, projector.patches_per_image**2, weight.shape[0], generator=generator)
    with torch.no_grad():
        got = projector(vision).double()
        features = hf_quant._gemma3_features(projector, vision)
        want = quantized_linear_reference(features, qlinear.qweight()).double()
        unquantized = tiny.model.model.multi_modal_projector(vision).double()
    assert got.shape == (2, 16, weight.shape[1])
    assert (got - want).norm() / want.norm() < 1e-5
    # SQNR against the unquantized projector: 8-bit codes, e4m3 weights and activations,
    # 16 levels per group of 32.
    sqnr = 20 * torch.log10(unquantized.norm() / (got - unquantized).norm())
    assert sqnr >= {"w8a16": 40, "fp8": 25, "w4a16": 18}[scheme], f"{scheme}: SQNR {float(sqnr):.1f} dB"


def test_gemma3_bad_group_size_or_unknown_forward_change_nothing(tiny_models):
    model = copy.deepcopy(tiny_models("gemma3").model)
    projector = model.model.multi_modal_projector
    with pytest.raises(ValueError, match=r"group_size: model.multi_modal_projector.mm_input_projection_weight has "
                                         r"in_features=64 \(its first dim\), not a multiple of group_size=128"):  # fmt: skip
        mmkernels.quantize_projector(model, "w4a16")
    original = projector.forward
    projector.forward = lambda vision_outputs: original(vision_outputs) * 2  # someone else's forward
    with pytest.raises(ValueError, match=r"no projector to quantize in Gemma3ForConditionalGeneration .*Gemma 3: its "
                                         r"forward does not compute matmul\(mm_soft_emb_norm"):  # fmt: skip
        mmkernels.quantize_projector(model, "w8a16")
    assert not hf_quant.is_quantized(model)
    assert "mm_input_projection_weight" in dict(projector.named_parameters())
    assert hf_quant.quantization_config(model) is None


def test_gemma3_is_no_longer_reported_as_skipped(tiny_models):
    model = copy.deepcopy(tiny_models("gemma3").model)
    report = mmkernels.patch(model, quantize_projector="w8a16")
    assert "model.multi_modal_projector.mm_input_projection" in [r.module_path for r in report.replaced]
    assert not [s for s in report.skipped if "projector" in s.module_path or "projector" in s.reason], report.skipped
    assert "gemma3" in report.supported_model_types


def test_text_only_model_has_no_projector():
    with pytest.raises(ValueError, match="no projector to quantize in Linear"):
        mmkernels.quantize_projector(torch.nn.Linear(4, 4), "w8a16")
    with pytest.raises(TypeError, match="model: expected a torch.nn.Module"):
        mmkernels.quantize_projector("llava", "w8a16")


def test_dtype_casts_keep_the_quantized_format():
    linear = torch.nn.Linear(64, 16)
    for scheme, code_dtype in (("w8a16", torch.int8), ("w4a16", torch.uint8), ("fp8", torch.float8_e4m3fn)):
        q = QuantizedLinear.from_linear(linear, scheme, group_size=32)
        codes, scales = q.packed.clone(), q.scales.clone()
        q.to(torch.bfloat16)
        assert q.packed.dtype == code_dtype and torch.equal(q.packed.view(torch.uint8), codes.view(torch.uint8))
        assert q.scales.dtype == torch.float32 and torch.equal(q.scales, scales)
        assert q.bias.dtype == torch.bfloat16
        x = torch.randn(3, 64).to(torch.bfloat16)
        assert q(x).dtype == torch.bfloat16
        assert "scheme=" in repr(q)


# --------------------------------------------------------------------------------------
# Loading is strict about every tensor (issue 15)


def _rewrite_checkpoint(path, suffix: str, edit) -> str:
    """Replace the one checkpoint tensor whose key ends with ``suffix`` by ``edit(tensor)``."""
    from safetensors.torch import load_file, save_file

    file = path / "model.safetensors"
    tensors = load_file(str(file))
    (key,) = [k for k in tensors if k.endswith(suffix)]
    tensors[key] = edit(tensors[key])
    save_file(tensors, str(file), metadata={"format": "pt"})
    return key


BAD_TENSORS = {
    # copy_ broadcast a (1,) scale over every group of every channel
    "scales-(1,)": ("linear_1.scales", lambda t: t.reshape(-1)[:1].clone(), r"expected shape \(\d+, \d+\), got \(1,\)"),
    # copy_ cast int8 codes into the uint8 buffer
    "packed-int8": ("linear_2.packed", lambda t: t.view(torch.int8).clone(), r"expected dtype torch.uint8, got torch.int8"),
    "zeros-float16": ("linear_1.zeros", lambda t: t.half(), r"expected dtype torch.float32, got torch.float16"),
    # (a bias of another shape transformers refuses itself: the key is the Linear's own)
    "bias-float64": ("linear_2.bias", lambda t: t.double(), r"expected dtype torch.float32, got torch.float64"),
}


@pytest.mark.parametrize("case", list(BAD_TENSORS))
def test_from_pretrained_refuses_a_tensor_of_another_shape_or_dtype(tiny_models, tmp_path, case):
    suffix, edit, message = BAD_TENSORS[case]
    tiny = tiny_models("llava")
    model = copy.deepcopy(tiny.model)
    mmkernels.quantize_projector(model, "w4a16", group_size=32)
    assert model.dtype == torch.float32
    model.save_pretrained(tmp_path)
    key = _rewrite_checkpoint(tmp_path, suffix, edit)
    with pytest.raises(ValueError, match=rf"model\.multi_modal_projector\.{suffix.replace('.', '[.]')} in .*: {message}"):
        hf_quant.from_pretrained(type(tiny.model), tmp_path, patch=False)
    assert key.endswith(suffix)


def test_from_pretrained_with_another_dtype_casts_only_the_bias(tiny_models, tmp_path):
    """Asking transformers for another dtype casts every floating weight, the projector's
    bias too; the quantized format's tensors keep theirs."""
    tiny = tiny_models("llava")
    model = copy.deepcopy(tiny.model)
    mmkernels.quantize_projector(model, "w8a16")
    model.save_pretrained(tmp_path)
    loaded = hf_quant.from_pretrained(type(tiny.model), tmp_path, patch=False, dtype=torch.bfloat16)
    for name in ("linear_1", "linear_2"):
        ours, saved = loaded.model.multi_modal_projector.get_submodule(name), model.model.multi_modal_projector.get_submodule(name)
        assert ours.bias.dtype == torch.bfloat16 and torch.equal(ours.bias, saved.bias.to(torch.bfloat16))
        assert torch.equal(ours.packed, saved.packed) and torch.equal(ours.scales, saved.scales)


def test_quantized_linear_state_dict_and_load_quantized_are_strict():
    """load_state_dict checks shapes but casts dtypes: int8 codes loaded into the fp8
    buffer (or float16 scales) are refused by name; load_quantized takes only a weight of
    the module's own format."""
    linear = torch.nn.Linear(64, 16)
    q = QuantizedLinear.from_linear(linear, "fp8", group_size=None)
    state = q.state_dict()
    state["packed"] = state["packed"].view(torch.int8).clone()
    with pytest.raises(RuntimeError, match=r"packed: expected dtype torch.float8_e4m3fn \(the fp8 format\), got torch.int8"):
        q.load_state_dict(state)
    state = q.state_dict()
    state["scales"] = state["scales"].half()
    with pytest.raises(RuntimeError, match="scales: expected dtype torch.float32"):
        q.load_state_dict(state)
    q.load_state_dict(q.state_dict())  # its own state loads
    from mmkernels.quant import quantize as quantize_weight

    with pytest.raises(ValueError, match=r"qw: expected \(scheme, group_size, in_features, out_features\) = "
                                         r"\('fp8', None, 64, 16\) \(this module's\), got \('w8a16', None, 64, 16\)"):  # fmt: skip
        q.load_quantized(quantize_weight(linear.weight, "w8a16"))


def test_group_size_must_be_an_int():
    with pytest.raises(TypeError, match="group_size: expected an int .*got float 64.0"):
        mmkernels.quantize_projector(torch.nn.Linear(64, 4), "w4a16", group_size=64.0)
    with pytest.raises(TypeError, match="group_size: expected an int"):
        mmkernels.quantize_projector(torch.nn.Linear(64, 4), {"scheme": "w4a16", "group_size": True})
    with pytest.raises(TypeError, match="group_size: expected an int"):
        QuantizedLinear(64, 4, scheme="w4a16", group_size=32.0, bias=False, activation=None, dtype=torch.float32)


def test_quantized_linear_keeps_its_quantized_weight_between_forwards():
    """The QuantizedWeight is built (and validated) once, kept while the buffers are the
    same tensors (in-place updates seen), and built anew when a buffer is replaced."""
    linear = torch.nn.Linear(64, 32)
    module = hf_quant.QuantizedLinear.from_linear(linear, "w8a16", group_size=None)
    x = torch.randn(3, 64)
    first = module(x)
    kept = module._kept_qweight()
    module(x)
    assert module._kept_qweight() is kept and kept.packed is module.packed
    with torch.no_grad():
        module.scales.mul_(2)  # in place: the kept weight sees it
    assert module._kept_qweight() is kept
    torch.testing.assert_close(module(x) - module.bias, 2 * (first - module.bias), rtol=1e-5, atol=1e-5)
    module.packed = module.packed.clone()  # replaced: built anew
    assert module._kept_qweight() is not kept and module._kept_qweight().packed is module.packed
    assert copy.deepcopy(module)._kept_qweight().packed is not module.packed
