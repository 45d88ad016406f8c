"""Network Slimming: train with an L1 penalty on the norm scales, then prune by those scales.

Liu et al., "Learning Efficient Convolutional Networks through Network Slimming", ICCV 2017: adding
``strength * sum |gamma|`` over every BatchNorm (and GroupNorm / LayerNorm with a scale) to the loss
drives the scales of unneeded channels toward zero, so pruning by ``criterion="bn"`` afterwards
removes channels the network has already learned to do without::

    slimming_train(model, loader, strength=1e-4, epochs=5, lr=1e-3)
    small = prune_channels(model, Channel(ratio=0.5, criterion="bn"), example_inputs=(x,))

It runs on slimkit's one training loop (``core.train.fit``: progress, checkpoints, resume).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from slimkit.core.train import LossFn, TrainResult, cross_entropy, fit
from slimkit.errors import ConfigError

_NORMS = (_BatchNorm, nn.GroupNorm, nn.LayerNorm)


def norm_scales(model: nn.Module) -> list[torch.Tensor]:
    """The per-channel scale parameters of every normalisation layer."""
    return [m.weight for m in model.modules() if isinstance(m, _NORMS) and m.weight is not None]


def slimming_loss(model: nn.Module, strength: float, base: LossFn | None = None) -> LossFn:
    """``base(model, batch) + strength * sum |gamma|`` over the norm scales of ``model``."""
    if strength < 0:
        raise ConfigError(f"strength must be >= 0 (got {strength})", fix="e.g. strength=1e-4")
    if not norm_scales(model):
        raise ConfigError(
            f"{type(model).__name__} has no BatchNorm / GroupNorm / LayerNorm scales to sparsify",
            fix="use another criterion (l1) for models without normalisation layers",
        )
    base_fn = base or cross_entropy

    def loss(m: nn.Module, batch: Any) -> torch.Tensor:
        penalty = sum(w.abs().sum() for w in norm_scales(m))
        return base_fn(m, batch) + strength * penalty

    return loss


def slimming_train(
    model: nn.Module,
    train_loader: Any,
    *,
    strength: float = 1e-4,
    epochs: int = 3,
    lr: float = 1e-3,
    loss_fn: LossFn | None = None,
    **fit_kwargs: Any,
) -> TrainResult:
    """Train ``model`` in place with the sparsity penalty on its norm scales."""
    return fit(model, train_loader, loss_fn=slimming_loss(model, strength, loss_fn), epochs=epochs,
               lr=lr, **fit_kwargs)  # fmt: skip
