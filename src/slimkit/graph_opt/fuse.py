"""Fuse Conv/Linear with what follows them, exactly, so later passes see one unit per layer.

Eager PyTorch has no fused kernels, so fusion here is two things, each exact to float rounding:

- **folding**: ops that only rescale or shift go into the layer's own weight, bias or padding:
  ``nn.Identity`` and eval-mode Dropout are removed; a zero pad before a conv becomes the conv's
  padding (when symmetric); ``conv(x) * a + b`` with constant per-channel ``a``, ``b`` (also ``-``
  and ``/``) folds into the conv or Linear; ``Linear -> Linear`` with nothing in between becomes one
  Linear when that lowers the MACs (a low-rank pair is left split, being cheaper).
- **grouping**: ``Conv -> ReLU``, ``Conv -> ReLU6``, ``Linear -> ReLU`` and ``Linear -> GELU``
  become one ``FusedConvAct`` / ``FusedLinearAct``, an ordinary module holding the layer (``.conv``
  or ``.linear``) and the activation (``.act``), so that later passes (quantizer placement,
  export) see one unit. ONNX export still writes ``Conv`` + ``Relu`` (``Clip`` for ReLU6), a pair
  ONNX Runtime fuses itself.

Every candidate left alone is in the report with its reason (the layer's output has a second
user, the pad is asymmetric, the constant varies over space, ...)::

    fused, report = fuse(model, example_inputs=(x,), return_report=True)
    print(report.summary())   # "3 rewrites (conv+relu x3); left alone: "Conv2d 'c3' + relu": the
                              #  Conv2d output has 2 users (relu, add): fusing would hide ..."

``example_inputs`` let slimkit see tensor ranks, needed for constants such as ``(1, C, 1, 1)``.
Supports Conv1d/2d/3d (any groups, stride, dilation) and Linear. Re-capturing a fused model with
``core.graph.capture(..., leaves=FUSED)`` keeps the units whole. Registered as ``graph_opt.fuse``:
``sk.optimize(model, "fuse", example_inputs=(x,))``, YAML ``- graph_opt.fuse: {}``. Paper trail:
Jacob et al., "Quantization and Training of Neural Networks for Efficient Integer-Arithmetic-Only
Inference", CVPR 2018 (folding and fused activations).
"""

from __future__ import annotations

import operator
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Literal, overload

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.nn.modules.batchnorm import _BatchNorm

from slimkit.core.config import Config
from slimkit.core.registry import METHODS
from slimkit.graph_opt.bn_fold import _bias, _rank, _set, _weight
from slimkit.graph_opt.const_fold import (
    Constants,
    drop_unused_attributes,
    dropout_training,
    erase_dead_constants,
    graph_module,
)

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_DROPOUTS = (
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
    nn.AlphaDropout,
    nn.FeatureAlphaDropout,
)
_pad = nn.modules.padding
_COPY_PADS = (_pad._ReflectionPadNd, _pad._ReplicationPadNd, _pad._CircularPadNd)


class Fuse(Config):
    """Which rewrites ``fuse`` makes; all are exact, so every one is on by default."""

    drop_identity: bool = True  # remove nn.Identity and eval-mode Dropout
    fold_pad: bool = True  # symmetric zero padding before a conv -> the conv's padding
    fold_affine: bool = True  # per-channel `y * a + b` after a conv/linear -> its weight and bias
    merge_linear: bool = True  # Linear -> Linear -> one Linear, when that lowers the MACs
    fuse_activation: bool = True  # Conv+ReLU/ReLU6, Linear+ReLU/GELU -> one fused module


@dataclass
class FuseReport:
    """Each rewrite made, each candidate left alone with its reason, and the attributes removed."""

    fused: list[tuple[str, str, str]] = field(default_factory=list)  # (kind, what, into)
    kept: list[tuple[str, str]] = field(default_factory=list)  # (candidate, reason)
    removed: list[str] = field(default_factory=list)  # constants folded into a layer, then unused

    def summary(self) -> str:
        kinds = Counter(k for k, _, _ in self.fused)
        text = f"{len(self.fused)} rewrite{'s' if len(self.fused) != 1 else ''}"
        if kinds:
            text += " (" + ", ".join(f"{k} x{n}" for k, n in kinds.items()) + ")"
        if self.kept:
            text += "; left alone: " + "; ".join(f"{c!r}: {why}" for c, why in self.kept)
        return text

    def to_dict(self) -> dict[str, Any]:
        return {
            "fused": [{"kind": k, "what": w, "into": i} for k, w, i in self.fused],
            "kept": [{"candidate": c, "reason": r} for c, r in self.kept],
            "removed": list(self.removed),
        }


