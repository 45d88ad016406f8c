"""``slimkit analyze`` and ``slimkit hw``, as a user runs them (typer's runner, in process)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from slimkit.analyze.hardware import list_presets
from slimkit.cli import app

runner = CliRunner()
HW = ["--hw", "ryzen7_5800u"]  # a preset: no measurement of this machine in unit tests


@pytest.mark.parametrize("cmd", [["analyze"], ["hw"], ["hw", "list"], ["hw", "measure"]])
def test_help(cmd: list[str]) -> None:
    res = runner.invoke(app, [*cmd, "--help"])
    assert res.exit_code == 0 and "Usage" in res.output


def test_analyze_prints_tables() -> None:
    res = runner.invoke(app, ["analyze", "zoo:cnn_bn", *HW, "--top", "3", "--measure"])
    assert res.exit_code == 0, res.output
    out = res.stdout
    # with a preset, times of this machine are only taken when asked for (--measure)
    plain = runner.invoke(app, ["analyze", "zoo:cnn_bn", *HW, "--top", "3"])
    assert plain.exit_code == 0 and "measured on" not in plain.stdout
    assert "slowest 3 layers (measured on onnxruntime)" in out
    assert "features." in out and "overhead-dominated, leave it" in out
    assert "predicted speed-ups" in out and "prune 50% channels" in out and "int8" in out
    assert "totals" in out and "sensitivity" not in out


def test_analyze_json_and_sensitivity_files(tmp_path: Path) -> None:
    res = runner.invoke(app, ["analyze", "zoo:cnn_bn", *HW, "--no-measure", "--batch", "2",
                              "--sensitivity", "--changes", "int8,int4", "--out", str(tmp_path),
                              "--json"])  # fmt: skip
    assert res.exit_code == 0, res.output
    rep = json.loads(res.stdout)
    assert rep["batch"] == 2 and rep["hardware"]["name"] == "ryzen7_5800u"
    assert rep["measured"] is None and rep["totals"]["macs"] > 0
    assert {r["change"] for r in rep["sensitivity"]["rows"]} == {"int8", "int4"}
    assert all(r["verdict"] for r in rep["layers"])
    for name in ("analysis.json", "roofline.png", "sensitivity.json", "sensitivity.png"):
        assert (tmp_path / name).is_file()


def test_unknown_preset_names_the_valid_ones() -> None:
    res = runner.invoke(app, ["analyze", "zoo:cnn_bn", "--hw", "ryzen7", "--no-measure"])
    assert res.exit_code == 2
    assert "unknown hardware profile 'ryzen7'" in res.output
    assert all(p in res.output for p in list_presets())


def test_hw_list() -> None:
    res = runner.invoke(app, ["hw", "list", "--json"])
    assert res.exit_code == 0, res.output
    presets = json.loads(res.stdout)["presets"]
    assert len(presets) >= 4 and all("http" in p["source"] for p in presets)
    table = runner.invoke(app, ["hw", "list"])
    assert table.exit_code == 0 and "raspberry_pi_4" in table.stdout


def test_hw_measure_quick_writes_a_profile(tmp_path: Path) -> None:
    out = tmp_path / "me.yaml"
    res = runner.invoke(app, ["hw", "measure", "--quick", "--out", str(out), "--json"])
    assert res.exit_code == 0, res.output
    prof = json.loads(res.stdout)
    assert prof["kind"] == "measured" and prof["peak_fp32_gflops"] > 0
    assert prof["details"]["op_overhead_us"] > 0 and "flags" in prof
    assert yaml.safe_load(out.read_text())["details"]["op_overhead_us"] > 0
