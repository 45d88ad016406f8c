"""Recovery after pruning: fine-tune the smaller model, optionally distilling from the dense one.

With a teacher, recovery is the ``distill.response`` method (``sk.distill``), run in place: the
distillation loss is chosen from what the model returns (softened KL for class or token logits,
binary KL for sigmoid outputs, a distribution loss for peaked heat-maps, MSE for regressions and
embeddings), mixed with the task loss where the data has targets. It runs on slimkit's one
training loop (``core.train.fit``: progress bar, atomic checkpoints, resume)::

    small = sk.prune(model, sk.prune.Channel(ratio=0.5), example_inputs=(x,))
    recover(small, loader, teacher=model, epochs=3, lr=1e-3)

``distillation_loss`` is the plain softmax-only loss (Hinton et al., 2015), kept for callers that
build their own training loop around it.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from slimkit.core.train import LossFn, TrainResult, fit


def distillation_loss(
    teacher: nn.Module, *, temperature: float = 4.0, alpha: float = 0.5
) -> LossFn:
    """``loss(model, (x, y)) = alpha * T^2 * KL(teacher_T || model_T) + (1 - alpha) * CE(y)``."""
    teacher.eval()

    def loss(model: nn.Module, batch: Any) -> torch.Tensor:
        x, y = batch
        out = model(x)
        with torch.no_grad():
            ref = teacher(x)
        logits, ref = out.reshape(-1, out.shape[-1]), ref.reshape(-1, ref.shape[-1])
        kd = F.kl_div(
            F.log_softmax(logits / temperature, -1),
            F.log_softmax(ref / temperature, -1),
            log_target=True,
            reduction="batchmean",
        )
        ce = F.cross_entropy(logits, y.reshape(-1))
        return alpha * temperature**2 * kd + (1 - alpha) * ce

    return loss


def recover(
    model: nn.Module,
    train_loader: Any,
    *,
    teacher: nn.Module | None = None,
    epochs: int = 3,
    lr: float = 1e-3,
    temperature: float = 4.0,
    alpha: float = 0.5,
    loss: str = "auto",
    **fit_kwargs: Any,
) -> TrainResult:
    """Fine-tune ``model`` in place; with ``teacher``, by distillation (``distill.response``
    with ``loss``, ``temperature`` and ``alpha``). ``fit_kwargs`` go to ``core.train.fit``."""
    if teacher is None:
        return fit(model, train_loader, epochs=epochs, lr=lr, **fit_kwargs)
    from slimkit.core.registry import load_methods
    from slimkit.core.verbs import dispatch, report

    cfg_keys = ("seed", "optimizer", "weight_decay", "grad_clip")
    fields = {k: fit_kwargs.pop(k) for k in cfg_keys if k in fit_kwargs}
    cls = load_methods().entry("distill.response").meta["config"]
    cfg = cls(loss=loss, temperature=temperature, alpha=alpha, epochs=epochs, lr=lr, **fields)
    passed = {k: fit_kwargs.pop(k) for k in ("val_fn", "checkpoint", "progress", "max_steps")
              if k in fit_kwargs}  # fmt: skip
    out = dispatch("distill", model, cfg, data=train_loader, teacher=teacher, inplace=True,
                   fit_options=fit_kwargs or None, **passed)  # fmt: skip
    result: TrainResult = report(out).detail.train
    return result
