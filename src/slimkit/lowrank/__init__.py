"""Low-rank decomposition: truncated SVD for Linear layers, Tucker-2 and CP for convolutions,
with automatic rank selection. ``sk.decompose(model, method, ...)`` runs every registered
``lowrank.*`` method by name or config."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from slimkit.core.config import Config
from slimkit.core.scope import Scope
from slimkit.core.verbs import dispatch

__all__ = ["decompose"]


def decompose(
    model: nn.Module,
    config: str | Config = "svd",
    *,
    data: Any = None,
    example_inputs: Sequence[torch.Tensor] | torch.Tensor | None = None,
    scope: Scope | None = None,
    **options: Any,
) -> nn.Module:
    """A factorised copy of ``model`` (never modified); ``config`` is a registered ``lowrank.*``
    name or config object. ``sk.report(result)`` says which layers were factorised."""
    return dispatch("lowrank", model, config, data=data, example_inputs=example_inputs,
                    scope=scope, **options)  # fmt: skip
