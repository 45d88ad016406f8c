"""``slimkit quantize MODEL --calib DATA --out DIR``: static int8 PTQ, or weight-only int4 / int8
(``--method int4-gptq --group-size 128``: ONNX Runtime MatMulNBits), exported and measured."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from slimkit.cli._ui import console, emit_json, err_console, friendly_errors, stages, table


@friendly_errors
def quantize_cmd(
    model: str = typer.Argument(..., help="zoo:NAME, file.pt2, or package.module:factory"),
    out: Path = typer.Option(..., "--out", "-o", help="artifact directory to write"),
    calib: str | None = typer.Option(
        None,
        help="calibration data: zoo:TASK[:split], file.npz, pkg.mod:loader "
        "(default: the zoo model's own training split)",
    ),  # fmt: skip
    method: str = typer.Option(
        "mse",
        help="int8 calibration: minmax | percentile | entropy | mse; or weight-only: int4 | "
        "int4-rtn | int4-mse | int4-gptq | int4-awq | int8-rtn | int8-gptq; or mixed (a format "
        "per layer under --max-size / --max-latency / --avg-bits, or --plan)",
    ),  # fmt: skip
    group_size: int = typer.Option(128, help="weight-only: input channels per scale (32/64/128)"),
    symmetric: bool = typer.Option(False, help="weight-only: no zero points"),
    accuracy_level: int = typer.Option(
        4, min=0, max=4, help="weight-only: ORT MatMulNBits compute (4 = int8, fastest on CPU)"
    ),
    percentile: float = typer.Option(99.999, help="for --method percentile"),
    weight_bits: str = typer.Option(
        "auto", help="auto (8 with VNNI, else 7) | 2-8 (below 7: low-bit codes on int8 kernels)"
    ),
    adaround: int = typer.Option(
        0, min=0, help="AdaRound iterations per layer (200 on trained models; pair with 4-bit)"
    ),
    brecq: int = typer.Option(
        0, min=0, help="block reconstruction iterations per block (experimental, after AdaRound)"
    ),
    diagnose: bool = typer.Option(
        False,
        "--diagnose",
        help="also split the output error into weights / activations and name the worst layers "
        "(held-out inputs; written to metrics.json)",
    ),  # fmt: skip
    qat_epochs: int = typer.Option(
        0,
        min=0,
        help="quantization-aware training after PTQ, distilled from the float model "
        "(zoo models: on the task's train split)",
    ),  # fmt: skip
    qat_lr: float = typer.Option(1e-3, min=0.0, help="learning rate of --qat-epochs"),
    code_bits: int | None = typer.Option(
        None, "--bits", help="--method binary | ternary | pow2 | kmeans (experimental): code bits"
    ),
    epochs: int = typer.Option(
        0,
        min=0,
        help="--method binary | ternary | pow2 | kmeans: distilled fine-tune epochs (zoo models: "
        "on the task's train split; learning rate --qat-lr)",
    ),
    num_batches: int = typer.Option(32, min=1, help="calibration batches"),
    weights: Path | None = typer.Option(None, help="safetensors weights for a factory model"),
    input_shape: str | None = typer.Option(None, help="e.g. 1,3,224,224 when slimkit can't know"),
    max_drop: float | None = typer.Option(
        None, min=0.0, help="keep the fewest layers in float so val top-1 drops at most this"
    ),
    float_prefix: bool = typer.Option(
        True,
        "--float-prefix/--all-int8",
        help="keep the first layers float where ORT runs them faster (timed here), or quantize "
        "every layer (--all-int8 also turns the speed check off)",
    ),  # fmt: skip
    speed_check: bool = typer.Option(
        True,
        "--speed-check/--no-speed-check",
        help="keep float what ORT runs slower in int8 here (whole model if need be), or not",
    ),  # fmt: skip
    runs: int = typer.Option(30, min=1, help="timed runs per latency round"),
    json_out: bool = typer.Option(False, "--json", help="print JSON instead of a table"),
    max_size: str | None = typer.Option(
        None, help="--method mixed: file size budget (0.5MB, 200KB)"
    ),
    max_latency: str | None = typer.Option(
        None, help="--method mixed: batch-1 ORT latency budget here (2ms, 500us), measured"
    ),
    avg_bits: float | None = typer.Option(None, help="--method mixed: mean bits per weight"),
    plan: Path | None = typer.Option(None, help="--method mixed: apply this plan (YAML) exactly"),
    plan_out: Path | None = typer.Option(None, help="--method mixed: write the chosen plan here"),
) -> None:
    """Quantize to int8 (ONNX Runtime integer kernels) and compare size, SQNR, accuracy, latency.

    The artifact's recipe.yaml pins the timed float prefix (and the --max-drop search's float
    layers): `slimkit run OUT/recipe.yaml --out DIR` repeats this artifact.
    """
    from slimkit.core.machine import configure_threads
    from slimkit.errors import ConfigError, ReferenceResolutionError
    from slimkit.pipeline.artifact import write_metrics
    from slimkit.pipeline.measure import compare
    from slimkit.pipeline.recipe import Recipe, Step
    from slimkit.pipeline.refs import default_data, parse_shape, resolve_model
    from slimkit.pipeline.runner import run
    from slimkit.quant.ptq import PTQ

    configure_threads(2)
    if method.strip().lower() in ("mixed", "quant.mixed"):
        budget = {"max_size": max_size, "avg_bits": avg_bits, "plan": plan, "plan_out": plan_out,
                  "max_latency": max_latency}  # fmt: skip
        return _mixed_cmd(model, out, calib, weights, input_shape, runs, json_out, num_batches,
                          budget)  # fmt: skip
    lowbit = _method_fields(method, "quant.lowbit")  # experimental low-bit weights
    if lowbit is not None:
        fields = {**lowbit, "bits": code_bits, "epochs": epochs, "lr": qat_lr}
        return _lowbit_cmd(model, out, calib, fields, weights, input_shape, runs, json_out)
    if _weight_only(method) is not None:
        fields = {**_weight_only(method), "group_size": group_size,  # type: ignore[dict-item]
                  "symmetric": symmetric, "accuracy_level": accuracy_level,
                  "num_batches": num_batches}  # fmt: skip
        return _weight_only_cmd(model, out, calib, fields, weights, input_shape, runs, json_out)
    if weight_bits not in ("auto", *map(str, range(2, 9))):
        raise ConfigError(
            f"--weight-bits {weight_bits!r} is not auto or a number of bits from 2 to 8",
            fix="use auto (8 with VNNI, else 7), 8, 7, or 2-6 for low-bit weights (e.g. 4)",
        )
    bits: Any = weight_bits if weight_bits == "auto" else int(weight_bits)
    cfg: Any = PTQ(calibration=method, percentile=percentile, weight_bits=bits,
                   num_batches=num_batches, float_prefix=float_prefix, adaround=adaround,
                   brecq=brecq, speed_check=speed_check and float_prefix)  # fmt: skip
    name = "quant.ptq"
    if qat_epochs:
        from slimkit.quant.ptq import resolve_weight_bits
        from slimkit.quant.qat import QAT

        if max_drop is not None:
            raise ConfigError("--max-drop and --qat-epochs cannot be combined",
                              fix="drop one: QAT trains every layer at --weight-bits")  # fmt: skip
        cfg = QAT(cfg.replace(speed_check=False), weight_bits=resolve_weight_bits(bits),
                  epochs=qat_epochs, lr=qat_lr)  # fmt: skip
        name = "quant.qat"
    shape = parse_shape(input_shape) if input_shape else None
    rm = resolve_model(model, weights=weights, input_shape=shape, progress=not json_out)
    if calib is None and default_data(rm) is None:
        raise ReferenceResolutionError(
            f"no calibration data for {model!r}",
            fix="pass --calib zoo:TASK, file.npz or package.module:loader",
        )
    if max_drop is not None and rm.task is None:
        raise ConfigError(
            "--max-drop needs a metric: a zoo model with a bundled task",
            fix="in Python: quantize_with_fallback(model, data=..., metric=fn, max_drop=...)",
        )
    step = Step(name, cfg, max_drop=max_drop)
    recipe = Recipe.for_model(model, weights=weights, input_shape=shape, data=calib, batch_size=8,
                              steps=(step,))  # fmt: skip
    with stages(not json_out) as stage:
        res = run(recipe, model=rm, out=out, progress=not json_out, on_event=stage)
    meta = res.steps[0].details
    with err_console.status("timing ONNX Runtime fp32 vs int8"):
        cmp = compare(res, labels=("fp32", "int8"), runs=runs)
    metrics = _metrics(cmp, "int8")
    floated = meta["float_prefix_layers"]
    result = {
        "model": model,
        "config": cfg.to_dict(),
        "weight_bits": meta["weight_bits"],
        "tool_s": round(res.seconds, 2),
        "size_mb": cmp.to_dict()["size_mb"],
        "latency_ms": cmp.to_dict()["latency_ms"],
        "metrics": metrics,
        "kernels": res.kernels.to_dict(),
        "onnx": res.onnx.to_dict(),
        "float_layers": meta["float_layers"],
        "speed_check": meta.get("speed", {}),
    }
    if "fallback" in meta:
        result["fallback"] = meta["fallback"]
    for key in ("adaround", "brecq"):
        if key in meta:
            result[key] = meta[key]
    diagnosis = _diagnose(res) if diagnose else None
    if diagnose:
        result["diagnosis"] = (
            {**diagnosis.to_dict(), "summary": diagnosis.summary()}
            if diagnosis
            else {"skipped": FLOAT_RESULT}
        )
    run_info = res.to_dict()
    extra = {k: run_info[k] for k in ("machine", "versions")}
    write_metrics(
        out, {**result, **extra, "recipe": run_info["recipe"], "steps": run_info["steps"]}
    )
    if json_out:
        emit_json({**result, **extra})
        return
    kernels = res.kernels
    rows = _rows(cmp, metrics, "int8")
    rows.append(["integer kernels / float compute ops", "-",
                 f"{kernels.integer} / {kernels.float_compute}"])  # fmt: skip
    how = f"QAT {qat_epochs} epochs" if qat_epochs else "PTQ"
    wb = result["weight_bits"]  # below 7: low-bit codes on the int8 kernels (W4A8, ...)
    scheme = "int8" if not isinstance(wb, int) or wb >= 7 else f"W{wb}A8"
    console.print(table(f"{rm.name}: {scheme} {how} ({method}, {wb}-bit weights)",
                        ["", "float", scheme], rows))  # fmt: skip
    speed = meta.get("speed", {})
    if "kept_float" in meta:  # int8 timed slower than the source: the float model, said so
        console.print(f"kept float: {meta['kept_float']} ({speed.get('summary', '')})")
    elif floated:
        console.print(f"float (faster in float on this CPU, timed): {', '.join(floated)}")
    if speed.get("summary") and "kept_float" not in meta:
        console.print(f"speed check: {speed['summary']}")
    if "fallback_summary" in meta:
        console.print(f"float fall-back (val split): {meta['fallback_summary']}")
    for key in ("adaround", "brecq"):
        if key in meta:
            console.print(meta[key])
    if diagnose:
        _print_diagnosis(diagnosis)
    console.print(f"[dim]tool time {res.seconds:.1f} s; artifact in {out}/ "
                  "(recipe.yaml repeats it: slimkit run)[/]")  # fmt: skip


FLOAT_RESULT = "the result is the float model (int8 was slower here): nothing to split"


def _diagnose(res: Any) -> Any:
    """``quant.diagnose`` of the run's quantized model on held-out inputs (up to 8 batches of 8),
    or None when the model came back float."""
    from slimkit.pipeline.measure import held_out_inputs
    from slimkit.quant.diagnose import diagnose
    from slimkit.quant.modules import QuantLayer

    if not any(isinstance(m, QuantLayer) for m in res.model.modules()):
        return None
    xs = held_out_inputs(res.source)
    batches = [tuple(x[i : i + 8] for x in xs) for i in range(0, len(xs[0]), 8)]
    with err_console.status("diagnosing the quantization error"):
        return diagnose(res.model, data=batches, reference=res.source.model)


def _print_diagnosis(d: Any) -> None:
    if d is None:
        console.print(f"diagnosis: {FLOAT_RESULT}")
        return
    console.print(f"diagnosis: {d.summary().splitlines()[0]}")
    rows = [[r["name"], r["bits"], r["sqnr_db"]] for r in d.worst_layers(5)]
    if rows:
        console.print(table("worst layers alone (output SQNR, weights only)",
                            ["layer", "bits", "dB"], rows))  # fmt: skip


def _metrics(cmp: Any, label: str) -> dict[str, Any]:
    """SQNR and the zoo task's metrics of fp32 (``*_float``) and the result (``*_LABEL_ort``)."""
    metrics: dict[str, Any] = {"sqnr_db": cmp.sqnr_db}
    for name, values in cmp.task.items():
        for key in ("top1", "perplexity"):
            if key in values:
                metrics[f"{key}_{'float' if name == 'fp32' else label + '_ort'}"] = values[key]
    return metrics


