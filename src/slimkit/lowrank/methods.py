"""The registered methods ``lowrank.svd``, ``lowrank.tucker`` and ``lowrank.cp``: choose the layers,
their ranks (``rank``), factorise them (``modules``) and record what was done.

    small = sk.decompose(model, "svd")                              # energy 0.9, Linear + conv
    small = sk.decompose(model, sk.lowrank.SVD(params=0.1), example_inputs=(x,))
    small = sk.decompose(model, sk.lowrank.SVD(energy=0.99, data_aware=True), data=calib)
    fast = sk.decompose(model, sk.lowrank.Tucker(macs=0.5), example_inputs=(x,))  # convs
    fast = sk.decompose(model, sk.lowrank.CP(rank=0.25, spatial="separable"))
    print(sk.report(small).summary())   # per layer: shape, rank, params before/after, error

YAML steps: ``- lowrank.svd: {energy: 0.9}``, ``- lowrank.tucker: {vbmf: true}``,
``- lowrank.cp: {rank: 0.25}``. Papers: truncated SVD (Denton et al., "Exploiting linear structure
within convolutional networks", 2014; data-aware: Zhang et al., TPAMI 2016), Tucker-2 with VBMF
ranks (Kim et al., ICLR 2016), CP (Lebedev et al., ICLR 2015); see ``factorise``, ``vbmf``,
``whiten``. A ``macs`` budget needs ``example_inputs``, ``data_aware`` needs ``data``.

Supported layers: ``nn.Linear`` (svd) and ``nn.Conv1d/2d/3d`` with ``groups=1`` (svd: kxk -> 1x1;
tucker and cp: their chains, a 1x1 conv by svd). A layer is kept, with the reason in the record,
when it is grouped, when its weight is shared (tied), when its parent reads the weight itself
(``nn.MultiheadAttention``, ``nn.Transformer*Layer``), or when its factorisation would save less
than ``min_saving`` of its parameters or would add MACs; weighted layers of other types are named.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from pydantic import Field
from torch import nn

from slimkit.core.registry import METHODS
from slimkit.core.scope import Scope
from slimkit.core.verbs import eval_mode
from slimkit.errors import ConfigError, UnsupportedError
from slimkit.lowrank.modules import (
    CONVS,
    LAYERS,
    Kind,
    Layer,
    LowRank,
    Spatial,
    factorise,
    kernel_size,
)
from slimkit.lowrank.rank import Candidate, RankRule, allocate, curve, pick, rounded
from slimkit.lowrank.whiten import covariances, supports, whitener

RECORD = "_slimkit_lowrank"  # the record on a factorised module (read by the artifact writer)
_READS_WEIGHT = (nn.MultiheadAttention, nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)


class SVD(RankRule):
    """Truncated SVD: a Linear becomes two (in -> r -> out), a conv a kxk conv to r channels and
    a 1x1 conv."""

    layers: Literal["all", "linear", "conv"] = "all"  # which layer types to factorise
    data_aware: bool = False  # factorise W S (S: input covariance root on data=): output error


class Tucker(RankRule):
    """Tucker-2 of a conv kernel: 1x1 (in -> r_in), kxk core (r_in -> r_out), 1x1 (r_out -> out)."""

    hooi_iters: int = Field(2, ge=0)  # HOOI sweeps after HOSVD (0: plain HOSVD)


class CP(RankRule):
    """CP of a conv kernel: 1x1 (in -> R), depthwise kxk (or kx1 then 1xk), 1x1 (R -> out)."""

    spatial: Literal["full", "separable"] = "full"  # depthwise kxk, or kx1 then 1xk (Conv2d)
    als_iters: int = Field(50, ge=1)  # ALS sweeps of the final fit (the rank search uses 25)


@dataclass
class LowRankReport:
    """What a decomposition did: per factorised layer its shape, kind, rank, parameters and MACs
    before/after and relative reconstruction error; the layers kept and why."""

    method: str
    rule: str
    layers: list[dict[str, Any]] = field(default_factory=list)
    kept: list[dict[str, str]] = field(default_factory=list)
    budget: dict[str, float] | None = None
    output_sqnr_db: float | None = None

    def to_dict(self) -> dict[str, Any]:
        before = sum(r["params"][0] for r in self.layers)
        after = sum(r["params"][1] for r in self.layers)
        return {
            "rule": self.rule,
            "layers": self.layers,
            "kept": self.kept,
            "factorised_params": [before, after],
            "budget": self.budget,
            "output_sqnr_db": self.output_sqnr_db,
        }

    def summary(self) -> str:
        d = self.to_dict()
        b, a = d["factorised_params"]
        head = f"{self.method} ({self.rule}): {len(self.layers)} layer(s) factorised" + (
            f", their params {b:,} -> {a:,} ({a / b:.0%})" if b else ""
        )
        if self.output_sqnr_db is not None:
            head += f", output SQNR {self.output_sqnr_db:.1f} dB on the example inputs"
        lines = [head]
        for r in self.layers:
            lines.append(
                f"{r['name']} ({r['type']}, weight {tuple(r['shape'])}): {r['kind']} rank "
                f"{r['rank']}, params {r['params'][0]:,} -> {r['params'][1]:,}, "
                f"error {r['rel_error']:.3f}"
            )
        lines += [f"kept {k['name']}: {k['reason']}" for k in self.kept]
        return "\n  ".join(lines)


def _owners(model: nn.Module) -> tuple[dict[int, list[str]], dict[int, nn.Module]]:
    """Every name of each module (a module may sit at several), and each module's parent."""
    names: dict[int, list[str]] = {}
    parent: dict[int, nn.Module] = {}
    for name, m in model.named_modules(remove_duplicate=False):
        names.setdefault(id(m), []).append(name)
        for child in m.children():
            parent.setdefault(id(child), m)
    return names, parent


