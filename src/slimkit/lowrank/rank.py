"""Rank selection: one rule per config, per layer or over a budget for all the layers in scope.

- ``rank``: an int (that rank) or a fraction in (0, 1] of each layer's full rank (svd: ``min(out,
  in k)``; tucker: of each mode, ``out`` and ``in``; cp: of ``max(out, in)``).
- ``energy``: keep that fraction of the kernel's squared norm. svd: of its singular values
  (``1 - energy`` is the relative squared error); tucker: of each mode's unfolding; cp: the
  smallest rank whose ALS fit has relative squared error <= ``1 - energy`` (bisection).
- ``params`` / ``macs``: a budget, the fraction of the scoped layers' parameters (MACs) to keep.
  Each layer's options (rank -> cost, relative squared error) form a curve; walking the lower
  convex hulls of all curves greedily, always the step with the least error per saved unit,
  until the total fits.
- ``vbmf``: the rank EVBMF estimates (``lowrank.vbmf``); tucker per mode (as Kim et al. 2016), cp
  the larger of the two mode ranks.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass, field
from typing import Any

import torch
from pydantic import Field, field_validator, model_validator

from slimkit.core.config import Config
from slimkit.lowrank.factorise import cp_als, energy_rank, tail_error2, tucker_curve, unfold
from slimkit.lowrank.modules import Kind, Layer, Spatial, kernel_size
from slimkit.lowrank.vbmf import vbmf

RULES = ("rank", "energy", "params", "macs", "vbmf")


class RankRule(Config):
    """How ranks are chosen (exactly one rule; none given: ``energy: 0.9``), and when a layer is
    worth factorising at all."""

    rank: int | float | None = None  # int >= 1: that rank; float in (0, 1]: fraction of full rank
    energy: float | None = Field(None, gt=0.0, le=1.0)  # keep this fraction of the squared norm
    params: float | None = Field(None, gt=0.0, lt=1.0)  # budget: keep this fraction of params
    macs: float | None = Field(None, gt=0.0, lt=1.0)  # budget: keep this fraction of MACs
    vbmf: bool = False  # rank by empirical variational Bayes (Nakajima et al. 2013)
    min_saving: float = Field(0.1, ge=0.0, lt=1.0)  # keep layers that would save less than this
    round_to: int = Field(1, ge=1)  # ranks rounded up to a multiple (8, 16: faster CPU kernels)

    @model_validator(mode="before")
    @classmethod
    def _default_rule(cls, data: Any) -> Any:
        if isinstance(data, dict) and not any(data.get(k) not in (None, False) for k in RULES):
            return {**data, "energy": 0.9}
        return data

    @field_validator("rank")
    @classmethod
    def _rank(cls, v: int | float | None) -> int | float | None:
        if v is None or isinstance(v, bool):
            return None if v is None else int(v)
        if isinstance(v, int) and v < 1 or isinstance(v, float) and not 0.0 < v <= 1.0:
            raise ValueError(
                f"rank={v!r} is not a rank: use an int >= 1 (that rank) or a float in (0, 1] "
                "(a fraction of each layer's full rank), e.g. rank: 16 or rank: 0.25"
            )
        return v

    @model_validator(mode="after")
    def _one_rule(self) -> RankRule:
        given = [k for k in RULES if getattr(self, k) not in (None, False)]
        if len(given) > 1:
            raise ValueError(
                f"{' and '.join(given)} are each a rank rule: give one of "
                f"{', '.join(RULES)} (e.g. energy: 0.9, or params: 0.2)"
            )
        return self

    @property
    def rule(self) -> str:
        """The rule in words: ``energy 0.9``, ``params 0.2``, ``rank 16``, ``vbmf``."""
        for k in RULES:
            v = getattr(self, k)
            if v not in (None, False):
                return "vbmf" if k == "vbmf" else f"{k} {v:g}"
        return "energy 0.9"


@dataclass
class Candidate:
    """A layer that may be factorised: its kernel, kind and where it runs (``positions``: input
    and output positions per sample, from the example inputs; None when unknown)."""

    name: str
    layer: Layer
    kind: Kind
    spatial: Spatial = "full"
    positions: tuple[int, int, int] | None = None  # (input, middle of kx1/1xk, output)
    whiten: tuple[torch.Tensor, torch.Tensor] | None = None  # data-aware svd: (S, S^-1)
    _cache: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def dims(self) -> tuple[int, int, int]:
        """(out, in, kernel elements)."""
        w = self.layer.weight
        return w.shape[0], w.shape[1], kernel_size(self.layer)

    def full_rank(self) -> list[int]:
        o, i, k = self.dims
        if self.kind == "svd":
            return [min(o, i * k)]
        if self.kind == "tucker":
            return [o, i]
        return [max(o, i)]

    def cost(self, rank: list[int] | None) -> tuple[int, int | None]:
        """(parameters, MACs per sample or None) of the layer at ``rank`` (None: unfactorised)."""
        o, i, k = self.dims
        bias = o if self.layer.bias is not None else 0
        pin, pmid, pout = self.positions or (0, 0, 0)
        if rank is None:
            p, m = o * i * k, pout * o * i * k
        elif self.kind == "svd":
            p = m = rank[0] * (i * k + o)
            m *= pout
        elif self.kind == "tucker":
            r_out, r_in = rank
            p = i * r_in + r_in * r_out * k + r_out * o
            m = pin * i * r_in + pout * (r_in * r_out * k + r_out * o)
        else:
            r = rank[0]
            if self.spatial == "separable":
                kh, kw = tuple(getattr(self.layer, "kernel_size", (1, 1)))[:2]
                p = r * (i + kh + kw + o)
                m = pin * i * r + pmid * r * kh + pout * r * (kw + o)
            else:
                p, m = r * (i + k + o), pin * i * r + pout * r * (k + o)
        return p + bias, (m if self.positions is not None else None)

    def weight(self) -> torch.Tensor:
        return self.layer.weight.detach().to(torch.float64)

    def matrix(self) -> torch.Tensor:
        """The matrix svd factorises: ``W (out, in k)``, times ``S`` when data-aware."""
        w = unfold(self.weight(), 0)
        return w @ self.whiten[0] if self.whiten is not None else w

    def singular_values(self, mode: int = 0) -> torch.Tensor:
        key = f"s{mode}"
        if key not in self._cache:
            m = self.matrix() if mode == 0 else unfold(self.weight(), 1)
            self._cache[key] = torch.linalg.svdvals(m)
        out: torch.Tensor = self._cache[key]
        return out

    def cp_error2(self, rank: int, iters: int) -> float:
        key = f"cp{rank}/{iters}"
        if key not in self._cache:
            w = self.weight()
            t = w if self.spatial == "separable" else w.reshape(w.shape[0], w.shape[1], -1)
            self._cache[key] = cp_als(t, rank, iters=iters)[1] ** 2
        return float(self._cache[key])


def pick(c: Candidate, cfg: RankRule, *, iters: int = 50) -> list[int]:
    """The rank of ``c`` under a per-layer rule (``rank``, ``energy``, ``vbmf``)."""
    full = c.full_rank()
    o, i, _ = c.dims
    if cfg.rank is not None:
        if isinstance(cfg.rank, int):
            return [min(cfg.rank, f) for f in full]
        return [max(1, math.ceil(cfg.rank * f)) for f in full]
    if cfg.vbmf:
        ranks = [max(vbmf(c.matrix())[0], 1)]
        if c.kind != "svd":
            ranks.append(max(vbmf(unfold(c.weight(), 1))[0], 1))
        return ranks if c.kind == "tucker" else [max(ranks)]
    energy = cfg.energy if cfg.energy is not None else 0.9
    if c.kind == "svd":
        return [energy_rank(c.singular_values(0), energy)]
    if c.kind == "tucker":
        return [energy_rank(c.singular_values(m), energy) for m in (0, 1)]
    lo, hi = 1, max(break_even(c), 1)  # bisection on the ALS fit
    if c.cp_error2(hi, iters) > 1 - energy:
        return [hi + 1]  # not reachable below the break-even rank: no saving (kept)
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (mid + 1, hi) if c.cp_error2(mid, iters) > 1 - energy else (lo, mid)
    return [lo]


def break_even(c: Candidate) -> int:
    """The largest single rank (cp, svd; tucker: the same fraction of both modes) that still has
    fewer parameters than the layer."""
    orig = c.cost(None)[0]
    lo, hi = 0, max(c.full_rank()) + 1
    while lo + 1 < hi:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if c.cost(_tied(c, mid))[0] < orig else (lo, mid)
    return lo


def _tied(c: Candidate, r: int) -> list[int]:
    """A single number as the rank of ``c``: tucker takes the same fraction of both modes."""
    if c.kind != "tucker":
        return [r]
    o, i, _ = c.dims
    big = max(o, i)
    return [max(1, min(o, math.ceil(r * o / big))), max(1, min(i, math.ceil(r * i / big)))]


def rounded(c: Candidate, rank: list[int], multiple: int) -> list[int]:
    """``rank`` rounded up to a multiple of ``multiple`` (capped at the full rank)."""
    full = c.full_rank() if c.kind != "cp" else [max(rank[0], 1)]
    return [min(-(-r // multiple) * multiple, max(f, r)) for r, f in zip(rank, full, strict=True)]


def curve(c: Candidate, *, iters: int = 25, points: int = 24,
          round_to: int = 1) -> list[tuple[list[int], float]]:  # fmt: skip
    """``(rank, relative squared error)`` options of ``c`` below its break-even rank: every rank
    (multiple of ``round_to``) for svd (exact, from the singular values), a grid for tucker (HOSVD)
    and cp (short ALS)."""
    top = break_even(c)
    if top < 1:
        return []
    if c.kind == "svd":
        err = tail_error2(c.singular_values(0))
        return [([r], float(err[r])) for r in range(round_to, top + 1, round_to)]
    grid = sorted({max(1, round(top * (j / points) ** 1.5)) for j in range(1, points + 1)})
    orig = c.cost(None)[0]
    if c.kind == "cp":
        grid = grid[:: max(1, len(grid) // 8)]  # ALS is the cost here: about 8 points
        ranks = sorted({rounded(c, [r], round_to)[0] for r in grid})
        return [([r], c.cp_error2(r, iters)) for r in ranks if c.cost([r])[0] < orig]
    table = tucker_curve(c.weight())  # (r_out, r_in) -> error, clamped to the basis sizes
    pairs = {tuple(rounded(c, _tied(c, r), round_to)) for r in grid}
    return [
        ([r_out, r_in], float(table[min(r_out, table.shape[0]) - 1, min(r_in, table.shape[1]) - 1]))
        for r_out, r_in in sorted(pairs)
        if c.cost([r_out, r_in])[0] < orig
    ]


def allocate(
    cands: list[Candidate],
    options: dict[str, list[tuple[list[int], float]]],
    budget: float,
    key: str,
) -> tuple[dict[str, list[int] | None], float, float]:
    """Ranks that bring the total cost (``key``: ``params`` or ``macs``) of ``cands`` to at most
    ``budget`` times the original, by the greedy hull walk. Returns ``(name -> rank or None,
    original total, reached total)``."""
    idx = 0 if key == "params" else 1

    def cost(c: Candidate, rank: list[int] | None) -> float:
        return float(c.cost(rank)[idx] or 0)

    hulls: dict[str, list[tuple[float, float, list[int] | None]]] = {}
    for c in cands:
        pts: list[tuple[float, float, list[int] | None]] = [(cost(c, None), 0.0, None)]
        pts += [(cost(c, r), e, r) for r, e in options[c.name]]
        hulls[c.name] = _lower_hull(pts)
    total = sum(h[0][0] for h in hulls.values())
    target = budget * total
    at = {name: 0 for name in hulls}
    heap: list[tuple[float, int, str]] = []
    order = {c.name: n for n, c in enumerate(cands)}

    def push(name: str) -> None:
        h, j = hulls[name], at[name]
        if j + 1 < len(h):
            saved = h[j][0] - h[j + 1][0]
            heapq.heappush(heap, ((h[j + 1][1] - h[j][1]) / max(saved, 1e-12), order[name], name))

    for name in hulls:
        push(name)
    reached = total
    while reached > target and heap:
        _, _, name = heapq.heappop(heap)
        h, j = hulls[name], at[name]
        reached -= h[j][0] - h[j + 1][0]
        at[name] = j + 1
        push(name)
    return {name: hulls[name][j][2] for name, j in at.items()}, total, reached


def _lower_hull(
    pts: list[tuple[float, float, list[int] | None]],
) -> list[tuple[float, float, list[int] | None]]:
    """The lower convex hull of (cost, error) points from the highest cost down: the options a
    greedy walk visits, each step costing more error per saved unit than the one before."""
    pts = sorted(pts, key=lambda p: (-p[0], p[1]))
    hull: list[tuple[float, float, list[int] | None]] = []
    for p in pts:
        if hull and p[0] == hull[-1][0]:
            continue  # the same cost at no less error
        while len(hull) >= 2:
            (x1, y1, _), (x2, y2, _) = hull[-2], hull[-1]
            # keep convex: the slope from hull[-2] to p must exceed the one to hull[-1]
            if (y2 - y1) * (x1 - p[0]) >= (p[1] - y1) * (x1 - x2):
                hull.pop()
            else:
                break
        hull.append(p)
    return hull
