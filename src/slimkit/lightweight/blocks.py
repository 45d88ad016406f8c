"""Lightweight replacements for a standard kxk convolution, initialised from its kernel.

- ``separable(conv, multiplier)``: depthwise kxk (``multiplier`` filters per input channel) then
  a 1x1 pointwise conv (MobileNet, Howard et al. 2017). Initialised by a rank-``multiplier`` SVD
  of each input channel's (out, k*k) slice of the kernel, the best such fit in the Frobenius
  norm; exact when ``multiplier >= min(out, k*k)``.
- ``GhostConv``: a primary kxk conv to ``out / ratio`` channels and a cheap depthwise 3x3 that
  makes the other channels from them (GhostNet, Han et al., CVPR 2020). Initialised by pairing
  each cheap channel with its most similar primary filter (|cosine|): the primary conv keeps that
  original filter, the cheap op starts as the least-squares scale between the two filters.
"""

from __future__ import annotations

import torch
from torch import nn


def _pair(v: int | tuple[int, ...]) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


def separable(conv: nn.Conv2d, multiplier: int = 1) -> tuple[nn.Sequential, float]:
    """``conv`` as depthwise kxk -> pointwise 1x1, and the relative kernel error of the fit."""
    w = conv.weight.detach().double()  # (out, in, kh, kw)
    cout, cin, kh, kw = w.shape
    m = multiplier
    dw = nn.Conv2d(
        cin, cin * m, (kh, kw), _pair(conv.stride), conv.padding,  # type: ignore[arg-type]
        _pair(conv.dilation), groups=cin, bias=False, padding_mode=conv.padding_mode,
    )  # fmt: skip
    pw = nn.Conv2d(cin * m, cout, 1, bias=conv.bias is not None)
    slices = w.permute(1, 0, 2, 3).reshape(cin, cout, kh * kw)  # per input channel: (out, k*k)
    u, s, vh = torch.linalg.svd(
        slices, full_matrices=False
    )  # (cin, out, r), (cin, r), (cin, r, k*k)
    r = min(m, s.shape[1])
    root = s[:, :r].sqrt()
    dw_w = torch.zeros(cin, m, kh * kw, dtype=torch.float64)
    pw_w = torch.zeros(cout, cin, m, dtype=torch.float64)
    dw_w[:, :r] = root[:, :, None] * vh[:, :r]
    pw_w[:, :, :r] = (u[:, :, :r] * root[:, None, :]).permute(1, 0, 2)
    with torch.no_grad():
        dw.weight.copy_(dw_w.reshape(cin * m, 1, kh, kw).to(conv.weight.dtype))
        pw.weight.copy_(pw_w.reshape(cout, cin * m, 1, 1).to(conv.weight.dtype))
        if conv.bias is not None and pw.bias is not None:
            pw.bias.copy_(conv.bias.detach())
    fit = torch.einsum("ocj,cjk->ock", pw_w, dw_w).reshape(cout, cin, kh, kw)
    err = float((fit - w).norm() / w.norm().clamp_min(1e-30))
    return nn.Sequential(dw, pw), err


class GhostConv(nn.Module):
    """Primary kxk conv to ``m`` channels, a cheap depthwise 3x3 making ``out - m`` more, the two
    concatenated and put back in the original channel order (``order``)."""

    order: torch.Tensor

    def __init__(self, conv: nn.Conv2d, ratio: int = 2) -> None:
        super().__init__()
        cout, cin = conv.out_channels, conv.in_channels
        if cout % ratio or ratio < 2:
            raise ValueError(f"out channels {cout} are not a multiple of ratio {ratio} >= 2")
        m, extra = cout // ratio, cout - cout // ratio
        bias = conv.bias is not None
        self.primary = nn.Conv2d(
            cin, m, _pair(conv.kernel_size), _pair(conv.stride), conv.padding,  # type: ignore[arg-type]
            _pair(conv.dilation), bias=bias, padding_mode=conv.padding_mode,
        )  # fmt: skip
        self.cheap = nn.Conv2d(m, extra, 3, 1, 1, groups=m, bias=bias)
        self.register_buffer("order", torch.zeros(cout, dtype=torch.long))
        self._init_from(conv, m, extra)

    def _init_from(self, conv: nn.Conv2d, m: int, extra: int) -> None:
        w = conv.weight.detach().flatten(1)  # (out, in*k*k)
        cout = w.shape[0]
        unit = w / w.norm(dim=1, keepdim=True).clamp_min(1e-12)
        sim = (unit @ unit.T).abs().fill_diagonal_(-1.0)
        # primaries: the filters with the largest norms; each cheap channel (extra // m per
        # primary) takes the unassigned filter most similar to its primary
        prim = w.norm(dim=1).argsort(descending=True)[:m].tolist()
        free = [i for i in range(cout) if i not in set(prim)]
        per = extra // m if m else 0
        ghost: list[int] = []
        src: list[int] = []
        for p in prim:
            for _ in range(per):
                j = max(free, key=lambda i: float(sim[p, i]))
                free.remove(j)
                ghost.append(j)
                src.append(p)
        with torch.no_grad():
            self.primary.weight.copy_(conv.weight[prim])
            self.cheap.weight.zero_()
            for c, (g, p) in enumerate(zip(ghost, src, strict=True)):
                scale = float(w[g] @ w[p] / (w[p] @ w[p]).clamp_min(1e-12))
                self.cheap.weight[c, 0, 1, 1] = scale
            if conv.bias is not None:
                assert self.primary.bias is not None and self.cheap.bias is not None
                self.primary.bias.copy_(conv.bias[prim])
                self.cheap.bias.copy_(conv.bias[ghost])
        position = torch.empty(cout, dtype=torch.long)
        position[torch.tensor(prim + ghost)] = torch.arange(cout)
        self.order.copy_(position)  # output channel i is concatenated channel order[i]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.primary(x)
        return torch.cat([y, self.cheap(y)], 1).index_select(1, self.order)
