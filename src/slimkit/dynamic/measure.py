"""Timing for models whose cost depends on the input: the mean time per image over a set of
test images at batch 1, in interleaved rounds (A, B, A, B, ...), so that a dynamic model is
measured on the mix of easy and hard inputs it will meet, gating included."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

Runner = Callable[[np.ndarray], Any]


def mean_latency(
    runners: Mapping[str, Runner],
    images: Sequence[np.ndarray],
    *,
    rounds: int = 3,
    warmup: int = 20,
) -> dict[str, dict[str, Any]]:
    """Per runner: ``latency_ms`` (the median over rounds of the mean per image), the spread of
    the round means and the round means themselves."""
    for fn in runners.values():
        for a in images[:warmup]:
            fn(a)
    means: dict[str, list[float]] = {k: [] for k in runners}
    for _ in range(rounds):
        for name, fn in runners.items():
            t0 = time.perf_counter_ns()
            for a in images:
                fn(a)
            means[name].append((time.perf_counter_ns() - t0) / 1e6 / max(len(images), 1))
    return {
        k: {
            "latency_ms": round(statistics.median(v), 4),
            "latency_spread_ms": [round(min(v), 4), round(max(v), 4)],
            "round_means_ms": [round(t, 4) for t in v],
        }
        for k, v in means.items()
    }


def top1(run: Callable[[np.ndarray], np.ndarray], images: Sequence[np.ndarray],
         labels: np.ndarray) -> float:  # fmt: skip
    """Top-1 of ``run`` (batch-1 logits) over ``images``."""
    pred = np.array([int(np.asarray(run(a))[0].argmax()) for a in images])
    return round(float((pred == labels).mean()), 4)
