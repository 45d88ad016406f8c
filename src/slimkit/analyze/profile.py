"""Per-layer profile: parameters, MACs and bytes of every op, found through the graph.

The model is captured with torch.fx and run by a shape-recording interpreter, so functional ops
count too (attention's ``q @ k.transpose(-2, -1)``, residual adds, ``F.linear``)::

    prof = profile_model(model, (x,))
    prof.total_macs, prof.total_params, prof.macs_by_op()   # {"conv": ..., "matmul": ...}
    prof.rows[0]      # LayerProfile(name="conv1", op="conv", macs=118013952, ...)

A submodule that torch.fx cannot trace is run as a black box whose leaf modules are counted with
forward hooks; when the top-level forward itself cannot be traced, the whole model is. Either way
a warning names the module, and the functional ops inside it are missed.

Conventions: conv = out_elems * (in_ch / groups) * prod(kernel); linear = out_elems * in_features;
matmul = prod(batch dims) * M * N * K; LSTM/GRU/RNN by formula (gates * H * (I + H) per step).
Norm, pooling, elementwise and embedding ops have 0 MACs but their bytes count. ``flops`` is
2 * MACs (+ bias) for MAC ops and about one per element otherwise: a rough figure for a roofline.
Floating tensors take ``dtype_bytes`` per element; integer ones (token ids) their own size.
"""

from __future__ import annotations

import math
import operator
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import fx, nn
from torch.nn.utils.rnn import PackedSequence

from slimkit.core.graph import capture
from slimkit.errors import GraphCaptureError

_MAX_OPAQUE = 16  # untraceable submodules tolerated before giving up on the graph


@dataclass(frozen=True)
class LayerProfile:
    """One op: a module call (named by its qualified name) or a functional op (its fx node name).

    ``op`` is one of conv, linear, matmul, rnn, attention, norm, pool, reduce, elementwise,
    embedding, other; ``target`` the module class or function; ``scope`` the module it runs in.
    ``params`` counts each parameter once (a shared module's second call shows 0);
    ``weight_bytes`` is what the op reads (an embedding: the rows it gathers).
    """

    name: str
    op: str
    target: str
    scope: str
    params: int
    macs: int
    flops: int
    weight_bytes: int
    input_bytes: int
    output_bytes: int
    output_shape: tuple[int, ...]

    @property
    def bytes(self) -> int:
        """Weights read plus activations read and written: the least memory traffic of the op."""
        return self.weight_bytes + self.input_bytes + self.output_bytes

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["output_shape"] = list(self.output_shape)
        return d


@dataclass
class ModelProfile:
    """All rows in execution order, the model's parameter count, and how they were found.

    ``method`` is ``fx`` (whole graph), ``fx+hooks`` (graph with untraceable submodules counted
    by hooks) or ``hooks`` (no graph: leaf modules only).
    """

    rows: list[LayerProfile]
    total_params: int
    dtype_bytes: int
    method: str
    warnings: list[str] = field(default_factory=list)

    @property
    def total_macs(self) -> int:
        return sum(r.macs for r in self.rows)

    @property
    def total_flops(self) -> int:
        return sum(r.flops for r in self.rows)

    @property
    def weight_bytes(self) -> int:
        return self.total_params * self.dtype_bytes

    @property
    def activation_bytes(self) -> int:
        """Bytes of every op's output (each activation written once)."""
        return sum(r.output_bytes for r in self.rows)

    def macs_by_op(self) -> dict[str, int]:
        """Total MACs per op kind, e.g. ``{"conv": ..., "linear": ..., "matmul": ...}``."""
        out: dict[str, int] = {}
        for r in self.rows:
            out[r.op] = out.get(r.op, 0) + r.macs
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "dtype_bytes": self.dtype_bytes,
            "total_params": self.total_params,
            "total_macs": self.total_macs,
            "total_flops": self.total_flops,
            "weight_bytes": self.weight_bytes,
            "activation_bytes": self.activation_bytes,
            "macs_by_op": self.macs_by_op(),
            "warnings": list(self.warnings),
            "rows": [r.to_dict() for r in self.rows],
        }


# --- op tables ---------------------------------------------------------------------------------

