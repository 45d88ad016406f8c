"""The distillation methods: ``distill.response``, ``distill.feature`` and ``distill.relation``.

Each trains a copy of the student (``inplace=True``: the student itself) on slimkit's one
training loop (``core.train.fit``: progress bar, atomic checkpoints and resume, validation and
early stopping, and multi-process data parallel under ``torchrun``) with a loss made of

    alpha * (response + feature + relation terms) + (1 - alpha) * task loss on the data's targets

where the response term is chosen per output tensor from what the teacher returns (``losses``),
and the task term is used only when the data has targets (else alpha is 1)::

    s = sk.distill(student, teacher, "response", data=train_loader)
    s = sk.distill(student, teacher, sk.distill.Feature(n_pairs=3, epochs=5), data=train_loader)
    s = sk.distill(student, teacher, sk.distill.Relation(kind="rkd"), data=train_loader)

YAML step (the teacher is the recipe's model before the previous steps):
``- distill.response: {epochs: 3, temperature: 4}``. Any model whose student and teacher return
outputs of the same structure: classifiers, multi-label and peaked sigmoid heads, regressions,
embeddings, language models, tuples and dicts of those.
"""

from __future__ import annotations

import copy
import functools
import itertools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from pydantic import Field
from torch import nn

from slimkit.core.config import Config
from slimkit.core.data import Batch, flatten_output, iter_batches, model_failed
from slimkit.core.io import PathLike
from slimkit.core.registry import METHODS
from slimkit.core.train import TrainResult, fit
from slimkit.distill import feature as ft
from slimkit.distill.losses import (
    Decision,
    detect,
    response_loss,
    task_loss,
)
from slimkit.errors import ConfigError, DataError, SlimkitError


class Response(Config):
    """Response distillation: the student's outputs match the teacher's."""

    # auto: chosen per output from the teacher's outputs and the data's targets (losses.detect)
    loss: Literal["auto", "softmax", "sigmoid", "peaked", "regression", "cosine"] = "auto"
    temperature: float = Field(4.0, gt=0)  # softens softmax outputs
    alpha: float = Field(0.5, ge=0, le=1)  # weight of distillation vs the targets' task loss
    epochs: int = Field(3, ge=1)
    lr: float = Field(1e-3, gt=0)
    optimizer: Literal["adamw", "adam", "sgd"] = "adamw"
    weight_decay: float = Field(0.0, ge=0)
    grad_clip: float | None = Field(None, gt=0)
    seed: int = 0


class Feature(Response):
    """Response plus hint layers: intermediate features matched through learned adapters."""

    pairs: dict[str, str] = Field(default_factory=dict)  # student layer -> teacher layer
    n_pairs: int = Field(3, ge=1)  # layers paired automatically when ``pairs`` is empty
    feature_weight: float = Field(1.0, ge=0)


class Relation(Response):
    """Response plus the relations between samples (RKD distance and angle, or contrastive)."""

    kind: Literal["rkd", "contrastive"] = "rkd"
    layer: str | None = None  # the student's embedding layer (default: input of the last Linear)
    teacher_layer: str | None = None  # the teacher's (default: the same rule)
    distance: float = Field(1.0, ge=0)
    angle: float = Field(2.0, ge=0)
    relation_weight: float = Field(1.0, ge=0)


@dataclass
class DistillReport:
    """What a distillation did: the loss per output and why, the paired layers, the training."""

    decisions: list[Decision]
    pairs: list[tuple[str, str]] = field(default_factory=list)
    embeddings: tuple[str, str] | None = None
    train: TrainResult = field(default_factory=TrainResult)
    alpha: float = 1.0
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "losses": [d.to_dict() for d in self.decisions],
            "alpha": self.alpha,
            "epochs_run": self.train.epochs_run,
            "final_loss": self.train.final_loss,
            "history": self.train.history,
        }
        if self.pairs:
            out["pairs"] = [list(p) for p in self.pairs]
        if self.embeddings:
            out["embeddings"] = list(self.embeddings)
        if self.train.resumed_from is not None:
            out["resumed_from_epoch"] = self.train.resumed_from
        if self.train.best_val is not None:
            out["best_val"], out["best_epoch"] = self.train.best_val, self.train.best_epoch
        return out

    def summary(self) -> str:
        losses = ", ".join(f"{d.name}: {d.kind} ({d.reason})" for d in self.decisions)
        parts = [f"distillation loss {losses}; alpha {self.alpha:g}"]
        if self.pairs:
            parts.append("feature pairs " + ", ".join(f"{s}<-{t}" for s, t in self.pairs))
        if self.embeddings:
            parts.append(f"relations on {self.embeddings[0]}<-{self.embeddings[1]}")
        parts.append(f"{self.train.epochs_run} epochs, final loss {self.train.final_loss}")
        return "; ".join(parts + self.notes)


