"""The decompositions themselves, on plain tensors (float64): truncated SVD, Tucker-2 by HOSVD with
HOOI refinement, and CP by alternating least squares. No layers here: ``modules`` turns factors
into convolutions.

- **SVD** (Eckart-Young): the best rank-r approximation of a matrix keeps its r largest singular
  triplets; the relative squared error is the energy of the dropped singular values.
- **Tucker-2** (Kim et al., "Compression of deep convolutional neural networks for fast and low
  power mobile applications", ICLR 2016): a conv kernel ``W (out, in, *k)`` is approximated by
  ``core x_0 U_out x_1 U_in`` with orthonormal ``U_out (out, r_out)``, ``U_in (in, r_in)``. HOSVD
  takes the leading left singular vectors of the mode-0 / mode-1 unfoldings; HOOI (De Lathauwer
  et al., 2000) then alternates: each factor becomes the leading singular vectors of the kernel
  projected on the other factor. With orthonormal factors
  ``||W - W_hat||^2 = ||W||^2 - ||core||^2``.
- **CP** (Lebedev et al., "Speeding-up convolutional neural networks using fine-tuned
  CP-decomposition", ICLR 2015): ``W ~ sum_r a_r o b_r o c_r (o d_r)``; ALS solves for one factor
  at a time in closed form: ``A_n = X_(n) KR(others) (hadamard of the others' Gram matrices)^-1``.
"""

from __future__ import annotations

import math

import torch

Tensor = torch.Tensor


