"""Student builders: a smaller model made from the teacher and initialised from its weights.

- **Depth** (Sanh et al., "DistilBERT", 2019): keep a fraction of the teacher's blocks (residual
  blocks, transformer layers: children of a Sequential / ModuleList that keep their input's
  shape), evenly spaced (``order="even"``, DistilBERT's every other layer) or the ones whose
  removal changes the output most (``order="greedy"``, on calibration data).
- **Width**: structured channel pruning to a fraction of the MACs (``macs``) or of the channels
  (``width``: the fraction removed per layer) through the pruning package's dependency graph.
- Both, depth first (Muralidharan et al., "Compact Language Models via Pruning and Knowledge
  Distillation", 2024, the Minitron recipe), then :func:`slimkit.distill` to recover::

    small = sk.distill.student(gpt, depth=0.5, macs=0.5, example_inputs=(ids,))
    small = sk.distill(small, gpt, "response", data=train, epochs=2)

The student is an ordinary module with a pruning record: ``sk.prune.save_pruned`` / ``sk.load``
replay it on the teacher's architecture.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch
from torch import nn

from slimkit.core.registry import load_methods
from slimkit.core.verbs import dispatch
from slimkit.errors import ConfigError


def student(
    teacher: nn.Module,
    *,
    depth: float | None = None,
    width: float | None = None,
    macs: float | None = None,
    order: Literal["even", "greedy"] = "even",
    example_inputs: Sequence[torch.Tensor] | torch.Tensor | None = None,
    data: Any = None,
) -> nn.Module:
    """A copy of ``teacher`` with ``depth`` (a fraction) of its blocks kept, then narrowed to
    ``macs`` (a fraction of its MACs) or by ``width`` (a fraction of channels removed)."""
    if depth is None and width is None and macs is None:
        raise ConfigError(
            "student() needs depth=, width= or macs= to know how small to make the student",
            fix="e.g. student(teacher, depth=0.5) or student(teacher, macs=0.25)",
        )
    if width is not None and macs is not None:
        raise ConfigError("width= and macs= both size the width", fix="pass one of them")
    for name, value in (("depth", depth), ("macs", macs)):
        if value is not None and not 0 < value <= 1:
            raise ConfigError(f"{name}={value} is not a fraction", fix=f"use 0 < {name} <= 1")
    if width is not None and not 0 < width < 1:
        raise ConfigError(f"width={width} is not a fraction removed", fix="use 0 < width < 1")
    methods = load_methods()
    out = teacher
    if depth is not None and depth < 1:
        drop = methods.entry("prune.blocks").meta["config"](keep=depth, order=order)
        out = dispatch("prune", out, drop, example_inputs=example_inputs, data=data)
    if macs is not None and macs < 1:
        target = methods.entry("prune.auto").meta["config"](macs=macs)
        out = dispatch("prune", out, target, example_inputs=example_inputs, data=data)
    elif width is not None:
        channel = methods.entry("prune.channel").meta["config"](ratio=width)
        out = dispatch("prune", out, channel, example_inputs=example_inputs, data=data)
    return out
