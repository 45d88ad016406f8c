"""The CLI as a user runs it (typer's runner, in process): tables, --json, and clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from slimkit.cli import app
from slimkit.export.ort import ort_session, run_session
from slimkit.zoo import create_model

runner = CliRunner()


def _json(args: list[str]) -> dict:
    res = runner.invoke(app, [*args, "--json"])
    assert res.exit_code == 0, res.output
    return json.loads(res.stdout)


@pytest.mark.parametrize("cmd", [[], ["list"], ["zoo"], ["zoo", "list"], ["zoo", "train"],
                                 ["export"], ["bench"], ["demo"]])  # fmt: skip
def test_help_on_every_command(cmd: list[str]) -> None:
    res = runner.invoke(app, [*cmd, "--help"])
    assert res.exit_code == 0 and "Usage" in res.output


def test_list_and_zoo_list() -> None:
    rows = _json(["list"])
    names = {m["name"] for m in rows["models"]}
    assert {"resnet18", "mobilenetv2", "bert_encoder", "mlp", "gpt"} <= names
    assert {t["name"] for t in rows["tasks"]} == {"digits", "shapes", "pycode_lm", "pycode_cls"}
    assert "digits_cnn" in {p["name"] for p in rows["pretrained"]}
    assert [m["name"] for m in _json(["zoo", "list", "resnet*"])["models"]] == [
        "resnet18",
        "resnet18_cifar",
    ]
    res = runner.invoke(app, ["list"])
    assert res.exit_code == 0 and "bundled tasks" in res.stdout


def test_export_then_bench_the_onnx_file(tmp_path: Path) -> None:
    out = tmp_path / "mlp.onnx"
    rep = _json(["export", "zoo:mlp", "--out", str(out), "--batch", "2"])
    assert rep["max_abs_err"] < 1e-5 and out.is_file()
    x = torch.randn(5, 64)
    (y,) = run_session(ort_session(out), [x])
    np.testing.assert_allclose(y, create_model("mlp")(x).detach().numpy(), atol=1e-5)
    bench = _json(["bench", str(out), "--runs", "3", "--rounds", "2", "--warmup", "1"])
    assert set(bench["latency"]) == {"onnxruntime"}
    assert bench["latency"]["onnxruntime"]["median_ms"] > 0 and "flags" in bench["machine"]


def test_bench_eager_vs_ort_table() -> None:
    res = runner.invoke(
        app, ["bench", "zoo:cnn_bn", "--runs", "3", "--rounds", "2", "--batch", "4"]
    )
    assert res.exit_code == 0, res.output
    assert "pytorch eager" in res.stdout and "onnxruntime" in res.stdout and "batch 4" in res.stdout


def test_factory_reference_with_weights_and_input_shape(tmp_path: Path) -> None:
    from slimkit.core.io import save_weights

    w = tmp_path / "w.safetensors"
    save_weights(torch.nn.Linear(3, 2), w)
    rep = _json(["export", "torch.nn:Identity", "--out", str(tmp_path / "i.onnx"),
                 "--input-shape", "1,3"])  # fmt: skip
    assert rep["max_abs_err"] == 0.0
    res = runner.invoke(app, ["export", "torch.nn:Identity", "--out", str(tmp_path / "j.onnx")])
    assert res.exit_code == 2 and "--input-shape" in res.output


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["export", "zoo:resnt18", "--out", "x.onnx"], "did you mean 'resnet18'"),
        (["export", "nosuchpkg.mod:make", "--out", "x.onnx"], "could not import module"),
        (["export", "missing.pt2", "--out", "x.onnx"], "does not exist"),
        (["bench", "zoo:mlp", "--input-shape", "1,a"], "positive integers"),
        (["zoo", "train", "digits_cnnn"], "did you mean 'digits_cnn'"),
    ],
)
def test_bad_input_gives_a_clear_error(args: list[str], expected: str) -> None:
    res = runner.invoke(app, args)
    assert res.exit_code == 2, res.output
    assert "error:" in res.output and expected in res.output and "fix:" in res.output
    assert "Traceback" not in res.output


@pytest.mark.slow
def test_demo_end_to_end(tmp_path: Path) -> None:
    """The whole story on the trained digits CNN, 3 search trials: the table, the artifact, the
    report with its search section."""
    out = tmp_path / "demo"
    res = runner.invoke(app, ["demo", "--out", str(out), "--quick"])
    assert res.exit_code == 0, res.output
    text = "".join(res.output.split())  # rich wraps long cells and paths
    for row in ("test top1 (held out)", "ONNX size (kB)", "latency ms, batch 1",
                "latency ms, batch 64", f"report: {out / 'report.html'}"):  # fmt: skip
        assert "".join(row.split()) in text, row
    r = json.loads((out / "metrics.json").read_text())["demo"]  # the table's numbers
    top1 = r["pytorch"]["top1"]
    assert top1 >= 0.97  # the bar for the digits CNN
    assert abs(r["onnxruntime"]["top1"] - top1) < 1e-9  # deployed fp32 == measured
    assert r["onnx"]["max_abs_err"] < 1e-4
    assert r["compress"]["met"] and r["compress"]["trials"] == 3
    # the goals (25 KB, 1 point on val): held out, the compressed model stays within 2 points
    assert r["size_mb"]["compressed"] <= 0.025 < r["size_mb"]["onnx_fp32"]
    assert r["onnxruntime_compressed"]["top1"] >= top1 - 0.02  # measured: equal (0.994)
    assert r["compressed_kernels"]["integer"] > 0 and r["compressed_steps"]
    assert f"{r['size_mb']['compressed'] * 1e3:.3g}" in text  # the printed table is this one
    for batch in ("1", "64"):
        lat = r["latency_ms"][batch]
        assert set(lat) == {"pytorch eager", "ort fp32", "ort compressed"}
        assert all(v["median_ms"] > 0 for v in lat.values())
    names = {p.name for p in out.iterdir()}
    assert {"model.onnx", "source.onnx", "recipe.yaml", "metrics.json", "search.json",
            "report.html", "layers.json", "sensitivity.json"} <= names  # fmt: skip
    html = (out / "report.html").read_text()
    for section in ("comparison", "search", "roofline", "sensitivity"):
        assert f'<section id="{section}">' in html
    assert 'alt="Pareto front"' in html and 'alt="sensitivity"' in html
    assert f"{r['onnxruntime_compressed']['top1']:.4g}" in html  # the test-split cards
