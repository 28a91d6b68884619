"""Triton body of the varlen attention forward (see :mod:`mmkernels.ops.varlen_attention`).

FlashAttention-2's forward over packed variable-length sequences: one program per
(query block slot, sequence, query head) streams the key blocks of its sequence through
an online softmax in fp32 (running max ``m``, running sum ``l``, unnormalized ``acc``).

What is added to flash-attn's varlen forward:

* ``kv_ranges``: query ``i`` sees only keys ``[start_i, end_i)`` of its own sequence. The
  program reads the ranges of its query rows and streams only the key blocks inside
  their union, so keys outside every row's range are never loaded (that is the speed
  over a dense mask); inside the union each score is masked per row.
* A row that sees no key ends with ``l == 0`` and stores exactly 0 (no NaN): the running
  max is kept finite (``m_safe``) while a row has seen nothing.
* No output row is left undefined. One extra program column (sequence index ``B``)
  writes rows past ``cu_seqlens_q[-1]`` (padding some callers leave at the end) as 0,
  and rows that ``max_seqlen_q`` did not cover (a caller passing too small a value, which
  flash-attn silently leaves as garbage) or that lie before ``cu_seqlens_q[0]`` as NaN,
  so the mistake shows. (A loop over query blocks inside each program would cover them,
  but costs ~60 registers per thread in every launch and spills: see the kernel report.)
* Offsets are never trusted for addressing. Validating ``cu_seqlens`` on the host costs
  a sync (the op's ``check=True``), so every program clamps the offsets it reads into
  ``[0, total]`` with ``end >= start``: offsets that break the contract (negative, past
  the end, decreasing) give wrong rows, NaN rows or, where such sequences overlap, rows
  written twice, but never a read or write outside q, k, v, out or kv_ranges.
* 64-bit addressing where a product can pass 2^31: sequence starts always; head
  offsets when the launcher finds ``(heads - 1) x head_stride`` past 2^31 (``WIDE_HEADS``:
  a head-major layout, head stride S x d, passes it at 32 heads from S = 524k tokens of
  d = 128; 64-bit head offsets everywhere would cost d = 96 on sm_80 70 registers, 185
  -> 255, in the kernel report). Offsets inside a tile are 32-bit (the launcher keeps
  token strides small enough that ``BLOCK x stride`` fits).
* Head dims that are not powers of two (72, 80, 96) are padded to ``HEAD_PAD`` inside the
  kernel with masked loads; the caller passes the real tensors.
"""

import triton
import triton.language as tl


