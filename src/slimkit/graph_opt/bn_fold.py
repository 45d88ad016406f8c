"""Fold BatchNorm into a neighbouring Conv or Linear, only where the result is exact.

A BN right after a Conv/Linear folds into it (the usual case). A BN placed elsewhere (after a ReLU
or a pooling layer, as real models sometimes do) can fold *forward* into the layer that consumes it,
but only when that layer is a Linear or an unpadded, ungrouped Conv: zero padding would otherwise
see shifted zeros. Anything else is kept, and the report says why::

    folded, report = fold_bn(model, example_inputs=(x,), return_report=True)
    print(report.summary())   # "folded 20 of 21 BatchNorm layers; kept 'head.bn': follows ..."

Paper trail: Jacob et al., "Quantization and Training of Neural Networks for Efficient
Integer-Arithmetic-Only Inference", CVPR 2018 (section 3.2, batch-norm folding).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Literal, overload

import torch
from torch import fx, nn
from torch.nn.modules.batchnorm import _BatchNorm

from slimkit.core.graph import bind_inputs, capture_model

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


@dataclass
class FoldReport:
    """Which BN layers were folded (and into what), and which were kept with the reason."""

    folded: list[tuple[str, str, str]] = field(default_factory=list)  # (bn, layer, direction)
    kept: list[tuple[str, str]] = field(default_factory=list)  # (bn, reason)

    def summary(self) -> str:
        total = len(self.folded) + len(self.kept)
        text = f"folded {len(self.folded)} of {total} BatchNorm layers"
        if self.kept:
            text += "; kept " + "; ".join(f"{bn!r}: {why}" for bn, why in self.kept)
        return text

    def to_dict(self) -> dict[str, Any]:
        return {
            "folded": [{"bn": b, "into": m, "direction": d} for b, m, d in self.folded],
            "kept": [{"bn": b, "reason": r} for b, r in self.kept],
        }


def _bn_affine(bn: _BatchNorm) -> tuple[torch.Tensor, torch.Tensor]:
    """``bn(x) = x * s + t`` per channel, in eval mode."""
    assert bn.running_var is not None and bn.running_mean is not None
    var, mean = bn.running_var.double(), bn.running_mean.double()
    gamma = bn.weight.double() if bn.weight is not None else torch.ones_like(var)
    beta = bn.bias.double() if bn.bias is not None else torch.zeros_like(var)
    s = gamma / torch.sqrt(var + bn.eps)
    return s, beta - mean * s


def _weight(layer: nn.Module) -> torch.Tensor:
    w = layer.weight
    assert isinstance(w, torch.Tensor)
    return w


def _set(layer: nn.Module, weight: torch.Tensor, bias: torch.Tensor) -> None:
    w = _weight(layer)
    layer.weight = nn.Parameter(weight.to(w.dtype), requires_grad=w.requires_grad)
    layer.bias = nn.Parameter(bias.to(w.dtype), requires_grad=w.requires_grad)


def _bias(layer: nn.Module, n: int) -> torch.Tensor:
    b = layer.bias
    return b.double() if isinstance(b, torch.Tensor) else torch.zeros(n, dtype=torch.float64)


def _fold_backward(layer: nn.Module, bn: _BatchNorm) -> None:
    """``bn(layer(x))`` -> ``layer'(x)``: scale output channels (dim 0 of the weight)."""
    s, t = _bn_affine(bn)
    w = _weight(layer).double()
    shape = (-1,) + (1,) * (w.dim() - 1)
    _set(layer, w * s.view(shape), _bias(layer, w.shape[0]) * s + t)


def _fold_forward(layer: nn.Module, bn: _BatchNorm) -> None:
    """``layer(bn(x))`` -> ``layer'(x)``: scale input channels (dim 1), shift into the bias."""
    s, t = _bn_affine(bn)
    w = _weight(layer).double()
    shape = (1, -1) + (1,) * (w.dim() - 2)
    bias = _bias(layer, w.shape[0]) + (w * t.view(shape)).flatten(1).sum(1)
    _set(layer, w * s.view(shape), bias)


def _single_call(gm: fx.GraphModule, target: str) -> bool:
    return sum(1 for n in gm.graph.nodes if n.op == "call_module" and n.target == target) == 1


def _rank(node: fx.Node) -> int | None:
    meta = node.meta.get("tensor_meta", node.meta.get("val"))  # ShapeProp's, or torch.export's
    return len(meta.shape) if meta is not None and hasattr(meta, "shape") else None


