"""ONNX Runtime, the reference backend: the exported ONNX file as is, on the CPU provider.

Tuned settings: intra-op threads, graph optimisation level and execution mode.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from slimkit.export.backends.base import Arrays, Backend, Runner

_LEVELS = {
    "disable": "ORT_DISABLE_ALL",
    "basic": "ORT_ENABLE_BASIC",
    "extended": "ORT_ENABLE_EXTENDED",
    "all": "ORT_ENABLE_ALL",
}


class OrtBackend(Backend):
    name = "ort"
    package = "onnxruntime"
    module = "onnxruntime"
    suffix = ".onnx"

    def settings(self, threads: int) -> list[dict[str, Any]]:
        base = {"threads": threads, "optimization": "all", "execution_mode": "sequential"}
        grid = [base, {**base, "optimization": "extended"}, {**base, "execution_mode": "parallel"}]
        if threads > 1:
            grid.append({**base, "threads": 1})
        return grid

    def export(self, onnx_path: Path, inputs: Arrays, workdir: Path) -> list[Path]:
        dest = workdir / "model.onnx"
        if dest.resolve() != onnx_path.resolve():
            shutil.copyfile(onnx_path, dest)
        return [dest]

    def load(self, files: list[Path], inputs: Arrays, settings: dict[str, Any]) -> Runner:
        import onnxruntime as ort

        from slimkit.export.ort import feeds

        threads = int(settings.get("threads", 2))
        parallel = settings.get("execution_mode") == "parallel"
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = threads if parallel else 1
        so.execution_mode = getattr(
            ort.ExecutionMode, "ORT_PARALLEL" if parallel else "ORT_SEQUENTIAL"
        )
        so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, _LEVELS[
            str(settings.get("optimization", "all"))])  # fmt: skip
        so.log_severity_level = 3
        sess = ort.InferenceSession(str(files[0]), sess_options=so,
                                    providers=["CPUExecutionProvider"])  # fmt: skip

        def bind(xs: Arrays) -> Callable[[], Any]:
            fed = feeds(sess, xs)
            return lambda: sess.run(None, fed)

        return Runner(lambda xs: sess.run(None, feeds(sess, xs)), bind)
