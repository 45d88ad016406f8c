"""Group-wise integer weights: ranges, codes, the importance-weighted range search, and packing in
ONNX Runtime's ``MatMulNBits`` layout.

A weight ``W`` (N out, K in) is cut along K into groups of ``group_size`` columns (the last one
zero-padded when K is not a multiple); each (row, group) has a float scale and an integer zero
point, and a weight is ``(code - zero_point) * scale`` with ``code`` in ``[0, 2**bits - 1]``.
Symmetric groups use the fixed zero point ``2**(bits - 1)`` (what ``MatMulNBits`` assumes when no
zero points are given) and need no zero-point bytes.

Packing (checked numerically against ONNX Runtime in ``tests/quant/test_int4_pack.py``): codes are
packed low bits first along K, ``(N, groups, group_size * bits / 8)`` uint8; zero points likewise
per row, ``(N, ceil(groups * bits / 8))``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class GroupSpec:
    """How a weight is cut and coded: ``bits`` (4 or 8), ``group_size`` columns, symmetric."""

    bits: int = 4
    group_size: int = 128
    symmetric: bool = False

    @property
    def qmax(self) -> int:
        return 2**self.bits - 1

    @property
    def mid(self) -> int:
        return 2 ** (self.bits - 1)

    def groups(self, k: int) -> int:
        return -(-k // self.group_size)


def to_groups(w: torch.Tensor, group_size: int) -> torch.Tensor:
    """(N, K) -> (N, G, group_size), zero-padded along K."""
    n, k = w.shape
    g = -(-k // group_size)
    if g * group_size != k:
        w = torch.nn.functional.pad(w, (0, g * group_size - k))
    return w.reshape(n, g, group_size)


def group_range(
    g: torch.Tensor, spec: GroupSpec, ratio: float | torch.Tensor = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point (N, G) of grouped weights ``g`` (N, G, S), the range shrunk by
    ``ratio`` (a number or one per group). The zero point is integer-valued, kept as float."""
    if spec.symmetric:
        amax = g.abs().amax(-1) * ratio
        scale = amax / (spec.mid - 1)
        zero = torch.full_like(scale, float(spec.mid))
    else:
        lo = g.amin(-1).clamp(max=0) * ratio
        hi = g.amax(-1).clamp(min=0) * ratio
        scale = (hi - lo) / spec.qmax
        zero = torch.round(-lo / scale.clamp(min=1e-30)).clamp(0, spec.qmax)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # an all-zero group
    return scale, zero


def quantize_groups(
    g: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, spec: GroupSpec
) -> torch.Tensor:
    """Codes (float, integer-valued) of grouped weights ``g`` (N, G, S)."""
    return torch.clamp(torch.round(g / scale[..., None]) + zero[..., None], 0, spec.qmax)


