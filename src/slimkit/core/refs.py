"""The zoo-free half of reference resolution: files and ``package.module:attr`` references.

Users type references on the command line and in recipes; ``slimkit.pipeline.refs`` turns them into
models and data, and handles the ``zoo:`` forms there (``core`` knows no technique and no zoo). This
module holds what needs neither: the resolved-model record, shape parsing, and the forms that name
a file (``program.pt2``, ``data.npz``) or an importable object (``package.module:factory``)::

    rm = resolve_model_file("mypkg.models:make_net", weights="w.safetensors", input_shape=(1, 16))
    batches = resolve_data_file("calib.npz", batch_size=8)

``resolve_model`` / ``resolve_data`` (every form, zoo included) are re-exported lazily from
``slimkit.pipeline.refs`` so older imports keep working.
"""

from __future__ import annotations

import importlib
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from slimkit.errors import ReferenceResolutionError

MODEL_FORMS = (
    "zoo:NAME (see `slimkit zoo list`)",
    "a .pt2 file saved with torch.export.save",
    "package.module:factory (plus --weights file.safetensors)",
)
DATA_FORMS = (
    "zoo:TASK[:split] (see `slimkit zoo list`; split train, val, test or calibration)",
    "zoo:MODEL:inputs (random example inputs of a zoo model)",
    "a .npz file (arrays x and optionally y)",
    "package.module:loader (a callable returning an iterable of batches)",
)


@dataclass
class ResolvedModel:
    """A model plus what slimkit knows about it: example inputs, its task, where it came from."""

    model: nn.Module
    name: str
    source: str
    example_inputs: tuple[torch.Tensor, ...] | None = None
    task: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def inputs(self, batch: int = 1) -> tuple[torch.Tensor, ...]:
        """Example inputs at ``batch`` (repeating or slicing the known ones)."""
        if self.example_inputs is None:
            raise ReferenceResolutionError(
                f"slimkit does not know the input shape of {self.name!r}",
                fix="pass --input-shape, e.g. --input-shape 1,3,224,224 (or example_inputs=...)",
            )
        out = []
        for x in self.example_inputs:
            reps = -(-batch // x.shape[0])
            out.append(x.repeat(reps, *([1] * (x.dim() - 1)))[:batch])
        return tuple(out)


def fail(kind: str, ref: str, tried: str, forms: Sequence[str]) -> ReferenceResolutionError:
    """The error for an unresolvable reference: what was tried and which forms exist."""
    return ReferenceResolutionError(
        f"cannot resolve {kind} reference {ref!r}: {tried}",
        fix="use one of: " + "; ".join(forms),
    )


def import_attr(ref: str, kind: str, forms: Sequence[str]) -> Any:
    """The object ``package.module:attr`` names."""
    mod_name, _, attr = ref.partition(":")
    try:
        mod = importlib.import_module(mod_name)
    except ImportError as e:
        raise fail(kind, ref, f"could not import module {mod_name!r} ({e})", forms) from None
    try:
        return getattr(mod, attr)
    except AttributeError:
        raise fail(kind, ref, f"module {mod_name!r} has no attribute {attr!r}", forms) from None


def parse_shape(text: str) -> tuple[int, ...]:
    """``"1,3,224,224"`` -> ``(1, 3, 224, 224)``."""
    try:
        dims = tuple(int(t) for t in text.replace("x", ",").split(",") if t.strip())
    except ValueError:
        dims = ()
    if not dims or any(d <= 0 for d in dims):
        raise ReferenceResolutionError(
            f"input shape {text!r} is not a list of positive integers",
            fix="write it like 1,3,224,224 (batch first)",
        )
    return dims


def resolve_model_file(
    ref: str,
    *,
    weights: str | Path | None = None,
    input_shape: Sequence[int] | None = None,
) -> ResolvedModel:
    """A ``.pt2`` program or a ``package.module:factory`` model, in eval mode."""
    shape_inputs = (torch.randn(*input_shape),) if input_shape else None
    if ref.endswith(".pt2"):
        if not Path(ref).is_file():
            raise fail("model", ref, "the file does not exist", MODEL_FORMS)
        from slimkit.core.io import load_program
        from slimkit.core.rebuild import program_module

        ep = load_program(ref)  # refuses pickled objects: nothing in the file runs
        ex = getattr(ep, "example_inputs", None)
        ex_args = tuple(ex[0]) if ex else shape_inputs
        # ATen calls rebuilt into nn layers, so that every technique sees Conv / Linear / BN
        return ResolvedModel(program_module(ep).eval(), Path(ref).stem, ref, ex_args)
    if ":" in ref and not Path(ref).exists():
        factory = import_attr(ref, "model", MODEL_FORMS)
        model = factory() if callable(factory) and not isinstance(factory, nn.Module) else factory
        if not isinstance(model, nn.Module):
            raise fail(
                "model", ref, f"it gave a {type(model).__name__}, not nn.Module", MODEL_FORMS
            )
        if weights is not None:
            from slimkit.core.io import load_into, load_weights

            load_into(model, load_weights(weights))
        return ResolvedModel(model.eval(), ref.rpartition(":")[2], ref, shape_inputs)
    tried = "the file does not exist" if not Path(ref).exists() else "unknown file type"
    raise fail("model", ref, tried, MODEL_FORMS)


def resolve_data_file(ref: str, *, batch_size: int = 32) -> Any:
    """An ``.npz`` archive or a ``package.module:loader``, as an iterable of batches."""
    if ref.endswith(".npz"):
        import numpy as np

        if not Path(ref).is_file():
            raise fail("data", ref, "the file does not exist", DATA_FORMS)
        try:
            with np.load(ref, allow_pickle=False) as z:  # never unpickles object arrays
                keys = list(z.keys())
                if not keys:
                    raise fail("data", ref, "the archive holds no arrays", DATA_FORMS)
                x = torch.from_numpy(z["x"] if "x" in z else z[keys[0]])
                y = torch.from_numpy(z["y"]) if "y" in z else None
        except ReferenceResolutionError:
            raise
        except ValueError as e:  # object arrays: pickled Python objects, refused
            raise fail("data", ref, f"it holds pickled Python objects, which slimkit does not "
                       f"load ({e})", DATA_FORMS) from None  # fmt: skip
        except (OSError, EOFError, zipfile.BadZipFile) as e:  # damaged or not an archive
            raise fail("data", ref, f"not a readable .npz archive ({e})", DATA_FORMS) from None
        tensors = (x,) if y is None else (x, y)
        ds = torch.utils.data.TensorDataset(*tensors)
        return torch.utils.data.DataLoader(ds, batch_size=batch_size)
    if ":" in ref and not Path(ref).exists():
        loader = import_attr(ref, "data", DATA_FORMS)
        return loader() if callable(loader) else loader
    tried = "the file does not exist" if not Path(ref).exists() else "unknown file type"
    raise fail("data", ref, tried, DATA_FORMS)


def __getattr__(name: str) -> Any:
    # every form, zoo included, lives one layer up; resolved on first use (no import cycle)
    if name in ("resolve_model", "resolve_data"):
        return getattr(importlib.import_module("slimkit.pipeline.refs"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
