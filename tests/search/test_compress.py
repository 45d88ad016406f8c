"""``slimkit.compress`` end to end on the trained digits CNN: every trial exported and measured in
ONNX Runtime, search.json in the shape the report reads, the chosen model rebuilt from its recipe,
and a clear answer when no candidate meets the goals."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import slimkit as sk
from slimkit.pipeline.recipe import Recipe
from slimkit.search import Constraints, compress

# a small space: a trial takes about a second on 2 cores (no fine-tuning)
SPACE = {"prune_macs": [1.0, 0.5], "lowrank_energy": [0.0], "quant": ["fp32", "int8"]}
TRIAL_KEYS = {"number", "state", "params", "values", "feasible", "pareto", "note"}


def test_compress_meets_a_size_goal_and_writes_the_artifact(tmp_path: Path) -> None:
    out = tmp_path / "art"
    c = Constraints(size_mb=0.05, max_drop=0.05)  # the fp32 file is 0.098 MB: int8 meets it
    res = compress("zoo:digits_cnn", c, out=out, trials=4, time_budget_s=240, space=SPACE)
    doc = json.loads((out / "search.json").read_text())
    assert set(doc) == {
        "objectives",
        "directions",
        "constraints",
        "source",
        "trials",
        "chosen",
        "message",
    }
    assert doc["objectives"] == ["metric", "latency_ms", "size_mb"]
    assert doc["directions"] == ["maximize", "minimize", "minimize"]
    assert doc["constraints"]["size_mb"] == 0.05 and set(doc["source"]) == {
        "metric",
        "latency_ms",
        "size_mb",
    }
    assert len(doc["trials"]) >= 4 and all(set(t) == TRIAL_KEYS for t in doc["trials"])
    assert doc["trials"][0]["params"]["quant"] == "int8"  # the planner's candidate runs first
    assert res.met and doc["chosen"] == res.chosen
    chosen = next(t for t in doc["trials"] if t["number"] == res.chosen)
    assert chosen["feasible"] and chosen["pareto"] and chosen["values"]["size_mb"] <= 0.05
    assert res.deployed is not None and res.deployed.size_mb <= 0.05  # re-measured
    assert res.source.metric - res.deployed.metric <= 0.05
    assert "meets every goal" in res.message
    for name in ("model.onnx", "recipe.yaml", "metrics.json", "plan.yaml", "search.db"):
        assert (out / name).is_file(), name
    rec = Recipe.load(out / "recipe.yaml")  # the pinned recipe that rebuilt the chosen model
    assert rec.model == "zoo:digits_cnn" and "quant.ptq" in [s.name for s in rec.steps]
    plan = Recipe.load(out / "plan.yaml")
    assert [s.name for s in plan.steps] == ["quant.ptq"]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["compress"]["trial"] == res.chosen and metrics["compress"]["met_on_remeasure"]


def test_no_candidate_meets_an_impossible_latency(tmp_path: Path) -> None:
    c = Constraints(latency_ms=1e-6)
    res = sk.search.compress(
        "zoo:digits_cnn",
        c,
        out=tmp_path,
        trials=2,
        time_budget_s=120,
        space={**SPACE, "prune_macs": [1.0]},
        sampler="tpe",
    )
    doc = json.loads((tmp_path / "search.json").read_text())
    assert res.chosen is None and doc["chosen"] is None
    assert "no trial" in res.message and not (tmp_path / "model.onnx").exists()
    # every candidate was rejected by the roofline proxy before export: pruned, with its estimate
    assert {t["state"] for t in doc["trials"]} == {"pruned"}
    assert all(t["note"].startswith("proxy: roofline latency") for t in doc["trials"])


def test_plan_only_writes_a_runnable_plan(tmp_path: Path) -> None:
    res = compress("zoo:digits_cnn", {"size_mb": 0.05}, out=tmp_path, plan_only=True)
    assert res.chosen is None and not (tmp_path / "search.db").exists()
    text = (tmp_path / "plan.yaml").read_text()
    assert "# why: int8 on ORT's integer kernels" in text
    assert [s.name for s in Recipe.load(tmp_path / "plan.yaml").steps] == ["quant.ptq"]


def test_bad_input_names_the_fix(tmp_path: Path) -> None:
    with pytest.raises(sk.errors.ConfigError, match="needs constraints"):
        compress("zoo:digits_cnn", None, out=tmp_path)
    with pytest.raises(sk.errors.ConfigError, match="unknown sampler"):
        compress("zoo:digits_cnn", {"size_mb": 1}, out=tmp_path, sampler="grid", trials=1)
