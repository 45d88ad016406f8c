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
from collections.abc import Collection, Iterator, Sequence
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
        return _fx(model, {}, leaf_names, leaves)
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


# --- capture for real code: fx with flags fixed, then torch.export rebuilt, then leaves ---------

_PLAIN = (bool, int, float, str, type(None))
MAX_LEAF_TRIES = 8


def _fixable_defaults(model: nn.Module, given: Sequence[str], n_args: int) -> dict[str, Any]:
    """Parameters of ``model.forward`` not given by the caller whose default is a plain value
    (a flag, ``return_dict=None``, a ``None`` mask): fixed to it when tracing."""
    from slimkit.core.rebuild import forward_params

    out: dict[str, Any] = {}
    for i, p in enumerate(forward_params(model).values()):
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) or i < n_args or p.name in given:
            continue
        if p.default is not p.empty and isinstance(p.default, _PLAIN):
            out[p.name] = p.default
    return out


def _strip_specialised(gm: fx.GraphModule, fixed: Collection[str]) -> None:
    """Drop fx's guards on fixed arguments and their placeholders: ``forward(x)`` stays."""
    guards = {torch._assert, fx._symbolic_trace._assert_is_none}
    for n in reversed(list(gm.graph.nodes)):
        if n.op == "call_function" and n.target in guards:
            srcs = [a for a in n.args if isinstance(a, fx.Node)]
            gm.graph.erase_node(n)
            for s in srcs:
                if not s.users and s.op == "call_function":
                    gm.graph.erase_node(s)
    for n in list(gm.graph.nodes):
        if n.op == "placeholder" and not n.users and str(n.target).rsplit("_", 1)[0] in fixed:
            gm.graph.erase_node(n)
    gm.recompile()


def _fx(model: nn.Module, fixed: dict[str, Any], leaf_names: Sequence[str],
        leaves: Sequence[type[nn.Module]]) -> fx.GraphModule:  # fmt: skip
    tracer = _NamingTracer(leaves, leaf_names)
    try:
        graph = tracer.trace(model, concrete_args=fixed or None)
    except Exception as e:  # torch raises many types here; all mean "could not trace"
        raise _fail(model, tracer.failed_in or "", e, "torch.fx") from e
    gm = fx.GraphModule(tracer.root, graph, type(model).__name__)
    if fixed:
        _strip_specialised(gm, fixed)
    return gm


