"""``slimkit report ARTIFACT_DIR [--open]``: the artifact's self-contained report.html."""

from __future__ import annotations

from pathlib import Path

import typer

from slimkit.cli._ui import console, emit_json, friendly_errors, status


@friendly_errors
def report_cmd(
    artifact: Path = typer.Argument(..., help="an artifact folder (the --out of a command)"),
    out: Path | None = typer.Option(None, "--out", "-o", help="write here, not DIR/report.html"),
    open_it: bool = typer.Option(False, "--open", help="open the report in the web browser"),
    layers: bool = typer.Option(
        True,
        "--layers/--no-layers",
        help="compute the per-layer roofline and sensitivity from the recipe's model when the "
        "artifact has no layers.json",
    ),
    json_out: bool = typer.Option(False, "--json", help="print the path as JSON"),
) -> None:
    """Write the artifact's report.html: the chosen model against the original (size, latency,
    metric, as run), the search's Pareto front, what each step changed, per-layer roofline and
    sensitivity, the recipe that reproduces it and the machine it was measured on.

    One file, plots embedded, nothing fetched: it can be mailed or attached as it is. The
    per-layer record (layers.json, sensitivity.json) is computed once and kept in DIR.
    """
    from slimkit.report.html import report_html

    with status(f"drawing the report of {artifact}", not json_out):
        path = report_html(artifact, out=out, layers=layers)
    if json_out:
        emit_json({"report": str(path)})
    else:
        console.print(f"report: {path}")
    if open_it:
        import webbrowser

        if not webbrowser.open(path.resolve().as_uri()):
            console.print("[dim]no web browser found here: open the file yourself[/]")
