"""Pruning: a dependency graph of coupled channels, importance criteria, channel pruning that
physically shrinks layers, unstructured / N:M masks, and reload of pruned artifacts.

``from slimkit.prune import Channel, prune_channels, save_pruned, load_pruned`` covers the common
path; ``build_depgraph`` shows which groups can be pruned and why the others cannot. The package
is also the verb, for every registered ``prune.*`` method::

    p = sk.prune(model, sk.prune.Channel(ratio=0.5), example_inputs=(x,))
    p = sk.prune(model, "channel", example_inputs=(x,))       # by name, default config
    s = sk.prune(model, sk.prune.Magnitude(sparsity=0.8))     # masks
    s = sk.prune(model, sk.prune.NM())                        # 2:4
    print(sk.report(p).summary())
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from slimkit.core.config import Config
from slimkit.core.scope import Scope
from slimkit.core.verbs import dispatch, make_callable
from slimkit.prune.amc import AMC, prune_amc
from slimkit.prune.artifact import load_pruned, save_pruned
from slimkit.prune.auto import Target, prune_to_target
from slimkit.prune.blocks import Drop, drop_blocks
from slimkit.prune.channel import (
    Channel,
    apply_slices,
    group_widths,
    plan_channels,
    prune_channels,
    pruning_record,
)
from slimkit.prune.depgraph import DepGraph, Group, Member, build_depgraph
from slimkit.prune.hf_attention import sync_head_counts
from slimkit.prune.llm import SparseGPT, Wanda, prune_sparsegpt, prune_wanda
from slimkit.prune.lottery import (
    Lottery,
    Ticket,
    apply_ticket,
    find_ticket,
    load_ticket,
    save_ticket,
)
from slimkit.prune.recover import distillation_loss, recover
from slimkit.prune.schedule import prune_iterative
from slimkit.prune.slimming import slimming_loss, slimming_train
from slimkit.prune.sparse_store import load_sparse, save_sparse
from slimkit.prune.unstructured import NM, Magnitude, finalize, prune_magnitude, prune_nm, sparsity

__all__ = [
    "Lottery",
    "Ticket",
    "apply_ticket",
    "find_ticket",
    "load_ticket",
    "save_ticket",
    "prune",
    "Drop",
    "Target",
    "drop_blocks",
    "prune_iterative",
    "prune_to_target",
    "slimming_loss",
    "slimming_train",
    "sync_head_counts",
    "NM",
    "Channel",
    "group_widths",
    "Magnitude",
    "distillation_loss",
    "finalize",
    "load_pruned",
    "prune_magnitude",
    "prune_nm",
    "recover",
    "save_pruned",
    "sparsity",
    "DepGraph",
    "Group",
    "Member",
    "apply_slices",
    "build_depgraph",
    "plan_channels",
    "prune_channels",
    "pruning_record",
    "SparseGPT",
    "Wanda",
    "prune_sparsegpt",
    "prune_wanda",
    "save_sparse",
    "load_sparse",
    "AMC",
    "prune_amc",
]


def prune(
    model: nn.Module,
    config: str | Config = "channel",
    *,
    example_inputs: Sequence[torch.Tensor] | torch.Tensor | None = None,
    data: Any = None,
    scope: Scope | None = None,
    **options: Any,
) -> nn.Module:
    """A pruned copy of ``model`` (never modified): ``sk.prune(model, method, ...)``.

    ``config`` is a registered name or alias (``"channel"``, ``"magnitude"``, ``"nm"``, ``"2:4"``,
    ``"auto"``, ``"blocks"``, ``"prune.channel"``) or a config object (``Channel``, ``Magnitude``,
    ``NM``, ``Target``, ``Drop``). ``example_inputs`` (one input batch) let structural methods
    trace the model; they default to the first batch of ``data``, the calibration batches some
    methods read (``Target(allocation="sensitivity")``, ``Drop``, ``criterion="taylor"``).
    ``scope`` limits the layers, for the methods that take one; ``options`` go to the handler
    (``loss_fn``, ``widths``, ``on_step``). The result keeps the input's train/eval flags.
    ``sk.report(result)`` says what was removed; structural results also carry the pruning record
    (``pruning_record``) that ``save_pruned`` / ``sk.load`` replay.
    """
    return dispatch("prune", model, config, example_inputs=example_inputs, data=data,
                    scope=scope, **options)  # fmt: skip


make_callable(__name__, "slimkit.prune:prune")
