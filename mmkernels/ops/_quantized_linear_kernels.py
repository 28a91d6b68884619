"""Triton bodies of the quantized projector matmul (see :mod:`mmkernels.ops.quantized_linear`).

``out[m, n] = act(sum_k x[m, k] * W[n, k] + bias[n])`` with ``W`` read in its quantized
format (see :mod:`mmkernels.quant`) and dequantized in registers:

* ``SCHEME == 0`` (w8a16): int8 codes cast to the activation dtype (exact), the per-channel
  scale applied to the fp32 accumulator in the epilogue.
* ``SCHEME == 1`` (w4a16): a ``(BLOCK_N, BLOCK_K // 2)`` tile of packed bytes is split into
  low / high nibbles and interleaved back into K order, ``(q - z) * s`` in fp32 (exact
  ``q - z`` from exponent bits, no int-to-float conversion) for the tile's group
  (``BLOCK_K`` divides the group size, so one scale and zero per column per tile),
  rounded to the activation dtype and fed to the tensor-core dot.
* ``SCHEME == 2`` (fp8): activations already quantized per token by
  :func:`quantize_rows_fp8_kernel`; fp8 x fp8 dot, ``sx[m] * s[n]`` in the epilogue.

With ``SWAP_AB`` the tile is computed transposed, ``acc^T = W_tile . x_tile^T``, so that
the dequantized weight (made in registers) is the dot's first operand, the one Hopper's
wgmma reads from registers; the accumulator is transposed back before the epilogue.

Large-M fp8 on sm_90+ (:func:`fp8_linear_tma_kernel`): the same GEMM with both operands
read through TMA tensor descriptors, 128 x 256 tiles.

Split-K (small M): program ``(tile, s)`` reduces its share of K and writes the raw fp32
partial sum to ``partial[s]``; :func:`splitk_epilogue_kernel` adds the shares in a fixed
order (deterministic, no atomics) and runs the same epilogue.

Offsets (audited for M up to ~10^6 video tokens, K and N up to 16k): every product of a
row index and a row stride (x, the weight, the output, split-K partials, the row
quantizer's input and codes) is taken in int64, since ``M x K`` passes 2^31 at about
262k tokens of K = 8192. The products left in int32 are bounded by the weight alone:
the w4a16 scale index ``n * (K / GROUP_SIZE) + g`` (under 2^31 for any N x K weight below
6.8e10 elements) and the split-K epilogue's ``s * M * N`` (split-K runs at M <= 64 only).
Tensors are read at unit stride along K and N (the launcher copies a strided last dim of
x, a strided or expanded bias, and non-contiguous quantized tensors); row strides may
be anything, 0 included.
"""

import triton
import triton.language as tl

SCHEME_W8A16 = 0
SCHEME_W4A16 = 1
SCHEME_FP8 = 2

ACT_NONE = 0
ACT_GELU = 1
ACT_GELU_TANH = 2
ACT_QUICK_GELU = 3
ACT_SILU = 4


@triton.jit
def _activation(y, ACTIVATION: tl.constexpr):
    """fp32 activations, as torch defines them (tanh via the sigmoid: tanh(u) = 2 sigmoid(2u) - 1)."""
    if ACTIVATION == 1:  # gelu (erf)
        y = 0.5 * y * (1.0 + tl.erf(y * 0.7071067811865476))
    elif ACTIVATION == 2:  # gelu, tanh approximation
        u = 0.7978845608028654 * (y + 0.044715 * y * y * y)
        y = y * tl.sigmoid(2.0 * u)  # = 0.5 * y * (1 + tanh(u))
    elif ACTIVATION == 3:  # quick_gelu
        y = y * tl.sigmoid(1.702 * y)
    elif ACTIVATION == 4:  # silu
        y = y * tl.sigmoid(y)
    return y