_POOL_FNS = ("avg_pool", "max_pool", "adaptive_avg_pool", "adaptive_max_pool", "lp_pool")
_OP_BY_NAME: dict[str, str] = {
    **dict.fromkeys(("matmul", "bmm", "mm", "mv", "baddbmm", "addmm", "addbmm", "addmv"), "matmul"),
    "scaled_dot_product_attention": "matmul",
    "linear": "linear",
    **dict.fromkeys(("conv1d", "conv2d", "conv3d"), "conv"),
    **dict.fromkeys(("conv_transpose1d", "conv_transpose2d", "conv_transpose3d"), "conv"),
    **dict.fromkeys(
        ("layer_norm", "batch_norm", "group_norm", "instance_norm", "rms_norm", "normalize"),
        "norm",
    ),
    **{f"{p}{d}d": "pool" for p in _POOL_FNS for d in (1, 2, 3)},
    **dict.fromkeys(
        ("mean", "sum", "amax", "amin", "max", "min", "prod", "var", "std", "norm", "logsumexp"),
        "reduce",
    ),
    **dict.fromkeys(("embedding", "embedding_bag"), "embedding"),
    **dict.fromkeys(
        (
            "add", "sub", "mul", "truediv", "div", "floordiv", "pow", "neg", "exp", "log", "sqrt",
            "rsqrt", "tanh", "sigmoid", "relu", "relu6", "gelu", "silu", "hardswish",
            "hardsigmoid", "hardtanh", "leaky_relu", "elu", "mish", "softmax", "log_softmax",
            "where", "clamp", "clip", "abs", "masked_fill", "maximum", "minimum", "erf", "sin",
            "cos", "square", "reciprocal", "eq", "ne", "lt", "gt", "le", "ge", "iadd", "isub",
            "imul", "itruediv",
        ),
        "elementwise",
    ),
}  # fmt: skip
# Ops that move no data (views, metadata) or vanish at inference (dropout): no row.
_NO_ROW = {
    "view", "reshape", "flatten", "unflatten", "transpose", "permute", "contiguous", "squeeze",
    "unsqueeze", "expand", "expand_as", "narrow", "getitem", "getattr", "size", "dim", "chunk",
    "split", "unbind", "t", "detach", "dropout", "alpha_dropout", "feature_alpha_dropout",
}  # fmt: skip
_NO_ROW_MODULES = (nn.Identity, nn.Flatten, nn.Unflatten, nn.modules.dropout._DropoutNd)
_NORMS = (
    nn.modules.batchnorm._NormBase,
    nn.LayerNorm,
    nn.GroupNorm,
    nn.LocalResponseNorm,
    nn.RMSNorm,
)
_POOLS = (
    nn.modules.pooling._MaxPoolNd,
    nn.modules.pooling._AvgPoolNd,
    nn.modules.pooling._AdaptiveAvgPoolNd,
    nn.modules.pooling._AdaptiveMaxPoolNd,
    nn.modules.pooling._LPPoolNd,
)
# Modules counted as a whole (never opened up by the hook fallback).
_KNOWN = (
    nn.modules.conv._ConvNd,
    nn.Linear,
    nn.Bilinear,
    nn.RNNBase,
    nn.MultiheadAttention,
    nn.Embedding,
    nn.EmbeddingBag,
    *_NORMS,
    *_POOLS,
    *_NO_ROW_MODULES,
)


def _is_activation(m: nn.Module) -> bool:
    return type(m).__module__ == "torch.nn.modules.activation" and not isinstance(
        m, nn.MultiheadAttention
    )


def _whole(m: nn.Module) -> bool:
    """Counted as one row (a known layer or a module without children), never opened up."""
    return isinstance(m, _KNOWN) or _is_activation(m) or not any(m.children())


def _tensors(obj: Any) -> Iterator[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (tuple, list)):  # PackedSequence is a tuple too
        for o in obj:
            yield from _tensors(o)
    elif isinstance(obj, dict):
        for o in obj.values():
            yield from _tensors(o)


def _first_tensor(obj: Any) -> torch.Tensor | None:
    return next(_tensors(obj), None)


def _numel(obj: Any) -> int:
    return sum(t.numel() for t in _tensors(obj))


# --- formulas ----------------------------------------------------------------------------------


