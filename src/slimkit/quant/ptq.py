"""Post-training static int8 quantization that ONNX Runtime runs as integer kernels.

    q = sk.quantize(model, "int8", data=calib)                         # defaults
    q = sk.quantize(model, PTQ(calibration="entropy"), data=calib, scope=sk.Scope(exclude=["fc"]))

YAML step: ``- quant.ptq: {calibration: percentile, percentile: 99.99}``.
Supports Conv1d/2d/3d and Linear (weights, per output channel, symmetric int8), and quantizes the
activations around them, matmuls, adds, concatenations and average pooling (uint8, per tensor).
The result is an ``fx.GraphModule`` that simulates the integer model exactly; export it with
``sk.export_onnx`` (QDQ ONNX) or ``slimkit.export.qdq.export_quantized`` (also counts the integer
kernels ORT runs). BatchNorm is folded first (exactly; see graph_opt.bn_fold).

Weight bits: on CPUs without VNNI, ORT's uint8 x int8 kernels add pairs of products in 16 bits and
saturate with full 8-bit weights (measured here, AVX2: 27 output steps of error on a 3x3 conv fed
codes over 0..255; ResNet-18/32 as run 23.2 dB against 32.6 dB simulated). 7-bit weights keep
every pair sum in range, so ``weight_bits="auto"`` picks 7 there and 8 where VNNI exists.
Keeping 8 bits after ReLU-like inputs was tried and still saturated (23.8 dB as run), so the choice
is per CPU, not per layer, until a per-layer check against ORT exists. ``export_quantized``
measures ORT against the simulation, so saturation shows up as a failed check, never silently.
"""

from __future__ import annotations

import time
from typing import Any, Literal

import torch
from pydantic import Field
from torch import fx, nn

from slimkit.core.config import Config
from slimkit.core.data import collect_batches
from slimkit.core.graph import capture
from slimkit.core.machine import cpu_info
from slimkit.core.registry import METHODS
from slimkit.core.scope import Scope
from slimkit.quant import bias_correction, sim


class PTQ(Config):
    """Static post-training quantization: int8 weights, uint8 activations, calibrated ranges."""

    calibration: Literal["minmax", "percentile", "entropy", "mse"] = "mse"
    percentile: float = Field(99.999, gt=90.0, le=100.0)  # for calibration="percentile"
    weight_bits: Literal["auto", 7, 8] = "auto"  # auto: 8 with VNNI, else 7 (exact on ORT)
    num_batches: int = Field(32, ge=1)  # calibration batches read from `data`
    fold_bn: bool = True
    bias_correction: bool = True  # remove the mean output shift of each layer (one extra pass)


def resolve_weight_bits(value: str | int) -> int:
    """``"auto"`` -> 8 on CPUs with VNNI (AVX512-VNNI / AVX-VNNI), 7 elsewhere (worst case)."""
    if value == "auto":
        return 8 if cpu_info()["vnni"] else 7
    return int(value)


@METHODS.register("quant.ptq", config=PTQ, summary="static int8 PTQ, ORT integer kernels")
def quantize_ptq(
    model: nn.Module,
    config: PTQ | None = None,
    *,
    data: Any,
    example_inputs: tuple[torch.Tensor, ...] | None = None,
    scope: Scope | None = None,
    progress: bool = False,
) -> fx.GraphModule:
    """Quantize ``model`` (not modified) with ``config``; ``data`` is the calibration data."""
    cfg = config or PTQ()
    t0 = time.perf_counter()
    batches = collect_batches(data, what="calibration data", limit=cfg.num_batches)
    example = example_inputs or batches[0].inputs
    if cfg.fold_bn:
        from slimkit.graph_opt.bn_fold import fold_bn

        gm = fold_bn(model.eval(), example_inputs=tuple(example))
    else:
        import copy

        gm = capture(copy.deepcopy(model).eval(), method="fx")
    plan = sim.place(gm, scope)
    quants = sim.insert_quantizers(gm, plan)
    needs_hist = cfg.calibration != "minmax"
    stats = sim.observe(gm, quants, batches, histogram=needs_hist)
    bits = resolve_weight_bits(cfg.weight_bits)
    out = sim.convert(gm, plan, quants, stats, method=cfg.calibration,
                      percentile=cfg.percentile, weight_bits=bits)  # fmt: skip
    if cfg.bias_correction:
        layers = {t: out.get_submodule(t) for t in plan.weighted.values()}
        bias_correction.correct(out, layers, batches)  # type: ignore[arg-type]
    out.eval()
    out.meta["slimkit"] = {
        "method": "quant.ptq",
        "config": cfg.to_dict(),
        "weight_bits": _bits_summary(out),
        "activation_quantizers": len(quants),
        "quantized_layers": len(plan.weighted),
        "float_layers": plan.skipped,
        "seconds": round(time.perf_counter() - t0, 3),
    }
    return out


def quantize(
    model: nn.Module,
    config: str | PTQ = "int8",
    *,
    data: Any,
    example_inputs: tuple[torch.Tensor, ...] | None = None,
    scope: Scope | None = None,
    progress: bool = False,
) -> fx.GraphModule:
    """``sk.quantize(model, "int8", data=calib)``: the quantization verb."""
    if isinstance(config, str):
        from slimkit.errors import ConfigError

        if config not in ("int8", "ptq", "quant.ptq"):
            raise ConfigError(
                f"unknown quantization {config!r}",
                fix="use 'int8' (static PTQ) or pass a config object such as PTQ(...)",
            )
        config = PTQ()
    return quantize_ptq(model, config, data=data, example_inputs=example_inputs, scope=scope,
                        progress=progress)  # fmt: skip


def _bits_summary(model: nn.Module) -> str:
    """``"8"``, ``"7"`` or e.g. ``"8/7 (50/3 layers)"`` for a mix."""
    from collections import Counter

    from slimkit.quant.modules import QuantLayer

    c = Counter(m.weight_bits for m in model.modules() if isinstance(m, QuantLayer))
    if len(c) <= 1:
        return str(next(iter(c), "-"))
    bits = sorted(c, reverse=True)
    return "/".join(map(str, bits)) + f" ({'/'.join(str(c[b]) for b in bits)} layers)"
