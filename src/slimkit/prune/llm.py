"""One-shot sparsity for language models: SparseGPT and Wanda, unstructured or N:M (2:4).

Both visit the Linear layers in forward order, one calibration pass per layer (or per group of
layers that take the same input, q / k / v), each pass through the layers already pruned, so a
layer is pruned against the inputs it will really see and memory stays at one layer's statistics
(``X^T X``, K x K). The layer-by-layer driver is the one quantization uses (``core/layerwise.py``):

- **Wanda** (Sun et al., 2023, "A Simple and Effective Pruning Approach for Large Language
  Models"): score ``|W_ij| * ||X_j||_2``; the smallest scores of each output row are zeroed (of
  each group of M inputs, for N:M). Weights are not changed otherwise.
- **SparseGPT** (Frantar & Alistarh, 2023, "SparseGPT: Massive Language Models Can Be Accurately
  Pruned in One-Shot"): column by column, the weights with the smallest ``w^2 / [H^-1]_jj^2`` are
  zeroed (chosen per block of 128 columns, or per group of M for N:M) and each zeroed weight's
  error is spread over the columns not yet visited through the inverse Hessian ``H = E[x x^T]``
  (optimal brain surgeon, as GPTQ does for rounding).

The result keeps masks (``prune.unstructured.WeightMask``), so the zeros survive fine-tuning;
``finalize`` bakes them. ``save_sparse`` stores each masked weight as a bit mask plus its kept
values (about ``1/32 + (1 - sparsity)`` of the dense fp32 bytes). Speed: dense CPU kernels
multiply the zeros, so a sparse model is not faster there; 2:4 runs faster only where a
semi-structured sparse kernel exists (NVIDIA Ampere and later).

    s = sk.prune(model, sk.prune.SparseGPT(sparsity=0.5), data=calib)
    s = sk.prune(model, sk.prune.Wanda(n=2, m=4), data=calib)        # 2:4
    s = sk.prune(model, "sparsegpt-2:4", data=calib, scope=sk.Scope(exclude=["lm_head"]))

YAML: ``- prune.sparsegpt: {sparsity: 0.5}``, ``- prune.wanda: {n: 2, m: 4}``. Supports
``nn.Linear`` and Hugging Face ``Conv1D`` (replaced by the equal Linear); weights tied to an
embedding (a tied LM head) are left dense; N:M skips layers whose input width is not a multiple
of M.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from pydantic import Field, model_validator
from torch import nn

from slimkit.core.config import Config
from slimkit.core.data import collect_batches, merge_batches

# the layer-by-layer calibration driver is shared with GPTQ / AWQ (it lives in quant/)
from slimkit.core.layerwise import InputStats, quantize_layerwise
from slimkit.core.rebuild import linearize_conv1d
from slimkit.core.registry import METHODS
from slimkit.core.scope import Scope
from slimkit.errors import ConfigError
from slimkit.prune.channel import set_record
from slimkit.prune.unstructured import _attach


class _OneShot(Config):
    sparsity: float = Field(0.5, ge=0.0, lt=1.0)  # fraction of each layer's weights zeroed
    n: int = Field(
        0, ge=0
    )  # N:M when n > 0: keep n of every m consecutive inputs (sparsity unused)
    m: int = Field(4, ge=2)
    num_batches: int = Field(8, ge=1)  # calibration batches read

    @model_validator(mode="after")
    def _n_below_m(self) -> _OneShot:
        if self.n >= self.m:
            raise ValueError(f"n={self.n} must be smaller than m={self.m} (2:4 is n=2, m=4)")
        return self

    def fraction(self) -> float:
        """The fraction of weights each pruned layer loses."""
        return 1 - self.n / self.m if self.n else self.sparsity


class Wanda(_OneShot):
    """Zero the weights of smallest ``|W| * ||X||`` per output row (N:M: per group of m)."""


class SparseGPT(_OneShot):
    """Zero weights column by column, compensating in the remaining columns (inverse Hessian)."""

    damp: float = Field(0.01, gt=0.0)  # added to H's diagonal, times its mean, for Cholesky
    block: int = Field(128, ge=1)  # columns per lazy update (mask chosen per block)


# --- the solvers: weight (N, K) and input statistics -> pruned weight and its mask ---------------


def wanda_mask(w: torch.Tensor, x_norm: torch.Tensor, cfg: _OneShot) -> torch.Tensor:
    """Keep-mask (N, K) of Wanda for ``w`` given the per-input norms ``||X_j||`` (K,)."""
    score = w.detach().abs().float() * x_norm[None, :]
    mask = torch.ones_like(score)
    if cfg.n:
        groups = score.reshape(-1, cfg.m)  # (N * K / m, m): m consecutive inputs of one row
        drop = groups.topk(cfg.m - cfg.n, dim=1, largest=False).indices
        return mask.reshape(-1, cfg.m).scatter_(1, drop, 0.0).reshape(score.shape)
    k = int(cfg.sparsity * score.shape[1])
    if k:
        mask.scatter_(1, score.topk(k, dim=1, largest=False).indices, 0.0)
    return mask


def sparsegpt_prune(
    w: torch.Tensor, h: torch.Tensor, cfg: SparseGPT
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(pruned weight (N, K), keep-mask (N, K))`` for ``w`` given ``h = E[x x^T]`` (K, K)."""
    w = w.detach().float().clone()
    n_out, k = w.shape
    h = h.detach().float().clone()
    dead = torch.diagonal(h) == 0  # inputs that were always zero: their weights do not matter
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    h += cfg.damp * torch.diagonal(h).mean() * torch.eye(k)
    # upper Cholesky factor of H^-1: row i holds the update of columns >= i once 0..i-1 are fixed
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    pruned = torch.zeros(n_out, k, dtype=torch.bool)
    step = cfg.block if not cfg.n else max(cfg.m, cfg.block // cfg.m * cfg.m)  # whole groups
    for i1 in range(0, k, step):
        i2 = min(i1 + step, k)
        w1 = w[:, i1:i2].clone()
        err1 = torch.zeros_like(w1)
        hinv1 = hinv[i1:i2, i1:i2]
        d = torch.diagonal(hinv1)
        drop1 = torch.zeros_like(w1, dtype=torch.bool)
        if not cfg.n:  # the block's smallest saliencies, over all its rows and columns
            sal = (w1**2 / d[None, :] ** 2).flatten()
            kk = int(cfg.sparsity * sal.numel())
            if kk:
                drop1.view(-1)[sal.topk(kk, largest=False).indices] = True
        for i in range(i2 - i1):
            if cfg.n and i % cfg.m == 0:  # choose this group's zeros from the updated weights
                sal = w1[:, i : i + cfg.m] ** 2 / d[None, i : i + cfg.m] ** 2
                idx = sal.topk(cfg.m - cfg.n, dim=1, largest=False).indices
                drop1[:, i : i + cfg.m].scatter_(1, idx, True)
            col = w1[:, i]
            q = torch.where(drop1[:, i], torch.zeros_like(col), col)
            e = (col - q) / hinv1[i, i]
            w1[:, i:] -= e[:, None] * hinv1[i, i:][None, :]
            w1[:, i] = q
            err1[:, i] = e
        w[:, i1:i2] = w1
        pruned[:, i1:i2] = drop1
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    w[pruned] = 0.0
    return w, (~pruned).float()


# --- the handlers ------------------------------------------------------------------------------


def _tied(model: nn.Module) -> set[int]:
    """ids of weights shared with an embedding (a tied LM head)."""
    return {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}


def _one_shot(
    model: nn.Module, cfg: _OneShot, data: Any, scope: Scope | None, method: str
) -> nn.Module:
    out = copy.deepcopy(model).eval()
    converted = linearize_conv1d(out)
    tied = _tied(out)
    chosen, skipped = [], {}
    for name, m in (scope or Scope()).select(out, (nn.Linear,)):
        assert isinstance(m, nn.Linear)
        if id(m.weight) in tied:
            skipped[name] = "weight tied to an embedding"
        elif cfg.n and m.in_features % cfg.m:
            skipped[name] = f"input width {m.in_features} is not a multiple of m={cfg.m}"
        else:
            chosen.append(name)
    if not chosen:
        raise ConfigError(
            f"{method}: no Linear layer in scope can be pruned ({skipped or 'none in scope'})",
            fix="widen the scope, or for N:M use an m that divides the layers' input widths",
        )
    batches = merge_batches(collect_batches(data, what="calibration data", limit=cfg.num_batches))
    unreached: list[str] = []

    def solve(
        group: list[tuple[str, nn.Linear]], stats: InputStats | None, _producer: str | None
    ) -> list[nn.Module]:
        for name, layer in group:
            w = layer.weight.detach()
            if stats is None:  # no data reached it: plain magnitude (H = identity)
                unreached.append(name)
                h = torch.eye(w.shape[1])
            else:
                h = stats.hessian()
            if isinstance(cfg, SparseGPT):
                new, mask = sparsegpt_prune(w, h, cfg)
            else:
                new, mask = w.float(), wanda_mask(w, torch.diagonal(h).clamp_min(0).sqrt(), cfg)
            with torch.no_grad():
                layer.weight.copy_((new * mask).to(w.dtype))
            _attach(layer, mask)
        return [layer for _, layer in group]

    rep = quantize_layerwise(out, chosen, batches, solve)
    record: dict[str, Any] = {
        "method": method,
        "config": cfg.to_dict(),
        "layers": rep.order,
        "sparsity": round(cfg.fraction(), 4),
        "calibration_passes": rep.passes,
    }
    if skipped:
        record["left_dense"] = "; ".join(f"{n} ({why})" for n, why in skipped.items())
    if unreached:
        record["not_reached"] = f"no calibration input reached {', '.join(unreached)} (magnitude)"
    if converted:
        record["conv1d_as_linear"] = converted
    set_record(out, record)
    return out.train(model.training)


@METHODS.register(
    "prune.wanda",
    config=Wanda,
    summary="one-shot LLM sparsity by |W| * ||X|| (unstructured or 2:4; masks)",
    aliases={"wanda-2:4": {"n": 2, "m": 4}},
    example={"sparsity": 0.5, "num_batches": 2},
)
def prune_wanda(
    model: nn.Module, config: Wanda | None = None, *, data: Any, scope: Scope | None = None
) -> nn.Module:
    """A copy of ``model`` whose Linear weights are Wanda-pruned on ``data`` (masks kept)."""
    return _one_shot(model, config or Wanda(), data, scope, "prune.wanda")


@METHODS.register(
    "prune.sparsegpt",
    config=SparseGPT,
    summary="one-shot LLM sparsity with inverse-Hessian weight updates (unstructured or 2:4)",
    aliases={"sparsegpt-2:4": {"n": 2, "m": 4}},
    example={"sparsity": 0.5, "num_batches": 2},
)
def prune_sparsegpt(
    model: nn.Module, config: SparseGPT | None = None, *, data: Any, scope: Scope | None = None
) -> nn.Module:
    """A copy of ``model`` whose Linear weights are SparseGPT-pruned and updated on ``data``."""
    return _one_shot(model, config or SparseGPT(), data, scope, "prune.sparsegpt")
