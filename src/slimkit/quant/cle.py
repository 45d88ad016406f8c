"""Cross-layer equalisation and bias absorption: exact float rewrites that quantize better.

Nagel et al., "Data-Free Quantization Through Weight Equalization and Bias Correction", ICCV 2019
(sections 4.1-4.2). Both act on channels that travel from producer layers to consumer layers
through ops that commute with the rewrite; the model computes the same function in float::

    gm, report = equalize(fold_bn(model), data=calib, absorb=True)   # or PTQ(cle=True)
    print(report.summary())

YAML: ``- quant.ptq: {cle: true, bias_absorption: true}`` (absorption is the default).

**Scaling** (``scale=True``, the paper's CLE). A producer's output channel ``i`` is divided by
``s_i`` and its consumers' input channel ``i`` multiplied by it. With ``r1_i`` the largest
``|weight|`` of the producer's row ``i`` and ``r2_i`` that of the consumer's input channel ``i``,
``s_i = sqrt(r1_i * r2_i) / r2_i`` gives both ``sqrt(r1_i * r2_i)``. It passes ReLU, max / average
pooling, dropout and identity (``relu(x / s) = relu(x) / s`` for ``s > 0``); chains (conv ->
depthwise -> conv) are swept until the scales settle.

**Bias absorption** (``absorb=True``, needs ``data``). Where only additions and offset-preserving
ops (identity, dropout, max pooling, global average pooling) lie between producers and consumers,
each producer's mean output per channel (on ``data``) leaves its bias and the consumers' biases
take it back (``W c``). That centres every channel of a linear stream, which is what a per-tensor
activation quantizer needs: the paper absorbs high biases behind a ReLU (exact only where the
ReLU never clips, so not here); this is the same move on linear paths, where it is exact. Consumers
with zero padding are refused (their padding would see the offset).

Beyond the paper's pairs, channels are grouped wherever they are tied: all layers whose outputs
meet in an addition (a residual stream) share one scale and offset per channel, and every layer
reading the stream takes the inverse; ``r1`` / ``r2`` are then the largest over the group.

**ReLU6 is a barrier**, as are concatenation, reshapes that move the channel axis, any other op,
layers called more than once and grouped (non-depthwise) convs. ``relu6(x / s) != relu6(x) / s``
wherever ``x`` reaches 6, and on MobileNetV2 (random weights, 32 calibration images) 0.002 % to
25 % of the inputs of each ReLU6 lie above 6 (median per-channel maxima 4-17), so neither
scaling across it nor swapping it for ReLU keeps the float model. Its conv -> ReLU6 -> depthwise ->
ReLU6 -> conv chains are left alone and the report says why; its linear bottlenecks (the residual
streams) are what remains, and there bias absorption is what helps.

Measured (int8 in ONNX Runtime vs float, 7-bit weights per output channel; table in
``quant.ptq``): scaling on its own cost MobileNetV2 0.4 dB (simulated, 23.96 -> 23.53) and costs
ResNet-18 0.3 dB (42.56 -> 42.27): per-output-channel weight quantization already gives every row
its own range, which is what the paper's per-tensor setting gained, and the consumers' rows get
the new column ranges. After absorption it is neutral on MobileNetV2 (24.08 -> 24.16), so
``PTQ(cle=...)`` is off by default. Absorption gains MobileNetV2 0.1 dB as run (0.35 dB on 64 more
images, simulated; 0.45 dB without bias correction) and changes nothing where no stream qualifies
(ResNet-18: every stream passes a ReLU; BERT: LayerNorm), so it is on.
Supports Conv1d/2d/3d (groups 1 or depthwise) and Linear, after BatchNorm folding.
"""

from __future__ import annotations

import copy
import operator
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from slimkit.core.data import Batch, collect_batches
from slimkit.core.graph import call_counts, capture
from slimkit.errors import ConfigError
from slimkit.quant.primitives import is_depthwise

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_WEIGHTED = (*_CONVS, nn.Linear)
# ops that commute with a positive per-channel scale
_SCALE_MODULES = (nn.ReLU, nn.Identity, nn.Dropout, nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d,
                  nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d, nn.AdaptiveAvgPool1d,
                  nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool2d)  # fmt: skip
