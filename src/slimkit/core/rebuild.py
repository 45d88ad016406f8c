"""A module-level ``fx.GraphModule`` rebuilt from a ``torch.export`` program.

torch.fx cannot trace most real code (Hugging Face models: item assignment on a Proxy, iteration,
decorated forwards); ``torch.export`` (non-strict) captures almost all of it, but as a graph of
ATen ops over lifted parameters, where slimkit's graph passes look for ``call_module`` nodes of
``nn.Linear`` / ``nn.Conv2d`` / ``nn.BatchNorm2d`` and for torch-level functions. ``rebuild``
turns the one into the other:

- an ATen call that is exactly what a module's ``forward`` computes (``aten.linear`` over
  ``fc.weight`` and ``fc.bias`` of the ``nn.Linear`` ``fc``; conv, embedding, layer norm, batch
  norm in eval mode) becomes ``call_module`` of that very module object;
- common ATen ops become their torch-level functions (``aten.add.Tensor`` -> ``operator.add``,
  ``aten.relu`` -> ``torch.relu``, ``aten.view`` -> ``torch.reshape``, ...); dropout in eval
  mode disappears; shape reads stay ``aten.sym_size`` (they trace as constants: an ONNX export
  of a rebuilt graph has the example's batch size, which ``export_onnx`` detects and reports);
- every other ATen op stays as it is (it runs and exports; passes treat it as opaque).

The result is called like the original model (same argument names, keyword inputs, the same
output structure: a ``ModelOutput`` stays a ``ModelOutput``), holds the original module objects
under their original names, and computes the same values.
"""

from __future__ import annotations

import contextlib
import operator
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

aten = torch.ops.aten

# ATen op -> torch-level function with the same positional arguments
_FUNCS: dict[Any, Callable[..., Any]] = {
    aten.relu.default: torch.relu,
    aten.relu_.default: torch.relu,
    aten.hardtanh.default: F.hardtanh,
    aten.hardtanh_.default: F.hardtanh,
    aten.cat.default: torch.cat,
    aten.matmul.default: torch.matmul,
    aten.bmm.default: torch.bmm,
    aten.reshape.default: torch.reshape,
    aten.view.default: torch.reshape,
    aten.flatten.using_ints: torch.flatten,
    aten.permute.default: torch.permute,
    aten.transpose.int: torch.transpose,
    aten.squeeze.dim: torch.squeeze,
    aten.unsqueeze.default: torch.unsqueeze,
    aten.adaptive_avg_pool2d.default: F.adaptive_avg_pool2d,
    aten.avg_pool2d.default: F.avg_pool2d,
    aten.max_pool2d.default: F.max_pool2d,
    aten.max_pool1d.default: F.max_pool1d,
}
_DROPS = {aten.dropout.default, aten.dropout_.default, aten.alpha_dropout.default,
          aten.feature_dropout.default}  # fmt: skip
_ASSERTS = {aten._assert_tensor_metadata.default, aten._assert_scalar.default,
            aten.sym_constrain_range_for_size.default}  # fmt: skip
_CONVS = {aten.conv1d.default: nn.Conv1d, aten.conv2d.default: nn.Conv2d,
          aten.conv3d.default: nn.Conv3d}  # fmt: skip


def _attr(node: Any) -> str | None:
    return str(node.target) if isinstance(node, fx.Node) and node.op == "get_attr" else None


def _tup(v: Any, n: int) -> tuple[int, ...]:
    return tuple(v) if isinstance(v, (list, tuple)) else (v,) * n


Owners = dict[int, list[tuple[str, str]]]


def _owners(model: nn.Module) -> Owners:
    """id(tensor) -> every (module name, attribute) holding it: a tied weight (GPT-2's ``wte``
    and ``lm_head``) is one parameter under two names, and torch.export keeps only one."""
    out: Owners = {}
    for name, m in model.named_modules(remove_duplicate=False):
        for leaf, t in [*m.named_parameters(recurse=False), *m.named_buffers(recurse=False)]:
            out.setdefault(id(t), []).append((name, leaf))
    return out


