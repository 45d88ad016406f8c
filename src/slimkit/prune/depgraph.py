"""Dependency graph: which tensor dimensions of which parameters must lose the same channels.

Removing output channel ``c`` of a conv also removes input column ``c`` of every layer reading it,
the BatchNorm entries of that channel, the partner channel of a residual add, and so on. A
:class:`Group` collects every ``(module, param, dim, positions)`` that moves together; pruning
removes whole *units* of a group (a channel, or an attention head of ``head_dim`` rows).

The graph is built on slimkit's fx capture with shapes from ``ShapeProp``; a model fx cannot trace
(Hugging Face transformers, say) is captured with ``torch.export`` on the example inputs instead,
where layers appear as aten ops (``aten.linear`` on a Linear's weight) and an attention head shows
up as a view that splits a projection's width into (heads, head_dim). Each traced tensor
carries a *layout*: for the dimensions that hold prunable channels, the segments (group, units,
positions per unit) laid end to end along that dimension, so ``torch.cat`` shifts offsets and a
flatten of (C, H, W) into a Linear gives each channel H*W consecutive columns. An op the builder
does not understand marks the groups it touches unprunable with a reason naming the node and its
module; nothing is ever guessed::

    graph = build_depgraph(model, example_inputs=(x,))
    print(graph.summary())      # "12 groups, 9 prunable; unprunable: 10 channels of fc: ..."
"""

from __future__ import annotations

import math
import operator
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal, cast

import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from slimkit.core.graph import capture
from slimkit.errors import DataError, GraphCaptureError, SlimkitError
from slimkit.prune.hf_attention import HEAD_COUNT_ATTRS, head_layout

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CONVTS = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
_BNS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_PASS_MODULES = (
    nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh, nn.Hardswish, nn.Hardsigmoid,
    nn.LeakyReLU, nn.ELU, nn.Mish, nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d,
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d, nn.Upsample,
)  # fmt: skip
_PASS_FUNCS = {
    "relu", "relu_", "relu6", "gelu", "silu", "sigmoid", "tanh", "hardswish", "hardsigmoid",
    "leaky_relu", "elu", "mish", "dropout", "contiguous", "clone", "detach", "neg", "abs", "exp",
    "sqrt", "rsqrt", "clamp", "clamp_min", "clamp_max", "hardtanh", "float", "to", "type_as",
    "max_pool1d", "max_pool2d", "max_pool3d", "avg_pool1d", "avg_pool2d", "avg_pool3d",
    "adaptive_avg_pool1d", "adaptive_avg_pool2d", "adaptive_avg_pool3d", "adaptive_max_pool2d",
    "interpolate", "pow", "square", "_to_copy", "alias",
}  # fmt: skip
_ELEMENTWISE = {
    "add", "sub", "mul", "truediv", "div", "iadd", "isub", "imul", "itruediv", "add_", "mul_",
    "sub_", "maximum", "minimum", "where", "masked_fill", "floordiv", "rsub",
}  # fmt: skip
_SHAPE_QUERIES = {
    "size", "dim", "getattr", "numel", "sym_size", "sym_numel", "sym_stride",
    "_assert_tensor_metadata", "_assert_scalar",
}  # fmt: skip
# aten ops of a torch.export graph that stand for a call of a layer: (layer types, index of the
# weight argument, index of the input argument); the layer is the innermost module on the stack
_LAYER_OPS: dict[str, tuple[tuple[type[nn.Module], ...], int, int]] = {
    "linear": ((nn.Linear,), 1, 0),
    "conv1d": (_CONVS, 1, 0),
    "conv2d": (_CONVS, 1, 0),
    "conv3d": (_CONVS, 1, 0),
    "embedding": ((nn.Embedding,), 0, 1),
    "layer_norm": ((nn.LayerNorm,), 2, 0),
    "group_norm": ((nn.GroupNorm,), 2, 0),
    "batch_norm": (_BNS, 1, 0),
}


@dataclass(frozen=True)
class Member:
    """Positions ``offset + u * expand + [0, expand)`` of ``dim`` of ``module.param`` belong to unit
    ``u`` of the group. ``role``: ``out`` produces the channel, ``in`` reads it, ``norm`` is
    channel-wise (BatchNorm, depthwise conv, a per-channel scale)."""

    module: str
    param: str
    dim: int
    offset: int
    expand: int
    role: str

    @property
    def fqn(self) -> str:
        return f"{self.module}.{self.param}" if self.module else self.param

    def positions(self, units: Sequence[int]) -> list[int]:
        return [self.offset + u * self.expand + k for u in units for k in range(self.expand)]


@dataclass
class Group:
    """Coupled dimensions pruned together, ``units`` wide. ``reasons`` empty means prunable;
    ``lossy`` means a normalisation over channels (LayerNorm) sees the width, so removing even
    all-zero channels changes its statistics."""

    gid: int
    units: int
    kind: str  # "channel" or "head"
    members: list[Member] = field(default_factory=list)
    reasons: list[str] = field(default_factory=list)
    lossy: bool = False

    @property
    def prunable(self) -> bool:
        return not self.reasons

    def modules(self, role: str | None = None) -> list[str]:
        names = [m.module for m in self.members if role is None or m.role == role]
        return list(dict.fromkeys(names))

    def describe(self) -> str:
        what = "heads" if self.kind == "head" else "channels"
        return f"{self.units} {what} of {', '.join(self.modules('out')) or '?'}"


@dataclass
class DepGraph:
    """All channel groups of a model; ``unprunable()`` lists the refused ones with reasons."""

    groups: list[Group]
    capture: str = "fx"  # how the model was captured: "fx" or "torch.export"

    def prunable(self) -> list[Group]:
        return [g for g in self.groups if g.prunable]

    def unprunable(self) -> list[Group]:
        return [g for g in self.groups if not g.prunable]

    def groups_of(self, module: str) -> list[Group]:
        return [g for g in self.groups if module in g.modules()]

    def summary(self) -> str:
        text = f"{len(self.groups)} groups, {len(self.prunable())} prunable"
        bad = [f"{g.describe()}: {'; '.join(g.reasons)}" for g in self.unprunable()]
        return text + ("; unprunable: " + " | ".join(bad) if bad else "")


