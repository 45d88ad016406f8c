"""Export to ONNX with a dynamic batch, and prove the file computes what the PyTorch model does.

``export_onnx`` writes the file atomically, loads it in ONNX Runtime, runs it at a batch size other
than the one it was traced with, and reports the max abs error against PyTorch; above tolerance it
raises, so a silently wrong export never reaches a user::

    rep = export_onnx(model, "m.onnx", example_inputs=(x,))
    rep.max_abs_err   # e.g. 2.4e-07
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from slimkit.core.io import atomic_path
from slimkit.errors import ExportError
from slimkit.export.ort import ort_session, run_session, to_numpy

DEFAULT_OPSET = 17


@dataclass
class ExportReport:
    """What was written and how closely ONNX Runtime reproduces PyTorch."""

    path: str
    opset: int
    input_names: list[str]
    output_names: list[str]
    dynamic_batch: bool
    size_bytes: int
    max_abs_err: float | None = None  # ORT vs PyTorch on the parity batch, all outputs
    parity_batch: int | None = None
    exporter: str = "torchscript"
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _flatten(out: Any) -> list[torch.Tensor]:
    """The tensors of a model's output, in order: tuples, lists, dicts, Hugging Face
    ``ModelOutput``s (a dict of its non-None fields) and dataclasses; other values are dropped."""
    import dataclasses

    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        return [t for v in out.values() for t in _flatten(v)]
    if isinstance(out, (tuple, list)):
        return [t for v in out for t in _flatten(v)]
    if dataclasses.is_dataclass(out) and not isinstance(out, type):
        return [t for f in dataclasses.fields(out) for t in _flatten(getattr(out, f.name))]
    return []


def _output_names(out: Any) -> list[str] | None:
    """Names for the flattened outputs of a dict-like output of tensors (``logits``, ...)."""
    if isinstance(out, dict) and out and all(isinstance(v, torch.Tensor) for v in out.values()):
        return [str(k) for k in out]
    return None


class FlatIO(nn.Module):
    """``model`` called from positional tensors (the keyword inputs after the positional ones,
    by name, plus fixed options such as ``use_cache=False``), returning a flat tuple of tensors:
    the form the ONNX exporter and ONNX Runtime take. Hugging Face models export this way with
    named inputs and outputs."""

    def __init__(self, model: nn.Module, n_args: int, kw_names: Sequence[str],
                 fixed: dict[str, Any]) -> None:  # fmt: skip
        super().__init__()
        self.model = model
        self.n_args = n_args
        self.kw_names = list(kw_names)
        self.fixed = dict(fixed)
        self.train(model.training)  # the exporter restores this mode on the whole tree after

    def forward(self, *xs: torch.Tensor) -> Any:
        kw = dict(zip(self.kw_names, xs[self.n_args :], strict=True))
        out = _flatten(self.model(*xs[: self.n_args], **kw, **self.fixed))
        return out[0] if len(out) == 1 else tuple(out)


def flat_io(
    model: nn.Module, args: Sequence[torch.Tensor], kwargs: dict[str, torch.Tensor] | None
) -> tuple[nn.Module, tuple[torch.Tensor, ...], list[str] | None, list[str] | None]:
    """``(module, inputs, input names, output names)`` to export: ``model`` itself when it takes
    positional tensors and returns tensors, else a ``FlatIO`` around it (names from the keyword
    inputs and the output's keys)."""
    from slimkit.core.rebuild import fixed_kwargs, forward_params

    kw = dict(kwargs or {})
    fixed = fixed_kwargs(model, set(kw))
    ids = kw.get("input_ids")
    if (
        isinstance(ids, torch.Tensor)
        and "attention_mask" not in kw
        and "attention_mask" in forward_params(model)
    ):
        # deployed language models take a mask; without one, Hugging Face models run a
        # packed-sequence check (torch.diff) that has no ONNX export
        kw["attention_mask"] = torch.ones_like(ids)
    inputs = tuple(args) + tuple(kw.values())
    with torch.no_grad():
        out = model(*args, **kw, **fixed)
    plain = isinstance(out, torch.Tensor) or (
        isinstance(out, (tuple, list)) and all(isinstance(t, torch.Tensor) for t in out)
    )
    if not kw and not fixed and plain:
        return model, inputs, None, None
    in_names = None
    if kw:
        in_names = _default_names("input", len(args)) + list(kw) if args else list(kw)
    return FlatIO(model, len(args), list(kw), fixed), inputs, in_names, _output_names(out)


def _default_names(stem: str, n: int) -> list[str]:
    return [stem] if n == 1 else [f"{stem}_{i}" for i in range(n)]


def parity_inputs(example_inputs: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """The example batch plus its first sample again: same content, a batch size never traced."""
    return tuple(torch.cat([x, x[:1]], dim=0) if x.dim() > 0 else x for x in example_inputs)


def max_abs_error(ref: Sequence[Any], out: Sequence[Any]) -> float:
    """Largest absolute difference over a list of outputs (shapes must agree)."""
    worst = 0.0
    for i, (r, o) in enumerate(zip(ref, out, strict=True)):
        r_np, o_np = to_numpy(r), to_numpy(o)
        if r_np.shape != o_np.shape:
            raise ExportError(
                f"output {i}: ONNX shape {o_np.shape} differs from PyTorch {r_np.shape}",
                fix="the batch or sequence dimension was probably baked in as a constant; avoid "
                "Python ints from tensor.shape in arithmetic, or export with dynamic_batch=False",
            )
        if r_np.size:
            worst = max(worst, float(np.max(np.abs(r_np.astype(np.float64) - o_np))))
    return worst


def _integer_graph(model: nn.Module) -> bool:
    """Whether ``model`` is the result of a method whose registry entry says it deploys as an
    integer graph (``export="qdq"``: static int8 PTQ, QAT, weight-only int4)."""
    meta = getattr(model, "meta", None)
    method = meta.get("slimkit", {}).get("method") if isinstance(meta, dict) else None
    if not isinstance(method, str):
        return False
    from slimkit.core.registry import load_methods

    methods = load_methods()
    return method in methods and methods.entry(method).meta.get("export") == "qdq"


def export_onnx(
    model: nn.Module,
    path: str | Path,
    *,
    example_inputs: Sequence[torch.Tensor] | torch.Tensor = (),
    example_kwargs: dict[str, torch.Tensor] | None = None,
    dynamic_batch: bool = True,
    opset: int = DEFAULT_OPSET,
    check: bool = True,
    atol: float = 1e-4,
    input_names: Sequence[str] | None = None,
    output_names: Sequence[str] | None = None,
    exporter: Literal["torchscript", "dynamo"] = "torchscript",
) -> ExportReport:
    """Export ``model`` (in eval mode) to ``path``; with ``check`` verify it in ONNX Runtime.

    ``example_kwargs`` are keyword inputs (``input_ids=..., attention_mask=...``): they become
    ONNX inputs of those names, after the positional ones. Outputs that are dicts, Hugging Face
    ``ModelOutput``s or dataclasses are flattened to their tensors (named by their keys), and
    key/value caches are switched off (``use_cache=False``) where the forward takes the flag.

    ``exporter="torchscript"`` (default) is torch's tracing exporter: fast and stable for the
    layers slimkit produces. ``"dynamo"`` uses ``torch.export`` and onnxscript.
    Raises ``ExportError`` when export fails or ORT differs from PyTorch by more than ``atol``.
    A quantized result of ``sk.quantize`` (int8 PTQ / QAT, weight-only int4) is exported as its
    integer graph (``export.qdq.export_quantized``), checked against the simulation by SQNR;
    low-bit codebook layers (``quant.lowbit``) keep their codes as UINT2 / UINT4 initializers
    (``export.codebook``).
    """
    args = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs)
    kwargs = dict(example_kwargs or {})
    if not (args or kwargs) or not all(
        isinstance(x, torch.Tensor) for x in (*args, *kwargs.values())
    ):
        raise ExportError(
            "example_inputs must be a tensor or a tuple of tensors (example_kwargs a dict of "
            "named tensors)",
            fix="pass example_inputs=(torch.randn(1, 3, 224, 224),) with the model's input shape",
        )
    from slimkit.core.io import check_writable

    check_writable(path, "ONNX file")  # before any compute
    if check and _integer_graph(model):
        # QDQ / MatMulNBits, checked against their simulation by SQNR (ORT's integer
        # arithmetic rounds differently from float, so an absolute tolerance is wrong)
        from slimkit.export.qdq import export_quantized

        return export_quantized(model, path, example_inputs=args, example_kwargs=kwargs)[0]
    was_training = model.training
    model.eval()
    try:
        try:
            module, inputs, auto_in, auto_out = flat_io(model, args, kwargs)
        except Exception as e:  # the model does not run on these inputs
            from slimkit.core.data import Batch, model_failed

            raise model_failed(model, "example_inputs", Batch(0, args, kwargs), e) from None
        with torch.no_grad():
            ref = _flatten(module(*inputs))
        in_names = list(input_names or auto_in or _default_names("input", len(inputs)))
        out_names = list(output_names or auto_out or _default_names("output", len(ref)))
        dest = Path(path)
        rep = ExportReport(
            path=str(dest),
            opset=max(opset, 18) if exporter == "dynamo" else opset,
            input_names=in_names,
            output_names=out_names,
            dynamic_batch=dynamic_batch,
            size_bytes=0,
            exporter=exporter,
        )
        # the file appears at `path` only once exported and (with check) verified in ORT
        with atomic_path(dest) as tmp:
            _run_exporter(module, inputs, tmp, exporter, opset, in_names, out_names, dynamic_batch)
            if any(getattr(m, "exports_codebook", False) for m in module.modules()):
                from slimkit.export.codebook import pack_codebooks  # quant.lowbit: small codes

                packed = pack_codebooks(tmp)
                rep.notes += packed.notes if packed is not None else []
            rep.size_bytes = tmp.stat().st_size
            if check:
                check_parity(module, tmp, inputs, dynamic_batch=dynamic_batch, atol=atol,
                             report=rep)  # fmt: skip
        return rep
    finally:
        model.train(was_training)


def _run_exporter(
    model: nn.Module,
    inputs: tuple[torch.Tensor, ...],
    dest: Path,
    exporter: str,
    opset: int,
    in_names: list[str],
    out_names: list[str],
    dynamic_batch: bool,
) -> None:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if exporter == "dynamo":
                dims = None
                if dynamic_batch:
                    batch = torch.export.Dim("batch", min=1)
                    dims = tuple({0: batch} if x.dim() > 0 else None for x in inputs)
                prog = torch.onnx.export(
                    model, inputs, dynamo=True, opset_version=max(opset, 18),
                    input_names=in_names, output_names=out_names, dynamic_shapes=dims,
                    verbose=False,
                )  # fmt: skip
                if prog is None:  # pragma: no cover
                    raise RuntimeError("torch.onnx.export returned no program")
                prog.save(str(dest))
            elif exporter == "torchscript":
                axes = {n: {0: "batch"} for n in in_names + out_names} if dynamic_batch else None
                torch.onnx.export(
                    model, inputs, str(dest), dynamo=False, opset_version=opset,
                    input_names=in_names, output_names=out_names, dynamic_axes=axes,
                    do_constant_folding=True,
                )  # fmt: skip
            else:
                raise ExportError(
                    f"unknown exporter {exporter!r}", fix="use 'torchscript' or 'dynamo'"
                )
    except ExportError:
        raise
    except Exception as e:
        raise ExportError(
            f"torch.onnx ({exporter}) could not export {type(model).__name__}: "
            f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300] if str(e).strip() else ''}",
            fix="check that the model runs on example_inputs; try exporter='dynamo' (or "
            "'torchscript'), or replace the unsupported op",
        ) from None


