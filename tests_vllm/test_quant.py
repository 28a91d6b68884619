"""Quantized multimodal projectors in vLLM (``--quantization mmkernels-w8a16`` / ``-w4a16`` /
``-fp8``, integrations/vllm/quant.py).

Unit: the registered configs and their linear method on real vLLM linear layers built on
the CPU (a one-rank gloo group, as vLLM's own layer tests set up), against ``F.linear`` by
SQNR and bit-identical to :func:`mmkernels.ops.quantized_linear` on the same
``QuantizedWeight``; only projector prefixes are quantized. End to end: the tiny LLaVA and
Qwen2-VL served offline with the quantization on (the engine in one process).

The plugin registers the methods (``quantized_projector``, see tests_vllm/test_plugin.py);
these tests call :func:`register_quantization` themselves, here and in the probe
subprocess, so that they test the quantization alone.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

os.environ.setdefault("TRITON_INTERPRET", "1")  # before mmkernels' kernels are imported

import pytest
import torch
import torch.nn.functional as F

from conftest import HERE, vllm_env

from mmkernels.integrations.vllm import quant as vllm_quant  # noqa: E402
from mmkernels.ops.quantized_linear import quantized_linear  # noqa: E402
from mmkernels.quant import quantize  # noqa: E402

# Minimum SQNR (dB) of the layer's output against the unquantized F.linear.
SQNR_DB = {"w8a16": 38.0, "w4a16": 18.0, "fp8": 25.0}


@pytest.fixture(scope="module", autouse=True)
def registered():
    return vllm_quant.register_quantization()


@pytest.fixture(scope="module")
def dist():
    """vLLM's tensor-parallel state for one rank (its parameters read the TP rank)."""
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.distributed import init_distributed_environment, initialize_model_parallel
    from vllm.distributed.parallel_state import model_parallel_is_initialized

    if not model_parallel_is_initialized():
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        with set_current_vllm_config(VllmConfig()):
            init_distributed_environment(world_size=1, rank=0, distributed_init_method=f"tcp://127.0.0.1:{port}",
                                         local_rank=0, backend="gloo")  # fmt: skip
            initialize_model_parallel(1, 1)
    return True


