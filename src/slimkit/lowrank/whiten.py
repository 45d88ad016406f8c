"""Data-aware SVD: factorise ``W S`` instead of ``W``, where ``S`` is the square root of the layer's
input covariance on calibration data, so that ranks, energies and errors measure the layer's
*outputs* on that data rather than its weights.

``||(W - W_hat) x||`` averaged over inputs ``x`` is ``||(W - W_hat) S||_F`` with
``S S^T = E[x x^T]``; the best rank-r ``W_hat`` is ``[W S]_r S^-1`` (Eckart-Young on ``W S``).
Trained weights often carry large components in input directions the data never excites (what
remains of the random initialisation); plain SVD spends rank on them, this does not. The idea is
that of Zhang et al., "Accelerating very deep convolutional networks for classification and
detection" (TPAMI 2016) and of the activation-aware SVDs of LLM compression. ``S^-1`` is
regularised (eigenvalues plus 1 % of their mean) so that directions without data are not
amplified; the error it reports includes that ridge, so it overstates the error on the data.

For a conv the inputs are its patches (``F.unfold``: ``in * kh * kw`` values per output position,
in the order of ``weight.reshape(out, -1)``); Linear layers take the last dimension.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from slimkit.core.data import collect_batches

RIDGE = 0.01  # fraction of the mean eigenvalue added before inverting


def supports(layer: nn.Module) -> bool:
    """Linear, and Conv1d/2d with zero padding given as numbers (their patches are unfolded)."""
    if isinstance(layer, nn.Linear):
        return True
    return (
        isinstance(layer, nn.Conv1d | nn.Conv2d)
        and layer.padding_mode == "zeros"
        and not isinstance(layer.padding, str)
    )


def _patches(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The layer's input vectors, one row each: ``(n, in * k)``."""
    if isinstance(layer, nn.Linear):
        return x.reshape(-1, x.shape[-1])
    assert isinstance(layer, nn.Conv1d | nn.Conv2d)
    two = (lambda v: (1, *v)) if isinstance(layer, nn.Conv1d) else (lambda v: tuple(v))
    x4 = x.unsqueeze(-2) if isinstance(layer, nn.Conv1d) else x  # (B, C, L) -> (B, C, 1, L)
    cols = F.unfold(x4, two(layer.kernel_size), dilation=two(layer.dilation),  # type: ignore[arg-type]
                    padding=two(layer.padding), stride=two(layer.stride))  # fmt: skip
    return cols.transpose(1, 2).reshape(-1, cols.shape[1])  # (B, in k, L) -> (B L, in k)


def covariances(model: nn.Module, layers: dict[str, nn.Module], data: Any,
                limit: int = 16) -> dict[str, torch.Tensor]:  # fmt: skip
    """``E[x x^T]`` (float64) of each layer's input vectors over up to ``limit`` batches."""
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}

    def hook(name: str) -> Any:
        def fn(m: nn.Module, args: tuple[Any, ...], out: Any) -> None:
            p = _patches(m, args[0].detach()).to(torch.float64)
            sums[name] = sums.get(name, 0) + p.T @ p  # type: ignore[assignment, operator]
            counts[name] = counts.get(name, 0) + p.shape[0]

        return fn

    handles = [m.register_forward_hook(hook(n)) for n, m in layers.items()]
    try:
        with torch.no_grad():
            for b in collect_batches(data, limit=limit):
                b.run(model)
    finally:
        for h in handles:
            h.remove()
    return {n: sums[n] / counts[n] for n in sums}


def whitener(cov: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(S, S^-1)``: the symmetric square root of ``cov`` (regularised) and its inverse."""
    vals, vecs = torch.linalg.eigh(cov)
    vals = vals.clamp_min(0) + RIDGE * float(vals.clamp_min(0).mean()) + 1e-30
    return (vecs * vals.sqrt()) @ vecs.T, (vecs / vals.sqrt()) @ vecs.T
