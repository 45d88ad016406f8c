"""Mixed precision under a budget: one format per layer (fp32, fp16, int8, int4, int2) chosen so
that the exported file fits a size (and an average bits-per-weight) budget at the least damage.

1. **Sensitivity**: each Conv/Linear alone is put in each format on the BN-folded float model
   (integer formats: PTQ's weight codes and a uint8 input, fp16: rounded weights) and the
   output is compared with the float model's on the calibration data: KL divergence of the
   softmax (``metric="kl"``, classifiers; the default for logit outputs) or the relative squared
   error (``"mse"``).
2. **Solver**: a multiple-choice knapsack solved exactly as an integer programme
   (``scipy.optimize.milp``): one binary per layer and format, minimise the summed sensitivity
   subject to the bytes each layer takes in the exported file (<= the size budget less the rest
   of the file) and the bits per weight (<= ``avg_bits``). Exact because a greedy Pareto walk is
   not (per-layer curves are not convex, and two budgets at once break its ordering), and a
   model's few hundred binaries solve in milliseconds.
   With ``max_latency_ms`` each layer's kernels are timed in ONNX Runtime once in fp32 and once
   in int8 (``layer_seconds``; fp16 weights run on the float kernels, 4- and 2-bit codes on the
   int8 ones) and their sum is kept under the budget less the rest of the graph.
3. **Apply**: static PTQ (``quant.ptq``) with the float layers kept float, the per-layer weight
   bits of the integer ones (4- and 2-bit codes run on ORT's int8 kernels: W4A8, W2A8), and the
   fp16 layers' weights stored in fp16. The result is exported (QDQ, weights packed, checked
   against the simulation) and its file measured (and, with a latency budget, timed: the lower
   quartile of batch-1 runs); over budget, the estimate of the rest is corrected by what was
   measured and the plan solved again.

The **plan** is a YAML file (``save_plan``): ``layers: {name: format}``, each line commented with
its parameters, bytes per format and sensitivity. Edit it and pass it back (``Mixed(plan=path)``
or a dict): it is applied exactly, with no sensitivity pass.

    q = sk.quantize(model, Mixed(max_size_mb=0.05), data=calib)
    print(q.meta["slimkit"]["distribution"])            # share of layers / params per format
    save_plan(q, "plan.yaml")                           # edit, then:
    q2 = sk.quantize(model, Mixed(plan="plan.yaml"), data=calib)

YAML step: ``- quant.mixed: {max_size_mb: 0.05}``. Supports the layers static PTQ supports
(Conv1d/2d/3d, Linear); ``formats`` limits the choice (``int2`` is off by default: ternary
weights suit only large, insensitive layers).
"""

from __future__ import annotations

import copy
import math
import tempfile
import time
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import yaml
from pydantic import Field
from torch import nn

from slimkit.core.config import Config
from slimkit.core.data import Batch, collect_batches, flatten_output
from slimkit.core.io import atomic_write
from slimkit.core.registry import METHODS, did_you_mean
from slimkit.core.scope import Scope
from slimkit.errors import ConfigError
from slimkit.quant.modules import run_layer
from slimkit.quant.primitives import affine_params, weight_codes

Format = Literal["fp32", "fp16", "int8", "int4", "int2"]
FORMATS: tuple[str, ...] = ("fp32", "fp16", "int8", "int4", "int2")
DEFAULT_FORMATS: tuple[Format, ...] = ("fp32", "fp16", "int8", "int4")
BITS = {"fp32": 32, "fp16": 16, "int8": 8, "int4": 4, "int2": 2}
_INT_OVERHEAD = 17  # bytes per output channel: weight scale + zero point, int32 bias + scale + zp


