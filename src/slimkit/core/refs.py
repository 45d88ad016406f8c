"""One place that turns the references users type (CLI, recipes) into models and data.

Models:
- ``zoo:NAME``: a trained zoo model (``slimkit zoo list``), trained and cached on first use; a zoo
  architecture without a training recipe (e.g. ``zoo:resnet18``) comes with random weights.
- ``path/to/program.pt2``: a saved ``torch.export`` program (no user code needed).
- ``package.module:factory`` with ``weights=file.safetensors``: the user's own class.
Data:
- ``zoo:TASK[:split]`` (split defaults to ``train``), ``file.npz`` (arrays ``x`` and optional ``y``,
  or the first array), ``package.module:loader`` (a callable returning an iterable of batches).
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from slimkit.errors import ReferenceResolutionError

MODEL_FORMS = (
    "zoo:NAME (see `slimkit zoo list`)",
    "a .pt2 file saved with torch.export.save",
    "package.module:factory (plus --weights file.safetensors)",
)
DATA_FORMS = (
    "zoo:TASK[:split] (see `slimkit zoo list`)",
    "a .npz file (arrays x and optionally y)",
    "package.module:loader (a callable returning an iterable of batches)",
)


@dataclass
class ResolvedModel:
    """A model plus what slimkit knows about it: example inputs, its task, where it came from."""

    model: nn.Module
    name: str
    source: str
    example_inputs: tuple[torch.Tensor, ...] | None = None
    task: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def inputs(self, batch: int = 1) -> tuple[torch.Tensor, ...]:
        """Example inputs at ``batch`` (repeating or slicing the known ones)."""
        if self.example_inputs is None:
            raise ReferenceResolutionError(
                f"slimkit does not know the input shape of {self.name!r}",
                fix="pass --input-shape, e.g. --input-shape 1,3,224,224 (or example_inputs=...)",
            )
        out = []
        for x in self.example_inputs:
            reps = -(-batch // x.shape[0])
            out.append(x.repeat(reps, *([1] * (x.dim() - 1)))[:batch])
        return tuple(out)


def _fail(kind: str, ref: str, tried: str, forms: Sequence[str]) -> ReferenceResolutionError:
    return ReferenceResolutionError(
        f"cannot resolve {kind} reference {ref!r}: {tried}",
        fix="use one of: " + "; ".join(forms),
    )


def _import_attr(ref: str, kind: str, forms: Sequence[str]) -> Any:
    mod_name, _, attr = ref.partition(":")
    try:
        mod = importlib.import_module(mod_name)
    except ImportError as e:
        raise _fail(kind, ref, f"could not import module {mod_name!r} ({e})", forms) from None
    try:
        return getattr(mod, attr)
    except AttributeError:
        raise _fail(kind, ref, f"module {mod_name!r} has no attribute {attr!r}", forms) from None


def parse_shape(text: str) -> tuple[int, ...]:
    """``"1,3,224,224"`` -> ``(1, 3, 224, 224)``."""
    try:
        dims = tuple(int(t) for t in text.replace("x", ",").split(",") if t.strip())
    except ValueError:
        dims = ()
    if not dims or any(d <= 0 for d in dims):
        raise ReferenceResolutionError(
            f"input shape {text!r} is not a list of positive integers",
            fix="write it like 1,3,224,224 (batch first)",
        )
    return dims


def resolve_model(
    ref: str,
    *,
    weights: str | Path | None = None,
    input_shape: Sequence[int] | None = None,
    progress: bool = True,
) -> ResolvedModel:
    """Resolve a model reference (see the module docstring) to a model in eval mode."""
    shape_inputs = (torch.randn(*input_shape),) if input_shape else None
    if ref.startswith("zoo:"):
        return _zoo_model(ref[4:], progress=progress, shape_inputs=shape_inputs)
    if ref.endswith(".pt2"):
        if not Path(ref).is_file():
            raise _fail("model", ref, "the file does not exist", MODEL_FORMS)
        ep = torch.export.load(ref)
        ex = getattr(ep, "example_inputs", None)
        ex_args = tuple(ex[0]) if ex else shape_inputs
        return ResolvedModel(ep.module(), Path(ref).stem, ref, ex_args)
    if ":" in ref and not Path(ref).exists():
        factory = _import_attr(ref, "model", MODEL_FORMS)
        model = factory() if callable(factory) and not isinstance(factory, nn.Module) else factory
        if not isinstance(model, nn.Module):
            raise _fail(
                "model", ref, f"it gave a {type(model).__name__}, not nn.Module", MODEL_FORMS
            )
        if weights is not None:
            from slimkit.core.io import load_into, load_weights

            load_into(model, load_weights(weights))
        return ResolvedModel(model.eval(), ref.rpartition(":")[2], ref, shape_inputs)
    tried = "the file does not exist" if not Path(ref).exists() else "unknown file type"
    raise _fail("model", ref, tried, MODEL_FORMS)


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


def resolve_data(ref: str, *, batch_size: int = 32) -> Any:
    """Resolve a data reference to an iterable of batches (validated later by core.data)."""
    if ref.startswith("zoo:"):
        from slimkit.zoo.tasks import TASKS, load_task

        name, _, split = ref[4:].partition(":")
        if name not in TASKS:
            raise _fail(
                "data", ref, f"no zoo task {name!r} (tasks: {', '.join(TASKS)})", DATA_FORMS
            )
        return load_task(name).loader(split or "train", batch_size)
    if ref.endswith(".npz"):
        import numpy as np

        if not Path(ref).is_file():
            raise _fail("data", ref, "the file does not exist", DATA_FORMS)
        with np.load(ref, allow_pickle=False) as z:
            keys = list(z.keys())
            if not keys:
                raise _fail("data", ref, "the archive holds no arrays", DATA_FORMS)
            x = torch.from_numpy(z["x"] if "x" in z else z[keys[0]])
            y = torch.from_numpy(z["y"]) if "y" in z else None
        tensors = (x,) if y is None else (x, y)
        ds = torch.utils.data.TensorDataset(*tensors)
        return torch.utils.data.DataLoader(ds, batch_size=batch_size)
    if ":" in ref and not Path(ref).exists():
        loader = _import_attr(ref, "data", DATA_FORMS)
        return loader() if callable(loader) else loader
    tried = "the file does not exist" if not Path(ref).exists() else "unknown file type"
    raise _fail("data", ref, tried, DATA_FORMS)
