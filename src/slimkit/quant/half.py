"""fp16 / bf16 conversion with float32 at the boundaries.

Halves weight size and memory traffic. On CPUs the speed depends on hardware support (AVX512-BF16,
AMX, or ARM bf16): without it PyTorch emulates, which is slower than fp32, and slimkit says so.

    m16 = sk.quantize(model, "bf16")      # inputs and outputs stay float32
"""

from __future__ import annotations

import copy
import warnings
from typing import Any, Literal

import torch
from torch import nn

from slimkit.core.config import Config
from slimkit.core.machine import cpu_info
from slimkit.core.registry import METHODS


class Half(Config):
    """Cast weights and compute to a 16-bit float type."""

    dtype: Literal["fp16", "bf16"] = "bf16"


class HalfModel(nn.Module):
    """Runs ``inner`` in 16-bit; float inputs are cast in and outputs cast back to float32."""

    def __init__(self, inner: nn.Module, dtype: torch.dtype) -> None:
        super().__init__()
        self.inner = inner
        self.dtype = dtype

    def forward(self, *args: Any) -> Any:
        cast = [
            a.to(self.dtype) if torch.is_tensor(a) and a.is_floating_point() else a for a in args
        ]
        out = self.inner(*cast)
        if isinstance(out, torch.Tensor):
            return out.float() if out.is_floating_point() else out
        return type(out)(
            o.float() if torch.is_tensor(o) and o.is_floating_point() else o for o in out
        )


@METHODS.register(
    "quant.half",
    config=Half,
    summary="fp16 / bf16 weights and compute",
    aliases={"fp16": {"dtype": "fp16"}, "bf16": {"dtype": "bf16"}},
    example={"dtype": "fp16"},
    export_atol=1e-2,  # ORT and PyTorch round fp16 sums differently: parity to fp16 precision
)
def to_half(model: nn.Module, config: Half | None = None) -> nn.Module:
    """A 16-bit copy of ``model`` behind float32 inputs and outputs."""
    cfg = config or Half()
    dtype = torch.bfloat16 if cfg.dtype == "bf16" else torch.float16
    if cfg.dtype == "bf16" and not cpu_info()["bf16_hw"]:
        warnings.warn(
            "this CPU has no bf16 hardware (no AVX512-BF16/AMX): bf16 halves the size but runs "
            "slower than fp32 here; measure before deploying",
            stacklevel=2,
        )
    return HalfModel(copy.deepcopy(model).eval().to(dtype), dtype)
