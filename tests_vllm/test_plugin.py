"""The plugin in fresh processes, without a model: what it registers under each
environment, its guards, the replaced layers and merge against vLLM's own code, and
its fall-through for what it does not cover."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

import logs
from conftest import HERE, vllm_env

OURS = "mmkernels.integrations.vllm.plugin"
# The adapter modules, where the classes the plugin registers are defined.
OURS_PATCH_EMBED = "mmkernels.integrations.vllm.patch_embed"
OURS_ENCODER_ATTENTION = "mmkernels.integrations.vllm.encoder_attention"
VLLM_LLAVA = "vllm.model_executor.models.llava.LlavaForConditionalGeneration"
VLLM_ENCODER_ATTENTION = "vllm.model_executor.layers.attention.mm_encoder_attention.MMEncoderAttention"


def _probe(mode: str, plugin: bool = True, **env: str) -> tuple[dict, str]:
    proc = subprocess.run(
        [sys.executable, str(HERE / "plugin_probe.py"), mode],
        env=vllm_env(plugin, **env), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    text = proc.stdout + proc.stderr
    assert proc.returncode == 0, text[-5000:]
    (line,) = [ln for ln in proc.stdout.splitlines() if ln.startswith("PROBE ")]
    return json.loads(line[len("PROBE ") :]), text


def test_replaced_layers_and_merge_match_vllm():
    facts, text = _probe("full")
    assert set(facts["returned"]) == {"merge", "patch_embed", "encoder_attention", "quantized_projector"}
    assert facts["returned_again"] == facts["returned"]
    # --quantization mmkernels-*, and "mmkernels": what a checkpoint saved quantized names
    assert facts["quantization_methods"] == ["mmkernels", "mmkernels-fp8", "mmkernels-w4a16", "mmkernels-w8a16"]
    assert len(logs.registered(text)) == 1  # one line per process, even when called twice
    assert facts["oot"] == {
        "Conv2dLayer": f"{OURS_PATCH_EMBED}.MMKernelsConv2dLayer",
        "Conv3dLayer": f"{OURS_PATCH_EMBED}.MMKernelsConv3dLayer",
        "MMEncoderAttention": f"{OURS_ENCODER_ATTENTION}.MMKernelsMMEncoderAttention",
    }
    assert facts["encoder_attention_class"] == f"{OURS_ENCODER_ATTENTION}.MMKernelsMMEncoderAttention"
    assert facts["llava_class"] == VLLM_LLAVA  # vLLM's own class: the merge is replaced under it
    # vLLM's one shared merge function is replaced, wherever a model reaches it.
    assert all(facts["shared_merge"].values()), facts["shared_merge"]
    assert "already registered" in facts["register_again"]

    layers = facts["layers"]
    for name, run in layers.items():
        assert run["shape"] == run["ref_shape"], name
        assert run["rel_err"] < 1e-5, (name, run)  # fp32 against the float64 convolution
    assert layers["conv2d_patch"]["counted"] == ["patch_embed/triton-interpreter"]
    assert layers["conv3d_patch"]["counted"] == ["patch_embed/triton-interpreter"]
    assert layers["conv2d_strided"]["counted"] == ["patch_embed/fallthrough"]  # stride != kernel
    assert layers["conv3d_video"]["counted"] == ["patch_embed/fallthrough"]  # not one patch per row
    covered = [c for c in logs.not_covered(text) if c.startswith("mmkernels patch_embed")]
    assert len(covered) == 2 and any("stride (2, 2) != kernel (4, 4)" in c for c in covered), covered

    assert facts["merge_equal"]  # bit-identical to vLLM's merge, nested 3-D and 2-D features
    msg_vllm, msg_ours = facts["merge_errors"]
    assert msg_ours == msg_vllm and "multimodal tokens to 18 placeholders" in msg_ours
    assert facts["shared_merge_equal"]  # through vLLM's shared function, as models call it
    (ran,) = [r for r in logs.ran(text) if r[0] == "merge"]
    assert ran[1:3] == ("triton-interpreter", "ProbeModel")  # the caller's class names the first call
    assert facts["stats"]["merge/triton-interpreter"] == 2


def test_encoder_attention_matches_vllm():
    """MMEncoderAttention as the plugin registers it, against vLLM's own forward_native
    (SDPA per cu_seqlens chunk) on the same layer: packed sequences, GQA, CLIP's batched
    (B, S, H * D) call, cross lengths; what the op does not cover runs vLLM's path."""
    facts, text = _probe("encoder_attention")
    assert facts["encoder_attention_class"] == f"{OURS_ENCODER_ATTENTION}.MMKernelsMMEncoderAttention"
    runs = facts["encoder_attention"]
    for name, run in runs.items():
        assert run["shape"] == run["ref_shape"], name
        assert run["rel_err"] < 1e-5, (name, run)  # fp32 against vLLM's fp32 SDPA
    for name in ("packed_cu_seqlens", "gqa_cu_seqlens", "max_seqlen_placeholder", "batched_flat", "batched_cross"):
        assert runs[name]["counted"] == ["encoder_attention/triton-interpreter"], (name, runs[name])
    for name in ("head_288", "cu_seqlens_batch_2"):
        assert runs[name]["counted"] == ["encoder_attention/fallthrough"], (name, runs[name])
    covered = [c for c in logs.not_covered(text) if c.startswith("mmkernels encoder_attention")]
    assert len(covered) == 2, covered
    assert any("head size 288 > 256" in c for c in covered) and any("batch dimension > 1" in c for c in covered)
    (ran,) = [r for r in logs.ran(text) if r[0] == "encoder_attention"]
    assert ran[1:3] == ("triton-interpreter", "MMEncoderAttention")
    # The launch's max_seqlen: exact from host cu_seqlens; vLLM's max_seqlen only where its
    # backend computes one (Qwen2.5-VL passes a placeholder 0 otherwise); else the bound.
    assert facts["max_seqlen"] == {
        "host_cu_seqlens": 64,
        "device_sdpa_placeholder": 70,
        "device_sdpa_none": 70,
        "device_flash_host_scalar": 64,
        "device_flash_int": 64,
    }


