"""Response distillation losses that fit what the model returns, and the rule that picks one.

A teacher's output is compared with the student's tensor by tensor (a tuple, dict or
``ModelOutput`` is walked the same way for both). Each tensor gets a loss for its kind:

- ``softmax``: class logits (or a probability row summing to 1): KL between the temperature-
  softened distributions, scaled by T^2 (Hinton et al., 2015). Language-model logits (B, T, V) are
  the same, token by token.
- ``sigmoid``: independent probabilities per unit (multi-label): per-unit binary KL between the
  teacher's and the student's probabilities (a sigmoid is applied first where the model returns
  logits).
- ``peaked``: sigmoid units of which only a few are active (heat-maps over bins, keypoints, rare
  tags). Per-unit BCE averaged over hundreds of mostly-zero units is minimised by predicting zero
  everywhere, so this kind uses the KL between the unit distributions (each row normalised to sum
  to 1), which only the active units' *shape* can lower, plus a positive-weighted binary KL that
  keeps the absolute level.
- ``regression``: values (embeddings, boxes, per-frame regressions): mean squared error, scaled by
  the teacher's variance so that the loss does not depend on the output's units.
- ``cosine``: 1 - cosine similarity along the last axis (embeddings whose norm is meaningless).

``detect_kinds`` decides from the teacher's outputs and the data's targets; every decision is
recorded with its reason in the result's report.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F

from slimkit.core.data import flatten_output
from slimkit.errors import ConfigError

Kind = Literal["softmax", "sigmoid", "peaked", "regression", "cosine"]
KINDS: tuple[str, ...] = ("softmax", "sigmoid", "peaked", "regression", "cosine")
EPS = 1e-6


@dataclass
class Decision:
    """The loss chosen for one output tensor, and why."""

    name: str
    kind: str
    reason: str
    logits: bool = False  # sigmoid / peaked kinds: the model returns logits, not probabilities

    def to_dict(self) -> dict[str, Any]:
        return {"output": self.name, "kind": self.kind, "reason": self.reason,
                "logits": self.logits}  # fmt: skip


def _is_index_target(y: Any, out: torch.Tensor) -> bool:
    return (
        isinstance(y, torch.Tensor)
        and not y.is_floating_point()
        and y.numel() * out.shape[-1] == out.numel()
    )


def detect(name: str, out: torch.Tensor, target: Any = None) -> Decision:
    """The loss kind for the teacher output ``out`` (a few batches concatenated), given the
    data's ``target`` for it when the data has one."""
    o = out.detach().float()
    units = o.shape[-1] if o.dim() >= 2 else 1
    lo, hi = float(o.min()), float(o.max())
    bounded = lo >= -EPS and hi <= 1 + EPS
    if target is not None and _is_index_target(target, o):
        return Decision(name, "softmax", "integer class targets with one index per row")
    binary_target = (
        isinstance(target, torch.Tensor)
        and target.shape == o.shape
        and bool(((target == 0) | (target == 1)).all())
    )
    if units > 1 and bounded and bool(torch.allclose(o.sum(-1), torch.ones(()), atol=1e-3)):
        return Decision(name, "softmax", "rows of probabilities summing to 1")
    if units > 1 and (bounded or binary_target):
        probs = o if bounded else torch.sigmoid(o)
        active = float((probs > 0.5).float().mean())
        mean = float(probs.mean())
        how = "probabilities in [0, 1]" if bounded else "logits with 0/1 targets"
        if units >= 16 and (active <= 0.1 and mean <= 0.15):
            return Decision(
                name, "peaked", f"{how}, few units active ({active:.1%} above 0.5, mean "
                f"{mean:.3f}, {units} units): plain per-unit BCE would collapse to zero",
                logits=not bounded,
            )  # fmt: skip
        return Decision(name, "sigmoid", f"{how}, {active:.0%} of units active",
                        logits=not bounded)  # fmt: skip
    if target is not None and isinstance(target, torch.Tensor) and target.is_floating_point():
        return Decision(name, "regression", "floating targets of the output's shape")
    if o.dim() >= 3 and units >= 64 and target is None:
        return Decision(name, "softmax", f"scores over {units} classes per position, no "
                        "targets: token-level logits")  # fmt: skip
    if target is None:
        # unbounded values without labels: regression outputs, embeddings, or class logits;
        # matching them by MSE is right for all three (logit matching, Ba & Caruana 2014)
        return Decision(name, "regression", "unbounded values, no targets (for class logits "
                        "pass loss='softmax' or data with labels to use softened KL)")  # fmt: skip
    return Decision(name, "regression", "a value per sample")


