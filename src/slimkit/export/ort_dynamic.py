"""ONNX Runtime's dynamic int8 path: weights int8 offline, activations quantized per batch at run
time (DynamicQuantizeMatMul / DynamicQuantizeLSTM kernels). Best for Linear/LSTM-heavy models
whose activation ranges vary from input to input."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from slimkit.core.io import atomic_path
from slimkit.export.onnx import export_onnx


def export_preprocessed(
    model: nn.Module, path: str | Path, *, example_inputs: tuple[torch.Tensor, ...]
) -> Path:
    """Float ONNX after ORT's ``quant_pre_process`` (shape inference and clean-up), which ORT's
    own quantizers need: without it the exporter's shared initializers keep most convs in float."""
    import tempfile

    from onnxruntime.quantization import quant_pre_process

    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "raw.onnx"
        export_onnx(model, raw, example_inputs=example_inputs, input_names=["input"])
        with atomic_path(path) as out:
            quant_pre_process(str(raw), str(out), skip_symbolic_shape=True)
    return Path(path)


def export_dynamic_int8(
    model: nn.Module,
    path: str | Path,
    *,
    example_inputs: tuple[torch.Tensor, ...],
    per_channel: bool = True,
    reduce_range: bool = False,
    ops: tuple[str, ...] = ("MatMul", "Gemm", "LSTM", "Attention"),
) -> Path:
    """Export ``model`` (float) and quantize it dynamically with ORT; written atomically."""
    import tempfile

    from onnxruntime.quantization import QuantType, quantize_dynamic

    with tempfile.TemporaryDirectory() as tmp:
        pre = export_preprocessed(model, Path(tmp) / "pre.onnx", example_inputs=example_inputs)
        with atomic_path(path) as out:
            quantize_dynamic(
                str(pre), str(out), per_channel=per_channel, reduce_range=reduce_range,
                weight_type=QuantType.QInt8, op_types_to_quantize=list(ops),
            )  # fmt: skip
    return Path(path)
