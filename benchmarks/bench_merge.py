"""Benchmark of the variable-length multimodal token merge.

What every provider computes: the k-th placeholder position of ``input_ids`` (row-major)
receives the k-th feature row, every other position keeps its text embedding (the
contract of ``mmkernels.ops.merge_multimodal_embeddings``). Inputs are what the models
hand over: ``input_ids`` ((B, S) padded, or vLLM's packed (T,)), ``inputs_embeds``, and
the encoder's features as one (n_i, D) tensor per image / video / audio clip.

Providers (the first is the baseline for speedups):

* ``hf``: what Hugging Face transformers 5.x does in ``LlavaModel.forward`` /
  ``Qwen2VLModel.forward``, per placeholder kind: ``torch.cat`` of the per-item
  features, ``.to(device, dtype)``, ``mask = input_ids == placeholder_id``, the count
  check ``n = mask.sum()`` against the feature rows through ``torch_compilable_check``
  (its message formats ``n``: two host syncs), then
  ``inputs_embeds.masked_scatter(mask.unsqueeze(-1), features)``.
* ``vllm-style``: vLLM's ``_merge_multimodal_embeddings``: ``torch.cat`` of all items in
  position order, ``.to(dtype)``, then the boolean-index assignment
  ``inputs_embeds[is_multimodal] = features`` (in place; one host sync for the
  boolean index). vLLM builds ``is_multimodal`` on the host in its model runner; here it
  is computed from ``input_ids`` on the device, the work every other provider does too.
* ``torch.compile(reference)``: ``torch.cat`` of the items per kind (eager, timed),
  then ``torch.compile(dynamic=True)`` of
  ``mmkernels.ops.merge.merge_multimodal_embeddings_reference`` with ``check=False``
  (one tensor per kind, so a new item count does not recompile); skipped by name if it
  does not compile. Its CPU check and its host-sync count use
  dynamo with the eager backend (inductor's CPU compile takes ~25 s here).
* ``mmkernels``: ``mmkernels.ops.merge_multimodal_embeddings(..., check=False)``
  (features passed as the per-item list, no concatenation); ``mmkernels(check)``: the
  same with ``check=True`` (one host sync).

Bytes moved (the GB/s of every row): the op's own traffic, the same for all providers:
read ``input_ids`` (T * id itemsize), read the text rows ((T - N) * D * itemsize of
``inputs_embeds``; with the fused lookup these rows are gathered from the embedding
table instead, same count), read the features (N * D * itemsize of the features),
write the output (T * D * itemsize). T = all positions of ``input_ids`` (padding
included), N = placeholder positions. Providers that copy more (HF's
``torch.cat``) are slower for it; ``vllm-style`` writes in place and so moves less
than declared (it writes N rows, not T).

``run(out_dir, quick=False)`` is what ``tools/gpu_suite.py`` calls; ``test_merge`` is
the same work as pytest-benchmark cells.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from benchmarks import harness
from benchmarks.shapes import MERGE_SHAPES, QUICK_MERGE_SHAPES, MergeShape

__all__ = [
    "MERGE_BENCHMARK",
    "MergeInputs",
    "PROVIDERS",
    "expected_merge",
    "hf_merge",
    "make_merge_inputs",
    "merge_bytes",
    "run",
    "vllm_style_merge",
]

_FLOAT_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
_ID_DTYPES = {"int64": torch.int64, "int32": torch.int32}


# ======================================================================================
# Inputs


@dataclass
class MergeInputs:
    """One input set for a :class:`MergeShape` on one device.

    ``items_per_kind[k]``: the (n_i, D) feature tensors of kind k in position order;
    ``items_in_order``: all items in position order (what vLLM concatenates);
    ``positions_per_kind[k]``: the flat (row-major) positions of kind k's placeholders,
    recorded while building ``input_ids`` (the oracle uses these, not a search).
    """

    input_ids: torch.Tensor
    inputs_embeds: torch.Tensor
    items_per_kind: tuple[tuple[torch.Tensor, ...], ...]
    items_in_order: tuple[torch.Tensor, ...]
    positions_per_kind: tuple[torch.Tensor, ...]
    placeholder_ids: tuple[int, ...]
    placeholder_id_tensor: torch.Tensor

    def op_features(self):
        """``features`` as the op takes them: a list per kind (the list itself for one kind)."""
        if len(self.placeholder_ids) == 1:
            return list(self.items_per_kind[0])
        return [list(items) for items in self.items_per_kind]

    def op_placeholder_id(self):
        return self.placeholder_ids[0] if len(self.placeholder_ids) == 1 else list(self.placeholder_ids)


def _token_ids(shape: MergeShape, generator: torch.Generator) -> tuple[torch.Tensor, list[list[torch.Tensor]]]:
    """``input_ids`` (CPU, int64, flat) and, per kind, the position ranges of its items."""
    text_high = min(shape.placeholder_ids)  # every text id is below every placeholder id
    seq_len = shape.ids_shape[-1] if shape.layout == "batch" else 0
    chunks: list[torch.Tensor] = []
    positions: list[list[torch.Tensor]] = [[] for _ in shape.placeholder_ids]
    offset = 0
    for seq in shape.sequences:
        start = offset
        for seg in seq:
            if seg.is_text:
                chunks.append(torch.randint(1, text_high, (seg.tokens,), generator=generator))
            else:
                chunks.append(torch.full((seg.tokens,), shape.placeholder_ids[seg.kind], dtype=torch.int64))
                positions[seg.kind].append(torch.arange(offset, offset + seg.tokens))
            offset += seg.tokens
        if shape.layout == "batch":
            pad = seq_len - (offset - start)
            chunks.append(torch.full((pad,), shape.pad_id, dtype=torch.int64))
            offset += pad
    ids = torch.cat(chunks) if chunks else torch.zeros(0, dtype=torch.int64)
    return ids, positions


def make_merge_inputs(shape: MergeShape, device: torch.device | str, seed: int) -> MergeInputs:
    """Deterministic inputs for ``shape`` (same ``seed``, same values) on ``device``."""
    device = torch.device(device)
    dtype = _FLOAT_DTYPES[shape.dtype]
    ids_cpu, positions = _token_ids(shape, torch.Generator().manual_seed(seed))
    gen = torch.Generator(device=device).manual_seed(seed)
    embeds = torch.randn(*shape.ids_shape, shape.hidden, generator=gen, device=device, dtype=dtype)
    items_per_kind: list[list[torch.Tensor]] = [[] for _ in shape.placeholder_ids]
    items_in_order = []
    for seg in shape.items:
        item = torch.randn(seg.tokens, shape.hidden, generator=gen, device=device, dtype=dtype)
        items_per_kind[seg.kind].append(item)
        items_in_order.append(item)
    return MergeInputs(
        input_ids=ids_cpu.to(_ID_DTYPES[shape.id_dtype]).reshape(shape.ids_shape).to(device),
        inputs_embeds=embeds,
        items_per_kind=tuple(tuple(items) for items in items_per_kind),
        items_in_order=tuple(items_in_order),
        positions_per_kind=tuple(
            (torch.cat(p) if p else torch.zeros(0, dtype=torch.int64)).to(device) for p in positions
        ),
        placeholder_ids=tuple(shape.placeholder_ids),
        placeholder_id_tensor=torch.tensor(shape.placeholder_ids, dtype=_ID_DTYPES[shape.id_dtype]).to(device),
    )


def expected_merge(inputs: MergeInputs) -> torch.Tensor:
    """The oracle: copy the text embeddings, then place each kind's features at the
    positions recorded when the ids were built."""
    dim = inputs.inputs_embeds.shape[-1]
    out = inputs.inputs_embeds.reshape(-1, dim).clone()
    for positions, items in zip(inputs.positions_per_kind, inputs.items_per_kind):
        if items:
            out.index_copy_(0, positions, torch.cat(items).to(out.dtype))
    return out.view(inputs.inputs_embeds.shape)


def merge_bytes(shape: MergeShape) -> int:
    """Declared bytes of one merge (see the module docstring)."""
    tokens, placeholders, dim = shape.num_tokens, shape.num_placeholders, shape.hidden
    embed_size = _FLOAT_DTYPES[shape.dtype].itemsize
    feature_size = embed_size  # features arrive in the embeddings' dtype here
    id_size = _ID_DTYPES[shape.id_dtype].itemsize
    return (
        tokens * id_size
        + (tokens - placeholders) * dim * embed_size
        + placeholders * dim * feature_size
        + tokens * dim * embed_size
    )


# ======================================================================================
# Providers


def _hf_compilable_check():
    """transformers' ``torch_compilable_check`` when transformers is installed; otherwise
    what it does in eager mode."""
    try:
        from transformers.utils.import_utils import torch_compilable_check

        return torch_compilable_check
    except Exception:

        def check(cond, msg: str, error_type: type[Exception] = ValueError) -> None:
            if isinstance(cond, torch.Tensor):
                torch._check_tensor_all_with(error_type, cond, lambda: msg)
            else:
                torch._check_with(error_type, cond, lambda: msg)

        return check


def hf_merge(inputs: MergeInputs) -> torch.Tensor:
    """Hugging Face today (see the module docstring); returns a new tensor."""
    check = _hf_compilable_check()
    embeds = inputs.inputs_embeds
    for placeholder_id, items in zip(inputs.placeholder_ids, inputs.items_per_kind):
        if not items:
            continue
        features = torch.cat(items, dim=0).to(embeds.device, embeds.dtype)
        mask = inputs.input_ids == placeholder_id
        n_tokens = mask.sum()
        mask = mask.unsqueeze(-1).to(embeds.device)
        check(
            n_tokens * embeds.shape[-1] == features.numel(),
            f"Image features and image tokens do not match, tokens: {n_tokens}, features: {features.shape[0]}",
        )
        embeds = embeds.masked_scatter(mask, features)
    return embeds


def vllm_style_merge(inputs: MergeInputs) -> torch.Tensor:
    """vLLM's concatenate, cast, boolean-index assignment (in place on ``inputs_embeds``)."""
    embeds = inputs.inputs_embeds
    if not inputs.items_in_order:
        return embeds
    if len(inputs.placeholder_ids) == 1:
        is_multimodal = inputs.input_ids == inputs.placeholder_ids[0]
    else:
        is_multimodal = torch.isin(inputs.input_ids, inputs.placeholder_id_tensor)
    flat = torch.cat(inputs.items_in_order)
    embeds[is_multimodal] = flat.to(dtype=embeds.dtype)
    return embeds