Seg = tuple[int | None, int, int]  # (group id or None for fixed positions, units, expand)
Layout = dict[int, list[Seg]]  # tensor dim -> segments laid end to end


def attention_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Modules with ``q_proj``/``k_proj``/``v_proj``/``out_proj`` Linear children and an int
    ``head_dim``: attention whose head count follows ``q_proj``'s width, pruned by whole heads."""
    found = {}
    for name, m in model.named_modules():
        parts = [getattr(m, p, None) for p in ("q_proj", "k_proj", "v_proj", "out_proj")]
        if all(isinstance(p, nn.Linear) for p in parts) and isinstance(
            getattr(m, "head_dim", None), int
        ):
            found[name] = m
    return found


class _Builder:
    def __init__(self, gm: fx.GraphModule, attn: dict[str, nn.Module], model: nn.Module) -> None:
        self.gm = gm
        self.modules = dict(gm.named_modules())  # call_module targets
        self.owners = dict(model.named_modules())  # the model's layers, by qualified name
        self.top = type(model).__name__
        self.attn = attn
        self.parent: dict[int, int] = {}
        self.groups: dict[int, Group] = {}
        self.made_by: dict[str, int] = {}  # producer module -> its output group (shared calls)
        self.convt_bias: set[str] = set()  # transposed convs whose bias joined their group
        self.lay: dict[fx.Node, Layout] = {}
        self.parts: dict[fx.Node, list[Layout]] = {}  # chunk / split: each piece's layout

    # -- groups ---------------------------------------------------------------------------------
    def new(self, units: int, kind: str = "channel") -> int:
        gid = len(self.parent)
        self.parent[gid] = gid
        self.groups[gid] = Group(gid, units, kind)
        return gid

    def find(self, g: int) -> int:
        while self.parent[g] != g:
            self.parent[g] = self.parent[self.parent[g]]
            g = self.parent[g]
        return g

    def union(self, a: int, b: int, why: str) -> int:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return ra
        ga, gb = self.groups[ra], self.groups[rb]
        if ga.units != gb.units or ga.kind != gb.kind:
            ga.reasons.append(f"couples {ga.units} with {gb.units} units at {why}")
        self.parent[rb] = ra
        ga.members += gb.members
        ga.reasons += gb.reasons
        ga.lossy |= gb.lossy
        del self.groups[rb]
        return ra

    def coarsen(self, gid: int, factor: int) -> None:
        """Make every ``factor`` consecutive units of a group one unit (a head of channels)."""
        root = self.find(gid)
        g = self.groups[root]
        g.units //= factor
        g.kind = "head"
        g.members = [replace(m, expand=m.expand * factor) for m in g.members]
        for lay in self.lay.values():
            for d, segs in lay.items():
                lay[d] = [
                    (s, u // factor, e * factor) if s is not None and self.find(s) == root else
                    (s, u, e)
                    for s, u, e in segs
                ]  # fmt: skip

    def split_units(self, gid: int, parts: int) -> None:
        """Make unit ``u`` of a group the ``parts`` channels ``u, u + n, u + 2n ...`` (n = units /
        parts): the pieces of a chunk along the channels are computed together (GLU: a * s(b))."""
        root = self.find(gid)
        g = self.groups[root]
        n = g.units // parts
        g.members = [replace(m, offset=m.offset + k * n * m.expand)
                     for m in g.members for k in range(parts)]  # fmt: skip
        g.units = n
        for lay in self.lay.values():
            for d, segs in lay.items():
                lay[d] = [piece for s, u, e in segs for piece in (
                    [(s, u // parts, e)] * parts if s is not None and self.find(s) == root
                    else [(s, u, e)])]  # fmt: skip

    def add(self, gid: int | None, member: Member) -> None:
        if gid is not None:
            self.groups[self.find(gid)].members.append(member)

    def fail(self, lay: Layout | None, reason: str, dims: Sequence[int] | None = None) -> None:
        for d, segs in (lay or {}).items():
            if dims is None or d in dims:
                for gid, _, _ in segs:
                    if gid is not None:
                        g = self.groups[self.find(gid)]
                        if reason not in g.reasons:
                            g.reasons.append(reason)

    # -- helpers --------------------------------------------------------------------------------
    @staticmethod
    def shape(n: Any) -> tuple[int, ...] | None:
        meta = n.meta.get("tensor_meta") if isinstance(n, fx.Node) else None
        return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None

    @staticmethod
    def scope(node: fx.Node) -> str:
        """The innermost module whose forward emitted ``node`` ("" at the top level)."""
        stack = node.meta.get("nn_module_stack") or {}
        if not stack:
            return str(node.target) if node.op == "call_module" else ""
        key, value = next(reversed(stack.items()))
        return str(value[0]) if isinstance(value, tuple) else str(key)  # export: (path, type)

    def where(self, node: fx.Node) -> str:
        mod = self.scope(node)
        return f"{_op_name(node.target)} at node {node.name!r} in module {mod or self.top!r}"

    def inputs(self, node: fx.Node) -> Iterator[fx.Node]:
        for a in node.all_input_nodes:
            if a in self.lay:
                yield a

    def fail_inputs(self, node: fx.Node, what: str) -> None:
        for a in self.inputs(node):
            self.fail(self.lay[a], f"{what}: {self.where(node)}")

    def segs_at(self, n: Any, d: int) -> list[Seg]:
        shape = self.shape(n)
        if isinstance(n, fx.Node) and n in self.lay and d in self.lay[n]:
            return self.lay[n][d]
        return [(None, shape[d], 1)] if shape is not None else []

    # -- the walk -------------------------------------------------------------------------------
    def run(self) -> DepGraph:
        for node in self.gm.graph.nodes:
            try:
                if node.op == "call_module":
                    self.call_module(node)
                elif node.op in ("call_function", "call_method"):
                    self.call_function(node)
            except SlimkitError:
                raise
            except Exception as e:  # an op with arguments slimkit cannot follow (a dim computed
                # at run time): every group reaching it is refused, never guessed
                self.lay.pop(node, None)
                self.fail_inputs(node, f"cannot follow ({type(e).__name__}: {e})"[:200])
            if node.op == "output":
                self.fail_inputs(node, "reaches the model output")
            if node in self.lay:
                self.lay[node] = {d: s for d, s in self.lay[node].items() if s}
        return self.finish()

    def finish(self) -> DepGraph:
        # a param/dim listed in two groups (a layer called twice) ties those groups together
        seen: dict[tuple[str, int, int, int], int] = {}
        for gid in list(self.groups):
            if gid not in self.groups:
                continue
            for m in list(self.groups[gid].members):
                key = (m.fqn, m.dim, m.offset, m.expand)
                if key in seen and self.find(seen[key]) != self.find(gid):
                    gid = self.union(seen[key], gid, f"shared parameter {m.fqn}")
                seen[key] = gid
        out = []
        for g in self.groups.values():
            g.members = list(dict.fromkeys(g.members))
            out.append(g)
        return DepGraph(out)

    def pass_through(self, node: fx.Node, src: Any) -> None:
        if isinstance(src, fx.Node) and src in self.lay:
            self.lay[node] = dict(self.lay[src])

    def call_module(self, node: fx.Node) -> None:
        name = str(node.target)
        self.layer(node, name, self.modules[name], node.args[0] if node.args else None)

    def layer_op(self, node: fx.Node, fname: str) -> None:
        """An aten op of a torch.export graph that is the call of one of the model's layers."""
        types, w_at, x_at = _LAYER_OPS[fname]
        name = self.scope(node)
        m = self.owners.get(name)
        w = node.args[w_at] if len(node.args) > w_at else None
        weight = f"{name}.weight" if name else "weight"
        own = w.target == weight if isinstance(w, fx.Node) else w is getattr(m, "weight", 0)
        if not (isinstance(m, types) and own):  # (a BatchNorm without affine has weight None)
            return self.fail_inputs(node, f"{fname} on a weight that is not its layer's")
        return self.layer(node, name, m, node.args[x_at])

    def layer(self, node: fx.Node, name: str, m: nn.Module, x: Any) -> None:
        lay = self.lay.get(x, {}) if isinstance(x, fx.Node) else {}
        shape = self.shape(x)
        if name in self.attn:
            return self.attention(node, name, m, lay, shape)
        if isinstance(m, _CONVS):
            return self.conv(node, name, m, lay)
        if isinstance(m, _CONVTS) and m.groups == 1:  # weight (in, out, *kernel)
            self.fail({d: s for d, s in lay.items() if d != 1},
                      f"transposed conv mixes positions: {self.where(node)}")  # fmt: skip
            self.read(lay.get(1, []), name, "weight", 0)
            gid = self.produce(name, m.out_channels, m, dim=1)
            if m.bias is not None and name not in self.convt_bias:
                self.add(gid, Member(name, "bias", 0, 0, 1, "out"))
                self.convt_bias.add(name)
            self.lay[node] = {1: [(gid, m.out_channels, 1)]}
            return None
        if isinstance(m, nn.Linear):
            rank = len(shape) if shape else 2
            for d, segs in lay.items():
                if d == rank - 1:
                    self.read(segs, name, "weight", 1)
            out = {d: s for d, s in lay.items() if d != rank - 1}
            out[rank - 1] = [(self.produce(name, m.out_features, m), m.out_features, 1)]
            self.lay[node] = out
            return None
        if isinstance(m, nn.Embedding):
            self.fail(lay, f"indexes an embedding: {self.where(node)}")
            rank = len(self.shape(node) or (0, 0))
            self.lay[node] = {
                rank - 1: [(self.produce(name, m.embedding_dim, m, 1), m.embedding_dim, 1)]
            }
            return None
        if isinstance(m, _BNS):
            self.channelwise(
                lay.get(1, []), name, m, ("weight", "bias", "running_mean", "running_var")
            )
            self.lay[node] = dict(lay)
            return None
        if isinstance(m, nn.LayerNorm):
            rank = len(shape) if shape else 0
            normed = list(range(rank - len(m.normalized_shape), rank))
            if len(normed) != 1:
                self.fail(lay, f"LayerNorm over several dims: {self.where(node)}", normed)
            else:
                self.channelwise(lay.get(normed[0], []), name, m, ("weight", "bias"), lossy=True)
            self.lay[node] = dict(lay)
            return None
        if isinstance(m, nn.GroupNorm):
            if m.num_groups not in (1, m.num_channels):
                self.fail(lay, f"GroupNorm with {m.num_groups} groups: {self.where(node)}", [1])
            lossy = m.num_groups == 1
            self.channelwise(lay.get(1, []), name, m, ("weight", "bias"), lossy=lossy)
            self.lay[node] = dict(lay)
            return None
        if isinstance(m, nn.GLU):
            return self.chunk(node, x, "glu", glu_dim=m.dim)
        if isinstance(m, nn.PReLU):
            if m.num_parameters == 1:  # one slope shared by every channel
                return self.pass_through(node, x)
            self.channelwise(lay.get(1, []), name, m, ("weight",))
            self.lay[node] = dict(lay)
            return None
        if isinstance(m, _PASS_MODULES):
            return self.pass_through(node, x)
        if isinstance(m, nn.Flatten):
            return self.flatten(node, x, m.start_dim, m.end_dim)
        if isinstance(m, (nn.Softmax, nn.LogSoftmax)):
            return self.softmax(node, x, m.dim)
        return self.fail_inputs(node, f"passes through unsupported layer {type(m).__name__}")

    def produce(self, name: str, units: int, m: nn.Module, dim: int = 0) -> int:
        if name in self.made_by:
            return self.made_by[name]
        gid = self.new(units)
        self.add(gid, Member(name, "weight", dim, 0, 1, "out"))
        if dim == 0 and isinstance(getattr(m, "bias", None), torch.Tensor):
            self.add(gid, Member(name, "bias", 0, 0, 1, "out"))
        self.made_by[name] = gid
        return gid

    def read(self, segs: list[Seg], name: str, param: str, dim: int) -> None:
        offset = 0
        for gid, units, expand in segs:
            self.add(gid, Member(name, param, dim, offset, expand, "in"))
            offset += units * expand

    def channelwise(
        self, segs: list[Seg], name: str, m: nn.Module, params: Sequence[str], lossy: bool = False
    ) -> None:
        have = [p for p in params if isinstance(getattr(m, p, None), torch.Tensor)]
        if not have:  # nothing to slice would leave the layer's width stale
            self.fail({0: segs}, f"{type(m).__name__} {name!r} has no per-channel tensor to slice")
        offset = 0
        for gid, units, expand in segs:
            for p in have:
                self.add(gid, Member(name, p, 0, offset, expand, "norm"))
            if gid is not None and lossy:
                self.groups[self.find(gid)].lossy = True
            offset += units * expand

    def conv(self, node: fx.Node, name: str, m: nn.Module, lay: Layout) -> None:
        assert isinstance(m, _CONVS)
        self.fail(
            {d: s for d, s in lay.items() if d != 1}, f"conv mixes positions: {self.where(node)}"
        )
        segs = lay.get(1, [])
        if m.groups == 1:
            self.read(segs, name, "weight", 1)
            self.lay[node] = {1: [(self.produce(name, m.out_channels, m), m.out_channels, 1)]}
        elif m.groups == m.in_channels == m.out_channels:  # depthwise: channel c in -> c out
            self.channelwise(segs, name, m, ("weight", "bias"))
            self.lay[node] = {1: list(segs)}
        else:
            self.grouped_conv(node, name, m, segs)

    def grouped_conv(self, node: fx.Node, name: str, m: nn.Module, segs: list[Seg]) -> None:
        """Groups of a grouped conv (ResNeXt, RegNet) are pruned whole: unit ``u`` is input
        channels ``u * in/groups ...`` with their producers, and output channels ``u * out/groups
        ...`` with their readers, in one group; the conv keeps its per-group widths."""
        assert isinstance(m, _CONVS)
        g_in, g_out = m.in_channels // m.groups, m.out_channels // m.groups
        gid, units, expand = segs[0] if len(segs) == 1 else (None, 0, 1)
        factor = g_in // expand if g_in % expand == 0 else 0
        if gid is None or factor == 0 or units % factor or units // factor != m.groups:
            why = "its input is not one channel group whose units fit the conv groups"
            self.fail({1: segs}, f"grouped conv ({m.groups} groups): {why}: {self.where(node)}")
            return
        if factor > 1:  # every `factor` channels of the input group become one unit
            self.coarsen(gid, factor)
        self.add(gid, Member(name, "weight", 0, 0, g_out, "out"))
        if m.bias is not None:
            self.add(gid, Member(name, "bias", 0, 0, g_out, "out"))
        self.lay[node] = {1: [(self.find(gid), m.groups, g_out)]}

    def attention(
        self, node: fx.Node, name: str, m: nn.Module, lay: Layout, shape: tuple[int, ...] | None
    ) -> None:
        rank = len(shape) if shape else 3
        kv = [a for a in node.args[1:3] if isinstance(a, fx.Node)]
        if any(a is not node.args[0] for a in kv):  # cross-attention: k / v read other tensors
            return self.fail_inputs(node, "attention with separate key / value inputs")
        self.fail(
            {d: s for d, s in lay.items() if d != rank - 1},
            f"attention mixes positions: {self.where(node)}",
        )
        for p in ("q_proj", "k_proj", "v_proj"):
            self.read(lay.get(rank - 1, []), f"{name}.{p}", "weight", 1)
        q, out = cast(nn.Linear, m.q_proj), cast(nn.Linear, m.out_proj)
        head_dim = int(cast(int, m.head_dim))
        heads = self.new(q.out_features // head_dim, "head")
        for p in ("q_proj", "k_proj", "v_proj"):
            lin = getattr(m, p)
            self.add(heads, Member(f"{name}.{p}", "weight", 0, 0, head_dim, "out"))
            if lin.bias is not None:
                self.add(heads, Member(f"{name}.{p}", "bias", 0, 0, head_dim, "out"))
        self.add(heads, Member(f"{name}.out_proj", "weight", 1, 0, head_dim, "in"))
        for attr in HEAD_COUNT_ATTRS:
            if isinstance(getattr(m, attr, None), int):
                self.groups[heads].reasons.append(
                    f"attention {name!r} stores its head count in {attr!r}, so pruned heads "
                    "would not match its forward"
                )
        gid = self.produce(f"{name}.out_proj", out.out_features, out)
        result: Layout = {rank - 1: [(gid, out.out_features, 1)]}
        if self.shape(node) is not None:
            self.lay[node] = result
            return None
        # (output, weights) as nn.MultiheadAttention returns: the output is item 0
        if all(u.op == "call_function" and _op_name(u.target) == "getitem"
               and u.args[1] in (0, 1) for u in node.users):  # fmt: skip
            self.parts[node] = [result, {}]
        else:
            self.fail(result, f"uses attention's outputs as a tuple: {self.where(node)}")
        return None

    # -- functions and methods ------------------------------------------------------------------
    def call_function(self, node: fx.Node) -> None:
        t = node.target
        fname = _op_name(t)
        args, kw = node.args, node.kwargs
        x = args[0] if args else kw.get("input")
        if fname in _SHAPE_QUERIES:
            return None
        if fname in ("chunk", "split", "split_with_sizes", "glu"):
            return self.chunk(node, x, fname)
        if self.shape(node) is None and fname != "getitem":  # a tuple (chunk, split, max)
            return self.fail_inputs(node, f"returns several tensors from {fname}")
        if fname in _LAYER_OPS and isinstance(t, torch._ops.OpOverload):
            return self.layer_op(node, fname)
        if fname in ("matmul", "bmm", "mm"):
            return self.matmul(node)
        if fname == "scaled_dot_product_attention":
            return self.sdpa(node)
        if fname == "select":
            return self.select(node, x)
        if fname == "slice":
            return self.slice(node, x)
        if fname == "expand":
            return self.expand(node, x)
        if fname in _PASS_FUNCS:
            return self.pass_through(node, x)
        if fname in _ELEMENTWISE or t in (operator.add, operator.mul, operator.sub):
            return self.elementwise(node)
        if fname == "flatten":
            start = args[1] if len(args) > 1 else kw.get("start_dim", 0)
            end = args[2] if len(args) > 2 else kw.get("end_dim", -1)
            return self.flatten(node, x, int(start), int(end))  # type: ignore[arg-type]
        if fname in ("view", "reshape", "_unsafe_view"):
            shape_args = args[1:]
            if len(shape_args) == 1 and isinstance(shape_args[0], (tuple, list)):
                shape_args = tuple(shape_args[0])
            return self.reshape(node, x, list(shape_args))
        if fname == "unflatten":  # sizes as a view of the whole shape would give them
            in_shape = self.shape(x)
            if in_shape is not None:
                at = int(cast(int, args[1])) % len(in_shape)
                sizes = [None] * at + list(cast(Sequence[Any], args[2]))
                return self.reshape(node, x, sizes + [None] * (len(in_shape) - at - 1))
        if fname in ("permute", "transpose", "swapaxes", "t", "movedim", "unsqueeze", "squeeze"):
            return self.move_dims(node, x, fname)
        if fname in ("cat", "concat", "concatenate"):
            return self.cat(node)
        if fname in ("mean", "sum", "amax", "amin", "max", "min", "prod", "std", "var"):
            return self.reduce(node, x, fname)
        if fname in ("softmax", "log_softmax", "_softmax", "_log_softmax"):
            dim = args[1] if len(args) > 1 else kw.get("dim")
            return self.softmax(node, x, dim)
        if fname in ("pad", "constant_pad_nd"):
            return self.pad(node, x)
        if fname == "getitem":
            return self.getitem(node, x)
        return self.fail_inputs(node, "passes through an op slimkit cannot follow")

    def elementwise(self, node: fx.Node) -> None:
        out_shape = self.shape(node)
        assert out_shape is not None
        out: Layout = {}
        for d in range(len(out_shape)):
            segs = self.join(node, self.broadcast(node.all_input_nodes, d, len(out_shape)))
            if segs:
                out[d] = segs
        self.lay[node] = out

    def broadcast(self, ops: Sequence[Any], d: int, rank: int) -> list[tuple[fx.Node, int]]:
        """The (operand, its dim) that output dim ``d`` of a broadcasting op of ``rank`` reads."""
        parts = []
        for a in ops:
            sa = self.shape(a)
            da = d - (rank - len(sa)) if sa is not None else -1
            if sa is not None and da >= 0 and sa[da] != 1:
                parts.append((a, da))
        return parts

    def join(self, node: fx.Node, parts: Sequence[tuple[fx.Node, int]]) -> list[Seg] | None:
        """Couple the channels that meet at one dim of ``node`` (an add, a matmul's batch dim)."""
        tracked = [self.lay[a][da] for a, da in parts if a in self.lay and da in self.lay[a]]
        if not tracked:
            return None
        if self.match_units(tracked):  # coarsened: read the layouts again
            tracked = [self.lay[a][da] for a, da in parts if a in self.lay and da in self.lay[a]]
        first = tracked[0]
        for a, da in parts:
            if a in self.lay and da in self.lay[a]:
                continue
            if a.op == "get_attr":  # a per-channel parameter or buffer: prune it too
                owner, _, attr = str(a.target).rpartition(".")
                off = 0
                for gid, units, expand in first:
                    self.add(gid, Member(owner, attr, da, off, expand, "norm"))
                    off += units * expand
            else:
                self.fail({0: first}, f"combined with a fixed-width tensor: {self.where(node)}")
        for segs in tracked[1:]:
            if [(u, e) for _, u, e in segs] != [(u, e) for _, u, e in first]:
                self.fail(
                    {0: first + segs}, f"adds differently laid-out channels: {self.where(node)}"
                )
                continue
            for (g1, _, _), (g2, _, _) in zip(first, segs, strict=True):
                if g1 is None or g2 is None:
                    if g1 != g2:
                        self.fail(
                            {0: first + segs}, f"combined with fixed channels: {self.where(node)}"
                        )
                else:
                    self.union(g1, g2, self.where(node))
        return first

    def match_units(self, tracked: list[list[Seg]]) -> bool:
        """Channels that meet whole groups at a time (a squeeze-excitation gate of C channels on a
        grouped conv's output of G groups of C / G): the finer group is coarsened to the groups,
        so both lose the same channels. Whether anything was coarsened."""
        one = [segs[0] for segs in tracked if len(segs) == 1 and segs[0][0] is not None]
        if len(one) != len(tracked):
            return False
        widest = max(e for _, _, e in one)
        done = False
        for gid, units, expand in one:
            factor = widest // expand
            fits = widest % expand == 0 and units % factor == 0
            if factor > 1 and fits and units * expand == one[0][1] * one[0][2]:
                self.coarsen(cast(int, gid), factor)
                done = True
        return done

    def fail_dims(self, node: fx.Node, x: Any, dims: Sequence[int], what: str) -> None:
        """Refuse the channels at ``dims`` (negative counts from the end) of operand ``x``."""
        shape = self.shape(x)
        if shape is not None and x in self.lay:
            self.fail(self.lay[x], f"{what}: {self.where(node)}", [d % len(shape) for d in dims])

    def tail(self, x: Any, d: int) -> list[Seg] | None:
        """The layout of dim ``d`` (negative: from the end) of ``x``, if it holds channels."""
        shape = self.shape(x)
        if shape is None or not isinstance(x, fx.Node) or x not in self.lay:
            return None
        return self.lay[x].get(d % len(shape))

    def matmul(self, node: fx.Node) -> None:
        a, b = node.args[0], node.args[1]
        sa, sb, out_shape = self.shape(a), self.shape(b), self.shape(node)
        assert out_shape is not None
        if sa is None or sb is None or len(sa) < 2 or len(sb) < 2:
            return self.fail_inputs(node, "matmul with a vector")
        self.fail_dims(node, a, [-1], "matmul sums over channels")
        self.fail_dims(node, b, [-2], "matmul sums over channels")
        rank = len(out_shape)
        out: Layout = {}
        for d in range(rank - 2):  # batch dims broadcast like an elementwise op
            segs = self.join(node, self.broadcast([a, b], d, rank))
            if segs:
                out[d] = segs
        for d, (t, td) in ((rank - 2, (a, -2)), (rank - 1, (b, -1))):
            segs = self.tail(t, td)
            if segs:
                out[d] = segs
        self.lay[node] = out

    def sdpa(self, node: fx.Node) -> None:
        """``scaled_dot_product_attention(q, k, v, mask)``: heads are a batch dim shared by q, k
        and v; q·k sums over q's and k's last dim and the softmax mixes k's and v's positions."""
        q, k, v = node.args[:3]
        mask = node.args[3] if len(node.args) > 3 else node.kwargs.get("attn_mask")
        out_shape = self.shape(node)
        assert out_shape is not None
        if node.kwargs.get("enable_gqa"):
            return self.fail_inputs(node, "grouped-query attention")
        self.fail_dims(node, q, [-1], "attention sums over channels")
        self.fail_dims(node, k, [-1, -2], "attention sums over channels")
        self.fail_dims(node, v, [-2], "attention mixes positions")
        rank = len(out_shape)
        ops = [t for t in (q, k, v, mask) if isinstance(t, fx.Node)]
        out: Layout = {}
        for d in range(rank - 2):
            segs = self.join(node, self.broadcast(ops, d, rank))
            if segs:
                out[d] = segs
        for d, (t, td) in ((rank - 2, (q, -2)), (rank - 1, (v, -1))):
            segs = self.tail(t, td)
            if segs:
                out[d] = segs
        self.lay[node] = out

    def select(self, node: fx.Node, x: Any) -> None:
        """``aten.select(x, dim, index)``, i.e. ``x[:, i]``: drops ``dim``."""
        shape = self.shape(x)
        if shape is None or x not in self.lay:
            return None
        dim = int(cast(int, node.args[1])) % len(shape)
        self.fail(self.lay[x], f"indexes into channels: {self.where(node)}", [dim])
        self.lay[node] = {d - (d > dim): s for d, s in self.lay[x].items() if d != dim}

    def slice(self, node: fx.Node, x: Any) -> None:
        """``aten.slice(x, dim, start, end)``: channels survive only a slice that keeps them all."""
        shape, out_shape = self.shape(x), self.shape(node)
        if shape is None or out_shape is None or x not in self.lay:
            return None
        dim = int(cast(int, node.args[1] if len(node.args) > 1 else 0)) % len(shape)
        if out_shape[dim] != shape[dim]:
            self.fail(self.lay[x], f"slices channels: {self.where(node)}", [dim])
        self.pass_through(node, x)

    def expand(self, node: fx.Node, x: Any) -> None:
        """``x.expand(...)`` adds leading dims and repeats size-1 dims, which hold no channels."""
        shape, out_shape = self.shape(x), self.shape(node)
        if shape is None or out_shape is None or x not in self.lay:
            return None
        shift = len(out_shape) - len(shape)
        grown = [d for d in self.lay[x] if out_shape[d + shift] != shape[d]]
        self.fail(self.lay[x], f"repeats channels: {self.where(node)}", grown)
        self.lay[node] = {d + shift: s for d, s in self.lay[x].items() if d not in grown}

    def flatten(self, node: fx.Node, x: Any, start: int, end: int) -> None:
        shape = self.shape(x)
        if shape is None or x not in self.lay:
            return None
        rank = len(shape)
        start, end = start % rank, end % rank
        out: Layout = {}
        for d, segs in self.lay[x].items():
            if d < start:
                out[d] = segs
            elif d > end:
                out[d - (end - start)] = segs
            else:  # each unit spans the inner merged dims, once per position of the outer ones
                out[start] = _interleave(segs, shape, start, d, end)
        self.lay[node] = out

    def reshape(self, node: fx.Node, x: Any, sizes: list[Any]) -> None:
        shape, out_shape = self.shape(x), self.shape(node)
        if shape is None or out_shape is None or x not in self.lay:
            return None
        out: Layout = {}
        for d, segs in list(self.lay[x].items()):
            pre, post = math.prod(shape[:d]), math.prod(shape[d + 1 :])
            # the channel dim survives as the outer part of an output dim whose prefix matches
            acc, od = 1, 0
            while od < len(out_shape) and acc < pre:
                acc *= out_shape[od]
                od += 1
            while acc == pre and od + 1 < len(out_shape) and out_shape[od] == 1 < shape[d]:
                od += 1  # a size-1 dim inserted before the channels
            ok = acc == pre and od < len(out_shape)
            width = out_shape[od] if ok else 0
            merge = ok and width % shape[d] == 0
            merge = merge and math.prod(out_shape[od + 1 :]) * (width // shape[d]) == post
            split = ok and not merge and shape[d] % width == 0
            split = split and math.prod(out_shape[od + 1 :]) == shape[d] // width * post
            block = None if merge or split else _merged_block(shape, out_shape, d)
            if block is not None:  # channels inside merged dims (channels-last into a Linear)
                od, a, b = block
            elif not (merge or split):
                self.fail({d: segs}, f"reshapes channels into other dims: {self.where(node)}")
                continue
            size = sizes[od] if od < len(sizes) else None
            if isinstance(size, int) and size != -1:
                self.fail(
                    {d: segs},
                    f"hard-codes width {size} in {self.where(node)}; write -1 or x.size(...) there",
                )
                continue
            if block is not None:
                out[od] = _interleave(segs, shape, a, d, b)
            elif merge:
                out[od] = [(g, u, e * (width // shape[d])) for g, u, e in segs]
            elif self.split_heads(node, segs, shape[d] // width):
                out[od] = [(segs[0][0], width, 1)]
        self.lay[node] = out

    def split_heads(self, node: fx.Node, segs: list[Seg], head_dim: int) -> bool:
        """A view of (..., C) as (..., C / head_dim, head_dim): the channels of one group become
        heads of ``head_dim`` channels, pruned whole (the attention of a torch.export graph)."""
        gid, units, expand = segs[0] if len(segs) == 1 else (None, 0, 0)
        if gid is None or head_dim % expand or units % (head_dim // expand):
            self.fail({0: segs}, f"splits channels unevenly into heads: {self.where(node)}")
            return False
        name = self.scope(node)
        m = self.owners.get(name)
        known = head_layout(m) if m is not None else None
        stored = [a for a in HEAD_COUNT_ATTRS if isinstance(getattr(m, a, None), int)]
        if stored and (known is None or known[1] != head_dim):
            self.fail(
                {0: segs},
                f"attention {name!r} stores its head count in {stored[0]!r}, so pruned heads "
                "would not match its forward",
            )
            return False
        self.coarsen(gid, head_dim // expand)
        return True

    def move_dims(self, node: fx.Node, x: Any, fname: str) -> None:
        shape = self.shape(x)
        if shape is None or x not in self.lay:
            return None
        rank = len(shape)
        args: tuple[Any, ...] = tuple(node.args[1:])
        order = list(range(rank))
        if fname == "permute":
            perm = args[0] if len(args) == 1 and isinstance(args[0], (tuple, list)) else args
            order = [int(p) % rank for p in perm]
        elif fname in ("transpose", "swapaxes", "t", "movedim"):
            a, b = (args[0], args[1]) if len(args) >= 2 else (0, 1)
            a, b = int(a) % rank, int(b) % rank
            if fname == "movedim":
                order.pop(a)
                order.insert(b, a)
            else:
                order[a], order[b] = order[b], order[a]
        elif fname == "unsqueeze":
            at = int(args[0]) % (rank + 1)
            order = [d for d in range(rank)]
            order.insert(at, -1)
        else:  # squeeze: drops the named (or every) size-1 dim
            named = [int(a) % rank for a in args] if args else list(range(rank))
            order = [d for d in range(rank) if not (d in named and shape[d] == 1)]
        self.lay[node] = {order.index(d): s for d, s in self.lay[x].items() if d in order}

    def cat(self, node: fx.Node) -> None:
        tensors = node.args[0] if node.args else node.kwargs.get("tensors")
        dim_arg: Any = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
        out_shape = self.shape(node)
        assert isinstance(tensors, (list, tuple)) and out_shape is not None
        dim = int(dim_arg) % len(out_shape)
        segs: list[Seg] = []
        for t in tensors:
            segs += self.segs_at(t, dim)
        out: Layout = {dim: segs} if any(g is not None for g, _, _ in segs) else {}
        for d in range(len(out_shape)):  # other dims behave as in an elementwise op
            if d == dim:
                continue
            lays = [
                self.lay[t][d]
                for t in tensors
                if isinstance(t, fx.Node) and t in self.lay and d in self.lay[t]
            ]
            if lays and len(lays) < len(tensors):
                self.fail({0: lays[0]}, f"concatenated with fixed channels: {self.where(node)}")
            elif lays:
                for other in lays[1:]:
                    for (g1, _, _), (g2, _, _) in zip(lays[0], other, strict=False):
                        if g1 is not None and g2 is not None:
                            self.union(g1, g2, self.where(node))
                out[d] = lays[0]
        self.lay[node] = out

    def reduce(self, node: fx.Node, x: Any, fname: str) -> None:
        shape = self.shape(x)
        if shape is None or x not in self.lay:
            return None
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        keep = bool(node.kwargs.get("keepdim", node.args[2] if len(node.args) > 2 else False))
        rank = len(shape)
        dims = range(rank) if dim is None else [dim] if isinstance(dim, int) else list(dim)  # type: ignore[arg-type]
        dims = sorted(int(d) % rank for d in dims)
        self.fail(self.lay[x], f"{fname} over channels: {self.where(node)}", dims)
        out = {}
        for d, s in self.lay[x].items():
            if d not in dims:
                out[d if keep else d - sum(1 for r in dims if r < d)] = s
        self.lay[node] = out

    def softmax(self, node: fx.Node, x: Any, dim: Any) -> None:
        shape = self.shape(x)
        if shape is not None and x in self.lay and isinstance(dim, int):
            self.fail(self.lay[x], f"softmax over channels: {self.where(node)}", [dim % len(shape)])
        self.pass_through(node, x)

    def pad(self, node: fx.Node, x: Any) -> None:
        shape = self.shape(x)
        pads = node.args[1] if len(node.args) > 1 else node.kwargs.get("pad", ())
        if shape is None or x not in self.lay:
            return None
        assert isinstance(pads, (tuple, list))
        rank = len(shape)
        padded = [rank - 1 - i // 2 for i, p in enumerate(pads) if p != 0]
        self.fail(self.lay[x], f"pads the channel dim: {self.where(node)}", padded)
        self.pass_through(node, x)

    def chunk(self, node: fx.Node, x: Any, fname: str, glu_dim: int | None = None) -> None:
        """``chunk`` into equal pieces (and ``glu``, which multiplies the two halves): along a
        channel dim, unit ``u`` becomes the channels at ``u`` of every piece. ``split`` along the
        channels hard-codes the piece sizes, so its channels are refused (it passes others)."""
        args, kw = node.args, node.kwargs
        shape = self.shape(x)
        if shape is None or not isinstance(x, fx.Node) or x not in self.lay:
            return None
        rank = len(shape)
        size: Any
        if fname == "glu":
            at = glu_dim if glu_dim is not None else args[1] if len(args) > 1 else kw.get("dim", -1)
            dim, size = int(cast(int, at)) % rank, 2
        else:
            dim = int(cast(int, args[2] if len(args) > 2 else kw.get("dim", 0))) % rank
            size = args[1] if len(args) > 1 else kw.get("chunks", kw.get("split_size_or_sections"))
        if fname in ("chunk", "glu"):
            pieces = int(cast(int, size))
        elif isinstance(size, int):
            pieces = -(-shape[dim] // size)
        else:
            pieces = len(cast(Sequence[int], size))
        lay = self.lay[x]
        getitems = all(u.op == "call_function" and _op_name(u.target) == "getitem"
                       and isinstance(u.args[1], int) for u in node.users)  # fmt: skip
        if fname != "glu" and not getitems:  # the tuple itself is used: pieces not followed
            return self.fail(lay, f"uses the pieces of {fname} as a tuple: {self.where(node)}")
        segs = lay.get(dim, [])
        if segs:
            gid, units, _ = segs[0]
            ok = fname != "split" and fname != "split_with_sizes" and len(segs) == 1
            ok = ok and gid is not None and units % pieces == 0 and shape[dim] % pieces == 0
            if not ok:
                self.fail(lay, f"splits channels into pieces it cannot follow ({fname} with "
                          f"{size}; chunk into equal pieces follows): {self.where(node)}",
                          [dim])  # fmt: skip
                lay = {d: s for d, s in lay.items() if d != dim}
            else:
                self.split_units(cast(int, gid), pieces)
                lay = self.lay[x]
        piece = [{d: list(s[i::pieces]) if d == dim else list(s) for d, s in lay.items()}
                 for i in range(pieces)]  # fmt: skip
        if fname == "glu":
            self.lay[node] = piece[0]
        else:
            self.parts[node] = piece
        return None

    def getitem(self, node: fx.Node, x: Any) -> None:
        if x in self.parts:  # a piece of a chunk / split (chunk checked: an int index)
            self.lay[node] = self.parts[x][cast(int, node.args[1])]
            return None
        shape = self.shape(x)
        if shape is None or x not in self.lay:
            return None  # indexing a tuple (e.g. an LSTM's output): its producer decided
        idx = node.args[1]
        items = list(idx) if isinstance(idx, tuple) else [idx]
        if any(i is Ellipsis for i in items):
            at = items.index(Ellipsis)
            fill = len(shape) - (len(items) - 1 - sum(1 for i in items if i is None))
            items[at : at + 1] = [slice(None)] * fill
        out, d_in, d_out = {}, 0, 0
        lay = self.lay[x]
        for it in items:
            if it is None:
                d_out += 1
                continue
            if isinstance(it, slice) and it == slice(None):
                if d_in in lay:
                    out[d_out] = lay[d_in]
                d_in, d_out = d_in + 1, d_out + 1
            elif isinstance(it, int):
                self.fail(lay, f"indexes into channels: {self.where(node)}", [d_in])
                d_in += 1
            else:
                self.fail(lay, f"slices channels: {self.where(node)}", [d_in])
                d_in, d_out = d_in + 1, d_out + 1
        for d in range(d_in, len(shape)):
            if d in lay:
                out[d_out + d - d_in] = lay[d]
        self.lay[node] = out


def _interleave(segs: list[Seg], shape: Sequence[int], a: int, d: int, b: int) -> list[Seg]:
    """The segments of channel dim ``d`` once dims ``a..b`` are merged into one: each unit spans
    the dims after ``d`` (a larger expand), and the whole run repeats once per position of the
    dims before it (channels-last (H, W, C) -> H * W runs of C), so a reader gets one member per
    run and the columns it drops follow the merged layout."""
    inner, outer = math.prod(shape[d + 1 : b + 1]), math.prod(shape[a:d])
    return [(g, u, e * inner) for g, u, e in segs] * outer


def _merged_block(
    shape: Sequence[int], out_shape: Sequence[int], d: int
) -> tuple[int, int, int] | None:
    """``(od, a, b)`` when input dims ``a..b`` (around ``d``) become exactly output dim ``od``."""
    cin = [math.prod(shape[:i]) for i in range(len(shape) + 1)]
    cout = [math.prod(out_shape[:i]) for i in range(len(out_shape) + 1)]
    for od in range(len(out_shape)):
        if cout[od] not in cin or cout[od + 1] not in cin:
            continue
        a, b = cin.index(cout[od]), len(cin) - 1 - cin[::-1].index(cout[od + 1]) - 1
        if a <= d <= b and shape[d] > 1:
            return od, a, b
    return None


def _op_name(target: Any) -> str:
    """``aten.linear.default`` -> ``linear``; a function or method -> its name."""
    if isinstance(target, torch._ops.OpOverload):
        return str(target.overloadpacket.__name__)
    return target if isinstance(target, str) else str(getattr(target, "__name__", target))


def build_depgraph(
    model: nn.Module,
    example_inputs: Sequence[torch.Tensor],
    *,
    method: Literal["auto", "fx", "export"] = "auto",
) -> DepGraph:
    """The channel groups of ``model`` traced on ``example_inputs`` (the model is not modified).

    ``method="auto"`` traces with torch.fx and falls back to ``torch.export`` on the example
    inputs when fx cannot trace the model (Hugging Face transformers models, for instance)."""
    inputs = tuple(example_inputs)
    attn = attention_modules(model)
    if method == "export":
        return _exported_graph(model, inputs)
    try:
        gm = capture(model, method="fx", leaf_names=list(attn))
    except GraphCaptureError as e:
        if method == "fx":
            raise
        try:
            return _exported_graph(model, inputs)
        except GraphCaptureError as e2:
            raise GraphCaptureError(
                f"{e.problem}; torch.export also failed: {e2.problem}", fix=e2.fix, module=e.module
            ) from e2
    from slimkit.core.verbs import eval_mode

    try:  # eval mode: running the user's layers must not update their BatchNorm statistics
        with torch.no_grad(), eval_mode(model):
            ShapeProp(gm).propagate(*inputs)
    except Exception as e:  # the user's inputs do not fit the model
        raise _bad_inputs(model, inputs, e) from e
    return _Builder(gm, attn, model).run()


def _exported_graph(model: nn.Module, inputs: tuple[torch.Tensor, ...]) -> DepGraph:
    graph = _Builder(_exported(model, inputs), {}, model).run()
    graph.capture = "torch.export"
    return graph


def _bad_inputs(model: nn.Module, inputs: tuple[torch.Tensor, ...], e: Exception) -> DataError:
    return DataError(
        f"{type(model).__name__} fails on example_inputs of shapes "
        f"{[tuple(x.shape) for x in inputs]}: {str(e).splitlines()[0][:200]}",
        fix="pass example_inputs=(x,) with the shape and dtype the model is called with",
    )


def _exported(model: nn.Module, inputs: tuple[torch.Tensor, ...]) -> fx.GraphModule:
    """``model`` captured by torch.export on ``inputs`` (shapes static), parameters as get_attr
    nodes named by their qualified names, with shapes propagated."""
    was_training = model.training
    model.eval()  # neither the check nor the capture may update BatchNorm statistics
    try:
        try:
            with torch.no_grad():
                model(*inputs)
        except Exception as e:
            raise _bad_inputs(model, inputs, e) from e
        from slimkit.core.rebuild import no_caches

        with no_caches(model):
            gm = capture(model, inputs, method="export").module()
    finally:
        model.train(was_training)
    with torch.no_grad():
        ShapeProp(gm).propagate(*inputs)
    return cast(fx.GraphModule, gm)
