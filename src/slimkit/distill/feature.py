"""Feature and relation distillation: intermediate layers paired between teacher and student.

Feature (hint) distillation (Romero et al., "FitNets", 2015): the student's intermediate features
are mapped by a learned adapter (a 1x1 convolution or a Linear over the channel axis, where widths
differ) onto the teacher's, and the mean squared error is minimised. Layers are paired
automatically by relative depth and shape (the i-th of ``n`` evenly spaced student layers with the
teacher layer at the same fraction of its depth whose output has the same sample shape up to the
channel axis); ``pairs={"student.layer": "teacher.layer"}`` overrides it.

Relation distillation (Park et al., "Relational Knowledge Distillation", 2019): the student keeps
the teacher's *relations between samples* of a batch, the pairwise distances (normalised by their
mean) and the angles formed by triplets, on embeddings (the input of the last Linear layer unless
a layer is named). ``contrastive`` is an InfoNCE variant: each student embedding, projected to
the teacher's width, must pick its own teacher embedding out of the batch.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from slimkit.errors import ConfigError

EPS = 1e-6


def trace_features(model: nn.Module, run: Any) -> list[tuple[str, tuple[int, ...]]]:
    """``(module name, output shape)`` of every submodule whose output is one float tensor of rank
    >= 2, in execution order; a module returning the same tensor as one before it is skipped."""
    seen: list[tuple[str, tuple[int, ...]]] = []
    ids: set[int] = set()
    alive: list[torch.Tensor] = []  # (ids are only unique while the tensors live)
    hooks = []

    def hook(name: str) -> Any:
        def fn(_m: nn.Module, _i: Any, out: Any) -> None:
            tensor = isinstance(out, torch.Tensor) and out.is_floating_point()
            if tensor and out.dim() >= 2 and id(out) not in ids:
                ids.add(id(out))
                alive.append(out)
                seen.append((name, tuple(out.shape)))

        return fn

    for name, m in model.named_modules():
        if name and not isinstance(m, (nn.Dropout, nn.Identity)):
            hooks.append(m.register_forward_hook(hook(name)))
    try:
        with torch.no_grad():
            run(model)
    finally:
        for h in hooks:
            h.remove()
    return seen


def _compatible(s: tuple[int, ...], t: tuple[int, ...]) -> bool:
    """Same rank and the same sizes except at most one axis (the channel axis)."""
    return len(s) == len(t) and sum(a != b for a, b in zip(s[1:], t[1:], strict=True)) <= 1


def pair_layers(
    student: list[tuple[str, tuple[int, ...]]],
    teacher: list[tuple[str, tuple[int, ...]]],
    n: int,
) -> list[tuple[str, str]]:
    """``n`` (student layer, teacher layer) pairs at matching relative depths (the final output
    is left to response distillation)."""
    s_body, t_body = student[:-1], teacher[:-1]
    if not s_body or not t_body:
        return []
    pairs: list[tuple[str, str]] = []
    for i in range(1, n + 1):
        frac = i / (n + 1)
        s_name, s_shape = s_body[min(int(frac * len(s_body)), len(s_body) - 1)]
        options = [(abs(j / len(t_body) - frac), name) for j, (name, shape) in enumerate(t_body)
                   if _compatible(s_shape, shape)]  # fmt: skip
        if options and s_name not in {p[0] for p in pairs}:
            pairs.append((s_name, min(options)[1]))
    return pairs


def _channel_axis(s: tuple[int, ...], t: tuple[int, ...]) -> int | None:
    diff = [i for i, (a, b) in enumerate(zip(s, t, strict=True)) if a != b and i > 0]
    return diff[0] if diff else None


class Adapter(nn.Module):
    """Maps a student feature onto the teacher's width along ``axis`` (identity where equal)."""

    def __init__(self, s_shape: tuple[int, ...], t_shape: tuple[int, ...]) -> None:
        super().__init__()
        axis = _channel_axis(s_shape, t_shape)
        self.axis = -1 if axis is None else axis
        c_in = s_shape[self.axis]
        c_out = t_shape[self.axis]
        self.proj = nn.Linear(c_in, c_out, bias=False) if axis is not None else nn.Identity()
        if isinstance(self.proj, nn.Linear):
            nn.init.orthogonal_(self.proj.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if isinstance(self.proj, nn.Identity):
            return x
        return self.proj(x.movedim(self.axis, -1)).movedim(-1, self.axis)


def hint_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """MSE normalised by the teacher feature's variance (scale-free across layers)."""
    t = teacher.detach().float()
    return F.mse_loss(student.float(), t) / t.var().clamp_min(EPS)


@contextmanager
def capture(model: nn.Module, names: Sequence[str], *, inputs: bool = False) -> Iterator[dict]:
    """Collect the outputs (or first inputs) of the named submodules during forward passes."""
    if not names:
        yield {}
        return
    mods = dict(model.named_modules())
    missing = [n for n in names if n not in mods]
    if missing:
        raise ConfigError(
            f"no layer named {missing} in {type(model).__name__}",
            fix=f"use names of model.named_modules(), e.g. {[n for n in mods if n][:6]}",
        )
    got: dict[str, torch.Tensor] = {}
    hooks = []
    for n in names:

        def fn(_m: nn.Module, i: Any, o: Any, n: str = n) -> None:
            got[n] = i[0] if inputs else o

        hooks.append(mods[n].register_forward_hook(fn))
    try:
        yield got
    finally:
        for h in hooks:
            h.remove()


def last_linear(model: nn.Module) -> str:
    """The name of the last Linear layer (its input is the embedding relations are taken on)."""
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not names:
        raise ConfigError(
            f"{type(model).__name__} has no Linear layer to take embeddings from",
            fix="name the layer whose output is the embedding: Relation(layer='...')",
        )
    return names[-1]


def _pdist(e: torch.Tensor) -> torch.Tensor:
    d = torch.cdist(e, e)
    mean = d[d > 0].mean() if bool((d > 0).any()) else d.new_ones(())
    return d / mean.clamp_min(EPS)


def _angles(e: torch.Tensor) -> torch.Tensor:
    diff = F.normalize(e.unsqueeze(0) - e.unsqueeze(1), p=2, dim=-1)  # (B, B, D)
    return torch.bmm(diff, diff.transpose(1, 2)).reshape(-1)  # cos of every angle (B^3)


def rkd_loss(
    student: torch.Tensor, teacher: torch.Tensor, *, distance: float, angle: float
) -> torch.Tensor:
    """RKD: distance and angle relations within the batch (embeddings flattened per sample)."""
    s, t = student.flatten(1).float(), teacher.detach().flatten(1).float()
    loss = s.new_zeros(())
    if distance:
        loss = loss + distance * F.smooth_l1_loss(_pdist(s), _pdist(t))
    if angle and s.shape[0] > 2:
        loss = loss + angle * F.smooth_l1_loss(_angles(s), _angles(t))
    return loss


def contrastive_loss(
    student: torch.Tensor, teacher: torch.Tensor, proj: nn.Module, *, tau: float = 0.1
) -> torch.Tensor:
    """InfoNCE: the projected student embedding must match its own teacher embedding."""
    s = F.normalize(proj(student.flatten(1).float()), dim=-1)
    t = F.normalize(teacher.detach().flatten(1).float(), dim=-1)
    logits = s @ t.T / tau
    return F.cross_entropy(logits, torch.arange(len(s), device=s.device))
