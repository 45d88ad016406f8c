"""OpenVINO: reads the ONNX file directly (fp32, and slimkit's QDQ int8 graphs, which it runs on
its integer kernels), saved as OpenVINO IR (``model.xml`` + ``model.bin``).

Tuned settings: inference threads and the inference precision (``f32``; ``bf16`` where the CPU
has it, kept only when parity holds).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from slimkit.export.backends.base import Arrays, Backend, Runner


class OpenVinoBackend(Backend):
    name = "openvino"
    package = "openvino"
    module = "openvino"
    suffix = ".xml"

    def _core(self) -> Any:
        import openvino as ov

        return ov.Core()

    def settings(self, threads: int) -> list[dict[str, Any]]:
        base = {"threads": threads, "precision": "f32", "hint": "LATENCY"}
        grid = [base]
        caps = self._core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
        if "BF16" in caps:
            grid.append({**base, "precision": "bf16"})
        if threads > 1:
            grid.append({**base, "threads": 1})
        return grid

    def export(self, onnx_path: Path, inputs: Arrays, workdir: Path) -> list[Path]:
        import openvino as ov

        model = self._core().read_model(str(onnx_path))
        xml = workdir / "model.xml"
        ov.save_model(model, str(xml), compress_to_fp16=False)
        return [xml, xml.with_suffix(".bin")]

    def load(self, files: list[Path], inputs: Arrays, settings: dict[str, Any]) -> Runner:
        core = self._core()
        config = {
            "INFERENCE_NUM_THREADS": int(settings.get("threads", 2)),
            "PERFORMANCE_HINT": str(settings.get("hint", "LATENCY")),
            "INFERENCE_PRECISION_HINT": str(settings.get("precision", "f32")),
        }
        compiled = core.compile_model(core.read_model(str(files[0])), "CPU", config)
        request = compiled.create_infer_request()
        outputs = list(compiled.outputs)

        def run(xs: Arrays) -> list[Any]:
            res = request.infer(list(xs))
            return [res[o].copy() for o in outputs]

        def bind(xs: Arrays) -> Callable[[], Any]:
            fixed = list(xs)
            return lambda: request.infer(fixed)

        return Runner(run, bind)