def _rnn_macs(m: nn.RNNBase, x: Any) -> int:
    """MACs of the gate matmuls of an LSTM / GRU / RNN over the whole input sequence."""
    if isinstance(x, PackedSequence):
        steps = x.data.shape[0]  # sum over the batch of each sequence's length
    elif x.dim() == 2:  # unbatched (T, I)
        steps = x.shape[0]
    else:
        steps = x.shape[0] * x.shape[1]  # (T, B, I) or (B, T, I)
    gates = {"LSTM": 4, "GRU": 3}.get(m.mode, 1)
    h, dirs = m.hidden_size, 2 if m.bidirectional else 1
    out = m.proj_size or h  # the recurrent state's width
    per_step = 0
    for layer in range(m.num_layers):
        width_in = m.input_size if layer == 0 else out * dirs
        per_step += dirs * (gates * h * (width_in + out) + (h * out if m.proj_size else 0))
    return steps * per_step


def _mha_macs(m: nn.MultiheadAttention, query: torch.Tensor, key: torch.Tensor) -> int:
    """Input projections, QK^T, AV and the output projection of nn.MultiheadAttention."""
    e = m.embed_dim
    seq_axis = 1 if (m.batch_first and query.dim() == 3) else 0
    n = query.numel() // (query.shape[seq_axis] * query.shape[-1])
    lq, lk = query.shape[seq_axis], key.shape[seq_axis]
    proj = n * (lq * e * e + lk * e * m.kdim + lk * e * m.vdim + lq * e * e)
    return proj + 2 * n * lq * lk * e


