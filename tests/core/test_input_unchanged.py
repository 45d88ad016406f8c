"""Analysis and the dependency graph run the user's model: they must leave it exactly as it was,
BatchNorm running statistics and training flags included, for a model in train mode too."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import slimkit as sk


def _bn_net() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))  # fmt: skip
    return net.train()


@pytest.mark.parametrize("call", ["analyze", "build_depgraph"])
def test_train_mode_model_is_left_bit_identical(call: str) -> None:
    model = _bn_net()
    model[5].eval()  # a mix of modes must come back as it was, module by module
    before = copy.deepcopy(model.state_dict())
    modes = [m.training for m in model.modules()]
    x = torch.randn(2, 3, 8, 8) * 3 + 1  # far from the running statistics: any update shows
    if call == "analyze":
        sk.analyze(model, (x,))
    else:
        sk.prune.build_depgraph(model, (x,))
    after = model.state_dict()
    assert [k for k in before if not torch.equal(before[k], after[k])] == []
    assert [m.training for m in model.modules()] == modes