_mmkernels_import_error = functools.partial(harness.import_error, "mmkernels.ops.merge")


def _mmkernels_op_caller(check: bool):
    from mmkernels.ops import merge_multimodal_embeddings

    def merge(inputs: MergeInputs) -> torch.Tensor:
        return merge_multimodal_embeddings(
            inputs.input_ids, inputs.inputs_embeds, inputs.op_features(), inputs.op_placeholder_id(), check=check
        )

    return merge


def _compiled_reference_caller(backend: str = "inductor"):
    from mmkernels.ops.merge import merge_multimodal_embeddings_reference

    compiled = torch.compile(merge_multimodal_embeddings_reference, dynamic=True, backend=backend)

    def merge(inputs: MergeInputs) -> torch.Tensor:
        # One tensor per kind: a list of items would be guarded on its length and
        # recompile for every item count; the concatenation is timed (HF does it too).
        empty = inputs.inputs_embeds.new_empty(0, inputs.inputs_embeds.shape[-1])
        features = [torch.cat(items) if items else empty for items in inputs.items_per_kind]
        features = features[0] if len(features) == 1 else features
        return compiled(inputs.input_ids, inputs.inputs_embeds, features, inputs.op_placeholder_id(), check=False)

    return merge


PROVIDERS: tuple[harness.Provider, ...] = (
    harness.Provider(
        name="hf",
        factory=lambda: hf_merge,
        notes="transformers 5.x: cat, placeholder mask, count check (2 host syncs per kind), masked_scatter",
    ),
    harness.Provider(
        name="vllm-style",
        factory=lambda: vllm_style_merge,
        notes="vLLM: cat, .to(dtype), embeds[is_mm] = feats (in place: writes N rows, not T)",
    ),
    harness.Provider(
        name="torch.compile(reference)",
        factory=_compiled_reference_caller,
        check_factory=functools.partial(_compiled_reference_caller, backend="eager"),
        requires=_mmkernels_import_error,
        optional=True,
        notes="cat per kind, then torch.compile(dynamic=True) of the reference with check=False; its CPU "
        "check and host-sync count use dynamo's eager backend",
    ),
    harness.Provider(
        name="mmkernels",
        factory=functools.partial(_mmkernels_op_caller, False),
        requires=_mmkernels_import_error,
        timed_backend="triton",
        notes="merge_multimodal_embeddings(check=False), per-item feature list",
    ),
    harness.Provider(
        name="mmkernels(check)",
        factory=functools.partial(_mmkernels_op_caller, True),
        requires=_mmkernels_import_error,
        timed_backend="triton",
        notes="merge_multimodal_embeddings(check=True): one host sync for the count check",
    ),
)

