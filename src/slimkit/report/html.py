"""``report.html``: one self-contained page per artifact (plots embedded, CSS inline, no script,
nothing fetched), readable at a glance::

    import slimkit as sk
    path = sk.report_html("artifacts/digits_small")       # -> artifacts/digits_small/report.html

It shows the chosen model against the original (size, latency, metric, as run), the search's
Pareto front when the artifact holds ``search.json``, what each step changed, the per-layer roofline
and sensitivity the run recorded, the recipe that reproduces it and the machine it was measured on.
"""

from __future__ import annotations

import base64
import warnings
from importlib import resources
from pathlib import Path
from typing import Any

from slimkit.core.io import PathLike, atomic_write
from slimkit.errors import CheckpointError
from slimkit.report.collect import ArtifactData, Compared, collect

REPORT = "report.html"


def fmt(v: Any) -> str:
    """Numbers for people: 4 significant digits, thousands grouped for large integers."""
    if v is None:
        return "–"
    if isinstance(v, bool) or not isinstance(v, int | float):
        return str(v)
    if isinstance(v, int) or (float(v).is_integer() and abs(v) >= 1000):
        return f"{int(v):,}"
    return f"{v:.4g}"


def _data_uri(svg_text: str | None) -> str | None:
    if not svg_text:
        return None
    return "data:image/svg+xml;base64," + base64.b64encode(svg_text.encode()).decode()


def _cards(cmp: Compared | None) -> list[dict[str, Any]]:
    if cmp is None:
        return []
    out = []
    for r in cmp.rows:
        if r.result is None or not r.what.startswith(("ONNX size", "ORT latency", "test ")):
            continue
        if r.what == "test loss":
            continue
        out.append({"what": f"{r.what}, {cmp.labels[1]}", "value": fmt(r.result),
                    "change": f"{r.change} (vs {fmt(r.source)})" if r.change else "",
                    "better": r.better})  # fmt: skip
    return out


def _machine(d: ArtifactData) -> list[tuple[str, str]]:
    m = d.machine
    if not m:
        return [("machine", "not recorded")]
    rows = [("CPU", str(m.get("cpu", "?"))), ("architecture", str(m.get("arch", "?"))),
            ("logical cores", str(m.get("cores", "?"))),
            ("PyTorch threads", str(m.get("torch_threads", "?"))),
            ("int8 dot-product (VNNI)", "yes" if m.get("vnni") else "no"),
            ("bf16 in hardware", "yes" if m.get("bf16_hw") else "no"),
            ("ISA features", ", ".join(m.get("flags") or []) or "none detected"),
            ("OS", str(m.get("os", "?")))]  # fmt: skip
    return rows


def _layers(d: ArtifactData, top: int = 12) -> dict[str, Any] | None:
    rec = d.layers
    if not rec or not rec.get("models"):
        return None
    rows = [(label, r) for label, m in rec["models"].items() for r in m.get("layers") or []]
    rows.sort(key=lambda p: p[1].get("time_s", 0.0), reverse=True)
    return {**rec, "top": rows[:top]}


def _search(d: ArtifactData) -> dict[str, Any] | None:
    s = d.search
    if s is None:
        return None
    trials = [t for t in s.get("trials") or [] if isinstance(t, dict)]
    states: dict[str, int] = {}
    for t in trials:
        states[str(t.get("state"))] = states.get(str(t.get("state")), 0) + 1
    pareto = [
        {**t, "params_text": ", ".join(f"{k}={v}" for k, v in (t.get("params") or {}).items())}
        for t in trials if t.get("pareto") and isinstance(t.get("values"), dict)
    ]  # fmt: skip
    pareto.sort(key=lambda t: -float(t["values"].get("metric") or 0.0))
    feasible = sum(1 for t in trials if t.get("feasible"))
    counts = f"{len(trials)} trials ({', '.join(f'{n} {k}' for k, n in states.items())})"
    counts += f", {feasible} feasible, {len(pareto)} on the front"
    return {"pareto": pareto, "counts": counts,
            "objectives": [f"{o}: {dr}" for o, dr in zip(s.get("objectives") or [],
                                                        s.get("directions") or [], strict=False)],
            "constraints": s.get("constraints") or {}}  # fmt: skip


def _plots(d: ArtifactData) -> dict[str, str | None]:
    from slimkit.report import plots

    out: dict[str, str | None] = {}
    jobs = {
        "compare": lambda: plots.compare_chart(d.compared) if d.compared else None,
        "roofline": lambda: plots.roofline_chart(d.layers) if d.layers else None,
        "sensitivity": lambda: plots.sensitivity_chart(d.sensitivity) if d.sensitivity else None,
        "pareto": lambda: plots.pareto_chart(d.search) if d.search else None,
    }
    for name, draw in jobs.items():
        try:
            out[name] = _data_uri(draw())
        except Exception as e:  # one broken record must not cost the whole page
            out[name] = None
            d.notes.append(f"the {name} plot could not be drawn: {type(e).__name__}: {e}")
    return out


def render(d: ArtifactData) -> str:
    """The report's HTML for the collected artifact ``d``."""
    import jinja2

    import slimkit

    env = jinja2.Environment(
        autoescape=True,
        undefined=jinja2.ChainableUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    plots = _plots(d)
    template = resources.files("slimkit.report").joinpath("report.html.j2").read_text("utf-8")
    return env.from_string(template).render(
        d=d, fmt=fmt, plots=plots, cards=_cards(d.compared), machine=_machine(d),
        layers=_layers(d), search=_search(d), version=slimkit.__version__,
    )  # fmt: skip


def report_html(
    artifact_dir: PathLike, *, out: PathLike | None = None, layers: bool = True
) -> Path:
    """Write ``report.html`` for the artifact in ``artifact_dir`` (atomically) and return its
    path; ``out`` writes it elsewhere. It reads metrics.json, recipe.yaml and, when present,
    layers.json, sensitivity.json and search.json. With ``layers`` and no layers.json, the
    per-layer roofline and sensitivity are computed from the recipe's model first (and saved)."""
    folder = Path(artifact_dir)
    if not folder.is_dir():
        raise CheckpointError(
            f"{str(folder)!r} is not an artifact directory",
            fix="pass the --out folder of a slimkit command (it holds metrics.json)",
        )
    path = Path(out) if out is not None else folder / REPORT
    why = None
    if layers:
        from slimkit.report.layers import layers_from_artifact

        why = layers_from_artifact(folder)
    data = collect(folder)
    if why:
        data.notes.append(f"no per-layer record: {why}")
    html = render(data)
    with atomic_write(path) as f:
        f.write(html)
    return path


def try_report(artifact_dir: PathLike, **layers: Any) -> Path | None:
    """The hook artifact writing calls: ``write_layers(**layers)`` when models are given, then
    ``report_html``. A report that fails warns and returns None: it never fails the run."""
    try:
        if layers:
            from slimkit.report.layers import write_layers

            write_layers(Path(artifact_dir), **layers)
        return report_html(artifact_dir, layers=False)
    except Exception as e:
        warnings.warn(f"report.html was not written: {type(e).__name__}: {e}", stacklevel=2)
        return None
