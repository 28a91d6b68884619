"""Triton bodies of the multimodal token merge (see :mod:`mmkernels.ops.merge`).

Two launches, no host sync (one for short sequences without the count check):

1. ``merge_count_kernel``: per block of ``BLOCK_T`` tokens, how many positions hold each
   placeholder id (and, for the fused lookup, how many text ids fall outside the table).
   The launcher takes its cumulative sum over blocks on the device (one torch.cumsum).
   With ``SCAN_PREFIX`` (short sequences, no count check) neither runs: each program of
   the rows kernel counts the placeholders before its block itself, re-reading at most
   the sequence's ids (a few KB from L2) instead of two more device operations.
2. ``merge_rows_kernel``: each program owns ``BLOCK_T`` output rows x ``BLOCK_D``
   columns and writes every element exactly once: placeholder rows from the features
   (rank = block prefix + in-block cumsum, then a binary search over the feature
   segments; every placeholder of a broadcast kind takes that kind's one row, no rank
   needed), text rows from ``inputs_embeds`` or gathered from the embedding table.
   Rows that cannot be filled (more placeholders than features, a text id outside the
   table) are written as NaN so an unchecked mismatch is visible, never read out of
   bounds. In place (``WRITE_TEXT=False``, ``out`` is ``inputs_embeds``) only the
   placeholder rows are written.

Layouts: ``input_ids`` and the text source are read through their strides (any view:
offsets into a larger buffer, expanded zero strides, transposed); only the feature
tensors must have unit column stride (the launcher copies the rare ones that do not).
Every address is computed in int64: a 262144 x 8192 embedding table has 2^31 elements,
and ``token_id * row_stride`` (or a row index times a padded row stride) passes 2^31
at real sizes.
"""

import triton
import triton.language as tl


