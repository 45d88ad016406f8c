"""``slimkit distill``: a student built from the teacher, distilled, measured, and an artifact
whose recipe repeats the run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

import slimkit as sk
from slimkit.cli import app
from slimkit.zoo import pretrained


@pytest.mark.slow
def test_distill_command_writes_a_student_that_reloads(tmp_path: Path) -> None:
    out = tmp_path / "s"
    args = ["distill", "zoo:digits_cnn", "--macs", "0.5", "--epochs", "1", "--lr", "3e-3",
            "--runs", "3", "--out", str(out), "--json"]  # fmt: skip
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    info = json.loads(res.output[res.output.index("{") :])
    steps = [next(iter(s)) for s in info["steps"]]
    assert steps == ["prune.auto", "distill.response"]
    assert info["steps"][1]["details"]["losses"][0]["kind"] == "softmax"  # digits labels
    recipe = yaml.safe_load((out / "recipe.yaml").read_text())
    assert list(recipe["steps"][1]) == ["distill.response"]
    student = sk.load(out, model=pretrained("digits_cnn"))
    dense = sum(p.numel() for p in pretrained("digits_cnn").parameters())
    assert sum(p.numel() for p in student.parameters()) < dense
    task = info["measured"]["task"]
    assert task["student"]["top1"] > 0.5  # one epoch: far above chance (0.1)


def test_distill_command_names_what_is_missing(tmp_path: Path) -> None:
    res = CliRunner().invoke(app, ["distill", "zoo:mlp", "--out", str(tmp_path / "x")])
    assert res.exit_code == 2 and "needs training data" in res.output and "--data" in res.output
    res = CliRunner().invoke(app, ["distill", "zoo:digits_cnn", "--ratio", "0.5", "--macs", "0.5",
                                   "--out", str(tmp_path / "y")])  # fmt: skip
    assert res.exit_code == 2 and "pass one of them" in res.output
