"""Store masked (sparse) weights compactly: a bit mask and the kept values, in one safetensors file.

A weight pruned to sparsity s takes ``K / 8`` bytes of mask plus ``(1 - s)`` of its dense bytes
(fp32 at 50 %: about 53 % of dense); every other tensor is stored dense. ``load_sparse`` rebuilds
the dense weights on a copy of the original architecture and puts the masks back, so the result
computes exactly what was saved and keeps its zeros through fine-tuning::

    save_sparse(sparse_model, "gpt_sparse.safetensors")
    back = load_sparse("gpt_sparse.safetensors", model=create_original())
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
from torch import nn
from torch.nn.utils import parametrize

from slimkit.core.io import PathLike, load_into, load_weights, read_metadata, save_weights
from slimkit.core.rebuild import linearize_conv1d
from slimkit.errors import CheckpointError
from slimkit.prune.artifact import baked_state_dict
from slimkit.prune.channel import pruning_record
from slimkit.prune.unstructured import _attach, _mask_of

_BITS = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.uint8)


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """A 0/1 tensor -> uint8, 8 entries per byte (most significant bit first), zero-padded."""
    flat = (mask.flatten() != 0).to(torch.uint8)
    flat = torch.cat([flat, flat.new_zeros(-flat.numel() % 8)])
    return (flat.reshape(-1, 8) * _BITS).sum(1).to(torch.uint8)


def unpack_bits(packed: torch.Tensor, shape: torch.Size | tuple[int, ...]) -> torch.Tensor:
    """The boolean tensor of ``shape`` that ``pack_bits`` packed."""
    n = int(torch.Size(shape).numel())
    bits = (packed[:, None] & _BITS) != 0
    return bits.flatten()[:n].reshape(shape)


def save_sparse(model: nn.Module, path: PathLike) -> Path:
    """Write ``model`` to ``path`` (safetensors, atomically): each masked weight as
    ``<name>.__mask`` (packed bits) + ``<name>.__values`` (kept entries), the rest dense."""
    state = baked_state_dict(model)
    shapes: dict[str, list[int]] = {}
    for name, m in model.named_modules():
        if not parametrize.is_parametrized(m, "weight"):
            continue
        key = f"{name}.weight" if name else "weight"
        w, keep = state.pop(key), _mask_of(m) != 0
        state[f"{key}.__mask"] = pack_bits(keep)
        state[f"{key}.__values"] = w[keep]
        shapes[key] = list(w.shape)
    rec = pruning_record(model) or {}
    meta = {"slimkit": "sparse", "sparse_shapes": json.dumps(shapes),
            "conv1d_as_linear": json.dumps(rec.get("conv1d_as_linear", []))}  # fmt: skip
    return save_weights(state, path, metadata=meta)


def load_sparse(path: PathLike, *, model: nn.Module) -> nn.Module:
    """A copy of ``model`` (the original architecture) with the weights of ``path`` and the saved
    masks attached again; ``model`` itself is not modified."""
    meta = read_metadata(path)
    if meta.get("slimkit") != "sparse":
        raise CheckpointError(
            f"{str(path)!r} was not written by save_sparse",
            fix="save the pruned model with slimkit.prune.save_sparse(model, path)",
        )
    shapes = json.loads(meta["sparse_shapes"])
    state = load_weights(path)
    masks: dict[str, torch.Tensor] = {}
    for key, shape in shapes.items():
        keep = unpack_bits(state.pop(f"{key}.__mask"), tuple(shape))
        w = torch.zeros(shape, dtype=state[f"{key}.__values"].dtype)
        w[keep] = state.pop(f"{key}.__values")
        state[key], masks[key] = w, keep.float()
    out = copy.deepcopy(model)
    if json.loads(meta.get("conv1d_as_linear", "[]")):
        linearize_conv1d(out)  # saved from the Linear layers the pruner replaced Conv1D with
    load_into(out, state)
    for key, mask in masks.items():
        owner = key.rpartition(".")[0]
        _attach(out.get_submodule(owner), mask)
    return out
