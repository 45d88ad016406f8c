"""Graph capture (torch.fx or torch.export) whose failure names the module that broke it.

Whole-graph techniques (structured pruning, BN folding, fusion) need a graph. Capture fails on
data-dependent control flow, unsupported Python and the like; the raw error from torch points to a
line of torch's own code. Here the failure says which submodule was being traced and how to step
around it (a ``Scope`` that excludes it, or marking it a leaf)::

    gm = capture(model, example_inputs=(x,))            # torch.fx GraphModule
    ep = capture(model, example_inputs=(x,), method="export")   # torch.export ExportedProgram
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any, Literal

import torch
from torch import fx, nn

from slimkit.errors import GraphCaptureError


class _NamingTracer(fx.Tracer):
    """A tracer that remembers the stack of submodules it is inside, and keeps some as leaves."""

    def __init__(self, leaves: Sequence[type[nn.Module]] = (), leaf_names: Sequence[str] = ()):
        super().__init__()
        self.stack: list[str] = []
        self.failed_in: str | None = None  # innermost module being traced when tracing failed
        self.extra_leaves = tuple(leaves)
        self.leaf_names = set(leaf_names)

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if module_qualified_name in self.leaf_names or isinstance(m, self.extra_leaves):
            return True
        # LSTM/GRU/RNN and MultiheadAttention contain Python control flow: keep them whole.
        if isinstance(m, (nn.RNNBase, nn.MultiheadAttention)):
            return True
        return super().is_leaf_module(m, module_qualified_name)

    def call_module(self, m: nn.Module, forward: Any, args: Any, kwargs: Any) -> Any:
        name = self.path_of_module(m)
        self.stack.append(name)
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_in is None:
                self.failed_in = name
            raise
        finally:
            self.stack.pop()


@contextlib.contextmanager
def _module_stack_hooks(model: nn.Module) -> Iterator[list[str]]:
    """Track which module's forward is running, via forward pre/post hooks (for torch.export)."""
    stack: list[str] = []  # a module whose forward raises is never popped: it stays on top
    handles = []
    for name, m in model.named_modules():

        def pre(_m: nn.Module, _a: Any, _n: str = name) -> None:
            stack.append(_n)

        def post(_m: nn.Module, _a: Any, _o: Any) -> None:
            if stack:
                stack.pop()

        handles.append(m.register_forward_pre_hook(pre))
        handles.append(m.register_forward_hook(post))
    try:
        yield stack
    finally:
        for h in handles:
            h.remove()


def _describe_module(model: nn.Module, name: str) -> str:
    if not name:
        return f"the top-level forward of {type(model).__name__}"
    return f"module {name!r} ({type(model.get_submodule(name)).__name__})"


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0][:300] if text else type(e).__name__


def _fail(model: nn.Module, where: str, e: BaseException, method: str) -> GraphCaptureError:
    scope_hint = (
        f"exclude it from graph-level techniques with Scope(exclude=[{where!r}]), or "
        if where
        else ""
    )
    return GraphCaptureError(
        f"{method} could not capture {_describe_module(model, where)}: "
        f"{type(e).__name__}: {_first_line(e)}",
        fix=f"{scope_hint}rewrite that forward without data-dependent Python control flow "
        "(use torch.where instead of `if tensor:`); per-module techniques (quantization of "
        "Linear/Conv, unstructured pruning, low-rank) still work without a graph",
        module=where,
    )


def call_counts(gm: fx.GraphModule) -> dict[str, int]:
    """How many times the graph calls each submodule (by target): a rewrite of a module's weights
    is only safe for a module called once."""
    counts: dict[str, int] = {}
    for n in gm.graph.nodes:
        if n.op == "call_module":
            counts[str(n.target)] = counts.get(str(n.target), 0) + 1
    return counts


def capture(
    model: nn.Module,
    example_inputs: tuple[Any, ...] | None = None,
    *,
    method: Literal["fx", "export"] = "fx",
    leaves: Sequence[type[nn.Module]] = (),
    leaf_names: Sequence[str] = (),
) -> Any:
    """Capture ``model`` as an ``fx.GraphModule`` (``method="fx"``) or an ``ExportedProgram``.

    ``fx`` needs no inputs; ``export`` needs ``example_inputs`` and keeps the batch size static
    unless the caller asks ``torch.export`` for dynamic shapes itself. ``leaves`` / ``leaf_names``
    keep those submodules whole (fx only), which is how a user steps around an untraceable block.
    """
    if method == "fx":
        tracer = _NamingTracer(leaves, leaf_names)
        try:
            graph = tracer.trace(model)
        except Exception as e:  # torch raises many types here; all mean "could not trace"
            raise _fail(model, tracer.failed_in or "", e, "torch.fx") from e
        name = type(model).__name__
        return fx.GraphModule(tracer.root, graph, name)
    if method == "export":
        if example_inputs is None:
            raise GraphCaptureError(
                "torch.export needs example inputs",
                fix="pass example_inputs=(tensor, ...) with the shapes the model is called with",
            )
        with _module_stack_hooks(model) as stack:
            try:
                return torch.export.export(model, tuple(example_inputs), strict=False)
            except Exception as e:
                where = stack[-1] if stack else ""
                raise _fail(model, where, e, "torch.export") from e
    raise GraphCaptureError(f"unknown capture method {method!r}", fix="use 'fx' or 'export'")
