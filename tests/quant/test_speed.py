"""Never slower than the source: PTQ times int8 against float on ONNX Runtime and keeps float
what runs slower. The decision is checked against the times it records; the decision logic is
also driven with given times (the runtime still runs: only the clock is replaced)."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

import slimkit as sk
from slimkit.quant import speed
from slimkit.quant.modules import QuantLayer
from slimkit.quant.ptq import PTQ, quantize_ptq


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(),
                         nn.Linear(64, 8)).eval()  # fmt: skip


def _data() -> list[torch.Tensor]:
    return [torch.randn(4, 32) for _ in range(4)]


def test_decision_agrees_with_the_recorded_times() -> None:
    model, data = _mlp(), _data()
    q = quantize_ptq(model, PTQ(float_prefix=False), data=data)
    meta = q.meta["slimkit"]
    s = meta["speed"]
    assert s["fp32_ms"] > 0 and s["int8_ms"] > 0 and "fp32" in s["summary"]
    x = torch.randn(3, 32)
    if s["decision"] == "float":  # tiny layers: ORT's int8 usually loses here
        assert s["int8_ms"] > speed.TOLERANCE * s["fp32_ms"] and meta["quantized_layers"] == 0
        assert not any(isinstance(m, QuantLayer) for m in q.modules())
        torch.testing.assert_close(q(x), model(x), rtol=0, atol=1e-5)  # the float model
        assert "kept_float" in meta
    else:
        assert s["decision"].startswith("int8")
        assert meta["quantized_layers"] > 0


def _clock(monkeypatch: pytest.MonkeyPatch, times: list[dict[str, float]]) -> None:
    calls = iter(times)

    def fake(paths: dict[str, Any], inputs: list[Any], **kw: Any) -> dict[str, float]:
        for p in paths.values():  # the files were really exported and load in ORT
            from slimkit.export.ort import ort_session

            ort_session(p)
        return next(calls)

    monkeypatch.setattr(speed, "time_onnx", fake)


def test_slow_layers_stay_float_when_that_is_faster(monkeypatch: pytest.MonkeyPatch) -> None:
    model, data = _mlp(), _data()
    _clock(monkeypatch, [{"fp32": 1.0, "int8": 1.5}, {"fp32": 1.0, "int8": 0.8}])
    monkeypatch.setattr(speed, "slow_layers", lambda *a, **k: ["2"])
    q = quantize_ptq(model, PTQ(float_prefix=False), data=data)
    meta = q.meta["slimkit"]
    assert meta["speed"]["decision"] == "int8, slow layers float"
    assert meta["speed"]["slow_layers"] == ["2"] and meta["speed"]["retry_ms"] == 0.8
    assert isinstance(q.get_submodule("0"), QuantLayer)
    assert isinstance(q.get_submodule("2"), nn.Linear)  # kept float
    assert meta["float_prefix_layers"] == ["2"]  # what a recipe pins to repeat it


def test_still_slower_returns_the_float_model(monkeypatch: pytest.MonkeyPatch) -> None:
    model, data = _mlp(), _data()
    _clock(monkeypatch, [{"fp32": 1.0, "int8": 1.5}, {"fp32": 1.0, "int8": 1.2}])
    monkeypatch.setattr(speed, "slow_layers", lambda *a, **k: ["0"])
    q = quantize_ptq(model, PTQ(float_prefix=False), data=data)
    meta = q.meta["slimkit"]
    assert meta["speed"]["decision"] == "float" and meta["quantized_layers"] == 0
    x = torch.randn(2, 32)
    torch.testing.assert_close(q(x), model(x), rtol=0, atol=1e-5)
    # the verb says that nothing was quantized, and why
    rep = sk.report(sk.quantize(model, PTQ(float_prefix=False, speed_check=False), data=data))
    assert rep.changed  # (int8 without the check changes the layers)
    float_layers = meta["float_prefix_layers"]
    again = quantize_ptq(model, PTQ(float_prefix=float_layers, speed_check=False), data=data)
    assert again.meta["slimkit"]["quantized_layers"] == 0  # pinned: the same float model
    torch.testing.assert_close(again(x), q(x), rtol=0, atol=0)


def test_faster_int8_is_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    _clock(monkeypatch, [{"fp32": 1.0, "int8": 0.6}])
    q = quantize_ptq(_mlp(), PTQ(float_prefix=False), data=_data())
    assert q.meta["slimkit"]["speed"]["decision"] == "int8"
    assert sum(isinstance(m, QuantLayer) for m in q.modules()) == 3


def test_float_fallback_lists_the_layers_out_of_scope_too(monkeypatch: pytest.MonkeyPatch) -> None:
    """Falling back to the source keeps every layer float, the excluded ones too (the record
    listed only the layers it had quantized: a recipe's ``exclude: [fc]`` vanished from it)."""
    from slimkit.core.scope import Scope

    _clock(monkeypatch, [{"fp32": 1.0, "int8": 1.5}])
    monkeypatch.setattr(speed, "slow_layers", lambda *a, **k: [])
    q = quantize_ptq(_mlp(), PTQ(float_prefix=False), data=_data(), scope=Scope(exclude=["4"]))
    meta = q.meta["slimkit"]
    assert meta["speed"]["decision"] == "float"
    assert set(meta["float_layers"]) == {"0", "2", "4"}
    assert meta["float_prefix_layers"] == ["0", "2"]  # what a rerun pins (all in scope)
