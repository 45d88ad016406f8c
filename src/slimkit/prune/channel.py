"""Structured channel pruning: remove whole channel groups and return a smaller ordinary module.

Each group of the dependency graph (``prune/depgraph.py``) is ranked by an importance criterion
(``prune/importance.py``); the lowest units are removed from every coupled parameter at once: conv
filters and the input columns that read them, BatchNorm entries, residual partners, concatenated
slices, flattened Linear columns, attention heads (q/k/v rows and ``out_proj`` columns). The result
is a plain ``nn.Module`` with physically smaller tensors that runs, exports to ONNX and reloads with
``load_pruned`` (the kept indices are recorded). Paper trail: Li et al., "Pruning Filters for
Efficient ConvNets", ICLR 2017; Fang et al., "DepGraph: Towards Any Structural Pruning", CVPR 2023.

    small = prune_channels(model, Channel(ratio=0.5, round_to=8), example_inputs=(x,))

YAML step: ``- prune.channel: {ratio: 0.5, criterion: l1, round_to: 8}``. Supports Conv1d/2d/3d
(plain, depthwise, and grouped: whole conv groups), Linear, Embedding, BatchNorm, LayerNorm,
GroupNorm (1 or C groups), PReLU, residual adds, concatenation (dense blocks), channel ``chunk`` and
GLU, flatten and reshape (channels-last into a Linear included), pooling and activations, attention
modules with q_proj/k_proj/v_proj/out_proj and a ``head_dim`` attribute, and self-attention
``nn.MultiheadAttention`` (replaced by the equal ``prune.mha.HeadAttention``, by heads). The
model's input channels and output width are never pruned; a layer slimkit cannot follow is refused
by name, never guessed.
"""

from __future__ import annotations

import copy
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from pydantic import Field
from torch import nn

from slimkit.core.config import Config
from slimkit.core.data import collect_batches
from slimkit.core.registry import METHODS
from slimkit.core.scope import Scope
from slimkit.core.verbs import eval_mode
from slimkit.errors import ConfigError, UnsupportedError
from slimkit.prune.depgraph import DepGraph, Group, build_depgraph
from slimkit.prune.hf_attention import sync_head_counts
from slimkit.prune.importance import Criterion, LossFn, group_importance, taylor_saliency
from slimkit.prune.mha import split_attention
from slimkit.prune.thinet import readers, refit, thinet_scores

_OUTPUT = "reaches the model output"
Slices = dict[str, dict[int, list[int]]]  # param name -> dim -> kept positions


class Channel(Config):
    """Remove a fraction of the units (channels, heads) of every prunable group."""

    ratio: float = Field(0.5, ge=0.0, lt=1.0)  # fraction of units removed (per group, or overall)
    ratios: dict[str, float] = Field(
        default_factory=dict
    )  # per layer: regex of a producer -> ratio
    criterion: Criterion = "l1"  # l1, l2, bn, taylor (needs data), fpgm, thinet (data), random
    global_ranking: bool = False  # rank units across all groups instead of within each
    round_to: int = Field(1, ge=1)  # kept channels rounded up to a multiple (8 suits SIMD)
    min_channels: int = Field(1, ge=1)  # never keep fewer channels than this in a group
    heads: bool = True  # prune attention heads too
    keep_normalized: bool = False  # keep widths a LayerNorm normalises (the residual stream)
    include: list[str] = Field(default_factory=list)  # Scope regexes of producer layers
    exclude: list[str] = Field(default_factory=list)  # Scope regexes of layers left untouched
    taylor_batches: int = Field(8, ge=1)  # batches of `data` read by criterion="taylor"
    thinet_batches: int = Field(4, ge=1)  # batches of `data` read by criterion="thinet"
    seed: int = 0  # for criterion="random"


@dataclass
class ChannelPlan:
    """The graph, and for each pruned group the units removed; ``slices`` is what reload replays."""

    graph: DepGraph
    remove: dict[int, list[int]] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)  # unprunable groups, with reasons
    notes: dict[str, Any] = field(default_factory=dict)  # what the criterion adds to the record

    def slices(self, model: nn.Module) -> Slices:
        removed: dict[str, dict[int, set[int]]] = {}
        for g in self.graph.groups:
            units = self.remove.get(g.gid, [])
            for m in g.members if units else []:
                removed.setdefault(m.fqn, {}).setdefault(m.dim, set()).update(m.positions(units))
        out: Slices = {}
        for fqn, dims in removed.items():
            owner, _, attr = fqn.rpartition(".")
            t = getattr(model.get_submodule(owner), attr)
            out[fqn] = {
                d: [i for i in range(t.shape[d]) if i not in gone] for d, gone in dims.items()
            }
        return out