def _rows(cmp: Any, metrics: dict[str, Any], label: str) -> list[list[Any]]:
    """The float vs ``label`` table: size, latency, speed-up, SQNR, task metrics."""
    f_ms, q_ms = cmp.latency["fp32"].median_ms, cmp.latency[label].median_ms
    rows: list[list[Any]] = [
        ["ONNX size (MB)", cmp.size_bytes["fp32"] / 1e6, cmp.size_bytes[label] / 1e6],
        ["ORT latency, batch 1 (ms)", f_ms, q_ms],
        ["speed-up", 1.0, f_ms / q_ms],
        ["SQNR vs float (dB)", "-", metrics["sqnr_db"]],
    ]
    for k in ("top1", "perplexity"):
        if f"{k}_float" in metrics:
            rows.append([f"test {k}", metrics[f"{k}_float"], metrics[f"{k}_{label}_ort"]])
    return rows


def _weight_only(method: str) -> dict[str, Any] | None:
    """The ``quant.int4`` config fields ``method`` names (``int4-gptq``), or None."""
    return _method_fields(method, "quant.int4")


def _method_fields(method: str, registered: str) -> dict[str, Any] | None:
    """The config fields that ``method`` (a name or alias) gives ``registered``, or None."""
    from slimkit.core.verbs import names

    hit = names("quant").get(method.strip().lower().replace("-", "_"))
    return dict(hit[1]) if hit is not None and hit[0].name == registered else None


