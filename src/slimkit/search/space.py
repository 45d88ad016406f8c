"""The search space: a few knobs of the registered techniques, turned into recipe steps.

A candidate is one value per knob; ``Space.steps(params)`` makes it the ordered steps the
planner uses too (structure first, then recovery, then quantization)::

    prune_macs       fraction of the source MACs kept (prune.auto)           1.0 = no pruning
    prune_allocation how prune.auto spreads that over the layers: one ratio for all (uniform) or
                     per-layer ratios from each layer's measured sensitivity (sensitivity)
    lowrank_energy   spectral energy kept by truncated SVD (lowrank.svd)    0 = off
    recovery_epochs  fine-tuning after a structural change, distilled from the source
                     (the zoo task's ``finetune`` step, else distill.response on the data)
    quant            fp32 | int8 (quant.ptq) | mixed (quant.mixed: < 8 bits under the size budget)

The space is built from what is registered and what the model, data and constraints allow
(``build_space``), and kept small (a few dozen candidates) so that a search on 2 cores finds the
trade-off in minutes. ``override`` narrows or widens a knob: ``{"recovery_epochs": [0]}``.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from slimkit.core.registry import did_you_mean
from slimkit.errors import ConfigError
from slimkit.pipeline.recipe import Step, config_class

KNOBS: dict[str, tuple[Any, ...]] = {
    "prune_macs": (1.0, 0.75, 0.5, 0.35, 0.25),
    "prune_allocation": ("uniform", "sensitivity"),
    "lowrank_energy": (0.0, 0.99, 0.95, 0.9),
    "recovery_epochs": (0, 1, 2),
    "quant": ("fp32", "int8", "mixed"),
}
METHOD_OF = {
    "prune_macs": "prune.auto",
    "prune_allocation": "prune.auto",
    "lowrank_energy": "lowrank.svd",
    "quant": "quant.ptq",
}
MIXED_BELOW = 0.35  # a size budget under this fraction of the fp32 file needs < 8 bits


@dataclass(frozen=True)
class Space:
    """Knob -> allowed values (a single value: fixed), plus how recovery trains."""

    choices: dict[str, tuple[Any, ...]]
    training: str | None = None  # "finetune" (zoo task) | "distill.response" (given data) | None
    size_mb: float | None = None  # the size budget quant.mixed aims at
    notes: list[str] = field(default_factory=list)

    def suggest(self, trial: Any) -> dict[str, Any]:
        """One candidate from an Optuna trial (recovery only after a structural change)."""
        params: dict[str, Any] = {}
        for knob, values in self.choices.items():
            if knob == "recovery_epochs" and not structural(params):
                continue
            if knob == "prune_allocation" and params.get("prune_macs", 1.0) >= 1.0:
                continue
            params[knob] = trial.suggest_categorical(knob, list(values))
        return params

    def complete(self, params: Mapping[str, Any]) -> dict[str, Any]:
        """``params`` with every knob it lacks at its "no change" value."""
        out = {k: v[0] for k, v in self.choices.items()}
        out.update(params)
        if not structural(out):
            out.pop("recovery_epochs", None)
        if out.get("prune_macs", 1.0) >= 1.0:
            out.pop("prune_allocation", None)
        return out

    def steps(self, params: Mapping[str, Any]) -> list[Step]:
        """The recipe steps of a candidate, in the order they run."""
        p = self.complete(params)
        steps: list[Step] = []
        if p.get("prune_macs", 1.0) < 1.0:
            fields = {"macs": p["prune_macs"]}
            if p.get("prune_allocation", "uniform") != "uniform":
                fields["allocation"] = p["prune_allocation"]
            steps.append(_step("prune.auto", fields))
        if p.get("lowrank_energy", 0.0) > 0.0:
            steps.append(_step("lowrank.svd", {"energy": p["lowrank_energy"]}))
        epochs = int(p.get("recovery_epochs", 0) or 0)
        if epochs and self.training is not None:
            steps.append(_step(self.training, {"epochs": epochs}))
        quant = p.get("quant", "fp32")
        if quant == "int8":  # the search times every candidate: no timed choices inside PTQ
            steps.append(_step("quant.ptq", {"float_prefix": [], "speed_check": False}))
        elif quant == "mixed":
            steps.append(_step("quant.mixed", {"max_size_mb": self.size_mb}))
        return steps

    def size(self) -> int:
        n = 1
        for v in self.choices.values():
            n *= len(v)
        return n

    def to_dict(self) -> dict[str, Any]:
        return {
            "choices": {k: list(v) for k, v in self.choices.items()},
            "training": self.training,
            "size_mb": self.size_mb,
        }

    def key(self) -> str:
        """A short hash of the space (part of the default study name)."""
        text = json.dumps(self.to_dict(), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:8]


def structural(params: Mapping[str, Any]) -> bool:
    """Whether a candidate changes the architecture (pruning or low rank)."""
    return params.get("prune_macs", 1.0) < 1.0 or params.get("lowrank_energy", 0.0) > 0.0


def _step(name: str, fields: dict[str, Any]) -> Step:
    return Step(name, config_class(name).from_dict(fields))


def build_space(
    methods: Sequence[str],
    *,
    training: str | None,
    size_mb: float | None,
    source_size_mb: float,
    override: Mapping[str, Sequence[Any]] | None = None,
) -> Space:
    """The knobs that apply: each technique's knob when its method is registered, recovery when
    the model can be trained (``training``), ``mixed`` when the size budget needs < 8 bits."""
    choices: dict[str, tuple[Any, ...]] = {}
    notes: list[str] = []
    for knob, values in KNOBS.items():
        method = METHOD_OF.get(knob)
        if method is not None and method not in methods:
            notes.append(f"{knob}: {method} is not registered")
            continue
        if knob == "recovery_epochs" and training is None:
            notes.append("recovery_epochs: no training data (a zoo task or data=...)")
            continue
        if knob == "quant":
            mixed = (
                size_mb is not None
                and size_mb < MIXED_BELOW * source_size_mb
                and "quant.mixed" in methods
            )
            values = tuple(v for v in values if v != "mixed" or mixed)
        choices[knob] = values
    for knob, given in (override or {}).items():
        if knob not in KNOBS:
            hint = did_you_mean(knob, list(KNOBS))
            raise ConfigError(
                f"the search space has no knob {knob!r}",
                fix=f"{hint + ' ' if hint else ''}knobs are: {', '.join(KNOBS)}",
            )
        vals: tuple[Any, ...] = tuple(given)
        if not vals:
            raise ConfigError(f"space[{knob!r}] is empty", fix="give at least one value")
        if knob == "quant" and "mixed" in vals and size_mb is None:
            raise ConfigError(
                "quant 'mixed' needs a size budget", fix="set size_mb (--max-size), or drop 'mixed'"
            )
        choices[knob] = vals
    return Space(choices, training, size_mb, notes)
