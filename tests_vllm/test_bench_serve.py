"""benchmarks/serve_vllm.py (the GPU serving benchmark, plugin off vs on through
`vllm bench serve --dataset-name random-mm`), smoke-run on the CPU with the tiny LLaVA:
both runs complete with 0 failures, the "on" run's kernels ran, results are written.
CPU numbers are the interpreter's and are not looked at."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

from conftest import HERE, vllm_env

SCRIPT = HERE.parent / "benchmarks" / "serve_vllm.py"


def test_serve_benchmark_smoke(tiny_models, tmp_path):
    model = tiny_models["llava"]
    out = tmp_path / "bench"
    cmd = [
        sys.executable, str(SCRIPT), "--allow-cpu", "--model", str(model), "--out", str(out),
        "--num-prompts", "4", "--max-concurrency", "2", "--image-size", "56",
        "--input-len", "16", "--output-len", "4", "--ready-timeout", "400",
        "--extra-serve-args",
        f"--dtype float32 --enforce-eager --max-model-len 512 --chat-template {model / 'chat_template.jinja'}",
    ]  # fmt: skip
    env = vllm_env(plugin=True)
    env.pop("MMKERNELS_DISABLE")  # the script sets it per run
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-5000:]
    summary = json.loads((out / "serve_vllm.json").read_text())
    off, on = summary["runs"]["off"], summary["runs"]["on"]
    for run in (off, on):
        assert run["valid"] and run["completed"] == 4 and run["failed"] == 0, run
        assert run["mean_ttft_ms"] > 0 and run["request_throughput"] > 0, run
    assert off["kernels_ran"] == [] and off["plugin_lines"] == 0
    assert on["kernels_ran"] == [
        ["encoder_attention", "triton-interpreter"],
        ["merge", "triton-interpreter"],
        ["patch_embed", "triton-interpreter"],
    ]
    assert "| TTFT mean (ms) |" in proc.stdout


def test_serve_benchmark_skips_by_name_without_vllm(monkeypatch, capsys):
    spec = importlib.util.spec_from_file_location("serve_vllm", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "vllm" else real_find_spec(name, *a))
    assert module.main(["--out", "unused"]) == 0
    assert "[serve_vllm] skipped: vllm is not installed" in capsys.readouterr().out
