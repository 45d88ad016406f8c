"""``sk.nas.search_arch``: supernet, latency table, search, extraction and fine-tuning in one call.

    import slimkit as sk
    res = sk.nas.search_arch("shapes", latency_ms=0.08, trials=60)   # NASResult
    res.model            # a plain nn.Module (ArchNet), fine-tuned; exports to ONNX
    res.arch.describe()  # 'w12 d1 k3 e4 | w24 d2 k35 e24 | ...'
    res.save("out/")     # model.safetensors, arch.yaml, model.onnx, search.json, metrics.json
    net = sk.nas.load("out/")                                         # the same network back

The steps are public too (``SuperNet``, ``train_supernet``, ``LatencyTable``, ``search``,
``finetune``), so a benchmark trains one supernet and searches it for several targets.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from slimkit.core.io import PathLike, load_into, load_weights, save_weights, write_json
from slimkit.errors import ConfigError
from slimkit.nas.darts import Darts, darts_search
from slimkit.nas.latency import LatencyTable, Validation, measure_archs, validate
from slimkit.nas.model import ArchNet
from slimkit.nas.search import (
    STRATEGIES,
    Candidate,
    Evaluator,
    SearchResult,
    search,
    seed_archs,
)
from slimkit.nas.space import Arch, CNNSpace, write_yaml
from slimkit.nas.supernet import SuperNet, recalibrate_bn, train, train_supernet


def check_task(space: CNNSpace, task: Any) -> None:
    """``ConfigError`` unless ``task`` is a classification task whose images fit ``space``."""
    want = (space.in_channels, space.input_size, space.input_size)
    if task.kind != "classification" or tuple(task.input_shape) != want:
        raise ConfigError(
            f"task {task.name!r} ({task.kind}, inputs {tuple(task.input_shape)}) does not fit the "
            f"search space (classification of {want} images)",
            fix="use an image classification task such as 'shapes', or set the space's "
            "in_channels and input_size to the task's input shape",
        )
    if task.num_classes != space.num_classes:
        raise ConfigError(
            f"task {task.name!r} has {task.num_classes} classes, the space {space.num_classes}",
            fix=f"set num_classes: {task.num_classes} in the space",
        )


def calibrated_table(
    space: CNNSpace,
    *,
    threads: int = 1,
    n_calib: int = 8,
    n_val: int = 8,
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
    cache: bool = True,
) -> tuple[LatencyTable, Validation]:
    """The latency table of ``space``, calibrated on ``n_calib`` whole networks (the largest,
    the smallest and random ones) and validated on ``n_val`` other random ones, all measured now.

    A cached table whose validation error exceeds ``STALE_ERROR`` (median, relative) is measured
    again and the cache replaced, once: a table cached while the machine was busy, or before a
    runtime upgrade, otherwise keeps mispredicting (``table.meta["refreshed"]`` says so).
    ``cache=False`` measures the entries afresh and leaves the cache alone."""
    table = LatencyTable.measure(space, threads=threads, progress=progress, cache=cache)
    rng = random.Random(seed)
    cal = [space.largest(), space.smallest(), *[space.sample(rng) for _ in range(n_calib - 2)]]
    held = [a for a in (space.sample(rng) for _ in range(4 * n_val)) if a not in cal][:n_val]
    measured = measure_archs(space, cal + held, threads=threads)

    def fit(t: LatencyTable) -> Validation:
        t.calibrate(space, cal, measured[: len(cal)])
        return validate(lambda a: t.predict(space, a), space, held, measured=measured[len(cal) :])

    check = fit(table)
    if table.meta.get("cached") and check.median_error > STALE_ERROR:
        stale = check.median_error
        table = LatencyTable.measure(space, threads=threads, progress=progress, refresh=True)
        check = fit(table)
        table.meta["refreshed"] = (
            f"the cached table mispredicted held-out networks by {stale:.1%} (median, over "
            f"{STALE_ERROR:.0%}): measured again, now {check.median_error:.1%}"
        )
    return table, check


# median relative error on held-out networks that makes a cached table measured again: a fresh
# table errs about 2 %, the one cached at load 6 (results/nas_stale_table.json) 6.2 %
STALE_ERROR = 0.05


VAL_IMAGES = 500  # the evaluator's proxy top-1 is measured on the first ones of the val split


def held_out(task: Any, batch_size: int = 64, *, skip: int = VAL_IMAGES) -> list[Any]:
    """``(inputs, targets)`` batches of the task's validation split after its first ``skip``
    images: data for DARTS' architecture steps that neither the weights nor the evaluator see."""
    xs, ys = task.val.tensors
    if len(xs) <= skip:
        raise ConfigError(
            f"task {task.name!r} has {len(xs)} validation images, DARTS needs more than {skip}",
            fix="use a task with a larger validation split, or another strategy",
        )
    return list(zip(xs[skip:].split(batch_size), ys[skip:].split(batch_size), strict=True))


