"""ThiNet: keep the channels from which the next layer's output is best reconstructed, then refit
that layer's weights by least squares (Luo et al., "ThiNet: A Filter Level Pruning Method for Deep
Neural Network Compression", ICCV 2017).

The next layer (a Conv or Linear reading the group's channels) computes ``y = sum_c z_c``, one
term per input channel. Removing the set T of channels changes y by ``sum_{c in T} z_c``; ThiNet
grows T greedily, each step adding the channel that keeps ``E||sum_{c in T} z_c||^2`` smallest.
All that the greedy search needs is the Gram matrix ``G_cd = E[z_c . z_d]``, which follows from
the layer's weights and the second moment ``A = E[u u^T]`` of its (unfolded) input ``u``: one
calibration pass for every group at once, memory one D x D matrix per reading layer (D = its
input width times its kernel taps; at most ``_ROWS`` sampled positions per batch). The order in
which channels join T is the ranking (first in, least important); groups read by several layers
add up their Gram matrices, each scaled to mean diagonal 1.

After the channels are removed, each reading layer is refit in forward order, on the pruned
model's own inputs (its predecessors already pruned and refit), to reproduce the dense layer's
output: ``W' = argmin E||y_dense - W' u'||^2``, a ridge-damped least-squares solve.

    small = sk.prune(model, sk.prune.Channel(ratio=0.5, criterion="thinet"),
                     example_inputs=(x,), data=calib)
    small = sk.prune(model, sk.prune.Target(macs=0.5, channel=sk.prune.Channel(ratio=0.0,
                     criterion="thinet")), example_inputs=(x,), data=calib)

Reading layers supported: ``nn.Linear`` and ungrouped ``nn.Conv1d`` / ``nn.Conv2d`` with zero
padding; a group read by none of them (only by a depthwise conv, an attention block) is ranked
by ``l1`` instead, and the record says which.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from slimkit.core.data import Batch
from slimkit.prune.depgraph import Group, Member

_ROWS = 1024  # positions (rows of the unfolded input) sampled per batch and layer
_DAMP = 1e-5  # ridge term of the refit, times the mean diagonal of the input moment


def reads_channels(m: nn.Module) -> bool:
    """Whether ThiNet can model ``m``'s output as a sum of per-input-channel terms."""
    if isinstance(m, nn.Linear):
        return True
    if isinstance(m, (nn.Conv1d, nn.Conv2d)):
        return m.groups == 1 and m.padding_mode == "zeros" and not isinstance(m.padding, str)
    return False


