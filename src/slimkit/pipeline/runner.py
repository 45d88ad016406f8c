"""Run a recipe: resolve its references, apply its steps in order, export, write the artifact.

Every command that produces an artifact (``slimkit quantize``, ``prune``, ``export``, ``run``)
goes through here, so they resolve references, call methods and write files the same way::

    import slimkit as sk
    result = sk.run("recipe.yaml", out="artifact/")              # references from the recipe
    result = sk.run(recipe, model=my_model, data=calib, example_inputs=(x,), out="artifact/")
    result.model, result.recipe, result.onnx     # result.recipe: the run, every choice pinned

Steps dispatch by technique: a ``quant.*`` step calls ``slimkit.quantize`` with its config
object, ``prune.*`` ``slimkit.prune``, ``graph_opt.*`` ``slimkit.optimize`` (the verbs dispatch
through the registry, with the checks of ``core.verbs.dispatch``); the built-in ``finetune`` step
and ``quant.ptq`` with ``max_drop`` (``quant.fallback``) run here. Choices a method makes by timing
or searching are written back into the recipe the run returns (and saves), so running that recipe
again repeats the artifact: PTQ's timed float prefix becomes ``float_prefix: [layer names]``, a
``max_drop`` search becomes ``scope.exclude``, a measured ``prune.auto`` speed-up target becomes
the MAC budget it chose. The run is seeded with the recipe's ``seed``.
"""

from __future__ import annotations

import copy
import inspect
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from slimkit.core.config import Config
from slimkit.core.io import PathLike
from slimkit.errors import ConfigError
from slimkit.pipeline.recipe import Finetune, Recipe, ScopeSpec, Step, absolute_ref
from slimkit.pipeline.refs import ResolvedModel, default_data, resolve_data, resolve_model

Model = nn.Module | ResolvedModel | str
OnStep = Callable[["StepRecord", nn.Module], None]


@dataclass
class StepRecord:
    """What one step did: its pinned step, how it was called, its time and its details."""

    step: Step
    via: str  # "slimkit.quantize", "handler prune.nm", "pipeline"
    seconds: float
    details: dict[str, Any] = field(default_factory=dict)  # quant meta / pruning summary / ...

    @property
    def name(self) -> str:
        return self.step.name

    def to_dict(self) -> dict[str, Any]:
        return {**self.step.to_dict(), "via": self.via, "seconds": round(self.seconds, 3),
                "details": self.details}  # fmt: skip


@dataclass
class RunResult:
    """A finished run. ``recipe`` is the recipe as run, every timed or searched choice pinned:
    saving and running it again gives the same artifact."""

    recipe: Recipe
    model: nn.Module
    source: ResolvedModel  # the model the recipe started from (not modified)
    steps: list[StepRecord]
    seconds: float
    onnx: Any = None  # ExportReport once exported
    kernels: Any = None  # KernelReport for int8 models
    out: Path | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def export_kind(self) -> str:
        """How the result deploys: ``qdq`` (integer ONNX), ``ort`` (already an ONNX Runtime
        model), or ``onnx`` (a float export) -- the registry's ``export`` of the last quant step."""
        return export_kind(self.model, [s.name for s in self.steps])

    @property
    def quant_method(self) -> str | None:
        """The quantization method the result carries (``quant.ptq``, ...), or None."""
        return quant_method(self.model) or next(
            (s.name for s in reversed(self.steps) if s.name.startswith("quant.")), None
        )

    def example_inputs(self, batch: int = 1) -> tuple[torch.Tensor, ...]:
        return self.source.inputs(batch)

    def to_dict(self) -> dict[str, Any]:
        from slimkit.core.machine import machine_info, versions

        return {
            "model": self.recipe.model or self.source.source,
            "recipe": self.recipe.to_dict(),
            "steps": [s.to_dict() for s in self.steps],
            "tool_s": round(self.seconds, 2),
            "onnx": self.onnx.to_dict() if self.onnx is not None else None,
            "kernels": self.kernels.to_dict() if self.kernels is not None else None,
            "notes": self.notes,
            "machine": machine_info(),
            "versions": versions(),
        }


def quant_method(model: nn.Module) -> str | None:
    """``model.meta["slimkit"]["method"]`` of a quantized graph (``quant.ptq``), else None."""
    meta = getattr(model, "meta", None)
    info = meta.get("slimkit") if isinstance(meta, dict) else None
    method = info.get("method") if isinstance(info, dict) else None
    return method if isinstance(method, str) and method.startswith("quant") else None


