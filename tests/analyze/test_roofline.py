from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from slimkit.analyze import api, plots
from slimkit.analyze.hardware import HardwareProfile, load_profile
from slimkit.analyze.profile import ModelProfile, profile_model
from slimkit.analyze.roofline import (
    Int8,
    LowRank,
    PruneChannels,
    layer_costs,
    predict,
    roofline,
)
from slimkit.errors import ConfigError
from slimkit.zoo import create_model, example_inputs

# AVX2 laptop preset: fp32 486 GFLOP/s, int8 973 GOP/s (2x), 51.2 GB/s, ridge 9.5 FLOP/B
HW = "ryzen7_5800u"


@pytest.fixture(scope="module")
def hw() -> HardwareProfile:
    return load_profile(HW)


@pytest.fixture(scope="module")
def resnet224() -> ModelProfile:
    return profile_model(create_model("resnet18"), example_inputs("resnet18", batch=1))


@pytest.fixture(scope="module")
def big_linear() -> ModelProfile:
    return profile_model(nn.Linear(4096, 4096), (torch.randn(1, 4096),))


@pytest.mark.parametrize("preset", [HW, "xeon_8380", "raspberry_pi_4"])
def test_resnet18_is_compute_bound_and_a_big_linear_memory_bound(
    preset: str, resnet224: ModelProfile, big_linear: ModelProfile
) -> None:
    hw = load_profile(preset)
    ridge = hw.ridge_point("fp32")
    assert ridge is not None
    rf = roofline(resnet224, hw)
    assert rf.bound == "compute" and rf.intensity > ridge  # ~52 FLOP/B vs ridges of 3.7-29
    assert rf.share("compute") > 0.5  # most of the time (68 % on the 40-core Xeon, ridge 29)
    lin = roofline(big_linear, hw)
    (row,) = lin.layers
    assert lin.bound == "memory" and row.bound == "memory" and row.intensity < 1  # 0.5 FLOP/B
    assert "memory-bound" in row.verdict and "int8" in row.verdict


def test_int8_pays_more_on_a_memory_bound_linear(
    hw: HardwareProfile, resnet224: ModelProfile, big_linear: ModelProfile
) -> None:
    conv = predict(resnet224, hw, Int8()).speedup
    lin = predict(big_linear, hw, Int8()).speedup
    ratio = hw.peak("int8") / hw.peak_fp32_gflops  # type: ignore[operator]
    assert 1.0 < conv <= ratio * 1.05  # compute-bound: at most the int8 / fp32 peak ratio
    assert 3.0 < lin <= 4.0  # memory-bound: bytes / 4, less the launch overhead
    assert lin > conv


def test_prune_channels_scales_inner_layers_by_a_quarter(hw: HardwareProfile) -> None:
    prof = profile_model(create_model("resnet18_cifar"), example_inputs("resnet18_cifar"))
    before = {c.name: c for c in layer_costs(prof)}
    after = {c.name: c for c in PruneChannels(0.5).apply(layer_costs(prof))}
    assert after["conv1"].macs == pytest.approx(before["conv1"].macs / 2)  # input is the image
    assert after["fc"].macs == pytest.approx(before["fc"].macs / 2)  # output is the prediction
    for name in ("layer1.0.conv1", "layer3.1.conv2", "layer2.0.downsample.0"):
        assert after[name].macs == pytest.approx(before[name].macs / 4)
        assert after[name].weight_bytes == pytest.approx(before[name].weight_bytes / 4)
    p = predict(prof, hw, PruneChannels(0.5))
    assert 0.24 < p.macs_after / p.macs_before < 0.27
    assert 3.0 < p.speedup < 4.0  # compute-bound: close to the MAC ratio, overhead aside


def test_depthwise_conv_shrinks_linearly() -> None:
    prof = profile_model(create_model("mobilenetv2_cifar"), example_inputs("mobilenetv2_cifar"))
    before = {c.name: c for c in layer_costs(prof)}
    after = {c.name: c for c in PruneChannels(0.5).apply(layer_costs(prof))}
    dw, pw = "features.2.conv.1.0", "features.2.conv.2"  # 3x3 depthwise, then 1x1 projection
    assert after[dw].macs == pytest.approx(before[dw].macs / 2)
    assert after[pw].macs == pytest.approx(before[pw].macs / 4)


def test_low_rank_counts_r_times_in_plus_out(hw: HardwareProfile) -> None:
    prof = profile_model(nn.Sequential(nn.Linear(512, 512)), (torch.randn(4, 512),))
    (c,) = LowRank(64).apply(layer_costs(prof))
    assert c.macs == 4 * 64 * (512 + 512) and c.kernels == 2
    assert LowRank(0.125).apply(layer_costs(prof))[0].macs == c.macs  # fraction of full rank
    assert LowRank(512).apply(layer_costs(prof))[0].macs == 4 * 512 * 512  # full rank: unchanged
    assert predict(prof, hw, LowRank(64)).speedup > 1.5


def test_fusion_overhead_and_composition(hw: HardwareProfile) -> None:
    model = create_model("cnn_bn")
    prof = profile_model(model, example_inputs("cnn_bn"))
    rf = roofline(prof, hw, overhead_us=5.0)
    bounds = {r.name: r.bound for r in rf.layers}
    assert bounds["features.0.1"] == "fused" and bounds["features.0.2"] == "fused"  # BN, ReLU
    kernels = sum(1 for r in rf.layers if r.bound != "fused")
    assert rf.total_s >= kernels * 5e-6  # tiny models are never predicted free
    assert all(r.bound == "overhead" for r in rf.layers if r.bound != "fused")
    assert "leave it" in rf.layers[0].verdict and "overhead" in rf.summary
    big = profile_model(create_model("resnet18_cifar"), example_inputs("resnet18_cifar"))
    both = predict(big, hw, [PruneChannels(0.5), Int8()])
    assert both.speedup > predict(big, hw, PruneChannels(0.5)).speedup
    assert both.change == "prune 50% channels + int8"
    with pytest.raises(ConfigError):
        PruneChannels(1.5)
    with pytest.raises(ConfigError):
        predict(big, hw, "int8")  # type: ignore[arg-type]


def test_analyze_writes_json_and_pngs_atomically(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model, x = create_model("cnn_bn"), example_inputs("cnn_bn", batch=2)
    rep = api.analyze(model, x, hw=HW, sensitivity=True, changes=["int8", "prune50"],
                      out=tmp_path)  # fmt: skip
    data = json.loads((tmp_path / "analysis.json").read_text())
    assert data["roofline"]["bound"] in ("compute", "memory")
    assert set(data["predictions"]) == {"int8", "prune50", "lowrank25"}
    assert len(data["sensitivity"]["rows"]) == 3 * 2  # 2 convs + fc, 2 changes
    for png in ("roofline.png", "sensitivity.png"):
        assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "analysis.json",
        "roofline.png",
        "sensitivity.json",
        "sensitivity.png",
    ]  # no temporary files left over
    assert rep.files["analysis_json"] == str(tmp_path / "analysis.json")

    def broken(*_a: object, **_k: object) -> None:
        raise RuntimeError("plot failed")

    monkeypatch.setattr(plots, "roofline_chart", broken)
    with pytest.raises(RuntimeError):
        api.analyze(model, x, hw=HW, out=tmp_path)
    assert json.loads((tmp_path / "analysis.json").read_text()) == data  # old report intact
