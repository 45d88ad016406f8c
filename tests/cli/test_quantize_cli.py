"""`slimkit quantize` writes a complete artifact and reports what ORT runs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import yaml
from typer.testing import CliRunner

from slimkit.cli import app

runner = CliRunner()


def test_quantize_random_zoo_model_writes_artifact(tmp_path: Path) -> None:
    out = tmp_path / "q"
    res = runner.invoke(app, ["quantize", "zoo:cnn_bn", "--out", str(out), "--runs", "3",
                              "--num-batches", "8", "--no-speed-check", "--json"])  # fmt: skip
    assert res.exit_code == 0, res.output
    r = json.loads(res.stdout)
    floated = len(r["float_layers"])  # the timed float prefix: none silent
    assert r["kernels"]["integer"] > 0 and r["kernels"]["float_compute"] == floated
    assert r["metrics"]["sqnr_db"] > 30.0  # held-out random inputs; measured ~45 dB
    assert r["size_mb"]["int8"] > 0  # tiny model: QDQ metadata outweighs the 1.6k weights
    assert {p.name for p in out.iterdir()} == {"model.onnx", "model.safetensors", "recipe.yaml",
                                              "metrics.json", "report.html",
                                              "layers.json"}  # fmt: skip
    recipe = yaml.safe_load((out / "recipe.yaml").read_text())
    assert recipe["steps"][0]["quant.ptq"]["calibration"] == "mse"
    # the recipe pins the timed choice, so running it again gives this artifact
    assert recipe["steps"][0]["quant.ptq"]["float_prefix"] == r["float_layers"]


def test_quantize_with_npz_calibration_and_table(tmp_path: Path) -> None:
    npz = tmp_path / "calib.npz"
    np.savez(npz, x=np.random.default_rng(0).standard_normal((16, 64)).astype(np.float32))
    args = ["quantize", "zoo:mlp", "--calib", str(npz), "--out", str(tmp_path / "q"), "--runs", "3"]
    res = runner.invoke(app, [*args, "--method", "percentile"])
    assert res.exit_code == 0, res.output
    assert "int8 PTQ (percentile" in res.stdout and "speed-up" in res.stdout


def test_quantize_bad_method_and_missing_calibration(tmp_path: Path) -> None:
    res = runner.invoke(app, ["quantize", "zoo:mlp", "--out", str(tmp_path), "--method", "kl"])
    assert res.exit_code == 2 and "calibration" in res.output and "fix:" in res.output
    res = runner.invoke(app, ["quantize", "torch.nn:Identity", "--out", str(tmp_path),
                              "--input-shape", "1,4"])  # fmt: skip
    assert res.exit_code == 2 and "--calib" in res.output


def test_quantize_with_max_drop_reports_the_fallback(tmp_path: Path) -> None:
    out = tmp_path / "q"
    res = runner.invoke(app, ["quantize", "zoo:digits_cnn", "--out", str(out), "--max-drop",
                              "0.01", "--runs", "3", "--json"])  # fmt: skip
    assert res.exit_code == 0, res.output
    fb = json.loads(res.stdout)["fallback"]
    assert fb["met"] and fb["float_metric"] - fb["metric"] <= 0.01
    assert fb["steps"][0]["float_layers"] == []
    res = runner.invoke(app, ["quantize", "zoo:residual", "--out", str(out), "--max-drop", "0.01"])
    assert res.exit_code == 2 and "bundled task" in res.output


def test_quantize_all_int8_keeps_no_float_layer(tmp_path: Path) -> None:
    out = tmp_path / "q"
    res = runner.invoke(app, ["quantize", "zoo:mobilenetv2_cifar", "--all-int8", "--out", str(out),
                              "--runs", "2", "--num-batches", "4", "--json"])  # fmt: skip
    assert res.exit_code == 0, res.output
    r = json.loads(res.stdout)
    assert r["float_layers"] == [] and r["kernels"]["float_compute"] == 0
    recipe = yaml.safe_load((out / "recipe.yaml").read_text())
    assert recipe["steps"][0]["quant.ptq"]["float_prefix"] == []


def test_quantize_w4_adaround_with_diagnosis(tmp_path: Path) -> None:
    """--weight-bits 4 --adaround N --diagnose: the AdaRound summary, and the error split into
    weights / activations (4-bit weights dominate), in the JSON and in metrics.json."""
    out = tmp_path / "q"
    res = runner.invoke(app, ["quantize", "zoo:digits_cnn", "--out", str(out), "--runs", "3",
                              "--weight-bits", "4", "--adaround", "10", "--all-int8",
                              "--diagnose", "--json"])  # fmt: skip
    assert res.exit_code == 0, res.output
    r = json.loads(res.stdout)
    assert r["config"]["adaround"] == 10 and "learned rounding" in r["adaround"]
    d = r["diagnosis"]
    assert d["dominant"] == "weights" and d["weights_only_db"] < d["activations_only_db"]
    assert len(d["layers"]) == 4 and all(x["bits"] == 4 for x in d["layers"])
    # the split is measured on the same model: its full SQNR near the ORT one (other inputs)
    assert abs(d["full_db"] - r["metrics"]["sqnr_db"]) < 3.0
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["diagnosis"]["full_db"] == d["full_db"]
    table_run = runner.invoke(app, ["quantize", "zoo:digits_cnn", "--out", str(tmp_path / "t"),
                                    "--runs", "3", "--weight-bits", "4", "--all-int8",
                                    "--diagnose"])  # fmt: skip
    assert table_run.exit_code == 0, table_run.output
    assert "weights only" in table_run.stdout and "worst layers alone" in table_run.stdout
    assert "W4A8 PTQ (mse, 4-bit weights)" in table_run.stdout