def _candidates(
    model: nn.Module, types: tuple[type[nn.Module], ...], scope: Scope | None
) -> tuple[list[tuple[str, Layer]], list[dict[str, str]]]:
    """Layers of exactly ``types`` in scope that can be factorised, and those kept (why)."""
    pool = (
        scope.select(model, types)
        if scope is not None
        else [(n, m) for n, m in model.named_modules() if n and isinstance(m, types)]
    )
    names, parent = _owners(model)
    holders: dict[int, list[str]] = {}  # parameter -> the modules holding it
    for n, m in model.named_modules():
        for p in m.parameters(recurse=False):
            holders.setdefault(id(p), []).append(n)
    inside = {id(m) for lr in model.modules() if isinstance(lr, LowRank) for m in lr.modules()}
    chosen: list[tuple[str, Layer]] = []
    kept: list[dict[str, str]] = []
    for name, m in pool:
        if type(m) not in types or id(m) in inside:
            continue  # a subclass (its forward may differ) or a factor of an earlier pass
        assert isinstance(m, LAYERS)
        reason = None
        if isinstance(m, CONVS) and m.groups != 1:
            reason = f"grouped conv (groups={m.groups}): not factorised"
        elif isinstance(parent.get(id(m)), _READS_WEIGHT):
            reason = f"its parent {type(parent[id(m)]).__name__} reads the weight directly"
        elif len(holders[id(m.weight)]) > 1:
            tied = [h for h in holders[id(m.weight)] if h != name]
            reason = f"weight shared with {tied} (tied): factorising would untie it"
        elif not m.weight.is_floating_point():
            reason = f"{m.weight.dtype} weight"
        if reason:
            kept.append({"name": name, "reason": reason})
        else:
            chosen.append((name, m))
    if scope is None:  # say which weighted layers of other types were not considered
        other: dict[str, list[str]] = {}
        for n, m in model.named_modules():
            w = getattr(m, "weight", None)
            own = isinstance(w, nn.Parameter) and w.dim() >= 2 and not isinstance(m, LAYERS)
            if own and id(m) not in inside and not isinstance(m, nn.Embedding):
                other.setdefault(type(m).__name__, []).append(n)
        for t, ns in other.items():
            kept.append({"name": ", ".join(ns[:3]) + (f" (+{len(ns) - 3})" if len(ns) > 3 else ""),
                         "reason": f"{t} is not a layer type this method factorises"})  # fmt: skip
    return chosen, kept


def _positions(
    model: nn.Module, layers: list[tuple[str, Layer]], example: tuple[torch.Tensor, ...]
) -> dict[str, tuple[int, int, int]]:
    """Per layer (input, kx1-middle, output) positions per sample, from one forward pass."""
    seen: dict[str, tuple[int, int, int]] = {}

    def hook(name: str) -> Any:
        def fn(m: nn.Module, args: tuple[Any, ...], out: torch.Tensor) -> None:
            if name in seen or not args or not isinstance(args[0], torch.Tensor):
                return
            x = args[0]
            if isinstance(m, nn.Linear):
                n = x.numel() // max(x.shape[0] * x.shape[-1], 1) if x.dim() > 1 else 1
                seen[name] = (n, n, n)
            else:
                nd = len(m.kernel_size)  # type: ignore[arg-type]
                pin, pout = x.shape[-nd:].numel(), out.shape[-nd:].numel()
                mid = out.shape[-nd] * (x.shape[-1] if nd > 1 else 1)  # H_out x W_in
                seen[name] = (pin, mid, pout)

        return fn

    handles = [m.register_forward_hook(hook(n)) for n, m in layers]
    try:
        with torch.no_grad():
            model(*example)
    finally:
        for h in handles:
            h.remove()
    return seen


