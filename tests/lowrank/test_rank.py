"""Rank rules pick what they should on matrices whose rank is known; bad rules are named."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import slimkit as sk
from slimkit.errors import ConfigError
from slimkit.lowrank import SVD, Tucker
from slimkit.lowrank.factorise import energy_rank
from slimkit.lowrank.rank import Candidate, allocate, curve, pick
from slimkit.lowrank.vbmf import tau_bar, vbmf


def _low_rank(rows: int, cols: int, rank: int, noise: float) -> torch.Tensor:
    signal = torch.randn(rows, rank) @ torch.randn(rank, cols)
    return signal + noise * torch.randn(rows, cols)


def _linear(weight: torch.Tensor) -> nn.Linear:
    lin = nn.Linear(weight.shape[1], weight.shape[0])
    with torch.no_grad():
        lin.weight.copy_(weight)
    return lin


@pytest.mark.parametrize(("rows", "cols", "rank", "noise"),
                         [(200, 100, 5, 0.1), (64, 256, 10, 0.5), (300, 300, 20, 1.0)])  # fmt: skip
def test_vbmf_recovers_the_rank_and_noise_of_a_noisy_low_rank_matrix(
    rows: int, cols: int, rank: int, noise: float
) -> None:
    found, s2 = vbmf(_low_rank(rows, cols, rank, noise))
    assert found == rank
    assert s2 == pytest.approx(noise**2, rel=0.1)  # measured within 2 %
    assert vbmf(noise * torch.randn(rows, cols))[0] == 0  # pure noise: nothing to keep


def test_vbmf_threshold_constant() -> None:
    assert tau_bar(1.0) == pytest.approx(2.5129, abs=1e-4)  # the paper's 2.5129 sqrt(alpha)
    assert tau_bar(0.25) == pytest.approx(2.5129 * 0.5, rel=0.05)


def test_energy_rank_counts_the_singular_values_it_needs() -> None:
    s = torch.tensor([3.0, 2.0, 1.0, 0.0])  # energies 9, 4, 1 of 14
    assert energy_rank(s, 9 / 14) == 1
    assert energy_rank(s, 0.9) == 2
    assert energy_rank(s, 1.0) == 3


def test_rules_on_a_layer_of_known_rank() -> None:
    lin = _linear(_low_rank(64, 48, 6, 1e-3))
    c = Candidate("fc", lin, "svd")
    assert pick(c, SVD(vbmf=True)) == [6]
    assert pick(c, SVD(energy=0.999)) == [6]
    assert pick(c, SVD(rank=4)) == [4]
    assert pick(c, SVD(rank=0.5)) == [24]  # half of min(64, 48)
    conv = nn.Conv2d(16, 24, 3)
    with torch.no_grad():  # mode ranks 4 (out) and 5 (in)
        core = torch.randn(4, 5, 3, 3)
        conv.weight.copy_(torch.einsum("rsab,or,is->oiab", core, torch.randn(24, 4),
                                       torch.randn(16, 5)))  # fmt: skip
    t = Candidate("conv", conv, "tucker")
    assert pick(t, Tucker(energy=0.9999)) == [4, 5]
    assert pick(t, Tucker(vbmf=True)) == [4, 5]


def test_budget_goes_where_it_costs_the_least_error() -> None:
    # two layers of the same size: one nearly rank 4, one full rank; a params budget should
    # squeeze the low-rank one first
    easy = Candidate("easy", _linear(_low_rank(64, 64, 4, 1e-3)), "svd")
    hard = Candidate("hard", _linear(torch.randn(64, 64)), "svd")
    opts = {c.name: curve(c) for c in (easy, hard)}
    ranks, total, reached = allocate([easy, hard], opts, 0.5, "params")
    assert reached <= 0.5 * total
    assert ranks["easy"] is not None and ranks["easy"][0] <= 4
    assert ranks["hard"] is None or ranks["hard"][0] > 8
    tight, _, reached = allocate([easy, hard], opts, 0.1, "params")
    assert reached <= 0.1 * total and tight["hard"] is not None


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        ({"rank": 0}, r"rank=0 is not a rank.*Fix: .*int >= 1"),
        ({"rank": 1.5}, r"rank=1.5 is not a rank"),
        ({"energy": 1.5}, r"energy.*less than or equal to 1"),
        ({"params": 0.0}, r"params.*greater than 0"),
        ({"energy": 0.9, "vbmf": True}, r"energy and vbmf are each a rank rule"),
        ({"ranks": 4}, r"unknown key 'ranks'.*did you mean 'rank'"),
        ({"budget": 0.5}, r"unknown key 'budget'.*valid keys: rank, energy, params, macs, vbmf"),
    ],
)
def test_bad_rules_are_config_errors_with_a_fix(fields: dict[str, object], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        SVD.from_dict(fields)


def test_no_rule_means_energy_and_the_rule_reads_back() -> None:
    assert SVD().energy == 0.9 and SVD().rule == "energy 0.9"
    assert SVD(params=0.2).energy is None and SVD(params=0.2).rule == "params 0.2"
    assert SVD.from_dict(SVD(vbmf=True).to_dict()) == SVD(vbmf=True)
    with pytest.raises(ConfigError, match="unknown low-rank decomposition method 'svdd'"):
        sk.decompose(nn.Linear(4, 4), "svdd")


def test_round_to_gives_multiples_of_the_kernel_block() -> None:
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Conv1d(64, 64, 3))
    x = (torch.randn(2, 64, 64),)  # the Linear runs on the last dimension, the conv on channels
    for cfg in (SVD(energy=0.5, round_to=8), SVD(params=0.3, round_to=16)):
        out = sk.decompose(model, cfg, example_inputs=x)
        ranks = [r["rank"][0] for r in sk.report(out).record["layers"]]
        assert ranks and all(r % cfg.round_to == 0 for r in ranks), ranks
    tucker = sk.decompose(nn.Sequential(nn.Conv2d(24, 40, 3)), Tucker(rank=0.3, round_to=8))
    assert sk.report(tucker).record["layers"][0]["rank"] == [16, 8]  # 12 -> 16, 7.2 -> 8
