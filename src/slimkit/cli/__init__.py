"""The ``slimkit`` command line: one command per verb, rich tables, ``--json`` where a table prints.

slimkit list              every method, zoo model and task
slimkit zoo list|train    the model zoo and its trained weights
slimkit export MODEL      ONNX with a dynamic batch, checked in ONNX Runtime
slimkit deploy MODEL      every runtime (ORT, OpenVINO, TVM, MNN, ...): parity, tuned, fastest kept
slimkit bench MODEL       latency, PyTorch eager vs ONNX Runtime
slimkit demo              train, evaluate, export, check and time a model end to end
slimkit analyze MODEL     roofline, measured layer times, predicted speed-ups, sensitivity
slimkit hw measure|list   hardware profiles
slimkit quantize|prune    compress a model; the artifact's recipe.yaml repeats it
slimkit distill TEACHER   a smaller student trained by distillation
slimkit run RECIPE        apply a recipe's steps, export, measure, write the artifact
slimkit compress MODEL    meet size / latency / quality goals: plan, search, measure in ORT
slimkit report DIR        the artifact's self-contained report.html
slimkit nas               search an architecture for a latency target (supernet, ORT latency table)
"""

from __future__ import annotations

import typer

from slimkit.cli import analyze, bench, demo, export, hw, info, prune, quantize, report, run

app = typer.Typer(
    name="slimkit",
    help="Make trained PyTorch models smaller and faster, with a measured loss of accuracy.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.command("list")(info.list_cmd)
app.add_typer(info.zoo_app, name="zoo")
app.command("export")(export.export_cmd)
app.command("deploy")(__import__("slimkit.cli.deploy", fromlist=["_"]).deploy_cmd)
app.command("bench")(bench.bench_cmd)
app.command("demo")(demo.demo_cmd)
app.command("quantize")(quantize.quantize_cmd)
app.command("prune")(prune.prune_cmd)
app.command("distill")(__import__("slimkit.cli.distill", fromlist=["_"]).distill_cmd)
app.command("decompose")(__import__("slimkit.cli.decompose", fromlist=["_"]).decompose_cmd)
app.command("run")(run.run_cmd)
app.command("compress")(__import__("slimkit.cli.compress", fromlist=["_"]).compress_cmd)
app.command("report")(report.report_cmd)
app.command("analyze")(analyze.analyze_cmd)
app.command("nas")(__import__("slimkit.cli.nas", fromlist=["_"]).nas_cmd)
app.command("dynamic")(__import__("slimkit.cli.dynamic", fromlist=["_"]).dynamic_cmd)
app.add_typer(hw.hw_app, name="hw")


def main() -> None:
    app()
