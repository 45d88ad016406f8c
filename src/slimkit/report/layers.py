"""Per-layer evidence for the report, computed while the models are at hand (the end of a run):
the roofline of the source and of the result, and a cheap per-layer sensitivity of the source.

Both are saved in the artifact (``layers.json``, ``sensitivity.json``) so the report can be drawn
again later from the folder alone (``slimkit report DIR``)::

    record = layer_record({"source": (model, "fp32"), "result": (small, "int8")}, (x,))
    write_layers(folder, record)
"""

from __future__ import annotations

import contextlib
import functools
from pathlib import Path
from typing import Any

import torch
from torch import nn

from slimkit.core.io import write_json
from slimkit.report.collect import LAYERS, SENSITIVITY, read_json

SENSITIVITY_CHANGES = ("int8", "prune50")
MAX_SENSITIVITY_LAYERS = 40  # above this the per-layer trials are not "cheap": skipped
MAX_SENSITIVITY_PARAMS = 5_000_000


def report_hardware() -> Any:
    """This machine's profile: the cached measurement when there is one, else a quick one
    (about 1.5 s, measured once per machine: every artifact write draws a roofline). The quick
    one is cached beside, not as, the measured profile: ``slimkit hw measure`` owns that."""
    from slimkit.analyze.hardware import _cache_file, load_profile

    if _cache_file(2).is_file():
        return load_profile("this")
    return _quick_hardware(_cache_file(2))


@functools.cache
def _quick_hardware(measured: Path) -> Any:
    from slimkit.analyze.hardware import HardwareProfile, measure_hardware

    path = measured.with_name(measured.stem + "-quick.yaml")
    try:
        return HardwareProfile.from_yaml(path)
    except Exception:  # absent or unreadable: measure again
        pass
    hw = measure_hardware(2, quick=True)
    with contextlib.suppress(OSError):  # a read-only cache only costs the next run 1.5 s
        path.parent.mkdir(parents=True, exist_ok=True)
        hw.to_yaml(path)
    return hw


def _hw_dict(hw: Any) -> dict[str, Any]:
    return {k: v for k, v in hw.to_dict().items() if k != "details"}  # details: how measured


def layer_record(
    models: dict[str, tuple[nn.Module, str]],
    example_inputs: tuple[torch.Tensor, ...],
    *,
    hw: Any = None,
) -> dict[str, Any]:
    """``{"hardware": {...}, "models": {label: roofline}}`` for each ``label: (model, dtype)``;
    a model that cannot be profiled gets ``{"error": why}`` instead of its layers."""
    from slimkit.analyze.profile import profile_model
    from slimkit.analyze.roofline import roofline
    from slimkit.core.verbs import eval_mode

    hw = hw if hw is not None else report_hardware()
    out: dict[str, Any] = {"hardware": _hw_dict(hw), "models": {}}
    for label, (model, dtype) in models.items():
        try:
            with eval_mode(model), torch.no_grad():
                rf = roofline(profile_model(model, example_inputs), hw, dtype)  # type: ignore[arg-type]
        except Exception as e:  # evidence, not a gate: say why it is missing
            out["models"][label] = {"error": f"{type(e).__name__}: {e}"[:300]}
            continue
        d = rf.to_dict()
        d["layers"] = [r for r in d["layers"] if r["bound"] != "fused" and r["flops"] > 0]
        out["models"][label] = d
    return out


def is_small(model: nn.Module) -> bool:
    """Up to 40 conv / linear layers and 5 M parameters: per-layer work on it takes well under
    a second (the artifact write profiles only such models; ``slimkit report DIR`` any)."""
    from slimkit.analyze.sensitivity import LAYER_TYPES

    layers = sum(isinstance(m, LAYER_TYPES) for m in model.modules())
    params = sum(p.numel() for p in model.parameters())
    return 0 < layers <= MAX_SENSITIVITY_LAYERS and params <= MAX_SENSITIVITY_PARAMS


