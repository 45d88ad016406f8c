"""Constant folding: compute once what a forward recomputes from parameters alone.

A sub-graph whose inputs are all parameters, buffers or constants (``self.weight * 2``,
``torch.ones(4, 8) @ self.w``, a weight transposed in ``forward``, ``self.w.shape[0] * 2``) gives
the same value on every call. It is evaluated once; a tensor result becomes a buffer read by one
``get_attr``, a plain number (shape arithmetic) is written into the graph as a literal. Parameters
that only fed folded sub-graphs are removed, so the model does not hold both::

    folded, report = fold_constants(model, return_report=True)
    print(report.summary())   # "folded 2 constant sub-graphs: 'w.t()' -> buffer '_folded_t' ..."

Left alone, with the reason in the report: random ops and uninitialised memory (``torch.rand``,
``torch.empty``), anything an in-place op mutates, modules in training mode, results that would be
much larger than the tensors they are computed from (``w.expand(1024, -1)``), and values that are
neither tensors nor plain numbers. The folded model's buffers are no longer trainable parameters:
fold for inference. Registered as ``graph_opt.const_fold``: ``sk.optimize(model, "const_fold")``,
YAML ``- graph_opt.const_fold: {}``. Classic compiler constant folding (Aho, Lam, Sethi, Ullman,
"Compilers", 2nd ed., section 9.4).
"""

from __future__ import annotations

import copy
import operator
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Literal, overload

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import fx, nn

from slimkit.core.config import Config
from slimkit.core.graph import capture
from slimkit.core.registry import METHODS


class ConstFold(Config):
    """Options of ``fold_constants``; the defaults fold everything that is exact and small."""

    fold_modules: bool = True  # evaluate eval-mode submodules called on constants (norm(self.w))
    max_growth: float = Field(4.0, ge=1.0)  # keep results this many times larger than their inputs
    small_bytes: int = Field(1 << 20, ge=0)  # ...unless the result is at most this many bytes
    drop_unused: bool = True  # remove parameters / buffers that only fed folded sub-graphs


@dataclass
class ConstFoldReport:
    """What was folded (expression -> buffer or literal), what was kept and why, and the
    parameters / buffers removed because nothing reads them any more."""

    folded: list[tuple[str, str]] = field(default_factory=list)  # (expression, replacement)
    kept: list[tuple[str, str]] = field(default_factory=list)  # (expression, reason)
    removed: list[str] = field(default_factory=list)  # parameters / buffers no longer read

    def summary(self) -> str:
        n = len(self.folded)
        text = f"folded {n} constant sub-graph{'s' if n != 1 else ''}"
        if self.folded:
            text += ": " + "; ".join(f"{e!r} -> {r}" for e, r in self.folded)
        if self.kept:
            text += "; kept " + "; ".join(f"{e!r}: {why}" for e, why in self.kept)
        if self.removed:
            text += "; removed " + ", ".join(self.removed)
        return text

    def to_dict(self) -> dict[str, Any]:
        return {
            "folded": [{"expr": e, "into": r} for e, r in self.folded],
            "kept": [{"expr": e, "reason": r} for e, r in self.kept],
            "removed": list(self.removed),
        }


# Values differ on every call (or are uninitialised memory): never folded.
_RANDOM_FUNCTIONS = {
    torch.rand, torch.rand_like, torch.randn, torch.randn_like, torch.randint, torch.randint_like,
    torch.randperm, torch.bernoulli, torch.normal, torch.multinomial, torch.poisson, torch.empty,
    torch.empty_like, torch.empty_strided, F.rrelu, torch.rrelu,
}  # fmt: skip
_RANDOM_METHODS = {"bernoulli", "multinomial", "new_empty", "new_empty_strided"}
# Dropout is pure only when its `training` flag (an argument at this position) is False.
_DROPOUT_FUNCTIONS: dict[Any, int] = {
    F.dropout: 2, F.dropout1d: 2, F.dropout2d: 2, F.dropout3d: 2, F.alpha_dropout: 2,
    F.feature_alpha_dropout: 2, torch.dropout: 2, torch.alpha_dropout: 2,
    torch.feature_dropout: 2, torch.feature_alpha_dropout: 2,
}  # fmt: skip
_MUTATING_FUNCTIONS = {
    operator.setitem, operator.iadd, operator.isub, operator.imul, operator.itruediv,
    operator.ifloordiv, operator.imod, operator.ipow, operator.imatmul, operator.iand,
    operator.ior, operator.ixor, operator.ilshift, operator.irshift,
}  # fmt: skip
_LITERALS = (int, float, bool, str, type(None))  # not dtype / device: model.to() must reach them


