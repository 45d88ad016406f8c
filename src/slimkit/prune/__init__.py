"""Pruning: a dependency graph of coupled channels, importance criteria, channel pruning that
physically shrinks layers, unstructured / N:M masks, and reload of pruned artifacts.

``from slimkit.prune import Channel, prune_channels, save_pruned, load_pruned`` covers the common
path; ``build_depgraph`` shows which groups can be pruned and why the others cannot. The package
is also the verb: ``sk.prune(model, sk.prune.Channel(ratio=0.5), example_inputs=(x,))``.
"""

from slimkit.core.verbs import make_callable
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
from slimkit.prune.recover import distillation_loss, recover
from slimkit.prune.schedule import prune_iterative
from slimkit.prune.slimming import slimming_loss, slimming_train
from slimkit.prune.unstructured import NM, Magnitude, finalize, prune_magnitude, prune_nm, sparsity

__all__ = [
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
]

make_callable(__name__, "slimkit.prune.channel:prune_channels")
