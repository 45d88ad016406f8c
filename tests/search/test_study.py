"""Choosing from the trials: the Pareto set and the chosen trial."""

from __future__ import annotations

from slimkit.search.study import choose, pareto


def _row(n: int, metric: float, ms: float, mb: float, feasible: bool) -> dict:
    return {
        "number": n,
        "state": "complete",
        "params": {},
        "feasible": feasible,
        "values": {"metric": metric, "latency_ms": ms, "size_mb": mb},
        "pareto": False,
        "note": "",
    }


def test_pareto_drops_dominated_points() -> None:
    pts = {0: (0.9, 1.0, 1.0), 1: (0.8, 2.0, 2.0), 2: (0.95, 3.0, 1.0), 3: (0.9, 1.0, 1.0)}
    assert pareto(pts) == {0, 2, 3}


def test_choose_prefers_the_best_feasible_metric() -> None:
    rows = [
        _row(0, 0.9, 1.0, 1.0, True),
        _row(1, 0.95, 0.5, 0.5, False),
        _row(2, 0.92, 2.0, 1.0, True),
    ]
    chosen, front = choose(rows)
    assert chosen == 2 and {r["number"] for r in front} == {0, 2}
    assert rows[1]["pareto"] is False  # the Pareto set is of the feasible trials


def test_choose_none_when_nothing_is_feasible() -> None:
    rows = [_row(0, 0.9, 1.0, 1.0, False), _row(1, 0.8, 2.0, 2.0, False)]
    chosen, front = choose(rows)
    assert chosen is None and [r["number"] for r in front] == [0]
