"""``slimkit.load`` reloads pruned and plain artifacts and explains quantized ones."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import slimkit as sk
from slimkit.core.io import save_weights
from slimkit.errors import CheckpointError
from slimkit.prune import Channel, prune_channels, save_pruned
from slimkit.zoo.models import create_model, example_inputs


def test_load_reloads_a_pruned_artifact_and_plain_weights(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = create_model("residual").eval()
    (x,) = example_inputs("residual", 2)
    small = prune_channels(model, Channel(ratio=0.5), example_inputs=(x,))
    save_pruned(small, tmp_path / "p")
    back = sk.load(tmp_path / "p", model=create_model("residual"))
    with torch.no_grad():
        torch.testing.assert_close(back.eval()(x), small(x), atol=1e-6, rtol=0)
    save_weights(model.state_dict(), tmp_path / "w" / "model.safetensors")
    same = sk.load(tmp_path / "w", model=create_model("residual"))
    with torch.no_grad():
        torch.testing.assert_close(same.eval()(x), model(x), atol=0, rtol=0)
    same = sk.load(tmp_path / "w" / "model.safetensors", model=create_model("residual"))
    assert torch.equal(same.state_dict()["fc.weight"], model.state_dict()["fc.weight"])


def test_load_errors_name_the_problem(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="neither an artifact"):
        sk.load(tmp_path / "missing", model=create_model("residual"))
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        sk.load(tmp_path, model=create_model("residual"))
    save_weights(
        {"w": torch.zeros(2)}, tmp_path / "model.safetensors", metadata={"method": "quant.ptq"}
    )
    with pytest.raises(CheckpointError, match="quantized artifact"):
        sk.load(tmp_path, model=create_model("residual"))
