"""LiteRT (TFLite): the ONNX file converted by ``onnx2tf`` (through TensorFlow) to ``model.tflite``
and run by LiteRT's interpreter (``ai-edge-litert``, XNNPACK delegate), its threads tuned.

The conversion runs in a child process: TensorFlow is imported there only, so its thread pools, its
log lines and its memory stay out of the calling process (``import slimkit`` never imports it; at
run time the small ``ai_edge_litert`` interpreter is used). The ONNX file gets the example's static
shapes first (onnx2tf's shape inference needs them on attention blocks); inputs of rank 3 and more
are kept NCHW (onnx2tf would make them channels-last), and each output is mapped back to the ONNX
output's layout (onnx2tf may return it channels-last) by comparing with ONNX Runtime on the example
input, so a caller's NCHW tensors go in as they are and outputs compare element by element. Exact
GELU's ``Erf`` (a TensorFlow "Flex" op the interpreter lacks) is converted to onnx2tf's polynomial.

int8 (``native_int8``): TensorFlow's converter, full-integer quantization (int8 weights and
activations, the ``TFLITE_BUILTINS_INT8`` op set, float input and output tensors) with the
calibration batches as its representative dataset. An op the converter cannot keep in int8 is
retried with float fallback, and ``int8.json`` beside the model says which was used.
"""

from __future__ import annotations

import importlib.util
import itertools
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from slimkit.export.backends.base import Arrays, Backend, Runner, quiet_stdout, static_onnx

# what the conversion imports (onnx2tf declares none of its dependencies)
_NEEDED = {"ai_edge_litert": "ai-edge-litert", "tensorflow": "tensorflow-cpu",
           "onnx2tf": "onnx2tf", "tf_keras": "tf-keras", "onnx_graphsurgeon": "onnx-graphsurgeon",
           "sng4onnx": "sng4onnx", "sne4onnx": "sne4onnx", "psutil": "psutil"}  # fmt: skip
_CHILD = "import sys; from slimkit.export.backends.litert import _child; _child(sys.argv[1])"


def _dims(value_info: Any) -> list[int]:
    return [int(d.dim_value) for d in value_info.type.tensor_type.shape.dim]


class LiteRtBackend(Backend):
    name = "litert"
    package = "litert"  # the result files' tool name; the wheels are ai-edge-litert and onnx2tf
    module = "ai_edge_litert"
    suffix = ".tflite"
    fixed_batch = True  # converted at the example's shapes
    native_int8 = "TFLite full-integer int8 (converter's representative dataset)"

    @property
    def install(self) -> str:
        # tf-keras asks for the full `tensorflow` wheel; --no-deps keeps the CPU build only
        return "pip install 'slimkit[litert]' && pip install --no-deps tf-keras"

    def missing(self) -> str | None:
        for mod, pkg in _NEEDED.items():
            if importlib.util.find_spec(mod) is None:
                return f"{pkg} is not installed (LiteRT conversion needs it): {self.install}"
        return None

    def version(self) -> str | None:
        from importlib.metadata import PackageNotFoundError, version

        try:
            return f"ai-edge-litert {version('ai-edge-litert')}, onnx2tf {version('onnx2tf')}"
        except PackageNotFoundError:
            return None

    def settings(self, threads: int) -> list[dict[str, Any]]:
        grid: list[dict[str, Any]] = [{"threads": threads}]
        if threads > 1:
            grid.append({"threads": 1})
        return grid

    def export(self, onnx_path: Path, inputs: Arrays, workdir: Path) -> list[Path]:
        return self._convert(onnx_path, inputs, None, workdir)

    def export_int8(
        self, onnx_path: Path, inputs: Arrays, calib: list[Arrays], workdir: Path
    ) -> list[Path]:
        return self._convert(onnx_path, inputs, calib, workdir)

    def _convert(
        self, onnx_path: Path, inputs: Arrays, calib: list[Arrays] | None, workdir: Path
    ) -> list[Path]:
        import onnx

        static = static_onnx(onnx_path, inputs, workdir / "static.onnx")
        graph = onnx.load(str(static), load_external_data=False).graph
        inits = {i.name for i in graph.initializer}
        names = [i.name for i in graph.input if i.name not in inits]
        dest = workdir / "model.tflite"
        spec: dict[str, Any] = {"onnx": str(static), "tf_dir": str(workdir / "tf"),
                                "dest": str(dest), "names": names, "int8": calib is not None,
                                "nchw": [n for n, x in zip(names, inputs, strict=True)
                                         if np.ndim(x) >= 3]}  # fmt: skip
        if calib is not None:
            spec["calib"] = str(workdir / "calib.npz")
            arrays = {f"b{i}_{j}": np.asarray(x) for i, b in enumerate(calib)
                      for j, x in enumerate(b)}  # fmt: skip
            np.savez(spec["calib"], **arrays)  # type: ignore[arg-type]
            spec["batches"] = len(calib)
        (workdir / "spec.json").write_text(json.dumps(spec))
        env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "CUDA_VISIBLE_DEVICES": "-1"}
        proc = subprocess.run([sys.executable, "-c", _CHILD, str(workdir / "spec.json")],
                              capture_output=True, text=True, timeout=1800, cwd=workdir,
                              env=env)  # fmt: skip
        for tmp in (workdir / "tf", static, workdir / "calib.npz", workdir / "spec.json"):
            shutil.rmtree(tmp, ignore_errors=True) if tmp.is_dir() else tmp.unlink(missing_ok=True)
        if proc.returncode != 0 or not dest.is_file():
            log = (proc.stdout + proc.stderr).strip()
            raise RuntimeError(f"onnx2tf / TensorFlow's converter exited {proc.returncode}: "
                               f"{log[-1500:]}")  # fmt: skip
        layout = _layout(dest, onnx_path, inputs, graph)
        (workdir / "layout.json").write_text(json.dumps(layout))
        return [dest, workdir / "layout.json"]

    def int8_detail(self, files: list[Path]) -> str | None:
        info = files[0].parent / "int8.json"
        return str(json.loads(info.read_text())["mode"]) if info.is_file() else None

    def load(self, files: list[Path], inputs: Arrays, settings: dict[str, Any]) -> Runner:
        layout = json.loads((files[0].parent / "layout.json").read_text())
        return _runner(files[0], layout, int(settings.get("threads", 2)))


