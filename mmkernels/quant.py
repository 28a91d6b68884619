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
it dequantizes to exactly 0. Every field of :class:`QuantizedWeight` that is a tensor is a
plain tensor (``state_dict``-friendly); the rest (scheme, group size, shapes, dtype) is
metadata that :meth:`QuantizedWeight.config` returns as a JSON-able dict.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["FP8_MAX", "GROUP_SIZES", "SCHEMES", "QuantizedWeight", "quantize"]

SCHEMES: tuple[str, ...] = ("w8a16", "w4a16", "fp8")
GROUP_SIZES: tuple[int, ...] = (32, 64, 128)  # w4a16
FP8_MAX = 448.0  # largest finite float8_e4m3fn
_INT8_MAX = 127.0
_INT4_MAX = 15.0
_WEIGHT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


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
        group_size: the K elements sharing a scale and zero (w4a16: 32, 64 or 128); for the
            per-channel schemes, None.
        in_features: K. out_features: N.
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
        n, k = self.out_features, self.in_features
        expect = {
            "w8a16": ((n, k), torch.int8, (n,)),
            "w4a16": ((n, k // 2), torch.uint8, (n, k // (self.group_size or 1))),
            "fp8": ((n, k), torch.float8_e4m3fn, (n,)),
        }[self.scheme]
        if tuple(self.packed.shape) != expect[0] or self.packed.dtype != expect[1]:
            raise ValueError(
                f"packed: expected {expect[1]} of shape {expect[0]} for scheme {self.scheme!r}, "
                f"got {self.packed.dtype} {tuple(self.packed.shape)}"
            )
        if tuple(self.scales.shape) != expect[2] or self.scales.dtype != torch.float32:
            raise ValueError(f"scales: expected float32 of shape {expect[2]}, got {self.scales.dtype} {tuple(self.scales.shape)}")
        if self.scheme == "w4a16":
            if self.group_size not in GROUP_SIZES:
                raise ValueError(f"group_size: expected one of {GROUP_SIZES} for w4a16, got {self.group_size}")
            if self.zeros is None or tuple(self.zeros.shape) != expect[2] or self.zeros.dtype != torch.float32:
                got = None if self.zeros is None else f"{self.zeros.dtype} {tuple(self.zeros.shape)}"
                raise ValueError(f"zeros: expected float32 of shape {expect[2]} for w4a16, got {got}")
        elif self.zeros is not None:
            raise ValueError(f"zeros: scheme {self.scheme!r} has no zero points, got a tensor")
        if self.dtype not in _WEIGHT_DTYPES:
            raise ValueError(f"dtype: expected a float dtype, got {self.dtype}")

    # ----------------------------------------------------------------------------------
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
        if self.scheme == "w4a16":
            lo = (self.packed & 0xF).to(torch.float32)
            hi = (self.packed >> 4).to(torch.float32)
            return torch.stack([lo, hi], dim=-1).reshape(self.out_features, self.in_features)
        return self.packed.to(torch.float32)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The weight ``(N, K)`` in ``dtype`` (default: :attr:`dtype`), computed in float32:
        ``q * s[n]`` (w8a16, fp8) or ``(q - z) * s`` per group (w4a16), then rounded once."""
        q = self.codes()
        if self.scheme == "w4a16":
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
        if self.scheme == "w4a16":
            return self.dequantize(activation_dtype).to(torch.float64)
        return self.codes().to(torch.float64) * self.scales.to(torch.float64)[:, None]


def _check_scheme(scheme) -> None:
    if scheme not in SCHEMES:
        raise ValueError(f"scheme: expected one of {list(SCHEMES)}, got {scheme!r}")


def quantize(weight: torch.Tensor, scheme: str, *, group_size: int = 128) -> QuantizedWeight:
    """Quantize an ``nn.Linear`` weight ``(out_features, in_features)``.

    Args:
        weight: ``(N, K)`` float16 / bfloat16 / float32 / float64, any device, finite.
        scheme: one of :data:`SCHEMES`.
        group_size: w4a16 only: 32, 64 or 128 consecutive K elements per scale and zero;
            ``K`` must be a multiple of it (so K is even, as int4 packing needs).

    Returns:
        A :class:`QuantizedWeight` on ``weight``'s device (computed in float32).
    """
    _check_scheme(scheme)
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"weight: expected a torch.Tensor, got {type(weight).__name__}")
    if weight.dtype not in _WEIGHT_DTYPES:
        raise TypeError(f"weight: expected a float dtype ({', '.join(str(d) for d in _WEIGHT_DTYPES)}), got {weight.dtype}")
    if weight.dim() != 2:
        raise ValueError(f"weight: expected (out_features, in_features), got shape {tuple(weight.shape)}")
    n, k = weight.shape
    if n == 0 or k == 0:
        raise ValueError(f"weight: expected a non-empty (out_features, in_features), got {tuple(weight.shape)}")
    if scheme == "w4a16":
        if group_size not in GROUP_SIZES:
            raise ValueError(f"group_size: expected one of {GROUP_SIZES} for w4a16, got {group_size!r}")
        if k % 2:
            raise ValueError(f"weight: int4 packing needs an even in_features (K), got K={k}")
        if k % group_size:
            raise ValueError(f"weight: in_features (K={k}) must be divisible by group_size={group_size}")
    w = weight.detach().to(torch.float32)
    if not bool(torch.isfinite(w).all()):
        raise ValueError("weight: expected finite values (found NaN or inf)")
    if scheme == "w8a16":
        amax = w.abs().amax(dim=1)
        scales = torch.where(amax > 0, amax / _INT8_MAX, torch.ones_like(amax))
        q = torch.round(w / scales[:, None]).clamp_(-_INT8_MAX, _INT8_MAX).to(torch.int8)
        return QuantizedWeight(scheme, q.contiguous(), scales.contiguous(), None, None, k, n, weight.dtype)
    if scheme == "fp8":
        amax = w.abs().amax(dim=1)
        scales = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
        q = (w / scales[:, None]).clamp_(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
        return QuantizedWeight(scheme, q.contiguous(), scales.contiguous(), None, None, k, n, weight.dtype)
    groups = w.view(n, k // group_size, group_size)
    lo = groups.amin(dim=2).clamp(max=0.0)  # the range always holds 0, so 0 stays exact
    hi = groups.amax(dim=2).clamp(min=0.0)
    span = hi - lo
    scales = torch.where(span > 0, span / _INT4_MAX, torch.ones_like(span))
    zeros = torch.round(-lo / scales).clamp_(0, _INT4_MAX)
    q = (torch.round(groups / scales[..., None]) + zeros[..., None]).clamp_(0, _INT4_MAX).to(torch.uint8)
    q = q.view(n, k)
    packed = (q[:, 0::2] | (q[:, 1::2] << 4)).contiguous()
    return QuantizedWeight(scheme, packed, scales.contiguous(), zeros.contiguous(), group_size, k, n, weight.dtype)


def quantize_activations_fp8(x2d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token fp8 quantization of activations ``(M, K)`` as the fp8 kernel does it, in
    float32: ``sx = max|x| / 448`` per row (1 for an all-zero row), ``xq = (x / sx).to(e4m3)``.
    Returns ``(xq float8_e4m3fn (M, K), sx float32 (M,))``."""
    x = x2d.to(torch.float32)
    amax = x.abs().amax(dim=1) if x.shape[1] else torch.zeros(x.shape[0], device=x.device)
    sx = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    xq = (x / sx[:, None]).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return xq, sx
