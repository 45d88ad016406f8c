"""The decompositions and their layers: exact at full rank, better with rank, smaller."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from slimkit.lowrank import factorise
from slimkit.lowrank.factorise import cp_als, cp_reconstruct, tail_error2, tucker2, tucker_error2
from slimkit.testing.numerics import assert_sqnr


def _params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


@pytest.mark.parametrize(
    ("layer", "x"),
    [
        (nn.Linear(24, 16), torch.randn(3, 5, 24)),
        (nn.Conv2d(6, 10, 3, stride=2, padding=1), torch.randn(2, 6, 9, 9)),
        (nn.Conv1d(4, 6, 5, padding=2, padding_mode="reflect"), torch.randn(2, 4, 11)),
        (nn.Conv3d(3, 5, 3, padding="same", bias=False), torch.randn(1, 3, 5, 5, 5)),
    ],
)
def test_full_rank_svd_reproduces_the_layer(layer: nn.Module, x: torch.Tensor) -> None:
    w = layer.weight
    full = min(w.shape[0], w[0].numel())
    chain, err = factorise(layer, "svd", [full])
    assert err < 1e-12
    torch.testing.assert_close(chain(x), layer(x), atol=1e-5, rtol=0)


def test_full_rank_tucker_and_cp_reproduce_the_conv() -> None:
    conv = nn.Conv2d(6, 8, 3, stride=2, padding=1)
    x = torch.randn(2, 6, 9, 9)
    tucker, err = factorise(conv, "tucker", [8, 6])
    assert err < 1e-12
    torch.testing.assert_close(tucker(x), conv(x), atol=1e-5, rtol=0)
    # a CP rank of out*in reproduces any kernel; ALS gets there: measured error 1e-5 / 3e-7
    for spatial in ("full", "separable"):
        cp, err = factorise(conv, "cp", [48], spatial=spatial, iters=200)  # type: ignore[arg-type]
        assert err < 1e-4, spatial
        assert_sqnr(conv(x), cp(x), 60.0)  # measured 98 dB (full), 127 dB (separable)


def test_error_decreases_with_rank_and_matches_the_singular_values() -> None:
    lin = nn.Linear(40, 30)
    errors = [factorise(lin, "svd", [r])[1] for r in (2, 5, 10, 20, 30)]
    assert errors == sorted(errors, reverse=True) and errors[-1] < 1e-12
    s = torch.linalg.svdvals(lin.weight.detach().double())
    expected = tail_error2(s)[10].sqrt().item()  # Eckart-Young: the dropped energy
    assert abs(factorise(lin, "svd", [10])[1] - expected) < 1e-9
    conv = nn.Conv2d(16, 16, 3)
    t_err = [factorise(conv, "tucker", [r, r])[1] for r in (2, 4, 8, 16)]
    assert t_err == sorted(t_err, reverse=True)
    c_err = [factorise(conv, "cp", [r], iters=30)[1] for r in (4, 16, 64)]
    assert c_err == sorted(c_err, reverse=True)


def test_hooi_refines_hosvd() -> None:
    w = torch.randn(32, 24, 3, 3)
    hosvd = tucker_error2(w, *_outer(tucker2(w, 8, 6, iters=0)))
    hooi = tucker_error2(w, *_outer(tucker2(w, 8, 6, iters=5)))
    assert hooi <= hosvd - 1e-3  # measured 0.842 -> 0.794 on a random kernel


def _outer(t: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    return t[0], t[2]


def test_cp_als_recovers_an_exact_low_rank_tensor() -> None:
    factors = [torch.randn(d, 5, dtype=torch.float64) for d in (12, 10, 9)]
    t = cp_reconstruct(factors)
    found, err = cp_als(t, 5, iters=200)
    assert err < 1e-5  # measured 1.5e-7
    assert float((cp_reconstruct(found) - t).norm() / t.norm()) == pytest.approx(err, abs=1e-12)


def test_high_rank_decompositions_of_a_low_rank_conv_have_high_sqnr() -> None:
    # a kernel that is nearly Tucker/CP low-rank (as trained kernels nearly are), plus noise
    torch.manual_seed(0)
    conv = nn.Conv2d(32, 32, 3, padding=1)
    base = cp_reconstruct([torch.randn(d, 12) for d in (32, 32, 9)]).reshape(32, 32, 3, 3)
    with torch.no_grad():
        conv.weight.copy_(base + 0.01 * base.std() * torch.randn_like(base))
    x = torch.randn(2, 32, 8, 8)
    tucker, _ = factorise(conv, "tucker", [16, 16], iters=2)
    cp, _ = factorise(conv, "cp", [16], iters=100)
    assert_sqnr(conv(x), tucker(x), 30.0)  # measured 41.9 dB
    assert_sqnr(conv(x), cp(x), 30.0)  # measured 40.5 dB
    assert _params(tucker) < _params(conv) and _params(cp) < _params(conv) / 5


def test_chains_are_smaller_and_keep_the_layer_geometry() -> None:
    conv = nn.Conv2d(64, 64, 3, stride=2, padding=1, dilation=1)
    x = torch.randn(1, 64, 16, 16)
    for kind, rank in (("svd", [16]), ("tucker", [16, 16]), ("cp", [32])):
        chain, _ = factorise(conv, kind, rank, iters=5)  # type: ignore[arg-type]
        assert _params(chain) < _params(conv) / 2, kind
        assert chain(x).shape == conv(x).shape
        assert chain.kind == kind and chain.rank == rank
    sep, _ = factorise(conv, "cp", [32], spatial="separable", iters=5)
    assert [tuple(m.kernel_size) for m in sep] == [(1, 1), (3, 1), (1, 3), (1, 1)]
    assert sep[1].groups == 32 and sep[1].stride == (2, 1) and sep[2].stride == (1, 2)
