"""The modules a quantized model is made of: activation fake-quant and integer-weight layers.

They compute in float exactly what ONNX Runtime computes in integers, and they export to the QDQ
ONNX pattern that ORT fuses into integer kernels (QLinearConv, MatMulIntegerToFloat, QLinearAdd):
activations as QuantizeLinear/DequantizeLinear (uint8), weights as DequantizeLinear over int8
initializers (per output channel), biases as DequantizeLinear over int32 with scale = input scale x
weight scale (what ORT requires to fuse a conv).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from slimkit.quant.primitives import affine_params, weight_codes


class _DequantizeConst(torch.autograd.Function):
    """``q * scale`` along ``axis``; exports as ONNX DequantizeLinear over the integer constant."""

    @staticmethod
    def forward(ctx: Any, q: torch.Tensor, scale: torch.Tensor, axis: int) -> torch.Tensor:
        shape = [1] * q.dim()
        shape[axis] = -1
        return q.to(torch.float32) * scale.view(shape)

    @staticmethod
    def symbolic(g: Any, q: Any, scale: Any, axis: int) -> Any:
        n = q.type().sizes()[axis]
        dtype = torch.int8 if q.type().scalarType() == "Char" else torch.int32
        zp = g.op("Constant", value_t=torch.zeros(n, dtype=dtype))
        return g.op("DequantizeLinear", q, scale, zp, axis_i=axis)


def dequantize_const(q: torch.Tensor, scale: torch.Tensor, axis: int = 0) -> torch.Tensor:
    out: torch.Tensor = _DequantizeConst.apply(q, scale, axis)
    return out


class ActQuant(nn.Module):
    """Per-tensor asymmetric uint8 fake-quant of an activation (QuantizeLinear+DequantizeLinear).

    Before calibration it observes (``stats`` is filled by the observation pass) and passes the
    tensor through unchanged; ``set_range`` switches it to quantizing.
    """

    scale: torch.Tensor
    zero_point: torch.Tensor

    def __init__(self, name: str, bits: int = 8, share_with: str | None = None) -> None:
        super().__init__()
        self.name = name  # the graph node whose output this quantizes (for messages)
        self.bits = bits
        self.share_with = share_with  # reuse another quantizer's range (pass-through ops)
        self.register_buffer("scale", torch.ones(()))
        self.register_buffer("zero_point", torch.zeros((), dtype=torch.int64))
        self.enabled = False
        self.observer: Any = None  # set by the observation pass

    def set_range(self, lo: float, hi: float) -> None:
        scale, zp, _, _ = affine_params(lo, hi, bits=self.bits, symmetric=False, signed=False)
        self.scale.copy_(scale)
        self.zero_point.copy_(zp)
        self.enabled = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.observer is not None:
            self.observer(self, x)
        if not self.enabled:
            return x
        # scale/zero point as Python numbers: the exporter then writes a uint8 zero point
        return torch.fake_quantize_per_tensor_affine(
            x, float(self.scale), int(self.zero_point), 0, 2**self.bits - 1
        )

    def extra_repr(self) -> str:
        state = (
            f"scale={float(self.scale):.4g}, zp={int(self.zero_point)}" if self.enabled else "off"
        )
        return f"{self.name!r}, {state}"


class QuantLayer(nn.Module):
    """A Conv/Linear whose weight is stored as int8 (per output channel, symmetric) and whose bias
    is int32 at scale ``input_scale * weight_scale``; ``float_layer`` keeps the original."""

    w_q: torch.Tensor
    w_scale: torch.Tensor
    b_q: torch.Tensor
    b_scale: torch.Tensor

    def __init__(self, layer: nn.Module, weight_bits: int = 8) -> None:
        super().__init__()
        if not isinstance(layer, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)):
            raise TypeError(f"QuantLayer wraps Conv/Linear, not {type(layer).__name__}")
        self.float_layer = layer
        self.weight_bits = weight_bits
        w = layer.weight.detach()
        assert isinstance(w, torch.Tensor)
        q, scale = weight_codes(w, weight_bits)  # narrow symmetric: 7-bit weights stay exact
        self.register_buffer("w_scale", scale)
        self.register_buffer("w_q", q.to(torch.int8))
        self.register_buffer("b_q", torch.zeros(w.shape[0], dtype=torch.int32))
        self.register_buffer("b_scale", torch.ones(w.shape[0]))
        self.has_bias = False
        self.input_scale = 1.0
        self.input_zero_point = 0
        self.float_mode = False  # run the original float layer (bias correction's float pass)
        self.bias_shift = torch.zeros(w.shape[0])  # bias correction, added to the float bias

    def set_input_scale(self, input_scale: float, zero_point: int | None = None) -> None:
        """Quantize the bias to int32 at ``input_scale * w_scale`` (needed for ORT's fusion)."""
        b = self.float_layer.bias
        bias = b.detach() if isinstance(b, torch.Tensor) else torch.zeros_like(self.w_scale)
        bias = bias + self.bias_shift
        self.input_scale = input_scale
        if zero_point is not None:
            self.input_zero_point = zero_point
        self.b_scale.copy_(self.w_scale * input_scale)
        limit = 2**31 - 1
        self.b_q.copy_(torch.clamp(torch.round(bias / self.b_scale), -limit, limit).to(torch.int32))
        self.has_bias = True

    def correct_bias(self, delta: torch.Tensor) -> None:
        """Subtract ``delta`` (the mean output error per channel) from the bias, re-quantized."""
        self.bias_shift = self.bias_shift - delta.detach().float()
        self.set_input_scale(self.input_scale)

    def set_weight_codes(self, codes: torch.Tensor) -> None:
        """Replace the integer weights (e.g. AdaRound's choice of rounding) on the same grid."""
        qmax = 2 ** (self.weight_bits - 1) - 1
        if codes.shape != self.w_q.shape or not torch.equal(codes, codes.round()):
            raise ValueError(f"weight codes must be integers of shape {tuple(self.w_q.shape)}")
        if codes.abs().max() > qmax:
            raise ValueError(f"weight codes must lie in -{qmax}..{qmax} ({self.weight_bits} bits)")
        self.w_q.copy_(codes.to(torch.int8))

    def set_weight_scale(self, scale: torch.Tensor) -> None:
        """A new per-channel weight scale; the codes re-rounded to nearest on it, the int32 bias
        re-quantized."""
        qmax = 2 ** (self.weight_bits - 1) - 1
        self.w_scale.copy_(scale.to(self.w_scale.dtype))
        w = self.float_layer.weight.detach().float()
        s = self.w_scale.view((-1,) + (1,) * (w.dim() - 1))
        self.w_q.copy_(torch.clamp(torch.round(w / s), -qmax, qmax).to(torch.int8))
        if self.has_bias:
            self.set_input_scale(self.input_scale)

    def weight(self) -> torch.Tensor:
        return dequantize_const(self.w_q, self.w_scale, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        layer = self.float_layer
        if self.float_mode:
            return layer(x)
        b = dequantize_const(self.b_q, self.b_scale, 0) if self.has_bias else layer.bias
        return run_layer(layer, x, self.weight(), b)


@contextlib.contextmanager
def switched(
    model: nn.Module,
    acts_on: Callable[[ActQuant], bool],
    layers_quant: Callable[[QuantLayer], bool],
) -> Iterator[None]:
    """Inside the block, the activation quantizers ``acts_on`` picks stay on (the others off) and
    the layers ``layers_quant`` picks run on their integer weights (the others on their float
    ones); a quantizer that was off stays off, a layer already float stays float. Every flag is
    restored to what it was, also on error."""
    acts = [m for m in model.modules() if isinstance(m, ActQuant)]
    lays = [m for m in model.modules() if isinstance(m, QuantLayer)]
    saved = [m.enabled for m in acts], [m.float_mode for m in lays]
    try:
        for m, on in zip(acts, saved[0], strict=True):
            m.enabled = on and bool(acts_on(m))
        for lay, fm in zip(lays, saved[1], strict=True):
            lay.float_mode = fm or not layers_quant(lay)
        yield
    finally:
        for m, on in zip(acts, saved[0], strict=True):
            m.enabled = on
        for lay, fm in zip(lays, saved[1], strict=True):
            lay.float_mode = fm


def float_pass(
    model: nn.Module, layers: Iterable[QuantLayer] | None = None
) -> contextlib.AbstractContextManager[None]:
    """Run ``model`` as its float original inside the block: activation quantizers off and
    ``layers`` (default: every ``QuantLayer``) on their float weights; the flags are restored
    to what they were, also on error."""
    floated = None if layers is None else set(map(id, layers))
    return switched(model, lambda _a: False,
                    lambda lay: floated is not None and id(lay) not in floated)  # fmt: skip


def run_layer(
    layer: nn.Module, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None
) -> torch.Tensor:
    """``layer`` (a Linear or Conv) applied to ``x`` with the weight ``w`` and bias ``b``."""
    if isinstance(layer, nn.Linear):
        return F.linear(x, w, b)
    assert isinstance(layer, (nn.Conv1d, nn.Conv2d, nn.Conv3d))
    conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[w.dim() - 2]
    if layer.padding_mode != "zeros":
        x = F.pad(x, layer._reversed_padding_repeated_twice, mode=layer.padding_mode)
        return conv(x, w, b, layer.stride, 0, layer.dilation, layer.groups)
    return conv(x, w, b, layer.stride, layer.padding, layer.dilation, layer.groups)


class QuantEmbedding(nn.Module):
    """An embedding table stored as int8 rows with one float scale per row (weight-only).

    The forward gathers the int8 rows and their scales, then multiplies: in ONNX a Gather over the
    int8 initializer, a Cast and a Mul, so ONNX Runtime touches only the looked-up rows. (A
    DequantizeLinear over the whole table before the Gather would dequantize every row on every
    run: 1.6 ms for BERT's 30522 x 256 table, measured, against 0.02 ms this way.) Symmetric,
    narrow (-127..127) per row: 43 dB against the float table for N(0, 0.02) rows.
    """

    w_q: torch.Tensor
    w_scale: torch.Tensor

    def __init__(self, emb: nn.Embedding, bits: int = 8) -> None:
        super().__init__()
        if emb.max_norm is not None:
            raise ValueError("an embedding with max_norm renormalises its weights: keep it float")
        q, scale = weight_codes(emb.weight.detach().float(), bits)
        self.register_buffer("w_q", q.to(torch.int8))
        self.register_buffer("w_scale", scale.unsqueeze(1).contiguous())
        self.num_embeddings, self.embedding_dim = emb.num_embeddings, emb.embedding_dim
        self.padding_idx = emb.padding_idx

    def weight(self) -> torch.Tensor:
        return self.w_q.float() * self.w_scale

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.w_q[ids].to(torch.float32) * self.w_scale[ids]

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, int8 rows"
