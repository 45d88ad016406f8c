"""Constraints: units, did-you-mean, and the errors that name the fix."""

from __future__ import annotations

import pytest

from slimkit.errors import ConfigError
from slimkit.search.constraints import Constraints


def test_parse_units() -> None:
    c = Constraints.parse(size="5MB", latency="10ms", drop="1%")
    assert (c.size_mb, c.latency_ms, c.max_drop) == (5.0, 10.0, 0.01)
    c = Constraints.parse(size="500KB", latency="0.5s", drop="0.02")
    assert c.size_mb == pytest.approx(0.5) and c.latency_ms == pytest.approx(500.0)
    assert c.max_drop == pytest.approx(0.02)
    assert Constraints.parse(size="2", latency="250us").latency_ms == pytest.approx(0.25)


def test_violations_are_signed_distances() -> None:
    c = Constraints(size_mb=1.0, latency_ms=2.0, max_drop=0.01)
    v = c.violations({"metric": 0.95, "latency_ms": 1.5, "size_mb": 1.2}, source_metric=0.97)
    assert v["size_mb"] == pytest.approx(0.2) and v["latency_ms"] == pytest.approx(-0.5)
    assert v["drop"] == pytest.approx(0.01)
    assert "size <= 1 MB" in c.describe()


def test_unknown_key_gets_did_you_mean() -> None:
    with pytest.raises(ConfigError, match="did you mean 'latency_ms'"):
        Constraints(latency_m=3)


def test_no_goal_and_bad_quantities_name_the_fix() -> None:
    with pytest.raises(ConfigError, match="no goal"):
        Constraints()
    with pytest.raises(ConfigError, match=r"--max-size '5 parsecs'.*Fix: write it like 5MB"):
        Constraints.parse(size="5 parsecs")
    with pytest.raises(ConfigError, match="not positive"):
        Constraints.parse(latency="0ms")