class Mixed(Config):
    """Per-layer fp32 / fp16 / int8 / int4 (/ int2) under a size or bits budget, or a given plan."""

    max_size_mb: float | None = Field(None, gt=0)  # the exported ONNX file (packed), in MB
    avg_bits: float | None = Field(None, ge=2, le=32)  # mean bits per weight of the layers
    # batch-1 latency in ONNX Runtime on this machine (each run's lower quartile, measured)
    max_latency_ms: float | None = Field(None, gt=0)
    formats: list[Format] = Field(default_factory=lambda: list(DEFAULT_FORMATS))  # to choose from
    plan: str | dict[str, Any] | None = None  # a plan to apply exactly: YAML path or {layer: fmt}
    metric: Literal["auto", "kl", "mse"] = "auto"  # sensitivity; auto: kl for logits, else mse
    sensitivity_batches: int = Field(8, ge=1)  # calibration batches the sensitivity pass reads
    calibration: Literal["minmax", "percentile", "entropy", "mse"] = "mse"  # activation ranges
    num_batches: int = Field(32, ge=1)  # calibration batches read from `data`
    bias_correction: bool = True
    # AdaRound iterations per integer layer (as PTQ's; 0: nearest): learned rounding for the
    # int4 / int2 layers of the plan, at 2-5x the tool time
    adaround: int = Field(0, ge=0, le=100_000)


class HalfLayer(nn.Module):
    """A Conv/Linear whose weight is stored in fp16 and computed in float32 (exported as a
    FLOAT16 initializer + Cast: half the bytes, float kernels); the bias stays float32."""

    w16: torch.Tensor

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.float_layer = layer
        w = layer.weight
        assert isinstance(w, torch.Tensor)
        self.register_buffer("w16", w.detach().to(torch.float16))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = self.float_layer.bias
        bias = b if isinstance(b, torch.Tensor) else None
        return run_layer(self.float_layer, x, self.w16.float(), bias)


# --- costs and sensitivity --------------------------------------------------------------------


def layer_bytes(layer: nn.Module, fmt: str) -> int:
    """The bytes ``layer`` takes in the exported file in format ``fmt`` (weights packed)."""
    w = layer.weight
    assert isinstance(w, torch.Tensor)
    n, out = w.numel(), w.shape[0]
    if fmt in ("fp32", "fp16"):
        has_bias = isinstance(getattr(layer, "bias", None), torch.Tensor)
        return n * BITS[fmt] // 8 + (4 * out if has_bias else 0)
    return math.ceil(n * BITS[fmt] / 8) + _INT_OVERHEAD * out


def _divergence(ref: list[torch.Tensor], out: list[torch.Tensor], metric: str) -> float:
    total = 0.0
    for r, o in zip(ref, out, strict=True):
        if metric == "kl":
            lp, lq = torch.log_softmax(r.double(), -1), torch.log_softmax(o.double(), -1)
            total += float((lp.exp() * (lp - lq)).sum(-1).mean())
        else:
            total += float(
                (r - o).double().pow(2).mean() / r.double().pow(2).mean().clamp_min(1e-30)
            )
    return max(total, 0.0)


def sensitivities(
    gm: nn.Module, layers: dict[str, nn.Module], batches: list[Batch], formats: list[str],
    metric: str, int8_bits: int,
) -> dict[str, dict[str, float]]:  # fmt: skip
    """``{layer: {format: divergence}}``: each layer alone in each format, the rest float."""
    with torch.no_grad():
        refs = [[t for _, t in flatten_output(b.run(gm))] for b in batches]
    ranges: dict[str, list[float]] = {n: [math.inf, -math.inf] for n in layers}

    def observe(name: str) -> Any:
        def hook(_m: nn.Module, args: tuple[Any, ...]) -> None:
            r = ranges[name]
            r[0], r[1] = min(r[0], float(args[0].min())), max(r[1], float(args[0].max()))

        return hook

    handles = [m.register_forward_pre_hook(observe(n)) for n, m in layers.items()]
    with torch.no_grad():
        for b in batches:
            b.run(gm)
    for h in handles:
        h.remove()
    out: dict[str, dict[str, float]] = {}
    for name, m in layers.items():
        w = m.weight
        assert isinstance(w, torch.Tensor)
        saved = w.detach().clone()
        out[name] = {}
        for fmt in formats:
            if fmt == "fp32":
                out[name][fmt] = 0.0
                continue
            handle = None
            if fmt == "fp16":
                new = saved.half().float()
            else:
                codes, scale = weight_codes(saved, int8_bits if fmt == "int8" else BITS[fmt])
                new = codes * scale.view((-1,) + (1,) * (saved.dim() - 1))
                lo, hi = ranges[name]
                s, zp, _, _ = affine_params(min(lo, 0.0), max(hi, 0.0), bits=8, symmetric=False,
                                            signed=False)  # fmt: skip

                def fake(_m: nn.Module, args: tuple[Any, ...], s: Any = s, zp: Any = zp) -> Any:
                    x = torch.fake_quantize_per_tensor_affine(args[0], float(s), int(zp), 0, 255)
                    return (x, *args[1:])

                handle = m.register_forward_pre_hook(fake)
            try:
                with torch.no_grad():
                    w.copy_(new)
                    total = sum(
                        _divergence(ref, [t for _, t in flatten_output(b.run(gm))], metric)
                        for ref, b in zip(refs, batches, strict=True)
                    )
            finally:
                with torch.no_grad():
                    w.copy_(saved)
                if handle is not None:
                    handle.remove()
            out[name][fmt] = total / len(batches)
    return out


