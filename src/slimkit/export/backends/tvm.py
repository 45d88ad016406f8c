"""Apache TVM (Relax): the ONNX file imported by TVM's ONNX frontend, compiled for this CPU
(LLVM, ``mcpu`` of the host) at the example's input shapes, saved as a shared library
``model.so``. With ``tune_trials`` > 0 TVM's MetaSchedule auto-tunes the kernels for that many
trials in total. Experimental: on a loaded 2-core machine 8 trials of a 3-layer MLP did not finish
in 400 s, and with apache-tvm-ffi 0.1.15 the tuner crashed (``ToJSONGraph``); untuned, TVM runs
convolutions far slower than the other runtimes.

Tuned settings: threads of TVM's thread pool. TVM would pin the calling thread to one core when
its pool starts (``TVM_BIND_THREADS``); that would leave PyTorch, ONNX Runtime and everything else
in the process on one core afterwards, so binding is turned off and the process's CPU affinity is
restored around every TVM call that can start the pool.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from slimkit.export.backends.base import Arrays, Backend, Runner, static_onnx


@contextlib.contextmanager
def _keep_affinity() -> Iterator[None]:
    """Run TVM without letting it pin this process to one core."""
    os.environ["TVM_BIND_THREADS"] = "0"
    saved = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
    try:
        yield
    finally:
        if saved is not None and os.sched_getaffinity(0) != saved:
            os.sched_setaffinity(0, saved)


class TvmBackend(Backend):
    name = "tvm"
    package = "apache-tvm"
    module = "tvm"
    suffix = ".so"
    fixed_batch = True

    def __init__(self, tune_trials: int = 0) -> None:
        self.tune_trials = tune_trials

    def settings(self, threads: int) -> list[dict[str, Any]]:
        grid: list[dict[str, Any]] = [{"threads": threads}]
        if threads > 1:
            grid.append({"threads": 1})
        return grid

    def _target(self) -> Any:
        import tvm

        cpu = tvm.get_global_func("tvm.codegen.llvm.GetHostCPUName", allow_missing=True)
        return tvm.target.Target({"kind": "llvm", "mcpu": cpu() if cpu else "generic",
                                  "num-cores": 1})  # fmt: skip

    def export(self, onnx_path: Path, inputs: Arrays, workdir: Path) -> list[Path]:
        import onnx
        import tvm
        from tvm import relax
        from tvm.relax.frontend.onnx import from_onnx

        # static shapes, shape arithmetic folded: TVM's Slice needs a known rank
        model = onnx.load(str(static_onnx(onnx_path, inputs, workdir / "static.onnx")))
        inits = {i.name for i in model.graph.initializer}
        names = [i.name for i in model.graph.input if i.name not in inits]
        shapes = {n: list(x.shape) for n, x in zip(names, inputs, strict=True)}
        dtypes = {n: str(x.dtype) for n, x in zip(names, inputs, strict=True)}
        mod = from_onnx(model, shape_dict=shapes, dtype_dict=dtypes, keep_params_in_input=False)
        mod = relax.transform.DecomposeOpsForInference()(mod)
        target = self._target()
        with _keep_affinity():
            if self.tune_trials > 0:
                with target:
                    mod = relax.get_pipeline("static_shape_tuning", target=target,
                                             work_dir=str(workdir / "tuning"),
                                             total_trials=self.tune_trials)(mod)  # fmt: skip
            else:
                mod = relax.get_pipeline("zero")(mod)
            lib = tvm.compile(mod, target=target)
            dest = workdir / "model.so"
            lib.export_library(str(dest))
        return [dest]

    def load(self, files: list[Path], inputs: Arrays, settings: dict[str, Any]) -> Runner:
        import tvm
        from tvm import relax

        with _keep_affinity():
            tvm.get_global_func("runtime.config_threadpool")(0, int(settings.get("threads", 2)))
            vm = relax.VirtualMachine(tvm.runtime.load_module(str(files[0])), tvm.cpu())
            vm_main = vm["main"]

        def fn(*args: Any) -> Any:
            with _keep_affinity():  # the pool may (re)start on a call
                return vm_main(*args)

        def to_tvm(xs: Arrays) -> list[Any]:
            return [tvm.runtime.tensor(x) for x in xs]

        def outs(res: Any) -> list[Any]:
            return [res.numpy()] if hasattr(res, "numpy") else [r.numpy() for r in res]

        def bind(xs: Arrays) -> Callable[[], Any]:
            vs = to_tvm(xs)
            return lambda: fn(*vs)

        return Runner(lambda xs: outs(fn(*to_tvm(xs))), bind)
