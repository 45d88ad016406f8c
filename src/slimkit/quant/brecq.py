"""Block reconstruction (experimental): learn the rounding of every layer of a block jointly,
against the float block's output.

At 4-bit weights, rounding each layer on its own (AdaRound) leaves the errors of consecutive
layers to add up: a residual block's output is what the next block sees, and the layers inside
can trade errors between them. Block reconstruction (Li et al., "BRECQ: Pushing the Limit of
Post-Training Quantization by Block Reconstruction", ICLR 2021) learns the rounding variables of
all the layers of a block together, minimising the squared error of the block's outputs against
the float model's, with AdaRound's rectified sigmoid and annealed regulariser, block after block,
on the calibration data only. Each layer's bias is learned with it (AdaQuant's bias term), so the
block's mean error does not cost rounding.

- A **block** is the set of integer layers that share a module path up to its first numbered part
  (``layer1.0.conv1`` and ``layer1.0.conv2`` -> ``layer1.0``; ``features.3.conv.0.0`` ->
  ``features.3``; ``blocks.1.attn.qkv`` -> ``blocks.1``); its graph is every node from its first
  layer up to the next block's first layer (the residual add and the activation quantizers
  included), so its output is what the next block reads.
- Inputs come from the quantized model with the blocks before already reconstructed, targets from
  the float model (BRECQ's asymmetric reconstruction); activations stay quantized in the block.
- The grid is the ``QuantLayer``'s own (per channel, symmetric, narrow): the learned codes are
  written to its ``w_q`` and export writes exactly those integers.
- With ``PTQ(adaround=N, brecq=M)`` it starts from AdaRound's codes (``start="codes"``), else from
  the float weights' fractions.
- Each block also reports its error with its float layers on the same quantized inputs
  (``BlockResult.loss_float``, ``BrecqReport.headroom``): how much of the block's error its
  weights cause at all, so a run that gains little says whether rounding or the activation grid
  is to blame.
- Guard: a block keeps its learned codes only where both the block's error and the *model's* output
  error on the held-out calibration batches (every 4th) go down; a lower block error alone was
  seen to raise the output error (the mean error a pooling passes on grew while the per-position
  error shrank). So it is never worse than its start on those batches.

Measured (``python benchmarks/bench_ptq.py --w4a8``, README): on these models it has not beaten
AdaRound yet, at several times its tool time; it is an option, off by default.

Python: ``sk.quantize(model, PTQ(weight_bits=4, adaround=50, brecq=100), data=calib)``; YAML:
``- quant.ptq: {weight_bits: 4, adaround: 50, brecq: 100}``. Layers called more than once keep
their codes.
"""

from __future__ import annotations

import contextlib
import functools
import math
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn

from slimkit.core.data import Batch, flatten_output
from slimkit.core.graph import call_counts
from slimkit.quant.adaround import GAMMA, ZETA, _run_node
from slimkit.quant.modules import QuantLayer, float_pass, run_layer


def block_of(name: str) -> str:
    """The block a layer belongs to: its module path up to the first numbered part."""
    parts = name.split(".")
    for i, p in enumerate(parts):
        if re.fullmatch(r"\d+", p):
            return ".".join(parts[: i + 1])
    return parts[0] if len(parts) > 1 else name


@dataclass
class BlockResult:
    block: str
    layers: list[str]
    loss_nearest: float  # held-out mean squared error of the block output, nearest rounding
    loss: float  # with the codes kept
    changed: float  # fraction of codes that differ from nearest
    seconds: float
    # the same error with the block's float layers (unrounded weights, original biases) on the
    # same quantized inputs and activation grid: near or above loss_nearest, the block's error
    # comes from what reaches it and from its activations, and no rounding can remove it
    loss_float: float = math.nan

    def to_dict(self) -> dict[str, Any]:
        return {"block": self.block, "layers": self.layers,
                "loss_nearest": self.loss_nearest, "loss": self.loss,
                "loss_float": self.loss_float,
                "changed": round(self.changed, 4), "seconds": round(self.seconds, 2)}  # fmt: skip


