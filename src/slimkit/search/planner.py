"""The planner: from the analysis of the source and the constraints, an ordered plan that says why.

It reads what was measured (ORT latency at the constraint's batch, the ONNX file size, the metric)
and what the roofline predicts on the hardware profile (the speed-up of int8, of pruning to each
MAC fraction the search space allows, of both), and chooses, in the order they run:

1. structured pruning to the least MAC reduction predicted to reach the latency (and size) goal;
2. recovery: fine-tuning distilled from the source, after any structural change;
3. quantization: int8 PTQ when speed or size asks for it, mixed precision (< 8 bits per layer)
   when the size budget is below what int8 reaches;
4. export to ONNX at the constraint's batch.

The plan is a candidate of the search space (the search starts from it) and a recipe that
``slimkit run`` runs, written with a ``# why:`` comment above each step::

    analysis = analyse(rm, src, constraints, space)
    p = make_plan(analysis, constraints, space)
    p.save("plan.yaml", p.recipe(model="zoo:digits_cnn"))
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from slimkit.core.io import PathLike, atomic_write
from slimkit.core.refs import ResolvedModel
from slimkit.pipeline.recipe import Export, Recipe
from slimkit.search.constraints import Constraints
from slimkit.search.judge import Deployed
from slimkit.search.space import Space, structural

INT8_SIZE = 3.8  # fp32 -> int8 file ratio measured on the zoo CNNs (scales and zero points cost)


@dataclass
class Analysis:
    """What the planner and the cheap proxies know about the source."""

    name: str
    params: int
    macs: int
    source: Deployed
    hw: str
    bound: str  # the roofline's one-sentence summary
    base_s: float  # roofline time of the source
    int8_speedup: float  # predicted by the roofline
    prune_speedup: dict[float, tuple[float, float]] = field(
        default_factory=dict
    )  # keep -> fp32, int8
    profile_hw: Any = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "params": self.params,
            "macs": self.macs,
            "source": self.source.to_dict(),
            "hw": self.hw,
            "bound": self.bound,
            "int8_speedup_predicted": self.int8_speedup,
            "prune_speedup_predicted": {str(k): list(v) for k, v in self.prune_speedup.items()},
        }

    def estimate(
        self, model: nn.Module, inputs: tuple[Any, ...], quant: str, size_budget: float | None
    ) -> dict[str, float]:
        """Latency and size of ``model`` once quantized as ``quant``, from its parameters and
        MACs on the roofline, scaled to the source's measured latency and file size."""
        from slimkit.analyze.profile import profile_model
        from slimkit.analyze.roofline import Int8, predict

        prof = profile_model(model, inputs)
        pred = predict(prof, self.profile_hw, [Int8()] if quant != "fp32" else [])
        ms = self.source.latency_ms * pred.new_s / self.base_s
        per_weight = 1.0 / INT8_SIZE if quant != "fp32" else 1.0
        size = self.source.size_mb * prof.total_params / max(self.params, 1) * per_weight
        if quant == "mixed" and size_budget is not None:
            size = min(size, size_budget)
        return {"latency_ms": ms, "size_mb": size, "macs": float(prof.total_macs)}


def analyse(
    rm: ResolvedModel, source: Deployed, constraints: Constraints, space: Space, batch: int = 1
) -> Analysis:
    """Profile the source and predict, on the roofline, each change the space allows."""
    from slimkit.analyze.hardware import load_profile
    from slimkit.analyze.profile import profile_model
    from slimkit.analyze.roofline import Int8, PruneChannels, predict, roofline

    hw = load_profile(constraints.hw or "this")
    prof = profile_model(rm.model, rm.inputs(batch))
    rf = roofline(prof, hw)
    int8 = predict(prof, hw, Int8()).speedup
    prune: dict[float, tuple[float, float]] = {}
    for keep in space.choices.get("prune_macs", (1.0,)):
        ratio = min(max(1.0 - math.sqrt(keep), 0.0), 0.95)  # inner layers' MACs go as (1-r)^2
        prune[keep] = (
            predict(prof, hw, PruneChannels(ratio)).speedup,
            predict(prof, hw, [PruneChannels(ratio), Int8()]).speedup,
        )
    return Analysis(
        rm.name,
        prof.total_params,
        prof.total_macs,
        source,
        constraints.hw or "this",
        rf.summary,
        rf.total_s,
        int8,
        prune,
        hw,
    )


