"""The report's plots, drawn with matplotlib on an Agg canvas of their own (no pyplot, no global
backend) and returned as SVG text, which the report embeds as ``data:`` images: one file, no
external references, text drawn as paths so no font is needed to read it."""

from __future__ import annotations

import functools
import io
import json
import math
from typing import Any

from slimkit.report.collect import Compared

SOURCE, RESULT = "#6b7280", "#2563eb"  # grey: the original; blue: the chosen model
_BOUND = {"compute": "#dc2626", "memory": "#2563eb", "overhead": "#9ca3af"}


def _figure(width: float, height: float, *, margins: dict[str, float] | None = None) -> Any:
    """A figure with constrained layout, or fixed ``margins`` (``subplots_adjust``): half the
    drawing time, which counts since every artifact write draws the roofline."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100, layout=None if margins else "constrained")
    if margins:
        fig.subplots_adjust(**margins)
    FigureCanvasAgg(fig)
    return fig


def svg(fig: Any) -> str:
    """The figure as standalone SVG text (no metadata date, so equal figures give equal text)."""
    buf = io.StringIO()
    fig.savefig(buf, format="svg", metadata={"Date": None})
    return buf.getvalue()


def compare_chart(cmp: Compared) -> str | None:
    """Size, latency and each task metric: one small bar pair per quantity."""
    wanted = [r for r in cmp.rows if r.source is not None and r.result is not None
              and r.what.startswith(("ONNX size", "ORT latency", "test "))
              and r.what != "test loss"]  # fmt: skip
    if not wanted:
        return None
    fig = _figure(2.6 * len(wanted), 2.6)
    axes = fig.subplots(1, len(wanted), squeeze=False)[0]
    for ax, row in zip(axes, wanted, strict=True):
        vals = [row.source or 0.0, row.result or 0.0]
        bars = ax.bar(list(cmp.labels), vals, color=[SOURCE, RESULT], width=0.6)
        ax.bar_label(bars, labels=[f"{v:.4g}" for v in vals], fontsize=8, padding=2)
        ax.set_title(row.what + (f"\n{row.change}" if row.change else ""), fontsize=9)
        ax.set_ylim(0, max(vals) * 1.25 or 1.0)
        ax.tick_params(labelsize=8)
        ax.spines[["top", "right"]].set_visible(False)
    return svg(fig)


def roofline_chart(record: dict[str, Any]) -> str | None:
    """Each layer of the source (hollow) and the result (filled) at its arithmetic intensity
    and the performance its bound allows, under the roofs of the hardware profile."""
    # drawn once per layers.json: a command draws the report when it writes the artifact and
    # again when it adds its measurements, from the same per-layer record
    return _roofline_svg(json.dumps(record, sort_keys=True, default=str))


@functools.lru_cache(maxsize=4)
def _roofline_svg(record_json: str) -> str | None:
    record = json.loads(record_json)
    hw = record.get("hardware") or {}
    models = {k: v for k, v in (record.get("models") or {}).items() if v.get("layers")}
    bw = hw.get("mem_bandwidth_gbs")
    if not models or not bw:
        return None
    fig = _figure(8, 4.8, margins={"left": 0.08, "right": 0.98, "bottom": 0.11, "top": 0.94})
    ax = fig.add_subplot()
    points = []
    for label, m in models.items():
        for r in m["layers"]:
            if r["intensity"] > 0 and r["time_s"] > 0:
                points.append((label, r, r["flops"] / r["time_s"] / 1e9))
    if not points:
        return None
    xs = [p[1]["intensity"] for p in points]
    lo, hi = min(xs) / 2, max(xs) * 2
    for key, style, what in (("peak_fp32_gflops", "-", "fp32"), ("peak_int8_gops", "--", "int8")):
        peak = hw.get(key)
        if not peak:
            continue
        hi = max(hi, peak / bw * 4)
        grid = [lo * (hi / lo) ** (i / 100) for i in range(101)]
        ax.plot(grid, [min(peak, bw * x) for x in grid], style, color="black", lw=1,
                label=f"roof {what}: {peak:.0f} G/s, {bw:.0f} GB/s")  # fmt: skip
    for label, r, perf in points:
        colour = _BOUND.get(r["bound"], "#9ca3af")
        filled = label != "source"
        ax.scatter([r["intensity"]], [perf], s=36, marker="o" if filled else "s", alpha=0.8,
                   facecolors=colour if filled else "none", edgecolors=colour)  # fmt: skip
    top = sorted(points, key=lambda p: p[1]["time_s"], reverse=True)[:6]
    for label, r, perf in top:
        ax.annotate(f"{r['name']} ({label})", (r["intensity"], perf), fontsize=7,
                    xytext=(4, 3), textcoords="offset points")  # fmt: skip
    for bound, colour in _BOUND.items():
        ax.scatter([], [], color=colour, label=f"{bound}-bound")
    ax.scatter([], [], marker="s", facecolors="none", edgecolors="black", label="source layer")
    ax.scatter([], [], marker="o", color="black", label="result layer")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("arithmetic intensity (FLOP / byte)")
    ax.set_ylabel("GFLOP/s the bound allows")
    ax.set_title(f"roofline on {hw.get('name', '?')}", fontsize=10)
    ax.grid(True, which="both", lw=0.3, alpha=0.5)
    ax.legend(fontsize=7, loc="lower right")
    return svg(fig)


def sensitivity_chart(sens: dict[str, Any], max_layers: int = 30) -> str | None:
    """One group of bars per layer, one bar per change: SQNR in dB (higher is safer) for the
    built-in metric, else the recorded drop / distortion (lower is safer)."""
    rows = [r for r in sens.get("rows") or [] if isinstance(r, dict)]
    sqnr = sens.get("metric_name") == "sqnr_db"
    layers = list(dict.fromkeys(r["layer"] for r in rows))[:max_layers]
    changes = list(dict.fromkeys(r["change"] for r in rows))
    if not layers:
        return None

    def val(r: dict[str, Any]) -> float:
        v = r.get("metric") if sqnr else r.get("drop")
        return float(v) if isinstance(v, int | float) and math.isfinite(v) else math.nan

    value = {(r["layer"], r["change"]): val(r) for r in rows}
    finite = [v for v in value.values() if math.isfinite(v)] or [1.0]
    cap = max(finite) * 1.1 or 1.0
    fig = _figure(8, max(2.5, 0.22 * len(layers) * max(1, len(changes)) + 1.2))
    ax = fig.add_subplot()
    h = 0.8 / max(len(changes), 1)
    for j, change in enumerate(changes):
        vals = [value.get((layer, change), math.nan) for layer in layers]
        ax.barh([i + j * h for i in range(len(layers))],
                [v if math.isfinite(v) else cap for v in vals], height=h, label=change)  # fmt: skip
    ax.set_yticks([i + 0.4 - h / 2 for i in range(len(layers))], labels=layers, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("SQNR of the output (dB), higher is safer" if sqnr
                  else f"{sens.get('metric_name', 'drop')}, lower is safer")  # fmt: skip
    ax.legend(fontsize=7, ncols=min(len(changes), 4))
    ax.grid(True, axis="x", lw=0.3, alpha=0.5)
    return svg(fig)


def _limits(search: dict[str, Any]) -> dict[str, float]:
    """Constraint lines: ``latency_ms`` / ``size_mb`` ceilings and the metric's floor."""
    c = search.get("constraints") or {}
    out: dict[str, float] = {}
    for key in ("latency_ms", "size_mb"):
        for name in (key, f"max_{key}"):
            if isinstance(c.get(name), int | float):
                out[key] = float(c[name])
    src = (search.get("source") or {}).get("metric")
    for name in ("min_metric", "metric"):
        if isinstance(c.get(name), int | float):
            out["metric"] = float(c[name])
    if "metric" not in out and isinstance(c.get("max_drop"), int | float) and src is not None:
        out["metric"] = float(src) - float(c["max_drop"])
    return out