class FusedConvAct(nn.Module):
    """A conv and the activation applied to its output, as one unit: ``act(conv(x))``."""

    def __init__(self, conv: nn.Module, act: nn.Module) -> None:
        super().__init__()
        self.conv = conv
        self.act = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.conv(x))


class FusedLinearAct(nn.Module):
    """A Linear and the activation applied to its output, as one unit: ``act(linear(x))``."""

    def __init__(self, linear: nn.Module, act: nn.Module) -> None:
        super().__init__()
        self.linear = linear
        self.act = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.linear(x))


FUSED = (FusedConvAct, FusedLinearAct)
_FUSABLE = {"conv": ("relu", "relu6"), "linear": ("relu", "gelu")}

# Activations by name: the supported ones become a fresh module, the others are only reported.
_ACT_MODULES: dict[type[nn.Module], str] = {
    nn.ReLU: "relu", nn.ReLU6: "relu6", nn.GELU: "gelu", nn.SiLU: "silu", nn.Hardswish: "hardswish",
    nn.Sigmoid: "sigmoid", nn.Tanh: "tanh", nn.LeakyReLU: "leaky_relu", nn.ELU: "elu",
    nn.Hardtanh: "hardtanh", nn.Mish: "mish", nn.Hardsigmoid: "hardsigmoid", nn.SELU: "selu",
}  # fmt: skip
_ACT_FUNCTIONS: dict[Any, str] = {
    F.relu: "relu", torch.relu: "relu", F.relu_: "relu", torch.relu_: "relu", F.relu6: "relu6",
    F.gelu: "gelu", F.silu: "silu", F.hardswish: "hardswish", torch.sigmoid: "sigmoid",
    F.sigmoid: "sigmoid", torch.tanh: "tanh", F.tanh: "tanh", F.leaky_relu: "leaky_relu",
    F.elu: "elu", F.hardtanh: "hardtanh", F.mish: "mish", F.hardsigmoid: "hardsigmoid",
}  # fmt: skip
_ACT_METHODS = {"relu": "relu", "relu_": "relu", "sigmoid": "sigmoid", "tanh": "tanh"}

_AFFINE: dict[Any, str] = {
    operator.mul: "mul", torch.mul: "mul", "mul": "mul",
    operator.add: "add", torch.add: "add", "add": "add",
    operator.sub: "sub", torch.sub: "sub", "sub": "sub",
    operator.truediv: "div", torch.div: "div", torch.true_divide: "div", "div": "div",
}  # fmt: skip


class _Graph:
    """The graph being rewritten, its constants and the report: what every rewrite needs."""

    def __init__(self, gm: fx.GraphModule, report: FuseReport) -> None:
        self.gm, self.graph, self.report = gm, gm.graph, report
        self.consts = Constants(gm)

    def module(self, node: Any) -> nn.Module | None:
        if isinstance(node, fx.Node) and node.op == "call_module":
            return self.gm.get_submodule(str(node.target))
        return None

    def layer(self, node: Any) -> nn.Module | None:
        """The Conv/Linear that ``node`` calls, or None."""
        m = self.module(node)
        return m if isinstance(m, (*_CONVS, nn.Linear)) else None

    def called_once(self, node: fx.Node) -> bool:
        return sum(n.op == "call_module" and n.target == node.target for n in self.graph.nodes) == 1

    def label(self, node: fx.Node) -> str:
        m = self.module(node)
        return f"{type(m).__name__} {str(node.target)!r}" if m is not None else repr(node.name)

    def set_module(self, target: str, module: nn.Module) -> None:
        parent, _, name = target.rpartition(".")
        setattr(self.gm.get_submodule(parent), name, module)

    def bypass(self, node: fx.Node, into: fx.Node) -> None:
        """Remove ``node``, its users reading ``into`` instead."""
        node.replace_all_uses_with(into)
        self.graph.erase_node(node)

    def keep(self, candidate: str, reason: str) -> None:
        self.report.kept.append((candidate, reason))