def _per_row(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, t.shape[-1]) if t.dim() >= 2 else t.reshape(-1, 1)


def kind_loss(
    kind: str, student: torch.Tensor, teacher: torch.Tensor, *, temperature: float, logits: bool
) -> torch.Tensor:
    """The distillation loss of one output tensor (a scalar, mean over samples)."""
    s, t = _per_row(student.float()), _per_row(teacher.detach().float())
    if s.shape != t.shape:
        raise ConfigError(
            f"the student's output {tuple(student.shape)} and the teacher's "
            f"{tuple(teacher.shape)} differ in shape",
            fix="distil a student with the teacher's output layout, or add feature distillation "
            "with an adapter and loss='regression' on a shared head",
        )
    if kind == "softmax":
        is_prob = bool((t >= 0).all()) and bool(torch.allclose(t.sum(-1), torch.ones(())))
        tt = torch.log(t.clamp_min(EPS)) if is_prob else t
        ss = torch.log(s.clamp_min(EPS)) if is_prob else s
        return (
            F.kl_div(
                F.log_softmax(ss / temperature, -1),
                F.log_softmax(tt / temperature, -1),
                log_target=True,
                reduction="batchmean",
            )
            * temperature**2
        )
    if kind in ("sigmoid", "peaked"):
        ps = torch.sigmoid(s) if logits else s.clamp(EPS, 1 - EPS)
        pt = torch.sigmoid(t) if logits else t.clamp(EPS, 1 - EPS)
        bce = F.binary_cross_entropy(ps, pt, reduction="none") - F.binary_cross_entropy(
            pt, pt, reduction="none"
        )  # binary KL(t || s) per unit: 0 where the student matches
        if kind == "sigmoid":
            return bce.mean()
        # peaked: the distribution over units, plus BCE weighted to the active units
        ds, dt = ps / ps.sum(-1, keepdim=True), pt / pt.sum(-1, keepdim=True)
        kl = (dt * (torch.log(dt.clamp_min(EPS)) - torch.log(ds.clamp_min(EPS)))).sum(-1).mean()
        weight = 1.0 + pt * (pt.shape[-1] / pt.sum(-1, keepdim=True).clamp_min(EPS))
        return kl + (bce * weight).mean()
    if kind == "regression":
        return F.mse_loss(s, t) / t.var().clamp_min(EPS)
    if kind == "cosine":
        return (1 - F.cosine_similarity(s, t, dim=-1)).mean()
    raise ConfigError(f"unknown distillation loss {kind!r}", fix=f"use one of {', '.join(KINDS)}")


def response_loss(
    student_out: Any, teacher_out: Any, decisions: Sequence[Decision], *, temperature: float
) -> torch.Tensor:
    """The sum of the per-tensor losses of two outputs of the same structure."""
    s_flat, t_flat = dict(flatten_output(student_out)), dict(flatten_output(teacher_out))
    total = torch.zeros(())
    for d in decisions:
        if d.name not in s_flat:
            raise ConfigError(
                f"the student returns no output {d.name!r} (it returns {sorted(s_flat)})",
                fix="distil a student whose forward returns what the teacher's returns",
            )
        total = total + kind_loss(d.kind, s_flat[d.name], t_flat[d.name],
                                  temperature=temperature, logits=d.logits)  # fmt: skip
    return total


def task_loss(out: torch.Tensor, target: torch.Tensor, decision: Decision) -> torch.Tensor:
    """The loss on the data's own targets, for the kind of the output."""
    if decision.kind == "softmax":
        return F.cross_entropy(_per_row(out), target.reshape(-1).long())
    if decision.kind in ("sigmoid", "peaked"):
        t = target.float().reshape(out.shape)
        weight = None
        if decision.kind == "peaked":  # the few active units weigh as much as all the others
            rows = _per_row(t)
            weight = 1.0 + rows * (rows.shape[-1] / rows.sum(-1, keepdim=True).clamp_min(1))
            weight = weight.reshape(out.shape)
        if decision.logits:
            return F.binary_cross_entropy_with_logits(out, t, weight=weight)
        return F.binary_cross_entropy(out.clamp(EPS, 1 - EPS), t, weight=weight)
    return F.mse_loss(out, target.float().reshape(out.shape))
