"""Triton body of the fused patch embedding (see :mod:`mmkernels.ops.patch_embed`).

One GEMM ``out[m, d] = sum_k A[m, k] * W[d, k]`` where row ``m`` is a patch and ``A`` is
never materialized: each (BLOCK_M, BLOCK_K) tile is gathered straight from the image
(im2col addressing: patch (b, ph, pw), element (c, i, j) -> pixels[b, c, ph*P+i, pw*P+j])
or read from pre-flattened patches (Qwen2-VL), normalized per channel in fp32 when asked
((x*scale - mean)/std as ``x * (scale/std) - mean/std``, so uint8 pixels can come
straight from the decoder) and cast to the weight dtype, as Hugging Face casts
``pixel_values`` to the conv weight's dtype. The
epilogue adds bias and the position embedding and stores each row at its place in the
output; programs that own a patch 0 also write that image's class row (class embedding
+ position 0).

Gathered A tiles cost the K loop one narrow copy and the im2col address arithmetic per
element (and normalization, when asked), about 3x the instructions per K step of a GEMM
over a plain matrix (kernel report, sm_90). For large batches the launcher therefore
first runs :func:`patch_pack_kernel` for images and for normalized flat patches (see
``embed_config``): it writes the
normalized, converted patches as a row-major ``(M, K_pad)`` matrix (rows padded with
zeros to a multiple of 16 elements), which the GEMM then reads like any other
(``IMAGE_FORM`` and ``NORMALIZE`` off) with 16-byte async copies: two launches and one
extra write + read of ``M x K_pad`` elements. ``EmbedConfig.a_source`` names the
forms.

Offsets: every product of an index and a stride (or a row length) is taken in int64,
except the position table's row offset, 64-bit only when the launcher finds the table
spanning 2^31 elements (``POS_INT64``: always 64-bit, it cost SigLIP's sm_90 GEMM 2
registers, 128 -> 130 at 8 warps). At the sizes of issue 15 (a Qwen2-VL video of
thousands of frames: 100k+ rows of 1176 columns, packed or flat, into 1280 output
columns; 64 x 3 x 1344 x 1344 uint8 pixels) the row, image, weight and output offsets
already were. The products that were int32 (a patch's pixel row or column times the
pixel row or column stride, a position row times the table's row stride) stay inside one
image or one table; they overflowed only for pixels viewed out of a buffer of more than
2^31 elements with the image rows outermost (the JIT passes each stride as int32 while
it fits, their product need not) or a position table spanning more than 2^31 elements.
Indices themselves (rows < M, columns < K or D) stay int32.
"""

import triton
import triton.language as tl


