"""``slimkit quantize MODEL --calib DATA --out DIR``: static int8 PTQ, exported and measured."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

import typer

from slimkit.cli._ui import console, emit_json, err_console, friendly_errors, table


@friendly_errors
def quantize_cmd(
    model: str = typer.Argument(..., help="zoo:NAME, file.pt2, or package.module:factory"),
    out: Path = typer.Option(..., "--out", "-o", help="artifact directory to write"),
    calib: str | None = typer.Option(
        None,
        help="calibration data: zoo:TASK[:split], file.npz, pkg.mod:loader "
        "(default: the zoo model's own training split)",
    ),  # fmt: skip
    method: str = typer.Option("mse", help="minmax | percentile | entropy | mse"),
    percentile: float = typer.Option(99.999, help="for --method percentile"),
    weight_bits: str = typer.Option("auto", help="auto (8 with VNNI, else 7) | 7 | 8"),
    num_batches: int = typer.Option(32, min=1, help="calibration batches"),
    weights: Path | None = typer.Option(None, help="safetensors weights for a factory model"),
    input_shape: str | None = typer.Option(None, help="e.g. 1,3,224,224 when slimkit can't know"),
    max_drop: float | None = typer.Option(
        None, min=0.0, help="keep the fewest layers in float so val top-1 drops at most this"
    ),
    float_prefix: bool = typer.Option(
        True,
        "--float-prefix/--all-int8",
        help="keep the first layers float where ORT runs them faster (timed here), or not",
    ),  # fmt: skip
    runs: int = typer.Option(30, min=1, help="timed runs per latency round"),
    json_out: bool = typer.Option(False, "--json", help="print JSON instead of a table"),
) -> None:
    """Quantize to int8 (ONNX Runtime integer kernels) and compare size, SQNR, accuracy, latency."""
    import torch
    import yaml

    from slimkit.analyze.latency import measure_latency, ort_runner
    from slimkit.core.io import atomic_write, save_weights, write_json
    from slimkit.core.machine import configure_threads, machine_info, versions
    from slimkit.core.refs import parse_shape, resolve_data, resolve_model
    from slimkit.errors import ReferenceResolutionError
    from slimkit.export.onnx import export_onnx
    from slimkit.export.ort import OrtModule, ort_session, run_session
    from slimkit.export.qdq import export_quantized
    from slimkit.quant.ptq import PTQ, quantize_ptq
    from slimkit.testing.numerics import sqnr

    configure_threads(2)
    bits: Any = weight_bits if weight_bits == "auto" else int(weight_bits)
    cfg = PTQ(calibration=method, percentile=percentile, weight_bits=bits, num_batches=num_batches,
              float_prefix=float_prefix)  # fmt: skip
    shape = parse_shape(input_shape) if input_shape else None
    rm = resolve_model(model, weights=weights, input_shape=shape, progress=not json_out)
    task = None
    if calib is not None:
        data: Any = resolve_data(calib, batch_size=8)
    elif rm.task is not None:
        from slimkit.zoo import load_task

        task = load_task(rm.task)
        data = task.calibration(n=8 * num_batches, batch_size=8)
    elif model.startswith("zoo:"):
        from slimkit.zoo import example_inputs

        data = [example_inputs(rm.name, batch=1, seed=i)[0] for i in range(num_batches)]
    else:
        raise ReferenceResolutionError(
            f"no calibration data for {model!r}",
            fix="pass --calib zoo:TASK, file.npz or package.module:loader",
        )
    t0 = time.perf_counter()
    fallback = None
    if max_drop is not None:
        from slimkit.errors import ConfigError
        from slimkit.quant.fallback import quantize_with_fallback
        from slimkit.zoo import evaluate, load_task

        if rm.task is None:
            raise ConfigError(
                "--max-drop needs a metric: a zoo model with a bundled task",
                fix="in Python: quantize_with_fallback(model, data=..., metric=fn, max_drop=...)",
            )
        val_task = load_task(rm.task)
        key = "top1" if val_task.kind == "classification" else "perplexity"
        sign = 1.0 if key == "top1" else -1.0

        def val_metric(m: Any) -> float:
            return sign * float(evaluate(m, val_task, "val")[key])

        with err_console.status("calibrating, converting, falling back") as st:
            q, fallback = quantize_with_fallback(rm.model, cfg, data=data, metric=val_metric,
                                                 max_drop=max_drop, on_step=st.update)  # fmt: skip
    else:
        with err_console.status("calibrating and converting"):
            q = quantize_ptq(rm.model, cfg, data=data)
    tool_s = time.perf_counter() - t0
    example = rm.inputs(1)
    out.mkdir(parents=True, exist_ok=True)
    with err_console.status("exporting and checking ONNX Runtime's integer kernels"):
        rep, kernels = export_quantized(q, out / "model.onnx", example_inputs=example)
    with tempfile.TemporaryDirectory() as tmp:
        fp32 = export_onnx(rm.model, Path(tmp) / "fp32.onnx", example_inputs=example)
        s_fp32, s_int8 = ort_session(fp32.path), ort_session(rep.path)
        fp32_size = fp32.size_bytes
    eval_x = task.test.tensors[0][:256] if task is not None else _held_out(rm, model)
    with torch.no_grad():
        ref = rm.model(eval_x)
    (deployed,) = run_session(s_int8, [eval_x])
    metrics: dict[str, Any] = {"sqnr_db": sqnr(ref, deployed)}
    if task is not None:
        from slimkit.zoo import evaluate

        key = "top1" if task.kind == "classification" else "perplexity"
        metrics[f"{key}_float"] = evaluate(rm.model, task)[key]
        metrics[f"{key}_int8_ort"] = evaluate(OrtModule(s_int8), task)[key]
    with err_console.status("timing ONNX Runtime fp32 vs int8"):
        lat = measure_latency(
            {"fp32": ort_runner(s_fp32, example), "int8": ort_runner(s_int8, example)},
            runs=runs, warmup=5, rounds=3,
        )  # fmt: skip
    result = {
        "model": model,
        "config": cfg.to_dict(),
        "weight_bits": q.meta["slimkit"]["weight_bits"],
        "tool_s": round(tool_s, 2),
        "size_mb": {"fp32": fp32_size / 1e6, "int8": rep.size_bytes / 1e6},
        "latency_ms": {k: v.to_dict() for k, v in lat.items()},
        "metrics": metrics,
        "kernels": kernels.to_dict(),
        "onnx": rep.to_dict(),
        "machine": machine_info(),
        "versions": versions(),
    }
    # the recipe repeats this artifact: the timed float-prefix choice is written as its result
    floated = q.meta["slimkit"]["float_prefix_layers"]
    step: dict[str, Any] = {"quant.ptq": {**cfg.to_dict(), "float_prefix": floated}}
    result["float_layers"] = q.meta["slimkit"]["float_layers"]
    if fallback is not None:
        result["fallback"] = fallback.to_dict()
        step["scope"] = {"exclude": fallback.float_layers}
    save_weights(q.state_dict(), out / "model.safetensors", metadata={"method": "quant.ptq"})
    with atomic_write(out / "recipe.yaml") as f:
        yaml.safe_dump({"model": model, "steps": [step]}, f, sort_keys=False)
    write_json(out / "metrics.json", result)
    if json_out:
        emit_json(result)
        return
    f_ms, i_ms = lat["fp32"].median_ms, lat["int8"].median_ms
    rows: list[list[Any]] = [
        ["ONNX size (MB)", fp32_size / 1e6, rep.size_bytes / 1e6],
        ["ORT latency, batch 1 (ms)", f_ms, i_ms],
        ["speed-up", 1.0, f_ms / i_ms],
        ["SQNR vs float (dB)", "-", metrics["sqnr_db"]],
    ]
    for k in ("top1", "perplexity"):
        if f"{k}_float" in metrics:
            rows.append([f"test {k}", metrics[f"{k}_float"], metrics[f"{k}_int8_ort"]])
    rows.append(["integer kernels / float compute ops", "-",
                 f"{kernels.integer} / {kernels.float_compute}"])  # fmt: skip
    console.print(table(f"{rm.name}: int8 PTQ ({method}, {result['weight_bits']}-bit weights)",
                        ["", "float", "int8"], rows))  # fmt: skip
    if floated:
        console.print(f"float prefix (faster in float on this CPU, timed): {', '.join(floated)}")
    if fallback is not None:
        console.print(f"float fall-back (val split): {fallback.summary()}")
    console.print(f"[dim]tool time {tool_s:.1f} s; artifact in {out}/[/]")


def _held_out(rm: Any, ref: str) -> Any:
    """Inputs never used for calibration: zoo example inputs at other seeds, or fresh noise."""
    import torch

    if ref.startswith("zoo:"):
        from slimkit.zoo import example_inputs

        return example_inputs(rm.name, batch=8, seed=10_000)[0]
    x = rm.inputs(8)[0]
    return torch.randn_like(x) if x.is_floating_point() else x