# --- the solver -------------------------------------------------------------------------------


def solve(
    sens: dict[str, dict[str, float]], costs: dict[str, dict[str, int]], params: dict[str, int],
    *, max_bytes: float | None = None, avg_bits: float | None = None,
    seconds: dict[str, dict[str, float]] | None = None, max_seconds: float | None = None,
) -> dict[str, str]:  # fmt: skip
    """The format per layer of least summed sensitivity with ``sum(bytes) <= max_bytes``,
    ``sum(params * bits) <= avg_bits * sum(params)`` and ``sum(seconds) <= max_seconds`` (an
    exact integer programme)."""
    from scipy.optimize import Bounds, LinearConstraint, milp

    names = list(sens)
    pairs = [(n, f) for n in names for f in sens[n]]
    worst = max((v for n in names for v in sens[n].values()), default=0.0) or 1.0
    c = np.array([sens[n][f] / worst for n, f in pairs])
    rows, lo, hi = [], [], []
    for n in names:  # exactly one format per layer
        rows.append([1.0 if p == n else 0.0 for p, _ in pairs])
        lo.append(1.0)
        hi.append(1.0)
    if max_bytes is not None:
        rows.append([float(costs[n][f]) for n, f in pairs])
        lo.append(-np.inf)
        hi.append(float(max_bytes))
    if avg_bits is not None:
        rows.append([float(params[n] * BITS[f]) for n, f in pairs])
        lo.append(-np.inf)
        hi.append(avg_bits * sum(params.values()))
    if max_seconds is not None and seconds is not None:
        rows.append([float(seconds[n][f]) for n, f in pairs])
        lo.append(-np.inf)
        hi.append(float(max_seconds))
    res = milp(c, constraints=LinearConstraint(np.array(rows), lo, hi),
               integrality=np.ones(len(pairs)), bounds=Bounds(0, 1))  # fmt: skip
    if res.x is None:
        raise ConfigError(
            "no choice of formats meets the budget",
            fix="raise max_size_mb / avg_bits, or allow smaller formats (formats: [..., int2])",
        )
    return {n: f for (n, f), x in zip(pairs, res.x, strict=True) if x > 0.5}


# --- plans ------------------------------------------------------------------------------------


def load_plan(plan: str | Path | dict[str, Any], layers: list[str]) -> dict[str, str]:
    """``{layer: format}`` from a plan (a YAML path, or a dict: ``{layers: {...}}`` or the
    mapping itself), checked against the model's ``layers``; every layer needs a format."""
    where = "the plan"
    if isinstance(plan, (str, Path)):
        where = f"plan {str(plan)!r}"
        if not Path(plan).is_file():
            raise ConfigError(f"{where} does not exist",
                              fix="pass the path of a plan written by save_plan (or "
                              "--plan-out), or a dict {layer: format}")  # fmt: skip
        plan = yaml.safe_load(Path(plan).read_text()) or {}
    if not isinstance(plan, dict):
        raise ConfigError(f"{where} is not a mapping", fix="write it as `layers: {name: int8}`")
    chosen = plan.get("layers", plan) if isinstance(plan.get("layers"), dict) else plan
    out = {}
    for name, fmt in chosen.items():
        if name not in layers:
            hint = did_you_mean(str(name), layers)
            raise ConfigError(
                f"{where} names layer {name!r}, which is not a Conv/Linear layer in scope",
                fix=f"{hint + ' ' if hint else ''}use the model's layer names "
                f"({', '.join(layers[:4])}, ...) or write a fresh plan with save_plan",
            )
        if fmt not in FORMATS:
            raise ConfigError(
                f"{where} gives layer {name!r} the unknown format {fmt!r}",
                fix=f"use one of {', '.join(FORMATS)}",
            )
        out[str(name)] = str(fmt)
    missing = [n for n in layers if n not in out]
    if missing:
        raise ConfigError(
            f"{where} has no format for {len(missing)} layer(s): {', '.join(missing[:5])}",
            fix=f"add a line per layer (e.g. `{missing[0]}: int8`), or exclude them with a Scope",
        )
    return out


