"""Cross-layer equalisation and bias absorption: exact in float, ranges evened, barriers named."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from slimkit.errors import ConfigError
from slimkit.export.qdq import export_quantized
from slimkit.graph_opt.bn_fold import fold_bn
from slimkit.quant.cle import equalize
from slimkit.quant.ptq import PTQ
from slimkit.quant.verb import quantize
from slimkit.testing.numerics import sqnr
from slimkit.zoo import create_model, example_inputs


def _uneven(m: nn.Module) -> nn.Module:
    """Spread each layer's output-channel ranges over two decades (as trained nets often do)."""
    with torch.no_grad():
        for layer in m.modules():
            if isinstance(layer, (nn.Conv2d, nn.Linear)):
                n = layer.weight.shape[0]
                layer.weight.mul_(torch.logspace(-1, 1, n)[torch.randperm(n)].view(-1, 1, 1, 1)
                                  if layer.weight.dim() == 4 else torch.logspace(-1, 1, n)
                                  [torch.randperm(n)].view(-1, 1))  # fmt: skip
    return m.eval()


class Chains(nn.Module):
    """conv -> ReLU -> depthwise -> ReLU -> conv, a residual stream, a max-pool, and a Linear head
    through a global pool: every kind of group equalisation handles."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 16, 3, padding=1)
        self.dw = nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.c2 = nn.Conv2d(16, 8, 1)
        self.c3 = nn.Conv2d(8, 8, 1)
        self.pool = nn.MaxPool2d(2)
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.c2(torch.relu(self.dw(torch.relu(self.c1(x)))))
        y = self.pool(y + self.c3(y))  # residual stream: c2 and c3 tied, read by c3 and fc
        return self.fc(torch.flatten(self.gap(y), 1))  # (B, 8, 1, 1) -> (B, 8)


def _rel_err(ref: torch.Tensor, out: torch.Tensor) -> float:
    return float((ref - out).abs().max() / ref.abs().max())


def test_equalisation_is_exact_and_evens_the_ranges() -> None:
    model = _uneven(Chains())
    x = torch.randn(4, 3, 12, 12)
    eq, report = equalize(model)
    with torch.no_grad():
        assert _rel_err(model(x), eq(x)) < 1e-4  # measured 6e-7: positive scaling commutes
    assert ("c1", "dw") in report.pairs and ("dw", "c2") in report.pairs
    stream = next(g for g in report.groups if "c3" in g.producers)
    assert stream.producers == ["c2", "c3"] and stream.consumers == ["c3", "fc"]
    assert report.skipped == [("fc", "feeds the model's output")]
    for g in report.groups:  # producers' per-channel ranges: ~100x apart, then 11-14x (measured)
        assert g.spread_after < g.spread_before / 3, (g.producers, g.spread_before)
    assert all(not isinstance(m, nn.BatchNorm2d) for m in eq.modules())
    assert model.c1.weight.data_ptr() != eq.get_submodule("c1").weight.data_ptr()  # a copy


def test_relu6_and_other_barriers_are_reported_and_left_exact() -> None:
    model = fold_bn(create_model("inverted_residual"))
    (x,) = example_inputs("inverted_residual", batch=2)
    eq, report = equalize(model)
    with torch.no_grad():
        assert _rel_err(model(x), eq(x)) < 1e-5
    reasons = dict(report.skipped)
    assert "ReLU6" in reasons["features.1.conv.0.0"]  # relu6(x / s) != relu6(x) / s past 6
    assert reasons["features.1.conv.2"] == "joins ReLU6 'features.0.2'"  # the skip's other side
    assert [g.producers for g in report.groups] == [["features.2.conv.2"]]  # only the bottleneck
    # a transformer block: LayerNorm, GELU and the attention reshapes stop every group
    _, rep = equalize(create_model("transformer_block"))
    assert rep.groups == [] and len(rep.skipped) > 0


class Stream(nn.Module):
    """Two 1x1 convs with offsets adding up into a stream read by a 1x1 conv and a padded one."""

    def __init__(self, padded: bool) -> None:
        super().__init__()
        self.a = nn.Conv2d(4, 8, 1)
        self.b = nn.Conv2d(8, 8, 1)
        self.c = nn.Conv2d(8, 6, 3 if padded else 1, padding=1 if padded else 0)
        with torch.no_grad():
            self.a.bias.copy_(torch.linspace(-3, 5, 8))  # per-channel offsets to absorb
            self.b.bias.copy_(torch.linspace(4, -2, 8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.a(x)
        return self.c(y + self.b(y))


def test_bias_absorption_centres_a_linear_stream_exactly() -> None:
    model = Stream(padded=False).eval()
    calib = [torch.randn(2, 4, 6, 6) for _ in range(4)]
    x = torch.randn(3, 4, 6, 6)
    eq, report = equalize(model, scale=False, absorb=True, data=calib)
    with torch.no_grad():
        assert _rel_err(model(x), eq(x)) < 1e-5  # measured 3e-7
        y = eq.a(torch.cat(calib))
        stream = y + eq.b(y)
    means = stream.transpose(0, 1).reshape(8, -1).mean(1)
    assert means.abs().max() < 1e-4  # every channel of the stream centred on the data
    assert [g.absorbed for g in report.groups] == ["yes"]
    _, refused = equalize(Stream(padded=True).eval(), scale=False, absorb=True, data=calib)
    assert "zero-padded" in refused.groups[0].absorbed
    with pytest.raises(ConfigError, match="needs data"):
        equalize(model, absorb=True)


def test_bias_absorption_helps_a_mobilenet_block() -> None:
    name = "inverted_residual"
    model = create_model(name)
    calib = [example_inputs(name, batch=2, seed=i)[0] for i in range(16)]
    (x,) = example_inputs(name, batch=4, seed=99)
    with torch.no_grad():
        ref = model(x)
        plain = sqnr(
            ref, quantize(model, PTQ(speed_check=False, bias_absorption=False), data=calib)(x)
        )
        centred = sqnr(ref, quantize(model, PTQ(speed_check=False), data=calib)(x))
    assert centred > plain + 2.0  # measured 65.8 -> 69.0 dB: the bottleneck feeding fc centred


def test_ptq_with_equalisation_runs_as_integer_kernels(tmp_path: Path) -> None:
    name = "residual"
    model = create_model(name)
    calib = [example_inputs(name, batch=2, seed=i)[0] for i in range(8)]
    (x,) = example_inputs(name, batch=4, seed=99)
    q = quantize(model, PTQ(speed_check=False, cle=True), data=calib)
    assert "scaled" in q.meta["slimkit"]["equalisation"]
    with torch.no_grad():
        # measured 53.1 dB (55.9 without: with per-channel weights, scaling does not pay here)
        assert sqnr(model(x), q(x)) > 48.0
    _, kernels = export_quantized(q, tmp_path / "q.onnx", example_inputs=(x[:1],))
    assert kernels.float_compute == 0 and kernels.integer > 0