_SCALE_FUNCS: set[Any] = {F.relu, torch.relu, F.dropout, F.max_pool2d, F.avg_pool2d,
                          F.adaptive_avg_pool2d}  # fmt: skip
# ... and those that commute with a per-channel offset too (ReLU and zero-padded pools do not)
_SHIFT_MODULES = (nn.Identity, nn.Dropout, nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d,
                  nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
                  nn.AdaptiveMaxPool2d)  # fmt: skip
_ADD_FUNCS: set[Any] = {operator.add, torch.add}


@dataclass
class Group:
    """Channels tied together from ``producers`` (their outputs) to ``consumers`` (their inputs),
    module names; ``tensors`` are the graph nodes that carry them, channels on ``axis``."""

    producers: list[str]
    consumers: list[str]
    channels: int
    tensors: list[str] = field(default_factory=list)
    axis: int = 1
    spread_before: float = 1.0  # max / min over channels of the producers' row ranges r1
    spread_after: float = 1.0
    scaled: bool = False
    absorbed: str = "not asked"  # "yes", or why not


@dataclass
class CLEReport:
    """The channel groups found (and what was done to each), and the layers left alone, with why."""

    groups: list[Group] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (producer, reason)
    rounds: int = 0

    @property
    def pairs(self) -> list[tuple[str, str]]:
        """Every (producer, consumer) pair that was equalised."""
        return [(p, c) for g in self.groups if g.scaled for p in g.producers for c in g.consumers]

    def summary(self) -> str:
        scaled = [g for g in self.groups if g.scaled]
        absorbed = [g for g in self.groups if g.absorbed == "yes"]
        return (
            f"{len(self.groups)} channel groups: scaled {len(scaled)} ({len(self.pairs)} "
            f"producer-consumer pairs, {self.rounds} rounds), absorbed the mean of "
            f"{len(absorbed)}; {len(self.skipped)} layer outputs left alone"
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "groups": [vars(g) for g in self.groups],
            "skipped": [{"layer": n, "reason": r} for n, r in self.skipped],
            "rounds": self.rounds,
        }


def _describe(node: fx.Node, modules: dict[str, nn.Module]) -> str:
    if node.op == "call_module":
        return f"{type(modules[str(node.target)]).__name__} {str(node.target)!r}"
    if node.op in ("placeholder", "output"):
        return "the model's " + ("input" if node.op == "placeholder" else "output")
    return f"{getattr(node.target, '__name__', node.target)} {node.name!r}"


def _weight(m: nn.Module) -> torch.Tensor:
    w = m.weight
    assert isinstance(w, torch.Tensor)
    return w


