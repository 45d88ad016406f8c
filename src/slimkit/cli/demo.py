"""``slimkit demo``: the whole story on the embedded defaults, in a few minutes on 2 cores.

Load a zoo model (trained once, then cached), analyse it (parameters, MACs, the per-layer roofline
on this machine's measured profile), export it to ONNX and check ONNX Runtime against PyTorch,
then compress it under constraints with ``slimkit.compress`` (the planner's recipe, an Optuna
search whose every candidate is exported and measured in ONNX Runtime), evaluate the chosen model
as deployed on the held-out test split, time PyTorch eager, ORT fp32 and ORT compressed in
interleaved rounds, and write the artifact's ``report.html``. Ends with the table original against
compressed and the report's path.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import Any

import typer

from slimkit.cli._ui import console, emit_json, err_console, friendly_errors, status, table

STEPS = 7
# what a previous demo left in its folder (model_int8.onnx: the demo before the search)
FRESH = ("search.db", "trials", "search.json", "model.onnx", "metrics.json", "report.html",
         "model_int8.onnx")  # fmt: skip


@friendly_errors
def demo_cmd(
    model: str = typer.Option("digits_cnn", help="a trained zoo model (see `slimkit zoo list`)"),
    out: Path = typer.Option(
        Path("out/demo"), help="the demo's artifact folder (a previous demo's files are replaced)"
    ),
    max_size: str = typer.Option("25KB", help="ONNX file size goal (int8 alone gives 34 KB)"),
    max_drop: str = typer.Option("1%", help="largest test-metric drop the search may accept"),
    max_latency: str | None = typer.Option(None, help="ORT latency goal at batch 1: 1ms"),
    trials: int = typer.Option(12, min=1, help="search trials (each one exported and timed)"),
    time_budget: str = typer.Option("4m", help="the search's wall-clock budget: 90s, 4m"),
    finetune: bool = typer.Option(
        False, "--finetune/--no-finetune", help="let candidates recover by fine-tuning (slower)"
    ),
    quick: bool = typer.Option(False, help="3 trials and short timing: a smoke run (~1 min)"),
    runs: int = typer.Option(50, min=1, help="timed runs per round"),
    rounds: int = typer.Option(3, min=1, help="interleaved latency rounds"),
    json_out: bool = typer.Option(False, "--json", help="print JSON instead of tables"),
) -> None:
    """Load, analyse, compress under constraints, export, measure in ORT and report a zoo model."""
    # before torch loads: OpenMP threads that spin while idle made PyTorch eager 100-1000x slower
    # on a busy 2-core machine (0.35 ms -> 156 ms a batch), as in the tests' conftest
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    from slimkit.core.machine import configure_threads, machine_info, versions
    from slimkit.search.constraints import Constraints
    from slimkit.zoo import PRETRAINED, load_task, pretrained

    configure_threads(2)
    if quick:
        trials, runs, rounds = min(trials, 3), min(runs, 10), min(rounds, 2)
    c = Constraints.parse(size=max_size, latency=max_latency, drop=max_drop, batch=1)
    budget = _seconds(time_budget)
    t0 = time.perf_counter()
    recipe = PRETRAINED.get(model)
    say = (lambda _m: None) if json_out else (lambda m: err_console.print(f"[bold cyan]>[/] {m}"))

    say(f"1/{STEPS} loading {model} ({recipe.model} on {recipe.task}): trained once, then cached")
    net = pretrained(model, progress=not json_out).eval()
    task = load_task(recipe.task)
    key = "top1" if task.kind == "classification" else "perplexity"
    x1, xb = task.test.tensors[0][:1], task.test.tensors[0][:64]

    say(f"2/{STEPS} analysing: this machine's hardware profile (measured once) and the roofline")
    with status("measuring this machine (once) and profiling the layers", not json_out):
        analysis = _analyse(net, x1)
    if not json_out:
        _print_analysis(model, analysis)

    say(f"3/{STEPS} exporting to ONNX and checking ONNX Runtime against PyTorch (test split)")
    out.mkdir(parents=True, exist_ok=True)
    for stale in FRESH:  # the demo's own folder: a fresh search every run
        p = out / stale
        if p.is_dir():
            shutil.rmtree(p)
        p.unlink(missing_ok=True)
    with status("exporting and evaluating in ONNX Runtime", not json_out):
        base = _baseline(net, task, x1, out / "source.onnx")

    say(f"4/{STEPS} compressing to {c.describe()}: plan, then {trials} trials, each in ORT")
    from slimkit.cli.compress import _print as print_search
    from slimkit.cli.compress import _run as run_search
    from slimkit.search.compress import compress

    res = run_search(compress, f"zoo:{model}", c, out=out, budget=budget, trials=trials,
                     quiet=json_out, space=None if finetune else {"recovery_epochs": [0]},
                     stop_when_met=False)  # fmt: skip
    if not json_out:
        print_search(res, False)

    small: dict[str, Any] | None = None
    if res.met:
        say(f"5/{STEPS} evaluating the compressed model in ONNX Runtime (test split)")
        with status("evaluating model.onnx in ONNX Runtime", not json_out):
            small = _deployed(res.out / "model.onnx", task)
        from slimkit.report.collect import read_json

        written = read_json(res.out / "metrics.json") or {}
        small["steps"] = [next((k for k in st if k not in ("via", "seconds", "details")), "?")
                          for st in written.get("steps") or []]  # fmt: skip
        small["kernels"] = written.get("kernels")
    else:
        say(f"5/{STEPS} no candidate met every goal: the original is the comparison's only model")

    say(f"6/{STEPS} timing PyTorch eager, ORT fp32 and ORT compressed ({rounds} rounds)")
    with status(f"timing {runs} runs x {rounds} rounds at batch 1 and 64", not json_out):
        lat = _timings(net, base["session"], small["session"] if small else None, x1, xb, runs,
                       rounds)  # fmt: skip

    say(f"7/{STEPS} writing the report")
    result = {
        "model": model,
        "task": recipe.task,
        "metric": key,
        "constraints": c.to_dict(),
        "pytorch": base["pytorch"],
        "onnxruntime": base["ort"],
        "onnxruntime_compressed": small and small["metrics"],
        "compressed_steps": small and small["steps"],
        "compressed_kernels": small and small["kernels"],
        "size_mb": {"onnx_fp32": base["size_mb"], "compressed": small and small["size_mb"]},
        "onnx": base["export"],
        "params": sum(p.numel() for p in net.parameters()),
        "macs": analysis["macs"],
        "roofline": analysis["summary"],
        "latency_ms": lat,
        "compress": {"met": res.met, "chosen": res.chosen, "message": res.message,
                     "trials": len(res.search.get("trials") or []), "stopped": res.stopped},
        "machine": machine_info(),
        "versions": versions(),
    }  # fmt: skip
    with status("per-layer sensitivity and report.html", not json_out):
        report = _report(out, result, small)
    result["report"] = str(report) if report else None
    result["seconds"] = round(time.perf_counter() - t0, 1)
    if json_out:
        emit_json(result)
        return
    _print_summary(result, key)


def _seconds(text: str) -> float:
    from slimkit.search.constraints import TIME_UNITS, parse_quantity

    per = {k: v / 1e3 for k, v in TIME_UNITS.items()} | {"m": 60.0, "h": 3600.0, "": 1.0}
    return parse_quantity(text, per, "--time-budget", "90s, 4m or 1h") or 240.0


def _analyse(net: Any, x1: Any) -> dict[str, Any]:
    """Parameters, MACs and the roofline of ``net`` on this machine's profile."""
    from slimkit.analyze.hardware import load_profile
    from slimkit.analyze.profile import profile_model
    from slimkit.analyze.roofline import roofline

    hw = load_profile("this")  # measured once per machine and cached; the planner reads it too
    prof = profile_model(net, (x1,))
    rf = roofline(prof, hw)
    return {
        "params": prof.total_params,
        "macs": prof.total_macs,
        "summary": rf.summary,
        "predicted_ms": rf.total_s * 1e3,
        "top": [(r.name, r.op, r.bound, r.time_s * 1e6) for r in rf.top(3)],
        "hardware": hw.name,
    }


