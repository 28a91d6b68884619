"""The merge kernel compiled on a GPU, at real model sizes (run by tools/gpu_suite.py)."""

from __future__ import annotations

import pytest
import torch

from mmkernels.backend import Backend, recent_decisions
from mmkernels.ops import merge_multimodal_embeddings as merge
from mmkernels.ops import merge_multimodal_embeddings_reference as reference
from mmkernels.testing import HostSyncCounter, assert_bitwise_equal, assert_deterministic, nan_padded, poison_outputs

pytestmark = pytest.mark.gpu
IMAGE = 32000


def prompt(images: int, tokens_per_image: int, text_between: int, dim: int, dtype, vocab=32064):
    """`text_between` text tokens, then an image, repeated; one flat sequence on the GPU."""
    pieces = []
    for _ in range(images):
        pieces += [torch.randint(0, IMAGE, (text_between,)), torch.full((tokens_per_image,), IMAGE)]
    ids = torch.cat(pieces + [torch.randint(0, IMAGE, (text_between,))]).cuda()
    feats = [torch.randn(tokens_per_image, dim, device="cuda", dtype=dtype) for _ in range(images)]
    return ids, feats, torch.randn(vocab, dim, device="cuda", dtype=dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize(
    "images,tokens,dim",
    [(16, 576, 4096), (3, 1601, 4096), (1, 256, 2048), (5, 729, 1152), (2, 2880, 7168), (0, 0, 3584)],
)
def test_real_sizes_match_reference(images, tokens, dim, dtype):
    ids, feats, table = prompt(images, tokens, 37, dim, dtype)
    embeds = torch.nn.functional.embedding(ids, table)
    with poison_outputs():
        out = merge(ids, embeds, feats, IMAGE)
    assert recent_decisions()[-1].backend is Backend.TRITON
    assert_bitwise_equal(out, reference(ids, embeds, feats, IMAGE))
    with poison_outputs():
        fused = merge(ids, None, feats, IMAGE, embedding_weight=table)
    assert_bitwise_equal(fused, out)


def test_strided_nan_padded_inputs_on_gpu():
    ids, feats, table = prompt(4, 577, 129, 1024, torch.bfloat16)
    feats = [nan_padded(f) for f in feats]
    embeds = nan_padded(torch.nn.functional.embedding(ids, table))
    out = assert_deterministic(lambda: merge(ids, embeds, feats, IMAGE))
    assert not out.isnan().any()
    assert_bitwise_equal(out, reference(ids, embeds, feats, IMAGE))


def test_host_syncs_on_gpu():
    ids, feats, table = prompt(16, 576, 20, 4096, torch.bfloat16)
    merge(ids, None, feats, IMAGE, embedding_weight=table, check=False)  # compile first
    torch.cuda.synchronize()
    with HostSyncCounter() as unchecked:
        merge(ids, None, feats, IMAGE, embedding_weight=table, check=False)
    with HostSyncCounter() as checked:
        merge(ids, None, feats, IMAGE, embedding_weight=table, check=True)
    assert unchecked.count == 0, unchecked
    assert checked.count == 1, checked


def test_cuda_graph_capture_with_check_false():
    ids, feats, table = prompt(2, 576, 11, 4096, torch.bfloat16)
    merge(ids, None, feats, IMAGE, embedding_weight=table, check=False)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = merge(ids, None, feats, IMAGE, embedding_weight=table, check=False)
    graph.replay()
    torch.cuda.synchronize()
    assert_bitwise_equal(out, reference(ids, None, feats, IMAGE, embedding_weight=table))