@dataclass
class BrecqReport:
    blocks: list[BlockResult] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0

    def summary(self) -> str:
        kept = sum(b.loss < b.loss_nearest for b in self.blocks)
        gain = [b.loss_nearest / max(b.loss, 1e-30) for b in self.blocks if b.loss > 0]
        mean = sum(gain) / len(gain) if gain else 1.0
        room = self.headroom()
        bound = f", {room:.2f}x with float layers" if math.isfinite(room) else ""
        return (f"block reconstruction: {len(self.blocks)} blocks, learned rounding kept in "
                f"{kept} (block output error {mean:.2f}x lower on average{bound}), "
                f"{len(self.skipped)} layers nearest, {self.seconds:.1f} s")  # fmt: skip

    def headroom(self) -> float:
        """Geometric mean over blocks of (error at the starting codes) / (error with the float
        layers): roughly how far the block errors could fall if rounding cost nothing (1.0 or
        less: the weights are not where the error is). Per block in ``blocks``."""
        logs = [math.log(max(b.loss_nearest, 1e-30) / b.loss_float) for b in self.blocks
                if math.isfinite(b.loss_float) and b.loss_float > 0]  # fmt: skip
        return math.exp(sum(logs) / len(logs)) if logs else math.nan


class _Soft:
    """A layer's weight as ``scale * (floor(w / scale) + h(v))`` with learnable ``v``, and its
    bias with a learnable shift (AdaQuant's bias learning: the block's mean error goes there)."""

    def __init__(self, layer: QuantLayer, start: str = "float") -> None:
        self.layer = layer
        w = layer.float_layer.weight.detach().float()
        self.w = w
        self.qmax = 2 ** (layer.weight_bits - 1) - 1
        self.scale = layer.w_scale.view((-1,) + (1,) * (w.dim() - 1))
        x = w / self.scale
        self.nearest = layer.w_q.detach().float()  # the codes it has now (nearest or AdaRound's)
        self.base = torch.floor(x).clamp(-self.qmax, self.qmax - 1)
        if start == "codes":  # start at the layer's codes, h a little off 0 / 1 to keep a gradient
            up = (self.nearest - self.base).clamp(0, 1)
            rest = 0.15 + 0.7 * up
        else:  # the float weight's own fraction (AdaRound's start)
            rest = (x - self.base).clamp(1e-4, 1 - 1e-4)
        self.v = (-torch.log((ZETA - GAMMA) / (rest - GAMMA) - 1)).requires_grad_(True)
        b = layer.float_layer.bias
        self.bias = None if b is None else (b.detach().float() + layer.bias_shift)
        self.shift = torch.zeros(w.shape[0], requires_grad=True)
        self.unrounded = False  # run as the float layer (BlockResult.loss_float)

    def h(self) -> torch.Tensor:
        return (torch.sigmoid(self.v) * (ZETA - GAMMA) + GAMMA).clamp(0, 1)

    def codes(self) -> torch.Tensor:
        return self.base + (self.h() >= 0.5).float()

    def weight(self, codes: torch.Tensor | None = None) -> torch.Tensor:
        return self.scale * (self.base + self.h() if codes is None else codes)

    def __call__(self, x: torch.Tensor, codes: torch.Tensor | None = None,
                 learned_bias: bool = True) -> torch.Tensor:  # fmt: skip
        bias = self.bias
        if self.unrounded:  # the float layer itself
            return run_layer(self.layer.float_layer, x, self.w, self.layer.float_layer.bias)
        if learned_bias:
            bias = self.shift if bias is None else bias + self.shift
        return run_layer(self.layer.float_layer, x, self.weight(codes), bias)


def _set(softs: Any, learned: bool) -> None:
    """Write the learned codes and bias shifts into the layers, or restore the starting ones."""
    for s in softs:
        s.layer.set_weight_codes((s.codes() if learned else s.nearest).to(s.w.dtype))
        # re-quantizes the int32 bias with the learned shift (or takes it back)
        s.layer.correct_bias(-s.shift.detach() if learned else s.shift.detach())


def _layer(gm: fx.GraphModule, node: fx.Node) -> QuantLayer:
    layer = gm.get_submodule(str(node.target))
    assert isinstance(layer, QuantLayer)
    return layer


