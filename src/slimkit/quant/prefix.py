"""Which leading layers run faster in float than in int8 on ONNX Runtime: measured, not assumed.

ORT's int8 convolutions are not faster everywhere. Profiled on an AVX-512 VNNI Xeon (2 threads,
MobileNetV2 at 224x224): the 3-channel stem conv takes 315 us as QLinearConv and 151 us as float
Conv; the first depthwise conv at 112x112 165 us against 117 us; the 1x1 convs after them are 2x
faster in int8. Where the float region ends, the tensor is quantized (and re-laid out) once, which
costs time in proportion to its size: running only the stem in float is slower overall (+0.15 ms),
running stem, depthwise and first projection in float is faster (-0.08 ms) than all-int8.

So, like an inference compiler picking the fastest kernel per layer, ``choose`` times the
candidates: the network's leading chain of layers (from the input, up to the first branch) is cut
after each of its layers in turn, the layers before the cut are kept float, and each variant of
that sub-network (plus the next int8 layer, so the boundary's cost is counted) is timed in ORT,
interleaved (0.15 s for ResNet-18, 0.9 s for MobileNetV2). The fastest cut wins; cuts within
``TIE`` (10 %) of it count as ties and the longest of those is taken, since every float layer also
removes quantization noise where it hurts most: noise entering at the input is amplified by every
layer after it (MobileNetV2, random weights: input noise at 41 dB SNR alone leaves 30 dB at the
output; with the stem block float the int8 model goes 25.2 -> 26.0 dB, 26.2 with
``rotate_boundary``).

Only a small leading part of a model is ever a candidate: at most ``MAX_LAYERS`` layers holding
at most ``MAX_PARAM_SHARE`` of the weights, so the file stays int8-sized and a model never comes
back float because it is tiny. Decisions are cached per process by the chain's structure.
"""

from __future__ import annotations

import math
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import fx, nn

from slimkit.core.data import Batch
from slimkit.quant import sim

MAX_LAYERS = 8
MAX_PARAM_SHARE = 0.02  # of the quantizable layers' weights
# cuts within 10 % of the fastest sub-network time count as ties, and the tie with more float
# layers is the more accurate one. The timed sub-network is a fraction of the model (MobileNetV2:
# about half), and timing noise on 2 cores is +-2-5 %. MobileNetV2: stem + depthwise float is
# 3-6 % faster on the sub-network, 2 % end to end, than also the projection float: 25.8 vs
# 26.2 dB; at a 5 % tie the choice flipped between the two in 3 of 12 tries
TIE = 0.10
# structure of the timed sub-network -> (cut, times); names are re-read from each model
_CACHE: dict[tuple[Any, ...], tuple[int, list[float]]] = {}


@dataclass
class PrefixChoice:
    """The leading layers to keep float, and the measurements behind the choice."""

    layers: list[str] = field(default_factory=list)  # module targets kept float
    candidates: list[str] = field(default_factory=list)  # the leading chain, module targets
    times_ms: list[float] = field(default_factory=list)  # sub-network ms, per cut 0..n
    reason: str = ""

    def summary(self) -> str:
        if not self.times_ms:
            return self.reason
        cuts = ", ".join(f"{k}: {t:.3f}" for k, t in enumerate(self.times_ms))
        kept = ", ".join(self.layers) or "none"
        return f"float: {kept} (leading-chain sub-network ms by float layers {cuts})"


def leading_chain(gm: fx.GraphModule, weighted: dict[str, str]) -> tuple[list[str], str | None]:
    """Node names of the weighted layers on the chain from the single input to the first branch,
    and the name of the first weighted node after it (None when the chain is the whole model)."""
    modules = dict(gm.named_modules())
    inputs = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(inputs) != 1:
        return [], None
    chain: list[str] = []
    cur = inputs[0]
    while len(cur.users) == 1:
        (user,) = cur.users
        if user.name in weighted:
            chain.append(user.name)
        elif sim._kind(user, modules, set(weighted.values())) not in ("pass", "pool"):
            break
        cur = user
    # the first weighted node downstream of the chain's end, breadth first in graph order
    seen, frontier = set(), [cur]
    while frontier:
        node = frontier.pop(0)
        for u in node.users:
            if u.name in weighted and u.name not in chain:
                return chain, u.name
            if u.name not in seen:
                seen.add(u.name)
                frontier.append(u)
    return chain, None


