"""Sub-byte and half-precision weight storage in an exported ONNX file, computed as before.

The QDQ export writes every integer weight as an INT8 initializer, so 4-bit codes take a byte
each and a W4A8 file is as large as a W8A8 one. ``pack_weights`` rewrites the file:

- an INT8 weight read by ``DequantizeLinear`` whose codes fit in 4 bits (2 bits) becomes an
  ``INT4`` (``INT2``) initializer followed by ``Cast(to=INT8)``: two (four) codes per byte. ONNX
  Runtime constant-folds the cast when the session loads and still fuses the conv into
  ``QLinearConv`` (int8 kernels, the same arithmetic). INT4 needs opset 21, INT2 opset 25; the
  file is converted (``onnx.version_converter``) only when it packs something.
- a float weight read by Conv / Gemm / MatMul whose values are all exactly representable in fp16
  (the layers a mixed-precision plan marks fp16 store fp16-rounded weights) becomes a
  ``FLOAT16`` initializer followed by ``Cast(to=FLOAT)``: half the bytes, float compute.

Both rewrites are lossless by construction (the values are checked, not assumed), so ORT's output
is unchanged; ``export_quantized`` still compares it with the simulation.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

_INT4_OPSET, _INT2_OPSET = 21, 25
_FLOAT_WEIGHT_OPS = {"Conv": 1, "Gemm": 1, "MatMul": 1}  # op -> index of the weight input


@dataclass
class PackReport:
    """What ``pack_weights`` stored how: initializer names per storage type, and the sizes."""

    int4: list[str] = field(default_factory=list)
    int2: list[str] = field(default_factory=list)
    fp16: list[str] = field(default_factory=list)
    opset: int | None = None  # the file's opset after packing (None: unchanged)
    bytes_before: int = 0
    bytes_after: int = 0

    def summary(self) -> str:
        parts = [f"{len(v)} {k}" for k, v in (("int4", self.int4), ("int2", self.int2),
                                                ("fp16", self.fp16)) if v]  # fmt: skip
        return (f"packed weights: {', '.join(parts) or 'none'}; "
                f"{self.bytes_before} -> {self.bytes_after} bytes")  # fmt: skip


def pack_bits(codes: np.ndarray, bits: int) -> bytes:
    """Two's-complement ``bits``-bit codes packed little end first (ONNX INT4 / INT2 layout)."""
    per = 8 // bits
    flat = codes.astype(np.int16).ravel() & ((1 << bits) - 1)
    flat = np.concatenate([flat, np.zeros((-len(flat)) % per, dtype=np.int16)])
    groups = flat.reshape(-1, per)
    packed = np.zeros(len(groups), dtype=np.int16)
    for i in range(per):
        packed |= groups[:, i] << (bits * i)
    return packed.astype(np.uint8).tobytes()


def _fits(values: np.ndarray, bits: int) -> bool:
    lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    return values.size > 0 and int(values.min()) >= lo and int(values.max()) <= hi


def pack_weights(
    path: str | Path, *, int_bits: int | None = None, fp16: bool = False
) -> PackReport:
    """Rewrite the ONNX file at ``path`` in place: integer weights of ``int_bits`` (4 or 2) or
    fewer bits packed, and (``fp16``) fp16-exact float weights stored as FLOAT16 (see the module
    docstring). Files with external data are left as they are."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    path = Path(path)
    rep = PackReport(bytes_before=path.stat().st_size, bytes_after=path.stat().st_size)
    model = onnx.load(str(path))
    if any(t.data_location == TensorProto.EXTERNAL for t in model.graph.initializer):
        return rep
    plan = _plan(model, int_bits, fp16)
    if not plan:
        return rep
    need = _INT2_OPSET if 2 in plan.values() else _INT4_OPSET if 4 in plan.values() else None
    if need is not None:  # before packing: the converter knows only the types of the old opset
        model = _at_least_opset(model, need)
    graph = model.graph
    casts = []
    for t in [t for t in graph.initializer if t.name in plan]:
        name, bits = t.name, plan[t.name]
        if bits == 16:
            w = numpy_helper.to_array(t).astype(np.float16)
            packed = numpy_helper.from_array(w, f"{name}_fp16")
            cast = helper.make_node("Cast", [packed.name], [name], to=TensorProto.FLOAT,
                                    name=f"{name}_widen")  # fmt: skip
            rep.fp16.append(name)
        else:
            codes = numpy_helper.to_array(t)
            kind = TensorProto.INT2 if bits == 2 else TensorProto.INT4
            packed = helper.make_tensor(f"{name}_packed", kind, codes.shape,
                                        pack_bits(codes, bits), raw=True)  # fmt: skip
            cast = helper.make_node("Cast", [packed.name], [name], to=TensorProto.INT8,
                                    name=f"{name}_unpack")  # fmt: skip
            (rep.int2 if bits == 2 else rep.int4).append(name)
        graph.initializer.remove(t)
        graph.initializer.append(packed)
        casts.append(cast)
    for i, node in enumerate(casts):  # casts first: the graph stays topologically sorted
        graph.node.insert(i, node)
    onnx.save(model, str(path))
    rep.opset = _opset(model)
    rep.bytes_after = path.stat().st_size
    return rep


def _opset(model: Any) -> int:
    return int(next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")))


def _plan(model: Any, int_bits: int | None, fp16: bool) -> dict[str, int]:
    """Initializer name -> storage bits (4, 2, or 16 for FLOAT16) of what can be packed."""
    from onnx import TensorProto, numpy_helper

    readers: dict[str, list[tuple[str, int]]] = {}
    for node in model.graph.node:
        for i, name in enumerate(node.input):
            readers.setdefault(name, []).append((node.op_type, i))

    def only_read_as(name: str, ops: dict[str, int]) -> bool:
        uses = readers.get(name, [])
        return bool(uses) and all(ops.get(op) == i for op, i in uses)

    plan: dict[str, int] = {}
    for t in model.graph.initializer:
        if t.data_type == TensorProto.INT8 and int_bits is not None:
            if only_read_as(t.name, {"DequantizeLinear": 0}):
                codes = numpy_helper.to_array(t)
                bits = 2 if int_bits <= 2 and _fits(codes, 2) else 4 if _fits(codes, 4) else 0
                if bits:
                    plan[t.name] = bits
        elif fp16 and t.data_type == TensorProto.FLOAT and len(t.dims) >= 2:
            w = numpy_helper.to_array(t)
            exact = np.array_equal(w.astype(np.float16).astype(np.float32), w)
            if exact and only_read_as(t.name, _FLOAT_WEIGHT_OPS):
                plan[t.name] = 16
    return plan


def _at_least_opset(model: Any, opset: int) -> Any:
    """``model`` converted to ``opset`` when its default-domain opset is lower."""
    from onnx import helper, version_converter

    if _opset(model) >= opset:
        return model
    new = version_converter.convert_version(model, opset)
    del new.graph.value_info[:]  # shapes the converter inferred: bytes ORT does not need
    new.ir_version = max(new.ir_version, helper.find_min_ir_version_for(list(new.opset_import)))
    return new
