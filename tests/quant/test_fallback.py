"""Automatic float fall-back under a user's max_drop."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from slimkit.analyze.sensitivity import SensitivityResult, SensitivityRow
from slimkit.errors import ConfigError
from slimkit.quant.fallback import quantize_with_fallback
from slimkit.quant.ptq import PTQ


def _model_and_data() -> tuple[nn.Module, list[torch.Tensor], torch.Tensor]:
    # the first layer reads an input whose feature 0 is 1000x larger than the rest: its uint8
    # input quantizer wipes out the other features; the later layers quantize well
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(),
                          nn.Linear(64, 10)).eval()  # fmt: skip

    def sample(n: int) -> torch.Tensor:
        x = torch.randn(n, 16)
        x[:, 0] *= 1000.0
        return x

    with torch.no_grad():
        model[0].weight[:, 0] /= 1000.0  # the big feature carries no more signal than the others
    calib = [sample(32) for _ in range(4)]
    return model, calib, sample(256)


def _metric(ref_model: nn.Module, x: torch.Tensor):  # type: ignore[no-untyped-def]
    with torch.no_grad():
        ref = ref_model(x)

    def neg_rel_mse(m: nn.Module) -> float:  # 0 for the float model, higher is better
        with torch.no_grad():
            return -float((m(x) - ref).pow(2).sum() / ref.pow(2).sum())

    return neg_rel_mse


def test_the_sensitive_layer_falls_back_and_the_drop_is_met() -> None:
    model, calib, x = _model_and_data()
    metric = _metric(model, x)
    cfg = PTQ(speed_check=False, calibration="minmax", bias_correction=False)
    q, rep = quantize_with_fallback(model, cfg, data=calib, metric=metric, max_drop=0.01)
    assert rep.steps[0]["metric"] < -0.01  # all-int8 misses the target (measured about -0.5)
    assert rep.float_layers == ["0"] and rep.met
    assert rep.ranking_source.startswith("leave-one-out")
    assert metric(q) == pytest.approx(rep.metric)
    assert q.meta["slimkit"]["fallback"]["float_layers"] == ["0"]
    assert "1 layers in float (0)" in rep.summary()


def test_a_given_sensitivity_result_is_used_and_unmet_targets_error() -> None:
    model, calib, x = _model_and_data()
    metric = _metric(model, x)
    sens = SensitivityResult("sqnr_db", float("inf"), [
        SensitivityRow("0", "int8", 30.0, 0.5), SensitivityRow("2", "int8", 40.0, 0.1),
        SensitivityRow("4", "int8", 50.0, 0.01)])  # fmt: skip
    cfg = PTQ(speed_check=False, calibration="minmax", bias_correction=False)
    _, rep = quantize_with_fallback(model, cfg, data=calib, metric=metric, max_drop=0.01,
                                    sensitivity=sens)  # fmt: skip
    assert rep.ranking_source.startswith("sensitivity") and rep.float_layers == ["0"]
    assert len(rep.steps) == 2  # all int8, then layer 0 in float: no leave-one-out passes
    with pytest.raises(ConfigError, match="max_drop"):
        quantize_with_fallback(model, cfg, data=calib, metric=metric, max_drop=0.0,
                               max_float_layers=0)  # fmt: skip
    with pytest.raises(ConfigError, match="max_drop must be"):
        quantize_with_fallback(model, cfg, data=calib, metric=metric, max_drop=-1)
