"""Automatic per-layer pruning ratios toward a target: MACs, parameters or measured speed-up.

The user states what the pruned model must reach; slimkit chooses how many units each group keeps:

- ``macs=0.5`` / ``params=0.3``: keep that fraction of the dense model's MACs / parameters. A cost
  model built from one profile of the dense model (each layer's MACs scale with the kept fractions
  of the groups it reads and writes) gives the cost of any choice of widths instantly; the pruned
  model's exact count is measured afterwards and reported.
- ``speedup=2.0``: the pruned model must run that many times faster than the dense one on ONNX
  Runtime, *measured* on this machine: a bisection over the MAC budget exports and times each
  candidate against the dense model (interleaved rounds) and returns the least-pruned model that
  meets the target. With ``hw="raspberry_pi_4"`` (a preset, a profile YAML, or ``"this"``) the
  speed-up is the roofline's prediction on that hardware profile instead (``slimkit.analyze``),
  for a device that is not at hand.

Allocation across groups:

- ``uniform``: every group keeps the same fraction (what one ``Channel(ratio=...)`` does).
- ``sensitivity``: each group is pruned alone to several widths and the change of the model's
  output on calibration data is measured; a greedy allocation then removes, step by step, the units
  with the least output change per unit of cost saved (the per-layer search of NetAdapt, Yang et al.
  ECCV 2018, with an output-distortion proxy instead of short-term fine-tuning). Needs ``data``.

::

    small = prune_to_target(model, Target(speedup=2.0), example_inputs=(x,))
    small = prune_to_target(model, Target(macs=0.5, allocation="sensitivity"),
                            example_inputs=(x,), data=calibration_batches)

YAML step: ``- prune.auto: {speedup: 2.0}``. The result carries the pruning record (reload with
``load_pruned``) and, under ``record["target"]``, what was asked, what was reached and the widths.
"""

from __future__ import annotations

import copy
import math
import tempfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field, model_validator
from torch import nn

from slimkit.core.config import Config
from slimkit.core.data import collect_batches
from slimkit.core.machine import channel_multiple
from slimkit.core.registry import METHODS
from slimkit.core.scope import Scope
from slimkit.core.verbs import eval_mode
from slimkit.errors import ConfigError
from slimkit.prune.channel import (
    Channel,
    ChannelPlan,
    _as_inputs,
    apply_slices,
    eligible_groups,
    group_key,
    prune_channels,
    pruning_record,
    set_record,
)
from slimkit.prune.depgraph import Group
from slimkit.prune.importance import group_importance