def decompose(
    model: nn.Module,
    cfg: RankRule,
    method: str,
    kind: Kind,
    types: tuple[type[nn.Module], ...],
    scope: Scope | None,
    example_inputs: tuple[torch.Tensor, ...] | None,
    data: Any = None,
) -> tuple[nn.Module, LowRankReport]:
    """The shared body of the three methods (see the module docstring)."""
    aware = bool(getattr(cfg, "data_aware", False))
    if aware and data is None:
        raise ConfigError(
            f"{method} with data_aware: true needs data",
            fix="pass data=... (a few batches of the model's inputs), or data_aware: false",
        )
    out = copy.deepcopy(model)
    report = LowRankReport(method, cfg.rule + (", data-aware" if aware else ""))
    with eval_mode(out):
        layers, report.kept = _candidates(out, types, scope)
        pos = _positions(out, layers, example_inputs) if example_inputs is not None else {}
        covs = covariances(out, {n: m for n, m in layers if supports(m)}, data) if aware else {}
    if cfg.macs is not None and example_inputs is None:
        raise ConfigError(
            f"{method} with a macs budget needs example_inputs",
            fix="pass example_inputs=(x,) (or data=...), or use params: instead",
        )
    spatial: Spatial = getattr(cfg, "spatial", "full")
    iters = int(getattr(cfg, "als_iters", 0) or getattr(cfg, "hooi_iters", 0))
    cands = []
    for name, m in layers:
        k = "svd" if kind != "svd" and kernel_size(m) == 1 else kind  # a 1x1 conv: svd
        if cfg.macs is not None and name not in pos:
            report.kept.append({"name": name, "reason": "not run on the example inputs"})
            continue
        white = whitener(covs[name]) if name in covs else None
        if aware and white is None:
            report.kept.append({"name": name, "reason": "data-aware needs Linear / Conv1d / "
                                "Conv2d with zero padding: plain SVD"})  # fmt: skip
        cands.append(Candidate(name, m, k, spatial, pos.get(name), white))
    ranks: dict[str, list[int] | None]
    if cfg.params is not None or cfg.macs is not None:
        key = "params" if cfg.params is not None else "macs"
        budget = float(cfg.params if cfg.params is not None else cfg.macs)  # type: ignore[arg-type]
        opts = {c.name: curve(c, iters=min(iters, 25) or 25, round_to=cfg.round_to) for c in cands}
        ranks, total, reached = allocate(cands, opts, budget, key)
        report.budget = {"key": key, "fraction": budget, "original": total, "reached": reached}  # type: ignore[dict-item]
    else:
        ranks = {c.name: rounded(c, pick(c, cfg, iters=25), cfg.round_to) for c in cands}
    names, _ = _owners(out)
    for c in cands:
        rank = ranks[c.name]
        (p0, m0), (p1, m1) = c.cost(None), c.cost(rank) if rank else (None, None)
        why = _not_worth(rank, p0, p1, m0, m1, cfg.min_saving)
        if why:
            report.kept.append({"name": c.name, "reason": why})
            continue
        assert rank is not None
        new, err = factorise(c.layer, c.kind, rank, spatial=c.spatial, iters=iters, whiten=c.whiten)
        new.train(c.layer.training)
        for n in names[id(c.layer)]:
            parent, _, attr = n.rpartition(".")
            setattr(out.get_submodule(parent), attr, new)
        row: dict[str, Any] = {
            "name": c.name,
            "type": type(c.layer).__name__,
            "shape": list(c.layer.weight.shape),
            "kind": c.kind,
            "rank": rank,
            "params": [p0, p1],
            "rel_error": round(err, 6),
        }
        if new.spatial != "full":
            row["spatial"] = new.spatial
        if m0 is not None:
            row["macs"] = [m0, m1]
        report.layers.append(row)
    if isinstance(model, LAYERS):  # the root cannot be replaced in place
        reason = (f"the model is itself a {type(model).__name__}: wrap it (nn.Sequential(layer)) "
                  "or call slimkit.lowrank.factorise(layer, kind, rank)")  # fmt: skip
        report.kept.append({"name": "(model)", "reason": reason})
    elif not layers and not report.kept:
        what = "Linear or conv" if kind == "svd" else "conv"
        extra = "" if kind == "svd" else "; Linear layers: use lowrank.svd"
        report.kept.append({"name": "(model)", "reason": f"no {what} layer in scope{extra}"})
    if example_inputs is not None and report.layers:
        report.output_sqnr_db = _output_sqnr(model, out, example_inputs, report)
    prior = dict(model.__dict__.get(RECORD) or {})
    out.__dict__[RECORD] = {
        "method": method,
        "config": cfg.to_dict(),
        "layers": [*prior.get("layers", []), *report.layers],
    }
    return out, report


