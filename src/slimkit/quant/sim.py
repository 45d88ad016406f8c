"""Build the simulated int8 model: where activations are quantized, observation, conversion.

Placement follows what ONNX Runtime fuses into integer kernels, so that the simulated model *is*
the deployed one: the inputs of every Conv/Linear/matmul/average-pool are quantized, and of every
add/concat whose result feeds one of those (a transformer's residual add feeding LayerNorm stays
float); the outputs of Conv, add, concat and pooling are quantized after a ReLU/ReLU6 that directly
follows them (ORT folds it into the clamp); Linear/matmul outputs only when a quantized op consumes
them (otherwise ORT's MatMulIntegerToFloat / QGemm produce float, which is also more accurate).
Reshapes, flatten, transposes, max-pooling and unfused ReLUs pass quantized tensors through and
share their input's scale, so ORT can run them on uint8.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from slimkit.core.data import Batch
from slimkit.core.scope import Scope, set_submodule
from slimkit.errors import DataError
from slimkit.quant.calibrate import TensorStats, choose_range
from slimkit.quant.modules import ActQuant, QuantLayer

WEIGHTED = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
ACT_MODULES = (nn.ReLU, nn.ReLU6, nn.Hardtanh)
ACT_FUNCS: set[Any] = {F.relu, torch.relu, F.relu6, F.hardtanh}
POOL_MODULES = (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AvgPool1d, nn.AvgPool2d)
QOP_FUNCS: set[Any] = {torch.matmul, operator.matmul, torch.bmm, operator.add, torch.add, torch.cat}
QOP_FUNCS |= {F.adaptive_avg_pool2d, F.avg_pool2d}
PASS_MODULES = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.Flatten, nn.Unflatten, nn.Identity,
                nn.Dropout, *ACT_MODULES)  # fmt: skip
PASS_FUNCS: set[Any] = {torch.flatten, torch.reshape, torch.transpose, torch.permute, F.dropout,
                        torch.squeeze, torch.unsqueeze, F.max_pool2d, F.max_pool1d}  # fmt: skip
PASS_FUNCS |= ACT_FUNCS
PASS_METHODS = {"view", "reshape", "flatten", "permute", "transpose", "contiguous", "squeeze",
                "unsqueeze", "relu", "relu_"}  # fmt: skip
ALWAYS_OUT = {"conv", "add", "cat", "pool"}  # ops whose output ORT needs quantized to fuse


@dataclass
class Placement:
    """Which nodes get an activation quantizer, and which quantizers share another's range."""

    points: list[str] = field(default_factory=list)  # node names, graph order
    shares: dict[str, str] = field(default_factory=dict)  # node -> root node it copies
    weighted: dict[str, str] = field(default_factory=dict)  # node name -> module target
    skipped: list[str] = field(default_factory=list)  # weighted layers left in float (scope)


def _kind(node: fx.Node, modules: dict[str, nn.Module], in_scope: set[str]) -> str:
    if node.op == "call_module":
        m = modules[str(node.target)]
        if isinstance(m, WEIGHTED):
            if str(node.target) not in in_scope:
                return "float"
            return "conv" if not isinstance(m, nn.Linear) else "linear"
        if isinstance(m, POOL_MODULES):
            return "pool"
        if isinstance(m, PASS_MODULES):
            return "pass"
        return "other"
    if node.op == "call_function":
        if node.target in (operator.add, torch.add):
            tensors = [a for a in node.args[:2] if isinstance(a, fx.Node)]
            return "add" if len(tensors) == 2 else "other"
        if node.target is torch.cat:
            return "cat"
        if node.target in (F.adaptive_avg_pool2d, F.avg_pool2d):
            return "pool"
        if node.target in QOP_FUNCS:
            return "matmul"
        return "pass" if node.target in PASS_FUNCS else "other"
    if node.op == "call_method":
        if node.target in ("matmul", "bmm"):
            return "matmul"
        return "pass" if node.target in PASS_METHODS else "other"
    return node.op  # placeholder, get_attr, output