class _Graph:
    """The graph questions grouping needs: which nodes are layers, which ops let channels pass."""

    def __init__(self, gm: fx.GraphModule) -> None:
        self.gm = gm
        self.modules = dict(gm.named_modules())
        self.order = {n: i for i, n in enumerate(gm.graph.nodes)}
        self.nodes = {n.name: n for n in gm.graph.nodes}
        self.calls = call_counts(gm)

    def module(self, n: fx.Node) -> nn.Module | None:
        return self.modules.get(str(n.target)) if n.op == "call_module" else None

    def weighted(self, n: fx.Node) -> nn.Module | None:
        m = self.module(n)
        return m if isinstance(m, _WEIGHTED) else None

    def is_add(self, n: fx.Node) -> bool:
        return (
            n.op == "call_function"
            and n.target in _ADD_FUNCS
            and all(isinstance(a, fx.Node) for a in n.args[:2])
            and not n.kwargs
        )

    def global_flatten(self, n: fx.Node) -> bool:
        """``flatten(x, 1)`` of a global pool: (B, C, 1, 1) -> (B, C) keeps the channels."""
        src = n.args[0] if n.args else None
        if not isinstance(src, fx.Node):
            return False
        m = self.module(n)
        if m is not None:
            flat = isinstance(m, nn.Flatten) and m.start_dim == 1 and m.end_dim == -1
        else:
            is_fn = n.op == "call_function" and n.target is torch.flatten
            is_method = n.op == "call_method" and n.target == "flatten"
            dims = [*n.args[1:], *(n.kwargs.get(k) for k in ("start_dim", "end_dim"))]
            dims = [d for d in dims if d is not None]
            flat = (is_fn or is_method) and dims[:1] == [1] and dims[1:] in ([], [-1])
        pool = self.module(src)
        one = isinstance(pool, (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)) and (
            pool.output_size in (1, (1, 1))
        )
        return bool(flat and one)

    def passes(self, n: fx.Node) -> bool:
        """Does a positive per-channel scale pass through ``n`` unchanged?"""
        if self.is_add(n) or self.global_flatten(n):
            return True
        m = self.module(n)
        if m is not None:
            return isinstance(m, _SCALE_MODULES)
        if n.op == "call_function":
            return n.target in _SCALE_FUNCS
        return n.op == "call_method" and n.target in ("relu", "relu_")

    def group_of(self, start: fx.Node) -> tuple[Group | None, str]:
        """The group reached from producer ``start``, or None and why it cannot be rewritten."""
        producers: dict[str, fx.Node] = {}
        consumers: dict[str, fx.Node] = {}
        seen: set[fx.Node] = set()
        todo = [start]
        while todo:
            n = todo.pop()
            if n in seen:
                continue
            seen.add(n)
            if self.weighted(n) is not None:
                producers[str(n.target)] = n
            else:  # a pass-through op: what it reads is tied to it
                for a in n.all_input_nodes:
                    if self.weighted(a) is None and not self.passes(a):
                        return None, f"joins {_describe(a, self.modules)}"
                    todo.append(a)
            for u in n.users:
                if self.passes(u):
                    todo.append(u)
                elif self.weighted(u) is not None and u.args and u.args[0] is n:
                    consumers[str(u.target)] = u
                else:
                    return None, f"feeds {_describe(u, self.modules)}"
        for name in [*producers, *consumers]:
            if self.calls.get(name, 0) != 1:
                return None, f"{name!r} is called more than once"
        channels = {int(_weight(self.modules[p]).shape[0]) for p in producers}
        for c in consumers:
            m = self.modules[c]
            if isinstance(m, _CONVS) and m.groups != 1 and not is_depthwise(m):
                return None, f"feeds the grouped conv {c!r}"
            channels.add(int(m.in_channels) if is_depthwise(m) else int(_weight(m).shape[1]))
        if len(channels) != 1:
            return None, f"channel counts differ along the way: {sorted(channels)}"
        # the channel axis: 1 after a conv, last after a Linear, either once flat (B, C)
        axis: dict[fx.Node, str] = {}
        for n in sorted(seen, key=self.order.__getitem__):
            if n in producers.values():
                axis[n] = "last" if isinstance(self.weighted(n), nn.Linear) else "1"
            elif self.global_flatten(n):
                axis[n] = "flat"
            else:
                kinds = {axis[a] for a in n.all_input_nodes}
                if len(kinds) != 1:
                    return None, f"adds tensors whose channels lie on different axes at {n.name!r}"
                axis[n] = kinds.pop()
        for u in consumers.values():
            linear = isinstance(self.weighted(u), nn.Linear)
            if axis[u.args[0]] not in (("last", "flat") if linear else ("1",)):  # type: ignore[index]
                return None, f"reaches {str(u.target)!r} on another channel axis"
        if not consumers:
            return None, "reaches no layer that could take the inverse"
        group = Group(sorted(producers), sorted(consumers), channels.pop())
        group.tensors = [n.name for n in sorted(seen, key=self.order.__getitem__)]
        group.axis = -1 if {axis[n] for n in seen} - {"flat"} == {"last"} else 1
        return group, ""

    def shift_problem(self, g: Group) -> str | None:
        """None when a per-channel offset on the group moves into the consumers' biases exactly."""
        for t in g.tensors:
            n = self.nodes[t]
            if self.weighted(n) is not None or self.is_add(n) or self.global_flatten(n):
                continue
            if not isinstance(self.module(n), _SHIFT_MODULES):
                return f"passes {_describe(n, self.modules)}, which an offset does not commute with"
        for c in g.consumers:
            m = self.modules[c]
            pad = getattr(m, "padding", 0)
            if pad == "same" or (isinstance(pad, tuple) and any(p != 0 for p in pad)):
                return f"feeds the zero-padded conv {c!r}, whose padding would see the offset"
        return None


