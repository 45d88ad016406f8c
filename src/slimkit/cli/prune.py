"""``slimkit prune MODEL --ratio R --out DIR``: channel pruning, measured before and after."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

from slimkit.cli._steps import run_then_finetune
from slimkit.cli._ui import console, emit_json, err_console, friendly_errors, table
from slimkit.errors import ConfigError

if TYPE_CHECKING:
    pass


@friendly_errors
def prune_cmd(
    model: str = typer.Argument(..., help="zoo:NAME, file.pt2, or package.module:factory"),
    out: Path = typer.Option(..., "--out", "-o", help="artifact directory to write"),
    ratio: float = typer.Option(0.5, min=0.0, max=0.95, help="fraction of channels removed"),
    criterion: str = typer.Option(
        "l1", help="l1 | l2 | bn | fpgm | random | taylor, thinet (they read the task's data)"
    ),
    global_ranking: bool = typer.Option(False, help="rank channels across layers"),
    round_to: int | None = typer.Option(
        None,
        min=1,
        help="keep a multiple of this many channels (default: with a target the CPU's channel "
        "block, 16 with AVX-512, else 8; without one 1)",
    ),
    target_macs: float | None = typer.Option(
        None, min=0.01, max=1.0, help="choose per-layer ratios to keep this fraction of MACs"
    ),
    target_params: float | None = typer.Option(
        None, min=0.01, max=1.0, help="choose per-layer ratios to keep this fraction of params"
    ),
    target_speedup: float | None = typer.Option(
        None, min=1.0, help="choose ratios until ORT runs this many times faster (measured)"
    ),
    allocation: str = typer.Option("uniform", help="uniform | sensitivity (with a target)"),
    hw: str | None = typer.Option(
        None, help="with --target-speedup: predict on this hardware profile (roofline) instead"
    ),
    finetune_epochs: int = typer.Option(
        0, min=0, help="fine-tune on the zoo task, distilling from the dense model"
    ),
    exclude: list[str] = typer.Option([], help="regex of layers to leave untouched (repeat)"),
    weights: Path | None = typer.Option(None, help="safetensors weights for a factory model"),
    input_shape: str | None = typer.Option(None, help="e.g. 1,3,224,224 when slimkit can't know"),
    runs: int = typer.Option(30, min=1, help="timed runs per latency round"),
    json_out: bool = typer.Option(False, "--json", help="print JSON instead of a table"),
) -> None:
    """Remove channels (a smaller ordinary model), then compare params, MACs, latency, metric.

    With --target-macs / --target-params / --target-speedup slimkit chooses the per-layer ratios
    (--ratio is then ignored). With --finetune-epochs (zoo models with a task) the pruned model is
    fine-tuned with response distillation from the dense one; otherwise the metric after pruning
    is the one-shot drop.
    """
    from slimkit.core.machine import channel_multiple, configure_threads
    from slimkit.pipeline.artifact import write_metrics
    from slimkit.pipeline.measure import compare
    from slimkit.pipeline.recipe import Step
    from slimkit.pipeline.refs import parse_shape, resolve_model
    from slimkit.prune import Channel, pruning_record
    from slimkit.prune.auto import Target

    configure_threads(2)
    targets = {"macs": target_macs, "params": target_params, "speedup": target_speedup}
    targets = {k: v for k, v in targets.items() if v is not None}
    cfg = Channel(ratio=0.0 if targets else ratio, criterion=criterion,  # type: ignore[arg-type]
                  global_ranking=global_ranking,
                  round_to=round_to or (channel_multiple() if targets else 1),
                  exclude=list(exclude))  # fmt: skip
    shape = parse_shape(input_shape) if input_shape else None
    rm = resolve_model(model, weights=weights, input_shape=shape, progress=not json_out)
    if finetune_epochs and rm.task is None:
        raise ConfigError(
            "--finetune-epochs needs a model with a bundled task (a trained zoo model)",
            fix="fine-tune in Python with slimkit.prune.recover(model, loader, teacher=dense)",
        )
    data = None
    if rm.task is not None and criterion in ("thinet", "taylor"):
        data = f"zoo:{rm.task}:train"  # labelled batches: Taylor's loss, ThiNet's inputs
    elif rm.task is not None and allocation != "uniform":
        data = f"zoo:{rm.task}:calibration"  # what the sensitivity allocation reads
    if targets:
        step = Step("prune.auto", Target(**targets, allocation=allocation, channel=cfg, hw=hw))  # type: ignore[arg-type]
        what = ", ".join(f"target {k} {v:g}" for k, v in targets.items())
    else:
        step = Step("prune.channel", cfg)
        what = f"{ratio:.0%} of channels removed ({criterion})"
    res, oneshot = run_then_finetune(step, model=model, rm=rm, out=out,
                                     finetune_epochs=finetune_epochs, weights=weights,
                                     shape=shape, data=data, json_out=json_out)  # fmt: skip
    with err_console.status("timing ONNX Runtime, dense vs pruned"):
        cmp = compare(res, labels=("dense", "pruned"), runs=runs, sqnr=False, task_on="torch",
                      profile=True)  # fmt: skip
    metrics: dict[str, Any] = dict(cmp.task)
    if oneshot:
        metrics["pruned_before_finetuning"] = oneshot
    run_info = res.to_dict()
    result = {
        "model": model, "config": cfg.to_dict(), "targets": targets,
        "params": cmp.params, "macs": cmp.macs,
        "latency_ms": cmp.to_dict()["latency_ms"],
        "metrics": metrics, "onnx": res.onnx.to_dict(), "machine": run_info["machine"],
        "versions": run_info["versions"],
    }  # fmt: skip
    write_metrics(out, {**result, "recipe": run_info["recipe"], "steps": run_info["steps"]})
    if json_out:
        emit_json(result)
        return
    lat = cmp.latency
    d_ms, p_ms = lat["dense"].median_ms, lat["pruned"].median_ms
    rows: list[list[Any]] = [
        ["parameters", cmp.params["dense"], cmp.params["pruned"]],
        ["MACs", cmp.macs["dense"], cmp.macs["pruned"]],
        ["ORT latency, batch 1 (ms)", d_ms, p_ms],
        ["speed-up", 1.0, d_ms / p_ms],
    ]
    tuned = f"{finetune_epochs} epochs of fine-tuning" if finetune_epochs else "no fine-tuning"
    for k in ("top1", "perplexity"):
        if metrics and k in metrics["dense"]:
            rows.append([f"test {k} ({tuned})", metrics["dense"][k], metrics["pruned"][k]])
    console.print(table(f"{rm.name}: {what}", ["", "dense", "pruned"], rows))
    auto = (pruning_record(res.model) or {}).get("auto", {})
    for k, v in auto.items():
        if k.startswith("predicted_speedup_on_"):
            console.print(f"roofline-predicted speed-up on {k[21:]}: {v:.2f}x (not measured)")
    console.print(f"[dim]artifact in {out}/ (model.safetensors, pruning.json, model.onnx, "
                  "recipe.yaml: slimkit run repeats it)[/]")  # fmt: skip
