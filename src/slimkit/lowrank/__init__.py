"""Low-rank decomposition: truncated SVD for Linear layers, Tucker-2 and CP for convolutions,
with automatic rank selection. ``sk.decompose(model, method, ...)`` runs every registered
``lowrank.*`` method by name or config::

    small = sk.decompose(model, "svd")                                  # energy 0.9
    small = sk.decompose(model, sk.lowrank.SVD(params=0.2), example_inputs=(x,))
    fast = sk.decompose(model, sk.lowrank.Tucker(vbmf=True))
    print(sk.report(small).summary())                   # per layer: rank, params, error
    sk.lowrank.save_lowrank(small, "out/"); sk.load("out/", model=original)

See ``methods`` (the methods and the layers they take), ``rank`` (the rank rules), ``modules``
(the factorised chains) and ``factorise`` / ``vbmf`` (the math)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from slimkit.core.config import Config
from slimkit.core.scope import Scope
from slimkit.core.verbs import dispatch
from slimkit.lowrank.artifact import load_lowrank, lowrank_record, save_lowrank
from slimkit.lowrank.methods import CP, SVD, LowRankReport, Tucker
from slimkit.lowrank.modules import LowRank, factorise
from slimkit.lowrank.rank import RankRule

__all__ = [
    "CP",
    "SVD",
    "LowRank",
    "LowRankReport",
    "RankRule",
    "Tucker",
    "decompose",
    "factorise",
    "load_lowrank",
    "lowrank_record",
    "save_lowrank",
]


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
    return dispatch(
        "lowrank", model, config, data=data, example_inputs=example_inputs, scope=scope, **options
    )