def _row_range(m: nn.Module) -> torch.Tensor:
    """Largest |weight| of each output channel."""
    w = _weight(m).detach()
    return w.abs().reshape(w.shape[0], -1).amax(1).double()


def _col_range(m: nn.Module) -> torch.Tensor:
    """Largest |weight| reading each input channel (a depthwise conv: its channel's kernel)."""
    w = _weight(m).detach()
    if is_depthwise(m):
        return w.abs().reshape(w.shape[0], -1).amax(1).double()
    return w.abs().transpose(0, 1).reshape(w.shape[1], -1).amax(1).double()


def _balance(g: Group, modules: dict[str, nn.Module]) -> tuple[torch.Tensor, float]:
    """The paper's scales for one group, and the spread (max / min) of the producers' ranges."""
    r1 = torch.stack([_row_range(modules[p]) for p in g.producers]).amax(0)
    r2 = torch.stack([_col_range(modules[c]) for c in g.consumers]).amax(0)
    ok = (r1 > 0) & (r2 > 0)  # a dead channel stays as it is
    s = torch.where(ok, torch.sqrt(r1 * r2) / r2.clamp_min(1e-30), torch.ones_like(r1))
    spread = float(r1[ok].max() / r1[ok].min()) if bool(ok.any()) else 1.0
    return s, spread


def _bias(m: nn.Module) -> torch.Tensor:
    if not isinstance(m.bias, torch.Tensor):
        w = _weight(m)
        m.bias = nn.Parameter(torch.zeros(w.shape[0], dtype=w.dtype), requires_grad=w.requires_grad)
    return m.bias  # type: ignore[return-value]


def _scale(g: Group, modules: dict[str, nn.Module], s: torch.Tensor) -> None:
    """Divide the producers' output channels by ``s``; multiply the consumers' inputs by it."""
    for name in g.producers:
        m = modules[name]
        w = _weight(m)
        w.copy_((w.double() / s.view((-1,) + (1,) * (w.dim() - 1))).to(w.dtype))
        if isinstance(m.bias, torch.Tensor):
            m.bias.copy_((m.bias.double() / s).to(m.bias.dtype))
    for name in g.consumers:
        m = modules[name]
        w = _weight(m)
        shape = [1] * w.dim()
        shape[0 if is_depthwise(m) else 1] = -1
        w.copy_((w.double() * s.view(shape)).to(w.dtype))


def _producer_means(
    gm: fx.GraphModule, groups: list[Group], data: Sequence[Batch]
) -> dict[str, torch.Tensor]:
    """Each producer's mean output per channel over ``data``."""
    modules = dict(gm.named_modules())
    sums: dict[str, list[Any]] = {}

    def hook(name: str, axis: int) -> Any:
        def fn(_m: nn.Module, _args: Any, out: torch.Tensor) -> None:
            ax = axis % out.dim()
            flat = out.detach().transpose(0, ax).reshape(out.shape[ax], -1)
            entry = sums.setdefault(name, [0.0, 0])
            entry[0] = entry[0] + flat.sum(1, dtype=torch.float64)
            entry[1] += flat.shape[1]

        return fn

    handles = [modules[p].register_forward_hook(hook(p, g.axis)) for g in groups
               for p in g.producers]  # fmt: skip
    try:
        for b in data:
            b.run(gm)
    finally:
        for h in handles:
            h.remove()
    return {p: total / n for p, (total, n) in sums.items()}


