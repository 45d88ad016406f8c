"""Unstructured magnitude pruning and N:M (2:4) sparsity, kept as masks until ``finalize``.

Each pruned weight gets a ``torch.nn.utils.parametrize`` mask: the layer computes with
``weight * mask``, so the zeros survive fine-tuning (an optimizer step changes the stored weight,
never the masked one) and tracing for export. ``finalize`` bakes the masks into plain weights.

Honest note: zeros in a dense tensor shrink a *compressed* file (zip, or a sparse format), but dense
CPU kernels (PyTorch, ONNX Runtime) multiply the zeros anyway, so latency does not improve. 2:4
sparsity is faster only on hardware with sparse tensor cores; for CPU speed use ``prune.channel``.

Papers: Han et al., "Learning both Weights and Connections for Efficient Neural Networks", NeurIPS
2015 (magnitude); Mishra et al., "Accelerating Sparse Deep Neural Networks", 2021 (2:4).

    sparse = prune_magnitude(model, Magnitude(sparsity=0.8, global_ranking=True))
    sparse = prune_nm(model, NM(n=2, m=4)); dense = finalize(sparse)

YAML steps: ``- prune.magnitude: {sparsity: 0.8}`` and ``- prune.nm: {n: 2, m: 4}``. Supports
Linear and Conv1d/2d/3d weights (N:M groups run along input channels; layers whose input width is
not a multiple of M are left dense).
"""

from __future__ import annotations

import copy

import torch
from pydantic import Field, model_validator
from torch import nn
from torch.nn.utils import parametrize

from slimkit.core.config import Config
from slimkit.core.registry import METHODS
from slimkit.core.scope import Scope
from slimkit.errors import ConfigError

WEIGHTED = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


class Magnitude(Config):
    """Zero the smallest-magnitude weights."""

    sparsity: float = Field(0.5, ge=0.0, lt=1.0)  # fraction of weights set to zero
    global_ranking: bool = False  # one threshold over all layers instead of per layer


class NM(Config):
    """Keep the ``n`` largest of every ``m`` consecutive weights along the input dimension."""

    n: int = Field(2, ge=1)
    m: int = Field(4, ge=2)

    @model_validator(mode="after")
    def _n_below_m(self) -> NM:
        if self.n >= self.m:
            raise ValueError(f"n={self.n} must be smaller than m={self.m} (e.g. n=2, m=4)")
        return self


class WeightMask(nn.Module):
    """Parametrization ``w -> w * mask`` with the mask as a buffer (saved in the state dict)."""

    mask: torch.Tensor

    def __init__(self, mask: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("mask", mask.to(torch.float32))

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return w * self.mask.to(w.dtype)


def _weight(m: nn.Module) -> torch.Tensor:
    w = m.weight
    assert isinstance(w, torch.Tensor)
    return w.detach()


def _attach(m: nn.Module, mask: torch.Tensor) -> None:
    if parametrize.is_parametrized(m, "weight"):  # prune again: combine with the current mask
        mask = mask * _mask_of(m)
        parametrize.remove_parametrizations(m, "weight", leave_parametrized=True)
    parametrize.register_parametrization(m, "weight", WeightMask(mask))


def _mask_of(m: nn.Module) -> torch.Tensor:
    p = m.parametrizations["weight"][0]  # type: ignore[index, union-attr]
    assert isinstance(p, WeightMask)
    return p.mask


def _layers(model: nn.Module, scope: Scope | None) -> list[tuple[str, nn.Module]]:
    return (scope or Scope()).select(model, WEIGHTED)


@METHODS.register(
    "prune.magnitude",
    config=Magnitude,
    summary="zero the smallest weights (masks)",
    aliases={"unstructured": {}},
)
def prune_magnitude(
    model: nn.Module, config: Magnitude | None = None, *, scope: Scope | None = None
) -> nn.Module:
    """A copy of ``model`` with magnitude masks on Linear/Conv weights (original unchanged)."""
    cfg = config or Magnitude()
    out = copy.deepcopy(model)
    layers = _layers(out, scope)
    if cfg.global_ranking:
        scores = torch.cat([_weight(m).abs().flatten() for _, m in layers])
        k = int(cfg.sparsity * scores.numel())
        threshold = scores.kthvalue(k).values if k > 0 else scores.min() - 1
        for _, m in layers:
            _attach(m, (_weight(m).abs() > threshold).float())
        return out
    for _, m in layers:
        w = _weight(m).abs()
        k = int(cfg.sparsity * w.numel())
        mask = torch.ones_like(w)
        if k > 0:
            mask.view(-1)[w.flatten().argsort()[:k]] = 0.0  # exactly k zeros, ties included
        _attach(m, mask)
    return out


def nm_mask(weight: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Mask keeping the ``n`` largest |w| in every ``m`` consecutive input channels."""
    w = weight.detach().abs()
    # (out, in, *k) -> (out, *k, in): groups of m consecutive input channels at the same tap
    moved = w.movedim(1, -1) if w.dim() > 2 else w
    groups = moved.reshape(-1, m)
    keep = groups.topk(n, dim=1).indices
    mask = torch.zeros_like(groups).scatter_(1, keep, 1.0).reshape(moved.shape)
    return mask.movedim(-1, 1) if w.dim() > 2 else mask


@METHODS.register(
    "prune.nm",
    config=NM,
    summary="N:M semi-structured sparsity, e.g. 2:4 (masks)",
    aliases={"2:4": {"n": 2, "m": 4}, "n:m": {}, "semi_structured": {}},
)
def prune_nm(
    model: nn.Module, config: NM | None = None, *, scope: Scope | None = None
) -> nn.Module:
    """A copy of ``model`` with N:M masks on Linear/Conv weights whose input width allows it."""
    cfg = config or NM()
    out = copy.deepcopy(model)
    done = 0
    for _, m in _layers(out, scope):
        w = _weight(m)
        if w.shape[1] % cfg.m == 0:
            _attach(m, nm_mask(w, cfg.n, cfg.m))
            done += 1
    if not done:
        raise ConfigError(
            f"no layer in scope has an input width divisible by m={cfg.m}",
            fix=f"use a smaller m, or a scope with layers of input width a multiple of {cfg.m}",
        )
    return out


def finalize(model: nn.Module) -> nn.Module:
    """Bake every mask into its weight (in place) and return the model, now with plain weights."""
    for m in model.modules():
        if parametrize.is_parametrized(m, "weight"):
            parametrize.remove_parametrizations(m, "weight", leave_parametrized=True)
    return model


def sparsity(model: nn.Module) -> dict[str, float]:
    """Fraction of zero weights per Linear/Conv layer, and ``"(global)"`` over all of them."""
    out: dict[str, float] = {}
    zeros = total = 0
    for name, m in model.named_modules():
        if isinstance(m, WEIGHTED):
            w = m.weight.detach()  # the masked weight when parametrized
            z = int((w == 0).sum())
            out[name] = z / w.numel()
            zeros, total = zeros + z, total + w.numel()
    out["(global)"] = zeros / max(total, 1)
    return out