def _name(target: Any) -> str:
    return str(getattr(target, "__name__", target))


def _written(node: fx.Node, gm: nn.Module) -> list[fx.Node]:
    """The inputs ``node`` may write into: the first argument of an in-place op (a method ending
    in ``_``, ``inplace=True``, ``+=``, ``x[i] = v``, an in-place module) and any ``out=``."""
    written: list[Any] = []
    fx.node.map_arg(node.kwargs.get("out"), written.append)
    name = _name(node.target)
    if node.op == "call_module":
        in_place = getattr(gm.get_submodule(name), "inplace", False) is True
    else:
        in_place = name.endswith("_") and not name.endswith("__")
        in_place = in_place or node.kwargs.get("inplace") is True
        in_place = in_place or (node.op == "call_function" and node.target in _MUTATING_FUNCTIONS)
    if in_place and node.args and isinstance(node.args[0], fx.Node):
        written.append(node.args[0])
    return written


def dropout_training(node: fx.Node) -> bool | None:
    """For a functional dropout node: whether it is in training mode (random); None otherwise."""
    pos = _DROPOUT_FUNCTIONS.get(node.target) if node.op == "call_function" else None
    if pos is None:
        return None
    flag = node.kwargs.get("training", node.kwargs.get("train"))
    if flag is None:  # F.dropout* default to training=True; torch.dropout needs the argument
        flag = node.args[pos] if len(node.args) > pos else True
    return flag is not False


def _impure(node: fx.Node, gm: fx.GraphModule, fold_modules: bool) -> str | None:
    """Why ``node`` may not be evaluated ahead of time even with constant inputs, or None."""
    if _written(node, gm):
        return "writes into its input in place"
    if node.op == "call_function":
        if node.target in _RANDOM_FUNCTIONS:
            return f"is random or uninitialised ({_name(node.target)}): it differs on every call"
        if dropout_training(node):
            return "is dropout in training mode (random)"
        return None
    if node.op == "call_method":
        if str(node.target) in _RANDOM_METHODS:
            return f"is random or uninitialised (.{node.target}): it differs on every call"
        return None
    if node.op == "call_module":
        if not fold_modules:
            return "is a module call (ConstFold(fold_modules=False))"
        if gm.get_submodule(str(node.target)).training:
            return "is a module in training mode (it may update state or be random)"
        return None
    return "is not an operation"


def _fetch(gm: nn.Module, target: str) -> Any:
    obj: Any = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _is_literal(value: Any) -> bool:
    if isinstance(value, (tuple, list)):  # torch.Size is a tuple
        return all(_is_literal(v) for v in value)
    return isinstance(value, _LITERALS)


