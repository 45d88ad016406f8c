"""One normalisation of user data: any iterable of batches (tensors, tuples, dicts, numpy arrays).

Every technique reads data through ``iter_batches`` / ``collect_batches``, so every technique gives
the same clear error for empty data, NaN/Inf, a wrong type or a shape that changes mid-stream, and
the error names the batch::

    for b in iter_batches(loader, what="calibration data"):
        out = b.run(model)              # model(*b.args, **b.kwargs)
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from slimkit.errors import DataError

TARGET_KEYS = frozenset({"label", "labels", "target", "targets", "y"})


@dataclass
class Batch:
    """A normalised batch: positional inputs, keyword inputs, and the target if the data had one."""

    index: int
    args: tuple[torch.Tensor, ...]
    kwargs: dict[str, torch.Tensor] = field(default_factory=dict)
    target: Any = None

    def run(self, model: torch.nn.Module) -> Any:
        return model(*self.args, **self.kwargs)

    @property
    def inputs(self) -> tuple[torch.Tensor, ...]:
        """Positional inputs followed by keyword inputs in key order (e.g. for ONNX feeds)."""
        return self.args + tuple(self.kwargs[k] for k in sorted(self.kwargs))

    @property
    def size(self) -> int:
        first = self.inputs[0]
        return int(first.shape[0]) if first.dim() > 0 else 1


def _as_tensor(x: Any, where: str, what: str) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x
    if type(x).__module__ == "numpy":
        return torch.from_numpy(x)
    raise DataError(
        f"{what}: {where} is a {type(x).__name__}, not a tensor",
        fix="yield torch tensors or numpy arrays, as a tensor, a tuple (inputs..., target) or a "
        "dict of named tensors",
    )


def _normalise(item: Any, index: int, n_inputs: int, what: str) -> Batch:
    where = f"batch {index}"
    if isinstance(item, Batch):  # already normalised (a technique re-running another)
        return Batch(index, item.args, dict(item.kwargs), item.target)
    if isinstance(item, Mapping):
        kwargs, target = {}, None
        for k, v in item.items():
            if k in TARGET_KEYS:
                target = v
            else:
                kwargs[str(k)] = _as_tensor(v, f"{where} key {k!r}", what)
        if not kwargs:
            raise DataError(
                f"{what}: {where} is a dict with no input tensors (keys {list(item)})",
                fix=f"name the inputs after the model's forward arguments; {sorted(TARGET_KEYS)} "
                "are read as targets",
            )
        return Batch(index, (), kwargs, target)
    if isinstance(item, (tuple, list)):
        if len(item) == 0:
            raise DataError(f"{what}: {where} is empty", fix="drop empty batches")
        args = tuple(
            _as_tensor(x, f"{where} input {i}", what) for i, x in enumerate(item[:n_inputs])
        )
        rest = item[n_inputs:]
        target = None if not rest else (rest[0] if len(rest) == 1 else tuple(rest))
        return Batch(index, args, {}, target)
    return Batch(index, (_as_tensor(item, where, what),), {}, None)


def _check_finite(b: Batch, what: str) -> None:
    named = [(f"input {i}", t) for i, t in enumerate(b.args)] + [
        (f"input {k!r}", t) for k, t in b.kwargs.items()
    ]
    for label, t in named:
        if t.is_floating_point() or t.is_complex():
            bad = ~torch.isfinite(t)
            if bool(bad.any()):
                n_nan = int(torch.isnan(t).sum())
                n_inf = int(bad.sum()) - n_nan
                raise DataError(
                    f"{what}: batch {b.index}, {label} (shape {tuple(t.shape)}) contains "
                    f"{n_nan} NaN and {n_inf} Inf values",
                    fix="clean or drop that batch (e.g. torch.nan_to_num, or filter with "
                    "torch.isfinite) before passing it to slimkit",
                )


def _signature(b: Batch) -> tuple[Any, ...]:
    """Structure and per-sample shapes: what must not change from batch to batch."""
    args = tuple((tuple(t.shape[1:]), t.dtype) for t in b.args)
    kw = tuple((k, tuple(t.shape[1:]), t.dtype) for k, t in sorted(b.kwargs.items()))
    return args, kw


def _describe(sig: tuple[Any, ...]) -> str:
    args, kw = sig

    def one(s: tuple[int, ...], d: torch.dtype) -> str:
        return f"(B, {', '.join(map(str, s))}) {str(d).replace('torch.', '')}"

    parts = [one(s, d) for s, d in args] + [f"{k}: {one(s, d)}" for k, s, d in kw]
    return "[" + "; ".join(parts) + "]"


def iter_batches(
    data: Any,
    *,
    what: str = "data",
    n_inputs: int = 1,
    check_finite: bool = True,
    sample_shape: Sequence[int] | None = None,
    limit: int | None = None,
) -> Iterator[Batch]:
    """Normalise and check ``data`` batch by batch.

    ``data`` is a tensor / array (one batch) or an iterable of batches; a tuple batch holds
    ``n_inputs`` inputs then the target. ``sample_shape`` is the expected shape of one sample of the
    first input (without the batch dimension). ``limit`` stops after that many batches.
    """
    if data is None:
        raise DataError(f"{what} is None", fix="pass an iterable of batches, e.g. a DataLoader")
    if isinstance(data, torch.Tensor) or type(data).__module__ == "numpy":
        source: Iterable[Any] = [data]
    elif isinstance(data, (Mapping, tuple)) and not isinstance(data, list):
        source = [data]  # a single dict / (x, y) tuple is one batch
    elif isinstance(data, Iterable):
        source = data
    else:
        raise DataError(
            f"{what} is a {type(data).__name__}, which is not iterable",
            fix="pass a DataLoader, a list of tensors, or a list of (inputs, target) tuples",
        )
    first_sig: tuple[Any, ...] | None = None
    n = 0
    for i, item in enumerate(itertools.islice(source, limit)):
        b = _normalise(item, i, n_inputs, what)
        empty = [t for t in (*b.args, *b.kwargs.values()) if t.dim() > 0 and t.shape[0] == 0]
        if empty:
            raise DataError(
                f"{what}: batch {i} holds 0 samples (shape {tuple(empty[0].shape)})",
                fix="drop empty batches (e.g. DataLoader(drop_last=True) or filter len(batch))",
            )
        if check_finite:
            _check_finite(b, what)
        sig = _signature(b)
        if first_sig is None:
            first_sig = sig
            if sample_shape is not None and b.args:
                got = tuple(b.args[0].shape[1:])
                if got != tuple(sample_shape):
                    raise DataError(
                        f"{what}: batch 0 has samples of shape {got}, the model expects "
                        f"{tuple(sample_shape)}",
                        fix="reshape the data (the first dimension is the batch) or pass the "
                        "matching example inputs",
                    )
        elif sig != first_sig:
            raise DataError(
                f"{what}: batch {i} has shape {_describe(sig)} but batch 0 had "
                f"{_describe(first_sig)}",
                fix="every batch must have the same per-sample shapes and dtypes; pad or crop "
                "the odd batch",
            )
        n += 1
        yield b
    if n == 0:
        raise DataError(f"{what} is empty", fix="pass at least one batch")


def collect_batches(data: Any, **kwargs: Any) -> list[Batch]:
    """``list(iter_batches(...))``: check all of the data up front."""
    return list(iter_batches(data, **kwargs))


def inputs_to_measure(
    data: Any, example_inputs: Any, *, what: str, limit: int, missing: str, fix: str
) -> list[Batch]:
    """The batches a measurement runs on: up to ``limit`` batches of ``data``, else the
    ``example_inputs`` (a tensor or a tuple) as one batch; neither raises ``missing`` / ``fix``."""
    if data is not None:
        return collect_batches(data, what=f"{what} data", limit=limit)
    if example_inputs is not None:
        inputs = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else example_inputs
        return collect_batches([tuple(inputs)], what="example inputs", n_inputs=len(inputs))
    raise DataError(missing, fix=fix)


def merge_batches(batches: Sequence[Batch], max_samples: int = 16) -> list[Batch]:
    """Consecutive batches concatenated along dim 0, up to ``max_samples`` samples each.

    For passes that only accumulate statistics (calibration, bias correction): a model runs
    several times faster per sample on larger batches. Batches whose tensors do not all share one
    leading batch size are returned as they are; a merged batch keeps its first batch's index.
    """

    def size(b: Batch) -> int | None:
        ts = list(b.args) + list(b.kwargs.values())
        sizes = {int(t.shape[0]) if t.dim() > 0 else -1 for t in ts}
        return sizes.pop() if len(sizes) == 1 and -1 not in sizes else None

    sizes = [size(b) for b in batches]
    if not batches or any(n is None for n in sizes):
        return list(batches)
    out: list[Batch] = []
    group: list[Batch] = []
    count = 0

    def flush() -> None:
        if len(group) == 1:
            out.append(group[0])
        elif group:
            first = group[0]
            args = tuple(torch.cat([b.args[i] for b in group]) for i in range(len(first.args)))
            kwargs = {k: torch.cat([b.kwargs[k] for b in group]) for k in first.kwargs}
            out.append(Batch(first.index, args, kwargs, None))

    for b, n in zip(batches, sizes, strict=True):
        assert n is not None
        if group and count + n > max_samples:
            flush()
            group, count = [], 0
        group.append(b)
        count += n
    flush()
    return out


def model_failed(model: torch.nn.Module, what: str, b: Batch, e: BaseException) -> DataError:
    """The error for a model that raises on ``b``: names the model, the inputs' shapes and
    dtypes, and torch's own first line (a wrong channel count, rank or dtype shows there)."""
    parts = [f"{tuple(t.shape)} {str(t.dtype).replace('torch.', '')}" for t in b.args]
    parts += [f"{k}: {tuple(t.shape)}" for k, t in b.kwargs.items()]
    msg = str(e).strip().splitlines()[0][:240] if str(e).strip() else ""
    return DataError(
        f"{type(model).__name__} fails on {what} (inputs {', '.join(parts) or 'none'}): "
        f"{type(e).__name__}: {msg}",
        fix="pass inputs shaped like the model's forward arguments (first dimension: the "
        "batch; float32 for float layers); check that model(*inputs) runs",
    )


def flatten_output(out: Any) -> list[tuple[str, torch.Tensor]]:
    """``(name, tensor)`` for every floating tensor of a model output, in a fixed order."""
    if isinstance(out, torch.Tensor):
        return [("output", out)] if out.is_floating_point() else []
    if isinstance(out, Mapping) or hasattr(out, "to_tuple") and hasattr(out, "keys"):
        items = [(str(k), out[k]) for k in out.keys()]  # noqa: SIM118 - ModelOutput keys
    elif isinstance(out, (tuple, list)):
        items = [(str(i), v) for i, v in enumerate(out)]
    else:
        return []
    flat = []
    for name, value in items:
        flat += [(name if n == "output" else f"{name}.{n}", t) for n, t in flatten_output(value)]
    return flat
