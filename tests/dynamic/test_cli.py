"""`slimkit dynamic` trains, calibrates, exports, measures in ONNX Runtime and writes its files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from typer.testing import CliRunner

import slimkit as sk
from slimkit.cli import app
from slimkit.export.ort import ort_session
from slimkit.zoo.models import create_model

runner = CliRunner()


def test_early_exit_command_writes_the_pieces_and_metrics(tmp_path: Path) -> None:
    out = tmp_path / "ee"
    res = runner.invoke(app, ["dynamic", "zoo:digits_cnn", "--out", str(out), "--epochs", "1",
                              "--max-steps", "2", "--max-drop", "0.02", "--timed-images", "10",
                              "--json"])  # fmt: skip
    assert res.exit_code == 0, res.output
    r = json.loads(res.stdout)
    assert r == json.loads((out / "metrics.json").read_text())
    assert sum(r["exit_fractions"]) > 0.999 and -1 < r["macs_saved"] < 1  # heads can cost more
    assert r["top1"]["float"] > 0.9 and r["top1"]["early-exit"] > r["top1"]["float"] - 0.1
    assert set(r["latency_ms"]) == {"float", "early-exit"}
    assert (out / "early_exit" / "exits.json").is_file() and (out / "float.onnx").is_file()


def test_separable_command_saves_macs(tmp_path: Path) -> None:
    out = tmp_path / "s"
    res = runner.invoke(app, ["dynamic", "zoo:digits_cnn", "--out", str(out), "--method",
                              "separable", "--epochs", "1", "--max-steps", "2", "--timed-images",
                              "10", "--json"])  # fmt: skip
    assert res.exit_code == 0, res.output
    r = json.loads(res.stdout)
    assert r["macs_saved"] > 0.3 and r["layers"]
    assert (out / "model.onnx").is_file()
    # the weights reload on the original architecture and match the exported ONNX
    back = sk.load(out, model=create_model("digits_cnn")).eval()
    x = torch.randn(2, 1, 8, 8)
    got = ort_session(out / "model.onnx").run(None, {"input": x.numpy()})[0]
    np.testing.assert_allclose(got, back(x).detach().numpy(), atol=1e-4)


def test_unknown_method_and_untrained_model_are_named(tmp_path: Path) -> None:
    res = runner.invoke(app, ["dynamic", "zoo:digits_cnn", "--out", str(tmp_path / "x"),
                              "--method", "prune"])  # fmt: skip
    assert res.exit_code != 0 and "early-exit, skip-gate, separable, ghost" in res.output
    res = runner.invoke(app, ["dynamic", "zoo:cnn_bn", "--out", str(tmp_path / "y")])
    assert res.exit_code != 0 and "no bundled task" in res.output
