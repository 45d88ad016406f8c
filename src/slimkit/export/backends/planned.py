"""Backends named by ``slimkit deploy`` but not converted by slimkit yet: LiteRT (TFLite) and
ExecuTorch. They consume a PyTorch program rather than ONNX; until their converters are wired in,
``deploy`` reports them as unavailable with the reason instead of failing."""

from __future__ import annotations

from slimkit.export.backends.base import Backend


class _Planned(Backend):
    def missing(self) -> str | None:
        return (f"slimkit does not convert to {self.package} yet (it consumes a PyTorch "
                "program, not ONNX); deploy to ort, openvino, tvm or mnn")  # fmt: skip


class LiteRtBackend(_Planned):
    name = "litert"
    package = "litert-torch"
    module = "litert_torch"
    suffix = ".tflite"


class ExecuTorchBackend(_Planned):
    name = "executorch"
    package = "executorch"
    module = "executorch"
    suffix = ".pte"
