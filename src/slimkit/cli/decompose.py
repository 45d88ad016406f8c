"""``slimkit decompose MODEL --method svd --energy 0.9 --out DIR``: low-rank factorisation, measured
before and after, with a per-layer table (shape, rank, parameters, reconstruction error)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

from slimkit.cli._steps import run_then_finetune
from slimkit.cli._ui import console, emit_json, err_console, friendly_errors, table
from slimkit.errors import ConfigError

if TYPE_CHECKING:
    pass


def _rank(text: str | None) -> int | float | None:
    if text is None:
        return None
    try:
        return int(text)
    except ValueError:
        try:
            return float(text)
        except ValueError:
            raise ConfigError(
                f"--rank {text!r} is not a number",
                fix="give a rank (--rank 16) or a fraction of each layer's full rank (--rank 0.25)",
            ) from None


@friendly_errors
def decompose_cmd(
    model: str = typer.Argument(..., help="zoo:NAME, file.pt2, or package.module:factory"),
    out: Path = typer.Option(..., "--out", "-o", help="artifact directory to write"),
    method: str = typer.Option("svd", help="svd (Linear + conv) | tucker | cp (convs)"),
    rank: str | None = typer.Option(None, help="a rank (16) or a fraction of full rank (0.25)"),
    energy: float | None = typer.Option(None, help="keep this fraction of each kernel's energy"),
    params_budget: float | None = typer.Option(
        None, help="keep this fraction of the factorised layers' parameters (greedy allocation)"
    ),
    macs_budget: float | None = typer.Option(None, help="the same for MACs"),
    vbmf: bool = typer.Option(False, "--vbmf", help="rank by empirical variational Bayes"),
    layers: str = typer.Option("all", help="svd: all | linear | conv"),
    data_aware: bool = typer.Option(
        False, "--data-aware", help="svd: rank by the outputs on the task's calibration data"
    ),
    spatial: str = typer.Option("full", help="cp: full (depthwise kxk) | separable (kx1, 1xk)"),
    finetune_epochs: int = typer.Option(
        0, min=0, help="fine-tune on the zoo task, distilling from the dense model"
    ),
    exclude: list[str] = typer.Option([], help="regex of layers to leave untouched (repeat)"),
    weights: Path | None = typer.Option(None, help="safetensors weights for a factory model"),
    input_shape: str | None = typer.Option(None, help="e.g. 1,3,224,224 when slimkit can't know"),
    runs: int = typer.Option(30, min=1, help="timed runs per latency round"),
    json_out: bool = typer.Option(False, "--json", help="print JSON instead of a table"),
) -> None:
    """Factorise Linear / conv layers into smaller chains, then compare params, MACs, latency,
    metric. One rank rule: --rank, --energy (the default, 0.9), --params-budget, --macs-budget or
    --vbmf. With --finetune-epochs (zoo models with a task) the result is fine-tuned with response
    distillation from the dense model."""
    from slimkit.core.machine import configure_threads
    from slimkit.core.registry import load_methods
    from slimkit.pipeline.artifact import write_metrics
    from slimkit.pipeline.measure import compare
    from slimkit.pipeline.recipe import ScopeSpec, Step
    from slimkit.pipeline.refs import parse_shape, resolve_model

    configure_threads(2)
    name = f"lowrank.{method.strip().lower()}"
    methods = load_methods()
    if name not in methods.names("lowrank.*"):
        raise ConfigError(f"--method {method!r} is not a low-rank method",
                          fix="use svd, tucker or cp")  # fmt: skip
    fields: dict[str, Any] = {"rank": _rank(rank), "energy": energy, "params": params_budget,
                              "macs": macs_budget, "vbmf": vbmf}  # fmt: skip
    if method == "svd":
        fields["layers"] = layers
        fields["data_aware"] = data_aware
    if method == "cp":
        fields["spatial"] = spatial
    cfg = (
        methods.entry(name)
        .meta["config"]
        .from_dict({k: v for k, v in fields.items() if v not in (None, False)})
    )
    shape = parse_shape(input_shape) if input_shape else None
    rm = resolve_model(model, weights=weights, input_shape=shape, progress=not json_out)
    if finetune_epochs and rm.task is None:
        raise ConfigError(
            "--finetune-epochs needs a model with a bundled task (a trained zoo model)",
            fix="fine-tune in Python with slimkit.prune.recover(model, loader, teacher=dense)",
        )
    data = None
    if getattr(cfg, "data_aware", False):
        if rm.task is None:
            raise ConfigError(
                "--data-aware needs calibration data, and this model has no bundled task",
                fix="use a zoo model with a task, or a recipe with `data:` (slimkit run)",
            )
        data = f"zoo:{rm.task}:calibration"
    step = Step(name, cfg, ScopeSpec(exclude=list(exclude)) if exclude else None)
    res, oneshot = run_then_finetune(step, model=model, rm=rm, out=out,
                                     finetune_epochs=finetune_epochs, weights=weights,
                                     shape=shape, data=data, json_out=json_out)  # fmt: skip
    with err_console.status("timing ONNX Runtime, dense vs factorised"):
        cmp = compare(res, labels=("dense", "factorised"), runs=runs, sqnr=rm.task is None,
                      task_on="torch", profile=True)  # fmt: skip
    details = res.steps[0].details
    metrics: dict[str, Any] = dict(cmp.task)
    if oneshot:
        metrics["factorised_before_finetuning"] = oneshot
    run_info = res.to_dict()
    result = {
        "model": model, "method": name, "config": cfg.to_dict(), "rule": cfg.rule,
        "params": cmp.params, "macs": cmp.macs, "latency_ms": cmp.to_dict()["latency_ms"],
        "sqnr_db": cmp.sqnr_db, "metrics": metrics, "layers": details.get("layers", []),
        "kept": details.get("kept", []), "onnx": res.onnx.to_dict(),
        "machine": run_info["machine"], "versions": run_info["versions"],
    }  # fmt: skip
    write_metrics(out, {**result, "recipe": run_info["recipe"], "steps": run_info["steps"]})
    if json_out:
        emit_json(result)
        return
    d_ms, f_ms = cmp.latency["dense"].median_ms, cmp.latency["factorised"].median_ms
    rows: list[list[Any]] = [
        ["parameters", cmp.params["dense"], cmp.params["factorised"]],
        ["MACs", cmp.macs["dense"], cmp.macs["factorised"]],
        ["ORT latency, batch 1 (ms)", d_ms, f_ms],
        ["speed-up", 1.0, d_ms / f_ms],
    ]
    if cmp.sqnr_db is not None:
        rows.append(["SQNR vs dense (dB)", None, cmp.sqnr_db])
    tuned = f"{finetune_epochs} epochs of fine-tuning" if finetune_epochs else "no fine-tuning"
    for k in ("top1", "perplexity"):
        if metrics and k in metrics["dense"]:
            rows.append([f"test {k} ({tuned})", metrics["dense"][k], metrics["factorised"][k]])
    console.print(table(f"{rm.name}: {name}, {cfg.rule}", ["", "dense", "factorised"], rows))
    per_layer = [[r["name"], "x".join(map(str, r["shape"])), r["kind"],
                  "/".join(map(str, r["rank"])), r["params"][0], r["params"][1], r["rel_error"]]
                 for r in result["layers"]]  # fmt: skip
    per_layer += [[k["name"], "", "kept", k["reason"], None, None, None] for k in result["kept"]]
    console.print(table("layers", ["layer", "weight", "kind", "rank", "params", "after",
                                   "rel. error"], per_layer))  # fmt: skip
    console.print(f"[dim]artifact in {out}/ (model.safetensors, lowrank.json, model.onnx, "
                  "recipe.yaml: slimkit run repeats it)[/]")  # fmt: skip
