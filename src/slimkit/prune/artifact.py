"""Save a pruned model as plain files and reload it into a fresh copy of the original architecture.

The directory holds ``model.safetensors`` (the pruned weights) and ``pruning.json`` (for every
tensor that lost channels, the positions kept along each dimension, and for attention modules that
store their head count, such as Hugging Face BERT's, the head-count attributes after pruning).
``load_pruned`` replays those slices on the original model, sets and checks those attributes, and
then loads the weights; no pickle is involved::

    save_pruned(small, "out/")
    small = load_pruned("out/", model=create_original())
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
from torch import nn
from torch.nn.utils import parametrize

from slimkit.core.io import PathLike, load_into, load_weights, save_weights, write_json
from slimkit.errors import CheckpointError
from slimkit.prune.channel import Slices, apply_slices, pruning_record, set_record
from slimkit.prune.hf_attention import head_counts, sync_head_counts
from slimkit.prune.mha import split_attention

FORMAT = 1


def save_pruned(model: nn.Module, directory: PathLike) -> Path:
    """Write ``model.safetensors`` and ``pruning.json`` into ``directory`` (atomically, each)."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    record = dict(pruning_record(model) or {"method": "none", "slices": {}})
    # the head counts the pruned tensors imply (whether or not the modules were synced)
    attributes = head_counts(model, record.get("slices", {}))
    if attributes:
        record["attributes"] = attributes
    save_weights(baked_state_dict(model), out / "model.safetensors", metadata={"slimkit": "pruned"})
    write_json(out / "pruning.json", {"format": FORMAT, **record})
    return out


def baked_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """``model.state_dict()`` with unstructured masks applied: plain ``weight`` keys, no masks."""
    sd = {k: v for k, v in model.state_dict().items() if ".parametrizations." not in k}
    for name, m in model.named_modules():
        if parametrize.is_parametrized(m, "weight"):
            sd[f"{name}.weight" if name else "weight"] = m.weight.detach()
    return sd


def _read_record(directory: Path) -> dict[str, object]:
    path = directory / "pruning.json"
    if not path.is_file():
        raise CheckpointError(
            f"{str(path)!r} does not exist",
            fix="point load_pruned at a directory written by save_pruned",
        )
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise CheckpointError(
            f"{str(path)!r} is not valid JSON ({e})", fix="re-create it"
        ) from None
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise CheckpointError(
            f"{str(path)!r} is not a slimkit pruning record of format {FORMAT}",
            fix="re-save the model with this version of slimkit",
        )
    return record


def _slices(raw: object, d: Path) -> Slices:
    """The recorded slices, checked field by field: ``{param: {dim: [kept indices]}}``."""
    bad = CheckpointError(
        f"the pruning record in {str(d)!r} is malformed: 'slices' must map parameter names to "
        "{dimension: [kept indices]}",
        fix="re-create the artifact (slimkit prune ... --out DIR, or save_pruned)",
    )
    if not isinstance(raw, dict):
        raise bad
    out: Slices = {}
    for name, dims in raw.items():
        if not isinstance(name, str) or not isinstance(dims, dict):
            raise bad
        try:
            out[name] = {int(dim): [int(i) for i in keep] for dim, keep in dims.items()}
        except (TypeError, ValueError):
            raise bad from None
        if any(i < 0 for keep in out[name].values() for i in keep):
            raise bad
    return out


def load_pruned(directory: PathLike, *, model: nn.Module) -> nn.Module:
    """Replay the recorded slicing on a copy of ``model`` (the original, unpruned architecture) and
    load the pruned weights; ``model`` itself is not modified."""
    d = Path(directory)
    record = _read_record(d)
    slices = _slices(record.get("slices", {}), d)
    dropped = record.get("dropped", [])
    if not isinstance(dropped, list) or not all(isinstance(n, str) for n in dropped):
        raise CheckpointError(
            f"the pruning record in {str(d)!r} is malformed: 'dropped' is not a list of names",
            fix="re-create the artifact (slimkit prune ... --out DIR, or save_pruned)",
        )
    out = copy.deepcopy(model)
    if record.get("attention_split"):
        split_attention(out)  # as prune_channels did before slicing
    try:
        apply_slices(out, slices)
        if dropped:
            from slimkit.prune.blocks import replace_with_dropped

            replace_with_dropped(out, [str(n) for n in dropped])
    except (AttributeError, IndexError, RuntimeError) as e:
        raise CheckpointError(
            f"the pruning record in {str(d)!r} does not fit {type(model).__name__} ({e})",
            fix="pass model= a fresh instance of the architecture that was pruned",
        ) from None
    _set_attributes(out, slices, record.get("attributes", {}), d)
    load_into(out, load_weights(d / "model.safetensors"))
    rec = {k: v for k, v in record.items() if k != "format"}
    set_record(out, rec)
    return out


def _set_attributes(model: nn.Module, slices: Slices, recorded: object, directory: Path) -> None:
    """Bring head-count attributes in step with the sliced tensors; they must agree with the
    record (a record that disagrees was written for another architecture)."""
    derived = sync_head_counts(model, slices)
    if not isinstance(recorded, dict):
        recorded = {}
    for name, attrs in recorded.items():
        if derived.get(name) != attrs:
            raise CheckpointError(
                f"the pruning record in {str(directory)!r} gives module {name!r} the attributes "
                f"{attrs}, but its sliced weights imply {derived.get(name)}",
                fix="pass model= a fresh instance of the architecture that was pruned",
            )
