"""MNN (Alibaba): the ONNX file converted by MNN's converter to ``model.mnn``, run by its CPU
backend through the Python module API.

The converter runs in a child process: on a graph it cannot convert it may abort the process
(C++ ``terminate``), and its output names the failing op. It is called directly, not through the
``mnnconvert`` script, whose usage logging tries to ``pip install`` a package at run time.
Tuned settings: threads and precision (``high``: fp32; ``low``: reduced precision where the CPU
has it, kept only when parity holds).

int8 (``native_int8``): MNN's converter on the float ONNX with ``--weightQuantBits 8`` (int8
weights, per output channel). MNN's full int8 path is closed here: its converter aborts on
slimkit's QDQ graph, and its offline quantization tool (``mnnquant``, 3.6.1) aborted with
``std::length_error`` when given tensor samples (``input_type: sequence``, one folder per sample
with ``input.json`` and the tensor as text) on the zoo's residual model; it otherwise calibrates
on image files. So the activations stay float; the ``memory=low`` setting (tried in the tuning)
lets MNN's CPU kernels compute with the int8 weights directly.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from slimkit.export.backends.base import Arrays, Backend, Runner, quiet_stdout

_CONVERT = "import sys, _tools; _tools.mnnconvert(sys.argv)"


def _io_names(onnx_path: Path) -> tuple[list[str], list[str]]:
    import onnx

    g = onnx.load(str(onnx_path), load_external_data=False).graph
    inits = {i.name for i in g.initializer}
    return [i.name for i in g.input if i.name not in inits], [o.name for o in g.output]


class MnnBackend(Backend):
    name = "mnn"
    package = "mnn"
    module = "MNN"
    suffix = ".mnn"
    fixed_batch = False
    native_int8 = "MNN weight quantization (int8 weights, per channel; float activations)"

    def settings(self, threads: int) -> list[dict[str, Any]]:
        base = {"threads": threads, "precision": "high"}
        grid = [base, {**base, "precision": "low"}, {**base, "precision": "low", "memory": "low"}]
        if threads > 1:
            grid.append({**base, "threads": 1})
        return grid

    def export(self, onnx_path: Path, inputs: Arrays, workdir: Path) -> list[Path]:
        return self._convert(onnx_path, workdir, [])

    def export_int8(
        self, onnx_path: Path, inputs: Arrays, calib: list[Arrays], workdir: Path
    ) -> list[Path]:
        return self._convert(onnx_path, workdir, ["--weightQuantBits", "8"])

    def _convert(self, onnx_path: Path, workdir: Path, extra: list[str]) -> list[Path]:
        dest = workdir / "model.mnn"
        argv = ["mnnconvert", "-f", "ONNX", "--modelFile", str(onnx_path), "--MNNModel", str(dest),
                "--bizCode", "slimkit", *extra]  # fmt: skip
        proc = subprocess.run([sys.executable, "-c", _CONVERT, *argv[1:]], capture_output=True,
                              text=True, timeout=600, cwd=workdir)  # fmt: skip
        log = (proc.stdout + proc.stderr).strip()
        if proc.returncode != 0 or not dest.is_file() or "Converted Success" not in log:
            raise RuntimeError(f"MNN's converter exited {proc.returncode}: {log[-1500:]}")
        (workdir / "io.txt").write_text("\n".join(",".join(n) for n in _io_names(onnx_path)))
        return [dest]

    def load(self, files: list[Path], inputs: Arrays, settings: dict[str, Any]) -> Runner:
        with quiet_stdout():  # importing MNN prints the CPU's features on stdout
            import MNN.expr as F
            import MNN.nn as mnn_nn

        ins, outs = (ln.split(",") for ln in (files[0].parent / "io.txt").read_text().splitlines())
        config = {"backend": "CPU", "precision": str(settings.get("precision", "high")),
                  "memory": str(settings.get("memory", "normal")),
                  "numThread": int(settings.get("threads", 2))}  # fmt: skip
        with quiet_stdout():  # MNN prints its precision on stdout
            rt = mnn_nn.create_runtime_manager((config,))
            net = mnn_nn.load_module_from_file(str(files[0]), ins, outs, runtime_manager=rt,
                                               shape_mutable=True)  # fmt: skip

        def to_var(x: np.ndarray) -> Any:
            if np.issubdtype(x.dtype, np.integer):  # token ids: MNN converts int64 inputs to int32
                ids = np.ascontiguousarray(x, dtype=np.int32)
                return F.const(ids, list(x.shape), F.NCHW, F.int)
            return F.const(np.ascontiguousarray(x, dtype=np.float32), list(x.shape), F.NCHW)

        def to_vars(xs: Arrays) -> list[Any]:
            return [to_var(x) for x in xs]

        def read(vs: Any) -> list[np.ndarray]:
            vs = vs if isinstance(vs, list) else [vs]
            return [np.array(v.read(), copy=True).reshape(v.shape) for v in vs]

        def bind(xs: Arrays) -> Callable[[], Any]:
            vs = to_vars(xs)
            # timed with reading the outputs back: MNN computes lazily, on read
            return lambda: read(net.forward(vs))

        return Runner(lambda xs: read(net.forward(to_vars(xs))), bind)