def _numel(gm: fx.GraphModule, target: str) -> int:
    w = gm.get_submodule(target).weight
    assert isinstance(w, torch.Tensor)
    return int(w.numel())


def _eligible(gm: fx.GraphModule, chain: list[str], weighted: dict[str, str]) -> list[str]:
    total = sum(_numel(gm, t) for t in weighted.values())
    out: list[str] = []
    params = 0
    for name in chain[:MAX_LAYERS]:
        params += _numel(gm, weighted[name])
        if params > MAX_PARAM_SHARE * total or len(out) + 1 >= len(weighted):
            break
        out.append(name)
    return out


def _sub_network(gm: fx.GraphModule, last: str) -> fx.GraphModule:
    """A copy of ``gm`` computing only the output of node ``last`` (and its fused activation)."""
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    modules = dict(gm.named_modules())
    end = next(n for n in gm.graph.nodes if n.name == last)
    users = list(end.users)
    if len(users) == 1 and sim._is_act(users[0], modules):
        end = users[0]
    for node in gm.graph.nodes:
        if node.op == "output":
            continue
        env[node] = graph.node_copy(node, lambda n: env[n])
        if node is end:
            break
    graph.output(env[end])
    sub = fx.GraphModule(gm, graph)
    sub.graph.eliminate_dead_code()
    sub.recompile()
    return sub


def _signature(sub: fx.GraphModule, x: torch.Tensor, keep: frozenset[str]) -> tuple[Any, ...]:
    """What the timing depends on: the ops in order with their shapes and settings (not the
    names, not the weights), the input shape, the layers kept float anyway, the CPU."""
    from slimkit.core.machine import cpu_info

    modules = dict(sub.named_modules())
    ops: list[Any] = []
    for n in sub.graph.nodes:
        if n.op == "call_module":
            m = modules[str(n.target)]
            w = getattr(m, "weight", None)
            settings = tuple(getattr(m, a, None) for a in ("stride", "padding", "dilation",
                             "groups", "padding_mode", "kernel_size", "output_size"))  # fmt: skip
            ops.append((type(m).__name__, tuple(w.shape) if isinstance(w, torch.Tensor) else None,
                        settings, str(n.target) in keep))  # fmt: skip
        elif n.op in ("call_function", "call_method"):
            ops.append((n.op, str(n.target), str(n.args[1:]), str(sorted(n.kwargs.items()))))
    return (tuple(x.shape), tuple(ops), cpu_info().get("model", ""))


def _variant_onnx(
    sub: fx.GraphModule, chain: Sequence[str], k: int, weighted: dict[str, str],
    x: torch.Tensor, dest: Path, keep: frozenset[str],
) -> Path:  # fmt: skip
    """Export ``sub`` quantized (ranges from ``x``, min-max) with its first ``k`` chain layers
    float, and the ``keep`` layers (out of scope) float as in the real model. Only the kernels
    matter for timing, so no calibration beyond one batch."""
    import copy

    from slimkit.export.onnx import export_onnx

    variant = copy.deepcopy(sub)
    plan = sim.place(variant, None, keep_float=keep | {weighted[n] for n in chain[:k]})
    quants = sim.insert_quantizers(variant, plan)
    stats = sim.observe(variant, quants, [Batch(0, (x,), {}, None)], histogram=False)
    sim.convert(variant, plan, quants, stats, method="minmax", percentile=100.0, weight_bits=8)
    export_onnx(variant.eval(), dest, example_inputs=(x,), check=False)
    return dest


