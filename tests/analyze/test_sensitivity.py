from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from slimkit.analyze.sensitivity import SensitivityResult, _apply, sensitivity
from slimkit.core.scope import Scope
from slimkit.errors import ConfigError, ScopeError
from slimkit.zoo import create_model, example_inputs


@pytest.fixture(scope="module")
def result_and_model() -> tuple[SensitivityResult, nn.Module, dict[str, torch.Tensor]]:
    model = create_model("residual")  # convs with BN, residual blocks, a linear head
    before = {k: v.clone() for k, v in model.state_dict().items()}
    res = sensitivity(model, example_inputs=example_inputs("residual", batch=8), progress=False)
    return res, model, before


def test_model_is_restored_bitwise(result_and_model: tuple) -> None:
    res, model, before = result_and_model
    after = model.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert len(res.rows) == len(res.layers) * 7 and "fc" in res.layers


def test_more_aggressive_changes_drop_more(result_and_model: tuple) -> None:
    res, _, _ = result_and_model
    rows = {(r.layer, r.change): r for r in res.rows}
    for layer in res.layers:
        assert rows[(layer, "int4")].drop > rows[(layer, "int8")].drop
        assert rows[(layer, "int8")].metric > 35  # per-channel int8 weights: ~45-60 dB here
        assert rows[(layer, "prune70")].drop > rows[(layer, "prune30")].drop
    top = res.most_sensitive("int4", k=2)
    assert len(top) == 2 and top[0].drop >= top[1].drop
    assert top[0].drop == max(res.drops("int4").values())
    with pytest.raises(ConfigError, match="no change 'int3'"):
        res.most_sensitive("int3")


def test_pruning_zeroes_channels_through_the_batchnorm() -> None:
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU()).eval()
    model[1].bias.data.fill_(0.5)  # a shift that would survive zeroing only the conv weight
    model[1].running_mean.fill_(0.3)
    with torch.no_grad():
        l1 = model[0].weight.abs().sum(dim=(1, 2, 3))
        _apply(model, "0", model[0], "prune50")
        y = model(torch.randn(2, 3, 6, 6))
    pruned = torch.argsort(l1)[:4]
    assert torch.equal(y[:, pruned], torch.zeros_like(y[:, pruned]))  # exactly removed
    assert bool((y[:, torch.argsort(l1)[4:]] != 0).any())


def test_low_rank_truncates_the_rank() -> None:
    lin = nn.Linear(32, 16)
    with torch.no_grad():
        _apply(lin, "", lin, "lowrank25")
    assert int(torch.linalg.matrix_rank(lin.weight)) == 4  # 25 % of min(16, 32)


def test_user_metric_scope_and_round_trip(tmp_path: Path) -> None:
    model = create_model("mlp")
    x = example_inputs("mlp", batch=16)
    ref = model(*x).argmax(-1)

    def agreement(m: nn.Module) -> float:
        return float((m(*x).argmax(-1) == ref).float().mean())

    res = sensitivity(model, metric=agreement, scope=Scope(include=["fc2"]),
                      changes=["int8", "prune70"], progress=False)  # fmt: skip
    assert res.metric_name == "agreement" and res.baseline == 1.0
    assert res.layers == ["fc2"]
    for r in res.rows:
        assert r.drop == pytest.approx(1.0 - r.metric)
    path = res.save(tmp_path / "sens.json")
    assert SensitivityResult.load(path) == res
    sq = sensitivity(model, example_inputs=x, changes=["int8"], progress=False)
    raw = json.loads(sq.save(tmp_path / "sq.json").read_text())  # strict JSON: inf -> null
    assert raw["baseline"] is None and math.isinf(SensitivityResult.load(tmp_path / "sq.json")
                                                  .baseline)  # fmt: skip
    with pytest.raises(ConfigError, match="unknown sensitivity change"):
        sensitivity(model, example_inputs=x, changes=["int1"], progress=False)
    with pytest.raises(ScopeError):
        sensitivity(model, example_inputs=x, scope=Scope(include=["nope"]), progress=False)
