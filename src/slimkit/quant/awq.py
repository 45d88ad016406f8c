"""AWQ weight solver (Lin et al., 2023, "AWQ: Activation-aware Weight Quantization for LLM
Compression and Acceleration").

A few input channels carry much larger activations than the rest; their weights matter most.
Scaling weight column k up by ``s_k`` (and the input down by ``s_k``) leaves the float layer
unchanged but gives those columns finer steps of the group's grid. ``s = E[|x|]^alpha``
(normalised to a geometric mean of 1), with ``alpha`` grid-searched per layer for the smallest
output error ``tr(dW H dW^T)`` (``H = E[x x^T]``, so the error is measured on the calibration
inputs without keeping them); ``alpha = 0`` is round-to-nearest, so the search never does worse.
The chosen scales' groups then get the E[x^2]-weighted clip search (AWQ's second step), kept
where it lowers the output error. The input
scaling ``1 / s`` stays in the layer (``NBitsLinear.input_scale``, an ONNX ``Mul``).

Used by ``quant.int4`` (``method="awq"``); call :func:`awq` directly on a weight and statistics.
"""

from __future__ import annotations

import torch

from slimkit.quant.groupwise import GroupSpec, dequantize_weight, quantize_weight, search_range


def output_error(dw: torch.Tensor, h: torch.Tensor) -> float:
    """``E ||x dW^T||^2`` for inputs of second moment ``h``: ``tr(dW H dW^T)``."""
    return float(((dw @ h) * dw).sum())


def awq(
    w: torch.Tensor,
    h: torch.Tensor,
    abs_mean: torch.Tensor,
    spec: GroupSpec,
    *,
    grid: int = 20,
    clip_grid: int = 20,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """``(codes, scale, zero, input_scale (K,), alpha)`` for ``w`` (N, K): the layer computes
    ``(x * input_scale) @ dequant(codes).T``."""
    w = w.detach().float()
    k = w.shape[1]
    h = h.float()
    act = abs_mean.float().clamp(min=1e-5)
    best: tuple[float, float, torch.Tensor] = (float("inf"), 0.0, torch.ones(k))
    for alpha in [i / grid for i in range(grid)]:
        s = act**alpha
        s = s / torch.sqrt(s.max() * s.min())
        ws = w * s
        sc, z = search_range(ws, spec, grid=1)
        dq = dequantize_weight(quantize_weight(ws, sc, z, spec), sc, z, k) / s
        err = output_error(w - dq, h)
        if err < best[0]:
            best = (err, alpha, s)
    err, alpha, s = best
    ws = w * s
    sc, z = search_range(ws, spec, grid=1)
    if clip_grid > 1:  # the clip search weighs channels by E[x^2] only: kept if H agrees
        csc, cz = search_range(ws, spec, torch.diagonal(h) / s**2, grid=clip_grid)
        dq = dequantize_weight(quantize_weight(ws, csc, cz, spec), csc, cz, k) / s
        if output_error(w - dq, h) < err:
            sc, z = csc, cz
    return quantize_weight(ws, sc, z, spec), sc, z, 1.0 / s, alpha