def _blocks(gm: fx.GraphModule) -> tuple[list[tuple[str, list[fx.Node]]], list[tuple[str, str]]]:
    calls = call_counts(gm)
    order: dict[str, list[fx.Node]] = {}
    skipped = []
    for n in gm.graph.nodes:
        if n.op != "call_module" or not isinstance(gm.get_submodule(str(n.target)), QuantLayer):
            continue
        fl = gm.get_submodule(str(n.target)).float_layer
        if calls[str(n.target)] != 1 or not isinstance(fl, (nn.Linear, nn.Conv1d, nn.Conv2d)):
            skipped.append((str(n.target), "called more than once or not Linear/Conv1d/Conv2d"))
            continue
        order.setdefault(block_of(str(n.target)), []).append(n)
    return list(order.items()), skipped


def _block_loss(
    run: Any,
    span: tuple[int, int],
    outs: list[fx.Node],
    softs: dict[fx.Node, _Soft],
    env_q: dict[fx.Node, Any],
    env_f: dict[fx.Node, Any],
    codes: bool | None,
    dc: float = 0.0,
) -> torch.Tensor:
    """The block's mean squared output error on one batch: with soft weights (``codes`` None),
    the learned codes (True) or nearest rounding (False)."""
    env = dict(env_q)

    def layer(s: _Soft) -> Any:
        fixed = None if codes is None else (s.codes() if codes else s.nearest)
        return lambda x: s(x, fixed, codes is not False)

    run(*span, env, True, {n: layer(s) for n, s in softs.items()})
    err = [_error(env[o] - env_f[o], dc) for o in outs
           if isinstance(env[o], torch.Tensor) and env[o].is_floating_point()]  # fmt: skip
    return torch.stack(err).sum() if err else torch.zeros(())


def _error(diff: torch.Tensor, dc: float) -> torch.Tensor:
    """Mean squared error plus ``dc`` times the squared mean error per channel (dim 1 of a
    feature map, the last dim of a sequence): a pooling or a later sum passes the mean on whole,
    the zero-mean rest averages out."""
    mse = diff.pow(2).mean()
    if dc <= 0 or diff.dim() < 2:
        return mse
    dims = [d for d in range(diff.dim()) if d != (1 if diff.dim() > 2 else diff.dim() - 1)]
    return mse + dc * diff.mean(dim=dims).pow(2).mean()


def _outputs(model: nn.Module, batches: Sequence[Batch], quant: bool = True) -> list[torch.Tensor]:
    """The model's outputs (flattened, float tensors) on ``batches``: quantized or float."""
    with float_pass(model) if not quant else contextlib.nullcontext(), torch.no_grad():
        outs = [flatten_output(model(*b.args, **b.kwargs)) for b in batches]
    return [t.float() for out in outs for _, t in out if t.is_floating_point()]


def _output_error(model: nn.Module, batches: Sequence[Batch], refs: list[torch.Tensor]) -> float:
    outs = _outputs(model, batches)
    return sum(float((o - r).pow(2).sum()) for o, r in zip(outs, refs, strict=True))


