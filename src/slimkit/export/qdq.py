"""What ONNX Runtime actually runs for a quantized model: integer kernels or float fall-backs.

ORT fuses QDQ patterns into integer kernels only when the graph satisfies its rules; a near miss
(a float bias, a missing output Q) silently falls back to float. ``kernel_report`` loads the graph
ORT optimised and counts both kinds, so a fall-back is a failing test, not a slow surprise.
"""

from __future__ import annotations

import tempfile
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from slimkit.export.onnx import ExportReport, export_onnx
from slimkit.export.ort import ort_session
from slimkit.export.packing import pack_weights

INTEGER_OPS = frozenset({
    "QLinearConv", "QLinearMatMul", "MatMulInteger", "MatMulIntegerToFloat", "QGemm",
    "QLinearAdd", "QLinearMul", "QLinearGlobalAveragePool", "QLinearAveragePool",
    "QLinearConcat", "ConvInteger", "DynamicQuantizeMatMul", "QLinearSoftmax", "QLinearSigmoid",
    "QLinearLeakyRelu", "NhwcQLinearConv", "QAttention",
})  # fmt: skip
FLOAT_COMPUTE_OPS = frozenset({"Conv", "MatMul", "Gemm", "FusedConv", "FusedMatMul", "FusedGemm"})


@dataclass
class KernelReport:
    """Op counts of the ORT-optimised graph, split into integer kernels and float compute."""

    ops: dict[str, int] = field(default_factory=dict)

    @property
    def integer(self) -> int:
        return sum(n for op, n in self.ops.items() if op in INTEGER_OPS)

    @property
    def float_compute(self) -> int:
        return sum(n for op, n in self.ops.items() if op in FLOAT_COMPUTE_OPS)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "integer": self.integer, "float_compute": self.float_compute}


def kernel_report(onnx_path: str | Path) -> KernelReport:
    """Count the ops in the graph ORT runs (extended optimisations: QDQ fusion, no layouts)."""
    import onnx

    with tempfile.TemporaryDirectory() as tmp:
        opt = Path(tmp) / "optimized.onnx"
        ort_session(onnx_path, optimization="extended", optimized_model_path=opt)
        graph = onnx.load(str(opt)).graph
    return KernelReport(dict(Counter(n.op_type for n in graph.node)))


def packable(model: nn.Module) -> tuple[int | None, bool]:
    """What ``model``'s export stores packed: the fewest weight bits of its integer layers when
    4 or fewer (else None), and whether it has fp16-weight layers (``quant.mixed``)."""
    from slimkit.quant.mixed import HalfLayer
    from slimkit.quant.modules import QuantLayer

    bits = [m.weight_bits for m in model.modules() if isinstance(m, QuantLayer)]
    low = min(bits, default=8)
    return (low if low <= 4 else None), any(isinstance(m, HalfLayer) for m in model.modules())


def export_quantized(
    model: nn.Module,
    path: str | Path,
    *,
    example_inputs: tuple[torch.Tensor, ...] = (),
    example_kwargs: dict[str, torch.Tensor] | None = None,
    min_sqnr_db: float = 25.0,
) -> tuple[ExportReport, KernelReport]:
    """Export a quantized model as QDQ ONNX, check it in ORT, and report the kernels ORT runs.

    ORT's integer arithmetic rounds like the simulation except at exact .5 ties, where a value can
    land one step away; through a deep network those steps add up to small noise. So the check is
    the SQNR of ORT's output against the simulation (``min_sqnr_db``), and ``max_abs_err`` is
    reported. Raises ``ExportError`` below the bound (a kernel that saturates, a wrong scale).
    Weights of 4 or 2 bits are stored packed, fp16 layers as FLOAT16 (``export.packing``; the
    file's opset becomes 21 or 25 only when it holds such codes).
    """
    from slimkit.errors import ExportError
    from slimkit.export.onnx import _flatten, flat_io, parity_inputs
    from slimkit.export.ort import run_session
    from slimkit.quant.modules import float_pass
    from slimkit.testing.numerics import max_abs_err, sqnr

    module, flat, _, _ = flat_io(model, example_inputs, example_kwargs)
    int_bits, fp16 = packable(model)

    def run(dynamic: bool) -> tuple[ExportReport, tuple[torch.Tensor, ...], list[Any], list[Any]]:
        rep = export_onnx(
            model, path, example_inputs=example_inputs, example_kwargs=example_kwargs,
            check=False, dynamic_batch=dynamic,
        )  # fmt: skip
        if int_bits is not None or fp16:
            packed = pack_weights(path, int_bits=int_bits, fp16=fp16)
            rep.size_bytes = packed.bytes_after
            rep.opset = packed.opset or rep.opset
            rep.notes.append(packed.summary())
        inputs = parity_inputs(flat) if dynamic else flat
        with torch.no_grad():
            refs = _flatten(module(*inputs))
        out = run_session(ort_session(path), inputs)
        if [tuple(r.shape) for r in refs] != [tuple(o.shape) for o in out]:
            raise ExportError("output shapes differ", fix="")
        return rep, inputs, refs, out

    try:
        rep, inputs, refs, out = run(True)
    except Exception as e:  # noqa: BLE001 - ORT's own error types; retried at the example batch
        # a graph rebuilt from torch.export holds the example's batch size as a constant
        rep, inputs, refs, out = run(False)
        rep.dynamic_batch = False
        first = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
        rep.notes.append(f"batch fixed at {int(flat[0].shape[0])}: at another batch {first}")
    rep.max_abs_err = max_abs_err(refs, out)
    rep.parity_batch = int(inputs[0].shape[0])
    agreement = sqnr(refs, out)
    rep.notes.append(f"ORT vs simulation SQNR {agreement:.1f} dB")
    if agreement < min_sqnr_db:
        # A sensitive network (one whose quantized output is far from its float output) can
        # amplify ORT's one-step rounding differences at exact ties past the bound. Then ORT is
        # still as close to the float model as the simulation is; a wrong scale or a saturating
        # kernel makes it further away. So judge ORT against the float model too.
        with float_pass(model), torch.no_grad():
            floats = _flatten(module(*inputs))
        sim_db, ort_db = sqnr(floats, refs), sqnr(floats, out)
        if ort_db < sim_db - TIE_SLACK_DB or agreement < TIE_FLOOR_DB:
            raise ExportError(
                f"ONNX Runtime's integer model differs from slimkit's simulation: SQNR "
                f"{agreement:.1f} dB (bound {min_sqnr_db:g} dB), max abs error "
                f"{rep.max_abs_err:.3g}; against the float model ORT is at {ort_db:.1f} dB, the "
                f"simulation at {sim_db:.1f} dB",
                fix="on CPUs without VNNI quantize with weight_bits=7 (the default 'auto' does); "
                "otherwise report the model, this is a bug",
            )
        rep.notes.append(
            f"ORT vs simulation under {min_sqnr_db:g} dB, but ORT is as close to the float model "
            f"as the simulation ({ort_db:.1f} vs {sim_db:.1f} dB): rounding differences at ties, "
            "amplified by a sensitive network"
        )
    return rep, kernel_report(path)


# how much further from the float model than the simulation ORT may be when it misses the bound,
# and the least agreement with the simulation it may have (outputs 1.5x too large: 6 dB)
TIE_SLACK_DB, TIE_FLOOR_DB = 1.0, 12.0
