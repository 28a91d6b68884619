"""Quantized projectors in tiny Hugging Face models (mmkernels.zoo, random weights, no
downloads): logits close to the unquantized model, the kernel (interpreter) doing the
projector's work, save_pretrained -> plain from_pretrained giving bit-identical outputs
with the quantization_config carried in the checkpoint (the transformers quantizer of
integrations/hf_quantizer.py), unpatch refusing, bad requests.
Gemma 3's projector weight is a bare (K, N) Parameter used with torch.matmul, not a
Linear: it becomes the QuantizedLinear ``mm_input_projection`` (see hf_quant)."""

from __future__ import annotations

import copy
import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import transformers

import mmkernels
from mmkernels import zoo
from mmkernels.backend import Backend, recent_decisions
from mmkernels.integrations import hf_quant
from mmkernels.integrations.engine import ORIGINALS_ATTR
from mmkernels.integrations.hf_quant import QuantizedLinear
from mmkernels.integrations.hf_quantizer import MmkernelsConfig, MmkernelsHfQuantizer
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
    # The main merger only: the deepstack mergers stay as they are.
    "qwen3_vl": (["model.visual.merger.linear_fc1", "model.visual.merger.linear_fc2"], "linear_fc1"),
    "kimi_k25": (["model.mm_projector.in_proj", "model.mm_projector.out_proj"], "in_proj"),
    "glm4v": ([f"model.visual.merger.{n}" for n in ("proj", "gate_proj", "up_proj", "down_proj")], None),
    "molmo2": ([f"model.multi_modal_projector.image_projector.{n}" for n in ("gate_proj", "up_proj", "down_proj")],
               None),
    "llama4": (["multi_modal_projector.linear_1"], None),
}
FAMILIES = [f for f in EXPECTED if f in zoo.FAMILIES]
# The tiny models are 64 wide: w4a16 needs a group that divides K = 64.
REPO = Path(__file__).resolve().parent.parent
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
    qcfg = hf_quant.quantization_config(model)
    assert qcfg["quant_method"] == "mmkernels" and qcfg["scheme"] == "w4a16" and qcfg["group_size"] == 32
    assert qcfg["modules"]["model.multi_modal_projector.linear_1"] == {"activation": "gelu", "fused": "act"}
    assert isinstance(model.config.quantization_config, MmkernelsConfig)


# Kimi K2.5 is not among these: its checkpoint does not keep experts_implementation, so
# even unquantized it reloads onto grouped_mm experts, another summation order.
@pytest.mark.parametrize("family,scheme", [("llava", "w4a16"), ("qwen2_vl", "fp8"), ("idefics3", "w8a16"),
                                           ("paligemma", "fp8"), ("mllama", "w4a16"), ("gemma3", "w8a16"),
                                           ("gemma3", "w4a16"), ("gemma3", "fp8"), ("internvl", "w4a16"),
                                           ("mistral3", "w8a16"), ("qwen3_5", "fp8"), ("qwen3_vl", "w4a16"),
                                           ("glm4v", "w8a16"), ("molmo2", "fp8")])  # fmt: skip
def test_save_pretrained_then_from_pretrained_is_bit_identical(tiny_models, tmp_path, family, scheme):
    """Plain ``from_pretrained`` (mmkernels imported) loads the stored codes into the
    quantized modules and patches the model, as the saved model was."""
    if family not in zoo.FAMILIES:
        pytest.skip(f"{family} is not in mmkernels.zoo")
    tiny = tiny_models(family)
    model = copy.deepcopy(tiny.model)
    report = mmkernels.patch(model, quantize_projector=REQUESTS[scheme])
    assert any(r.op == "mmkernels::quantized_linear" for r in report.replaced)
    want = logits(model, tiny.inputs)
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "mmkernels"
    assert config["quantization_config"]["scheme"] == scheme and "mmkernels_quantization" not in config
    loaded = type(tiny.model).from_pretrained(tmp_path)
    assert type(loaded) is type(tiny.model)
    assert [n for n, m in loaded.named_modules() if isinstance(m, QuantizedLinear)] == EXPECTED[family][0]
    assert isinstance(loaded.hf_quantizer, MmkernelsHfQuantizer)
    # Patched with the other kernels too, where the family has any (Mllama's have no spec yet).
    assert patched_paths(loaded) == patched_paths(model)
    got = logits(loaded, tiny.inputs)
    assert torch.equal(got, want)
    # ... and saved again, the same checkpoint.
    loaded.save_pretrained(tmp_path / "again")
    again = json.loads((tmp_path / "again" / "config.json").read_text())["quantization_config"]
    assert again == config["quantization_config"]


def patched_paths(model):
    return sorted(n for n, sub in model.named_modules() if ORIGINALS_ATTR in sub.__dict__)