def _is_act(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    if node.op == "call_module":
        return isinstance(modules[str(node.target)], ACT_MODULES)
    return node.op == "call_function" and node.target in ACT_FUNCS


def _tensor_inputs(node: fx.Node, kind: str) -> list[fx.Node]:
    if kind in ("conv", "linear", "pool"):
        args = node.args[:1]
    elif kind == "cat":
        first = node.args[0]
        args = tuple(first) if isinstance(first, (list, tuple)) else ()
    else:
        args = node.args[:2]
    return [a for a in args if isinstance(a, fx.Node) and a.op != "get_attr"]


def place(gm: fx.GraphModule, scope: Scope | None, keep_float: Collection[str] = ()) -> Placement:
    """Decide the quantization points of ``gm`` (see the module docstring); layers out of
    ``scope`` or named in ``keep_float`` (module targets) stay float."""
    modules = dict(gm.named_modules())
    weighted_all = [n for n, m in gm.named_modules() if isinstance(m, WEIGHTED)]
    in_scope = set(weighted_all)
    if scope is not None:
        in_scope = {n for n, _ in scope.select(gm, WEIGHTED)}
    in_scope -= set(keep_float)
    kinds = {n.name: _kind(n, modules, in_scope) for n in gm.graph.nodes}
    plan = Placement(skipped=[n for n in weighted_all if n not in in_scope])
    marked: dict[str, str | None] = {}  # node -> None (own range) or the root it shares

    def fused_act(n: fx.Node) -> fx.Node | None:
        users = list(n.users)
        return users[0] if len(users) == 1 and _is_act(users[0], modules) else None

    def root_of(name: str) -> str:
        while marked.get(name):
            name = marked[name]  # type: ignore[assignment]
        return name

    def mark_input(a: fx.Node) -> None:
        if a.name in marked:
            return
        src = a.args[0] if a.args else None
        if kinds[a.name] == "pass" and isinstance(src, fx.Node) and not _is_fused(a):
            mark_input(src)
            marked[a.name] = root_of(src.name)
        else:
            marked[a.name] = None

    def _is_fused(a: fx.Node) -> bool:
        src = a.args[0] if a.args else None
        return (
            _is_act(a, modules)
            and isinstance(src, fx.Node)
            and kinds[src.name] in ("conv", "linear", "matmul", "add", "cat", "pool", "float")
            and fused_act(src) is a
        )

    memo: dict[str, bool] = {}

    def consumed_by_qop(n: fx.Node) -> bool:
        """Whether an integer kernel reads ``n`` (through pass-through ops): a conv, linear,
        matmul or pool, or an add / concat whose own output one of those reads. A chain of
        residual adds that only ever feeds LayerNorms (a pre-LN transformer's stream) stays
        float: quantizing it per tensor costs ViT 20 dB and no kernel would use it."""
        if n.name not in memo:
            memo[n.name] = False  # a DAG: no cycles, this only guards repeated work
            for u in n.users:
                k = kinds[u.name]
                if (
                    k in ("conv", "linear", "matmul", "pool")
                    or (k == "pass" and consumed_by_qop(u))
                    or (k in ("add", "cat") and consumed_by_qop(fused_act(u) or u))
                ):
                    memo[n.name] = True
                    break
        return memo[n.name]

    for n in gm.graph.nodes:
        k = kinds[n.name]
        if k not in ("conv", "linear", "matmul", "add", "cat", "pool"):
            continue
        out = fused_act(n) or n
        if k in ("add", "cat") and not consumed_by_qop(out):
            continue  # e.g. a transformer's residual add feeding LayerNorm: float is exact there
        if k in ("conv", "linear"):
            plan.weighted[n.name] = str(n.target)
        for a in _tensor_inputs(n, k):
            mark_input(a)
        if k in ALWAYS_OUT or consumed_by_qop(out):
            marked.setdefault(out.name, None)
    order = [n.name for n in gm.graph.nodes]
    plan.points = [n for n in order if n in marked]
    plan.shares = {n: root_of(n) for n, r in marked.items() if r is not None}
    return plan


def insert_quantizers(gm: fx.GraphModule, plan: Placement, bits: int = 8) -> dict[str, ActQuant]:
    """Insert an ``ActQuant`` after each placement point; returns them by node name."""
    nodes = {n.name: n for n in gm.graph.nodes}
    quants: dict[str, ActQuant] = {}
    for name in plan.points:
        node = nodes[name]
        q = ActQuant(name, bits, share_with=plan.shares.get(name))
        target = f"act_quant_{len(quants)}"
        gm.add_submodule(target, q)
        with gm.graph.inserting_after(node):
            qn = gm.graph.call_module(target, (node,))
        node.replace_all_uses_with(qn, delete_user_cb=lambda u, qn=qn: u is not qn)
        quants[name] = q
    gm.graph.lint()
    gm.recompile()
    return quants


def observe(
    gm: fx.GraphModule,
    quants: dict[str, ActQuant],
    batches: Sequence[Batch],
    *,
    histogram: bool,
    progress: Callable[[str], None] | None = None,
) -> dict[str, TensorStats]:
    """The one observation pass: ranges (and histograms when a method needs them)."""
    stats = {name: TensorStats() for name, q in quants.items() if q.share_with is None}
    current = {"batch": 0}

    def ranges(q: ActQuant, x: torch.Tensor) -> None:
        st = stats[q.name]
        if histogram:
            st.update(x)
            lo, hi = st.batch_lo, st.batch_hi
        else:
            lo, hi = st.update_range(x)
        if not (math.isfinite(lo) and math.isfinite(hi)):  # NaN/Inf anywhere shows in min/max
            raise DataError(
                f"the activation after {q.name!r} has NaN/Inf on calibration batch "
                f"{current['batch']}",
                fix="check the calibration data and the float model on it (an overflow in that "
                "layer, or an unnormalised input); exclude the layer with a Scope if it is "
                "meant to produce Inf",
            )

    try:
        for name, q in quants.items():
            q.observer = ranges if name in stats else None
        with torch.no_grad():
            for b in batches:
                current["batch"] = b.index
                b.run(gm)
                if progress is not None:
                    progress("calibration")
    finally:
        for q in quants.values():
            q.observer = None
    return stats


def constants(stats: dict[str, TensorStats]) -> dict[str, float]:
    """The activations that were one value on all calibration data (a zero-initialised residual
    branch, a dead channel group, a constant mask): ``convert`` quantizes them exactly."""
    return {name: st.lo for name, st in stats.items() if st.lo == st.hi}


def convert(
    gm: fx.GraphModule,
    plan: Placement,
    quants: dict[str, ActQuant],
    stats: dict[str, TensorStats],
    *,
    method: str,
    percentile: float,
    weight_bits: int | Callable[[nn.Module, ActQuant | None], int],
) -> fx.GraphModule:
    """Set every quantizer's range and swap Conv/Linear for integer-weight layers."""
    for name, q in quants.items():
        if q.share_with is None:
            st = stats[name]
            if st.lo == st.hi:  # a constant c: the range [min(c, 0), max(c, 0)] holds it exactly
                c = st.lo
                q.set_range(min(c, 0.0), max(c, 0.0) if c != 0 else 1.0)
            else:
                q.set_range(*choose_range(st, method, percentile=percentile, bits=q.bits))
    for q in quants.values():
        if q.share_with is not None:
            root = quants[q.share_with]
            q.scale.copy_(root.scale)
            q.zero_point.copy_(root.zero_point)
            q.enabled = True
    nodes = {n.name: n for n in gm.graph.nodes}
    modules = dict(gm.named_modules())
    for node_name, target in plan.weighted.items():
        src = nodes[node_name].args[0]
        qmod = modules.get(str(src.target)) if isinstance(src, fx.Node) else None
        in_quant = qmod if isinstance(qmod, ActQuant) else None
        bits = (
            weight_bits if isinstance(weight_bits, int) else weight_bits(modules[target], in_quant)
        )
        layer = QuantLayer(modules[target], bits)
        if isinstance(qmod, ActQuant):
            layer.set_input_scale(float(qmod.scale), int(qmod.zero_point))
        set_submodule(gm, target, layer)
    gm.recompile()
    return gm


class LeafInput(nn.Module):
    """A layer inside a submodule no capture could trace (kept whole, a leaf of the graph),
    quantized on its own: an activation quantizer on its input, then the layer (later the
    integer-weight ``QuantLayer``). Per-module quantization, no graph needed."""

    def __init__(self, name: str, layer: nn.Module) -> None:
        super().__init__()
        self.act = ActQuant(name)
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(self.act(x))


def wrap_leaves(gm: fx.GraphModule, leaves: Collection[str], scope: Scope | None,
                keep_float: Collection[str] = ()) -> dict[str, LeafInput]:  # fmt: skip
    """Wrap every Conv/Linear inside the ``leaves`` (module names, in ``scope``, not kept float)
    in a ``LeafInput``; returns them by the layer's name."""
    out: dict[str, LeafInput] = {}
    in_scope = None if scope is None else {n for n, _ in scope.select(gm, WEIGHTED)}
    for leaf in leaves:
        for sub, m in list(gm.get_submodule(leaf).named_modules()):
            name = f"{leaf}.{sub}" if sub else leaf
            if not isinstance(m, WEIGHTED) or name in keep_float:
                continue
            if in_scope is not None and name not in in_scope:
                continue
            wrapped = LeafInput(f"leaf:{name}", m)
            set_submodule(gm, name, wrapped)
            out[name] = wrapped
    return out


def convert_leaves(
    wrapped: dict[str, LeafInput], weight_bits: Callable[[nn.Module, ActQuant | None], int]
) -> list[QuantLayer]:
    """After the ranges are set: each wrapped layer becomes integer-weight; returns them."""
    layers: list[QuantLayer] = []
    for w in wrapped.values():
        q = QuantLayer(w.layer, weight_bits(w.layer, w.act))
        q.set_input_scale(float(w.act.scale), int(w.act.zero_point))
        w.layer = q
        layers.append(q)
    return layers
