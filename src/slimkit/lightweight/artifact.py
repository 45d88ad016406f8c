"""Save a model with lightweight blocks as plain files and reload it into a fresh copy of the
original architecture.

The directory holds ``model.safetensors`` (the converted weights, the ghost blocks' channel order
included) and ``lightweight.json`` (per converted conv: its name, type, weight shape and the block
that replaced it, with its multiplier or ratio). ``load_lightweight`` rebuilds each block from the
original model's conv at that name, checking its type and shape against the record, then loads
the weights; no pickle is involved::

    save_lightweight(small, "out/")
    small = load_lightweight("out/", model=create_original())

``slimkit.load`` / ``pipeline.artifact.load`` read these folders, and the artifact writer writes
them for every model a ``lightweight.*`` step produced.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from torch import nn
from torch.nn.utils import parametrize

from slimkit.core.io import (
    PathLike,
    load_into,
    load_weights,
    read_record,
    save_weights,
    write_json,
)
from slimkit.core.scope import set_submodule
from slimkit.errors import CheckpointError
from slimkit.lightweight.blocks import GhostConv, separable

FORMAT = 1
FILE = "lightweight.json"
RECORD = "_slimkit_lightweight"  # the record on a converted module (read by the artifact writer)


def lightweight_record(model: nn.Module) -> dict[str, Any] | None:
    """The record a ``lightweight.*`` method left on its result (method, config, layers), or
    None."""
    rec = model.__dict__.get(RECORD)
    return dict(rec) if isinstance(rec, dict) else None


def block_for(conv: nn.Conv2d, row: dict[str, Any]) -> nn.Module:
    """The block that replaced ``conv``, as recorded in ``row`` (its weights are overwritten by
    the artifact's)."""
    if row["block"] == "separable":
        return separable(conv, int(row["multiplier"]))[0]
    return GhostConv(conv, int(row["ratio"]))


def save_lightweight(model: nn.Module, directory: PathLike) -> Path:
    """Write ``model.safetensors`` and ``lightweight.json`` into ``directory`` (atomically,
    each)."""
    record = lightweight_record(model)
    if record is None:
        raise CheckpointError(
            f"this {type(model).__name__} carries no lightweight-block record",
            fix="save the result of sk.lighten (an unconverted model: "
            "slimkit.core.io.save_weights(model, path))",
        )
    masked = any(parametrize.is_parametrized(m) for m in model.modules())
    for other, what in (("_slimkit_pruning", "pruned"), ("_slimkit_lowrank", "factorised")):
        if model.__dict__.get(other) is not None or (masked and what == "pruned"):
            raise CheckpointError(
                f"this model was converted to lightweight blocks and {what}; its artifact "
                "cannot replay both yet",
                fix="save the weights with slimkit.core.io.save_weights and rebuild in Python, "
                "or apply only one of the two",
            )
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    save_weights(model.state_dict(), out / "model.safetensors",
                 metadata={"slimkit": "lightweight"})  # fmt: skip
    write_json(out / FILE, {"format": FORMAT, **record})
    return out


def _read(d: Path) -> dict[str, Any]:
    path = d / FILE
    bad = CheckpointError(
        f"{str(path)!r} is not a slimkit lightweight-block record of format {FORMAT}",
        fix="re-create the artifact (slimkit dynamic ... --method separable|ghost --out DIR, "
        "or save_lightweight)",
    )
    record = read_record(path, FORMAT, bad)
    layers = record.get("layers")

    def ok(r: Any) -> bool:
        if not (isinstance(r, dict) and isinstance(r.get("name"), str)
                and r.get("type") == "Conv2d" and isinstance(r.get("shape"), list)):  # fmt: skip
            return False
        key = {"separable": "multiplier", "ghost": "ratio"}.get(r.get("block"))  # type: ignore[arg-type]
        return key is not None and isinstance(r.get(key), int) and r[key] >= 1

    if not isinstance(layers, list) or not all(ok(r) for r in layers):
        raise bad
    return record


def load_lightweight(directory: PathLike, *, model: nn.Module) -> nn.Module:
    """Replay the recorded conversions on a copy of ``model`` (the original architecture) and
    load the weights; ``model`` itself is not modified."""
    d = Path(directory)
    record = _read(d)
    out = copy.deepcopy(model)
    for row in record["layers"]:
        name = row["name"]
        try:
            conv = out.get_submodule(name)
        except AttributeError:
            conv = None
        if not isinstance(conv, nn.Conv2d) or list(conv.weight.shape) != row["shape"]:
            got = "nothing" if conv is None else type(conv).__name__
            if isinstance(conv, nn.Conv2d):
                got += f" {tuple(conv.weight.shape)}"
            raise CheckpointError(
                f"the lightweight record in {str(d)!r} converted {name!r}, a Conv2d "
                f"{tuple(row['shape'])}, but this model has {got} there",
                fix="pass model= a fresh instance of the architecture that was converted",
            )
        block = block_for(conv, row)
        block.train(conv.training)
        set_submodule(out, name, block)
    load_into(out, load_weights(d / "model.safetensors"))
    out.__dict__[RECORD] = {k: v for k, v in record.items() if k != "format"}
    return out
