"""ONNX Runtime sessions with the threading of the benchmark protocol, and running them on tensors.

This package is the only place that imports onnx / onnxruntime (they load on first use).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from slimkit.errors import ExportError

_LEVELS = {
    "disable": "ORT_DISABLE_ALL",
    "basic": "ORT_ENABLE_BASIC",
    "extended": "ORT_ENABLE_EXTENDED",
}


def ort_session(
    model: str | os.PathLike[str] | bytes,
    *,
    threads: int = 2,
    inter_threads: int = 1,
    optimization: str = "all",
    optimized_model_path: str | os.PathLike[str] | None = None,
    profile: bool = False,
    spinning: bool = True,
) -> Any:
    """An ``onnxruntime.InferenceSession`` on the CPU provider.

    Defaults follow ``BENCHMARKS.md``: intra-op 2 threads, inter-op 1, ``ORT_ENABLE_ALL``.
    ``optimization`` is one of ``disable | basic | extended | all``; ``optimized_model_path`` saves
    the graph ORT actually runs (how tests check which kernels were fused). ``spinning=False``
    stops idle worker threads busy-waiting between runs: slower runs, but timings of several
    sessions interleaved no longer disturb each other (what ``quant.prefix`` compares).
    """
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = inter_threads
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    level = _LEVELS.get(optimization, "ORT_ENABLE_ALL")
    so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, level)
    so.log_severity_level = 3
    if optimized_model_path is not None:
        so.optimized_model_filepath = str(optimized_model_path)
    if profile:
        so.enable_profiling = True
    if not spinning:
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    src: str | bytes = model if isinstance(model, bytes) else str(model)
    if isinstance(src, str) and not Path(src).is_file():
        raise ExportError(f"ONNX file {src!r} does not exist", fix="export the model first")
    try:
        return ort.InferenceSession(src, sess_options=so, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises its own Fail/InvalidGraph types
        raise ExportError(
            f"ONNX Runtime could not load {src if isinstance(src, str) else 'the model'}: "
            f"{str(e).splitlines()[0][:300]}",
            fix="re-export with slimkit.export_onnx (opset 17); if the model uses a custom op, "
            "register it with ORT or exclude that layer",
        ) from None


def to_numpy(t: Any) -> np.ndarray:
    if isinstance(t, torch.Tensor):
        return t.detach().cpu().contiguous().numpy()
    return np.asarray(t)


def feeds(session: Any, inputs: Sequence[Any]) -> dict[str, np.ndarray]:
    """Map positional inputs onto the session's input names, checking the count."""
    names = [i.name for i in session.get_inputs()]
    if len(names) != len(inputs):
        raise ExportError(
            f"the ONNX model takes {len(names)} inputs {names}, got {len(inputs)}",
            fix="pass one tensor per model input, in the order of forward()",
        )
    return {n: to_numpy(x) for n, x in zip(names, inputs, strict=True)}


def run_session(session: Any, inputs: Sequence[Any]) -> list[np.ndarray]:
    """Run ``session`` on tensors/arrays and return its outputs as numpy arrays."""
    return list(session.run(None, feeds(session, inputs)))


class OrtModule(torch.nn.Module):
    """An ONNX Runtime session behind the ``nn.Module`` call interface, so code that evaluates a
    PyTorch model (``slimkit.zoo.evaluate``, metrics) measures the deployed file unchanged."""

    def __init__(self, session: Any) -> None:
        super().__init__()
        self.session = session

    def forward(self, *inputs: torch.Tensor) -> Any:
        outs = [torch.from_numpy(o) for o in run_session(self.session, inputs)]
        return outs[0] if len(outs) == 1 else tuple(outs)