def _merge(scope: Scope | None, cfg: Channel) -> Scope:
    if scope is None:
        return Scope(include=cfg.include, exclude=cfg.exclude)
    return Scope(
        include=[*scope.include, *cfg.include],
        exclude=[*scope.exclude, *cfg.exclude],
        types=scope.types,
    )


def _eligible(g: Group, model: nn.Module, scope: Scope, cfg: Channel) -> bool:
    if not g.prunable or (g.kind == "head" and not cfg.heads) or (g.lossy and cfg.keep_normalized):
        return False
    outs = g.modules("out")
    if not all(scope.matches(n, model.get_submodule(n)) for n in outs):
        return False
    excl = Scope(exclude=scope.exclude)
    return all(excl.matches(n, model.get_submodule(n)) for n in g.modules())


def _check_explicit(model: nn.Module, graph: DepGraph, scope: Scope) -> None:
    """A layer the user named in ``include`` that cannot be pruned is an error, not a no-op."""
    if not scope.include:
        return
    named = {n for n, _ in scope.select(model)}
    for name in sorted(named):
        groups = [g for g in graph.groups if name in g.modules("out")]
        bad = [r for g in groups for r in g.reasons if r != _OUTPUT]
        if groups and not any(g.prunable for g in groups) and bad:
            raise UnsupportedError(
                f"cannot prune the channels of {name!r}: {bad[0]}",
                fix=f"leave it out with Scope(exclude=[{name!r}]) (or rewrite that op)",
            )


def group_key(g: Group) -> str:
    """A name for a group that survives pruning: its first producing layer (and the kind)."""
    outs = g.modules("out")
    name = outs[0] if outs else f"#{g.gid}"
    return f"heads of {name}" if g.kind == "head" else name


def _ratio(g: Group, cfg: Channel) -> float:
    """``cfg.ratios``' first pattern matching one of the group's producers, else ``cfg.ratio``."""
    for pattern, r in cfg.ratios.items():
        if any(re.fullmatch(pattern, n) for n in g.modules("out")):
            return r
    return cfg.ratio


def _keep(g: Group, n_keep: int, cfg: Channel) -> int:
    if g.kind == "channel" and cfg.round_to > 1:
        n_keep = math.ceil(n_keep / cfg.round_to) * cfg.round_to
    floor = cfg.min_channels if g.kind == "channel" else 1
    return min(g.units, max(n_keep, floor))


