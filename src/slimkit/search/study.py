"""The Optuna study behind ``slimkit.compress``: storage, sampler, the run loop, the results.

- Three objectives, ``metric`` (maximize), ``latency_ms`` and ``size_mb`` (minimize), measured on
  the exported model in ONNX Runtime; the constraints go to the sampler as Optuna constraints
  (a value <= 0 is met), so NSGA-II (default) or TPE prefer feasible candidates.
- Storage: an RDB URL. The default is ``sqlite:///OUT/search.db``: a search that is killed resumes
  where it stopped (the trial that was running is failed and run again). ``postgresql://...``
  lets any number of worker processes on any number of machines share the study: each trial
  sends a heartbeat, and a worker that dies loses only its running trial, which the others fail
  after the grace period and run again (``RetryHeartbeatStaleTrialCallback``).
- The loop stops at ``trials`` finished (complete or pruned) trials in the study, at the time
  budget (the Pareto set found so far is the answer), or, with ``stop_when_met``, at the first
  trial that meets every goal.
"""

from __future__ import annotations

import math
import os
import socket
import time
import warnings
from collections.abc import Callable
from typing import Any, Literal

from slimkit.errors import ConfigError

OBJECTIVES = ["metric", "latency_ms", "size_mb"]
DIRECTIONS: list[Literal["maximize", "minimize"]] = ["maximize", "minimize", "minimize"]
STATES = {"COMPLETE": "complete", "PRUNED": "pruned", "FAIL": "fail"}
MAX_FAILURES = 5  # consecutive failed trials in one process end its loop


def worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def open_study(
    url: str, name: str, *, sampler: str, heartbeat_s: int, seed: int = 0, population: int = 8
) -> Any:
    """Create or load study ``name`` in the RDB storage ``url`` (several workers may race)."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.ERROR)  # trial notes say why
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    url = storage_url(url)
    if url.startswith("postgresql"):
        try:
            import psycopg2  # noqa: F401
        except ImportError:
            raise ConfigError(
                "--storage postgresql://... needs the psycopg2 driver",
                fix="pip install psycopg2-binary",
            ) from None
    kwargs: dict[str, Any] = {"pool_pre_ping": True}
    if url.startswith("sqlite"):
        kwargs["connect_args"] = {"timeout": 60}
    storage = _storage(url, kwargs, heartbeat_s)
    smp = _sampler(sampler, seed, population)
    for attempt in range(5):
        try:
            return optuna.create_study(
                storage=storage,
                study_name=name,
                directions=DIRECTIONS,
                sampler=smp,
                load_if_exists=True,
            )
        except optuna.exceptions.DuplicatedStudyError:  # another worker created it just now
            time.sleep(0.2 * (attempt + 1))
    return optuna.load_study(study_name=name, storage=storage, sampler=smp)


def _storage(url: str, kwargs: dict[str, Any], heartbeat_s: int) -> Any:
    """The RDB storage; workers starting together race to create its tables, so a failure is
    tried again a few times before it is reported."""
    import optuna

    retry = optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=2)
    for attempt in range(6):
        try:
            return optuna.storages.RDBStorage(
                url,
                engine_kwargs=kwargs,
                heartbeat_interval=heartbeat_s,
                grace_period=3 * heartbeat_s,
                heartbeat_stale_trial_callback=retry,
            )
        except Exception as e:  # sqlalchemy / driver errors: name the URL and the cause
            if attempt < 5 and "exists" in str(e):
                time.sleep(0.5 * (attempt + 1))
                continue
            raise ConfigError(
                f"cannot open the search storage {_safe(url)}: {str(e).splitlines()[0][:200]}",
                fix="check the URL (sqlite:///path/search.db or "
                "postgresql://user@host:port/db) and that the server runs",
            ) from None
    raise AssertionError("unreachable")


def storage_url(url: str) -> str:
    """``postgresql://`` with the psycopg2 driver named (SQLAlchemy 2.1 defaults to psycopg 3)."""
    if url.startswith(("postgresql://", "postgres://")):
        return "postgresql+psycopg2://" + url.partition("://")[2]
    return url


def _safe(url: str) -> str:
    """The URL without a password."""
    head, at, tail = url.rpartition("@")
    if not at:
        return url
    scheme, _, user = head.partition("://")
    return f"{scheme}://{user.split(':')[0]}@{tail}"


def _sampler(name: str, seed: int, population: int) -> Any:
    """NSGA-II or TPE; both read the constraints each trial sets (``Trial.set_constraint``)."""
    import optuna

    if name == "nsga2":
        return optuna.samplers.NSGAIISampler(population_size=population, seed=seed)
    if name == "tpe":
        return optuna.samplers.TPESampler(seed=seed, n_startup_trials=population)
    raise ConfigError(f"unknown sampler {name!r}", fix="use 'nsga2' (default) or 'tpe'")


def finished(study: Any) -> int:
    """Trials that count toward ``trials``: complete or pruned (failed ones are retried)."""
    from optuna.trial import TrialState

    return len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)))


def recover_interrupted(study: Any) -> list[int]:
    """Fail the trials left running by a killed process and queue them again. Only for a
    storage this process owns (the artifact's SQLite file, under the artifact lock)."""
    import optuna
    from optuna.trial import TrialState

    retry = optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=2)
    failed = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        study._storage.set_trial_user_attr(t._trial_id, "note", "interrupted: its process died")
        if study._storage.set_trial_state_values(t._trial_id, state=TrialState.FAIL):
            retry(study, study._storage.get_trial(t._trial_id))
            failed.append(t.number)
    return failed


