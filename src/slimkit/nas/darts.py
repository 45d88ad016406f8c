"""Differentiable, hardware-aware architecture search (DARTS-style) over a :class:`CNNSpace`.

Every choice of the space becomes a softmax over architecture parameters ``alpha``: per stage
the output width and the depth, per block position the (kernel size, expansion) pair. The relaxed
network runs the trained supernet's weights with every choice mixed (Liu et al., "DARTS", ICLR
2019): a block's output is the softmax-weighted sum of its (kernel, expansion) ops; a stage's
output is the softmax-weighted sum of its outputs after 1, 2, ... blocks (skipping the optional
blocks is the depth choice); a width is a soft channel mask (Wan et al., "FBNetV2", CVPR 2020).
With one-hot weights the relaxed network computes exactly the sub-network of that architecture::

    net = SuperNet(space); train_supernet(net, loader, epochs=4)         # warm start
    res = darts_search(net, table, train=loader, val=held_out, target_ms=0.08,
                       evaluate=evaluator)                               # SearchResult
    res.best.arch; net.extract(res.best.arch)                            # a plain ArchNet

Hardware-aware (as FBNet / ProxylessNAS): the expected latency, the latency table's prediction
averaged over the softmax of every choice (:class:`ExpectedLatency`, exact for independent
choices), enters the architecture loss as ``latency_weight * relu(E[ms] / target - 1)``, so the
alphas head for the latency budget. Training is first-order DARTS through ``core.train.fit``:
each step first moves the alphas on a held-out batch (Adam, cross entropy plus the latency term,
weights fixed), then the supernet's weights on a training batch with the alphas fixed. The
architecture is derived by the argmax of every choice; when the table predicts it over the target,
the choices are stepped down greedily (the smallest loss of log-probability per ms saved) until it
fits.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, cast

import torch
import torch.nn.functional as F
from pydantic import field_validator
from torch import nn

from slimkit.core.config import Config
from slimkit.errors import ConfigError
from slimkit.nas.latency import LatencyTable, _key_str
from slimkit.nas.search import Candidate, SearchResult
from slimkit.nas.space import Arch, CNNSpace, Stage
from slimkit.nas.supernet import SuperBlock, SuperNet, train


class Darts(Config):
    """Settings of :func:`darts_search` (and ``search_arch(strategy="darts")``)."""

    epochs: int = 1  # passes over the weight batches; each step also takes one alpha step
    weight_lr: float = 1e-3  # AdamW on the supernet's weights (core.train.fit, cosine decay)
    alpha_lr: float = 0.05  # Adam on the architecture parameters
    latency_weight: float = 2.0  # weight of relu(E[ms] / target - 1) in the architecture loss
    max_steps: int | None = None  # cap on the steps (a quick run)

    @field_validator("epochs")
    @classmethod
    def _epochs(cls, v: int) -> int:
        if v < 1:
            raise ValueError("epochs must be at least 1")
        return v

    @field_validator("weight_lr", "alpha_lr")
    @classmethod
    def _positive(cls, v: float) -> float:
        if not v > 0:
            raise ValueError("learning rates must be positive")
        return v

    @field_validator("latency_weight")
    @classmethod
    def _weight(cls, v: float) -> float:
        if not v >= 0:
            raise ValueError("the latency weight must be at least 0 (0: the target is only "
                             "enforced when the architecture is derived)")  # fmt: skip
        return v


def stage_ops(space: CNNSpace, s: int) -> list[tuple[int, int]]:
    """The (kernel, expansion) ops of a block position of stage ``s``, in alpha order."""
    st = space.stages[s]
    return [(k, e) for k in st.kernels for e in st.expands]


@dataclass
class Probs:
    """The softmax of every choice: ``width[s]``, ``depth[s]``, ``op[s][j]`` (block position j)."""

    width: list[torch.Tensor]
    depth: list[torch.Tensor]
    op: list[list[torch.Tensor]]

    def detach(self) -> Probs:
        return Probs([p.detach() for p in self.width], [p.detach() for p in self.depth],
                     [[p.detach() for p in ps] for ps in self.op])  # fmt: skip

    @classmethod
    def one_hot(cls, space: CNNSpace, arch: Arch) -> Probs:
        """Exactly one-hot weights on ``arch`` (positions past its depth on their first op)."""
        space.check(arch)

        def hot(n: int, i: int) -> torch.Tensor:
            return F.one_hot(torch.tensor(i), n).float()

        width, depth, op = [], [], []
        for s, (st, a) in enumerate(zip(space.stages, arch.stages, strict=True)):
            ops = stage_ops(space, s)
            width.append(hot(len(st.widths), st.widths.index(a.width)))
            depth.append(hot(len(st.depths), st.depths.index(a.depth)))
            chosen = list(zip(a.kernels, a.expands, strict=True))
            op.append([hot(len(ops), ops.index(chosen[j]) if j < a.depth else 0)
                       for j in range(st.depths[-1])])  # fmt: skip
        return cls(width, depth, op)


class Alphas(nn.Module):
    """The architecture parameters of ``space``: logits of every choice, zero (uniform) at the
    start; kept apart from the supernet so that the weight optimizer never sees them."""

    def __init__(self, space: CNNSpace) -> None:
        super().__init__()
        self.space = space

        def zeros(n: int) -> nn.Parameter:
            return nn.Parameter(torch.zeros(n))

        self.width = nn.ParameterList([zeros(len(s.widths)) for s in space.stages])
        self.depth = nn.ParameterList([zeros(len(s.depths)) for s in space.stages])
        self.op = nn.ModuleList([
            nn.ParameterList([zeros(len(stage_ops(space, i))) for _ in range(s.depths[-1])])
            for i, s in enumerate(space.stages)
        ])  # fmt: skip

    def probs(self) -> Probs:
        return Probs([F.softmax(a, -1) for a in self.width], [F.softmax(a, -1) for a in self.depth],
                     [[F.softmax(a, -1) for a in cast(nn.ParameterList, ps)]
                      for ps in self.op])  # fmt: skip

    def choices(self) -> dict[tuple[Any, ...], torch.Tensor]:
        """Log-probabilities of every choice, keyed ``("width", s)``, ``("depth", s)``,
        ``("op", s, j)``."""
        out: dict[tuple[Any, ...], torch.Tensor] = {}
        for s in range(len(self.space.stages)):
            out[("width", s)] = F.log_softmax(self.width[s].detach(), -1)
            out[("depth", s)] = F.log_softmax(self.depth[s].detach(), -1)
            for j, a in enumerate(cast(nn.ParameterList, self.op[s])):
                out[("op", s, j)] = F.log_softmax(a.detach(), -1)
        return out

    def derive(self) -> Arch:
        """The architecture of the argmax of every choice."""
        return arch_of(self.space, {k: int(v.argmax()) for k, v in self.choices().items()})


def arch_of(space: CNNSpace, pick: dict[tuple[Any, ...], int]) -> Arch:
    """The architecture of one index per choice (keys as in :meth:`Alphas.choices`)."""
    stages = []
    for s, st in enumerate(space.stages):
        ops = stage_ops(space, s)
        d = st.depths[pick[("depth", s)]]
        chosen = [ops[pick[("op", s, j)]] for j in range(d)]
        stages.append(Stage(st.widths[pick[("width", s)]], tuple(k for k, _ in chosen),
                            tuple(e for _, e in chosen)))  # fmt: skip
    return Arch(tuple(stages))


# --- the relaxed network ------------------------------------------------------------------


def _mask(values: Sequence[int], probs: torch.Tensor, n: int, factor: int = 1) -> torch.Tensor:
    """The expected channel mask (1, n, 1, 1): channel c is kept with P(width * factor > c)."""
    keep = torch.arange(n)[None, :] < torch.tensor(values)[:, None] * factor
    return (probs @ keep.to(probs.dtype)).view(1, n, 1, 1)


def _mixed_block(
    sb: SuperBlock,
    x: torch.Tensor,
    cin: tuple[Sequence[int], torch.Tensor],
    cout: tuple[Sequence[int], torch.Tensor],
    ops: list[tuple[int, int]],
    p_op: torch.Tensor,
    same: bool = False,
) -> torch.Tensor:
    """The block's ops mixed by ``p_op``, the hidden and output channels masked by the input and
    output width distributions; every layer runs at full size (masked channels are zero, so the
    next layer sees what a sliced one would). ``same``: input and output are one width (the
    blocks after a stage's first), so the residual is always there."""
    hidden, width = sb.expand.conv.out_channels, sb.project.conv.out_channels
    h = sb.expand(x, hidden, 1)
    dw = {k: sb.dw(h, hidden, k) for k in dict.fromkeys(k for k, _ in ops)}
    y = sum(p * sb.project(dw[k] * _mask(*cin, hidden, e), width, 1)
            for (k, e), p in zip(ops, p_op, strict=True))  # fmt: skip
    y = cast(torch.Tensor, y) * _mask(*cout, width)
    if sb.stride == 1:  # the residual, when input and output widths are equal
        equal = torch.tensor([[float(a == b) for b in cout[0]] for a in cin[0]])
        r = torch.ones(()) if same else cin[1] @ equal @ cout[1]
        xr = x[:, :width] if x.shape[1] >= width else F.pad(x, (0, 0, 0, 0, 0, width - x.shape[1]))
        y = y + r * xr
    return y


def mixed_forward(net: SuperNet, probs: Probs, x: torch.Tensor) -> torch.Tensor:
    """The relaxed network's logits: every choice of ``net.space`` mixed by ``probs``."""
    space = net.space
    x = net.stem(x)
    cin: tuple[Sequence[int], torch.Tensor] = ([space.stem], torch.ones(1))
    for s, (blocks, st) in enumerate(zip(net.stages, space.stages, strict=True)):
        cout = (st.widths, probs.width[s])
        outs = []
        for j, sb in enumerate(cast(nn.ModuleList, blocks)):
            x = _mixed_block(cast(SuperBlock, sb), x, cin if j == 0 else cout, cout,
                             stage_ops(space, s), probs.op[s][j], same=j > 0)  # fmt: skip
            outs.append(x)
        mixed = sum(p * outs[d - 1] for d, p in zip(st.depths, probs.depth[s], strict=True))
        x = cast(torch.Tensor, mixed)
        cin = cout
    x = net.pool(net.head(x, space.head, 1))
    return net.classifier(torch.flatten(x, 1))


class ExpectedLatency:
    """``E[table.predict(arch)]`` when every choice is drawn independently from ``probs``: the
    table is linear in its entries, and each entry depends on at most the input and output
    width, the op, and whether the block exists (P(depth > j))."""

    def __init__(self, space: CNNSpace, table: LatencyTable) -> None:
        self.space, self.table = space, table
        size = -(-space.input_size // space.stem_stride)
        cins = [space.stem]
        # per stage: the first block's (n_in, n_out, n_ops) entries (ms), the later blocks'
        # (n_out, n_ops) ones (their input width is their output width)
        self.blocks: list[list[torch.Tensor]] = []
        for s, st in enumerate(space.stages):
            ops = stage_ops(space, s)
            per = [
                torch.tensor(
                    [
                        [
                            [self._entry("block", ci, co, st.stride, k, e, size) for k, e in ops]
                            for co in st.widths
                        ]
                        for ci in cins
                    ]
                )
            ]
            size = -(-size // st.stride)
            if st.depths[-1] > 1:
                per += [torch.tensor([[self._entry("block", co, co, 1, k, e, size)
                                       for k, e in ops] for co in st.widths])] * (
                    st.depths[-1] - 1)  # fmt: skip
            self.blocks.append(per)
            cins = st.widths
        self.head = torch.tensor([self._entry("head", ci, size) for ci in cins])
        self.fixed = table.call_ms + self._entry("stem")

    def _entry(self, *key: Any) -> float:
        try:
            return self.table.entries[_key_str(key)]
        except KeyError:
            raise ConfigError(
                f"the latency table has no entry {_key_str(key)!r}",
                fix="measure the table for this space (LatencyTable.measure(space))",
            ) from None

    def __call__(self, probs: Probs) -> torch.Tensor:
        total = torch.tensor(self.fixed)
        p_in = torch.ones(1)
        for s, st in enumerate(self.space.stages):
            p_out, p_depth = probs.width[s], probs.depth[s]
            for j, t in enumerate(self.blocks[s]):
                exists = sum(p for d, p in zip(st.depths, p_depth, strict=True) if d > j)
                if j == 0:
                    cost = torch.einsum("i,o,k,iok->", p_in, p_out, probs.op[s][j], t)
                else:
                    cost = torch.einsum("o,k,ok->", p_out, probs.op[s][j], t)
                total = total + exists * cost
            p_in = p_out
        total = total + p_in @ self.head
        return self.table.scale * total + self.table.offset


def fit_target(space: CNNSpace, alphas: Alphas, predict: Callable[[Arch], float],
               target_ms: float) -> Arch:  # fmt: skip
    """The argmax architecture, stepped down choice by choice (the smallest loss of
    log-probability per ms saved) until ``predict`` puts it at or under ``target_ms``; then
    stepped back up while a change of one choice raises its log-probability and stays under the
    target (the largest gain first), so the budget that a large step freed is used again."""
    logp = alphas.choices()
    pick = {k: int(v.argmax()) for k, v in logp.items()}
    arch = arch_of(space, pick)
    ms = predict(arch)

    def moves() -> Iterator[tuple[float, dict[tuple[Any, ...], int], Arch, float]]:
        """(log-probability gained, choices, architecture, ms) of every one-choice change."""
        for key, lp in logp.items():
            if key[0] == "op" and key[2] >= arch.stages[key[1]].depth:
                continue  # a position the architecture does not use
            for i in range(len(lp)):
                if i != pick[key]:
                    trial = {**pick, key: i}
                    a = arch_of(space, trial)
                    yield float(lp[i] - lp[pick[key]]), trial, a, predict(a)

    while ms > target_ms:
        cheaper = [(-gain / (ms - m), t, a, m) for gain, t, a, m in moves() if m < ms]
        if not cheaper:  # the smallest network is over the target
            break
        _, pick, arch, ms = min(cheaper, key=lambda c: c[0])
    while ms <= target_ms:
        better = [c for c in moves() if c[0] > 0 and c[3] <= target_ms]
        if not better:
            break
        _, pick, arch, ms = max(better, key=lambda c: c[0])
    return arch


def _cycle(batches: Iterable[Any]) -> Iterator[Any]:
    while True:
        yield from batches


def darts_search(
    net: SuperNet,
    table: LatencyTable,
    *,
    train_loader: Any,
    val: Sequence[Any],
    target_ms: float,
    evaluate: Callable[[Arch], Candidate],
    config: Darts | None = None,
    seed: int = 0,
    progress: bool = False,
) -> SearchResult:
    """Train the alphas of ``net.space`` and ``net``'s weights (in place) by first-order DARTS
    with the latency term, derive the architecture, fit it under ``target_ms`` and evaluate it;
    ``val`` are held-out ``(inputs, targets)`` batches for the alpha steps (cycled). The
    result's ``info`` holds the final probabilities and the expected latency along the way."""
    cfg = config or Darts()
    if not val:
        raise ConfigError("DARTS needs held-out batches for the architecture steps",
                          fix="pass a few (inputs, targets) batches as val=")  # fmt: skip
    if not target_ms > 0:
        raise ConfigError(f"the latency target must be positive (got {target_ms})",
                          fix="pass target_ms > 0")  # fmt: skip
    space = net.space
    alphas = Alphas(space)  # uniform: nothing random to seed
    expected = ExpectedLatency(space, table)
    opt = torch.optim.Adam(alphas.parameters(), lr=cfg.alpha_lr, betas=(0.5, 0.999))
    held = _cycle(val)
    trace: list[dict[str, float]] = []

    def loss(model: nn.Module, batch: Any) -> torch.Tensor:
        # the architecture step, on a held-out batch with the weights fixed (first order)
        xv, yv = next(held)
        probs = alphas.probs()
        ce = F.cross_entropy(mixed_forward(net, probs, xv), yv)
        ms = expected(probs)
        arch_loss = ce + cfg.latency_weight * F.relu(ms / target_ms - 1)
        grads = torch.autograd.grad(arch_loss, list(alphas.parameters()))
        opt.zero_grad(set_to_none=True)
        for p, g in zip(alphas.parameters(), grads, strict=True):
            p.grad = g
        opt.step()
        trace.append({"val_ce": float(ce.detach()), "expected_ms": float(ms.detach())})
        # the weight step's loss, with the architecture fixed
        x, y = batch
        return F.cross_entropy(mixed_forward(net, alphas.probs().detach(), x), y)

    train(net, train_loader, loss, epochs=cfg.epochs, lr=cfg.weight_lr, description="darts",
          seed=seed, progress=progress, max_steps=cfg.max_steps)  # fmt: skip
    argmax = alphas.derive()
    arch = fit_target(space, alphas, lambda a: table.predict(space, a), target_ms)
    result = SearchResult("darts", target_ms, [evaluate(arch)])
    with torch.no_grad():
        final = expected(alphas.probs())
    every = max(1, len(trace) // 20)
    result.info = {
        "steps": len(trace),
        "argmax": argmax.describe(),
        "argmax_predicted_ms": table.predict(space, argmax),
        "changed_to_fit": arch != argmax,
        "expected_ms": float(final),
        "trace": trace[::every] + ([trace[-1]] if (len(trace) - 1) % every else []),
        "probs": {
            "/".join(map(str, k)): [round(float(v), 4) for v in lp.exp()]
            for k, lp in alphas.choices().items()
        },  # fmt: skip
        "config": cfg.to_dict(),
    }
    return result


__all__ = ["Alphas", "Darts", "ExpectedLatency", "Probs", "darts_search", "fit_target",
           "mixed_forward"]  # fmt: skip
