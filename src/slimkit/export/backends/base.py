"""The backend interface: export an ONNX file to a runtime's format, load it with runtime settings,
run it, time it, and check its parity against slimkit's PyTorch model.

A backend is a small class with two steps; timing and parity are shared (``time``, ``parity``)::

    be = get_backend("openvino")
    be.missing()                               # None, or why it cannot run here (with the fix)
    files = be.export(onnx_path, inputs, workdir)            # the runtime's own files
    runner = be.load(files, inputs, {"threads": 2})          # settings from be.settings(...)
    outs = runner.run(inputs)                                # list of numpy arrays

Inputs and outputs are numpy arrays in the order of the ONNX graph's inputs and outputs.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import re
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from slimkit.errors import ExportError

Arrays = Sequence[np.ndarray]


class BackendUnavailable(ExportError):
    """A backend cannot run on this machine: its package is missing, or its hardware is."""


class BackendFailed(ExportError):
    """A backend could not convert or run a model; ``op`` names the failing ONNX op when known."""

    def __init__(self, problem: str, *, fix: str, op: str | None = None) -> None:
        self.op = op
        super().__init__(problem, fix=fix)


class Runner:
    """A loaded model: ``run(inputs)`` returns the outputs; ``bind(inputs)`` a zero-argument
    callable for timing that does the input conversion once, outside the timed call."""

    def __init__(
        self,
        run: Callable[[Arrays], list[Any]],
        bind: Callable[[Arrays], Callable[[], Any]] | None = None,
    ) -> None:
        self._run = run
        self._bind = bind

    def run(self, inputs: Arrays) -> list[np.ndarray]:
        return [np.asarray(o) for o in self._run(inputs)]

    def bind(self, inputs: Arrays) -> Callable[[], Any]:
        if self._bind is not None:
            return self._bind(inputs)
        fixed = list(inputs)
        return lambda: self._run(fixed)


class Backend:
    """One runtime. Subclasses set the class attributes and implement ``export`` and ``load``."""

    name: ClassVar[str]  # the --backend name: ort, openvino, tvm, mnn, ...
    package: ClassVar[str]  # the PyPI package: onnxruntime, openvino, apache-tvm, mnn, ...
    module: ClassVar[str]  # what is imported
    suffix: ClassVar[str] = ".onnx"  # the main file written into the deploy artifact
    fixed_batch: ClassVar[bool] = False  # compiled for the example batch only
    consumes: ClassVar[str] = "onnx"  # or "torch": export_torch gets the PyTorch model
    # the runtime's own int8 quantizer (a description for the report), run on the float model
    # with the calibration batches when ``deploy`` quantizes; None: it runs slimkit's QDQ graph
    native_int8: ClassVar[str | None] = None

    @property
    def install(self) -> str:
        return f"pip install {self.package}   (or pip install 'slimkit[backends]')"

    def missing(self) -> str | None:
        """Why this backend cannot run here (the package is missing, ...), or None."""
        if importlib.util.find_spec(self.module) is None:
            return f"{self.package} is not installed: {self.install}"
        return None

    def settings(self, threads: int) -> list[dict[str, Any]]:
        """Runtime settings to try, the backend's default first (tuned by measurement)."""
        return [{"threads": threads}]

    def export(self, onnx_path: Path, inputs: Arrays, workdir: Path) -> list[Path]:
        """Convert ``onnx_path`` to this runtime's files in ``workdir``; the first is the main."""
        raise NotImplementedError

    def export_torch(self, model: Any, inputs: tuple[Any, ...], workdir: Path) -> list[Path]:
        """For a backend that consumes the PyTorch model (``consumes = "torch"``)."""
        raise NotImplementedError

    def export_int8(
        self, onnx_path: Path, inputs: Arrays, calib: list[Arrays], workdir: Path
    ) -> list[Path]:
        """The runtime's own int8 model from the float ``onnx_path``, calibrated on ``calib``
        (batches of inputs at the example's batch size); for a ``native_int8`` backend."""
        raise NotImplementedError

    def export_torch_int8(
        self, model: Any, inputs: tuple[Any, ...], calib: list[tuple[Any, ...]], workdir: Path
    ) -> list[Path]:
        """``export_int8`` for a backend that consumes the float PyTorch model."""
        raise NotImplementedError

    def int8_detail(self, files: list[Path]) -> str | None:
        """What the native int8 export did, when it chose (e.g. LiteRT's float fallback)."""
        return None

    def load(self, files: list[Path], inputs: Arrays, settings: dict[str, Any]) -> Runner:
        """Load the exported files with ``settings``."""
        raise NotImplementedError

    def version(self) -> str | None:
        from importlib.metadata import PackageNotFoundError
        from importlib.metadata import version as pkg_version

        try:
            return pkg_version(self.package)
        except PackageNotFoundError:
            return None


