"""diagnose: a quantized model's output error split into weights and activations, per part, each
SQNR measured against the float model; the model's quantizer flags are left as they were."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

import slimkit as sk
from slimkit.errors import DataError
from slimkit.quant.modules import ActQuant, QuantLayer
from slimkit.testing.numerics import sqnr


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10),
    ).eval()  # fmt: skip


def _quantized(model: nn.Module, bits: int) -> nn.Module:
    torch.manual_seed(1)
    calib = [torch.randn(4, 3, 10, 10) for _ in range(4)]
    cfg = sk.quant.PTQ(weight_bits=bits, speed_check=False, float_prefix=False)
    return sk.quantize(model, cfg, data=calib)


def _flags(q: nn.Module) -> tuple[list[bool], list[bool]]:
    return ([m.enabled for m in q.modules() if isinstance(m, ActQuant)],
            [m.float_mode for m in q.modules() if isinstance(m, QuantLayer)])  # fmt: skip


def test_split_matches_the_model_and_ranks_parts() -> None:
    model = _net()
    q4 = _quantized(model, 4)
    test = [torch.randn(4, 3, 10, 10) for _ in range(3)]
    before = _flags(q4)
    d = sk.quant.diagnose(q4, data=test, reference=model)
    assert _flags(q4) == before  # every switch restored
    with torch.no_grad():
        full = sqnr([model(x) for x in test], [q4(x) for x in test])
    assert d.full_db == pytest.approx(full, abs=1e-6)  # "full" is the model as it runs
    assert d.batches == 3
    # 4-bit weights against 8-bit activations: the weights are the larger error
    assert d.weights_only_db < d.activations_only_db and d.dominant() == "weights"
    assert d.full_db < d.activations_only_db
    assert [r["name"] for r in d.layers] == ["0", "2", "6"]  # every integer layer, in order
    assert all(r["bits"] == 4 for r in d.layers)
    assert d.activations and all(r["sqnr_db"] > d.full_db for r in d.activations)
    # one layer alone errs less than all the integer weights together
    assert all(r["sqnr_db"] > d.weights_only_db - 1.0 for r in d.layers)
    assert d.worst_layers(1)[0]["sqnr_db"] == min(r["sqnr_db"] for r in d.layers)
    assert "weights dominate" in d.summary()


def test_more_weight_bits_raise_the_weight_half_only() -> None:
    model = _net()
    test = [torch.randn(4, 3, 10, 10) for _ in range(2)]
    d4 = sk.quant.diagnose(_quantized(model, 4), data=test, per_layer=False)
    d8 = sk.quant.diagnose(_quantized(model, 8), data=test, per_layer=False)
    assert d8.weights_only_db > d4.weights_only_db + 15  # about 6 dB per bit
    # the activation grid is calibrated the same way on both: within noise of each other
    assert abs(d8.activations_only_db - d4.activations_only_db) < 1.0
    assert d4.layers == [] and d4.activations == []


def test_saves_json_and_refuses_a_float_model(tmp_path: Path) -> None:
    model = _net()
    d = sk.quant.diagnose(_quantized(model, 8), example_inputs=(torch.randn(2, 3, 10, 10),))
    d.save(tmp_path / "d.json")
    saved = json.loads((tmp_path / "d.json").read_text())
    assert saved["dominant"] in ("weights", "activations") and len(saved["layers"]) == 3
    with pytest.raises(DataError, match="no quantized layers"):
        sk.quant.diagnose(model, example_inputs=(torch.randn(1, 3, 10, 10),))
    with pytest.raises(DataError, match="needs inputs"):
        sk.quant.diagnose(_quantized(model, 8))
