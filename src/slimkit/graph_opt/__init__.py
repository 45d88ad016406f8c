"""Graph optimisations that keep the function exactly (to float rounding): BN folding, constant
folding, fusion. Each works on a ``torch.fx`` capture and returns an ordinary ``nn.Module``;
``optimize`` runs the three in order::

    from slimkit.graph_opt import optimize
    fast, report = optimize(model, (x,))
    print(report.summary())
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn

from slimkit.graph_opt.bn_fold import FoldReport, fold_bn
from slimkit.graph_opt.const_fold import ConstFold, ConstFoldReport, fold_constants
from slimkit.graph_opt.fuse import FUSED, Fuse, FusedConvAct, FusedLinearAct, FuseReport, fuse


@dataclass
class OptimizeReport:
    """The reports of the three passes, and how far the result is from the original."""

    bn_fold: FoldReport
    const_fold: ConstFoldReport
    fuse: FuseReport
    max_abs_err: float | None = None  # on example_inputs; None when the model was in train mode

    def summary(self) -> str:
        err = "" if self.max_abs_err is None else f"\nmax abs error: {self.max_abs_err:.3g}"
        return (
            f"bn_fold: {self.bn_fold.summary()}\nconst_fold: {self.const_fold.summary()}\n"
            f"fuse: {self.fuse.summary()}{err}"
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "bn_fold": self.bn_fold.to_dict(),
            "const_fold": self.const_fold.to_dict(),
            "fuse": self.fuse.to_dict(),
            "max_abs_err": self.max_abs_err,
        }


def _outputs(out: Any) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in _outputs(o)]
    return []


def optimize(
    model: nn.Module,
    example_inputs: Sequence[torch.Tensor] | torch.Tensor,
    *,
    const_fold: ConstFold | None = None,
    fuse_config: Fuse | None = None,
    inplace: bool = False,
) -> tuple[fx.GraphModule, OptimizeReport]:
    """``fold_bn``, then ``fold_constants``, then ``fuse``: one exact, inference-ready graph.

    The returned model is in eval mode; ``model`` is untouched unless ``inplace``. The report holds
    each pass's report and the max abs error against ``model`` on ``example_inputs``.
    """
    inputs = (
        (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs)
    )
    ref = None
    if not model.training:
        with torch.no_grad():
            ref = _outputs(model(*inputs))
    gm, bn = fold_bn(model, example_inputs=inputs, inplace=inplace, return_report=True)
    gm, const = fold_constants(gm, const_fold, inplace=True, return_report=True)
    gm, fused = fuse(gm, fuse_config, example_inputs=inputs, inplace=True, return_report=True)
    report = OptimizeReport(bn, const, fused)
    if ref is not None:
        with torch.no_grad():
            out = _outputs(gm(*inputs))
        diffs = [
            float((r.double() - o.double()).abs().max())
            for r, o in zip(ref, out, strict=True)
            if r.numel()
        ]
        report.max_abs_err = max(diffs, default=0.0)
    return gm, report


__all__ = [
    "FUSED",
    "ConstFold",
    "ConstFoldReport",
    "FoldReport",
    "Fuse",
    "FuseReport",
    "FusedConvAct",
    "FusedLinearAct",
    "OptimizeReport",
    "fold_bn",
    "fold_constants",
    "fuse",
    "optimize",
]
