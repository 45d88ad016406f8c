"""``slimkit.load(dir, model=...)``: reload any slimkit artifact into a fresh copy of the original
architecture, without pickle.

- a pruning artifact (``pruning.json`` + ``model.safetensors``, written by ``save_pruned``,
  ``slimkit prune`` or the pruning recipes) replays the recorded slicing, then loads the weights;
- a directory or file with only ``model.safetensors`` loads the weights into ``model`` as they are.

Quantized artifacts deploy as their ``model.onnx`` (run it with ``slimkit.export.ort.OrtModule``);
``load`` says so instead of guessing.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from slimkit.core.io import PathLike, load_into, load_weights, read_metadata
from slimkit.errors import CheckpointError


def load(directory: PathLike, *, model: nn.Module) -> nn.Module:
    """The artifact in ``directory`` as a module built on ``model`` (which is not modified)."""
    import copy

    d = Path(directory)
    if d.is_file() and d.suffix == ".safetensors":
        out = copy.deepcopy(model)
        load_into(out, load_weights(d))
        return out
    if not d.is_dir():
        raise CheckpointError(
            f"{str(d)!r} is neither an artifact directory nor a .safetensors file",
            fix="pass the --out directory of a slimkit command (or save_pruned's directory)",
        )
    if (d / "pruning.json").is_file():
        from slimkit.prune.artifact import load_pruned

        return load_pruned(d, model=model)
    weights = d / "model.safetensors"
    if not weights.is_file():
        raise CheckpointError(
            f"{str(d)!r} holds no model.safetensors", fix="point at a slimkit artifact directory"
        )
    meta = read_metadata(weights)
    if str(meta.get("method", "")).startswith("quant"):
        raise CheckpointError(
            f"{str(d)!r} is a quantized artifact: its deployable form is {str(d / 'model.onnx')!r}",
            fix="run it with slimkit.export.ort.OrtModule(path), or re-quantize the float model",
        )
    out = copy.deepcopy(model)
    load_into(out, load_weights(weights))
    return out