def _not_worth(
    rank: list[int] | None,
    p0: int,
    p1: int | None,
    m0: int | None,
    m1: int | None,
    min_saving: float,
) -> str | None:
    if rank is None:
        return "the budget was met without it"
    assert p1 is not None
    if p1 > (1 - min_saving) * p0:
        return f"rank {rank} would keep {p1:,} of {p0:,} params (saves less than {min_saving:.0%})"
    if m0 is not None and m1 is not None and m1 > m0:
        return f"rank {rank} would add MACs ({m0:,} -> {m1:,})"
    return None


def _floats(obj: Any) -> list[torch.Tensor]:
    """The floating tensors of a model output (a tensor, tuple, list, dict or ModelOutput)."""
    if isinstance(obj, torch.Tensor):
        return [obj.detach().flatten().double()] if obj.is_floating_point() else []
    items = obj.values() if isinstance(obj, dict) else obj if isinstance(obj, list | tuple) else []
    return [t for o in items for t in _floats(o)]


def _output_sqnr(
    model: nn.Module, out: nn.Module, x: tuple[torch.Tensor, ...], report: LowRankReport
) -> float | None:
    """SQNR (dB) of the factorised model's output against the original's on ``x``."""
    with eval_mode(model), eval_mode(out), torch.no_grad():
        ref = _floats(model(*x))
        try:
            got = _floats(out(*x))
        except Exception as e:
            names = [r["name"] for r in report.layers]
            raise UnsupportedError(
                f"the factorised {type(model).__name__} fails to run ({type(e).__name__}: {e}); "
                f"a module may read a factorised layer's weight directly (factorised: {names})",
                fix="exclude the layers that module uses: scope=sk.Scope(exclude=[...])",
            ) from None
    if not ref or len(ref) != len(got):
        return None
    r, g = torch.cat(ref), torch.cat(got)
    noise = float(((r - g) ** 2).sum())
    return round(10 * math.log10(float((r * r).sum()) / noise), 2) if noise > 0 else float("inf")


@METHODS.register(
    "lowrank.svd",
    config=SVD,
    summary="truncated SVD of Linear / conv layers into two smaller layers",
    aliases={"low_rank": {}},
    example={"rank": 0.25},
)
def decompose_svd(
    model: nn.Module,
    config: SVD | None = None,
    *,
    scope: Scope | None = None,
    example_inputs: tuple[torch.Tensor, ...] | None = None,
    data: Any = None,
) -> tuple[nn.Module, LowRankReport]:
    """A copy of ``model`` with its Linear (and groups=1 conv) layers factorised by SVD."""
    cfg = config or SVD()
    types: tuple[type[nn.Module], ...] = {"all": LAYERS, "linear": (nn.Linear,), "conv": CONVS}[
        cfg.layers
    ]
    return decompose(model, cfg, "lowrank.svd", "svd", types, scope, example_inputs, data)


@METHODS.register(
    "lowrank.tucker",
    config=Tucker,
    summary="Tucker-2 of conv kernels: 1x1 -> kxk core -> 1x1",
    aliases={"tucker2": {}},
    example={"rank": 0.5},
)
def decompose_tucker(
    model: nn.Module,
    config: Tucker | None = None,
    *,
    scope: Scope | None = None,
    example_inputs: tuple[torch.Tensor, ...] | None = None,
) -> tuple[nn.Module, LowRankReport]:
    """A copy of ``model`` with its groups=1 convs factorised by Tucker-2 (HOSVD + HOOI)."""
    cfg = config or Tucker()
    return decompose(model, cfg, "lowrank.tucker", "tucker", CONVS, scope, example_inputs)


@METHODS.register(
    "lowrank.cp",
    config=CP,
    summary="CP of conv kernels: 1x1 -> depthwise -> 1x1 (own CP-ALS)",
    aliases={"cp_als": {}},
    example={"rank": 0.5, "als_iters": 10},
)
def decompose_cp(
    model: nn.Module,
    config: CP | None = None,
    *,
    scope: Scope | None = None,
    example_inputs: tuple[torch.Tensor, ...] | None = None,
) -> tuple[nn.Module, LowRankReport]:
    """A copy of ``model`` with its groups=1 convs factorised by CP (ALS)."""
    cfg = config or CP()
    return decompose(model, cfg, "lowrank.cp", "cp", CONVS, scope, example_inputs)
