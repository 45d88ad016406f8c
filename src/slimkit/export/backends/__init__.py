"""Deployment backends: one small interface (export, load, run, time, parity) over the runtimes
users ship on. ONNX Runtime is the reference and the only required one; the others are optional
extras, each reported by name with its install command when absent::

    from slimkit.export.backends import deploy
    rep = deploy(model, (x,), backend="auto", out="deployed/")   # the fastest whose parity holds
    print(rep.chosen)

``slimkit deploy MODEL --backend ...`` and ``sk.deploy`` call ``deploy``.
"""

from __future__ import annotations

from typing import Any

from slimkit.export.backends.base import (
    Backend,
    BackendFailed,
    BackendUnavailable,
    Runner,
    cpu_threads,
    require,
)
from slimkit.export.backends.executorch import ExecuTorchBackend
from slimkit.export.backends.litert import LiteRtBackend
from slimkit.export.backends.measure import BackendResult, DeployReport, check_backend_name, deploy
from slimkit.export.backends.mnn import MnnBackend
from slimkit.export.backends.openvino import OpenVinoBackend
from slimkit.export.backends.ort import OrtBackend
from slimkit.export.backends.tensorrt import TensorRtBackend
from slimkit.export.backends.tvm import TvmBackend

# --backend names, in the order deploy tries them; ort first (the reference)
BACKENDS: dict[str, type[Backend]] = {
    b.name: b
    for b in (
        OrtBackend,
        OpenVinoBackend,
        TvmBackend,
        MnnBackend,
        LiteRtBackend,
        ExecuTorchBackend,
        TensorRtBackend,
    )  # fmt: skip
}


def get_backend(name: str, **options: Any) -> Backend:
    """The backend registered as ``name`` (``ConfigError`` with a did-you-mean otherwise);
    ``options`` go to its constructor (``tune_trials`` for tvm)."""
    check_backend_name(name, list(BACKENDS))
    return BACKENDS[name](**options)


def available_backends() -> dict[str, str | None]:
    """Every backend name -> None when it can run here, else the reason (with the fix)."""
    return {name: cls().missing() for name, cls in BACKENDS.items()}


__all__ = [
    "BACKENDS",
    "Backend",
    "BackendFailed",
    "BackendResult",
    "BackendUnavailable",
    "DeployReport",
    "Runner",
    "available_backends",
    "cpu_threads",
    "deploy",
    "get_backend",
    "require",
]
