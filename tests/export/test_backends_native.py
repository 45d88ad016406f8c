"""LiteRT (TFLite) and the runtimes' own int8 quantizers (LiteRT full-integer, ExecuTorch's XNNPACK
PT2E, MNN weight quantization): each exported on the zoo's tiny models and checked numerically when
its package is installed (skipped with the install command otherwise); the parity bound of a
native int8 and the calibration batches it gets, on a stand-in runtime."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from slimkit import zoo
from slimkit.export import backends as B
from slimkit.export.backends.base import Backend, Runner
from slimkit.export.backends.litert import LiteRtBackend
from slimkit.export.backends.measure import MIN_SQNR_INT8, NATIVE_MARGIN_DB
from slimkit.testing.numerics import sqnr

FAST: dict[str, Any] = {"runs": 5, "rounds": 1, "hw": None, "max_seconds": 5.0, "tune": False}

_litert_missing = LiteRtBackend().missing()
needs_litert = pytest.mark.skipif(_litert_missing is not None, reason=str(_litert_missing))
needs = {
    name: pytest.mark.skipif(
        importlib.util.find_spec(mod) is None, reason=f"{pkg} not installed: pip install {pkg}"
    )  # fmt: skip
    for name, mod, pkg in [("mnn", "MNN", "mnn"), ("executorch", "executorch", "executorch")]
}


@pytest.fixture(scope="module")
def residual() -> tuple[torch.nn.Module, torch.Tensor, list[torch.Tensor]]:
    torch.manual_seed(0)
    model = zoo.create_model("residual").eval()
    calib = [zoo.example_inputs("residual", batch=8)[0] for _ in range(2)]
    return model, zoo.example_inputs("residual", batch=2)[0], calib


def _int8(model: torch.nn.Module, x: torch.Tensor, calib: Any, names: list[str]) -> Any:
    return B.deploy(model, (x,), backend=["ort", *names], int8=True, data=calib, **FAST)


@needs_litert
def test_litert_fp32_and_full_integer_int8(residual: Any, tmp_path: Path) -> None:
    model, x, calib = residual
    rep = B.deploy(model, (x,), backend="litert", out=tmp_path, **FAST)
    r = rep.result("litert")
    assert r.status == "ok", r.reason
    assert r.sqnr_db is not None and r.sqnr_db > 100  # 140.8 dB measured (NCHW input as is)
    assert r.files == ["model.tflite", "layout.json"] and (tmp_path / "model.tflite").is_file()
    rep8 = _int8(model, x, calib, ["litert"])
    q = rep8.result("litert")
    assert q.status == "ok", q.reason
    # the converter kept every op in int8 (TFLITE_BUILTINS_INT8 only, no float fallback)
    assert q.quantizer is not None and q.quantizer.endswith(": full integer")
    # its own quantization, checked against the float model: 47.2 dB measured (slimkit's 53.7)
    assert q.sqnr_db is not None and q.sqnr_db == q.sqnr_float_db and q.sqnr_db > 40
    assert rep8.native_min_sqnr_db == MIN_SQNR_INT8
    # 12.9 vs 24.8 kB measured (the weights are a quarter; the file's fixed part is not)
    assert q.size_mb is not None and r.size_mb is not None and q.size_mb < 0.6 * r.size_mb
    assert "tensorflow" not in sys.modules  # converted in a child process


@needs_litert
def test_litert_channels_last_output_mapped_back(tmp_path: Path) -> None:
    """A convolution's 4-d output comes back from onnx2tf channels-last: the runner returns it in
    the ONNX layout, so it compares element by element."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.ReLU()).eval()
    x = torch.randn(1, 3, 6, 5)
    be = B.get_backend("litert")
    onnx_path = tmp_path / "m.onnx"
    torch.onnx.export(model, (x,), str(onnx_path), dynamo=False, input_names=["input"])
    files = be.export(onnx_path, [x.numpy()], tmp_path)
    layout = __import__("json").loads(files[1].read_text())
    assert layout["inputs"][0][1] is None  # the input stays NCHW
    assert layout["outputs"][0][1] == [0, 3, 1, 2]  # NHWC -> NCHW
    (out,) = be.load(files, [x.numpy()], {"threads": 1}).run([x.numpy()])
    assert out.shape == (1, 4, 6, 5)
    assert sqnr([model(x).detach().numpy()], [out]) > 100


def test_litert_missing_names_the_install_command(
    residual: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    model, x, _ = residual
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda n, *a: None if n == "onnx2tf" else real(n, *a))  # fmt: skip
    rep = B.deploy(model, (x,), backend=["litert", "ort"], **FAST)
    r = rep.result("litert")
    assert r.status == "missing" and r.reason is not None
    # the first package of the stack that is missing is named (ai-edge-litert where nothing of
    # it is installed, as in CI), with the install command
    named = [pkg for pkg in ("ai-edge-litert", "onnx2tf") if pkg in r.reason]
    assert named and "is not installed" in r.reason and "slimkit[litert]" in r.reason
    assert rep.chosen == "ort"


def test_importing_slimkit_does_not_import_tensorflow() -> None:
    code = ("import sys, slimkit, slimkit.export.backends as b; b.available_backends(); "
            "sys.exit('tensorflow' in sys.modules)")  # fmt: skip
    assert subprocess.run([sys.executable, "-c", code], timeout=120).returncode == 0