@triton.jit
def merge_count_kernel(
    ids_ptr,  # (T,) int32/int64
    ids_stride,  # element stride of the (T,) ids view (0 for an expanded view)
    kind_ids_ptr,  # (NUM_KINDS,) int64: the placeholder id of each kind
    counts_ptr,  # (num_blocks, NUM_KINDS + 1) int32, out; last column: text ids outside [0, V)
    T,
    V,  # rows of the embedding table; ignored unless FUSED_LOOKUP
    NUM_KINDS: tl.constexpr,
    FUSED_LOOKUP: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    block = tl.program_id(0)
    rows = block * BLOCK_T + tl.arange(0, BLOCK_T)
    in_range = rows < T
    ids = tl.load(ids_ptr + rows.to(tl.int64) * ids_stride, mask=in_range, other=0).to(tl.int64)
    is_placeholder = tl.zeros([BLOCK_T], dtype=tl.int1)
    for k in tl.static_range(NUM_KINDS):
        hit = (ids == tl.load(kind_ids_ptr + k)) & in_range
        is_placeholder = is_placeholder | hit
        tl.store(counts_ptr + block * (NUM_KINDS + 1) + k, tl.sum(hit.to(tl.int32), axis=0))
    if FUSED_LOOKUP:
        bad = in_range & (~is_placeholder) & ((ids < 0) | (ids >= V))
        tl.store(counts_ptr + block * (NUM_KINDS + 1) + NUM_KINDS, tl.sum(bad.to(tl.int32), axis=0))
    else:
        tl.store(counts_ptr + block * (NUM_KINDS + 1) + NUM_KINDS, 0)


@triton.jit
def merge_rows_kernel(
    ids_ptr,  # (T,) int32/int64
    ids_stride,  # element stride of the (T,) ids view
    kind_ids_ptr,  # (NUM_KINDS,) int64
    kind_rows_ptr,  # (NUM_KINDS,) int64: feature rows given for each kind
    kind_first_row_ptr,  # (NUM_KINDS,) int64: global index of each kind's first feature row
    counts_ptr,  # (num_blocks, NUM_KINDS + 1) int32: from merge_count_kernel
    block_cumsum_ptr,  # (num_blocks, NUM_KINDS + 1) int32: inclusive cumsum of counts over blocks
    seg_offset_ptr,  # (num_segs,) int64: start of each feature tensor, in elements from feat_base_ptr
    seg_first_row_ptr,  # (num_segs,) int64: global index of each segment's first row (non-decreasing)
    seg_row_stride_ptr,  # (num_segs,) int64: row stride of each feature tensor, in elements
    feat_base_ptr,  # the first feature tensor; every segment is addressed relative to it
    src_ptr,  # the embedding table (V, D), inputs_embeds rows (T, D), or (T // src_seq, src_seq, D)
    src_stride_0,  # table: row stride; inputs_embeds: row stride, or stride of dim 0 if SRC_BATCHED
    src_stride_1,  # inputs_embeds with SRC_BATCHED: stride of dim 1; else unused
    src_col_stride,
    src_seq,  # inputs_embeds with SRC_BATCHED: size of dim 1; else unused
    out_ptr,  # (T, D) contiguous
    out_row_stride,
    T,
    D,
    V,
    num_segs,  # feature tensors given (runtime: a new image count must not recompile)
    NUM_KINDS: tl.constexpr,
    HAS_FEATURES: tl.constexpr,  # num_segs > 0
    SEARCH_STEPS: tl.constexpr,  # >= ceil(log2(num_segs)), bucketed to a power of two
    FUSED_LOOKUP: tl.constexpr,
    SRC_BATCHED: tl.constexpr,  # inputs_embeds whose (B, S) rows do not flatten to one stride
    CAST_FEATURES: tl.constexpr,  # features dtype != output dtype
    FEAT_BYTES: tl.constexpr,  # element size of the features
    FEATURES_ALIGNED: tl.constexpr,  # every segment base and row stride is 16-byte aligned
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
    WRITE_TEXT: tl.constexpr = True,  # False: in place, out is inputs_embeds; only placeholder rows are written
    SCAN_PREFIX: tl.constexpr = False,  # count the placeholders before the block here (counts_ptr unused)
    SCAN_T: tl.constexpr = 1024,  # ids per step of that count
    BROADCAST_KINDS: tl.constexpr = 0,  # bit k set: kind k has one feature row, written at each of its placeholders
):
    block = tl.program_id(0)
    # Masks in int32 (T < 2^31), every address from int64 rows: with int64 masks too the
    # Qwen2-VL fp16 case took 90 registers on sm_80 instead of 76.
    rows32 = block * BLOCK_T + tl.arange(0, BLOCK_T)
    row_ok = rows32 < T
    rows = rows32.to(tl.int64)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    col_ok = cols < D
    ids = tl.load(ids_ptr + rows * ids_stride, mask=row_ok, other=0).to(tl.int64)

    # Which kind each row is, and its global feature index (-1: none).
    is_placeholder = tl.zeros([BLOCK_T], dtype=tl.int1)
    feat_index = tl.full([BLOCK_T], -1, dtype=tl.int64)
    for k in tl.static_range(NUM_KINDS):
        kind_id = tl.load(kind_ids_ptr + k)
        hit = (ids == kind_id) & row_ok
        if (BROADCAST_KINDS >> k) & 1:
            # Every placeholder of this kind takes its one row: no rank, so no count.
            feat_index = tl.where(hit, tl.load(kind_first_row_ptr + k), feat_index)
        else:
            if SCAN_PREFIX:
                # Placeholders of this kind in the rows before the block, counted here.
                first_row = block * BLOCK_T
                before = tl.zeros([], dtype=tl.int64)
                for start in range(0, first_row, SCAN_T):
                    prior32 = start + tl.arange(0, SCAN_T)
                    prior_ok = prior32 < first_row
                    prior = tl.load(ids_ptr + prior32.to(tl.int64) * ids_stride, mask=prior_ok, other=0).to(tl.int64)
                    before += tl.sum(((prior == kind_id) & prior_ok).to(tl.int64), axis=0)
            else:
                before = tl.load(block_cumsum_ptr + block * (NUM_KINDS + 1) + k).to(tl.int64) - tl.load(
                    counts_ptr + block * (NUM_KINDS + 1) + k
                ).to(tl.int64)
            rank = before + tl.cumsum(hit.to(tl.int64), axis=0) - 1
            has_feature = hit & (rank < tl.load(kind_rows_ptr + k))
            feat_index = tl.where(has_feature, tl.load(kind_first_row_ptr + k) + rank, feat_index)
        is_placeholder = is_placeholder | hit
    has_feature = feat_index >= 0

    tile_ok = col_ok[None, :]
    if HAS_FEATURES:
        # Last segment whose first row <= feat_index: seg_first_row[lo] <= g < seg_first_row[hi].
        # Extra steps (SEARCH_STEPS is bucketed) leave lo unchanged once hi - lo == 1.
        g = tl.maximum(feat_index, 0)
        lo = tl.zeros([BLOCK_T], dtype=tl.int64)
        hi = tl.zeros([BLOCK_T], dtype=tl.int64) + num_segs
        for _ in tl.static_range(SEARCH_STEPS):
            mid = (lo + hi) // 2
            go_right = tl.load(seg_first_row_ptr + mid, mask=mid < num_segs, other=0) <= g
            lo = tl.where(go_right, mid, lo)
            hi = tl.where(go_right, hi, mid)
        local_row = g - tl.load(seg_first_row_ptr + lo, mask=has_feature, other=0)
        row_stride = tl.load(seg_row_stride_ptr + lo, mask=has_feature, other=0)
        row_offset = tl.load(seg_offset_ptr + lo, mask=has_feature, other=0) + local_row * row_stride
        if FEATURES_ALIGNED:
            # Offsets read from a table carry no alignment the compiler can see; the launcher
            # checked that every segment start and row stride is a multiple of 16 bytes.
            row_offset = tl.multiple_of(row_offset, 16 // FEAT_BYTES)
        feat_ptrs = feat_base_ptr + row_offset[:, None] + cols[None, :]
        feat = tl.load(feat_ptrs, mask=has_feature[:, None] & tile_ok, other=0)
        if CAST_FEATURES:
            feat = feat.to(tl.float32).to(out_ptr.dtype.element_ty)

    if not WRITE_TEXT:
        # In place: the text rows are already in out; placeholder rows get their feature
        # row, or NaN where there is none (as the out-of-place form writes them).
        value = tl.full([BLOCK_T, BLOCK_D], float("nan"), dtype=tl.float32).to(out_ptr.dtype.element_ty)
        if HAS_FEATURES:
            value = tl.where(has_feature[:, None], feat, value)
        tl.store(out_ptr + rows[:, None] * out_row_stride + cols[None, :], value, mask=is_placeholder[:, None] & tile_ok)
    else:
        if FUSED_LOOKUP:
            # ids is int64: token_id * row_stride passes 2^31 for large tables.
            src_offset = ids * src_stride_0
            text_ok = row_ok & (~is_placeholder) & (ids >= 0) & (ids < V)
        elif SRC_BATCHED:
            # Expanded over the batch, (S, B, D) memory, ...: row t is (t // S, t % S). Only
            # these layouts pay the division; the others compile without it.
            outer = rows // src_seq
            src_offset = outer * src_stride_0 + (rows - outer * src_seq) * src_stride_1
            text_ok = row_ok & (~is_placeholder)
        else:
            src_offset = rows * src_stride_0
            text_ok = row_ok & (~is_placeholder)
        text = tl.load(
            src_ptr + src_offset[:, None] + cols.to(tl.int64)[None, :] * src_col_stride,
            mask=text_ok[:, None] & tile_ok,
            other=float("nan"),
        )
        if HAS_FEATURES:
            text = tl.where(has_feature[:, None], feat, text)
        tl.store(
            out_ptr + rows[:, None] * out_row_stride + cols[None, :],
            text,
            mask=row_ok[:, None] & tile_ok,
        )
