"""ExecuTorch with the XNNPACK delegate: the PyTorch model itself (not the ONNX file) captured by
``torch.export``, lowered with XNNPACK's partitioner (what it does not take runs on ExecuTorch's
portable kernels) and saved as ``model.pte``.

int8 (``native_int8``): XNNPACK's own path, the float model captured by ``torch.export``,
annotated by ``XNNPACKQuantizer`` (symmetric int8, weights per channel), observed on the
calibration batches (``prepare_pt2e``), converted (``convert_pt2e``) and lowered to XNNPACK's int8
kernels. An already-quantized slimkit model exports as its simulation (the fake-quant ops run in
float), which ``torch.export`` cannot capture today (reported as failed). Tuned settings: threads of
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
    native_int8 = "XNNPACK PT2E (XNNPACKQuantizer, symmetric int8, per-channel weights)"

    def settings(self, threads: int) -> list[dict[str, Any]]:
        grid: list[dict[str, Any]] = [{"threads": threads}]
        if threads > 1:
            grid.append({"threads": 1})
        return grid

    def export_torch(
        self, model: torch.nn.Module, inputs: tuple[torch.Tensor, ...], workdir: Path
    ) -> list[Path]:
        return self._lower(model, inputs, None, workdir)

    def export_torch_int8(
        self, model: torch.nn.Module, inputs: tuple[torch.Tensor, ...],
        calib: list[tuple[torch.Tensor, ...]], workdir: Path,
    ) -> list[Path]:  # fmt: skip
        return self._lower(model, inputs, calib, workdir)

    def _lower(
        self, model: torch.nn.Module, inputs: tuple[torch.Tensor, ...],
        calib: list[tuple[torch.Tensor, ...]] | None, workdir: Path,
    ) -> list[Path]:  # fmt: skip
        from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
        from executorch.exir import to_edge_transform_and_lower

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = _capture(model, inputs)
            if calib is not None:
                program = _capture(_pt2e_int8(program.module(), calib), inputs)
            lowered = to_edge_transform_and_lower(program, partitioner=[XnnpackPartitioner()])
            buffer = lowered.to_executorch().buffer
        dest = workdir / "model.pte"
        dest.write_bytes(buffer)
        return [dest]

    def load(self, files: list[Path], inputs: Arrays, settings: dict[str, Any]) -> Runner:
        threads = int(settings.get("threads", 2))
        loaded: list[Any] = []

        def method() -> Any:
            # ExecuTorch's thread pool is one for the process, and a loaded method keeps the pool
            # it was loaded with: after another runner resized the pool (the tuning tries 1 and
            # all cores), running the old method hangs, so it is loaded again at its size
            if _POOL.get("threads") != threads or not loaded:
                loaded[:] = [_load(files[0], threads)]
            return loaded[0]

        def to_torch(xs: Arrays) -> list[torch.Tensor]:
            return [torch.from_numpy(x) for x in xs]

        def bind(xs: Arrays) -> Callable[[], Any]:
            ts, m = to_torch(xs), method()
            return lambda: m.execute(ts)

        return Runner(lambda xs: [o.detach().numpy() for o in method().execute(to_torch(xs))], bind)


_POOL: dict[str, int] = {}  # the size ExecuTorch's thread pool was last set to


def _load(path: Path, threads: int) -> Any:
    from executorch.extension.pybindings import portable_lib
    from executorch.runtime import Runtime

    if _POOL.get("threads") != threads:
        portable_lib._unsafe_reset_threadpool(threads)
        _POOL["threads"] = threads
    return Runtime.get().load_program(str(path)).load_method("forward")


def _capture(model: torch.nn.Module, inputs: tuple[torch.Tensor, ...]) -> Any:
    try:
        return torch.export.export(model, inputs)
    except Exception as e:  # noqa: BLE001 - named in one line, not torch's page of text
        first = (str(e).strip().splitlines() or [""])[0][:200]
        raise RuntimeError(f"torch.export could not capture the model "
                           f"({type(e).__name__}): {first}") from None  # fmt: skip


def _pt2e_int8(graph: torch.nn.Module, calib: list[tuple[torch.Tensor, ...]]) -> torch.nn.Module:
    """XNNPACK's int8 annotation of a captured graph, observed on ``calib``, converted."""
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (
        XNNPACKQuantizer,
        get_symmetric_quantization_config,
    )
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    quantizer = XNNPACKQuantizer().set_global(
        get_symmetric_quantization_config(is_per_channel=True)
    )
    prepared = prepare_pt2e(graph, quantizer)  # type: ignore[arg-type]
    with torch.no_grad():
        for batch in calib:
            prepared(*batch)
    return convert_pt2e(prepared)
