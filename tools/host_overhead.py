#!/usr/bin/env python3
"""Host overhead of each op's Python path, measured on the CPU (no GPU needed).

    python tools/host_overhead.py [--calls N] [--top K] [--json PATH]

On the first H200 run (benchmarks/results/H200-2026-12-01-9359c97) every op took
0.1-0.2 ms at small sizes where cuBLAS took 0.012 ms: the GPU waited for the host. This
tool measures that host path without a GPU: each op's Triton launches are replaced by a
recorder (so the kernel itself costs nothing and the number of launches per call is
counted), the backend decision is forced to the compiled-kernel path, and the public op is
called on CPU tensors of real shapes. What remains is what a CUDA call pays in Python
before and between its launches: validation, the custom-op dispatch, config choice,
allocations. Triton's own launch cost (argument binding, per launch) comes on top on a
GPU and is not in these numbers.

Numbers depend on the machine (this project's CI machines are slow 2-core VMs); compare
runs on one machine. Not a test: nothing is asserted about time.
"""

from __future__ import annotations

import argparse
import cProfile
import contextlib
import importlib
import json
import pstats
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import torch  # noqa: E402

class LaunchRecorder:
    """Stands in for a ``@triton.jit`` kernel: ``kernel[grid](*args, **meta)`` is counted."""

    def __init__(self, name: str, counts: dict):
        self.name, self.counts = name, counts

    def __getitem__(self, grid):
        def launch(*args, **meta):
            self.counts[self.name] = self.counts.get(self.name, 0) + 1

        return launch


@contextlib.contextmanager
def launches_recorded():
    """Every op module's kernels replaced by recorders and its backend forced to Triton;
    yields the launch counts (kernel name -> launches)."""
    from mmkernels import backend
    from mmkernels.testing import OP_MODULES, kernels_replaced

    def forced(op, kernel, caps, device, dtypes, extra_reasons=()):
        return backend.Decision(op, backend.Backend.TRITON)

    counts: dict[str, int] = {}
    modules = [importlib.import_module(f"mmkernels.ops.{name}") for name in OP_MODULES]
    chosen = [module.choose_backend for module in modules]
    try:
        for module in modules:
            module.choose_backend = forced
        with kernels_replaced(lambda name, kernel: LaunchRecorder(name, counts)):
            yield counts
    finally:
        for module, choose in zip(modules, chosen):
            module.choose_backend = choose


def cases():
    """(op, case, callable) on CPU tensors of real shapes, small sizes first (where the
    host dominates)."""
    from mmkernels import ops
    from mmkernels.quant import quantize

    bf16 = torch.bfloat16
    out = []

    # merge: LLaVA-1.5-7B, one prompt with one 576-token image (D=4096), and 16 prompts;
    # check=False (the count check reads back what the stubbed kernel did not write).
    for prompts in (1, 16):
        ids = torch.randint(0, 32000, (prompts, 640))
        ids[:, 5:581] = 32000
        embeds = torch.empty(prompts, 640, 4096, dtype=bf16)
        feats = [torch.empty(576, 4096, dtype=bf16) for _ in range(prompts)]
        out.append(("merge", f"llava-1.5-7b/{prompts}x1img",
                    lambda ids=ids, e=embeds, f=feats: ops.merge_multimodal_embeddings(ids, e, f, 32000, check=False)))  # fmt: skip

    # patch_embed: SigLIP-so400m/14-384 batch 1; Qwen2-VL-7B 256 pre-flattened patches.
    pix = torch.empty(1, 3, 384, 384, dtype=bf16)
    w = torch.empty(1152, 3, 14, 14, dtype=bf16)
    b = torch.empty(1152, dtype=bf16)
    pos = torch.empty(729, 1152, dtype=bf16)
    out.append(("patch_embed", "siglip-so400m-14-384/b1",
                lambda: ops.patch_embed(pix, w, b, position_embedding=pos)))  # fmt: skip
    flat = torch.empty(256, 1176, dtype=bf16)
    w3 = torch.empty(1280, 3, 2, 14, 14, dtype=bf16)
    out.append(("patch_embed", "qwen2-vl-7b/256p", lambda: ops.patch_embed(flat, w3)))

    # quantized_linear: LLaVA-1.5-7B linear_1 (1024 -> 4096, GELU) at 16 and 576 tokens.
    weight = torch.randn(4096, 1024, dtype=bf16)
    bias = torch.randn(4096, dtype=bf16)
    for scheme in ("w8a16", "w4a16"):
        qw = quantize(weight, scheme, group_size=128)
        for m in (16, 576):
            x = torch.empty(m, 1024, dtype=bf16)
            out.append(("quantized_linear", f"llava-1.5-7b/linear_1/m{m}/{scheme}",
                        lambda x=x, qw=qw: ops.quantized_linear(x, qw, bias, activation="gelu")))  # fmt: skip

    # varlen_attention: Whisper-large-v3 cross-attention (20 heads, d=64), 8 sequences.
    lq, lk = [64] * 8, [1500] * 8
    q = torch.empty(sum(lq), 20, 64, dtype=bf16)
    k = torch.empty(sum(lk), 20, 64, dtype=bf16)
    cu_q = torch.tensor([0, *torch.tensor(lq).cumsum(0).tolist()], dtype=torch.int32)
    cu_k = torch.tensor([0, *torch.tensor(lk).cumsum(0).tolist()], dtype=torch.int32)
    out.append(("varlen_attention", "whisper-large-v3/cross-8x64",
                lambda: ops.varlen_attention(q, k, k, cu_q, cu_k, 64, 1500)))  # fmt: skip
    return out


def measure(fn, counts: dict, calls: int, top: int) -> dict:
    for _ in range(20):
        fn()
    counts.clear()
    started = time.perf_counter()
    for _ in range(calls):
        fn()
    host_us = 1e6 * (time.perf_counter() - started) / calls
    launches = {name: n / calls for name, n in counts.items()}
    profile = cProfile.Profile()
    profile.enable()
    for _ in range(calls):
        fn()
    profile.disable()
    stats = pstats.Stats(profile).stats
    rows = sorted(stats.items(), key=lambda kv: kv[1][2], reverse=True)[:top]
    functions = [
        f"{1e6 * tottime / calls:6.1f} us own, {ncalls / calls:4.1f}x  {'/'.join(Path(f).parts[-2:])}:{line} {func}"
        for (f, line, func), (_, ncalls, tottime, _, _) in rows
    ]
    return {"host_us": round(host_us, 1), "launches_per_call": launches, "top_functions": functions}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=300)
    parser.add_argument("--top", type=int, default=6)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    results = []
    with launches_recorded() as counts:
        for op, case, fn in cases():
            row = {"op": op, "case": case, **measure(fn, counts, args.calls, args.top)}
            results.append(row)
            launches = ", ".join(f"{k} x{v:g}" for k, v in row["launches_per_call"].items())
            print(f"{op:17s} {case:36s} {row['host_us']:8.1f} us/call  launches: {launches}")
            for line in row["top_functions"]:
                print(f"    {line}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
