"""Dynamic int8 (ORT and PyTorch), weight-only int8, and fp16/bf16: numerics and deployment."""

from __future__ import annotations

import warnings
from pathlib import Path

import onnx
import pytest
import torch
from torch import nn

from slimkit.core.registry import METHODS
from slimkit.errors import ConfigError
from slimkit.export.onnx import export_onnx
from slimkit.export.ort import ort_session, run_session
from slimkit.export.qdq import kernel_report
from slimkit.quant import Dynamic, Half, WeightOnly
from slimkit.quant.modules import QuantLayer
from slimkit.quant.verb import quantize
from slimkit.testing.numerics import sqnr
from slimkit.zoo import create_model, example_inputs


@pytest.mark.parametrize("name", ["lstm", "transformer_block", "mlp"])
def test_dynamic_int8_on_onnxruntime(name: str, tmp_path: Path) -> None:
    model = create_model(name)
    (x,) = example_inputs(name, batch=3, seed=7)
    q = quantize(model, Dynamic(path=str(tmp_path / "d.onnx")), example_inputs=(x[:1],))
    with torch.no_grad():
        ref, out = model(x), q(x)
    assert sqnr(ref, out) > 35.0  # measured 40.1 / 50.3 / 43.4 dB (7-bit weights, AVX2)
    ops = kernel_report(tmp_path / "d.onnx").ops
    assert ops.get("DynamicQuantizeMatMul", 0) + ops.get("DynamicQuantizeLSTM", 0) > 0, ops


def test_dynamic_int8_on_pytorch() -> None:
    model = create_model("lstm")
    (x,) = example_inputs("lstm", batch=4, seed=3)
    q = quantize(model, Dynamic(runtime="pytorch"))
    dynamic = [n for n, m in q.named_modules() if "quantized.dynamic" in type(m).__module__]
    assert {"lstm", "fc"} <= set(dynamic)
    with torch.no_grad():
        assert sqnr(model(x), q(x)) > 32.0  # measured 37.2 dB
    with pytest.raises(ConfigError, match="needs example_inputs"):
        quantize(model, "dynamic")


def test_weight_only_int8_is_4x_smaller_and_close(tmp_path: Path) -> None:
    model = create_model("gpt_tiny")
    (x,) = example_inputs("gpt_tiny", batch=2, seed=1)
    q = quantize(model, "weight-only")
    assert sum(isinstance(m, QuantLayer) for m in q.modules()) == sum(
        isinstance(m, nn.Linear) for m in model.modules()
    )
    with torch.no_grad():
        assert sqnr(model(x), q(x)) > 35.0  # measured 39.4 dB (8-bit per-channel weights)
    f32 = export_onnx(model, tmp_path / "f.onnx", example_inputs=(x,))
    w8 = export_onnx(q, tmp_path / "w.onnx", example_inputs=(x,), check=False)
    # ORT runs DequantizeLinear(int8) + MatMul as its weight-only kernel MatMulNBits, which may
    # compute in int8 internally: compare with float by SQNR rather than bit-exactly
    assert kernel_report(w8.path).ops.get("MatMulNBits", 0) > 0
    (deployed,) = run_session(ort_session(w8.path), [x])
    assert sqnr(model(x), deployed) > 32.0  # measured 36.7 dB
    linear_bytes = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear)) * 4
    assert f32.size_bytes - w8.size_bytes > 0.7 * linear_bytes  # 3 of every 4 bytes saved
    types = {i.data_type for i in onnx.load(str(tmp_path / "w.onnx")).graph.initializer}
    assert onnx.TensorProto.INT8 in types
    small = quantize(model, WeightOnly(min_params=20_000))
    assert sum(isinstance(m, QuantLayer) for m in small.modules()) < sum(
        isinstance(m, QuantLayer) for m in q.modules()
    )


def test_half_precision_keeps_float32_boundaries() -> None:
    model = create_model("cnn_bn")
    (x,) = example_inputs("cnn_bn", batch=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # no bf16 hardware warning on some CPUs
        for name, min_db in (("bf16", 40.0), ("fp16", 60.0)):  # measured 46.6 and 67.3 dB
            h = quantize(model, name)
            with torch.no_grad():
                y = h(x)
            assert y.dtype == torch.float32 and sqnr(model(x), y) > min_db
    h16 = quantize(model, Half(dtype="fp16"))
    assert {p.dtype for p in h16.parameters()} == {torch.float16}
    assert {p.dtype for p in model.parameters()} == {torch.float32}  # the original is untouched


def test_every_quant_method_is_registered_and_names_resolve() -> None:
    assert {"quant.ptq", "quant.dynamic", "quant.weight_only", "quant.half"} <= set(
        METHODS.names("quant.*")
    )
    for name, cfg in [(n, METHODS.entry(n).meta["config"]) for n in METHODS.names("quant.*")]:
        assert cfg.from_dict(cfg().to_dict()) == cfg(), name  # round-trips through YAML dicts
    with pytest.raises(ConfigError, match="did you mean 'dynamic'"):
        quantize(create_model("mlp"), "dynamc")
