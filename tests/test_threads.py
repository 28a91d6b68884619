"""Every op and a patched model called from 8 threads at once (a server's request threads,
a data loader's workers): no error, and each thread's outputs equal a single-threaded
run, on the interpreter backend and on the reference. Triton's interpreter keeps global
state while a kernel runs; the launchers serialise interpreted launches
(``backend.device_guard``)."""

from __future__ import annotations

import threading

import pytest
import torch

import mmkernels
from mmkernels.backend import Backend, force_backend
from mmkernels.ops import merge_multimodal_embeddings, patch_embed, quantized_linear, varlen_attention
from mmkernels.quant import quantize
from zoo_helpers import build_or_skip

THREADS = 8
CALLS_PER_THREAD = 3


def _cu(*offsets) -> torch.Tensor:
    return torch.tensor(offsets, dtype=torch.int32)


def _op_calls() -> dict:
    """One small call per op (several per thread below), each a zero-argument function."""
    gen = torch.Generator().manual_seed(0)
    ids = torch.tensor([[3, 7, 7, 4, 7, 2], [7, 5, 6, 7, 7, 1]])
    embeds, feats = torch.randn(2, 6, 24, generator=gen), torch.randn(6, 24, generator=gen)
    pixels, conv = torch.randn(2, 3, 28, 30, generator=gen), torch.randn(16, 3, 14, 14, generator=gen)
    conv_bias = torch.randn(16, generator=gen)
    q, kv = torch.randn(20, 4, 16, generator=gen), torch.randn(12, 2, 16, generator=gen)
    x, weight = torch.randn(5, 64, generator=gen), torch.randn(24, 64, generator=gen)
    qweights = {scheme: quantize(weight, scheme, group_size=32) for scheme in ("w8a16", "w4a16")}
    return {
        "merge": lambda: merge_multimodal_embeddings(ids, embeds, feats, 7),
        "patch_embed": lambda: patch_embed(pixels, conv, conv_bias),
        "varlen_attention": lambda: varlen_attention(q, kv, kv, _cu(0, 7, 20), _cu(0, 5, 12), 13, 7, causal=True),
        "quantized_linear/w8a16": lambda: quantized_linear(x, qweights["w8a16"], activation="gelu"),
        "quantized_linear/w4a16": lambda: quantized_linear(x, qweights["w4a16"]),
    }


def _run_in_threads(work, backend: Backend | None) -> list[list]:
    """``work()`` CALLS_PER_THREAD times in each of THREADS threads started together; the
    results per thread, and any exception re-raised."""
    barrier = threading.Barrier(THREADS)
    results: list[list] = [[] for _ in range(THREADS)]
    errors: list[BaseException] = []

    def worker(slot: int):
        try:
            barrier.wait()
            with force_backend(backend):
                for _ in range(CALLS_PER_THREAD):
                    results[slot].append(work())
        except BaseException as error:  # noqa: BLE001 - re-raised in the main thread
            errors.append(error)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return results


@pytest.mark.parametrize("backend", [None, Backend.REFERENCE], ids=["interpreter", "reference"])
def test_every_op_from_8_threads_equals_one_thread(backend):
    calls = _op_calls()

    def all_ops():
        return {name: call() for name, call in calls.items()}

    with force_backend(backend):
        single = all_ops()
    for per_thread in _run_in_threads(all_ops, backend):
        for outputs in per_thread:
            for name, out in outputs.items():
                assert torch.equal(out, single[name]), name


@pytest.mark.parametrize("backend", [None, Backend.REFERENCE], ids=["interpreter", "reference"])
def test_patched_model_from_8_threads_equals_one_thread(backend):
    """A patched tiny LLaVA (merge, CLIP patch embedding with its position-table cache, the
    "mmkernels" attention): images of two sizes alternate across threads."""
    tiny = build_or_skip("llava")
    mmkernels.patch(tiny.model)
    inputs = tiny.inputs
    with torch.no_grad(), force_backend(backend):
        single = tiny.model(**inputs).logits

    def forward():
        with torch.no_grad():
            return tiny.model(**inputs).logits

    for per_thread in _run_in_threads(forward, backend):
        for logits in per_thread:
            assert torch.equal(logits, single)