def round_quartiles_ms(
    runners: dict[str, Any], *, runs: int, rounds: int, filter_first: bool = True
) -> list[float]:
    """Per runner: the 25th percentile of its ``runs`` run times in each round, the median over
    rounds (ms). Rounds interleave the runners, so a slow spell of the machine hits one round of
    every runner, not all runs of one; other processes only ever slow a run, so a low quantile
    is steadier than the median. A first round drops the runners more than 30 % slower than the
    fastest; if several are left, they get ``rounds`` more. (The MobileNetV2 choice flipped in
    1 of 5 tries with medians of 30 pooled runs; this way 0 of 12.) ``filter_first=False`` gives
    every runner the ``rounds`` more: for a two-way decision one noisy first round must not
    decide (an LSTM's fp32 round 1.37x slow once made a slower int8 model look faster)."""
    import time

    import numpy as np

    per_round: dict[str, list[float]] = {k: [] for k in runners}

    def timed(keys: list[str], n_rounds: int) -> None:
        for _ in range(n_rounds):
            for k in keys:
                run, ts = runners[k], []
                for _ in range(runs):
                    t0 = time.perf_counter()
                    run()
                    ts.append(time.perf_counter() - t0)
                per_round[k].append(1000 * float(np.percentile(ts, 25)))

    for run in runners.values():  # warm-up: weight packing, arena growth
        for _ in range(3):
            run()
    timed(list(runners), 1)
    best = min(v[0] for v in per_round.values())
    close = [k for k, v in per_round.items() if v[0] <= 1.3 * best or not filter_first]
    if len(close) > 1:  # only a close call needs more rounds
        timed(close, rounds)
    return [float(np.median(per_round[k][1:] or per_round[k])) for k in runners]


def pick(times_ms: Sequence[float], tie: float = TIE) -> int:
    """The cut to take from the sub-network time of each cut (index = float layers): the most
    float layers among those within ``tie`` (relative) of the fastest."""
    finite = [t for t in times_ms if math.isfinite(t)]
    if not finite:
        return 0
    best = min(finite)
    return max(i for i, t in enumerate(times_ms) if math.isfinite(t) and t <= best * (1 + tie))


def choose(
    gm: fx.GraphModule, weighted: dict[str, str], example: Sequence[torch.Tensor],
    *, runs: int = 8, rounds: int = 5,
) -> PrefixChoice:  # fmt: skip
    """Time the leading-chain cuts of ``gm`` (float, BN folded) in ORT; see the module docstring.

    ``weighted`` maps node names to module targets of the layers that would be quantized.
    """
    from slimkit.analyze.latency import ort_runner
    from slimkit.export.ort import ort_session

    if len(example) != 1 or not isinstance(example[0], torch.Tensor) or example[0].dim() < 2:
        return PrefixChoice(reason="not timed: the model does not take one batched tensor")
    full, nxt = leading_chain(gm, weighted)
    chain = _eligible(gm, full, weighted)
    if len(chain) < len(full):
        nxt = full[len(chain)]  # the first layer that stays int8 ends the timed sub-network
    if not chain:
        return PrefixChoice(reason="not timed: no leading chain of small layers")
    x = example[0][:1].detach()
    # a chain that is the whole sub-network (no next layer) never goes fully float
    cuts = range(len(chain) + (1 if nxt is not None else 0))
    try:
        sub = _sub_network(gm, nxt or chain[-1])
        quantized = set(weighted.values())
        in_sub = {str(n.target) for n in sub.graph.nodes if n.op == "call_module"}
        keep = frozenset(t for t in in_sub if t not in quantized
                         and isinstance(sub.get_submodule(t), sim.WEIGHTED))  # fmt: skip
        key = _signature(sub, x, keep) + (len(chain),)
        if key not in _CACHE:
            runners = {}
            with tempfile.TemporaryDirectory() as tmp:
                for k in cuts:
                    dest = Path(tmp) / f"cut{k}.onnx"
                    path = _variant_onnx(sub, chain, k, weighted, x, dest, keep)
                    # without spinning: a busy-waiting pool of one session slows the next one's
                    # runs (round medians of one variant 1.0-1.8 ms with spinning, +-5 % without)
                    runners[str(k)] = ort_runner(ort_session(path, spinning=False), [x])
                times = round_quartiles_ms(runners, runs=runs, rounds=rounds)
            _CACHE[key] = (pick(times), [round(t, 4) for t in times])
    except Exception as e:  # noqa: BLE001 - the timing is an optimisation: never fail on it
        first = str(e).strip().splitlines()[0][:160] if str(e).strip() else ""
        return PrefixChoice(reason=f"not timed: {type(e).__name__}: {first}")
    k, times = _CACHE[key]
    return PrefixChoice(
        layers=[weighted[n] for n in chain[:k]],
        candidates=[weighted[n] for n in chain],
        times_ms=list(times),
    )