def save_plan(result: nn.Module | dict[str, Any], path: str | Path) -> Path:
    """Write the plan of a ``quant.mixed`` result (or its record) as commented YAML."""
    rec = result if isinstance(result, dict) else getattr(result, "meta")["slimkit"]  # noqa: B009
    lines = [
        "# quant.mixed plan: one format per layer (fp32 | fp16 | int8 | int4 | int2).",
        "# Edit a format and apply it again: sk.quantize(model, Mixed(plan='plan.yaml'), "
        "data=...) or `slimkit quantize MODEL --method mixed --plan plan.yaml`.",
        f"# budget: {rec.get('budget')}; file {rec.get('size_mb')} MB",
        f"# per layer: params, bytes per format, sensitivity per format ({rec.get('metric')} "
        "of the output to the float model; lower is better)",
        "layers:",
    ]
    for name, info in rec["layers"].items():
        sizes = " ".join(f"{f} {b}" for f, b in info.get("bytes", {}).items())
        sens = " ".join(f"{f} {v:.3g}" for f, v in info.get("sensitivity", {}).items())
        comment = f"{info.get('params')} params; bytes {sizes}; {rec.get('metric')} {sens}"
        lines.append(f"  {yaml.safe_dump(name).splitlines()[0]}: {info['format']}  # {comment}")
    lines += ["", *("# " + t for t in str(rec.get("distribution", "")).splitlines())]
    dest = Path(path)
    with atomic_write(dest) as f:
        f.write("\n".join(lines) + "\n")
    return dest


def distribution(formats: dict[str, str], params: dict[str, int]) -> dict[str, dict[str, Any]]:
    """Per format: layers, parameters and their shares of the total."""
    total_p, total_l = sum(params.values()) or 1, len(formats) or 1
    out = {}
    for f in FORMATS:
        names = [n for n, g in formats.items() if g == f]
        if names:
            p = sum(params[n] for n in names)
            out[f] = {"layers": len(names), "layer_share": round(len(names) / total_l, 4),
                      "params": p, "param_share": round(p / total_p, 4)}  # fmt: skip
    return out


def distribution_table(dist: dict[str, dict[str, Any]], size_mb: float | None,
                       avg_bits: float) -> str:  # fmt: skip
    """The bit-width distribution as a text table (what the result and the CLI print)."""
    rows = ["format  layers  % layers    params  % params"]
    for f, d in dist.items():
        rows.append(f"{f:<6} {d['layers']:>7} {100 * d['layer_share']:>8.1f} "
                    f"{d['params']:>9} {100 * d['param_share']:>9.1f}")  # fmt: skip
    size = f"{size_mb:.4f} MB" if size_mb is not None else "not measured"
    rows.append(f"size {size}; {avg_bits:.2f} bits per weight on average")
    return "\n".join(rows)


# --- the method -------------------------------------------------------------------------------


