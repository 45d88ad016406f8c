"""``slimkit deploy MODEL --backend ort|openvino|tvm|mnn|litert|executorch|tensorrt|auto``."""

from __future__ import annotations

from pathlib import Path

import typer

from slimkit.cli._ui import console, emit_json, friendly_errors, stages, table


@friendly_errors
def deploy_cmd(
    model: str = typer.Argument(..., help="zoo:NAME, file.pt2, or package.module:factory"),
    backend: str = typer.Option(
        "auto",
        "--backend",
        "-b",
        help="ort | openvino | tvm | mnn | litert | executorch | tensorrt | auto (every installed "
        "one, keep the fastest whose parity holds); several comma-separated",
    ),  # fmt: skip
    out: Path = typer.Option(Path("deployed"), "--out", "-o", help="the folder to write"),
    int8: bool = typer.Option(False, "--int8", help="quantize to int8 first (slimkit PTQ)"),
    data: str | None = typer.Option(None, help="calibration data for --int8 (zoo:TASK, .npz)"),
    weights: Path | None = typer.Option(None, help="safetensors weights for a factory model"),
    input_shape: str | None = typer.Option(None, help="e.g. 1,3,224,224 when slimkit can't know"),
    batch: int = typer.Option(1, min=1, help="batch size deployed and timed"),
    min_sqnr: float | None = typer.Option(None, help="parity bound in dB (40 fp32, 25 int8)"),
    threads: int | None = typer.Option(None, min=1, help="most threads to try (default: cores)"),
    tune: bool = typer.Option(True, help="tune each runtime's settings by measurement"),
    tvm_trials: int = typer.Option(
        0, min=0, help="TVM MetaSchedule tuning trials (0: none; experimental, slow)"
    ),
    runs: int = typer.Option(50, min=5, help="timed runs per round"),
    rounds: int = typer.Option(3, min=1, help="interleaved rounds"),
    hw: str = typer.Option("this", help="hardware profile of the roofline bound ('none': skip)"),
    json_out: bool = typer.Option(False, "--json", help="print JSON instead of a table"),
) -> None:
    """Export to each runtime, tune its settings, check parity against PyTorch, time them all
    and write the fastest whose output matches (with deploy.json, the full comparison)."""
    from slimkit.export.backends import deploy
    from slimkit.export.backends.measure import COLUMNS
    from slimkit.pipeline.refs import default_data, parse_shape, resolve_data, resolve_model

    shape = parse_shape(input_shape) if input_shape else None
    rm = resolve_model(model, weights=weights, input_shape=shape, progress=not json_out)
    names: str | list[str] = backend if "," not in backend else backend.split(",")
    calib = None
    if int8:
        ref = data or default_data(rm)
        calib = resolve_data(ref) if ref else None
    with stages(not json_out) as say:
        rep = deploy(
            rm.model, rm.inputs(batch), backend=names, out=out, int8=int8, data=calib,
            min_sqnr_db=min_sqnr, threads=threads, tune=tune, runs=runs, rounds=rounds,
            hw=None if hw == "none" else hw, name=rm.name, progress=say,
            options={"tvm": {"tune_trials": tvm_trials}},
        )  # fmt: skip
    if json_out:
        emit_json(rep.to_dict())
        return
    title = f"{rm.name} ({rep.format}, batch {rep.batch}) on every backend"
    if rep.roofline:
        title += f"; roofline bound {rep.roofline['bound_ms']:.3g} ms ({rep.roofline['hardware']})"
    console.print(table(title, COLUMNS, rep.rows()))
    if rep.chosen is None:
        console.print("[bold red]no backend ran the model with parity[/]: see the reasons above")
        raise typer.Exit(code=1)
    console.print(f"chose [bold]{rep.chosen}[/] (fastest with SQNR >= {rep.min_sqnr_db:g} dB); "
                  f"written to {rep.out} with deploy.json")  # fmt: skip
