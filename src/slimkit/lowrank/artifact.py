"""Save a factorised model as plain files and reload it into a fresh copy of the original
architecture.

The directory holds ``model.safetensors`` (the factorised weights) and ``lowrank.json`` (the method,
its config and, per factorised layer, its name, type, weight shape, kind, rank and spatial form).
``load_lowrank`` rebuilds each chain on the original model (``modules.chain``), checks each layer's
type and shape against the record, then loads the weights; no pickle is involved::

    save_lowrank(small, "out/")
    small = load_lowrank("out/", model=create_original())
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

from torch import nn

from slimkit.core.io import (
    PathLike,
    load_into,
    load_weights,
    read_record,
    save_weights,
    write_json,
)
from slimkit.errors import CheckpointError
from slimkit.lowrank.methods import RECORD
from slimkit.lowrank.modules import LAYERS, chain

FORMAT = 1
FILE = "lowrank.json"


def lowrank_record(model: nn.Module) -> dict[str, Any] | None:
    """The record a ``lowrank.*`` method left on its result (method, config, layers), or None."""
    rec = model.__dict__.get(RECORD)
    return dict(rec) if isinstance(rec, dict) else None


def save_lowrank(model: nn.Module, directory: PathLike) -> Path:
    """Write ``model.safetensors`` and ``lowrank.json`` into ``directory`` (atomically, each)."""
    record = lowrank_record(model)
    if record is None:
        raise CheckpointError(
            f"this {type(model).__name__} carries no low-rank record",
            fix="save the result of sk.decompose (an unfactorised model: "
            "slimkit.core.io.save_weights(model, path))",
        )
    if model.__dict__.get("_slimkit_pruning") is not None:
        raise CheckpointError(
            "this model was pruned and then factorised; its artifact cannot replay both yet",
            fix="save the weights with slimkit.core.io.save_weights and rebuild in Python, or "
            "factorise before pruning",
        )
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    save_weights(model.state_dict(), out / "model.safetensors", metadata={"slimkit": "lowrank"})
    write_json(out / FILE, {"format": FORMAT, **record})
    return out


def _read(d: Path) -> list[dict[str, Any]]:
    path = d / FILE
    bad = CheckpointError(
        f"{str(path)!r} is not a slimkit low-rank record of format {FORMAT}",
        fix="re-create the artifact (slimkit decompose ... --out DIR, or save_lowrank)",
    )
    record = read_record(path, FORMAT, bad)
    layers = record.get("layers")
    ok = isinstance(layers, list) and all(
        isinstance(r, dict)
        and isinstance(r.get("name"), str)
        and isinstance(r.get("type"), str)
        and r.get("kind") in ("svd", "tucker", "cp")
        and isinstance(r.get("rank"), list)
        and all(isinstance(v, int) and v >= 1 for v in r["rank"])
        and isinstance(r.get("shape"), list)
        for r in layers
    )
    if not ok:
        raise bad
    return list(layers)  # type: ignore[arg-type]


def load_lowrank(directory: PathLike, *, model: nn.Module) -> nn.Module:
    """Replay the recorded factorisations on a copy of ``model`` (the original architecture) and
    load the weights; ``model`` itself is not modified."""
    d = Path(directory)
    layers = _read(d)
    out = copy.deepcopy(model)
    for row in layers:
        name = row["name"]
        try:
            layer = out.get_submodule(name)
        except AttributeError:
            layer = None
        if (
            not isinstance(layer, LAYERS)
            or type(layer).__name__ != row["type"]
            or list(layer.weight.shape) != row["shape"]
        ):
            got = "nothing" if layer is None else f"{type(layer).__name__}"
            if isinstance(layer, LAYERS):
                got += f" {tuple(layer.weight.shape)}"
            raise CheckpointError(
                f"the low-rank record in {str(d)!r} factorised {name!r}, a {row['type']} "
                f"{tuple(row['shape'])}, but this model has {got} there",
                fix="pass model= a fresh instance of the architecture that was factorised",
            )
        new = chain(layer, row["kind"], row["rank"], row.get("spatial", "full"))
        new.train(layer.training)
        for n, m in list(out.named_modules(remove_duplicate=False)):
            if m is layer and n:
                parent, _, attr = n.rpartition(".")
                setattr(out.get_submodule(parent), attr, new)
    load_into(out, load_weights(d / "model.safetensors"))
    record = json.loads((d / FILE).read_text(encoding="utf-8"))
    out.__dict__[RECORD] = {k: v for k, v in record.items() if k != "format"}
    return out