def test_kernel_selection():
    facts, text = _probe("registry", MMKERNELS_KERNELS="merge,bogus")
    assert set(facts["returned"]) == {"merge"}
    assert facts["oot"] == {}  # patch embed not selected: vLLM's conv layers untouched
    assert all(facts["shared_merge"].values()), facts["shared_merge"]
    assert facts["encoder_attention_class"] == VLLM_ENCODER_ATTENTION
    (line,) = logs.registered(text).values()
    assert "ignored unknown MMKERNELS_KERNELS entries ['bogus']" in line
    assert "not selected by MMKERNELS_KERNELS: patch_embed, encoder_attention, quantized_projector" in line
    assert facts["quantization_methods"] == []  # not selected: --quantization mmkernels-* is unknown

    # Any case, commas, semicolons or spaces (these registered nothing, said only at INFO).
    facts, text = _probe("registry", MMKERNELS_KERNELS="MERGE; Patch_Embed")
    assert set(facts["returned"]) == {"merge", "patch_embed"}
    assert set(facts["oot"]) == {"Conv2dLayer", "Conv3dLayer"}
    # An entry that names no kernel is a mistake: said at WARNING, not INFO.
    facts, text = _probe("registry", MMKERNELS_KERNELS="merges")
    assert facts["returned"] == {}
    (line,) = [ln for ln in text.splitlines() if "mmkernels vLLM plugin (pid" in ln and "registered" in ln]
    assert "WARNING" in line and "ignored unknown MMKERNELS_KERNELS entries ['merges']" in line, line

    facts, text = _probe("registry", MMKERNELS_KERNELS="patch_embed")
    assert set(facts["returned"]) == {"patch_embed"}
    assert set(facts["oot"]) == {"Conv2dLayer", "Conv3dLayer"}
    assert not any(facts["shared_merge"].values()), facts["shared_merge"]  # vLLM's own merge
    assert facts["encoder_attention_class"] == VLLM_ENCODER_ATTENTION

    facts, text = _probe("registry", MMKERNELS_KERNELS="encoder_attention")
    assert set(facts["returned"]) == {"encoder_attention"}
    assert facts["oot"] == {"MMEncoderAttention": f"{OURS_ENCODER_ATTENTION}.MMKernelsMMEncoderAttention"}
    assert facts["encoder_attention_class"] == f"{OURS_ENCODER_ATTENTION}.MMKernelsMMEncoderAttention"
    assert not any(facts["shared_merge"].values()), facts["shared_merge"]  # vLLM's own merge


