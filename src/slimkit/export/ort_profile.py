"""Per-node time from ONNX Runtime's profiler, mapped back to the PyTorch modules it came from.

ORT rewrites the graph before it runs it: it fuses Conv + BatchNorm + ReLU, converts convs to its
blocked NCHWc layout and renames them after their output (``/layer1/layer1.0/relu1/Relu_output_0
_nchwc`` is the kernel of ``layer1.0.conv1``), and invents nodes (``BiasGelu``). Each profiled
kernel is traced back to a node of the exported graph, by name, by output tensor, and through
the activations fused into it, and that node's scope path gives the module::

    nodes = profile_onnx("model.onnx", (x,), modules={n for n, _ in model.named_modules()})
    nodes[0]   # NodeTime(node=".../relu1/Relu_output_0_nchwc", op_type="Conv",
               #          source="/layer1/layer1.0/conv1/Conv", module="layer1.0.conv1", us=812.0)
"""

from __future__ import annotations

import json
import statistics
import tempfile
from collections.abc import Collection, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from slimkit.export.ort import feeds

# the op of the exported graph that an ORT kernel implements
_BASE_OP = {
    "FusedConv": "Conv", "QLinearConv": "Conv", "ConvInteger": "Conv", "NhwcConv": "Conv",
    "FusedMatMul": "MatMul", "MatMulInteger": "MatMul", "QLinearMatMul": "MatMul",
    "MatMulIntegerToFloat": "MatMul", "DynamicQuantizeMatMul": "MatMul", "FusedGemm": "Gemm",
    "QGemm": "Gemm", "QLinearAdd": "Add", "QLinearMul": "Mul", "BiasGelu": "Mul", "Gelu": "Mul",
    "QLinearGlobalAveragePool": "GlobalAveragePool", "QLinearAveragePool": "AveragePool",
    "QLinearConcat": "Concat", "QLinearSigmoid": "Sigmoid", "QLinearSoftmax": "Softmax",
    "SkipLayerNormalization": "LayerNormalization",
}  # fmt: skip
# ops that ORT fuses into the kernel before them: walk back through these to find the source
_FUSABLE = {
    "Relu", "Clip", "Add", "Sum", "BatchNormalization", "Mul", "Div", "Erf", "Sigmoid",
    "HardSigmoid", "LeakyRelu", "Tanh", "Identity", "DequantizeLinear", "QuantizeLinear",
}  # fmt: skip
_SUFFIXES = ("_nchwc", "_quant", "_Fused", "_fused")


@dataclass(frozen=True)
class NodeTime:
    """One kernel ORT ran: its name and op, the exported node it came from, the module, the
    median time per run in microseconds, and how many times it ran per run."""

    node: str
    op_type: str
    source: str
    module: str
    us: float
    calls: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def module_path(node_name: str, modules: Collection[str] | None = None) -> str:
    """The module of an exported node name: ``/layer2/layer2.0/downsample/downsample.0/Conv`` ->
    ``layer2.0.downsample.0``. The exporter writes one scope per module, each the tail of the
    qualified name, so consecutive scopes are merged on their overlap. With ``modules``, a name
    that is not a module falls back to its longest prefix that is ("" for the root)."""
    scopes = [s for s in node_name.strip("/").split("/")[:-1] if s]
    parts: list[str] = []
    for s in scopes:
        seg = s.split(".")
        k = next(
            (k for k in range(min(len(seg) - 1, len(parts)), 0, -1) if parts[-k:] == seg[:k]), 0
        )
        parts.extend(seg[k:])
    if modules is not None:
        while parts and ".".join(parts) not in modules:
            parts.pop()
    return ".".join(parts)


class _Graph:
    """The exported graph's nodes by name and by the tensors they produce."""

    def __init__(self, nodes: Sequence[Any]) -> None:
        self.by_name = {n.name: n for n in nodes if n.name}
        self.producer = {out: n for n in nodes for out in n.output}

    def walk_back(self, node: Any, op: str) -> Any:
        """The nearest node of type ``op`` feeding ``node`` through fusable ops, else ``node``."""
        frontier, seen = [node], set()
        for _ in range(5):
            nxt: list[Any] = []
            for n in frontier:
                if n.op_type == op:
                    return n
                if n.op_type not in _FUSABLE or id(n) in seen:
                    continue
                seen.add(id(n))
                nxt.extend(self.producer[i] for i in n.input if i in self.producer)
            frontier = nxt
        return node

    def source(self, name: str, op_type: str, outputs: Sequence[str]) -> Any:
        op = _BASE_OP.get(op_type, op_type)
        cands = [name] + [name[: -len(s)] for s in _SUFFIXES if name.endswith(s)]
        parts = name.split("/")
        cands += ["/".join(parts[:k]) for k in range(len(parts) - 1, 1, -1)]
        for c in cands:
            if c in self.by_name:
                return self.walk_back(self.by_name[c], op)
            if c in self.producer:
                return self.walk_back(self.producer[c], op)
        for out in outputs:
            for s in ("", *_SUFFIXES):
                t = out[: -len(s)] if s and out.endswith(s) else out
                if t in self.producer:
                    return self.walk_back(self.producer[t], op)
        return None


def _session(path: str, prefix: str, optimized: str, threads: int) -> Any:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    so.enable_profiling = True
    so.profile_file_prefix = prefix
    so.optimized_model_filepath = optimized
    return ort.InferenceSession(path, sess_options=so, providers=["CPUExecutionProvider"])


def profile_onnx(
    path: str | Path,
    inputs: Sequence[Any],
    *,
    runs: int = 20,
    warmup: int = 3,
    threads: int = 2,
    modules: Collection[str] | None = None,
) -> list[NodeTime]:
    """Run ``path`` ``warmup + runs`` times with ORT's profiler (protocol threading, all graph
    optimisations) and return each kernel's median time per run, in execution order."""
    import onnx

    graph = _Graph(onnx.load(str(path), load_external_data=False).graph.node)
    with tempfile.TemporaryDirectory() as tmp:
        optimized = str(Path(tmp) / "optimized.onnx")
        sess = _session(str(path), str(Path(tmp) / "ort"), optimized, threads)
        fed = feeds(sess, inputs)
        for _ in range(warmup + runs):
            sess.run(None, fed)
        events = json.loads(Path(sess.end_profiling()).read_text(encoding="utf-8"))
        opt_outputs = {n.name: list(n.output) for n in onnx.load(optimized).graph.node}
    durs: dict[str, list[float]] = {}
    ops: dict[str, str] = {}
    for e in events:
        name = e.get("name", "")
        if e.get("cat") != "Node" or not name.endswith("_kernel_time"):
            continue
        node = name[: -len("_kernel_time")]
        durs.setdefault(node, []).append(float(e.get("dur", 0.0)))
        ops[node] = e.get("args", {}).get("op_name", "")
    total = warmup + runs
    out = []
    for node, d in durs.items():
        calls = max(1, round(len(d) / total))
        timed = d[warmup * calls :] or d
        per_run = [sum(timed[i : i + calls]) for i in range(0, len(timed), calls)]
        src = graph.source(node, ops[node], opt_outputs.get(node, []))
        src_name = src.name if src is not None else ""
        module = module_path(src_name or node, modules)
        out.append(NodeTime(node, ops[node], src_name, module, statistics.median(per_run), calls))
    return out
