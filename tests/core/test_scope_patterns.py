"""A pattern that matches nothing is an error, never a silent no-op: a typo in an exclude list
would otherwise quantize or prune the very layer the user meant to protect."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import slimkit as sk
from slimkit.errors import ConfigError, ScopeError


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(),
                         nn.Linear(16, 4)).eval()  # fmt: skip


def test_exclude_pattern_matching_nothing_is_named() -> None:
    data = [torch.randn(4, 8) for _ in range(2)]
    cfg = sk.quant.PTQ(speed_check=False, float_prefix=False)
    with pytest.raises(ScopeError, match=r"exclude pattern 'head' matches no module.*Fix:"):
        sk.quantize(_net(), cfg, data=data, scope=sk.Scope(exclude=["head"]))
    q = sk.quantize(_net(), cfg, data=data, scope=sk.Scope(exclude=["4"]))  # a real name works
    assert q.meta["slimkit"]["float_layers"] == ["4"]


def test_ratio_pattern_matching_nothing_is_named() -> None:
    x = (torch.randn(1, 8),)
    with pytest.raises(ConfigError, match=r"ratios pattern 'fc1' matches no module"):
        sk.prune(_net(), sk.prune.Channel(ratios={"fc1": 0.5}), example_inputs=x)
    with pytest.raises(ConfigError, match="not a valid regular expression"):
        sk.prune(_net(), sk.prune.Channel(ratios={"(": 0.5}), example_inputs=x)
    p = sk.prune(_net(), sk.prune.Channel(ratio=0.0, ratios={"0": 0.5}), example_inputs=x)
    assert p[0].out_features == 8  # the pattern that names a layer is applied
