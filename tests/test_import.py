"""`import slimkit` is cheap: no onnxruntime / matplotlib / optuna / transformers, under 1.5 s."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

import slimkit


def test_import_is_light_and_fast() -> None:
    code = (
        "import sys, time, json; t = time.perf_counter(); import slimkit; "
        "dt = time.perf_counter() - t; "
        "print(json.dumps({'dt': dt, 'mods': [m for m in ('onnxruntime', 'matplotlib', 'optuna', "
        "'transformers', 'onnx', 'torch') if m in sys.modules]}))"
    )
    best = None
    for _ in range(3):  # the first run may pay for a cold disk cache
        out = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, check=True
        )
        res = json.loads(out.stdout)
        best = res if best is None or res["dt"] < best["dt"] else best
    assert best is not None
    assert not {"onnxruntime", "matplotlib", "optuna", "transformers", "onnx"} & set(best["mods"])
    assert best["dt"] < 1.5, f"import slimkit took {best['dt']:.2f} s"


def test_lazy_public_names() -> None:
    assert callable(slimkit.export_onnx) and callable(slimkit.measure_latency)
    assert slimkit.Scope.__name__ == "Scope"
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        _ = slimkit.nope  # type: ignore[attr-defined]


def test_verb_packages_stay_callable_after_their_submodules_load() -> None:
    import slimkit.analyze.latency  # noqa: F401 - binds the package to slimkit.analyze
    import slimkit.prune.depgraph  # noqa: F401
    from slimkit.zoo import create_model, example_inputs

    model = create_model("cnn_bn")
    x = example_inputs("cnn_bn", batch=2)
    small = slimkit.prune(model, slimkit.prune.Channel(ratio=0.5), example_inputs=x)
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in model.parameters())
    assert type(slimkit.analyze(model, x, hw="xeon_8380")).__name__ == "AnalysisReport"
    assert slimkit.quant.PTQ().calibration == "mse"
