"""Lightweight blocks: the standard kxk convolutions of a trained model replaced by
depthwise-separable or ghost blocks, initialised from the original kernels and recovered by
distillation from the original. ``sk.lighten(model, method, ...)`` runs every registered
``lightweight.*`` method by name or config::

    small = sk.lighten(model, "separable", data=train, epochs=2)
    small = sk.lighten(model, sk.lightweight.Ghost(ratio=2, epochs=2), data=train)
    print(sk.report(small).summary())

See ``blocks`` (the blocks and their initialisation), ``methods`` and ``artifact``
(``save_lightweight`` / ``load_lightweight``: plain files, replayed on the original
architecture; ``slimkit.load`` reads them).
"""

from __future__ import annotations

from typing import Any

from torch import nn

from slimkit.core.config import Config
from slimkit.core.scope import Scope
from slimkit.core.verbs import dispatch
from slimkit.lightweight.artifact import load_lightweight, save_lightweight
from slimkit.lightweight.blocks import GhostConv, separable
from slimkit.lightweight.methods import (
    Ghost,
    LightweightReport,
    Separable,
    convert,
    distill_from,
)

__all__ = [
    "Ghost",
    "GhostConv",
    "LightweightReport",
    "Separable",
    "convert",
    "distill_from",
    "lighten",
    "load_lightweight",
    "save_lightweight",
    "separable",
]


def lighten(
    model: nn.Module,
    config: str | Config = "separable",
    *,
    data: Any = None,
    scope: Scope | None = None,
    **options: Any,
) -> nn.Module:
    """A copy of ``model`` (never modified) with its kxk convs as lightweight blocks; ``config``
    is a registered ``lightweight.*`` name or config object. ``sk.report(result)`` says which
    layers changed."""
    return dispatch("lightweight", model, config, data=data, scope=scope, **options)
