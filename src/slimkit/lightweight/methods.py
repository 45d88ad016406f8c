"""The registered methods ``lightweight.separable`` and ``lightweight.ghost``: replace the standard
kxk convolutions of a model with lightweight blocks (``blocks``), initialised from the original
kernels, then (``epochs > 0``) recover accuracy by distillation from the original model.

    small = sk.lighten(model, "separable")                          # init only: a rough copy
    small = sk.lighten(model, sk.lightweight.Separable(epochs=2), data=train)   # + distillation
    small = sk.lighten(model, "ghost", data=train, epochs=2)
    print(sk.report(small).summary())       # per layer: shape, params before/after, kernel error

YAML steps: ``- lightweight.separable: {epochs: 2}``, ``- lightweight.ghost: {ratio: 2}``.
Supported layers: ``nn.Conv2d`` with ``groups=1``, a kernel larger than 1x1 and at least
``min_in_channels`` input channels (the RGB stem is kept by default); other layers are kept,
with the reason in the record. Distillation (``epochs``) reads ``data``: batches of inputs, or
``(inputs, labels)`` (labels then add a cross-entropy term).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import torch
from pydantic import Field
from torch import nn
from torch.nn import functional as F

from slimkit.core.config import Config
from slimkit.core.data import collect_batches
from slimkit.core.registry import METHODS
from slimkit.core.scope import Scope, set_submodule
from slimkit.core.train import fit
from slimkit.errors import ConfigError
from slimkit.lightweight.artifact import RECORD
from slimkit.lightweight.blocks import GhostConv, separable


class _Lightweight(Config):
    min_in_channels: int = Field(4, ge=1)  # keep convs with fewer input channels (RGB stems)
    epochs: int = Field(0, ge=0)  # distillation from the original on data= (0: init only)
    lr: float = Field(1e-3, gt=0)
    temperature: float = Field(2.0, gt=0)
    max_steps: int | None = Field(None, ge=1)  # cap on distillation steps


class Separable(_Lightweight):
    """kxk conv -> depthwise kxk (``multiplier`` per input channel) + pointwise 1x1."""

    multiplier: int = Field(1, ge=1)  # depthwise filters per input channel (SVD rank)


class Ghost(_Lightweight):
    """kxk conv -> primary kxk conv to out/ratio channels + cheap depthwise 3x3 for the rest."""

    ratio: int = Field(2, ge=2)  # out channels / primary channels


@dataclass
class LightweightReport:
    """Per converted conv: its weight shape, the block, parameters before/after and the relative
    error of the initial fit (separable: of the kernel); the layers kept and why; distillation."""

    method: str
    layers: list[dict[str, Any]] = field(default_factory=list)
    kept: list[dict[str, str]] = field(default_factory=list)
    recovery: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"layers": self.layers, "kept": self.kept, "recovery": self.recovery}

    def summary(self) -> str:
        b = sum(r["params"][0] for r in self.layers)
        a = sum(r["params"][1] for r in self.layers)
        lines = [f"{self.method}: {len(self.layers)} conv(s) converted, params {b:,} -> {a:,}"]
        lines += [f"{r['name']} {tuple(r['shape'])} -> {r['block']}" for r in self.layers]
        lines += [f"kept {k['name']}: {k['reason']}" for k in self.kept]
        return "\n  ".join(lines)


def _params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def _why_not(m: nn.Conv2d, cfg: Config) -> str | None:
    if m.groups != 1:
        return f"grouped (groups={m.groups})"
    if tuple(m.kernel_size) == (1, 1):
        return "1x1: already pointwise"
    if m.in_channels < cfg.min_in_channels:  # type: ignore[attr-defined]
        return f"{m.in_channels} input channels < min_in_channels"
    if isinstance(cfg, Ghost) and m.out_channels % cfg.ratio:
        return f"out channels {m.out_channels} not a multiple of ratio {cfg.ratio}"
    return None


def convert(
    model: nn.Module, cfg: Separable | Ghost, method: str, scope: Scope | None = None
) -> tuple[nn.Module, LightweightReport]:
    """A copy of ``model`` with its eligible convs replaced (no training)."""
    out = copy.deepcopy(model)
    report = LightweightReport(method)
    replays: list[dict[str, Any]] = []
    chosen = (scope or Scope()).select(out, [nn.Conv2d])
    for name, conv in chosen:
        assert isinstance(conv, nn.Conv2d)
        reason = _why_not(conv, cfg)
        if reason is not None:
            report.kept.append({"name": name, "reason": reason})
            continue
        block: nn.Module
        replay: dict[str, Any]  # what lightweight.json records: enough to rebuild the block
        if isinstance(cfg, Separable):
            block, err = separable(conv, cfg.multiplier)
            kind = f"depthwise {conv.kernel_size[0]}x{conv.kernel_size[1]} x{cfg.multiplier} + 1x1"
            replay = {"block": "separable", "multiplier": cfg.multiplier}
        else:
            block = GhostConv(conv, cfg.ratio)
            w = conv.weight.detach()
            order = block.order
            prim = block.primary.weight.detach()
            cheap = block.cheap.weight.detach()[:, 0, 1, 1]
            per = cheap.numel() // prim.shape[0]
            cat = torch.cat([prim, prim.repeat_interleave(per, 0) * cheap[:, None, None, None]])
            rebuilt = cat[order]
            err = float((rebuilt - w).norm() / w.norm().clamp_min(1e-30))
            kind = f"ghost ratio {cfg.ratio}"
            replay = {"block": "ghost", "ratio": cfg.ratio}
        set_submodule(out, name, block)
        report.layers.append({
            "name": name, "type": "Conv2d", "shape": list(conv.weight.shape), "block": kind,
            "params": [_params(conv), _params(block)], "rel_error": round(err, 4),
        })  # fmt: skip
        replays.append({"name": name, "type": "Conv2d", "shape": list(conv.weight.shape),
                        **replay})  # fmt: skip
    prior = dict(model.__dict__.get(RECORD) or {})  # an earlier conversion of other layers
    out.__dict__[RECORD] = {"method": method, "config": cfg.to_dict(),
                            "layers": [*prior.get("layers", []), *replays]}  # fmt: skip
    return out, report


def distill_from(
    student: nn.Module,
    teacher: nn.Module,
    data: Any,
    *,
    epochs: int,
    lr: float,
    temperature: float = 2.0,
    max_steps: int | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Train ``student`` in place to match ``teacher``'s softened outputs on ``data`` (plus
    cross-entropy with the labels of ``(inputs, labels)`` batches); returns what was run."""
    if isinstance(data, torch.utils.data.DataLoader):
        batches: Any = data
    else:  # normalised: (inputs, labels) where the data has labels, else inputs
        batches = [b.args[0] if b.target is None else (b.args[0], b.target)
                   for b in collect_batches(data)]  # fmt: skip
    teacher = copy.deepcopy(teacher).eval()
    t = temperature

    def loss_fn(model: nn.Module, batch: Any) -> torch.Tensor:
        x, y = batch if isinstance(batch, list | tuple) else (batch, None)
        with torch.no_grad():
            ref = teacher(x)
        out = model(x)
        kd = F.kl_div(F.log_softmax(out / t, -1), F.softmax(ref / t, -1), reduction="batchmean")
        loss = kd * t * t
        if isinstance(y, torch.Tensor) and y.dtype == torch.long and y.shape == out.shape[:1]:
            loss = loss + F.cross_entropy(out, y)
        return loss

    res = fit(student, batches, loss_fn=loss_fn, epochs=epochs, lr=lr, weight_decay=5e-4,
              max_steps=max_steps, progress=progress, description="distill")  # fmt: skip
    return {"epochs": epochs, "steps": res.steps, "lr": lr, "temperature": t}


