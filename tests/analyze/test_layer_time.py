from __future__ import annotations

import math

import pytest
from torch import nn

from slimkit.analyze.hardware import load_profile
from slimkit.analyze.layer_time import (
    compare,
    eager_layer_times,
    measure_op_overhead,
    ort_layer_times,
)
from slimkit.analyze.profile import profile_model
from slimkit.analyze.roofline import roofline
from slimkit.export.ort_profile import module_path
from slimkit.zoo import create_model, example_inputs


@pytest.mark.parametrize(
    ("node", "module"),
    [
        ("/layer2/layer2.0/downsample/downsample.0/Conv", "layer2.0.downsample.0"),
        ("/features/features.1/conv/conv.0/conv.0.0/Conv", "features.1.conv.0.0"),
        ("/blocks/blocks.0/attn/q_proj/MatMul", "blocks.0.attn.q_proj"),
        ("/conv1/Conv", "conv1"),
        ("/Flatten", ""),
        ("Unsqueeze_2", ""),
    ],
)
def test_module_path(node: str, module: str) -> None:
    assert module_path(node) == module


def test_module_path_falls_back_to_an_existing_module() -> None:
    mods = {"", "blocks", "blocks.0", "blocks.0.attn"}
    assert module_path("/blocks/blocks.0/attn/MatMul_1", mods) == "blocks.0.attn"
    assert module_path("/blocks/blocks.0/attn/MatMul/MatMulScaleFusion/", mods) == "blocks.0.attn"


@pytest.fixture(scope="module")
def resnet() -> tuple[nn.Module, tuple]:
    return create_model("resnet18_cifar"), example_inputs("resnet18_cifar")


def test_ort_kernels_map_to_modules(resnet: tuple) -> None:
    model, x = resnet
    times = ort_layer_times(model, x, runs=2, warmup=1)
    modules = dict(model.named_modules())
    convs = {n for n, m in modules.items() if isinstance(m, nn.Conv2d)}
    conv_kernels = [k for k in times.kernels if k["op_type"] in ("Conv", "FusedConv")]
    # ORT renames fused convs after their ReLU's output; each still maps to its conv module
    assert all(isinstance(modules.get(k["module"]), nn.Conv2d) for k in conv_kernels)
    assert {k["module"] for k in conv_kernels} == convs
    assert any(k["node"].endswith("Relu_output_0_nchwc") for k in conv_kernels)
    assert times.per_module[""] < 0.1 * times.total_s  # almost nothing left unattributed

    rows = compare(roofline(profile_model(model, x), load_profile("ryzen7_5800u")), times)
    by_name = {r["name"]: r for r in rows}
    assert all(by_name[c]["measured_s"] > 0 and by_name[c]["measured_over_bound"] > 0
               for c in convs)  # fmt: skip
    assert by_name["bn1"]["bound"] == "fused" and by_name["bn1"]["measured_s"] is None
    assert by_name["fc"]["measured_s"] is not None


def test_eager_times_every_leaf_module() -> None:
    model = create_model("cnn_bn")
    times = eager_layer_times(model, example_inputs("cnn_bn"), runs=3, warmup=1)
    leaves = {n for n, m in model.named_modules() if n and not any(m.children())}
    assert set(times.per_module) == leaves and times.runtime == "pytorch eager"
    assert all(t > 0 for t in times.per_module.values()) and times.total_s > 0


def test_op_overhead_is_a_positive_microsecond_figure() -> None:
    us = measure_op_overhead(n=16, runs=20)
    assert math.isfinite(us) and 0 < us < 1000