@METHODS.register(
    "quant.mixed",
    config=Mixed,
    summary="mixed precision: fp32/fp16/int8/int4 per layer under a size budget (ILP)",
    example={"avg_bits": 6.0, "num_batches": 2, "sensitivity_batches": 2},
    export="qdq",  # QDQ ONNX, 4/2-bit codes packed, fp16 layers as FLOAT16
)
def quantize_mixed(
    model: nn.Module,
    config: Mixed | None = None,
    *,
    data: Any,
    scope: Scope | None = None,
    progress: bool = False,
) -> nn.Module:
    """A mixed-precision copy of ``model`` (not modified) under ``config``'s budget, or with its
    plan; ``data`` is calibration data. ``meta["slimkit"]`` records the plan (``layers``), the
    measured file size and the bit-width ``distribution``."""
    from slimkit.graph_opt.bn_fold import fold_bn
    from slimkit.quant.ptq import resolve_weight_bits
    from slimkit.quant.sim import WEIGHTED, place

    cfg = config or Mixed()
    if (
        cfg.plan is None
        and cfg.max_size_mb is None
        and cfg.avg_bits is None
        and (cfg.max_latency_ms is None)
    ):
        raise ConfigError(
            "quant.mixed needs a budget or a plan",
            fix="pass max_size_mb=..., avg_bits=..., max_latency_ms=..., or plan='plan.yaml'",
        )
    t0 = time.perf_counter()
    batches = collect_batches(data, what="calibration data", limit=cfg.num_batches)
    args, kwargs = batches[0].args, dict(batches[0].kwargs)
    gm = fold_bn(copy.deepcopy(model).eval(), example_inputs=args, example_kwargs=kwargs,
                 inplace=True)  # fmt: skip
    placed = place(gm, scope).weighted.values()
    layers = {n: gm.get_submodule(n) for n in dict.fromkeys(placed)}
    layers = {n: m for n, m in layers.items() if isinstance(m, WEIGHTED)}
    params = {n: int(m.weight.numel()) for n, m in layers.items()}  # type: ignore[operator]
    costs = {n: {f: layer_bytes(m, f) for f in FORMATS} for n, m in layers.items()}
    int8_bits = resolve_weight_bits("auto")
    metric = cfg.metric
    if metric == "auto":
        with torch.no_grad():
            outs = [t for _, t in flatten_output(batches[0].run(gm))]
        metric = "kl" if outs and all(t.dim() >= 2 and t.shape[-1] > 1 for t in outs) else "mse"
    sens: dict[str, dict[str, float]] = {}
    if cfg.plan is not None:
        formats = load_plan(cfg.plan, list(layers))
    else:
        sens = sensitivities(gm, layers, batches[: cfg.sensitivity_batches], list(cfg.formats),
                             metric, int8_bits)  # fmt: skip
    del gm
    budget = None if cfg.max_size_mb is None else cfg.max_size_mb * 1e6
    lat_budget = None if cfg.max_latency_ms is None else cfg.max_latency_ms / 1e3
    timed = cfg.max_latency_ms is not None
    seconds: dict[str, dict[str, float]] = {}
    if cfg.plan is not None:
        out = _apply(model, formats, cfg, batches, scope, int8_bits)
        (size_bytes, latency), attempts = _measure(out, batches[0], timed), 1
    else:
        if timed:
            seconds = layer_seconds(model, list(layers), cfg, batches, scope, int8_bits)
        fit = _Fit(model, cfg, batches, scope, int8_bits, sens, costs, params, seconds)
        out, formats, size_bytes, latency, attempts = fit.run(budget, lat_budget)
    size_mb = size_bytes / 1e6
    bits = sum(params[n] * BITS[f] for n, f in formats.items()) / max(sum(params.values()), 1)
    dist = distribution(formats, params)
    meta: dict[str, Any] = getattr(out, "meta")["slimkit"]  # noqa: B009 - set by quant.ptq
    meta.update({
        "method": "quant.mixed", "config": cfg.to_dict(), "metric": metric,
        "budget": {"max_size_mb": cfg.max_size_mb, "avg_bits": cfg.avg_bits,
                   "max_latency_ms": cfg.max_latency_ms},
        "size_mb": round(size_mb, 6),
        "within_budget": None if budget is None else size_bytes <= budget,
        "latency_ms": None if latency is None else round(latency * 1e3, 4),
        "within_latency_budget": None if lat_budget is None or latency is None
        else latency <= lat_budget,
        "avg_bits": round(bits, 3), "plan": dict(formats), "bit_widths": dist,
        "int8_weight_bits": int8_bits, "solves": attempts,
        "layers": {n: {"format": formats[n], "params": params[n], "bytes": costs[n],
                       **({"sensitivity": sens[n]} if sens else {}),
                       **({"ms": {f: round(t * 1e3, 4) for f, t in seconds[n].items()}}
                          if seconds else {})} for n in layers},
        "distribution": distribution_table(dist, size_mb, bits),
        "seconds": round(time.perf_counter() - t0, 3),
    })  # fmt: skip
    return out