def plan_channels(
    model: nn.Module,
    config: Channel | None = None,
    *,
    example_inputs: Sequence[torch.Tensor],
    data: Iterable[Any] | None = None,
    scope: Scope | None = None,
    loss_fn: LossFn | None = None,
    widths: Mapping[str, int] | None = None,
) -> ChannelPlan:
    """Which units of which groups ``prune_channels`` would remove (the model is not modified).

    ``widths`` (group key -> units kept, see :func:`group_key`) overrides the ratios for the groups
    it names: schedules and automatic ratios use it to ask for exact widths."""
    cfg = config or Channel()
    for pattern, r in cfg.ratios.items():
        if not 0 <= r < 1:
            raise ConfigError(
                f"ratios[{pattern!r}] = {r} is not in [0, 1)", fix="use a fraction like 0.5"
            )
    names = [n for n, _ in model.named_modules() if n]
    for pattern in cfg.ratios:  # a ratio whose pattern names no layer would be silently unused
        try:
            hit = any(re.fullmatch(pattern, n) for n in names)
        except re.error as e:
            raise ConfigError(f"ratios pattern {pattern!r} is not a valid regular expression ({e})",
                              fix=r"escape dots, e.g. 'layer1\.0\.conv1'") from None  # fmt: skip
        if not hit:
            from slimkit.core.registry import did_you_mean

            hint = did_you_mean(pattern, names)
            raise ConfigError(
                f"ratios pattern {pattern!r} matches no module of {type(model).__name__}",
                fix=f"{hint + ' ' if hint else ''}patterns match whole module names (regex), e.g. "
                f"{', '.join(names[:4])}",
            )
    graph = build_depgraph(model, tuple(example_inputs))
    sc = _merge(scope, cfg)
    _check_explicit(model, graph, sc)
    if sc.include or sc.exclude or sc.types:
        sc.select(model)  # a scope matching nothing is an error
    plan = ChannelPlan(
        graph, skipped=[f"{g.describe()}: {'; '.join(g.reasons)}" for g in graph.unprunable()]
    )
    groups = [g for g in graph.groups if _eligible(g, model, sc, cfg)]
    if widths is not None:
        unknown = sorted(set(widths) - {group_key(g) for g in groups})
        if unknown:
            raise ConfigError(
                f"widths names groups that are not prunable here: {unknown[:3]}",
                fix="use the keys of group_widths(model, example_inputs)",
            )
    if not groups or (cfg.ratio == 0 and not cfg.ratios and not widths):
        return plan
    saliency = None
    if cfg.criterion == "taylor":
        saliency = taylor_saliency(model, data or [], loss_fn, cfg.taylor_batches)
    gen = torch.Generator().manual_seed(cfg.seed)
    if cfg.criterion == "thinet":
        with eval_mode(model):
            batches = _thinet_batches(data, example_inputs, cfg)
            scores, fallback = thinet_scores(model, groups, batches)
        if fallback:
            plan.notes["thinet_by_l1"] = f"no Conv/Linear reads {'; '.join(fallback)}: ranked by l1"
        scores.update({g.gid: group_importance(model, g, "l1") for g in groups
                       if g.gid not in scores})  # fmt: skip
    else:
        scores = {
            g.gid: group_importance(model, g, cfg.criterion, saliency=saliency, generator=gen)
            for g in groups
        }
    if not cfg.global_ranking or widths:
        for g in groups:
            if widths and group_key(g) in widths:
                n_keep = max(1, min(g.units, widths[group_key(g)]))
            else:
                n_keep = _keep(g, g.units - int(g.units * _ratio(g, cfg)), cfg)
            order = torch.argsort(scores[g.gid], stable=True).tolist()
            plan.remove[g.gid] = sorted(order[: g.units - n_keep])
        plan.remove = {gid: r for gid, r in plan.remove.items() if r}
        return plan
    # global: compare scores normalised per group, remove the lowest until the ratio is reached
    flat = [
        (float(s / scores[g.gid].mean().clamp_min(1e-12)), g.gid, u)
        for g in groups
        for u, s in enumerate(scores[g.gid])
    ]
    budget = int(sum(g.units for g in groups) * cfg.ratio)
    by_id = {g.gid: g for g in groups}
    chosen: dict[int, list[int]] = {g.gid: [] for g in groups}
    for _, gid, u in sorted(flat):
        if budget <= 0:
            break
        g = by_id[gid]
        if g.units - len(chosen[gid]) - 1 >= (cfg.min_channels if g.kind == "channel" else 1):
            chosen[gid].append(u)
            budget -= 1
    for gid, units in chosen.items():
        g = by_id[gid]
        n_keep = _keep(g, g.units - len(units), cfg)
        order = [u for u in torch.argsort(scores[gid], stable=True).tolist() if u in units]
        if units:
            plan.remove[gid] = sorted(order[: g.units - n_keep])
    return plan


def _thinet_batches(data: Any, example_inputs: Sequence[torch.Tensor], cfg: Channel) -> list[Any]:
    if data is None:
        raise ConfigError(
            "criterion 'thinet' needs calibration data",
            fix="pass data=... (a few batches of the model's inputs; (x, y) batches are fine)",
        )
    return collect_batches(data, what="calibration data", n_inputs=len(example_inputs),
                           limit=cfg.thinet_batches)  # fmt: skip