def _interpreter(path: Path, threads: int) -> Any:
    from ai_edge_litert.interpreter import Interpreter

    with quiet_stdout(1, 2):  # "INFO: Created TensorFlow Lite XNNPACK delegate for CPU."
        it = Interpreter(model_path=str(path), num_threads=threads)
        it.allocate_tensors()
    return it


def _feed(it: Any, ins: list[list[Any]], xs: Arrays) -> None:
    """Set each input, in the interpreter's axis order and dtype."""
    dtypes = {d["index"]: d["dtype"] for d in it.get_input_details()}
    for (idx, perm), x in zip(ins, xs, strict=True):
        x = np.transpose(x, perm) if perm else x
        it.set_tensor(idx, np.ascontiguousarray(x, dtype=dtypes[idx]))


def _runner(path: Path, layout: dict[str, Any], threads: int) -> Runner:
    it = _interpreter(path, threads)
    outs = [(i, p) for i, p in layout["outputs"]]

    def fetch() -> list[np.ndarray]:
        return [np.transpose(it.get_tensor(i), p) if p else it.get_tensor(i) for i, p in outs]

    def run(xs: Arrays) -> list[np.ndarray]:
        _feed(it, layout["inputs"], xs)
        it.invoke()
        return fetch()

    def bind(xs: Arrays) -> Callable[[], Any]:
        _feed(it, layout["inputs"], xs)
        return lambda: (it.invoke(), fetch())

    return Runner(run, bind)


def _layout(tflite: Path, onnx_path: Path, inputs: Arrays, graph: Any) -> dict[str, Any]:
    """Which LiteRT tensor, in which axis order, is each ONNX input and output: inputs by name
    (else in order) and shape, outputs by agreement with ONNX Runtime on ``inputs``."""
    import onnxruntime as ort

    from slimkit.export.ort import feeds

    it = _interpreter(tflite, 1)
    tin = it.get_input_details()
    inits = {i.name for i in graph.initializer}
    onnx_in = [i for i in graph.input if i.name not in inits]
    ins: list[list[Any]] = []
    free = list(range(len(tin)))
    for k, vi in enumerate(onnx_in):
        named = [j for j in free if tin[j]["name"].split(":")[0].endswith(vi.name)]
        j = named[0] if named else free[0]
        free.remove(j)
        want = tuple(int(v) for v in tin[j]["shape"])
        perm = next(p for p in itertools.permutations(range(len(want)))
                    if tuple(np.shape(inputs[k])[a] for a in p) == want)  # fmt: skip
        ins.append([int(tin[j]["index"]), None if list(perm) == sorted(perm) else list(perm)])
    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(str(onnx_path), sess_options=so,
                                providers=["CPUExecutionProvider"])  # fmt: skip
    refs = sess.run(None, feeds(sess, inputs))
    _feed(it, ins, inputs)
    it.invoke()
    got = {int(d["index"]): it.get_tensor(d["index"]) for d in it.get_output_details()}
    outs: list[list[Any]] = []
    for ref in refs:
        best: tuple[float, int, list[int] | None] | None = None
        for idx, out in got.items():
            for p in itertools.permutations(range(out.ndim)):
                cand = np.transpose(out, p)
                if cand.shape != ref.shape:
                    continue
                err = float(np.mean((cand.astype(np.float64) - ref) ** 2))
                if best is None or err < best[0]:
                    best = (err, idx, None if list(p) == sorted(p) else list(p))
        if best is None:
            raise RuntimeError(f"LiteRT's outputs {[o.shape for o in got.values()]} match no "
                               f"axis order of the ONNX output {ref.shape}")  # fmt: skip
        outs.append([best[1], best[2]])
    return {"inputs": ins, "outputs": outs}