def _module_call(
    node: fx.Node, modules: dict[str, nn.Module], model: nn.Module, owners: Owners
) -> tuple[str, fx.Node] | None:
    """``(module name, tensor input)`` when ``node`` computes exactly ``module(input)``."""
    t, a = node.target, node.args

    def tensor(i: int) -> Any:
        target = _attr(a[i]) if len(a) > i else None
        try:
            return _get(model, target) if target else None
        except AttributeError:  # a constant torch.export lifted, not one of the model's
            return None

    def owned(i: int, leaf: str, cls: type[nn.Module] | tuple[type[nn.Module], ...]) -> str | None:
        obj = tensor(i)
        classes = cls if isinstance(cls, tuple) else (cls,)
        for name, attr in owners.get(id(obj), []) if obj is not None else []:
            m = modules.get(name)
            # a subclass with its own forward (ConvNeXt's channels-first LayerNorm) computes
            # something else than the op it calls: not a module call
            if (
                attr == leaf
                and isinstance(m, classes)
                and any(type(m).forward is c.forward for c in classes)
            ):
                return name
        return None

    def bias_ok(name: str, i: int) -> bool:
        b = getattr(modules[name], "bias", None)
        given = a[i] if len(a) > i else None
        return given is None if b is None else tensor(i) is b

    if t == aten.linear.default:
        name = owned(1, "weight", nn.Linear)
        if name and bias_ok(name, 2) and isinstance(a[0], fx.Node):
            return name, a[0]
    elif t in _CONVS:
        name = owned(1, "weight", _CONVS[t])
        if name and bias_ok(name, 2) and isinstance(a[0], fx.Node):
            m = modules[name]
            assert isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d))
            nd = len(m.kernel_size)
            args = list(a) + [None] * (7 - len(a))
            stride, padding, dilation, groups = (args[3] or 1), args[4], args[5] or 1, args[6]
            same = (m.padding_mode == "zeros" and _tup(stride, nd) == _tup(m.stride, nd)
                    and (padding or 0) is not None
                    and (padding == m.padding if isinstance(m.padding, str)
                         else _tup(padding or 0, nd) == _tup(m.padding, nd))
                    and _tup(dilation, nd) == _tup(m.dilation, nd)
                    and (groups or 1) == m.groups)  # fmt: skip
            if same:
                return name, a[0]
    elif t == aten.embedding.default:
        name = owned(0, "weight", nn.Embedding)
        if name and isinstance(a[1], fx.Node):
            m = modules[name]
            assert isinstance(m, nn.Embedding)
            pad = a[2] if len(a) > 2 else -1
            own = m.padding_idx if m.padding_idx is not None else -1
            if m.max_norm is None and not m.sparse and pad in (-1, own):
                return name, a[1]
    elif t == aten.layer_norm.default:
        name = owned(2, "weight", nn.LayerNorm)
        ln = modules.get(name or "")
        if name and isinstance(ln, nn.LayerNorm) and bias_ok(name, 3):
            eps = a[4] if len(a) > 4 else 1e-5
            if list(a[1]) == list(ln.normalized_shape) and eps == ln.eps:  # type: ignore[arg-type]
                return name, a[0]  # type: ignore[return-value]
    elif t == aten.batch_norm.default:
        bn_types = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
        name = owned(3, "running_mean", bn_types)
        bn = modules.get(name or "")
        if name and isinstance(bn, bn_types) and not bn.training and a[5] is False:
            return name, a[0]  # type: ignore[return-value]
    return None