def _fix_attributes(m: nn.Module) -> None:
    """Make a layer's width attributes agree with its (sliced) tensors."""
    if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        out, per_group = m.weight.shape[:2]
        if m.groups > 1 and m.groups == m.in_channels == m.out_channels:  # depthwise
            m.groups = m.in_channels = m.out_channels = out
        elif m.groups > 1:  # grouped: whole groups removed, per-group widths kept
            m.groups = out // (m.out_channels // m.groups)
            m.in_channels, m.out_channels = per_group * m.groups, out
        else:
            m.in_channels, m.out_channels = per_group, out
    elif isinstance(m, (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)):
        m.in_channels, per_group = m.weight.shape[:2]
        m.out_channels = per_group * m.groups
    elif isinstance(m, nn.Linear):
        m.out_features, m.in_features = m.weight.shape
    elif isinstance(m, nn.Embedding):
        m.embedding_dim = m.weight.shape[1]
    elif isinstance(m, nn.PReLU):
        m.num_parameters = m.weight.shape[0]
    elif isinstance(m, nn.modules.batchnorm._BatchNorm):
        ref = m.weight if m.weight is not None else m.running_mean
        assert ref is not None
        m.num_features = ref.shape[0]
    elif isinstance(m, nn.LayerNorm):
        m.normalized_shape = (m.weight.shape[0],)
    elif isinstance(m, nn.GroupNorm):
        if m.num_groups == m.num_channels:
            m.num_groups = m.weight.shape[0]
        m.num_channels = m.weight.shape[0]


def apply_slices(model: nn.Module, slices: Slices) -> nn.Module:
    """Keep only the listed positions of each tensor (in place) and fix the layers' widths."""
    touched = set()
    for fqn, dims in slices.items():
        owner, _, attr = fqn.rpartition(".")
        mod = model.get_submodule(owner)
        t = getattr(mod, attr)
        new = t.detach()
        for dim, kept in sorted(dims.items()):
            new = new.index_select(int(dim), torch.tensor(kept, dtype=torch.long))
        new = new.contiguous().clone()
        if isinstance(t, nn.Parameter):
            setattr(mod, attr, nn.Parameter(new, requires_grad=t.requires_grad))
        else:
            setattr(mod, attr, new)
        touched.add(owner)
    for owner in touched:
        _fix_attributes(model.get_submodule(owner))
    sync_head_counts(model, slices)
    return model


@METHODS.register(
    "prune.channel",
    config=Channel,
    summary="remove whole channels and heads",
    aliases={"structured": {}},
    example={"ratio": 0.5},
)
def prune_channels(
    model: nn.Module,
    config: Channel | None = None,
    *,
    example_inputs: Sequence[torch.Tensor] | torch.Tensor,
    data: Iterable[Any] | None = None,
    scope: Scope | None = None,
    loss_fn: LossFn | None = None,
    widths: Mapping[str, int] | None = None,
) -> nn.Module:
    """A smaller copy of ``model`` (the original is not modified); ``pruning_record(result)`` holds
    the kept indices per tensor, which ``save_pruned`` / ``load_pruned`` replay.

    Pruning an already pruned model composes the records, so the result still reloads into the
    original architecture (iterative schedules rely on this). ``widths`` asks for exact widths per
    group (see :func:`group_widths`)."""
    cfg = config or Channel()
    inputs = _as_inputs(example_inputs)
    out = copy.deepcopy(model)
    split = split_attention(out)  # nn.MultiheadAttention -> separate projections, by heads
    if split and not _still_runs(out, inputs):  # its forward reads the module's internals
        out, split = copy.deepcopy(model), []
    plan = plan_channels(
        out, cfg, example_inputs=inputs, data=data, scope=scope, loss_fn=loss_fn, widths=widths
    )
    slices = plan.slices(out)
    apply_slices(out, slices)
    out.zero_grad(set_to_none=True)
    if cfg.criterion == "thinet" and any(plan.remove.values()):
        plan.notes["thinet_refit"] = _thinet_refit(model, out, plan, slices, inputs, data, cfg)
    previous = pruning_record(model)
    if previous and previous.get("slices"):
        slices = compose_slices(_decode(previous["slices"]), slices)
    record = {
        "method": "prune.channel",
        "config": cfg.to_dict(),
        "slices": {k: {str(d): v for d, v in dims.items()} for k, dims in slices.items()},
        "skipped": plan.skipped,
        "capture": plan.graph.capture,  # how the dependency graph was traced
    }
    if previous and previous.get("dropped"):
        record["dropped"] = previous["dropped"]  # blocks dropped earlier (prune/blocks.py)
    record.update(plan.notes)
    split = [*(previous or {}).get("attention_split", []), *split]
    if split:
        record["attention_split"] = split  # load_pruned replays it before the slices
    if not any(plan.remove.values()):  # a verb that changes nothing says so, and why
        why = "; ".join(plan.skipped[:3]) + (f" (and {len(plan.skipped) - 3} more)"
                                             if len(plan.skipped) > 3 else "")  # fmt: skip
        record["nothing_removed"] = (
            f"every channel group was refused: {why}"
            if plan.skipped
            else "no prunable channel group (no Conv/Linear output feeds another layer)"
        )
        import warnings

        warnings.warn(f"prune.channel removed nothing: {record['nothing_removed']}", stacklevel=2)
    set_record(out, record)
    return out