def _users(node: fx.Node) -> str:
    return ", ".join(u.name for u in node.users)


def _drop_identities(g: _Graph) -> None:
    for node in list(g.graph.nodes):
        m = g.module(node)
        functional = dropout_training(node)
        if not (isinstance(m, (nn.Identity, *_DROPOUTS)) or functional is not None):
            continue
        what = (
            f"{node.target} ({type(m).__name__})" if m is not None else f"{node.name} (F.dropout)"
        )
        if functional or (isinstance(m, _DROPOUTS) and m.training):
            g.keep(what, "dropout in training mode is random; call model.eval() first")
        elif node.args and isinstance(node.args[0], fx.Node):
            g.bypass(node, node.args[0])
            g.report.fused.append(("identity", what, "removed"))


def _pad_spec(g: _Graph, node: fx.Node) -> tuple[int, ...] | str | None:
    """The amounts of a constant-zero pad (F.pad order: last dim first), a reason it is not a
    zero pad, or None when ``node`` is no pad at all."""
    m = g.module(node)
    if isinstance(m, nn.modules.padding._ConstantPadNd):
        return tuple(m.padding) if m.value == 0 else f"pads with {m.value}, not zero"
    if isinstance(m, _COPY_PADS):
        return f"{type(m).__name__} pads with copies of the input, not zeros"
    if node.op != "call_function" or node.target not in (F.pad, torch.constant_pad_nd):
        return None
    args, kw = node.args, node.kwargs
    pad = args[1] if len(args) > 1 else kw.get("pad")
    mode = args[2] if len(args) > 2 and node.target is F.pad else kw.get("mode", "constant")
    value = args[-1] if len(args) > (3 if node.target is F.pad else 2) else kw.get("value")
    if mode != "constant":
        return f"mode {mode!r} is not zero padding"
    if value not in (None, 0):
        return f"pads with {value!r}, not zero"
    if not isinstance(pad, (tuple, list)) or not all(isinstance(p, int) for p in pad):
        return "the amounts are computed at run time"
    return tuple(int(p) for p in pad)


def _pad_refusal(g: _Graph, pad: fx.Node, spec: tuple[int, ...], conv_node: fx.Node) -> str | None:
    """Why ``spec`` cannot become the padding of the conv ``conv_node`` calls, or None."""
    conv = g.layer(conv_node)
    assert isinstance(conv, _CONVS)
    k = conv.weight.dim() - 2  # spatial dims
    if len(pad.users) > 1:
        return f"the padded tensor has {len(pad.users)} users ({_users(pad)})"
    if len(spec) % 2 or len(spec) > 2 * k:
        return f"pad {spec} reaches a non-spatial dimension"
    if any(spec[i] != spec[i + 1] for i in range(0, len(spec), 2)):
        return f"pad {spec} is asymmetric, and a conv pads both sides of a dimension equally"
    if any(p < 0 for p in spec):
        return f"pad {spec} is negative (a crop)"
    if conv.padding == "same":
        return "the conv uses padding='same'"
    if conv.padding_mode != "zeros" and conv.padding != "valid" and any(conv.padding):
        return f"the conv pads with padding_mode={conv.padding_mode!r}"
    if not g.called_once(conv_node):
        return "the conv is called more than once"
    return None