class Target(Config):
    """Prune until the model reaches one target: one of ``macs``, ``params``, ``speedup``."""

    macs: float | None = Field(None, gt=0.0, le=1.0)  # fraction of the dense MACs to keep
    params: float | None = Field(None, gt=0.0, le=1.0)  # fraction of the dense parameters to keep
    speedup: float | None = Field(None, ge=1.0)  # measured ORT speed-up over the dense model
    allocation: Literal["uniform", "sensitivity"] = "uniform"
    # criterion, scope, rounding: widths are multiples of the CPU's channel block by default
    # (core.machine.channel_multiple: 16 with AVX-512, else 8), since ORT's convolutions fall back
    # to a much slower path otherwise (MobileNetV2 at 50 % MACs, AVX2: 1.9x faster with multiples
    # of 8, 0.8x, i.e. slower than dense, with Torch-Pruning's widths)
    channel: Channel = Field(
        default_factory=lambda: Channel(ratio=0.0, round_to=channel_multiple())
    )
    min_keep: float = Field(0.1, gt=0.0, le=1.0)  # no group keeps fewer than this fraction
    levels: int = Field(16, ge=2, le=64)  # widths tried per group by the sensitivity allocation
    calibration_batches: int = Field(2, ge=1)  # batches of `data` the sensitivity reads
    tolerance: float = Field(0.1, ge=0.0)  # speed-up search stops within target * (1 + tolerance)
    search_steps: int = Field(8, ge=1)  # latency measurements the speed-up search may take
    batch: int = Field(1, ge=1)  # batch size the latency is measured at
    hw: str | None = None  # with speedup: predict on this hardware profile instead of measuring

    @model_validator(mode="after")
    def _one_target(self) -> Target:
        set_ = [k for k in ("macs", "params", "speedup") if getattr(self, k) is not None]
        if len(set_) != 1:
            raise ValueError(
                f"give exactly one of macs, params, speedup (got {set_ or 'none'}); "
                "e.g. Target(macs=0.5) or Target(speedup=2.0)"
            )
        return self

    @model_validator(mode="before")
    @classmethod
    def _hw_block(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("hw") is not None and "channel" not in data:
            # predicting for another device: this CPU's channel block says nothing about it
            data = {**data, "channel": Channel(ratio=0.0, round_to=8)}
        return data


@dataclass
class CostModel:
    """Cost (MACs or params) of the model as a function of each group's kept fraction."""

    total: float
    fixed: float
    terms: list[tuple[float, tuple[int, ...]]] = field(default_factory=list)

    def __call__(self, keep: dict[int, float]) -> float:
        var = sum(c * math.prod(keep.get(g, 1.0) for g in gids) for c, gids in self.terms)
        return (self.fixed + var) / self.total


def cost_model(
    model: nn.Module, inputs: tuple[torch.Tensor, ...], groups: list[Group], what: str
) -> CostModel:
    from slimkit.analyze.profile import profile_model

    prof = profile_model(model, inputs)
    touch: dict[str, set[int]] = {}
    heads: dict[str, set[int]] = {}
    for g in groups:
        for m in g.members:
            touch.setdefault(m.module, set()).add(g.gid)
            if g.kind == "head":
                parent = m.module.rpartition(".")[0]
                heads.setdefault(parent, set()).add(g.gid)
    model_ = CostModel(total=0.0, fixed=0.0)
    for row in prof.rows:
        c = float(row.macs if what == "macs" else row.params)
        if c <= 0:
            continue
        model_.total += c
        gids = touch.get(row.scope) or heads.get(row.scope)
        if gids:
            model_.terms.append((c, tuple(sorted(gids))))
        else:
            model_.fixed += c
    if model_.total <= 0:
        raise ConfigError(
            f"the model has no {what} slimkit can count", fix="use another target (speedup)"
        )
    return model_


def _width(g: Group, frac: float, cfg: Target) -> int:
    n = max(1, round(g.units * frac), math.ceil(g.units * cfg.min_keep))
    if g.kind == "channel":
        # a group narrower than two blocks rounds to half a block (and so on), so that a 16-wide
        # layer can still be pruned when the CPU's block is 16
        rt = cfg.channel.round_to
        while rt > 1 and g.units < 2 * rt:
            rt //= 2
        n = max(n, cfg.channel.min_channels)
        n = math.ceil(n / rt) * rt if rt > 1 else n
    return min(g.units, n)


def _levels(g: Group, cfg: Target) -> list[int]:
    """Candidate widths of a group, widest first (its full width included)."""
    ws = {_width(g, 1 - k / cfg.levels, cfg) for k in range(cfg.levels)}
    return sorted(ws, reverse=True)


def output_tensors(model: nn.Module, batches: Sequence[tuple[Any, ...]]) -> list[torch.Tensor]:
    """The model's (first) output tensor for each batch, as float."""
    outs = []
    with torch.no_grad():
        for b in batches:
            o = model(*b)
            o = o[0] if isinstance(o, (tuple, list)) else getattr(o, "logits", o)
            outs.append(o.detach().float())
    return outs


def distortion(
    model: nn.Module, batches: Sequence[tuple[Any, ...]], ref: list[torch.Tensor]
) -> float:
    """Relative squared error of the model's outputs against ``ref`` (1 / SQNR)."""
    outs = output_tensors(model, batches)
    num = sum(float((o - r).pow(2).sum()) for o, r in zip(outs, ref, strict=True))
    den = sum(float(r.pow(2).sum()) for r in ref)
    return num / max(den, 1e-12)


class _Pruner:
    """Prunes copies of one model to given widths without re-tracing it every time."""

    def __init__(self, model: nn.Module, inputs: tuple[torch.Tensor, ...], cfg: Target,
                 scope: Scope | None) -> None:  # fmt: skip
        self.model, self.inputs, self.cfg, self.scope = model, inputs, cfg, scope
        self.graph, self.groups = eligible_groups(model, inputs, cfg.channel, scope=scope)
        gen = torch.Generator().manual_seed(cfg.channel.seed)
        # thinet ranks from data when the final prune runs; the allocation's trial prunes use l1
        crit = "l1" if cfg.channel.criterion == "thinet" else cfg.channel.criterion
        if crit == "taylor":
            raise ConfigError(
                "criterion 'taylor' is not available for automatic ratios",
                fix="use l1, l2, bn, fpgm or random in Target(channel=Channel(criterion=...))",
            )
        self.order = {
            g.gid: torch.argsort(
                group_importance(model, g, crit, generator=gen), stable=True
            ).tolist()
            for g in self.groups
        }

    def apply(self, widths: dict[int, int]) -> nn.Module:
        plan = ChannelPlan(self.graph)
        for g in self.groups:
            n = widths.get(g.gid, g.units)
            if n < g.units:
                plan.remove[g.gid] = sorted(self.order[g.gid][: g.units - n])
        out = copy.deepcopy(self.model)
        apply_slices(out, plan.slices(out))
        return out


def _allocate_uniform(p: _Pruner, cost: CostModel, target: float, cfg: Target) -> dict[int, int]:
    lo, hi = cfg.min_keep, 1.0
    for _ in range(30):
        mid = (lo + hi) / 2
        keep = {g.gid: _width(g, mid, cfg) / g.units for g in p.groups}
        if cost(keep) > target:
            hi = mid
        else:
            lo = mid
    return {g.gid: _width(g, lo, cfg) for g in p.groups}


def sensitivity_table(
    p: _Pruner, batches: Sequence[tuple[Any, ...]], cfg: Target
) -> dict[int, list[tuple[int, float]]]:
    """For each group: (width, output distortion when only that group is pruned to it)."""
    ref = output_tensors(p.model, batches)
    table: dict[int, list[tuple[int, float]]] = {}
    for g in p.groups:
        rows, worst = [], 0.0
        for w in _levels(g, cfg):
            d = 0.0 if w == g.units else distortion(p.apply({g.gid: w}), batches, ref)
            worst = max(worst, d)  # monotone: a narrower layer never counts as better
            rows.append((w, worst))
        table[g.gid] = rows
    return table


def _allocate_sensitivity(
    p: _Pruner, cost: CostModel, target: float, table: dict[int, list[tuple[int, float]]]
) -> dict[int, int]:
    idx = {g.gid: 0 for g in p.groups}
    units = {g.gid: g.units for g in p.groups}

    def keep() -> dict[int, float]:
        return {gid: table[gid][i][0] / units[gid] for gid, i in idx.items()}

    current = cost(keep())
    while current > target:
        best: tuple[float, int] | None = None
        for gid, i in idx.items():
            if i + 1 >= len(table[gid]):
                continue
            trial = keep()
            trial[gid] = table[gid][i + 1][0] / units[gid]
            saved = current - cost(trial)
            if saved <= 0:
                continue
            score = (table[gid][i + 1][1] - table[gid][i][1]) / saved
            if best is None or score < best[0]:
                best = (score, gid)
        if best is None:
            break
        idx[best[1]] += 1
        current = cost(keep())
    return {gid: table[gid][i][0] for gid, i in idx.items()}


def measure_speedup(dense: nn.Module, small: nn.Module, inputs: tuple[torch.Tensor, ...],
                    runs: int = 30) -> tuple[float, float, float]:  # fmt: skip
    """``(speed-up, dense ms, small ms)`` of ``small`` over ``dense``, both exported to ONNX and
    timed in ORT fp32 in the same interleaved rounds (medians)."""
    from slimkit.analyze.latency import measure_latency, ort_runner
    from slimkit.export.onnx import export_onnx
    from slimkit.export.ort import ort_session

    with tempfile.TemporaryDirectory() as tmp:
        runners = {}
        for name, m in (("dense", dense), ("pruned", small)):
            path = Path(tmp) / f"{name}.onnx"
            export_onnx(m, path, example_inputs=inputs, check=False)
            runners[name] = ort_runner(ort_session(path), list(inputs))
        stats = measure_latency(runners, runs=runs, warmup=5, rounds=3)
    d, s = stats["dense"].median_ms, stats["pruned"].median_ms
    return d / s, d, s


def _predictor(
    dense: nn.Module, inputs: tuple[torch.Tensor, ...], hw: str
) -> Callable[..., tuple[float, float, float]]:
    """Speed-up predicted by the roofline on hardware profile ``hw`` (no measurement)."""
    from slimkit.analyze.hardware import load_profile
    from slimkit.analyze.profile import profile_model
    from slimkit.analyze.roofline import roofline

    prof = load_profile(hw)
    base = roofline(profile_model(dense, inputs), prof).total_s * 1e3

    def speed(
        _: nn.Module, small: nn.Module, x: tuple[torch.Tensor, ...]
    ) -> tuple[float, float, float]:
        ms = roofline(profile_model(small, x), prof).total_s * 1e3
        return base / ms, base, ms

    return speed


@METHODS.register(
    "prune.auto",
    config=Target,
    summary="per-layer ratios toward a MAC/latency target",
    example={"macs": 0.6},
    unsupported={"lstm": "nothing in it is prunable: the dependency graph does not follow LSTMs"},
)
def prune_to_target(
    model: nn.Module,
    target: Target,
    *,
    example_inputs: Sequence[torch.Tensor] | torch.Tensor,
    data: Iterable[Any] | None = None,
    scope: Scope | None = None,
    on_step: Callable[[str], None] | None = None,
) -> nn.Module:
    """A pruned copy of ``model`` that reaches ``target`` (see the module docstring). ``model``
    is run in eval mode and left as it was, train/eval flags included."""
    with eval_mode(model):
        return _prune_to_target(model, target, _as_inputs(example_inputs), data, scope, on_step)


def _prune_to_target(
    model: nn.Module,
    target: Target,
    inputs: tuple[torch.Tensor, ...],
    data: Iterable[Any] | None,
    scope: Scope | None,
    on_step: Callable[[str], None] | None,
) -> nn.Module:
    p = _Pruner(model, inputs, target, scope)
    if not p.groups:
        raise ConfigError(
            "nothing in this model can be pruned with these settings",
            fix="check graph.summary() from build_depgraph, or widen the scope",
        )
    what = "params" if target.params is not None else "macs"
    cost = cost_model(model, inputs, p.groups, what)
    table = None
    if target.allocation == "sensitivity":
        if data is None:
            raise ConfigError(
                "allocation 'sensitivity' needs calibration data",
                fix="pass data= (batches of inputs), or use allocation='uniform'",
            )
        batches = collect_batches(
            data, what="calibration data", n_inputs=len(inputs), limit=target.calibration_batches
        )
        table = sensitivity_table(p, [b.args for b in batches], target)

    def allocate(t: float) -> dict[int, int]:
        if table is not None:
            return _allocate_sensitivity(p, cost, t, table)
        return _allocate_uniform(p, cost, t, target)

    report: dict[str, Any] = {"target": target.to_dict()}
    if target.speedup is None:
        goal = float(target.macs if target.macs is not None else target.params)  # type: ignore[arg-type]
        widths = allocate(goal)
        report["predicted_cost"] = round(cost({g: widths[g] / u for g, u in _units(p)}), 4)
    else:
        lo, hi, best = 0.0, 1.0, None
        tried = []
        speed = measure_speedup if target.hw is None else _predictor(model, inputs, target.hw)
        for _ in range(target.search_steps):
            t = (lo + hi) / 2
            widths = allocate(t)
            sp, d_ms, s_ms = speed(model, p.apply(widths), inputs)
            tried.append({"macs": round(t, 4), "speedup": round(sp, 3), "ms": round(s_ms, 4)})
            if on_step:
                on_step(f"MAC budget {t:.3f}: {sp:.2f}x ({d_ms:.3f} -> {s_ms:.3f} ms)")
            if sp >= target.speedup:
                best, lo = (t, widths, sp), t
                if sp <= target.speedup * (1 + target.tolerance):
                    break
            else:
                hi = t
        if best is None:
            raise ConfigError(
                f"no pruning within min_keep={target.min_keep} reached a {target.speedup}x "
                f"speed-up on this machine (best tried: {max(x['speedup'] for x in tried):.2f}x)",
                fix="lower the target (--target-speedup, Target(speedup=...)), let groups shrink "
                "further (Python: Target(min_keep=0.05); in a recipe: prune.auto: {min_keep: "
                "0.05}), or combine pruning with int8 quantization",
            )
        widths = best[1]
        key = "measured_speedup" if target.hw is None else f"predicted_speedup_on_{target.hw}"
        report.update({key: round(best[2], 3), "search": tried})
    keys = {g.gid: group_key(g) for g in p.groups}
    # one plan through prune_channels so the record is the usual one (and composes with others)
    small = prune_channels(model, target.channel, example_inputs=inputs, scope=scope, data=data,
                           widths={keys[g]: w for g, w in widths.items()})  # fmt: skip
    record = pruning_record(small) or {}
    report["widths"] = {keys[g]: [u, widths[g]] for g, u in _units(p)}
    # the record names the method that ran and its own config (sk.report rebuilds it); the
    # channel pruning it ran through keeps its config beside
    set_record(small, {**record, "method": "prune.auto", "config": target.to_dict(),
                       "channel_config": record.get("config"), "auto": report})  # fmt: skip
    return small


def _units(p: _Pruner) -> list[tuple[int, int]]:
    return [(g.gid, g.units) for g in p.groups]
