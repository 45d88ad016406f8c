"""ThiNet: the Gram matrix of per-channel contributions against a brute-force computation (conv
and a flattened Linear), the greedy order, exact removal of dead channels with the refit, better
reconstruction than l1, and the criterion through Channel and Target."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import slimkit as sk
from slimkit.core.data import collect_batches
from slimkit.errors import ConfigError
from slimkit.prune import Channel, Target, build_depgraph, prune_to_target, pruning_record
from slimkit.prune.thinet import gram, greedy_order, input_moments, readers
from slimkit.zoo.models import create_model


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(),
        nn.Conv2d(6, 8, 3, stride=2, padding=1), nn.ReLU(),
        nn.Flatten(), nn.Linear(8 * 4 * 4, 5),
    ).eval()  # fmt: skip


def _data(n: int = 3, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(4, 3, 8, 8, generator=g) for _ in range(n)]


def test_gram_matches_the_contributions_computed_one_channel_at_a_time() -> None:
    model, data = _net(), _data()
    graph = build_depgraph(model, (data[0],))
    groups = [g for g in graph.groups if g.prunable]
    assert [g.units for g in groups] == [6, 8]
    names = sorted({m.module for g in groups for m in readers(model, g)})
    moments = input_moments(model, names, collect_batches(data))
    for g in groups:
        (member,) = readers(model, g)
        layer = model.get_submodule(member.module)
        feats = nn.Sequential(*list(model)[: int(member.module)])
        zs = []
        for u in range(g.units):  # the reader on its input with only unit u's positions kept
            z = []
            for x in data:
                inp = feats(x)
                keep = torch.zeros_like(inp)
                pos = member.positions([u])
                keep[:, pos] = inp[:, pos]
                out = layer(keep) - layer.bias.view(1, -1, *[1] * (inp.dim() - 2))
                z.append(out.transpose(0, 1).reshape(out.shape[1], -1))
            zs.append(torch.cat(z, 1).flatten())
        z = torch.stack(zs).double()  # (units, everything)
        rows = sum(x.shape[0] for x in data) * (16 if member.module == "2" else 1)
        brute = z @ z.T / rows
        got = gram(model, g, moments)
        brute = brute.detach()
        assert got is not None
        scale = torch.diagonal(brute).mean()
        assert float((got * scale - brute).abs().max() / brute.abs().max()) < 1e-5


def test_greedy_order_removes_cancelling_channels_together() -> None:
    assert greedy_order(torch.diag(torch.tensor([3.0, 1.0, 2.0]))) == [1, 2, 0]
    g = torch.tensor([[1.0, -1.0, 0.0], [-1.0, 1.0, 0.0], [0.0, 0.0, 0.5]])
    assert greedy_order(g) == [2, 0, 1]  # after 0 goes, 1 cancels it: cost -1


def test_dead_channels_go_first_and_removing_them_is_exact() -> None:
    model, data = _net(), _data()
    with torch.no_grad():
        model[0].weight[[1, 3, 4]] = 0.0
        model[0].bias[[1, 3, 4]] = -1.0  # ReLU(-1) = 0: these channels carry nothing
        model[2].weight[:, 0] *= 1e-3  # and channel 0 is nearly unread (but large in l1)
    x = _data(1, seed=7)[0]
    with torch.no_grad():
        ref = model(x)
    errs = []
    for ratio, kept, refit in ((0.5, [0, 2, 5], []), (0.67, [2, 5], ["2"])):
        out = sk.prune(model, Channel(ratio=ratio, criterion="thinet"), example_inputs=(x,),
                       data=data, scope=sk.Scope(include=["0"]))  # fmt: skip
        assert pruning_record(out)["slices"]["0.weight"]["0"] == kept  # dead ones, then 0
        assert pruning_record(out)["thinet_refit"] == refit  # nothing to refit when exact
        with torch.no_grad():
            errs.append(float((out(x) - ref).abs().max()))
    assert errs[0] < 1e-5, errs  # removing channels that carry nothing is exact
    # channel 0 was read with weight 1e-3: a small error, which the refit shrinks further
    assert errs[1] < 1e-2 * float(ref.abs().max()), errs


def test_thinet_reconstructs_better_than_l1_and_runs_through_target() -> None:
    model = create_model("cnn_bn").eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # trained-like BatchNorm statistics
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_var.uniform_(0.5, 2.0, generator=g)
                m.weight.uniform_(0.2, 1.5, generator=g)
    data = [torch.randn(16, 3, 16, 16, generator=g) for _ in range(4)]
    held = torch.randn(32, 3, 16, 16, generator=g)
    with torch.no_grad():
        ref = model(held)
    errs = {}
    for crit in ("l1", "thinet"):
        cfg = Target(macs=0.5, channel=Channel(ratio=0.0, criterion=crit))
        out = prune_to_target(model, cfg, example_inputs=(held[:1],), data=data)
        with torch.no_grad():
            errs[crit] = float((out(held) - ref).pow(2).mean() / ref.pow(2).mean())
        if crit == "thinet":
            assert pruning_record(out)["thinet_refit"] == ["features.2.0", "fc"]
    # relative output error at half the MACs, measured: l1 0.070, thinet 0.0004
    assert errs["thinet"] < 0.1 * errs["l1"], errs
    with pytest.raises(ConfigError, match="criterion 'thinet' needs calibration data.*Fix:"):
        sk.prune(model, Channel(criterion="thinet"), example_inputs=(held[:1],))