def unfold(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``m``'s input as rows (positions, D) with D ordered as ``m.weight.reshape(O, -1)``."""
    if isinstance(m, nn.Linear):
        return x.reshape(-1, x.shape[-1])
    assert isinstance(m, (nn.Conv1d, nn.Conv2d))
    if isinstance(m, nn.Conv1d):  # (N, C, T) -> (N, C, 1, T)
        x = x.unsqueeze(2)
        k, s, p, d = (1, *m.kernel_size), (1, *m.stride), (0, *m.padding), (1, *m.dilation)  # type: ignore[misc]
    else:
        k, s, p, d = m.kernel_size, m.stride, m.padding, m.dilation  # type: ignore[assignment]
    cols = F.unfold(x, k, dilation=d, padding=p, stride=s)  # (N, C * taps, L)
    return cols.transpose(1, 2).reshape(-1, cols.shape[1])


def output_rows(m: nn.Module, y: torch.Tensor) -> torch.Tensor:
    """``m``'s output (bias removed) as rows (positions, O), in the order of ``unfold``."""
    b = getattr(m, "bias", None)
    if isinstance(m, nn.Linear):
        rows = y.reshape(-1, y.shape[-1])
        return rows - b if b is not None else rows
    rows = y.flatten(2).transpose(1, 2).reshape(-1, y.shape[1])  # (N * L, O)
    return rows - b if b is not None else rows


def _weight(m: nn.Module) -> torch.Tensor:
    w = m.weight
    assert isinstance(w, torch.Tensor)
    return w.detach()


def _sample(n: int, gen: torch.Generator) -> torch.Tensor:
    return torch.randperm(n, generator=gen)[:_ROWS] if n > _ROWS else torch.arange(n)


class _Stop(Exception):
    """Raised by a hook once a forward has computed what the pass needs."""


def _run(model: nn.Module, batches: Sequence[Batch], hooks: list[Any]) -> None:
    try:
        with torch.no_grad():
            for b in batches:
                with contextlib.suppress(_Stop):
                    b.run(model)
    finally:
        for h in hooks:
            h.remove()


def input_moments(
    model: nn.Module, names: Sequence[str], batches: Sequence[Batch]
) -> dict[str, torch.Tensor]:
    """``E[u u^T]`` (D, D) of the unfolded input of each layer in ``names`` (one pass)."""
    acc: dict[str, list[Any]] = {}
    gen = torch.Generator().manual_seed(0)

    def hook(name: str) -> Callable[..., None]:
        def fn(m: nn.Module, args: tuple[Any, ...]) -> None:
            u = unfold(m, args[0].detach()).float()
            u = u[_sample(len(u), gen)]
            if name not in acc:
                acc[name] = [torch.zeros(u.shape[1], u.shape[1], dtype=torch.float64), 0]
            acc[name][0] += (u.T @ u).double()
            acc[name][1] += len(u)

        return fn

    _run(model, batches,
         [model.get_submodule(n).register_forward_pre_hook(hook(n)) for n in names])  # fmt: skip
    return {n: a / max(rows, 1) for n, (a, rows) in acc.items()}


def readers(model: nn.Module, g: Group) -> list[Member]:
    """The members of ``g`` that read its channels in a layer ThiNet can model."""
    return [m for m in g.members if m.role == "in" and m.param == "weight"
            and m.dim == 1 and reads_channels(model.get_submodule(m.module))]  # fmt: skip


def _unit_columns(model: nn.Module, members: list[Member], units: int) -> torch.Tensor:
    """(units, b): the columns of ``weight.reshape(O, -1)`` that each unit feeds, over all the
    members of one layer (a channels-last flatten gives a layer one member per position)."""
    w = getattr(model.get_submodule(members[0].module), members[0].param)
    taps = int(w[0, 0].numel())
    per_unit = [[p for m in members for p in m.positions([u])] for u in range(units)]
    return torch.tensor([[p * taps + t for p in ps for t in range(taps)] for ps in per_unit])


def gram(model: nn.Module, g: Group, moments: dict[str, torch.Tensor]) -> torch.Tensor | None:
    """``G_cd = E[z_c . z_d]`` over the group's readers (each scaled to mean diagonal 1)."""
    total = None
    by_layer: dict[str, list[Member]] = {}
    for m in readers(model, g):
        by_layer.setdefault(m.module, []).append(m)
    for name, members in by_layer.items():
        if name not in moments:
            continue
        w = _weight(model.get_submodule(name)).double()
        w = w.reshape(w.shape[0], -1)
        idx = _unit_columns(model, members, g.units)  # (U, b)
        wu = w[:, idx]  # (O, U, b)
        a = moments[name][idx][:, :, idx]  # (U, b, U, b)
        gm = torch.einsum("oub,ubvc,ovc->uv", wu, a, wu)
        gm = gm / torch.diagonal(gm).mean().clamp_min(1e-30)
        total = gm if total is None else total + gm
    return total


def greedy_order(g: torch.Tensor) -> list[int]:
    """Units in the order ThiNet removes them: each step the one whose contribution, added to
    those already removed, has the smallest energy ``||r + z_c||^2 - ||r||^2 = 2 r.z_c + G_cc``."""
    n = g.shape[0]
    cross = torch.zeros(n, dtype=g.dtype)
    removed: list[int] = []
    free = torch.ones(n, dtype=torch.bool)
    for _ in range(n):
        cost = torch.where(free, 2 * cross + torch.diagonal(g), torch.inf)
        c = int(cost.argmin())
        removed.append(c)
        free[c] = False
        cross += g[c]
    return removed


def thinet_scores(
    model: nn.Module, groups: Sequence[Group], batches: Sequence[Batch]
) -> tuple[dict[int, torch.Tensor], list[str]]:
    """Scores per group (higher: more important; removal order reversed), and the groups that
    had no layer ThiNet can model (the caller ranks those by another criterion)."""
    names = sorted({m.module for g in groups for m in readers(model, g)})
    moments = input_moments(model, names, batches) if names else {}
    scores: dict[int, torch.Tensor] = {}
    fallback: list[str] = []
    for g in groups:
        gm = gram(model, g, moments)
        if gm is None:
            fallback.append(g.describe())
            continue
        s = torch.empty(g.units)
        s[torch.tensor(greedy_order(gm))] = torch.arange(g.units, dtype=torch.float32)
        scores[g.gid] = s
    return scores, fallback


def _forward_order(model: nn.Module, names: Sequence[str], batch: Batch) -> list[str]:
    calls: list[str] = []
    hooks = [model.get_submodule(n).register_forward_pre_hook(
        lambda _m, _a, n=n: calls.append(n)) for n in names]  # fmt: skip
    _run(model, [batch], hooks)
    return list(dict.fromkeys(calls))


def _cross_moments(
    dense: nn.Module,
    pruned: nn.Module,
    name: str,
    kept_out: list[int] | None,
    batches: Sequence[Batch],
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(sum u' u'^T, sum u' y^T)`` of layer ``name``: u' its unfolded input in ``pruned``, y the
    dense layer's output (bias removed; ``kept_out`` channels) at the same sampled positions."""
    dm, pm = dense.get_submodule(name), pruned.get_submodule(name)
    gen = torch.Generator().manual_seed(1)
    ys: list[torch.Tensor] = []
    stats: dict[str, torch.Tensor] = {}

    def grab_y(m: nn.Module, _a: Any, y: torch.Tensor) -> None:
        ys.append(output_rows(m, y.detach()))
        raise _Stop  # the rest of the dense forward is not needed

    def grab_u(m: nn.Module, args: tuple[Any, ...]) -> None:
        u = unfold(m, args[0].detach()).float()
        y = ys.pop(0).float()
        if kept_out is not None:
            y = y[:, kept_out]
        pick = _sample(len(u), gen)
        u, y = u[pick], y[pick]
        for key, v in (("a", u.T @ u), ("b", u.T @ y)):
            stats[key] = stats[key] + v.double() if key in stats else v.double()
        raise _Stop

    for b in batches:  # one batch at a time: the dense outputs are held only briefly
        _run(dense, [b], [dm.register_forward_hook(grab_y)])
        _run(pruned, [b], [pm.register_forward_pre_hook(grab_u)])
    return stats["a"], stats["b"]


def refit(
    dense: nn.Module,
    pruned: nn.Module,
    names: Sequence[str],
    kept_out: dict[str, list[int]],
    batches: Sequence[Batch],
) -> list[str]:
    """Refit the layers ``names`` of ``pruned`` (in place, in forward order) to reproduce the dense
    layers' outputs (only the output channels in ``kept_out[name]`` when given) by least squares
    on ``pruned``'s own inputs; returns the layers refit. Both models must be in eval mode."""
    done = []
    for name in _forward_order(pruned, names, batches[0]):
        pm = pruned.get_submodule(name)
        a, bm = _cross_moments(dense, pruned, name, kept_out.get(name), batches)
        ridge = _DAMP * torch.diagonal(a).mean().clamp_min(1e-12) * torch.eye(len(a), dtype=a.dtype)
        w = torch.linalg.solve(a + ridge, bm).T  # (O, D)
        weight = _weight(pm)
        now = weight.double().reshape(w.shape)
        # E||y - v u||^2 up to the constant E||y||^2; the ridge can make an exact layer worse
        err_new = float((w @ a * w).sum() - 2 * (w * bm.T).sum())
        err_now = float((now @ a * now).sum() - 2 * (now * bm.T).sum())
        if err_new < err_now:
            with torch.no_grad():
                weight.copy_(w.reshape(weight.shape).to(weight.dtype))
            done.append(name)
    return done