def _as_literal(value: Any) -> Any:
    """``value`` as fx writes it into generated code (torch.Size becomes a plain tuple)."""
    if isinstance(value, list):
        return [_as_literal(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_as_literal(v) for v in value)
    return value


def _storages(value: Any) -> set[int]:
    """Addresses of the memory the tensors in ``value`` live in."""
    found: set[int] = set()
    fx.node.map_aggregate(
        value,
        lambda v: found.add(v.untyped_storage().data_ptr()) if isinstance(v, torch.Tensor) else v,
    )
    return found


class Constants:
    """Which nodes of a graph compute a constant, and their values (evaluated once, on demand).

    A node is constant when it is a ``get_attr`` or a pure operation whose inputs are all constant;
    a node that an in-place op writes into is not, and neither is anything computed from it.
    """

    def __init__(self, gm: fx.GraphModule, *, fold_modules: bool = True) -> None:
        self.gm = gm
        self.why_not: dict[fx.Node, str] = {}  # all inputs constant, yet not foldable: why
        training = [
            str(n.target)
            for n in gm.graph.nodes
            if n.op == "call_module" and gm.get_submodule(str(n.target)).training
        ]
        const: set[fx.Node] = set()
        written: set[fx.Node] = set()
        for node in gm.graph.nodes:
            written.update(n for n in _written(node, gm) if n in const)
            if node.op == "get_attr":
                owner = str(node.target).rpartition(".")[0]
                if any(owner == t or owner.startswith(t + ".") for t in training):
                    self.why_not[node] = "belongs to a module in training mode that may update it"
                else:
                    const.add(node)
            elif node.op != "placeholder" and all(n in const for n in node.all_input_nodes):
                why = _impure(node, gm, fold_modules)
                if why is None:
                    const.add(node)
                elif node.op != "output":
                    self.why_not[node] = why
        self._values: dict[fx.Node, Any] = {}
        # a tensor written in place may be a view of what it was computed from: that changes too
        stack = list(written)
        while stack:
            w = stack.pop()
            for n in w.all_input_nodes:
                if n in const and n not in written and self._aliases(w, n):
                    written.add(n)
                    stack.append(n)
        for node in written:
            self.why_not.setdefault(node, "is written in place during forward")
        self._const: set[fx.Node] = set()
        for node in gm.graph.nodes:  # nor is anything computed from a written tensor
            inputs_const = all(n in self._const for n in node.all_input_nodes)
            if node in const and node not in written and inputs_const:
                self._const.add(node)

    def _aliases(self, a: fx.Node, b: fx.Node) -> bool:
        """Whether the values of ``a`` and ``b`` share memory (True when that cannot be told)."""
        try:
            ptrs = [_storages(self.value(a)), _storages(self.value(b))]
        except Exception:
            return True
        return bool(ptrs[0] & ptrs[1])

    def is_const(self, node: Any) -> bool:
        return isinstance(node, fx.Node) and node in self._const

    def value(self, node: fx.Node) -> Any:
        """The value of constant ``node``; raises what the computation raises. (Nodes whose
        inputs are all constant may be evaluated too: only the write-tracking does that.)"""
        if node in self._values:
            return self._values[node]
        order = []  # the constant nodes it needs, without recursion (graphs can be deep)
        stack, seen = [node], {node}
        while stack:
            n = stack.pop()
            order.append(n)
            for m in n.all_input_nodes:
                if m not in seen and m not in self._values:
                    seen.add(m)
                    stack.append(m)
        index = {n: i for i, n in enumerate(self.gm.graph.nodes)}
        for n in sorted(order, key=index.__getitem__):
            self._values[n] = self._run(n)
        return self._values[node]

    def _run(self, node: fx.Node) -> Any:
        if node.op == "get_attr":
            return _fetch(self.gm, str(node.target))
        args = fx.node.map_arg(node.args, self._values.__getitem__)
        kwargs = fx.node.map_arg(node.kwargs, self._values.__getitem__)
        with torch.no_grad():
            if node.op == "call_function":
                return node.target(*args, **kwargs)  # type: ignore[operator]
            if node.op == "call_method":
                return getattr(args[0], str(node.target))(*args[1:], **kwargs)
            return self.gm.get_submodule(str(node.target))(*args, **kwargs)

    def leaves(self, node: fx.Node) -> list[fx.Node]:
        """The ``get_attr`` nodes (stored tensors) that ``node`` is computed from."""
        stack, seen, found = [node], {node}, []
        while stack:
            n = stack.pop()
            if n.op == "get_attr":
                found.append(n)
            for m in n.all_input_nodes:
                if m not in seen:
                    seen.add(m)
                    stack.append(m)
        return found

    def leaf_bytes(self, node: fx.Node) -> int:
        """Bytes of the distinct stored tensors that ``node`` is computed from."""
        tensors = {
            id(t): t for n in self.leaves(node) if isinstance(t := self.value(n), torch.Tensor)
        }
        return sum(t.numel() * t.element_size() for t in tensors.values())

    def pinned_view(self, node: fx.Node, value: torch.Tensor, drop_unused: bool) -> str | None:
        """When ``value`` is a view of a stored tensor that stays in use, the name of that tensor:
        storing the view (free to compute) would then only duplicate memory."""
        ptrs = _storages(value)
        called = [str(n.target) for n in self.gm.graph.nodes if n.op == "call_module"]
        for leaf in self.leaves(node):
            if not _storages(self.value(leaf)) & ptrs:
                continue
            target = str(leaf.target)
            owner = target.rpartition(".")[0]
            readers = [n for n in self.gm.graph.nodes if n.op == "get_attr" and n.target == target]
            if (
                not drop_unused
                or any(not self.is_const(u) for r in readers for u in r.users)
                or any(owner == c or owner.startswith(c + ".") for c in called)
            ):
                return target
        return None


_SYMBOLS = {operator.add: "+", operator.sub: "-", operator.mul: "*", operator.truediv: "/",
            operator.matmul: "@", operator.floordiv: "//", operator.pow: "**"}  # fmt: skip


def describe(node: Any, depth: int = 0) -> str:
    """A short Python-like expression for the sub-graph ending at ``node`` (for reports)."""
    if isinstance(node, (tuple, list)):
        return "(" + ", ".join(describe(a, depth) for a in node) + ")"
    if not isinstance(node, fx.Node):
        return repr(node)
    if node.op == "get_attr":
        return str(node.target)
    if node.op == "placeholder" or depth > 3:
        return node.name
    args = [describe(a, depth + 1) for a in node.args]
    args += [f"{k}={describe(v, depth + 1)}" for k, v in node.kwargs.items()]
    target = node.target
    if node.op == "call_method":
        return f"{args[0]}.{target}({', '.join(args[1:])})"
    if node.op == "call_module":
        return f"{target}({', '.join(args)})"
    if target is getattr:
        return f"{args[0]}.{node.args[1]}"
    if target is operator.getitem:
        return f"{args[0]}[{args[1]}]"
    if target in _SYMBOLS and len(args) == 2:
        text = f"{args[0]} {_SYMBOLS[target]} {args[1]}"
        return f"({text})" if depth else text
    module = str(getattr(target, "__module__", None) or "")
    prefix = "F." if "functional" in module else "torch." if module.startswith("torch") else ""
    return f"{prefix}{_name(target)}({', '.join(args)})"


def _short(text: str, n: int = 100) -> str:
    return text if len(text) <= n else text[: n - 3] + "..."


def erase_dead_constants(gm: fx.GraphModule, consts: Constants) -> list[str]:
    """Erase constant nodes nothing reads any more; returns the ``get_attr`` targets erased."""
    erased: list[str] = []
    for node in reversed(list(gm.graph.nodes)):
        if not node.users and consts.is_const(node):
            if node.op == "get_attr":
                erased.append(str(node.target))
            gm.graph.erase_node(node)
    return erased


def drop_unused_attributes(gm: fx.GraphModule, candidates: Iterable[str]) -> list[str]:
    """Delete the parameters / buffers among ``candidates`` that no node reads any more."""
    read = {str(n.target) for n in gm.graph.nodes if n.op == "get_attr"}
    called = [str(n.target) for n in gm.graph.nodes if n.op == "call_module"]
    removed = []
    for target in dict.fromkeys(candidates):
        owner, _, attr = target.rpartition(".")
        if target in read or any(owner == c or owner.startswith(c + ".") for c in called):
            continue
        try:
            module = gm.get_submodule(owner)
        except AttributeError:
            continue
        if hasattr(module, attr):
            delattr(module, attr)
            removed.append(target)
    return removed


def _swapper(node: fx.Node, literal: Any) -> Any:
    return lambda n: literal if n is node else n


def _new_buffer(gm: fx.GraphModule, node: fx.Node, value: torch.Tensor) -> str:
    name, i = f"_folded_{node.name}", 0
    while hasattr(gm, name):
        i += 1
        name = f"_folded_{node.name}_{i}"
    gm.register_buffer(name, value.detach().clone(memory_format=torch.contiguous_format))
    return name


def graph_module(model: nn.Module, inplace: bool) -> fx.GraphModule:
    """``model`` as an ``fx.GraphModule``: an existing one as is (copied unless ``inplace``),
    anything else captured with ``core.graph.capture`` (fused units kept whole)."""
    from slimkit.graph_opt.fuse import FUSED  # fuse imports this module

    src = model if inplace else copy.deepcopy(model)
    if isinstance(src, fx.GraphModule):
        return src
    gm: fx.GraphModule = capture(src, method="fx", leaves=FUSED)
    return gm


@overload
def fold_constants(
    model: nn.Module,
    config: ConstFold | None = ...,
    *,
    inplace: bool = ...,
    return_report: Literal[False] = ...,
) -> fx.GraphModule: ...
@overload
def fold_constants(
    model: nn.Module,
    config: ConstFold | None = ...,
    *,
    inplace: bool = ...,
    return_report: Literal[True],
) -> tuple[fx.GraphModule, ConstFoldReport]: ...


@METHODS.register(
    "graph_opt.const_fold",
    config=ConstFold,
    summary="compute parameter-only sub-graphs once (exact)",
    aliases={"fold_constants": {}},
)
def fold_constants(
    model: nn.Module,
    config: ConstFold | None = None,
    *,
    inplace: bool = False,
    return_report: bool = False,
) -> fx.GraphModule | tuple[fx.GraphModule, ConstFoldReport]:
    """Evaluate every sub-graph that depends only on parameters, buffers and constants once.

    Returns an ``fx.GraphModule`` (in eval mode) computing the same function; ``model`` is left
    untouched unless ``inplace``. Raises ``GraphCaptureError`` naming the module fx cannot trace.
    Python: ``from slimkit.graph_opt import fold_constants``. Works on any traceable model.
    """
    cfg = config or ConstFold()
    gm = graph_module(model, inplace)
    consts = Constants(gm, fold_modules=cfg.fold_modules)
    report = ConstFoldReport()
    for node in list(gm.graph.nodes):
        if node in consts.why_not and node.op != "get_attr":
            report.kept.append((_short(describe(node)), consts.why_not[node]))
            continue
        if not consts.is_const(node) or node.op == "get_attr":
            continue
        if all(consts.is_const(u) for u in node.users):
            continue  # an intermediate: only the values that leave the constant sub-graph are kept
        expr = _short(describe(node))
        try:
            value = consts.value(node)
        except Exception as e:  # whatever the op raises, the forward would raise too: keep it
            report.kept.append((expr, f"could not be evaluated ahead ({type(e).__name__}: {e})"))
            continue
        if isinstance(value, torch.Tensor):
            size = value.numel() * value.element_size()
            limit = max(cfg.max_growth * consts.leaf_bytes(node), cfg.small_bytes)
            pinned = consts.pinned_view(node, value, cfg.drop_unused)
            if pinned is not None:
                why = (
                    f"is a view of {pinned!r}, which stays in use: storing it would only add memory"
                )
                report.kept.append((expr, why))
                continue
            if size > limit:
                report.kept.append(
                    (
                        expr,
                        f"its result ({size} bytes, shape {tuple(value.shape)}) "
                        f"would be over {cfg.max_growth:g}x the tensors it reads; "
                        "raise ConstFold.max_growth or small_bytes to fold it",
                    )
                )
                continue
            name = _new_buffer(gm, node, value)
            with gm.graph.inserting_before(node):
                node.replace_all_uses_with(gm.graph.get_attr(name))
            report.folded.append((expr, f"buffer {name!r} {tuple(value.shape)}"))
        elif _is_literal(value):
            literal = _as_literal(value)
            for user in list(node.users):
                swap = _swapper(node, literal)
                user.args = fx.node.map_arg(user.args, swap)
                user.kwargs = fx.node.map_arg(user.kwargs, swap)
            report.folded.append((expr, f"literal {literal!r}"))
        elif isinstance(value, (torch.dtype, torch.device)):
            report.kept.append((expr, "a dtype or device stays live, so that model.to() applies"))
        else:
            why = f"its value is a {type(value).__name__}, neither a tensor nor a plain number"
            report.kept.append((expr, why))
    erased = erase_dead_constants(gm, consts)
    if cfg.drop_unused:
        report.removed = drop_unused_attributes(gm, erased)
    gm.graph.lint()
    gm.delete_all_unused_submodules()
    gm.recompile()
    gm.eval()
    return (gm, report) if return_report else gm
