"""Iterative pruning: remove channels in several steps with fine-tuning in between.

One-shot pruning removes every channel at once and then fine-tunes; the iterative schedule reaches
the same final widths in ``steps`` equal steps, re-ranking the channels on the fine-tuned model
before each step (Han et al., "Learning both Weights and Connections for Efficient Neural
Networks", NeurIPS 2015; Zhu & Gupta, "To prune, or not to prune", 2017). The final widths are those
one-shot pruning of the dense model would give, so both reach the same MACs and the comparison is
about the schedule only::

    small = prune_iterative(model, Channel(ratio=0.5), example_inputs=(x,),
                            train_loader=loader, steps=3, epochs_per_step=1, teacher=model)

With ``checkpoint_dir``, every finished step is saved as a pruning artifact (``step_K/``); a run
that was interrupted resumes after the last finished step. The result carries one pruning record
relative to the original model, so ``save_pruned`` / ``load_pruned`` work as for one-shot pruning.
"""

from __future__ import annotations

import copy
import shutil
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from slimkit.core.io import PathLike
from slimkit.core.scope import Scope
from slimkit.errors import ConfigError
from slimkit.prune.artifact import load_pruned, save_pruned
from slimkit.prune.channel import (
    Channel,
    _as_inputs,
    group_key,
    plan_channels,
    prune_channels,
)
from slimkit.prune.recover import recover


def final_widths(
    model: nn.Module,
    config: Channel,
    example_inputs: Sequence[torch.Tensor] | torch.Tensor,
    *,
    data: Iterable[Any] | None = None,
    scope: Scope | None = None,
) -> tuple[dict[str, int], dict[str, int]]:
    """(current widths, widths after pruning ``model`` with ``config``) per group key."""
    plan = plan_channels(model, config, example_inputs=_as_inputs(example_inputs), data=data,
                         scope=scope)  # fmt: skip
    now, after = {}, {}
    for g in plan.graph.groups:
        if g.gid in plan.remove:
            now[group_key(g)] = g.units
            after[group_key(g)] = g.units - len(plan.remove[g.gid])
    return now, after


def step_widths(
    now: dict[str, int], final: dict[str, int], step: int, steps: int
) -> dict[str, int]:
    """Widths after ``step`` of ``steps`` equal steps from ``now`` to ``final``."""
    return {k: round(now[k] - (now[k] - final[k]) * step / steps) for k in final}


def prune_iterative(
    model: nn.Module,
    config: Channel | None = None,
    *,
    example_inputs: Sequence[torch.Tensor] | torch.Tensor,
    train_loader: Any,
    steps: int = 3,
    epochs_per_step: int = 1,
    lr: float = 1e-3,
    teacher: nn.Module | None = None,
    data: Iterable[Any] | None = None,
    scope: Scope | None = None,
    checkpoint_dir: PathLike | None = None,
    **fit_kwargs: Any,
) -> nn.Module:
    """Prune ``model`` to the widths ``config`` gives one-shot, in ``steps`` prune / fine-tune
    rounds (``epochs_per_step`` epochs each, with response distillation from ``teacher`` when
    given). Returns a new model; ``model`` is not modified."""
    if steps < 1 or epochs_per_step < 1:
        raise ConfigError(
            f"steps and epochs_per_step must be >= 1 (got {steps}, {epochs_per_step})",
            fix="e.g. steps=3, epochs_per_step=1",
        )
    cfg = config or Channel()
    inputs = _as_inputs(example_inputs)
    now, final = final_widths(model, cfg, inputs, data=data, scope=scope)
    current, start = copy.deepcopy(model), 1
    ckpt = Path(checkpoint_dir) if checkpoint_dir is not None else None
    if ckpt is not None:
        done = sorted(
            int(p.name.split("_")[1])
            for p in ckpt.glob("step_*")
            if p.name.split("_")[1].isdigit() and (p / "pruning.json").is_file()
        )
        done = [k for k in done if k <= steps]
        if done:
            current = load_pruned(ckpt / f"step_{done[-1]}", model=model)
            start = done[-1] + 1
    seed = int(fit_kwargs.pop("seed", 0))
    for step in range(start, steps + 1):
        widths = step_widths(now, final, step, steps)
        current = prune_channels(current, cfg, example_inputs=inputs, data=data, scope=scope,
                                 widths=widths)  # fmt: skip
        recover(current, train_loader, teacher=teacher, epochs=epochs_per_step, lr=lr,
                seed=seed + step, **fit_kwargs)  # fmt: skip
        if ckpt is not None:
            tmp = ckpt / f".step_{step}.partial"
            shutil.rmtree(tmp, ignore_errors=True)
            save_pruned(current, tmp)
            shutil.rmtree(ckpt / f"step_{step}", ignore_errors=True)
            tmp.rename(ckpt / f"step_{step}")
    return current
