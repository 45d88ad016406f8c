"""What every benchmark shares: arguments, the result file of BENCHMARKS.md, the table."""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from slimkit.core.io import write_json
from slimkit.core.machine import configure_threads, machine_info, versions

RESULTS = Path(__file__).parent / "results"


def parser(name: str, doc: str | None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"bench_{name}.py", description=doc)
    p.add_argument("--quick", action="store_true", help="about a minute: fewer models and runs")
    p.add_argument(
        "--json", type=Path, default=None, help=f"result file (default results/{name}.json)"
    )
    return p


def start(threads: int = 2) -> float:
    configure_threads(threads)
    return time.perf_counter()


def write_result(
    name: str, args: argparse.Namespace, rows: list[dict[str, Any]], settings: dict[str, Any],
    t0: float, **extra: Any,
) -> Path:  # fmt: skip
    """Write the result file (atomically) and return its path."""
    path = args.json or RESULTS / f"{name}{'_quick' if args.quick else ''}.json"
    result = {
        "benchmark": name,
        "quick": bool(args.quick),
        "machine": machine_info(),
        # other processes share the CPU on a busy machine: timings from a loaded one are noisy
        "load_avg_1_5_15_min": [round(v, 2) for v in os.getloadavg()],
        "versions": versions(),
        "settings": settings,
        "seconds": round(time.perf_counter() - t0, 1),
        **extra,
        "rows": rows,
    }
    write_json(path, result)
    return Path(path)


def print_table(title: str, columns: list[tuple[str, str]], rows: list[dict[str, Any]]) -> None:
    """``columns`` are (header, key) pairs; missing keys print as '-'."""
    t = Table(title=title, title_justify="left", header_style="bold")
    for i, (header, _) in enumerate(columns):
        t.add_column(header, justify="left" if i < 2 else "right")
    for r in rows:
        cells = []
        for _, key in columns:
            v = r.get(key)
            cells.append("-" if v is None else f"{v:.3g}" if isinstance(v, float) else str(v))
        t.add_row(*cells)
    Console().print(t)


def ort_latency(
    models: dict[str, Any], x: Any, *, runs: int = 50, warmup: int = 10, rounds: int = 3
) -> dict[str, Any]:
    """Each model exported to ONNX and timed in ONNX Runtime on input ``x`` (batch as given), all
    in the same interleaved rounds: label -> ``LatencyStats``."""
    import tempfile

    from slimkit.analyze.latency import measure_latency, ort_runner
    from slimkit.export.onnx import export_onnx
    from slimkit.export.ort import ort_session

    with tempfile.TemporaryDirectory() as tmp:
        runners = {}
        for i, (label, m) in enumerate(models.items()):
            path = Path(tmp) / f"m{i}.onnx"
            export_onnx(m, path, example_inputs=(x,))
            runners[label] = ort_runner(ort_session(path), [x])
        return measure_latency(runners, runs=runs, warmup=warmup, rounds=rounds)