class _Fit:
    """Solve, apply, export and measure until the plan fits: the rest of the file (all but the
    layers' bytes) and of the latency (all but the layers' kernels) are estimated first, then
    taken from each measured model."""

    def __init__(self, model: nn.Module, cfg: Mixed, batches: list[Batch], scope: Scope | None,
                 int8_bits: int, sens: dict[str, dict[str, float]],
                 costs: dict[str, dict[str, int]], params: dict[str, int],
                 seconds: dict[str, dict[str, float]] | None = None) -> None:  # fmt: skip
        self.model, self.cfg, self.batches, self.scope = model, cfg, batches, scope
        self.int8_bits, self.sens, self.params = int8_bits, sens, params
        self.costs: dict[str, dict[str, int]] = {
            n: {str(f): c[f] for f in cfg.formats} for n, c in costs.items()
        }
        self.seconds = {n: {str(f): t[f] for f in cfg.formats} for n, t in (seconds or {}).items()}

    def solve(self, budget: float | None, rest: float, lat: float | None,
              lat_rest: float) -> dict[str, str]:  # fmt: skip
        if budget is not None:
            smallest = sum(min(c.values()) for c in self.costs.values())
            if smallest + rest > budget:
                raise ConfigError(
                    f"max_size_mb={budget / 1e6:g} is below what this model can reach with "
                    f"formats {list(self.cfg.formats)}: about {(smallest + rest) / 1e6:.4g} MB",
                    fix="raise max_size_mb, or allow smaller formats (formats: [..., int2])",
                )
        if lat is not None:
            fastest = sum(min(t.values()) for t in self.seconds.values())
            if fastest + lat_rest > lat:
                raise ConfigError(
                    f"max_latency_ms={lat * 1e3:g} is below what this model reaches here with "
                    f"formats {list(self.cfg.formats)}: about {(fastest + lat_rest) * 1e3:.4g} ms",
                    fix="raise max_latency_ms (or prune the model first: fewer MACs)",
                )
        return solve(self.sens, self.costs, self.params, avg_bits=self.cfg.avg_bits,
                     max_bytes=None if budget is None else budget - rest,
                     seconds=self.seconds or None,
                     max_seconds=None if lat is None else lat - lat_rest)  # fmt: skip

    def run(
        self, budget: float | None, lat: float | None = None
    ) -> tuple[nn.Module, dict[str, str], int, float | None, int]:
        # first guess of the rest: float parameters outside the layers, per-layer graph nodes
        rest = 4.0 * sum(p.numel() for p in self.model.parameters())
        rest = max(rest - sum(c["fp32"] for c in self.costs.values()), 0.0) if all(
            "fp32" in c for c in self.costs.values()) else 0.0  # fmt: skip
        rest += 300.0 * len(self.costs) + 2000.0
        lat_rest = 0.0  # the kernels outside the layers: taken from the first measured model
        best: tuple[nn.Module, dict[str, str], int, float | None] | None = None
        last: tuple[nn.Module, dict[str, str], int, float | None] | None = None
        attempts = 0
        while attempts < 4:
            attempts += 1
            try:
                formats = self.solve(budget, rest, lat, lat_rest)
            except ConfigError:
                if best is not None:  # a plan that fits was measured: keep it
                    break
                if attempts > 1:  # with the rest measured, nothing fits
                    raise
                # the first estimate of the rest may be off: measure the smallest (or fastest)
                # plan's model
                table = self.costs if budget is not None or lat is None else self.seconds
                formats = {n: min(c, key=c.__getitem__) for n, c in table.items()}
            if last is not None and formats == last[1]:
                break  # the same plan again: nothing new to measure
            out = _apply(self.model, formats, self.cfg, self.batches, self.scope, self.int8_bits)
            size, seconds = _measure(out, self.batches[0], lat is not None)
            last = (out, formats, size, seconds)
            fits = (budget is None or size <= budget) and (
                lat is None or (seconds is not None and seconds <= lat)
            )
            if fits and (best is None or self._cost(formats) <= self._cost(best[1])):
                best = last
            if budget is None and lat is None:
                break
            if budget is not None:
                measured = size - sum(self.costs[n][f] for n, f in formats.items()) + 64.0
                over = size > budget
                rest = max(measured, rest + size - budget) if over else measured
            if lat is not None and seconds is not None:
                measured_t = seconds - sum(self.seconds[n][f] for n, f in formats.items())
                lat_rest = max(measured_t, lat_rest + seconds - lat) if seconds > lat else (
                    measured_t)  # fmt: skip
        if best is None:
            assert last is not None
            if budget is not None or lat is not None:
                got = [f"the last file was {last[2] / 1e6:.4g} MB"] if budget is not None else []
                if lat is not None and last[3] is not None:
                    got.append(f"it ran in {last[3] * 1e3:.4g} ms")
                wanted = ", ".join(
                    ([f"max_size_mb={budget / 1e6:g}"] if budget is not None else [])
                    + ([f"max_latency_ms={lat * 1e3:g}"] if lat is not None else [])
                )
                raise ConfigError(
                    f"no plan met {wanted} in {attempts} tries ({'; '.join(got)})",
                    fix="loosen the budget a little, or allow smaller formats (add int2)",
                )
        final = best if best is not None else last
        assert final is not None
        return final[0], final[1], final[2], final[3], attempts

    def _cost(self, formats: dict[str, str]) -> float:
        return sum(self.sens[n][f] for n, f in formats.items())