def rebuild(exported: fx.GraphModule, model: nn.Module) -> fx.GraphModule:
    """The module-level graph of ``exported`` (``ExportedProgram.module()`` of ``model``).

    ``model`` is the module that was exported (its parameters are the graph's ``get_attr``
    targets); the result uses its submodules, so it shares their parameters.
    """
    modules = dict(model.named_modules(remove_duplicate=False))
    tensors = _owners(model)
    old = exported.graph
    graph = fx.Graph()
    graph._codegen = old._codegen  # pytree in / out: called like the model, same output type
    env: dict[fx.Node, Any] = {}
    owners: dict[str, Any] = {}  # target -> object for the new GraphModule's root

    def arg(v: Any) -> Any:
        return fx.node.map_arg(v, lambda n: env[n])

    for node in old.nodes:
        t = node.target
        if (node.op == "call_function" and t in _ASSERTS) or (
            node.op == "call_module" and str(t) == "_guards_fn"  # input checks of ep.module()
        ):
            continue
        if node.op == "call_function" and t in _DROPS:
            env[node] = env[node.args[0]]
            continue
        if node.op == "call_function":
            mc = _module_call(node, modules, model, tensors)
            if mc is not None:
                name, x = mc
                owners[name] = modules[name]
                env[node] = graph.call_module(name, (env[x],))
            elif t == aten.add.Tensor and len(node.args) == 2 and not node.kwargs:
                env[node] = graph.call_function(operator.add, arg(node.args))
            elif t in _FUNCS and not node.kwargs:
                env[node] = graph.call_function(_FUNCS[t], arg(node.args))
            else:
                env[node] = graph.call_function(t, arg(node.args), arg(node.kwargs))
        else:  # placeholders, output, get_attr (parameters, constants), higher-order calls
            if node.op in ("get_attr", "call_module"):
                owners[str(t)] = _get(exported, str(t))
            env[node] = graph.node_copy(node, lambda n: env[n])
        if isinstance(env[node], fx.Node):
            env[node].meta = dict(node.meta)
    gm = fx.GraphModule(owners, graph, type(model).__name__)
    gm.graph.eliminate_dead_code()
    gm.delete_all_unused_submodules()
    gm.recompile()
    # the root must see BatchNorm statistics and flags of reused modules as they were
    gm.train(False)
    return gm


def _get(root: nn.Module, target: str) -> Any:
    obj: Any = root
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def forward_params(model: nn.Module) -> dict[str, Any]:
    """The parameters of ``model.forward`` by name (``inspect.Parameter``); empty when Python
    cannot read its signature (a C extension, a wrapped callable)."""
    import inspect

    try:
        return dict(inspect.signature(model.forward).parameters)
    except (TypeError, ValueError):
        return {}


def fixed_kwargs(model: nn.Module, given: set[str]) -> dict[str, Any]:
    """Keyword arguments to fix when exporting ``model``: caches off where the forward takes
    ``use_cache`` (or ``**kwargs`` with a config that has it) and the caller did not set it:
    Hugging Face language models otherwise return a ``DynamicCache`` among their outputs."""
    params = forward_params(model)
    takes_kwargs = any(p.kind == p.VAR_KEYWORD for p in params.values())
    cfg = getattr(model, "config", None)
    if "use_cache" in given:
        return {}
    if "use_cache" in params or (takes_kwargs and getattr(cfg, "use_cache", False)):
        return {"use_cache": False}
    return {}


def caches_off(model: nn.Module) -> list[Any]:
    """Switch off key/value caches in ``model``'s config (a copy's: it is changed in place), so
    that a captured graph returns tensors only; returns the configs changed."""
    changed = []
    for m in model.modules():
        cfg = getattr(m, "config", None)
        if cfg is not None and getattr(cfg, "use_cache", False):
            cfg.use_cache = False
            changed.append(cfg)
    return changed


@contextlib.contextmanager
def no_caches(model: nn.Module) -> Iterator[None]:
    """``caches_off`` for the duration only: the user's model comes back as it was."""
    changed = caches_off(model)
    try:
        yield
    finally:
        for cfg in changed:
            cfg.use_cache = True


def linearize_conv1d(model: nn.Module) -> list[str]:
    """Replace Hugging Face's ``Conv1D`` layers (GPT-2: ``x @ W + b`` with ``W`` stored (in, out))
    by the ``nn.Linear`` that computes the same, in place; returns their names. Techniques then
    see ordinary Linear layers (quantization, pruning)."""
    done = []
    for name, m in list(model.named_modules()):
        w = getattr(m, "weight", None)
        if type(m).__name__ != "Conv1D" or not isinstance(w, torch.Tensor) or w.dim() != 2:
            continue
        b = getattr(m, "bias", None)
        lin = nn.Linear(w.shape[0], w.shape[1], bias=b is not None, dtype=w.dtype)
        with torch.no_grad():
            lin.weight.copy_(w.t())
            if b is not None:
                lin.bias.copy_(b)
        parent, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, leaf, lin)
        done.append(name)
    return done


