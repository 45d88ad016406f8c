"""Search spaces as data: sampling, YAML round trips, genes, and errors that name the fix."""

from __future__ import annotations

import random

import pytest

from slimkit.errors import ConfigError
from slimkit.nas import Arch, CNNSpace, EncoderSpace, StageSpace


def test_sampled_arch_round_trips_through_yaml(tmp_path):
    space = CNNSpace()
    rng = random.Random(0)
    for _ in range(20):
        arch = space.sample(rng)
        space.check(arch)  # every sample lies in the space
        assert Arch.from_yaml(arch.to_yaml(tmp_path / "a.yaml")) == arch
        assert space.decode(space.encode(arch)) == arch
    assert CNNSpace.from_yaml(space.to_yaml(tmp_path / "s.yaml")) == space


def test_largest_smallest_uniform_and_size():
    space = CNNSpace()
    big, small = space.largest(), space.smallest()
    assert [s.width for s in big.stages] == [16, 32, 56, 80]
    assert [s.depth for s in small.stages] == [1, 1, 1, 1]
    u = space.uniform(1)
    assert [s.width for s in u.stages] == [12, 24, 40, 64]
    assert all(set(s.kernels) == {3} and set(s.expands) == {4} for s in u.stages)
    # 3 widths x sum over depths of (2 kernels x 2 expands)^depth, per stage
    assert space.size() == (3 * 4) * (3 * (4 + 16 + 64)) ** 2 * (3 * (4 + 16))


def test_user_extends_the_space():
    space = CNNSpace(stages=[StageSpace(widths=[8], depths=[1, 2], kernels=[3, 5, 7]),
                             StageSpace(widths=[16, 24], depths=[2], stride=2)])  # fmt: skip
    arch = space.sample(random.Random(1))
    assert len(arch.stages) == 2 and arch.stages[1].depth == 2
    assert {n for n, _ in space.genes()} >= {"s0.b1.kernel", "s1.width"}


def test_bad_space_and_arch_name_the_problem():
    with pytest.raises(ConfigError, match="odd"):
        StageSpace(widths=[8], depths=[1], kernels=[4])
    with pytest.raises(ConfigError, match="stride"):
        StageSpace(widths=[8], depths=[1], stride=3)
    with pytest.raises(ConfigError, match="did you mean 'widths'"):
        StageSpace.from_dict({"width": [8], "depths": [1]})
    space = CNNSpace()
    wrong = Arch.from_dict({"stages": [{"width": 9, "kernels": [3], "expands": [2]}] * 4})
    with pytest.raises(ConfigError, match="width 9 not in"):
        space.check(wrong)
    with pytest.raises(ConfigError, match="as many kernels as expands"):
        Arch.from_dict({"stages": [{"width": 8, "kernels": [3, 5], "expands": [2]}]})
    with pytest.raises(ConfigError, match="not an architecture"):
        Arch.from_dict({"stage": []})


def test_encoder_space_is_data():
    space = EncoderSpace()
    arch = space.sample(random.Random(0))
    assert len(arch["layers"]) in space.depths
    assert EncoderSpace.from_dict(space.to_dict()) == space
    with pytest.raises(ConfigError, match="divide"):
        EncoderSpace(hidden=100, heads=[3])