def reconstruct(
    qmodel: fx.GraphModule,
    batches: Sequence[Batch],
    *,
    iterations: int = 200,
    lr: float = 3e-2,
    reg: float = 0.01,
    per_step: int = 4,
    seed: int = 0,
    start: str = "float",
    bias_lr: float = 1e-3,
    dc: float = 0.0,
    judge_model: bool = True,
) -> BrecqReport:
    """Learn the rounding of ``qmodel``'s integer layers block by block, in place."""
    report = BrecqReport()
    t_all = time.perf_counter()
    gen = torch.Generator().manual_seed(seed)
    blocks, report.skipped = _blocks(qmodel)
    nodes = list(qmodel.graph.nodes)
    index = {n: i for i, n in enumerate(nodes)}
    starts = [index[layers[0]] for _, layers in blocks] + [len(nodes)]
    placeholders = [n for n in nodes if n.op == "placeholder"]
    envs_f: list[dict[fx.Node, Any]] = []
    envs_q: list[dict[fx.Node, Any]] = []
    for b in batches:
        values = {p: (b.args[i] if i < len(b.args) else b.kwargs.get(str(p.target),
                  p.args[0] if p.args else None)) for i, p in enumerate(placeholders)}  # fmt: skip
        envs_f.append(dict(values))
        envs_q.append(dict(values))

    def run(lo: int, hi: int, env: dict[fx.Node, Any], quant: bool,
            soft: dict[fx.Node, Any] | None = None) -> None:  # fmt: skip
        for node in nodes[lo:hi]:
            if node.op in ("placeholder", "output"):
                continue
            if soft is not None and node in soft:
                env[node] = soft[node](env[node.args[0]])
                continue
            mod = qmodel.get_submodule(str(node.target)) if node.op == "call_module" else None
            env[node] = _run_node(qmodel, node, mod, env, quant=quant)

    with torch.no_grad():
        for env_f, env_q in zip(envs_f, envs_q, strict=True):  # up to the first block
            run(0, starts[0], env_f, False)
            run(0, starts[0], env_q, True)
    held = [i for i in range(len(batches)) if i % 4 == 3] if len(batches) >= 4 else []
    fit = [i for i in range(len(batches)) if i not in held] or list(range(len(batches)))
    judged = [batches[i] for i in (held or fit)]
    refs = _outputs(qmodel, judged, quant=False) if judge_model else []
    err_model = _output_error(qmodel, judged, refs) if judge_model else 0.0
    for k, (block, layers) in enumerate(blocks):
        t0 = time.perf_counter()
        lo, hi = starts[k], starts[k + 1]
        inside = {n for n in nodes[lo:hi] if n.op != "output"}
        outs = [n for n in nodes[lo:hi] if any(u not in inside for u in n.users)]
        with torch.no_grad():  # the float targets; the quantized inputs are already in env_q
            for env_f in envs_f:
                run(lo, hi, env_f, False)
        softs = {n: _Soft(_layer(qmodel, n), start) for n in layers}

        loss_on = functools.partial(_block_loss, run, (lo, hi), outs, softs, dc=dc)

        judge = held or fit
        with torch.no_grad():
            l_near = float(sum(loss_on(envs_q[i], envs_f[i], False) for i in judge)) / len(judge)
            for s in softs.values():  # the float layers on the same inputs: the weights' share
                s.unrounded = True
            l_float = float(sum(loss_on(envs_q[i], envs_f[i], False) for i in judge)) / len(judge)
            for s in softs.values():
                s.unrounded = False
        params = [s.v for s in softs.values()]
        shifts = [s.shift for s in softs.values()]
        opt = torch.optim.Adam([{"params": params, "lr": lr}, {"params": shifts, "lr": bias_lr}])
        norm = max(l_near, 1e-30)
        n_w = sum(s.v.numel() for s in softs.values())
        for t in range(iterations):
            picks = torch.randint(len(fit), (min(per_step, len(fit)),), generator=gen)
            beta = 20 - 18 * t / max(iterations - 1, 1)
            chosen = [fit[int(j)] for j in picks]
            rec = torch.stack([loss_on(envs_q[i], envs_f[i], None) for i in chosen]).mean() / norm
            rounding = torch.stack(
                [(1 - (2 * s.h() - 1).abs().pow(beta)).sum() for s in softs.values()]
            ).sum()
            total = rec + reg * rounding / n_w * (t >= iterations // 5)  # warm-up: error only
            opt.zero_grad()
            total.backward()
            opt.step()
        with torch.no_grad():
            l_learned = float(sum(loss_on(envs_q[i], envs_f[i], True) for i in judge)) / len(judge)
            keep = l_learned < l_near
            changed = sum(float((s.codes() != s.nearest).sum()) for s in softs.values()) / n_w
            if keep:
                _set(softs.values(), learned=True)
            if keep and judge_model:  # and only where the model's own output gains too
                err = _output_error(qmodel, judged, refs)
                keep = err < err_model
                err_model = min(err, err_model)
                if not keep:
                    _set(softs.values(), learned=False)
            for env_q in envs_q:  # the next block reads this block's new quantized outputs
                run(lo, hi, env_q, True)
            for env in (*envs_f, *envs_q):  # free what no later node reads
                for n in list(env):
                    if n in inside and all(index.get(u, 0) < hi for u in n.users):
                        del env[n]
        kept_loss, kept_changed = (l_learned, changed) if keep else (l_near, 0.0)
        names = [str(n.target) for n in layers]
        seconds = time.perf_counter() - t0
        report.blocks.append(
            BlockResult(block, names, l_near, kept_loss, kept_changed, seconds, l_float)
        )
    report.seconds = time.perf_counter() - t_all
    return report
