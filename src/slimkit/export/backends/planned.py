"""Backends named by ``slimkit deploy`` but not converted by slimkit yet: LiteRT (TFLite). Its
converter (``litert-torch``) needs TensorFlow; until it is wired in, ``deploy`` reports it as
unavailable with the reason instead of failing."""

from __future__ import annotations

from slimkit.export.backends.base import Backend


class _Planned(Backend):
    def missing(self) -> str | None:
        return (f"slimkit does not convert to {self.package} yet; deploy to ort, openvino, "
                "tvm, mnn or executorch")  # fmt: skip


class LiteRtBackend(_Planned):
    name = "litert"
    package = "litert-torch"
    module = "litert_torch"
    suffix = ".tflite"