def _still_runs(model: nn.Module, inputs: tuple[torch.Tensor, ...]) -> bool:
    try:
        with eval_mode(model), torch.no_grad():
            model(*inputs)
    except Exception:  # noqa: BLE001 - any failure: keep the original attention modules
        return False
    return True


def _thinet_refit(
    dense: nn.Module,
    out: nn.Module,
    plan: ChannelPlan,
    slices: Slices,
    inputs: tuple[torch.Tensor, ...],
    data: Any,
    cfg: Channel,
) -> list[str]:
    """Refit, by least squares, every layer ThiNet modelled whose input lost channels."""
    names = sorted({m.module for g in plan.graph.groups if plan.remove.get(g.gid)
                    for m in readers(dense, g)})  # fmt: skip
    kept = {n: slices[f"{n}.weight"][0] for n in names if 0 in slices.get(f"{n}.weight", {})}
    with eval_mode(dense), eval_mode(out):
        return refit(dense, out, names, kept, _thinet_batches(data, inputs, cfg))


def _as_inputs(example_inputs: Sequence[torch.Tensor] | torch.Tensor) -> tuple[torch.Tensor, ...]:
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    return tuple(example_inputs)


def _decode(raw: Mapping[str, Mapping[Any, Sequence[int]]]) -> Slices:
    return {k: {int(d): list(v) for d, v in dims.items()} for k, dims in raw.items()}


def compose_slices(first: Slices, then: Slices) -> Slices:
    """The slicing equal to applying ``first`` and then ``then`` (positions of the original)."""
    out: Slices = {k: dict(dims) for k, dims in first.items()}
    for fqn, dims in then.items():
        for d, kept in dims.items():
            before = out.get(fqn, {}).get(d)
            out.setdefault(fqn, {})[d] = [before[p] for p in kept] if before else list(kept)
    return out


def eligible_groups(
    model: nn.Module,
    example_inputs: Sequence[torch.Tensor] | torch.Tensor,
    config: Channel | None = None,
    *,
    scope: Scope | None = None,
) -> tuple[DepGraph, list[Group]]:
    """The dependency graph and the groups ``config`` (and ``scope``) allow pruning."""
    cfg = config or Channel()
    graph = build_depgraph(model, _as_inputs(example_inputs))
    sc = _merge(scope, cfg)
    _check_explicit(model, graph, sc)
    if sc.include or sc.exclude or sc.types:
        sc.select(model)
    return graph, [g for g in graph.groups if _eligible(g, model, sc, cfg)]


def group_widths(
    model: nn.Module,
    example_inputs: Sequence[torch.Tensor] | torch.Tensor,
    config: Channel | None = None,
    *,
    scope: Scope | None = None,
) -> dict[str, int]:
    """The current width (units) of every group that ``config`` would prune, by group key."""
    _, groups = eligible_groups(model, example_inputs, config, scope=scope)
    return {group_key(g): g.units for g in groups}


def set_record(model: nn.Module, record: dict[str, Any]) -> None:
    """Attach a pruning record as a plain attribute (the module stays an ordinary module)."""
    model.__dict__["_slimkit_pruning"] = record


def pruning_record(model: nn.Module) -> dict[str, Any] | None:
    """What ``prune_channels`` removed from ``model`` (kept positions per tensor), or None."""
    rec = getattr(model, "_slimkit_pruning", None)
    return rec if isinstance(rec, dict) else None
