"""Artifacts: write what a run produced, and reload it without pickle.

An artifact directory holds ``model.safetensors`` (plus ``pruning.json`` for a pruned model),
``model.onnx`` when exported, ``recipe.yaml`` (the run with every choice pinned: ``slimkit run``
repeats it), ``metrics.json`` and ``report.html`` (``slimkit.report``, with ``layers.json``;
``slimkit report DIR`` adds ``sensitivity.json``).
Each file is written atomically (temporary file + rename); files a previous run left in the folder
that this run did not write (a ``pruning.json`` under a now quantized model) are removed, so the
folder always describes one model.

``load(dir, model=original)`` (``slimkit.load``) reloads any artifact into a fresh copy of the
original architecture:

- a pruning artifact (``pruning.json`` + ``model.safetensors``) replays the recorded slicing, then
  loads the weights;
- a low-rank artifact (``lowrank.json`` + ``model.safetensors``) rebuilds the factorised chains,
  then loads the weights;
- a lightweight-block artifact (``lightweight.json`` + ``model.safetensors``) rebuilds the
  separable / ghost blocks, then loads the weights;
- a directory or file with only ``model.safetensors`` loads the weights into ``model`` as they are.

Quantized artifacts deploy as their ``model.onnx`` (run it with ``slimkit.export.ort.OrtModule``);
``load`` says so instead of guessing.
"""

from __future__ import annotations

import contextlib
import copy
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import nn
from torch.nn.utils import parametrize

from slimkit.core.io import (
    PathLike,
    atomic_path,
    atomic_write,
    load_into,
    load_weights,
    read_metadata,
    save_weights,
    write_json,
)
from slimkit.errors import CheckpointError

if TYPE_CHECKING:
    from slimkit.pipeline.recipe import Export
    from slimkit.pipeline.refs import ResolvedModel
    from slimkit.pipeline.runner import RunResult

FILES = ("model.safetensors", "pruning.json", "lowrank.json", "lightweight.json", "model.onnx",
         "recipe.yaml", "metrics.json")  # fmt: skip


def check_out_dir(out: PathLike) -> Path:
    """``out`` as an artifact folder that can be written: not an existing file, creatable,
    writable. Checked before the compute."""
    import os

    from slimkit.errors import OutputError

    d = Path(out)
    if d.exists() and not d.is_dir():
        raise OutputError(
            f"--out {str(d)!r} is an existing file, and an artifact is a folder",
            fix=f"name a folder (it is created), e.g. '{d.with_suffix('')}_artifact'",
        )
    existing = d
    while not existing.exists():  # nothing is created here: a failed run leaves no folder
        existing = existing.parent
    if not existing.is_dir():
        raise OutputError(
            f"cannot create the artifact folder {str(d)!r}: {str(existing)!r} is a file",
            fix="choose a folder path that does not go through a file",
        )
    if not os.access(existing, os.W_OK | os.X_OK):
        raise OutputError(
            f"the artifact folder {str(d)!r} cannot be written ({str(existing)!r} is read-only)",
            fix="choose a folder you can write to, or fix its permissions",
        )
    return d


INCOMPLETE = ".slimkit-incomplete"  # present while an artifact is being written (or was cut)
LOCK = ".slimkit.lock"  # held by the one run writing the folder


@contextlib.contextmanager
def artifact_lock(d: Path) -> Iterator[None]:
    """One writer per artifact folder: a second run into the same ``--out`` is refused while the
    first one writes; a lock left by a killed run (its process is gone) is taken over."""
    import os

    from slimkit.errors import OutputError

    lock = d / LOCK
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                pid = int(lock.read_text().strip() or 0)
            except (OSError, ValueError):
                pid = 0
            if pid and pid != os.getpid() and _alive(pid):
                raise OutputError(
                    f"another slimkit run (process {pid}) is writing the artifact {str(d)!r}",
                    fix="wait for it to finish, or write this one to another --out",
                ) from None
            lock.unlink(missing_ok=True)  # stale: its writer was killed
            continue
        with os.fdopen(fd, "w") as f:
            f.write(str(os.getpid()))
        break
    try:
        yield
    finally:
        lock.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    import os

    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def write_artifact(result: RunResult, out: PathLike) -> Path:
    """Write ``result`` into ``out``: weights, ONNX (per the recipe's export settings), the pinned
    recipe and ``metrics.json`` (the run's record; commands add their measurements to it).

    All or nothing: each file is written atomically, and the folder carries a
    ``.slimkit-incomplete`` marker from the first file to the last, so a run killed half-way
    leaves a folder that ``sk.load`` refuses by name (and a rerun replaces); one run at a time
    writes a folder (``artifact_lock``)."""
    d = check_out_dir(out)
    d.mkdir(parents=True, exist_ok=True)
    with artifact_lock(d):
        with atomic_write(d / INCOMPLETE) as f:
            f.write("a slimkit run is writing this artifact\n")
        _write_files(result, d)
        (d / INCOMPLETE).unlink()
    return d


