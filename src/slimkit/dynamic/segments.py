"""Cut a model into a chain of segments at points where one tensor carries everything forward.

Early exit needs the backbone as ``seg_0 -> seg_1 -> ... -> seg_n``: a head reads the output of
each segment but the last. The model is traced with ``torch.fx``; a node is a *cut point* when,
after it runs, no earlier value is read again (so inside a residual block, where the identity is
still live, nothing is a cut point) and its output is a single tensor. Cut points are named by the
module that produced them (``layer2.1.relu2``) and chosen by name or by where they fall in the
model's cumulative MACs::

    seg = split(model, x, at=[0.25, 0.5, 0.75])      # the cut points nearest those MAC fractions
    seg = split(model, x, names=["layer1", "layer2"])  # a module name: its last node
    seg.segments  # list of GraphModules; seg.segments[-1] ends with the model's output
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp
from torch.fx.passes.split_module import split_module

from slimkit.errors import ConfigError, GraphCaptureError


@dataclass
class Cut:
    """A place the model can be cut: the fx node, the module name it belongs to, its output shape
    (batch first) and the fraction of the model's MACs done before it."""

    node: str
    module: str
    shape: tuple[int, ...]
    macs_before: float


@dataclass
class Split:
    """The model as a chain: ``segments[k]`` maps the previous segment's output (the model's
    input for ``k = 0``) to the next; ``cuts[k]`` is where segment ``k`` ends."""

    segments: list[fx.GraphModule]
    cuts: list[Cut]


def _conv_linear_macs(m: nn.Module, out: torch.Size) -> int:
    if isinstance(m, nn.Conv2d | nn.Conv1d | nn.Conv3d):
        k = int(torch.tensor(m.kernel_size).prod())
        return int(torch.Size(out).numel()) * (m.in_channels // m.groups) * k
    if isinstance(m, nn.Linear):
        return int(torch.Size(out).numel()) * m.in_features
    return 0


def trace(model: nn.Module, example: torch.Tensor) -> fx.GraphModule:
    """``torch.fx`` trace of ``model`` with every node's output shape recorded."""
    try:
        gm = fx.symbolic_trace(model)
    except Exception as e:
        raise GraphCaptureError(
            f"{type(model).__name__} cannot be traced by torch.fx to cut it into segments "
            f"({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''})",
            fix="pass the traceable backbone (e.g. a nn.Sequential of its stages) and its head",
        ) from None
    ShapeProp(gm).propagate(example)
    return gm


def cut_points(gm: fx.GraphModule) -> list[Cut]:
    """Every node after which only its own output is read again, with its MAC position."""
    nodes = list(gm.graph.nodes)
    pos = {n: i for i, n in enumerate(nodes)}
    last_use = {n: max((pos[u] for u in n.users), default=pos[n]) for n in nodes}
    mods = dict(gm.named_modules())
    macs: list[int] = []
    for n in nodes:
        meta = n.meta.get("tensor_meta")
        m = mods.get(str(n.target)) if n.op == "call_module" else None
        macs.append(_conv_linear_macs(m, meta.shape) if m is not None and meta is not None else 0)
    total = max(sum(macs), 1)
    cuts, done, live_after = [], 0, 0
    # live_after[i]: the largest last use among nodes 0..i-1 (a value still needed past node i)
    for i, n in enumerate(nodes):
        done += macs[i]
        meta = n.meta.get("tensor_meta")
        if (
            n.op in ("call_module", "call_function", "call_method")
            and live_after <= i
            and isinstance(meta, fx.passes.shape_prop.TensorMetadata)
            and i < len(nodes) - 2  # not the output itself
        ):
            name = str(n.target) if n.op == "call_module" else n.name
            cuts.append(Cut(n.name, name, tuple(meta.shape), done / total))
        live_after = max(live_after, last_use[n])
    # of the cut points with no MACs between them keep the last (after the activation or pool);
    # the ones after the last weighted layer are no place for an exit
    kept = [
        c
        for i, c in enumerate(cuts)
        if i + 1 == len(cuts) or cuts[i + 1].macs_before > c.macs_before
    ]
    return [c for c in kept if c.macs_before < 0.99]


def _pick(cuts: list[Cut], names: Sequence[str], at: Sequence[float]) -> list[Cut]:
    if names:
        chosen = []
        for want in names:
            hits = [c for c in cuts if c.module == want or c.module.startswith(want + ".")]
            if not hits:
                known = ", ".join(c.module for c in cuts) or "(none)"
                raise ConfigError(
                    f"no cut point after module {want!r}: the model cannot be cut there (a "
                    "residual's input is still needed, or no such module)",
                    fix=f"name one of the modules after which it can be cut: {known}",
                )
            chosen.append(hits[-1])
    else:
        chosen = []
        for f in at:
            best = min(cuts, key=lambda c: abs(c.macs_before - f), default=None)
            if best is not None and best not in chosen:
                chosen.append(best)
    chosen.sort(key=lambda c: c.macs_before)
    if not chosen:
        raise ConfigError(
            "the model has no point where it can be cut into segments",
            fix="use a model whose backbone is a chain of blocks (a CNN, a ResNet)",
        )
    return chosen


def split(
    model: nn.Module,
    example: torch.Tensor,
    *,
    names: Sequence[str] = (),
    at: Sequence[float] = (0.25, 0.5, 0.75),
) -> Split:
    """``model`` as a chain of segments cut at the modules ``names`` or, without names, at the
    cut points nearest the MAC fractions ``at``. The segments share no parameters with
    ``model`` only if ``model`` is a copy: pass ``copy.deepcopy(model)`` to keep it apart."""
    gm = trace(model, example)
    chosen = _pick(cut_points(gm), names, at)
    order = {n.name: i for i, n in enumerate(gm.graph.nodes)}
    ends = [order[c.node] for c in chosen]

    def part(n: fx.Node) -> int:
        return sum(order[n.name] > e for e in ends)

    whole = split_module(gm, model, part, keep_original_order=True)
    segments = [getattr(whole, f"submod_{k}") for k in range(len(ends) + 1)]
    for k, seg in enumerate(segments):
        n_in = sum(n.op == "placeholder" for n in seg.graph.nodes)
        if n_in != 1:
            raise GraphCaptureError(
                f"segment {k} of {type(model).__name__} takes {n_in} inputs, not one",
                fix="cut after another module (see slimkit.dynamic.segments.cut_points)",
            )
    return Split(segments, chosen)
