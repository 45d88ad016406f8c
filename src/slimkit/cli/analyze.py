"""``slimkit analyze MODEL``: where the time goes, what bounds each layer, what a change buys."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import typer
from rich import box

from slimkit.cli._ui import console, emit_json, err_console, friendly_errors, status, table


def _sensitivity_setup(rm: Any, batch: int) -> tuple[Callable[[Any], float] | None, Any, str]:
    """A trained classifier is scored by top-1 on its task's test split; anything else by the
    SQNR of its output on the example inputs."""
    from slimkit.zoo import evaluate, load_task

    if rm.task is not None and rm.meta.get("trained"):
        task = load_task(rm.task)
        if task.kind == "classification":

            def top1(model: Any) -> float:
                return evaluate(model, task, "test")["top1"]

            return top1, None, f"top-1 on the {rm.task} test split"
        return None, [(task.test.tensors[0][:64],)], f"SQNR on 64 {rm.task} test samples"
    return None, [rm.inputs(batch)], "SQNR of the output on random example inputs"


def _si(n: float) -> str:
    """37748736 -> '37.7M'."""
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.3g}{unit}"
    return f"{n:g}"


def _us(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1e6


@friendly_errors
def analyze_cmd(
    model: str = typer.Argument(..., help="zoo:NAME, file.pt2, or package.module:factory"),
    hw: str = typer.Option("this", help="'this' (measured here), a preset, or a profile .yaml"),
    batch: int = typer.Option(1, min=1, help="batch size of the example inputs"),
    measure: bool | None = typer.Option(
        None,
        help="time each layer here beside its bound (default: only with --hw this, since "
        "times measured on this machine say nothing about another target)",
    ),  # fmt: skip
    runtime: str = typer.Option("onnxruntime", help="runtime to measure: onnxruntime | eager"),
    sensitivity: bool = typer.Option(False, help="per-layer int8/int4/prune/low-rank trials"),
    changes: str = typer.Option(
        "int8,int4,prune30,prune50,prune70,lowrank50,lowrank25", help="sensitivity trials"
    ),
    out: Path | None = typer.Option(None, "--out", "-o", help="folder for analysis.json + PNGs"),
    top: int = typer.Option(15, min=1, help="layers to list"),
    threads: int = typer.Option(2, min=1, help="PyTorch threads"),
    weights: Path | None = typer.Option(None, help="safetensors weights for a factory model"),
    input_shape: str | None = typer.Option(None, help="e.g. 1,3,224,224 when slimkit can't know"),
    json_out: bool = typer.Option(False, "--json", help="print JSON instead of tables"),
) -> None:
    """Profile a model, place each layer on the roofline of a hardware profile, measure it, and
    predict what int8, pruning and low rank would buy, before any of them is made."""
    from slimkit.analyze.api import analyze
    from slimkit.core.machine import configure_threads
    from slimkit.pipeline.refs import parse_shape, resolve_model

    configure_threads(threads)
    shape = parse_shape(input_shape) if input_shape else None
    rm = resolve_model(model, weights=weights, input_shape=shape, progress=not json_out)
    metric, data, how = (None, None, "") if not sensitivity else _sensitivity_setup(rm, batch)
    timed = (hw == "this") if measure is None else measure
    with status(f"analysing {rm.name}", not json_out):
        rep = analyze(
            rm.model, rm.inputs(batch), hw=hw, measure=timed,
            runtime="eager" if runtime == "eager" else runtime, sensitivity=sensitivity,
            changes=[c.strip() for c in changes.split(",") if c.strip()], metric=metric,
            data=data, out=out, progress=sensitivity and not json_out, name=rm.name,
        )  # fmt: skip
    if json_out:
        emit_json({"model": model, **rep.to_dict()})
        return
    _print(rep, top, how)


def _print(rep: Any, top: int, how: str) -> None:
    rf, hw = rep.roofline, rep.hardware
    console.print(f"[bold]{rep.model}[/] at batch {rep.batch} on [bold]{hw.name}[/] ({hw.kind})")
    console.print(rf.summary)
    measured = rep.measured is not None
    slow = [r for r in rep.top(top + len(rep.layers)) if r["bound"] != "fused"][:top]
    rows = [
        [r["name"], r["op"], _si(r["macs"]), r["intensity"], r["bound"], _us(r["time_s"]),
         _us(r["measured_s"]), r["measured_over_bound"]]
        for r in slow
    ]  # fmt: skip
    cols = ["layer", "op", "MACs", "FLOP/B", "bound", "bound us", "meas us", "x bound"]
    by = f"measured on {rep.measured.runtime}" if measured else "by the roofline's bound"
    t = table(f"slowest {len(rows)} layers ({by})", cols, rows)
    t.box, t.show_edge, t.pad_edge = box.SIMPLE_HEAD, False, False  # 8 columns in 80 characters
    t.collapse_padding = True
    t.columns[0].min_width = min(32, max((len(r[0]) for r in rows), default=5))
    console.print(t)
    for r in slow:
        console.print(f"  [bold]{r['name']}[/]: {r['verdict']}", soft_wrap=True)
    p = rep.profile
    totals = [
        ["parameters", p.total_params],
        ["MACs", p.total_macs],
        ["weights (MB, fp32)", p.weight_bytes / 1e6],
        ["intensity (FLOP/B) / ridge", f"{rf.intensity:.3g} / {rf.ridge_point:.3g}"],
        ["bound", rf.bound],
        ["predicted (roofline) ms", rf.total_s * 1e3],
    ]
    if measured:
        totals.append([f"measured ({rep.measured.runtime}, sum of layers) ms",
                       rep.measured.total_s * 1e3])  # fmt: skip
    console.print(table("totals", ["", "value"], totals))
    preds = [
        [p.change, p.new_s * 1e3, p.speedup, _si(p.macs_after)] for p in rep.predictions.values()
    ]
    console.print(table("predicted speed-ups, before any change is made",
                        ["change", "predicted ms", "speed-up", "MACs after"], preds))  # fmt: skip
    sens = rep.sensitivity
    if sens is not None:
        changes = sens.changes
        value = {(r.layer, r.change): r.metric for r in sens.rows}
        worst = sorted(sens.layers, key=lambda n: -max(sens.drops(c)[n] for c in changes))
        srows = [[n, *[value[(n, c)] for c in changes]] for n in worst[:top]]
        label = ("SQNR dB" if sens.metric_name == "sqnr_db"
                 else f"{sens.metric_name}, baseline {sens.baseline:.4g}")  # fmt: skip
        console.print(table(f"sensitivity ({label}; {how}), most sensitive first",
                            ["layer", *changes], srows))  # fmt: skip
    if rep.files:
        err_console.print("wrote " + ", ".join(rep.files.values()))
