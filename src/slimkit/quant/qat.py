"""Quantization-aware training: PTQ, then the int8 graph is trained, then converted back.

1. **Prepare**: the model is quantized by :class:`~slimkit.quant.ptq.PTQ` (BatchNorm folded into
   the convolutions with its running statistics, which then stay frozen: training cannot move
   them, so training and inference see the same folded weights); every integer layer is then
   trained through a fake-quant of its float weight at ``weight_bits`` with a learned per-channel
   step size (LSQ: Esser et al., "Learned Step Size Quantization", ICLR 2020; straight-through
   rounding, gradient-scaled step), initialised by a per-channel clipping search (the MSE-best
   step on a grid). Activations keep their calibrated uint8 ranges (straight-through).
2. **Train**: by distillation from the float model (``sk.distill``'s response loss, chosen per
   output, mixed with the task loss where the data has labels), on the one trainer
   ``core.train.fit``: progress, checkpoints and resume, and data parallel under ``torchrun``.
3. **Convert**: the learned weights and steps become the integer codes and scales, the biases
   int32 again; the result is the same graph as PTQ's and exports through the same QDQ path
   (codes of fewer than 8 bits run on ORT's int8 kernels unchanged: W4A8, W3A8).

    q = sk.quantize(model, sk.quant.QAT(sk.quant.PTQ(calibration="mse"), weight_bits=4,
                                        epochs=3), data=train_loader, val_fn=accuracy)

YAML step: ``- quant.qat: {weight_bits: 4, epochs: 3}``. The record says what PTQ at the same
bits scored and what QAT recovered (``recovered`` = share of the PTQ loss won back, with
``val_fn``; SQNR against the float model on calibration data always).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from typing import Any, Literal

import torch
from pydantic import Field
from torch import fx, nn

from slimkit.core.config import Config
from slimkit.core.data import collect_batches, flatten_output
from slimkit.core.io import PathLike
from slimkit.core.registry import METHODS
from slimkit.core.scope import Scope, set_submodule
from slimkit.core.verbs import dispatch
from slimkit.quant.modules import QuantLayer, run_layer
from slimkit.quant.primitives import EPS, mse_step
from slimkit.quant.ptq import PTQ, quantize_ptq


def _fast_ptq() -> PTQ:
    return PTQ(speed_check=False, float_prefix=False)


class QAT(Config):
    """Quantization-aware training from a PTQ start; ``weight_bits`` below 8 for low-bit
    weights on int8 kernels."""

    ptq: PTQ = Field(default_factory=_fast_ptq)  # how the start is quantized (and calibrated)
    weight_bits: int = Field(8, ge=2, le=8)
    epochs: int = Field(3, ge=1)
    lr: float = Field(1e-4, gt=0)  # small: the start is already a good model
    learn_scales: bool = True  # LSQ step sizes (else the initial steps stay)
    loss: Literal["auto", "softmax", "sigmoid", "peaked", "regression", "cosine"] = "auto"
    alpha: float = Field(0.5, ge=0, le=1)  # distillation vs label loss, where data has labels
    temperature: float = Field(4.0, gt=0)
    seed: int = 0

    def __init__(self, ptq: PTQ | dict[str, Any] | None = None, /, **data: Any) -> None:
        if ptq is not None:
            data["ptq"] = ptq
        super().__init__(**data)


def _round_ste(x: torch.Tensor) -> torch.Tensor:
    return (torch.round(x) - x).detach() + x


def _grad_scale(x: torch.Tensor, g: float) -> torch.Tensor:
    return (x - x * g).detach() + x * g


def lsq_fake_quant(w: torch.Tensor, step: torch.Tensor, qmax: int) -> torch.Tensor:
    """Symmetric narrow fake-quant of ``w`` per output channel with a learnable ``step`` (LSQ)."""
    g = 1.0 / math.sqrt(w[0].numel() * qmax)
    s = _grad_scale(step.clamp_min(EPS), g).view((-1,) + (1,) * (w.dim() - 1))
    return _round_ste(torch.clamp(w / s, -qmax, qmax)) * s


class QATLayer(nn.Module):
    """A :class:`QuantLayer` in training: its float weight fake-quantized at ``bits`` with a
    learned step; :meth:`freeze` writes the codes back into the QuantLayer."""

    def __init__(self, q: QuantLayer, bits: int, learn: bool) -> None:
        super().__init__()
        self.q = q
        self.bits = bits
        w = q.float_layer.weight
        assert isinstance(w, torch.Tensor)
        step = mse_step(w, bits)
        self.step = nn.Parameter(step, requires_grad=learn)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        layer = self.q.float_layer
        w = lsq_fake_quant(layer.weight, self.step, 2 ** (self.bits - 1) - 1)
        b = layer.bias
        if b is not None:
            b = b + self.q.bias_shift
        return run_layer(layer, x, w, b)

    @torch.no_grad()
    def freeze(self) -> QuantLayer:
        q, qmax = self.q, 2 ** (self.bits - 1) - 1
        w = q.float_layer.weight
        step = self.step.detach().clamp_min(EPS)
        codes = torch.clamp(torch.round(w / step.view((-1,) + (1,) * (w.dim() - 1))), -qmax, qmax)
        q.weight_bits = self.bits
        q.w_scale.copy_(step)
        q.w_q.copy_(codes.to(torch.int8))
        if q.has_bias:
            q.set_input_scale(q.input_scale, q.input_zero_point)
        return q


def prepare(gm: fx.GraphModule, bits: int, learn: bool) -> dict[str, QATLayer]:
    """Swap every QuantLayer of ``gm`` (in place) for a trainable :class:`QATLayer`."""
    layers = {n: m for n, m in gm.named_modules() if isinstance(m, QuantLayer)}
    swapped = {}
    for name, q in layers.items():
        q.float_layer.requires_grad_(True)
        swapped[name] = QATLayer(q, bits, learn)
        set_submodule(gm, name, swapped[name])
    return swapped


def convert(gm: fx.GraphModule, swapped: dict[str, QATLayer]) -> fx.GraphModule:
    """Write the learned codes back: the PTQ graph, with trained integer weights."""
    for name, layer in swapped.items():
        set_submodule(gm, name, layer.freeze())
    gm.requires_grad_(False)
    return gm


def _sqnr(ref: list[torch.Tensor], out: list[torch.Tensor]) -> float:
    num = sum(float((r.float() ** 2).sum()) for r in ref)
    den = sum(float(((r.float() - o.float()) ** 2).sum()) for r, o in zip(ref, out, strict=True))
    return round(10 * math.log10(max(num, EPS) / max(den, EPS)), 2)


def _outputs(model: nn.Module, batches: list[Any]) -> list[torch.Tensor]:
    with torch.no_grad():
        return [t for b in batches for _, t in flatten_output(b.run(model))]


@METHODS.register(
    "quant.qat",
    config=QAT,
    summary="quantization-aware training (LSQ steps, distilled from the float model)",
    aliases={"qat": {}, "w4a8_qat": {"weight_bits": 4}},
    example={
        "epochs": 1,
        "ptq": {"speed_check": False, "float_prefix": False, "num_batches": 2},
    },  # fmt: skip
    export="qdq",
)
def quantize_qat(
    model: nn.Module,
    config: QAT,
    *,
    data: Any,
    scope: Scope | None = None,
    val_fn: Callable[[nn.Module], float] | None = None,
    checkpoint: PathLike | None = None,
    progress: bool = False,
) -> nn.Module:
    """A QAT-trained int8 graph of ``model`` (not modified); ``data`` is the training data
    (its first batches calibrate the start)."""
    cfg = config
    teacher = copy.deepcopy(model).eval()
    ptq_cfg = cfg.ptq.replace(speed_check=False)  # timing happens on the final model, if asked
    gm = quantize_ptq(model, ptq_cfg, data=data, scope=scope, progress=progress)
    if not isinstance(gm, fx.GraphModule):
        return gm  # every layer float (nothing to train)
    batches = collect_batches(data, what="training data", limit=4)
    ref = _outputs(teacher, batches)
    swapped = prepare(gm, cfg.weight_bits, cfg.learn_scales)
    record: dict[str, Any] = {"weight_bits": cfg.weight_bits, "layers": len(swapped)}
    with torch.no_grad():
        record["sqnr_db_ptq"] = _sqnr(ref, _outputs(gm, batches))
        if val_fn is not None:
            record["val_float"] = float(val_fn(teacher))
            record["val_ptq"] = float(val_fn(gm.eval()))
    response = METHODS.entry("distill.response").meta["config"](
        loss=cfg.loss, alpha=cfg.alpha, temperature=cfg.temperature, epochs=cfg.epochs,
        lr=cfg.lr, seed=cfg.seed)  # fmt: skip
    trained = dispatch("distill", gm, response, data=data, teacher=teacher, inplace=True,
                       val_fn=val_fn, checkpoint=checkpoint, progress=progress or None)  # fmt: skip
    from slimkit.core.verbs import report

    train = report(trained).record
    out = convert(gm, swapped).eval()
    record["sqnr_db_qat"] = _sqnr(ref, _outputs(out, batches))
    record["history"] = train.get("history", [])
    record["loss_kinds"] = [d["kind"] for d in train.get("losses", [])]
    if val_fn is not None:
        record["val_qat"] = float(val_fn(out))
        lost = record["val_float"] - record["val_ptq"]
        if abs(lost) > 1e-9:
            record["recovered"] = round((record["val_qat"] - record["val_ptq"]) / lost, 4)
    meta = dict(out.meta.get("slimkit", {}))
    meta.update(method="quant.qat", config=cfg.to_dict(), weight_bits=cfg.weight_bits, qat=record)
    out.meta["slimkit"] = meta
    return out
