"""``slimkit prune MODEL --ratio R --out DIR``: channel pruning, measured before and after."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import typer

from slimkit.cli._ui import console, emit_json, err_console, friendly_errors, table


@friendly_errors
def prune_cmd(
    model: str = typer.Argument(..., help="zoo:NAME, file.pt2, or package.module:factory"),
    out: Path = typer.Option(..., "--out", "-o", help="artifact directory to write"),
    ratio: float = typer.Option(0.5, min=0.0, max=0.95, help="fraction of channels removed"),
    criterion: str = typer.Option("l1", help="l1 | l2 | bn | fpgm | random"),
    global_ranking: bool = typer.Option(False, help="rank channels across layers"),
    round_to: int = typer.Option(1, min=1, help="keep a multiple of this many channels"),
    exclude: list[str] = typer.Option([], help="regex of layers to leave untouched (repeat)"),
    weights: Path | None = typer.Option(None, help="safetensors weights for a factory model"),
    input_shape: str | None = typer.Option(None, help="e.g. 1,3,224,224 when slimkit can't know"),
    runs: int = typer.Option(30, min=1, help="timed runs per latency round"),
    json_out: bool = typer.Option(False, "--json", help="print JSON instead of a table"),
) -> None:
    """Remove channels (a smaller ordinary model), then compare params, MACs, latency, metric.

    No fine-tuning happens here yet: the metric after pruning is the one-shot drop.
    """
    from slimkit.analyze.latency import measure_latency, ort_runner
    from slimkit.analyze.profile import profile_model
    from slimkit.core.io import write_json
    from slimkit.core.machine import configure_threads, machine_info, versions
    from slimkit.core.refs import parse_shape, resolve_model
    from slimkit.export.onnx import export_onnx
    from slimkit.export.ort import ort_session
    from slimkit.prune import Channel, prune_channels, save_pruned

    configure_threads(2)
    cfg = Channel(ratio=ratio, criterion=criterion, global_ranking=global_ranking,  # type: ignore[arg-type]
                  round_to=round_to, exclude=list(exclude))  # fmt: skip
    shape = parse_shape(input_shape) if input_shape else None
    rm = resolve_model(model, weights=weights, input_shape=shape, progress=not json_out)
    x = rm.inputs(1)
    with err_console.status("building the dependency graph and removing channels"):
        small = prune_channels(rm.model, cfg, example_inputs=x)
    save_pruned(small, out)
    rep = export_onnx(small, out / "model.onnx", example_inputs=x)
    before, after = profile_model(rm.model, x), profile_model(small, x)
    with tempfile.TemporaryDirectory() as tmp:
        dense = export_onnx(rm.model, Path(tmp) / "dense.onnx", example_inputs=x)
        runners = {"dense": ort_runner(ort_session(dense.path), x),
                   "pruned": ort_runner(ort_session(rep.path), x)}  # fmt: skip
        with err_console.status("timing ONNX Runtime, dense vs pruned"):
            lat = measure_latency(runners, runs=runs, warmup=5, rounds=3)
    metrics: dict[str, Any] = {}
    if rm.task is not None:
        from slimkit.zoo import evaluate, load_task

        task = load_task(rm.task)
        metrics = {"dense": evaluate(rm.model, task), "pruned": evaluate(small, task)}
    result = {
        "model": model, "config": cfg.to_dict(),
        "params": {"dense": before.total_params, "pruned": after.total_params},
        "macs": {"dense": before.total_macs, "pruned": after.total_macs},
        "latency_ms": {k: v.to_dict() for k, v in lat.items()},
        "metrics": metrics, "onnx": rep.to_dict(), "machine": machine_info(),
        "versions": versions(),
    }  # fmt: skip
    write_json(out / "metrics.json", result)
    if json_out:
        emit_json(result)
        return
    d_ms, p_ms = lat["dense"].median_ms, lat["pruned"].median_ms
    rows: list[list[Any]] = [
        ["parameters", before.total_params, after.total_params],
        ["MACs", before.total_macs, after.total_macs],
        ["ORT latency, batch 1 (ms)", d_ms, p_ms],
        ["speed-up", 1.0, d_ms / p_ms],
    ]
    for k in ("top1", "perplexity"):
        if metrics and k in metrics["dense"]:
            rows.append([f"test {k} (no fine-tuning)", metrics["dense"][k], metrics["pruned"][k]])
    console.print(table(f"{rm.name}: {ratio:.0%} of channels removed ({criterion})",
                        ["", "dense", "pruned"], rows))  # fmt: skip
    console.print(f"[dim]artifact in {out}/ (model.safetensors, pruning.json, model.onnx)[/]")
