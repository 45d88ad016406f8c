"""Scale-out: two processes share one study on a real PostgreSQL server; one is killed mid-trial.
The study still completes its trials, no finished trial is lost, and the killed trial is failed
(after the heartbeat grace period) and run again by the survivor.

The fixture starts a throwaway cluster (initdb + pg_ctl in a temporary folder, as the
``postgres`` OS user when run as root, on a free port) and stops it; the test skips only when the
PostgreSQL server binaries are absent (Debian: ``apt-get install postgresql``)."""

from __future__ import annotations

import glob
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from ._procs import SLOW_SPACE, start

ARGS = dict(trials=10, time_budget_s=300, heartbeat_s=1, study="pg-test", space=SLOW_SPACE)


def _bin(name: str) -> str | None:
    found = shutil.which(name) or sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return found if isinstance(found, str) else (found[-1] if found else None)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def postgres_url() -> Iterator[str]:
    initdb, pg_ctl = _bin("initdb"), _bin("pg_ctl")
    if initdb is None or pg_ctl is None:
        pytest.skip(
            "PostgreSQL server binaries (initdb, pg_ctl) are absent: apt-get install postgresql"
        )
    root = Path(tempfile.mkdtemp(prefix="slimkit-pg-"))
    as_user: list[str] = []
    if os.geteuid() == 0:  # PostgreSQL refuses to run as root
        shutil.chown(root, "postgres")
        as_user = ["runuser", "-u", "postgres", "--"]
    port, data = _free_port(), root / "data"
    run = lambda *a: subprocess.run([*as_user, *a], check=True, capture_output=True)  # noqa: E731
    run(initdb, "-D", str(data), "-A", "trust", "-U", "postgres", "--no-sync")
    opts = f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off"
    run(pg_ctl, "-D", str(data), "-o", opts, "-l", str(root / "log"), "-w", "start")
    try:
        yield f"postgresql://postgres@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run(
            [*as_user, pg_ctl, "-D", str(data), "-m", "immediate", "stop"], capture_output=True
        )
        shutil.rmtree(root, ignore_errors=True)


def _trials(url: str) -> list:
    import optuna

    from slimkit.search.study import storage_url

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    try:
        return optuna.load_study(study_name="pg-test", storage=storage_url(url)).get_trials(
            deepcopy=False
        )
    except Exception:  # not created yet (or its tables are being created)
        return []


@pytest.mark.slow
def test_two_workers_one_killed_mid_trial(postgres_url: str, tmp_path: Path) -> None:
    # The worker to be killed starts first, and the main process once the worker holds its first
    # trial: started together, on a loaded machine, main could run most of the study while the
    # worker was still importing, and the worker never held a second trial to be killed in.
    main: subprocess.Popen | None = None  # type: ignore[type-arg]
    done_by_victim: list[int] = []
    killed: list[int] = []
    victims: list[subprocess.Popen] = []  # type: ignore[type-arg]
    try:
        # on a loaded machine the victim's trial can end between the poll that saw it running
        # and the kill: then the kill cut nothing, and a fresh worker is killed instead
        for attempt in range(3):
            victim = start(ARGS, str(tmp_path / f"worker{attempt}"), postgres_url, "worker",
                           threads=1)  # fmt: skip
            victims.append(victim)
            mine = f":{victim.pid}"
            running: list[int] = []
            deadline = time.monotonic() + 240
            while time.monotonic() < deadline and victim.poll() is None:
                ts = [t for t in _trials(postgres_url)
                      if t.user_attrs.get("worker", "").endswith(mine)]  # fmt: skip
                done = [t.number for t in ts if t.state.name == "COMPLETE"]
                running = [t.number for t in ts if t.state.name == "RUNNING"]
                if ts and main is None:  # the study exists and the worker is in it: the second
                    main = start(ARGS, str(tmp_path / "main"), postgres_url, "main", threads=1)
                if done and running:
                    os.kill(victim.pid, signal.SIGKILL)  # mid-trial
                    break
                time.sleep(0.2)
            assert running, "the worker never held a running trial after a finished one"
            victim.wait()  # then what it was running is what the kill cut (before the grace)
            ts = [t for t in _trials(postgres_url) if t.user_attrs.get("worker", "").endswith(mine)]
            done_by_victim += [t.number for t in ts if t.state.name == "COMPLETE"]
            killed = [t.number for t in ts if t.state.name == "RUNNING"]
            if killed:
                break
        assert killed, "each worker finished its trial just before the kill (3 tries)"
        assert main is not None
        assert main.wait(timeout=300) == 0, main.stderr.read().decode()[-3000:]  # type: ignore[union-attr]
    finally:
        for p in (q for q in (main, *victims) if q is not None):
            if p.poll() is None:
                p.kill()
            p.wait()
    doc = json.loads((tmp_path / "main" / "search.json").read_text())
    by_number = {t["number"]: t for t in doc["trials"]}
    for n in done_by_victim:  # finished by the killed worker: kept
        assert by_number[n]["state"] == "complete"
    assert all(by_number[n]["state"] == "fail" for n in killed)  # failed by its stale heartbeat
    finished = [t for t in doc["trials"] if t["state"] in ("complete", "pruned")]
    assert len(finished) >= ARGS["trials"]  # type: ignore[operator]
    retried = [t for t in finished if t["number"] > killed[0]]
    assert any(t["params"] == by_number[killed[0]]["params"] for t in retried)
    assert doc["chosen"] is not None and (tmp_path / "main" / "model.onnx").is_file()
