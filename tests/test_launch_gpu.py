"""The direct launch layer on a GPU (run by tools/gpu_suite.py with MMK_TEST_GPU=1): the
compiled kernel launched through ``mmkernels.backend.launch`` writes exactly what Triton's
own launch path writes, across specialization changes, and replays in a CUDA graph."""

from __future__ import annotations

import pytest
import torch
from triton.runtime.jit import JITFunction

import launch_kernels
from mmkernels import backend

pytestmark = pytest.mark.gpu

SCALE_ROWS = JITFunction(launch_kernels.scale_rows)
BLOCK = 32


def _buffer(n, dtype, offset=0):
    t = torch.randn(n + 16, device="cuda").to(dtype)
    return t[offset : offset + n]


def _call(x, y, out, stride, scale):
    grid = (x.numel() // BLOCK,)
    return grid, (x, y, out, x.numel(), stride, scale, True), dict(BLOCK=BLOCK, num_warps=4)


CASES = {
    "aligned": dict(dtype=torch.float32, offset=0, stride=1, n=256),
    "misaligned": dict(dtype=torch.float32, offset=1, stride=1, n=256),
    "bf16": dict(dtype=torch.bfloat16, offset=0, stride=1, n=256),
    "fp16-misaligned": dict(dtype=torch.float16, offset=3, stride=1, n=256),
    "strided": dict(dtype=torch.float32, offset=0, stride=3, n=256),
    "new-shape": dict(dtype=torch.float32, offset=0, stride=16, n=96),
}


def test_direct_launch_equals_tritons_path_across_specializations():
    backend.reset_launchers()
    for name, case in list(CASES.items()) * 2:  # the second pass is direct for every key
        x, y = _buffer(case["n"], case["dtype"], case["offset"]), _buffer(case["n"], case["dtype"], case["offset"])
        outs = [torch.full((case["n"] * case["stride"],), float("nan"), device="cuda", dtype=case["dtype"])
                for _ in range(2)]  # fmt: skip
        grid, args, meta = _call(x, y, outs[0], case["stride"], 0.5)
        SCALE_ROWS[grid](*args, **meta)
        grid, args, meta = _call(x, y, outs[1], case["stride"], 0.5)
        backend.launch(SCALE_ROWS, grid, args, meta)
        torch.cuda.synchronize()
        assert torch.equal(outs[0].view(torch.uint8), outs[1].view(torch.uint8)), name
    direct, missed = backend.launcher_stats(SCALE_ROWS)
    assert direct >= len(CASES) and missed <= len(CASES)


def test_direct_launch_in_a_cuda_graph():
    backend.reset_launchers()
    x, y = _buffer(256, torch.float32), _buffer(256, torch.float32)
    out = torch.empty(256, device="cuda")
    grid, args, meta = _call(x, y, out, 1, 2.0)
    backend.launch(SCALE_ROWS, grid, args, meta)  # compile and key outside the capture
    backend.launch(SCALE_ROWS, grid, args, meta)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        backend.launch(SCALE_ROWS, grid, args, meta)
    assert backend.launcher_stats(SCALE_ROWS)[0] >= 2  # captured through the direct path
    for _ in range(2):
        x.copy_(torch.randn_like(x))
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, x + y * 2.0)
