"""Factorised layers: one Linear / conv replaced by a short chain of ordinary layers
(``LowRank``, an ``nn.Sequential``), so that ONNX export gives plain MatMul / Gemm / Conv nodes.

``chain(layer, kind, rank, spatial)`` builds the empty chain for a layer (the artifact replays
it from the record before loading the weights); ``factorise(layer, kind, rank, ...)`` builds it
and fills it from the decomposition, returning the relative reconstruction error of the kernel.

======  =========================================================  ============================
kind    chain                                                      parameters (no bias)
======  =========================================================  ============================
svd     Linear in->r, Linear r->out (conv: kxk in->r, 1x1 r->out)  r (in k + out)
tucker  1x1 in->r_in, kxk r_in->r_out, 1x1 r_out->out              r_in (in + r_out k) + r_out out
cp      1x1 in->R, depthwise kxk R (or kx1 then 1xk), 1x1 R->out   R (in + k + out)
======  =========================================================  ============================

The kxk part keeps the layer's stride, padding (mode), dilation; the bias sits on the last layer.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
from torch import nn

from slimkit.lowrank.factorise import cp_als, cp_reconstruct, svd, tucker2

Kind = Literal["svd", "tucker", "cp"]
Spatial = Literal["full", "separable"]
CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
LAYERS = (nn.Linear, *CONVS)
Layer = nn.Linear | nn.Conv1d | nn.Conv2d | nn.Conv3d


class LowRank(nn.Sequential):
    """A layer factorised into a chain; ``kind`` and ``rank`` say how (``rank``: ``[r]`` for svd
    and cp, ``[r_out, r_in]`` for tucker)."""

    def __init__(self, *layers: nn.Module, kind: str, rank: list[int], spatial: str = "full"):
        super().__init__(*layers)
        self.kind, self.rank, self.spatial = kind, list(rank), spatial

    def extra_repr(self) -> str:
        return f"kind={self.kind}, rank={self.rank}" + (
            ", spatial=separable" if self.spatial == "separable" else ""
        )


def _ones(n: int) -> tuple[int, ...]:
    return (1,) * n


def _conv(
    layer: nn.Module,
    cin: int,
    cout: int,
    *,
    spatial: bool,
    bias: bool,
    groups: int = 1,
    axis: int | None = None,
) -> nn.Module:
    """A conv of ``layer``'s type: its kernel, stride, padding, dilation (``spatial``; only along
    ``axis`` when given) or a pointwise one."""
    assert isinstance(layer, CONVS)
    cls: Any = type(layer)
    nd = len(layer.kernel_size)
    if not spatial:
        return cls(cin, cout, _ones(nd), bias=bias)

    def along(value: tuple[int, ...], rest: int) -> tuple[int, ...]:
        return (
            value if axis is None else tuple(v if i == axis else rest for i, v in enumerate(value))
        )

    padding = layer.padding
    if not isinstance(padding, str):
        padding = along(tuple(padding), 0)
    return cls(
        cin,
        cout,
        along(layer.kernel_size, 1),
        stride=along(layer.stride, 1),
        padding=padding,
        dilation=along(layer.dilation, 1),
        groups=groups,
        bias=bias,
        padding_mode=layer.padding_mode,
    )


def chain(layer: Layer, kind: Kind, rank: list[int], spatial: Spatial = "full") -> LowRank:
    """The empty chain (right shapes, default initialisation) that factorises ``layer``."""
    bias = layer.bias is not None
    if isinstance(layer, nn.Linear):
        if kind != "svd":
            raise ValueError(f"a Linear layer is factorised by svd, not {kind}")
        r = rank[0]
        return LowRank(
            nn.Linear(layer.in_features, r, bias=False),
            nn.Linear(r, layer.out_features, bias=bias),
            kind="svd",
            rank=[r],
        )
    cin, cout = layer.in_channels, layer.out_channels
    if kind == "svd":
        r = rank[0]
        return LowRank(
            _conv(layer, cin, r, spatial=True, bias=False),
            _conv(layer, r, cout, spatial=False, bias=bias),
            kind="svd",
            rank=[r],
        )
    if kind == "tucker":
        r_out, r_in = rank
        return LowRank(
            _conv(layer, cin, r_in, spatial=False, bias=False),
            _conv(layer, r_in, r_out, spatial=True, bias=False),
            _conv(layer, r_out, cout, spatial=False, bias=bias),
            kind="tucker",
            rank=[r_out, r_in],
        )
    r = rank[0]
    if spatial == "separable" and isinstance(layer, nn.Conv2d):
        middle = [_conv(layer, r, r, spatial=True, bias=False, groups=r, axis=a) for a in (0, 1)]
    else:
        middle, spatial = [_conv(layer, r, r, spatial=True, bias=False, groups=r)], "full"
    return LowRank(
        _conv(layer, cin, r, spatial=False, bias=False),
        *middle,
        _conv(layer, r, cout, spatial=False, bias=bias),
        kind="cp",
        rank=[r],
        spatial=spatial,
    )


def _set(module: nn.Module, weight: torch.Tensor) -> None:
    w = module.weight
    assert isinstance(w, torch.Tensor)
    with torch.no_grad():
        w.copy_(weight.reshape(w.shape).to(w.dtype))


def factorise(
    layer: Layer,
    kind: Kind,
    rank: list[int],
    *,
    spatial: Spatial = "full",
    iters: int = 0,
    seed: int = 0,
    whiten: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[LowRank, float]:
    """``layer`` as a filled chain, and the relative reconstruction error ``||W - W_hat|| / ||W||``
    of its kernel. ``iters``: HOOI sweeps (tucker) or ALS sweeps (cp). ``whiten`` (svd only):
    ``(S, S^-1)`` of the layer's input covariance (``lowrank.whiten``); the error is then that of
    the outputs on the data, ``||(W - W_hat) S|| / ||W S||``."""
    w = layer.weight.detach()
    out = chain(layer, kind, rank, spatial).to(device=w.device, dtype=w.dtype)
    w64 = w.to(torch.float64)
    parts = list(out)
    s_in = None
    if kind == "svd":
        w2 = w64.reshape(w64.shape[0], -1)
        s_in, s_inv = whiten if whiten is not None else (None, None)
        u, s, vh = svd(w2 @ s_in if s_in is not None else w2)
        r, root = rank[0], s[: rank[0]].sqrt()
        first, second = root[:, None] * vh[:r], u[:, :r] * root[None, :]  # (r, in k), (out, r)
        if s_inv is not None:
            first = first @ s_inv
        _set(parts[0], first)
        _set(parts[1], second)
        approx = second @ first
    elif kind == "tucker":
        u_out, core, u_in = tucker2(w64, rank[0], rank[1], iters)
        _set(parts[0], u_in.T)
        _set(parts[1], core)
        _set(parts[2], u_out)
        approx = torch.einsum("rs...,or,is->oi...", core, u_out, u_in)
    else:
        sep = out.spatial == "separable"
        k = tuple(w.shape[2:])
        tensor = w64 if sep else w64.reshape(w.shape[0], w.shape[1], -1)  # (out, in, k...)
        factors, _ = cp_als(tensor, rank[0], iters=iters or 50, seed=seed)
        a, b, spatial_factors = factors[0], factors[1], factors[2:]
        _set(parts[0], b.T)
        if sep:  # (kh, R) and (kw, R) -> depthwise (R, 1, kh, 1) and (R, 1, 1, kw)
            _set(parts[1], spatial_factors[0].T)
            _set(parts[2], spatial_factors[1].T)
        else:  # (prod k, R) -> depthwise (R, 1, *k)
            _set(parts[1], spatial_factors[0].T.reshape(rank[0], 1, *k))
        _set(parts[-1], a)
        approx = cp_reconstruct(factors)
    if layer.bias is not None:
        last = parts[-1]
        assert isinstance(last.bias, torch.Tensor)
        with torch.no_grad():
            last.bias.copy_(layer.bias.detach())
    diff = w64 - approx.reshape(w64.shape)
    if s_in is not None:  # the error of the outputs on the data
        w2 = w64.reshape(w64.shape[0], -1)
        diff, w64 = diff.reshape(w2.shape) @ s_in, w2 @ s_in
    err = float(diff.norm()) / (float(w64.norm()) or 1.0)
    return out, err


def kernel_size(layer: Layer) -> int:
    """Elements of one filter's spatial kernel (1 for Linear)."""
    return 1 if isinstance(layer, nn.Linear) else math.prod(layer.kernel_size)
