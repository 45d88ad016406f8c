"""Before / after: the source model against a run's result, on the deployment runtime.

One place measures what every command reports, so the numbers of ``slimkit quantize``, ``prune``
and ``run`` mean the same thing: ONNX size, ONNX Runtime latency at batch 1 (interleaved rounds),
the SQNR of the deployed output against the source's PyTorch output on held-out inputs, the zoo
task's metrics, and parameters / MACs::

    cmp = compare(result, labels=("fp32", "int8"), runs=30)
    cmp.latency["int8"].median_ms, cmp.sqnr_db, cmp.task["int8"]["top1"]
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from slimkit.pipeline.refs import ResolvedModel
from slimkit.pipeline.runner import RunResult


@dataclass
class Comparison:
    """Measurements of the source (``labels[0]``) and the result (``labels[1]``)."""

    labels: tuple[str, str]
    size_bytes: dict[str, int] = field(default_factory=dict)  # ONNX file sizes
    latency: dict[str, Any] = field(default_factory=dict)  # label -> LatencyStats
    sqnr_db: float | None = None  # deployed result vs the source in PyTorch, held-out inputs
    task: dict[str, dict[str, float]] = field(default_factory=dict)  # zoo task metrics (test)
    params: dict[str, int] = field(default_factory=dict)
    macs: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "size_mb": {k: v / 1e6 for k, v in self.size_bytes.items()},
            "latency_ms": {k: v.to_dict() for k, v in self.latency.items()},
            "sqnr_db": self.sqnr_db,
            "task": self.task,
            "params": self.params,
            "macs": self.macs,
        }


def held_out_inputs(source: ResolvedModel, batch: int = 8) -> tuple[torch.Tensor, ...]:
    """Inputs never used for calibration: the task's test split (up to 256 samples), zoo example
    inputs at an unused seed, or fresh noise shaped like the known inputs."""
    if source.task is not None:
        from slimkit.zoo import load_task

        return (load_task(source.task).test.tensors[0][:256],)
    if source.source.startswith("zoo:"):
        from slimkit.zoo import example_inputs

        return example_inputs(source.name, batch=batch, seed=10_000)
    xs = source.inputs(batch)
    return tuple(torch.randn_like(x) if x.is_floating_point() else x for x in xs)


def compare(
    result: RunResult,
    *,
    labels: tuple[str, str] = ("source", "result"),
    runs: int = 30,
    latency: bool = True,
    sqnr: bool = True,
    task_on: str = "onnx",
    profile: bool = False,
) -> Comparison:
    """Measure ``result.source`` against ``result.model``.

    The result is timed and evaluated as exported (``result.onnx``; exported to a temporary file
    when the run wrote none). ``task_on="onnx"`` evaluates the zoo task on the deployed file,
    ``"torch"`` on the PyTorch result. ``profile`` adds parameters and MACs (float models).
    """
    from slimkit.export.onnx import export_onnx
    from slimkit.export.ort import OrtModule, ort_session, run_session
    from slimkit.pipeline.artifact import export_model

    a, b = labels
    src = result.source
    x = src.inputs(1)
    cmp = Comparison(labels)
    with tempfile.TemporaryDirectory() as tmp:
        ref = export_onnx(src.model, Path(tmp) / "source.onnx", example_inputs=x)
        path = result.onnx.path if result.onnx is not None else None
        if path is None:
            rep, _ = export_model(result.model, Path(tmp) / "result.onnx", source=src,
                                  settings=result.recipe.export,
                                  kind=result.export_kind)  # fmt: skip
            path = rep.path if rep is not None else str(Path(tmp) / "result.onnx")
        s_a, s_b = ort_session(ref.path), ort_session(path)
        cmp.size_bytes = {a: ref.size_bytes, b: Path(path).stat().st_size}
        if sqnr:
            from slimkit.testing.numerics import sqnr as sqnr_db

            eval_x = held_out_inputs(src)
            with torch.no_grad():
                expected = src.model(*eval_x)
            cmp.sqnr_db = sqnr_db(expected, run_session(s_b, list(eval_x)))
        if src.task is not None:
            from slimkit.zoo import evaluate, load_task

            task = load_task(src.task)
            deployed: nn.Module = OrtModule(s_b) if task_on == "onnx" else result.model
            cmp.task = {a: evaluate(src.model, task), b: evaluate(deployed, task)}
        if latency:
            from slimkit.analyze.latency import measure_latency, ort_runner

            cmp.latency = measure_latency({a: ort_runner(s_a, x), b: ort_runner(s_b, x)},
                                          runs=runs, warmup=5, rounds=3)  # fmt: skip
    if profile:
        from slimkit.analyze.profile import profile_model

        before, after = profile_model(src.model, x), profile_model(result.model, x)
        cmp.params = {a: before.total_params, b: after.total_params}
        cmp.macs = {a: before.total_macs, b: after.total_macs}
    return cmp
