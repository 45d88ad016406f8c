"""`slimkit run RECIPE`: steps, export, measurements, and errors that name the fix."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from slimkit.cli import app

runner = CliRunner()


def _write(path: Path, recipe: dict) -> Path:
    path.write_text(yaml.safe_dump(recipe))
    return path


def test_run_writes_the_artifact_and_measures_it(tmp_path: Path) -> None:
    recipe = _write(tmp_path / "r.yaml", {"model": "zoo:cnn_bn", "steps": [
        {"prune.channel": {"ratio": 0.5}}, {"graph_opt.fuse": {}}]})  # fmt: skip
    out = tmp_path / "a"
    res = runner.invoke(app, ["run", str(recipe), "--out", str(out), "--runs", "2", "--json"])
    assert res.exit_code == 0, res.output
    r = json.loads(res.stdout)
    assert [s["via"] for s in r["steps"]] == ["slimkit.prune", "slimkit.optimize"]
    m = r["measured"]
    assert m["params"]["result"] < 0.5 * m["params"]["source"]
    assert m["latency_ms"]["result"]["median_ms"] > 0 and m["sqnr_db"] is not None
    assert json.loads((out / "metrics.json").read_text())["measured"] == m
    assert yaml.safe_load((out / "recipe.yaml").read_text())["steps"] == r["recipe"]["steps"]


def test_run_table_and_model_override(tmp_path: Path) -> None:
    recipe = _write(tmp_path / "r.yaml", {"model": "zoo:resnet18", "steps": ["prune.nm"]})
    res = runner.invoke(app, ["run", str(recipe), "--out", str(tmp_path / "a"), "--model",
                              "zoo:mlp", "--runs", "2"])  # fmt: skip
    assert res.exit_code == 0, res.output
    assert "prune.nm" in res.stdout and "source vs result" in res.stdout
    assert yaml.safe_load((tmp_path / "a" / "recipe.yaml").read_text())["model"] == "zoo:mlp"


@pytest.mark.parametrize(
    ("recipe", "expected"),
    [
        ({"model": "zoo:mlp", "steps": ["prune.chanel"]}, "did you mean 'prune.channel'"),
        ({"model": "zoo:mlp", "steps": [{"prune.nm": {"n": 2, "mm": 4}}]}, "did you mean 'm'"),
        ({"model": "zoo:mlpp", "steps": []}, "did you mean 'mlp'"),
        ({"model": "zoo:mlp", "sed": 1}, "did you mean 'seed'"),
    ],
)
def test_bad_recipes_exit_2_with_the_fix(tmp_path: Path, recipe: dict, expected: str) -> None:
    path = _write(tmp_path / "r.yaml", recipe)
    res = runner.invoke(app, ["run", str(path), "--out", str(tmp_path / "a")])
    assert res.exit_code == 2, res.output
    assert expected in res.output and "fix:" in res.output and "Traceback" not in res.output
    assert not (tmp_path / "a").exists()  # nothing half-written


def test_run_help() -> None:
    res = runner.invoke(app, ["run", "--help"])
    assert res.exit_code == 0 and "recipe" in res.output
