"""Calibrate and replace Linear layers one at a time, in the order the forward calls them.

Each pass runs the model (already-quantized predecessors included, so a layer is solved against
the inputs it will really see) on the calibration batches with a hook on the next pending layer,
which accumulates ``X^T X`` and ``sum |x|`` of its input: the Hessian that GPTQ and AWQ's output
error need, and whose diagonal is the E[x^2] of the range search. Memory stays at one layer's
statistics (K x K). Layers that take the very same input tensor (q / k / v projections after one
LayerNorm) are solved together from the same pass, which also notes the normalisation layer whose
output they take (AWQ folds its input scaling there); the forward stops as soon as it reaches a
layer after them (unless some layer runs twice per forward), so pass i costs about i / L of a
forward.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from slimkit.core.data import Batch
from slimkit.core.scope import set_submodule


class _Stop(Exception):
    """Raised by a hook to end a forward that has computed all a pass needs."""


@dataclass
class InputStats:
    """Statistics of a layer's input rows x (K,): ``xtx = sum x x^T``, ``abs_sum = sum |x|``."""

    xtx: torch.Tensor
    abs_sum: torch.Tensor
    rows: int = 0

    @classmethod
    def empty(cls, k: int) -> InputStats:
        return cls(torch.zeros(k, k, dtype=torch.float64), torch.zeros(k, dtype=torch.float64))

    def add(self, x: torch.Tensor) -> None:
        x2 = x.detach().reshape(-1, x.shape[-1]).to(torch.float64)  # (rows, K)
        self.xtx += x2.T @ x2
        self.abs_sum += x2.abs().sum(0)
        self.rows += x2.shape[0]

    def hessian(self) -> torch.Tensor:
        """E[x x^T] (K, K), float32."""
        return (self.xtx / max(self.rows, 1)).float()

    def sq_mean(self) -> torch.Tensor:
        """E[x^2] per input channel (K,)."""
        return (torch.diagonal(self.xtx) / max(self.rows, 1)).float()

    def abs_mean(self) -> torch.Tensor:
        """E[|x|] per input channel (K,)."""
        return (self.abs_sum / max(self.rows, 1)).float()


# solve(group, stats, producer) -> the new modules: a group of Linear layers that take the same
# input, its statistics (None: no data reached it), and the norm layer that made that input
Solve = Callable[[list[tuple[str, nn.Linear]], InputStats | None, str | None], list[nn.Module]]
# fold(model, producer, names) -> an undo, or None when there is nothing to fold
Fold = Callable[[nn.Module, str, list[str]], Callable[[], None] | None]


@dataclass
class LayerwiseReport:
    order: list[str] = field(default_factory=list)  # layers in forward order, as solved
    passes: int = 0
    not_called: list[str] = field(default_factory=list)  # never ran on the data: no statistics
    folded: dict[str, list[str]] = field(default_factory=dict)  # norm -> layers folded into it


def forward_order(model: nn.Module, names: Sequence[str], batch: Batch) -> tuple[list[str], bool]:
    """``names`` in the order the forward first calls them (layers never called are left out),
    and whether each ran exactly once (then a pass may stop early)."""
    calls: list[str] = []
    handles = [
        model.get_submodule(n).register_forward_pre_hook(lambda _m, _a, n=n: calls.append(n))
        for n in names
    ]
    _run_hooked(model, batch, handles)
    order = list(dict.fromkeys(calls))
    return order, len(order) == len(calls)


def _run_hooked(model: nn.Module, batch: Batch, handles: list[Any]) -> None:
    """One no-grad forward of ``batch`` with the hooks ``handles``, removed afterwards."""
    try:
        with torch.no_grad():
            batch.run(model)
    finally:
        for h in handles:
            h.remove()


def _is_norm(m: nn.Module) -> bool:
    """A normalisation layer with a per-channel scale (LayerNorm, RMSNorm, HF's *RMSNorm)."""
    w = getattr(m, "weight", None)
    return "Norm" in type(m).__name__ and isinstance(w, torch.Tensor) and w.dim() == 1