def require(backend: Backend) -> None:
    """Raise ``BackendUnavailable`` when ``backend`` cannot run here."""
    reason = backend.missing()
    if reason is not None:
        raise BackendUnavailable(f"backend {backend.name!r} cannot run: {reason}",
                                 fix=backend.install)  # fmt: skip


def onnx_ops(onnx_path: Path) -> list[str]:
    """The op types of an ONNX file, in graph order (to name a failing op from an error text)."""
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    return [n.op_type for n in model.graph.node]


# how runtimes spell some ONNX ops in their messages
_ALIASES = {"convolution": "Conv", "deconvolution": "ConvTranspose", "quantize": "QuantizeLinear",
            "dequantize": "DequantizeLinear", "matmul": "MatMul", "pooling": "MaxPool"}  # fmt: skip


def failing_op(text: str, ops: Sequence[str]) -> str | None:
    """The first of ``ops`` named as a whole word in a runtime's error ``text`` (or by the name
    the runtime gives it, e.g. MNN's "convolution" for Conv)."""
    present = list(dict.fromkeys(ops))
    for op in present:
        if re.search(rf"(?<![A-Za-z]){re.escape(op)}(?![a-z])", text):
            return op
    for alias, op in _ALIASES.items():
        if op in present and re.search(rf"\b{alias}\b", text, re.I):
            return op
    return None


@contextlib.contextmanager
def quiet_stdout(*fds: int) -> Iterator[None]:
    """Silence what a runtime's C++ code prints on file descriptor 1 (``--json`` output stays
    clean), or on ``fds`` (2 too: LiteRT announces its XNNPACK delegate on stderr)."""
    fds = fds or (1,)
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(fd) for fd in fds]
    try:
        with open(os.devnull, "w") as null:
            for fd in fds:
                os.dup2(null.fileno(), fd)
            yield
    finally:
        for fd, s in zip(fds, saved, strict=True):
            os.dup2(s, fd)
            os.close(s)


def failure(
    backend: Backend, stage: str, err: BaseException | str, onnx_path: Path
) -> BackendFailed:
    """A ``BackendFailed`` for ``stage`` (export / load / run) naming the op the runtime names."""
    text = err if isinstance(err, str) else f"{type(err).__name__}: {err}"
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip() and not
             ln.strip().endswith(":")]  # fmt: skip
    op = failing_op(text, onnx_ops(onnx_path)) if onnx_path.is_file() else None
    where = f" at op {op}" if op else ""
    first = next(
        (
            ln
            for pat in (r"error for|not supported|unsupported|invalid", r"what\(\)|error")
            for ln in lines
            if re.search(pat, ln, re.I)
        ),
        lines[0] if lines else "no message",
    )
    return BackendFailed(
        f"{backend.package} failed to {stage} the model{where}: {first[:300]}",
        fix=f"deploy with another backend (the others still run), or keep {op or 'that layer'} "
        "out of the compressed model; report it to the runtime if the op is valid",
        op=op,
    )


def static_onnx(onnx_path: Path, inputs: Arrays, dest: Path) -> Path:
    """``onnx_path`` with its inputs fixed to the shapes of ``inputs`` and the shape arithmetic
    folded away (ONNX Runtime's basic level: constant folding and redundant-node removal, standard
    ONNX ops only), for compilers that need static shapes (TVM's ``Slice`` of a ``Shape``)."""
    import onnx
    import onnxruntime as ort

    model = onnx.load(str(onnx_path))
    inits = {i.name for i in model.graph.initializer}
    graph_inputs = [i for i in model.graph.input if i.name not in inits]
    for i, x in zip(graph_inputs, inputs, strict=True):
        for d, v in zip(i.type.tensor_type.shape.dim, x.shape, strict=True):
            d.ClearField("dim_param")
            d.dim_value = int(v)
    for o in model.graph.output:  # re-inferred from the fixed inputs
        o.type.tensor_type.ClearField("shape")
    fixed = dest.with_name(dest.stem + ".fixed.onnx")
    onnx.save(model, str(fixed))
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    so.optimized_model_filepath = str(dest)
    so.log_severity_level = 3
    ort.InferenceSession(str(fixed), sess_options=so, providers=["CPUExecutionProvider"])
    fixed.unlink()
    return dest


def cpu_threads() -> int:
    """The cores this process may use."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)
