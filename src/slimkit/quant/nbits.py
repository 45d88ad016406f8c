"""``NBitsLinear``: a Linear layer stored as packed 4- or 8-bit group-wise codes, computed in
PyTorch exactly as ONNX Runtime's ``com.microsoft.MatMulNBits`` computes it, and exported as that
node (so ``sk.export_onnx`` / the artifact's ``model.onnx`` run ORT's fast weight-only kernels).

The module keeps what ``MatMulNBits`` takes: ``qweight`` (N, G, blob) uint8, ``scales`` (N, G),
``zero_points`` (N, ceil(G * bits / 8)) uint8 when asymmetric, plus an optional per-input-channel
``input_scale`` (AWQ's activation scaling, exported as a ``Mul`` before the node) and the float
bias (an ``Add`` after it). ``Int8Embedding`` keeps an embedding table in int8 per row. With
``accuracy_level=4`` ORT quantizes the input to int8 per block
before its integer dot products; the forward does the same, so the simulation is what runs.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from slimkit.quant.groupwise import (
    GroupSpec,
    dequantize_weight,
    pack_codes,
    pack_zero_points,
    quantize_activations_int8,
    unpack_codes,
    unpack_zero_points,
)


class _MatMulNBits(torch.autograd.Function):
    """``x @ dequant(B).T``; exports as ``com.microsoft::MatMulNBits``."""

    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        weight: torch.Tensor,
        qweight: torch.Tensor,
        scales: torch.Tensor,
        zero_points: torch.Tensor,
        k: int,
        n: int,
        bits: int,
        block: int,
        accuracy_level: int,
    ) -> torch.Tensor:
        if accuracy_level == 4:
            x = quantize_activations_int8(x, block)
        return F.linear(x, weight)

    @staticmethod
    def symbolic(
        g: Any,
        x: Any,
        weight: Any,
        qweight: Any,
        scales: Any,
        zero_points: Any,
        k: int,
        n: int,
        bits: int,
        block: int,
        accuracy_level: int,
    ) -> Any:
        inputs = [x, qweight, scales]
        if zero_points.type().sizes() and zero_points.type().sizes()[-1] > 0:
            inputs.append(zero_points)
        y = g.op("com.microsoft::MatMulNBits", *inputs, K_i=k, N_i=n, bits_i=bits,
                 block_size_i=block, accuracy_level_i=accuracy_level)  # fmt: skip
        sizes = x.type().varyingSizes()
        if sizes:  # the output's rank and last size; the others stay symbolic (dynamic batch)
            y.setType(x.type().with_sizes([None] * (len(sizes) - 1) + [n]))
        return y


class NBitsLinear(nn.Module):
    """``y = (x * input_scale) @ W.T + bias`` with ``W`` stored as packed group-wise codes."""

    qweight: torch.Tensor
    scales: torch.Tensor
    zero_points: torch.Tensor
    input_scale: torch.Tensor | None

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        bits: int = 4,
        group_size: int = 128,
        symmetric: bool = False,
        accuracy_level: int = 4,
        bias: bool = True,
        input_scale: bool = False,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.spec = GroupSpec(bits, group_size, symmetric)
        self.accuracy_level = accuracy_level
        g = self.spec.groups(in_features)
        blob = group_size * bits // 8
        self.register_buffer("qweight", torch.zeros(out_features, g, blob, dtype=torch.uint8))
        self.register_buffer("scales", torch.ones(out_features, g))
        zcols = 0 if symmetric else -(-g * bits // 8)
        self.register_buffer("zero_points", torch.zeros(out_features, zcols, dtype=torch.uint8))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        if input_scale:
            self.register_buffer("input_scale", torch.ones(in_features))
        else:
            self.input_scale = None
        self._weight: torch.Tensor | None = None  # dequantized weight, rebuilt after a load

    @classmethod
    def from_codes(
        cls,
        codes: torch.Tensor,
        scale: torch.Tensor,
        zero: torch.Tensor,
        spec: GroupSpec,
        *,
        in_features: int,
        bias: torch.Tensor | None,
        input_scale: torch.Tensor | None = None,
        accuracy_level: int = 4,
    ) -> NBitsLinear:
        """The layer for uint8 ``codes`` (N, G * S), ``scale`` and ``zero`` (N, G)."""
        m = cls(in_features, codes.shape[0], bits=spec.bits, group_size=spec.group_size,
                symmetric=spec.symmetric, accuracy_level=accuracy_level, bias=bias is not None,
                input_scale=input_scale is not None)  # fmt: skip
        with torch.no_grad():
            m.qweight.copy_(pack_codes(codes, spec))
            m.scales.copy_(scale)
            if not spec.symmetric:
                m.zero_points.copy_(pack_zero_points(zero, spec))
            if bias is not None and m.bias is not None:
                m.bias.copy_(bias)
            if input_scale is not None and m.input_scale is not None:
                m.input_scale.copy_(input_scale)
        return m

    def codes(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Unpacked ``(codes (N, G * S), zero points (N, G))``."""
        codes = unpack_codes(self.qweight, self.spec)
        if self.spec.symmetric:
            zero = torch.full(self.scales.shape, self.spec.mid, dtype=torch.uint8)
        else:
            zero = unpack_zero_points(self.zero_points, self.spec, self.scales.shape[1])
        return codes, zero

    def dequantized_weight(self) -> torch.Tensor:
        """The float weight (N, K) the codes stand for (without ``input_scale``)."""
        codes, zero = self.codes()
        return dequantize_weight(codes, self.scales, zero.float(), self.in_features)

    def _apply(self, fn: Any, recurse: bool = True) -> NBitsLinear:
        self._weight = None  # buffers moved or loaded: dequantize again
        return super()._apply(fn, recurse)  # type: ignore[no-any-return]

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        self._weight = None
        super()._load_from_state_dict(*args, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._weight is None:
            self._weight = self.dequantized_weight()
        w = self._weight
        if self.input_scale is not None:
            x = x * self.input_scale
        y: torch.Tensor = _MatMulNBits.apply(
            x, w, self.qweight, self.scales, self.zero_points, self.in_features,
            self.out_features, self.spec.bits, self.spec.group_size, self.accuracy_level,
        )  # fmt: skip
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        s = self.spec
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bits={s.bits}, "
            f"group_size={s.group_size}, symmetric={s.symmetric}, "
            f"accuracy_level={self.accuracy_level}, awq_scale={self.input_scale is not None}"
        )


class Int8Embedding(nn.Module):
    """An embedding table stored as int8 per row (symmetric, scale ``amax / 127``); a lookup
    dequantizes the rows it gathers. A language model's embeddings are a sizeable share of a small
    model's bytes once its Linears are 4-bit."""

    qweight: torch.Tensor
    scale: torch.Tensor

    def __init__(self, emb: nn.Embedding) -> None:
        super().__init__()
        w = emb.weight.detach().float()
        scale = w.abs().amax(1).clamp(min=1e-12) / 127
        self.register_buffer("qweight", torch.round(w / scale[:, None]).to(torch.int8))
        self.register_buffer("scale", scale)
        self.num_embeddings, self.embedding_dim = w.shape

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        # gather the int8 rows, then dequantize only them: Gather, Cast, Mul in ONNX (a
        # DequantizeLinear of the whole table would run on every call: ORT keeps it unfolded)
        return self.qweight[idx].float() * self.scale[idx].unsqueeze(-1)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, int8 per row"
