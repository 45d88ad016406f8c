"""Dynamic int8 for Linear/LSTM-heavy models: int8 weights, activations quantized at run time.

Two runtimes, the same call::

    ort_model = sk.quantize(model, Dynamic(), example_inputs=(x,))              # ONNX Runtime
    eager = sk.quantize(model, Dynamic(runtime="pytorch"))                      # PyTorch eager

The ONNX Runtime result is an ``OrtModule`` (an ``nn.Module`` running the int8 ONNX file, saved at
``.path``), so metrics that evaluate a model evaluate the deployed file. Without VNNI the weights
use ORT's reduced range (7 bits) for the same reason as static PTQ: u8 x s8 pair sums saturate.
YAML step: ``- quant.dynamic: {runtime: onnxruntime}``. Supports Linear, LSTM (and GRU in PyTorch).
"""

from __future__ import annotations

import tempfile
import warnings
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from slimkit.core.config import Config
from slimkit.core.machine import cpu_info
from slimkit.core.registry import METHODS
from slimkit.core.verbs import eval_mode
from slimkit.errors import ConfigError


class Dynamic(Config):
    """Dynamic int8 quantization of Linear / LSTM layers."""

    runtime: Literal["onnxruntime", "pytorch"] = "onnxruntime"
    per_channel: bool = True  # onnxruntime only; PyTorch's dynamic Linear is per tensor
    path: str | None = None  # where the ONNX file goes (default: a temporary directory)


@METHODS.register(
    "quant.dynamic",
    config=Dynamic,
    summary="dynamic int8 (Linear/LSTM)",
    export="ort",  # the result runs the int8 ONNX file at result.path
)
def quantize_dynamic(
    model: nn.Module,
    config: Dynamic | None = None,
    *,
    example_inputs: tuple[torch.Tensor, ...] | None = None,
) -> nn.Module:
    """Dynamic int8 copy of ``model`` for the chosen runtime (the original is not modified)."""
    cfg = config or Dynamic()
    if cfg.runtime == "pytorch":
        import copy

        from torch.ao.quantization import quantize_dynamic as torch_dynamic

        with warnings.catch_warnings():  # torch.ao's quantized tensors are deprecated upstream
            warnings.simplefilter("ignore")
            return torch_dynamic(copy.deepcopy(model).eval(), {nn.Linear, nn.LSTM, nn.GRU},
                                 dtype=torch.qint8)  # fmt: skip
    if example_inputs is None:
        raise ConfigError(
            "dynamic quantization for onnxruntime needs example_inputs to export the model",
            fix="pass example_inputs=(x,) with the model's input shape",
        )
    from slimkit.export.ort import OrtModule, ort_session
    from slimkit.export.ort_dynamic import export_dynamic_int8

    path = Path(cfg.path) if cfg.path else Path(tempfile.mkdtemp(prefix="slimkit-")) / "dyn.onnx"
    reduce = not cpu_info()["vnni"]
    with eval_mode(model):  # exported in eval mode; the caller's flags are left as they were
        export_dynamic_int8(model, path, example_inputs=tuple(example_inputs),
                            per_channel=cfg.per_channel, reduce_range=reduce)  # fmt: skip
    out = OrtModule(ort_session(path))
    out.path = str(path)  # type: ignore[assignment]
    return out
