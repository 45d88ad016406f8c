"""Rank of a noisy matrix by empirical variational Bayesian matrix factorisation (EVBMF).

Nakajima, Sugiyama, Babacan and Tomioka, "Global analytic solution of fully-observed variational
Bayesian matrix factorization", JMLR 14, 2013. The model is ``V = B A^T + E`` with Gaussian priors
on the columns of A and B (their variances estimated: *empirical* Bayes) and Gaussian noise of
variance ``s2`` (estimated too). The global solution is analytic: a singular value ``g`` of V is
kept iff ``g^2 > M s2 xbar``, and ``s2`` minimises the free energy, a function of one variable.

With ``L <= M`` the shape of V, ``alpha = L / M``, ``x_h = g_h^2 / (M s2)`` and
``tau(x) = (x - 1 - alpha + sqrt((x - 1 - alpha)^2 - 4 alpha)) / 2`` (the inverse of
``x = (1 + tau)(1 + alpha / tau)``), the free energy is, up to constants::

    F(s2) = ||V||^2 / (M s2) + L log s2 + sum_{h: x_h > xbar} psi1(x_h)
    psi1(x) = log(tau + 1) + alpha log(tau / alpha + 1) - tau

The first two terms are the all-noise fit; ``psi1 < 0`` is what keeping component h gains.
``xbar = (1 + tbar)(1 + alpha / tbar)`` where ``tbar > 0`` is the zero of
``psi1(x(tau)) = log(tau + 1) + alpha log(tau / alpha + 1) - tau`` (about ``2.5129 sqrt(alpha)``).
At most ``ceil(L / (1 + alpha)) - 1`` components survive, which bounds ``s2`` from below.
"""

from __future__ import annotations

import math

import torch


def _gain(tau: float, alpha: float) -> float:
    return math.log(tau + 1) + alpha * math.log(tau / alpha + 1) - tau


def tau_bar(alpha: float) -> float:
    """The positive zero of ``log(t + 1) + alpha log(t / alpha + 1) - t`` (bisection)."""
    lo, hi = 1e-9, 1.0
    while _gain(hi, alpha) > 0:
        hi *= 2
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if _gain(mid, alpha) > 0 else (lo, mid)
    return (lo + hi) / 2


def _free_energy(
    s2: float, sq: torch.Tensor, total: float, big_l: int, big_m: int, alpha: float, xbar: float
) -> float:
    x = sq / (big_m * s2)
    kept = x[x > xbar]
    f = total / (big_m * s2) + big_l * math.log(s2)
    if kept.numel():
        d = kept - 1 - alpha
        tau = (d + torch.sqrt((d * d - 4 * alpha).clamp_min(0))) / 2
        f += float((torch.log1p(tau) + alpha * torch.log1p(tau / alpha) - tau).sum())
    return f


def vbmf(matrix: torch.Tensor) -> tuple[int, float]:
    """``(rank, noise variance)`` of ``matrix`` by EVBMF (at least rank 0)."""
    v = matrix.detach().to(torch.float64)
    if v.shape[0] > v.shape[1]:
        v = v.T  # L <= M
    big_l, big_m = v.shape
    s = torch.linalg.svdvals(v)
    sq = s * s
    total = float(sq.sum())
    if total == 0.0:
        return 0, 0.0
    alpha = big_l / big_m
    tb = tau_bar(alpha)
    xbar = (1 + tb) * (1 + alpha / tb)
    h_max = max(math.ceil(big_l / (1 + alpha)) - 1, 0)  # at most this many kept
    upper = total / (big_l * big_m)
    tail = sq[h_max:] if h_max < big_l else sq[-1:]
    lower = max(float(tail[0]) / (big_m * xbar), float(tail.mean()) / big_m, upper * 1e-12)
    if lower >= upper:
        s2 = upper
    else:  # F is not unimodal: a grid on log s2, then golden section around its best point
        lo, hi = math.log(lower), math.log(upper)
        grid = [lo + (hi - lo) * i / 200 for i in range(201)]
        f = [_free_energy(math.exp(g), sq, total, big_l, big_m, alpha, xbar) for g in grid]
        i = min(range(len(f)), key=f.__getitem__)
        a, b = grid[max(i - 1, 0)], grid[min(i + 1, 200)]
        phi = (math.sqrt(5) - 1) / 2
        for _ in range(60):
            c, d = b - phi * (b - a), a + phi * (b - a)
            fc = _free_energy(math.exp(c), sq, total, big_l, big_m, alpha, xbar)
            fd = _free_energy(math.exp(d), sq, total, big_l, big_m, alpha, xbar)
            a, b = (a, d) if fc < fd else (c, b)
        s2 = math.exp((a + b) / 2)
    threshold = big_m * s2 * xbar
    return int((sq > threshold).sum()), s2
