"""The quantization verb: ``sk.quantize(model, method, ...)`` for every registered ``quant.*``.

    q = sk.quantize(model, "int8", data=calib)                       # quant.ptq, defaults
    q = sk.quantize(model, sk.quant.PTQ(calibration="entropy"), data=calib,
                    scope=sk.Scope(exclude=["fc"]))                  # full control
    d = sk.quantize(model, "dynamic", example_inputs=(x,))           # ONNX Runtime dynamic int8
    h = sk.quantize(model, "fp16")                                   # 16-bit, float32 boundaries
    print(sk.report(q).summary())                                    # what it did

Names: ``int8`` / ``static`` / ``ptq`` (``quant.ptq``), ``dynamic``, ``weight-only``, ``half``
with ``fp16`` / ``bf16``, or any registered ``quant.*`` name; ``slimkit list 'quant.*'`` shows
them. The dispatch (checks, the untouched input, the report) is ``core.verbs.dispatch``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from slimkit.core.config import Config
from slimkit.core.registry import METHODS
from slimkit.core.scope import Scope
from slimkit.core.verbs import dispatch

# quant.ptq registers itself in quant/ptq.py; what the verb and the contract tests need to know
# about it is said here.
METHODS.annotate(
    "quant.ptq",
    aliases={"int8": {}, "static": {}},
    example={"float_prefix": False, "num_batches": 2, "speed_check": False},  # no timing here
    export="qdq",
)


def quantize(
    model: nn.Module,
    config: str | Config = "int8",
    *,
    data: Any = None,
    example_inputs: Sequence[torch.Tensor] | torch.Tensor | None = None,
    scope: Scope | None = None,
    progress: bool = False,
    **options: Any,
) -> nn.Module:
    """A quantized copy of ``model`` (never modified); ``config`` is a registered name or alias
    (``"int8"``, ``"dynamic"``, ``"weight-only"``, ``"fp16"``, ``"quant.ptq"``) or a config object
    (``PTQ``, ``Dynamic``, ``WeightOnly``, ``Half``).

    ``data`` is calibration data (static int8 needs it: an iterable of batches); ``example_inputs``
    is one input batch (dynamic int8 on ONNX Runtime exports with it; it defaults to the first
    batch of ``data``); ``scope`` limits the layers, for the methods that take one. ``options``
    go to the method's handler. ``sk.report(result)`` says what was quantized and what was kept
    float, and why. Static int8 returns an ``fx.GraphModule`` whose ``meta["slimkit"]`` is the
    method's record; export it with ``slimkit.export.qdq.export_quantized`` (or
    ``sk.export_onnx``).
    """
    return dispatch("quant", model, config, data=data, example_inputs=example_inputs,
                    scope=scope, progress=progress or None, **options)  # fmt: skip
