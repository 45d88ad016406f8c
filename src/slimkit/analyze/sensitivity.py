"""Per-layer sensitivity: the metric drop when only one layer is quantized, pruned or factorised.

Each trial changes one conv / linear in place, measures, and restores the original tensors
exactly, so the model is bitwise unchanged afterwards. Changes are named:

- ``int8``, ``int4`` (``intN``): symmetric per-channel fake-quant of the weight;
- ``prune30``, ``prune50``, ``prune70`` (``pruneN``): the N % output channels of lowest L1 norm
  are zeroed, and so are their scale and shift in a BatchNorm right after, so the layer computes
  what the pruned one would;
- ``lowrank50``, ``lowrank25`` (``lowrankN``): the weight (out, in * kernel) truncated by SVD to
  N % of its full rank.

::

    res = sensitivity(model, data=calib)                     # SQNR of the output vs the original
    res = sensitivity(model, metric=lambda m: top1(m))       # any metric, higher is better
    res.most_sensitive("int4", k=3); res.save("sensitivity.json"); SensitivityResult.load(...)
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from slimkit.core.data import inputs_to_measure
from slimkit.core.io import PathLike, write_json
from slimkit.core.scope import Scope
from slimkit.errors import ConfigError
from slimkit.quant.primitives import quantize_weight
from slimkit.testing.numerics import sqnr

CHANGES = ("int8", "int4", "prune30", "prune50", "prune70", "lowrank50", "lowrank25")
LAYER_TYPES = (nn.modules.conv._ConvNd, nn.Linear)
_PATTERN = re.compile(r"(int|prune|lowrank)(\d+)")


@dataclass(frozen=True)
class SensitivityRow:
    """The metric with only ``layer`` changed by ``change``, and its drop from the baseline."""

    layer: str
    change: str
    metric: float
    drop: float


@dataclass
class SensitivityResult:
    """All trials. ``metric_name`` is ``sqnr_db`` for the built-in metric: then ``baseline`` is
    inf and ``drop`` is the noise-to-signal power ratio ``10 ** (-sqnr / 10)`` (0: unchanged,
    1: an error as large as the output); otherwise ``drop = baseline - metric``."""

    metric_name: str
    baseline: float
    rows: list[SensitivityRow] = field(default_factory=list)

    @property
    def layers(self) -> list[str]:
        return list(dict.fromkeys(r.layer for r in self.rows))

    @property
    def changes(self) -> list[str]:
        return list(dict.fromkeys(r.change for r in self.rows))

    def drops(self, change: str) -> dict[str, float]:
        """``{layer: drop}`` for one change."""
        self._check(change)
        return {r.layer: r.drop for r in self.rows if r.change == change}

    def most_sensitive(self, change: str, k: int = 5) -> list[SensitivityRow]:
        """The ``k`` layers whose metric drops most under ``change``."""
        self._check(change)
        rows = [r for r in self.rows if r.change == change]
        return sorted(rows, key=lambda r: r.drop, reverse=True)[:k]

    def _check(self, change: str) -> None:
        if change not in self.changes:
            raise ConfigError(
                f"the sensitivity result has no change {change!r}",
                fix=f"use one of {', '.join(self.changes)}, or rerun with changes=[{change!r}]",
            )

    def to_dict(self) -> dict[str, Any]:
        def num(v: float) -> float | None:
            return v if math.isfinite(v) else None  # strict JSON has no inf

        return {
            "metric_name": self.metric_name,
            "baseline": num(self.baseline),
            "rows": [{**asdict(r), "metric": num(r.metric)} for r in self.rows],
        }

    def save(self, path: PathLike) -> Path:
        """Write the result as JSON, atomically; ``load`` reads it back."""
        write_json(path, self.to_dict())
        return Path(path)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SensitivityResult:
        def num(v: float | None) -> float:
            return math.inf if v is None else float(v)

        rows = [
            SensitivityRow(r["layer"], r["change"], num(r["metric"]), float(r["drop"]))
            for r in d["rows"]
        ]
        return cls(d["metric_name"], num(d["baseline"]), rows)

    @classmethod
    def load(cls, path: PathLike) -> SensitivityResult:
        """Read a result written by ``save``."""
        import json

        p = Path(path)
        if not p.is_file():
            raise ConfigError(
                f"sensitivity file {str(p)!r} does not exist",
                fix="run slimkit.analyze(..., sensitivity=True, out=DIR) or sensitivity(...)"
                ".save(path) first",
            )
        return cls.from_dict(json.loads(p.read_text(encoding="utf-8")))


def _parse(change: str) -> tuple[str, int]:
    m = _PATTERN.fullmatch(change)
    ok = m is not None and (
        (m[1] == "int" and 2 <= int(m[2]) <= 16) or (m[1] != "int" and 0 < int(m[2]) < 100)
    )
    if m is None or not ok:
        raise ConfigError(
            f"unknown sensitivity change {change!r}",
            fix="use intN (2-16 bits), pruneN or lowrankN (N in 1-99 %), e.g. "
            + ", ".join(CHANGES),
        )
    return m[1], int(m[2])


def _out_axis(m: nn.Module) -> int:
    return 1 if getattr(m, "transposed", False) else 0


def _norm_after(model: nn.Module, name: str, channels: int) -> list[torch.Tensor]:
    """Scale and shift of the BatchNorm registered right after ``name`` when it normalises its
    output channels, else nothing."""
    names = [n for n, _ in model.named_modules()]
    i = names.index(name)
    if i + 1 < len(names):
        nxt = model.get_submodule(names[i + 1])
        if isinstance(nxt, nn.modules.batchnorm._BatchNorm) and nxt.num_features == channels:
            return [t for t in (nxt.weight, nxt.bias) if isinstance(t, torch.Tensor)]
    return []


def _touched(model: nn.Module, name: str, m: nn.Module) -> list[torch.Tensor]:
    """Every tensor a change of layer ``name`` may modify: its weight and bias, and the scale and
    shift of the BatchNorm after it."""
    w: torch.Tensor = m.weight  # type: ignore[assignment]
    out = [t for t in (w, getattr(m, "bias", None)) if isinstance(t, torch.Tensor)]
    return out + _norm_after(model, name, int(w.shape[_out_axis(m)]))


def _apply(model: nn.Module, name: str, m: nn.Module, change: str) -> None:
    """Change one layer in place (the caller restores the tensors of ``_touched``)."""
    kind, n = _parse(change)
    w: torch.Tensor = m.weight  # type: ignore[assignment]
    axis = _out_axis(m)
    if kind == "int":
        w.copy_(quantize_weight(w, bits=n, per_channel=True, axis=axis))
        return
    if kind == "lowrank":
        mat = w.transpose(0, axis).reshape(w.shape[axis], -1).double()
        u, s, vh = torch.linalg.svd(mat, full_matrices=False)
        k = max(1, round(n / 100 * s.numel()))
        low = (u[:, :k] * s[:k]) @ vh[:k]
        shape = list(w.transpose(0, axis).shape)
        w.copy_(low.to(w.dtype).reshape(shape).transpose(0, axis))
        return
    channels = w.shape[axis]
    drop = round(n / 100 * channels)
    l1 = w.detach().abs().transpose(0, axis).reshape(channels, -1).sum(dim=1)
    idx = torch.argsort(l1, stable=True)[:drop]
    w.index_fill_(axis, idx, 0.0)
    bias = getattr(m, "bias", None)
    if isinstance(bias, torch.Tensor):
        bias.index_fill_(0, idx, 0.0)
    for t in _norm_after(model, name, channels):
        t.index_fill_(0, idx, 0.0)


def _sqnr_metric(model: nn.Module, data: Any, example_inputs: Any) -> Callable[[nn.Module], float]:
    batches = inputs_to_measure(
        data, example_inputs, what="sensitivity", limit=8,
        missing="sensitivity needs a metric, data or example inputs",
        fix="pass metric=callable(model) -> float, data=batches or example_inputs=(x,)",
    )  # fmt: skip
    with torch.no_grad():
        ref = [b.run(model) for b in batches]

    def metric(m: nn.Module) -> float:
        with torch.no_grad():
            return sqnr(ref, [b.run(m) for b in batches])

    return metric


def sensitivity(
    model: nn.Module,
    *,
    metric: Callable[[nn.Module], float] | None = None,
    data: Any = None,
    example_inputs: Any = None,
    scope: Scope | None = None,
    changes: Sequence[str] = CHANGES,
    progress: bool = True,
) -> SensitivityResult:
    """The metric with each conv / linear in ``scope`` changed alone, for each change.

    ``metric(model) -> float`` (higher is better), or by default the SQNR in dB of the model's
    output against the original's on ``data`` (up to 8 batches) or ``example_inputs``. The
    model is restored exactly after each trial.
    """
    for c in changes:
        _parse(c)
    layers = (scope or Scope()).select(model, candidates=LAYER_TYPES)
    layers = [(n, m) for n, m in layers if isinstance(getattr(m, "weight", None), torch.Tensor)]
    was_training = model.training
    model.eval()
    if metric is None:
        fn, name = _sqnr_metric(model, data, example_inputs), "sqnr_db"
        baseline = math.inf
    else:
        fn, name = metric, getattr(metric, "__name__", "metric")
        baseline = float(fn(model))
    result = SensitivityResult("sqnr_db" if metric is None else name, baseline)
    from rich.progress import Progress

    try:
        with Progress(disable=not progress, transient=True) as bar:
            task = bar.add_task("sensitivity", total=len(layers) * len(changes))
            for lname, m in layers:
                for change in changes:
                    bar.update(task, description=f"{lname}: {change}")
                    with torch.no_grad():
                        saved = [(t, t.detach().clone()) for t in _touched(model, lname, m)]
                        try:
                            _apply(model, lname, m, change)
                            value = float(fn(model))
                        finally:
                            for t, orig in saved:
                                t.copy_(orig)
                    drop = 10 ** (-value / 10) if metric is None else baseline - value
                    result.rows.append(SensitivityRow(lname, change, value, drop))
                    bar.advance(task)
    finally:
        model.train(was_training)
    return result
