"""AMC (policy-gradient widths): the budget holds on re-measurement, the agent improves on its
first episodes, the search is reproducible, and bad input is refused."""

from __future__ import annotations

import pytest
import torch

import slimkit as sk
from slimkit.analyze.profile import profile_model
from slimkit.errors import ConfigError
from slimkit.prune import AMC, pruning_record
from slimkit.zoo.models import create_model


def _case() -> tuple[torch.nn.Module, tuple[torch.Tensor], list[torch.Tensor]]:
    torch.manual_seed(0)
    model = create_model("cnn_bn").eval()
    g = torch.Generator().manual_seed(0)
    data = [torch.randn(16, 3, 16, 16, generator=g) for _ in range(2)]
    return model, (data[0][:1],), data


def test_budget_is_met_on_remeasurement_and_the_search_is_reproducible() -> None:
    model, x, data = _case()
    cfg = AMC(macs=0.5, episodes=12, batch=4)
    out = sk.prune(model, cfg, example_inputs=x, data=data)
    rec = pruning_record(out)["amc"]  # type: ignore[index]
    measured = profile_model(out, x).total_macs / profile_model(model, x).total_macs
    assert measured <= 0.5 and rec["measured_macs"] == round(measured, 4)
    assert measured > 0.35  # measured 0.393: the budget is used, not overshot (8-16 wide layers)
    assert len(rec["rewards"]) == 12 and rec["best_reward"] == max(rec["rewards"])
    # the best candidate is no worse than the first batch's (the policy starts near uniform)
    assert rec["best_reward"] >= max(rec["rewards"][:4])
    again = sk.prune(model, cfg, example_inputs=x, data=data)
    assert pruning_record(again)["amc"]["widths"] == rec["widths"]  # type: ignore[index]
    for key, (units, kept) in rec["widths"].items():
        assert 1 <= kept <= units, key


def test_amc_needs_data_and_a_valid_budget() -> None:
    model, x, _ = _case()
    with pytest.raises(ConfigError, match="needs data="):
        sk.prune(model, AMC(), example_inputs=x)
    with pytest.raises(ConfigError):
        AMC(macs=1.5)