def _pass(
    model: nn.Module, target: str, pending: Sequence[str], batches: Sequence[Batch], early: bool
) -> tuple[list[str], InputStats, str | None]:
    """One calibration pass for ``target``: its input statistics, the pending layers that take
    the same input tensor, and the norm layer that produced it (both found on the first batch)."""
    layer = model.get_submodule(target)
    assert isinstance(layer, nn.Linear)
    stats = InputStats.empty(layer.weight.shape[1])
    group = [target]
    state: dict[str, Any] = {"x": None, "first": True, "norm_out": {}, "producer": None}

    def norm_hook(name: str) -> Callable[..., None]:
        def fn(_m: nn.Module, _args: tuple[Any, ...], out: Any) -> None:
            if state["first"] and isinstance(out, torch.Tensor):
                state["norm_out"][name] = out

        return fn

    def hook(name: str) -> Callable[..., None]:
        def fn(_m: nn.Module, args: tuple[Any, ...]) -> None:
            x = args[0] if args else None
            if name == target:
                stats.add(x)  # type: ignore[arg-type]
                state["x"] = x
                if state["first"]:
                    made = [n for n, t in state["norm_out"].items() if t is x]
                    state["producer"] = made[-1] if made else None
            elif state["x"] is not None:
                if x is state["x"]:
                    if state["first"] and name not in group:
                        group.append(name)
                elif early:
                    raise _Stop

        return fn

    handles = [model.get_submodule(n).register_forward_pre_hook(hook(n)) for n in pending]
    handles += [m.register_forward_hook(norm_hook(n)) for n, m in model.named_modules()
                if _is_norm(m)]  # fmt: skip
    try:
        with torch.no_grad():
            for b in batches:
                state["x"] = None
                with contextlib.suppress(_Stop):
                    b.run(model)
                state["first"] = False
                state["norm_out"] = {}
    finally:
        for h in handles:
            h.remove()
    return group, stats, state["producer"]


def _leaf_outputs(model: nn.Module, b: Batch, skip: str) -> dict[str, torch.Tensor]:
    """The float output of every leaf module (but ``skip``) on batch ``b``."""
    outs: dict[str, torch.Tensor] = {}

    def hook(name: str) -> Callable[..., None]:
        def fn(_m: nn.Module, _a: Any, out: Any) -> None:
            if isinstance(out, torch.Tensor) and out.is_floating_point():
                outs.setdefault(name, out.detach().clone())

        return fn

    handles = [m.register_forward_hook(hook(n)) for n, m in model.named_modules()
               if n != skip and next(m.children(), None) is None]  # fmt: skip
    _run_hooked(model, b, handles)
    return outs


def _try_fold(model: nn.Module, producer: str, names: list[str], fold: Fold, batch: Batch) -> bool:
    """Fold, and keep the fold only if every other layer computes the same on ``batch``: the
    norm's output may feed more than these layers (a float layer out of scope, a functional op),
    which no hook on the norm can see. 0.1 % per layer leaves room for an int8 rounding step."""
    before = _leaf_outputs(model, batch, producer)
    undo = fold(model, producer, names)
    if undo is None:
        return False
    after = _leaf_outputs(model, batch, producer)
    same = before.keys() == after.keys() and all(
        a.shape == after[n].shape and float((a - after[n]).norm()) <= 1e-3 * float(a.norm()) + 1e-6
        for n, a in before.items()
    )
    if not same:
        undo()
    return same


def quantize_layerwise(
    model: nn.Module,
    names: Sequence[str],
    batches: Sequence[Batch] | None,
    solve: Solve,
    *,
    fold: Fold | None = None,
    progress: bool = False,
) -> LayerwiseReport:
    """Replace the Linear layers ``names`` (in place, in ``model``) by what ``solve(group, stats,
    producer)`` returns. With ``batches`` the layers are solved in forward order, grouped by
    shared input, on the statistics of their inputs (predecessors already replaced); without, or
    for layers the data never reaches, one by one with ``stats`` None. ``fold(model, producer,
    names)`` then moves what it can into the producing norm layer (kept if outputs agree)."""
    rep = LayerwiseReport()
    pending: list[str] = list(names)
    early = False
    if batches:
        order, early = forward_order(model, names, batches[0])
        rep.not_called = [n for n in names if n not in order]
        pending = order
    bar = _bar(progress, len(names))
    while batches and pending:
        group, stats, producer = _pass(model, pending[0], pending, batches, early)
        rep.passes += 1
        _replace(model, group, solve, stats, producer, rep, bar)
        if producer and fold and _try_fold(model, producer, group, fold, batches[0]):
            rep.folded[producer] = group
        pending = [p for p in pending if p not in group]
    for name in rep.not_called if batches else names:
        _replace(model, [name], solve, None, None, rep, bar)
    bar(None)
    return rep


def _replace(model: nn.Module, group: list[str], solve: Solve, stats: InputStats | None,
             producer: str | None, rep: LayerwiseReport,
             bar: Callable[[str | None], None]) -> None:  # fmt: skip
    layers = [(n, model.get_submodule(n)) for n in group]
    for name, new in zip(group, solve(layers, stats, producer), strict=True):  # type: ignore[arg-type]
        set_submodule(model, name, new)
        rep.order.append(name)
        bar(name)


def _bar(enabled: bool, total: int) -> Callable[[str | None], None]:
    """A rich progress bar over the layers (a no-op when disabled or not on a terminal)."""
    if not enabled:
        return lambda _n: None
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    p = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                 transient=True)  # fmt: skip
    task = p.add_task("quantizing layers", total=total)
    p.start()

    def step(name: str | None) -> None:
        if name is None:
            p.stop()
        else:
            p.update(task, advance=1, description=f"quantizing {name}")

    return step