def task_evaluator(net: SuperNet, task: Any, latency: Callable[[Arch], float], *, seed: int = 0,
                   calib_batches: int = 6, val_images: int = VAL_IMAGES) -> Evaluator:  # fmt: skip
    """An :class:`Evaluator` on a zoo task: BatchNorm re-estimated on ``calib_batches`` of 64
    training images, top-1 on the first ``val_images`` of the validation split."""
    loader = task.loader("train", 64, shuffle=True, seed=seed + 1)
    calib = [b for _, b in zip(range(calib_batches), loader, strict=False)]
    xs, ys = task.val.tensors
    val = list(zip(xs[:val_images].split(250), ys[:val_images].split(250), strict=True))
    return Evaluator(net, calib=calib, val=val, latency=latency)


def finetune(
    model: nn.Module,
    teacher: nn.Module | None,
    loader: Any,
    *,
    epochs: int,
    lr: float = 1e-3,
    alpha: float = 0.5,
    temperature: float = 2.0,
    seed: int = 0,
    progress: bool = True,
    max_steps: int | None = None,
) -> nn.Module:
    """Fine-tune ``model`` in place through ``core.train.fit``: cross entropy, plus (with a
    ``teacher``) ``alpha`` x softened KL to the teacher's output."""
    if teacher is not None:
        teacher.eval()

    def loss(m: nn.Module, batch: Any) -> torch.Tensor:
        x, y = batch
        out = m(x)
        ce = F.cross_entropy(out, y)
        if teacher is None:
            return ce
        with torch.no_grad():
            soft = F.softmax(teacher(x) / temperature, dim=-1)
        kd = F.kl_div(F.log_softmax(out / temperature, -1), soft, reduction="batchmean")
        return (1 - alpha) * ce + alpha * kd * temperature**2

    train(model, loader, loss, epochs=epochs, lr=lr, description="fine-tune", seed=seed,
          progress=progress, max_steps=max_steps)  # fmt: skip
    return model


@dataclass
class NASResult:
    """What :func:`search_arch` found: the fine-tuned network and the evidence."""

    space: CNNSpace
    arch: Arch
    model: nn.Module
    search: SearchResult
    metrics: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "arch": self.arch.to_dict(),
            "describe": self.arch.describe(),
            **self.metrics,
            "search": {k: v for k, v in self.search.to_dict().items() if k != "all"},
        }

    def save(self, out: PathLike, *, onnx: bool = True) -> Path:
        """Write the artifact folder: ``arch.yaml`` (space + architecture), ``model.safetensors``,
        ``model.onnx`` (checked in ORT), ``search.json`` (every trial), ``metrics.json``."""
        d = Path(out)
        d.mkdir(parents=True, exist_ok=True)
        write_yaml(d / "arch.yaml", {"space": self.space.to_dict(), "arch": self.arch.to_dict()})
        save_weights(self.model, d / "model.safetensors")
        if onnx:
            from slimkit.export.onnx import export_onnx

            x = torch.randn(1, self.space.in_channels, self.space.input_size, self.space.input_size)
            rep = export_onnx(self.model, d / "model.onnx", example_inputs=(x,))
            self.metrics["onnx_max_abs_error"] = rep.to_dict().get("max_abs_error")
        write_json(d / "search.json", self.search.to_dict())
        write_json(d / "metrics.json", self.to_dict())
        return d


