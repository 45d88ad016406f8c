"""Deployment backends (export.backends): each runtime's export and parity on the zoo's tiny
models when its package is installed (skipped with the reason otherwise), the auto choice, and how
a missing or failing backend is reported while the others still run."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from slimkit import zoo
from slimkit.errors import ConfigError
from slimkit.export import backends as B
from slimkit.export.backends.base import Backend, Runner, failing_op
from slimkit.export.backends.measure import _quantize
from slimkit.export.backends.tensorrt import nvidia_gpu

FAST: dict[str, Any] = {"runs": 5, "rounds": 1, "hw": None, "max_seconds": 5.0}


def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


needs = {
    name: pytest.mark.skipif(not _installed(mod), reason=f"{pkg} not installed: pip install {pkg}")
    for name, mod, pkg in [("openvino", "openvino", "openvino"), ("tvm", "tvm", "apache-tvm"),
                           ("mnn", "MNN", "mnn"), ("executorch", "executorch", "executorch")]
}  # fmt: skip


@pytest.fixture(scope="module")
def residual() -> tuple[torch.nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    return zoo.create_model("residual").eval(), zoo.example_inputs("residual", batch=2)[0]


@pytest.fixture(scope="module")
def residual_int8(residual: Any) -> Any:
    model, x = residual
    calib = [zoo.example_inputs("residual", batch=8)[0] for _ in range(2)]
    q = _quantize(model, calib, (x,))  # the int8 model deploy builds
    return model, q, x


def test_ort_reference_tunes_settings_and_writes_artifact(residual: Any, tmp_path: Path) -> None:
    model, x = residual
    state = {k: v.clone() for k, v in model.state_dict().items()}
    rep = B.deploy(model, (x,), backend="ort", out=tmp_path, **FAST)
    r = rep.result("ort")
    assert r.status == "ok" and rep.chosen == "ort" and rep.format == "fp32"
    assert r.sqnr_db is not None and r.sqnr_db > 100  # float ORT vs PyTorch: 145.7 dB measured
    tried = [t["settings"] for t in r.tuning]
    assert {s["optimization"] for s in tried} >= {"all", "extended"}
    assert {s["execution_mode"] for s in tried} == {"sequential", "parallel"}
    assert r.settings in tried and r.latency_ms is not None and r.latency_ms > 0
    saved = json.loads((tmp_path / "deploy.json").read_text())
    assert saved["chosen"] == "ort" and (tmp_path / "model.onnx").is_file()
    assert saved["results"][0]["settings"] == r.settings
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())  # input untouched


@needs["openvino"]
def test_openvino_fp32_and_int8_parity(residual: Any, residual_int8: Any) -> None:
    model, x = residual
    rep = B.deploy(model, (x,), backend="openvino", tune=False, **FAST)
    r = rep.result("openvino")
    assert r.status == "ok" and r.settings is not None and r.settings["precision"] == "f32"
    assert r.sqnr_db is not None and r.sqnr_db > 100  # 147.5 dB measured (f32 precision hint)
    _, q, _ = residual_int8
    rep8 = B.deploy(q, (x,), backend=["ort", "openvino"], tune=False, **FAST)
    assert rep8.format == "int8"
    for name in ("ort", "openvino"):  # the QDQ graph against slimkit's simulation
        res = rep8.result(name)
        assert res.status == "ok" and res.sqnr_db is not None
        assert res.sqnr_db > 40, name  # ORT 147.9 dB, OpenVINO 59.3 dB measured


@needs["openvino"]
def test_openvino_bf16_is_kept_only_with_parity(residual: Any) -> None:
    model, x = residual
    be = B.get_backend("openvino")
    if not any(s["precision"] == "bf16" for s in be.settings(2)):
        pytest.skip("this CPU has no bf16: OpenVINO offers f32 only")
    rep = B.deploy(model, (x,), backend="openvino", min_sqnr_db=100.0, **FAST)
    r = rep.result("openvino")
    bf16 = [t for t in r.tuning if t["settings"]["precision"] == "bf16"]
    assert bf16 and bf16[0]["parity"] is False and bf16[0]["sqnr_db"] < 100  # 58.8 dB measured
    assert r.settings is not None and r.settings["precision"] == "f32"


@needs["tvm"]
def test_tvm_fp32_parity_and_library(residual: Any, tmp_path: Path) -> None:
    import os

    model, x = residual
    cores = os.sched_getaffinity(0)
    rep = B.deploy(model, (x,), backend="tvm", out=tmp_path, tune=False, **FAST)
    r = rep.result("tvm")
    assert r.status == "ok", r.reason
    assert r.sqnr_db is not None and r.sqnr_db > 100  # 146.1 dB measured
    assert r.files == ["model.so"] and (tmp_path / "model.so").stat().st_size > 1000
    # TVM's thread pool pins its caller to one core unless told not to: the rest of the process
    # (PyTorch, ONNX Runtime) would then run on one core, slower and with other float sums
    assert os.sched_getaffinity(0) == cores


@needs["mnn"]
def test_mnn_fp32_parity_and_int8_reported(residual: Any, residual_int8: Any) -> None:
    model, x = residual
    rep = B.deploy(model, (x,), backend="mnn", tune=False, **FAST)
    r = rep.result("mnn")
    assert r.status == "ok", r.reason
    assert r.sqnr_db is not None and r.sqnr_db > 100  # 143.1 dB measured
    _, q, _ = residual_int8
    rep8 = B.deploy(q, (x,), backend=["mnn", "ort"], tune=False, **FAST)
    r8 = rep8.result("mnn")
    # MNN 3.6's converter aborts on slimkit's QDQ graph: reported with the op it names; ORT runs
    if r8.status == "failed":
        assert r8.reason is not None and "mnn" in r8.reason and r8.op is not None
    else:
        assert r8.sqnr_db is not None and r8.sqnr_db > 25
    assert rep8.result("ort").status == "ok" and rep8.chosen is not None


@needs["executorch"]
def test_executorch_xnnpack_fp32_parity(residual: Any) -> None:
    model, x = residual
    rep = B.deploy(model, (x,), backend="executorch", tune=False, **FAST)
    r = rep.result("executorch")
    assert r.status == "ok", r.reason
    assert r.sqnr_db is not None and r.sqnr_db > 100  # 140.8 dB measured
    assert r.files == ["model.pte"]


class _Noisy(Backend):
    """Fast, but wrong: its output is noise (the auto choice must not take it)."""

    name, package, module = "noisy", "onnxruntime", "onnxruntime"

    def export(self, onnx_path: Path, inputs: Any, workdir: Path) -> list[Path]:
        (workdir / "m.bin").write_bytes(b"0")
        return [workdir / "m.bin"]

    def load(self, files: list[Path], inputs: Any, settings: dict[str, Any]) -> Runner:
        return Runner(lambda xs: [np.random.default_rng(0).normal(size=(xs[0].shape[0], 10))])


class _Broken(Backend):
    name, package, module = "broken", "onnxruntime", "onnxruntime"

    def export(self, onnx_path: Path, inputs: Any, workdir: Path) -> list[Path]:
        raise RuntimeError("[ERROR] node /features.0/Relu: Relu is not supported")


def test_auto_skips_wrong_failing_and_missing_backends(
    residual: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    model, x = residual
    monkeypatch.setitem(B.BACKENDS, "noisy", _Noisy)
    monkeypatch.setitem(B.BACKENDS, "broken", _Broken)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda n, *a: None if n == "openvino" else real(n, *a))  # fmt: skip
    rep = B.deploy(model, (x,), backend=["noisy", "broken", "openvino", "ort"], tune=False, **FAST)
    noisy, broken, ov = rep.result("noisy"), rep.result("broken"), rep.result("openvino")
    assert noisy.status == "parity" and noisy.sqnr_db is not None and noisy.sqnr_db < 40
    assert broken.status == "failed" and broken.op == "Relu" and "Relu" in (broken.reason or "")
    assert ov.status == "missing" and "pip install openvino" in (ov.reason or "")
    assert rep.chosen == "ort" and rep.result("ort").status == "ok"


def test_tensorrt_without_gpu_is_skipped_by_name(residual: Any) -> None:
    model, x = residual
    rep = B.deploy(model, (x,), backend=["tensorrt", "ort"], tune=False, **FAST)
    r = rep.result("tensorrt")
    reason = nvidia_gpu()
    if reason is None and _installed("tensorrt"):  # a GPU machine: TensorRT must match PyTorch
        assert r.status == "ok" and r.sqnr_db is not None and r.sqnr_db > 40
    else:
        assert r.status == "missing" and r.reason is not None
        assert ("NVIDIA" in r.reason) if reason else ("pip install tensorrt" in r.reason)
    assert rep.chosen == "ort"


def test_tensorrt_build_path_up_to_the_gpu(
    residual: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """TensorRT's engine build on a stand-in module (no GPU here): the ONNX parse, the input
    shapes of the optimization profile, the engine file, and a parser error named."""
    import types

    model, x = residual
    onnx_path = tmp_path / "m.onnx"
    torch.onnx.export(model, (x,), str(onnx_path), dynamo=False, input_names=["input"])
    seen: dict[str, Any] = {}

    class Parser:
        ok = True
        num_errors = 1

        def __init__(self, network: Any, logger: Any) -> None:
            pass

        def parse(self, data: bytes) -> bool:
            seen["parsed"] = data[:4]
            return Parser.ok

        def get_error(self, i: int) -> str:
            return "Unsupported ONNX op: Relu"

    class Profile:
        def set_shape(self, name: str, *shapes: Any) -> None:
            seen[name] = shapes

    network = types.SimpleNamespace(get_input=lambda i: types.SimpleNamespace(name="input"))
    builder = types.SimpleNamespace(
        create_network=lambda flags: network,
        create_builder_config=lambda: types.SimpleNamespace(
            add_optimization_profile=lambda p: None
        ),
        create_optimization_profile=Profile,
        build_serialized_network=lambda net, cfg: b"engine",  # the GPU call
    )

    class Logger:
        WARNING = 2

        def __init__(self, level: int) -> None:
            pass

    trt = types.SimpleNamespace(Logger=Logger, Builder=lambda logger: builder, OnnxParser=Parser)
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    be = B.get_backend("tensorrt")
    files = be.export(onnx_path, [x.numpy()], tmp_path)
    assert files[0].read_bytes() == b"engine" and seen["parsed"] == onnx_path.read_bytes()[:4]
    assert seen["input"] == (tuple(x.shape),) * 3  # min = opt = max: the example's shape
    Parser.ok = False
    with pytest.raises(RuntimeError, match="Unsupported ONNX op: Relu"):
        be.export(onnx_path, [x.numpy()], tmp_path)


def test_unknown_backend_and_failing_op_names() -> None:
    with pytest.raises(ConfigError, match="openvino"):
        B.get_backend("openvno")
    assert failing_op("Error for compute convolution shape", ["QuantizeLinear", "Conv"]) == "Conv"
    assert failing_op("MatMul: bad shape", ["Conv", "MatMul"]) == "MatMul"
    assert failing_op("nothing here", ["Conv"]) is None


@pytest.mark.slow
def test_cli_deploy_json(tmp_path: Path) -> None:
    """In a real process: runtimes that print from C++ (MNN) must not spoil --json on stdout."""
    import subprocess

    names = "ort,mnn" if _installed("MNN") else "ort"
    cmd = ["deploy", "zoo:cnn_bn", "--backend", names, "--out", str(tmp_path), "--json", "--hw",
           "none", "--runs", "5", "--rounds", "1", "--no-tune"]  # fmt: skip
    res = subprocess.run([sys.executable, "-c", "from slimkit.cli import main; main()", *cmd],
                         capture_output=True, text=True, timeout=240)  # fmt: skip
    assert res.returncode == 0, res.stderr[-2000:]
    data = json.loads(res.stdout)
    assert data["chosen"] in names.split(",") and data["results"][0]["sqnr_db"] > 100
    assert (tmp_path / "deploy.json").is_file() and (tmp_path / "model.onnx").is_file()
