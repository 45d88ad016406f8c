"""MNN (Alibaba): the ONNX file converted by MNN's converter to ``model.mnn``, run by its CPU
backend through the Python module API.

The converter runs in a child process: on a graph it cannot convert it may abort the process
(C++ ``terminate``), and its output names the failing op. It is called directly, not through the
``mnnconvert`` script, whose usage logging tries to ``pip install`` a package at run time.
Tuned settings: threads and precision (``high``: fp32; ``low``: reduced precision where the CPU
has it, kept only when parity holds).

int8 (``native_int8``): MNN's offline quantization tool (``mnnquant``) on the float model,
calibrated on the batches given as tensor samples (``input_type: sequence``: one folder per
sample with ``input.json`` and each input as text), KL activation scales: int8 weights and
activations.
Where the tool fails, MNN's weight quantization (``--weightQuantBits 8``: int8 weights, float
activations) is used instead, and ``int8.json`` says so with the tool's error. (The converter
aborts on slimkit's QDQ graph, so the native path is the only int8 MNN runs.)
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from slimkit.export.backends.base import Arrays, Backend, Runner, quiet_stdout

_CONVERT = "import sys, _tools; _tools.mnnconvert(sys.argv)"
# the quantization tool's binding takes one argv list, its program name first
# MNN's activation scales (KL, ADMM or EMA). Against the float model, KL / ADMM / EMA: zoo
# residual 37.2 / 47.1 / 18.6 dB, trained shapes_resnet18 27.0 / 0.9 / 0.5 dB; so KL (MNN's default)
_FEATURE_METHOD = "KL"
_QUANT = "import sys, _tools; _tools.mnnquant(['quantized.out'] + sys.argv[1:])"


def _io_names(onnx_path: Path) -> tuple[list[str], list[str]]:
    import onnx

    g = onnx.load(str(onnx_path), load_external_data=False).graph
    inits = {i.name for i in g.initializer}
    return [i.name for i in g.input if i.name not in inits], [o.name for o in g.output]


def _shapes(names: list[str], batch: Arrays) -> list[dict[str, Any]]:
    return [{"name": n, "shape": list(np.shape(x))} for n, x in zip(names, batch, strict=True)]


class MnnBackend(Backend):
    name = "mnn"
    package = "mnn"
    module = "MNN"
    suffix = ".mnn"
    fixed_batch = False
    native_int8 = "MNN offline quantization (mnnquant, KL, calibration samples)"

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
        (dest,) = self._convert(onnx_path, workdir, [])
        names = _io_names(onnx_path)[0]
        source, samples = workdir / "float.mnn", workdir / "calib"
        dest.rename(source)
        for i, batch in enumerate(calib):
            folder = samples / f"s{i:05d}"
            folder.mkdir(parents=True)
            (folder / "input.json").write_text(json.dumps({"inputs": _shapes(names, batch)}))
            for n, x in zip(names, batch, strict=True):
                flat = np.asarray(x, dtype=np.float64).reshape(-1)
                np.savetxt(folder / f"{n}.txt", flat, fmt="%.9g")
        config = {"inputs": _shapes(names, calib[0]), "path": str(samples),
                  "input_type": "sequence", "used_sample_num": len(calib),
                  "feature_quantize_method": _FEATURE_METHOD, "weight_quantize_method": "MAX_ABS",
                  "batch_size": 1, "quant_bits": 8}  # fmt: skip
        (workdir / "quant.json").write_text(json.dumps(config))
        proc = subprocess.run([sys.executable, "-c", _QUANT, str(source), str(dest),
                               str(workdir / "quant.json")], capture_output=True, text=True,
                              timeout=1800, cwd=workdir)  # fmt: skip
        log = (proc.stdout + proc.stderr).strip()
        shutil.rmtree(samples, ignore_errors=True)
        if proc.returncode == 0 and dest.is_file() and "Quantize model done" in log:
            mode = f"int8 weights and activations ({len(calib)} samples)"
        else:  # the weight-only fallback, with the tool's last words
            self._convert(onnx_path, workdir, ["--weightQuantBits", "8"])
            why = log.splitlines()[-1][:200] if log else f"exit {proc.returncode}"
            mode = f"int8 weights only, float activations (mnnquant failed: {why})"
        source.unlink(missing_ok=True)
        (workdir / "int8.json").write_text(json.dumps({"mode": mode}))
        return [dest]

    def int8_detail(self, files: list[Path]) -> str | None:
        info = files[0].parent / "int8.json"
        return str(json.loads(info.read_text())["mode"]) if info.is_file() else None

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
