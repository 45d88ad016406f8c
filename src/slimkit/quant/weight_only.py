"""Weight-only int8: weights stored as int8 per output channel, activations stay float.

For memory-bound models (LLM-style decoders at batch 1, embedding-heavy encoders) the weights are
the bytes that move; storing them in int8 cuts model size and weight traffic 4x while activations
keep full precision. In ONNX the weight is a DequantizeLinear over an int8 initializer feeding a
float MatMul/Gemm/Conv.

    small = sk.quantize(model, "weight-only")
    small = sk.quantize(model, WeightOnly(bits=8), scope=sk.Scope(exclude=["lm_head"]))

YAML step: ``- quant.weight_only: {bits: 8}``. Supports Linear and Conv1d/2d/3d.
"""

from __future__ import annotations

import copy
from typing import Literal

from pydantic import Field
from torch import nn

from slimkit.core.config import Config
from slimkit.core.registry import METHODS
from slimkit.core.scope import Scope, set_submodule
from slimkit.quant.modules import QuantLayer
from slimkit.quant.sim import WEIGHTED


class WeightOnly(Config):
    """Symmetric per-channel integer weights, float activations."""

    bits: Literal[8] = 8  # int8 storage (4-bit packing comes with the LLM methods)
    min_params: int = Field(0, ge=0)  # keep layers smaller than this in float


@METHODS.register(
    "quant.weight_only",
    config=WeightOnly,
    summary="int8 weights, float activations",
    aliases={"int8_weights": {}},
    export="qdq",  # ORT may run DequantizeLinear + MatMul as an int8 kernel: checked by SQNR
)
def quantize_weight_only(
    model: nn.Module, config: WeightOnly | None = None, *, scope: Scope | None = None
) -> nn.Module:
    """A copy of ``model`` whose Linear/Conv weights are int8 (the original is not modified)."""
    cfg = config or WeightOnly()
    out = copy.deepcopy(model).eval()
    chosen = (scope or Scope()).select(out, WEIGHTED)
    for name, layer in chosen:
        if sum(p.numel() for p in layer.parameters()) < cfg.min_params:
            continue
        # 8-bit full range: no activation is quantized, so no integer kernel can saturate
        set_submodule(out, name, QuantLayer(layer, cfg.bits))
    return out