def export_kind(model: nn.Module, steps: list[str]) -> str:
    """``qdq``, ``ort`` or ``onnx`` for ``model``, the result of ``steps`` (see ``RunResult``)."""
    from slimkit.core.registry import load_methods

    methods = load_methods()
    for name in reversed(steps):
        kind = methods.entry(name).meta.get("export") if name in methods else None
        if name.startswith("quant.") and kind:
            return str(kind)
    if quant_method(model) == "quant.ptq":
        return "qdq"
    return "ort" if type(model).__name__ == "OrtModule" else "onnx"


def as_recipe(recipe: Recipe | Mapping[str, Any] | PathLike) -> Recipe:
    """A ``Recipe`` from a Recipe, a parsed mapping, or the path of a YAML file."""
    if isinstance(recipe, Recipe):
        return recipe
    if isinstance(recipe, Mapping):
        return Recipe.from_dict(recipe)
    return Recipe.load(recipe)


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (a run and its rerun draw the same numbers)."""
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def run(
    recipe: Recipe | Mapping[str, Any] | PathLike,
    *,
    model: Model | None = None,
    data: Any = None,
    example_inputs: tuple[torch.Tensor, ...] | torch.Tensor | None = None,
    metric: Callable[[nn.Module], float] | None = None,
    out: PathLike | None = None,
    progress: bool = False,
    on_step: OnStep | None = None,
    on_event: Callable[[str], None] | None = None,
) -> RunResult:
    """Run ``recipe`` (a ``Recipe``, a mapping, or a YAML path) and return the result.

    ``model`` overrides the recipe's model: an ``nn.Module``, a reference string, or a resolved
    model; ``data`` its data (batches or a reference); ``example_inputs`` the inputs used to trace
    and export (default: the reference's known inputs, else the first batch of ``data``);
    ``metric(model) -> float`` (higher is better) is what a ``max_drop`` step keeps (default: the
    zoo task's validation top-1 or negated perplexity). With ``out`` the artifact is written
    there: ``model.safetensors`` (+ ``pruning.json``), ``model.onnx``, ``recipe.yaml``,
    ``metrics.json``. ``on_step(record, model)`` is called after each step.
    """
    rec = as_recipe(recipe)
    if out is not None:
        from slimkit.pipeline.artifact import check_out_dir

        check_out_dir(out)  # a bad --out fails before any compute
    seed_everything(rec.seed)
    say = on_event or (lambda _m: None)
    say("resolving the model")
    source = _source(rec, model, example_inputs, data, progress)
    ctx = _Context(rec, source, data, metric, progress)
    ctx.out = Path(out) if out is not None else None
    current, records, notes = source.model, [], []
    macs = _macs(current, ctx)
    for i, step in enumerate(rec.steps):
        say(f"step {i + 1}/{len(rec.steps)}: {step.name}")
        t0 = time.perf_counter()
        current, record = _apply(step, current, ctx)
        record.seconds = time.perf_counter() - t0
        after = _macs(current, ctx)
        if macs is not None and after is not None:  # what the report's steps table shows
            record.details.setdefault("changed", {})["macs"] = [macs, after]
        macs = after
        if record.via.startswith("handler"):
            notes.append(f"{step.name}: no verb for its technique; its handler was called")
        records.append(record)
        if on_step is not None:
            on_step(record, current)
    given_model = isinstance(model, nn.Module)
    if given_model:
        notes.append(
            "the model was a Python object: the recipe's model reference (if any) "
            "is what a rerun resolves"
        )
    if data is not None and not isinstance(data, str):
        notes.append("the data was a Python object: the recipe records no data reference")
    # references as absolute paths (the recipe is written elsewhere); Python objects have none
    data_ref = ctx.data_ref or (data if isinstance(data, str) else None)
    if data is None and data_ref is None:
        data_ref = rec.path(rec.data)
    resolved = rec.replace(
        model=absolute_ref(rec.path(rec.model) if given_model else source.source),
        weights=absolute_ref(rec.path(rec.weights)),
        steps=tuple(r.step for r in records),
        data=absolute_ref(data_ref),
        base=None,
    )
    result = RunResult(resolved, current, source, records,
                       sum(r.seconds for r in records), notes=notes)  # fmt: skip
    if out is not None:
        from slimkit.pipeline.artifact import write_artifact

        say("exporting and writing the artifact")
        write_artifact(result, out)
    return result


class _Context:
    """What steps share: the source, the data (resolved once, on first need), the metric."""

    def __init__(
        self,
        rec: Recipe,
        source: ResolvedModel,
        data: Any,
        metric: Callable[[nn.Module], float] | None,
        progress: bool,
    ) -> None:
        self.rec, self.source, self.metric, self.progress = rec, source, metric, progress
        self._data = data
        self.explicit_data = data is not None or rec.data is not None
        self.data_ref: str | None = None  # the reference the data came from, as recorded
        self.out: Path | None = None  # the artifact folder: fine-tuning checkpoints go there
        self.done: list[Step] = []  # the steps applied so far (what a checkpoint depends on)

    def data(self, need: str | None = None) -> Any:
        """The data: given, named by the recipe, or (``need`` set) the zoo model's own."""
        if self._data is None or isinstance(self._data, str):
            ref = self._data if isinstance(self._data, str) else self.rec.path(self.rec.data)
            if ref is None and need is not None:
                ref = default_data(self.source)
                if ref is None:
                    raise ConfigError(
                        f"step {need} needs data and the recipe names none",
                        fix="add `data:` to the recipe (zoo:TASK, file.npz, package.module:loader)"
                        " or pass data=... to slimkit.run",
                    )
            if ref is None:
                return None
            self._data = resolve_data(ref, batch_size=self.rec.batch_size)
            self.data_ref = absolute_ref(ref)
        return self._data

    def example(self) -> tuple[torch.Tensor, ...] | None:
        return self.source.inputs(1) if self.source.example_inputs is not None else None

    def task(self, what: str) -> Any:
        if self.source.task is None:
            raise ConfigError(
                f"{what} needs a model with a bundled task (a trained zoo model)",
                fix="use a zoo model with a task (slimkit zoo list), or do it in Python "
                "(slimkit.prune.recover, slimkit.quant.fallback.quantize_with_fallback)",
            )
        from slimkit.zoo import load_task

        return load_task(self.source.task)


def _source(
    rec: Recipe, model: Model | None, example_inputs: Any, data: Any, progress: bool
) -> ResolvedModel:
    if isinstance(model, ResolvedModel):
        rm = model
    elif isinstance(model, nn.Module):
        rm = ResolvedModel(model, type(model).__name__, "python object")
    else:
        ref = model if isinstance(model, str) else rec.path(rec.model)
        if ref is None:
            raise ConfigError(
                "the recipe names no model",
                fix="add `model: zoo:NAME` (or file.pt2, package.module:factory) to the recipe, "
                "or pass model=... to slimkit.run",
            )
        rm = resolve_model(ref, weights=rec.path(rec.weights), input_shape=rec.input_shape,
                           progress=progress)  # fmt: skip
    if example_inputs is not None:
        rm.example_inputs = (
            (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs)
        )
    elif rm.example_inputs is None and data is not None and not isinstance(data, str):
        from slimkit.core.data import collect_batches

        rm.example_inputs = tuple(t[:1] for t in collect_batches(data, limit=1)[0].inputs)
    return rm


def _callee(name: str) -> tuple[Callable[..., Any], str, bool]:
    """The function a step calls, how the record names it, and whether it is a verb: the verb of
    the method's technique (``core.verbs.TECHNIQUES``), else the registered handler."""
    from slimkit.core.registry import load_methods
    from slimkit.core.verbs import TECHNIQUES

    entry = load_methods().entry(name)
    tech = TECHNIQUES.get(name.partition(".")[0])
    if tech is None:
        return entry.obj, f"handler {name}", False
    import slimkit

    return getattr(slimkit, tech.verb), f"slimkit.{tech.verb}", True


def _accepted(fn: Callable[..., Any], kwargs: dict[str, Any]) -> dict[str, Any]:
    """The keyword arguments ``fn``'s signature names (all of them when it takes ``**kw``)."""
    params = inspect.signature(fn).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return kwargs
    return {k: v for k, v in kwargs.items() if k in params}


def _apply(step: Step, model: nn.Module, ctx: _Context) -> tuple[nn.Module, StepRecord]:
    try:
        return _apply_step(step, model, ctx)
    finally:
        ctx.done.append(step)


def _apply_step(step: Step, model: nn.Module, ctx: _Context) -> tuple[nn.Module, StepRecord]:
    if step.name == "finetune":
        return _finetune(step, model, ctx)
    if step.name.startswith("distill."):
        return _distill(step, model, ctx)
    if step.max_drop is not None:
        return _fallback(step, model, ctx)
    technique = step.name.partition(".")[0]
    kwargs: dict[str, Any] = {}
    example = ctx.example()
    if example is not None:
        kwargs["example_inputs"] = example
    if step.scope is not None:
        kwargs["scope"] = step.scope.to_scope()
    trains = step.name == "quant.qat" or (
        step.name == "quant.lowbit" and getattr(step.config, "epochs", 0) > 0
    )
    where = None
    if trains and not ctx.explicit_data and ctx.source.task is not None:
        kwargs["data"] = _train_split(ctx, step)  # training, not the calibration samples
        where = f"{ctx.source.task} train split"
    elif technique == "quant" or getattr(step.config, "allocation", None) == "sensitivity":
        kwargs["data"] = ctx.data(need=step.name)  # calibration: the zoo model's own by default
    elif ctx.explicit_data:
        kwargs["data"] = ctx.data()
    fn, via, is_verb = _callee(step.name)
    if not is_verb:
        kwargs = _accepted(fn, kwargs)
    out = fn(model, step.config, **kwargs)
    if isinstance(out, tuple):  # handlers that also return a report: (model, report)
        out = out[0]
    pinned = _pin(step, out)
    details = _details(out)
    if where is not None:
        details["data"] = where
    return out, StepRecord(pinned, via, 0.0, details)


def _macs(model: nn.Module, ctx: _Context) -> int | None:
    """Multiply-accumulates of ``model`` at batch 1 on the run's example inputs; None where they
    cannot be counted (no example inputs, or a model the profiler cannot run)."""
    from slimkit.analyze.profile import profile_model

    example = ctx.example()
    if example is None:
        return None
    try:
        return int(profile_model(model, example).total_macs)
    except Exception:  # counting is a courtesy of the report: it never fails a run
        return None


def _pin(step: Step, out: nn.Module) -> Step:
    """The step with the choices the method made by timing or searching written in."""
    cfg: Config = step.config
    if step.name == "quant.ptq" and (
        isinstance(getattr(cfg, "float_prefix", None), bool) or getattr(cfg, "speed_check", False)
    ):  # timed: the float prefix and the layers (or whole model) kept float for speed
        meta = getattr(out, "meta", {}).get("slimkit", {})  # True: timed; False: none
        cfg = cfg.replace(float_prefix=list(meta.get("float_prefix_layers", [])),
                          speed_check=False)  # fmt: skip
    if step.name == "quant.mixed" and getattr(cfg, "plan", None) is None:
        # solved from sensitivities under a budget: the plan it chose, applied exactly on rerun
        plan = getattr(out, "meta", {}).get("slimkit", {}).get("plan")
        if isinstance(plan, dict) and plan:
            cfg = cfg.replace(plan=dict(plan))
    speedup = getattr(cfg, "speedup", None)
    if step.name == "prune.auto" and speedup is not None and getattr(cfg, "hw", None) is None:
        from slimkit.prune import pruning_record  # measured here: pin the MAC budget it chose

        auto = (pruning_record(out) or {}).get("auto", {})
        budget = _searched_budget(auto.get("search", []), float(speedup))
        if budget is not None:
            cfg = cfg.replace(speedup=None, macs=budget)
    return Step(step.name, cfg, step.scope, step.max_drop)


def _searched_budget(search: list[dict[str, Any]], target: float) -> float | None:
    """The exact MAC budget the speed-up bisection ended on (its steps are dyadic), replayed
    from the recorded search; None if the record does not replay consistently."""
    lo, hi, best = 0.0, 1.0, None
    for s in search:
        t = (lo + hi) / 2
        if round(t, 4) != s.get("macs"):
            return None
        if s["speedup"] >= target:
            best, lo = t, t
        else:
            hi = t
    return best


def _details(model: nn.Module) -> dict[str, Any]:
    """What the step did, from the verb's report (``sk.report``): the method's record (the kept
    indices of a pruning record stay in pruning.json), what changed, and its notes."""
    from slimkit.core.verbs import report
    from slimkit.errors import SlimkitError

    try:
        rep = report(model)
    except SlimkitError:
        return {}
    record = {k: v for k, v in rep.record.items() if k != "slices"}
    return {**record, "changed": rep.changed, "notes": rep.notes}


def _finetune(step: Step, model: nn.Module, ctx: _Context) -> tuple[nn.Module, StepRecord]:
    from slimkit.prune.recover import recover

    cfg = step.config
    assert isinstance(cfg, Finetune)
    task = ctx.task("the finetune step")
    if model is ctx.source.model:  # the source stays as it was (it is the teacher)
        model = copy.deepcopy(model)
    ckpt = _checkpoint_path(step, ctx)
    res = recover(model, task.loader("train", cfg.batch_size, shuffle=True),
                  teacher=ctx.source.model if cfg.distill else None, epochs=cfg.epochs,
                  lr=cfg.lr, temperature=cfg.temperature, alpha=cfg.alpha,
                  progress=ctx.progress, checkpoint=ckpt)  # fmt: skip
    model.eval()
    details: dict[str, Any] = {"task": task.name}
    resumed = getattr(res, "resumed_from", None)
    if resumed is not None:  # a killed run's checkpoint: it goes on, and says so
        details["resumed_from_epoch"] = resumed
        if ctx.progress:
            import sys

            print(f"finetune: resumed from the checkpoint after epoch {resumed}", file=sys.stderr)
    if ckpt is not None:
        ckpt.unlink(missing_ok=True)  # done: a rerun starts over
    best = getattr(res, "best_value", None)
    if isinstance(best, float):
        details["best_value"] = best
    return model, StepRecord(step, "pipeline", 0.0, details)


def _train_split(ctx: _Context, step: Step) -> Any:
    """The bundled task's shuffled training split (batches of 64), for the training steps."""
    return ctx.task(f"the {step.name} step").loader("train", 64, shuffle=True)


def _distill(step: Step, model: nn.Module, ctx: _Context) -> tuple[nn.Module, StepRecord]:
    """A distillation step: the recipe's source model is the teacher, and the data is the
    recipe's explicit data, else the bundled task's shuffled training split."""
    import slimkit as sk

    if ctx.explicit_data:
        data, where = ctx.data(), "the recipe's data"
    else:
        data, where = _train_split(ctx, step), f"{ctx.source.task} train split"
    ckpt = _checkpoint_path(step, ctx)
    out = sk.distill(model, ctx.source.model, step.config, data=data, checkpoint=ckpt,
                     progress=ctx.progress)  # fmt: skip
    if ckpt is not None:
        ckpt.unlink(missing_ok=True)  # done: a rerun starts over
    details = {**_details(out), "data": where}
    return out, StepRecord(step, "slimkit.distill", 0.0, details)


def _checkpoint_path(step: Step, ctx: _Context) -> Path | None:
    """Where a fine-tuning step keeps its per-epoch checkpoint: in the artifact folder, named by
    a hash of everything the training depends on (model, data, seed, the steps before it and
    its own config), so a checkpoint is only ever resumed by the same run."""
    if ctx.out is None:
        return None
    import hashlib
    import json

    key = json.dumps({
        "model": str(ctx.rec.model), "data": str(ctx.rec.data), "seed": ctx.rec.seed,
        "steps": [[s.name, s.config.to_dict()] for s in [*ctx.done, step]],
    }, sort_keys=True, default=str)  # fmt: skip
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    ctx.out.mkdir(parents=True, exist_ok=True)
    return ctx.out / f".finetune-{digest}.ckpt"


def _fallback(step: Step, model: nn.Module, ctx: _Context) -> tuple[nn.Module, StepRecord]:
    """``quant.ptq`` with ``max_drop``: the fewest float layers within the drop, pinned as the
    step's ``scope.exclude`` (and its timed float prefix as ``float_prefix``)."""
    from slimkit.quant.fallback import quantize_with_fallback

    metric = ctx.metric or _task_metric(ctx.task(f"{step.name} with max_drop"))
    assert step.max_drop is not None
    scope = step.scope.to_scope() if step.scope is not None else None
    q, report = quantize_with_fallback(model, step.config, data=ctx.data(need=step.name),  # type: ignore[arg-type]
                                       metric=metric, max_drop=step.max_drop, scope=scope,
                                       example_inputs=ctx.example())  # fmt: skip
    meta = q.meta["slimkit"]
    cfg = step.config.replace(float_prefix=list(meta["float_prefix_layers"]), speed_check=False)
    spec = step.scope or ScopeSpec()
    spec = spec.replace(exclude=[*spec.exclude, *(re.escape(n) for n in report.float_layers)])
    pinned = Step(step.name, cfg, spec if spec.to_dict() != ScopeSpec().to_dict() else None)
    details = {**meta, "fallback": report.to_dict(), "fallback_summary": report.summary()}
    return q, StepRecord(pinned, "slimkit.quant.fallback.quantize_with_fallback", 0.0, details)


def _task_metric(task: Any) -> Callable[[nn.Module], float]:
    """The task's validation metric, higher is better (top-1, or negated perplexity)."""
    from slimkit.zoo import evaluate

    key = "top1" if task.kind == "classification" else "perplexity"
    sign = 1.0 if key == "top1" else -1.0

    def metric(m: nn.Module) -> float:
        return sign * float(evaluate(m, task, "val")[key])

    return metric
