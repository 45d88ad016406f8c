"""Low-bit weights on int8 kernels (W4A8, W3A8): per-channel clipping chosen by squared error,
codes inside the narrow range, ORT running exactly the simulated model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

import slimkit as sk
from slimkit.errors import ConfigError
from slimkit.export.qdq import export_quantized
from slimkit.quant.modules import QuantLayer
from slimkit.quant.primitives import weight_codes


def _sqnr(ref: torch.Tensor, out: torch.Tensor) -> float:
    return float(10 * torch.log10(ref.pow(2).sum() / (ref - out).pow(2).sum()))


def test_low_bit_codes_clip_where_it_lowers_the_error() -> None:
    torch.manual_seed(0)
    w = torch.randn(16, 128)
    w[:, 0] = 6.0  # an outlier per channel
    codes, scale = weight_codes(w, 4)
    assert codes.abs().max() <= 7
    deq = codes * scale[:, None]
    full = w.abs().amax(1, keepdim=True) / 7
    naive = torch.clamp(torch.round(w / full), -7, 7) * full
    assert _sqnr(w, deq) > _sqnr(w, naive) + 0.5  # measured: 14.4 vs 13.3 dB


def _net() -> nn.Module:
    torch.manual_seed(0)
    layers = [nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1),
              nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10)]  # fmt: skip
    return nn.Sequential(*layers).eval()


@pytest.mark.parametrize("bits", [4, 3])
def test_w4a8_and_w3a8_run_on_int8_kernels_as_simulated(bits: int, tmp_path: Path) -> None:
    data = [torch.randn(8, 3, 16, 16) for _ in range(4)]
    cfg = sk.quant.PTQ(weight_bits=bits, speed_check=False, float_prefix=False)
    q = sk.quantize(_net(), cfg, data=data)
    layers = [m for m in q.modules() if isinstance(m, QuantLayer)]
    qmax = 2 ** (bits - 1) - 1
    assert len(layers) == 3 and all(int(m.w_q.abs().max()) <= qmax for m in layers)
    assert q.meta["slimkit"]["weight_bits"] == bits
    rep, kernels = export_quantized(q, tmp_path / "q.onnx", example_inputs=(data[0],))
    assert rep.max_abs_err is not None and rep.max_abs_err < 1e-4
    assert kernels.ops.get("QLinearConv", 0) == 2


def test_weight_bits_out_of_range_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="weight_bits"):
        sk.quant.PTQ(weight_bits=1)
    with pytest.raises(ConfigError, match="weight_bits"):
        sk.quant.PTQ(weight_bits=9)