@dataclass
class Plan:
    """A candidate of the space with the reason for each of its steps."""

    params: dict[str, Any]
    reasons: list[str]  # one per step of ``space.steps(params)``, then the export's
    notes: list[str]
    predicted: dict[str, float]
    space: Space

    def recipe(self, *, model: str | None, data: str | None = None, batch: int = 1) -> Recipe:
        return Recipe(
            model=model,
            data=data,
            steps=tuple(self.space.steps(self.params)),
            export=Export(batch=batch),
        )

    def to_yaml(self, recipe: Recipe) -> str:
        """The recipe as YAML with a ``# why:`` comment above each step."""
        import yaml

        d = recipe.to_dict()
        steps, export = d.pop("steps"), d.pop("export")
        text = yaml.safe_dump(d, sort_keys=False, default_flow_style=False)
        text += "steps:\n" if steps else "steps: []\n"
        for step, why in zip(steps, self.reasons, strict=False):
            text += f"# why: {why}\n" + yaml.safe_dump([step], sort_keys=False)
        text += f"# why: {self.reasons[-1]}\n"
        return text + yaml.safe_dump({"export": export}, sort_keys=False)

    def save(self, path: PathLike, recipe: Recipe) -> Path:
        p = Path(path)
        with atomic_write(p) as f:
            f.write(f"# slimkit plan: `slimkit run {p.name} --out DIR` runs it\n")
            for note in self.notes:
                f.write(f"# note: {note}\n")
            f.write(self.to_yaml(recipe))
        return p

    def to_dict(self) -> dict[str, Any]:
        steps = [s.to_dict() for s in self.space.steps(self.params)]
        return {
            "params": self.params,
            "steps": steps,
            "reasons": self.reasons,
            "notes": self.notes,
            "predicted": self.predicted,
        }


def make_plan(a: Analysis, c: Constraints, space: Space) -> Plan:
    """Choose the candidate the analysis predicts meets the goals with the least change."""
    ch, notes = space.choices, list(space.notes)
    src = a.source
    need_speed = src.latency_ms / c.latency_ms if c.latency_ms else 1.0
    need_size = src.size_mb / c.size_mb if c.size_mb else 1.0
    why: dict[str, str] = {}
    quant = "fp32"
    if "mixed" in ch.get("quant", ()) and need_size > INT8_SIZE:
        quant = "mixed"
        why["quant"] = (
            f"the size budget is {need_size:.1f}x below the fp32 file and int8 "
            f"reaches about {INT8_SIZE}x: a format per layer (fp32/fp16/int8/int4) "
            "under the budget, the most sensitive layers kept wider"
        )
    elif "int8" in ch.get("quant", ()) and (need_speed > 1.0 or need_size > 1.0):
        quant = "int8"
        why["quant"] = (
            f"int8 on ORT's integer kernels: about {INT8_SIZE}x smaller, "
            f"{a.int8_speedup:.2f}x faster on the roofline ({a.hw})"
        )
    shrink = INT8_SIZE if quant == "int8" else (need_size if quant == "mixed" else 1.0)
    keep = 1.0
    levels = sorted(ch.get("prune_macs", (1.0,)), reverse=True)
    for k in levels:
        fp32, int8 = a.prune_speedup.get(k, (1.0, a.int8_speedup))
        speed = int8 if quant != "fp32" else fp32
        fast = c.latency_ms is None or speed >= need_speed
        if fast and k * need_size <= shrink * 1.05:
            keep = k
            break
    else:
        keep = levels[-1]
        notes.append(
            f"no pruning level of the space is predicted to reach the goals; the plan "
            f"prunes to {keep:g} of the MACs and the search measures the rest"
        )
    speed = a.int8_speedup if quant != "fp32" else 1.0
    if keep < 1.0:
        fp32, int8 = a.prune_speedup[keep]
        speed = int8 if quant != "fp32" else fp32
        goal = (
            f"the latency goal needs {need_speed:.2f}x the speed of the source "
            f"({src.latency_ms:.3g} ms)"
            if c.latency_ms
            else f"the size goal needs {need_size:.2f}x smaller than the source"
        )
        why["prune_macs"] = (
            f"{goal}; keeping {keep:g} of the MACs is predicted "
            f"{speed:.2f}x faster with {quant} ({a.bound})"
        )
    params: dict[str, Any] = {"prune_macs": keep, "quant": quant}
    if structural(params) and "recovery_epochs" in ch:
        epochs = max(v for v in ch["recovery_epochs"] if v <= (1 if keep >= 0.5 else 2))
        params["recovery_epochs"] = epochs
        if epochs:
            why["recovery_epochs"] = (
                f"win back the accuracy pruning costs: {epochs} epoch(s) "
                "distilled from the source model"
            )
    params = {k: v for k, v in space.complete(params).items() if k in ch}
    reasons = [why.get(_knob(s.name), s.name) for s in space.steps(params)]
    reasons.append(f"export to ONNX at batch {c.batch}, measured in ONNX Runtime")
    if not space.steps(params):
        notes.append("the source already meets the goals the analysis can predict")
    predicted = {"latency_ms": src.latency_ms / speed, "size_mb": src.size_mb * keep / shrink}
    return Plan(params, reasons, notes, predicted, space)


def _knob(step: str) -> str:
    if step.startswith("prune."):
        return "prune_macs"
    if step.startswith("lowrank."):
        return "lowrank_energy"
    if step.startswith("quant."):
        return "quant"
    return "recovery_epochs"
