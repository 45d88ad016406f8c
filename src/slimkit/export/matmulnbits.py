"""Export a weight-only int4 / int8 model (``quant.int4``) to ONNX Runtime's ``MatMulNBits``.

Each ``NBitsLinear`` exports as one ``com.microsoft::MatMulNBits`` node over its packed codes
(plus a ``Mul`` for AWQ's input scale and an ``Add`` for the bias); the rest of the model is the
usual float export. ``export_nbits`` checks ORT's output against the PyTorch simulation (SQNR:
with ``accuracy_level=4`` both sides quantize the input to int8 per block, so they agree to float
rounding; a rare rounding tie flips one int8 step) and that every packed layer became a node::

    rep = export_nbits(q, "model.onnx", example_inputs=(ids,))
    rep.nodes, rep.weight_bytes, rep.export.notes   # 25, 312_000, ['ORT vs simulation SQNR 71 dB']
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from slimkit.errors import ExportError
from slimkit.export.onnx import ExportReport
from slimkit.export.qdq import export_quantized


@dataclass
class NBitsReport:
    """What an int4 / int8 export holds: ``MatMulNBits`` nodes and their settings."""

    export: ExportReport
    nodes: int = 0
    settings: dict[str, int] = field(default_factory=dict)  # "bits=4 block=128 acc=4" -> count
    weight_bytes: int = 0  # packed codes, scales and zero points of the MatMulNBits nodes

    def to_dict(self) -> dict[str, Any]:
        return {"export": self.export.to_dict(), "nodes": self.nodes, "settings": self.settings,
                "weight_bytes": self.weight_bytes}  # fmt: skip


def nbits_nodes(path: str | Path) -> tuple[list[dict[str, int]], int]:
    """The attributes of each ``MatMulNBits`` node in ``path`` and the bytes of their quantized
    initializers (codes, scales, zero points)."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    inits = {i.name: i for i in model.graph.initializer}
    nodes, nbytes = [], 0
    for n in model.graph.node:
        if n.op_type != "MatMulNBits":
            continue
        nodes.append({a.name: int(onnx.helper.get_attribute_value(a)) for a in n.attribute})
        nbytes += sum(numpy_helper.to_array(inits[i]).nbytes for i in n.input[1:] if i in inits)
    return nodes, nbytes


def export_nbits(
    model: nn.Module,
    path: str | Path,
    *,
    example_inputs: tuple[torch.Tensor, ...],
    example_kwargs: dict[str, torch.Tensor] | None = None,
    min_sqnr_db: float = 30.0,
) -> NBitsReport:
    """Export ``model`` (a ``quant.int4`` result) with ``MatMulNBits`` nodes, check ORT against
    the simulation (``min_sqnr_db``) and that each packed layer became a node; raises
    ``ExportError`` otherwise."""
    from slimkit.quant.nbits import NBitsLinear

    expected = sum(isinstance(m, NBitsLinear) for m in model.modules())
    rep, _ = export_quantized(model, path, example_inputs=example_inputs,
                              example_kwargs=example_kwargs, min_sqnr_db=min_sqnr_db)  # fmt: skip
    nodes, nbytes = nbits_nodes(path)
    if len(nodes) != expected:
        raise ExportError(
            f"{path}: {len(nodes)} MatMulNBits nodes for {expected} packed layers",
            fix="export with the torchscript exporter (exporter='torchscript'), which writes the "
            "node NBitsLinear declares",
        )
    keys = Counter(f"bits={n['bits']} block={n['block_size']} acc={n.get('accuracy_level', 0)}"
                   for n in nodes)  # fmt: skip
    return NBitsReport(rep, len(nodes), dict(keys), nbytes)
