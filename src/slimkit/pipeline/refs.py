"""Every reference users type (CLI options, recipe fields), resolved in one place.

Models:
- ``zoo:NAME``: a trained zoo model (``slimkit zoo list``), trained and cached on first use; a zoo
  architecture without a training recipe (e.g. ``zoo:resnet18``) comes with random weights.
- ``path/to/program.pt2``: a saved ``torch.export`` program (no user code needed).
- ``package.module:factory`` with ``weights=file.safetensors``: the user's own class.
Data (an iterable of batches; ``core.data`` validates it when a method reads it):
- ``zoo:TASK[:split]``: a bundled task's split in order (split ``train`` by default, ``val``,
  ``test``), or ``zoo:TASK:calibration``: the train split in the fixed random order of
  ``Task.calibration`` (the calibration data of a zoo model that has a task);
- ``zoo:MODEL:inputs``: random example inputs of a zoo model, one seed per batch (0, 1, ...);
- ``file.npz`` (arrays ``x`` and optional ``y``, or the first array), ``package.module:loader``.

::

    rm = resolve_model("zoo:digits_cnn")          # rm.model, rm.inputs(1), rm.task == "digits"
    calib = resolve_data(default_data(rm), batch_size=8)
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from slimkit.core.refs import (
    DATA_FORMS,
    MODEL_FORMS,
    ResolvedModel,
    fail,
    parse_shape,
    resolve_data_file,
    resolve_model_file,
)
from slimkit.errors import ReferenceResolutionError

# the random-inputs source stops here (a method reads its `num_batches`, far fewer)
MAX_RANDOM_BATCHES = 1024

__all__ = [
    "DATA_FORMS",
    "MODEL_FORMS",
    "ResolvedModel",
    "default_data",
    "parse_shape",
    "resolve_data",
    "resolve_model",
]


def resolve_model(
    ref: str,
    *,
    weights: str | Path | None = None,
    input_shape: Sequence[int] | None = None,
    progress: bool = True,
) -> ResolvedModel:
    """Resolve a model reference (see the module docstring) to a model in eval mode."""
    if ref.startswith("zoo:"):
        shape_inputs = (torch.randn(*input_shape),) if input_shape else None
        return _zoo_model(ref[4:], progress=progress, shape_inputs=shape_inputs)
    return resolve_model_file(ref, weights=weights, input_shape=input_shape)


def _zoo_model(
    name: str, *, progress: bool, shape_inputs: tuple[torch.Tensor, ...] | None
) -> ResolvedModel:
    from slimkit.zoo.models import MODELS, create_model, example_inputs
    from slimkit.zoo.pretrained import PRETRAINED, pretrained

    if name in PRETRAINED:
        recipe = PRETRAINED.get(name)
        model = pretrained(name, progress=progress)
        ex = shape_inputs or _task_inputs(recipe.task)
        return ResolvedModel(model, name, f"zoo:{name}", ex, recipe.task, {"trained": True})
    if name in MODELS:
        ex = shape_inputs or example_inputs(name, batch=1)
        return ResolvedModel(create_model(name), name, f"zoo:{name}", ex, None, {"trained": False})
    choices = sorted({*PRETRAINED.names(), *MODELS.names()})
    from slimkit.core.registry import did_you_mean

    hint = did_you_mean(name, choices)
    raise ReferenceResolutionError(
        f"there is no zoo model {name!r}",
        fix=f"{hint + ' ' if hint else ''}zoo models are: {', '.join(choices)}",
    )


def _task_inputs(task_name: str) -> tuple[torch.Tensor, ...]:
    """One real test sample of a task, as example inputs."""
    from slimkit.zoo.tasks import load_task

    x = load_task(task_name).test.tensors[0][:1]
    return (x,)


def default_data(rm: ResolvedModel) -> str | None:
    """The data reference a zoo model calibrates with when none is given: its task's calibration
    order, or its random example inputs; ``None`` for other models (the user must name data)."""
    if rm.task is not None:
        return f"zoo:{rm.task}:calibration"
    if rm.source.startswith("zoo:"):
        return f"zoo:{rm.name}:inputs"
    return None


def resolve_data(ref: str, *, batch_size: int = 32) -> Any:
    """Resolve a data reference to an iterable of batches (validated later by core.data)."""
    if not ref.startswith("zoo:"):
        return resolve_data_file(ref, batch_size=batch_size)
    from slimkit.zoo.models import MODELS
    from slimkit.zoo.tasks import TASKS, load_task

    name, _, split = ref[4:].partition(":")
    if name in MODELS and split == "inputs":
        return _RandomInputs(name, batch_size)
    if name not in TASKS:
        models = " (a zoo model: write zoo:NAME:inputs for its random inputs)" * (name in MODELS)
        raise fail(
            "data", ref, f"no zoo task {name!r}{models} (tasks: {', '.join(TASKS)})", DATA_FORMS
        )
    task = load_task(name)
    if split == "calibration":
        return task.calibration(n=len(task.train), batch_size=batch_size)
    return task.loader(split or "train", batch_size)


class _RandomInputs:
    """Re-iterable random example inputs of zoo model ``name``: batch ``i`` is drawn at seed
    ``i``, so every pass over it (and every run of a recipe) sees the same batches."""

    def __init__(self, name: str, batch_size: int) -> None:
        self.name, self.batch_size = name, batch_size

    def __iter__(self) -> Iterator[Any]:
        from slimkit.zoo.models import example_inputs

        for seed in range(MAX_RANDOM_BATCHES):
            xs = example_inputs(self.name, batch=self.batch_size, seed=seed)
            yield xs[0] if len(xs) == 1 else xs