@triton.jit
def _epilogue(acc, rows, cols, M, N, ws_ptr, xs_ptr, bias_ptr, out_ptr, stride_om,
              SCHEME: tl.constexpr, HAS_BIAS: tl.constexpr, ACTIVATION: tl.constexpr):  # fmt: skip
    row_ok = rows < M
    col_ok = cols < N
    if SCHEME != 1:  # per-channel weight scale
        acc = acc * tl.load(ws_ptr + cols, mask=col_ok, other=0.0)[None, :]
    if SCHEME == 2:  # per-token activation scale
        acc = acc * tl.load(xs_ptr + rows, mask=row_ok, other=0.0)[:, None]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=col_ok, other=0).to(tl.float32)[None, :]
    acc = _activation(acc, ACTIVATION)
    ptrs = out_ptr + rows.to(tl.int64)[:, None] * stride_om + cols[None, :]
    tl.store(ptrs, acc.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _tile(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(row tile, column tile) of program ``pid`` in grouped order: ``GROUP_M`` consecutive
    programs share a column tile (the weight tile) while it is in L2."""
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    group = GROUP_M * num_pid_n
    first_m = (pid // group) * GROUP_M
    group_rows = tl.minimum(num_pid_m - first_m, GROUP_M)
    return first_m + (pid % group) % group_rows, (pid % group) // group_rows


@triton.jit
def quantized_linear_kernel(
    x_ptr,  # (M, K) activations (fp8 scheme: the per-token quantized copy)
    w_ptr,  # (N, K) int8 / float8_e4m3fn, or (N, K // 2) uint8 packed int4; row stride stride_wn
    ws_ptr,  # float32 weight scales: (N,) or (N, K // GROUP_SIZE)
    wz_ptr,  # float32 zero points (N, K // GROUP_SIZE) (w4a16)
    xs_ptr,  # float32 (M,) per-token scales (fp8)
    bias_ptr,  # (N,)
    out_ptr,  # (M, N) output, or (SPLIT_K, M, N) float32 partial sums when SPLIT_K > 1
    M,
    N,
    K,
    k_per_split,  # K elements per split (a multiple of BLOCK_K)
    stride_xm,
    stride_wn,
    stride_om,
    stride_os,  # partial sums: elements between splits
    SCHEME: tl.constexpr,
    GROUP_SIZE: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    ACTIVATION: tl.constexpr,
    SPLIT_K: tl.constexpr,
    UPCAST_DOT: tl.constexpr,  # interpreter only: bf16 / fp8 tl.dot are wrong or absent there
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    SWAP_AB: tl.constexpr,  # integer weights: the (BLOCK_N, BLOCK_K) weight tile is the dot's first operand
):
    pid_m, pid_n = _tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    pid_k = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < M
    col_ok = cols < N
    x_rows = x_ptr + rows.to(tl.int64)[:, None] * stride_xm
    w_cols = w_ptr + cols.to(tl.int64)[:, None] * stride_wn  # (BLOCK_N, 1)
    if SCHEME == 2:
        dot_ty = tl.float8e4nv
    else:
        dot_ty = x_ptr.dtype.element_ty

    k_start = pid_k * k_per_split
    k_end = tl.minimum(k_start + k_per_split, K)
    if SWAP_AB:
        acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    else:
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < k_end
        a = tl.load(x_rows + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        if SCHEME == 1:
            kp = k0 // 2 + tl.arange(0, BLOCK_K // 2)
            p = tl.load(w_cols + kp[None, :], mask=col_ok[:, None], other=0).to(tl.int32)  # (BLOCK_N, BLOCK_K // 2) bytes
            # Each nibble q becomes the float 2^23 + q by setting the exponent bits of 2^23
            # (0x4B000000) over it, a bit operation instead of an int-to-float conversion
            # (I2F, a quarter-rate instruction on sm_80 / sm_90); subtracting 2^23 is exact
            # and leaves q, then (q - z) * s exactly as the format defines it, whatever z.
            q = tl.interleave((p & 0xF) | 0x4B000000, (p >> 4) | 0x4B000000)  # (BLOCK_N, BLOCK_K): K order
            g = k0 // GROUP_SIZE
            n_groups = K // GROUP_SIZE
            s = tl.load(ws_ptr + cols * n_groups + g, mask=col_ok, other=0.0)
            z = tl.load(wz_ptr + cols * n_groups + g, mask=col_ok, other=0.0)
            w = ((q.to(tl.float32, bitcast=True) - 8388608.0) - z[:, None]) * s[:, None]  # (q - z) * s, fp32
            if not UPCAST_DOT:
                w = w.to(dot_ty)  # rounded once, as QuantizedWeight.dequantize(x.dtype)
        else:
            w = tl.load(w_cols + ks[None, :], mask=col_ok[:, None] & k_ok[None, :], other=0.0)  # (BLOCK_N, BLOCK_K)
            if SCHEME == 0 and not UPCAST_DOT:
                w = w.to(dot_ty)  # int8 is exact in bf16 / fp16 / fp32
        if not SWAP_AB:
            w = tl.trans(w)  # (BLOCK_K, BLOCK_N)
        if UPCAST_DOT:
            a = a.to(tl.float32)
            w = w.to(tl.float32)
        if SWAP_AB:
            acc = tl.dot(w, tl.trans(a), acc, input_precision=DOT_PRECISION)
        else:
            acc = tl.dot(a, w, acc, input_precision=DOT_PRECISION)
    if SWAP_AB:
        acc = tl.trans(acc)

    if SPLIT_K == 1:
        _epilogue(acc, rows, cols, M, N, ws_ptr, xs_ptr, bias_ptr, out_ptr, stride_om, SCHEME, HAS_BIAS, ACTIVATION)
    else:
        ptrs = out_ptr + pid_k.to(tl.int64) * stride_os + rows.to(tl.int64)[:, None] * stride_om + cols[None, :]
        tl.store(ptrs, acc, mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def fp8_linear_tma_kernel(
    x_desc,  # TensorDescriptor of the (M, K) float8_e4m3fn per-token quantized activations
    w_desc,  # TensorDescriptor of the (N, K) float8_e4m3fn weight codes
    ws_ptr,  # float32 (N,) weight scales
    xs_ptr,  # float32 (M,) per-token activation scales
    bias_ptr,  # (N,)
    out_ptr,  # (M, N)
    M,
    N,
    K,
    stride_om,
    HAS_BIAS: tl.constexpr,
    ACTIVATION: tl.constexpr,
    UPCAST_DOT: tl.constexpr,  # interpreter only: fp8 tl.dot is absent there
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    EPILOGUE_HALVES: tl.constexpr,  # 1 or 2 column halves of the tile, one after the other
):
    """The fp8 GEMM of large M with both operands read through TMA descriptors (sm_90+):
    the copy engine moves each tile to shared memory (no address arithmetic, no masks:
    rows, columns and K past the tensors' ends read as zeros). The epilogue runs on the
    tile's column halves one after the other (``EPILOGUE_HALVES = 2``): scales, bias and a
    GELU over a whole 128 x 256 fp32 tile at once spill (kernel report, sm_90)."""
    pid_m, pid_n = _tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    off_m = pid_m * BLOCK_M
    off_n = pid_n * BLOCK_N
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        a = x_desc.load([off_m, k0])  # (BLOCK_M, BLOCK_K)
        w = w_desc.load([off_n, k0])  # (BLOCK_N, BLOCK_K)
        if UPCAST_DOT:
            a = a.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(a, w.T, acc)
    rows = off_m + tl.arange(0, BLOCK_M)
    # The epilogue's scheme argument is 2 (SCHEME_FP8; a literal: jit bodies read no
    # module globals that are not constexpr).
    if EPILOGUE_HALVES == 2:
        left, right = tl.split(tl.permute(tl.reshape(acc, (BLOCK_M, 2, BLOCK_N // 2)), (0, 2, 1)))
        cols = off_n + tl.arange(0, BLOCK_N // 2)
        _epilogue(left, rows, cols, M, N, ws_ptr, xs_ptr, bias_ptr, out_ptr, stride_om, 2, HAS_BIAS, ACTIVATION)
        cols += BLOCK_N // 2
        _epilogue(right, rows, cols, M, N, ws_ptr, xs_ptr, bias_ptr, out_ptr, stride_om, 2, HAS_BIAS, ACTIVATION)
    else:
        cols = off_n + tl.arange(0, BLOCK_N)
        _epilogue(acc, rows, cols, M, N, ws_ptr, xs_ptr, bias_ptr, out_ptr, stride_om, 2, HAS_BIAS, ACTIVATION)


@triton.jit
def splitk_epilogue_kernel(
    partial_ptr,  # (SPLIT_K, M, N) float32
    ws_ptr,
    xs_ptr,
    bias_ptr,
    out_ptr,  # (M, N)
    M,
    N,
    stride_os,
    stride_pm,
    stride_om,
    SCHEME: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    ACTIVATION: tl.constexpr,
    SPLIT_K: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rows < M)[:, None] & (cols < N)[None, :]
    ptrs = partial_ptr + rows.to(tl.int64)[:, None] * stride_pm + cols[None, :]
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for s in tl.static_range(SPLIT_K):  # fixed order: bit-identical run to run
        acc += tl.load(ptrs + s * stride_os, mask=mask, other=0.0)
    _epilogue(acc, rows, cols, M, N, ws_ptr, xs_ptr, bias_ptr, out_ptr, stride_om, SCHEME, HAS_BIAS, ACTIVATION)


@triton.jit
def _max_propagate_nan(a, b):
    return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def quantize_rows_fp8_kernel(
    x_ptr,  # (M, K), unit stride along K, row stride stride_xm
    xq_ptr,  # (M, K) float8_e4m3fn, contiguous
    xs_ptr,  # (M,) float32
    K,
    stride_xm,
    FP8_MAX: tl.constexpr,
    MIN_SCALE: tl.constexpr,  # float32's smallest normal: no subnormal scales
    BLOCK_K: tl.constexpr,
):
    """Per-token fp8 quantization: one program per row, two passes over it (amax, then
    scale and cast), as :func:`mmkernels.quant.quantize_activations_fp8` defines it.

    NaN and inf: a row holding either gets scale NaN (and NaN codes), so the GEMM's
    epilogue, which multiplies by the scale, makes that row's outputs NaN, whatever the
    tensor-core dot does with NaN codes. ``tl.maximum`` / ``tl.minimum`` / ``tl.max``
    default to ``fmax`` semantics (a NaN operand is dropped: NaN became -448 x scale), so
    the amax, its reduction and the clamp ask for NaN propagation explicitly."""
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * stride_xm
    amax = tl.zeros([BLOCK_K], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        v = tl.load(x_row + ks, mask=ks < K, other=0).to(tl.float32)
        amax = tl.maximum(amax, tl.abs(v), propagate_nan=tl.PropagateNan.ALL)
    m = tl.reduce(amax, 0, _max_propagate_nan)  # NaN if the row holds a NaN, else inf if an inf
    scale = tl.where(m > 0, tl.maximum(m / FP8_MAX, MIN_SCALE), 1.0)
    scale = tl.where(m < float("inf"), scale, float("nan"))  # NaN and inf rows: NaN
    tl.store(xs_ptr + row, scale)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        v = tl.load(x_row + ks, mask=ks < K, other=0).to(tl.float32)
        q = tl.clamp(v / scale, -FP8_MAX, FP8_MAX, propagate_nan=tl.PropagateNan.ALL)
        tl.store(xq_ptr + row * K + ks, q.to(tl.float8e4nv), mask=ks < K)