def _fold_pads(g: _Graph) -> None:
    for node in list(g.graph.nodes):
        spec = _pad_spec(g, node)
        convs = [u for u in node.users if isinstance(g.layer(u), _CONVS) and u.args[0] is node]
        if spec is None or not convs or not node.args or not isinstance(node.args[0], fx.Node):
            continue
        conv_node = convs[0]
        what = f"{g.label(node) if g.module(node) else node.name} -> {g.label(conv_node)}"
        why = spec if isinstance(spec, str) else _pad_refusal(g, node, spec, conv_node)
        if why is not None:
            g.keep(what, why)
            continue
        assert not isinstance(spec, str)
        conv = g.layer(conv_node)
        assert isinstance(conv, _CONVS)
        k = conv.weight.dim() - 2
        padding = [0] * k if isinstance(conv.padding, str) else list(conv.padding)  # 'valid': 0
        for i in range(0, len(spec), 2):  # F.pad amounts run from the last dimension backwards
            padding[k - 1 - i // 2] += spec[i]
        conv.padding, conv.padding_mode = tuple(padding), "zeros"
        conv._reversed_padding_repeated_twice = [p for p in reversed(padding) for _ in range(2)]
        conv_node.args = (node.args[0], *conv_node.args[1:])
        g.graph.erase_node(node)
        g.report.fused.append(("pad", what, f"{conv_node.target}.padding={tuple(padding)}"))


def _per_channel(c: torch.Tensor, out: fx.Node, layer: nn.Module) -> torch.Tensor | str:
    """``c`` as one float64 value per output channel, or why it is not per-channel."""
    n, w_dim = _weight(layer).shape[0], _weight(layer).dim()
    rank = _rank(out)
    if rank is None:  # align with the channel dim first: right for batched and unbatched input
        rank, axis = (w_dim - 1 if isinstance(layer, _CONVS) else 1), 0
        if c.dim() > rank:
            return (
                f"constant of shape {tuple(c.shape)} may broadcast over the batch; pass "
                "example_inputs so slimkit can see the output rank"
            )
    else:
        axis = rank - (w_dim - 1) if isinstance(layer, _CONVS) else rank - 1
        if c.dim() > rank:
            return f"constant of shape {tuple(c.shape)} has more dimensions than the output"
    for j, size in enumerate(c.shape):
        if size != 1 and (rank - c.dim() + j != axis or size != n):
            return (
                f"constant of shape {tuple(c.shape)} is not per-channel for a {rank}-D output "
                f"with {n} channels"
            )
    return c.double().reshape(-1).expand(n).clone()


def _affine(
    g: _Graph, node: fx.Node, out: fx.Node, layer: nn.Module
) -> tuple[torch.Tensor, torch.Tensor] | str | None:
    """``node(out) == s * out + t`` per channel: (s, t), a reason it cannot fold, or None when
    ``node`` is not an affine op with a constant."""
    kind = _AFFINE.get(node.target) if node.op in ("call_function", "call_method") else None
    if kind is None or len(node.args) != 2 or (node.args[0] is out) == (node.args[1] is out):
        return None
    first = node.args[0] is out
    other = node.args[1] if first else node.args[0]
    number = isinstance(other, (int, float)) and not isinstance(other, bool)
    if not (number or g.consts.is_const(other)) or (kind == "div" and not first):
        return None  # a residual add, or c / y: not affine in the layer's output
    if node.kwargs:
        return f"{kind} with keyword arguments ({', '.join(node.kwargs)}) is not folded"
    try:
        c = torch.tensor(float(other)) if number else g.consts.value(other)  # type: ignore[arg-type]
    except Exception as e:  # the forward would raise the same; leave it to do so
        return f"its constant could not be evaluated ({type(e).__name__})"
    if isinstance(c, (int, float)) and not isinstance(c, bool):  # shape arithmetic
        c, number = torch.tensor(float(c)), True
    if not isinstance(c, torch.Tensor):
        return None
    dtype = _weight(layer).dtype
    if not number and torch.result_type(torch.empty(1, dtype=dtype), c) != dtype:
        return f"constant of dtype {c.dtype} would change the output dtype from {dtype}"
    if not bool(torch.isfinite(c).all()) or (kind == "div" and bool((c == 0).any())):
        return "constant is not finite (or divides by zero)"
    vec = _per_channel(c, out, layer)
    if isinstance(vec, str):
        return vec
    one, zero = torch.ones_like(vec), torch.zeros_like(vec)
    if kind == "mul":
        return vec, zero
    if kind == "add":
        return one, vec
    if kind == "div":
        return 1 / vec, zero
    return (one, -vec) if first else (-one, vec)  # y - c, or c - y


def _fold_affines(g: _Graph) -> None:
    for node in list(g.graph.nodes):
        layer = g.layer(node)
        while layer is not None:
            users = list(node.users)
            found = [(u, _affine(g, u, node, layer)) for u in users]
            found = [(u, a) for u, a in found if a is not None]
            bn = [u for u in users if isinstance(g.module(u), _BatchNorm)]
            if bn:
                g.keep(
                    f"{g.label(node)} -> {g.label(bn[0])}",
                    "a BatchNorm follows: fold it first with fold_bn (optimize() does)",
                )
            if not found:
                break
            user, affine = found[0]
            what = f"{g.label(node)} -> {user.name}"
            if len(users) > 1:
                affine = f"the layer's output has {len(users)} users ({_users(node)})"
            elif not g.called_once(node):
                affine = "the layer is called more than once"
            if isinstance(affine, str) or affine is None:
                g.keep(what, str(affine))
                break
            s, t = affine
            w = _weight(layer).double()
            n = w.shape[0]
            _set(layer, w * s.view((-1,) + (1,) * (w.dim() - 1)), _bias(layer, n) * s + t)
            g.bypass(user, node)
            g.report.fused.append(("affine", what, str(node.target)))


def _merge_linears(g: _Graph) -> None:
    for node in list(g.graph.nodes):
        first = g.layer(node)
        while isinstance(first, nn.Linear):
            users = list(node.users)
            nxt = [u for u in users if isinstance(g.layer(u), nn.Linear) and u.args[0] is node]
            if not nxt:
                break
            second = g.layer(nxt[0])
            assert isinstance(second, nn.Linear)
            what = f"{g.label(node)} -> {g.label(nxt[0])}"
            d_in, mid, d_out = first.in_features, first.out_features, second.out_features
            why = None
            if len(users) > 1:
                why = f"the first output has {len(users)} users ({_users(node)})"
            elif not (g.called_once(node) and g.called_once(nxt[0])):
                why = "a layer of the pair is called more than once"
            elif d_in * d_out >= mid * (d_in + d_out):
                why = (
                    f"one Linear would cost {d_in * d_out} MACs per row, the pair costs "
                    f"{mid * (d_in + d_out)} (a low-rank pair is cheaper split)"
                )
            elif first.weight.dtype != second.weight.dtype:
                why = "the two layers have different dtypes"
            if why is not None:
                g.keep(what, why)
                break
            w1, w2 = first.weight.double(), second.weight.double()
            bias = None
            if first.bias is not None or second.bias is not None:
                bias = w2 @ _bias(first, mid) + _bias(second, d_out)
            merged = nn.Linear(
                d_in,
                d_out,
                bias=bias is not None,
                device=first.weight.device,
                dtype=first.weight.dtype,
            )
            _set(merged, w2 @ w1, bias if bias is not None else torch.zeros(d_out))
            if bias is None:
                merged.bias = None
            merged.requires_grad_(first.weight.requires_grad)
            g.set_module(str(node.target), merged)
            g.bypass(nxt[0], node)
            g.report.fused.append(("linear+linear", what, str(node.target)))
            first = merged


def _activation(g: _Graph, node: fx.Node, kind: str) -> tuple[str, nn.Module | str] | None:
    """For an activation node: its name and the module a fused unit would hold (or why there is
    none for a ``kind`` layer); None for any other node."""
    m = g.module(node)
    extra = list(node.args[1:])
    if m is not None:
        name = _ACT_MODULES.get(type(m))
        approximate = getattr(m, "approximate", "none")
    elif node.op in ("call_function", "call_method"):
        table: dict[Any, str] = _ACT_FUNCTIONS if node.op == "call_function" else _ACT_METHODS
        name = table.get(node.target)
        approximate = node.kwargs.get("approximate", "none")
        if name == "gelu" and extra and isinstance(extra[0], str):  # F.gelu(x, "tanh")
            approximate = extra.pop(0)
    else:
        return None
    if name is None:
        return None
    if name not in _FUSABLE[kind]:
        return name, f"no fused unit for a {kind} + {name} (supported: {', '.join(_FUSABLE[kind])})"
    if any(not isinstance(a, bool) for a in extra) or set(node.kwargs) - {"inplace", "approximate"}:
        return name, "the activation has extra arguments"
    if name == "gelu":
        return name, nn.GELU(approximate=str(approximate))
    return name, nn.ReLU() if name == "relu" else nn.ReLU6()


def _fuse_activations(g: _Graph) -> None:
    for node in list(g.graph.nodes):
        out = node.args[0] if node.args else None
        layer = g.layer(out)
        if layer is None or not isinstance(out, fx.Node):
            continue
        kind = "conv" if isinstance(layer, _CONVS) else "linear"
        act = _activation(g, node, kind)
        if act is None:
            continue
        name, module = act
        what = f"{g.label(out)} + {g.label(node) if node.op == 'call_module' else name}"
        if isinstance(module, str):
            g.keep(what, module)
        elif len(out.users) > 1:
            g.keep(
                what,
                f"the {type(layer).__name__} output has {len(out.users)} users "
                f"({_users(out)}): fusing would hide the value before the activation",
            )
        elif not g.called_once(out):
            g.keep(what, f"{type(layer).__name__} {out.target!r} is called more than once")
        else:
            unit = FusedConvAct(layer, module) if kind == "conv" else FusedLinearAct(layer, module)
            target = str(out.target)
            parent, _, child = target.rpartition(".")
            if parent and child == kind and node.target == f"{parent}.act":
                out.target = target = parent  # a fused unit traced through again: rebuild it
            g.set_module(target, unit)
            g.bypass(node, out)
            g.report.fused.append((f"{kind}+{name}", what, f"{out.target} ({type(unit).__name__})"))


def _shape_prop(gm: fx.GraphModule, example_inputs: tuple[Any, ...]) -> None:
    """Record tensor shapes on the nodes, in eval mode so that no BatchNorm statistic moves."""
    from torch.fx.passes.shape_prop import ShapeProp

    modes = {m: m.training for m in gm.modules()}
    gm.eval()
    try:
        with torch.no_grad():
            ShapeProp(gm).propagate(*example_inputs)
    finally:
        for m, training in modes.items():
            m.training = training


@overload
def fuse(
    model: nn.Module,
    config: Fuse | None = ...,
    *,
    example_inputs: tuple[Any, ...] | None = ...,
    inplace: bool = ...,
    return_report: Literal[False] = ...,
) -> fx.GraphModule: ...
@overload
def fuse(
    model: nn.Module,
    config: Fuse | None = ...,
    *,
    example_inputs: tuple[Any, ...] | None = ...,
    inplace: bool = ...,
    return_report: Literal[True],
) -> tuple[fx.GraphModule, FuseReport]: ...


@METHODS.register(
    "graph_opt.fuse",
    config=Fuse,
    summary="fuse Conv/Linear with activations, affines and pads (exact)",
    aliases={"fusion": {}},
)
def fuse(
    model: nn.Module,
    config: Fuse | None = None,
    *,
    example_inputs: tuple[Any, ...] | None = None,
    inplace: bool = False,
    return_report: bool = False,
) -> fx.GraphModule | tuple[fx.GraphModule, FuseReport]:
    """Fold and group Conv/Linear with their neighbours where exact; returns an ``fx.GraphModule``
    (in eval mode). ``model`` is untouched unless ``inplace``; a model fx cannot trace raises
    ``GraphCaptureError`` naming the module. Python: ``from slimkit.graph_opt import fuse``. Run
    ``fold_bn`` first (``optimize`` runs both) so that Conv-BN-ReLU becomes Conv-ReLU.
    """
    cfg = config or Fuse()
    gm = graph_module(model, inplace)
    if example_inputs is not None:
        _shape_prop(gm, tuple(example_inputs))
    g = _Graph(gm, FuseReport())
    if cfg.drop_identity:
        _drop_identities(g)
    if cfg.fold_pad:
        _fold_pads(g)
    if cfg.fold_affine:
        _fold_affines(g)
    if cfg.merge_linear:  # after the affine folds: `fc1(x) * a` then merges with the fc2 after
        _merge_linears(g)
    if cfg.fuse_activation:
        _fuse_activations(g)
    g.report.removed = drop_unused_attributes(gm, erase_dead_constants(gm, g.consts))
    gm.graph.lint()
    gm.delete_all_unused_submodules()
    gm.recompile()
    gm.eval()
    return (gm, g.report) if return_report else gm
