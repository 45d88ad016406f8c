from __future__ import annotations

import time
from pathlib import Path

import torch
from torch import nn

from slimkit.analyze.latency import measure_latency, ort_runner, torch_runner
from slimkit.export.onnx import export_onnx
from slimkit.export.ort import ort_session


def test_interleaved_rounds_and_ordering() -> None:
    order: list[str] = []
    stats = measure_latency(
        {"fast": lambda: None, "slow": lambda: time.sleep(0.002)},
        runs=5, warmup=1, rounds=3, on_round=lambda r, n: order.append(f"{r}{n}"),
    )  # fmt: skip
    assert order == ["0fast", "0slow", "1fast", "1slow", "2fast", "2slow"]  # A, B, A, B, ...
    slow = stats["slow"]
    assert slow.median_ms >= 2.0 and stats["fast"].median_ms < slow.median_ms
    assert slow.spread_ms[0] <= slow.median_ms <= slow.spread_ms[1]
    assert len(slow.round_medians_ms) == 3 and slow.runs_per_round == 5


def test_time_cap_reduces_runs() -> None:
    stats = measure_latency({"s": lambda: time.sleep(0.01)}, runs=50, warmup=1, max_seconds=0.3)
    assert 5 <= stats["s"].runs_per_round < 50


def test_torch_and_ort_runners(tmp_path: Path) -> None:
    m = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4)).eval()
    x = torch.randn(1, 16)
    rep = export_onnx(m, tmp_path / "m.onnx", example_inputs=x)
    run_ort = ort_runner(ort_session(rep.path), [x])
    torch.testing.assert_close(torch.from_numpy(run_ort()[0]), torch_runner(m, [x])())
    stats = measure_latency({"eager": torch_runner(m, [x]), "ort": run_ort}, runs=5, warmup=2)
    assert all(s.median_ms > 0 for s in stats.values())
