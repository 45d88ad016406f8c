"""`slimkit compress`: goals typed with units, the plan, the table, and the exit codes."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from slimkit.cli import app

runner = CliRunner()


def test_compress_cli_meets_the_goals(tmp_path: Path) -> None:
    out = tmp_path / "a"
    r = runner.invoke(
        app,
        [
            "compress",
            "zoo:digits_cnn",
            "--max-size",
            "50KB",
            "--max-drop",
            "2%",
            "--trials",
            "3",
            "--time-budget",
            "2m",
            "--no-finetune",
            "--out",
            str(out),
        ],
    )
    assert r.exit_code == 0, r.output
    assert "meets every goal" in r.output and "Pareto set of" in r.output
    doc = json.loads((out / "search.json").read_text())
    assert doc["constraints"]["size_mb"] == 0.05 and doc["constraints"]["max_drop"] == 0.02
    assert (out / "model.onnx").is_file()


def test_compress_cli_exit_code_when_nothing_meets(tmp_path: Path) -> None:
    r = runner.invoke(
        app,
        [
            "compress",
            "zoo:digits_cnn",
            "--max-latency",
            "1us",
            "--trials",
            "2",
            "--time-budget",
            "60s",
            "--out",
            str(tmp_path),
        ],
    )
    assert r.exit_code == 3, r.output
    assert "no trial" in r.output


def test_compress_cli_plan_only_and_bad_input(tmp_path: Path) -> None:
    r = runner.invoke(
        app,
        ["compress", "zoo:digits_cnn", "--max-size", "50KB", "--plan-only", "--out", str(tmp_path)],
    )
    assert r.exit_code == 0, r.output
    assert "quant.ptq" in r.output and (tmp_path / "plan.yaml").is_file()
    r = runner.invoke(
        app, ["compress", "zoo:digits_cnn", "--max-size", "5 apples", "--out", str(tmp_path)]
    )
    assert r.exit_code == 2 and "write it like 5MB" in r.output
    r = runner.invoke(app, ["compress", "zoo:digits_cnn", "--out", str(tmp_path)])
    assert r.exit_code == 2 and "no goal" in r.output
