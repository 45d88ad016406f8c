"""Search a trained supernet for the most accurate architecture under a latency target.

    ev = Evaluator(net, calib=batches, val=val, latency=lambda a: table.predict(space, a))
    res = search(space, ev, trials=60, target_ms=0.08)          # NSGA-II, constrained
    base = search(space, ev, trials=60, target_ms=0.08, strategy="random")  # the baseline
    res.best.arch, res.best.top1, res.best.latency_ms

Each trial is one architecture: extracted from the supernet, its BatchNorm statistics
re-estimated on a few training batches, top-1 measured on validation data, its latency predicted
by the lookup table, its size counted. NSGA-II (Deb et al., 2002, with its constraint domination)
works on three objectives (top-1 up, latency down, parameters down) with the latency target as a
constraint, so infeasible architectures lose to feasible ones; random search samples the same
genes uniformly. Both share the evaluator's cache (an architecture is evaluated once).
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from slimkit.errors import ConfigError
from slimkit.nas.space import Arch, CNNSpace
from slimkit.nas.supernet import SuperNet, recalibrate_bn

STRATEGIES = ("nsga2", "random", "rl")


@dataclass(frozen=True)
class Candidate:
    """One evaluated architecture."""

    arch: Arch
    top1: float  # on the validation batches, after BatchNorm re-estimation
    latency_ms: float  # predicted
    params: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "arch": self.arch.to_dict(),
            "describe": self.arch.describe(),
            "top1": self.top1,
            "latency_ms": self.latency_ms,
            "params": self.params,
        }


@torch.no_grad()
def top1(model: torch.nn.Module, batches: Sequence[Any]) -> float:
    correct = count = 0
    for x, y in batches:
        correct += int((model(x).argmax(-1) == y).sum())
        count += len(y)
    return correct / max(count, 1)


class Evaluator:
    """``evaluator(arch) -> Candidate``, cached per architecture."""

    def __init__(
        self,
        net: SuperNet,
        *,
        calib: Sequence[Any],
        val: Sequence[Any],
        latency: Callable[[Arch], float],
    ) -> None:
        if not calib or not val:
            raise ConfigError(
                "the evaluator needs calibration and validation batches",
                fix="pass a few (inputs, targets) batches of each",
            )
        self.net, self.calib, self.val, self.latency = net, calib, val, latency
        self.cache: dict[Arch, Candidate] = {}

    def __call__(self, arch: Arch) -> Candidate:
        if arch not in self.cache:
            sub = recalibrate_bn(self.net.extract(arch), self.calib)
            params = sum(p.numel() for p in sub.parameters())
            self.cache[arch] = Candidate(arch, top1(sub, self.val), self.latency(arch), params)
        return self.cache[arch]


@dataclass
class SearchResult:
    """The trials of one search, in order, and the best feasible one."""

    strategy: str
    target_ms: float
    trials: list[Candidate] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)  # what a strategy adds (DARTS: alphas)

    @property
    def feasible(self) -> list[Candidate]:
        return [c for c in self.trials if c.latency_ms <= self.target_ms]

    @property
    def best(self) -> Candidate | None:
        """The most accurate feasible candidate (ties: the faster one)."""
        f = self.feasible
        return max(f, key=lambda c: (c.top1, -c.latency_ms)) if f else None

    def best_so_far(self) -> list[float]:
        """The best feasible top-1 after each trial (0 before the first feasible one)."""
        out, best = [], 0.0
        for c in self.trials:
            if c.latency_ms <= self.target_ms:
                best = max(best, c.top1)
            out.append(best)
        return out

    def to_dict(self) -> dict[str, Any]:
        b = self.best
        return {
            "strategy": self.strategy,
            "target_ms": self.target_ms,
            "trials": len(self.trials),
            "feasible": len(self.feasible),
            "best": b.to_dict() if b is not None else None,
            "best_so_far": self.best_so_far(),
            "all": [c.to_dict() for c in self.trials],
            **({"info": self.info} if self.info else {}),
        }


OBJECTIVES = {"top1": -1.0, "latency": 1.0, "params": 1.0}  # sign: minimise sign * value


def _objectives(c: Candidate, names: Sequence[str]) -> list[float]:
    values = {"top1": c.top1, "latency": c.latency_ms, "params": float(c.params)}
    return [OBJECTIVES[n] * values[n] for n in names]


def _dominates(a: tuple[list[float], float], b: tuple[list[float], float]) -> bool:
    """Deb's constraint domination: feasible beats infeasible, the smaller violation beats the
    larger, and among feasible ones Pareto domination decides."""
    (fa, va), (fb, vb) = a, b
    if va > 0 or vb > 0:
        return va < vb
    return all(x <= y for x, y in zip(fa, fb, strict=True)) and fa != fb


def rank_and_crowding(points: Sequence[tuple[list[float], float]]) -> tuple[list[int], list[float]]:
    """Non-dominated rank (0 = the front) and crowding distance of every point (NSGA-II)."""
    n = len(points)
    dominated_by: list[list[int]] = [[] for _ in range(n)]
    count = [0] * n
    for i in range(n):
        for j in range(n):
            if i != j and _dominates(points[i], points[j]):
                dominated_by[i].append(j)
            elif i != j and _dominates(points[j], points[i]):
                count[i] += 1
    rank = [0] * n
    front = [i for i in range(n) if count[i] == 0]
    r = 0
    while front:
        nxt = []
        for i in front:
            rank[i] = r
            for j in dominated_by[i]:
                count[j] -= 1
                if count[j] == 0:
                    nxt.append(j)
        front, r = nxt, r + 1
    crowd = [0.0] * n
    for r in set(rank):
        members = [i for i in range(n) if rank[i] == r]
        for m in range(len(points[0][0])):
            members.sort(key=lambda i: points[i][0][m])
            lo, hi = points[members[0]][0][m], points[members[-1]][0][m]
            crowd[members[0]] = crowd[members[-1]] = math.inf
            for a, i, b in zip(members, members[1:], members[2:], strict=False):
                if hi > lo:
                    crowd[i] += (points[b][0][m] - points[a][0][m]) / (hi - lo)
    return rank, crowd


def search(space: CNNSpace, evaluate: Callable[[Arch], Candidate], *, trials: int,
           target_ms: float, strategy: str = "nsga2", population: int = 12, seed: int = 0,
           objectives: Sequence[str] = ("top1", "latency", "params"),
           on_trial: Callable[[int, Candidate], None] | None = None) -> SearchResult:  # fmt: skip
    """Evaluate ``trials`` distinct architectures of ``space`` chosen by ``strategy`` under
    ``target_ms`` and return them all with the best.

    ``"nsga2"``: a random first population of ``population``, then generations of as many
    children (binary tournament on rank and crowding, uniform crossover of the genes, each gene
    re-drawn with probability 2 / genes) and elitist selection of the next population from
    parents and children, under constraint domination (latency <= target) on ``objectives``
    (any of ``top1``, ``latency``, ``params``). ``"random"``: every gene drawn uniformly.
    ``"rl"``: a REINFORCE controller (Williams, 1992; as in Zoph & Le's NAS and MnasNet), one
    softmax per gene, rewarded with ``top1 * min(1, target / latency)**2`` against a moving
    average baseline.
    """
    if strategy not in STRATEGIES:
        raise ConfigError(f"unknown search strategy {strategy!r}",
                          fix=f"use one of {', '.join(STRATEGIES)}")  # fmt: skip
    if trials < 1 or not math.isfinite(target_ms) or target_ms <= 0:
        raise ConfigError(f"search needs trials >= 1 and a positive latency target "
                          f"(got {trials}, {target_ms})", fix="pass positive values")  # fmt: skip
    unknown = [o for o in objectives if o not in OBJECTIVES]
    if unknown or not objectives:
        raise ConfigError(f"unknown objectives {unknown or objectives!r}",
                          fix=f"choose from {', '.join(OBJECTIVES)}")  # fmt: skip
    rng = random.Random(seed)
    choices = [c for _, c in space.genes()]
    result = SearchResult(strategy, target_ms)
    seen: set[Arch] = set()
    stalls = [0]

    def draw() -> list[int]:
        return [rng.choice(c) for c in choices]

    def trial(genes: list[int]) -> tuple[list[int], Candidate] | None:
        arch = space.decode(genes)
        for _ in range(50):  # a distinct architecture per trial: re-draw one gene
            if arch not in seen:
                break
            i = rng.randrange(len(genes))
            genes[i] = rng.choice(choices[i])
            arch = space.decode(genes)
        else:
            stalls[0] += 1  # the space is exhausted around here
            return None
        seen.add(arch)
        c = evaluate(arch)
        result.trials.append(c)
        if on_trial is not None:
            on_trial(len(result.trials), c)
        return genes, c

    def point(c: Candidate) -> tuple[list[float], float]:
        return _objectives(c, objectives), max(0.0, c.latency_ms - target_ms)

    pop: list[tuple[list[int], Candidate]] = []
    controller = _Reinforce(choices, rng) if strategy == "rl" else None
    while len(result.trials) < trials and stalls[0] < 100:
        if controller is not None:
            got = trial(controller.sample())
            if got is not None:
                c = got[1]
                controller.update(got[0], c.top1 * min(1.0, target_ms / c.latency_ms) ** 2)
        elif strategy == "random" or len(pop) < population:
            got = trial(draw())
            if got is not None and strategy == "nsga2":
                pop.append(got)
        else:
            rank, crowd = rank_and_crowding([point(c) for _, c in pop])

            def pick(pop: list[tuple[list[int], Candidate]] = pop, rank: list[int] = rank,
                     crowd: list[float] = crowd) -> list[int]:  # fmt: skip
                i, j = rng.randrange(len(pop)), rng.randrange(len(pop))
                return pop[i if (rank[i], -crowd[i]) <= (rank[j], -crowd[j]) else j][0]

            children = []
            for _ in range(population):
                if len(result.trials) >= trials:
                    break
                a, b = pick(), pick()
                child = [x if rng.random() < 0.5 else y for x, y in zip(a, b, strict=True)]
                child = [rng.choice(c) if rng.random() < 2 / len(child) else g
                         for g, c in zip(child, choices, strict=True)]  # fmt: skip
                got = trial(child)
                if got is not None:
                    children.append(got)
            merged = pop + children
            rank, crowd = rank_and_crowding([point(c) for _, c in merged])
            order = sorted(range(len(merged)), key=lambda i: (rank[i], -crowd[i]))
            pop = [merged[i] for i in order[:population]]
    return result


class _Reinforce:
    """Independent softmax policies over each gene's choices, trained by REINFORCE."""

    def __init__(self, choices: list[list[int]], rng: random.Random, lr: float = 2.0,
                 decay: float = 0.8) -> None:  # fmt: skip
        self.choices, self.rng, self.lr, self.decay = choices, rng, lr, decay
        self.logits = [[0.0] * len(c) for c in choices]
        self.baseline: float | None = None

    def _probs(self, g: int) -> list[float]:
        top = max(self.logits[g])
        e = [math.exp(v - top) for v in self.logits[g]]
        return [v / sum(e) for v in e]

    def sample(self) -> list[int]:
        return [self.rng.choices(c, weights=self._probs(g))[0] for g, c in enumerate(self.choices)]

    def update(self, genes: list[int], reward: float) -> None:
        if self.baseline is None:
            self.baseline = reward
        advantage = reward - self.baseline
        self.baseline = self.decay * self.baseline + (1 - self.decay) * reward
        for g, value in enumerate(genes):
            probs = self._probs(g)
            k = self.choices[g].index(value)
            for j, p in enumerate(probs):  # d log p(k) / d logit j = [j == k] - p_j
                self.logits[g][j] += self.lr * advantage * ((j == k) - p)