def load(directory: PathLike) -> ArchNet:
    """The network of a :meth:`NASResult.save` folder (built from ``arch.yaml``, weights from
    ``model.safetensors``; no pickle), in eval mode."""
    import yaml

    d = Path(directory)
    spec = d / "arch.yaml"
    if not spec.is_file():
        raise ConfigError(
            f"{str(d)!r} holds no arch.yaml",
            fix="pass the folder that `slimkit nas --out` or NASResult.save wrote",
        )
    data = yaml.safe_load(spec.read_text(encoding="utf-8"))
    space = CNNSpace.from_dict(data.get("space"))
    net = ArchNet(space, Arch.from_dict(data.get("arch")))
    load_into(net, load_weights(d / "model.safetensors"))
    return net.eval()


def search_arch(
    task: str = "shapes",
    *,
    space: CNNSpace | None = None,
    latency_ms: float | None = None,
    trials: int = 60,
    strategy: str = "nsga2",
    supernet_epochs: int = 4,
    finetune_epochs: int = 2,
    batch_size: int = 64,
    threads: int = 1,
    seed: int = 0,
    max_steps: int | None = None,
    margin: float | None = None,
    measure_top: int = 8,
    measure_margin: float = 0.03,
    progress: bool = True,
    on_stage: Callable[[str], None] | None = None,
    on_trial: Callable[[int, Candidate], None] | None = None,
    darts: Darts | None = None,
) -> NASResult:
    """Find the most accurate architecture of ``space`` whose predicted ORT latency (batch 1,
    ``threads`` threads, this machine) is at most ``latency_ms`` on the zoo ``task``.

    Without ``latency_ms`` the target is halfway between the smallest and the largest network.
    Steps: measure and calibrate the latency table (cached per machine), train the supernet
    (sandwich rule), search (``"nsga2"``, ``"random"`` or ``"rl"``: ``trials`` architectures,
    each predicted under the target before it is evaluated; NSGA-II's first population seeded
    with :func:`~slimkit.nas.search.seed_archs`;
    ``"darts"``: the differentiable relaxation warm-started from the supernet, settings in
    ``darts``, alphas trained on the validation images the evaluator does not use), extract the
    best, fine-tune it with distillation from the largest sub-network, evaluate it on the test
    split and measure it in ORT. ``max_steps`` caps the optimizer steps of the supernet
    training and of the fine-tuning (a quick run). The search keeps a ``margin`` below the target (a
    fraction; default: the latency model's median error on its held-out networks), so that the
    chosen network still meets the target when measured; the goal never drops below the smallest
    network's prediction (``metrics["goal_ms"]``), so a target the space can meet always gives one.
    Hardware in the loop (``"nsga2"``, ``"random"``, ``"rl"``): ``measure_top`` of the best
    trials are measured in ORT as whole networks and the pick is made among those measured under
    ``target * (1 - measure_margin)`` (:meth:`~slimkit.nas.search.SearchResult.measured_best`;
    the table errs most at the edge of the budget, where the best trial sits); ``measure_top=0``
    trusts the table alone.
    """
    from slimkit.zoo.tasks import evaluate, load_task

    if strategy not in (*STRATEGIES, "darts"):
        raise ConfigError(f"unknown search strategy {strategy!r}",
                          fix=f"use one of {', '.join((*STRATEGIES, 'darts'))}")  # fmt: skip
    space = space or CNNSpace()
    t = load_task(task)
    check_task(space, t)
    stage = on_stage or (lambda _s: None)
    stage("latency table")
    table, check = calibrated_table(space, threads=threads, seed=seed)
    lo, hi = table.predict(space, space.smallest()), table.predict(space, space.largest())
    target = latency_ms if latency_ms is not None else (lo + hi) / 2
    if target < lo:
        raise ConfigError(
            f"the latency target {target:.4g} ms is below the smallest network of the space "
            f"({lo:.4g} ms predicted)",
            fix=f"ask for at least {lo:.4g} ms, or add smaller choices",
        )
    stage("supernet")
    torch.manual_seed(seed)
    net = SuperNet(space)
    kw: dict[str, Any] = {"seed": seed, "progress": progress, "max_steps": max_steps}
    train_supernet(net, t.loader("train", batch_size, shuffle=True, seed=seed),
                   epochs=supernet_epochs, **kw)  # fmt: skip
    ev = task_evaluator(net, t, lambda a: table.predict(space, a), seed=seed)
    calib = ev.calib
    margin = check.median_error if margin is None else margin
    # the margin never rules out the whole space: a target just above the smallest network with a
    # large held-out error (a busy machine) would leave nothing to search, so the goal stops at it
    goal = max(target * (1 - margin), lo)
    if strategy == "darts":
        stage("search (darts)")
        cfg = darts or Darts()
        if max_steps is not None and cfg.max_steps is None:
            cfg = cfg.replace(max_steps=max_steps)
        loader = t.loader("train", batch_size, shuffle=True, seed=seed + 2)
        res = darts_search(net, table, train_loader=loader, val=held_out(t, batch_size),
                           target_ms=goal, evaluate=ev, config=cfg, seed=seed,
                           progress=progress)  # fmt: skip
        if on_trial is not None:
            on_trial(1, res.trials[0])
    else:
        stage(f"search ({strategy}, {trials} trials)")
        initial = seed_archs(space, ev.latency, goal) if strategy == "nsga2" else []
        res = search(space, ev, trials=trials, target_ms=goal, strategy=strategy, seed=seed,
                     on_trial=on_trial, latency=ev.latency, initial=initial)  # fmt: skip
    if res.best is None and strategy != "darts":
        # every trial was drawn over a goal at the smallest network's prediction: that one meets it
        res.trials.append(ev(space.smallest()))
    best = res.best
    picked_by = "table"
    if strategy != "darts" and measure_top > 0 and best is not None:
        stage("measure the best trials")
        best = res.measured_best(lambda archs: measure_archs(space, archs, threads=threads),
                                 target * (1 - measure_margin), top=measure_top)  # fmt: skip
        picked_by = "measured"
    if best is None:  # pragma: no cover - the smallest network meets any target >= lo
        raise ConfigError("no architecture met the latency target", fix="raise --latency-ms")
    stage("fine-tune")
    model = net.extract(best.arch)
    recalibrate_bn(model, calib)
    teacher = recalibrate_bn(net.extract(space.largest()), calib)
    loader = t.loader("train", batch_size, shuffle=True, seed=seed)
    finetune(model, teacher, loader, epochs=finetune_epochs, **kw)
    stage("measure")
    measured = measure_archs_trained(space, model, threads=threads)
    metrics = {
        "task": task,
        "target_ms": target,
        "strategy": strategy,
        "top1": evaluate(model, t, "test")["top1"],
        "search_top1_val": best.top1,
        "predicted_ms": best.latency_ms,
        "margin": margin,
        "goal_ms": goal,
        "picked_by": picked_by,
        "measured_ms": measured,
        "meets_target": measured <= target,
        "params": best.params,
        "latency_model": {
            **check.to_dict(),
            "scale": table.scale,
            "offset": table.offset,
            "entries": len(table.entries),
            "threads": threads,
            # where the entries came from: this run, the cache, or the cache found stale
            "table": table.meta.get("refreshed")
            or ("cached" if table.meta.get("cached") else "measured"),
        },
    }
    return NASResult(space, best.arch, model, res, metrics)


def measure_archs_trained(space: CNNSpace, model: nn.Module, *, threads: int = 1) -> float:
    """Whole-network ORT ms (lower quartile, batch 1) of a built model."""
    from slimkit.nas.latency import ort_times

    x = torch.randn(1, space.in_channels, space.input_size, space.input_size)
    return ort_times({"m": (model, x)}, threads=threads)["m"]["ms"]