def _lowbit_cmd(model: str, out: Path, calib: str | None, fields: dict[str, Any],
                weights: Path | None, input_shape: str | None, runs: int,
                json_out: bool) -> None:  # fmt: skip
    """Binary / ternary / pow2 / k-means weights (``quant.lowbit``, experimental): the artifact's
    model.onnx stores small integer codes; it runs as float weights (smaller, not faster)."""
    from slimkit.pipeline.artifact import write_metrics
    from slimkit.pipeline.measure import compare
    from slimkit.pipeline.recipe import Recipe, Step
    from slimkit.pipeline.refs import parse_shape, resolve_model
    from slimkit.pipeline.runner import run
    from slimkit.quant.nonuniform import LowBit

    cfg = LowBit.from_dict(fields)
    label = f"{cfg.scheme} {cfg.code_bits}-bit"
    shape = parse_shape(input_shape) if input_shape else None
    rm = resolve_model(model, weights=weights, input_shape=shape, progress=not json_out)
    data = None  # fine-tuning trains on the task's train split, not on calibration samples
    if cfg.epochs and calib is None and rm.task is not None:
        from slimkit.zoo import load_task

        data = load_task(rm.task).loader("train", 64, shuffle=True)
    recipe = Recipe.for_model(model, weights=weights, input_shape=shape, data=calib, batch_size=8,
                              steps=(Step("quant.lowbit", cfg),))  # fmt: skip
    with stages(not json_out) as stage:
        res = run(recipe, model=rm, data=data, out=out, progress=not json_out, on_event=stage)
    with err_console.status(f"timing ONNX Runtime fp32 vs {label}"):
        cmp = compare(res, labels=("fp32", label), runs=runs)
    metrics = _metrics(cmp, label)
    details, run_info = res.steps[0].details, res.to_dict()
    result = {"model": model, "method": "quant.lowbit", "experimental": True,
              "config": cfg.to_dict(), "tool_s": round(res.seconds, 2),
              "size_mb": cmp.to_dict()["size_mb"], "latency_ms": cmp.to_dict()["latency_ms"],
              "metrics": metrics, "float_layers": details.get("float_layers", []),
              "onnx": res.onnx.to_dict() if res.onnx is not None else None,
              **{k: run_info[k] for k in ("machine", "versions")}}  # fmt: skip
    write_metrics(out, {**result, "recipe": run_info["recipe"], "steps": run_info["steps"]})
    if json_out:
        emit_json(result)
        return
    tuned = f", fine-tuned {cfg.epochs} epochs" if cfg.epochs else ""
    console.print(table(f"{rm.name}: {label} weights{tuned} (experimental)",
                        ["", "float", label], _rows(cmp, metrics, label)))  # fmt: skip
    console.print(f"kept float (first / last): {', '.join(result['float_layers']) or 'none'}; "
                  f"{details.get('note', '')}")  # fmt: skip
    console.print(f"[dim]tool time {res.seconds:.1f} s; artifact in {out}/[/]")


