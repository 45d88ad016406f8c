"""Magnitude and N:M masks: sparsity reached, the 2:4 pattern, survival of training, finalize."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

from slimkit.core.scope import Scope
from slimkit.errors import ConfigError
from slimkit.prune import (
    NM,
    Magnitude,
    finalize,
    load_pruned,
    prune_magnitude,
    prune_nm,
    save_pruned,
    sparsity,
)
from slimkit.prune.unstructured import nm_mask
from slimkit.zoo.models import create_model, example_inputs


def test_layer_wise_magnitude_reaches_the_sparsity_in_every_layer() -> None:
    model = create_model("cnn_bn")
    sparse = prune_magnitude(model, Magnitude(sparsity=0.7))
    s = sparsity(sparse)
    for name in ("features.0.0", "features.2.0", "fc"):
        assert s[name] == pytest.approx(0.7, abs=0.01)
    assert sparsity(model)["(global)"] < 0.01  # the original is untouched


def test_global_magnitude_reaches_the_sparsity_overall_not_per_layer() -> None:
    model = create_model("mlp")
    with torch.no_grad():
        model.fc1.weight *= 100  # fc1 is large: global ranking spares it
    s = sparsity(prune_magnitude(model, Magnitude(sparsity=0.4, global_ranking=True)))
    assert s["(global)"] == pytest.approx(0.4, abs=0.01)  # 1357 of 3392 weights
    assert s["fc1"] < 0.05 and s["fc2"] > 0.95 and s["fc3"] > 0.95


def test_two_four_pattern_in_linear_and_conv() -> None:
    model = create_model("residual")
    sparse = prune_nm(model, NM(n=2, m=4), scope=Scope(exclude=["features.0.0"]))  # 3 inputs
    conv = sparse.features[1].conv1  # type: ignore[index]
    w = conv.weight.detach().movedim(1, -1).reshape(-1, 4)  # groups of 4 input channels
    assert torch.all((w != 0).sum(1) <= 2) and (w != 0).sum() > 0
    fc = sparse.fc.weight.detach().reshape(-1, 4)  # type: ignore[union-attr]
    assert torch.all((fc != 0).sum(1) == 2)
    lin = torch.tensor([[1.0, -5.0, 3.0, 0.5, 2.0, 2.5, -0.1, 9.0]])
    assert nm_mask(lin, 2, 4).tolist() == [[0, 1, 1, 0, 0, 1, 0, 1]]


def test_masks_survive_an_optimizer_step_and_finalize_keeps_outputs() -> None:
    model = create_model("mlp")
    (x,) = example_inputs("mlp", 4)
    sparse = prune_nm(model, NM()).train()
    zeros = sparse.fc1.weight.detach() == 0  # type: ignore[union-attr]
    opt = torch.optim.SGD(sparse.parameters(), lr=0.5)
    sparse(x).pow(2).sum().backward()
    opt.step()
    assert torch.all(sparse.fc1.weight.detach()[zeros] == 0)  # type: ignore[union-attr]
    sparse.eval()
    with torch.no_grad():
        before = sparse(x)
    dense = finalize(sparse)
    assert not any(isinstance(m, nn.ModuleDict) for m in dense.fc1.modules())  # type: ignore[union-attr]
    assert isinstance(dense.fc1.weight, nn.Parameter) and torch.all(dense.fc1.weight[zeros] == 0)  # type: ignore[union-attr,index]
    with torch.no_grad():
        torch.testing.assert_close(dense(x), before, atol=0, rtol=0)


def test_masked_model_exports_and_saves(tmp_path: Any) -> None:
    from slimkit.export.onnx import export_onnx

    model = create_model("cnn_bn")
    x = example_inputs("cnn_bn", 2)
    sparse = prune_magnitude(model, Magnitude(sparsity=0.5))
    rep = export_onnx(sparse, tmp_path / "m.onnx", example_inputs=x)
    assert rep.max_abs_err is not None and rep.max_abs_err < 1e-4
    save_pruned(sparse, tmp_path / "art")
    back = load_pruned(tmp_path / "art", model=create_model("cnn_bn", seed=3))
    with torch.no_grad():
        torch.testing.assert_close(back(*x), sparse(*x), atol=1e-6, rtol=0)
    assert sparsity(back)["(global)"] == pytest.approx(sparsity(sparse)["(global)"])


def test_bad_configs_are_config_errors() -> None:
    with pytest.raises(ConfigError):
        NM(n=4, m=4)
    with pytest.raises(ConfigError):
        Magnitude(sparsity=1.5)
    with pytest.raises(ConfigError, match="divisible"):
        prune_nm(create_model("cnn_bn"), NM(n=1, m=7))
