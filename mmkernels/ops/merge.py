"""Variable-length multimodal token merge: place image/video/audio features at the
placeholder tokens of a text sequence, in one pass and without a host sync.

Replaces Hugging Face's ``get_placeholder_mask`` (a count check that syncs the host)
followed by ``inputs_embeds.masked_scatter(mask, features)``, and vLLM's concatenate,
cast, boolean-index and copy. The kernel writes every output row once; with the fused
lookup it also replaces the embedding lookup of the text rows.

Public: :func:`merge_multimodal_embeddings` (registered as ``mmkernels::merge_multimodal_embeddings``),
its reference :func:`merge_multimodal_embeddings_reference` (same signature; it defines
the op), :data:`CAPABILITIES`.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Sequence, Union

import torch

from mmkernels.backend import (
    MISS,
    AotCase,
    Capabilities,
    Needs,
    Op,
    cdiv,
    empty_output,
    next_power_of_2,
    no_plan,
    plan_constant,
    plan_key,
    plan_ok,
    plan_step,
    resolve_check,
)
from mmkernels.backend import launch as backend_launch
from mmkernels.ops import _merge_kernels as kernels
from mmkernels.routes import Route

__all__ = [
    "CAPABILITIES",
    "PlaceholderCountError",
    "merge_multimodal_embeddings",
    "merge_multimodal_embeddings_reference",
]

FeatureArg = Union[torch.Tensor, Sequence[torch.Tensor]]

OP_NAME = "merge_multimodal_embeddings"
# The kernel only moves data; float64 is supported so it can be checked bit-exactly
# against the float64 reference.
CAPABILITIES = Capabilities(
    dtypes=frozenset({torch.float16, torch.bfloat16, torch.float32, torch.float64}),
    min_compute_capability=(7, 0),
)
_ID_DTYPES = (torch.int32, torch.int64)


# --------------------------------------------------------------------------------------
# Validation, shared by the op and the reference


@dataclass
class _MergeArgs:
    ids: torch.Tensor  # (T,): a view of input_ids where one stride allows it, else a copy
    out_shape: tuple[int, ...]  # ids.shape + (D,)
    embeds: torch.Tensor | None  # inputs_embeds as given ((T, D) or (B, S, D), any strides), or None
    table: torch.Tensor | None  # (V, D) embedding_weight, or None
    kind_ids: list[int]
    kind_features: list[list[torch.Tensor]]  # per kind, the (n_i, D) tensors in order
    dim: int
    out_dtype: torch.dtype
    padding_idx: int | None = None  # in [0, V), or None
    feat_dtype: torch.dtype | None = None  # the one dtype of every feature tensor (None: no features)
    check: bool = True  # the call's check (see merge_multimodal_embeddings)
    inplace: bool = False  # write the placeholder rows into embeds
    broadcast_ids: tuple[int, ...] = ()  # kinds whose one row goes to each of their placeholders

    @property
    def broadcast_kinds(self) -> int:
        """The broadcast kinds as a bit mask over kind indices (the kernel's BROADCAST_KINDS)."""
        return sum(1 << k for k, kid in enumerate(self.kind_ids) if kid in self.broadcast_ids)

    @property
    def flat_embeds(self) -> torch.Tensor:
        """inputs_embeds as (T, D) (a copy where the layout does not flatten); the reference's."""
        return self.embeds.reshape(self.ids.shape[0], self.dim)

    @functools.cached_property
    def kind_rows(self) -> list[int]:
        return [sum(f.shape[0] for f in feats) for feats in self.kind_features]

    @property
    def all_features(self) -> list[torch.Tensor]:
        """A new list each time (callers may replace entries)."""
        return [f for feats in self.kind_features for f in feats]


def _as_tensor_list(features: FeatureArg, name: str) -> list[torch.Tensor]:
    if isinstance(features, torch.Tensor):
        return [features]
    if isinstance(features, (list, tuple)):
        for i, f in enumerate(features):
            if not isinstance(f, torch.Tensor):
                raise TypeError(f"{name}[{i}]: expected a torch.Tensor, got {type(f).__name__}")
        return list(features)
    raise TypeError(f"{name}: expected a Tensor or a list of Tensors, got {type(features).__name__}")


def _split_kinds(features, placeholder_id) -> tuple[list[int], list[list[torch.Tensor]]]:
    """Normalize ``placeholder_id`` / ``features`` to parallel lists: ids, and per id its tensors."""
    if isinstance(placeholder_id, bool) or not isinstance(placeholder_id, (int, list, tuple)):
        raise TypeError(f"placeholder_id: expected an int or a sequence of ints, got {type(placeholder_id).__name__}")
    if isinstance(placeholder_id, int):
        kind_ids, per_kind = [placeholder_id], [features]
    else:
        kind_ids = list(placeholder_id)
        if not kind_ids:
            raise ValueError("placeholder_id: expected at least one placeholder id, got an empty sequence")
        if not isinstance(features, (list, tuple)) or len(features) != len(kind_ids):
            got = len(features) if isinstance(features, (list, tuple)) else type(features).__name__
            raise ValueError(
                f"features: with {len(kind_ids)} placeholder ids expected a sequence of {len(kind_ids)} "
                f"entries (one per id), got {got}"
            )
        per_kind = list(features)
    for i, kid in enumerate(kind_ids):
        if isinstance(kid, bool) or not isinstance(kid, int):
            raise TypeError(f"placeholder_id[{i}]: expected an int, got {type(kid).__name__}")
    if len(set(kind_ids)) != len(kind_ids):
        raise ValueError(f"placeholder_id: ids must be distinct, got {kind_ids}")
    names = ["features"] if len(kind_ids) == 1 else [f"features[{k}]" for k in range(len(kind_ids))]
    return kind_ids, [_as_tensor_list(entry, name) for entry, name in zip(per_kind, names)]


def _feature_name(name: str, feats: list, i: int) -> str:
    return f"{name}[{i}]" if len(feats) > 1 else name


def _validate(input_ids, inputs_embeds, features, placeholder_id, embedding_weight, padding_idx=None, *, check=True,
              inplace=False, broadcast_ids=()) -> _MergeArgs:
    if not isinstance(input_ids, torch.Tensor):
        raise TypeError(f"input_ids: expected a torch.Tensor, got {type(input_ids).__name__}")
    if input_ids.dtype not in _ID_DTYPES:
        raise TypeError(f"input_ids: expected dtype int32 or int64, got {input_ids.dtype}")
    if input_ids.dim() not in (1, 2):
        raise ValueError(f"input_ids: expected shape (B, S) or (T,), got {tuple(input_ids.shape)}")
    device = input_ids.device

    if inputs_embeds is None and embedding_weight is None:
        raise ValueError("inputs_embeds is None: pass inputs_embeds or embedding_weight (fused lookup)")
    if inputs_embeds is not None and embedding_weight is not None:
        raise ValueError("pass either inputs_embeds or embedding_weight (fused lookup), not both")
    base_name, base = (
        ("inputs_embeds", inputs_embeds) if inputs_embeds is not None else ("embedding_weight", embedding_weight)
    )
    if not isinstance(base, torch.Tensor):
        raise TypeError(f"{base_name}: expected a torch.Tensor, got {type(base).__name__}")
    if not base.is_floating_point():
        raise TypeError(f"{base_name}: expected a floating dtype, got {base.dtype}")
    if base.device != device:
        raise ValueError(f"{base_name}: expected device {device} (that of input_ids), got {base.device}")
    if inputs_embeds is not None:
        if tuple(inputs_embeds.shape[:-1]) != tuple(input_ids.shape) or inputs_embeds.dim() != input_ids.dim() + 1:
            raise ValueError(
                f"inputs_embeds: expected shape {tuple(input_ids.shape)} + (D,) to match input_ids, "
                f"got {tuple(inputs_embeds.shape)}"
            )
    elif embedding_weight.dim() != 2:
        raise ValueError(f"embedding_weight: expected shape (V, D), got {tuple(embedding_weight.shape)}")
    dim = base.shape[-1]
    if padding_idx is not None:
        if isinstance(padding_idx, bool) or not isinstance(padding_idx, int):
            raise TypeError(f"padding_idx: expected an int or None, got {type(padding_idx).__name__}")
        if embedding_weight is None:
            raise ValueError(
                f"padding_idx: only meaningful with embedding_weight (the fused lookup), got padding_idx="
                f"{padding_idx} with inputs_embeds"
            )
        vocab = embedding_weight.shape[0]
        if not -vocab <= padding_idx < vocab:
            raise ValueError(
                f"padding_idx: expected an index in [-{vocab}, {vocab}) (embedding_weight has {vocab} rows), "
                f"got {padding_idx}"
            )
        padding_idx %= vocab  # as F.embedding: a negative index counts from the end

    kind_ids, kind_features = _split_kinds(features, placeholder_id)
    feat_dtype = None
    for k, feats in enumerate(kind_features):
        name = "features" if len(kind_ids) == 1 else f"features[{k}]"
        for i, f in enumerate(feats):
            # The names are built only for an error (a per-image f-string is host time).
            dtype, shape = f.dtype, f.shape
            if dtype is not feat_dtype:
                if not dtype.is_floating_point:
                    raise TypeError(f"{_feature_name(name, feats, i)}: expected a floating dtype, got {dtype}")
                if feat_dtype is not None:
                    raise TypeError(f"{_feature_name(name, feats, i)}: all features must share one dtype, "
                                    f"got {dtype} and {feat_dtype}")  # fmt: skip
                feat_dtype = dtype
            if len(shape) != 2 or shape[1] != dim:
                raise ValueError(
                    f"{_feature_name(name, feats, i)}: expected shape (n, {dim}) (D of {base_name}), got {tuple(shape)}"
                    + ("; flatten leading dims with .reshape(-1, D)" if len(shape) > 2 and shape[-1] == dim else "")
                )
            if f.device != device:
                raise ValueError(f"{_feature_name(name, feats, i)}: expected device {device} (that of input_ids), "
                                 f"got {f.device}")  # fmt: skip
    if broadcast_ids:
        broadcast_ids = _validate_broadcast(broadcast_ids, kind_ids, kind_features)

    return _MergeArgs(
        ids=input_ids.reshape(-1),
        out_shape=tuple(input_ids.shape) + (dim,),
        embeds=inputs_embeds,
        table=embedding_weight if inputs_embeds is None else None,
        kind_ids=kind_ids,
        kind_features=kind_features,
        dim=dim,
        out_dtype=base.dtype,
        padding_idx=padding_idx,
        feat_dtype=feat_dtype,
        check=check,
        inplace=inplace,
        broadcast_ids=tuple(broadcast_ids),
    )


def _validate_broadcast(broadcast_ids, kind_ids: list[int], kind_features: list[list[torch.Tensor]]) -> tuple[int, ...]:
    """``broadcast_ids``: distinct ids of ``placeholder_id``, each with exactly one feature row."""
    if isinstance(broadcast_ids, (int, torch.Tensor)) or not isinstance(broadcast_ids, (list, tuple)):
        raise TypeError(f"broadcast_ids: expected a sequence of ints, got {type(broadcast_ids).__name__}")
    for i, kid in enumerate(broadcast_ids):
        if isinstance(kid, bool) or not isinstance(kid, int):
            raise TypeError(f"broadcast_ids[{i}]: expected an int, got {type(kid).__name__}")
        if kid not in kind_ids:
            raise ValueError(f"broadcast_ids[{i}]: {kid} is not one of placeholder_id {kind_ids}")
    if len(set(broadcast_ids)) != len(broadcast_ids):
        raise ValueError(f"broadcast_ids: ids must be distinct, got {list(broadcast_ids)}")
    for kid in broadcast_ids:
        k = kind_ids.index(kid)
        rows = sum(f.shape[0] for f in kind_features[k])
        if rows != 1:
            name = "features" if len(kind_ids) == 1 else f"features[{k}]"
            raise ValueError(f"{name}: placeholder id {kid} is in broadcast_ids, so its features must be one row "
                             f"(1, D) for every placeholder of it; got {rows} rows")  # fmt: skip
    return tuple(broadcast_ids)


class PlaceholderCountError(ValueError):
    """A placeholder count differs from the feature rows given for its id (``check=True``).

    A ``ValueError`` (the type Hugging Face raises for the same mismatch) that also carries
    the counts, so an integration can restate it in its framework's words:
    ``kind_ids``, ``placeholders`` (tokens per id in ``input_ids``) and ``rows`` (feature
    rows per id), parallel lists over every id of the call.
    """

    def __init__(self, kind_ids: list[int], placeholders: list[int], rows: list[int], message: str | None = None):
        self.kind_ids, self.placeholders, self.rows = list(kind_ids), list(placeholders), list(rows)
        if message is None:
            parts = [
                f"placeholder id {kid}: {n} placeholder tokens in input_ids but {r} feature rows"
                for kid, n, r in zip(kind_ids, placeholders, rows)
                if n != r
            ]
            message = "features: count mismatch: " + "; ".join(parts)
        super().__init__(message)

    def __reduce__(self):  # picklable with its counts (multiprocessing workers re-raise it)
        return type(self), (self.kind_ids, self.placeholders, self.rows, str(self))


def _out_of_table_error(n_bad: int, vocab: int) -> ValueError:
    return ValueError(
        f"input_ids: {n_bad} text token ids outside the embedding table [0, {vocab}) (embedding_weight has {vocab} rows)"
    )


# --------------------------------------------------------------------------------------
# Reference


def merge_multimodal_embeddings_reference(
    input_ids: torch.Tensor,
    inputs_embeds: torch.Tensor | None,
    features: FeatureArg | Sequence[FeatureArg],
    placeholder_id: int | Sequence[int],
    *,
    embedding_weight: torch.Tensor | None = None,
    check: bool = True,
    padding_idx: int | None = None,
    broadcast_ids: Sequence[int] = (),
) -> torch.Tensor:
    """PyTorch reference of :func:`merge_multimodal_embeddings`; it defines the op.

    Same signature and errors. With ``check=False`` placeholder positions beyond the
    given features, and (fused lookup) text ids outside the table, become NaN rows.
    Its autograd defines the op's gradients (``padding_idx`` as in ``F.embedding``).
    """
    args = _validate(input_ids, inputs_embeds, features, placeholder_id, embedding_weight, padding_idx, check=check,
                     broadcast_ids=broadcast_ids)  # fmt: skip
    return _reference_impl(args, check)


def _reference_impl(args: _MergeArgs, check: bool) -> torch.Tensor:
    ids = args.ids.long()
    nan = float("nan")
    is_placeholder = torch.zeros_like(ids, dtype=torch.bool)
    for kid in args.kind_ids:
        is_placeholder |= ids == kid
    if args.table is not None:
        vocab = args.table.shape[0]
        text_bad = ~is_placeholder & ((ids < 0) | (ids >= vocab))
        if check and bool(text_bad.any()):
            raise _out_of_table_error(int(text_bad.sum()), vocab)
        if vocab > 0:
            # F.embedding: the same rows as indexing, and padding_idx's row gets no gradient.
            out = torch.nn.functional.embedding(ids.clamp(0, vocab - 1), args.table, padding_idx=args.padding_idx)
        else:
            out = args.table.new_empty(ids.shape[0], args.dim)
        out[text_bad] = nan
    else:
        out = args.flat_embeds.clone()
    placeholders = [int((ids == kid).sum()) for kid in args.kind_ids]
    expected = _expected_counts(args.kind_ids, args.kind_rows, args.broadcast_ids, placeholders)
    if check and placeholders != expected:
        raise PlaceholderCountError(args.kind_ids, placeholders, expected)
    for kid, feats in zip(args.kind_ids, args.kind_features):
        positions = (ids == kid).nonzero().flatten()
        rows = torch.cat([f.to(args.out_dtype) for f in feats]) if feats else out.new_empty(0, args.dim)
        if kid in args.broadcast_ids:
            rows = rows.expand(len(positions), args.dim)
        n = min(len(positions), rows.shape[0])
        out[positions[:n]] = rows[:n]
        out[positions[n:]] = nan
    return out.reshape(args.out_shape).contiguous()


# --------------------------------------------------------------------------------------
# Launcher


@dataclass(frozen=True)
class MergeConfig:
    block_t: int
    block_d: int
    num_warps: int


def merge_config(dim: int, element_size: int) -> MergeConfig:
    """Deterministic tile heuristic: ~16 KB of output per program, 16-byte accesses.

    A row chunk of 2 KB (1024 bf16 / 512 fp32) per program keeps every thread on 16-byte
    vectors; 8 rows per program give a few thousand programs for real prompt lengths.
    """
    block_d = min(next_power_of_2(max(dim, 1)), max(16, 2048 // element_size))
    block_t = 8
    num_warps = 4 if block_t * block_d * element_size >= 8192 else 2
    return MergeConfig(block_t=block_t, block_d=block_d, num_warps=num_warps)


# Position of block_cumsum in merge_rows_kernel's arguments (filled in after the count launch).
_BLOCK_CUMSUM_ARG = 6
# Up to this many tokens a call without the count check is one launch: each rows program
# counts the placeholders before its block itself (SCAN_PREFIX), so the count launch and
# the cumsum between the launches go. Their host cost (a launch, a torch call, an
# allocation: about 10 us of the 36 of a 1-image LLaVA merge in tools/host_overhead.py)
# and their two device operations are what a short call waits on. The rows re-read, per
# program, at most this many ids (16 KB of int64 from L2), so above it the extra reads
# (quadratic in the token count) would grow past the launches saved.
_SCAN_PREFIX_MAX_TOKENS = 2048


@dataclass
class _Launch:
    """Everything both kernels get; built once so the AOT report sees the real launch."""

    count_args: tuple
    count_meta: dict
    rows_args: tuple
    rows_meta: dict
    num_blocks: int
    grid_rows: tuple
    kind_rows: torch.Tensor  # (NUM_KINDS,) int64 on the device: feature rows per kind


@dataclass
class _Tables:
    """The small int64 tables the rows kernel reads, built in one pass and sent to the
    device in one copy: per kind (id, rows, first row) and per feature tensor (offset in
    elements from the first one, first row, row stride)."""

    feats: list[torch.Tensor]  # the feature tensors the offsets refer to (keep alive)
    kinds: torch.Tensor  # (3, K)
    segs: torch.Tensor  # (3, S)
    aligned: bool  # every segment start and row stride is a multiple of 16 bytes


def _tables(args: _MergeArgs, device: torch.device) -> _Tables:
    """Feature tensors as segments addressed relative to the first one, so the kernel takes
    one real pointer and the per-image tensors are never concatenated."""
    # Empty tensors hold no rows (and may have a null data pointer): not segments. The
    # kernel reads a row with unit column stride (a per-segment column stride would cost
    # the 16-byte vectors of every segment): the rare tensor without one is copied. Every
    # copy is made before the base pointer is taken, since offsets are relative to it.
    feats = []
    for f in args.all_features:
        if f.shape[0] > 0:
            if f.shape[1] != 1 and f.stride(1) != 1:
                f = f.contiguous()
                no_plan()  # the copy's address goes into the table: never replayed
            feats.append(f)
    base = feats[0].data_ptr() if feats else 0
    es = feats[0].element_size() if feats else 1
    offsets, first_rows, strides, aligned, total = [], [], [], True, 0
    for i, f in enumerate(feats):
        ptr = f.data_ptr()
        if (ptr - base) % es:  # not a whole number of elements from the base: copy it
            f = feats[i] = f.clone(memory_format=torch.contiguous_format)
            ptr = f.data_ptr()
            no_plan()
        # Offsets may be negative (a tensor below the base) and strides zero (an expanded
        # view): the kernel's int64 arithmetic takes both. A one-row tensor's stride is
        # never used; 0 keeps it from spoiling the alignment claim.
        row_stride = f.stride(0) if f.shape[0] > 1 else 0
        offsets.append((ptr - base) // es)
        first_rows.append(total)
        strides.append(row_stride)
        aligned = aligned and ptr % 16 == 0 and (row_stride * es) % 16 == 0
        total += f.shape[0]
    kind_rows = args.kind_rows
    kind_first_row = [sum(kind_rows[:k]) for k in range(len(kind_rows))]
    table = torch.tensor(args.kind_ids + kind_rows + kind_first_row + offsets + first_rows + strides, dtype=torch.int64)
    if device.type == "cuda":
        # Pinned + non_blocking: a plain H2D copy from pageable memory syncs the stream.
        table = table.pin_memory().to(device, non_blocking=True)
    k = len(args.kind_ids)
    kinds, segs = table[: 3 * k].view(3, k), table[3 * k :].view(3, len(feats))
    # Its contents are a function of the call's plan key (kinds, row counts, strides, and
    # the segment offsets relative to the first feature: plan_key describes the tensors
    # of a list by their addresses relative to the list's first).
    plan_constant(table, kinds, segs, *kinds, *segs)
    return _Tables(feats, kinds, segs, aligned)


def _source_layout(args: _MergeArgs) -> tuple[torch.Tensor, int, int, int, int]:
    """Where the kernel reads text rows: (tensor, stride_0, stride_1, column stride, SEQ);
    SEQ > 1 means SRC_BATCHED (both strides used).

    The table is addressed by token id (row stride). ``inputs_embeds`` is read in place
    whatever its strides: as rows of one stride (SEQ = 1) where its layout flattens to
    (T, D) (contiguous, a slice of a padded buffer), else as (T // SEQ, SEQ, D) with both
    strides (expanded over the batch, (S, B, D) memory), so no layout costs a copy. A
    column stride that cannot matter (D = 1) is passed as 1, so the JIT's specialization
    of an argument equal to 1 gives the common, vectorized variant."""
    D = args.dim
    if args.table is not None:
        src = args.table
        return src, src.stride(0), 0, src.stride(1) if D > 1 else 1, 1
    src = args.embeds
    col_stride = src.stride(-1) if D > 1 else 1
    if src.dim() == 2:
        return src, src.stride(0), 0, col_stride, 1
    B, S = src.shape[0], src.shape[1]
    if S == 1:
        return src, src.stride(0), 0, col_stride, 1
    if B == 1 or src.stride(0) == S * src.stride(1):
        return src, src.stride(1), 0, col_stride, 1
    return src, src.stride(0), src.stride(1), col_stride, S


def _build_launch(args: _MergeArgs, out: torch.Tensor, inplace: bool = False,
                  scan_prefix: bool = False) -> tuple[_Launch, list[torch.Tensor]]:  # fmt: skip
    """The launches for ``args``, and the feature tensors whose addresses the segment
    table holds (the caller keeps them alive until the kernel has run). ``inplace``:
    ``out`` is ``inputs_embeds`` as (T, D) rows, and only placeholder rows are written.
    ``scan_prefix``: one launch, the rows kernel counting the placeholders before each
    block itself (no count launch, no counts allocated)."""
    device = args.ids.device
    T, D = args.ids.shape[0], args.dim
    cfg = merge_config(D, out.element_size())
    num_blocks = max(cdiv(T, cfg.block_t), 1)
    tables = _tables(args, device)
    feats, kind, seg = tables.feats, tables.kinds, tables.segs
    num_segs = len(feats)
    fused = args.table is not None
    src, src_stride_0, src_stride_1, src_col_stride, src_seq = _source_layout(args)
    vocab = args.table.shape[0] if fused else 0
    # scan_prefix: the kernel reads no counts (any int pointer stands in, never read).
    counts = kind[1] if scan_prefix else empty_output((num_blocks, len(args.kind_ids) + 1), torch.int32, device)
    feat_base = feats[0] if feats else out
    # One id per row: a stride of 1 where the ids are contiguous (specialized by the JIT),
    # any other (a strided or expanded view) read as is.
    ids_stride = args.ids.stride(0) if T > 1 else 1
    count_args = (args.ids, ids_stride, kind[0], counts, T, vocab)
    count_meta = dict(NUM_KINDS=len(args.kind_ids), FUSED_LOOKUP=fused, BLOCK_T=cfg.block_t, num_warps=1)
    rows_args = (
        args.ids, ids_stride, kind[0], kind[1], kind[2], counts, None,  # block cumsum: filled in by the caller
        seg[0], seg[1], seg[2], feat_base,
        src, src_stride_0, src_stride_1, src_col_stride, src_seq, out, out.stride(0), T, D, vocab, num_segs,
    )  # fmt: skip
    rows_meta = dict(
        NUM_KINDS=len(args.kind_ids),
        HAS_FEATURES=num_segs > 0,
        # Bucketed: 1, 2, 4, 8, 16 steps cover up to 65536 feature tensors with five compiles.
        SEARCH_STEPS=next_power_of_2(max(math.ceil(math.log2(num_segs)), 1)) if num_segs > 1 else 0,
        FUSED_LOOKUP=fused,
        SRC_BATCHED=src_seq > 1,
        CAST_FEATURES=bool(feats) and feats[0].dtype != out.dtype,
        FEAT_BYTES=feat_base.element_size(),
        FEATURES_ALIGNED=tables.aligned,
        BLOCK_T=cfg.block_t,
        BLOCK_D=cfg.block_d,
        num_warps=cfg.num_warps,
    )
    if inplace:
        rows_meta["WRITE_TEXT"] = False  # absent otherwise: the default, one compiled variant
    if args.broadcast_kinds:
        rows_meta["BROADCAST_KINDS"] = args.broadcast_kinds  # likewise
    if scan_prefix:
        rows_meta["SCAN_PREFIX"] = True
        rows_args = (*rows_args[:_BLOCK_CUMSUM_ARG], counts, *rows_args[_BLOCK_CUMSUM_ARG + 1 :])
    grid_rows = (num_blocks, cdiv(D, cfg.block_d))
    return _Launch(count_args, count_meta, rows_args, rows_meta, num_blocks, grid_rows, kind[1]), feats


def _inplace_rows(embeds: torch.Tensor, T: int, D: int) -> torch.Tensor | None:
    """``inputs_embeds`` as (T, D) rows of one stride with unit column stride (what the
    kernel writes through), or None for a layout it cannot write in place."""
    if D > 1 and embeds.stride(-1) != 1:
        return None
    try:
        return embeds.view(T, D)
    except RuntimeError:  # rows that do not flatten to one stride
        return None


def _triton_impl(args: _MergeArgs, check: bool, inplace: bool = False) -> torch.Tensor:
    T = args.ids.shape[0]
    if inplace:
        out = args.embeds
        out2d = _inplace_rows(out, T, args.dim)
        if out2d is None:  # a layout the kernel cannot write through: merge, then copy
            result = out.copy_(_triton_impl(args, check))
            no_plan()  # the copy is not a launch
            return result
    else:
        out = empty_output(args.out_shape, args.out_dtype, args.ids.device)
    vocab = args.table.shape[0] if args.table is not None else 0
    if T == 0:
        if check:
            _check_totals(args.kind_ids, args.kind_rows, vocab, torch.zeros(len(args.kind_ids) + 1, dtype=torch.int64),
                          args.broadcast_ids)  # fmt: skip
        plan_ok()  # nothing to launch; the check passed for counts the key fixes
        return out
    # Allocations, launches and plan steps from here (see mmkernels.backend.CallPlans).
    plan_ok()
    if not inplace:
        out2d = out.view(T, args.dim)
    if not check and T <= _SCAN_PREFIX_MAX_TOKENS:
        if args.dim == 0:
            return out
        launch, _keepalive = _build_launch(args, out2d, inplace, scan_prefix=True)
        backend_launch(kernels.merge_rows_kernel, launch.grid_rows, launch.rows_args, launch.rows_meta)
        return out
    launch, _keepalive = _build_launch(args, out2d, inplace)
    counts = launch.count_args[3]
    backend_launch(kernels.merge_count_kernel, (launch.num_blocks,), launch.count_args, launch.count_meta)
    block_cumsum = plan_step(_block_cumsum, counts)
    if check:
        # The one host sync of check=True: placeholder counts per kind and out-of-table text
        # ids, compared on the device with the expected counts (the kind table is there).
        plan_step(functools.partial(_check_on_device, args.kind_ids, args.kind_rows, vocab, launch.kind_rows,
                                    args.broadcast_ids), block_cumsum)  # fmt: skip
    if args.dim == 0:
        return out  # nothing to write; the counts were still checked (D = 0 is a valid empty hidden dim)
    rows_args = list(launch.rows_args)
    rows_args[_BLOCK_CUMSUM_ARG] = block_cumsum
    backend_launch(kernels.merge_rows_kernel, launch.grid_rows, tuple(rows_args), launch.rows_meta)
    return out


def _block_cumsum(counts: torch.Tensor) -> torch.Tensor:
    return counts.cumsum(0, dtype=torch.int32)


def _check_on_device(kind_ids: list[int], kind_rows: list[int], vocab: int, kind_rows_on_device: torch.Tensor,
                     broadcast_ids: tuple[int, ...], block_cumsum: torch.Tensor) -> None:  # fmt: skip
    """check=True: compare the totals with the expected counts on the device, and read them
    on the host (the sync) only to raise (with broadcast kinds, whose counts are free, read
    them on the host: the same one sync)."""
    totals = block_cumsum[-1].to(torch.int64)
    if broadcast_ids or not torch.equal(totals, torch.nn.functional.pad(kind_rows_on_device, (0, 1))):
        _check_totals(kind_ids, kind_rows, vocab, totals, broadcast_ids)


def _expected_counts(kind_ids: list[int], kind_rows: list[int], broadcast_ids: tuple[int, ...],
                     placeholders: list[int]) -> list[int]:  # fmt: skip
    """Placeholders expected per kind: its feature rows; a broadcast kind any number (its own count)."""
    if not broadcast_ids:
        return kind_rows
    return [n if kid in broadcast_ids else r for kid, r, n in zip(kind_ids, kind_rows, placeholders)]


def _check_totals(kind_ids: list[int], kind_rows: list[int], vocab: int, totals: torch.Tensor,
                  broadcast_ids: tuple[int, ...] = ()) -> None:  # fmt: skip
    """Raise the error ``totals`` (placeholders per kind, then bad text ids) implies, if any."""
    totals = totals.tolist()
    placeholders, bad_text = totals[:-1], totals[-1]
    expected = _expected_counts(kind_ids, kind_rows, broadcast_ids, placeholders)
    if placeholders != expected:
        raise PlaceholderCountError(kind_ids, placeholders, expected)
    if bad_text:
        raise _out_of_table_error(bad_text, vocab)


# --------------------------------------------------------------------------------------
# The op: torch.library registration and the public function


def _per_kind(features: list[torch.Tensor], features_per_kind: list[int]) -> list[list[torch.Tensor]]:
    """The registered op's flat feature list, grouped again per placeholder id."""
    per_kind, start = [], 0
    for n in features_per_kind:
        per_kind.append(features[start : start + n])
        start += n
    return per_kind


def _validate_op_inputs(input_ids, inputs_embeds, features, features_per_kind, placeholder_ids, embedding_weight,
                        check, padding_idx=None, broadcast_ids=()) -> _MergeArgs:  # fmt: skip
    return _validate(input_ids, inputs_embeds, _per_kind(features, features_per_kind), placeholder_ids,
                     embedding_weight, padding_idx, check=check, broadcast_ids=broadcast_ids)  # fmt: skip


def _validate_inplace_op_inputs(input_ids, inputs_embeds, features, features_per_kind, placeholder_ids,
                                check, broadcast_ids=()) -> _MergeArgs:  # fmt: skip
    return _validate(input_ids, inputs_embeds, _per_kind(features, features_per_kind), placeholder_ids, None,
                     check=check, inplace=True, broadcast_ids=broadcast_ids)  # fmt: skip


def _needs(args: _MergeArgs) -> Needs:
    # _validate checked that every feature tensor has one dtype.
    dtypes = (args.out_dtype, args.feat_dtype) if args.feat_dtype is not None else (args.out_dtype,)
    return Needs(args.ids.device, dtypes)


def _reference_run(args: _MergeArgs) -> torch.Tensor:
    out = _reference_impl(args, args.check)
    return args.embeds.copy_(out) if args.inplace else out


def _triton_run(args: _MergeArgs) -> torch.Tensor:
    return _triton_impl(args, args.check, args.inplace)


def _fake(input_ids, inputs_embeds, features, features_per_kind, placeholder_ids, embedding_weight, check,
          padding_idx=None, broadcast_ids=()):  # fmt: skip
    base = inputs_embeds if inputs_embeds is not None else embedding_weight
    return base.new_empty(tuple(input_ids.shape) + (base.shape[-1],))


def _setup_context(ctx, inputs, output):
    input_ids, inputs_embeds, features, features_per_kind, placeholder_ids, embedding_weight, _check, padding_idx = (
        inputs[:8]
    )
    ctx.broadcast_ids = tuple(inputs[8]) if len(inputs) > 8 else ()
    ctx.features_per_kind = features_per_kind
    ctx.placeholder_ids = placeholder_ids
    ctx.feature_rows = [f.shape[0] for f in features]
    ctx.has_embeds = inputs_embeds is not None
    ctx.vocab = embedding_weight.shape[0] if embedding_weight is not None else None
    # Validated in [-V, V) by the forward; stored in [0, V) as F.embedding does.
    ctx.padding_idx = padding_idx % ctx.vocab if padding_idx is not None else None
    ctx.save_for_backward(input_ids)


def _backward(ctx, grad_out):
    """Gradients by gather/scatter in PyTorch (training is not the hot path).

    Text rows flow to ``inputs_embeds`` (or are scattered into the table's rows, except
    ``padding_idx``'s row, which gets none, as in ``F.embedding``), placeholder rows to the
    feature rows they came from; rows written as NaN (unfilled placeholders, out-of-table
    ids) pass no gradient; a broadcast kind's one row gets the sum over its placeholders."""
    (input_ids,) = ctx.saved_tensors
    ids = input_ids.reshape(-1).long()
    grad = grad_out.reshape(ids.shape[0], grad_out.shape[-1])
    is_placeholder = torch.zeros_like(ids, dtype=torch.bool)
    for kid in ctx.placeholder_ids:
        is_placeholder |= ids == kid
    grad_embeds = grad_weight = None
    if ctx.has_embeds:
        grad_embeds = grad.masked_fill(is_placeholder[:, None], 0).reshape(grad_out.shape)
    else:
        text = ~is_placeholder & (ids >= 0) & (ids < ctx.vocab)
        if ctx.padding_idx is not None:
            text &= ids != ctx.padding_idx
        grad_weight = grad.new_zeros(ctx.vocab, grad.shape[1]).index_add_(0, ids[text], grad[text])
    grad_features, start = [], 0
    for kid, n_tensors in zip(ctx.placeholder_ids, ctx.features_per_kind):
        rows = ctx.feature_rows[start : start + n_tensors]
        positions = (ids == kid).nonzero().flatten()
        if kid in ctx.broadcast_ids:
            given = grad[positions].sum(0, keepdim=True)
        else:
            given = grad.new_zeros(sum(rows), grad.shape[1])
            n = min(len(positions), given.shape[0])
            given[:n] = grad[positions[:n]]
        grad_features += list(given.split(rows))
        start += n_tensors
    return None, grad_embeds, grad_features, None, None, grad_weight, None, None, None


def _index_copy_route(args: _MergeArgs) -> torch.Tensor:
    """The standard PyTorch path (Hugging Face's and vLLM's shape of it): find the
    placeholder positions, copy the concatenated features there (the reference, in the
    output dtype: the merge only moves data)."""
    no_plan()  # PyTorch ops with host syncs, not launches a call plan can replay
    return _reference_run(args)


def _index_copy_applies(args: _MergeArgs) -> str | None:
    if not args.check:
        return "check=False promises no host sync, and the index copy reads the placeholder positions on the host"
    return None


def bucket(args: _MergeArgs) -> str:
    """The shape bucket of a call: tokens and feature tensors as powers of two, D, dtype,
    kinds, and the form (fused lookup, in place)."""
    features = sum(len(feats) for feats in args.kind_features)
    form = ("-fused" if args.table is not None else "") + ("-inplace" if args.inplace else "") + (
        f"-broadcast{len(args.broadcast_ids)}" if args.broadcast_ids else "")
    return (f"t{next_power_of_2(max(args.ids.shape[0], 1))}-n{next_power_of_2(max(features, 1))}-d{args.dim}-"
            f"{str(args.out_dtype).removeprefix('torch.')}-kinds{len(args.kind_ids)}{form}")  # fmt: skip


_ROUTES = (Route("torch", _index_copy_route, standard=True, applies=_index_copy_applies, capturable=False),)


OP = Op(
    OP_NAME,
    schema="(Tensor input_ids, Tensor? inputs_embeds, Tensor[] features, SymInt[] features_per_kind, "
    "SymInt[] placeholder_ids, Tensor? embedding_weight, bool check, SymInt? padding_idx=None, "
    "SymInt[] broadcast_ids=[]) -> Tensor",
    validate=_validate_op_inputs,
    needs=_needs,
    kernel=kernels.merge_rows_kernel,
    capabilities=CAPABILITIES,
    reference=_reference_run,
    launch=_triton_run,
    fake=_fake,
    setup_context=_setup_context,
    backward=_backward,
    routes=_ROUTES,
    bucket=bucket,
    reduction_length=lambda args: 1,  # a copy: exact on every route
)
# The in-place form writes inputs_embeds: an op of its own that declares the write (so
# torch.compile and functionalization see it).
OP_INPLACE = Op(
    OP_NAME + "_",
    schema="(Tensor input_ids, Tensor(a1!) inputs_embeds, Tensor[] features, SymInt[] features_per_kind, "
    "SymInt[] placeholder_ids, bool check, SymInt[] broadcast_ids=[]) -> ()",
    validate=_validate_inplace_op_inputs,
    needs=_needs,
    kernel=kernels.merge_rows_kernel,
    capabilities=CAPABILITIES,
    reference=_reference_run,
    launch=_triton_run,
    fake=lambda *op_inputs: None,
    decision_name=OP_NAME,  # decided, routed and reported as the merge
    routes=_ROUTES,
    bucket=bucket,
    reduction_length=lambda args: 1,
)


def merge_multimodal_embeddings(
    input_ids: torch.Tensor,
    inputs_embeds: torch.Tensor | None,
    features: FeatureArg | Sequence[FeatureArg],
    placeholder_id: int | Sequence[int],
    *,
    embedding_weight: torch.Tensor | None = None,
    check: bool | None = True,
    padding_idx: int | None = None,
    inplace: bool = False,
    broadcast_ids: Sequence[int] = (),
) -> torch.Tensor:
    """Place multimodal features at the placeholder tokens of a text sequence.

    The k-th position (row-major over ``input_ids``) that holds ``placeholder_id``
    receives ``features[k]``; every other position keeps its text embedding.

    Args:
        input_ids: ``(B, S)`` or ``(T,)``, int32 or int64.
        inputs_embeds: ``input_ids.shape + (D,)``, float16/bfloat16/float32/float64; or
            ``None`` together with ``embedding_weight``.
        features: ``(N, D)`` or a list of ``(n_i, D)`` tensors (one per image, taken in
            order, no concatenation needed). Any float dtype; cast to the output dtype
            in the kernel (as Hugging Face's ``.to(inputs_embeds.dtype)`` does). For
            several placeholder kinds (image, video, audio): a sequence with one such
            entry per id in ``placeholder_id``.
        placeholder_id: the placeholder token id, or a sequence of distinct ids.
        embedding_weight: ``(V, D)``; fused lookup: text rows are gathered from this
            table instead of read from ``inputs_embeds`` (one pass instead of two).
        check: as for every op (:func:`mmkernels.backend.resolve_check`; None: the
            default, True). ``True``: raise ``ValueError`` naming both counts when the placeholder
            count of any kind differs from its feature rows (a :class:`PlaceholderCountError`,
            which carries the counts), and, with the fused lookup, when a text id is
            outside ``[0, V)``; costs one host sync, as Hugging Face's check does.
            ``False``: zero host syncs; never reads or writes out of bounds whatever the
            counts: the k-th placeholder of an id gets feature row k of that id while
            there is one, placeholder rows beyond the given features and out-of-table
            text rows are written as NaN, and surplus feature rows are ignored.
        padding_idx: with ``embedding_weight`` only, as ``nn.Embedding``'s: the output is
            unchanged, but the table row ``padding_idx`` receives no gradient (so a model
            whose pad tokens embed through the fused lookup trains as unpatched). An
            index in ``[-V, V)``; None: every text row passes its gradient.

    Any strides are accepted (views into larger buffers, expanded or transposed
    tensors); only feature tensors without unit column stride are copied first.

        inplace: write the placeholder rows into ``inputs_embeds`` itself (as vLLM's merge
            does) and return it; text rows are neither read nor written. For callers that
            own ``inputs_embeds``. Needs ``inputs_embeds`` (not the fused lookup); the
            same counts, checks and NaN rows as the out-of-place form (with
            ``check=True`` a mismatch raises before anything is written). Layouts whose
            rows do not flatten to one stride are merged out of place and copied back;
            with autograd recording, the out-of-place result is copied in (``copy_``).
        broadcast_ids: ids of ``placeholder_id`` whose features are one ``(1, D)`` row that
            every placeholder of that id receives, however many there are (none included):
            Ovis2's visual indicator tokens, one learned vector per indicator id. Their
            counts are not checked; their row's gradient is the sum over its placeholders.

    Returns:
        A new contiguous tensor of shape ``input_ids.shape + (D,)`` with the dtype of
        ``inputs_embeds`` (or ``embedding_weight``); with ``inplace=True``,
        ``inputs_embeds``.

    Runs the Triton kernel on CUDA (and on CPU under ``TRITON_INTERPRET=1``), otherwise
    the reference; see :mod:`mmkernels.backend`. Registered as
    ``torch.ops.mmkernels.merge_multimodal_embeddings`` (traceable by ``torch.compile``).
    """
    check = resolve_check(check, default=True)
    # Validated here too: with a tensor on another device the dispatcher would route the
    # op by that device (a meta tensor reaches the fake kernel) before the body could check.
    op_inputs = key = None
    if type(placeholder_id) is int and not broadcast_ids:
        # The common forms (one placeholder id; a tensor or a list of them) are keyed for a
        # call plan before any validation: a call seen before replays its launches.
        feats = [features] if type(features) is torch.Tensor else list(features) if type(features) in (list, tuple) else None
        if feats is not None:
            if inplace:
                op_inputs = (input_ids, inputs_embeds, feats, [len(feats)], [placeholder_id], check)
            else:
                op_inputs = (input_ids, inputs_embeds, feats, [len(feats)], [placeholder_id], embedding_weight, check,
                             padding_idx)  # fmt: skip
            # The segment table holds each feature's offset from the first: so does the key
            # (plan_key describes the tensors of a list by their offsets from the first).
            key = plan_key(op_inputs)
            out = (OP_INPLACE if inplace else OP).replay(key, op_inputs)
            if out is not MISS:
                return inputs_embeds if inplace else out
    args = _validate(input_ids, inputs_embeds, features, placeholder_id, embedding_weight, padding_idx, check=check,
                     inplace=inplace, broadcast_ids=broadcast_ids)  # fmt: skip
    if inplace:
        return _merge_inplace(input_ids, args, check, op_inputs, key)
    if op_inputs is None:
        op_inputs = (input_ids, inputs_embeds, args.all_features, [len(feats) for feats in args.kind_features],
                     args.kind_ids, embedding_weight, check, padding_idx)  # fmt: skip
        if args.broadcast_ids:
            op_inputs += (list(args.broadcast_ids),)
    return OP.call(op_inputs, args, key)


def _merge_inplace(input_ids: torch.Tensor, args: _MergeArgs, check: bool, op_inputs=None, key=None) -> torch.Tensor:
    embeds = args.embeds
    if embeds is None:
        raise ValueError("inplace=True: needs inputs_embeds to write into (the fused lookup has none)")
    if torch.is_grad_enabled() and (embeds.requires_grad or any(f.requires_grad for f in args.all_features)):
        # Autograd records: the differentiable out-of-place op, copied in (copy_ is tracked).
        op_inputs = (input_ids, embeds, args.all_features, [len(feats) for feats in args.kind_features],
                     args.kind_ids, None, check, None, list(args.broadcast_ids))  # fmt: skip
        return embeds.copy_(OP.op(*op_inputs))
    if op_inputs is None:
        op_inputs = (input_ids, embeds, args.all_features, [len(feats) for feats in args.kind_features], args.kind_ids,
                     check)  # fmt: skip
        if args.broadcast_ids:
            op_inputs += (list(args.broadcast_ids),)
    OP_INPLACE.call(op_inputs, args, key)
    return embeds


# --------------------------------------------------------------------------------------
# Ahead-of-time cases (tools/kernel_report.py): the launches of real models.


def aot_cases() -> list[AotCase]:
    """The launches of real models that ``tools/kernel_report.py`` compiles ahead of time for
    sm_80 and sm_90 (made when asked, not when the module is imported)."""
    cases: list[AotCase] = []

    def _aot_case(name: str, tokens: int, images: int, tokens_per_image: int, dim: int, dtype, fused: bool, rows: bool,
                  inplace: bool = False, scan_prefix: bool = False, indicators: int = 0):  # fmt: skip
        def make_launch():
            n_feat = images * tokens_per_image
            ids = torch.zeros(tokens, dtype=torch.int64)
            ids[:n_feat] = 7
            feats = [torch.empty(tokens_per_image, dim, dtype=dtype) for _ in range(images)]
            kinds, broadcast = 7, ()
            if indicators:  # Ovis2: one broadcast row per visual indicator id
                broadcast = tuple(range(8, 8 + indicators))
                kinds, feats = [7, *broadcast], [feats, *[torch.empty(1, dim, dtype=dtype) for _ in broadcast]]
            if fused:
                args = _validate(ids, None, feats, kinds, torch.empty(32000, dim, dtype=dtype), broadcast_ids=broadcast)
            else:
                args = _validate(ids, torch.empty(tokens, dim, dtype=dtype), feats, kinds, None, broadcast_ids=broadcast)
            out = args.embeds if inplace else torch.empty(tokens, dim, dtype=dtype)
            launch, keep = _build_launch(args, out, inplace, scan_prefix)
            if not rows:
                return launch.count_args, launch.count_meta, (launch.num_blocks,)
            rows_args = list(launch.rows_args)
            if not scan_prefix:
                rows_args[_BLOCK_CUMSUM_ARG] = launch.count_args[3]
            # Keep the feature tensors referenced: the segment table holds their addresses.
            make_launch.keep = keep
            return tuple(rows_args), launch.rows_meta, launch.grid_rows

        kernel = kernels.merge_rows_kernel if rows else kernels.merge_count_kernel
        cases.append(AotCase(name, kernel, make_launch))

    # LLaVA-1.5-7B: 16 images x 576 tokens, D=4096, bf16 (the benchmark goal shape).
    _aot_case("merge.rows/llava-1.5-7b/bf16", 9472, 16, 576, 4096, torch.bfloat16, fused=False, rows=True)
    # Same, fused embedding lookup.
    _aot_case("merge.rows-fused/llava-1.5-7b/bf16", 9472, 16, 576, 4096, torch.bfloat16, fused=True, rows=True)
    # In place (vLLM's wiring): only the placeholder rows written into inputs_embeds.
    _aot_case("merge.rows-inplace/llava-1.5-7b/bf16", 9472, 16, 576, 4096, torch.bfloat16, fused=False, rows=True,
              inplace=True)  # fmt: skip
    # Qwen2-VL-7B: D=3584, three images of 700 tokens, fp16.
    _aot_case("merge.rows/qwen2-vl-7b/fp16", 3000, 3, 700, 3584, torch.float16, fused=False, rows=True)
    _aot_case("merge.count/llava-1.5-7b", 9472, 16, 576, 4096, torch.bfloat16, fused=False, rows=False)
    # One launch (check=False, up to _SCAN_PREFIX_MAX_TOKENS): LLaVA-1.5-7B, one 640-token
    # prompt with its image, out of place and in place; the fused lookup at the limit.
    _aot_case("merge.rows-scan/llava-1.5-7b-1img/bf16", 640, 1, 576, 4096, torch.bfloat16, fused=False, rows=True,
              scan_prefix=True)  # fmt: skip
    _aot_case("merge.rows-scan-inplace/llava-1.5-7b-1img/bf16", 640, 1, 576, 4096, torch.bfloat16, fused=False,
              rows=True, inplace=True, scan_prefix=True)  # fmt: skip
    _aot_case("merge.rows-scan-fused/2048-tokens/bf16", 2048, 3, 576, 4096, torch.bfloat16, fused=True, rows=True,
              scan_prefix=True)  # fmt: skip
    # Ovis2-2B (D=1536): two 256-token crops and its five visual indicators (broadcast kinds).
    _aot_case("merge.rows-scan-broadcast/ovis2-2b/bf16", 640, 2, 256, 1536, torch.bfloat16, fused=False, rows=True,
              scan_prefix=True, indicators=5)  # fmt: skip
    return cases
