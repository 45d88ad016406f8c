"""``slimkit export MODEL --out FILE``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from slimkit.cli._ui import console, emit_json, friendly_errors, status, table


@friendly_errors
def export_cmd(
    model: str = typer.Argument(..., help="zoo:NAME, file.pt2, or package.module:factory"),
    out: Path = typer.Option(..., "--out", "-o", help="the .onnx file to write"),
    weights: Path | None = typer.Option(None, help="safetensors weights for a factory model"),
    input_shape: str | None = typer.Option(None, help="e.g. 1,3,224,224 when slimkit can't know"),
    batch: int = typer.Option(1, min=1, help="batch size to trace with (the batch stays dynamic)"),
    opset: int = typer.Option(17, help="ONNX opset"),
    exporter: str = typer.Option("torchscript", help="torchscript | dynamo"),
    atol: float = typer.Option(1e-4, help="max abs error allowed between ORT and PyTorch"),
    json_out: bool = typer.Option(False, "--json", help="print JSON instead of a table"),
) -> None:
    """Export to ONNX with a dynamic batch and check it against PyTorch in ONNX Runtime.

    Beside FILE it writes FILE's stem + .recipe.yaml: `slimkit run` on it exports the same model.
    """
    from slimkit.pipeline.artifact import export_model
    from slimkit.pipeline.recipe import Export, Recipe
    from slimkit.pipeline.refs import parse_shape, resolve_model
    from slimkit.pipeline.runner import run

    shape = parse_shape(input_shape) if input_shape else None
    settings = Export(opset=opset, batch=batch, exporter=exporter, atol=atol)  # type: ignore[arg-type]
    rm = resolve_model(model, weights=weights, input_shape=shape, progress=not json_out)
    recipe = Recipe.for_model(model, weights=weights, input_shape=shape, export=settings)
    res = run(recipe, model=rm)
    with status(f"exporting {rm.name} and checking it in ONNX Runtime", not json_out):
        rep, _ = export_model(res.model, out, source=rm, settings=settings)
    res.recipe.save(recipe_path(out))
    if json_out:
        emit_json({"model": model, **rep.to_dict(), "recipe": str(recipe_path(out))})
        return
    rows: list[list[Any]] = [
        ["file", rep.path],
        ["size (MB)", rep.size_bytes / 1e6],
        ["opset", rep.opset],
        ["inputs", ", ".join(rep.input_names)],
        ["dynamic batch", rep.dynamic_batch],
        [f"max abs err vs PyTorch (batch {rep.parity_batch})", rep.max_abs_err],
        ["recipe (slimkit run repeats it)", str(recipe_path(out))],
    ]
    console.print(table(f"exported {rm.name}", ["", "value"], rows))


def recipe_path(onnx_file: Path) -> Path:
    """Where ``slimkit export`` writes its recipe: ``model.onnx`` -> ``model.recipe.yaml``."""
    return onnx_file.with_name(onnx_file.stem + ".recipe.yaml")