@triton.jit
def _row_offsets(rows, N, patches_w, stride_pb, stride_ph, stride_pw, P: tl.constexpr, IMAGE_FORM: tl.constexpr):
    """Offset (int64 elements) of each GEMM row's first pixel: patch (image, ph, pw) of
    the image form, or the row of pre-flattened patches."""
    if IMAGE_FORM:
        image = rows // N
        patch = rows % N
        return (
            image.to(tl.int64) * stride_pb
            + ((patch // patches_w) * P).to(tl.int64) * stride_ph
            + ((patch % patches_w) * P).to(tl.int64) * stride_pw
        )
    else:
        return rows.to(tl.int64) * stride_pb


@triton.jit
def _normalized(a, scale, mean, std):
    """``(a * scale - mean) / std`` in fp32 as one multiply-add per element: the divisions
    happen on the per-channel factors ``scale / std`` and ``-mean / std`` (vectors along
    K, or scalars), not per element. uint8 pixels become floats by exponent bits (the
    float 2^23 + x, minus 2^23: exact, no int-to-float conversion, which issues at a
    quarter of the add rate)."""
    if a.dtype.is_uint8():
        x = (a.to(tl.int32) | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0
    else:
        x = a.to(tl.float32)
    return x * (scale / std) - mean / std


@triton.jit
def _pixel_tile(pix_ptr, norm_ptr, row_base, row_ok, ks, K, channels, k_per_channel, stride_pc, stride_ph, stride_pw,
                P: tl.constexpr, IMAGE_FORM: tl.constexpr, NORMALIZE: tl.constexpr):  # fmt: skip
    """The (rows, ks) tile of the implicit patch matrix A, normalized in fp32 when asked
    (not yet converted). Columns ks >= K load 0 (normalized: not 0)."""
    k_ok = ks < K
    channel = ks // k_per_channel
    if IMAGE_FORM:
        within = ks % (P * P)
        k_off = (channel.to(tl.int64) * stride_pc + (within // P).to(tl.int64) * stride_ph
                 + (within % P).to(tl.int64) * stride_pw)  # fmt: skip
    else:
        k_off = ks.to(tl.int64) * stride_pc
    a = tl.load(pix_ptr + row_base[:, None] + k_off[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0)
    if NORMALIZE:
        scale = tl.load(norm_ptr + channel, mask=k_ok, other=1.0)
        mean = tl.load(norm_ptr + channels + channel, mask=k_ok, other=0.0)
        std = tl.load(norm_ptr + 2 * channels + channel, mask=k_ok, other=1.0)
        a = _normalized(a, scale[None, :], mean[None, :], std[None, :])
    return a


@triton.jit
def patch_pack_kernel(
    pix_ptr,
    norm_ptr,  # (3, C) fp32: scale, mean, std
    a_ptr,  # (M, K_pad) out: the patch matrix in the weight dtype
    M,
    N,  # patches per image
    K,
    k_pad,  # columns of A written: K, then zeros up to k_pad
    patches_w,
    channels,
    k_per_channel,
    stride_pb,
    stride_pc,
    stride_ph,
    stride_pw,
    stride_am,
    P: tl.constexpr,
    IMAGE_FORM: tl.constexpr,
    NORMALIZE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """A[m, k] = normalize(pixels at patch m, element k) in the weight dtype; 0 for
    K <= k < k_pad (the GEMM may then read whole 16-element groups of a row)."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    ks = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    row_ok = rows < M
    row_base = _row_offsets(rows, N, patches_w, stride_pb, stride_ph, stride_pw, P, IMAGE_FORM)
    a = _pixel_tile(pix_ptr, norm_ptr, row_base, row_ok, ks, K, channels, k_per_channel, stride_pc, stride_ph,
                    stride_pw, P, IMAGE_FORM, NORMALIZE)  # fmt: skip
    a = tl.where((ks < K)[None, :], a, 0)
    ptrs = a_ptr + rows.to(tl.int64)[:, None] * stride_am + ks[None, :]
    tl.store(ptrs, a.to(a_ptr.dtype.element_ty), mask=row_ok[:, None] & (ks < k_pad)[None, :])


@triton.jit
def patch_embed_kernel(
    pix_ptr,
    w_ptr,  # (D, K) row-major: the conv weight flattened over (C, [T,] P, P)
    bias_ptr,
    cls_ptr,  # (D,)
    pos_ptr,  # (num_positions, D) or (B, num_positions, D)
    norm_ptr,  # (3, C) fp32: scale, mean, std
    out_ptr,  # (B, CLS + N, D) or (N, D)
    M,  # GEMM rows: B * N patches
    N,  # patches per image
    D,
    K,
    a_cols,  # flat form: columns of A that may be read (K, or K_pad of a packed matrix whose pad is 0)
    patches_w,  # patches per image row (W // P)
    channels,  # C
    k_per_channel,  # GEMM columns per channel: P*P, or T*P*P for pre-flattened Conv3d patches
    stride_pb,  # image form: pixel strides (b, c, h, w); flat form: (row, col, 0, 0)
    stride_pc,
    stride_ph,
    stride_pw,
    pos_stride_b,  # 0 when the position table is shared by all images
    pos_stride_n,
    out_stride_b,
    out_stride_n,
    P: tl.constexpr,
    IMAGE_FORM: tl.constexpr,  # (B, C, H, W) pixels; else pre-flattened (M, K)
    HAS_BIAS: tl.constexpr,
    HAS_CLASS: tl.constexpr,
    HAS_POS: tl.constexpr,
    POS_INT64: tl.constexpr,  # the table's rows span 2^31 elements or more: 64-bit row offsets
    NORMALIZE: tl.constexpr,
    UPCAST_DOT: tl.constexpr,  # interpreter only: bf16 tl.dot is wrong there
    DOT_PRECISION: tl.constexpr,  # "ieee" for exact fp32 GEMMs, "tf32" where torch allows it
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    W_ALIGN: tl.constexpr,  # K and the weight's base are multiples of W_ALIGN elements (<= 16 bytes)
    PIX_ALIGN: tl.constexpr,  # flat form: the row stride, a_cols and base likewise (1: nothing known)
    ROW_STEPS: tl.constexpr,  # image form: one K step per (channel, patch row), BLOCK_K >= P
):
    # Alignment the JIT cannot see (it proves only multiples of 16): K = 1176 (Qwen2-VL) or
    # 588 (P = 14 towers) leaves weight and flat-patch rows 8- or 16-byte aligned, and
    # saying so lets their loads be vectors instead of single elements. Written as
    # (x // A) * A, exact since the launcher checked divisibility: tl.multiple_of has no
    # effect on a scalar argument (nothing defines it to carry the attribute).
    if W_ALIGN > 1:
        K = (K // W_ALIGN) * W_ALIGN
    if PIX_ALIGN > 1:
        stride_pb = (stride_pb // PIX_ALIGN) * PIX_ALIGN
        a_cols = (a_cols // PIX_ALIGN) * PIX_ALIGN
    # Grouped ordering: consecutive programs share weight tiles in L2.
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(D, BLOCK_N)
    group = GROUP_M * num_pid_n
    first_m = (pid // group) * GROUP_M
    group_size = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group) % group_size
    pid_n = (pid % group) // group_size

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < M
    col_ok = cols < D
    image = rows // N
    patch = rows % N
    row_base = _row_offsets(rows, N, patches_w, stride_pb, stride_ph, stride_pw, P, IMAGE_FORM)

    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    if IMAGE_FORM and ROW_STEPS:
        # One K step per (channel c, patch row i): the A tile is P contiguous pixels of one
        # image row per patch (address = row start + j, so the loads can be vectors and
        # async copies) instead of a gather with a divmod per element; P < BLOCK_K
        # columns are masked (14 of 16: 12.5% of the MMA idle).
        js = tl.arange(0, BLOCK_K)
        j_ok = js < P
        a_base = pix_ptr + row_base[:, None] + js.to(tl.int64)[None, :] * stride_pw
        a_mask = row_ok[:, None] & j_ok[None, :]
        w_base = w_ptr + cols[None, :].to(tl.int64) * K + js[:, None]
        w_mask = j_ok[:, None] & col_ok[None, :]
        for r in range(0, channels * P):
            c = r // P
            i = r - c * P
            a = tl.load(a_base + (c.to(tl.int64) * stride_pc + i.to(tl.int64) * stride_ph), mask=a_mask, other=0)
            if NORMALIZE:
                scale = tl.load(norm_ptr + c)
                mean = tl.load(norm_ptr + channels + c)
                std = tl.load(norm_ptr + 2 * channels + c)
                a = _normalized(a, scale, mean, std)
            a = a.to(w_ptr.dtype.element_ty)
            w = tl.load(w_base + r * P, mask=w_mask, other=0)  # K index c*P*P + i*P + j = r*P + j
            if UPCAST_DOT:
                a = a.to(tl.float32)
                w = w.to(tl.float32)
            acc = tl.dot(a, w, acc, input_precision=DOT_PRECISION)
    else:
        for k0 in range(0, K, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            k_ok = ks < K
            if IMAGE_FORM or NORMALIZE:
                a = _pixel_tile(pix_ptr, norm_ptr, row_base, row_ok, ks, K, channels, k_per_channel, stride_pc,
                                stride_ph, stride_pw, P, IMAGE_FORM, NORMALIZE)  # fmt: skip
            else:
                # Columns up to a_cols: a packed matrix's zero pad is read, not masked, so
                # the mask is constant over 16-element groups and the loads are vectors.
                a_ptrs = pix_ptr + row_base[:, None] + ks.to(tl.int64)[None, :] * stride_pc
                a = tl.load(a_ptrs, mask=row_ok[:, None] & (ks < a_cols)[None, :], other=0)
            a = a.to(w_ptr.dtype.element_ty)
            w = tl.load(w_ptr + cols[None, :].to(tl.int64) * K + ks[:, None], mask=k_ok[:, None] & col_ok[None, :], other=0)
            if UPCAST_DOT:
                a = a.to(tl.float32)
                w = w.to(tl.float32)
            acc = tl.dot(a, w, acc, input_precision=DOT_PRECISION)

    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=col_ok, other=0).to(tl.float32)[None, :]
    out_rows = patch + HAS_CLASS
    tile_ok = row_ok[:, None] & col_ok[None, :]
    if HAS_POS:
        if POS_INT64:
            pos_row = image.to(tl.int64) * pos_stride_b + out_rows.to(tl.int64) * pos_stride_n
        else:
            # The launcher checked that row * pos_stride_n fits: the 64-bit product costs
            # SigLIP's sm_90 tile 2 registers, 128 -> 130 at 8 warps (one CTA per SM less).
            pos_row = image.to(tl.int64) * pos_stride_b + out_rows * pos_stride_n
        pos = tl.load(pos_ptr + pos_row[:, None] + cols[None, :], mask=tile_ok, other=0)
        acc += pos.to(tl.float32)
    out_base = out_ptr + image.to(tl.int64)[:, None] * out_stride_b + cols[None, :]
    tl.store(out_base + out_rows.to(tl.int64)[:, None] * out_stride_n, acc.to(out_ptr.dtype.element_ty), mask=tile_ok)
    if HAS_CLASS:
        first = tile_ok & (patch == 0)[:, None]
        cls_row = tl.load(cls_ptr + cols, mask=col_ok, other=0).to(tl.float32)[None, :] + tl.zeros(
            [BLOCK_M, BLOCK_N], dtype=tl.float32
        )
        if HAS_POS:
            pos0 = tl.load(pos_ptr + image.to(tl.int64)[:, None] * pos_stride_b + cols[None, :], mask=first, other=0)
            cls_row += pos0.to(tl.float32)
        tl.store(out_base, cls_row.to(out_ptr.dtype.element_ty), mask=first)