MERGE_BENCHMARK = harness.Benchmark(
    name="merge",
    description=(
        "Variable-length multimodal token merge: placeholder positions of input_ids receive the "
        "encoder's features, other positions keep their text embeddings."
    ),
    cases=MERGE_SHAPES,
    quick_cases=QUICK_MERGE_SHAPES,
    providers=PROVIDERS,
    make_inputs=make_merge_inputs,
    expected_output=expected_merge,
    bytes_moved=merge_bytes,
    small_case=lambda shape: shape.scaled(),
    bytes_model=(
        "read ids (T x id itemsize) + read text rows ((T-N) x D x itemsize) + read features "
        "(N x D x itemsize) + write output (T x D x itemsize); T = all positions, N = placeholders"
    ),
)
harness.register(MERGE_BENCHMARK, size_param="tokens", size_label="tokens T (all positions of input_ids)")


def run(out_dir: str | Path, quick: bool = False) -> harness.BenchmarkResult:
    """Run the merge benchmark into ``out_dir`` (timed on CUDA; validated, not timed, on
    the CPU) and return its result; ``quick`` runs fewer shapes and repetitions."""
    return harness.run_into_folder(MERGE_BENCHMARK, out_dir, quick=quick)


# ======================================================================================
# pytest-benchmark cells

merge_session = pytest.fixture(scope="module")(harness.pytest_session(MERGE_BENCHMARK))


@pytest.mark.parametrize("provider", [p.name for p in PROVIDERS])
@pytest.mark.parametrize("shape", MERGE_SHAPES, ids=lambda s: s.name.replace("/", "-"))
def test_merge(benchmark, merge_session: harness.BenchSession, shape, provider: str):
    harness.run_pytest_cell(benchmark, merge_session, shape, provider)
