"""``slimkit bench MODEL``: latency on PyTorch eager and ONNX Runtime, per the benchmark
protocol."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from slimkit.cli._ui import console, emit_json, err_console, friendly_errors, table


def latency_rows(stats: dict[str, Any], baseline: str | None = None) -> list[list[Any]]:
    """Rows: runtime, median, spread, and speed-up over ``baseline`` (the first by default)."""
    base = stats[baseline or next(iter(stats))].median_ms
    return [
        [
            name,
            s.median_ms,
            f"{s.spread_ms[0]:.3g}-{s.spread_ms[1]:.3g}",
            s.runs_per_round,
            base / s.median_ms,
        ]
        for name, s in stats.items()
    ]


LATENCY_COLUMNS = ["runtime", "median ms", "spread ms", "runs/round", "speed-up"]


@friendly_errors
def bench_cmd(
    model: str = typer.Argument(
        ..., help="zoo:NAME, file.pt2, file.onnx or package.module:factory"
    ),
    batch: int = typer.Option(1, min=1, help="batch size"),
    runs: int = typer.Option(50, min=1, help="timed runs per round"),
    rounds: int = typer.Option(3, min=1, help="interleaved rounds (A, B, A, B, ...)"),
    warmup: int = typer.Option(10, min=0, help="untimed runs first"),
    threads: int = typer.Option(2, min=1, help="intra-op threads (PyTorch and ORT)"),
    weights: Path | None = typer.Option(None, help="safetensors weights for a factory model"),
    input_shape: str | None = typer.Option(None, help="e.g. 1,3,224,224 when slimkit can't know"),
    json_out: bool = typer.Option(False, "--json", help="print JSON instead of a table"),
) -> None:
    """Measure latency: median of interleaved round medians, with the spread between rounds."""
    from slimkit.analyze.latency import eager_vs_ort
    from slimkit.core.machine import configure_threads, machine_info
    from slimkit.pipeline.refs import parse_shape, resolve_model

    configure_threads(threads)
    shape = parse_shape(input_shape) if input_shape else None
    with err_console.status("measuring") as st:

        def on_round(r: int, name: str) -> None:
            st.update(f"round {r + 1}/{rounds}: {name}")

        if model.endswith(".onnx"):
            stats = _bench_onnx(model, batch, shape, runs, warmup, rounds, threads, on_round)
            label = Path(model).stem
        else:
            rm = resolve_model(model, weights=weights, input_shape=shape, progress=not json_out)
            label = rm.name
            stats = eager_vs_ort(
                rm.model, rm.inputs(batch), runs=runs, warmup=warmup, rounds=rounds,
                on_round=on_round,
            )  # fmt: skip
    if json_out:
        emit_json(
            {
                "model": model,
                "batch": batch,
                "machine": machine_info(),
                "latency": {k: v.to_dict() for k, v in stats.items()},
            }
        )
        return
    console.print(table(f"{label}, batch {batch}", LATENCY_COLUMNS, latency_rows(stats)))


def _bench_onnx(
    path: str,
    batch: int,
    shape: tuple[int, ...] | None,
    runs: int,
    warmup: int,
    rounds: int,
    threads: int,
    on_round: Any,
) -> dict[str, Any]:
    """ORT only: inputs from the file's declared shapes (symbolic dims become ``batch``)."""
    import numpy as np

    from slimkit.analyze.latency import measure_latency, ort_runner
    from slimkit.export.ort import ort_session

    sess = ort_session(path, threads=threads)
    inputs = []
    for i in sess.get_inputs():
        dims = list(shape) if shape else [d if isinstance(d, int) else batch for d in i.shape]
        if "int" in i.type:
            inputs.append(np.zeros(dims, dtype=np.int64))
        else:
            inputs.append(np.random.default_rng(0).standard_normal(dims).astype(np.float32))
    return measure_latency(
        {"onnxruntime": ort_runner(sess, inputs)},
        runs=runs, warmup=warmup, rounds=rounds, on_round=on_round,
    )  # fmt: skip
