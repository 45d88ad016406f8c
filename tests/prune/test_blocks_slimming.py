"""Block / layer dropping and Network Slimming's sparsity training."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from slimkit.errors import ConfigError
from slimkit.export.onnx import export_onnx
from slimkit.prune import (
    Channel,
    Drop,
    drop_blocks,
    load_pruned,
    prune_channels,
    pruning_record,
    save_pruned,
    slimming_train,
)
from slimkit.prune.blocks import Dropped, droppable_blocks
from slimkit.prune.depgraph import build_depgraph
from slimkit.prune.slimming import norm_scales
from slimkit.zoo import load_task
from slimkit.zoo.models import create_model, example_inputs


def _resnet() -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    torch.manual_seed(0)
    return create_model("resnet18_cifar", width_mult=0.25).eval(), (torch.randn(2, 3, 32, 32),)


def test_only_shape_keeping_blocks_are_candidates() -> None:
    model, x = _resnet()
    cands = droppable_blocks(model, x)
    # ResNet-18: 8 basic blocks, the 3 with a downsampling shortcut change the shape
    assert cands == ["layer1.0", "layer1.1", "layer2.1", "layer3.1", "layer4.1"]


def test_dropping_blocks_removes_params_exports_and_reloads(tmp_path: Path) -> None:
    model, x = _resnet()
    small = drop_blocks(model, Drop(blocks=2), example_inputs=x, data=[torch.randn(8, 3, 32, 32)])
    dropped = pruning_record(small)["dropped"]  # type: ignore[index]
    assert len(dropped) == 2
    assert all(isinstance(small.get_submodule(n), Dropped) for n in dropped)
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in model.parameters())
    # channel pruning composes with dropping, and both replay on reload
    smaller = prune_channels(small, Channel(ratio=0.25), example_inputs=x)
    save_pruned(smaller, tmp_path / "a")
    back = load_pruned(tmp_path / "a", model=create_model("resnet18_cifar", width_mult=0.25))
    with torch.no_grad():
        torch.testing.assert_close(back.eval()(*x), smaller(*x), atol=1e-5, rtol=0)
    rep = export_onnx(smaller, tmp_path / "m.onnx", example_inputs=x)
    assert rep.max_abs_err is not None and rep.max_abs_err < 1e-4


def test_greedy_choice_drops_the_block_that_matters_least() -> None:
    model, x = _resnet()
    with torch.no_grad():  # make layer3.1's residual branch nearly zero: dropping it is free
        model.get_submodule("layer3.1").bn2.weight.mul_(1e-4)
        model.get_submodule("layer3.1").bn2.bias.mul_(1e-4)
    small = drop_blocks(model, Drop(blocks=1), example_inputs=x, data=[torch.randn(8, 3, 32, 32)])
    assert pruning_record(small)["dropped"] == ["layer3.1"]  # type: ignore[index]


def test_transformer_layers_can_be_dropped() -> None:
    torch.manual_seed(0)
    kw = dict(vocab_size=64, seq_len=16, n_layer=3, d_model=32, d_ff=64)
    model = create_model("bert_encoder", **kw).eval()
    x = example_inputs("bert_encoder", 2, **kw)
    small = drop_blocks(model, Drop(blocks=1), example_inputs=x)
    assert len(pruning_record(small)["dropped"]) == 1  # type: ignore[index]
    with torch.no_grad():
        assert small(*x).shape == model(*x).shape


def test_drop_errors_name_the_fix() -> None:
    model, x = _resnet()
    with pytest.raises(ConfigError, match="only 5 can be dropped"):
        drop_blocks(model, Drop(blocks=9), example_inputs=x)
    with pytest.raises(ConfigError, match="layer2.0"):
        drop_blocks(model, Drop(names=["layer2.0"]), example_inputs=x)


@pytest.mark.slow
def test_slimming_training_drives_norm_scales_down() -> None:
    task = load_task("digits")
    x = task.test.tensors[0][:1]
    scales = {}
    for strength in (0.0, 1e-2):
        torch.manual_seed(0)
        model = create_model("digits_cnn")
        slimming_train(model, task.loader("train", 64, shuffle=True), strength=strength, epochs=4,
                       lr=1e-2, progress=False)  # fmt: skip
        scales[strength] = float(sum(w.detach().abs().sum() for w in norm_scales(model)))
        assert build_depgraph(model, (x,)).prunable()
    assert scales[1e-2] < 0.8 * scales[0.0], scales
    with pytest.raises(ConfigError, match="no BatchNorm"):
        slimming_train(nn.Sequential(nn.Linear(2, 2)), [], strength=1e-4)
