"""Measured time per layer, on ONNX Runtime (its profiler) or PyTorch eager (forward hooks), put
beside the roofline's bound so that a user sees which layers the runtime handles badly::

    times = ort_layer_times(model, (x,))          # exports to ONNX, profiles, maps to modules
    rows = compare(roofline(prof, hw), times)     # per layer: bound, measured, measured / bound
"""

from __future__ import annotations

import statistics
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from slimkit.analyze.roofline import Roofline

# ORT op type -> the profile's op kind, to pair kernels with functional rows in the same module
_KIND = {
    "Conv": "conv", "FusedConv": "conv", "QLinearConv": "conv", "MatMul": "matmul",
    "FusedMatMul": "matmul", "Gemm": "matmul", "FusedGemm": "matmul", "MatMulInteger": "matmul",
    "QLinearMatMul": "matmul", "LayerNormalization": "norm", "BatchNormalization": "norm",
    "SkipLayerNormalization": "norm", "MaxPool": "pool", "AveragePool": "pool",
    "GlobalAveragePool": "pool", "Gather": "embedding", "ReduceMean": "reduce",
    "ReduceSum": "reduce", "Add": "elementwise", "Mul": "elementwise", "Sub": "elementwise",
    "Div": "elementwise", "Relu": "elementwise", "Softmax": "elementwise", "Sigmoid": "elementwise",
    "Tanh": "elementwise", "Erf": "elementwise", "Where": "elementwise", "Clip": "elementwise",
    "BiasGelu": "elementwise", "Gelu": "elementwise", "QLinearAdd": "elementwise",
    "Pow": "elementwise", "Sqrt": "elementwise",
}  # fmt: skip


@dataclass
class LayerTimes:
    """Seconds per run for each module (``""``: kernels outside any module), the runtime, and for
    ORT each kernel with what it was mapped to."""

    runtime: str
    per_module: dict[str, float]
    total_s: float
    kernels: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "runtime": self.runtime,
            "total_s": self.total_s,
            "per_module": self.per_module,
            "kernels": self.kernels,
        }


def ort_layer_times(
    model: nn.Module,
    example_inputs: Sequence[torch.Tensor],
    *,
    runs: int = 20,
    warmup: int = 3,
    threads: int = 2,
    onnx_path: str | Path | None = None,
) -> LayerTimes:
    """Export ``model`` (a temporary file unless ``onnx_path``) and time each ORT kernel."""
    from slimkit.export.onnx import export_onnx
    from slimkit.export.ort_profile import profile_onnx

    inputs = tuple(example_inputs)
    modules = {n for n, _ in model.named_modules()}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(onnx_path) if onnx_path else Path(tmp) / "model.onnx"
        if onnx_path is None or not path.is_file():
            export_onnx(model, path, example_inputs=inputs)
        nodes = profile_onnx(path, inputs, runs=runs, warmup=warmup, threads=threads,
                             modules=modules)  # fmt: skip
    per: dict[str, float] = {}
    for n in nodes:
        per[n.module] = per.get(n.module, 0.0) + n.us * 1e-6
    return LayerTimes("onnxruntime", per, sum(per.values()), [n.to_dict() for n in nodes])


def eager_layer_times(
    model: nn.Module,
    example_inputs: Sequence[torch.Tensor],
    *,
    runs: int = 20,
    warmup: int = 3,
) -> LayerTimes:
    """PyTorch eager: the median time of each leaf module's forward (hooks with a timer).
    Functional ops outside leaf modules are not timed."""
    leaves = [(n, m) for n, m in model.named_modules() if n and not any(m.children())]
    samples: dict[str, list[float]] = {n: [] for n, _ in leaves}
    starts: dict[str, float] = {}
    handles = []
    for name, m in leaves:

        def pre(_m: nn.Module, _a: Any, _n: str = name) -> None:
            starts[_n] = time.perf_counter()

        def post(_m: nn.Module, _a: Any, _o: Any, _n: str = name) -> None:
            samples[_n].append(time.perf_counter() - starts[_n])

        handles += [m.register_forward_pre_hook(pre), m.register_forward_hook(post)]
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for _ in range(warmup):
                model(*example_inputs)
            for s in samples.values():
                s.clear()
            t0 = time.perf_counter()
            for _ in range(runs):
                model(*example_inputs)
            total = (time.perf_counter() - t0) / runs
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    per = {}
    for n, s in samples.items():
        if s:  # a module called k times per run: k samples per run
            calls = max(1, len(s) // runs)
            per[n] = statistics.median(s) * calls
    return LayerTimes("pytorch eager", per, total)


def compare(rf: Roofline, times: LayerTimes) -> list[dict[str, Any]]:
    """One row per roofline layer: the bound, the measured time, and measured / bound.

    A module's kernels go to the row of that module; kernels of functional ops (an attention
    matmul, a residual add) go to the functional rows of the same module, paired in execution
    order by op kind. Fused rows get no time (their kernel is their host's).
    """
    per = dict(times.per_module)
    names = {r.name for r in rf.layers}
    queues: dict[tuple[str, str], list[float]] = {}
    for k in times.kernels:  # kernels of modules that have no row of their own
        if k["module"] not in names:
            kind = _KIND.get(k["op_type"], "layout")
            queues.setdefault((k["module"], kind), []).append(k["us"] * 1e-6)
    rows = []
    for r in rf.layers:
        measured: float | None = None
        if r.name in per:  # eager times fused rows too: they are separate ops there
            measured = per.pop(r.name)
        elif r.bound != "fused":
            q = queues.get((r.scope, "matmul" if r.op == "linear" else r.op))
            if q:
                measured = q.pop(0)
        ratio = measured / r.time_s if measured is not None and r.time_s > 0 else None
        rows.append({**r.to_dict(), "measured_s": measured, "measured_over_bound": ratio})
    return rows


class _Chain(nn.Module):
    """``n`` tiny 1x1 convs in a row: almost no work, so their time is the per-kernel overhead."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.convs = nn.Sequential(*[nn.Conv2d(8, 8, 1) for _ in range(n)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.convs(x)


def measure_op_overhead(*, threads: int = 2, n: int = 64, runs: int = 100) -> float:
    """ONNX Runtime's cost per kernel in microseconds: the time of ``n`` tiny chained convs minus
    that of one, divided by ``n - 1``, in interleaved rounds."""
    from slimkit.analyze.latency import measure_latency, ort_runner
    from slimkit.export.onnx import export_onnx
    from slimkit.export.ort import ort_session

    x = torch.randn(1, 8, 4, 4)
    runners = {}
    with tempfile.TemporaryDirectory() as tmp:
        for k in (1, n):
            path = Path(tmp) / f"chain{k}.onnx"
            export_onnx(_Chain(k).eval(), path, example_inputs=(x,))
            runners[k] = ort_runner(ort_session(path, threads=threads), [x])
        stats = measure_latency({str(k): r for k, r in runners.items()}, runs=runs, rounds=3)
    per_op_ms = (stats[str(n)].median_ms - stats["1"].median_ms) / (n - 1)
    return max(per_op_ms * 1e3, 0.1)
