"""Every command that writes an artifact also writes its recipe, and `slimkit run` on that recipe
gives the same artifact: the same weights bit for bit, the same ONNX outputs on the same input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from typer.testing import CliRunner

from slimkit.cli import app
from slimkit.core.io import load_weights
from slimkit.export.ort import ort_session, run_session

runner = CliRunner()


def _ok(args: list[str]) -> dict:
    res = runner.invoke(app, [*args, "--json"])
    assert res.exit_code == 0, res.output
    return json.loads(res.stdout)


def _rerun(recipe: Path, out: Path) -> dict:
    return _ok(["run", str(recipe), "--out", str(out), "--no-measure"])


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = load_weights(a), load_weights(b)
    assert wa.keys() == wb.keys() and wa
    for k in wa:
        assert wa[k].dtype == wb[k].dtype and torch.equal(wa[k], wb[k]), k


def assert_same_onnx_outputs(a: Path, b: Path, x: torch.Tensor) -> None:
    (ya,), (yb,) = run_session(ort_session(a), [x]), run_session(ort_session(b), [x])
    np.testing.assert_array_equal(ya, yb)


def _digits(n: int = 16) -> torch.Tensor:
    from slimkit.zoo import load_task

    return load_task("digits").test.tensors[0][:n]


@pytest.mark.slow
def test_quantize_recipe_repeats_the_artifact(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    first = _ok(["quantize", "zoo:digits_cnn", "--out", str(a), "--max-drop", "0.01",
                 "--num-batches", "8", "--runs", "2"])  # fmt: skip
    recipe = yaml.safe_load((a / "recipe.yaml").read_text())
    step = recipe["steps"][0]
    # the timed float prefix and the searched float layers are written as their results
    assert isinstance(step["quant.ptq"]["float_prefix"], list) and "max_drop" not in step
    assert recipe["data"] == "zoo:digits:calibration" and recipe["version"] == 1
    again = _rerun(a / "recipe.yaml", b)
    assert_same_weights(a / "model.safetensors", b / "model.safetensors")
    assert_same_onnx_outputs(a / "model.onnx", b / "model.onnx", _digits())
    assert again["kernels"]["integer"] == first["kernels"]["integer"]
    assert (b / "recipe.yaml").read_text() == (a / "recipe.yaml").read_text()


@pytest.mark.slow
def test_prune_recipe_with_fine_tuning_repeats_the_artifact(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    _ok(["prune", "zoo:digits_cnn", "--out", str(a), "--target-macs", "0.5", "--round-to", "8",
         "--finetune-epochs", "1", "--runs", "2"])  # fmt: skip
    names = [next(iter(s)) for s in yaml.safe_load((a / "recipe.yaml").read_text())["steps"]]
    assert names == ["prune.auto", "finetune"]
    _rerun(a / "recipe.yaml", b)
    assert_same_weights(a / "model.safetensors", b / "model.safetensors")
    assert json.loads((a / "pruning.json").read_text()) == json.loads(
        (b / "pruning.json").read_text()
    )
    assert_same_onnx_outputs(a / "model.onnx", b / "model.onnx", _digits())


def test_prune_by_ratio_recipe_repeats_the_artifact(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    _ok(["prune", "zoo:residual", "--out", str(a), "--ratio", "0.5", "--exclude", "fc",
         "--runs", "2"])  # fmt: skip
    step = yaml.safe_load((a / "recipe.yaml").read_text())["steps"][0]["prune.channel"]
    assert step["ratio"] == 0.5 and step["exclude"] == ["fc"]
    _rerun(a / "recipe.yaml", b)
    assert_same_weights(a / "model.safetensors", b / "model.safetensors")
    from slimkit.zoo import example_inputs

    (x,) = example_inputs("residual", batch=3, seed=7)
    assert_same_onnx_outputs(a / "model.onnx", b / "model.onnx", x)


def test_export_recipe_repeats_the_onnx_file(tmp_path: Path) -> None:
    onnx = tmp_path / "mlp.onnx"
    rep = _ok(["export", "zoo:mlp", "--out", str(onnx), "--batch", "2", "--opset", "18"])
    recipe_file = tmp_path / "mlp.recipe.yaml"
    assert rep["recipe"] == str(recipe_file)
    recipe = yaml.safe_load(recipe_file.read_text())
    assert recipe["steps"] == [] and recipe["export"]["opset"] == 18
    assert recipe["export"]["batch"] == 2
    out = _rerun(recipe_file, tmp_path / "b")
    assert out["onnx"]["opset"] == 18
    x = torch.randn(5, 64)
    assert_same_onnx_outputs(onnx, tmp_path / "b" / "model.onnx", x)
