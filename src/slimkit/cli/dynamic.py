"""``slimkit dynamic MODEL --method early-exit --out DIR``: dynamic inference (early exit, learned
block skipping) or lightweight blocks on a trained zoo model, trained on its task, measured on
its test split as run in ONNX Runtime (batch 1, the mean per test image) against the float
model, with a table; the ONNX files and ``metrics.json`` go to ``DIR``."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import typer

from slimkit.cli._ui import console, emit_json, err_console, friendly_errors, status, table
from slimkit.errors import ConfigError

METHODS = ("early-exit", "skip-gate", "separable", "ghost")


@friendly_errors
def dynamic_cmd(
    model: str = typer.Argument(..., help="a trained zoo model with a task: zoo:shapes_resnet18"),
    out: Path = typer.Option(..., "--out", "-o", help="directory to write"),
    method: str = typer.Option("early-exit", help="early-exit | skip-gate | separable | ghost"),
    max_drop: float = typer.Option(0.01, help="early exit: accuracy drop allowed on val"),
    criterion: str = typer.Option("max_softmax", help="early exit: max_softmax | entropy"),
    penalty: float = typer.Option(2.0, help="skip gate: weight of the compute penalty"),
    epochs: int = typer.Option(2, min=0, help="training / distillation epochs"),
    max_steps: int | None = typer.Option(None, min=1, help="cap on training steps"),
    timed_images: int = typer.Option(200, min=1, help="test images per timed round"),
    json_out: bool = typer.Option(False, "--json", help="print JSON instead of a table"),
) -> None:
    """Early exit (heads after 3 stages, thresholds calibrated on the val split), skip gates
    (a learned gate per residual block) or lightweight blocks (separable / ghost, distilled from
    the original); then top-1, average MACs and latency against the float model."""
    import torch

    import slimkit as sk
    from slimkit.analyze.profile import profile_model
    from slimkit.core.io import write_json
    from slimkit.core.machine import configure_threads, machine_info, versions
    from slimkit.dynamic import measure
    from slimkit.export.onnx import export_onnx
    from slimkit.export.ort import ort_session
    from slimkit.pipeline.refs import resolve_model
    from slimkit.zoo import load_task

    configure_threads(2)
    if method not in METHODS:
        raise ConfigError(f"--method {method!r} is unknown", fix=f"use one of {', '.join(METHODS)}")
    rm = resolve_model(model, progress=not json_out)
    if rm.task is None:
        raise ConfigError(
            f"{model} has no bundled task to train and calibrate on",
            fix="use a trained zoo model (slimkit zoo list), or the Python API with your data",
        )
    task = load_task(rm.task)
    src = rm.model.eval()
    x1 = task.test.tensors[0][:1]
    train = task.loader("train", 64, shuffle=True, seed=0)
    test = task.loader("test", 256)
    out.mkdir(parents=True, exist_ok=True)
    show = not json_out
    export_onnx(src, out / "float.onnx", example_inputs=(x1,))
    sess = ort_session(out / "float.onnx")
    name_in = sess.get_inputs()[0].name
    runners: dict[str, Any] = {"float": lambda a: sess.run(None, {name_in: a})[0]}
    full = profile_model(src, (x1,)).total_macs
    info: dict[str, Any] = {}
    if method == "early-exit":
        cfg = sk.dynamic.EarlyExit(max_drop=max_drop, criterion=criterion, epochs=epochs,  # type: ignore[arg-type]
                                   max_steps=max_steps)  # fmt: skip
        ee = sk.dynamic.early_exit(src, cfg, data=train, calib=task.loader("val", 256),
                                   progress=show)  # fmt: skip
        ev = ee.evaluate(test)
        run = sk.dynamic.export_early_exit(ee, out / "early_exit", example_inputs=x1)
        runners[method] = lambda a: run(a)[0]
        info = {k: ev[k] for k in ("exit_fractions", "thresholds", "avg_macs", "macs_saved")}
        info["exits_after"], config = ee.cuts, cfg.to_dict()
    elif method == "skip-gate":
        scfg = sk.dynamic.SkipGates(penalty=penalty, epochs=epochs, max_steps=max_steps)
        sg = sk.dynamic.skip_gates(src, scfg, data=train, progress=show)
        ev = sg.evaluate(test)
        srun = sk.dynamic.export_skip_gates(sg, out / "skip_gates", example_inputs=x1)
        runners[method] = lambda a: srun(a)[0]
        info = {k: ev[k] for k in ("blocks", "run_fractions", "avg_macs", "macs_saved")}
        config = scfg.to_dict()
    else:
        lcls = sk.lightweight.Separable if method == "separable" else sk.lightweight.Ghost
        lcfg = lcls(epochs=epochs, max_steps=max_steps)
        small = sk.lighten(copy.deepcopy(src), lcfg, data=train, progress=show)
        sk.lightweight.save_lightweight(small, out)  # sk.load(out, model=original) rebuilds it
        export_onnx(small, out / "model.onnx", example_inputs=(x1,))
        lsess = ort_session(out / "model.onnx")
        runners[method] = lambda a: lsess.run(None, {name_in: a})[0]
        macs = profile_model(small, (x1,)).total_macs
        info = {"avg_macs": macs, "macs_saved": 1 - macs / full,
                "layers": sk.report(small).record["layers"]}  # fmt: skip
        config = lcfg.to_dict()
    images = [a[None].numpy() for a in task.test.tensors[0]]
    labels = task.test.tensors[1].numpy()
    with status("measuring top-1 on the test split in ONNX Runtime", enabled=show):
        acc = {k: measure.top1(fn, images, labels) for k, fn in runners.items()}
    with status("timing ONNX Runtime at batch 1, float vs " + method, enabled=show):
        lat = measure.mean_latency(runners, images[:timed_images], rounds=3)
    result = {
        "model": model, "method": method, "config": config, "top1": acc,
        "latency_ms": {k: v["latency_ms"] for k, v in lat.items()}, "timing": lat,
        "full_macs": full, **info, "torch_version": torch.__version__,
        "machine": machine_info(), "versions": versions(),
    }  # fmt: skip
    write_json(out / "metrics.json", result)
    if json_out:
        emit_json(result)
        return
    f_ms, d_ms = lat["float"]["latency_ms"], lat[method]["latency_ms"]
    rows: list[list[Any]] = [
        ["test top-1 (ORT)", acc["float"], acc[method]],
        ["MACs per image (average)", full, round(info["avg_macs"])],
        ["MACs saved", 0.0, info["macs_saved"]],
        [f"ORT latency, batch 1, mean of {len(images[:timed_images])} images (ms)", f_ms, d_ms],
        ["speed-up", 1.0, f_ms / d_ms],
    ]
    console.print(table(f"{rm.name}: {method}", ["", "float", method], rows))
    if "exit_fractions" in info:
        fr = ", ".join(f"{f:.1%}" for f in info["exit_fractions"])
        console.print(f"exits after {', '.join(info['exits_after'])}, then the end: {fr}")
    if "run_fractions" in info:
        fr = ", ".join(f"{b} {f:.0%}" for b, f in zip(info["blocks"], info["run_fractions"],
                                                      strict=True))  # fmt: skip
        console.print(f"blocks run: {fr}")
    what = "ONNX files, metrics.json"
    if method in ("separable", "ghost"):
        what += "; model.safetensors + lightweight.json: sk.load(DIR, model=original)"
    err_console.print(f"[dim]written to {out}/ ({what})[/]")
