"""Learned block skipping: residual blocks are found, a closed gate is an identity, the compute
penalty closes gates, and the ONNX Runtime runner matches PyTorch sample by sample."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from slimkit.dynamic import SkipGates, export_skip_gates, find_blocks, skip_gates
from slimkit.errors import ConfigError
from slimkit.testing.zoo import randomise_bn
from slimkit.zoo.models import create_model


def _data(n: int = 3, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(16, 3, 16, 16, generator=g), torch.randint(0, 10, (16,), generator=g))
            for _ in range(n)]  # fmt: skip


def _resnet() -> torch.nn.Module:
    return randomise_bn(create_model("resnet18_cifar", width_mult=0.125, num_classes=10)).eval()


def test_residual_blocks_are_found() -> None:
    assert find_blocks(_resnet()) == ["layer1.0", "layer1.1", "layer2.1", "layer3.1", "layer4.1"]
    assert find_blocks(create_model("inverted_residual")) == ["features.1"]
    assert find_blocks(create_model("cnn_bn")) == []
    with pytest.raises(ConfigError, match="no residual block to gate.*Fix:"):
        skip_gates(create_model("cnn_bn"), data=_data(1))


def test_open_gates_are_the_model_and_closed_ones_skip() -> None:
    model = _resnet()
    sg = skip_gates(model, SkipGates(epochs=0), data=_data(1))
    x = _data(1, seed=4)[0][0]
    with torch.no_grad():
        torch.testing.assert_close(sg(x), model(x), atol=0, rtol=0)  # gates start open
        r = sg.evaluate(_data(2))
        assert r["run_fractions"] == [1.0] * 5 and r["macs_saved"] < 0  # the gates cost a little
        for b in sg.blocks():
            b.gate[2].bias.fill_(-10.0)  # closed: each block is its input
        block = sg.model.layer1[0]
        h = torch.randn(2, 8, 16, 16)
        torch.testing.assert_close(block(h), h, atol=0, rtol=0)
        r = sg.evaluate(_data(2))
        assert r["run_fractions"] == [0.0] * 5
        assert r["macs_saved"] == pytest.approx(sum(sg.block_macs) / sg.full_macs, rel=1e-3)


def test_the_compute_penalty_closes_gates() -> None:
    model = _resnet()
    data = _data(4)
    cfg = SkipGates(epochs=3, lr=3e-2, penalty=50.0)
    r = skip_gates(model, cfg, data=data, progress=False).evaluate(data)
    assert r["macs_saved"] > 0.2, r
    free = skip_gates(model, cfg.replace(penalty=0.0), data=data, progress=False).evaluate(data)
    assert free["macs_saved"] < r["macs_saved"], (free, r)


def test_ort_runner_matches_pytorch_sample_by_sample(tmp_path: Path) -> None:
    sg = skip_gates(_resnet(), SkipGates(epochs=0), data=_data(1))
    with torch.no_grad():
        for b in sg.blocks():  # gates that differ between samples
            b.gate[2].bias.zero_()
            b.gate[2].weight.normal_()
    x = _data(1, seed=9)[0][0]
    with torch.no_grad():
        want = sg(x)
    want_runs = torch.stack([b.last_run for b in sg.blocks()], 1).numpy()  # type: ignore[misc]
    assert 0 < want_runs.mean() < 1
    runner = export_skip_gates(sg, tmp_path / "sg", example_inputs=x[:1])
    got, runs = runner(x.numpy())
    np.testing.assert_array_equal(runs, want_runs)
    np.testing.assert_allclose(got, want.numpy(), atol=1e-4, rtol=0)
    for i in range(3):
        lg, r = runner(x[i : i + 1])
        np.testing.assert_array_equal(r[0], want_runs[i])
        np.testing.assert_allclose(lg[0], want[i].numpy(), atol=1e-4, rtol=0)
