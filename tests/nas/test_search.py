"""Search strategies on a synthetic problem (no training): constraint, trial count, NSGA-II vs
random, and bad input."""

from __future__ import annotations

import pytest

from slimkit.errors import ConfigError
from slimkit.nas import Arch, Candidate, CNNSpace, SearchResult, search, seed_archs


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


def test_a_latency_predictor_spends_every_trial_under_the_target():
    space = CNNSpace()
    ev = synthetic(space)
    target = ev(space.uniform(1)).latency_ms
    lat = lambda a: ev(a).latency_ms  # noqa: E731 - the synthetic latency is free
    for strategy in ("random", "nsga2", "rl"):
        free = search(space, ev, trials=40, target_ms=target, strategy=strategy, seed=1)
        kept = search(space, ev, trials=40, target_ms=target, strategy=strategy, seed=1,
                      latency=lat)  # fmt: skip
        assert len(kept.trials) == 40 and len(kept.feasible) == 40, strategy
        assert len(free.feasible) < 40, strategy  # without it, trials are lost over the target


def test_seed_archs_and_the_seeded_first_population():
    space = CNNSpace()
    ev = synthetic(space)
    lat = lambda a: ev(a).latency_ms  # noqa: E731
    target = lat(space.uniform(1))
    init = seed_archs(space, lat, target, largest=3)
    assert len(set(init)) == len(init) and all(lat(a) <= target for a in init)
    assert space.uniform(0) in init and space.uniform(1) in init and space.uniform(2) not in init
    assert len(init) >= 3 + 2  # the family (k3 e4 at widths 0 and 1, ...) and the largest ones
    # the largest feasible ones are close to the target: within 10 % of it here
    assert max(lat(a) for a in init) > 0.9 * target
    res = search(space, ev, trials=30, target_ms=target, latency=lat, initial=init)
    assert [c.arch for c in res.trials[: len(init)]] == init
    assert res.best is not None and res.best.top1 >= max(ev(a).top1 for a in init)
    with pytest.raises(ConfigError, match="seed NSGA-II"):
        search(space, ev, trials=5, target_ms=target, strategy="random", initial=init)


def test_best_breaks_ties_toward_the_budget_and_hypervolume_is_the_staircase():
    space = CNNSpace()
    a, b, c, d = (space.uniform(i, kernel=k) for i, k in ((0, 3), (1, 3), (2, 3), (0, 5)))
    res = SearchResult(
        "nsga2",
        1.0,
        trials=[
            Candidate(a, 0.50, 0.2, 1),
            Candidate(b, 0.60, 0.4, 2),
            Candidate(d, 0.60, 0.6, 3),
            Candidate(c, 0.9, 1.5, 4),
        ],
    )
    assert res.best.arch == d  # a tie at 0.60: the slower one
    assert res.best_top1() == 0.60
    # from (latency 1.0, top-1 0): 0.5 over [0.2, 1] plus 0.1 more over [0.4, 1]
    assert res.hypervolume() == pytest.approx(0.5 * 0.8 + 0.1 * 0.6, abs=1e-12)
    res.trials.append(Candidate(c.__class__(c.stages[:1] + a.stages[1:]), 0.59, 0.9, 5))
    assert res.best.arch == d
    res.tolerance = 0.02  # 0.59 is now within the tolerance of 0.60: the slowest of them wins
    assert res.best.top1 == 0.59 and res.best.latency_ms == 0.9
    assert res.to_dict()["hypervolume"] == pytest.approx(res.hypervolume())


def test_measured_best_keeps_the_measured_limit():
    space = CNNSpace()
    a, b, c = (space.uniform(i) for i in range(3))
    res = SearchResult(
        "nsga2",
        1.0,
        trials=[Candidate(a, 0.5, 0.3, 1), Candidate(b, 0.6, 0.8, 2), Candidate(c, 0.61, 0.9, 3)],
        tolerance=0.02,
    )
    assert res.best.arch == c
    truth = {a: 0.35, b: 0.9, c: 1.1}  # the prediction under-estimated c
    calls = []

    def measure(archs):
        calls.append(list(archs))
        return [truth[x] for x in archs]

    assert res.measured_best(measure, 1.0).arch == b  # c measured over: b, the next best
    assert calls == [[c, b, a]] and res.info["measured_ms"][c.describe()] == 1.1
    assert res.measured_best(measure, 0.5).arch == a
    assert res.measured_best(measure, 0.1).arch == a  # none fits: the fastest measured
    assert res.measured_best(measure, 1.0, top=1).arch == c  # only c measured, and over


def test_measured_best_measures_the_tied_trials_slowest_first():
    # a tie set larger than `top`: the slow ones near the budget are the ones measured, not the
    # fast ones a hair more accurate on the proxy
    space = CNNSpace()
    a, b, c = (space.uniform(i) for i in range(3))
    d = space.smallest()
    res = SearchResult("nsga2", 1.0, tolerance=0.05, trials=[
        Candidate(d, 0.62, 0.2, 1), Candidate(a, 0.61, 0.5, 2), Candidate(b, 0.60, 0.8, 3),
        Candidate(c, 0.40, 0.9, 4)])  # fmt: skip
    seen = []

    def measure(archs):
        seen.extend(archs)
        return [{a: 0.5, b: 0.8}[x] for x in archs]

    assert res.measured_best(measure, 1.0, top=2).arch == b  # ties go to the slowest measured
    assert seen == [b, a]
