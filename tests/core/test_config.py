from __future__ import annotations

from typing import Literal

import pytest
from pydantic import Field

from slimkit.core.config import Config
from slimkit.errors import ConfigError, SlimkitError


class PTQ(Config):
    calibration: Literal["minmax", "percentile"] = "minmax"
    percentile: float = Field(99.99, gt=50, le=100)
    num_batches: int = 32


def test_defaults_and_frozen() -> None:
    c = PTQ()
    assert c.calibration == "minmax" and c.num_batches == 32
    with pytest.raises(Exception):  # noqa: B017 - pydantic's frozen error type
        c.num_batches = 3  # type: ignore[misc]


def test_unknown_key_suggests_the_right_one() -> None:
    with pytest.raises(ConfigError) as ei:
        PTQ(calibraton="percentile")
    msg = str(ei.value)
    assert "unknown key 'calibraton'" in msg
    assert "did you mean 'calibration'" in msg
    assert msg.index("Fix:") > msg.index("calibraton")  # the fix comes last


def test_bad_value_names_field_and_value() -> None:
    with pytest.raises(ConfigError) as ei:
        PTQ.from_dict({"percentile": 20})
    assert "percentile" in str(ei.value) and "20" in str(ei.value)
    assert isinstance(ei.value, SlimkitError) and isinstance(ei.value, ValueError)


def test_from_dict_round_trip_and_replace() -> None:
    c = PTQ(calibration="percentile", percentile=99.9)
    assert PTQ.from_dict(c.to_dict()) == c
    d = c.replace(num_batches=8)
    assert d.num_batches == 8 and d.calibration == "percentile" and c.num_batches == 32
    with pytest.raises(ConfigError, match="expected a mapping"):
        PTQ.from_dict(["minmax"])  # type: ignore[arg-type]
