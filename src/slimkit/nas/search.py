"""Search a trained supernet for the most accurate architecture under a latency target.

    ev = Evaluator(net, calib=batches, val=val, latency=lambda a: table.predict(space, a))
    res = search(space, ev, trials=60, target_ms=0.08, latency=ev.latency)  # NSGA-II
    base = search(space, ev, trials=60, target_ms=0.08, strategy="random", latency=ev.latency)
    res.best.arch, res.best.top1, res.best.latency_ms, res.hypervolume()

Each trial is one architecture: extracted from the supernet, its BatchNorm statistics
re-estimated on a few training batches, top-1 measured on validation data, its latency predicted
by the lookup table, its size counted. NSGA-II (Deb et al., 2002, with its constraint domination)
works on three objectives (top-1 up, latency down, parameters down) with the latency target as a
constraint, so infeasible architectures lose to feasible ones; random search samples the same
genes uniformly. Both share the evaluator's cache (an architecture is evaluated once).

A trial is one accuracy evaluation (the expensive part). With ``latency=`` (the lookup table's
prediction, microseconds per call) an architecture predicted over the target is rejected before
it is evaluated, as in single-path one-shot search (Guo et al., 2020): random search then samples
uniformly among the feasible architectures and NSGA-II only breeds feasible children, so every
trial of both is spent where the answer can be. NSGA-II's first population can be seeded
(``initial=``, e.g. :func:`seed_archs`: the uniformly width-scaled family and the largest feasible
networks), the rest of it random.
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
    tolerance: float = 0.0  # top-1 differences up to this are ties in `best`

    @property
    def feasible(self) -> list[Candidate]:
        return [c for c in self.trials if c.latency_ms <= self.target_ms]

    @property
    def best(self) -> Candidate | None:
        """The most accurate feasible candidate; candidates within ``tolerance`` of its top-1 are
        ties, and a tie goes to the slowest (the one that uses most of the latency budget: with a
        noisy proxy, the larger network is the better bet after fine-tuning)."""
        picked = self._pick([(c, c.latency_ms) for c in self.feasible])
        return picked[0] if picked else None

    def _pick(self, options: list[tuple[Candidate, float]]) -> tuple[Candidate, float] | None:
        """The most accurate of ``(candidate, ms)`` options, ties within ``tolerance`` of its
        top-1 going to the slowest (then the more accurate)."""
        if not options:
            return None
        top = max(c.top1 for c, _ in options)
        return max((o for o in options if o[0].top1 >= top - self.tolerance - 1e-12),
                   key=lambda o: (o[1], o[0].top1))  # fmt: skip

    def measured_best(self, measure: Callable[[list[Arch]], Sequence[float]], limit_ms: float,
                      *, top: int = 8) -> Candidate | None:  # fmt: skip
        """Hardware in the loop: measure ``top`` feasible trials as whole networks
        (``measure(archs) -> ms``) and choose, as :attr:`best` does, among those measured at
        most ``limit_ms``; when none is, the fastest measured one. Measured first are the
        trials tied with the most accurate (within ``tolerance``), slowest predicted first (the
        ones :attr:`best` prefers, and where the prediction errs most, at the edge of the
        budget), then the rest by top-1. The measurements are kept in ``info["measured_ms"]``."""
        cut = self.best_top1() - self.tolerance - 1e-12  # tied with the most accurate from here
        tied = [c for c in self.feasible if c.top1 >= cut]
        rest = [c for c in self.feasible if c.top1 < cut]
        ranked = (sorted(tied, key=lambda c: (-c.latency_ms, -c.top1))
                  + sorted(rest, key=lambda c: (-c.top1, -c.latency_ms)))[:top]  # fmt: skip
        if not ranked:
            return None
        ms = list(measure([c.arch for c in ranked]))
        self.info["measured_ms"] = {c.arch.describe(): m for c, m in zip(ranked, ms, strict=True)}
        picked = self._pick([(c, m) for c, m in zip(ranked, ms, strict=True) if m <= limit_ms])
        if picked is None:
            return min(zip(ranked, ms, strict=True), key=lambda cm: cm[1])[0]
        return picked[0]

    def best_top1(self) -> float:
        """The best feasible top-1 (0 when nothing is feasible)."""
        return max((c.top1 for c in self.feasible), default=0.0)

    def hypervolume(self) -> float:
        """The area dominated by the feasible accuracy-latency front, from the reference point
        (latency = target, top-1 = 0), divided by the target: a top-1 in [0, 1] averaged over
        the latency budget (a single network of top-1 ``a`` at 0 ms would score ``a``)."""
        area, best = 0.0, 0.0
        for c in sorted(self.feasible, key=lambda c: c.latency_ms):
            if c.top1 > best:  # a step of the staircase from this latency to the target
                area += (c.top1 - best) * (self.target_ms - c.latency_ms)
                best = c.top1
        return area / self.target_ms

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
            "best_top1": self.best_top1(),
            "hypervolume": self.hypervolume(),
            "tolerance": self.tolerance,
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


def seed_archs(space: CNNSpace, latency: Callable[[Arch], float], target_ms: float, *,
               largest: int = 4) -> list[Arch]:  # fmt: skip
    """Architectures to seed NSGA-II's first population with under ``target_ms``: the uniformly
    width-scaled family that fits (every width index, kernel and expansion, full depth), then
    the ``largest`` feasible networks on the path from the largest network down (each step
    lowers the one choice that saves the most predicted latency), deduplicated."""
    out: list[Arch] = []

    def add(a: Arch) -> None:
        if a not in out and latency(a) <= target_ms:
            out.append(a)

    widest = max(len(s.widths) for s in space.stages)
    for k in sorted({k for s in space.stages for k in s.kernels}):
        for e in sorted({e for s in space.stages for e in s.expands}):
            for w in range(widest):
                if all(k in s.kernels and e in s.expands for s in space.stages):
                    add(space.uniform(w, kernel=k, expand=e))
    choices = [c for _, c in space.genes()]
    genes = space.encode(space.largest())
    found = 0
    while found < largest:
        arch = space.decode(genes)
        if arch not in out and latency(arch) <= target_ms:
            out.append(arch)
            found += 1
        steps = []  # every gene lowered by one choice, by the latency it saves
        for i, (g, c) in enumerate(zip(genes, choices, strict=True)):
            j = c.index(g)
            if j > 0:
                step = [*genes[:i], c[j - 1], *genes[i + 1 :]]
                steps.append((latency(space.decode(step)), step))
        if not steps:
            break
        feasible = [s for s in steps if s[0] <= target_ms]
        # above the target: the step that saves most; below it: the slowest of the feasible ones
        genes = max(feasible)[1] if feasible else min(steps)[1]
    return out


def search(space: CNNSpace, evaluate: Callable[[Arch], Candidate], *, trials: int,
           target_ms: float, strategy: str = "nsga2", population: int = 12, seed: int = 0,
           objectives: Sequence[str] = ("top1", "latency", "params"),
           on_trial: Callable[[int, Candidate], None] | None = None,
           latency: Callable[[Arch], float] | None = None, initial: Sequence[Arch] = (),
           tolerance: float = 0.0, redraws: int = 200) -> SearchResult:  # fmt: skip
    """Evaluate ``trials`` distinct architectures of ``space`` chosen by ``strategy`` under
    ``target_ms`` and return them all with the best.

    ``"nsga2"``: a first population of every ``initial`` architecture and random ones up to
    ``population`` in all, then generations of ``population`` children (binary tournament on
    rank and crowding, uniform crossover of the genes, each gene re-drawn with probability 2 /
    genes) and elitist selection of the next ``population`` from parents and children, under
    constraint domination (latency <= target) on ``objectives`` (any of ``top1``, ``latency``,
    ``params``). ``"random"``: every gene drawn uniformly. ``"rl"``: a REINFORCE controller
    (Williams, 1992; as in Zoph & Le's NAS and MnasNet), one softmax per gene, rewarded with
    ``top1 * min(1, target / latency)**2`` against a moving average baseline.

    ``latency``: a cheap latency predictor; an architecture it puts over the target is re-drawn
    (up to ``redraws`` times, then evaluated anyway) and costs no trial. ``tolerance``: top-1
    differences up to it are ties when the result picks its best (see ``SearchResult.best``).
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
    if initial and strategy != "nsga2":
        raise ConfigError(f"initial architectures seed NSGA-II's population, not {strategy!r}",
                          fix="drop initial=, or use strategy='nsga2'")  # fmt: skip
    for a in initial:
        space.check(a)
    rng = random.Random(seed)
    choices = [c for _, c in space.genes()]
    result = SearchResult(strategy, target_ms, tolerance=tolerance)
    seen: set[Arch] = set()
    stalls = [0]

    def draw() -> list[int]:
        return [rng.choice(c) for c in choices]

    def fits(arch: Arch) -> bool:
        return latency is None or latency(arch) <= target_ms

    def trial(genes: list[int], redraw: Callable[[], list[int]] | None = None,
              ) -> tuple[list[int], Candidate] | None:  # fmt: skip
        """Evaluate ``genes`` (made distinct from every earlier trial by re-drawing one gene;
        when the predictor puts them over the target, replaced by ``redraw()``)."""
        for _ in range(redraws):
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
            if fits(arch) or redraw is None:
                break
            genes = redraw()
        seen.add(arch)
        c = evaluate(arch)
        result.trials.append(c)
        if on_trial is not None:
            on_trial(len(result.trials), c)
        return genes, c

    def point(c: Candidate) -> tuple[list[float], float]:
        return _objectives(c, objectives), max(0.0, c.latency_ms - target_ms)

    pop: list[tuple[list[int], Candidate]] = []
    for a in initial:  # all of them (the first selection keeps ``population``), trials allowing
        if a not in seen and len(result.trials) < trials:
            got = trial(space.encode(a))
            if got is not None:
                pop.append(got)
    controller = _Reinforce(choices, rng) if strategy == "rl" else None
    while len(result.trials) < trials and stalls[0] < 100:
        if controller is not None:
            got = trial(controller.sample(), controller.sample)
            if got is not None:
                c = got[1]
                controller.update(got[0], c.top1 * min(1.0, target_ms / c.latency_ms) ** 2)
        elif strategy == "random" or len(pop) < population:
            got = trial(draw(), draw)
            if got is not None and strategy == "nsga2":
                pop.append(got)
        else:
            rank, crowd = rank_and_crowding([point(c) for _, c in pop])

            def pick(pop: list[tuple[list[int], Candidate]] = pop, rank: list[int] = rank,
                     crowd: list[float] = crowd) -> list[int]:  # fmt: skip
                i, j = rng.randrange(len(pop)), rng.randrange(len(pop))
                return pop[i if (rank[i], -crowd[i]) <= (rank[j], -crowd[j]) else j][0]

            def child() -> list[int]:
                a, b = pick(), pick()
                genes = [x if rng.random() < 0.5 else y for x, y in zip(a, b, strict=True)]
                return [rng.choice(c) if rng.random() < 2 / len(genes) else g
                        for g, c in zip(genes, choices, strict=True)]  # fmt: skip

            children = []
            for _ in range(population):
                if len(result.trials) >= trials:
                    break
                got = trial(child(), child)
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