def orthogonal(n: int) -> torch.Tensor:
    """A fixed n x n rotation (float64): normalised Sylvester-Hadamard when n is a power of two
    (it spreads every channel evenly over all others), else a seeded random orthogonal matrix."""
    if n & (n - 1) == 0:
        h = torch.ones(1, 1, dtype=torch.float64)
        while h.shape[0] < n:
            h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
        return h / math.sqrt(n)
    g = torch.Generator().manual_seed(n)
    q, r = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r))


def rotate_boundary(gm: fx.GraphModule, float_layers: Sequence[str]) -> list[str]:
    """Rotate the channels where the float prefix hands over to int8, exactly (in float).

    The first quantized tensor is the one whose noise is amplified most. Where it leaves float
    convs with no activation (a linear bottleneck) and reaches dense (groups=1) convs only
    through additions, ``R x`` is as cheap to compute as ``x`` (the float producers take ``R W``,
    the int8 consumers ``W R^T``) and mixes the channels, so the per-tensor range fits them all
    better: MobileNetV2 (224, random weights) 26.03 -> 26.22 dB. Layers with parametrized
    weights (pruning masks) or with zeros to keep (1 % of the weights or more: a rotation would
    make them dense) are left alone. Returns the rotated producers.
    """
    from torch.nn.utils import parametrize

    from slimkit.quant import cle

    graph = cle._Graph(gm)
    floated, done = set(float_layers), []
    keep = (nn.Identity, nn.Dropout)
    seen: set[tuple[str, ...]] = set()
    for node in gm.graph.nodes:
        if str(node.target) not in floated or graph.weighted(node) is None:
            continue
        group, _ = graph.group_of(node)
        if group is None or not set(group.producers) <= floated or group.axis != 1:
            continue
        if tuple(group.producers) in seen:  # reached again from its other producers
            continue
        seen.add(tuple(group.producers))
        mods = [graph.modules[n] for n in (*group.producers, *group.consumers)]
        if any(getattr(m, "groups", 1) != 1 for m in mods):  # depthwise included
            continue
        if any(parametrize.is_parametrized(m) or not isinstance(m.weight, nn.Parameter)
               or float((m.weight == 0).float().mean()) >= 0.01 for m in mods):  # fmt: skip
            continue
        ops = [graph.nodes[t] for t in group.tensors]
        if not all(graph.weighted(n) is not None or graph.is_add(n)
                   or isinstance(graph.module(n), keep) for n in ops):  # fmt: skip
            continue  # ReLU, pooling, ...: not rotation-invariant
        rot = orthogonal(group.channels)
        with torch.no_grad():
            for p in group.producers:
                m = graph.modules[p]
                w = m.weight.detach().double()
                m.weight.copy_((rot @ w.flatten(1)).view_as(w).to(m.weight.dtype))
                if m.bias is not None:
                    m.bias.copy_((rot @ m.bias.double()).to(m.bias.dtype))
            for c in group.consumers:
                m = graph.modules[c]
                w = m.weight.detach().double()
                m.weight.copy_(torch.einsum("oi...,ji->oj...", w, rot).to(m.weight.dtype))
        done.extend(group.producers)
    return done
