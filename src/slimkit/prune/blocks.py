"""Layer and block dropping: remove whole residual blocks or transformer layers.

Deep residual stacks and transformer encoders tolerate losing whole blocks far better than the
same MACs taken evenly from every layer (Veit et al., "Residual Networks Behave Like Ensembles of
Relatively Shallow Networks", NeurIPS 2016; Fan et al., "Reducing Transformer Depth on Demand with
Structured Dropout", ICLR 2020). A *candidate* is a child of an ``nn.Sequential`` or
``nn.ModuleList`` that holds a conv or linear layer and whose output has the shape of its first
input (so the block can become the identity): a ResNet block without downsampling, a transformer
layer, a plain conv layer that keeps its width. Blocks are dropped greedily,
each time the one whose removal changes the model's output least on calibration data::

    small = drop_blocks(model, Drop(blocks=2), example_inputs=(x,), data=calibration_batches)

The dropped blocks become :class:`Dropped` (an identity that accepts and ignores extra arguments);
the pruning record lists them, so ``save_pruned`` / ``load_pruned`` replay the drop.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Sequence
from typing import Any, Literal

import torch
from pydantic import Field
from torch import nn

from slimkit.core.config import Config
from slimkit.core.data import collect_batches
from slimkit.core.registry import METHODS
from slimkit.errors import ConfigError
from slimkit.prune.auto import distortion, output_tensors
from slimkit.prune.channel import _as_inputs, pruning_record, set_record

_COMPUTE = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)  # a block must hold one of these


class Drop(Config):
    """Drop ``blocks`` whole blocks (or the ones named in ``names``)."""

    blocks: int = Field(1, ge=0)
    names: list[str] = Field(default_factory=list)  # exact module names; overrides `blocks`
    # greedy: each time the block whose removal changes the output least (calibration data);
    # even: evenly spaced in each stack, the first and last kept (DistilBERT's every other layer)
    order: Literal["greedy", "even"] = "greedy"
    keep: float | None = Field(None, gt=0, le=1)  # keep this fraction of the blocks (not `blocks`)
    calibration_batches: int = Field(2, ge=1)


class Dropped(nn.Module):
    """What a dropped block becomes: returns its first input unchanged."""

    def forward(self, x: Any, *args: Any, **kwargs: Any) -> Any:
        return x


def _parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    owner, _, attr = name.rpartition(".")
    return model.get_submodule(owner), attr


def replace_with_dropped(model: nn.Module, names: Iterable[str]) -> nn.Module:
    """Turn each named block into :class:`Dropped`, in place."""
    for name in names:
        parent, attr = _parent(model, name)
        if isinstance(parent, (nn.Sequential, nn.ModuleList)):
            parent[int(attr)] = Dropped()
        else:
            setattr(parent, attr, Dropped())
    return model


def droppable_blocks(model: nn.Module, example_inputs: Sequence[torch.Tensor]) -> list[str]:
    """Children of Sequential / ModuleList containers whose output keeps their input's shape."""
    containers = {
        name: m
        for name, m in model.named_modules()
        if isinstance(m, (nn.Sequential, nn.ModuleList))
    }
    cands = {
        f"{cname}.{i}" if cname else str(i): child
        for cname, c in containers.items()
        for i, child in enumerate(c)
        if any(isinstance(sub, _COMPUTE) for sub in child.modules())
    }
    ok: dict[str, bool] = {}
    hooks = []
    for name, m in cands.items():

        def hook(mod: nn.Module, args: Any, out: Any, _n: str = name) -> None:
            x = args[0] if args else None
            y = out[0] if isinstance(out, tuple) else out
            same = (
                isinstance(x, torch.Tensor)
                and isinstance(y, torch.Tensor)
                and x.shape == y.shape
                and x.dtype == y.dtype
            )
            ok[_n] = ok.get(_n, True) and same
            if isinstance(out, tuple) and len(out) > 1:
                ok[_n] = False  # a block returning several things cannot become the identity

        hooks.append(m.register_forward_hook(hook))
    try:
        with torch.no_grad():
            model(*example_inputs)
    finally:
        for h in hooks:
            h.remove()
    return [n for n in cands if ok.get(n)]


def _inside(name: str, blocks: Iterable[str]) -> bool:
    """Whether module ``name`` lies inside one of ``blocks`` (a block is not inside itself)."""
    return any(name.startswith(f"{b}.") for b in blocks)


