"""GPTQ weight solver (Frantar et al., 2022, "GPTQ: Accurate Post-Training Quantization for
Generative Pre-trained Transformers").

Quantizes a weight column by column and spreads each column's rounding error over the columns not
yet quantized, weighted by the inverse Hessian of the layer's output error ``H = E[x x^T]``
(optimal brain surgeon for a linear layer). The error of a block of columns is applied to the rest
of the matrix once per block (lazy batch updates); with ``act_order`` the columns are visited by
decreasing ``H_kk`` (the inputs with most energy first), with group ranges fixed beforehand from
the original weights (contiguous groups, as ``MatMulNBits`` needs); without it each group's range
is chosen when the solver reaches it, from the already-updated weights. Ranges come from the
E[x^2]-weighted clip search (``groupwise.search_range``). ``damp`` adds ``damp * mean(diag H)`` to
the diagonal so that the Cholesky factorisation exists.

Used by ``quant.int4`` (``method="gptq"``); call :func:`gptq` directly on a weight and a Hessian.
"""

from __future__ import annotations

import torch

from slimkit.quant.groupwise import GroupSpec, search_range, to_groups


def gptq(
    w: torch.Tensor,
    h: torch.Tensor,
    spec: GroupSpec,
    *,
    act_order: bool = True,
    damp: float = 0.01,
    block: int = 128,
    clip_grid: int = 20,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(codes (N, G * S) uint8, scale (N, G), zero (N, G))`` for ``w`` (N, K) given the input
    second moment ``h`` (K, K)."""
    w = w.detach().float().clone()
    n, k = w.shape
    gs = spec.group_size
    h = h.detach().float().clone()
    dead = torch.diagonal(h) == 0  # inputs that were always zero: their weights do not matter
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    importance = torch.diagonal(h).clone()
    groups = spec.groups(k)
    scale = torch.ones(n, groups)
    zero = torch.zeros(n, groups)
    fixed = torch.zeros(groups, dtype=torch.bool)
    if act_order:
        scale, zero = search_range(w, spec, importance, grid=clip_grid)
        fixed[:] = True
        perm = torch.argsort(torch.diagonal(h), descending=True)
    else:
        perm = torch.arange(k)
    w, h = w[:, perm], h[perm][:, perm]
    h += damp * torch.diagonal(h).mean() * torch.eye(k)
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    codes = torch.zeros(n, k)
    block = max(gs, block // gs * gs)  # blocks hold whole groups: a group starts in its block
    for i1 in range(0, k, block):
        i2 = min(i1 + block, k)
        w1 = w[:, i1:i2].clone()
        err1 = torch.zeros_like(w1)
        hinv1 = hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = int(perm[i1 + i])
            g = col // gs
            if not fixed[g]:  # in natural order: the group starts here, all of it in this block
                s, z = search_range(w1[:, i : i + gs], GroupSpec(spec.bits, gs, spec.symmetric),
                                    importance[col : col + gs], grid=clip_grid)  # fmt: skip
                scale[:, g], zero[:, g] = s[:, 0], z[:, 0]
                fixed[g] = True
            x = w1[:, i]
            q = torch.clamp(torch.round(x / scale[:, g]) + zero[:, g], 0, spec.qmax)
            codes[:, i1 + i] = q
            e = (x - (q - zero[:, g]) * scale[:, g]) / hinv1[i, i]
            w1[:, i:] -= e[:, None] * hinv1[i, i:][None, :]
            err1[:, i] = e
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    codes = codes[:, torch.argsort(perm)]  # back to the original column order
    padded = to_groups(codes, gs).clone()  # (N, G, S): padded columns hold the zero point
    if groups * gs != k:
        padded.reshape(n, -1)[:, k:] = zero.repeat_interleave(gs, dim=1)[:, k:]
    return padded.reshape(n, -1).to(torch.uint8), scale, zero