def _weight_only_cmd(
    model: str,
    out: Path,
    calib: str | None,
    fields: dict[str, Any],
    weights: Path | None,
    input_shape: str | None,
    runs: int,
    json_out: bool,
) -> None:
    """Weight-only int4 / int8 (``quant.int4``): the artifact's model.onnx runs MatMulNBits."""
    from slimkit.pipeline.artifact import write_metrics
    from slimkit.pipeline.measure import compare
    from slimkit.pipeline.recipe import Step
    from slimkit.quant.int4 import Int4

    cfg = Int4.from_dict(fields)
    label = f"int{cfg.bits}"
    rm, res = _run_step(model, out, calib, weights, input_shape, json_out, Step("quant.int4", cfg))
    with err_console.status(f"timing ONNX Runtime fp32 vs {label}"):
        cmp = compare(res, labels=("fp32", label), runs=runs)
    metrics = _metrics(cmp, label)
    run_info = res.to_dict()
    result = {"model": model, "method": "quant.int4", "config": cfg.to_dict(),
              "tool_s": round(res.seconds, 2), "size_mb": cmp.to_dict()["size_mb"],
              "latency_ms": cmp.to_dict()["latency_ms"], "metrics": metrics,
              "onnx": res.onnx.to_dict() if res.onnx is not None else None,
              **{k: run_info[k] for k in ("machine", "versions")}}  # fmt: skip
    write_metrics(out, {**result, "recipe": run_info["recipe"], "steps": run_info["steps"]})
    if json_out:
        emit_json(result)
        return
    rows = _rows(cmp, metrics, label)
    title = f"{rm.name}: weight-only {label} {cfg.method}, group {cfg.group_size} (MatMulNBits)"
    console.print(table(title, ["", "float", label], rows))
    console.print(f"[dim]tool time {res.seconds:.1f} s; artifact in {out}/ "
                  "(recipe.yaml repeats it: slimkit run)[/]")  # fmt: skip