def optimize(
    study: Any,
    objective: Callable[[Any], Any],
    *,
    trials: int,
    deadline: float,
    stop_when_met: bool,
    on_trial: Callable[[Any], None] | None = None,
) -> str:
    """Run trials until ``trials`` have finished in the study, ``deadline`` (monotonic) passes,
    or (``stop_when_met``) a trial meets every goal. Returns why it stopped."""
    from optuna.study import MaxTrialsCallback
    from optuna.trial import TrialState

    why = {"reason": f"{trials} trials finished"}
    fails = {"n": 0}

    def after(study: Any, t: Any) -> None:
        fails["n"] = fails["n"] + 1 if t.state == TrialState.FAIL else 0
        if on_trial is not None:
            on_trial(t)
        if stop_when_met and t.state == TrialState.COMPLETE and t.user_attrs.get("feasible"):
            why["reason"] = f"trial {t.number} meets every goal (stop_when_met)"
            study.stop()
        elif fails["n"] >= MAX_FAILURES:
            why["reason"] = f"{MAX_FAILURES} trials failed in a row (see their notes)"
            study.stop()

    if finished(study) >= trials:
        return why["reason"]
    left = deadline - time.monotonic()
    if left <= 0:
        return "the time budget was spent"
    study.optimize(
        objective,
        timeout=left,
        catch=(Exception,),
        callbacks=[
            MaxTrialsCallback(trials, states=(TrialState.COMPLETE, TrialState.PRUNED)),
            after,
        ],
    )
    if time.monotonic() >= deadline and finished(study) < trials and "meets" not in why["reason"]:
        return "the time budget was spent"
    return why["reason"]


def drain(study: Any, objective: Callable[[Any], Any], *, until: float, heartbeat_s: int) -> None:
    """Wait for other workers' running trials: a dead worker's trial goes stale after the grace
    period, is failed and queued again, and is run here."""
    from optuna.storages import fail_stale_trials
    from optuna.trial import TrialState

    while time.monotonic() < until:
        waiting = study.get_trials(deepcopy=False, states=(TrialState.WAITING,))
        if waiting:
            study.optimize(objective, n_trials=len(waiting), catch=(Exception,))
            continue
        if not study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            return
        time.sleep(heartbeat_s)
        fail_stale_trials(study)


def pareto(points: dict[int, tuple[float, float, float]]) -> set[int]:
    """Numbers of the non-dominated points (metric up, latency and size down)."""

    def dominates(a: tuple[float, float, float], b: tuple[float, float, float]) -> bool:
        ge = a[0] >= b[0] and a[1] <= b[1] and a[2] <= b[2]
        return ge and (a[0] > b[0] or a[1] < b[1] or a[2] < b[2])

    return {
        n
        for n, p in points.items()
        if not any(dominates(q, p) for m, q in points.items() if m != n)
    }


def results(study: Any) -> list[dict[str, Any]]:
    """Every finished trial in the shape of ``search.json``'s ``trials`` (without ``pareto``)."""
    rows = []
    for t in study.get_trials(deepcopy=False):
        state = STATES.get(t.state.name)
        if state is None:  # running or waiting: not finished
            continue
        values = dict(zip(OBJECTIVES, t.values, strict=True)) if t.values else None
        note = str(t.user_attrs.get("note", ""))
        if state == "fail" and not note:
            note = str(t.system_attrs.get("fail_reason", "failed"))[:300]
        rows.append(
            {
                "number": t.number,
                "state": state,
                "params": dict(t.params),
                "values": values,
                "feasible": bool(t.user_attrs.get("feasible", False)),
                "pareto": False,
                "note": note,
            }
        )
    return rows


def choose(rows: list[dict[str, Any]]) -> tuple[int | None, list[dict[str, Any]]]:
    """Mark the Pareto points (of the feasible trials, else of all complete ones) and choose:
    the feasible trial with the best metric (then lowest latency, then smallest file)."""
    done = [r for r in rows if r["state"] == "complete" and r["values"] is not None]
    feasible = [r for r in done if r["feasible"]]
    pool = feasible or done
    front = pareto({r["number"]: _key(r) for r in pool})
    for r in rows:
        r["pareto"] = r["number"] in front
    if not feasible:
        return None, [r for r in pool if r["pareto"]]
    best = max(
        feasible,
        key=lambda r: (r["values"]["metric"], -r["values"]["latency_ms"], -r["values"]["size_mb"]),
    )
    return int(best["number"]), [r for r in pool if r["pareto"]]


def _key(r: dict[str, Any]) -> tuple[float, float, float]:
    v = r["values"]
    return (float(v["metric"]), float(v["latency_ms"]), float(v["size_mb"]))


def closeness(
    r: dict[str, Any],
    violations: Callable[[dict[str, float]], dict[str, float]],
    scale: dict[str, float],
) -> float:
    """How far a trial is from meeting the goals: the sum of its violations, each relative."""
    return sum(
        max(v, 0.0) / max(scale.get(k, 1.0), 1e-12)
        for k, v in violations(r["values"]).items()
        if not math.isnan(v)
    )
