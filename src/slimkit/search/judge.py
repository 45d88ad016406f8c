"""Judge a model as deployed: export to ONNX, then its metric, latency and file size in ORT.

Every candidate of the search, the source it is compared with, and the chosen model's
re-measurement go through ``Judge``, so the three objectives mean the same thing everywhere::

    judge = Judge(rm, metric_fn, batch=1)
    src = judge.source(folder)                 # exports folder/source.onnx, measures it
    m = judge.measure("trial/model.onnx")      # Deployed(metric, latency_ms, size_mb, speedup)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from torch import nn

from slimkit.core.refs import ResolvedModel, import_attr
from slimkit.errors import ConfigError

Metric = Callable[[nn.Module], float]
METRIC_FORMS = (
    "top1 (a zoo task's val split)",
    "perplexity (negated: higher is better)",
    "sqnr (dB of the deployed output against the source)",
    "package.module:function (model -> float, higher is better)",
)


@dataclass
class Deployed:
    """One model as run in ONNX Runtime."""

    metric: float
    latency_ms: float
    size_mb: float
    speedup: float = 1.0  # source latency / this latency, timed interleaved in the same rounds

    def values(self) -> dict[str, float]:
        return {"metric": self.metric, "latency_ms": self.latency_ms, "size_mb": self.size_mb}

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


def resolve_metric(metric: str | Metric | None, rm: ResolvedModel) -> tuple[Metric, str]:
    """A metric function (called with the deployed model, higher is better) and its name."""
    if callable(metric):
        return metric, getattr(metric, "__name__", "metric")
    name = metric or ("top1" if rm.task is not None else "sqnr")
    if name in ("top1", "perplexity"):
        if rm.task is None:
            raise ConfigError(
                f"metric {name!r} needs a model with a bundled task (a trained zoo model)",
                fix="use --metric sqnr, or package.module:function (model -> float)",
            )
        return _task_metric(rm.task, name), name
    if name == "sqnr":
        return _sqnr_metric(rm), name
    if ":" in name:
        fn = import_attr(name, "metric", METRIC_FORMS)
        if not callable(fn):
            raise ConfigError(
                f"metric {name!r} is not callable", fix="point at a function model -> float"
            )
        return fn, name
    raise ConfigError(f"unknown metric {name!r}", fix=f"use one of: {'; '.join(METRIC_FORMS)}")


def _task_metric(task_name: str, key: str) -> Metric:
    from slimkit.zoo import evaluate, load_task

    task = load_task(task_name)
    sign = -1.0 if key == "perplexity" else 1.0

    def metric(m: nn.Module) -> float:
        return sign * float(evaluate(m, task, "val")[key])

    metric.__name__ = key
    return metric


def _sqnr_metric(rm: ResolvedModel) -> Metric:
    import torch

    from slimkit.pipeline.measure import held_out_inputs
    from slimkit.testing.numerics import sqnr

    x = held_out_inputs(rm)
    with torch.no_grad():
        ref = rm.model(*x)

    def metric(m: nn.Module) -> float:
        with torch.no_grad():
            return float(sqnr(ref, m(*x)))

    metric.__name__ = "sqnr"
    return metric


class Judge:
    """Measures exported models against the source at the constraint's batch."""

    def __init__(self, rm: ResolvedModel, metric: Metric, *, batch: int = 1, runs: int = 20):
        self.rm, self.metric, self.batch, self.runs = rm, metric, batch, runs
        self._source_session: Any = None

    def source(self, folder: Path) -> Deployed:
        """Export the source to ``folder/source.onnx`` and measure it."""
        from slimkit.export.onnx import export_onnx
        from slimkit.export.ort import ort_session

        folder.mkdir(parents=True, exist_ok=True)
        rep = export_onnx(self.rm.model, folder / "source.onnx", example_inputs=self.rm.inputs(1))
        self._source_session = ort_session(rep.path)
        return self.measure(rep.path)

    def measure(self, path: str | Path) -> Deployed:
        """Metric of the deployed file, its latency (interleaved with the source's) and size."""
        from slimkit.analyze.latency import measure_latency, ort_runner
        from slimkit.export.ort import OrtModule, ort_session

        if self._source_session is None:
            raise ConfigError("the judge has not measured the source yet", fix="call source()")
        session = ort_session(path)
        value = float(self.metric(OrtModule(session)))
        x = self.rm.inputs(self.batch)
        stats = measure_latency(
            {"source": ort_runner(self._source_session, x), "candidate": ort_runner(session, x)},
            runs=self.runs,
            warmup=3,
            rounds=3,
        )
        ms = stats["candidate"].median_ms
        return Deployed(value, ms, Path(path).stat().st_size / 1e6, stats["source"].median_ms / ms)
