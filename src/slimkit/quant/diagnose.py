"""Where a quantized model's error comes from: weights or activations, and which layer.

After ``sk.quantize`` the first question is why the output moved. ``diagnose`` answers it on the
quantized (simulated) model itself, by switching its quantizers on and off, one group at a time,
and measuring the SQNR of the output against the float original on the same inputs:

- ``full``: everything quantized, as the model runs;
- ``weights_only``: the integer weights (and their int32 biases, corrections included) with every
  activation quantizer off;
- ``activations_only``: every activation quantizer on, every layer on its float weights;
- per layer (``per_layer=True``): that layer's integer weights alone, activations off;
- per activation quantizer: that quantizer alone, weights float.

The two halves bound what a better weight method can reach: if ``activations_only`` is 25 dB, no
rounding or reconstruction of the weights brings ``full`` above about 25 dB with the same
activation grid. The per-part numbers are SQNRs of the *whole output*, so the worst parts come
first in ``worst_layers`` / ``worst_activations``.

Caveat: a layer's bias correction is computed for the fully quantized model (quantized inputs,
upstream errors), so one layer alone can show an error that the whole model does not: parts do not
add up to the whole. Read them as a ranking. An int8 embedding table (``QuantEmbedding``) keeps no
float copy: pass ``reference=`` (the float model) to measure against the true original; without
it the reference runs the quantized model with its other quantizers off.

Python::

    q = sk.quantize(model, PTQ(weight_bits=4), data=calib)
    d = sk.quant.diagnose(q, data=test_batches, reference=model)
    print(d.summary()); d.save("diagnosis.json")
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from slimkit.core.data import inputs_to_measure
from slimkit.core.io import PathLike, write_json
from slimkit.errors import DataError
from slimkit.quant.modules import ActQuant, QuantLayer, switched
from slimkit.testing.numerics import sqnr


@dataclass
class QuantDiagnosis:
    """SQNRs (dB) of a quantized model's output against its float original, by error source."""

    full_db: float
    weights_only_db: float
    activations_only_db: float
    layers: list[dict[str, Any]] = field(default_factory=list)  # name, bits, sqnr_db (alone)
    activations: list[dict[str, Any]] = field(default_factory=list)  # name, sqnr_db (alone)
    batches: int = 0

    def worst_layers(self, k: int = 5) -> list[dict[str, Any]]:
        return sorted(self.layers, key=lambda r: r["sqnr_db"])[:k]

    def worst_activations(self, k: int = 5) -> list[dict[str, Any]]:
        return sorted(self.activations, key=lambda r: r["sqnr_db"])[:k]

    def dominant(self) -> str:
        """``weights`` or ``activations``: the half whose error alone is the larger."""
        return "weights" if self.weights_only_db < self.activations_only_db else "activations"

    def summary(self) -> str:
        lines = [
            f"output SQNR {self.full_db:.2f} dB as quantized; weights only "
            f"{self.weights_only_db:.2f} dB, activations only {self.activations_only_db:.2f} dB "
            f"({self.dominant()} dominate; {self.batches} batches)"
        ]
        for title, rows in (("layers", self.worst_layers(3)),
                            ("activations", self.worst_activations(3))):  # fmt: skip
            if rows:
                worst = ", ".join(f"{r['name']} {r['sqnr_db']:.1f} dB" for r in rows)
                lines.append(f"worst {title} alone: {worst}")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        def num(x: float) -> float | None:
            return round(x, 3) if math.isfinite(x) else None

        return {
            "full_db": num(self.full_db),
            "weights_only_db": num(self.weights_only_db),
            "activations_only_db": num(self.activations_only_db),
            "dominant": self.dominant(),
            "batches": self.batches,
            "layers": [{**r, "sqnr_db": num(r["sqnr_db"])} for r in self.layers],
            "activations": [{**r, "sqnr_db": num(r["sqnr_db"])} for r in self.activations],
        }

    def save(self, path: PathLike) -> None:
        """Write the diagnosis as JSON (atomically)."""
        write_json(path, self.to_dict())


def diagnose(
    qmodel: nn.Module,
    *,
    data: Any = None,
    example_inputs: Any = None,
    reference: nn.Module | None = None,
    per_layer: bool = True,
    max_batches: int = 8,
) -> QuantDiagnosis:
    """Split the output error of ``qmodel`` (a PTQ / QAT-converted model with integer layers and
    activation quantizers) into its weight and activation parts, and per part (module docstring).

    ``data``: batches as every verb takes them (up to ``max_batches`` are used), or
    ``example_inputs``; held-out inputs give the honest picture. ``reference``: the float model
    (default: ``qmodel`` with all its quantizers off).
    """
    lays = {n: m for n, m in qmodel.named_modules() if isinstance(m, QuantLayer)}
    acts = {n: m for n, m in qmodel.named_modules() if isinstance(m, ActQuant) and m.enabled}
    if not lays and not acts:
        raise DataError(
            "diagnose: the model has no quantized layers or activation quantizers",
            fix="pass the model that sk.quantize(model, PTQ(...)) or a converted QAT run returned",
        )
    batches = inputs_to_measure(
        data, example_inputs, what="diagnose", limit=max_batches,
        missing="diagnose needs inputs to measure on",
        fix="pass data=held-out batches or example_inputs=(x,)",
    )  # fmt: skip
    was_training = qmodel.training
    qmodel.eval()

    def run(model: nn.Module) -> list[Any]:
        with torch.no_grad():
            return [b.run(model) for b in batches]

    try:
        if reference is not None:
            ref_was = reference.training
            reference.eval()
            try:
                ref = run(reference)
            finally:
                reference.train(ref_was)
        else:
            with switched(qmodel, lambda _a: False, lambda _lay: False):
                ref = run(qmodel)

        def measure(acts_on: Any, layers_quant: Any) -> float:
            with switched(qmodel, acts_on, layers_quant):
                return sqnr(ref, run(qmodel))

        out = QuantDiagnosis(
            full_db=measure(lambda _a: True, lambda _lay: True),
            weights_only_db=measure(lambda _a: False, lambda _lay: True),
            activations_only_db=measure(lambda _a: True, lambda _lay: False),
            batches=len(batches),
        )
        if per_layer:
            for name, lay in lays.items():
                db = measure(lambda _a: False, lambda m, lay=lay: m is lay)
                out.layers.append({"name": name, "bits": lay.weight_bits, "sqnr_db": db})
            for name, a in acts.items():
                db = measure(lambda m, a=a: m is a, lambda _lay: False)
                out.activations.append({"name": name, "tensor": a.name, "sqnr_db": db})
    finally:
        qmodel.train(was_training)
    return out