def check_parity(
    model: nn.Module,
    onnx_path: str | Path,
    example_inputs: Sequence[torch.Tensor],
    *,
    dynamic_batch: bool = True,
    atol: float = 1e-4,
    report: ExportReport | None = None,
) -> float:
    """Max abs error of ORT vs PyTorch on a batch size the export never saw; raises above atol."""
    inputs = parity_inputs(example_inputs) if dynamic_batch else tuple(example_inputs)
    with torch.no_grad():
        ref = _flatten(model(*inputs))
    sess = ort_session(onnx_path)
    try:
        out = run_session(sess, inputs)
    except ExportError:
        raise
    except Exception as e:  # onnxruntime's Fail / RuntimeException
        raise ExportError(
            f"ONNX Runtime failed to run the exported model at batch {inputs[0].shape[0]}: "
            f"{str(e).splitlines()[0][:300]}",
            fix="a shape was probably baked in at export (e.g. int(x.shape[0]) in forward); keep "
            "shapes symbolic, or export with dynamic_batch=False",
        ) from None
    if len(out) != len(ref):
        raise ExportError(
            f"the ONNX model has {len(out)} outputs, PyTorch returned {len(ref)}",
            fix="return tensors (or a tuple of tensors) from forward",
        )
    err = max_abs_error(ref, out)
    if report is not None:
        report.max_abs_err = err
        report.parity_batch = int(inputs[0].shape[0]) if inputs[0].dim() else None
    if not err <= atol:  # also catches NaN
        raise ExportError(
            f"ONNX Runtime output differs from PyTorch by {err:.3g} (tolerance {atol:g}) on "
            f"{onnx_path}",
            fix="look for ops that behave differently when traced (in-place updates, Python "
            "scalars from tensors, training-mode layers); export in eval mode",
        )
    return err