def cheap_sensitivity(
    model: nn.Module, example_inputs: tuple[torch.Tensor, ...]
) -> dict[str, Any] | None:
    """SQNR of the output with one conv / linear changed at a time (int8, half the channels),
    on ``example_inputs``; None when the model is too large for that to be cheap."""
    from slimkit.analyze.sensitivity import sensitivity

    if not is_small(model):
        return None
    res = sensitivity(model, example_inputs=example_inputs, changes=SENSITIVITY_CHANGES,
                      progress=False)  # fmt: skip
    return {**res.to_dict(), "source": "SQNR of the source's output on its example inputs"}


def write_layers(
    folder: Path,
    *,
    source: nn.Module,
    result: nn.Module | None,
    example_inputs: tuple[torch.Tensor, ...],
    result_dtype: str = "fp32",
    sensitivity: bool = True,
) -> None:
    """Write ``layers.json`` (and, when cheap, ``sensitivity.json``) into ``folder``. Without
    ``sensitivity`` (artifact writes: it costs seconds) layers.json marks it deferred and the
    next ``slimkit report DIR`` computes it."""
    models = {"source": (source, "fp32")}
    if isinstance(result, nn.Module) and type(result).__name__ != "OrtModule":
        models["result"] = (result, result_dtype)
    record = layer_record(models, example_inputs)
    if "result" not in models:
        record["models"]["result"] = {"error": "the result is not a PyTorch model here (a "
                                      "quantized artifact deploys as its model.onnx)"}  # fmt: skip
    record["sensitivity"] = "computed" if sensitivity else "deferred"
    write_json(folder / LAYERS, record)
    if sensitivity:
        write_sensitivity(folder, source, example_inputs)
    else:  # a previous run's file would describe another model
        (folder / SENSITIVITY).unlink(missing_ok=True)


def write_sensitivity(
    folder: Path, source: nn.Module, example_inputs: tuple[torch.Tensor, ...]
) -> None:
    """Write ``sensitivity.json`` when it is cheap, else remove a previous run's."""
    try:
        sens = cheap_sensitivity(source, example_inputs)
    except Exception:  # a model the trials cannot change: the report says none was recorded
        sens = None
    if sens is not None:
        write_json(folder / SENSITIVITY, sens)
    else:
        (folder / SENSITIVITY).unlink(missing_ok=True)


def layers_from_artifact(folder: Path, *, progress: bool = False) -> str | None:
    """Write ``layers.json`` (and ``sensitivity.json``) for an artifact that has none, from its
    recipe: the recipe's model is resolved (a zoo model loads from the cache), the artifact is
    loaded onto it with ``slimkit.load`` (a quantized artifact deploys as ONNX: then only the
    source is profiled). Returns None when written, else why not (the report says it)."""
    from slimkit.errors import SlimkitError
    from slimkit.pipeline.artifact import load
    from slimkit.pipeline.recipe import Recipe
    from slimkit.pipeline.refs import resolve_model

    done = read_json(folder / LAYERS)
    if done is not None and done.get("sensitivity") != "deferred":
        return None
    if not (folder / "recipe.yaml").is_file():
        return "no recipe.yaml names the model"
    try:
        rec = Recipe.load(folder / "recipe.yaml")
        ref = rec.path(rec.model)
        if ref is None:
            return "the recipe names no model (it was a Python object)"
        src = resolve_model(str(ref), weights=rec.path(rec.weights), input_shape=rec.input_shape,
                            progress=progress)  # fmt: skip
        if done is not None:  # the artifact write profiled the layers, left the sensitivity
            write_sensitivity(folder, src.model, src.inputs(1))
            write_json(folder / LAYERS, {**done, "sensitivity": "computed"})
            return None
        try:
            result: nn.Module | None = load(folder, model=src.model)
        except SlimkitError:  # quantized: its deployable form is the ONNX file
            result = None
        write_layers(folder, source=src.model, result=result, example_inputs=src.inputs(1))
    except Exception as e:  # evidence, not a gate
        return f"{type(e).__name__}: {e}"[:300]
    return None