def layer_seconds(
    model: nn.Module, layers: list[str], cfg: Mixed, batches: list[Batch], scope: Scope | None,
    int8_bits: int,
) -> dict[str, dict[str, float]]:  # fmt: skip
    """Seconds per batch-1 run of each layer's kernels in ONNX Runtime, per format: measured once
    on the float model (fp32; fp16 too, whose weights ORT casts back at load) and once on the
    all-int8 model (int8, and int4 / int2, whose codes run on the same int8 kernels)."""
    from slimkit.analyze.layer_time import ort_layer_times
    from slimkit.export.qdq import export_quantized

    x = tuple(t[:1] for t in batches[0].args)
    kwargs = {k: v[:1] for k, v in batches[0].kwargs.items()} or None
    if kwargs:
        raise ConfigError(
            "max_latency_ms times models called with positional inputs only",
            fix="use max_size_mb / avg_bits for models that take keyword inputs",
        )
    fp = ort_layer_times(model, x, runs=30).per_module
    q = _apply(model, {n: "int8" for n in layers}, cfg, batches, scope, int8_bits)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "int8.onnx"
        export_quantized(q, path, example_inputs=x)
        i8 = ort_layer_times(q, x, runs=30, onnx_path=path).per_module
    out = {}
    for n in layers:
        t_fp, t_i8 = fp.get(n, 0.0), i8.get(n, fp.get(n, 0.0))
        out[n] = {f: (t_fp if f in ("fp32", "fp16") else t_i8) for f in FORMATS}
    return out


def _apply(model: nn.Module, formats: dict[str, str], cfg: Mixed, batches: list[Batch],
           scope: Scope | None, int8_bits: int) -> nn.Module:  # fmt: skip
    """Static PTQ with the float layers kept float and the integer layers at their bits; the
    fp16 layers then store fp16 weights."""
    from slimkit.core.scope import set_submodule
    from slimkit.quant.ptq import PTQ, quantize_ptq

    floats = [n for n, f in formats.items() if f in ("fp32", "fp16")]
    ints = {
        n: (int8_bits if f == "int8" else BITS[f]) for n, f in formats.items() if n not in floats
    }
    ptq = PTQ(calibration=cfg.calibration, weight_bits=int8_bits, num_batches=cfg.num_batches,
              bias_correction=cfg.bias_correction, float_prefix=floats, rotate_boundary=False,
              speed_check=False, layer_weight_bits=ints, adaround=cfg.adaround)  # fmt: skip
    out = quantize_ptq(model, ptq, data=batches, scope=scope)
    for n, f in formats.items():
        if f == "fp16":
            set_submodule(out, n, HalfLayer(out.get_submodule(n)))
    return out


def _measure(model: nn.Module, batch: Batch, timed: bool) -> tuple[int, float | None]:
    """The bytes of ``model``'s QDQ export (packed; checked against the simulation in ORT) and,
    when ``timed``, its batch-1 seconds per run in ONNX Runtime (lower quartile of the runs)."""
    from slimkit.analyze.latency import measure_latency, ort_runner
    from slimkit.export.ort import ort_session
    from slimkit.export.qdq import export_quantized

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "mixed.onnx"
        x = tuple(t[:1] for t in batch.args)
        kwargs = {k: v[:1] for k, v in batch.kwargs.items()} or None
        export_quantized(model, path, example_inputs=x, example_kwargs=kwargs)
        seconds = None
        if timed:
            stats = measure_latency({"m": ort_runner(ort_session(path), list(x))}, runs=50)
            seconds = stats["m"].quartile_ms / 1e3
        return path.stat().st_size, seconds
