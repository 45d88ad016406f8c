"""Recovery after pruning: fine-tune the smaller model, optionally distilling from the dense one.

Plain response distillation (Hinton et al., "Distilling the Knowledge in a Neural Network", 2015):
the loss mixes cross entropy on the labels with the KL divergence between the pruned model's and
the dense model's softened outputs. It runs on slimkit's one training loop (``core.train.fit``:
progress bar, atomic checkpoints, resume)::

    small = sk.prune(model, sk.prune.Channel(ratio=0.5), example_inputs=(x,))
    recover(small, loader, teacher=model, epochs=3, lr=1e-3)

Works for classifiers and language models (logits on the last axis).
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
    **fit_kwargs: Any,
) -> TrainResult:
    """Fine-tune ``model`` in place (with distillation from ``teacher`` when given)."""
    loss = distillation_loss(teacher, temperature=temperature, alpha=alpha) if teacher else None
    return fit(model, train_loader, loss_fn=loss, epochs=epochs, lr=lr, **fit_kwargs)
