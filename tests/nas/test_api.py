"""search_arch end to end on the shapes task with a tiny space and a few steps: the result meets
its predicted target, saves an artifact that reloads to the same outputs and runs in ORT."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from slimkit.errors import ConfigError
from slimkit.nas import CNNSpace, StageSpace, load, search_arch


def tiny() -> CNNSpace:
    return CNNSpace(stem=8, head=16, stages=[
        StageSpace(widths=[8, 12], depths=[1, 2], kernels=[3], expands=[2]),
        StageSpace(widths=[12, 16], depths=[1, 2], kernels=[3, 5], expands=[2], stride=2),
    ])  # fmt: skip


def test_search_arch_saves_a_model_that_reloads_and_runs_in_ort(tmp_path, monkeypatch):
    monkeypatch.setenv("SLIMKIT_CACHE_DIR", str(tmp_path / "cache"))
    space = tiny()
    stages = []
    res = search_arch("shapes", space=space, trials=6, supernet_epochs=1, finetune_epochs=1,
                      max_steps=4, progress=False, on_stage=stages.append)  # fmt: skip
    assert stages[0] == "latency table" and stages[-1] == "measure"
    m = res.metrics
    assert res.search.best is not None and m["predicted_ms"] <= m["target_ms"]
    assert len(res.search.trials) == 6 and 0.0 <= m["top1"] <= 1.0
    assert m["latency_model"]["n"] == 8 and m["measured_ms"] > 0
    out = res.save(tmp_path / "art")
    assert {p.name for p in out.iterdir()} >= {"arch.yaml", "model.safetensors", "model.onnx",
                                               "search.json", "metrics.json"}  # fmt: skip
    back = load(out)
    x = torch.rand(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(back(x), res.model(x), atol=0, rtol=0)
    from slimkit.export.ort import ort_session, run_session

    (got,) = run_session(ort_session(out / "model.onnx"), [x])
    # float ONNX vs PyTorch, measured ~1e-6
    assert np.abs(got - back(x).detach().numpy()).max() < 1e-4


def test_search_arch_rejects_a_task_that_does_not_fit(tmp_path):
    with pytest.raises(ConfigError, match="does not fit the search space"):
        search_arch("digits", space=tiny(), trials=2)
    with pytest.raises(ConfigError, match="no arch.yaml"):
        load(tmp_path)
