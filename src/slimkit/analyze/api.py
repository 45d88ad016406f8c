"""``slimkit.analyze``: where the time goes, what bounds each layer, and what a change would buy.

::

    rep = sk.analyze(model, (x,), hw="this", measure=True, sensitivity=True, data=calib,
                     out="analysis/")       # analysis.json, roofline.png, sensitivity.png
    rep.roofline.summary                    # "compute-bound overall (52 FLOP/B above ...)"
    rep.predictions["int8"].speedup         # predicted before anything is quantized
    rep.top(5)                              # slowest layers with bound, measured time, verdict
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from slimkit.analyze.hardware import Dtype, HardwareProfile, load_profile
from slimkit.analyze.layer_time import LayerTimes, compare, eager_layer_times, ort_layer_times
from slimkit.analyze.profile import ModelProfile, profile_model
from slimkit.analyze.roofline import (
    Change,
    Int8,
    LowRank,
    Prediction,
    PruneChannels,
    Roofline,
    predict,
    roofline,
)
from slimkit.analyze.sensitivity import CHANGES, SensitivityResult
from slimkit.analyze.sensitivity import sensitivity as run_sensitivity
from slimkit.core.io import write_json
from slimkit.core.scope import Scope
from slimkit.errors import ConfigError

CANDIDATES: dict[str, Change] = {
    "int8": Int8(),
    "prune50": PruneChannels(0.5),
    "lowrank25": LowRank(0.25),
}


@dataclass
class AnalysisReport:
    """Everything ``analyze`` found; ``layers`` joins the roofline rows with measured times."""

    model: str
    batch: int
    hardware: HardwareProfile
    profile: ModelProfile
    roofline: Roofline
    predictions: dict[str, Prediction]
    layers: list[dict[str, Any]]
    measured: LayerTimes | None = None
    sensitivity: SensitivityResult | None = None
    files: dict[str, str] = field(default_factory=dict)

    def top(self, k: int = 10) -> list[dict[str, Any]]:
        """The ``k`` slowest layers: by measured time when measured, else by the bound."""
        return sorted(self.layers, key=lambda r: r["measured_s"] or r["time_s"], reverse=True)[:k]

    def to_dict(self) -> dict[str, Any]:
        rf = self.roofline.to_dict()
        rf.pop("layers")
        return {
            "model": self.model,
            "batch": self.batch,
            "hardware": self.hardware.to_dict(),
            "totals": {
                "params": self.profile.total_params,
                "macs": self.profile.total_macs,
                "flops": self.profile.total_flops,
                "weight_bytes": self.profile.weight_bytes,
                "predicted_s": self.roofline.total_s,
                "measured_s": None if self.measured is None else self.measured.total_s,
            },
            "roofline": rf,
            "predictions": {k: p.to_dict() for k, p in self.predictions.items()},
            "layers": self.layers,
            "measured": None if self.measured is None else self.measured.to_dict(),
            "sensitivity": None if self.sensitivity is None else self.sensitivity.to_dict(),
            "profile": self.profile.to_dict(),
            "files": self.files,
        }


def _hardware(hw: str | os.PathLike[str] | HardwareProfile) -> HardwareProfile:
    return hw if isinstance(hw, HardwareProfile) else load_profile(hw)


def analyze(
    model: nn.Module,
    example_inputs: torch.Tensor | Sequence[torch.Tensor],
    *,
    hw: str | os.PathLike[str] | HardwareProfile = "this",
    dtype: Dtype = "fp32",
    data: Any = None,
    metric: Callable[[nn.Module], float] | None = None,
    sensitivity: bool = False,
    changes: Sequence[str] = CHANGES,
    scope: Scope | None = None,
    measure: bool = False,
    runtime: str = "onnxruntime",
    out: str | os.PathLike[str] | None = None,
    progress: bool = False,
    name: str | None = None,
) -> AnalysisReport:
    """Profile ``model`` on ``example_inputs``, place every layer on the roofline of ``hw``
    (``"this"``, a preset name, a YAML file or a ``HardwareProfile``) and predict the speed-up of
    int8, pruning 50 % of the channels and rank-25 % factorisation.

    ``measure`` times each layer on ``runtime`` (``onnxruntime`` via its profiler, or
    ``eager``). ``sensitivity`` runs per-layer trials (``changes``) scored by ``metric`` or, by
    default, the SQNR of the output on ``data`` (else on ``example_inputs``). With ``out`` the
    report goes to ``out/analysis.json`` with ``roofline.png`` (and ``sensitivity.json`` /
    ``sensitivity.png``), each written atomically. The model is not modified.
    """
    if runtime not in ("onnxruntime", "eager"):
        raise ConfigError(f"unknown runtime {runtime!r}", fix="use 'onnxruntime' or 'eager'")
    inputs = (
        (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs)
    )
    from slimkit.core.verbs import eval_mode

    with eval_mode(model):  # running the user's model must not update its BatchNorm statistics
        return _analyze(model, inputs, hw=hw, dtype=dtype, data=data, metric=metric,
                        sensitivity=sensitivity, changes=changes, scope=scope, measure=measure,
                        runtime=runtime, out=out, progress=progress, name=name)  # fmt: skip


def _analyze(
    model: nn.Module, inputs: tuple[torch.Tensor, ...], *, hw: Any, dtype: Dtype, data: Any,
    metric: Callable[[nn.Module], float] | None, sensitivity: bool, changes: Sequence[str],
    scope: Scope | None, measure: bool, runtime: str, out: Any, progress: bool, name: str | None,
) -> AnalysisReport:  # fmt: skip
    try:  # one forward first: a wrong shape or dtype is named here, not deep in the profiler
        with torch.no_grad():
            model(*inputs)
    except Exception as e:
        from slimkit.core.data import Batch, model_failed

        tensors = tuple(t for t in inputs if isinstance(t, torch.Tensor))
        raise model_failed(model, "example_inputs", Batch(0, tensors), e) from None
    hardware = _hardware(hw)
    prof = profile_model(model, inputs)
    rf = roofline(prof, hardware, dtype)
    preds = {k: predict(prof, hardware, c, dtype=dtype) for k, c in CANDIDATES.items()}
    times = None
    if measure:
        if runtime == "onnxruntime":
            times = ort_layer_times(model, inputs)
        else:
            times = eager_layer_times(model, inputs)
    layers = compare(rf, times) if times is not None else [
        {**r.to_dict(), "measured_s": None, "measured_over_bound": None} for r in rf.layers
    ]  # fmt: skip
    sens = None
    if sensitivity:
        sens = run_sensitivity(model, metric=metric, data=data, example_inputs=inputs,
                               scope=scope, changes=changes, progress=progress)  # fmt: skip
    batch = int(inputs[0].shape[0]) if inputs and inputs[0].dim() else 1
    report = AnalysisReport(name or type(model).__name__, batch, hardware, prof, rf, preds,
                            layers, times, sens)  # fmt: skip
    if out is not None:
        write_report(report, out)
    return report


def write_report(report: AnalysisReport, out: str | os.PathLike[str]) -> dict[str, str]:
    """Write ``analysis.json`` and the PNG plots into ``out``; returns ``{what: path}``."""
    from slimkit.analyze.plots import roofline_chart, sensitivity_chart

    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    measured = {r["name"]: r["measured_s"] for r in report.layers}
    chart = roofline_chart(
        report.roofline, report.hardware, folder / "roofline.png",
        measured if report.measured else None,
    )  # fmt: skip
    files = {"roofline_png": str(chart)}
    if report.sensitivity is not None:
        files["sensitivity_json"] = str(report.sensitivity.save(folder / "sensitivity.json"))
        files["sensitivity_png"] = str(sensitivity_chart(report.sensitivity,
                                                         folder / "sensitivity.png"))  # fmt: skip
    files["analysis_json"] = str(folder / "analysis.json")
    report.files = files
    write_json(folder / "analysis.json", report.to_dict())
    return files
