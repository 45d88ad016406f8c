"""Lightweight blocks: exact where the kernel allows it, fewer parameters and MACs, and
distillation from the original brings the output back toward it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

import slimkit as sk
from slimkit.analyze.profile import profile_model
from slimkit.errors import CheckpointError, ConfigError
from slimkit.lightweight import Ghost, GhostConv, Separable, save_lightweight, separable
from slimkit.pipeline.artifact import save_model
from slimkit.testing.numerics import sqnr
from slimkit.testing.zoo import randomise_bn
from slimkit.zoo.models import create_model


@pytest.mark.parametrize("stride", [1, 2])
def test_separable_is_exact_at_full_multiplier_and_improves_with_it(stride: int) -> None:
    conv = nn.Conv2d(6, 10, 3, stride, 1, bias=True)
    x = torch.randn(2, 6, 9, 9)
    block, err = separable(conv, multiplier=9)  # rank min(out, k*k) = 9: the whole kernel
    assert err < 1e-10
    torch.testing.assert_close(block(x), conv(x), atol=1e-5, rtol=0)
    errors = [separable(conv, m)[1] for m in (1, 2, 4, 8)]
    assert errors == sorted(errors, reverse=True) and errors[0] > 0.3  # random: far from rank 1


def test_separable_of_a_rank_one_kernel_is_exact() -> None:
    conv = nn.Conv2d(4, 5, 3, padding=1, bias=False)
    with torch.no_grad():  # per input channel: an outer product of out and spatial vectors
        conv.weight.copy_(torch.einsum("oc,ck->ock", torch.randn(5, 4), torch.randn(4, 9))
                          .reshape(5, 4, 3, 3))  # fmt: skip
    block, err = separable(conv, 1)
    x = torch.randn(1, 4, 7, 7)
    assert err < 1e-6
    torch.testing.assert_close(block(x), conv(x), atol=1e-5, rtol=0)


def test_ghost_is_exact_when_filters_come_in_scaled_pairs() -> None:
    conv = nn.Conv2d(3, 8, 3, padding=1, bias=False)
    base = torch.randn(4, 3, 3, 3) * torch.tensor([4.0, 3.5, 3.0, 2.5])[:, None, None, None]
    scales = torch.tensor([0.2, -0.15, 0.25, 0.1])  # copies: smaller norms
    with torch.no_grad():  # filters 0-3 and, shuffled among them, scaled copies
        conv.weight.copy_(torch.cat([base, base * scales[:, None, None, None]])[
            torch.tensor([0, 4, 1, 5, 6, 2, 7, 3])])  # fmt: skip
    g = GhostConv(conv, ratio=2)
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(g(x), conv(x), atol=1e-5, rtol=0)
    assert sum(p.numel() for p in g.parameters()) < conv.weight.numel()


@pytest.mark.parametrize("method", ["separable", "ghost"])
def test_converted_model_is_smaller_and_keeps_the_stem(method: str) -> None:
    model = randomise_bn(create_model("small_cnn")).eval()
    x = torch.randn(1, 3, 32, 32)
    out = sk.lighten(model, method)
    rep = sk.report(out)
    kept = {k["name"] for k in rep.record["kept"]}
    assert "features.0.0" in kept  # 3 input channels < min_in_channels
    assert len(rep.record["layers"]) == 3
    before, after = profile_model(model, (x,)), profile_model(out, (x,))
    assert after.total_macs < 0.7 * before.total_macs, (before.total_macs, after.total_macs)
    assert rep.changed["params"][1] < rep.changed["params"][0]
    with torch.no_grad():
        assert torch.isfinite(out(x)).all()


def test_distillation_brings_the_output_back_to_the_original() -> None:
    model = randomise_bn(create_model("cnn_bn", width=16)).eval()
    g = torch.Generator().manual_seed(0)
    data = [torch.randn(32, 3, 16, 16, generator=g) for _ in range(4)]
    x = torch.cat(data)
    raw = sk.lighten(model, Separable(min_in_channels=1))
    tuned = sk.lighten(model, Separable(min_in_channels=1, epochs=20, lr=3e-3), data=data,
                       progress=False)  # fmt: skip
    with torch.no_grad():  # softmax ignores a shift of the logits: compare them centred
        ref, before, after = (m(x) - m(x).mean(-1, keepdim=True) for m in (model, raw, tuned))
    # measured: 3.6 dB at initialisation, 27.7 dB after 80 steps on the same batches
    assert sqnr(ref, before) < 8.0 and sqnr(ref, after) > 20.0
    assert sk.report(tuned).record["recovery"]["steps"] == 80


def test_distillation_without_data_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="needs data=.*Fix:"):
        sk.lighten(create_model("cnn_bn"), Ghost(epochs=1))


@pytest.mark.parametrize("method", ["separable", "ghost"])
def test_lightweight_artifact_reloads_through_sk_load(method: str, tmp_path: Path) -> None:
    """The artifact writer records the blocks (lightweight.json) and sk.load rebuilds them on a
    fresh original: outputs equal, the original untouched; a wrong architecture is refused."""
    model = randomise_bn(create_model("small_cnn")).eval()
    small = sk.lighten(model, method)
    with torch.no_grad():  # trained-looking weights: not the ones the init would rebuild
        for p in small.parameters():
            p.add_(0.01 * torch.randn_like(p))
    written = save_model(small, tmp_path)
    assert written == ["model.safetensors", "lightweight.json"]
    fresh = create_model("small_cnn").eval()
    back = sk.load(tmp_path, model=fresh).eval()
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(back(x), small(x), atol=1e-6, rtol=0)
    assert not any(isinstance(m, GhostConv) for m in fresh.modules())  # not modified
    assert sum(p.numel() for p in back.parameters()) < sum(p.numel() for p in model.parameters())
    again = tmp_path / "again"  # the reloaded model carries the record: it saves again
    assert save_model(back, again) == ["model.safetensors", "lightweight.json"]
    with pytest.raises(CheckpointError, match="this model has"):
        sk.load(tmp_path, model=create_model("mlp"))


def test_lightweight_then_pruned_is_refused_at_save(tmp_path: Path) -> None:
    model = randomise_bn(create_model("small_cnn")).eval()
    small = sk.lighten(model, "ghost")
    small.__dict__["_slimkit_pruning"] = {"groups": []}  # what channel pruning leaves
    with pytest.raises(CheckpointError, match="cannot replay both"):
        save_lightweight(small, tmp_path)


def test_recipe_step_artifact_reloads(tmp_path: Path) -> None:
    recipe = {"model": "zoo:cnn_bn", "steps": [{"lightweight.ghost": {}}]}
    res = sk.run(recipe, out=tmp_path / "art")
    assert (tmp_path / "art" / "lightweight.json").is_file()
    back = sk.load(tmp_path / "art", model=create_model("cnn_bn"))
    assert any(isinstance(m, GhostConv) for m in back.modules())
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(back.eval()(x), res.model.eval()(x), atol=0, rtol=0)
