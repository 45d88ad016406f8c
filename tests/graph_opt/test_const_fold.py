"""Constant folding: exact on every zoo model; parameter-only sub-graphs become buffers or literals,
and what must be recomputed every call is kept and reported."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from slimkit.errors import ConfigError, GraphCaptureError
from slimkit.graph_opt import ConstFold, Fuse, fold_constants
from slimkit.zoo.models import create_model, list_models

from .test_fuse import KWARGS, Branchy, _assert_exact, _zoo


@pytest.mark.parametrize("name", list_models())
def test_zoo_models_stay_exact(name: str) -> None:
    model, x = _zoo(name)
    folded, rep = fold_constants(model, return_report=True)
    _assert_exact(model, folded, *x)
    # the zoo computes nothing from parameters alone: nothing folded, nothing lost, nothing kept
    assert not rep.folded and not rep.removed and not rep.kept, rep.summary()
    assert sum(p.numel() for p in folded.parameters()) == sum(p.numel() for p in model.parameters())
    # the original is untouched: same parameters as a fresh copy
    fresh = create_model(name, **KWARGS.get(name, {}))
    assert [n for n, _ in model.named_parameters()] == [n for n, _ in fresh.named_parameters()]


class Consts(nn.Module):
    """Work a forward repeats on every call although it depends only on parameters."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(8, 16))  # only read transposed and for its shape
        self.proj = nn.Parameter(torch.randn(4, 8))
        self.register_buffer("table", torch.randn(3, 8))
        self.norm = nn.LayerNorm(8)  # only applied to the table
        self.bias = nn.Parameter(torch.randn(8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, 16)
        y = x @ (self.w.t() * 2)  # (B, 8)
        y = y + (torch.ones(3, 4) @ self.proj).sum(0) + self.bias.exp()
        y = y.unsqueeze(1) + self.norm(self.table)  # (B, 3, 8)
        half = self.w.shape[0] // 2  # shape arithmetic: a literal 4
        return y.reshape(-1, 3, half, 2) + self.bias.view(half, 2)


def test_parameter_only_subgraphs_become_buffers_and_literals() -> None:
    model = Consts().eval()
    x = torch.randn(5, 16)
    folded, rep = fold_constants(model, return_report=True)
    _assert_exact(model, folded, x)
    exprs = dict(rep.folded)
    assert exprs["w.t() * 2"].startswith("buffer") and "(16, 8)" in exprs["w.t() * 2"]
    assert exprs["w.shape[0] // 2"] == "literal 4"
    assert any(e.startswith("norm(table)") for e in exprs)
    assert any("matmul(proj)" in e for e in exprs) and "bias.exp()" in exprs
    assert {"w", "proj", "table", "bias"} <= set(rep.removed)
    assert not list(folded.parameters())  # every parameter lives on only in folded buffers
    assert not any(isinstance(m, nn.LayerNorm) for m in folded.modules())
    code = folded.code
    assert ".t()" not in code and ".shape" not in code and ".exp(" not in code
    assert [n for n, _ in model.named_parameters()] == [
        "w",
        "proj",
        "bias",
        "norm.weight",
        "norm.bias",
    ]


class Impure(nn.Module):
    """Constant inputs, yet a different value on every call."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.randn(8))
        self.calls = nn.Parameter(torch.zeros(1), requires_grad=False)  # fx records its writes
        self.drop = nn.Dropout(0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, 8)
        self.calls.add_(1)  # a counter written every call
        acc = torch.zeros_like(self.scale)
        acc.add_(x.mean())  # written with a value from the input
        noise = torch.rand_like(self.scale)  # random
        return x + self.calls * 2 + acc * 3 + noise * 0 + self.drop(self.scale)


def test_random_mutated_and_training_mode_values_are_kept() -> None:
    model = Impure().train()
    x = torch.randn(2, 8)
    folded, rep = fold_constants(model, return_report=True)
    assert not rep.folded, rep.summary()
    kept = dict(rep.kept)
    assert "in place" in kept["calls.add_(1)"]
    assert "written in place" in kept["torch.zeros_like(scale)"]
    assert "random" in kept["torch.rand_like(scale)"]
    assert "training mode" in kept["drop(scale)"]
    before = float(folded.calls)
    folded(x)
    folded(x)
    assert float(folded.calls) == before + 2  # the counter still counts
    # in eval mode the dropout returns `scale` itself, which other ops read: nothing to gain
    model.eval()
    folded, rep_eval = fold_constants(model, return_report=True)
    assert not rep_eval.folded
    assert "view of 'scale'" in dict(rep_eval.kept)["drop(scale)"]


class Views(nn.Module):
    """A tied LM head reading the embedding transposed, and a weight only read transposed."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 8)
        self.w = nn.Parameter(torch.randn(8, 8))

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        h = self.emb(idx)  # (B, T, 8)
        return (h @ self.w.t()) @ self.emb.weight.t()  # (B, T, 10)


def test_views_of_tensors_still_in_use_are_not_duplicated() -> None:
    model = Views().eval()
    idx = torch.randint(0, 10, (2, 5))
    folded, rep = fold_constants(model, return_report=True)
    _assert_exact(model, folded, idx)
    assert [e for e, _ in rep.folded] == ["w.t()"] and rep.removed == ["w"]
    assert "view of 'emb.weight'" in dict(rep.kept)["emb.weight.t()"]
    n_params = sum(t.numel() for t in folded.state_dict().values())
    assert n_params == sum(t.numel() for t in model.state_dict().values())  # no copy added


class Devices(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, 4), int or float
        return x.to(self.w.dtype) + torch.arange(x.shape[-1], device=self.w.device) * self.w


def test_dtype_and_device_stay_live() -> None:
    model = Devices()
    x = torch.randint(0, 5, (2, 4))
    folded, rep = fold_constants(model, return_report=True)
    _assert_exact(model, folded, x)
    assert not rep.folded and {e for e, _ in rep.kept} == {"w.dtype", "w.device"}
    assert all("model.to()" in why for _, why in rep.kept)
    assert folded.double()(x).dtype == torch.float64  # follows the model, not baked in


class Grows(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.row = nn.Parameter(torch.randn(1, 8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, 64, 8)
        return x + self.row.expand(64, 8)  # a view: storing it costs 64x the parameter


def test_results_much_larger_than_their_inputs_are_kept() -> None:
    model = Grows()
    x = torch.randn(2, 64, 8)
    _, rep = fold_constants(model, return_report=True)  # small enough: folded
    assert len(rep.folded) == 1
    folded, rep = fold_constants(model, ConstFold(small_bytes=0), return_report=True)
    assert not rep.folded and "max_growth" in rep.kept[0][1]
    _assert_exact(model, folded, x)
    _, rep = fold_constants(model, ConstFold(small_bytes=0, max_growth=64), return_report=True)
    assert len(rep.folded) == 1


def test_folded_model_exports_to_onnx_with_parity(tmp_path: Path) -> None:
    from slimkit.export.onnx import export_onnx

    model = Consts().eval()
    x = torch.randn(2, 16)
    folded = fold_constants(model)
    report = export_onnx(folded, tmp_path / "c.onnx", example_inputs=(x,))  # checks ORT parity
    assert report.max_abs_err is not None and report.max_abs_err < 1e-4


def test_configs_reject_bad_values_and_typos() -> None:
    with pytest.raises(ConfigError, match="max_growth"):
        ConstFold(max_growth=0.5)
    with pytest.raises(ConfigError, match="did you mean 'fold_pad'"):
        Fuse(fold_pads=False)  # type: ignore[call-arg]
    assert ConstFold.from_dict(ConstFold(small_bytes=0).to_dict()) == ConstFold(small_bytes=0)


class _Wrap(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.branch = Branchy()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.branch(x) * 2


def test_untraceable_model_gets_a_clear_error() -> None:
    with pytest.raises(GraphCaptureError, match=r"module 'branch' \(Branchy\)"):
        fold_constants(_Wrap())
