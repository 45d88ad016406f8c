"""Automatic float fall-back: keep the fewest layers in float so int8 stays within ``max_drop``.

The user gives a metric (higher is better, e.g. top-1 on a validation split) and the largest drop
they accept. slimkit quantizes everything first; while the drop is too large it returns the most
sensitive layers to float, most sensitive first, re-quantizing after each:

- the ranking comes from the analysis step's sensitivity result when given (``sensitivity=``, a
  :class:`~slimkit.analyze.sensitivity.SensitivityResult` or the JSON path ``slimkit analyze``
  wrote; its ``int8`` drops), else slimkit measures it: each layer alone kept in float, the metric
  of the quantized model, one quantization per layer (``ranking="leave-one-out"``).
- ``max_float_layers`` bounds how many layers may fall back; when even that misses the target the
  error says how close it came, and the report keeps every step.

::

    q, report = quantize_with_fallback(model, data=calib, metric=lambda m: top1(m, val),
                                       max_drop=0.005)
    print(report.summary())   # "2 layers in float (features.0.0, fc): drop 0.003 <= 0.005"

The float layers are ordinary ``Scope(exclude=...)`` entries, so the ONNX export keeps them in
float and every other layer on ORT's integer kernels.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import fx, nn

from slimkit.core.io import PathLike
from slimkit.core.scope import Scope
from slimkit.errors import ConfigError
from slimkit.quant.ptq import PTQ, quantize_ptq

LAYER_TYPES = (nn.modules.conv._ConvNd, nn.Linear)
Metric = Callable[[nn.Module], float]


@dataclass
class FallbackReport:
    """What the search did: the float metric, each step's float layers and metric, the result."""

    float_metric: float
    max_drop: float
    steps: list[dict[str, Any]] = field(default_factory=list)
    ranking: list[tuple[str, float]] = field(default_factory=list)  # (layer, gain or drop)
    ranking_source: str = ""
    float_layers: list[str] = field(default_factory=list)
    metric: float = float("nan")

    @property
    def drop(self) -> float:
        return self.float_metric - self.metric

    @property
    def met(self) -> bool:
        return self.drop <= self.max_drop

    def summary(self) -> str:
        which = f" ({', '.join(self.float_layers)})" if self.float_layers else ""
        sign = "<=" if self.met else ">"
        return (
            f"{len(self.float_layers)} layers in float{which}: metric {self.metric:.4f}, "
            f"drop {self.drop:.4f} {sign} {self.max_drop:g}"
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "float_metric": self.float_metric, "max_drop": self.max_drop, "metric": self.metric,
            "drop": self.drop, "met": self.met, "float_layers": self.float_layers,
            "ranking_source": self.ranking_source, "ranking": self.ranking, "steps": self.steps,
        }  # fmt: skip


def _exclude(scope: Scope | None, names: list[str]) -> Scope:
    base = scope or Scope()
    return Scope(include=base.include, exclude=[*base.exclude, *(re.escape(n) for n in names)],
                 types=base.types)  # fmt: skip


def _ranking_from(sens: Any, layers: list[str]) -> list[tuple[str, float]]:
    from slimkit.analyze.sensitivity import SensitivityResult

    if isinstance(sens, (str, Path)):
        sens = SensitivityResult.load(sens)
    if not isinstance(sens, SensitivityResult):
        raise ConfigError(
            f"sensitivity= must be a SensitivityResult or a JSON path (got {type(sens).__name__})",
            fix="pass slimkit.analyze.sensitivity.sensitivity(model, ...) or its saved file",
        )
    drops = sens.drops("int8")
    missing = [n for n in layers if n not in drops]
    if missing:
        raise ConfigError(
            f"the sensitivity result has no int8 entry for {missing[:3]}",
            fix="recompute it on this model (slimkit analyze MODEL --sensitivity)",
        )
    return sorted(((n, drops[n]) for n in layers), key=lambda t: -t[1])


def quantize_with_fallback(
    model: nn.Module,
    config: PTQ | None = None,
    *,
    data: Any,
    metric: Metric,
    max_drop: float,
    sensitivity: Any = None,
    max_float_layers: int | None = None,
    scope: Scope | None = None,
    example_inputs: tuple[torch.Tensor, ...] | None = None,
    on_step: Callable[[str], None] | None = None,
) -> tuple[fx.GraphModule, FallbackReport]:
    """Static int8 PTQ of ``model`` with the fewest float layers that keep
    ``metric(float) - metric(int8) <= max_drop`` (see the module docstring)."""
    if max_drop < 0:
        raise ConfigError(f"max_drop must be >= 0 (got {max_drop})", fix="e.g. max_drop=0.005")
    cfg = config or PTQ()
    model.eval()
    layers = [n for n, _ in (scope or Scope()).select(model, candidates=LAYER_TYPES)]
    limit = len(layers) if max_float_layers is None else max_float_layers
    report = FallbackReport(float_metric=float(metric(model)), max_drop=max_drop)

    def run(names: list[str]) -> tuple[fx.GraphModule, float]:
        q = quantize_ptq(model, cfg, data=data, scope=_exclude(scope, names),
                         example_inputs=example_inputs)  # fmt: skip
        value = float(metric(q))
        report.steps.append({"float_layers": list(names), "metric": value})
        if on_step:
            on_step(f"{len(names)} float layers: metric {value:.4f}")
        return q, value

    q, value = run([])
    if cfg.float_prefix is True or cfg.speed_check:  # time once; the runs below keep the choice
        pinned = list(q.meta["slimkit"]["float_prefix_layers"])
        cfg = PTQ(**{**cfg.to_dict(), "float_prefix": pinned, "speed_check": False})
        layers = [n for n in layers if n not in pinned]
    if report.float_metric - value > max_drop and limit > 0:
        if sensitivity is not None:
            report.ranking = _ranking_from(sensitivity, layers)
            report.ranking_source = "sensitivity (int8 weight drop per layer)"
        else:
            gains = []
            for n in layers:
                _, v = run([n])
                gains.append((n, v - value))
            report.ranking = sorted(gains, key=lambda t: -t[1])
            report.ranking_source = "leave-one-out (metric gain with the layer in float)"
        chosen: list[str] = []
        for name, _ in report.ranking[:limit]:
            chosen.append(name)
            q, value = run(chosen)
            if report.float_metric - value <= max_drop:
                break
        report.float_layers = chosen
    report.metric = value
    if not report.met:
        best = max(report.steps, key=lambda s: s["metric"])
        raise ConfigError(
            f"int8 stays {report.float_metric - best['metric']:.4f} below the float metric "
            f"{report.float_metric:.4f} at best (with {len(best['float_layers'])} float layers), "
            f"more than max_drop={max_drop:g}",
            fix="raise max_drop or max_float_layers, try another calibration (PTQ(calibration="
            "'percentile')), more calibration data, or quantization-aware training",
        )
    meta = getattr(q, "meta", None)
    if isinstance(meta, dict) and isinstance(meta.get("slimkit"), dict):
        meta["slimkit"]["fallback"] = report.to_dict()
    return q, report


def save_report(report: FallbackReport, path: PathLike) -> Path:
    """Write the report as JSON (atomically)."""
    from slimkit.core.io import write_json

    write_json(path, report.to_dict())
    return Path(path)
