"""`slimkit prune` removes channels, writes a reloadable artifact and measures both models."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from typer.testing import CliRunner

from slimkit.cli import app
from slimkit.prune import load_pruned
from slimkit.zoo import create_model, example_inputs

runner = CliRunner()


def test_prune_writes_a_reloadable_artifact(tmp_path: Path) -> None:
    out = tmp_path / "p"
    res = runner.invoke(app, ["prune", "zoo:residual", "--out", str(out), "--ratio", "0.5",
                              "--runs", "3", "--json"])  # fmt: skip
    assert res.exit_code == 0, res.output
    r = json.loads(res.stdout)
    assert r["params"]["pruned"] < 0.5 * r["params"]["dense"]
    assert r["macs"]["pruned"] < 0.5 * r["macs"]["dense"]
    assert {"model.safetensors", "pruning.json", "model.onnx", "metrics.json"} <= {
        p.name for p in out.iterdir()
    }
    small = load_pruned(out, model=create_model("residual"))
    (x,) = example_inputs("residual", batch=2)
    assert sum(p.numel() for p in small.parameters()) == r["params"]["pruned"]
    assert small(x).shape == (2, 10) and torch.isfinite(small(x)).all()


def test_prune_refuses_bad_options(tmp_path: Path) -> None:
    res = runner.invoke(app, ["prune", "zoo:residual", "--out", str(tmp_path), "--criterion", "l3"])
    assert res.exit_code == 2 and "criterion" in res.output and "fix:" in res.output
