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


def _op_calls():
    """(name, make_inputs, call) of each op at small real-model shapes, bf16 on CUDA."""
    from mmkernels import ops
    from mmkernels.quant import quantize

    dev, bf16 = "cuda", torch.bfloat16
    qw = quantize(torch.randn(4096, 1024, device=dev, dtype=bf16), "w8a16")
    cu = torch.tensor([0, 64, 128], dtype=torch.int32, device=dev)

    def merge_inputs():
        ids = torch.randint(0, 32000, (1, 640), device=dev)
        ids[:, 5:581] = 32000
        return ids, torch.randn(1, 640, 4096, device=dev, dtype=bf16), list(torch.randn(576, 4096, device=dev,
                                                                                         dtype=bf16).split(288))  # fmt: skip

    return [
        ("merge", merge_inputs, lambda ids, e, f: ops.merge_multimodal_embeddings(ids, e, f, 32000, check=False)),
        ("merge-checked", merge_inputs, lambda ids, e, f: ops.merge_multimodal_embeddings(ids, e, f, 32000)),
        ("patch_embed", lambda: (torch.randn(1, 3, 384, 384, device=dev, dtype=bf16),
                                 torch.randn(1152, 3, 14, 14, device=dev, dtype=bf16)),
         lambda p, w: ops.patch_embed(p, w)),  # fmt: skip
        ("quantized_linear", lambda: (torch.randn(16, 1024, device=dev, dtype=bf16),),
         lambda x: ops.quantized_linear(x, qw, activation="gelu")),
        ("varlen_attention", lambda: tuple(torch.randn(128, 16, 64, device=dev, dtype=bf16) for _ in range(3)),
         lambda q, k, v: ops.varlen_attention(q, k, v, cu, cu, 64, 64)),
    ]


_NAMES = ["merge", "merge-checked", "patch_embed", "quantized_linear", "varlen_attention"]


def _op_call(name):
    """Built in the test (collection runs on machines without CUDA too)."""
    return next((make, call) for n, make, call in _op_calls() if n == name)


@pytest.mark.parametrize("name", _NAMES)
def test_call_plan_replay_equals_the_ordinary_path(name):
    make, call = _op_call(name)
    backend.clear_call_plans()
    call(*make())  # recorded
    inputs = make()
    with backend.poison_outputs():
        replayed = call(*inputs)
    with backend.force_backend(backend.Backend.TRITON):  # a forced scope takes the ordinary path
        ordinary = call(*inputs)
    torch.cuda.synchronize()
    assert torch.equal(replayed.view(torch.uint8), ordinary.view(torch.uint8)), name


@pytest.mark.parametrize("name", [n for n in _NAMES if n != "merge-checked"])  # check=True syncs: not capturable
def test_cuda_graph_capture_with_plans_around(name):
    """Capture takes the ordinary path (a plan's constants are not the graph's memory); a
    graph captured after plans were made replays right after they are dropped and their
    memory reused."""
    make, call = _op_call(name)
    backend.clear_call_plans()
    inputs = make()
    call(*make())  # a plan for this key exists before the capture
    want = call(*inputs).clone()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        call(*inputs)  # warm up on the side stream
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = call(*inputs)
    backend.clear_call_plans()
    junk = [torch.full((1 << 16,), 7, dtype=torch.int64, device="cuda") for _ in range(64)]  # reuse freed blocks
    graph.replay()
    torch.cuda.synchronize()
    del junk
    assert torch.equal(captured.view(torch.uint8), want.view(torch.uint8)), name
