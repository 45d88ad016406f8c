"""TensorRT: runs only on an NVIDIA GPU. The ONNX file (fp32, or the QDQ int8 graph, which
TensorRT builds as explicit int8) is parsed by TensorRT's ONNX parser and built into a serialized
engine ``model.engine`` at the example's shapes; inputs and outputs travel as torch CUDA tensors.

Elsewhere ``missing()`` says why (no package, or no NVIDIA GPU) and ``deploy`` skips it.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np

from slimkit.export.backends.base import Arrays, Backend, Runner


def nvidia_gpu() -> str | None:
    """Why there is no usable NVIDIA GPU here, or None when there is one."""
    import torch

    if torch.cuda.is_available():
        return None
    if shutil.which("nvidia-smi") is None:
        return "no NVIDIA GPU on this machine (TensorRT runs on NVIDIA GPUs only)"
    return "an NVIDIA driver is present but this torch build has no CUDA (install a CUDA torch)"


class TensorRtBackend(Backend):
    name = "tensorrt"
    package = "tensorrt"
    module = "tensorrt"
    suffix = ".engine"
    fixed_batch = True

    def missing(self) -> str | None:
        return nvidia_gpu() or super().missing()

    def settings(self, threads: int) -> list[dict[str, Any]]:
        return [{"precision": "fp32"}]  # fixed when the engine is built

    def export(self, onnx_path: Path, inputs: Arrays, workdir: Path) -> list[Path]:
        import tensorrt as trt

        logger = trt.Logger(trt.Logger.WARNING)
        builder = trt.Builder(logger)
        network = builder.create_network(0)
        parser = trt.OnnxParser(network, logger)
        if not parser.parse(onnx_path.read_bytes()):
            errs = [str(parser.get_error(i)) for i in range(parser.num_errors)]
            raise RuntimeError("TensorRT's ONNX parser failed: " + "; ".join(errs))
        config = builder.create_builder_config()
        profile = builder.create_optimization_profile()
        for i, x in enumerate(inputs):
            name = network.get_input(i).name
            profile.set_shape(name, x.shape, x.shape, x.shape)
        config.add_optimization_profile(profile)
        engine = builder.build_serialized_network(network, config)
        if engine is None:
            raise RuntimeError("TensorRT could not build an engine for this network")
        dest = workdir / "model.engine"
        dest.write_bytes(bytes(engine))
        return [dest]

    def load(self, files: list[Path], inputs: Arrays, settings: dict[str, Any]) -> Runner:
        import tensorrt as trt
        import torch

        runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        engine = runtime.deserialize_cuda_engine(files[0].read_bytes())
        ctx = engine.create_execution_context()
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        in_names = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        out_names = [n for n in names if n not in in_names]
        stream = torch.cuda.current_stream()

        def bind(xs: Arrays) -> Any:
            dev = [torch.from_numpy(np.ascontiguousarray(x)).cuda() for x in xs]
            for n, t in zip(in_names, dev, strict=True):
                ctx.set_input_shape(n, tuple(t.shape))
                ctx.set_tensor_address(n, t.data_ptr())
            outs = []
            for n in out_names:
                dtype = np.dtype(trt.nptype(engine.get_tensor_dtype(n)))
                t = torch.empty(tuple(ctx.get_tensor_shape(n)), device="cuda",
                                dtype=getattr(torch, str(dtype)))  # fmt: skip
                ctx.set_tensor_address(n, t.data_ptr())
                outs.append(t)

            def call(_keep: list[Any] = dev) -> list[Any]:  # the inputs live as long as call
                ctx.execute_async_v3(stream.cuda_stream)
                stream.synchronize()
                return outs

            return call, dev

        def run(xs: Arrays) -> list[np.ndarray]:
            call, _keep = bind(xs)
            return [t.cpu().numpy() for t in call()]

        return Runner(run, lambda xs: bind(xs)[0])
