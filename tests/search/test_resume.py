"""A search killed mid-trial (a real process, SIGKILL) resumes from its SQLite file in the
artifact: no finished trial is lost, the interrupted trial is failed and run again."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest

from ._procs import SLOW_SPACE, start

ARGS = dict(trials=4, time_budget_s=300, space=SLOW_SPACE)


def _states(db: Path) -> dict[str, list[int]]:
    """Trial numbers by state, read-only with sqlite3 (a second Optuna client on a file the
    search is still creating would race it to create the tables)."""
    import sqlite3

    out: dict[str, list[int]] = {}
    if not db.exists():
        return out
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10)
    try:
        rows = con.execute(
            "SELECT t.number, t.state, COUNT(p.param_id) FROM trials t LEFT JOIN trial_params p"
            " ON p.trial_id = t.trial_id GROUP BY t.trial_id"
        ).fetchall()
    except sqlite3.OperationalError:  # no tables yet
        return out
    finally:
        con.close()
    for number, state, n_params in rows:
        if state != "RUNNING" or n_params == len(SLOW_SPACE):  # its candidate is drawn
            out.setdefault(state, []).append(number)
    return out


@pytest.mark.slow
def test_killed_search_resumes_without_losing_trials(tmp_path: Path) -> None:
    out = tmp_path / "art"
    proc = start(ARGS, str(out))
    db, before = out / "search.db", {}
    deadline = time.monotonic() + 240
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            before = _states(db)
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
    before = _states(db)  # after the process died: what was running is what the kill cut
    assert before.get("RUNNING"), before
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
