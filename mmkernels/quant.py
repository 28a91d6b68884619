"""Weight quantization for the projector matmul (:func:`mmkernels.ops.quantized_linear`).

``quantize(weight, scheme, *, group_size=128) -> QuantizedWeight`` turns an ``nn.Linear``
weight ``(out_features, in_features)`` into one of three formats (:data:`SCHEMES`):

``"w8a16"``
    ``packed``: int8 ``(N, K)``, symmetric, ``q = clamp(round(w / s[n]), -127, 127)``;
    ``scales``: float32 ``(N,)``, ``s[n] = max_k |w[n, k]| / 127``. No zeros. The kernel
    multiplies ``x`` (bf16/fp16/fp32) by the int8 values (exact in every float dtype) and
    applies ``s[n]`` to the fp32 accumulator.
``"w4a16"``
    ``packed``: uint8 ``(N, K // 2)``, two 4-bit codes per byte along K: element ``2j`` in
    the low nibble, ``2j + 1`` in the high nibble. Asymmetric per group of ``group_size``
    consecutive K elements (32, 64 or 128): ``scales`` and ``zeros`` float32
    ``(N, K // group_size)``, ``s = (max - min) / 15``, ``z = clamp(round(-min / s), 0, 15)``
    (an integer value stored as float), ``q = clamp(round(w / s) + z, 0, 15)`` and
    ``w ~ (q - z) * s``. The kernel dequantizes each weight tile in registers, in fp32, and
    rounds it to the activation dtype before the tensor-core dot.
``"fp8"``
    ``packed``: ``torch.float8_e4m3fn`` ``(N, K)``, ``scales`` float32 ``(N,)``,
    ``s[n] = max_k |w[n, k]| / 448``, ``q = (w / s[n]).to(e4m3)`` (round to nearest).
    Activations are quantized per token on the fly, the same way:
    ``sx[m] = max_k |x[m, k]| / 448``, ``xq = (x / sx[m]).to(e4m3)``; the fp8 x fp8 dot
    accumulates in fp32 and ``sx[m] * s[n]`` scales the accumulator.

A zero row (or group) gets scale 1 and codes 0 (w8a16, fp8) or zero point 0 (w4a16), so
it dequantizes to exactly 0. Scales are computed in float64 and rounded once to float32,
with a floor at float32's smallest normal number (``2^-126``): a row or group whose range
is so tiny that ``range / levels`` would underflow (subnormal weights) gets that floor
instead of a zero scale (which made ``w / s`` inf or NaN), so its codes round to within
half a step, ``2^-127``, of the weight. No scale and no dequantized weight is subnormal,
so a GPU that flushes subnormals computes the same as the reference. A weight whose
dequantized format would overflow its dtype (w4a16 groups spanning nearly the whole
float range) is refused with :class:`QuantizationError`, as are NaN and inf. The
activations' per-token fp8 scales follow the same rules; a row of activations holding
NaN or inf has no finite scale: its scale is NaN (see :func:`quantize_activations_fp8`).

Every field of :class:`QuantizedWeight` that is a tensor is a
plain tensor (``state_dict``-friendly); the rest (scheme, group size, shapes, dtype) is
metadata that :meth:`QuantizedWeight.config` returns as a JSON-able dict.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = [
    "CHECKPOINT_FORMAT_VERSION",
    "CHECKPOINT_METHOD",
    "FP8_MAX",
    "GROUP_SIZES",
    "MIN_SCALE",
    "SCHEMES",
    "SCHEME_TABLE",
    "QuantizationError",
    "QuantizedWeight",
    "Scheme",
    "check_group_size",
    "quantize",
    "same_module_path",
    "scheme_info",
]

GROUP_SIZES: tuple[int, ...] = (32, 64, 128)  # w4a16
FP8_MAX = 448.0  # largest finite float8_e4m3fn

# A checkpoint whose projector mmkernels quantized says so in its config.json, read by
# the Hugging Face side (a transformers quantizer) and the vLLM side (a vLLM method):
# "quantization_config": {"quant_method": CHECKPOINT_METHOD, "version":
# CHECKPOINT_FORMAT_VERSION, "scheme", "group_size", "modules": {path: {...}}}.
CHECKPOINT_METHOD = "mmkernels"
CHECKPOINT_FORMAT_VERSION = 2


def same_module_path(saved: str, path: str) -> bool:
    """Whether a module path as a checkpoint records it names the model's ``path``: equal,
    or differing by leading dotted components (``model.`` dropped by a loader's names,
    ``LlavaModel`` vs ``LlavaForConditionalGeneration``, vLLM's prefixes)."""
    return saved == path or path.endswith("." + saved) or saved.endswith("." + path)


@dataclass(frozen=True)
class Scheme:
    """What one quantization format is, in one place: every caller (the op, its
    reference, the Hugging Face and vLLM integrations, the benchmarks) reads these fields
    instead of comparing scheme names.

    ``code_dtype``: the dtype of ``packed``. ``codes_per_byte``: K elements per element
    of ``packed`` (2: two int4 codes per uint8, even K in the low nibble). ``levels``: the
    largest code magnitude (127, 15, 448). ``grouped``: scales and zero points per group
    of ``group_size`` K elements (asymmetric; else one symmetric scale per output channel
    and no zeros). ``quantized_activations``: activations are quantized per token on the
    fly (fp8's e4m3 x e4m3 dot). ``min_compute_capability``: of the compiled kernel on
    CUDA (e4m3 dots need sm_89)."""

    name: str
    code_dtype: torch.dtype
    codes_per_byte: int
    levels: float
    grouped: bool
    quantized_activations: bool
    min_compute_capability: tuple[int, int]

    def layout(self, out_features: int, in_features: int, group_size: int | None) -> dict[str, tuple]:
        """``{buffer: (shape, dtype)}`` of the format's tensors for an ``(N, K)`` weight:
        ``packed``, ``scales`` and, when grouped, ``zeros`` (what a checkpoint holds)."""
        n, k = out_features, in_features
        groups = (n, k // group_size) if self.grouped else (n,)
        out = {"packed": ((n, k // self.codes_per_byte), self.code_dtype), "scales": (groups, torch.float32)}
        if self.grouped:
            out["zeros"] = (groups, torch.float32)
        return out

    def weight_bytes(self, out_features: int, in_features: int, group_size: int | None) -> int:
        """Bytes of the format's tensors (what a GEMM reads of the weight)."""
        total = 0
        for shape, dtype in self.layout(out_features, in_features, group_size).values():
            numel = 1
            for size in shape:
                numel *= size
            total += numel * dtype.itemsize
        return total


SCHEME_TABLE: dict[str, Scheme] = {
    s.name: s
    for s in (
        Scheme("w8a16", torch.int8, 1, 127.0, grouped=False, quantized_activations=False, min_compute_capability=(8, 0)),
        Scheme("w4a16", torch.uint8, 2, 15.0, grouped=True, quantized_activations=False, min_compute_capability=(8, 0)),
        Scheme("fp8", torch.float8_e4m3fn, 1, FP8_MAX, grouped=False, quantized_activations=True,
               min_compute_capability=(8, 9)),
    )
}
SCHEMES: tuple[str, ...] = tuple(SCHEME_TABLE)


def scheme_info(scheme, name: str = "scheme") -> Scheme:
    """The :class:`Scheme` named ``scheme``; ``ValueError`` naming the argument otherwise."""
    info = SCHEME_TABLE.get(scheme) if isinstance(scheme, str) else None
    if info is None:
        raise ValueError(f"{name}: expected one of {list(SCHEMES)}, got {scheme!r}")
    return info

_WEIGHT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# Smallest scale: float32's smallest normal number. Below it a scale (and the dequantized
# weights (q - z) * s) would be subnormal, which GPUs may flush to zero where the float64
# reference does not.
MIN_SCALE = torch.finfo(torch.float32).tiny
# Integer fields: Python ints, or the SymInts of shapes that torch.compile traces (the op's
# backward rebuilds a QuantizedWeight from tensor shapes). Never bool, never float.
_INTS = (int, torch.SymInt)


class QuantizationError(ValueError):
    """A weight that cannot be quantized: NaN or inf in it, or a range whose dequantized
    format would overflow its dtype. A ``ValueError``; integrations catch this subclass to
    leave such a layer unquantized (vLLM) rather than fail."""


def check_group_size(group_size, scheme: str, name: str = "group_size") -> int | None:
    """Validate a group size argument: a Python int (not a bool, not a float such as
    ``64.0``), and for w4a16 one of :data:`GROUP_SIZES`; None is accepted (and returned)
    only for the per-channel schemes, which have no groups. Returns it as an ``int``."""
    grouped = scheme_info(scheme).grouped
    if group_size is None and not grouped:
        return None
    if isinstance(group_size, bool) or not isinstance(group_size, _INTS):
        raise TypeError(f"{name}: expected an int (one of {GROUP_SIZES} for w4a16), got {type(group_size).__name__} "
                        f"{group_size!r}")  # fmt: skip
    if group_size <= 0:
        raise ValueError(f"{name}: expected a positive int, got {group_size}")
    if grouped and group_size not in GROUP_SIZES:
        raise ValueError(f"{name}: expected one of {GROUP_SIZES} for w4a16, got {group_size!r}")
    return group_size


def _check_features(value, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, _INTS):
        raise TypeError(f"{name}: expected a positive int, got {type(value).__name__} {value!r}")
    if value <= 0:
        raise ValueError(f"{name}: expected a positive int, got {value}")


@dataclass
class QuantizedWeight:
    """A quantized ``nn.Linear`` weight ``(out_features, in_features)`` = ``(N, K)``.

    Attributes:
        scheme: ``"w8a16"``, ``"w4a16"`` or ``"fp8"`` (see the module docstring).
        packed: the codes: int8 ``(N, K)`` (w8a16), uint8 ``(N, K // 2)`` with two 4-bit
            codes per byte, even K index in the low nibble (w4a16), float8_e4m3fn ``(N, K)``
            (fp8). Contiguous.
        scales: float32, ``(N,)`` (w8a16, fp8) or ``(N, K // group_size)`` (w4a16).
        zeros: float32 ``(N, K // group_size)`` integer-valued zero points in [0, 15]
            (w4a16); None otherwise.
        group_size: the K elements sharing a scale and zero (w4a16: an ``int``, 32, 64 or
            128, dividing ``in_features``); for the per-channel schemes, None.
        in_features: K. out_features: N. Positive ``int``s.
        dtype: the dtype of the weight that was quantized: the activation and output dtype
            the layer is meant to run in.
    """

    scheme: str
    packed: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor | None
    group_size: int | None
    in_features: int
    out_features: int
    dtype: torch.dtype

    def __post_init__(self):
        _check_scheme(self.scheme)
        _check_features(self.in_features, "in_features")
        _check_features(self.out_features, "out_features")
        n, k = self.out_features, self.in_features
        info = SCHEME_TABLE[self.scheme]
        if info.grouped:
            self.group_size = check_group_size(self.group_size, self.scheme)
            if k % self.group_size:
                # The kernel would read the scale of the next row's first group for the
                # last, partial one; the format has no partial groups.
                raise ValueError(f"group_size: in_features (K={k}) must be a multiple of group_size={self.group_size}")
        elif self.group_size is not None:
            raise ValueError(f"group_size: scheme {self.scheme!r} is per-channel (None), got {self.group_size!r}")
        layout = info.layout(n, k, self.group_size)
        for name in ("packed", "scales", "zeros"):
            t = getattr(self, name)
            if t is not None and not isinstance(t, torch.Tensor):
                raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
        (packed_shape, packed_dtype), (groups, _) = layout["packed"], layout["scales"]
        if tuple(self.packed.shape) != packed_shape or self.packed.dtype != packed_dtype:
            raise ValueError(
                f"packed: expected {packed_dtype} of shape {packed_shape} for scheme {self.scheme!r}, "
                f"got {self.packed.dtype} {tuple(self.packed.shape)}"
            )
        if tuple(self.scales.shape) != groups or self.scales.dtype != torch.float32:
            raise ValueError(f"scales: expected float32 of shape {groups}, got {self.scales.dtype} {tuple(self.scales.shape)}")
        if info.grouped:
            if self.zeros is None or tuple(self.zeros.shape) != groups or self.zeros.dtype != torch.float32:
                got = None if self.zeros is None else f"{self.zeros.dtype} {tuple(self.zeros.shape)}"
                raise ValueError(f"zeros: expected float32 of shape {groups} for {self.scheme}, got {got}")
        elif self.zeros is not None:
            raise ValueError(f"zeros: scheme {self.scheme!r} has no zero points, got a tensor")
        if self.dtype not in _WEIGHT_DTYPES:
            raise ValueError(f"dtype: expected a float dtype, got {self.dtype}")

    # ----------------------------------------------------------------------------------
    @property
    def info(self) -> Scheme:
        """The :class:`Scheme` of this weight's format."""
        return SCHEME_TABLE[self.scheme]

    @property
    def device(self) -> torch.device:
        return self.packed.device

    @property
    def shape(self) -> tuple[int, int]:
        """``(out_features, in_features)``, as the unquantized weight."""
        return (self.out_features, self.in_features)

    def tensors(self) -> dict[str, torch.Tensor]:
        """The plain tensors of the format (what goes into a ``state_dict``)."""
        out = {"packed": self.packed, "scales": self.scales}
        if self.zeros is not None:
            out["zeros"] = self.zeros
        return out

    def config(self) -> dict:
        """The non-tensor fields, JSON-able: what a checkpoint's config must carry."""
        return {
            "scheme": self.scheme,
            "group_size": self.group_size,
            "in_features": self.in_features,
            "out_features": self.out_features,
            "dtype": str(self.dtype).replace("torch.", ""),
        }

    @classmethod
    def from_tensors(cls, config: dict, tensors: dict[str, torch.Tensor]) -> "QuantizedWeight":
        """Inverse of :meth:`config` + :meth:`tensors` (validates the shapes)."""
        return cls(
            scheme=config["scheme"],
            packed=tensors["packed"],
            scales=tensors["scales"],
            zeros=tensors.get("zeros"),
            group_size=config["group_size"],
            in_features=int(config["in_features"]),
            out_features=int(config["out_features"]),
            dtype=getattr(torch, config["dtype"]),
        )

    def to(self, device) -> "QuantizedWeight":
        return QuantizedWeight(
            self.scheme, self.packed.to(device), self.scales.to(device),
            None if self.zeros is None else self.zeros.to(device),
            self.group_size, self.in_features, self.out_features, self.dtype,
        )  # fmt: skip

    def codes(self) -> torch.Tensor:
        """The integer (w8a16, w4a16) or e4m3 (fp8) codes as float32 ``(N, K)``, unpacked."""
        if self.info.codes_per_byte == 2:
            lo = (self.packed & 0xF).to(torch.float32)
            hi = (self.packed >> 4).to(torch.float32)
            return torch.stack([lo, hi], dim=-1).reshape(self.out_features, self.in_features)
        return self.packed.to(torch.float32)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The weight ``(N, K)`` in ``dtype`` (default: :attr:`dtype`), computed in float32:
        ``q * s[n]`` (w8a16, fp8) or ``(q - z) * s`` per group (w4a16), then rounded once."""
        q = self.codes()
        if self.info.grouped:
            g = self.group_size
            s = self.scales.repeat_interleave(g, dim=1)
            z = self.zeros.repeat_interleave(g, dim=1)
            w = (q - z) * s
        else:
            w = q * self.scales[:, None]
        return w.to(dtype or self.dtype)

    def kernel_weight(self, activation_dtype: torch.dtype) -> torch.Tensor:
        """Exactly the weight the kernel multiplies activations of ``activation_dtype`` by,
        as float64 ``(N, K)``: w4a16 dequantizes each tile in fp32 and rounds it to the
        activation dtype before the dot, so its weight is ``dequantize(activation_dtype)``;
        w8a16 and fp8 multiply by the raw codes and apply the scale to the fp32
        accumulator, so theirs is ``q * s[n]`` unrounded. (For fp8 the activations are
        quantized too: see :func:`quantize_activations_fp8`.)"""
        if self.info.grouped:
            return self.dequantize(activation_dtype).to(torch.float64)
        return self.codes().to(torch.float64) * self.scales.to(torch.float64)[:, None]


def _check_scheme(scheme) -> None:
    scheme_info(scheme)


def _scales(span: torch.Tensor, levels: float) -> torch.Tensor:
    """float32 scales ``span / levels`` of ranges ``span >= 0`` (float32 values, or the
    float64 differences ``hi - lo`` of w4a16 groups, which reach twice float32's largest
    value): the quotient in float64 (no overflow, no underflow on the way), rounded to
    float32 (for a float32 span that double rounding equals float32's own division),
    floored at :data:`MIN_SCALE`; 1 where the span is 0."""
    s = (span.to(torch.float64) / levels).to(torch.float32).clamp_(min=MIN_SCALE)
    return torch.where(span > 0, s, torch.ones_like(s))


def quantize(weight: torch.Tensor, scheme: str, *, group_size: int = 128) -> QuantizedWeight:
    """Quantize an ``nn.Linear`` weight ``(out_features, in_features)``.

    Args:
        weight: ``(N, K)`` float16 / bfloat16 / float32 / float64, any device, finite.
        scheme: one of :data:`SCHEMES`.
        group_size: an ``int``; w4a16 only (ignored otherwise): 32, 64 or 128 consecutive
            K elements per scale and zero; ``K`` must be a multiple of it (so K is even, as
            int4 packing needs).

    Returns:
        A :class:`QuantizedWeight` on ``weight``'s device (computed in float32, scales in
        float64 first: see the module docstring) whose :meth:`~QuantizedWeight.dequantize`
        is finite.

    Raises:
        QuantizationError (a ``ValueError``): NaN or inf in ``weight`` (after conversion
        to float32), or a row whose dequantized format overflows ``weight.dtype``.
    """
    info = scheme_info(scheme)
    group_size = check_group_size(group_size, scheme)
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"weight: expected a torch.Tensor, got {type(weight).__name__}")
    if weight.dtype not in _WEIGHT_DTYPES:
        raise TypeError(f"weight: expected a float dtype ({', '.join(str(d) for d in _WEIGHT_DTYPES)}), got {weight.dtype}")
    if weight.dim() != 2:
        raise ValueError(f"weight: expected (out_features, in_features), got shape {tuple(weight.shape)}")
    n, k = weight.shape
    if n == 0 or k == 0:
        raise ValueError(f"weight: expected a non-empty (out_features, in_features), got {tuple(weight.shape)}")
    if info.grouped:
        if k % info.codes_per_byte:
            raise ValueError(f"weight: int4 packing needs an even in_features (K), got K={k}")
        if k % group_size:
            raise ValueError(f"weight: in_features (K={k}) must be divisible by group_size={group_size}")
    w = weight.detach().to(torch.float32)
    if not bool(torch.isfinite(w).all()):
        raise QuantizationError("weight: expected finite values (found NaN or inf, or float64 values beyond float32's range)")
    levels = info.levels
    if not info.grouped and not info.code_dtype.is_floating_point:  # symmetric integer codes per channel
        scales = _scales(w.abs().amax(dim=1), levels)
        q = torch.round(w / scales[:, None]).clamp_(-levels, levels).to(info.code_dtype)
        qw = QuantizedWeight(scheme, q.contiguous(), scales.contiguous(), None, None, k, n, weight.dtype)
    elif not info.grouped:  # float codes per channel: round to nearest by the cast
        scales = _scales(w.abs().amax(dim=1), levels)
        q = (w / scales[:, None]).clamp_(-levels, levels).to(info.code_dtype)
        qw = QuantizedWeight(scheme, q.contiguous(), scales.contiguous(), None, None, k, n, weight.dtype)
    else:  # asymmetric integer codes per group, packed codes_per_byte to a byte
        groups = w.reshape(n, k // group_size, group_size)  # any strides (a transposed weight)
        lo = groups.amin(dim=2).clamp(max=0.0)  # the range always holds 0, so 0 stays exact
        hi = groups.amax(dim=2).clamp(min=0.0)
        scales = _scales(hi.to(torch.float64) - lo.to(torch.float64), levels)
        zeros = torch.round(-lo / scales).clamp_(0, levels)
        q = (torch.round(groups / scales[..., None]) + zeros[..., None]).clamp_(0, levels).to(info.code_dtype)
        q = q.reshape(n, k)
        packed = (q[:, 0::2] | (q[:, 1::2] << 4)).contiguous()
        qw = QuantizedWeight(scheme, packed, scales.contiguous(), zeros.contiguous(), group_size, k, n, weight.dtype)
    _check_representable(qw, w)
    return qw


def _check_representable(qw: QuantizedWeight, w: torch.Tensor) -> None:
    """Refuse a format whose dequantized weight overflows its dtype. A w4a16 group's grid
    ``(q - z) * s`` reaches up to half a step beyond the group's range, so a group spanning
    nearly float32's (or float16's) whole range has codes that dequantize to inf; the
    per-channel schemes can overflow by an ulp at the very top of the range."""
    bad = ~torch.isfinite(qw.dequantize()).all(dim=1)
    if bool(bad.any()):
        row = int(bad.nonzero()[0, 0])
        raise QuantizationError(
            f"weight: row {row} (values in [{float(w[row].min()):.6g}, {float(w[row].max()):.6g}]) cannot be quantized "
            f"to {qw.scheme}: its dequantized values overflow {qw.dtype} (a range this close to the dtype's largest "
            f"value has no finite {qw.scheme} grid); scale the layer down or leave it unquantized"
        )


def quantize_activations_fp8(x2d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token fp8 quantization of activations ``(M, K)`` as the fp8 kernel does it, in
    float32: ``sx = max(max|x| / 448, 2^-126)`` per row (1 for an all-zero row),
    ``xq = (x / sx).to(e4m3)``. A row holding NaN or inf has no finite scale: its ``sx``
    is NaN (so are its codes), and every output of that row of the fp8 matmul is NaN
    (the kernel multiplies the accumulator by ``sx``).
    Returns ``(xq float8_e4m3fn (M, K), sx float32 (M,))``."""
    x = x2d.to(torch.float32)
    amax = x.abs().amax(dim=1) if x.shape[1] else torch.zeros(x.shape[0], device=x.device)  # NaN if a NaN is in the row
    sx = torch.where(amax > 0, (amax / FP8_MAX).clamp(min=MIN_SCALE), torch.ones_like(amax))
    sx = torch.where(torch.isfinite(amax), sx, torch.full_like(amax, float("nan")))
    xq = (x / sx[:, None]).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return xq, sx
