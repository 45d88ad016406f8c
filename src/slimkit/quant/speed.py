"""Never slower than the source: the int8 model is timed against the float model on ONNX Runtime.

int8 is a speed claim only where the runtime has a faster kernel. On small layers, on activations
without an integer kernel (hard-swish, squeeze-excite gates), around concatenations and grouped
convs, the QuantizeLinear / DequantizeLinear pairs and layout changes cost more than the integer
arithmetic saves, and a quantized model can run slower than its float source. So PTQ
(``speed_check=True``, the default) exports both, times them in ORT at batch 1 with this
machine's threads (interleaved rounds, lower quartiles, as ``quant.prefix`` does), and:

1. keeps the int8 model when it is measurably faster than the float one (``TOLERANCE``);
2. otherwise profiles both (``export.ort_profile``), keeps float every layer whose integer
   kernels took longer than its float kernels, quantizes again and times again;
3. and if the model is still slower, returns a copy of the source model, saying so.

The decision and every time behind it are recorded in ``meta["slimkit"]["speed"]``.
"""

from __future__ import annotations

import tempfile
from collections.abc import Collection
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

# int8 is kept when its time is at most this times the float time: measurably faster. Timing
# noise of sub-millisecond models on 2 cores is +-3-4 %, so a tie kept as int8 could deploy slower
# (an LSTM timed 0.999x here ran 1.04x in the benchmark); for a smaller file whatever the speed,
# pass speed_check=False
TOLERANCE = 0.98
# an int8 / float time ratio outside this range after one round is a clear verdict, for models
# whose run takes at least SHORTCUT_S seconds (shorter runs are too noisy for one round)
CLEAR = (0.7, 1.4)
SHORTCUT_S = 0.002


@dataclass
class SpeedCheck:
    """Float and int8 times on ORT (ms, batch 1) and what was decided."""

    fp32_ms: float
    int8_ms: float
    decision: str = "int8"  # "int8", "int8, slow layers float", "float"
    slow_layers: list[str] = field(default_factory=list)  # kept float after profiling
    retry_ms: float | None = None  # the int8 model with those layers float

    def summary(self) -> str:
        text = f"ORT batch 1: fp32 {self.fp32_ms:.4g} ms, int8 {self.int8_ms:.4g} ms"
        if self.retry_ms is not None:
            text += f", int8 with {len(self.slow_layers)} slow layers float {self.retry_ms:.4g} ms"
        return f"{text}; kept {self.decision}"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def first_sample(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[tuple[Any, ...], dict]:
    """Batch 1 of an example (the deployment this toolkit times)."""

    def one(t: Any) -> Any:
        return t[:1] if isinstance(t, torch.Tensor) and t.dim() > 0 else t

    return tuple(one(t) for t in args), {k: one(t) for k, t in kwargs.items()}


def _export(model: nn.Module, dest: Path, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Path:
    """Exported as it is deployed (dynamic batch: its shape ops stay in the graph, which costs
    a small model measurably), or with a fixed batch where the dynamic export fails."""
    from slimkit.export.onnx import export_onnx

    try:
        export_onnx(model.eval(), dest, example_inputs=args, example_kwargs=kwargs, check=False)
    except Exception:  # noqa: BLE001 - fall back to the form every graph exports in
        export_onnx(model.eval(), dest, example_inputs=args, example_kwargs=kwargs, check=False,
                    dynamic_batch=False)  # fmt: skip
    return dest


def _feeds(model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> list[Any]:
    from slimkit.export.onnx import flat_io

    return list(flat_io(model, args, kwargs)[1])


def time_onnx(paths: dict[str, Path], inputs: list[Any], *, budget_s: float = 0.03,
              rounds: int = 5) -> dict[str, float]:  # fmt: skip
    """Lower-quartile ms per ONNX file, interleaved rounds (``quant.prefix``'s timing). Each
    runner gets about ``budget_s`` per round (5 to 300 runs): a model of 0.1 ms needs hundreds
    of runs before scheduling noise stops deciding, one of 10 ms a handful."""
    import time

    from slimkit.analyze.latency import ort_runner
    from slimkit.export.ort import ort_session
    from slimkit.quant.prefix import round_quartiles_ms

    runners = {k: ort_runner(ort_session(p, spinning=False), inputs) for k, p in paths.items()}
    slowest = 0.0
    for run in runners.values():
        run()  # weight packing, arena growth
        t0 = time.perf_counter()
        run()
        slowest = max(slowest, time.perf_counter() - t0)
    runs = int(min(300, max(5, budget_s / max(slowest, 1e-6))))
    # models of milliseconds: one round first, and a clear verdict (ResNet-18 runs 3x faster in
    # int8) needs no more. Sub-millisecond models always get every round: one noisy round of
    # 0.1 ms runs once timed a ConvNeXt's fp32 2x slow and kept a slower int8 model
    one = slowest >= SHORTCUT_S
    times = round_quartiles_ms(runners, runs=runs, rounds=1 if one else rounds,
                               filter_first=False)  # fmt: skip
    if one and len(times) == 2 and CLEAR[0] < times[1] / max(times[0], 1e-9) < CLEAR[1]:
        times = round_quartiles_ms(runners, runs=runs, rounds=rounds, filter_first=False)
    return dict(zip(runners, times, strict=True))


def slow_layers(
    fp32: Path, int8: Path, inputs: list[Any], layers: Collection[str], *, runs: int = 30
) -> list[str]:
    """The ``layers`` (module names) whose kernels take longer in ``int8`` than in ``fp32``,
    by ORT's profiler (kernels mapped back to modules)."""
    from slimkit.export.ort_profile import profile_onnx

    def per_layer(path: Path) -> dict[str, float]:
        out = dict.fromkeys(layers, 0.0)
        for n in profile_onnx(path, inputs, runs=runs, modules=None):
            for name in layers:
                if n.module == name or n.module.startswith(name + "."):
                    out[name] += n.us
                    break
        return out

    f, q = per_layer(fp32), per_layer(int8)
    return [n for n in layers if q[n] > f[n] > 0]


def check(
    float_model: nn.Module, int8_model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any],
    tmp: Path,
) -> tuple[SpeedCheck, list[Any], dict[str, Path]]:  # fmt: skip
    """Time ``int8_model`` against ``float_model`` (both exported to ``tmp``)."""
    a1, k1 = first_sample(args, kwargs)
    paths = {"fp32": _export(float_model, tmp / "fp32.onnx", a1, k1),
             "int8": _export(int8_model, tmp / "int8.onnx", a1, k1)}  # fmt: skip
    inputs = _feeds(float_model, a1, k1)
    t = time_onnx(paths, inputs)
    return SpeedCheck(fp32_ms=round(t["fp32"], 4), int8_ms=round(t["int8"], 4)), inputs, paths


def retime(fp32: Path, int8_model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any],
           inputs: list[Any], tmp: Path) -> tuple[float, float]:  # fmt: skip
    """``(fp32 ms, int8 ms)`` again, the new int8 model against the same float file."""
    a1, k1 = first_sample(args, kwargs)
    path = _export(int8_model, tmp / "int8_retry.onnx", a1, k1)
    t = time_onnx({"fp32": fp32, "int8": path}, inputs)
    return t["fp32"], t["int8"]


def workdir() -> tempfile.TemporaryDirectory[str]:
    return tempfile.TemporaryDirectory(prefix="slimkit-speed-")