def test_from_pretrained_alias_patch_false_and_format_1(tiny_models, tmp_path):
    """``hf_quant.from_pretrained``: ``patch=False`` loads quantized only; a format-1
    checkpoint (the ``mmkernels_quantization`` config entry) still loads, bit-identical."""
    tiny = tiny_models("llava")
    model = copy.deepcopy(tiny.model)
    mmkernels.quantize_projector(model, "w4a16", group_size=32)
    want = logits(model, tiny.inputs)
    model.save_pretrained(tmp_path)
    plain = hf_quant.from_pretrained(type(tiny.model), tmp_path, patch=False)
    assert patched_paths(plain) == [] and hf_quant.is_quantized(plain)
    assert torch.equal(logits(plain, tiny.inputs), want)

    config_file = tmp_path / "config.json"
    config = json.loads(config_file.read_text())
    entry = config.pop("quantization_config")
    config["mmkernels_quantization"] = {"version": 1, "scheme": entry["scheme"], "group_size": entry["group_size"],
                                        "modules": entry["modules"]}  # fmt: skip
    config_file.write_text(json.dumps(config))
    old = hf_quant.from_pretrained(type(tiny.model), tmp_path, patch=False)
    assert torch.equal(logits(old, tiny.inputs), want)
    assert hf_quant.quantization_config(old)["quant_method"] == "mmkernels"  # re-saved, it is format 2


def test_quantize_while_loading_a_full_precision_checkpoint(tiny_models, tmp_path):
    """``from_pretrained(..., quantization_config=MmkernelsConfig(...))`` on an ordinary
    checkpoint equals quantize_projector after loading, and saves as format 2."""
    tiny = tiny_models("qwen2_vl")
    tiny.model.save_pretrained(tmp_path / "full")
    model = copy.deepcopy(tiny.model)
    mmkernels.patch(model, quantize_projector={"scheme": "w4a16", "group_size": 32})
    loaded = type(tiny.model).from_pretrained(tmp_path / "full", quantization_config=MmkernelsConfig("w4a16", 32))
    assert [n for n, m in loaded.named_modules() if isinstance(m, QuantizedLinear)] == EXPECTED["qwen2_vl"][0]
    assert patched_paths(loaded) == patched_paths(model)
    assert torch.equal(logits(loaded, tiny.inputs), logits(model, tiny.inputs))
    loaded.save_pretrained(tmp_path / "quantized")
    saved = json.loads((tmp_path / "quantized" / "config.json").read_text())["quantization_config"]
    assert saved == dict(hf_quant.quantization_config(model)) and len(saved["modules"]) == 2


def test_mmkernels_config_refuses_bad_fields():
    with pytest.raises(ValueError, match="scheme"):
        MmkernelsConfig("int3")
    with pytest.raises(ValueError, match=r"group_size: expected one of \(32, 64, 128\)"):
        MmkernelsConfig("w4a16", 100)
    with pytest.raises(ValueError, match="version: this mmkernels reads quantization_config version 2, got 3"):
        MmkernelsConfig.from_dict({"quant_method": "mmkernels", "scheme": "w8a16", "version": 3})
    with pytest.raises(ValueError, match=r"unknown keys \['bits'\]"):
        MmkernelsConfig.from_dict({"quant_method": "mmkernels", "scheme": "w8a16", "bits": 8})
    assert MmkernelsConfig("fp8", 64).group_size is None  # per channel: no groups
    assert mmkernels.MmkernelsConfig is MmkernelsConfig


def test_a_model_quantized_by_another_method_is_refused(tiny_models):
    model = copy.deepcopy(tiny_models("llava").model)
    model.config.quantization_config = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    with pytest.raises(ValueError, match="already holds a quantization_config of quant_method 'bitsandbytes'"):
        mmkernels.quantize_projector(model, "w8a16")
    assert not hf_quant.is_quantized(model)


def test_from_pretrained_refuses_an_unquantized_checkpoint(tiny_models, tmp_path):
    tiny = tiny_models("paligemma")
    tiny.model.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="has no mmkernels quantization_config"):
        hf_quant.from_pretrained(type(tiny.model), tmp_path)


NEW_DTYPE_HOOK = tuple(int(p) for p in transformers.__version__.split(".")[:2]) >= (5, 25)
BAD_TENSORS = {
    # transformers' own size check: the key and both shapes
    # transformers' own size check (5.25; the report names the key), or mmkernels' (5.17)
    "scales-(1,)": ("linear_1.scales", lambda t: t.reshape(-1)[:1].clone(),
                    r"ignore_mismatched_sizes|linear_1\.scales: expected shape \(64, 2\), got \(1,\)"),
    # int8 codes would be another weight read as uint8
    "packed-int8": ("linear_2.packed", lambda t: t.view(torch.int8).clone(),
                    r"linear_2\.packed: expected dtype torch\.uint8 \(the w4a16 format\), got torch\.int8"),
    # transformers < 5.25 casts a floating tensor to the buffer's dtype (lossless here)
    "zeros-float16": ("linear_1.zeros", lambda t: t.half(),
                      r"linear_1\.zeros: expected dtype torch\.float32 \(the w4a16 format\), got torch\.float16"),
    "scales-missing": ("linear_2.scales", None, r"linear_2\.scales: missing from the checkpoint"),
}


