"""What a report shows, read from an artifact folder and normalised.

Commands write ``metrics.json`` in a few shapes (``slimkit run`` nests its measurements under
``measured``; ``prune`` / ``decompose`` keep ``params`` / ``macs`` / ``metrics`` at the top;
``quantize`` names its metrics ``top1_float`` / ``top1_int8_ort``). This module reads every one of
them into the same rows, so the template never guesses.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

LAYERS = "layers.json"  # per-layer roofline rows of the source and the result (report.layers)
SENSITIVITY = "sensitivity.json"  # SensitivityResult.to_dict() (slimkit.analyze.sensitivity)
SEARCH = "search.json"  # the planner's trials and Pareto front
_STEP_KEYS = ("via", "seconds", "details", "scope", "max_drop")


@dataclass
class Row:
    """One quantity of the source against the result, with the change in words."""

    what: str
    source: float | None
    result: float | None
    change: str = ""
    better: bool | None = None  # None: no judgement (e.g. a quantity with no direction)


@dataclass
class Compared:
    """The chosen model against the original, as measured."""

    labels: tuple[str, str]
    rows: list[Row] = field(default_factory=list)

    def value(self, what: str) -> Row | None:
        return next((r for r in self.rows if r.what == what), None)


@dataclass
class StepRow:
    """What one step of the recipe did."""

    index: int
    name: str
    via: str
    seconds: float | None
    params: tuple[int, int] | None
    bytes: tuple[int, int] | None
    layers: str  # module types added / removed
    facts: list[str]  # metric after the step, notes, skipped parts
    macs: tuple[int, int] | None = None  # batch 1, on the run's example inputs


@dataclass
class ArtifactData:
    """Everything the report reads from one artifact folder."""

    folder: Path
    model: str
    metrics: dict[str, Any]
    recipe_yaml: str | None
    compared: Compared | None
    steps: list[StepRow]
    machine: dict[str, Any]
    versions: dict[str, str]
    layers: dict[str, Any] | None
    sensitivity: dict[str, Any] | None
    search: dict[str, Any] | None
    files: dict[str, int]  # file name -> bytes
    notes: list[str] = field(default_factory=list)


def read_json(path: Path) -> dict[str, Any] | None:
    """The JSON object in ``path``, or None when the file is absent or not an object."""
    if not path.is_file():
        return None
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return obj if isinstance(obj, dict) else None


def collect(folder: Path) -> ArtifactData:
    """Read ``folder`` (an artifact directory) into an :class:`ArtifactData`."""
    metrics = read_json(folder / "metrics.json") or {}
    recipe = folder / "recipe.yaml"
    notes = [str(n) for n in metrics.get("notes") or []]
    if not metrics:
        notes.append("metrics.json is missing or unreadable: only the files are shown")
    files = {p.name: p.stat().st_size for p in sorted(folder.iterdir())
             if p.is_file() and not p.name.startswith(".")}  # fmt: skip
    return ArtifactData(
        folder=folder,
        model=str(metrics.get("model") or (metrics.get("recipe") or {}).get("model") or "?"),
        metrics=metrics,
        recipe_yaml=recipe.read_text(encoding="utf-8") if recipe.is_file() else None,
        compared=compare_rows(metrics),
        steps=step_rows(metrics),
        machine=dict(metrics.get("machine") or {}),
        versions={str(k): str(v) for k, v in (metrics.get("versions") or {}).items()},
        layers=read_json(folder / LAYERS),
        sensitivity=_sensitivity(folder, metrics),
        search=read_json(folder / SEARCH),
        files=files,
        notes=notes,
    )


def _num(v: Any) -> float | None:
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
        return None
    return float(v)


def _ratio_row(what: str, a: Any, b: Any, *, smaller_is_better: bool, unit: str) -> Row:
    a, b = _num(a), _num(b)
    if a is None or b is None or a <= 0 or b <= 0:
        return Row(what, a, b)
    r = a / b if smaller_is_better else b / a
    word = ("smaller" if unit == "size" else "faster") if smaller_is_better else "larger"
    if unit == "count":
        word = "fewer" if r >= 1 else "more"
    change = f"{r:.2f}x {word}" if r >= 1 else f"{1 / r:.2f}x {_opposite(word)}"
    return Row(what, a, b, change, r >= 1)


def _opposite(word: str) -> str:
    return {"smaller": "larger", "faster": "slower", "fewer": "more"}.get(word, word)


def _labels(m: dict[str, Any]) -> tuple[str, str] | None:
    for key in ("latency_ms", "size_mb", "params", "task"):
        keys = list(m.get(key) or {})
        if len(keys) >= 2:
            return str(keys[0]), str(keys[1])
    return None


def _task_metrics(m: dict[str, Any], top: dict[str, Any], a: str, b: str) -> dict[str, Any]:
    """``{label: {metric: value}}`` from whichever shape the command wrote."""
    for holder in (m.get("task"), top.get("metrics")):
        if isinstance(holder, dict) and isinstance(holder.get(a), dict):
            return {a: holder[a], b: holder.get(b) or {}}
    flat: dict[str, Any] = top["metrics"] if isinstance(top.get("metrics"), dict) else {}
    out: dict[str, dict[str, Any]] = {a: {}, b: {}}
    for key, v in flat.items():  # quantize: top1_float, top1_int8_ort
        name, _, rest = key.partition("_")
        if rest == "float":
            out[a][name] = v
        elif rest.endswith("_ort") or rest == b:
            out[b][name] = v
    return out


def compare_rows(metrics: dict[str, Any]) -> Compared | None:
    """The source-vs-result table of ``metrics.json``, or None when nothing was measured."""
    measured = metrics.get("measured")
    m: dict[str, Any] = measured if isinstance(measured, dict) else metrics
    labels = _labels(m)
    if labels is None:
        return None
    a, b = labels
    rows: list[Row] = []
    size = m.get("size_mb") or {}
    if a in size or b in size:
        rows.append(_ratio_row("ONNX size (MB)", size.get(a), size.get(b),
                               smaller_is_better=True, unit="size"))  # fmt: skip
    lat = m.get("latency_ms") or {}
    if a in lat and b in lat:
        med = {k: (v.get("median_ms") if isinstance(v, dict) else v) for k, v in lat.items()}
        rows.append(_ratio_row("ORT latency, batch 1 (ms)", med[a], med[b],
                               smaller_is_better=True, unit="time"))  # fmt: skip
    for key, what in (("params", "parameters"), ("macs", "MACs")):
        vals = m.get(key) or {}
        if a in vals and b in vals:
            rows.append(_ratio_row(what, vals[a], vals[b], smaller_is_better=True, unit="count"))
    task = _task_metrics(m, metrics, a, b)
    for name, va in task[a].items():
        vb = task[b].get(name)
        if _num(va) is None:
            continue
        rows.append(_metric_row(name, _num(va), _num(vb)))
    sqnr = m.get("sqnr_db", (metrics.get("metrics") or {}).get("sqnr_db"))
    if _num(sqnr) is not None:
        rows.append(Row(f"SQNR vs {a} (dB)", None, _num(sqnr)))
    return Compared((a, b), rows)


def _metric_row(name: str, a: float | None, b: float | None) -> Row:
    if a is None or b is None:
        return Row(f"test {name}", a, b)
    lower_better = name in ("perplexity", "loss")
    d = b - a
    if name in ("top1", "top5", "accuracy"):
        change = f"{d * 100:+.2f} points"
    else:
        change = f"{d:+.4g}" + (f" ({d / a:+.1%})" if a else "")
    return Row(f"test {name}", a, b, change, (d <= 0) if lower_better else (d >= 0))


def step_rows(metrics: dict[str, Any]) -> list[StepRow]:
    """One row per recorded step: time, parameters and bytes before -> after, notes."""
    out = []
    oneshot = {k: v for k, v in (metrics.get("metrics") or {}).items()
               if k.endswith("_before_finetuning") and isinstance(v, dict)}  # fmt: skip
    for i, s in enumerate(metrics.get("steps") or []):
        if not isinstance(s, dict):
            continue
        name = next((k for k in s if k not in _STEP_KEYS), "?")
        details: dict[str, Any] = s["details"] if isinstance(s.get("details"), dict) else {}
        changed: dict[str, Any] = details.get("changed") or {}
        changed = changed if isinstance(changed, dict) else {}
        facts = _facts(details)
        for vals in oneshot.values():
            if name.startswith(("prune.", "lowrank.")):
                shown = ", ".join(f"{k} {v:.4g}" for k, v in vals.items() if _num(v) is not None)
                facts.insert(0, f"test metrics right after this step (before fine-tuning): {shown}")
        out.append(StepRow(
            index=i + 1, name=name, via=str(s.get("via", "")), seconds=_num(s.get("seconds")),
            params=_pair(changed.get("params")), bytes=_pair(changed.get("bytes")),
            macs=_pair(changed.get("macs")),
            layers=_layer_changes(changed.get("layers")), facts=facts,
        ))  # fmt: skip
    return out


def _pair(v: Any) -> tuple[int, int] | None:
    if isinstance(v, list | tuple) and len(v) == 2 and all(_num(x) is not None for x in v):
        return int(v[0]), int(v[1])
    return None


def _layer_changes(layers: Any) -> str:
    if not isinstance(layers, dict):
        return ""
    parts = []
    for kind, pair in layers.items():
        p = _pair(pair)
        if p is not None and p[0] != p[1]:
            parts.append(f"{kind} {p[0]}→{p[1]}")
    return ", ".join(parts)


def _facts(details: dict[str, Any]) -> list[str]:
    facts = []
    if _num(details.get("best_value")) is not None:
        facts.append(f"best validation value while fine-tuning: {details['best_value']:.4g}")
    if details.get("summary") and isinstance(details["summary"], str):
        facts.append(details["summary"])
    speed = details.get("speed")
    if isinstance(speed, dict) and isinstance(speed.get("summary"), str):
        facts.append(speed["summary"])
    if isinstance(details.get("fallback_summary"), str):
        facts.append(details["fallback_summary"])
    if details.get("float_layers"):
        facts.append("kept float: " + ", ".join(map(str, details["float_layers"])))
    for key in ("skipped", "notes"):
        facts += [str(x) for x in details.get(key) or [] if not str(x).startswith("capture:")]
    return facts


def _sensitivity(folder: Path, metrics: dict[str, Any]) -> dict[str, Any] | None:
    """Per-layer sensitivity as ``{"metric_name", "baseline", "rows": [{layer, change, metric,
    drop}], "source"}``: the artifact's ``sensitivity.json``, else what a ``quant.mixed`` step
    recorded per layer and format."""
    found = read_json(folder / SENSITIVITY)
    if found is not None and isinstance(found.get("rows"), list):
        return {**found, "source": found.get("source") or SENSITIVITY}
    for s in metrics.get("steps") or []:
        layers = ((s or {}).get("details") or {}).get("layers")
        if not isinstance(layers, dict):
            continue
        rows = [{"layer": n, "change": f, "metric": None, "drop": v}
                for n, info in layers.items() if isinstance(info, dict)
                for f, v in (info.get("sensitivity") or {}).items()
                if _num(v) is not None]  # fmt: skip
        if rows:
            metric = (s.get("details") or {}).get("metric") or "distortion"
            return {"metric_name": str(metric), "baseline": None, "rows": rows,
                    "source": "the quant.mixed step's per-layer sensitivity"}  # fmt: skip
    return None
