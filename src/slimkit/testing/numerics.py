"""Numeric checks used by tests and benchmarks: SQNR and max-abs error against a reference."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch


def _flat(x: Any) -> np.ndarray:
    if isinstance(x, Mapping):  # a dict or a Hugging Face ModelOutput: its values in key order
        x = list(x.values())
    if isinstance(x, (list, tuple)):
        return np.concatenate([_flat(v) for v in x]) if x else np.zeros(0)
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().double().numpy()
    return np.asarray(x, dtype=np.float64).reshape(-1)


def sqnr(reference: Any, output: Any) -> float:
    """``10*log10(sum(ref^2) / sum((ref-out)^2))`` in dB; ``inf`` when identical."""
    r, o = _flat(reference), _flat(output)
    if r.shape != o.shape:
        raise ValueError(f"sqnr: shapes differ, reference {r.shape} vs output {o.shape}")
    noise = float(np.sum((r - o) ** 2))
    signal = float(np.sum(r**2))
    if noise == 0.0:
        return math.inf
    if signal == 0.0:
        return -math.inf
    return 10.0 * math.log10(signal / noise)


def assert_sqnr(reference: Any, output: Any, min_db: float) -> float:
    """Assert the SQNR is at least ``min_db``; returns the measured value."""
    value = sqnr(reference, output)
    assert value >= min_db, f"SQNR {value:.2f} dB is below the required {min_db:.2f} dB"
    return value


def max_abs_err(reference: Any, output: Any) -> float:
    r, o = _flat(reference), _flat(output)
    return float(np.max(np.abs(r - o))) if r.size else 0.0


def assert_close(reference: Sequence[Any] | Any, output: Any, atol: float) -> float:
    err = max_abs_err(reference, output)
    assert err <= atol, f"max abs error {err:.3g} exceeds {atol:g}"
    return err