def _layer_for(node: fx.Node, exported: fx.GraphModule) -> tuple[str, nn.Module] | None:
    """The ``nn`` layer an ATen call of a loaded program computes, built over the program's own
    parameters (same tensor objects), and the name it gets: its weight's owner path."""
    t: Any = node.target
    a: list[Any] = list(node.args)  # ATen arguments of a known schema
    wi = {aten.linear.default: 1, aten.embedding.default: 0, aten.layer_norm.default: 2,
          aten.batch_norm.default: 1, **dict.fromkeys(_CONVS, 1)}.get(t)  # fmt: skip
    target = _attr(a[wi]) if wi is not None and len(a) > wi else None
    if target is None or not target.endswith(".weight"):
        return None
    w = _get(exported, target)
    owner = target[: -len(".weight")]

    def p(i: int) -> Any:
        name = _attr(a[i]) if len(a) > i else None
        return _get(exported, name) if name else None

    m: nn.Module
    if t == aten.linear.default and w.dim() == 2:
        m = nn.Linear(w.shape[1], w.shape[0], bias=p(2) is not None)
    elif t in _CONVS:
        args = list(a) + [None] * (7 - len(a))
        nd = w.dim() - 2
        pad = args[4] if args[4] is not None else 0
        conv: Any = _CONVS[t]  # Conv1d / 2d / 3d: tuples of nd ints
        m = conv(w.shape[1] * (args[6] or 1), w.shape[0], tuple(w.shape[2:]),
                 stride=_tup(args[3] or 1, nd), padding=pad if isinstance(pad, str)
                 else _tup(pad, nd), dilation=_tup(args[5] or 1, nd), groups=args[6] or 1,
                 bias=p(2) is not None)  # fmt: skip
    elif t == aten.embedding.default:
        pad = a[2] if len(a) > 2 and a[2] != -1 else None
        m = nn.Embedding(w.shape[0], w.shape[1], padding_idx=pad)
    elif t == aten.layer_norm.default:
        m = nn.LayerNorm(list(a[1]), eps=a[4] if len(a) > 4 else 1e-5,  # type: ignore[arg-type]
                         bias=p(3) is not None)  # fmt: skip
    elif t == aten.batch_norm.default and len(a) > 7 and a[5] is False and p(3) is not None:
        val = getattr(a[0], "meta", {}).get("val")
        rank = val.dim() if val is not None else 4
        cls = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}[rank]
        m = cls(w.shape[0], eps=a[7], momentum=a[6])  # type: ignore[arg-type]
        m.running_mean, m.running_var = p(3), p(4)
        m.eval()
    else:
        return None
    m.weight = w if isinstance(w, nn.Parameter) else nn.Parameter(w, requires_grad=False)
    bi = {aten.embedding.default: None, aten.layer_norm.default: 3}.get(t, 2)  # type: ignore[call-overload]
    b = p(bi) if bi is not None else None
    if b is not None:
        m.bias = b if isinstance(b, nn.Parameter) else nn.Parameter(b, requires_grad=False)
    return owner, m


def program_module(program: Any) -> fx.GraphModule:
    """A loaded ``torch.export`` program (``ExportedProgram``) as a module-level graph: its ATen
    linear / conv / embedding / layer-norm / batch-norm calls become ``nn`` layers over the
    program's parameters (named after them), so every technique sees ordinary layers. Calls
    like the program (same inputs and output structure); supports ``.eval()``."""
    exported = program.module()
    root = nn.Module()
    for node in exported.graph.nodes:
        if node.op != "call_function":
            continue
        made = _layer_for(node, exported)
        if made is None:
            continue
        name, layer = made
        parent, _, leaf = name.rpartition(".")
        holder = root
        for part in parent.split(".") if parent else []:
            if not hasattr(holder, part):
                holder.add_module(part, nn.Module())
            holder = getattr(holder, part)
        if not hasattr(holder, leaf):
            holder.add_module(leaf, layer)
    return rebuild(exported, root)
