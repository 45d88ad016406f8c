"""``slimkit run RECIPE --out DIR``: apply a recipe's steps, export, measure, write the artifact."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from slimkit.cli._ui import console, emit_json, err_console, friendly_errors, stages, table


@friendly_errors
def run_cmd(
    recipe: Path = typer.Argument(..., help="a recipe.yaml (every slimkit artifact holds one)"),
    out: Path = typer.Option(..., "--out", "-o", help="artifact directory to write"),
    model: str | None = typer.Option(None, help="run on this model instead of the recipe's"),
    data: str | None = typer.Option(None, help="use this data instead of the recipe's"),
    measure: bool = typer.Option(
        True, "--measure/--no-measure", help="compare with the source model in ONNX Runtime"
    ),
    runs: int = typer.Option(30, min=1, help="timed runs per latency round"),
    json_out: bool = typer.Option(False, "--json", help="print JSON instead of a table"),
) -> None:
    """Run a recipe: its model and data references, its steps in order, its export settings.

    OUT receives model.safetensors (and pruning.json), model.onnx, metrics.json and recipe.yaml:
    the recipe as run, with every timed or searched choice pinned, so running it again repeats
    the artifact.
    """
    from slimkit.core.machine import configure_threads
    from slimkit.pipeline.artifact import write_metrics
    from slimkit.pipeline.recipe import Recipe
    from slimkit.pipeline.runner import run

    configure_threads(2)
    rec = Recipe.load(recipe)  # validated before any model is built
    with stages(not json_out) as stage:
        res = run(rec, model=model, data=data, out=out, progress=not json_out, on_event=stage)
    info = res.to_dict()
    if measure and res.onnx is not None:
        from slimkit.pipeline.measure import compare

        with err_console.status("measuring source vs result in ONNX Runtime"):
            cmp = compare(res, labels=("source", "result"), runs=runs,
                          profile=res.quant_method is None)  # fmt: skip
        info["measured"] = cmp.to_dict()
        write_metrics(out, info)
    if json_out:
        emit_json(info)
        return
    rows: list[list[Any]] = [
        [f"{i + 1}. {s.name}", s.via, s.seconds] for i, s in enumerate(res.steps)
    ]
    console.print(table(f"{res.source.name}: {recipe}", ["step", "called", "seconds"], rows))
    if "measured" in info:
        console.print(_measured_table(info["measured"]))
    for note in res.notes:
        console.print(f"[dim]note: {note}[/]")
    console.print(f"[dim]artifact in {out}/ (its recipe.yaml repeats this run)[/]")


def _measured_table(m: dict[str, Any]) -> Any:
    rows: list[list[Any]] = []
    if m["params"]:
        rows += [["parameters", *m["params"].values()], ["MACs", *m["macs"].values()]]
    rows.append(["ONNX size (MB)", *m["size_mb"].values()])
    if m["latency_ms"]:
        a, b = (v["median_ms"] for v in m["latency_ms"].values())
        rows += [["ORT latency, batch 1 (ms)", a, b], ["speed-up", 1.0, a / b]]
    if m["sqnr_db"] is not None:
        rows.append(["SQNR vs source (dB)", "-", m["sqnr_db"]])
    if m["task"]:
        before, after = m["task"].values()
        for k in ("top1", "perplexity"):
            if k in before:
                rows.append([f"test {k}", before[k], after[k]])
    return table("source vs result", ["", "source", "result"], rows)
