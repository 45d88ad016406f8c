"""``slimkit nas --latency-ms 0.08 --out DIR``: the most accurate architecture of a search space
under a latency target measured on this machine's ONNX Runtime."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from slimkit.cli._ui import console, emit_json, err_console, friendly_errors, table


@friendly_errors
def nas_cmd(
    out: Path = typer.Option(..., "--out", "-o", help="artifact directory to write"),
    task: str = typer.Option("shapes", help="zoo image classification task"),
    latency_ms: float | None = typer.Option(
        None,
        min=0.0,
        help="ORT batch-1 latency target in ms (default: halfway between the "
        "space's smallest and largest network)",
    ),  # fmt: skip
    trials: int = typer.Option(60, min=1, help="architectures the search evaluates"),
    strategy: str = typer.Option("nsga2", help="nsga2 | random | rl | darts"),
    space: Path | None = typer.Option(None, help="search space YAML (default: the shapes one)"),
    supernet_epochs: int = typer.Option(4, min=1, help="supernet training epochs"),
    finetune_epochs: int = typer.Option(2, min=1, help="fine-tuning epochs of the chosen net"),
    max_steps: int | None = typer.Option(None, min=1, help="cap on training steps (quick run)"),
    darts_epochs: int = typer.Option(1, min=1, help="DARTS: epochs of alpha / weight steps"),
    latency_weight: float = typer.Option(
        2.0, min=0.0, help="DARTS: weight of the expected-latency term"
    ),
    threads: int = typer.Option(1, min=1, help="ORT threads the latency is measured with"),
    measure_top: int = typer.Option(
        8,
        min=0,
        help="measure this many of the best trials in ORT and pick among those under "
        "the target (0: trust the latency table)",
    ),
    seed: int = typer.Option(0, help="random seed"),
    json_out: bool = typer.Option(False, "--json", help="print JSON instead of a table"),
) -> None:
    """Train a weight-sharing supernet over the search space once, search it (NSGA-II,
    random, REINFORCE, or the differentiable DARTS relaxation with an expected-latency term) for
    the most accurate network whose latency, predicted by a lookup table measured in ONNX Runtime
    on this machine, meets the target; extract it as a plain model, fine-tune it, and measure
    it. OUT receives arch.yaml, model.safetensors, model.onnx, search.json and metrics.json;
    `slimkit.nas.load(OUT)` rebuilds the model.
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    from slimkit.core.machine import configure_threads
    from slimkit.nas import CNNSpace, Darts, search_arch
    from slimkit.pipeline.artifact import check_out_dir

    configure_threads(2)
    check_out_dir(out)
    sp = CNNSpace.from_yaml(space) if space is not None else CNNSpace()
    columns = (TextColumn("search"), BarColumn(), MofNCompleteColumn(),
               TextColumn("{task.fields[info]}"))  # fmt: skip
    bar = Progress(*columns, console=err_console, transient=True, disable=json_out)
    task_id = bar.add_task("search", total=trials, info="")

    def on_stage(name: str) -> None:
        if not json_out:
            err_console.print(f"[dim]> {name}[/]")
        if name.startswith("search"):
            bar.start()
        elif name == "fine-tune":
            bar.stop()

    def on_trial(i: int, c: Any) -> None:
        bar.update(task_id, completed=i, info=f"top-1 {c.top1:.3f} at {c.latency_ms:.4f} ms")

    try:
        res = search_arch(task, space=sp, latency_ms=latency_ms, trials=trials,
                          strategy=strategy, supernet_epochs=supernet_epochs,
                          finetune_epochs=finetune_epochs, max_steps=max_steps, threads=threads,
                          seed=seed, measure_top=measure_top, progress=not json_out,
                          on_stage=on_stage,
                          on_trial=on_trial,
                          darts=Darts(epochs=darts_epochs, latency_weight=latency_weight,
                                      max_steps=max_steps))  # fmt: skip
    finally:
        bar.stop()
    res.save(out)
    info = res.to_dict()
    if json_out:
        emit_json(info)
        return
    m = res.metrics
    lm = m["latency_model"]
    rows = [
        ["architecture", res.arch.describe()],
        ["latency target (ms)", m["target_ms"]],
        ["predicted (ms)", m["predicted_ms"]],
        ["measured in ORT (ms)", m["measured_ms"]],
        ["meets the target", m["meets_target"]],
        ["top-1 (test split)", m["top1"]],
        ["parameters", m["params"]],
        ["trials (feasible)", f"{len(res.search.trials)} ({len(res.search.feasible)})"]
        if strategy != "darts"
        else ["DARTS argmax (before fitting the target)", res.search.info.get("argmax")],
        ["latency model median error", f"{lm['median_rel_error']:.1%} on {lm['n']} networks"],
    ]
    console.print(table(f"slimkit nas on {task} ({strategy})", ["", ""], rows))
    if lm.get("table") not in (None, "cached", "measured"):  # found stale and measured again
        console.print(f"latency table: {lm['table']}")
    console.print(f"[dim]artifact in {out}/[/]")
