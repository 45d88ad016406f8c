"""report.html without a browser: written by the run, self-contained, every section present."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

import slimkit as sk
from slimkit.cli import app
from slimkit.errors import CheckpointError
from slimkit.report.collect import compare_rows, step_rows

SECTIONS = ("comparison", "steps", "roofline", "sensitivity", "recipe", "machine", "files")


def _html(folder: Path) -> str:
    return (folder / "report.html").read_text(encoding="utf-8")


def test_the_report_is_self_contained(artifact: Path) -> None:
    html = _html(artifact)
    for section in SECTIONS:
        assert f'<section id="{section}">' in html
    # nothing is fetched: no http(s) source or link, no external script or stylesheet
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", html)
    assert "<script" not in html and "<link" not in html
    images = re.findall(r'<img class="plot" alt="([^"]+)" src="data:image/svg\+xml;base64,', html)
    assert images == ["source against result", "roofline", "sensitivity"]
    # computed once from the recipe's model, kept for the next drawing
    layers = json.loads((artifact / "layers.json").read_text())
    assert set(layers["models"]) == {"source", "result"}
    src, res = (sum(r["macs"] for r in layers["models"][k]["layers"]) for k in ("source", "result"))
    assert 0 < res < 0.5 * src  # half the channels: about a quarter of the MACs
    assert (artifact / "sensitivity.json").is_file()


def test_the_report_shows_the_measured_numbers_and_the_recipe(artifact: Path) -> None:
    html = _html(artifact)
    m = json.loads((artifact / "metrics.json").read_text())["measured"]
    assert f"{m['params']['source']:,}" in html and f"{m['params']['result']:,}" in html
    assert f"{m['size_mb']['result']:.4g}" in html
    assert "x fewer" in html  # the parameter ratio, in words
    recipe = (artifact / "recipe.yaml").read_text()
    assert "prune.channel:" in recipe and "    ratio: 0.5" in recipe
    assert "    ratio: 0.5" in html  # verbatim, indentation kept
    machine = json.loads((artifact / "metrics.json").read_text())["machine"]
    assert machine["cpu"] in html and "VNNI" in html and "torch " in html


def test_search_json_adds_the_pareto_front(searched: Path) -> None:
    html = _html(searched)
    assert '<section id="search">' in html
    assert "trial 4 meets every constraint" in html
    assert re.search(r'alt="Pareto front" src="data:image/svg\+xml;base64,', html)
    rows = re.findall(r"<tr[^>]*><td>#(\d+)( \(chosen\))?</td>", html)
    assert [n for n, _ in rows] == ["4", "0", "2"]  # the front, best metric first
    assert rows[0][1] == " (chosen)"
    assert "10 trials (8 complete, 1 pruned, 1 fail), 6 feasible, 3 on the front" in html


def test_report_html_api_cli_and_errors(artifact: Path, tmp_path: Path) -> None:
    target = tmp_path / "r.html"
    assert sk.report_html(artifact, out=target) == target
    assert '<section id="roofline">' in target.read_text()
    res = CliRunner().invoke(app, ["report", str(artifact), "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout) == {"report": str(artifact / "report.html")}
    with pytest.raises(CheckpointError, match="not an artifact directory"):
        sk.report_html(tmp_path / "missing")
    bad = CliRunner().invoke(app, ["report", str(tmp_path / "missing")])
    assert bad.exit_code != 0 and "not an artifact directory" in bad.output


def test_sk_report_is_still_the_verb_report() -> None:
    import slimkit.report  # binds the package to slimkit.report: it must stay callable

    model, x = sk.zoo.create_model("cnn_bn"), sk.zoo.example_inputs("cnn_bn")
    p = sk.prune(model, "channel", example_inputs=x)
    assert sk.report(p).method == slimkit.report(p).method == "prune.channel"


def test_try_report_writes_layers_and_never_raises(tmp_path: Path) -> None:
    from slimkit.report import try_report

    model, x = sk.zoo.create_model("cnn_bn"), sk.zoo.example_inputs("cnn_bn")
    path = try_report(tmp_path, source=model, result=None, example_inputs=x, sensitivity=False)
    assert path == tmp_path / "report.html" and (tmp_path / "layers.json").is_file()
    assert "metrics.json is missing" in path.read_text()
    with pytest.warns(UserWarning, match="report.html was not written"):
        assert try_report(tmp_path / "missing") is None


def test_an_empty_folder_still_gets_a_page(tmp_path: Path) -> None:
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump({"model": "zoo:mlp", "steps": []}))
    html = _html(tmp_path) if sk.report_html(tmp_path) else ""
    assert "metrics.json is missing" in html and "model: zoo:mlp" in html


def test_every_command_shape_gives_the_same_rows() -> None:
    # slimkit quantize: top1_float / top1_int8_ort, sqnr under metrics
    q = {"size_mb": {"fp32": 0.1, "int8": 0.025}, "latency_ms": {
        "fp32": {"median_ms": 0.02}, "int8": {"median_ms": 0.01}},
        "metrics": {"sqnr_db": 30.0, "top1_float": 0.99, "top1_int8_ort": 0.98}}  # fmt: skip
    cmp = compare_rows(q)
    assert cmp is not None and cmp.labels == ("fp32", "int8")
    rows = {r.what: r for r in cmp.rows}
    assert rows["ONNX size (MB)"].change == "4.00x smaller"
    assert rows["ORT latency, batch 1 (ms)"].change == "2.00x faster"
    assert rows["test top1"].change == "-1.00 points" and rows["test top1"].better is False
    assert rows["SQNR vs fp32 (dB)"].result == 30.0
    # slimkit prune: params / macs / metrics keyed by label at the top
    p = {"params": {"dense": 100, "pruned": 50}, "macs": {"dense": 10, "pruned": 4},
         "latency_ms": {"dense": {"median_ms": 1.0}, "pruned": {"median_ms": 2.0}},
         "metrics": {"dense": {"perplexity": 5.0}, "pruned": {"perplexity": 6.0},
                     "pruned_before_finetuning": {"perplexity": 9.0}},
         "steps": [{"prune.channel": {}, "via": "slimkit.prune", "seconds": 1.5, "details": {
             "changed": {"params": [100, 50], "layers": {"Conv2d": [2, 2]}}}}]}  # fmt: skip
    rows = {r.what: r for r in compare_rows(p).rows}  # type: ignore[union-attr]
    assert rows["MACs"].change == "2.50x fewer"
    assert rows["ORT latency, batch 1 (ms)"].change == "2.00x slower"
    assert rows["test perplexity"].better is False
    (step,) = step_rows(p)
    assert step.params == (100, 50) and step.layers == "" and step.seconds == 1.5
    assert "perplexity 9" in step.facts[0]
    assert compare_rows({"steps": []}) is None
