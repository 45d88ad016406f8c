"""One candidate of the search, built, exported and judged as deployed.

``Evaluator.evaluate(params, folder)`` runs the candidate's recipe through the pipeline (the same
runner as ``slimkit run``), exports ``folder/model.onnx`` and measures it with the ``Judge``. A
cheap proxy runs first: once the architecture is final (after the structural steps, before any
fine-tuning or quantization) the roofline estimate of the latency and the size estimate from the
parameter count reject a candidate that is hopeless, so no time goes into training or exporting
it (``Rejected``; the search records the trial as pruned, with the estimate).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from slimkit.core.refs import ResolvedModel
from slimkit.pipeline.recipe import Export, Recipe
from slimkit.search.constraints import Constraints
from slimkit.search.judge import Deployed, Judge
from slimkit.search.planner import Analysis
from slimkit.search.space import Space

# a proxy rejects only past these multiples of a budget: the roofline is rough on small models
LATENCY_SLACK = 2.0
SIZE_SLACK = 1.25


class Rejected(Exception):
    """The proxy's estimate is hopelessly past a budget."""

    def __init__(self, note: str, estimate: dict[str, float]) -> None:
        super().__init__(note)
        self.note, self.estimate = note, estimate


@dataclass
class Outcome:
    deployed: Deployed
    recipe: Recipe
    estimate: dict[str, float]
    seconds: float
    notes: list[str] = field(default_factory=list)


class Evaluator:
    """Builds and judges candidates of ``space`` for one source model."""

    def __init__(
        self,
        rm: ResolvedModel,
        *,
        data: Any,
        judge: Judge,
        analysis: Analysis,
        constraints: Constraints,
        space: Space,
        model_ref: str | None,
        data_ref: str | None,
    ) -> None:
        self.rm, self.data, self.judge, self.analysis = rm, data, judge, analysis
        self.c, self.space, self.model_ref, self.data_ref = constraints, space, model_ref, data_ref

    def recipe(self, params: dict[str, Any]) -> Recipe:
        return Recipe(
            model=self.model_ref,
            data=self.data_ref,
            steps=tuple(self.space.steps(params)),
            export=Export(batch=self.c.batch),
        )

    def check(self, model: nn.Module, quant: str) -> dict[str, float]:
        """The proxy: estimated latency and size; raises ``Rejected`` when hopeless."""
        est = self.analysis.estimate(model, self.rm.inputs(self.c.batch), quant, self.c.size_mb)
        if self.c.latency_ms is not None and est["latency_ms"] > LATENCY_SLACK * self.c.latency_ms:
            raise Rejected(
                f"proxy: roofline latency {est['latency_ms']:.3g} ms is over "
                f"{LATENCY_SLACK:g}x the {self.c.latency_ms:g} ms budget",
                est,
            )
        if self.c.size_mb is not None and est["size_mb"] > SIZE_SLACK * self.c.size_mb:
            raise Rejected(
                f"proxy: estimated size {est['size_mb']:.3g} MB is over "
                f"{SIZE_SLACK:g}x the {self.c.size_mb:g} MB budget",
                est,
            )
        return est

    def evaluate(self, params: dict[str, Any], folder: Path) -> Outcome:
        """Build, export to ``folder/model.onnx`` (with ``recipe.yaml``) and measure."""
        from slimkit.pipeline.artifact import export_model
        from slimkit.pipeline.runner import StepRecord, run

        t0 = time.perf_counter()
        rec = self.recipe(params)
        quant = str(self.space.complete(params).get("quant", "fp32"))
        n_struct = sum(s.name.startswith(("prune.", "lowrank.")) for s in rec.steps)
        est: dict[str, float] = {}
        if n_struct == 0:
            est = self.check(self.rm.model, quant)
        seen = 0

        def on_step(record: StepRecord, model: nn.Module) -> None:
            nonlocal seen, est
            if record.name.startswith(("prune.", "lowrank.")):
                seen += 1
                if seen == n_struct:  # the architecture is final: judge it before training
                    est = self.check(model, quant)

        res = run(rec, model=self.rm, data=self.data, on_step=on_step)
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / "model.onnx"
        export_model(res.model, path, source=self.rm, settings=rec.export, kind=res.export_kind)
        pinned = res.recipe.replace(model=self.model_ref)
        pinned.save(folder / "recipe.yaml")
        deployed = self.judge.measure(path)
        return Outcome(deployed, pinned, est, time.perf_counter() - t0, res.notes)