def _rewrite_checkpoint(path, suffix: str, edit) -> str:
    """Replace the one checkpoint tensor whose key ends with ``suffix`` by ``edit(tensor)``
    (``edit`` None: remove it)."""
    from safetensors.torch import load_file, save_file

    file = path / "model.safetensors"
    tensors = load_file(str(file))
    (key,) = [k for k in tensors if k.endswith(suffix)]
    if edit is None:
        del tensors[key]
    else:
        tensors[key] = edit(tensors[key])
    save_file(tensors, str(file), metadata={"format": "pt"})
    return key


@pytest.mark.parametrize("case", list(BAD_TENSORS))
def test_from_pretrained_refuses_a_tensor_of_another_shape_or_dtype(tiny_models, tmp_path, caplog, case):
    suffix, edit, message = BAD_TENSORS[case]
    if case == "zeros-float16" and not NEW_DTYPE_HOOK:
        pytest.skip(f"transformers {transformers.__version__} casts floating checkpoint tensors before any quantizer "
                    f"hook (float16 -> float32 zero points: exact)")  # fmt: skip
    tiny = tiny_models("llava")
    model = copy.deepcopy(tiny.model)
    mmkernels.quantize_projector(model, "w4a16", group_size=32)
    assert model.dtype == torch.float32
    model.save_pretrained(tmp_path)
    key = _rewrite_checkpoint(tmp_path, suffix, edit)
    with caplog.at_level(logging.WARNING), pytest.raises((ValueError, RuntimeError), match=message):
        type(tiny.model).from_pretrained(tmp_path)
    if case == "scales-(1,)" and NEW_DTYPE_HOOK:  # transformers' load report names the key and both shapes
        assert re.search(r"linear_1\.scales.*MISMATCH.*\[1\].*\[64, 2\]", caplog.text), caplog.text
    assert key.endswith(suffix)


def test_from_pretrained_with_another_dtype_casts_only_the_bias(tiny_models, tmp_path):
    """Asking transformers for another dtype casts every floating weight, the projector's
    bias too; the quantized format's tensors keep theirs."""
    tiny = tiny_models("llava")
    model = copy.deepcopy(tiny.model)
    mmkernels.quantize_projector(model, "w8a16")
    model.save_pretrained(tmp_path)
    loaded = type(tiny.model).from_pretrained(tmp_path, dtype=torch.bfloat16)
    for name in ("linear_1", "linear_2"):
        ours, saved = loaded.model.multi_modal_projector.get_submodule(name), model.model.multi_modal_projector.get_submodule(name)
        assert ours.bias.dtype == torch.bfloat16 and torch.equal(ours.bias, saved.bias.to(torch.bfloat16))
        assert ours.scales.dtype == torch.float32 and ours.packed.dtype == torch.int8
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


def _run(code: str, *args) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in [str(REPO), env.get("PYTHONPATH", "")] if p)
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)  # fmt: skip


def test_plain_transformers_and_import_order(tiny_models, tmp_path):
    """In fresh processes: ``import mmkernels`` imports no transformers, and the method is
    registered once transformers imports its registry, whichever comes first; without
    mmkernels, transformers (by its policy for unknown methods) only warns, naming the
    method, and reports the projector's weights missing."""
    tiny = tiny_models("llava")
    model = copy.deepcopy(tiny.model)
    mmkernels.quantize_projector(model, "w8a16")
    model.save_pretrained(tmp_path)
    after = _run(
        "import sys, mmkernels\n"
        "assert not [m for m in sys.modules if m.split('.')[0] == 'transformers'], 'transformers imported'\n"
        "from transformers import LlavaForConditionalGeneration\n"
        "m = LlavaForConditionalGeneration.from_pretrained(sys.argv[1])\n"
        "print(type(m.model.multi_modal_projector.linear_1).__name__)\n", tmp_path)
    assert after.returncode == 0 and after.stdout.split()[-1] == "QuantizedLinear", after.stderr[-3000:]
    before = _run(
        "import sys, transformers.quantizers.auto as auto\n"
        "assert 'mmkernels' not in auto.AUTO_QUANTIZER_MAPPING\n"
        "import mmkernels\n"
        "print(auto.AUTO_QUANTIZER_MAPPING['mmkernels'].__name__, auto.AUTO_QUANTIZATION_CONFIG_MAPPING['mmkernels'].__name__)\n")
    assert before.returncode == 0 and before.stdout.split()[-2:] == ["MmkernelsHfQuantizer", "MmkernelsConfig"], \
        before.stderr[-3000:]
    without = _run(
        "import json, sys\n"
        "from transformers import LlavaForConditionalGeneration\n"
        "m, info = LlavaForConditionalGeneration.from_pretrained(sys.argv[1], output_loading_info=True)\n"
        "assert 'mmkernels' not in sys.modules\n"
        "print(json.dumps(sorted(info['missing_keys'])))\n", tmp_path)
    assert without.returncode == 0, without.stderr[-3000:]
    assert "Unknown quantization type, got mmkernels" in without.stderr
    missing = json.loads(without.stdout.strip().splitlines()[-1])
    assert {f"model.multi_modal_projector.linear_{i}.weight" for i in (1, 2)} <= set(missing)