@pytest.mark.parametrize("case", ["disabled", "no_interpreter"])
def test_registers_nothing(case):
    if case == "disabled":
        facts, text = _probe("registry", plugin=False)
        assert logs.disabled_pids(text)
    else:
        facts, text = _probe("registry", TRITON_INTERPRET="0")
        assert "registered nothing: CPU platform without TRITON_INTERPRET=1" in text
    assert facts["returned"] == {} and facts["oot"] == {}
    assert not any(facts["shared_merge"].values()), facts["shared_merge"]  # vLLM's own merge
    assert facts["encoder_attention_class"] == VLLM_ENCODER_ATTENTION
    assert not logs.registered(text)


def test_plugin_loads_no_transformers_model_code_beyond_vllms():
    """vLLM imports what it imports of transformers; registering the plugin (in a fresh
    process, after vLLM's own model registry is loaded) adds no transformers modeling
    module and no module of mmkernels' Hugging Face side but its quantizer registration
    (issue 21)."""
    code = (
        "import json, sys\n"
        "import vllm, vllm.model_executor.models.registry\n"
        "before = set(sys.modules)\n"
        f"from {OURS} import register\n"
        "register()\n"
        "added = sorted(set(sys.modules) - before)\n"
        "print('PROBE ' + json.dumps(added))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], env=vllm_env(True), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-5000:]
    (line,) = [ln for ln in proc.stdout.splitlines() if ln.startswith("PROBE ")]
    added = json.loads(line[len("PROBE "):])
    # Model code: a family's modeling module. (vLLM's own modules that register() imports
    # bring transformers' auto registries, transformers.models.auto.*, which are not.)
    modeling = [m for m in added if m.startswith("transformers.models.") and ".modeling_" in m]
    assert not modeling, modeling
    # The one Hugging Face-side module allowed: the quant_method "mmkernels" entry that
    # `import mmkernels` adds to transformers' quantizer registry when vLLM's imports load
    # it (transformers' quantizer base classes only; no engine, no patch rules).
    hf_side = [m for m in added if m.startswith("mmkernels.integrations.") and ".vllm" not in m
               and m != "mmkernels.integrations.hf_quantizer"]  # fmt: skip
    assert not hf_side, hf_side


def test_merge_coverage_tool_reads_which_architectures_use_the_shared_merge():
    """tools/vllm_merge_coverage.py: the interface default (LLaVA), a model's own
    embed_input_ids calling the shared function by name (Qwen3-VL's deepstack), and one
    that merges its own way (Gemma 3n), read from this vLLM."""
    proc = subprocess.run(
        [sys.executable, str(HERE.parent / "tools" / "vllm_merge_coverage.py"), "LlavaForConditionalGeneration",
         "Qwen3VLForConditionalGeneration", "Gemma3nForConditionalGeneration"],
        env=vllm_env(True), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    verdicts = {line.split()[1]: line.split()[0] for line in proc.stdout.splitlines() if line.split()[:1] in (["shared"], ["own"])}
    assert verdicts == {
        "LlavaForConditionalGeneration": "shared",
        "Qwen3VLForConditionalGeneration": "shared",
        "Gemma3nForConditionalGeneration": "own",
    }, proc.stdout