@triton.jit
def varlen_attention_fwd_kernel(
    q_ptr,  # (total_q, Hq, d)
    k_ptr,  # (total_k, Hkv, d)
    v_ptr,
    out_ptr,  # (total_q, Hq, d)
    cu_q_ptr,  # (B + 1,) int32
    cu_k_ptr,
    ranges_ptr,  # (total_q, 2) int32: [start, end) per query, relative to its sequence's keys
    qk_scale,  # softmax_scale * log2(e): scores go through exp2
    total_q,
    total_k,
    n_seqs,
    n_slots,  # query blocks per sequence: program_id(0) = sequence * n_slots + slot
    group,  # Hq // Hkv
    stride_qt,
    stride_qh,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_ot,
    stride_oh,
    stride_rt,
    stride_rc,
    HAS_RANGES: tl.constexpr,
    CAUSAL: tl.constexpr,
    UPCAST_DOT: tl.constexpr,  # interpreter only: bf16 tl.dot is wrong there
    DOT_PRECISION: tl.constexpr,  # "ieee" for fp32 inputs
    HEAD_DIM: tl.constexpr,  # real head dim; constexpr so the d-mask folds away for powers of two
    HEAD_PAD: tl.constexpr,  # next power of two >= HEAD_DIM (the row-fill tiles)
    HEAD_A: tl.constexpr,  # the head dim in two power-of-two chunks: [0, HEAD_A) and
    HEAD_B: tl.constexpr,  # [HEAD_A, HEAD_A + HEAD_B) (0: none); 80 = 64 + 16, 96 = 64 + 32
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    ALIGN: tl.constexpr,  # every token and head stride is a multiple of ALIGN elements (16 bytes)
    WIDE_HEADS: tl.constexpr,  # some head * head_stride passes 2^31: 64-bit head offsets
):
    if ALIGN > 1:
        # The JIT only proves divisibility by 16 elements; a head dim of 72 or 80 (strides
        # 72 / 80, Hq * 72, ...) is 16-byte aligned too, and saying so lets the tiles load
        # as 16-byte vectors and through cp.async. Written as (x // A) * A, exact since the
        # launcher checked divisibility: tl.multiple_of on a scalar argument has no effect
        # (the PTX is identical with and without it; nothing defines the argument to carry
        # the attribute).
        stride_qt = (stride_qt // ALIGN) * ALIGN
        stride_qh = (stride_qh // ALIGN) * ALIGN
        stride_kt = (stride_kt // ALIGN) * ALIGN
        stride_kh = (stride_kh // ALIGN) * ALIGN
        stride_vt = (stride_vt // ALIGN) * ALIGN
        stride_vh = (stride_vh // ALIGN) * ALIGN
        stride_ot = (stride_ot // ALIGN) * ALIGN
        stride_oh = (stride_oh // ALIGN) * ALIGN
    # Sequences and their query blocks share axis 0 (CUDA allows 2^31 - 1 programs there
    # but 65535 in y and z, and a batch of many short sequences can pass that).
    pid = tl.program_id(0)
    seq = pid // n_slots
    slot = pid - seq * n_slots
    head = tl.program_id(1)
    offs_d = tl.arange(0, HEAD_PAD)
    d_ok = offs_d < HEAD_DIM
    if seq == n_seqs:
        if slot == 0:
            _fill_uncovered_rows(out_ptr, cu_q_ptr, total_q, n_seqs, head, stride_ot, stride_oh,
                                 n_slots * BLOCK_M, offs_d, d_ok, HEAD_PAD, BLOCK_M)  # fmt: skip
    else:
        q_start, q_end = _clamped_span(cu_q_ptr, seq, total_q)
        q_len = q_end - q_start
        m0 = slot * BLOCK_M
        if m0 < q_len:
            k_start, k_end = _clamped_span(cu_k_ptr, seq, total_k)
            k_len = k_end - k_start
            q_head = head
            kv_head = head // group
            if WIDE_HEADS:
                q_head = q_head.to(tl.int64)
                kv_head = kv_head.to(tl.int64)
            _attend_query_block(
                q_ptr + q_start.to(tl.int64) * stride_qt + q_head * stride_qh,
                k_ptr + k_start.to(tl.int64) * stride_kt + kv_head * stride_kh,
                v_ptr + k_start.to(tl.int64) * stride_vt + kv_head * stride_vh,
                out_ptr + q_start.to(tl.int64) * stride_ot + q_head * stride_oh,
                ranges_ptr + q_start.to(tl.int64) * stride_rt,
                m0, q_len, k_len, qk_scale, stride_qt, stride_kt, stride_vt, stride_ot, stride_rt, stride_rc,
                HEAD_DIM, HAS_RANGES, CAUSAL, UPCAST_DOT, DOT_PRECISION, HEAD_A, HEAD_B, BLOCK_M, BLOCK_N,
            )  # fmt: skip


@triton.jit
def _clamped_span(cu_ptr, seq, total):
    """Rows ``[start, end)`` of sequence ``seq``, clamped so that ``0 <= start <= end <=
    total`` whatever the offsets hold (see the module docstring)."""
    start = tl.minimum(tl.maximum(tl.load(cu_ptr + seq), 0), total)
    end = tl.minimum(tl.maximum(tl.load(cu_ptr + seq + 1), start), total)
    return start, end


@triton.jit
def _load_rows(base, first_row, lo_row, hi_row, stride, offs, ok, BLOCK: tl.constexpr):
    """Rows [first_row, first_row + BLOCK) of a row-major tile, those in [lo_row, hi_row),
    at the columns ``offs`` where ``ok`` (0 elsewhere): a 64-bit block base and 32-bit
    offsets inside the block (fewer address registers)."""
    rows = tl.arange(0, BLOCK)
    row = first_row + rows
    mask = ((row >= lo_row) & (row < hi_row))[:, None] & ok[None, :]
    return tl.load(base + tl.cast(first_row, tl.int64) * stride + rows[:, None] * stride + offs[None, :], mask=mask,
                   other=0)  # fmt: skip


@triton.jit
def _attend_query_block(q_base, k_base, v_base, o_base, r_base, m0, q_len, k_len, qk_scale,
                        stride_qt, stride_kt, stride_vt, stride_ot, stride_rt, stride_rc,
                        HEAD_DIM: tl.constexpr, HAS_RANGES: tl.constexpr, CAUSAL: tl.constexpr,
                        UPCAST_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr, HEAD_A: tl.constexpr,
                        HEAD_B: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):  # fmt: skip
    """Queries [m0, m0 + BLOCK_M) of one sequence and head, against that sequence's keys.

    The head dim is two chunks, each a power of two (the dots need one): [0, HEAD_A) and,
    when HEAD_B > 0, [HEAD_A, HEAD_A + HEAD_B), masked past HEAD_DIM. So 80 runs as
    64 + 16 and 96 as 64 + 32 instead of padding both to 128."""
    rows = tl.arange(0, BLOCK_M)
    offs_m = m0 + rows
    m_ok = offs_m < q_len
    offs_a = tl.arange(0, HEAD_A)
    a_ok = offs_a < HEAD_DIM
    q_a = _load_rows(q_base, m0, 0, q_len, stride_qt, offs_a, a_ok, BLOCK_M)
    if UPCAST_DOT:
        q_a = q_a.to(tl.float32)
    if HEAD_B > 0:
        offs_b = HEAD_A + tl.arange(0, HEAD_B)
        b_ok = offs_b < HEAD_DIM
        q_b = _load_rows(q_base, m0, 0, q_len, stride_qt, offs_b, b_ok, BLOCK_M)
        if UPCAST_DOT:
            q_b = q_b.to(tl.float32)
    # Bottom-right causal alignment (flash-attn): query i sees keys j <= i + k_len - q_len.
    causal_shift = k_len - q_len

    # The key window this block needs: the union of its rows' ranges (and the causal limit).
    lo = 0
    hi = k_len
    if HAS_RANGES:
        r_ptr = r_base + offs_m.to(tl.int64) * stride_rt
        row_lo = tl.maximum(tl.load(r_ptr, mask=m_ok, other=0), 0)
        row_hi = tl.minimum(tl.load(r_ptr + stride_rc, mask=m_ok, other=0), k_len)
        row_has = m_ok & (row_lo < row_hi)
        lo = tl.min(tl.where(row_has, row_lo, k_len), axis=0)
        hi = tl.max(tl.where(row_has, row_hi, 0), axis=0)
    if CAUSAL:
        hi = tl.minimum(hi, m0 + BLOCK_M + causal_shift)
    # Keys outside [lo, hi) are not loaded at all (masked to 0), so nothing there, not
    # even NaN or inf, can reach this block; block starts are aligned down so every query
    # block tiles the keys the same way.
    first = lo
    lo = (lo // BLOCK_N) * BLOCK_N

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc_a = tl.zeros([BLOCK_M, HEAD_A], dtype=tl.float32)
    if HEAD_B > 0:
        acc_b = tl.zeros([BLOCK_M, HEAD_B], dtype=tl.float32)
    for n0 in range(lo, hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_ok = (offs_n >= first) & (offs_n < hi)
        keys_a = _load_rows(k_base, n0, first, hi, stride_kt, offs_a, a_ok, BLOCK_N)
        if UPCAST_DOT:
            keys_a = keys_a.to(tl.float32)
        s = tl.dot(q_a, tl.trans(keys_a), input_precision=DOT_PRECISION)
        if HEAD_B > 0:
            keys_b = _load_rows(k_base, n0, first, hi, stride_kt, offs_b, b_ok, BLOCK_N)
            if UPCAST_DOT:
                keys_b = keys_b.to(tl.float32)
            s = tl.dot(q_b, tl.trans(keys_b), s, input_precision=DOT_PRECISION)
        s = s * qk_scale
        visible = m_ok[:, None] & n_ok[None, :]
        if HAS_RANGES:
            visible &= (offs_n[None, :] >= row_lo[:, None]) & (offs_n[None, :] < row_hi[:, None])
        if CAUSAL:
            visible &= offs_n[None, :] <= offs_m[:, None] + causal_shift
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        # A row that has seen nothing yet keeps m = -inf; subtract 0 instead so that
        # exp2(-inf - (-inf)) never makes a NaN.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        values_a = _load_rows(v_base, n0, first, hi, stride_vt, offs_a, a_ok, BLOCK_N)
        if UPCAST_DOT:
            values_a = values_a.to(tl.float32)
        else:
            p = p.to(values_a.dtype)
        acc_a = tl.dot(p, values_a, acc_a * alpha[:, None], input_precision=DOT_PRECISION)
        if HEAD_B > 0:
            values_b = _load_rows(v_base, n0, first, hi, stride_vt, offs_b, b_ok, BLOCK_N)
            if UPCAST_DOT:
                values_b = values_b.to(tl.float32)
            acc_b = tl.dot(p, values_b, acc_b * alpha[:, None], input_precision=DOT_PRECISION)
        m_i = m_new

    # Rows that saw no key: l == 0 and acc == 0, so they store exactly 0.
    inv_l = 1.0 / tl.where(l_i == 0.0, 1.0, l_i)
    out_rows = o_base + tl.cast(m0, tl.int64) * stride_ot + rows[:, None] * stride_ot
    tl.store(out_rows + offs_a[None, :], (acc_a * inv_l[:, None]).to(o_base.dtype.element_ty),
             mask=m_ok[:, None] & a_ok[None, :])  # fmt: skip
    if HEAD_B > 0:
        tl.store(out_rows + offs_b[None, :], (acc_b * inv_l[:, None]).to(o_base.dtype.element_ty),
                 mask=m_ok[:, None] & b_ok[None, :])  # fmt: skip


@triton.jit
def _fill_uncovered_rows(out_ptr, cu_q_ptr, total_q, n_seqs, head, stride_ot, stride_oh, covered, offs_d, d_ok,
                         HEAD_PAD: tl.constexpr, BLOCK_M: tl.constexpr):  # fmt: skip
    """Rows of one head that no attention program owns: NaN past the first ``covered`` rows
    of each sequence (max_seqlen_q was too small) and before ``cu_seqlens_q[0]`` (which
    the contract says is 0), 0 past ``cu_seqlens_q[-1]``. Offsets are clamped as the
    attention programs clamp them, so these loops stay inside ``out``."""
    rows = tl.arange(0, BLOCK_M)
    nan_tile = tl.full([BLOCK_M, HEAD_PAD], float("nan"), dtype=tl.float32)
    zero_tile = tl.zeros([BLOCK_M, HEAD_PAD], dtype=tl.float32)
    base = out_ptr + head * stride_oh  # out is packed: (Hq - 1) x d fits 32 bits
    first = tl.minimum(tl.maximum(tl.load(cu_q_ptr), 0), total_q)
    for r0 in range(0, first, BLOCK_M):
        r = r0 + rows
        tl.store(base + r.to(tl.int64)[:, None] * stride_ot + offs_d[None, :],
                 nan_tile.to(out_ptr.dtype.element_ty), mask=(r < first)[:, None] & d_ok[None, :])  # fmt: skip
    for b in range(0, n_seqs):
        start, end = _clamped_span(cu_q_ptr, b, total_q)
        for r0 in range(start + covered, end, BLOCK_M):
            r = r0 + rows
            tl.store(base + r.to(tl.int64)[:, None] * stride_ot + offs_d[None, :],
                     nan_tile.to(out_ptr.dtype.element_ty), mask=(r < end)[:, None] & d_ok[None, :])  # fmt: skip
    last = tl.minimum(tl.maximum(tl.load(cu_q_ptr + n_seqs), 0), total_q)
    for r0 in range(last, total_q, BLOCK_M):
        r = r0 + rows
        tl.store(base + r.to(tl.int64)[:, None] * stride_ot + offs_d[None, :],
                 zero_tile.to(out_ptr.dtype.element_ty), mask=(r < total_q)[:, None] & d_ok[None, :])  # fmt: skip