@pytest.mark.parametrize("family", ["llava", "gemma3", "mllama"])
def test_unpatch_refuses_a_quantized_projector_and_changes_nothing(tiny_models, family):
    """The quantized layers are permanent changes (engine.record_permanent): unpatch
    refuses, naming each, and leaves every patched method and quantized layer in place."""
    if family not in zoo.FAMILIES:
        pytest.skip(f"{family} is not in mmkernels.zoo")
    tiny = tiny_models(family)
    model = copy.deepcopy(tiny.model)
    mmkernels.patch(model, quantize_projector="w8a16")
    want = logits(model, tiny.inputs)
    patched = patched_paths(model)
    records = {n: dict(sub.__dict__[ORIGINALS_ATTR]) for n, sub in model.named_modules() if n in patched}
    with pytest.raises(RuntimeError, match="cannot be undone") as refused:
        mmkernels.unpatch(model)
    for path in EXPECTED[family][0]:
        named = path if family != "gemma3" else path.rsplit(".", 1)[0] + ".mm_input_projection_weight"
        assert f"{named}: " in str(refused.value), str(refused.value)
    assert patched_paths(model) == patched
    assert all(model.get_submodule(n).__dict__[ORIGINALS_ATTR] == r for n, r in records.items())
    assert [n for n, m in model.named_modules() if isinstance(m, QuantizedLinear)] == EXPECTED[family][0]
    assert torch.equal(logits(model, tiny.inputs), want)


def test_a_loaded_quantized_checkpoint_refuses_unpatch_too(tiny_models, tmp_path):
    tiny = tiny_models("llava")
    model = copy.deepcopy(tiny.model)
    mmkernels.quantize_projector(model, "fp8")
    model.save_pretrained(tmp_path)
    loaded = hf_quant.from_pretrained(type(tiny.model), tmp_path, patch=False)
    with pytest.raises(RuntimeError, match=r"model\.multi_modal_projector\.linear_1: quantized to fp8"):
        mmkernels.unpatch(loaded)


@pytest.mark.parametrize("how", ["deepcopy", "pickle", "torch.save"])
def test_quantized_gemma3_copies_and_pickles_with_its_forward(tiny_models, how):
    """Gemma 3's projector forward is swapped through the engine, so a copy or an unpickled
    model rebuilds it (a bound method pickled by itself came back as the class's forward,
    which reads the Parameter that is gone) and still refuses unpatch."""
    import io
    import pickle

    if "gemma3" not in zoo.FAMILIES:
        pytest.skip("gemma3 is not in mmkernels.zoo")
    tiny = tiny_models("gemma3")
    model = copy.deepcopy(tiny.model)
    mmkernels.quantize_projector(model, "w8a16")
    want = logits(model, tiny.inputs)
    if how == "deepcopy":
        clone = copy.deepcopy(model)
    elif how == "pickle":
        clone = pickle.loads(pickle.dumps(model))
    else:
        buffer = io.BytesIO()
        torch.save(model, buffer)
        buffer.seek(0)
        clone = torch.load(buffer, weights_only=False)
    projector = clone.model.multi_modal_projector
    assert "mm_input_projection_weight" not in dict(projector.named_parameters())
    assert projector.forward.__self__ is projector
    assert torch.equal(logits(clone, tiny.inputs), want)
    with pytest.raises(RuntimeError, match="cannot be undone"):
        mmkernels.unpatch(clone)


def test_check_unpatchable_is_deprecated_and_still_refuses(tiny_models):
    model = copy.deepcopy(tiny_models("llava").model)
    with pytest.warns(DeprecationWarning):
        hf_quant.check_unpatchable(model)  # nothing permanent: no error
    mmkernels.quantize_projector(model, "w8a16")
    with pytest.warns(DeprecationWarning), pytest.raises(RuntimeError, match="linear_2: quantized to w8a16"):
        hf_quant.check_unpatchable(model)