def _print_analysis(model: str, a: dict[str, Any]) -> None:
    rows: list[list[Any]] = [
        ["parameters", f"{a['params']:,}"],
        ["MACs per sample", f"{a['macs']:,}"],
        [f"roofline ({a['hardware']})", a["summary"]],
    ]
    rows += [[f"slowest layer: {n} ({op})", f"{bound}-bound, {us:.3g} µs"]
             for n, op, bound, us in a["top"]]  # fmt: skip
    console.print(table(f"analysis: {model}", ["", ""], rows))


def _baseline(net: Any, task: Any, x1: Any, path: Path) -> dict[str, Any]:
    """The original as shipped today: fp32 ONNX, its parity and test metric in ORT."""
    from slimkit.export.onnx import export_onnx
    from slimkit.export.ort import OrtModule, ort_session
    from slimkit.zoo import evaluate

    rep = export_onnx(net, path, example_inputs=(x1,))
    sess = ort_session(rep.path)  # as the search judges it (spinning pool)
    return {
        "pytorch": evaluate(net, task, "test"),
        "ort": evaluate(OrtModule(sess), task, "test"),
        "size_mb": rep.size_bytes / 1e6,
        "export": rep.to_dict(),
        "session": sess,
    }


def _deployed(path: Path, task: Any) -> dict[str, Any]:
    from slimkit.export.ort import OrtModule, ort_session
    from slimkit.zoo import evaluate

    sess = ort_session(path)
    metrics = evaluate(OrtModule(sess), task, "test")
    return {"metrics": metrics, "size_mb": path.stat().st_size / 1e6, "session": sess}