def _absorb(graph: _Graph, g: Group, means: dict[str, torch.Tensor]) -> None:
    """Producers subtract their mean output; each consumer adds back what reaches its input."""
    offset: dict[str, torch.Tensor] = {}  # node -> per-channel offset removed from it
    for t in g.tensors:
        n = graph.nodes[t]
        if str(n.target) in g.producers and graph.weighted(n) is not None:
            mu = means[str(n.target)]
            b = _bias(graph.modules[str(n.target)])
            b.copy_((b.double() - mu).to(b.dtype))
            offset[t] = mu
        else:  # an addition sums its inputs' offsets; any other op keeps its input's
            offset[t] = sum((offset[a.name] for a in n.all_input_nodes), torch.zeros(g.channels))
    for c in g.consumers:
        node = next(n for n in graph.gm.graph.nodes if n.op == "call_module" and n.target == c)
        m = graph.modules[c]
        off = offset[node.args[0].name]
        w = _weight(m).detach().double()
        if is_depthwise(m):
            back = w.reshape(w.shape[0], -1).sum(1) * off
        else:
            back = w.reshape(w.shape[0], w.shape[1], -1).sum(2) @ off  # (out, in) @ (in,)
        b = _bias(m)
        b.copy_((b.double() + back).to(b.dtype))


def equalize(
    model: nn.Module,
    *,
    scale: bool = True,
    absorb: bool = False,
    data: Any = None,
    rounds: int = 20,
    tolerance: float = 1e-3,
    inplace: bool = False,
) -> tuple[fx.GraphModule, CLEReport]:
    """Equalise (``scale``) and centre (``absorb``, from ``data``) the channel groups of
    ``model``, whose BatchNorms are already folded; see the module docstring.

    Returns the rewritten ``fx.GraphModule`` (the same function in float, up to rounding) and the
    report. Scaling sweeps all groups up to ``rounds`` times, until no scale moves by more than
    ``tolerance`` (relative). ``data`` is calibration data (tensors or batches) for ``absorb``.
    """
    if absorb and data is None:
        raise ConfigError(
            "bias absorption needs data to measure each channel's mean",
            fix="pass data=calibration batches, or absorb=False",
        )
    src = model if inplace else copy.deepcopy(model)
    gm = src if isinstance(src, fx.GraphModule) else capture(src, method="fx")
    graph = _Graph(gm)
    report = CLEReport()
    done: set[str] = set()
    for n in gm.graph.nodes:
        if graph.weighted(n) is None or str(n.target) in done:
            continue
        group, why = graph.group_of(n)
        if group is None:
            report.skipped.append((str(n.target), why))
            continue
        done.update(group.producers)
        report.groups.append(group)
    with torch.no_grad():
        if absorb:
            listed = isinstance(data, (list, tuple)) and all(isinstance(b, Batch) for b in data)
            batches = data if listed else collect_batches(data, what="calibration data")
            ok: list[Group] = []
            for g in report.groups:
                problem = graph.shift_problem(g)
                g.absorbed = problem or "yes"
                if problem is None:
                    ok.append(g)
            means = _producer_means(gm, ok, batches) if ok else {}  # no pass when none qualify
            for g in ok:
                _absorb(graph, g, means)
        for g in report.groups:
            g.spread_before = g.spread_after = _balance(g, graph.modules)[1]
        if scale:
            for r in range(rounds):
                moved = 0.0
                for g in report.groups:
                    s, _ = _balance(g, graph.modules)
                    _scale(g, graph.modules, s)
                    moved = max(moved, float(s.log().abs().max()))
                report.rounds = r + 1
                if moved < tolerance:
                    break
            for g in report.groups:
                g.scaled = True
                g.spread_after = _balance(g, graph.modules)[1]
    gm.recompile()
    return gm, report
