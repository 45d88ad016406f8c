"""An artifact written by a real `slimkit run` (with measurements), plus a search.json fixture."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from slimkit.cli import app


def search_fixture() -> dict:
    """search.json as the planner writes it: 10 trials (one pruned, one failed), 3 on the front,
    2 infeasible, trial 4 chosen."""
    vals = [(0.91, 0.8, 0.30), (0.93, 1.2, 0.50), (0.88, 0.5, 0.20), (0.95, 2.0, 0.90),
            (0.94, 1.0, 0.40), (0.70, 0.4, 0.10), (0.92, 1.5, 0.60), (0.90, 3.5, 1.20)]  # fmt: skip
    pareto = {0, 2, 4}
    trials = [{"number": i, "state": "complete", "params": {"ratio": round(0.1 * i, 1),
               "bits": 8 if i % 2 else 4}, "values": {"metric": m, "latency_ms": lat,
               "size_mb": s}, "feasible": lat <= 3.0 and m >= 0.85, "pareto": i in pareto,
               "note": f"trial note {i}"} for i, (m, lat, s) in enumerate(vals)]  # fmt: skip
    trials += [
        {"number": 8, "state": "pruned", "params": {"ratio": 0.9}, "values": None,
         "feasible": False, "pareto": False, "note": "roofline proxy: slower than the limit"},
        {"number": 9, "state": "fail", "params": {"ratio": 0.95}, "values": None,
         "feasible": False, "pareto": False, "note": "export failed"},
    ]  # fmt: skip
    return {
        "objectives": ["metric", "latency_ms", "size_mb"],
        "directions": ["maximize", "minimize", "minimize"],
        "constraints": {"latency_ms": 3.0, "size_mb": 1.0, "max_drop": 0.08},
        "source": {"metric": 0.96, "latency_ms": 2.5, "size_mb": 1.1},
        "trials": trials,
        "chosen": 4,
        "message": "trial 4 meets every constraint: 0.94 metric at 1.0 ms and 0.4 MB",
    }


@pytest.fixture(scope="session")
def artifact(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`slimkit run` of a 50 % channel pruning of zoo:cnn_bn, measured (2 timed runs), then
    `slimkit report` on it."""
    tmp = tmp_path_factory.mktemp("report")
    recipe = tmp / "r.yaml"
    recipe.write_text(yaml.safe_dump({"model": "zoo:cnn_bn",
                                      "steps": [{"prune.channel": {"ratio": 0.5}}]}))  # fmt: skip
    out = tmp / "artifact"
    res = CliRunner().invoke(app, ["run", str(recipe), "--out", str(out), "--runs", "2", "--json"])
    assert res.exit_code == 0, res.output
    res = CliRunner().invoke(app, ["report", str(out), "--json"])
    assert res.exit_code == 0, res.output
    return out


@pytest.fixture(scope="session")
def searched(artifact: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of ``artifact`` with a search.json, its report drawn again."""
    import shutil

    from slimkit.report import report_html

    d = tmp_path_factory.mktemp("searched") / "artifact"
    shutil.copytree(artifact, d)
    (d / "search.json").write_text(json.dumps(search_fixture()))
    report_html(d, layers=False)  # layers.json was copied
    return d