def _timings(
    net: Any, fp32: Any, small: Any, x1: Any, xb: Any, runs: int, rounds: int
) -> dict[int, dict[str, Any]]:
    """Median latency of each runtime at batch 1 and 64, timed in interleaved rounds."""
    from slimkit.analyze.latency import measure_latency, ort_runner, torch_runner

    lat: dict[int, dict[str, Any]] = {}
    for x in (x1, xb):
        runners = {"pytorch eager": torch_runner(net, [x]), "ort fp32": ort_runner(fp32, [x])}
        if small is not None:
            runners["ort compressed"] = ort_runner(small, [x])
        stats = measure_latency(runners, runs=runs, rounds=rounds, warmup=5)
        lat[int(x.shape[0])] = {k: v.to_dict() for k, v in stats.items()}
    return lat


def _report(out: Path, result: dict[str, Any], small: dict[str, Any] | None) -> Path | None:
    """Add the demo's test-split measurements to the artifact's metrics.json (the report's
    source-vs-result cards read them) and draw report.html again."""
    from slimkit.pipeline.artifact import write_metrics
    from slimkit.report.collect import read_json
    from slimkit.report.html import REPORT
    from slimkit.report.layers import layers_from_artifact

    layers_from_artifact(out)  # the per-layer sensitivity the artifact write left (about 1 s)
    metrics = read_json(out / "metrics.json")
    if metrics is not None and small is not None:
        lat = result["latency_ms"][1]
        metrics["measured"] = {
            "size_mb": {"source": result["size_mb"]["onnx_fp32"], "result": small["size_mb"]},
            "latency_ms": {"source": lat["ort fp32"], "result": lat["ort compressed"]},
            "task": {"source": result["onnxruntime"], "result": small["metrics"]},
        }
        metrics["demo"] = {k: v for k, v in result.items() if k not in ("machine", "versions")}
        write_metrics(out, metrics)  # draws report.html again
    path = out / REPORT
    return path if path.is_file() else None


def _print_summary(r: dict[str, Any], key: str) -> None:
    small = r["onnxruntime_compressed"]

    def cell(v: Any) -> Any:
        return "-" if v is None else v

    rows: list[list[Any]] = [
        [f"test {key} (held out)", r["pytorch"][key], r["onnxruntime"][key],
         cell(small and small[key])],
        ["ONNX size (kB)", "-", r["size_mb"]["onnx_fp32"] * 1e3,
         cell(small and r["size_mb"]["compressed"] * 1e3)],
        ["max abs err vs PyTorch", "-", r["onnx"]["max_abs_err"], "-"],
        ["steps", "-", "-", cell(small and " + ".join(r["compressed_steps"]))],
        ["integer kernels in ORT", "-", "-",
         cell((r["compressed_kernels"] or {}).get("integer") if small else None)],
    ]  # fmt: skip
    for batch, by in r["latency_ms"].items():
        ms = [by[k]["median_ms"] if k in by else "-"
              for k in ("pytorch eager", "ort fp32", "ort compressed")]  # fmt: skip
        rows.append([f"latency ms, batch {batch}", *ms])
    title = f"slimkit demo: {r['model']} on {r['task']}, original vs compressed"
    console.print(table(title, ["", "PyTorch fp32", "ORT fp32", "ORT compressed"], rows))
    cpu = r["machine"]
    style = "green" if r["compress"]["met"] else "bold red"
    console.print(f"[{style}]{r['compress']['message']}[/]")
    console.print(
        f"[dim]{cpu['cpu']}, {cpu['cores']} cores, flags {' '.join(cpu['flags']) or '-'}; "
        f"{r['seconds']} s[/]"
    )
    console.print(f"report: [bold]{r['report'] or '- (not written: see the warning above)'}[/]")
