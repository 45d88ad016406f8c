"""Dynamic inference: the compute spent depends on the input.

- **Early exit** (``early_exit``): classifier heads after chosen stages of a trained network,
  trained by distillation from its final head, thresholds calibrated to a target accuracy drop;
  ``export_early_exit`` writes one ONNX graph per segment and ``OrtEarlyExit`` runs them in
  ONNX Runtime until one is confident.

    ee = sk.dynamic.early_exit(model, sk.dynamic.EarlyExit(max_drop=0.01), data=train, calib=val)
    print(ee.evaluate(test))     # top1, exit fractions, average MACs, macs_saved
    runner = sk.dynamic.export_early_exit(ee, "out/ee", example_inputs=x[:1])
    logits, exit_index = runner(x)

- **Skipping residual blocks** (``skip_gates``): a small learned gate before each residual block
  decides per input whether it runs; trained with distillation and a compute penalty;
  ``export_skip_gates`` / ``OrtSkipGates`` run it in ONNX Runtime, gate by gate.

    sg = sk.dynamic.skip_gates(model, sk.dynamic.SkipGates(penalty=2.0), data=train)
    print(sg.evaluate(test))     # top1, how often each block runs, macs_saved

See ``segments`` (where a model can be cut), ``early_exit``, ``skip`` and ``runner``.
"""

from __future__ import annotations

from slimkit.dynamic.early_exit import (
    EarlyExit,
    EarlyExitModel,
    ExitHead,
    calibrate,
    confidence,
    early_exit,
)
from slimkit.dynamic.runner import OrtEarlyExit, OrtSkipGates, export_early_exit, export_skip_gates
from slimkit.dynamic.segments import cut_points, split
from slimkit.dynamic.skip import GatedBlock, SkipGateModel, SkipGates, find_blocks, skip_gates

__all__ = [
    "EarlyExit",
    "EarlyExitModel",
    "ExitHead",
    "GatedBlock",
    "OrtEarlyExit",
    "OrtSkipGates",
    "SkipGateModel",
    "SkipGates",
    "calibrate",
    "confidence",
    "cut_points",
    "early_exit",
    "export_early_exit",
    "export_skip_gates",
    "find_blocks",
    "skip_gates",
    "split",
]
