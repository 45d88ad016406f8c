"""Latency measured the way BENCHMARKS.md asks: warm-up, interleaved rounds, medians and spread.

Shared machines drift by 10-15 % over seconds, so candidates are timed in turns (A, B, A, B, ...)
and each reports the median of its round medians plus the spread of those medians::

    stats = measure_latency({"eager": torch_runner(model, x), "ort": ort_runner(sess, x)})
    stats["ort"].median_ms, stats["ort"].spread_ms
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch

Runner = Callable[[], Any]


@dataclass
class LatencyStats:
    """One candidate's timing: median of round medians, and the (min, max) of the round medians."""

    name: str
    median_ms: float
    spread_ms: tuple[float, float]
    round_medians_ms: list[float]
    runs_per_round: int
    rounds: int
    # median over rounds of each round's lower quartile: other processes only ever slow a run,
    # so on a shared machine this is the steadier estimate of what the code costs
    quartile_ms: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["spread_ms"] = list(self.spread_ms)
        return d


def torch_runner(model: torch.nn.Module, inputs: Sequence[torch.Tensor]) -> Runner:
    """A zero-argument callable running ``model(*inputs)`` in eval mode without autograd."""
    model.eval()
    args = tuple(inputs)

    def run() -> Any:
        with torch.inference_mode():
            return model(*args)

    return run


def ort_runner(session: Any, inputs: Sequence[Any]) -> Runner:
    """A zero-argument callable running an ONNX Runtime session on fixed inputs."""
    from slimkit.export.ort import feeds

    fed = feeds(session, inputs)

    def run() -> Any:
        return session.run(None, fed)

    return run


def measure_latency(
    candidates: Mapping[str, Runner],
    *,
    runs: int = 50,
    warmup: int = 10,
    rounds: int = 3,
    max_seconds: float | None = None,
    on_round: Callable[[int, str], None] | None = None,
) -> dict[str, LatencyStats]:
    """Time each runner ``runs`` times per round, in interleaved rounds, after ``warmup`` calls.

    ``max_seconds`` caps the total: runs per round shrink (to at least 5) for slow candidates,
    judged from the warm-up. ``on_round(round, name)`` is called before each timed block.
    """
    if not candidates:
        return {}
    per_call: dict[str, float] = {}
    for name, fn in candidates.items():
        t0 = time.perf_counter()
        for _ in range(max(warmup, 1)):
            fn()
        per_call[name] = (time.perf_counter() - t0) / max(warmup, 1)
    n = runs
    if max_seconds is not None:
        est = sum(per_call.values()) * rounds
        if est * runs > max_seconds:
            n = max(5, int(max_seconds / max(est, 1e-9)))
    samples: dict[str, list[float]] = {name: [] for name in candidates}
    quartiles: dict[str, list[float]] = {name: [] for name in candidates}
    for r in range(rounds):
        for name, fn in candidates.items():
            if on_round is not None:
                on_round(r, name)
            times = []
            for _ in range(n):
                t0 = time.perf_counter_ns()
                fn()
                times.append((time.perf_counter_ns() - t0) / 1e6)
            samples[name].append(statistics.median(times))
            quartiles[name].append(statistics.quantiles(times, n=4)[0] if len(times) > 1
                                   else times[0])  # fmt: skip
    return {
        name: LatencyStats(
            name=name,
            median_ms=statistics.median(meds),
            spread_ms=(min(meds), max(meds)),
            round_medians_ms=meds,
            runs_per_round=n,
            rounds=rounds,
            quartile_ms=statistics.median(quartiles[name]),
        )
        for name, meds in samples.items()
    }


def eager_vs_ort(
    model: torch.nn.Module,
    inputs: Sequence[torch.Tensor],
    *,
    onnx_path: str | None = None,
    runs: int = 50,
    warmup: int = 10,
    rounds: int = 3,
    max_seconds: float | None = None,
    on_round: Callable[[int, str], None] | None = None,
) -> dict[str, LatencyStats]:
    """Latency of PyTorch eager and ONNX Runtime (fp32, protocol threading), interleaved.

    The model is exported to ``onnx_path`` (a temporary file when omitted) with a parity check.
    """
    import tempfile
    from pathlib import Path

    from slimkit.export.onnx import export_onnx
    from slimkit.export.ort import ort_session

    with tempfile.TemporaryDirectory() as tmp:
        path = onnx_path or str(Path(tmp) / "model.onnx")
        export_onnx(model, path, example_inputs=tuple(inputs))
        session = ort_session(path)
        runners = {
            "pytorch eager": torch_runner(model, inputs),
            "onnxruntime": ort_runner(session, inputs),
        }
        return measure_latency(
            runners,
            runs=runs, warmup=warmup, rounds=rounds, max_seconds=max_seconds, on_round=on_round,
        )  # fmt: skip