def outermost_blocks(model: nn.Module, example_inputs: Sequence[torch.Tensor]) -> list[str]:
    """The droppable blocks of the main stack: those at the shallowest module depth among
    :func:`droppable_blocks` (ResNet's ``layer1.0``, MobileNetV2's ``features.2``), not the
    shape-keeping layers nested inside blocks (a MobileNetV2 block's depthwise convolution,
    ``features.11.conv.1``, which may sit in a block that itself cannot be dropped)."""
    cands = droppable_blocks(model, example_inputs)
    top = min((n.count(".") for n in cands), default=0)
    return [n for n in cands if n.count(".") == top]


def evenly_spaced(cands: Sequence[str], n: int) -> list[str]:
    """``n`` of the candidate blocks to drop, spread evenly over each stack (container) in
    proportion to its size, keeping each stack's first and last block where possible."""
    stacks: dict[str, list[str]] = {}
    for c in cands:
        stacks.setdefault(c.rpartition(".")[0], []).append(c)
    total = len(cands)
    quota = {k: round(n * len(v) / total) for k, v in stacks.items()}
    while sum(quota.values()) != n:  # fix rounding: adjust the largest stacks first
        k = max(stacks, key=lambda s: len(stacks[s]) - quota[s] if sum(quota.values()) < n
                else quota[s])  # fmt: skip
        quota[k] += 1 if sum(quota.values()) < n else -1
    chosen = []
    for k, blocks in stacks.items():
        keep_n = len(blocks) - quota[k]
        if keep_n <= 0:
            chosen += blocks
            continue
        keep = {round(i * (len(blocks) - 1) / max(keep_n - 1, 1)) for i in range(keep_n)}
        chosen += [b for i, b in enumerate(blocks) if i not in keep]
    return chosen


@METHODS.register(
    "prune.blocks",
    config=Drop,
    summary="drop whole residual blocks / layers",
    aliases={"drop": {}, "layers": {}},
    unsupported={
        m: "no child of an nn.Sequential / nn.ModuleList keeps its input's shape: nothing to drop"
        for m in ("mlp", "cnn_bn", "transformer_block", "lstm")
    },
)
def drop_blocks(
    model: nn.Module,
    config: Drop | None = None,
    *,
    example_inputs: Sequence[torch.Tensor] | torch.Tensor,
    data: Iterable[Any] | None = None,
) -> nn.Module:
    """A copy of ``model`` with whole blocks replaced by the identity (``model`` is untouched)."""
    cfg = config or Drop()
    inputs = _as_inputs(example_inputs)
    user, model = model, copy.deepcopy(model).eval()  # measure on an eval copy: BN stats stay
    cands = droppable_blocks(model, inputs)
    if cfg.keep is not None:
        cfg = cfg.replace(blocks=len(cands) - max(1, round(cfg.keep * len(cands))))
    if cfg.names:
        unknown = [n for n in cfg.names if n not in cands]
        if unknown:
            raise ConfigError(
                f"cannot drop {unknown}: not a block whose output keeps its input's shape",
                fix=f"choose among {cands[:8]}" if cands else "this model has no such block",
            )
        chosen = list(dict.fromkeys(cfg.names))
    elif cfg.order == "even":
        if cfg.blocks > len(cands):
            raise ConfigError(
                f"asked to drop {cfg.blocks} blocks but only {len(cands)} can be dropped",
                fix=f"use blocks <= {len(cands)} (candidates: {cands[:8]})",
            )
        chosen = evenly_spaced(cands, cfg.blocks)
    else:
        if cfg.blocks > len(cands):
            raise ConfigError(
                f"asked to drop {cfg.blocks} blocks but only {len(cands)} can be dropped",
                fix=f"use blocks <= {len(cands)} (candidates: {cands[:8]})",
            )
        batches = [
            b.args for b in collect_batches(
                data if data is not None else [inputs], what="calibration data",
                n_inputs=len(inputs), limit=cfg.calibration_batches,
            )
        ]  # fmt: skip
        ref = output_tensors(model, batches)
        chosen, current = [], copy.deepcopy(model)
        for _ in range(cfg.blocks):
            scores = {
                n: distortion(replace_with_dropped(copy.deepcopy(current), [n]), batches, ref)
                for n in cands
                if n not in chosen and not _inside(n, chosen)
            }
            if not scores:  # what is left lies inside dropped blocks: nothing more to drop
                break
            best = min(scores, key=scores.__getitem__)
            chosen.append(best)
            replace_with_dropped(current, [best])
    # a layer inside a block that is dropped too goes with it (dropping it after its block would
    # look for it inside the identity); the record lists what was dropped
    chosen = [n for n in chosen if not _inside(n, chosen)]
    out = replace_with_dropped(copy.deepcopy(user), chosen)  # the user's modes, as they were
    record = pruning_record(user) or {"method": "prune.blocks", "slices": {}}
    set_record(out, {**record, "dropped": [*record.get("dropped", []), *chosen]})
    return out
