"""``slimkit.compress``: make a model meet size / latency / quality goals, judged as deployed.

::

    import slimkit as sk
    res = sk.compress("zoo:digits_cnn", sk.Constraints(size_mb=0.05, max_drop=0.01),
                      out="digits_small/", time_budget_s=300, trials=20)
    res.chosen, res.message, res.deployed      # the trial kept, why, its re-measured numbers

What it does, in order: measure the source in ONNX Runtime (metric on held-out data, latency at
the constraint's batch, file size); analyse it (parameters, MACs, roofline); write the planner's
recipe (``OUT/plan.yaml``, a ``# why:`` per step); search the space of the registered techniques
with Optuna (the plan is the first candidate; each candidate exported and measured as deployed;
``OUT/search.db`` keeps the study, so an interrupted search resumes); then run the chosen
candidate's pinned recipe into ``OUT`` (``model.onnx``, ``recipe.yaml`` that reproduces it,
``metrics.json``), re-measure it, and write ``OUT/search.json`` (every trial, the Pareto set, the
choice and a message; when no candidate meets every goal it says so and names the closest
Pareto points).

Scale-out: ``storage="postgresql://user@host/db"`` shares the study with any number of
``compress(..., worker=True)`` processes (``slimkit compress ... --storage URL --worker``), on any
machine; a worker runs trials only, the process started without ``worker`` also collects the
results and writes the artifact.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from slimkit.core.io import PathLike, write_json
from slimkit.core.refs import ResolvedModel
from slimkit.errors import ConfigError
from slimkit.search import study as st
from slimkit.search.constraints import Constraints
from slimkit.search.judge import Deployed, Judge, Metric, resolve_metric
from slimkit.search.planner import Plan, analyse, make_plan
from slimkit.search.space import build_space
from slimkit.search.trials import Evaluator, Rejected


@dataclass
class CompressResult:
    """What ``compress`` found. ``chosen`` is None when no candidate met every goal."""

    out: Path
    constraints: Constraints
    source: Deployed
    plan: Plan
    chosen: int | None = None
    deployed: Deployed | None = None  # the chosen model, re-measured after it was rebuilt
    search: dict[str, Any] = field(default_factory=dict)  # the content of search.json
    message: str = ""
    stopped: str = ""  # why the search loop ended

    @property
    def met(self) -> bool:
        return self.chosen is not None

    @property
    def onnx(self) -> Path | None:
        return self.out / "model.onnx" if self.chosen is not None else None


def compress(
    model: nn.Module | ResolvedModel | str,
    constraints: Constraints | Mapping[str, Any] | None = None,
    *,
    data: Any = None,
    metric: str | Metric | None = None,
    out: PathLike | None = None,
    time_budget_s: float = 600.0,
    trials: int = 30,
    storage: str | None = None,
    sampler: str = "nsga2",
    stop_when_met: bool = False,
    plan_only: bool = False,
    worker: bool = False,
    study: str | None = None,
    space: Mapping[str, Sequence[Any]] | None = None,
    example_inputs: tuple[torch.Tensor, ...] | torch.Tensor | None = None,
    seed: int = 0,
    heartbeat_s: int = 10,
    progress: bool = False,
    on_trial: Callable[[Any], None] | None = None,
    on_event: Callable[[str], None] | None = None,
) -> CompressResult:
    """Search for the compressed model that meets ``constraints`` (see the module docstring).

    ``model``: an ``nn.Module``, a reference (``zoo:NAME``, ``file.pt2``, ...) or a resolved
    model. ``data``: calibration / training batches or a reference (default: a zoo model's own).
    ``metric``: ``model -> float`` (higher is better; it receives the deployed ONNX Runtime model),
    or ``top1`` | ``perplexity`` | ``sqnr`` | ``package.module:function`` (default: the zoo task's
    val top-1, else SQNR against the source). ``out``: the artifact folder (default: a new
    temporary folder). ``trials``: finished trials the study holds at the end; ``time_budget_s``:
    wall-clock budget of this call. ``storage``: an RDB URL (default ``sqlite:///OUT/search.db``).
    ``sampler``: ``nsga2`` or ``tpe``. ``space``: knob -> values (``slimkit.search.space``).
    ``heartbeat_s``: a dead worker's trial is failed and retried after 3x this.
    """
    c = _constraints(constraints)
    if trials < 1 or time_budget_s <= 0:
        raise ConfigError(
            f"trials={trials}, time_budget_s={time_budget_s}",
            fix="give at least 1 trial and a positive time budget",
        )
    start = time.monotonic()
    say = on_event or (lambda _m: None)
    folder = _out_dir(out)
    say("resolving the model")
    rm = _resolve(model, example_inputs, data, progress)
    model_ref = None if rm.source == "python object" else rm.source
    data_ref = data if isinstance(data, str) else None
    metric_fn, metric_name = resolve_metric(metric or c.metric, rm)
    own = storage is None
    url = storage or f"sqlite:///{(folder / 'search.db').resolve()}"
    from slimkit.pipeline.artifact import artifact_lock

    trials_dir = folder / "trials"
    trials_dir.mkdir(parents=True, exist_ok=True)
    lock = artifact_lock(trials_dir) if own else contextlib.nullcontext()
    with lock:
        say("measuring the source in ONNX Runtime")
        judge = Judge(rm, metric_fn, batch=c.batch)
        src = judge.source(trials_dir)
        sp = build_space(
            _methods(),
            training=_training(rm, data),
            size_mb=c.size_mb,
            source_size_mb=src.size_mb,
            override=space,
        )
        say("analysing and planning")
        analysis = analyse(rm, src, c, sp, batch=c.batch)
        plan = make_plan(analysis, c, sp)
        plan.save(folder / "plan.yaml", plan.recipe(model=model_ref, data=data_ref, batch=c.batch))
        res = CompressResult(folder, c, src, plan)
        if plan_only:
            res.message = "plan only: no search was run"
            return res
        name = study or _study_name(rm, c, sp.key(), metric_name)
        s = st.open_study(
            url,
            name,
            sampler=sampler,
            heartbeat_s=heartbeat_s,
            seed=seed,
            population=max(4, min(12, trials // 3)),
        )
        if own:
            st.recover_interrupted(s)
        if not s.get_trials(deepcopy=False) and not s.user_attrs.get("planned"):
            s.set_user_attr("planned", True)
            s.enqueue_trial(plan.params)  # the planner's choice is the first candidate
        ev = Evaluator(
            rm,
            data=data,
            judge=judge,
            analysis=analysis,
            constraints=c,
            space=sp,
            model_ref=model_ref,
            data_ref=data_ref,
        )
        objective = _objective(ev, c, src, trials_dir)
        say(f"searching ({sampler}, {sp.size()} candidates, {trials} trials)")
        deadline = start + time_budget_s
        res.stopped = st.optimize(
            s,
            objective,
            trials=trials,
            deadline=deadline,
            stop_when_met=stop_when_met,
            on_trial=on_trial,
        )
        if worker:
            res.message = f"worker {st.worker_id()} done: {res.stopped}"
            return res
        if not own:
            st.drain(
                s,
                objective,
                until=max(deadline, time.monotonic()) + 5 * heartbeat_s,
                heartbeat_s=heartbeat_s,
            )
        rows = st.results(s)
    chosen, front = st.choose(rows)
    res.chosen = chosen
    if chosen is not None:
        say(f"rebuilding trial {chosen} into {folder}")
        res.deployed = _rebuild(s, chosen, rm, data, judge, folder, c, src, res, metric_name)
    res.message = _message(c, src, rows, chosen, front, res.deployed)
    res.search = {
        "objectives": list(st.OBJECTIVES),
        "directions": list(st.DIRECTIONS),
        "constraints": c.to_dict(),
        "source": src.values(),
        "trials": rows,
        "chosen": chosen,
        "message": res.message,
    }
    write_json(folder / "search.json", res.search)
    from slimkit.report import try_report

    try_report(folder)  # drawn again with the Pareto front (also when no candidate met the goals)
    return res


def _constraints(c: Constraints | Mapping[str, Any] | None) -> Constraints:
    if isinstance(c, Constraints):
        return c
    if c is None:
        raise ConfigError(
            "compress needs constraints",
            fix="pass sk.Constraints(size_mb=..., latency_ms=..., max_drop=...)",
        )
    return Constraints.from_dict(c)


def _out_dir(out: PathLike | None) -> Path:
    from slimkit.pipeline.artifact import check_out_dir

    if out is None:
        return Path(tempfile.mkdtemp(prefix="slimkit-compress-"))
    d = check_out_dir(out)
    d.mkdir(parents=True, exist_ok=True)
    return d


def _resolve(model: Any, example_inputs: Any, data: Any, progress: bool) -> ResolvedModel:
    if isinstance(model, ResolvedModel):
        rm = model
    elif isinstance(model, nn.Module):
        rm = ResolvedModel(model, type(model).__name__, "python object")
    elif isinstance(model, str):
        from slimkit.pipeline.refs import resolve_model

        rm = resolve_model(model, progress=progress)
    else:
        raise ConfigError(
            f"model is a {type(model).__name__}",
            fix="pass an nn.Module or a reference such as zoo:digits_cnn",
        )
    if example_inputs is not None:
        x = example_inputs
        rm.example_inputs = (x,) if isinstance(x, torch.Tensor) else tuple(x)
    elif rm.example_inputs is None and data is not None and not isinstance(data, str):
        from slimkit.core.data import collect_batches

        rm.example_inputs = tuple(t[:1] for t in collect_batches(data, limit=1)[0].inputs)
    if rm.example_inputs is None:
        raise ConfigError(
            f"slimkit cannot tell the input shape of {rm.name}",
            fix="pass example_inputs=(x,) or data=batches",
        )
    rm.model.eval()
    return rm


def _methods() -> list[str]:
    from slimkit.core.registry import load_methods

    return load_methods().names()


def _training(rm: ResolvedModel, data: Any) -> str | None:
    """How a candidate recovers after a structural change: the zoo task's ``finetune`` step, or
    distillation on the given data."""
    if rm.task is not None:
        return "finetune"
    return "distill.response" if data is not None and "distill.response" in _methods() else None


def _study_name(rm: ResolvedModel, c: Constraints, space_key: str, metric: str) -> str:
    text = json.dumps([rm.source, rm.name, c.to_dict(), space_key, metric], sort_keys=True)
    return f"compress-{rm.name}-{hashlib.sha256(text.encode()).hexdigest()[:10]}"


def _objective(ev: Evaluator, c: Constraints, src: Deployed, folder: Path) -> Callable[[Any], Any]:
    import optuna

    def objective(trial: Any) -> tuple[float, float, float]:
        params = ev.space.suggest(trial)
        trial.set_user_attr("worker", st.worker_id())  # once its candidate is known
        try:
            o = ev.evaluate(params, folder / f"{trial.number:04d}")
        except Rejected as r:
            est = {"metric": src.metric, **r.estimate}
            _set_constraints(trial, c.violations(est, src.metric))
            trial.set_user_attr("note", r.note)
            raise optuna.TrialPruned(r.note) from None
        except Exception as e:
            trial.set_user_attr("note", f"failed: {type(e).__name__}: {e}"[:400])
            raise
        viol = c.violations(o.deployed.values(), src.metric)
        feasible = all(v <= 0 for v in viol.values())
        missed = ", ".join(f"{k} over by {v:.3g}" for k, v in viol.items() if v > 0)
        _set_constraints(trial, viol)
        trial.set_user_attr("feasible", feasible)
        trial.set_user_attr("recipe", o.recipe.to_dict())
        trial.set_user_attr("speedup", o.deployed.speedup)
        trial.set_user_attr("seconds", round(o.seconds, 2))
        trial.set_user_attr("note", "meets every goal" if feasible else f"misses: {missed}")
        d = o.deployed
        return d.metric, d.latency_ms, d.size_mb

    return objective


def _set_constraints(trial: Any, violations: dict[str, float]) -> None:
    for key, value in violations.items():
        trial.set_constraint(key, float(value))


def _rebuild(
    s: Any,
    number: int,
    rm: ResolvedModel,
    data: Any,
    judge: Judge,
    folder: Path,
    c: Constraints,
    src: Deployed,
    res: CompressResult,
    metric: str,
) -> Deployed:
    """Run the chosen trial's pinned recipe into the artifact and measure it again."""
    from slimkit.pipeline.artifact import write_metrics
    from slimkit.pipeline.recipe import Recipe
    from slimkit.pipeline.runner import run

    trial = next(t for t in s.get_trials(deepcopy=False) if t.number == number)
    rec = Recipe.from_dict(trial.user_attrs["recipe"])
    run_res = run(rec, model=rm, data=data, out=folder)
    if rec.model is None:  # a Python object: the saved recipe names no model, say so
        rec.save(folder / "recipe.yaml")
    deployed = judge.measure(folder / "model.onnx")
    info = run_res.to_dict()
    info["compress"] = {
        "constraints": c.to_dict(),
        "metric": metric,
        "trial": number,
        "searched": dict(zip(st.OBJECTIVES, trial.values, strict=True)),
        "remeasured": deployed.to_dict(),
        "source": src.to_dict(),
        "plan": res.plan.to_dict(),
        "met_on_remeasure": all(
            v <= 0 for v in c.violations(deployed.values(), src.metric).values()
        ),
    }
    # the report's source-vs-result cards (its metric rows read the test split: the search's
    # val metric stays in search.json)
    info["measured"] = {"size_mb": {"source": src.size_mb, "result": deployed.size_mb}}
    if c.batch == 1:
        info["measured"]["latency_ms"] = {"source": src.latency_ms, "result": deployed.latency_ms}
    write_metrics(folder, info)
    return deployed


def _message(
    c: Constraints,
    src: Deployed,
    rows: list[dict[str, Any]],
    chosen: int | None,
    front: list[dict[str, Any]],
    deployed: Deployed | None,
) -> str:
    done = sum(r["state"] == "complete" for r in rows)
    if chosen is not None and deployed is not None:
        v = deployed
        again = c.violations(v.values(), src.metric)
        text = (
            f"trial {chosen} meets every goal ({c.describe()}): metric {v.metric:.4g} "
            f"(source {src.metric:.4g}), {v.latency_ms:.3g} ms ({v.speedup:.2f}x), "
            f"{v.size_mb:.3g} MB (source {src.size_mb:.3g} MB), re-measured after rebuilding"
        )
        over = [k for k, x in again.items() if x > 0]
        if over:
            text += (
                f"; on re-measurement it misses {', '.join(over)} (this machine's timing "
                "noise is 10-15 %): set the budget with a margin"
            )
        return text
    if not done:
        return (
            f"no trial completed ({len(rows)} finished: pruned by the proxies or failed): "
            "no candidate of the space is predicted to meet "
            + c.describe()
            + "; loosen the goals or give the search more time"
        )
    scale = {
        "size_mb": c.size_mb or 1.0,
        "latency_ms": c.latency_ms or 1.0,
        "drop": max(c.max_drop or 0.0, 1e-3),
    }
    near = sorted(
        front, key=lambda r: st.closeness(r, lambda v: c.violations(v, src.metric), scale)
    )[:3]
    pts = "; ".join(
        f"trial {r['number']}: metric {r['values']['metric']:.4g}, "
        f"{r['values']['latency_ms']:.3g} ms, {r['values']['size_mb']:.3g} MB"
        for r in near
    )
    return (
        f"no trial meets every goal ({c.describe()}) among {done} complete trials; the "
        f"closest Pareto points: {pts}"
    )