def _layer(kind: str, k: int, n: int, config, prefix: str, dtype: torch.dtype, bias: bool = True):
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.model_executor.layers import linear

    with set_current_vllm_config(VllmConfig()):
        if kind == "merged":  # two layers stacked, as Molmo2's gate and up projections (n / 2 rows each)
            return linear.MergedColumnParallelLinear(k, [n // 2, n - n // 2], bias=bias, quant_config=config,
                                                     prefix=prefix, params_dtype=dtype)  # fmt: skip
        cls = {"column": linear.ColumnParallelLinear, "row": linear.RowParallelLinear,
               "replicated": linear.ReplicatedLinear}[kind]  # fmt: skip
        return cls(k, n, bias=bias, quant_config=config, prefix=prefix, params_dtype=dtype)


def _load(layer, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    """Through the layer's own weight loaders, as vLLM's model loader does (a merged
    layer: each stacked layer's rows by their shard id, as a checkpoint holds them)."""
    from vllm.model_executor.layers.linear import MergedColumnParallelLinear

    if isinstance(layer, MergedColumnParallelLinear):
        sizes = layer.output_sizes
        for shard, (w, b) in enumerate(zip(weight.split(sizes), bias.split(sizes) if bias is not None else [None] * 2)):
            layer.weight.weight_loader(layer.weight, w, shard)
            if b is not None:
                layer.bias.weight_loader(layer.bias, b, shard)
        return
    layer.weight.weight_loader(layer.weight, weight)
    if bias is not None:
        layer.bias.weight_loader(layer.bias, bias)


def _sqnr_db(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.double(), want.double()
    return float(10 * torch.log10(want.pow(2).sum() / (got - want).pow(2).sum()))


# --------------------------------------------------------------------------------------
# registration and configs


def test_registered_with_vllm(registered):
    from vllm.model_executor.layers import quantization as vq

    assert vllm_quant.register_quantization() == registered  # idempotent
    for name, cls in vllm_quant.CONFIGS.items():
        assert vq.QUANTIZATION_METHODS.count(name) == 1, name
        assert vq.get_quantization_config(name) is cls
        config = cls()
        assert config.get_name() == name
        assert torch.bfloat16 in config.get_supported_act_dtypes()
        assert torch.float32 in config.get_supported_act_dtypes()
        assert cls.get_config_filenames() == []
    assert vllm_quant.W8A16ProjectorConfig.get_min_capability() == 80
    assert vllm_quant.W4A16ProjectorConfig.get_min_capability() == 80
    assert vllm_quant.FP8ProjectorConfig.get_min_capability() == 89


def test_from_config():
    cfg = vllm_quant.W4A16ProjectorConfig.from_config({"quant_method": "mmkernels-w4a16", "group_size": 64,
                                                      "prefixes": ["proj."]})  # fmt: skip
    assert cfg.group_size == 64 and cfg.prefixes == ("proj.",)
    assert vllm_quant.W8A16ProjectorConfig.from_config({}).prefixes == vllm_quant.PROJECTOR_PREFIXES
    with pytest.raises(ValueError, match="group_size"):
        vllm_quant.W4A16ProjectorConfig(group_size=100)


def test_quantization_name_accepted_without_checkpoint_config(tiny_models):
    """``--quantization mmkernels-w8a16`` on a bf16-style checkpoint (no quantization_config):
    ModelConfig validates it and vLLM's get_quant_config builds the config with defaults."""
    from vllm.config import LoadConfig, ModelConfig
    from vllm.model_executor.model_loader.weight_utils import get_quant_config

    model_config = ModelConfig(model=str(tiny_models["llava"]), quantization="mmkernels-w8a16", dtype="float32",
                               max_model_len=512, enforce_eager=True)  # fmt: skip
    assert model_config.quantization == "mmkernels-w8a16"
    config = get_quant_config(model_config, LoadConfig())
    assert type(config) is vllm_quant.W8A16ProjectorConfig
    assert config.prefixes == vllm_quant.PROJECTOR_PREFIXES


def test_layer_selection_by_prefix(dist):
    from vllm.model_executor.layers.linear import UnquantizedLinearMethod

    config = vllm_quant.W8A16ProjectorConfig()
    projector = ["multi_modal_projector.linear_1", "multi_modal_projector.linear_2", "visual.merger.mlp.0",
                 "visual.merger.mlp.2", "model.connector.modality_projection.proj",
                 "visual.merger.linear_fc1",  # Qwen3-VL, Qwen3.5
                 "visual.merger.proj", "visual.merger.gate_up_proj", "visual.merger.down_proj",  # GLM-4.xV
                 "mm_projector.linear_1", "mm_projector.linear_2",  # Kimi K2.5
                 "vision_backbone.image_projector.merged_linear", "vision_backbone.image_projector.down_proj",  # Molmo2
                 ]  # fmt: skip
    others = ["language_model.model.layers.0.mlp.down_proj", "vision_tower.vision_model.encoder.layers.0.mlp.fc1",
              "visual.blocks.0.mlp.fc1", "multi_modal_projector_extra.linear", "lm_head",
              "visual.deepstack_merger_list.0.linear_fc1",  # Qwen3-VL's deepstack mergers: not the projector
              "vision_tower.encoder.blocks.0.mlp.fc0",  # Kimi's MoonViT
              "vision_backbone.image_vit.transformer.resblocks.0.attention.wq",  # Molmo2's ViT
              "vision_backbone.image_pooling_2d.wq"]  # fmt: skip
    for prefix in projector:
        layer = _layer("replicated", 64, 32, config, prefix, torch.float32)
        assert type(layer.quant_method) is vllm_quant.ProjectorLinearMethod, prefix
    for prefix in others:
        layer = _layer("replicated", 64, 32, config, prefix, torch.float32)
        assert type(layer.quant_method) is UnquantizedLinearMethod, prefix
    # A merged layer (Molmo2's gate and up projections, GLM's gate_up_proj) is one quantized layer.
    layer = _layer("merged", 64, 32, config, "vision_backbone.image_projector.merged_linear", torch.float32)
    assert type(layer.quant_method) is vllm_quant.ProjectorLinearMethod
    # Not a linear layer (embedding, attention, MoE): no method, vLLM's defaults apply.
    assert config.get_quant_method(torch.nn.Module(), "multi_modal_projector.norm") is None


@pytest.mark.parametrize("module,cls", [
    ("llava", "LlavaForConditionalGeneration"),
    ("qwen2_vl", "Qwen2VLForConditionalGeneration"),
    ("glm4_1v", "Glm4vForConditionalGeneration"),
    ("molmo2", "Molmo2ForConditionalGeneration"),
])  # fmt: skip
def test_projector_prefixes_are_vllms_own_connector_names(module, cls):
    """The projector of an architecture, as vLLM itself names it (``get_mm_mapping``'s
    connector, what its LoRA support targets), is under a prefix of the table: the table
    is read against the module names of the installed vLLM, not Hugging Face's."""
    import importlib

    model_class = getattr(importlib.import_module(f"vllm.model_executor.models.{module}"), cls)
    connectors = model_class.get_mm_mapping(None).connector
    assert connectors and all(vllm_quant.is_projector(c.rstrip(".") + ".layer") for c in connectors), connectors


# --------------------------------------------------------------------------------------
# the linear method against F.linear and against mmkernels' op


@pytest.mark.parametrize(
    "scheme,kind,dtype",
    [
        ("w8a16", "column", torch.float32),
        ("w8a16", "row", torch.bfloat16),
        ("w4a16", "column", torch.bfloat16),
        ("w4a16", "replicated", torch.float32),
        ("fp8", "row", torch.float32),
        ("w4a16", "merged", torch.float32),  # Molmo2's image projector, GLM-4.xV's gate_up_proj
    ],
)
def test_projector_layer(scheme, kind, dtype, dist):
    method = f"mmkernels-{scheme}"
    config = vllm_quant.CONFIGS[method]()
    k, n = 256, 96
    prefix = f"multi_modal_projector.{kind}_{scheme}_{str(dtype)[6:]}"
    layer = _layer(kind, k, n, config, prefix, dtype)
    assert isinstance(layer.quant_method, vllm_quant.ProjectorLinearMethod)
    g = torch.Generator().manual_seed(0)
    weight = (torch.randn(n, k, generator=g) * k**-0.5).to(dtype)
    bias = (torch.randn(n, generator=g) * 0.02).to(dtype)
    _load(layer, weight, bias)
    assert torch.equal(layer.weight.data, weight)  # vLLM's normal parameter took the checkpoint weight
    layer.quant_method.process_weights_after_loading(layer)

    # The bf16/fp32 weight is gone; plain tensors hold the quantized format.
    assert "weight" not in dict(layer.named_parameters())
    expected = quantize(weight, scheme, group_size=128)
    for name, t in expected.tensors().items():
        assert torch.equal(getattr(layer, f"weight_{name}"), t), name
    assert vllm_quant.stats()["quantized"][prefix]["scheme"] == scheme

    x = torch.randn(2, 7, k, generator=g).to(dtype)
    out, out_bias = layer(x)
    assert out_bias is None and out.shape == (2, 7, n) and out.dtype == dtype
    # Bit-identical to mmkernels' op on the same QuantizedWeight.
    assert torch.equal(out, quantized_linear(x, expected, bias))
    # Within the scheme's error of the unquantized layer (SQNR of x @ W^T, bias aside).
    want = F.linear(x.double(), weight.double())
    assert _sqnr_db(out.double() - bias.double(), want) >= SQNR_DB[scheme]
    # The kernel ran (the Triton interpreter on this CPU), not a fallback.
    calls = vllm_quant.stats()["calls"]
    assert calls.get(f"{prefix}/triton-interpreter", 0) >= 1, calls


def test_w4a16_group_size_fallback(dist):
    config = vllm_quant.W4A16ProjectorConfig()  # group_size 128
    g = torch.Generator().manual_seed(1)
    # in_features 64: the largest group size that divides it (64) is used.
    layer = _layer("column", 64, 40, config, "multi_modal_projector.k64", torch.float32)
    weight, bias = torch.randn(40, 64, generator=g) / 8, torch.randn(40, generator=g) / 50
    _load(layer, weight, bias)
    layer.quant_method.process_weights_after_loading(layer)
    assert layer.quant_method.group_size == 64
    x = torch.randn(5, 64, generator=g)
    assert torch.equal(layer(x)[0], quantized_linear(x, quantize(weight, "w4a16", group_size=64), bias))
    # in_features 48: no w4a16 group size divides it: the layer stays unquantized.
    layer = _layer("column", 48, 40, config, "multi_modal_projector.k48", torch.float32)
    weight = torch.randn(40, 48, generator=g)
    _load(layer, weight, bias)
    layer.quant_method.process_weights_after_loading(layer)
    assert "divisible" in vllm_quant.stats()["skipped"]["multi_modal_projector.k48"]
    x = torch.randn(5, 48, generator=g)
    torch.testing.assert_close(layer(x)[0], F.linear(x, weight, bias))


def test_from_config_refuses_a_bare_prefix_string_and_a_float_group_size():
    """``"prefixes": "model.connector."`` was split into characters ("m" matches nearly
    every layer); ``group_size: 64.0`` reached the kernel as a float."""
    with pytest.raises(TypeError, match="prefixes: expected a list of module-name prefixes"):
        vllm_quant.W8A16ProjectorConfig.from_config({"prefixes": "model.connector."})
    with pytest.raises(TypeError, match=r"group_size \(mmkernels-w4a16\): expected an int"):
        vllm_quant.W4A16ProjectorConfig.from_config({"group_size": 64.0})


@pytest.mark.parametrize("scheme", ["w8a16", "fp8"])
def test_projector_weight_that_cannot_be_quantized_stays_unquantized(scheme, dist):
    """A NaN in the projector's checkpoint weight failed the model load; the layer now
    runs unquantized (vLLM's own method, its weight as loaded), with the reason recorded."""
    config = vllm_quant.CONFIGS[f"mmkernels-{scheme}"]()
    prefix = f"multi_modal_projector.nan_{scheme}"
    layer = _layer("column", 64, 40, config, prefix, torch.float32)
    g = torch.Generator().manual_seed(2)
    weight, bias = torch.randn(40, 64, generator=g) / 8, torch.randn(40, generator=g) / 50
    weight[3, 5] = float("nan")
    _load(layer, weight, bias)
    layer.quant_method.process_weights_after_loading(layer)
    assert "cannot be quantized" in vllm_quant.stats()["skipped"][prefix]
    assert prefix not in vllm_quant.stats()["quantized"]
    x = torch.randn(5, 64, generator=g)
    torch.testing.assert_close(layer(x)[0], F.linear(x, weight, bias), equal_nan=True)


# --------------------------------------------------------------------------------------
# end to end: offline vllm.LLM with the quantization on

E2E = {
    "llava": ("mmkernels-w8a16", "w8a16", ["multi_modal_projector.linear_1", "multi_modal_projector.linear_2"]),
    "qwen2_vl": ("mmkernels-w4a16", "w4a16", ["visual.merger.mlp.0", "visual.merger.mlp.2"]),
}


@pytest.mark.parametrize("family", list(E2E))
def test_offline_quantized_projector(family, tiny_models):
    method, scheme, projector = E2E[family]
    env = vllm_env(False, VLLM_ENABLE_V1_MULTIPROCESSING="0")  # mmkernels' other kernels off: this only
    proc = subprocess.run(
        [sys.executable, str(HERE / "quant_probe.py"), str(tiny_models[family]), family, method],
        env=env, capture_output=True, text=True, timeout=420,
    )  # fmt: skip
    text = proc.stdout + proc.stderr
    assert proc.returncode == 0, text[-6000:]
    (line,) = [ln for ln in proc.stdout.splitlines() if ln.startswith("PROBE ")]
    facts = json.loads(line[len("PROBE ") :])
    assert facts["quant_name"] == method
    stats = facts["stats"]
    # Only the projector's linear layers are quantized, all of them, with the scheme asked for.
    assert sorted(stats["quantized"]) == projector, stats
    assert {v["scheme"] for v in stats["quantized"].values()} == {scheme}
    assert not stats["skipped"]
    assert stats["unquantized"] and not any(vllm_quant.is_projector(p) for p in stats["unquantized"])
    assert any(p.startswith("language_model.") for p in stats["unquantized"])
    assert any(p.startswith(("vision_tower.", "visual.blocks.")) for p in stats["unquantized"])
    # Each ran mmkernels' kernel (the interpreter here), and generation ran.
    for prefix in projector:
        assert stats["calls"].get(f"{prefix}/triton-interpreter", 0) >= 1, stats["calls"]
        assert f"quantized projector layer {prefix}" in text
    assert [len(r["token_ids"]) for r in facts["rows"]] == [8, 8, 8]


# --------------------------------------------------------------------------------------
# Tensor parallelism: each rank quantizes its own shard


# vLLM's projector layers: column-parallel ones shard the output features (N), row-parallel
# ones the input features (K).
_PROJECTOR_LAYERS = {
    "llava": {"multi_modal_projector.linear_1.weight": "column", "multi_modal_projector.linear_2.weight": "row"},
    "qwen2_vl": {"visual.merger.mlp.0.weight": "column", "visual.merger.mlp.2.weight": "row"},
}


def _per_rank_dequantized(src, dst, family: str, scheme: str, ranks: int):
    """A copy of the checkpoint ``src`` whose projector weights are what ``ranks`` ranks
    multiply by after each quantized its own shard: a column-parallel layer's shards are
    whole output rows, so per-channel scales are those of the whole weight; a row-parallel
    layer's shard is a slice of every row, with a scale of its own."""
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    tensors = load_file(str(dst / "model.safetensors"))
    for key, kind in _PROJECTOR_LAYERS[family].items():
        w = tensors[key]
        shards = [w] if kind == "column" else w.chunk(ranks, dim=1)
        tensors[key] = torch.cat([quantize(s.contiguous(), scheme).dequantize(torch.float32) for s in shards], dim=1)
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


def _offline(model, family: str, out, *, plugin: bool, tp: int = 1, quantization: str = "", with_log: bool = False):
    extra = {"VLLM_CPU_OMP_THREADS_BIND": "0|1"} if tp == 2 else {}
    proc = subprocess.run(
        [sys.executable, str(HERE / "run_offline.py"), str(model), family, str(out), str(tp), quantization],
        env=vllm_env(plugin, VLLM_ENABLE_V1_MULTIPROCESSING="0", **extra), capture_output=True, text=True,
        timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    if quantization and tp > 1:  # each rank says it quantized its own shard
        ranks = {line.split("tensor-parallel rank ")[1][0] for line in (proc.stdout + proc.stderr).splitlines()
                 if "quantized projector layer" in line and "tensor-parallel rank " in line}  # fmt: skip
        assert ranks == {str(r) for r in range(tp)}, (proc.stdout + proc.stderr)[-4000:]
    rows = json.loads(out.read_text())
    return (rows, proc.stdout + proc.stderr) if with_log else rows


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_tensor_parallel_2_quantizes_each_ranks_shard(family, tiny_models, tmp_path):
    """``--quantization mmkernels-w8a16`` with ``tensor_parallel_size=2`` (issue 21): the
    expected result is computed, not guessed. The same model unquantized, its projector
    weights replaced by what the two ranks' quantized shards dequantize to, served by one
    worker without the plugin, gives the same greedy tokens and logprobs to fp32
    rounding (the kernel scales the accumulator, the reference multiplies by the rounded
    product: 5e-7 apart when measured). A reference that quantizes the row-parallel
    layers' whole rows instead was 6e-4 apart, so the tolerance tells the two apart."""
    reference = _per_rank_dequantized(tiny_models[family], tmp_path / "reference", family, "w8a16", 2)
    want = _offline(reference, family, tmp_path / "want.json", plugin=False)
    got = _offline(tiny_models[family], family, tmp_path / "got.json", plugin=True, tp=2,
                   quantization="mmkernels-w8a16")  # fmt: skip
    for row_want, row_got in zip(want, got):
        assert row_got["token_ids"] == row_want["token_ids"], row_want["name"]
        assert row_got["logprobs"] == pytest.approx(row_want["logprobs"], abs=2e-5), row_want["name"]



# --------------------------------------------------------------------------------------
# Checkpoints saved quantized on the Hugging Face side (quant_method "mmkernels"): vLLM
# serves their stored codes


def _stored_config(scheme: str, group_size: int | None, *prefixes: str):
    modules = {f"model.{p}": {"activation": None, "fused": None} for p in prefixes}
    return vllm_quant.StoredProjectorConfig.from_config({"quant_method": "mmkernels", "version": 2, "scheme": scheme,
                                                         "group_size": group_size, "modules": modules})  # fmt: skip


@pytest.mark.parametrize("scheme,group_size,kind,dtype", [
    ("w8a16", None, "column", torch.float32), ("w8a16", None, "row", torch.bfloat16),
    ("w4a16", 64, "row", torch.float32), ("w4a16", 32, "replicated", torch.bfloat16),
    ("fp8", None, "column", torch.float32)])  # fmt: skip
def test_stored_projector_layer(scheme, group_size, kind, dtype, dist):
    """The stored tensors load through the layer's own loaders into parameters of their
    format (no full-precision weight is ever created) and the layer runs exactly
    mmkernels' op on them; other linear layers stay unquantized."""
    from vllm.model_executor.layers.linear import UnquantizedLinearMethod

    prefix = f"multi_modal_projector.stored_{kind}_{scheme}"
    config = _stored_config(scheme, group_size, prefix)
    assert config.get_name() == "mmkernels" and config.get_min_capability() == (89 if scheme == "fp8" else 80)
    k, n = 256, 96
    layer = _layer(kind, k, n, config, prefix, dtype)
    assert type(layer.quant_method) is vllm_quant.StoredProjectorLinearMethod
    assert "weight" not in dict(layer.named_parameters())
    g = torch.Generator().manual_seed(3)
    weight = (torch.randn(n, k, generator=g) * k**-0.5).to(dtype)
    bias = (torch.randn(n, generator=g) * 0.02).to(dtype)
    qw = quantize(weight, scheme, group_size=group_size or 128)
    for name, tensor in qw.tensors().items():
        param = getattr(layer, name)
        assert param.dtype == tensor.dtype and param.shape == tensor.shape, name
        param.weight_loader(param, tensor)
    layer.bias.weight_loader(layer.bias, bias)
    layer.quant_method.process_weights_after_loading(layer)
    assert vllm_quant.stats()["quantized"][prefix]["stored"] is True
    x = torch.randn(3, k, generator=g).to(dtype)
    assert torch.equal(layer(x)[0], quantized_linear(x, qw, bias))
    other = _layer(kind, k, n, config, "multi_modal_projector.not_recorded", dtype)
    assert type(other.quant_method) is UnquantizedLinearMethod


def test_stored_config_refusals(dist):
    with pytest.raises(ValueError, match=r"version \(mmkernels\): this mmkernels reads quantization_config version 2, "
                                         r"got 1"):  # fmt: skip
        vllm_quant.StoredProjectorConfig.from_config({"quant_method": "mmkernels", "version": 1, "scheme": "w8a16",
                                                      "modules": {"a": {}}})  # fmt: skip
    with pytest.raises(ValueError, match=r"modules \(mmkernels\): expected the checkpoint's quantized modules"):
        _stored_config("w8a16", None)
    with pytest.raises(ValueError, match="scheme"):
        _stored_config("int3", None, "multi_modal_projector.linear_1")
    # K = 48 cannot hold whole groups of 32 (a rank's shard under tensor parallelism, or a layer): a clear error.
    config = _stored_config("w4a16", 32, "multi_modal_projector.k48")
    with pytest.raises(ValueError, match=r"in_features 48 per tensor-parallel rank \(of 48\), not a multiple of the "
                                         r"checkpoint's group_size 32"):  # fmt: skip
        _layer("column", 48, 16, config, "multi_modal_projector.k48", torch.float32)


@pytest.fixture(scope="module")
def stored_models(tiny_models, tmp_path_factory):
    """The lane's tiny models saved quantized by the Hugging Face side. LLaVA: w4a16 in
    groups of 64 (what ``--quantization mmkernels-w4a16`` picks for its K = 64); Qwen2-VL:
    w8a16."""
    import tiny_models as tm

    root = tmp_path_factory.mktemp("stored")
    return {"llava": tm.write_quantized("llava", tiny_models["llava"], root, "w4a16", 64),
            "qwen2_vl": tm.write_quantized("qwen2_vl", tiny_models["qwen2_vl"], root, "w8a16")}  # fmt: skip


def test_stored_checkpoint_is_picked_from_its_config_and_refused_without_the_plugin(stored_models):
    from vllm.config import ModelConfig

    model_config = ModelConfig(model=str(stored_models["llava"]), dtype="float32", max_model_len=512,
                               enforce_eager=True)  # fmt: skip
    assert model_config.quantization == "mmkernels"
    code = ("import sys\nfrom vllm.config import ModelConfig\n"
            "ModelConfig(model=sys.argv[1], dtype='float32', max_model_len=512, enforce_eager=True)\n")
    proc = subprocess.run([sys.executable, "-c", code, str(stored_models["llava"])], env=vllm_env(False),
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode != 0
    assert "Unknown quantization method: mmkernels" in proc.stderr, proc.stderr[-3000:]


@pytest.mark.parametrize("family,method", [("llava", "mmkernels-w4a16"), ("qwen2_vl", "mmkernels-w8a16")])
def test_serving_a_stored_checkpoint_equals_quantizing_at_load(family, method, tiny_models, stored_models, tmp_path):
    """``vllm serve`` of the checkpoint saved quantized uses its stored codes and gives
    the tokens and logprobs of the full-precision checkpoint served with ``--quantization``
    of the same scheme (the same quantize on the same weights: the same codes)."""
    want = _offline(tiny_models[family], family, tmp_path / "want.json", plugin=True, quantization=method)
    got, text = _offline(stored_models[family], family, tmp_path / "got.json", plugin=True, with_log=True)
    assert "loaded the stored quantized projector layer" in text, text[-4000:]
    for row_want, row_got in zip(want, got):
        assert row_got["token_ids"] == row_want["token_ids"], row_want["name"]
        assert row_got["logprobs"] == row_want["logprobs"], row_want["name"]


def test_stored_checkpoint_under_tensor_parallel_2(tiny_models, stored_models, tmp_path):
    """Under ``tensor_parallel_size=2`` the ranks load their shards of the stored codes (a
    row-parallel rank its K slice with the whole row's scale: the same dequantized weight
    as one rank), so the tokens equal the one-worker run and the logprobs agree to fp32
    summation order."""
    want = _offline(stored_models["qwen2_vl"], "qwen2_vl", tmp_path / "want.json", plugin=True)
    got, text = _offline(stored_models["qwen2_vl"], "qwen2_vl", tmp_path / "got.json", plugin=True, tp=2,
                         with_log=True)  # fmt: skip
    ranks = {line.split("tensor-parallel rank ")[1][0] for line in text.splitlines()
             if "loaded the stored quantized projector layer" in line and "tensor-parallel rank " in line}  # fmt: skip
    assert ranks == {"0", "1"}, text[-4000:]
    for row_want, row_got in zip(want, got):
        assert row_got["token_ids"] == row_want["token_ids"], row_want["name"]
        assert row_got["logprobs"] == pytest.approx(row_want["logprobs"], abs=2e-5), row_want["name"]