def pareto_chart(search: dict[str, Any]) -> str | None:
    """Metric against latency and against size: every finished trial, the Pareto front
    highlighted and joined, infeasible trials greyed, constraints as dashed lines, the source and
    the chosen model marked."""
    trials = [t for t in search.get("trials") or [] if isinstance(t.get("values"), dict)]
    src = search.get("source") or {}
    if not trials:
        return None
    chosen = search.get("chosen")
    limits = _limits(search)
    fig = _figure(10, 4.2)
    axes = fig.subplots(1, 2)
    for ax, x in zip(axes, ("latency_ms", "size_mb"), strict=True):
        front_ts = [t for t in trials if t.get("pareto")]
        groups = (
            ("infeasible", "#d1d5db", [t for t in trials if not t.get("feasible")]),
            ("feasible", "#93c5fd", [t for t in trials if t.get("feasible") and t not in front_ts]),
            ("Pareto front", "#dc2626", front_ts),
        )
        for label, colour, ts in groups:
            ax.scatter([t["values"][x] for t in ts], [t["values"]["metric"] for t in ts],
                       s=40 if label == "Pareto front" else 22, color=colour, label=label,
                       edgecolors="black" if label == "Pareto front" else "none",
                       linewidths=0.5, zorder=3)  # fmt: skip
        front = sorted((t["values"][x], t["values"]["metric"]) for t in groups[2][2])
        if len(front) > 1:
            ax.plot(*zip(*front, strict=True), color="#dc2626", lw=0.8, alpha=0.6, zorder=2)
        if isinstance(src.get(x), int | float) and isinstance(src.get("metric"), int | float):
            ax.scatter([src[x]], [src["metric"]], marker="*", s=160, color="black",
                       label="source", zorder=4)  # fmt: skip
        pick = next((t for t in trials if t.get("number") == chosen), None)
        if pick is not None:
            ax.scatter([pick["values"][x]], [pick["values"]["metric"]], marker="o", s=180,
                       facecolors="none", edgecolors="#16a34a", linewidths=2,
                       label=f"chosen (#{chosen})", zorder=5)  # fmt: skip
        if x in limits:
            ax.axvline(limits[x], ls="--", color="#16a34a", lw=1, label=f"limit {x}")
        if "metric" in limits:
            ax.axhline(limits["metric"], ls=":", color="#16a34a", lw=1, label="metric floor")
        ax.set_xlabel({"latency_ms": "latency (ms)", "size_mb": "size (MB)"}[x])
        ax.set_ylabel("metric (as run)")
        ax.grid(True, lw=0.3, alpha=0.5)
    axes[0].legend(fontsize=7, loc="best")
    return svg(fig)