def _export_inputs(
    model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> tuple[tuple[Any, ...], dict[str, Any], dict[str, Any]]:
    """Inputs for torch.export with a symbolic batch (and sequence, for 2-D integer inputs),
    and their ``dynamic_shapes`` by argument name. A batch of 1 would be specialised to 1, so
    such examples are repeated to batch 2."""
    import inspect

    from torch.export import Dim

    def grow(t: Any) -> Any:
        if isinstance(t, torch.Tensor) and t.dim() > 0 and t.shape[0] == 1:
            return torch.cat([t, t])
        return t

    def dims(t: Any) -> Any:
        if not isinstance(t, torch.Tensor) or t.dim() == 0:
            return None
        d = {0: Dim.AUTO}
        if t.dim() == 2 and not t.is_floating_point():
            d[1] = Dim.AUTO
        return d

    a = tuple(grow(t) for t in args)
    k = {n: grow(t) for n, t in kwargs.items()}
    bound = inspect.signature(model.forward).bind(*a, **k)
    shapes = {n: (tuple(dims(t) for t in v) if isinstance(v, tuple) else dims(v))
              for n, v in bound.arguments.items()}  # fmt: skip
    return a, k, shapes


def _outputs_close(ref: Any, out: Any) -> float:
    """Largest absolute difference over the tensors of two (nested) outputs; inf if they differ
    in structure."""
    from torch.utils._pytree import tree_leaves

    r = [t for t in tree_leaves(ref) if isinstance(t, torch.Tensor)]
    o = [t for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
    if len(r) != len(o) or any(a.shape != b.shape for a, b in zip(r, o, strict=True)):
        return float("inf")
    return max((float((a.double() - b.double()).abs().max()) for a, b in zip(r, o, strict=True)
                if a.numel()), default=0.0)  # fmt: skip


def capture_model(
    model: nn.Module,
    args: Sequence[Any] = (),
    kwargs: dict[str, Any] | None = None,
    *,
    leaves: Sequence[type[nn.Module]] = (),
    leaf_names: Sequence[str] = (),
    allow_export: bool = True,
) -> fx.GraphModule:
    """A module-level ``fx.GraphModule`` of ``model`` (which it reuses: pass a copy), for code as
    users write it, trying in order:

    1. torch.fx, with the forward's plain-valued parameters that the caller does not pass (flags,
       ``return_dict``, ``None`` masks) fixed to their defaults;
    2. ``torch.export`` (non-strict, symbolic batch) on the example inputs, rebuilt into
       ``call_module`` nodes of the model's own layers (``core.rebuild``), checked against the
       model on the example;
    3. torch.fx again with each submodule that broke it kept whole (a leaf), up to 8 of them.

    ``gm.meta["capture"]`` records the path taken (``fx``, ``torch.export``, ``fx+leaves``),
    the leaves left whole and why, the earlier failures, and Hugging Face ``Conv1D`` layers
    replaced by the equal ``nn.Linear`` (``core.rebuild.linearize_conv1d``). Raises
    ``GraphCaptureError`` naming the module when nothing works. Key/value caches in the model's
    config are switched off.
    """
    from slimkit.core.rebuild import caches_off, linearize_conv1d, rebuild

    kw = dict(kwargs or {})
    args = tuple(args)
    caches_off(model)
    linear = linearize_conv1d(model)
    fixed = _fixable_defaults(model, list(kw), len(args))
    errors: list[str] = []
    try:
        gm = _fx(model, fixed, leaf_names, leaves)
        gm.meta["capture"] = {"path": "fx", "fixed": sorted(fixed), "leaves": {},
                              "conv1d_as_linear": linear}  # fmt: skip
        return gm
    except GraphCaptureError as e:
        first = e
        errors.append(f"torch.fx: {e.problem}")
    if allow_export and (args or kw):
        was = model.training
        model.eval()
        try:
            ea, ek, shapes = _export_inputs(model, args, kw)
            with _module_stack_hooks(model) as stack, torch.no_grad():
                try:
                    ep = torch.export.export(model, ea, ek, dynamic_shapes=shapes, strict=False)
                except Exception as e:
                    where = stack[-1] if stack else ""
                    raise _fail(model, where, e, "torch.export") from e
            gm = rebuild(ep.module(), model)
            with torch.no_grad():
                diff = _outputs_close(model(*args, **kw), gm(*args, **kw))
            if not diff <= 1e-4:
                raise GraphCaptureError(
                    f"the graph torch.export captured differs from the model by {diff:.3g}",
                    fix="report the model; meanwhile exclude its odd module with a Scope",
                )
            gm.meta["capture"] = {"path": "torch.export", "fixed": [], "leaves": {},
                                  "failed": errors, "conv1d_as_linear": linear}  # fmt: skip
            return gm
        except GraphCaptureError as e:
            errors.append(f"torch.export: {e.problem}")
        finally:
            model.train(was)
    # module by module: keep each failing submodule whole
    left: dict[str, str] = {}
    err = first
    for _ in range(MAX_LEAF_TRIES):
        if not err.module or err.module in left:
            break
        left[err.module] = err.problem
        try:
            gm = _fx(model, fixed, [*leaf_names, *left], leaves)
        except GraphCaptureError as e:
            err = e
            continue
        gm.meta["capture"] = {"path": "fx+leaves", "fixed": sorted(fixed), "leaves": left,
                              "failed": errors, "conv1d_as_linear": linear}  # fmt: skip
        return gm
    raise GraphCaptureError(
        "; ".join(errors) if len(errors) > 1 else first.problem, fix=first.fix, module=first.module
    )


def bind_inputs(gm: fx.GraphModule, args: Sequence[Any], kwargs: dict[str, Any]) -> list[Any]:
    """The positional values for ``gm``'s placeholders, from a call ``gm(*args, **kwargs)``."""
    import inspect

    bound = inspect.signature(gm.forward).bind(*args, **kwargs)
    bound.apply_defaults()
    return list(bound.arguments.values())