def dequantize_groups(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """(N, G, S) codes -> float weights."""
    return (codes.float() - zero[..., None]) * scale[..., None]


def search_range(
    w: torch.Tensor,
    spec: GroupSpec,
    importance: torch.Tensor | None = None,
    *,
    grid: int = 20,
    min_ratio: float = 0.5,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point per group, the clip ratio of each group chosen from ``grid`` values in
    ``[min_ratio, 1]`` by the error ``sum_k importance_k * (w_k - q_k)**2`` (``importance``: E[x^2]
    per input channel, K; None: plain MSE). Without a grid (``grid <= 1``): round-to-nearest."""
    g = to_groups(w.float(), spec.group_size)  # (N, G, S)
    best_s, best_z = group_range(g, spec)
    if grid <= 1:
        return best_s, best_z
    imp = torch.ones(w.shape[1]) if importance is None else importance.float()
    imp = to_groups(imp[None], spec.group_size)  # (1, G, S); padded columns weigh 0
    best = torch.full(best_s.shape, float("inf"))
    for r in torch.linspace(1.0, min_ratio, grid).tolist():
        s, z = group_range(g, spec, r)
        err = ((dequantize_groups(quantize_groups(g, s, z, spec), s, z) - g) ** 2 * imp).sum(-1)
        better = err < best
        best = torch.where(better, err, best)
        best_s = torch.where(better, s, best_s)
        best_z = torch.where(better, z, best_z)
    return best_s, best_z


def quantize_weight(
    w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, spec: GroupSpec
) -> torch.Tensor:
    """uint8 codes (N, G * group_size) of ``w`` (N, K); padded columns get the zero point."""
    g = to_groups(w.float(), spec.group_size)
    codes = quantize_groups(g, scale, zero, spec)
    k = w.shape[1]
    flat = codes.reshape(w.shape[0], -1)
    flat[:, k:] = zero.repeat_interleave(spec.group_size, dim=1)[:, k:]
    return flat.to(torch.uint8)


def dequantize_weight(
    codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, in_features: int
) -> torch.Tensor:
    """(N, G * S) codes -> (N, in_features) float weights."""
    n, g = scale.shape
    w = dequantize_groups(codes.reshape(n, g, -1), scale, zero)
    return w.reshape(n, -1)[:, :in_features]


# --- packing -------------------------------------------------------------------------------------


def _pack_last(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integers along the last dimension (padded with zeros), low bits first: (..., L) ->
    (..., ceil(L * bits / 8)) uint8."""
    per = 8 // bits
    n = values.shape[-1]
    v = values.to(torch.int32)
    if n % per:
        v = torch.nn.functional.pad(v, (0, per - n % per))
    v = v.reshape(*v.shape[:-1], -1, per)  # (..., bytes, per)
    shifts = torch.arange(per, dtype=torch.int32) * bits
    return (v << shifts).sum(-1).to(torch.uint8)


def _unpack_last(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    per = 8 // bits
    shifts = torch.arange(per, dtype=torch.int32) * bits
    v = (packed.to(torch.int32)[..., None] >> shifts) & (2**bits - 1)  # (..., bytes, per)
    return v.reshape(*packed.shape[:-1], -1)[..., :n].to(torch.uint8)


def pack_codes(codes: torch.Tensor, spec: GroupSpec) -> torch.Tensor:
    """(N, G * S) uint8 codes -> (N, G, S * bits / 8): ``MatMulNBits``'s input B."""
    n = codes.shape[0]
    return _pack_last(codes.reshape(n, -1, spec.group_size), spec.bits)


def unpack_codes(packed: torch.Tensor, spec: GroupSpec) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: (N, G * S) uint8 codes."""
    return _unpack_last(packed, spec.bits, spec.group_size).reshape(packed.shape[0], -1)


def pack_zero_points(zero: torch.Tensor, spec: GroupSpec) -> torch.Tensor:
    """(N, G) zero points -> (N, ceil(G * bits / 8)) uint8."""
    return _pack_last(zero, spec.bits)


def unpack_zero_points(packed: torch.Tensor, spec: GroupSpec, groups: int) -> torch.Tensor:
    return _unpack_last(packed, spec.bits, groups)


def quantize_activations_int8(x: torch.Tensor, block: int) -> torch.Tensor:
    """What ``MatMulNBits`` with ``accuracy_level=4`` does to its input before its int8 dot
    products: symmetric int8 per block of ``block`` values along the last axis (scale amax / 127),
    returned dequantized. Matches ONNX Runtime to float rounding (tests/quant/test_int4_pack.py)."""
    k = x.shape[-1]
    g = -(-k // block)
    xp = torch.nn.functional.pad(x, (0, g * block - k)) if g * block != k else x
    xb = xp.reshape(*x.shape[:-1], g, block)  # (..., G, block)
    s = xb.abs().amax(-1, keepdim=True) / 127
    s = torch.where(s > 0, s, torch.ones_like(s))
    q = torch.clamp(torch.round(xb / s), -127, 127) * s
    return q.reshape(*x.shape[:-1], g * block)[..., :k]