@needs["executorch"]
def test_executorch_xnnpack_pt2e_int8(residual: Any) -> None:
    model, x, calib = residual
    rep = _int8(model, x, calib, ["executorch"])
    r = rep.result("executorch")
    assert r.status == "ok", r.reason
    assert r.quantizer is not None and "PT2E" in r.quantizer
    assert r.sqnr_db is not None and r.sqnr_db > 38  # 44.2 dB measured against the float model


@needs["mnn"]
def test_mnn_int8_offline_quantization(residual: Any) -> None:
    model, x, calib = residual
    fp32 = B.deploy(model, (x,), backend="mnn", **FAST).result("mnn")
    rep = _int8(model, x, calib, ["mnn"])
    r = rep.result("mnn")
    assert r.status == "ok", r.reason
    assert r.quantizer is not None and "int8 weights and activations (8 samples)" in r.quantizer
    assert r.sqnr_db is not None and r.sqnr_db > 32  # 37.2 dB measured against the float model
    # 13.3 vs 25.2 kB measured (the file's fixed part stays)
    assert r.size_mb is not None and fp32.size_mb is not None and r.size_mb < 0.6 * fp32.size_mb


@needs["mnn"]
def test_mnn_int8_falls_back_to_weight_quantization(
    residual: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where MNN's quantization tool fails, the int8 weights of its converter, with the reason."""
    from slimkit.export.backends import mnn

    model, x, calib = residual
    monkeypatch.setattr(mnn, "_QUANT", "import sys; print('no calibration for you'); sys.exit(3)")
    r = _int8(model, x, calib, ["mnn"]).result("mnn")
    assert r.status == "ok", r.reason
    assert r.quantizer is not None and "int8 weights only" in r.quantizer
    assert "no calibration for you" in r.quantizer
    assert r.sqnr_db is not None and r.sqnr_db > 45  # 57.0 dB measured (weights only)


class _Native(Backend):
    """A stand-in runtime with its own int8: the float ONNX in ORT plus noise at ``DB`` dB."""

    name, package, module, native_int8 = "native", "onnxruntime", "onnxruntime", "stand-in"
    DB = 30.0
    seen: list[list[tuple[int, ...]]] = []

    def export_int8(self, onnx_path: Path, inputs: Any, calib: Any, workdir: Path) -> list[Path]:
        _Native.seen = [[np.shape(t) for t in b] for b in calib]
        return [onnx_path]

    def load(self, files: list[Path], inputs: Any, settings: dict[str, Any]) -> Runner:
        ort = B.get_backend("ort").load(files, inputs, {"threads": 1})

        def run(xs: Any) -> list[np.ndarray]:
            (y,) = ort.run(xs)
            noise = np.random.default_rng(0).normal(size=y.shape)
            noise *= np.sqrt(np.mean(y**2) / np.mean(noise**2) / 10 ** (_Native.DB / 10))
            return [y + noise]

        return Runner(run)


def test_native_int8_is_checked_against_the_float_model(
    residual: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    model, x, calib = residual
    monkeypatch.setitem(B.BACKENDS, "native", _Native)
    rep = B.deploy(model, (x,), backend=["native"], int8=True, data=calib, **FAST)
    r = rep.result("native")
    # 2 batches of 8 re-cut to the example's batch of 2
    assert _Native.seen == [[(2, 3, 16, 16)]] * 8
    assert r.status == "ok" and r.quantizer == "stand-in"
    assert r.sqnr_db is not None and abs(r.sqnr_db - 30.0) < 1.0  # against the float model
    _Native.DB = 20.0
    try:
        rep = B.deploy(model, (x,), backend=["native"], int8=True, data=calib, **FAST)
    finally:
        _Native.DB = 30.0
    r = rep.result("native")
    assert r.status == "parity" and "against the float model" in (r.reason or "")
    bound = rep.native_min_sqnr_db
    assert bound is not None and bound <= MIN_SQNR_INT8
    # the bound: 25 dB, or slimkit's own int8 SQNR against the float model less the margin
    sim = sqnr([model(x).detach().numpy()], [rep_ref(model, x, calib)])
    assert bound == pytest.approx(min(MIN_SQNR_INT8, sim - NATIVE_MARGIN_DB), abs=0.5)


def rep_ref(model: torch.nn.Module, x: torch.Tensor, calib: Any) -> np.ndarray:
    """slimkit's int8 simulation of ``model`` as deploy builds it."""
    from slimkit.export.backends.measure import _quantize

    with torch.no_grad():
        return _quantize(model, calib, (x,))(x).numpy()


def test_native_calibration_is_recut_and_capped() -> None:
    """Batches of any size are re-cut to the example's batch, and at most NATIVE_MAX_BATCHES go
    to a runtime's quantizer (MNN writes each as a text file)."""
    from slimkit.export.backends.measure import NATIVE_MAX_BATCHES, _calibration

    x = torch.randn(1, 3, 4, 4)
    data = [torch.randn(32, 3, 4, 4) for _ in range(32)]  # 1024 samples
    cut = _calibration(data, (x,))
    assert len(cut) == NATIVE_MAX_BATCHES and all(b[0].shape == (1, 3, 4, 4) for b in cut)
    assert torch.equal(cut[1][0][0], data[0][1])  # in order
    assert len(_calibration(None, (x,))) == 1  # no data: the example itself