def parse_size_mb(text: str) -> float:
    """``"0.5MB"``, ``"200KB"``, ``"1.2GB"`` or a plain number of MB -> MB."""
    from slimkit.errors import ConfigError

    t = text.strip().upper().replace(" ", "")
    for unit, mb in (("GB", 1e3), ("MB", 1.0), ("KB", 1e-3), ("B", 1e-6)):
        if t.endswith(unit):
            t, scale = t[: -len(unit)], mb
            break
    else:
        scale = 1.0
    try:
        return float(t) * scale
    except ValueError:
        raise ConfigError(f"--max-size {text!r} is not a size",
                          fix="write it like 0.5MB, 200KB or 0.5 (MB)") from None  # fmt: skip


def _mixed_cmd(model: str, out: Path, calib: str | None, weights: Path | None,
               input_shape: str | None, runs: int, json_out: bool, num_batches: int,
               budget: dict[str, Any]) -> None:  # fmt: skip
    """Mixed precision (``quant.mixed``): a format per layer under the budget, or a given plan;
    prints the bit-width distribution and writes the plan (``--plan-out``)."""
    from slimkit.pipeline.artifact import write_metrics
    from slimkit.pipeline.measure import compare
    from slimkit.pipeline.recipe import Step
    from slimkit.quant.mixed import Mixed, save_plan
    from slimkit.search.constraints import TIME_UNITS, parse_quantity

    size, plan, plan_out = budget["max_size"], budget["plan"], budget["plan_out"]
    latency = parse_quantity(budget.get("max_latency"), TIME_UNITS, "--max-latency", "2ms")
    cfg = Mixed(max_size_mb=parse_size_mb(size) if size else None, avg_bits=budget["avg_bits"],
                max_latency_ms=latency, plan=str(plan) if plan else None,
                num_batches=num_batches)  # fmt: skip
    rm, res = _run_step(model, out, calib, weights, input_shape, json_out, Step("quant.mixed", cfg))
    rec = res.steps[0].details
    if plan_out is not None:
        save_plan(rec, plan_out)
    with err_console.status("timing ONNX Runtime fp32 vs mixed"):
        cmp = compare(res, labels=("fp32", "mixed"), runs=runs)
    metrics = _metrics(cmp, "mixed")
    run_info = res.to_dict()
    result = {"model": model, "method": "quant.mixed", "config": cfg.to_dict(),
              "plan": rec["plan"], "bit_widths": rec["bit_widths"], "avg_bits": rec["avg_bits"],
              "within_budget": rec["within_budget"], "tool_s": round(res.seconds, 2),
              "within_latency_budget": rec.get("within_latency_budget"),
              "size_mb": cmp.to_dict()["size_mb"], "latency_ms": cmp.to_dict()["latency_ms"],
              "metrics": metrics, **{k: run_info[k] for k in ("machine", "versions")}}  # fmt: skip
    write_metrics(out, {**result, "recipe": run_info["recipe"], "steps": run_info["steps"]})
    if json_out:
        emit_json(result)
        return
    console.print(table(f"{rm.name}: mixed precision", ["", "float", "mixed"],
                        _rows(cmp, metrics, "mixed")))  # fmt: skip
    console.print(rec["distribution"])
    if plan_out is not None:
        console.print(f"plan written to {plan_out} (edit it, then --plan {plan_out})")
    console.print(f"[dim]tool time {res.seconds:.1f} s; artifact in {out}/[/]")


def _run_step(model: str, out: Path, calib: str | None, weights: Path | None,
              input_shape: str | None, json_out: bool, step: Any) -> tuple[Any, Any]:  # fmt: skip
    """The resolved model and the run of a one-step recipe that writes the artifact ``out``."""
    from slimkit.pipeline.recipe import Recipe
    from slimkit.pipeline.refs import parse_shape, resolve_model
    from slimkit.pipeline.runner import run

    shape = parse_shape(input_shape) if input_shape else None
    rm = resolve_model(model, weights=weights, input_shape=shape, progress=not json_out)
    recipe = Recipe.for_model(model, weights=weights, input_shape=shape, data=calib, batch_size=8,
                              steps=(step,))  # fmt: skip
    with stages(not json_out) as stage:
        return rm, run(recipe, model=rm, out=out, progress=not json_out, on_event=stage)
