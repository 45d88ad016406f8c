"""Search strategies on a synthetic problem (no training): constraint, trial count, NSGA-II vs
random, and bad input."""

from __future__ import annotations

import pytest

from slimkit.errors import ConfigError
from slimkit.nas import Arch, Candidate, CNNSpace, search


def synthetic(space: CNNSpace):
    """Accuracy grows with width and depth, with diminishing returns; latency with the MACs-ish
    sum of width x depth x kernel x expand."""

    def evaluate(arch: Arch) -> Candidate:
        work = sum(s.width * sum(k * e for k, e in zip(s.kernels, s.expands, strict=True))
                   for s in arch.stages)  # fmt: skip
        acc = 1 - 1 / (1 + 0.002 * sum(s.width * s.depth for s in arch.stages))
        return Candidate(arch, acc, 0.01 + work / 1e4, work)

    return evaluate


def test_search_keeps_the_target_and_counts_trials():
    space = CNNSpace()
    ev = synthetic(space)
    target = ev(space.uniform(1)).latency_ms
    seen = []
    res = search(space, ev, trials=30, target_ms=target, on_trial=lambda i, c: seen.append(i))
    assert len(res.trials) == 30 and seen == list(range(1, 31))
    assert res.best is not None and res.best.latency_ms <= target
    assert all(c.latency_ms <= target for c in res.feasible)
    curve = res.best_so_far()
    assert curve == sorted(curve) and curve[-1] == res.best.top1
    assert res.to_dict()["feasible"] == len(res.feasible)


def test_nsga2_and_rl_beat_random_at_equal_trials_on_a_synthetic_problem():
    space = CNNSpace()
    ev = synthetic(space)
    target = ev(space.uniform(1)).latency_ms
    evo, rnd, rl = [], [], []
    for seed in range(3):
        for strategy, out in (("nsga2", evo), ("random", rnd), ("rl", rl)):
            res = search(space, ev, trials=80, target_ms=target, strategy=strategy, seed=seed)
            assert len(res.trials) == 80 and len({c.arch for c in res.trials}) == 80
            out.append(res.best.top1)
    # measured: mean best top-1 0.439 (NSGA-II), 0.459 (REINFORCE), 0.411 (random), seeds 0-2
    assert sum(evo) > sum(rnd) + 0.03 and sum(rl) > sum(rnd) + 0.03


def test_bad_search_input():
    space = CNNSpace()
    with pytest.raises(ConfigError, match="unknown search strategy"):
        search(space, synthetic(space), trials=3, target_ms=1.0, strategy="grid")
    with pytest.raises(ConfigError, match="unknown objectives"):
        search(space, synthetic(space), trials=3, target_ms=1.0, objectives=("acc",))
    with pytest.raises(ConfigError, match="positive"):
        search(space, synthetic(space), trials=3, target_ms=0.0)