@dataclass
class Extra:
    """A feature or relation term: computed from what the named layers return (or receive, with
    ``inputs``) during the one forward pass each model makes per training step."""

    student_layers: list[str]
    teacher_layers: list[str]
    inputs: bool
    term: Callable[[Any, dict[str, torch.Tensor], dict[str, torch.Tensor]], torch.Tensor]
    pairs: list[tuple[str, str]] = field(default_factory=list)
    embeddings: tuple[str, str] | None = None


class _Trainee(nn.Module):
    """The student and the adapters trained with it (one module, so that the optimizer, the
    checkpoint and data-parallel training see every trained parameter)."""

    def __init__(self, student: nn.Module, adapters: dict[str, nn.Module]) -> None:
        super().__init__()
        self.student = student
        self.adapters = nn.ModuleDict({k.replace(".", "__"): v for k, v in adapters.items()})

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.student(*args, **kwargs)

    def adapter(self, name: str) -> nn.Module:
        return self.adapters[name.replace(".", "__")]


def _normalise(batch: Any, *, check: bool = False) -> Batch:
    """One training batch as a :class:`Batch` (NaN checks only where asked: the inputs were
    checked up front and ``fit`` stops on a non-finite loss)."""
    return next(iter_batches([batch], what="training data", check_finite=check))


def _teacher_outputs(teacher: nn.Module, data: Any, n: int = 4) -> tuple[list[Any], list[Batch]]:
    outs, batches = [], []
    for raw in itertools.islice(iter(data), n):
        b = _normalise(raw, check=True)
        try:
            with torch.no_grad():
                outs.append(b.run(teacher))
        except SlimkitError:
            raise
        except Exception as e:
            raise model_failed(teacher, "the teacher on the training data", b, e) from None
        batches.append(b)
    return outs, batches


def decide(cfg: Response, teacher: nn.Module, data: Any) -> tuple[list[Decision], bool]:
    """The loss of each teacher output tensor, and whether the data has usable targets."""
    outs, batches = _teacher_outputs(teacher, data)
    flat = [flatten_output(o) for o in outs]
    if not flat or not flat[0]:
        raise ConfigError(
            f"the teacher ({type(teacher).__name__}) returns no floating tensor to distil",
            fix="distil a model whose forward returns tensors (or a tuple / dict of them)",
        )
    targets = [b.target for b in batches]
    single = len(flat[0]) == 1 and all(isinstance(t, torch.Tensor) for t in targets)
    decisions = []
    for i, (name, _) in enumerate(flat[0]):
        joined = torch.cat([f[i][1].detach().reshape(-1, *f[i][1].shape[1:]) for f in flat])
        target = torch.cat([t.reshape(len(t), *t.shape[1:]) for t in targets]) if single else None
        if cfg.loss == "auto":
            decisions.append(detect(name, joined, target))
        else:
            d = detect(name, joined, target)
            logits = d.logits if cfg.loss in ("sigmoid", "peaked") else False
            if cfg.loss in ("sigmoid", "peaked") and d.kind not in ("sigmoid", "peaked"):
                logits = bool(joined.min() < 0 or joined.max() > 1)
            decisions.append(Decision(name, cfg.loss, "named by the config", logits))
    return decisions, single


