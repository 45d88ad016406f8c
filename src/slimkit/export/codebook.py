"""Write low-bit codebook layers (``quant.lowbit``) into ONNX in their small format.

The exporter writes each ``LowBitLayer`` weight as a placeholder node ``slimkit::LowBitDecode``
over its uint8 codes, levels and scales. ``pack_codebooks`` replaces each placeholder by what ONNX
Runtime runs::

    codes (UINT2 / UINT4 initializer) -> Cast(int32) -> Gather(levels) -> Mul(scale) -> weight

ONNX Runtime folds those constants once when it loads the file, so it then runs the ordinary
float kernels: the file is small, the model is not faster. UINT4 needs opset 21 and UINT2 opset 25
(the rest of the graph is converted with ``onnx.version_converter``); where that fails, the codes
stay UINT8 at the exported opset (a note says so). A Gather rather than ``DequantizeLinear``
because ORT does not constant-fold DequantizeLinear: it would dequantize every weight on every run.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

DOMAIN, OP = "slimkit", "LowBitDecode"
# storage bits -> (ONNX element type name, the opset that accepts it in Cast)
STORAGE = {2: ("UINT2", 25), 4: ("UINT4", 21), 8: ("UINT8", 0)}


@dataclass
class CodebookReport:
    """What ``pack_codebooks`` wrote: layers, code width, bytes of codes and tables."""

    layers: int = 0
    storage: str = "UINT8"  # the ONNX type the codes are stored as
    opset: int = 0
    code_bytes: int = 0  # the codes as stored in the file
    table_bytes: int = 0  # levels and scales
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _replace_placeholders(model: Any) -> tuple[list[str], set[str], int]:
    """Placeholders -> Cast / Gather / Mul over uint8 codes (valid at any opset), in place;
    returns the codes' initializer names, the levels' and scales', and the storage bits."""
    from onnx import TensorProto, helper, numpy_helper

    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    # the exporter shares equal initializers (a kmeans layer's scale of 1) through Identity nodes
    alias = {n.output[0]: n.input[0] for n in graph.node if n.op_type == "Identity"}

    def source(name: str) -> str:
        while name not in inits and name in alias:
            name = alias[name]
        return name

    nodes, codes, tables, bits = [], [], set(), 0
    for n in graph.node:
        if n.domain != DOMAIN or n.op_type != OP:
            nodes.append(n)
            continue
        c_name, levels, s_name = (source(i) for i in n.input)
        out = n.output[0]
        rank = len(inits[c_name].dims)
        scale = numpy_helper.to_array(inits[s_name]).astype(np.float32)
        # (C,) -> (C, 1, ...): broadcasts over each output channel
        graph.initializer.append(numpy_helper.from_array(
            scale.reshape((-1,) + (1,) * (rank - 1)), f"{out}_scale"))  # fmt: skip
        code_bits = next(helper.get_attribute_value(a) for a in n.attribute if a.name == "bits")
        bits = max(bits, min(w for w in STORAGE if w >= int(code_bits)))
        nodes += [
            helper.make_node("Cast", [c_name], [f"{out}_idx"], to=TensorProto.INT32),
            helper.make_node("Gather", [levels, f"{out}_idx"], [f"{out}_vals"], axis=0),
            helper.make_node("Mul", [f"{out}_vals", f"{out}_scale"], [out]),
        ]
        codes.append(c_name)
        tables |= {levels, f"{out}_scale"}
    nodes = _fold_batchnorm(graph, nodes, source)
    used = {i for n in nodes for i in n.input} | {o.name for o in graph.output}
    nodes = [n for n in nodes if n.op_type != "Identity" or n.output[0] in used]
    used = {i for n in nodes for i in n.input} | {o.name for o in graph.output}
    kept_inits = [i for i in graph.initializer if i.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept_inits)
    del graph.node[:]
    graph.node.extend(nodes)
    kept = [o for o in model.opset_import if o.domain != DOMAIN]
    del model.opset_import[:]
    model.opset_import.extend(kept)
    return sorted(set(codes)), tables, bits


