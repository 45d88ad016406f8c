"""Depth then width pruning, as bench_pipeline runs it: blocks nested in other droppable blocks
(a MobileNetV2 block's depthwise convolution inside the block) are dropped with their block."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from slimkit.export.onnx import export_onnx
from slimkit.export.ort import ort_session, run_session
from slimkit.prune import Channel, Drop, drop_blocks, prune_channels, pruning_record
from slimkit.prune.blocks import Dropped, droppable_blocks, outermost_blocks
from slimkit.zoo.models import create_model


class Res(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(c, c, 3, padding=1), nn.ReLU(), nn.Conv2d(c, c, 3, padding=1)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


def _net() -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), Res(8), Res(8), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(8, 4),
    )  # fmt: skip
    return net.eval(), (torch.randn(2, 3, 8, 8),)


def _head_only(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The net with both residual blocks removed, computed by hand."""
    with torch.no_grad():
        return net[5](net[4](net[3](net[0](x))))


def test_outermost_blocks_leave_out_layers_nested_in_a_block() -> None:
    net, x = _net()
    assert sorted(droppable_blocks(net, x)) == sorted(
        ["1", "2", "1.body.0", "1.body.2", "2.body.0", "2.body.2"]
    )
    assert outermost_blocks(net, x) == ["1", "2"]
    mb = create_model("mobilenetv2_cifar", width_mult=0.35).eval()
    xm = (torch.randn(1, 3, 32, 32),)
    outer = outermost_blocks(mb, xm)
    # MobileNetV2: the 11 inverted residuals with a shortcut (of 17 blocks), not the depthwise
    # convolutions inside blocks that change the shape (features.11.conv.1 and others)
    assert outer == [f"features.{i}" for i in (2, 3, 5, 6, 8, 9, 10, 12, 13, 15, 16)]
    assert "features.11.conv.1" in droppable_blocks(mb, xm)


@pytest.mark.parametrize("how", ["names", "greedy", "even"])
def test_dropping_a_block_and_a_layer_inside_it(how: str) -> None:
    """Before the fix, each of these raised AttributeError ('Dropped has no attribute body')."""
    net, x = _net()
    n = len(droppable_blocks(net, x))
    cfg = {
        "names": Drop(names=["1.body.0", "1", "2", "2.body.2"]),
        "greedy": Drop(blocks=n),
        "even": Drop(blocks=n, order="even"),
    }[how]
    small = drop_blocks(net, cfg, example_inputs=x, data=[torch.randn(4, 3, 8, 8)])
    assert (pruning_record(small) or {})["dropped"] in (["1", "2"], ["2", "1"])
    assert isinstance(small[1], Dropped) and isinstance(small[2], Dropped)
    got = small(x[0]).detach()
    assert torch.equal(got, _head_only(net, x[0]))  # exactly the identity: no arithmetic left


def test_depth_then_width_exports_and_matches_in_ort(tmp_path: Path) -> None:
    """bench_pipeline's pruning: every outermost block dropped, then channels narrowed; the
    result exports to ONNX with fewer nodes and ORT matches PyTorch."""
    torch.manual_seed(0)
    model = create_model("resnet18_cifar", width_mult=0.25).eval()
    x = (torch.randn(1, 3, 32, 32),)
    deep = drop_blocks(model, Drop(names=outermost_blocks(model, x)), example_inputs=x)
    small = prune_channels(deep, Channel(ratio=0.5, round_to=8), example_inputs=x).eval()
    assert sum(p.numel() for p in small.parameters()) < 0.15 * sum(
        p.numel() for p in model.parameters()
    )
    paths = {}
    for label, m in (("dense", model), ("small", small)):
        paths[label] = tmp_path / f"{label}.onnx"
        export_onnx(m, paths[label], example_inputs=x)
    import onnx

    nodes = {k: len(onnx.load(str(p)).graph.node) for k, p in paths.items()}
    assert nodes["small"] < 0.6 * nodes["dense"], nodes  # measured: 23 of 48 nodes
    ref = small(*x).detach().numpy()
    out = run_session(ort_session(paths["small"]), list(x))[0]
    assert abs(out - ref).max() < 1e-4 * max(1.0, abs(ref).max())  # measured ~1e-6