def _loss_fn(
    cfg: Response,
    teacher: nn.Module,
    decisions: list[Decision],
    use_targets: bool,
    extra: Extra | None,
) -> Callable[[nn.Module, Any], torch.Tensor]:
    alpha = cfg.alpha if use_targets else 1.0
    s_names, t_names = (extra.student_layers, extra.teacher_layers) if extra else ([], [])
    inputs = extra.inputs if extra else False

    def loss(model: nn.Module, raw: Any) -> torch.Tensor:
        b = _normalise(raw)
        trainee = _unwrap(model)
        with ft.capture(teacher, t_names, inputs=inputs) as t_got, torch.no_grad():
            ref = b.run(teacher)
        with ft.capture(trainee.student, s_names, inputs=inputs) as s_got:
            out = b.run(model)  # through the DDP wrapper, when there is one
        total = response_loss(out, ref, decisions, temperature=cfg.temperature)
        if extra is not None:
            total = total + extra.term(trainee, s_got, t_got)
        if alpha < 1:
            (d,) = decisions
            student_out = dict(flatten_output(out))[d.name]
            total = alpha * total + (1 - alpha) * task_loss(student_out, b.target, d)
        return total

    return loss


def _unwrap(model: nn.Module) -> _Trainee:
    inner = getattr(model, "module", model)  # DistributedDataParallel wraps the trainee
    assert isinstance(inner, _Trainee)
    return inner


def _run(
    student: nn.Module,
    cfg: Response,
    teacher: nn.Module,
    data: Any,
    *,
    inplace: bool,
    val_fn: Callable[[nn.Module], float] | None,
    checkpoint: PathLike | None,
    progress: bool,
    max_steps: int | None,
    prepare: Callable[[nn.Module, nn.Module, Batch], Any] | None = None,
    fit_options: dict[str, Any],
) -> tuple[nn.Module, DistillReport]:
    if teacher is student:
        teacher = copy.deepcopy(teacher)
    out = student if inplace else copy.deepcopy(student)
    teacher_was = teacher.training
    teacher.eval()
    try:
        decisions, use_targets = decide(cfg, teacher, data)
        adapters: dict[str, nn.Module] = {}
        extra: Extra | None = None
        notes: list[str] = []
        if prepare is not None:
            adapters, extra, notes = prepare(out, teacher, _normalise(next(iter(data))))
        trainee = _Trainee(out, adapters)
        loss = _loss_fn(cfg, teacher, decisions, use_targets, extra)
        val = (lambda m: val_fn(_unwrap(m).student)) if val_fn is not None else None
        result = fit(trainee, data, loss_fn=loss, epochs=cfg.epochs, lr=cfg.lr,
                     optimizer=cfg.optimizer, weight_decay=cfg.weight_decay,
                     grad_clip=cfg.grad_clip, val_fn=val, checkpoint=checkpoint, seed=cfg.seed,
                     progress=progress, max_steps=max_steps,
                     **{"description": "distill", **fit_options})  # fmt: skip
    finally:
        teacher.train(teacher_was)
    rep = DistillReport(decisions, train=result, alpha=cfg.alpha if use_targets else 1.0,
                        notes=notes)  # fmt: skip
    if extra is not None:
        rep.pairs, rep.embeddings = extra.pairs, extra.embeddings
    return out, rep


def _prepare_features(cfg: Feature, student: nn.Module, teacher: nn.Module, b: Batch) -> Any:
    """Adapters, the feature term and the pairs, traced on the first batch ``b``."""
    s_feats = ft.trace_features(student, b.run)
    t_feats = ft.trace_features(teacher, b.run)
    shapes_s, shapes_t = dict(s_feats), dict(t_feats)
    pairs = list(cfg.pairs.items()) or ft.pair_layers(s_feats, t_feats, cfg.n_pairs)
    notes = []
    for s, t in pairs:
        if s not in shapes_s or t not in shapes_t:
            raise ConfigError(
                f"feature pair {s!r} <- {t!r}: "
                + (f"student layer {s!r}" if s not in shapes_s else f"teacher layer {t!r}")
                + " has no single tensor output",
                fix=f"pair layers that return one tensor, e.g. student {list(shapes_s)[:4]}, "
                f"teacher {list(shapes_t)[:4]}",
            )
        if not ft._compatible(shapes_s[s], shapes_t[t]):
            raise ConfigError(
                f"feature pair {s!r} {shapes_s[s]} <- {t!r} {shapes_t[t]}: the shapes differ in "
                "more than the channel axis",
                fix="pair layers of the same spatial / sequence size",
            )
    if not pairs:
        notes.append("no compatible layer pairs: response distillation only")
    adapters = {s: ft.Adapter(shapes_s[s], shapes_t[t]) for s, t in pairs}

    def term(trainee: _Trainee, s_got: dict[str, Any], t_got: dict[str, Any]) -> torch.Tensor:
        total = torch.zeros(())
        for s, t in pairs:
            total = total + ft.hint_loss(trainee.adapter(s)(s_got[s]), t_got[t])
        return cfg.feature_weight * total / max(len(pairs), 1)

    s_names, t_names = [s for s, _ in pairs], [t for _, t in pairs]
    return adapters, Extra(s_names, t_names, False, term, pairs=pairs), notes


