"""A search killed mid-trial (a real process, SIGKILL) resumes from its SQLite file in the
artifact: no finished trial is lost, the interrupted trial is failed and run again."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

# one epoch of distilled fine-tuning per trial: seconds, so the kill lands mid-trial
ARGS = dict(
    trials=3,
    time_budget_s=300,
    space={
        "prune_macs": [0.5, 0.75],
        "lowrank_energy": [0.0],
        "recovery_epochs": [1],
        "quant": ["fp32", "int8"],
    },
)
CODE = """
import sys, torch
torch.set_num_threads(2)
from slimkit.search import compress
compress("zoo:digits_cnn", {{"size_mb": 0.05}}, out=sys.argv[1], **{args})
"""


def _states(db: Path) -> dict[str, list[int]]:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    url = f"sqlite:///{db}"
    names = [s.study_name for s in optuna.get_all_study_summaries(url)]
    out: dict[str, list[int]] = {}
    if names:
        for t in optuna.load_study(study_name=names[0], storage=url).get_trials(deepcopy=False):
            out.setdefault(t.state.name, []).append(t.number)
    return out


@pytest.mark.slow
def test_killed_search_resumes_without_losing_trials(tmp_path: Path) -> None:
    out = tmp_path / "art"
    proc = subprocess.Popen(
        [sys.executable, "-c", CODE.format(args=repr(ARGS)), str(out)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    db, before = out / "search.db", {}
    deadline = time.monotonic() + 240
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            before = _states(db) if db.exists() else {}
            if before.get("COMPLETE") and before.get("RUNNING"):
                break
            time.sleep(0.3)
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]  # type: ignore[union-attr]
        assert before.get("COMPLETE") and before.get("RUNNING"), before
        os.kill(proc.pid, signal.SIGKILL)  # mid-trial: a trial is running
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    killed = before["RUNNING"]
    from slimkit.search import compress

    res = compress("zoo:digits_cnn", {"size_mb": 0.05}, out=out, **ARGS)  # type: ignore[arg-type]
    doc = json.loads((out / "search.json").read_text())
    by_number = {t["number"]: t for t in doc["trials"]}
    for n in before["COMPLETE"]:  # every trial finished before the kill is still there
        assert by_number[n]["state"] == "complete"
    for n in killed:
        assert by_number[n]["state"] == "fail" and "interrupted" in by_number[n]["note"]
    finished = [t for t in doc["trials"] if t["state"] in ("complete", "pruned")]
    assert len(finished) >= ARGS["trials"]  # type: ignore[operator]
    # the interrupted candidate was run again with the same parameters
    retried = [t for t in finished if t["number"] > max(killed)]
    assert any(t["params"] == by_number[killed[0]]["params"] for t in retried)
    assert res.chosen is not None and (out / "model.onnx").is_file()