def _write_files(result: RunResult, d: Path) -> None:
    written = save_model(result.model, d, method=result.quant_method)
    if result.recipe.export.onnx:
        result.onnx, result.kernels = export_model(
            result.model,
            d / "model.onnx",
            source=result.source,
            settings=result.recipe.export,
            kind=result.export_kind,
        )
        written.append("model.onnx")
    result.recipe.save(d / "recipe.yaml")
    result.out = d
    write_json(d / "metrics.json", result.to_dict())
    for name in set(FILES) - {*written, "recipe.yaml", "metrics.json"}:
        (d / name).unlink(missing_ok=True)
    _report(result, d)


def _report(result: RunResult, d: Path) -> None:
    """report.html + layers.json; warns, never fails the run. The per-layer sensitivity, and the
    per-layer roofline of a model over 40 layers or 5 M parameters, cost seconds per write: they
    are left for ``slimkit report DIR``."""
    import warnings

    from slimkit.report import try_report
    from slimkit.report.layers import is_small

    try:
        inputs = result.example_inputs(1)
        small = is_small(result.source.model)
    except Exception as e:  # no example inputs: the page without the per-layer record
        warnings.warn(f"report.html has no per-layer record: {e}", stacklevel=3)
        small = False
    if not small:  # a previous run's record would describe another model
        for name in ("layers.json", "sensitivity.json"):
            (d / name).unlink(missing_ok=True)
        try_report(d)
        return
    dtype = "int8" if result.quant_method else "fp32"
    try_report(d, source=result.source.model, result=result.model, example_inputs=inputs,
               result_dtype=dtype, sensitivity=False)  # fmt: skip


def save_model(model: nn.Module, directory: Path, *, method: str | None = None) -> list[str]:
    """Save the weights the way ``load`` reads them back; returns the file names written."""
    if type(model).__name__ == "OrtModule":  # an ONNX Runtime model (dynamic int8): the ONNX is it
        return []
    if method is not None:
        save_weights(model.state_dict(), directory / "model.safetensors",
                     metadata={"method": method})  # fmt: skip
        return ["model.safetensors"]
    from slimkit.lightweight.artifact import lightweight_record, save_lightweight

    # separable / ghost blocks: lightweight.json (it refuses a model also factorised or pruned:
    # one record cannot replay both)
    if lightweight_record(model) is not None:
        save_lightweight(model, directory)
        return ["model.safetensors", "lightweight.json"]
    from slimkit.lowrank.artifact import lowrank_record, save_lowrank

    if lowrank_record(model) is not None:  # factorised: lowrank.json replays the chains
        save_lowrank(model, directory)
        return ["model.safetensors", "lowrank.json"]
    from slimkit.prune import pruning_record

    masked = any(parametrize.is_parametrized(m, "weight") for m in model.modules())
    if pruning_record(model) is not None or masked:
        from slimkit.prune.artifact import save_pruned

        save_pruned(model, directory)
        return ["model.safetensors", "pruning.json"]
    save_weights(model.state_dict(), directory / "model.safetensors")
    return ["model.safetensors"]


def export_model(
    model: nn.Module,
    path: PathLike,
    *,
    source: ResolvedModel,
    settings: Export,
    kind: str = "onnx",
) -> tuple[Any, Any]:
    """Export ``model`` to ``path`` and check it in ONNX Runtime. ``kind`` (``RunResult
    .export_kind``): ``qdq`` writes integer ONNX and counts the kernels ORT runs, ``ort`` copies
    the file an ONNX Runtime model runs, ``onnx`` is a float export with a parity check.
    Returns ``(ExportReport | None, KernelReport | None)``."""
    inputs = source.inputs(settings.batch)
    if kind == "ort":
        src = getattr(model, "path", None)
        if not src:
            raise CheckpointError(
                "this ONNX Runtime model does not say which file it runs",
                fix="quantize with slimkit.quant.Dynamic(path=...) or export: {onnx: false}",
            )
        with atomic_path(path) as tmp:
            shutil.copyfile(src, tmp)
        return None, None
    if kind == "qdq":
        from slimkit.export.qdq import export_quantized

        return export_quantized(model, Path(path), example_inputs=inputs)
    from slimkit.export.onnx import export_onnx

    rep = export_onnx(model, Path(path), example_inputs=inputs, opset=settings.opset,
                      atol=settings.atol, exporter=settings.exporter)  # fmt: skip
    return rep, None


def load(directory: PathLike, *, model: nn.Module) -> nn.Module:
    """The artifact in ``directory`` as a module built on ``model`` (which is not modified)."""
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
    if (d / INCOMPLETE).exists():
        raise CheckpointError(
            f"{str(d)!r} is an incomplete artifact: the run writing it was interrupted",
            fix="run the command (or `slimkit run` its recipe) again with this --out",
        )
    if (d / "lowrank.json").is_file():
        from slimkit.lowrank.artifact import load_lowrank

        return load_lowrank(d, model=model)
    if (d / "lightweight.json").is_file():
        from slimkit.lightweight.artifact import load_lightweight

        return load_lightweight(d, model=model)
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
            fix="run it with slimkit.export.ort.OrtModule(slimkit.export.ort.ort_session(path)), "
            "or re-quantize the float model",
        )
    out = copy.deepcopy(model)
    load_into(out, load_weights(weights))
    return out


def write_metrics(out: PathLike, metrics: dict[str, Any]) -> None:
    """(Re)write ``metrics.json`` of an artifact (atomically), and its report.html."""
    write_json(Path(out) / "metrics.json", metrics)
    from slimkit.report import try_report

    try_report(out)
