"""PNG plots of an analysis: the roofline chart and sensitivity bars.

matplotlib loads only when a plot is drawn, and draws on an Agg canvas of its own (no pyplot, no
global backend switch). Files are written atomically.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from slimkit.analyze.hardware import HardwareProfile
from slimkit.analyze.roofline import Roofline
from slimkit.analyze.sensitivity import SensitivityResult
from slimkit.core.io import PathLike, atomic_path

_COLOURS = {"compute": "tab:red", "memory": "tab:blue", "overhead": "tab:gray"}


def _figure(width: float, height: float) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Any, path: PathLike) -> Path:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    return Path(path)


def roofline_chart(
    rf: Roofline,
    hw: HardwareProfile,
    path: PathLike,
    measured: dict[str, float | None] | None = None,
    label: int = 6,
) -> Path:
    """Layers as points (intensity, attained GFLOP/s) under the roof of ``hw``.

    Attained performance is FLOPs over the measured time where ``measured`` has one (filled
    points), else over the roofline's bound (hollow points, which sit on the roof). The ``label``
    slowest layers are named.
    """
    fig = _figure(8, 5.5)
    ax = fig.add_subplot()
    rows = [r for r in rf.layers if r.bound != "fused" and r.flops > 0 and r.bytes > 0]
    xs = [r.intensity for r in rows] or [1.0]
    lo, hi = min(xs) / 2, max(max(xs) * 2, (rf.ridge_point or 1) * 4)
    grid = [lo * (hi / lo) ** (i / 200) for i in range(201)]
    for dtype, style in (("fp32", "-"), ("int8", "--"), ("bf16", ":")):
        peak = hw.peak(dtype)  # type: ignore[arg-type]
        if peak is None or (dtype == "bf16" and peak < hw.peak_fp32_gflops):
            continue
        roof = [min(peak, hw.mem_bandwidth_gbs * x) for x in grid]
        ax.plot(grid, roof, style, color="black", lw=1.2 if dtype == "fp32" else 0.9,
                label=f"roof {dtype} ({peak:.0f} G/s)")  # fmt: skip
    for r in rows:
        t = (measured or {}).get(r.name)
        perf = r.flops / (t if t else r.time_s) / 1e9
        size = 20 + 200 * math.sqrt(r.time_s / max(rf.total_s, 1e-12))
        face = _COLOURS.get(r.bound, "tab:gray") if t else "none"
        ax.scatter([r.intensity], [perf], s=size, facecolors=face,
                   edgecolors=_COLOURS.get(r.bound, "tab:gray"), alpha=0.75)  # fmt: skip
    for r in sorted(rows, key=lambda r: r.time_s, reverse=True)[:label]:
        t = (measured or {}).get(r.name)
        perf = r.flops / (t if t else r.time_s) / 1e9
        ax.annotate(r.name, (r.intensity, perf), fontsize=7, xytext=(4, 4),
                    textcoords="offset points")  # fmt: skip
    for bound, colour in _COLOURS.items():
        ax.scatter([], [], color=colour, label=f"{bound}-bound layers")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("arithmetic intensity (FLOP / byte)")
    ax.set_ylabel("attained GFLOP/s" + (" (filled: measured)" if measured else ""))
    ax.set_title(f"roofline on {hw.name} ({rf.dtype}), ridge {rf.ridge_point:.3g} FLOP/B")
    ax.grid(True, which="both", lw=0.3, alpha=0.5)
    ax.legend(fontsize=7, loc="lower right")
    return _save(fig, path)


def sensitivity_chart(res: SensitivityResult, path: PathLike, max_layers: int = 40) -> Path:
    """Grouped horizontal bars: one group per layer, one bar per change. For the SQNR metric the
    bars are the SQNR in dB (shorter = more sensitive), otherwise the metric drop."""
    layers = res.layers[:max_layers]
    changes = res.changes
    sqnr = res.metric_name == "sqnr_db"
    value = {(r.layer, r.change): (r.metric if sqnr else r.drop) for r in res.rows}
    finite = [v for v in value.values() if math.isfinite(v)]
    cap = (max(finite) if finite else 1.0) * 1.1
    fig = _figure(8, max(3.0, 0.28 * len(layers) * max(1, len(changes)) / 2.5 + 1.5))
    ax = fig.add_subplot()
    height = 0.8 / max(len(changes), 1)
    for j, change in enumerate(changes):
        ys = [i + j * height for i in range(len(layers))]
        vals = [value.get((layer, change), 0.0) for layer in layers]
        ax.barh(ys, [v if math.isfinite(v) else cap for v in vals], height=height, label=change)
    ax.set_yticks([i + 0.4 - height / 2 for i in range(len(layers))], labels=layers, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("SQNR of the output (dB), higher is safer" if sqnr
                  else f"drop in {res.metric_name} (baseline {res.baseline:.4g})")  # fmt: skip
    ax.set_title("sensitivity: only one layer changed at a time")
    ax.legend(fontsize=7, ncols=min(len(changes), 4))
    ax.grid(True, axis="x", lw=0.3, alpha=0.5)
    return _save(fig, path)
