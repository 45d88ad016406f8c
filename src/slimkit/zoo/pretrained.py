"""Trained zoo models, trained on first use and cached::

    model = pretrained("digits_cnn")              # trains once (seconds), then loads from the cache
    pretrained_metrics("digits_cnn")              # {"top1": 0.99, "loss": 0.04}: test, at training

Each name has a :class:`Recipe` (model, task, optimiser settings). Training uses
:func:`slimkit.core.train.fit`, picks the best epoch on the validation split and measures the test
split once. The weights go to ``<cache_dir>/<name>-<key>.safetensors`` with the recipe and the
metrics in its metadata; ``key`` hashes the recipe and the source of the model's file, the task's
file and ``train.py`` (and the Python version for tasks built from the standard library), so editing
any of them trains afresh. An unreadable cache file (truncated, corrupted) is retrained with a
warning. An interrupted training resumes from ``<name>-<key>.ckpt`` beside it.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import sys
import time
import warnings
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from slimkit.core import train as _train_module
from slimkit.core.io import load_into, load_weights, read_metadata, save_weights
from slimkit.core.registry import Registry
from slimkit.core.train import fit
from slimkit.errors import CheckpointError
from slimkit.zoo.models import MODELS, create_model
from slimkit.zoo.tasks import TASKS, evaluate, load_task

FORMAT = "slimkit.pretrained/1"


@dataclass(frozen=True, kw_only=True)
class Recipe:
    """How a pretrained zoo model is trained; every field is part of its cache key."""

    model: str
    model_kwargs: Mapping[str, Any] = field(default_factory=dict)
    task: str
    epochs: int
    lr: float
    batch_size: int
    optimizer: str = "adamw"
    weight_decay: float = 0.0
    scheduler: str = "cosine"
    warmup_steps: int = 0
    grad_clip: float | None = None
    max_steps: int | None = None
    early_stopping_patience: int | None = None
    metric: str = "top1"  # picks the best epoch on val: "perplexity" is minimised, others maximised
    seed: int = 0
    summary: str = ""

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["model_kwargs"] = dict(self.model_kwargs)
        return d


PRETRAINED: Registry[Recipe] = Registry("pretrained zoo model")

PRETRAINED.add(
    "digits_cnn",
    Recipe(
        model="digits_cnn",
        task="digits",
        epochs=12,
        lr=3e-3,
        batch_size=32,
        weight_decay=5e-4,
        summary="digits_cnn on scikit-learn's 8x8 digits",
    ),
)
PRETRAINED.add(
    "shapes_cnn",
    Recipe(
        model="small_cnn",
        model_kwargs={"width": 16},
        task="shapes",
        epochs=15,
        lr=2e-3,
        batch_size=64,
        weight_decay=5e-4,
        summary="small_cnn on the generated 32x32 shapes",
    ),
)
PRETRAINED.add(
    "shapes_cnn_wide",  # shapes_cnn's recipe at twice the width (4x the weights: room for 80 %
    replace(  # sparsity in the lottery benchmark), 10 epochs
        PRETRAINED.get("shapes_cnn"),
        model_kwargs={"width": 32},
        epochs=10,
        summary="small_cnn at twice shapes_cnn's width on the generated 32x32 shapes",
    ),
)
# bench_pipeline's CNNs: narrow enough to train in minutes on 2 threads (not trained by any test)
PRETRAINED.add(
    "shapes_resnet18",
    Recipe(
        model="resnet18_cifar",
        model_kwargs={"width_mult": 0.25},  # widths 16-32-64-128, 35 M MACs
        task="shapes",
        epochs=4,
        lr=3e-3,
        batch_size=64,
        weight_decay=5e-4,
        summary="resnet18_cifar at width 0.25 on the generated 32x32 shapes",
    ),
)
PRETRAINED.add(
    "shapes_mobilenetv2",
    replace(
        PRETRAINED.get("shapes_resnet18"),
        model="mobilenetv2_cifar",
        model_kwargs={"width_mult": 0.35},  # 16 M MACs (its 1280-wide last conv kept)
        epochs=3,
        summary="mobilenetv2_cifar at width 0.35 on the generated 32x32 shapes",
    ),
)
PRETRAINED.add(
    "pycode_gpt",
    Recipe(
        model="gpt",
        model_kwargs={"n_layer": 4, "d_model": 128, "n_head": 4, "dropout": 0.0},
        task="pycode_lm",
        epochs=1,
        max_steps=650,  # about 160 s on 2 threads: a third of an epoch
        lr=3e-3,
        batch_size=32,
        weight_decay=0.1,
        warmup_steps=30,
        grad_clip=1.0,
        metric="perplexity",
        summary="byte-level GPT on the Python standard library's source",
    ),
)
PRETRAINED.add(
    "pycode_classifier",
    Recipe(
        model="text_classifier",
        model_kwargs={"num_classes": 8},
        task="pycode_cls",
        epochs=1,  # 750 steps, about 110 s on 2 threads
        lr=2e-3,
        batch_size=32,
        weight_decay=0.01,
        warmup_steps=50,
        grad_clip=1.0,
        summary="text_classifier: which standard-library package a source snippet is from",
    ),
)
PRETRAINED.add(  # the same recipe with 4 layers: the teacher of bench_distill's depth student
    "pycode_classifier_deep",
    replace(
        PRETRAINED.get("pycode_classifier"),
        model_kwargs={"num_classes": 8, "n_layer": 4},
        summary="text_classifier with 4 layers on pycode_cls (bench_distill's depth teacher)",
    ),
)


def cache_dir() -> Path:
    """Where trained weights are cached: ``$SLIMKIT_CACHE_DIR``, else the user cache directory."""
    env = os.environ.get("SLIMKIT_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    import platformdirs

    return Path(platformdirs.user_cache_dir("slimkit"))


def _source(obj: Any) -> str:
    path = inspect.getsourcefile(obj)
    return Path(path).read_text(encoding="utf-8") if path else ""


def cache_key(recipe: Recipe) -> str:
    """16 hex digits of sha256 over the recipe and the source it depends on."""
    h = hashlib.sha256(json.dumps(recipe.to_dict(), sort_keys=True).encode())
    for obj in (MODELS.get(recipe.model), TASKS.get(recipe.task), _train_module):
        h.update(b"\0" + _source(obj).encode())
    if TASKS.entry(recipe.task).meta.get("depends_on_python"):
        h.update(f"\0python {sys.version_info.major}.{sys.version_info.minor}".encode())
    return h.hexdigest()[:16]


def weights_path(name: str, *, cache_dir: str | Path | None = None) -> Path:
    """The cache file of pretrained model ``name`` (it may not exist yet)."""
    root = Path(cache_dir) if cache_dir is not None else _default_dir()
    return root / f"{name}-{cache_key(PRETRAINED.get(name))}.safetensors"


def _default_dir() -> Path:  # for functions whose ``cache_dir`` argument hides the function
    return cache_dir()


def _build(recipe: Recipe) -> nn.Module:
    return create_model(recipe.model, seed=recipe.seed, **dict(recipe.model_kwargs))


def _load(path: Path, recipe: Recipe) -> tuple[nn.Module, dict[str, str]]:
    meta = read_metadata(path)
    if meta.get("format") != FORMAT or meta.get("key") != path.stem.rsplit("-", 1)[-1]:
        raise CheckpointError(f"{str(path)!r} has no slimkit pretrained metadata", fix="retrain")
    model = _build(recipe)
    load_into(model, load_weights(path))
    return model.eval(), meta


def _train(name: str, recipe: Recipe, path: Path, progress: bool) -> dict[str, str]:
    task = load_task(recipe.task)
    model = _build(recipe)
    metric = recipe.metric
    t0 = time.perf_counter()
    result = fit(
        model,
        task.loader("train", recipe.batch_size, shuffle=True, seed=recipe.seed),
        epochs=recipe.epochs,
        lr=recipe.lr,
        optimizer=recipe.optimizer,
        weight_decay=recipe.weight_decay,
        scheduler=recipe.scheduler,
        warmup_steps=recipe.warmup_steps,
        grad_clip=recipe.grad_clip,
        max_steps=recipe.max_steps,
        val_fn=lambda m: evaluate(m, task, "val")[metric],
        maximize=metric != "perplexity",
        early_stopping_patience=recipe.early_stopping_patience,
        checkpoint=path.with_suffix(".ckpt"),
        seed=recipe.seed,
        progress=progress,
        description=f"training zoo model {name}",
    )
    seconds = time.perf_counter() - t0
    metrics = {"val": evaluate(model, task, "val"), "test": evaluate(model, task, "test")}
    meta = {
        "format": FORMAT,
        "name": name,
        "key": path.stem.rsplit("-", 1)[-1],
        "recipe": json.dumps(recipe.to_dict(), sort_keys=True),
        "metrics": json.dumps(metrics),
        "train_seconds": f"{seconds:.1f}",
        "epochs_run": str(result.epochs_run),
        "steps": str(result.steps),
        "threads": str(torch.get_num_threads()),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
    }
    save_weights(model, path, metadata=meta)
    path.with_suffix(".ckpt").unlink(missing_ok=True)
    return meta


def _ensure(
    name: str, progress: bool, retrain: bool, cache_dir: str | Path | None
) -> tuple[nn.Module, dict[str, str]]:
    recipe = PRETRAINED.get(name)
    path = weights_path(name, cache_dir=cache_dir)
    if retrain:  # afresh: not from the checkpoint of an interrupted training either
        path.with_suffix(".ckpt").unlink(missing_ok=True)
    elif path.exists():
        try:
            return _load(path, recipe)
        except CheckpointError as e:
            warnings.warn(
                f"the cached weights of zoo model {name!r} are unreadable ({e}); retraining them",
                stacklevel=3,
            )
    meta = _train(name, recipe, path, progress)
    model, _ = _load(path, recipe)  # what later calls will load, exactly
    return model, meta


def pretrained(
    name: str,
    *,
    progress: bool = True,
    retrain: bool = False,
    cache_dir: str | Path | None = None,
) -> nn.Module:
    """Zoo model ``name`` trained by its recipe, in eval mode: from the cache, or trained now
    (once; ``retrain=True`` forces it). Names: ``PRETRAINED.names()``."""
    return _ensure(name, progress, retrain, cache_dir)[0]


def pretrained_metrics(
    name: str,
    *,
    progress: bool = True,
    retrain: bool = False,
    cache_dir: str | Path | None = None,
) -> dict[str, float]:
    """The test metrics of ``pretrained(name)`` measured when it was trained (training it first
    if needed), e.g. ``{"top1": 0.99, "loss": 0.04}``."""
    meta = _ensure(name, progress, retrain, cache_dir)[1]
    test: dict[str, float] = json.loads(meta["metrics"])["test"]
    return test


def pretrained_info(name: str, *, cache_dir: str | Path | None = None) -> dict[str, Any]:
    """Everything recorded with the cached weights (recipe, val and test metrics, training time,
    versions), or ``{}`` when ``name`` has not been trained yet."""
    path = weights_path(name, cache_dir=cache_dir)
    if not path.exists():
        return {}
    meta: dict[str, Any] = dict(read_metadata(path))
    for k in ("recipe", "metrics"):
        meta[k] = json.loads(meta[k])
    meta["path"] = str(path)
    return meta
