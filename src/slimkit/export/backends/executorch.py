"""ExecuTorch with the XNNPACK delegate: the PyTorch model itself (not the ONNX file) captured by
``torch.export``, lowered with XNNPACK's partitioner (what it does not take runs on ExecuTorch's
portable kernels) and saved as ``model.pte``.

A slimkit int8 model exports as its simulation (the fake-quant ops run in float): XNNPACK's own
int8 path needs its PT2E quantizer, which slimkit does not drive. Tuned settings: threads of
ExecuTorch's thread pool.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from slimkit.export.backends.base import Arrays, Backend, Runner


class ExecuTorchBackend(Backend):
    name = "executorch"
    package = "executorch"
    module = "executorch"
    suffix = ".pte"
    consumes = "torch"

    def settings(self, threads: int) -> list[dict[str, Any]]:
        grid: list[dict[str, Any]] = [{"threads": threads}]
        if threads > 1:
            grid.append({"threads": 1})
        return grid

    def export_torch(
        self, model: torch.nn.Module, inputs: tuple[torch.Tensor, ...], workdir: Path
    ) -> list[Path]:
        from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
        from executorch.exir import to_edge_transform_and_lower

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                program = torch.export.export(model, inputs)
            except Exception as e:  # noqa: BLE001 - named in one line, not torch's page of text
                first = (str(e).strip().splitlines() or [""])[0][:200]
                raise RuntimeError(f"torch.export could not capture the model "
                                   f"({type(e).__name__}): {first}") from None  # fmt: skip
            lowered = to_edge_transform_and_lower(program, partitioner=[XnnpackPartitioner()])
            buffer = lowered.to_executorch().buffer
        dest = workdir / "model.pte"
        dest.write_bytes(buffer)
        return [dest]

    def load(self, files: list[Path], inputs: Arrays, settings: dict[str, Any]) -> Runner:
        from executorch.extension.pybindings import portable_lib
        from executorch.runtime import Runtime

        portable_lib._unsafe_reset_threadpool(int(settings.get("threads", 2)))
        method = Runtime.get().load_program(str(files[0])).load_method("forward")

        def to_torch(xs: Arrays) -> list[torch.Tensor]:
            return [torch.from_numpy(x) for x in xs]

        def bind(xs: Arrays) -> Callable[[], Any]:
            ts = to_torch(xs)
            return lambda: method.execute(ts)

        return Runner(lambda xs: [o.detach().numpy() for o in method.execute(to_torch(xs))], bind)