def _module_op(m: nn.Module, args: tuple[Any, ...], out: Any) -> tuple[str, int] | None:
    """(op kind, MACs) of one call of module ``m``, or None for ops that get no row."""
    y = _first_tensor(out)
    out_elems = 0 if y is None else y.numel()
    if isinstance(m, _NO_ROW_MODULES):
        return None
    if isinstance(m, nn.modules.conv._ConvNd):
        k = math.prod(m.kernel_size)
        if m.transposed:  # every input element meets (out_ch / groups) * k weights
            return "conv", _numel(args[0]) * (m.out_channels // m.groups) * k
        return "conv", out_elems * (m.in_channels // m.groups) * k
    if isinstance(m, nn.Linear):
        return "linear", out_elems * m.in_features
    if isinstance(m, nn.Bilinear):
        return "linear", out_elems * m.in1_features * m.in2_features
    if isinstance(m, nn.RNNBase):
        return "rnn", _rnn_macs(m, args[0])
    if isinstance(m, nn.MultiheadAttention):
        return "attention", _mha_macs(m, args[0], args[1] if len(args) > 1 else args[0])
    if isinstance(m, (nn.Embedding, nn.EmbeddingBag)):
        return "embedding", 0
    if isinstance(m, _NORMS):
        return "norm", 0
    if isinstance(m, _POOLS):
        return "pool", 0
    if _is_activation(m):
        return "elementwise", 0
    return "other", 0


def _function_macs(kind: str, name: str, args: tuple[Any, ...], kw: dict[str, Any], y: Any) -> int:
    out_elems = _numel(y)
    if kind == "matmul":
        if name == "scaled_dot_product_attention":  # QK^T then AV: (B, H, L, S) * (E + Ev)
            s = args[1].shape[-2]
            return args[0].numel() * s + out_elems * s
        if name == "addbmm":  # sums over the batch, so the output hides one factor
            return int(args[1].numel() * args[2].shape[-1])
        a = args[1] if name in ("baddbmm", "addmm", "addmv") else args[0]
        return out_elems * a.shape[-1]  # (..., M, N) outputs, each a dot product of length K
    weight = args[1] if len(args) > 1 else kw.get("weight")
    if kind == "linear" and isinstance(weight, torch.Tensor):
        return out_elems * weight.shape[-1]
    if kind == "conv" and isinstance(weight, torch.Tensor):
        per = weight.shape[1] * math.prod(weight.shape[2:])  # (in/groups | out/groups) * kernel
        return (_numel(args[0]) if "transpose" in name else out_elems) * per
    return 0


def _flops(kind: str, macs: int, has_bias: bool, in_elems: int, out_elems: int) -> int:
    if macs:
        return 2 * macs + (out_elems if has_bias else 0)
    if kind in ("pool", "reduce"):
        return in_elems
    if kind == "norm":
        return 2 * out_elems
    if kind == "elementwise":
        return out_elems
    return 0


# --- counting ----------------------------------------------------------------------------------


class _Counter:
    """Collects rows; counts each parameter once (shared modules, tied weights)."""

    def __init__(self, dtype_bytes: int) -> None:
        self.dtype_bytes = dtype_bytes
        self.rows: list[LayerProfile] = []
        self.seen: set[int] = set()

    def nbytes(self, obj: Any) -> int:
        return sum(
            t.numel() * (self.dtype_bytes if t.is_floating_point() else t.element_size())
            for t in _tensors(obj)
        )

    def new_params(self, params: list[torch.Tensor]) -> int:
        fresh = [p for p in params if id(p) not in self.seen]
        self.seen.update(id(p) for p in fresh)
        return sum(p.numel() for p in fresh)

    def add(
        self,
        name: str,
        op: str,
        target: str,
        scope: str,
        macs: int,
        params: list[torch.Tensor],
        inputs: Any,
        out: Any,
        has_bias: bool = False,
    ) -> None:
        y = _first_tensor(out)
        flops = _flops(op, macs, has_bias, _numel(inputs), _numel(out))
        weight_bytes = sum(p.numel() for p in params) * self.dtype_bytes
        if op == "embedding":  # a lookup reads only the rows it gathers, not the whole table
            weight_bytes = min(weight_bytes, _numel(out) * self.dtype_bytes)
        self.rows.append(
            LayerProfile(
                name=name,
                op=op,
                target=target,
                scope=scope,
                params=self.new_params(params),
                macs=int(macs),
                flops=int(flops),
                weight_bytes=weight_bytes,
                input_bytes=self.nbytes(inputs),
                output_bytes=self.nbytes(out),
                output_shape=tuple(y.shape) if y is not None else (),
            )
        )

    def module(self, name: str, m: nn.Module, args: tuple[Any, ...], out: Any) -> None:
        found = _module_op(m, args, out)
        if found is not None:
            op, macs = found
            bias = getattr(m, "bias", None) is not None and op in ("conv", "linear")
            self.add(name, op, type(m).__name__, name, macs, list(m.parameters()), args, out, bias)

    def hooked(self, root: nn.Module, prefix: str, run: Callable[[], Any]) -> Any:
        """Run ``run()`` with forward hooks on the leaf modules of ``root``; count each call."""
        targets = _hook_targets(root, prefix)
        handles = []
        for name, m in targets:

            def hook(
                mod: nn.Module, args: tuple[Any, ...], kw: dict[str, Any], out: Any, _n: str = name
            ) -> None:
                self.module(_n, mod, tuple(args) + tuple(kw.values()), out)

            handles.append(m.register_forward_hook(hook, with_kwargs=True))
        try:
            out = run()
        finally:
            for h in handles:
                h.remove()
        # parameters a container uses in its own forward (not through a hooked leaf)
        hooked = {id(m) for _, m in targets}
        for name, m in root.named_modules(prefix=prefix):
            own = [p for p in m.parameters(recurse=False) if id(p) not in self.seen]
            if own and id(m) not in hooked:
                label = name or type(m).__name__
                self.add(label, "other", type(m).__name__, name, 0, own, (), None)
        return out


def _hook_targets(root: nn.Module, prefix: str) -> list[tuple[str, nn.Module]]:
    if _whole(root):
        return [(prefix, root)]
    out: list[tuple[str, nn.Module]] = []
    seen: set[int] = set()

    def walk(m: nn.Module, path: str) -> None:
        for child_name, child in m.named_children():
            full = f"{path}.{child_name}" if path else child_name
            if id(child) in seen:
                continue
            seen.add(id(child))
            if _whole(child):
                out.append((full, child))
            else:
                walk(child, full)

    walk(root, prefix)
    return out


class _Profiler(fx.Interpreter):
    """Runs the captured graph on real inputs and records a row per module call / op."""

    def __init__(self, gm: fx.GraphModule, counter: _Counter, opaque: set[str]) -> None:
        super().__init__(gm)
        self.counter = counter
        self.opaque = opaque

    def call_module(self, target: Any, args: Any, kwargs: Any) -> Any:
        m = self.fetch_attr(target)
        if target in self.opaque or not _whole(m):  # e.g. nn.TransformerEncoderLayer
            return self.counter.hooked(
                m, target, lambda: fx.Interpreter.call_module(self, target, args, kwargs)
            )
        out = super().call_module(target, args, kwargs)
        self.counter.module(target, m, tuple(args) + tuple(kwargs.values()), out)
        return out

    def run_node(self, n: fx.Node) -> Any:
        result = super().run_node(n)
        if n.op in ("call_function", "call_method"):
            self._record(n, result)
        return result

    def _record(self, n: fx.Node, result: Any) -> None:
        if _first_tensor(result) is None:
            return
        raw = n.target if isinstance(n.target, str) else getattr(n.target, "__name__", "")
        name = raw.strip("_") if raw.startswith("__") else raw.rstrip("_")  # add_ -> add
        if n.target is operator.matmul:
            name = "matmul"
        if name in _NO_ROW:
            return
        kind = _OP_BY_NAME.get(name, "other")
        args, kwargs = self.fetch_args_kwargs_from_env(n)
        weights: list[torch.Tensor] = []
        inputs: list[Any] = []
        for a in n.all_input_nodes:
            val = self.env[a]
            is_param = a.op == "get_attr" and isinstance(val, nn.Parameter)
            (weights if is_param else inputs).append(val)
        macs = _function_macs(kind, name, tuple(args), dict(kwargs), result)
        stack = n.meta.get("nn_module_stack") or {}
        scope = next(reversed(stack)) if stack else ""
        bias = kind in ("linear", "conv") and len(weights) > 1
        self.counter.add(n.name, kind, name or str(n.target), scope, macs, weights, inputs, result,
                         bias)  # fmt: skip


def _trace(model: nn.Module, notes: list[str]) -> tuple[fx.GraphModule | None, set[str]]:
    """Capture with torch.fx, keeping each untraceable submodule whole; None if the top fails."""
    opaque: list[str] = []
    for _ in range(_MAX_OPAQUE):
        try:
            return capture(model, method="fx", leaf_names=opaque), set(opaque)
        except GraphCaptureError as e:
            where = e.module or ""
            cause = e.problem.split(": ", 1)[-1]
            if not where or where in opaque:
                notes.append(
                    f"torch.fx could not trace the top-level forward of {type(model).__name__} "
                    f"({cause}); counted its leaf modules with forward hooks, so functional ops "
                    "outside modules (matmul, add, softmax, ...) are missed"
                )
                return None, set()
            cls = type(model.get_submodule(where)).__name__
            notes.append(
                f"torch.fx could not trace module {where!r} ({cls}: {cause}); counted its leaf "
                "modules with forward hooks, so functional ops inside its forward (matmul, add, "
                "softmax, ...) are missed"
            )
            opaque.append(where)
    notes.append(f"more than {_MAX_OPAQUE} untraceable submodules; counted with hooks only")
    return None, set()


def profile_model(
    model: nn.Module,
    example_inputs: torch.Tensor | tuple[Any, ...] | list[Any],
    *,
    dtype_bytes: int = 4,
) -> ModelProfile:
    """Parameters, MACs and bytes of every op of ``model`` run on ``example_inputs``.

    ``dtype_bytes`` is the size of a floating weight / activation element (4 fp32, 2 bf16,
    1 int8). Runs one forward pass without autograd; the model is not modified.
    """
    inputs = (
        (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs)
    )
    notes: list[str] = []
    gm, opaque = _trace(model, notes)
    counter = _Counter(dtype_bytes)
    method = "hooks"
    with torch.no_grad():
        if gm is not None:
            try:
                _Profiler(gm, counter, opaque).run(*inputs)
                method = "fx+hooks" if opaque else "fx"
            except Exception as e:  # a graph that traced but does not run: count per module
                notes.append(
                    f"the torch.fx graph of {type(model).__name__} failed to run "
                    f"({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}); "
                    "counted leaf modules with forward hooks, so functional ops are missed"
                )
                counter = _Counter(dtype_bytes)
                gm = None
        if gm is None:
            counter.hooked(model, "", lambda: model(*inputs))
    for note in notes:
        warnings.warn(note, stacklevel=2)
    total = sum(p.numel() for p in model.parameters())
    return ModelProfile(counter.rows, total, dtype_bytes, method, notes)