def _prepare_relations(cfg: Relation, student: nn.Module, teacher: nn.Module, b: Batch) -> Any:
    """The projection (contrastive), the relation term and the embedding layers."""
    s_layer = cfg.layer or ft.last_linear(student)
    t_layer = cfg.teacher_layer or cfg.layer or ft.last_linear(teacher)
    with ft.capture(student, [s_layer], inputs=True) as sg, torch.no_grad():
        b.run(student)
    with ft.capture(teacher, [t_layer], inputs=True) as tg, torch.no_grad():
        b.run(teacher)
    s_dim, t_dim = sg[s_layer].flatten(1).shape[1], tg[t_layer].flatten(1).shape[1]
    adapters: dict[str, nn.Module] = {}
    if cfg.kind == "contrastive":
        adapters["embedding"] = nn.Linear(s_dim, t_dim, bias=False)

    def term(trainee: _Trainee, s_got: dict[str, Any], t_got: dict[str, Any]) -> torch.Tensor:
        s, t = s_got[s_layer], t_got[t_layer]
        if cfg.kind == "contrastive":
            value = ft.contrastive_loss(s, t, trainee.adapter("embedding"))
        else:
            value = ft.rkd_loss(s, t, distance=cfg.distance, angle=cfg.angle)
        return cfg.relation_weight * value

    extra = Extra([s_layer], [t_layer], True, term, embeddings=(s_layer, t_layer))
    return adapters, extra, []


_PREPARE: dict[str, Callable[..., Any]] = {
    "feature": _prepare_features,
    "relation": _prepare_relations,
}


def _handler(kind: str) -> Callable[..., Any]:
    def handler(
        model: nn.Module,
        config: Response,
        *,
        data: Any,
        teacher: nn.Module,
        inplace: bool = False,
        val_fn: Callable[[nn.Module], float] | None = None,
        checkpoint: PathLike | None = None,
        progress: bool = False,
        max_steps: int | None = None,
        fit_options: dict[str, Any] | None = None,
    ) -> tuple[nn.Module, DistillReport]:
        if not isinstance(teacher, nn.Module):
            raise ConfigError(
                "distillation needs teacher=<the model to learn from>",
                fix="call sk.distill(student, teacher, method, data=...)",
            )
        try:
            len(data)
        except TypeError:
            raise DataError(
                "distillation data has no length (a one-pass iterator?)",
                fix="pass a DataLoader or a list of batches: training makes several passes",
            ) from None
        prepare: Callable[..., Any] | None = _PREPARE.get(kind)
        bound = None if prepare is None else functools.partial(prepare, config)
        return _run(model, config, teacher, data, inplace=inplace, val_fn=val_fn,
                    checkpoint=checkpoint, progress=progress, max_steps=max_steps,
                    prepare=bound, fit_options=fit_options or {})  # fmt: skip

    handler.__name__ = f"distill_{kind}"
    return handler


_COMMON = {"example": {"epochs": 1}, "export": "onnx"}
METHODS.register("distill.response", config=Response, aliases={"kd": {}, "hinton": {}},
                 summary="match the teacher's outputs, with a loss chosen per output kind",
                 **_COMMON)(_handler("response"))  # fmt: skip
METHODS.register("distill.feature", config=Feature, aliases={"hint": {}, "fitnets": {}},
                 summary="response plus intermediate features through learned adapters",
                 **_COMMON)(_handler("feature"))  # fmt: skip
METHODS.register("distill.relation", config=Relation,
                 aliases={"rkd": {}, "contrastive": {"kind": "contrastive"}},
                 summary="response plus sample relations (RKD distance/angle, contrastive)",
                 **_COMMON)(_handler("relation"))  # fmt: skip