def svd(matrix: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``U, S, Vh`` of ``matrix`` in float64 (reduced)."""
    u, s, vh = torch.linalg.svd(matrix.detach().to(torch.float64), full_matrices=False)
    return u, s, vh


def energy_rank(s: Tensor, energy: float) -> int:
    """The smallest r whose r largest singular values hold ``energy`` of the squared sum."""
    sq = s.to(torch.float64) ** 2
    total = float(sq.sum())
    if total == 0.0:
        return 1
    kept = torch.cumsum(sq, 0) / total
    return min(int((kept < energy - 1e-12).sum()) + 1, s.numel())


def tail_error2(s: Tensor) -> Tensor:
    """Relative squared error of keeping the r largest singular values, for r = 0 .. len(s)."""
    sq = s.to(torch.float64) ** 2
    total = float(sq.sum()) or 1.0
    tail = torch.flip(torch.cumsum(torch.flip(sq, [0]), 0), [0])  # tail[r] = sum_{i >= r}
    return torch.cat([tail, sq.new_zeros(1)]) / total


def unfold(t: Tensor, mode: int) -> Tensor:
    """Mode-n unfolding: ``(dim_n, product of the other dims)``."""
    return t.movedim(mode, 0).reshape(t.shape[mode], -1)


def _leading(matrix: Tensor, r: int) -> Tensor:
    """The ``r`` leading left singular vectors of a (rows, cols) matrix; for a wide one from the
    eigenvectors of its (rows, rows) Gram matrix (much faster than an SVD of the whole)."""
    if matrix.shape[0] * 4 <= matrix.shape[1]:
        vecs = torch.linalg.eigh(matrix @ matrix.T)[1]  # ascending eigenvalues
        return vecs.flip(1)[:, :r]
    return torch.linalg.svd(matrix, full_matrices=False)[0][:, :r]


def tucker2(w: Tensor, r_out: int, r_in: int, iters: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    """``(u_out (out, r_out), core (r_out, r_in, *k), u_in (in, r_in))`` of kernel ``w`` by HOSVD
    and ``iters`` HOOI sweeps; float64."""
    w = w.detach().to(torch.float64)
    u_out, u_in = _leading(unfold(w, 0), r_out), _leading(unfold(w, 1), r_in)
    for _ in range(iters):
        u_out = _leading(unfold(torch.einsum("oi...,ir->or...", w, u_in), 0), r_out)
        u_in = _leading(unfold(torch.einsum("oi...,or->ri...", w, u_out), 1), r_in)
    core = torch.einsum("oi...,or,is->rs...", w, u_out, u_in)
    return u_out, core, u_in


def tucker_curve(w: Tensor) -> Tensor:
    """Relative squared error of Tucker-2 HOSVD at every ``(r_out, r_in)``: entry
    ``[r_out - 1, r_in - 1]``. The full-basis core keeps all the energy, and a truncation keeps
    its leading block, so prefix sums of the squared core give every truncation at once."""
    w = w.detach().to(torch.float64)
    u_out = _leading(unfold(w, 0), w.shape[0])
    u_in = _leading(unfold(w, 1), w.shape[1])
    core = torch.einsum("oi...,or,is->rs...", w, u_out, u_in)
    kept = (core * core).reshape(core.shape[0], core.shape[1], -1).sum(-1).cumsum(0).cumsum(1)
    return (1 - kept / (float((w * w).sum()) or 1.0)).clamp_min(0)


def tucker_error2(w: Tensor, u_out: Tensor, u_in: Tensor) -> float:
    """Relative squared error of the Tucker-2 projection on orthonormal ``u_out``, ``u_in``."""
    w = w.detach().to(torch.float64)
    core = torch.einsum("oi...,or,is->rs...", w, u_out, u_in)
    total = float((w * w).sum()) or 1.0
    return max(1.0 - float((core * core).sum()) / total, 0.0)


_LETTERS = "abcdefgh"


def cp_reconstruct(factors: list[Tensor]) -> Tensor:
    """``sum_r a_r o b_r o ...`` of factors ``(dim_n, R)``."""
    idx = _LETTERS[: len(factors)]
    return torch.einsum(",".join(f"{c}z" for c in idx) + "->" + idx, *factors)


def khatri_rao(factors: list[Tensor]) -> Tensor:
    """Column-wise Kronecker product, rows in the order of ``unfold`` (the last factor fastest)."""
    out = factors[0]
    for f in factors[1:]:
        out = (out[:, None, :] * f[None, :, :]).reshape(-1, f.shape[1])  # (a*b, R)
    return out


def cp_als(
    t: Tensor, rank: int, iters: int = 50, tol: float = 1e-6, seed: int = 0
) -> tuple[list[Tensor], float]:
    """Rank-``rank`` CP factors of tensor ``t`` by ALS, and their relative error (float64).
    The weights are carried in the first factor; the others have unit columns."""
    t = t.detach().to(torch.float64)
    n = t.dim()
    gen = torch.Generator().manual_seed(seed)
    factors = []
    for mode in range(n):  # HOSVD-style start, random columns beyond the mode's dimension
        u = _leading(unfold(t, mode), rank)
        if u.shape[1] < rank:
            extra = torch.randn(t.shape[mode], rank - u.shape[1], generator=gen, dtype=t.dtype)
            u = torch.cat([u, extra / math.sqrt(t.shape[mode])], 1)
        factors.append(u)
    norm2 = float((t * t).sum()) or 1.0
    prev = float("inf")
    for _ in range(iters):
        for mode in range(n):
            others = [f for m, f in enumerate(factors) if m != mode]
            gram = torch.ones(rank, rank, dtype=t.dtype)
            for f in others:
                gram = gram * (f.T @ f)
            mttkrp = unfold(t, mode) @ khatri_rao(others)  # (dim_n, R)
            ridge = 1e-10 * float(gram.diagonal().mean()) * torch.eye(rank, dtype=t.dtype)
            f = torch.linalg.solve(gram + ridge, mttkrp.T).T
            if mode == n - 1:  # ||t - t_hat||^2 = ||t||^2 - 2 <t, t_hat> + ||t_hat||^2, cheaply
                inner, fit2 = float((f * mttkrp).sum()), float((gram * (f.T @ f)).sum())
                err2 = max(norm2 - 2 * inner + fit2, 0.0) / norm2
            if mode != 0:  # unit columns; their scale moves into the first factor
                scale = f.norm(dim=0).clamp_min(1e-30)
                f, factors[0] = f / scale, factors[0] * scale
            factors[mode] = f
        if abs(prev - err2) <= tol * err2 + 1e-15:  # relative change of the squared error
            break
        prev = err2
    err = float((t - cp_reconstruct(factors)).norm()) / math.sqrt(norm2)
    return factors, err
