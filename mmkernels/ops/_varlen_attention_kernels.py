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
* Rows past ``cu_seqlens_q[-1]`` (padding some callers leave at the end) are written
  as 0 by one extra program column, so no output row is left undefined.
* The query-block loop strides over the actual sequence length read from
  ``cu_seqlens_q``, so a ``max_seqlen_q`` that is too small only costs speed: no row is
  ever left unwritten.
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
    out_ptr,  # (total_q, Hq, d), contiguous
    cu_q_ptr,  # (B + 1,) int32
    cu_k_ptr,
    ranges_ptr,  # (total_q, 2) int32: [start, end) per query, relative to its sequence's keys
    qk_scale,  # softmax_scale * log2(e): scores go through exp2
    total_q,
    n_seqs,
    head_dim,
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
    HEAD_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    slot = tl.program_id(0)
    seq = tl.program_id(1)
    head = tl.program_id(2)
    kv_head = head // group
    # Sequence index n_seqs is the tail: rows past cu_seqlens_q[-1] belong to no sequence
    # and see no key, so they are written as 0 (every output row is defined).
    is_tail = seq == n_seqs
    last = tl.minimum(seq + 1, n_seqs)
    q_start = tl.load(cu_q_ptr + seq)
    q_len = tl.where(is_tail, total_q, tl.load(cu_q_ptr + last)) - q_start
    k_start = tl.load(cu_k_ptr + seq)
    k_len = tl.where(is_tail, 0, tl.load(cu_k_ptr + last) - k_start)

    offs_d = tl.arange(0, HEAD_PAD)
    d_ok = offs_d < head_dim
    q_base = q_ptr + q_start.to(tl.int64) * stride_qt + head * stride_qh
    k_base = k_ptr + k_start.to(tl.int64) * stride_kt + kv_head * stride_kh
    v_base = v_ptr + k_start.to(tl.int64) * stride_vt + kv_head * stride_vh
    o_base = out_ptr + q_start.to(tl.int64) * stride_ot + head * stride_oh
    # Bottom-right causal alignment (flash-attn): query i sees keys j <= i + k_len - q_len.
    causal_shift = k_len - q_len

    for m0 in range(slot * BLOCK_M, q_len, tl.num_programs(0) * BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        m_ok = offs_m < q_len
        q = tl.load(q_base + offs_m[:, None].to(tl.int64) * stride_qt + offs_d[None, :],
                    mask=m_ok[:, None] & d_ok[None, :], other=0)  # fmt: skip
        if UPCAST_DOT:
            q = q.to(tl.float32)

        # The key window this block needs: the union of its rows' ranges.
        lo = 0
        hi = k_len
        if HAS_RANGES:
            r_ptr = ranges_ptr + (q_start + offs_m).to(tl.int64) * stride_rt
            row_lo = tl.maximum(tl.load(r_ptr, mask=m_ok, other=0), 0)
            row_hi = tl.minimum(tl.load(r_ptr + stride_rc, mask=m_ok, other=0), k_len)
            row_has = m_ok & (row_lo < row_hi)
            lo = tl.min(tl.where(row_has, row_lo, k_len), axis=0)
            hi = tl.max(tl.where(row_has, row_hi, 0), axis=0)
        if CAUSAL:
            hi = tl.minimum(hi, m0 + BLOCK_M + causal_shift)
        lo = (lo // BLOCK_N) * BLOCK_N  # aligned starts: same key tiling for every block

        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, HEAD_PAD], dtype=tl.float32)
        for n0 in range(lo, hi, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            n_ok = offs_n < k_len
            kv_mask = n_ok[:, None] & d_ok[None, :]
            k = tl.load(k_base + offs_n[:, None].to(tl.int64) * stride_kt + offs_d[None, :], mask=kv_mask, other=0)
            if UPCAST_DOT:
                k = k.to(tl.float32)
            s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
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
            v = tl.load(v_base + offs_n[:, None].to(tl.int64) * stride_vt + offs_d[None, :], mask=kv_mask, other=0)
            if UPCAST_DOT:
                v = v.to(tl.float32)
            else:
                p = p.to(v.dtype)
            acc = acc * alpha[:, None]
            acc = tl.dot(p, v, acc, input_precision=DOT_PRECISION)
            m_i = m_new

        # Rows that saw no key: l == 0 and acc == 0, so they store exactly 0.
        out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
        tl.store(o_base + offs_m[:, None].to(tl.int64) * stride_ot + offs_d[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & d_ok[None, :])  # fmt: skip
