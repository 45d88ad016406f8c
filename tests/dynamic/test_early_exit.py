"""Early exit: the cut chain is the model, the thresholds keep their accuracy promise on the data
they were calibrated on, and the ONNX Runtime runner matches PyTorch sample by sample."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch

from slimkit.dynamic import (
    EarlyExit,
    OrtEarlyExit,
    calibrate,
    cut_points,
    early_exit,
    export_early_exit,
    split,
)
from slimkit.dynamic.segments import trace
from slimkit.errors import ConfigError, DataError, ExportError
from slimkit.testing.zoo import randomise_bn
from slimkit.zoo.models import create_model


def _model(name: str = "residual") -> torch.nn.Module:
    return randomise_bn(create_model(name)).eval()


def _data(n: int = 4, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(16, 3, 16, 16, generator=g), torch.randint(0, 10, (16,), generator=g))
            for _ in range(n)]  # fmt: skip


@pytest.mark.parametrize("name", ["cnn_bn", "residual", "inverted_residual"])
def test_the_segments_chained_are_the_model(name: str) -> None:
    model = _model(name)
    x = torch.randn(3, 3, 16, 16)
    chain = split(copy.deepcopy(model), x, at=[0.3, 0.6])
    assert len(chain.segments) == len(chain.cuts) + 1 >= 2
    h = x
    with torch.no_grad():
        for seg in chain.segments:
            h = seg(h)
        torch.testing.assert_close(h, model(x), atol=0, rtol=0)


def test_no_cut_inside_a_residual_block() -> None:
    model = _model("residual")
    names = [c.module for c in cut_points(trace(model, torch.randn(1, 3, 16, 16)))]
    assert names == ["features.0.2", "features.1.relu2"]  # block ends only; identity is live
    with pytest.raises(ConfigError, match=r"no cut point after module 'features.1.conv1'.*Fix:.*"
                       r"features.1.relu2"):  # fmt: skip
        split(model, torch.randn(1, 3, 16, 16), names=["features.1.conv1"])


def test_early_exit_trains_only_the_heads_and_leaves_the_input_alone() -> None:
    model = _model().train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ee = early_exit(model, EarlyExit(epochs=1, at=[0.3], lr=1e-2), data=_data(), progress=False)
    assert model.training and all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not ee.training and ee.cuts == ["features.0.2"]
    ref = early_exit(model, EarlyExit(epochs=0, at=[0.3]), data=_data(), progress=False)
    seg_same = [
        torch.equal(a, b)
        for a, b in zip(
            ee.segments.state_dict().values(), ref.segments.state_dict().values(), strict=True
        )
    ]
    head_same = [
        torch.equal(a, b)
        for a, b in zip(
            ee.heads.state_dict().values(), ref.heads.state_dict().values(), strict=True
        )
    ]
    assert all(seg_same) and not all(head_same)  # BN statistics of the backbone included
    ee.thresholds.fill_(2.0)  # no exit taken: exactly the original model
    x = _data(1, seed=5)[0][0]
    with torch.no_grad():
        torch.testing.assert_close(ee(x), model.eval()(x), atol=0, rtol=0)


def test_calibrated_thresholds_keep_the_drop_on_the_calibration_data() -> None:
    model = _model()
    data = _data(6)
    saved = []
    for max_drop in (0.0, 0.05, 0.2):
        for on in ("agreement", "labels"):
            cfg = EarlyExit(epochs=0, max_drop=max_drop, calibrate_on=on)
            ee = early_exit(model, cfg, data=data, progress=False)
            r = ee.evaluate(data)
            assert r["full_top1"] - r["top1"] <= max_drop + 1e-9, (max_drop, r)
            if on == "agreement":
                assert r["agreement"] >= 1 - max_drop - 1e-9
                saved.append(r["macs_saved"])
            assert sum(r["exit_fractions"]) == pytest.approx(1.0)
    assert saved == sorted(saved) and saved[0] < saved[-1]  # at 0 no exit is taken
    # without labels the promise is agreement with the full model
    unlabelled = [x for x, _ in data]
    calibrate(ee, unlabelled, 0.1)
    assert ee.evaluate(data)["agreement"] >= 0.9 - 1e-9
    # a budget of 1: the first exit's share (1/3 of it) lets at least a third leave there
    calibrate(ee, data, 1.0)
    assert ee.evaluate(data)["exit_fractions"][0] >= 1 / 3


def test_eval_forward_follows_the_thresholds() -> None:
    ee = early_exit(_model(), EarlyExit(epochs=0, at=[0.3]), data=_data(), progress=False)
    x = _data(1, seed=3)[0][0]
    with torch.no_grad():
        exits = ee.exit_logits(x)
        ee.thresholds.fill_(0.0)
        torch.testing.assert_close(ee(x), exits[0], atol=0, rtol=0)
        conf = torch.softmax(exits[0], -1).amax(-1)
        ee.thresholds.fill_(float(conf.median()))
        out, taken = ee.forward_with_exits(x)
        assert 0 < int((taken == 0).sum()) < x.shape[0]
        want = torch.where((taken == 0)[:, None], exits[0], exits[1])
        torch.testing.assert_close(out, want, atol=0, rtol=0)


@pytest.mark.parametrize(("criterion", "grid"), [("max_softmax", 0), ("entropy", 0),
                                                ("max_softmax", 2)])  # fmt: skip
def test_ort_runner_matches_pytorch_sample_by_sample(
    criterion: str, grid: int, tmp_path: Path
) -> None:
    cfg = EarlyExit(epochs=0, criterion=criterion, at=[0.1, 0.6], head_grid=grid)
    ee = early_exit(_model(), cfg, data=_data(), progress=False)
    x = _data(1, seed=7)[0][0]
    with torch.no_grad():
        confs = [torch.softmax(lg, -1).amax(-1) if criterion == "max_softmax" else None
                 for lg in ee.exit_logits(x)[:-1]]  # fmt: skip
    if criterion == "max_softmax":  # thresholds between samples: some leave at each exit
        ee.thresholds.copy_(torch.stack([c.quantile(0.6) for c in confs]) + 1e-4)
    else:
        ee.thresholds.fill_(0.0)
    runner = export_early_exit(ee, tmp_path / "ee", example_inputs=x[:1])
    with torch.no_grad():
        want, want_exit = ee.forward_with_exits(x)
    got, got_exit = runner(x.numpy())
    np.testing.assert_array_equal(got_exit, want_exit.numpy())
    np.testing.assert_allclose(got, want.numpy(), atol=1e-4, rtol=0)
    if criterion == "max_softmax":
        assert len(set(got_exit.tolist())) >= 2
    again = OrtEarlyExit.load(tmp_path / "ee", threads=1)
    for i in range(4):  # batch 1: the fast path
        lg, k = again(x[i : i + 1])
        assert k[0] == want_exit[i]
        np.testing.assert_allclose(lg[0], want[i].numpy(), atol=1e-4, rtol=0)


def test_bad_input_is_named() -> None:
    with pytest.raises(ConfigError, match=r"classifier returning \(batch, classes\).*Fix:"):
        early_exit(create_model("transformer_block"), data=[torch.randn(2, 8, 32)])
    bad = torch.randn(4, 3, 16, 16)
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(DataError, match="NaN or Inf.*Fix:"):
        early_exit(_model(), data=[bad])
    with pytest.raises(DataError, match="fails on the first batch of shape.*Fix:"):
        early_exit(_model(), data=[torch.randn(2, 1, 16, 16)])
    with pytest.raises(ExportError, match="no exits.json.*Fix:"):
        OrtEarlyExit.load("/nonexistent")


def test_grid_heads_cost_less_on_early_maps_and_keep_the_layout() -> None:
    """A grid head pools before its 1x1 conv (fewer MACs on a large early map) and its linear
    reads every cell of the pooled map (a global pool would not)."""
    cfg = EarlyExit(epochs=0, at=[0.1], head_width=16)
    full = early_exit(_model(), cfg, data=_data(), progress=False)
    grid = early_exit(_model(), cfg.replace(head_grid=2), data=_data(), progress=False)
    assert grid.head_macs[0] < full.head_macs[0]
    linear = grid.heads[0].body[-1]
    assert isinstance(linear, torch.nn.Linear) and linear.in_features == 16 * 4
