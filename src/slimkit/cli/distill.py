"""``slimkit distill TEACHER --macs 0.25 --out DIR``: build a smaller student from the teacher and
train it by distillation, measured against the teacher."""

from __future__ import annotations

from pathlib import Path

import typer

from slimkit.cli._ui import console, emit_json, err_console, friendly_errors, stages, table
from slimkit.errors import ConfigError


@friendly_errors
def distill_cmd(
    teacher: str = typer.Argument(..., help="zoo:NAME, file.pt2, or package.module:factory"),
    out: Path = typer.Option(..., "--out", "-o", help="artifact directory to write"),
    method: str = typer.Option("response", help="response | feature | relation"),
    ratio: float | None = typer.Option(
        None, min=0.05, max=0.95, help="student: remove this fraction of channels per layer"
    ),
    macs: float | None = typer.Option(
        None,
        min=0.01,
        max=1.0,
        help="student: keep this fraction of MACs (per-layer ratios "
        "chosen by slimkit; the default is 0.5)",
    ),  # fmt: skip
    loss: str = typer.Option(
        "auto", help="auto | softmax | sigmoid | peaked | regression | cosine"
    ),
    epochs: int = typer.Option(3, min=1, help="training epochs on the task's train split"),
    lr: float = typer.Option(1e-3, min=0.0, help="learning rate (AdamW, cosine decay)"),
    temperature: float = typer.Option(4.0, min=0.0, help="softens softmax outputs"),
    alpha: float = typer.Option(0.5, min=0.0, max=1.0, help="distillation vs label loss weight"),
    data: str | None = typer.Option(None, help="training data (default: the zoo task's train)"),
    weights: Path | None = typer.Option(None, help="safetensors weights for a factory model"),
    input_shape: str | None = typer.Option(None, help="e.g. 1,3,224,224 when slimkit can't know"),
    runs: int = typer.Option(30, min=1, help="timed runs per latency round"),
    json_out: bool = typer.Option(False, "--json", help="print JSON instead of a table"),
) -> None:
    """Shrink the teacher by channel pruning into a student, then distil it.

    The loss is chosen per output from what the teacher returns (softened KL for class or token
    logits, binary KL for sigmoid outputs, a distribution loss for peaked heat-maps, MSE for
    values) unless --loss names one; --method feature adds hint layers paired by depth, --method
    relation adds RKD sample relations. OUT receives the student (safetensors, pruning.json,
    ONNX), metrics.json and the recipe.yaml that repeats the run.
    """
    from slimkit.cli.run import _measured_table
    from slimkit.core.machine import configure_threads
    from slimkit.pipeline.artifact import write_metrics
    from slimkit.pipeline.measure import compare
    from slimkit.pipeline.recipe import Recipe, Step, config_class
    from slimkit.pipeline.refs import parse_shape, resolve_model
    from slimkit.pipeline.runner import run
    from slimkit.prune import Channel, Target

    configure_threads(2)
    if ratio is not None and macs is not None:
        raise ConfigError("--ratio and --macs both size the student", fix="pass one of them")
    name = f"distill.{method}"
    cfg = config_class(name).from_dict({"loss": loss, "epochs": epochs, "lr": lr,
                                        "temperature": temperature, "alpha": alpha})  # fmt: skip
    if ratio is not None:
        student = Step("prune.channel", Channel(ratio=ratio))
        what = f"{ratio:.0%} of channels removed"
    else:
        student = Step("prune.auto", Target(macs=macs or 0.5))
        what = f"{macs or 0.5:.0%} of the MACs kept"
    shape = parse_shape(input_shape) if input_shape else None
    rm = resolve_model(teacher, weights=weights, input_shape=shape, progress=not json_out)
    if data is None and rm.task is None:
        raise ConfigError(
            "distillation needs training data: the teacher has no bundled task",
            fix="pass --data (a .npz file or package.module:loader), or use a trained zoo model",
        )
    recipe = Recipe.for_model(teacher, weights=weights, input_shape=shape, data=data,
                              steps=(student, Step(name, cfg)))  # fmt: skip
    with stages(not json_out) as stage:
        res = run(recipe, model=rm, data=data, out=out, progress=not json_out, on_event=stage)
    info = res.to_dict()
    if res.onnx is not None:
        with err_console.status("measuring teacher vs student in ONNX Runtime"):
            cmp = compare(res, labels=("teacher", "student"), runs=runs, sqnr=False,
                          task_on="torch")  # fmt: skip
        info["measured"] = cmp.to_dict()
    write_metrics(out, info)
    if json_out:
        emit_json(info)
        return
    rec = info["steps"][-1].get("details", {})
    losses = ", ".join(f"{d['output']}: {d['kind']}" for d in rec.get("losses", []))
    console.print(table(f"{rm.name} -> student ({what}), {name}",
                        ["", ""], [["loss per output", losses or "-"],
                                   ["epochs", rec.get("epochs_run", "-")],
                                   ["final loss", rec.get("final_loss", "-")]]))  # fmt: skip
    if "measured" in info:
        console.print(_measured_table(info["measured"]))
    console.print(f"[dim]artifact in {out}/ (its recipe.yaml repeats this run)[/]")
