"""The one fine-tuning loop: zoo training, pruning recovery, QAT and distillation call :func:`fit`.

    result = fit(model, task.loader("train", 64, shuffle=True), epochs=5, lr=3e-3,
                 val_fn=lambda m: evaluate(m, task, "val")["top1"], checkpoint="run.ckpt")

- ``loss_fn(model, batch) -> scalar tensor``; the default, :func:`cross_entropy`, takes ``(x, y)``
  batches of classifiers (logits (B, C)) and language models (logits (B, T, V)).
- A rich progress bar (transient) shows epoch, step and loss when running in a terminal.
- ``checkpoint``: after every epoch the model, optimizer, scheduler, epoch, history and RNG
  state are saved atomically (plain tensors and containers, read back with ``weights_only=True``);
  when the file exists at the start, training resumes from it and ends with the same weights as a
  run that was never interrupted. Each epoch reseeds the global RNG and the loader's generator
  from ``seed`` and the epoch number, so the data order does not depend on where a run resumed.
- The model trains in train mode, ``val_fn`` sees it in eval mode, and it is returned in eval mode.
- **Data parallel** under ``torchrun`` (``torch.distributed``: gloo on CPU, nccl on GPU): when the
  process group is initialised, or the launcher's ``WORLD_SIZE`` is above 1 (then ``fit``
  initialises it), the model is wrapped in ``DistributedDataParallel``, each process takes every
  ``world``-th batch of the same seeded order, gradients are averaged across processes, the
  reported loss is the mean over all of them, and only rank 0 writes the checkpoint (every rank
  resumes from it). One process runs the same code path without the wrapper.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from slimkit.core.io import PathLike, atomic_path, load_into, safe_torch_load
from slimkit.errors import CheckpointError, ConfigError, DataError

LossFn = Callable[[nn.Module, Any], torch.Tensor]


@dataclass
class TrainResult:
    """What :func:`fit` did: one ``history`` entry per epoch (``epoch``, ``loss`` = mean train loss,
    ``lr``, ``seconds``, and ``val`` when a ``val_fn`` was given)."""

    history: list[dict[str, float]] = field(default_factory=list)
    best_val: float | None = None
    best_epoch: int | None = None
    epochs_run: int = 0
    steps: int = 0
    stopped_early: bool = False
    resumed_from: int | None = None  # the epoch a checkpoint had reached, when resuming

    @property
    def final_loss(self) -> float | None:
        return self.history[-1]["loss"] if self.history else None


def cross_entropy(model: nn.Module, batch: Any) -> torch.Tensor:
    """Mean cross entropy of ``model(x)`` against ``y`` for an ``(x, y)`` batch; logits of any rank
    (classes on the last axis)."""
    x, y = batch
    out = model(x)
    return nn.functional.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))


def _to(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, Mapping):
        return {k: _to(v, device) for k, v in batch.items()}
    if isinstance(batch, tuple):
        return tuple(_to(v, device) for v in batch)
    if isinstance(batch, list):
        return [_to(v, device) for v in batch]
    return batch


def _optimizer(
    model: nn.Module, name: str, lr: float, weight_decay: float
) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ConfigError("the model has no trainable parameters", fix="unfreeze some parameters")
    # no weight decay on biases and norm scales (1-d tensors), as is usual
    decay = [p for p in params if p.ndim > 1]
    no_decay = [p for p in params if p.ndim <= 1]
    groups = [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=0.9, nesterov=True)
    raise ConfigError(f"unknown optimizer {name!r}", fix="use 'adamw' or 'sgd'")


def _lr_lambda(kind: str, total: int, warmup: int) -> Callable[[int], float]:
    if kind not in ("cosine", "none"):
        raise ConfigError(f"unknown scheduler {kind!r}", fix="use 'cosine' or 'none'")

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if kind == "none":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def _epoch_seed(seed: int, epoch: int) -> int:
    return (seed * 1_000_003 + epoch * 7919) % (2**63)


def _progress(enabled: bool) -> Any:
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    console = Console(stderr=True)
    show = enabled and (console.is_terminal or console.is_jupyter)
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[info]}"),
        console=console,
        transient=True,
        disable=not show,
    )


def distributed() -> tuple[int, int]:
    """``(rank, world size)`` of the data-parallel run this process belongs to, ``(0, 1)`` when
    alone; under a launcher (``torchrun`` sets ``WORLD_SIZE``) the process group is initialised
    here on first use (nccl when CUDA is available, else gloo)."""
    import os

    dist = torch.distributed
    if not dist.is_available():
        return 0, 1
    if not dist.is_initialized():
        if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
            return 0, 1
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_rank(), dist.get_world_size()


def _shard(loader: Any, rank: int, world: int, per_rank: int) -> Any:
    """This rank's batches: every ``world``-th, ``per_rank`` of them (the same count on every
    rank, so that gradient averaging never waits for a rank that has run out)."""
    mine = (b for i, b in enumerate(loader) if i % world == rank)
    return (b for _, b in zip(range(per_rank), mine, strict=False))


def fit(
    model: nn.Module,
    train_loader: Any,
    *,
    loss_fn: LossFn | None = None,
    epochs: int,
    lr: float,
    optimizer: str = "adamw",
    weight_decay: float = 0.0,
    scheduler: str = "cosine",
    warmup_steps: int = 0,
    grad_clip: float | None = None,
    val_fn: Callable[[nn.Module], float] | None = None,
    maximize: bool = True,
    early_stopping_patience: int | None = None,
    restore_best: bool = True,
    checkpoint: PathLike | None = None,
    max_steps: int | None = None,
    seed: int = 0,
    progress: bool = True,
    description: str = "train",
) -> TrainResult:
    """Train ``model`` in place for ``epochs`` passes over ``train_loader`` (or ``max_steps``
    optimizer steps in all, whichever comes first) and return it in eval mode.

    ``val_fn(model) -> float`` runs after every epoch (higher is better unless ``maximize=False``);
    with it, ``early_stopping_patience`` stops after that many epochs without improvement and
    ``restore_best`` loads the best epoch's weights at the end. The learning rate follows a
    per-step cosine decay to 0 (after ``warmup_steps`` of linear warm-up) or stays constant.
    A non-finite loss raises :class:`DataError` naming the epoch and step.
    """
    if epochs < 1 or lr <= 0 or (max_steps is not None and max_steps < 1):
        raise ConfigError(
            f"fit needs epochs >= 1, lr > 0 and max_steps >= 1 (got {epochs}, {lr}, {max_steps})",
            fix="pass positive values",
        )
    try:
        steps_per_epoch = len(train_loader)
    except TypeError:
        raise DataError(
            "the training data has no length", fix="pass a DataLoader or a list of batches"
        ) from None
    if steps_per_epoch == 0:
        raise DataError("the training data is empty", fix="pass at least one batch")
    rank, world = distributed()
    if world > 1:
        if steps_per_epoch < world:
            raise DataError(
                f"the training data has {steps_per_epoch} batches for {world} processes",
                fix="pass at least one batch per process (smaller batches, or fewer processes)",
            )
        steps_per_epoch //= world
    total = epochs * steps_per_epoch
    if max_steps is not None:
        total = min(total, max_steps)
    loss_fn = loss_fn or cross_entropy
    opt = _optimizer(model, optimizer, lr, weight_decay)
    trained: nn.Module = model
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        trained = DistributedDataParallel(model)  # averages gradients; broadcasts rank 0's state
    device = next(model.parameters()).device
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(scheduler, total, warmup_steps))
    result = TrainResult()
    best_state: dict[str, torch.Tensor] | None = None
    start_epoch = 0
    ckpt_path = Path(checkpoint) if checkpoint is not None else None
    if ckpt_path is not None and ckpt_path.exists():
        start_epoch, best_state = _resume(ckpt_path, model, opt, sched, result)

    def improved(value: float) -> bool:
        if result.best_val is None:
            return True
        return value > result.best_val if maximize else value < result.best_val

    try:
        with torch.random.fork_rng(devices=[]), torch.enable_grad(), _progress(progress) as bar:
            task_id = bar.add_task(description, total=total, completed=result.steps, info="")
            for epoch in range(start_epoch, epochs):
                if result.steps >= total or result.stopped_early:
                    break
                seed_e = _epoch_seed(seed, epoch)
                torch.manual_seed(seed_e)  # dropout, augmentation, a loader without a generator
                gen = getattr(train_loader, "generator", None)
                if isinstance(gen, torch.Generator):
                    gen.manual_seed(seed_e)
                model.train()
                t0, loss_sum, n = time.perf_counter(), 0.0, 0
                batches = (_shard(train_loader, rank, world, steps_per_epoch) if world > 1
                           else train_loader)  # fmt: skip
                for step, batch in enumerate(batches):
                    if result.steps >= total:
                        break
                    loss = loss_fn(trained, _to(batch, device))
                    value = float(loss.detach())
                    if not math.isfinite(value):
                        raise DataError(
                            f"{description}: the loss is {value} at epoch {epoch + 1}, "
                            f"step {step + 1} (learning rate {sched.get_last_lr()[0]:.3g})",
                            fix="lower the learning rate, set grad_clip (e.g. 1.0), or check the "
                            "data for NaN/Inf",
                        )
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    if grad_clip is not None:
                        nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
                    opt.step()
                    sched.step()
                    result.steps += 1
                    loss_sum, n = loss_sum + value, n + 1
                    bar.update(
                        task_id, advance=1, info=f"epoch {epoch + 1}/{epochs} loss {value:.4f}"
                    )
                if world > 1:  # the mean over every process's batches
                    sums = torch.tensor([loss_sum, float(n)], dtype=torch.float64)
                    torch.distributed.all_reduce(sums)
                    loss_sum, n = float(sums[0]), int(sums[1])
                entry = {"epoch": float(epoch + 1), "loss": loss_sum / max(n, 1)}
                entry["lr"] = float(sched.get_last_lr()[0])
                entry["seconds"] = time.perf_counter() - t0
                if val_fn is not None:
                    model.eval()
                    with torch.no_grad():
                        val = float(val_fn(model))
                    entry["val"] = val
                    if improved(val):
                        result.best_val, result.best_epoch = val, epoch + 1
                        best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
                    elif (
                        early_stopping_patience is not None
                        and result.best_epoch is not None
                        and epoch + 1 - result.best_epoch >= early_stopping_patience
                    ):
                        result.stopped_early = True
                result.history.append(entry)
                result.epochs_run = epoch + 1
                if ckpt_path is not None and rank == 0:
                    _save(ckpt_path, model, opt, sched, result, best_state)
                if world > 1:
                    torch.distributed.barrier()  # the checkpoint is complete for every rank
    finally:
        model.eval()  # also when training fails
    if restore_best and best_state is not None:
        load_into(model, best_state)
    return result


def _save(
    path: Path,
    model: nn.Module,
    opt: torch.optim.Optimizer,
    sched: torch.optim.lr_scheduler.LRScheduler,
    result: TrainResult,
    best_state: dict[str, torch.Tensor] | None,
) -> None:
    state = {
        "format": "slimkit.fit/1",
        "model": model.state_dict(),
        "optimizer": opt.state_dict(),
        "scheduler": sched.state_dict(),
        "epoch": result.epochs_run,
        "steps": result.steps,
        "history": result.history,
        "best_val": result.best_val,
        "best_epoch": result.best_epoch,
        "stopped_early": result.stopped_early,
        "best_state": best_state,
        "rng": torch.get_rng_state(),
    }
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def _resume(
    path: Path,
    model: nn.Module,
    opt: torch.optim.Optimizer,
    sched: torch.optim.lr_scheduler.LRScheduler,
    result: TrainResult,
) -> tuple[int, dict[str, torch.Tensor] | None]:
    state = safe_torch_load(path)
    if not isinstance(state, dict) or state.get("format") != "slimkit.fit/1":
        raise CheckpointError(
            f"{str(path)!r} is not a checkpoint written by slimkit's fit",
            fix="delete it, or pass another checkpoint path",
        )
    load_into(model, state["model"])
    opt.load_state_dict(state["optimizer"])
    sched.load_state_dict(state["scheduler"])
    result.epochs_run = result.resumed_from = int(state["epoch"])
    result.steps = int(state["steps"])
    result.history = list(state["history"])
    result.best_val, result.best_epoch = state["best_val"], state["best_epoch"]
    result.stopped_early = bool(state["stopped_early"])
    return result.epochs_run, state["best_state"]