def _run(
    model: nn.Module, cfg: Separable | Ghost, method: str, scope: Scope | None, data: Any,
    progress: bool,
) -> tuple[nn.Module, LightweightReport]:  # fmt: skip
    if cfg.epochs > 0 and data is None:
        raise ConfigError(
            f"{method} with epochs={cfg.epochs} distils from the original model and needs data=",
            fix="pass data=... (training batches), or epochs=0 for the initialisation alone",
        )
    out, report = convert(model, cfg, method, scope)
    if cfg.epochs > 0 and report.layers:
        report.recovery = distill_from(out, model, data, epochs=cfg.epochs, lr=cfg.lr,
                                       temperature=cfg.temperature, max_steps=cfg.max_steps,
                                       progress=progress)  # fmt: skip
    return out.eval(), report


_UNSUPPORTED = {
    m: "has no kxk Conv2d to convert" for m in ("mlp", "transformer_block", "gpt_tiny", "lstm")
}


@METHODS.register(
    "lightweight.separable",
    config=Separable,
    summary="kxk convs -> depthwise-separable (SVD init), distilled from the original",
    aliases={"depthwise_separable": {}, "dws": {}},
    example={"epochs": 1, "max_steps": 2},
    unsupported=_UNSUPPORTED,
)
def lighten_separable(
    model: nn.Module,
    config: Separable | None = None,
    *,
    scope: Scope | None = None,
    data: Any = None,
    progress: bool = True,
) -> tuple[nn.Module, LightweightReport]:
    """A copy of ``model`` with its kxk convs as depthwise + pointwise pairs."""
    return _run(model, config or Separable(), "lightweight.separable", scope, data, progress)


@METHODS.register(
    "lightweight.ghost",
    config=Ghost,
    summary="kxk convs -> ghost modules (primary conv + cheap depthwise), distilled",
    aliases={"ghostnet": {}},
    example={"epochs": 1, "max_steps": 2},
    unsupported=_UNSUPPORTED,
)
def lighten_ghost(
    model: nn.Module,
    config: Ghost | None = None,
    *,
    scope: Scope | None = None,
    data: Any = None,
    progress: bool = True,
) -> tuple[nn.Module, LightweightReport]:
    """A copy of ``model`` with its kxk convs as ghost modules."""
    return _run(model, config or Ghost(), "lightweight.ghost", scope, data, progress)
