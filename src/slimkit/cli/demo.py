"""``slimkit demo``: what slimkit does today, end to end, on a model it trains itself.

Train (or load from the cache) a zoo model, measure its accuracy on the held-out test split, export
it to ONNX and check ONNX Runtime against PyTorch, quantize it to int8 (integer kernels in ORT),
measure the deployed accuracy of both files, and time PyTorch eager, ORT fp32 and ORT int8.
Each later capability (pruning, distillation, ...) adds its step here.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import typer

from slimkit.cli._ui import console, emit_json, err_console, friendly_errors, table


@friendly_errors
def demo_cmd(
    model: str = typer.Option("digits_cnn", help="a trained zoo model (see `slimkit zoo list`)"),
    out: Path = typer.Option(Path("out/demo"), help="where the artifact is written"),
    runs: int = typer.Option(50, min=1, help="timed runs per round"),
    rounds: int = typer.Option(3, min=1, help="interleaved latency rounds"),
    json_out: bool = typer.Option(False, "--json", help="print JSON instead of tables"),
) -> None:
    """Train, evaluate, export, quantize and time a zoo model, end to end."""
    from slimkit.analyze.latency import measure_latency, ort_runner, torch_runner
    from slimkit.core.io import save_weights, write_json
    from slimkit.core.machine import configure_threads, machine_info, versions
    from slimkit.export.onnx import export_onnx
    from slimkit.export.ort import OrtModule, ort_session
    from slimkit.export.qdq import export_quantized
    from slimkit.quant.ptq import PTQ, quantize_ptq
    from slimkit.zoo import PRETRAINED, evaluate, load_task, pretrained

    configure_threads(2)
    t0 = time.perf_counter()
    recipe = PRETRAINED.get(model)
    say = (lambda _m: None) if json_out else (lambda m: err_console.print(f"[bold cyan]>[/] {m}"))
    say(f"1/6 training {model} ({recipe.model} on {recipe.task}); cached after the first run")
    net = pretrained(model, progress=not json_out)
    task = load_task(recipe.task)
    key = "top1" if task.kind == "classification" else "perplexity"
    say("2/6 evaluating on the held-out test split")
    metrics_pt = evaluate(net, task, "test")
    say("3/6 exporting to ONNX and checking ONNX Runtime against PyTorch")
    out.mkdir(parents=True, exist_ok=True)
    x1 = task.test.tensors[0][:1]
    rep = export_onnx(net, out / "model.onnx", example_inputs=(x1,))
    sess_fp32 = ort_session(rep.path)
    metrics_ort = evaluate(OrtModule(sess_fp32), task, "test")
    say("4/6 quantizing to int8 (calibration on the training split) and exporting")
    q = quantize_ptq(net, PTQ(), data=task.calibration(n=256, batch_size=8))
    rep_q, kernels = export_quantized(q, out / "model_int8.onnx", example_inputs=(x1,))
    sess_int8 = ort_session(rep_q.path)
    say("5/6 evaluating the int8 file in ONNX Runtime")
    metrics_int8 = evaluate(OrtModule(sess_int8), task, "test")
    say(f"6/6 timing PyTorch eager, ORT fp32 and ORT int8 ({rounds} interleaved rounds)")
    xb = task.test.tensors[0][:64]
    lat: dict[int, dict[str, Any]] = {}
    for batch, x in ((1, x1), (xb.shape[0], xb)):
        stats = measure_latency(
            {"pytorch eager": torch_runner(net, [x]), "ort fp32": ort_runner(sess_fp32, [x]),
             "ort int8": ort_runner(sess_int8, [x])},
            runs=runs, rounds=rounds, warmup=5,
        )  # fmt: skip
        lat[batch] = {k: v.to_dict() for k, v in stats.items()}
    save_weights(net, out / "model.safetensors", metadata={"zoo": model})
    result = {
        "model": model,
        "task": recipe.task,
        "metric": key,
        "pytorch": metrics_pt,
        "onnxruntime": metrics_ort,
        "onnxruntime_int8": metrics_int8,
        "onnx": rep.to_dict(),
        "onnx_int8": rep_q.to_dict(),
        "int8_kernels": kernels.to_dict(),
        "int8_float_layers": q.meta["slimkit"]["float_layers"],  # timed: faster in float here
        # int8 against fp32 on ORT here: "float" when int8 was slower (never slower than source)
        "int8_speed_check": q.meta["slimkit"].get("speed", {}),
        "params": sum(p.numel() for p in net.parameters()),
        "latency_ms": lat,
        "machine": machine_info(),
        "versions": versions(),
        "seconds": round(time.perf_counter() - t0, 1),
    }
    write_json(out / "metrics.json", result)
    if json_out:
        emit_json(result)
        return
    rows: list[list[Any]] = [
        [f"test {key}", metrics_pt[key], metrics_ort[key], metrics_int8[key]],
        ["ONNX size (kB)", "-", rep.size_bytes / 1e3, rep_q.size_bytes / 1e3],
        ["max abs err vs PyTorch", "-", rep.max_abs_err, "-"],
        ["integer kernels", "-", "-", kernels.integer],
        ["kept (timed in ORT)", "-", "-", result["int8_speed_check"].get("decision", "int8")],
    ]
    for batch, by_runtime in lat.items():
        ms = [by_runtime[k]["median_ms"] for k in ("pytorch eager", "ort fp32", "ort int8")]
        rows.append([f"latency ms, batch {batch}", *ms])
    console.print(table(f"slimkit demo: {model} on {recipe.task}",
                        ["", "PyTorch fp32", "ORT fp32", "ORT int8"], rows))  # fmt: skip
    cpu = machine_info()
    console.print(
        f"[dim]{cpu['cpu']}, {cpu['cores']} cores, flags {' '.join(cpu['flags']) or '-'}; "
        f"artifact in {out}/ (model.onnx, model_int8.onnx, model.safetensors, metrics.json); "
        f"{result['seconds']} s[/]"
    )