def _child(spec_path: str) -> None:
    """The conversion, in a child process (TensorFlow is imported here only)."""
    spec = json.loads(Path(spec_path).read_text())
    import onnx2tf
    import tensorflow as tf

    tf.get_logger().setLevel("ERROR")
    tf_dir = spec["tf_dir"]
    onnx2tf.convert(input_onnx_file_path=spec["onnx"], output_folder_path=tf_dir,
                    output_signaturedefs=spec["int8"], not_use_onnxsim=True,
                    keep_ncw_or_nchw_or_ncdhw_input_names=spec["nchw"] or None,
                    replace_to_pseudo_operators=["erf"],
                    copy_onnx_input_output_names_to_tflite=True, non_verbose=True,
                    verbosity="error")  # fmt: skip
    dest = Path(spec["dest"])
    if not spec["int8"]:
        found = sorted(Path(tf_dir).glob("*_float32.tflite"))
        if not found:
            raise SystemExit(f"onnx2tf wrote no float32 .tflite in {tf_dir}")
        shutil.move(str(found[0]), str(dest))
        return
    calib = np.load(spec["calib"])
    sig = tf.saved_model.load(tf_dir).signatures["serving_default"]
    keys = sig.structured_input_signature[1]
    names = spec["names"]
    order = names if set(names) == set(keys) else sorted(keys)
    dtypes = {k: keys[k].dtype.as_numpy_dtype for k in keys}

    def dataset() -> Any:
        for i in range(spec["batches"]):
            yield {k: calib[f"b{i}_{j}"].astype(dtypes[k]) for j, k in enumerate(order)}

    conv = tf.lite.TFLiteConverter.from_saved_model(tf_dir)
    conv.optimizations = [tf.lite.Optimize.DEFAULT]
    conv.representative_dataset = dataset
    conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    mode = "full integer"
    try:
        blob = conv.convert()
    except Exception as e:  # noqa: BLE001 - an op without an int8 kernel: float fallback
        conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8,
                                          tf.lite.OpsSet.TFLITE_BUILTINS]  # fmt: skip
        mode = f"int8 with float fallback ({type(e).__name__}: {str(e).strip()[:200]})"
        blob = conv.convert()
    # an int8 kernel can refuse its calibrated input at run time (DIV by a divisor whose range
    # quantizes to zero, in a decomposed LayerNorm): that op type is kept float, and retried
    floated: list[str] = []
    while (op := _failing_op(blob, next(iter(dataset())))) is not None:
        if op in floated or len(floated) >= 4:
            raise SystemExit(f"LiteRT's int8 model fails at op {op} with {floated} kept float")
        floated.append(op)
        opts = tf.lite.experimental.QuantizationDebugOptions(denylisted_ops=floated)
        blob = tf.lite.experimental.QuantizationDebugger(
            converter=conv, debug_dataset=dataset, debug_options=opts
        ).get_nondebug_quantized_model()
        mode = f"int8 except {', '.join(floated)} (float: its int8 kernel failed on the data)"
    dest.write_bytes(blob)
    (dest.parent / "int8.json").write_text(json.dumps({"mode": mode, "float_ops": floated}))


def _failing_op(blob: bytes, feed: dict[str, np.ndarray]) -> str | None:
    """The op type a LiteRT model fails at on ``feed`` ("Node number 66 (DIV) failed to
    invoke"), or None when it runs."""
    import re

    from ai_edge_litert.interpreter import Interpreter

    runner = Interpreter(model_content=blob).get_signature_runner()
    try:
        runner(**feed)
    except RuntimeError as e:
        found = re.search(r"\((\w+)\) failed to invoke", str(e))
        if found is None:
            raise
        return found.group(1)
    return None
