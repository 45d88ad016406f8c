"""Calibrate and replace Linear layers one at a time, in the order the forward calls them.

Each pass runs the model (already-quantized predecessors included, so a layer is solved against
the inputs it will really see) on the calibration batches with a hook on the next pending layer,
which accumulates ``X^T X`` and ``sum |x|`` of its input: the Hessian that GPTQ and AWQ's output
error need, and whose diagonal is the E[x^2] of the range search. Memory stays at one layer's
statistics (K x K). Layers that take the very same input tensor (q / k / v projections after one
LayerNorm) are solved from the same pass; the forward stops as soon as it reaches a layer after
them (unless some layer runs twice per forward), so pass i costs about i / L of a forward.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from slimkit.core.data import Batch
from slimkit.quant.sim import _set_submodule


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


Solve = Callable[[str, nn.Linear, InputStats | None], nn.Module]


@dataclass
class LayerwiseReport:
    order: list[str] = field(default_factory=list)  # layers in forward order, as solved
    passes: int = 0
    not_called: list[str] = field(default_factory=list)  # never ran on the data: no statistics


def forward_order(model: nn.Module, names: Sequence[str], batch: Batch) -> tuple[list[str], bool]:
    """``names`` in the order the forward first calls them (layers never called are left out),
    and whether each ran exactly once (then a pass may stop early)."""
    calls: list[str] = []
    handles = [
        model.get_submodule(n).register_forward_pre_hook(lambda _m, _a, n=n: calls.append(n))
        for n in names
    ]
    try:
        with torch.no_grad():
            batch.run(model)
    finally:
        for h in handles:
            h.remove()
    order = list(dict.fromkeys(calls))
    return order, len(order) == len(calls)


def _pass(
    model: nn.Module, target: str, pending: Sequence[str], batches: Sequence[Batch], early: bool
) -> tuple[list[str], InputStats]:
    """One calibration pass for ``target``: its input statistics, and the pending layers that
    take the same input tensor (found on the first batch)."""
    layer = model.get_submodule(target)
    assert isinstance(layer, nn.Linear)
    stats = InputStats.empty(layer.weight.shape[1])
    group = [target]
    state: dict[str, Any] = {"x": None, "first": True}

    def hook(name: str) -> Callable[..., None]:
        def fn(_m: nn.Module, args: tuple[Any, ...]) -> None:
            x = args[0] if args else None
            if name == target:
                stats.add(x)  # type: ignore[arg-type]
                state["x"] = x
            elif state["x"] is not None:
                if x is state["x"]:
                    if state["first"] and name not in group:
                        group.append(name)
                elif early:
                    raise _Stop

        return fn

    handles = [model.get_submodule(n).register_forward_pre_hook(hook(n)) for n in pending]
    try:
        with torch.no_grad():
            for b in batches:
                state["x"] = None
                with contextlib.suppress(_Stop):
                    b.run(model)
                state["first"] = False
    finally:
        for h in handles:
            h.remove()
    return group, stats


def quantize_layerwise(
    model: nn.Module,
    names: Sequence[str],
    batches: Sequence[Batch] | None,
    solve: Solve,
    *,
    progress: bool = False,
) -> LayerwiseReport:
    """Replace each Linear in ``names`` (in place, in ``model``) by ``solve(name, layer, stats)``.
    With ``batches`` the layers are solved in forward order on the statistics of their inputs
    (predecessors already replaced); without, or for layers the data never reaches, ``stats`` is
    None."""
    rep = LayerwiseReport()
    pending: list[str] = list(names)
    early = False
    if batches:
        order, early = forward_order(model, names, batches[0])
        rep.not_called = [n for n in names if n not in order]
        pending = order
    bar = _bar(progress, len(names))
    while batches and pending:
        group, stats = _pass(model, pending[0], pending, batches, early)
        rep.passes += 1
        for name in group:
            layer = model.get_submodule(name)
            _set_submodule(model, name, solve(name, layer, stats))  # type: ignore[arg-type]
            rep.order.append(name)
            bar(name)
        pending = [p for p in pending if p not in group]
    for name in rep.not_called if batches else names:
        _set_submodule(model, name, solve(name, model.get_submodule(name), None))  # type: ignore[arg-type]
        rep.order.append(name)
        bar(name)
    bar(None)
    return rep


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
