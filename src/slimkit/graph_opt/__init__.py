"""Graph optimisations that keep the function exactly (to float rounding): BN folding, constant
folding, fusion. Each works on a ``torch.fx`` capture and returns an ordinary ``nn.Module``.

``sk.optimize`` is the verb for every registered ``graph_opt.*`` method; with no method it runs
the three passes in order (``graph_opt.optimize``) and, called the way it always was, returns the
module and an :class:`OptimizeReport`::

    fast, report = sk.optimize(model, (x,))                       # all three passes
    print(report.summary())
    fused = sk.optimize(model, "graph_opt.fuse", example_inputs=(x,))   # one pass, by name
    folded = sk.optimize(model, "bn_fold", example_inputs=(x,))
    print(sk.report(fused).summary())

YAML steps: ``- graph_opt.optimize: {}``, ``- graph_opt.bn_fold: {}``, ``- graph_opt.fuse:
{merge_linear: false}``, ``- graph_opt.const_fold: {max_growth: 4}``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from pydantic import Field
from torch import fx, nn

from slimkit.core.config import Config
from slimkit.core.registry import METHODS
from slimkit.core.verbs import dispatch, report
from slimkit.graph_opt.bn_fold import FoldReport, fold_bn
from slimkit.graph_opt.const_fold import ConstFold, ConstFoldReport, fold_constants
from slimkit.graph_opt.fuse import FUSED, Fuse, FusedConvAct, FusedLinearAct, FuseReport, fuse


class FoldBN(Config):
    """``fold_bn`` has no options: every BatchNorm that folds exactly is folded."""


class Optimize(Config):
    """The three exact passes in order; each can be switched off or configured."""

    bn_fold: bool = True
    const_fold: ConstFold | None = Field(default_factory=ConstFold)  # None: skip the pass
    fuse: Fuse | None = Field(default_factory=Fuse)  # None: skip the pass


@dataclass
class OptimizeReport:
    """The reports of the three passes, and how far the result is from the original."""

    bn_fold: FoldReport
    const_fold: ConstFoldReport
    fuse: FuseReport
    max_abs_err: float | None = None  # on example_inputs; None without them

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


@METHODS.register(
    "graph_opt.bn_fold",
    config=FoldBN,
    summary="fold BatchNorm into Conv/Linear, exactly",
    aliases={"fold_bn": {}},
)
def fold_bn_method(
    model: nn.Module,
    config: FoldBN | None = None,
    *,
    example_inputs: tuple[torch.Tensor, ...] | None = None,
    inplace: bool = False,
) -> tuple[fx.GraphModule, FoldReport]:
    """``fold_bn`` as a registered method: the folded graph and its report."""
    return fold_bn(model, example_inputs=example_inputs, inplace=inplace, return_report=True)


@METHODS.register(
    "graph_opt.optimize",
    config=Optimize,
    summary="BN folding, then constant folding, then fusion (exact)",
    aliases={"all": {}, "exact": {}},
)
def optimize_graph(
    model: nn.Module,
    config: Optimize | None = None,
    *,
    example_inputs: Sequence[torch.Tensor] | torch.Tensor | None = None,
    inplace: bool = False,
) -> tuple[fx.GraphModule, OptimizeReport]:
    """``fold_bn``, then ``fold_constants``, then ``fuse``: one exact, inference-ready graph (in
    eval mode), and the report of each pass with the max abs error against ``model`` on
    ``example_inputs`` (``None`` without them, or when ``model`` is in train mode)."""
    cfg = config or Optimize()
    inputs = None
    if example_inputs is not None:
        inputs = (
            (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs)
        )
    ref = None
    if not model.training and inputs is not None:
        with torch.no_grad():
            ref = _outputs(model(*inputs))
    if cfg.bn_fold:
        gm, bn = fold_bn(model, example_inputs=inputs, inplace=inplace, return_report=True)
    else:
        from slimkit.graph_opt.const_fold import graph_module

        gm, bn = graph_module(model, inplace), FoldReport()
    const = ConstFoldReport()
    if cfg.const_fold is not None:
        gm, const = fold_constants(gm, cfg.const_fold, inplace=True, return_report=True)
    fused = FuseReport()
    if cfg.fuse is not None:
        gm, fused = fuse(gm, cfg.fuse, example_inputs=inputs, inplace=True, return_report=True)
    rep = OptimizeReport(bn, const, fused)
    if ref is not None and inputs is not None:
        with torch.no_grad():
            out = _outputs(gm(*inputs))
        diffs = [
            float((r.double() - o.double()).abs().max())
            for r, o in zip(ref, out, strict=True)
            if r.numel()
        ]
        rep.max_abs_err = max(diffs, default=0.0)
    gm.eval()
    return gm, rep


def optimize(
    model: nn.Module,
    config: str | Config | Sequence[torch.Tensor] | torch.Tensor | None = None,
    *,
    example_inputs: Sequence[torch.Tensor] | torch.Tensor | None = None,
    data: Any = None,
    scope: Any = None,
    const_fold: ConstFold | None = None,
    fuse_config: Fuse | None = None,
    inplace: bool = False,
) -> Any:
    """The graph-optimisation verb: an exact, inference-ready copy of ``model`` (never modified,
    unless ``inplace``), in eval mode.

    ``config`` is a registered name or alias (``"graph_opt.fuse"``, ``"fuse"``, ``"bn_fold"``,
    ``"const_fold"``, ``"graph_opt.optimize"``) or a config object (``Fuse``, ``ConstFold``,
    ``FoldBN``, ``Optimize``); this form returns the module, and ``sk.report(result)`` says what
    was folded or fused and what was left alone, and why (``.detail`` is the pass's own report).

    Without a method (``optimize(model, (x,))``, or ``optimize(model, example_inputs=(x,))``) it
    runs all three passes and returns ``(module, OptimizeReport)`` as it always has;
    ``const_fold`` and ``fuse_config`` configure those passes. ``example_inputs`` let the passes
    see tensor ranks (and default to the first batch of ``data``). The passes transform the whole
    graph: a ``scope`` is refused (``ConfigError``), never ignored.
    """
    legacy = config is None or isinstance(config, torch.Tensor) or (
        isinstance(config, (tuple, list)) and all(isinstance(t, torch.Tensor) for t in config)
    )  # fmt: skip
    if legacy:
        if config is not None:
            if example_inputs is not None:
                from slimkit.errors import ConfigError

                raise ConfigError(
                    "example inputs given twice (as the second argument and as example_inputs=)",
                    fix="pass them once: optimize(model, example_inputs=(x,))",
                )
            example_inputs = config  # type: ignore[assignment]
        method: Config = Optimize(const_fold=const_fold or ConstFold(), fuse=fuse_config or Fuse())
    else:
        if const_fold is not None or fuse_config is not None:
            from slimkit.errors import ConfigError

            raise ConfigError(
                "const_fold= and fuse_config= configure the all-passes form only",
                fix="pass Optimize(const_fold=..., fuse=...) as the method, or the pass's config",
            )
        method = config  # type: ignore[assignment]
    out = dispatch("graph_opt", model, method, example_inputs=example_inputs, data=data,
                   scope=scope, inplace=inplace or None)  # fmt: skip
    return (out, report(out).detail) if legacy else out


__all__ = [
    "FUSED",
    "FoldBN",
    "Optimize",
    "ConstFold",
    "ConstFoldReport",
    "FoldReport",
    "Fuse",
    "FuseReport",
    "FusedConvAct",
    "FusedLinearAct",
    "OptimizeReport",
    "fold_bn",
    "fold_bn_method",
    "fold_constants",
    "fuse",
    "optimize",
    "optimize_graph",
]
