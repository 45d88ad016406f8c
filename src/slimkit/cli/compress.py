"""``slimkit compress MODEL --max-size 5MB --max-latency 10ms --max-drop 1% --out DIR``: plan,
search the trade-off (every candidate measured as deployed in ONNX Runtime), keep the best model
that meets every goal, or say that none does and show the closest."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from slimkit.cli._ui import console, emit_json, err_console, friendly_errors, table

NOT_MET = 3  # exit code when no candidate meets every goal


@friendly_errors
def compress_cmd(
    model: str = typer.Argument(..., help="zoo:NAME, file.pt2, or package.module:factory"),
    out: Path = typer.Option(..., "--out", "-o", help="artifact directory to write"),
    data: str | None = typer.Option(
        None,
        help="calibration / training data: zoo:TASK[:split], file.npz, pkg.mod:loader "
        "(default: the zoo model's own)",
    ),
    metric: str | None = typer.Option(
        None,
        help="top1 | perplexity | sqnr | package.module:function (default: the zoo task's "
        "val top-1, else SQNR against the source)",
    ),
    max_size: str | None = typer.Option(None, help="ONNX file size budget: 5MB, 500KB"),
    max_latency: str | None = typer.Option(None, help="ORT latency budget here: 10ms, 0.5s"),
    max_drop: str | None = typer.Option(None, help="largest metric drop: 1% (one point of top-1)"),
    batch: int = typer.Option(1, min=1, help="batch the latency is measured at"),
    hw: str | None = typer.Option(None, help="hardware profile the planner predicts with"),
    time_budget: str = typer.Option("10m", help="wall-clock budget: 90s, 10m, 1h"),
    trials: int = typer.Option(30, min=1, help="finished trials the study holds at the end"),
    sampler: str = typer.Option("nsga2", help="nsga2 | tpe"),
    storage: str | None = typer.Option(
        None,
        help="Optuna RDB URL shared by workers (postgresql://user@host/db); default "
        "sqlite in OUT/search.db",
    ),
    study: str | None = typer.Option(None, help="study name (default: from model + goals)"),
    worker: bool = typer.Option(False, help="with --storage: run trials only (no artifact)"),
    plan_only: bool = typer.Option(False, help="write OUT/plan.yaml and stop"),
    stop_when_met: bool = typer.Option(False, help="stop at the first trial meeting every goal"),
    finetune: bool = typer.Option(
        True, "--finetune/--no-finetune", help="allow recovery fine-tuning after pruning"
    ),
    json_out: bool = typer.Option(False, "--json", help="print search.json instead of tables"),
) -> None:
    """Make MODEL meet the goals: plan, search, and keep the best candidate as run in ORT.

    OUT receives plan.yaml (the planner's recipe, a reason per step), search.db (the study: an
    interrupted search resumes), search.json (every trial, the Pareto set, the choice), and for
    the chosen candidate model.onnx, recipe.yaml (slimkit run repeats it) and metrics.json. Exits
    with code 3 when no candidate meets every goal.
    """
    from slimkit.core.machine import configure_threads
    from slimkit.search.compress import compress
    from slimkit.search.constraints import TIME_UNITS, Constraints, parse_quantity

    configure_threads(2)
    c = Constraints.parse(
        size=max_size, latency=max_latency, drop=max_drop, batch=batch, hw=hw, metric=metric
    )
    seconds_per = {k: v / 1e3 for k, v in TIME_UNITS.items()} | {"m": 60.0, "h": 3600.0, "": 1.0}
    budget = parse_quantity(time_budget, seconds_per, "--time-budget", "90s, 10m or 1h")
    if worker and storage is None:
        from slimkit.errors import ConfigError

        raise ConfigError(
            "--worker needs --storage (the study the workers share)",
            fix="pass --storage postgresql://user@host/db to every worker",
        )
    space = None if finetune else {"recovery_epochs": [0]}
    res = _run(
        compress,
        model,
        c,
        out=out,
        data=data,
        metric=metric,
        budget=budget or 600.0,
        trials=trials,
        storage=storage,
        sampler=sampler,
        study=study,
        worker=worker,
        plan_only=plan_only,
        stop_when_met=stop_when_met,
        space=space,
        quiet=json_out,
    )
    if json_out:
        emit_json(res.search or {"plan": res.plan.to_dict(), "message": res.message})
    else:
        _print(res, plan_only or worker)
    if not (plan_only or worker or res.met):
        raise typer.Exit(code=NOT_MET)


def _run(compress: Any, model: str, c: Any, *, budget: float, quiet: bool, **kw: Any) -> Any:
    """``compress`` with a progress bar over the trials and the stages named beside it."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    cols = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
    )
    with Progress(*cols, console=err_console, disable=quiet) as bar:
        task = bar.add_task("starting", total=kw["trials"])

        def on_trial(t: Any) -> None:
            bar.update(task, advance=1, description=f"trial {t.number}: {t.state.name.lower()}")

        return compress(
            model,
            c,
            time_budget_s=budget,
            progress=not quiet,
            on_trial=on_trial,
            on_event=lambda m: bar.update(task, description=m),
            **kw,
        )


def _print(res: Any, short: bool) -> None:
    plan = res.plan
    rows = [
        [f"{i + 1}. {s.name}", why]
        for i, (s, why) in enumerate(zip(plan.space.steps(plan.params), plan.reasons, strict=False))
    ]
    console.print(table(f"plan ({res.out / 'plan.yaml'})", ["step", "why"], rows or [["-", "-"]]))
    for note in plan.notes:
        console.print(f"[dim]note: {note}[/]")
    if short:
        console.print(res.message)
        return
    src = res.source
    trows: list[list[Any]] = [["source", "-", src.metric, src.latency_ms, src.size_mb, "-", ""]]
    for t in res.search["trials"]:
        if not t["pareto"]:
            continue
        v = t["values"]
        params = ", ".join(f"{k}={p}" for k, p in t["params"].items())
        mark = "chosen" if t["number"] == res.chosen else ""
        trows.append(
            [
                f"trial {t['number']}",
                params,
                v["metric"],
                v["latency_ms"],
                v["size_mb"],
                t["feasible"],
                mark,
            ]
        )
    n = len(res.search["trials"])
    console.print(
        table(
            f"Pareto set of {n} trials ({res.constraints.describe()})",
            ["", "candidate", "metric", "ms", "MB", "meets goals", ""],
            trows,
        )
    )
    style = "green" if res.met else "bold red"
    console.print(f"[{style}]{res.message}[/]")
    console.print(
        f"[dim]search stopped: {res.stopped}; artifact in {res.out}/ (search.json"
        + (", model.onnx, recipe.yaml" if res.met else "")
        + ")[/]"
    )
