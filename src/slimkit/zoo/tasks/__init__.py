"""Bundled tasks: small data sets that need no download, with fixed train / val / test splits::

    task = load_task("digits")                  # cached in-process, identical on every call
    for x, y in task.loader("train", 64, shuffle=True): ...
    evaluate(model, task)                       # {"top1": 0.98, "loss": 0.06}

- ``digits``: scikit-learn's bundled 8x8 handwritten digits, (1, 8, 8) in [0, 1], 10 classes.
- ``shapes``: generated 32x32 RGB images of 10 shape classes on noisy, cluttered backgrounds.
- ``pycode_lm``: byte-level language modelling on the Python standard library's own source.
- ``pycode_cls``: which of 8 standard-library packages a 128-byte source snippet comes from.

Splits are disjoint and fixed by seeds; the test split is never used for training or model
selection. The two ``pycode`` tasks read the installed Python's standard library, so their data
(and any model trained on it) depends on the Python version; the other tasks are the same
everywhere.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from slimkit.core.registry import Registry
from slimkit.errors import ConfigError

SPLITS = ("train", "val", "test")
KINDS = ("classification", "language_model")


@dataclass(frozen=True)
class Task:
    """A data set with fixed splits. Each split is a ``TensorDataset`` of ``(inputs, targets)``;
    for the language model both are int64 (B, seq_len) and targets are inputs shifted by one."""

    name: str
    kind: str  # "classification" | "language_model"
    train: TensorDataset
    val: TensorDataset
    test: TensorDataset
    num_classes: int  # the vocabulary size (256) for the language model
    input_shape: tuple[int, ...]  # one sample, e.g. (1, 8, 8) or (128,)
    classes: tuple[str, ...] | None
    meta: Mapping[str, Any] = field(default_factory=dict)  # provenance: files, python version, ...

    def split(self, split: str) -> TensorDataset:
        """The data set of ``split`` ("train", "val" or "test")."""
        if split not in SPLITS:
            raise ConfigError(
                f"task {self.name!r} has no split {split!r}", fix=f"use one of {', '.join(SPLITS)}"
            )
        ds: TensorDataset = getattr(self, split)
        return ds

    def loader(
        self, split: str, batch_size: int = 64, *, shuffle: bool = False, seed: int = 0
    ) -> DataLoader:
        """Batches ``(inputs, targets)`` of ``split``; shuffled with its own seeded generator."""
        gen = torch.Generator().manual_seed(seed) if shuffle else None
        return DataLoader(self.split(split), batch_size=batch_size, shuffle=shuffle, generator=gen)

    def calibration(self, n: int = 32, batch_size: int = 8) -> list[torch.Tensor]:
        """``n`` input samples from the TRAIN split (a fixed random subset), in batches."""
        inputs = self.train.tensors[0]
        if not 0 < n <= len(inputs):
            raise ConfigError(
                f"task {self.name!r}: cannot take {n} calibration samples from {len(inputs)}",
                fix=f"ask for between 1 and {len(inputs)} samples",
            )
        idx = torch.randperm(len(inputs), generator=torch.Generator().manual_seed(1234))[:n]
        picked = inputs[idx]
        return list(picked.split(batch_size))


TASKS: Registry[Callable[[], Task]] = Registry("zoo task")
"""Task builders, with meta ``kind`` and ``summary``; use :func:`load_task` to get a Task."""

_CACHE: dict[str, Task] = {}


def load_task(name: str) -> Task:
    """The task ``name``, built once per process (deterministic: fixed seeds, sorted files)."""
    if name not in _CACHE:
        _CACHE[name] = TASKS.get(name)()
    return _CACHE[name]


@torch.no_grad()
def evaluate(
    model: nn.Module, task: Task, split: str = "test", batch_size: int = 256
) -> dict[str, float]:
    """Metrics of ``model`` on ``split``: classification ``{"top1", "loss"}``; language model
    ``{"perplexity", "bits_per_byte", "loss"}`` (loss in nats per token). The model's train/eval
    mode is restored afterwards."""
    was_training = model.training
    model.eval()
    total_loss, correct, count = 0.0, 0, 0
    try:
        for x, y in task.loader(split, batch_size):
            out = model(x)
            if task.kind == "language_model":
                out = out.reshape(-1, out.shape[-1])
                y = y.reshape(-1)
            total_loss += float(nn.functional.cross_entropy(out, y, reduction="sum"))
            correct += int((out.argmax(-1) == y).sum())
            count += y.numel()
    finally:
        model.train(was_training)
    loss = total_loss / max(count, 1)
    if task.kind == "language_model":
        return {"perplexity": math.exp(loss), "bits_per_byte": loss / math.log(2), "loss": loss}
    return {"top1": correct / max(count, 1), "loss": loss}


# Registers the tasks; after the names above because these modules import them.
from slimkit.zoo.tasks import digits, pycode, shapes  # noqa: E402, F401

__all__ = ["TASKS", "Task", "evaluate", "load_task"]
