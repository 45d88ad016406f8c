"""AMC-style automatic ratios: a policy-gradient agent picks each group's width under a MAC budget.

He et al., "AMC: AutoML for Model Compression and Acceleration on Mobile Devices", ECCV 2018,
train a DDPG agent layer by layer. This is the simpler policy-gradient variant the issue allows:
the policy is a Gaussian over the keep fraction of every prunable group (its mean starts at the
uniform allocation that meets the budget); each episode samples fractions, scales them until the
predicted MACs meet the budget (AMC's action projection, so every episode is feasible), prunes a
copy to those widths and scores it with a cheap accuracy proxy on the calibration batches: the
share of top-1 predictions that agree with the dense model, minus the relative output error.
REINFORCE with a running-mean baseline moves the mean; the best episode's widths are the result,
pruned through ``prune_channels`` with the ``channel`` config (criterion, rounding), as
``prune_to_target`` does, and the MACs are measured again on the result (recorded).

    small = sk.prune(model, sk.prune.AMC(macs=0.5, episodes=60), example_inputs=(x,), data=calib)

YAML step: ``- prune.amc: {macs: 0.5, episodes: 60}``. Supports what ``prune.auto`` supports.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from pydantic import Field
from torch import nn

from slimkit.core.config import Config
from slimkit.core.data import collect_batches
from slimkit.core.registry import METHODS
from slimkit.core.scope import Scope
from slimkit.core.verbs import eval_mode
from slimkit.errors import ConfigError
from slimkit.prune.auto import Target, _Pruner, _width, cost_model, output_tensors
from slimkit.prune.channel import (
    Channel,
    _as_inputs,
    group_key,
    prune_channels,
    pruning_record,
    set_record,
)


class AMC(Config):
    """Per-group widths chosen by a policy-gradient agent under a MAC budget."""

    macs: float = Field(0.5, gt=0.0, le=1.0)  # fraction of the dense MACs to keep
    episodes: int = Field(48, ge=1)  # pruned candidates scored
    batch: int = Field(4, ge=1)  # episodes per policy update
    sigma: float = Field(0.1, gt=0.0)  # exploration: std of the sampled keep fractions
    lr: float = Field(0.05, gt=0.0)  # step of the policy mean per unit of normalised advantage
    min_keep: float = Field(0.1, gt=0.0, le=1.0)  # no group keeps fewer than this fraction
    calibration_batches: int = Field(2, ge=1)  # batches of `data` the reward reads
    channel: Channel = Field(default_factory=lambda: Channel(ratio=0.0))  # criterion, rounding
    seed: int = 0


def _reward(model: nn.Module, batches: Sequence[tuple[Any, ...]], ref: list[torch.Tensor]) -> float:
    """Top-1 agreement with the dense model minus the relative squared output error."""
    outs = output_tensors(model, batches)
    pairs = list(zip(outs, ref, strict=True))
    agree = sum(float((o.argmax(-1) == r.argmax(-1)).float().mean()) for o, r in pairs)
    err = sum(float((o - r).pow(2).sum()) for o, r in pairs)
    norm = sum(float(r.pow(2).sum()) for r in ref)
    return agree / len(ref) - err / max(norm, 1e-12)


@METHODS.register(
    "prune.amc",
    config=AMC,
    summary="per-layer ratios from a policy-gradient agent under a MAC budget",
    example={"macs": 0.6, "episodes": 4, "batch": 2},
    unsupported={"lstm": "nothing in it is prunable: the dependency graph does not follow LSTMs"},
)
def prune_amc(
    model: nn.Module,
    config: AMC | None = None,
    *,
    example_inputs: Sequence[torch.Tensor] | torch.Tensor,
    data: Iterable[Any],
    scope: Scope | None = None,
) -> nn.Module:
    """A pruned copy of ``model`` at ``config.macs`` of its MACs, widths chosen by the agent."""
    cfg = config or AMC()
    inputs = _as_inputs(example_inputs)
    with eval_mode(model):
        return _search(model, cfg, inputs, data, scope)


def _search(
    model: nn.Module, cfg: AMC, inputs: tuple[torch.Tensor, ...], data: Any, scope: Scope | None
) -> nn.Module:
    target = Target(macs=cfg.macs, channel=cfg.channel, min_keep=cfg.min_keep)
    p = _Pruner(model, inputs, target, scope)
    if not p.groups:
        raise ConfigError(
            "nothing in this model can be pruned with these settings",
            fix="check graph.summary() from build_depgraph, or widen the scope",
        )
    cost = cost_model(model, inputs, p.groups, "macs")
    batches = [b.args for b in collect_batches(data, what="calibration data",
                                               n_inputs=len(inputs),
                                               limit=cfg.calibration_batches)]  # fmt: skip
    ref = output_tensors(model, batches)
    gids = [g.gid for g in p.groups]

    def widths_for(keep: torch.Tensor) -> dict[int, int]:
        """Scale ``keep`` down until the predicted MACs meet the budget (bisection)."""

        def at(scale: float) -> dict[int, int]:
            return {
                g.gid: _width(g, float(k) * scale, target)
                for g, k in zip(p.groups, keep, strict=True)
            }

        lo, hi = 0.0, 1.0
        for _ in range(25):
            mid = (lo + hi) / 2
            w = at(mid)
            if cost({g.gid: w[g.gid] / g.units for g in p.groups}) > cfg.macs:
                hi = mid
            else:
                lo = mid
        return at(lo)

    gen = torch.Generator().manual_seed(cfg.seed)
    mu = torch.full((len(gids),), math.sqrt(cfg.macs))  # ~ uniform: MACs scale with width^2
    baseline: float | None = None
    best: tuple[float, dict[int, int]] | None = None
    history: list[float] = []
    for start in range(0, cfg.episodes, cfg.batch):
        eps_list, rewards = [], []
        for _ in range(min(cfg.batch, cfg.episodes - start)):
            eps = torch.randn(len(gids), generator=gen)
            keep = (mu + cfg.sigma * eps).clamp(cfg.min_keep, 1.0)
            widths = widths_for(keep)
            r = _reward(p.apply(widths), batches, ref)
            eps_list.append(eps)
            rewards.append(r)
            history.append(round(r, 4))
            if best is None or r > best[0]:
                best = (r, widths)
        rs = torch.tensor(rewards)
        baseline = float(rs.mean()) if baseline is None else 0.8 * baseline + 0.2 * float(rs.mean())
        adv = (rs - baseline) / (rs.std() + 1e-8 if len(rs) > 1 else 1.0)
        grad = sum(a * e for a, e in zip(adv.tolist(), eps_list, strict=True)) / len(eps_list)
        mu = (mu + cfg.lr * grad).clamp(cfg.min_keep, 1.0)
    assert best is not None
    keys = {g.gid: group_key(g) for g in p.groups}
    small = prune_channels(model, cfg.channel, example_inputs=inputs, scope=scope, data=data,
                           widths={keys[g]: w for g, w in best[1].items()})  # fmt: skip
    from slimkit.analyze.profile import profile_model

    dense_macs = profile_model(model, inputs).total_macs
    measured = profile_model(small, inputs).total_macs / max(dense_macs, 1)
    record = pruning_record(small) or {}
    report = {
        "budget_macs": cfg.macs,
        "measured_macs": round(measured, 4),
        "best_reward": round(best[0], 4),
        "rewards": history,
        "widths": {keys[g]: [u.units, best[1][g]] for g, u in zip(gids, p.groups, strict=True)},
    }
    set_record(small, {**record, "method": "prune.amc", "config": cfg.to_dict(),
                       "channel_config": record.get("config"), "amc": report})  # fmt: skip
    return small