def _fold_batchnorm(graph: Any, nodes: list[Any], source: Any) -> list[Any]:
    """Fold each BatchNormalization that alone follows a Conv with a decoded weight into that
    weight's per-channel scale and the Conv's bias (the exporter folds float convs' BN itself)."""
    from onnx import numpy_helper

    inits = {i.name: i for i in graph.initializer}
    outputs = {o.name for o in graph.output}

    def arr(name: str) -> np.ndarray:
        return numpy_helper.to_array(inits[source(name)]).astype(np.float32)

    muls = {n.output[0]: n for n in nodes if n.op_type == "Mul" and n.input[1].endswith("_scale")}
    readers: dict[str, list[Any]] = {}
    for n in nodes:
        for i in n.input:
            readers.setdefault(i, []).append(n)
    dropped = set()
    for conv in nodes:
        if conv.op_type != "Conv" or conv.input[1] not in muls or conv.output[0] in outputs:
            continue
        (bn, *more) = readers.get(conv.output[0], [None])
        if bn is None or more or bn.op_type != "BatchNormalization" or len(bn.output) != 1:
            continue
        if not all(source(i) in inits for i in bn.input[1:]):
            continue
        eps = next((a.f for a in bn.attribute if a.name == "epsilon"), 1e-5)
        gamma, beta, mean, var = (arr(i) for i in bn.input[1:5])
        g = gamma / np.sqrt(var + eps)
        s_name = muls[conv.input[1]].input[1]
        scale = numpy_helper.to_array(inits[s_name])
        folded = scale * g.reshape((-1,) + (1,) * (scale.ndim - 1))  # (C, 1, ...)
        inits[s_name].CopyFrom(numpy_helper.from_array(folded.astype(np.float32), s_name))
        bias = arr(conv.input[2]) if len(conv.input) > 2 and conv.input[2] else 0.0
        b_name = f"{conv.input[1]}_bias"
        graph.initializer.append(numpy_helper.from_array(
            ((bias - mean) * g + beta).astype(np.float32), b_name))  # fmt: skip
        del conv.input[2:]
        conv.input.append(b_name)
        conv.output[0] = bn.output[0]
        dropped.add(id(bn))
    return [n for n in nodes if id(n) not in dropped]


def _retype(model: Any, names: list[str], type_name: str) -> None:
    """Store the uint8 code initializers ``names`` as ``type_name`` (UINT2 / UINT4: packed)."""
    import ml_dtypes  # onnx's own dependency: numpy types of 2 and 4 bits, packed raw
    from onnx import numpy_helper

    dtype = getattr(ml_dtypes, type_name.lower())
    for init in model.graph.initializer:
        if init.name in names:
            arr = numpy_helper.to_array(init)
            init.CopyFrom(numpy_helper.from_array(arr.astype(dtype), init.name))


def _loads(model: Any) -> str | None:
    """None if ONNX Runtime builds a session for ``model``, else its complaint."""
    import onnxruntime as ort

    try:
        ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    except Exception as e:  # noqa: BLE001 - ORT's own error types
        return str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
    return None


def pack_codebooks(path: str | Path) -> CodebookReport | None:
    """Rewrite the ONNX file at ``path`` in place: codebook placeholders become small-integer
    codes rebuilt by Cast / Gather / Mul. None when the file has no placeholder."""
    import onnx
    from onnx import version_converter

    model = onnx.load(str(path))
    if not any(n.domain == DOMAIN and n.op_type == OP for n in model.graph.node):
        return None
    codes, tables, bits = _replace_placeholders(model)
    opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    rep = CodebookReport(layers=len(codes), opset=opset)
    base = model
    for width in (w for w in (2, 4) if w >= bits):
        type_name, need = STORAGE[width]
        try:
            cand = version_converter.convert_version(base, max(opset, need))
            cand.ir_version = max(cand.ir_version, 11 if width == 2 else 10)
            _retype(cand, codes, type_name)
        except Exception as e:  # noqa: BLE001 - the converter's own error types
            rep.notes.append(f"{type_name} codes need opset {need}: conversion failed ({e})")
            continue
        problem = _loads(cand)
        if problem is None:
            model, rep.storage, rep.opset = cand, type_name, max(opset, need)
            break
        rep.notes.append(f"ONNX Runtime refused {type_name} codes: {problem}")
    if rep.storage == "UINT8" and bits < 8:
        rep.notes.append("codes stored as UINT8 (no smaller type loaded)")
    width = {"UINT2": 2, "UINT4": 4, "UINT8": 8}[rep.storage]
    inits = {i.name: i for i in model.graph.initializer}
    numel = [int(np.prod(inits[c].dims)) for c in codes]
    rep.code_bytes = sum((n * width + 7) // 8 for n in numel)
    rep.table_bytes = sum(int(np.prod(inits[t].dims)) * 4 for t in tables if t in inits)
    onnx.save(model, str(path))
    rep.notes.insert(0, f"{rep.layers} low-bit layers: codes as {rep.storage} (opset {rep.opset})")
    return rep