def _forward_ok(layer: nn.Module, bn_node: fx.Node) -> str | None:
    """None when folding forward into ``layer`` is exact, else the reason it is not."""
    if isinstance(layer, nn.Linear):
        if _rank(bn_node) != 2:
            return "feeds a Linear, but folding needs a 2-D input (pass example_inputs)"
        return None
    if isinstance(layer, _CONVS):
        if layer.groups != 1:
            return "feeds a grouped conv (channels would mix groups)"
        pad = layer.padding
        if pad == "same" or (not isinstance(pad, str) and any(p != 0 for p in pad)):
            return "feeds a zero-padded conv, where folding would turn the padding non-zero"
        return None
    return f"feeds {type(layer).__name__}, which has no weight to fold into"


@overload
def fold_bn(
    model: nn.Module,
    *,
    example_inputs: tuple[torch.Tensor, ...] | None = ...,
    example_kwargs: dict[str, Any] | None = ...,
    inplace: bool = ...,
    return_report: Literal[False] = ...,
) -> fx.GraphModule: ...
@overload
def fold_bn(
    model: nn.Module,
    *,
    example_inputs: tuple[torch.Tensor, ...] | None = ...,
    example_kwargs: dict[str, Any] | None = ...,
    inplace: bool = ...,
    return_report: Literal[True],
) -> tuple[fx.GraphModule, FoldReport]: ...


def fold_bn(
    model: nn.Module,
    *,
    example_inputs: tuple[torch.Tensor, ...] | None = None,
    example_kwargs: dict[str, Any] | None = None,
    inplace: bool = False,
    return_report: bool = False,
) -> fx.GraphModule | tuple[fx.GraphModule, FoldReport]:
    """Fold every eval-mode BatchNorm that can be folded exactly; returns an ``fx.GraphModule``.

    ``example_inputs`` (and ``example_kwargs``) let slimkit see tensor ranks, needed to fold
    BN1d next to a Linear, and capture models torch.fx cannot trace (``core.graph.capture_model``;
    ``gm.meta["capture"]`` says how). The model must be in eval mode (BN in training mode uses
    batch statistics and is kept). Python: ``sk.fold_bn(model)``. Supports Conv1d/2d/3d and
    Linear with BatchNorm1d/2d/3d.
    """
    src = model if inplace else copy.deepcopy(model)
    args = tuple(example_inputs or ())
    gm = capture_model(src, args, example_kwargs)
    if (args or example_kwargs) and gm.meta["capture"]["path"] != "torch.export":
        from torch.fx.passes.shape_prop import ShapeProp

        ShapeProp(gm).propagate(*bind_inputs(gm, args, example_kwargs or {}))
    modules = dict(gm.named_modules())
    report = FoldReport()
    for node in list(gm.graph.nodes):
        bn = modules.get(node.target) if node.op == "call_module" else None
        if not isinstance(bn, _BatchNorm):
            continue
        name = str(node.target)
        if bn.training or bn.running_mean is None:
            report.kept.append((name, "in training mode or without running statistics"))
            continue
        if not _single_call(gm, name):
            report.kept.append((name, "is called more than once"))
            continue
        prev = node.args[0]
        prev_mod = modules.get(prev.target) if isinstance(prev, fx.Node) else None
        if (
            isinstance(prev, fx.Node)
            and prev.op == "call_module"
            and isinstance(prev_mod, (*_CONVS, nn.Linear))
            and len(prev.users) == 1
            and _single_call(gm, str(prev.target))
            and (isinstance(prev_mod, _CONVS) or _rank(node) == 2)
        ):
            _fold_backward(prev_mod, bn)
            node.replace_all_uses_with(prev)
            gm.graph.erase_node(node)
            report.folded.append((name, str(prev.target), "into the preceding layer"))
            continue
        users = list(node.users)
        nxt = users[0] if len(users) == 1 else None
        nxt_mod = modules.get(nxt.target) if nxt is not None and nxt.op == "call_module" else None
        if nxt is None or nxt_mod is None:
            what = "several layers" if len(users) > 1 else "a function, not a layer"
            report.kept.append((name, f"follows {_describe(prev, modules)} and feeds {what}"))
            continue
        why = _forward_ok(nxt_mod, node)
        if why is None and not _single_call(gm, str(nxt.target)):
            why = "feeds a layer that is called more than once"
        if why is not None:
            report.kept.append((name, f"follows {_describe(prev, modules)} and {why}"))
            continue
        _fold_forward(nxt_mod, bn)
        node.replace_all_uses_with(prev)  # type: ignore[arg-type]
        gm.graph.erase_node(node)
        report.folded.append((name, str(nxt.target), "into the following layer"))
    gm.graph.lint()
    gm.delete_all_unused_submodules()
    gm.recompile()
    gm.eval()
    return (gm, report) if return_report else gm


def _describe(node: Any, modules: dict[str, nn.Module]) -> str:
    if not isinstance(node, fx.Node):
        return "a constant"
    if node.op == "call_module":
        return f"{type(modules[str(node.target)]).__name__} {str(node.target)!r}"
    if node.op == "placeholder":
        return "the model input"
    return f"{getattr(node.target, '__name__', node.target)}"
