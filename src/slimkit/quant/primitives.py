"""Quantization arithmetic shared by every quantization method and by sensitivity analysis.

Affine quantization maps a real ``x`` to ``q = clamp(round(x / scale) + zero_point, qmin, qmax)``
and back to ``(q - zero_point) * scale``. Fake-quant does both in float, with a straight-through
gradient, so a simulated model trains (QAT) and evaluates exactly like the integer one::

    w_q = quantize_weight(linear.weight, bits=8, per_channel=True)       # symmetric int8
    x_q = fake_quantize(x, *affine_params(x.min(), x.max(), bits=8, symmetric=False))
"""

from __future__ import annotations

import torch
from torch import nn

from slimkit.errors import ConfigError

EPS = torch.finfo(torch.float32).eps


def qrange(bits: int, signed: bool) -> tuple[int, int]:
    """Integer range: signed 8 bits -> (-128, 127), unsigned -> (0, 255)."""
    if not 2 <= bits <= 16:
        raise ConfigError(f"{bits}-bit quantization is not supported", fix="use 2 to 16 bits")
    return (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)


def affine_params(
    lo: torch.Tensor | float,
    hi: torch.Tensor | float,
    *,
    bits: int = 8,
    symmetric: bool = True,
    signed: bool | None = None,
    narrow: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    """Scale and zero point covering ``[lo, hi]`` (tensors give per-channel parameters).

    Symmetric: zero point 0 (signed) and ``scale = max(|lo|, |hi|) / qmax``; ``narrow`` drops the
    most negative code (-127..127), which keeps int8 x int8 products exact in some kernels.
    Asymmetric: the range is widened to include 0 so that zero padding is exact.
    Returns ``(scale, zero_point, qmin, qmax)``.
    """
    signed = symmetric if signed is None else signed
    qmin, qmax = qrange(bits, signed)
    if narrow and signed:
        qmin += 1
    lo_t = torch.as_tensor(lo, dtype=torch.float32)
    hi_t = torch.as_tensor(hi, dtype=torch.float32)
    lo_t, hi_t = (
        torch.minimum(lo_t, torch.zeros_like(lo_t)),
        torch.maximum(hi_t, torch.zeros_like(hi_t)),
    )
    if symmetric:
        amax = torch.maximum(-lo_t, hi_t)
        scale = torch.clamp(amax / ((qmax - qmin) / 2), min=EPS)
        zp = torch.zeros_like(scale, dtype=torch.int64)
        if not signed:
            zp = zp + (qmax + qmin + 1) // 2
    else:
        scale = torch.clamp((hi_t - lo_t) / (qmax - qmin), min=EPS)
        zp = torch.clamp(torch.round(qmin - lo_t / scale), qmin, qmax).to(torch.int64)
    return scale, zp, qmin, qmax


def fake_quantize(
    x: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    qmin: int,
    qmax: int,
    axis: int | None = None,
) -> torch.Tensor:
    """Quantize-dequantize with a straight-through gradient (per tensor, or per channel on axis)."""
    if axis is None or scale.numel() == 1:
        s, z = scale.reshape(()).float(), zero_point.reshape(()).to(torch.int32)
        return torch.fake_quantize_per_tensor_affine(x, s, z, qmin, qmax)
    return torch.fake_quantize_per_channel_affine(
        x, scale.reshape(-1).float(), zero_point.reshape(-1).to(torch.int32), axis, qmin, qmax
    )


def weight_range(
    w: torch.Tensor, per_channel: bool, axis: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Min and max of a weight, per output channel (``axis``) or over the whole tensor."""
    if not per_channel:
        return w.min(), w.max()
    flat = w.detach().transpose(0, axis).reshape(w.shape[axis], -1)
    return flat.min(dim=1).values, flat.max(dim=1).values


def quantize_weight(
    w: torch.Tensor,
    *,
    bits: int = 8,
    per_channel: bool = True,
    axis: int = 0,
    symmetric: bool = True,
    narrow: bool = False,
) -> torch.Tensor:
    """The weight as the integer model sees it (fake-quantized), symmetric signed by default."""
    lo, hi = weight_range(w, per_channel, axis)
    scale, zp, qmin, qmax = affine_params(lo, hi, bits=bits, symmetric=symmetric, narrow=narrow)
    return fake_quantize(w, scale, zp, qmin, qmax, axis if per_channel else None)


def mse_step(w: torch.Tensor, bits: int, grid: int = 40) -> torch.Tensor:
    """Per-channel step minimising the weight's squared quantization error over clip ratios."""
    qmax = 2 ** (bits - 1) - 1
    flat = w.detach().reshape(w.shape[0], -1)
    amax = flat.abs().amax(1).clamp_min(EPS)
    best, best_err = amax / qmax, torch.full_like(amax, float("inf"))
    for i in range(grid):
        step = amax * (1.0 - 0.8 * i / grid) / qmax
        q = torch.clamp(torch.round(flat / step[:, None]), -qmax, qmax) * step[:, None]
        err = ((q - flat) ** 2).sum(1)
        better = err < best_err
        best, best_err = torch.where(better, step, best), torch.where(better, err, best_err)
    return best


def weight_codes(w: torch.Tensor, bits: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Integer codes (as float) and scales of ``w`` per output channel (dim 0), symmetric and
    narrow (-q..q: negation is exact, and int8 x uint8 pair sums stay inside int16 at 7 bits).
    Below 7 bits the range is clipped per channel where that lowers the squared error
    (:func:`mse_step`); at 7 and 8 bits the full range is kept."""
    lo, hi = weight_range(w, per_channel=True)
    scale, _, qmin, qmax = affine_params(lo, hi, bits=bits, symmetric=True, narrow=True)
    if bits < 7:
        scale = mse_step(w, bits)
    codes = torch.clamp(torch.round(w / scale.view((-1,) + (1,) * (w.dim() - 1))), qmin, qmax)
    return codes, scale.float()


def nhwc(x: torch.Tensor) -> torch.Tensor | None:
    """The NHWC view of a channels-last 4-D tensor (its memory order, no copy); None otherwise.
    Reductions and flattening over that view avoid striding across channels."""
    cl = torch.channels_last
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=cl):
        return x.permute(0, 2, 3, 1)
    return None


def is_depthwise(m: nn.Module) -> bool:
    """A conv whose every output channel reads only its own input channel (groups = channels)."""
    return (
        isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d))
        and m.groups > 1
        and m.groups == m.in_channels == m.out_channels
    )
