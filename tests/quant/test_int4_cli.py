"""`slimkit quantize --method int4-*` and the `quant.int4` recipe step write a MatMulNBits
artifact that repeats itself."""

from __future__ import annotations

import json
from pathlib import Path

import onnx
import yaml
from typer.testing import CliRunner

from slimkit.cli import app
from slimkit.pipeline.runner import run

runner = CliRunner()


def _ops(path: Path) -> set[str]:
    return {n.op_type for n in onnx.load(str(path)).graph.node}


def test_quantize_cli_int4_gptq_writes_a_matmulnbits_artifact(tmp_path: Path) -> None:
    out = tmp_path / "q"
    res = runner.invoke(app, ["quantize", "zoo:gpt_tiny", "--method", "int4-gptq", "--group-size",
                              "32", "--out", str(out), "--runs", "3", "--num-batches", "4",
                              "--json"])  # fmt: skip
    assert res.exit_code == 0, res.output
    r = json.loads(res.stdout)
    assert r["method"] == "quant.int4" and r["config"]["method"] == "gptq"
    assert r["config"]["group_size"] == 32 and r["config"]["accuracy_level"] == 4
    assert r["metrics"]["sqnr_db"] > 15.0  # random weights, g32; measured 20.7 dB
    assert r["size_mb"]["int4"] < r["size_mb"]["fp32"] / 3  # tiny model: measured 4.1x
    assert "MatMulNBits" in _ops(out / "model.onnx")
    step = yaml.safe_load((out / "recipe.yaml").read_text())["steps"][0]
    assert step["quant.int4"]["method"] == "gptq" and step["quant.int4"]["group_size"] == 32


def test_quantize_cli_int8_table(tmp_path: Path) -> None:
    res = runner.invoke(app, ["quantize", "zoo:gpt_tiny", "--method", "int8-rtn", "--out",
                              str(tmp_path / "q"), "--runs", "3"])  # fmt: skip
    assert res.exit_code == 0, res.output
    assert "weight-only int8 rtn, group 128" in res.stdout and "speed-up" in res.stdout


def test_recipe_step_int4_awq(tmp_path: Path) -> None:
    step = {"quant.int4": {"method": "awq", "group_size": 32, "num_batches": 2}}
    recipe = {"model": "zoo:gpt_tiny", "steps": [step]}
    res = run(recipe, out=tmp_path / "r")
    assert res.steps[0].name == "quant.int4"
    assert "MatMulNBits" in _ops(tmp_path / "r" / "model.onnx")
    assert res.onnx is not None and res.onnx.dynamic_batch
