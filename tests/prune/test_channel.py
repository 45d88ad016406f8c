"""Channel pruning on every zoo model: exact on already-zero channels, smaller, exports, reloads."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from torch import nn

from slimkit.analyze.profile import profile_model
from slimkit.core.registry import METHODS
from slimkit.core.scope import Scope
from slimkit.errors import ConfigError, ScopeError, UnsupportedError
from slimkit.prune import Channel, apply_slices, plan_channels, prune_channels, pruning_record
from slimkit.prune.artifact import load_pruned, save_pruned
from slimkit.prune.channel import ChannelPlan
from slimkit.testing.zoo import SMALL_KWARGS, small_zoo
from slimkit.zoo.models import list_models

from .awkward_models import CASES

KWARGS = SMALL_KWARGS
NO_GROUPS = {"lstm"}  # everything feeds the LSTM, which slimkit does not prune
ZOO = list_models()


REFERENCE = set(list_models(kind="reference"))


def _zoo(name: str) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    return small_zoo(name)


def zero_removed(model: nn.Module, plan: ChannelPlan) -> None:
    """Zero every column that reads a channel the plan removes (in place)."""
    for g in plan.graph.groups:
        units = plan.remove.get(g.gid)
        for m in g.members if units else []:
            if m.role == "in":
                t = getattr(model.get_submodule(m.module), m.param)
                with torch.no_grad():
                    t.index_fill_(m.dim, torch.tensor(m.positions(units)), 0.0)


def assert_exact_removal(model: nn.Module, x: tuple[torch.Tensor, ...], cfg: Channel) -> int:
    plan = plan_channels(model, cfg, example_inputs=x)
    zeroed = copy.deepcopy(model)
    zero_removed(zeroed, plan)
    pruned = apply_slices(copy.deepcopy(zeroed), plan.slices(zeroed))
    with torch.no_grad():
        ref, out = zeroed(*x), pruned(*x)
    assert ref.shape == out.shape
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
    return sum(len(u) for u in plan.remove.values())


def _params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


@pytest.mark.parametrize(
    ("name", "criterion"),
    [(n, c) for n in ZOO for c in ("l1", "random") if c == "random" or n not in REFERENCE],
)
def test_removing_zero_channels_is_exact_on_every_zoo_model(name: str, criterion: str) -> None:
    model, x = _zoo(name)
    # LayerNorm widths are left alone: removing even zero channels changes LayerNorm's statistics
    cfg = Channel(ratio=0.5, criterion=criterion, keep_normalized=True)  # type: ignore[arg-type]
    removed = assert_exact_removal(model, x, cfg)
    assert (removed == 0) == (name in NO_GROUPS)


@pytest.mark.parametrize("name", [n for n in ZOO if n not in NO_GROUPS])
def test_pruned_zoo_model_is_smaller_exports_and_reloads(name: str, tmp_path: Any) -> None:
    from slimkit.export.onnx import export_onnx

    model, x = _zoo(name)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    pruned = prune_channels(model, Channel(ratio=0.5), example_inputs=x)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # untouched
    assert type(pruned) is type(model)
    assert _params(pruned) < _params(model)
    assert profile_model(pruned, x).total_macs < profile_model(model, x).total_macs
    with torch.no_grad():
        y = pruned(*x)
    assert y.shape == model(*x).shape and torch.isfinite(y).all()
    rep = export_onnx(pruned, tmp_path / "m.onnx", example_inputs=x)
    assert rep.max_abs_err is not None and rep.max_abs_err < 1e-4
    save_pruned(pruned, tmp_path / "art")
    fresh, _ = _zoo(name)
    reloaded = load_pruned(tmp_path / "art", model=fresh)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(*x), y, atol=0, rtol=0)
    assert _params(fresh) == _params(model)  # the fresh original is not modified


def test_attention_heads_and_ffn_shrink_together() -> None:
    model, x = _zoo("transformer_block")
    pruned = prune_channels(model, Channel(ratio=0.5), example_inputs=x)
    attn = pruned.attn  # type: ignore[union-attr]
    assert attn.q_proj.out_features == attn.k_proj.out_features == attn.v_proj.out_features == 16
    assert attn.out_proj.in_features == 16 and attn.out_proj.out_features == 32  # 2 of 4 heads
    assert pruned.mlp.fc1.out_features == pruned.mlp.fc2.in_features == 32  # type: ignore[union-attr]


def test_hidden_width_of_gpt_is_pruned_with_its_layernorms() -> None:
    model, x = _zoo("gpt_tiny")
    pruned = prune_channels(model, Channel(ratio=0.5, heads=False), example_inputs=x)
    assert pruned.tok_emb.embedding_dim == pruned.pos_emb.embedding_dim == 32  # type: ignore[union-attr]
    assert pruned.ln_f.normalized_shape == (32,)  # type: ignore[union-attr]
    assert pruned.lm_head.out_features == 256  # the output width is never pruned
    assert pruned.blocks[0].attn.q_proj.out_features == 64  # type: ignore[index]
    assert pruned(*x).shape == model(*x).shape


def test_input_channels_and_output_width_are_kept() -> None:
    model, x = _zoo("residual")
    pruned = prune_channels(model, Channel(ratio=0.9), example_inputs=x)
    assert pruned.features[0][0].in_channels == 3  # type: ignore[index]
    assert pruned.fc.out_features == 10  # type: ignore[union-attr]


@pytest.mark.parametrize("criterion", ["l1", "l2", "bn", "fpgm", "random", "taylor"])
def test_every_criterion_prunes_and_stays_exact(criterion: str) -> None:
    model, x = _zoo("cnn_bn")
    data = [(x[0], torch.tensor([1, 3]))]
    cfg = Channel(ratio=0.5, criterion=criterion)  # type: ignore[arg-type]
    pruned = prune_channels(model, cfg, example_inputs=x, data=data)
    assert _params(pruned) < _params(model)
    assert all(p.grad is None for p in model.parameters())
    if criterion != "taylor":
        assert_exact_removal(model, x, cfg)


def test_l1_removes_the_smallest_filters_and_bn_the_smallest_gammas() -> None:
    model, x = _zoo("cnn_bn")
    conv = model.features[0][0]  # type: ignore[index]
    with torch.no_grad():
        conv.weight[[1, 5]] *= 1e-3
    plan = plan_channels(
        model, Channel(ratio=0.25), example_inputs=x, scope=Scope(include=["features.0.0"])
    )
    (removed,) = plan.remove.values()
    assert removed == [1, 5]
    model, x = _zoo("cnn_bn")  # l1 also weighs the BN scales, so test bn on a fresh model
    with torch.no_grad():
        model.features[0][1].weight[[0, 2]] = 1e-3  # type: ignore[index]
    plan = plan_channels(
        model, Channel(ratio=0.25, criterion="bn", include=["features.0.0"]), example_inputs=x
    )
    assert list(plan.remove.values()) == [[0, 2]]


def test_taylor_without_labels_says_how_to_fix() -> None:
    model, x = _zoo("cnn_bn")
    with pytest.raises(ConfigError, match="labelled batches"):
        prune_channels(model, Channel(criterion="taylor"), example_inputs=x, data=[x[0]])


def test_round_to_and_min_channels() -> None:
    model, x = _zoo("small_cnn")  # widths 16, 32, 64, 64
    pruned = prune_channels(model, Channel(ratio=0.7, round_to=8), example_inputs=x)
    widths = [m.out_channels for m in pruned.modules() if isinstance(m, nn.Conv2d)]
    assert widths == [8, 16, 24, 24]  # 30 % kept, rounded up to a multiple of 8
    pruned = prune_channels(model, Channel(ratio=0.9, min_channels=6), example_inputs=x)
    widths = [m.out_channels for m in pruned.modules() if isinstance(m, nn.Conv2d)]
    assert widths == [6, 6, 7, 7]


def test_global_ranking_removes_the_requested_share_unevenly() -> None:
    model, x = _zoo("small_cnn")  # widths 16, 32, 64, 64: 176 channels
    with torch.no_grad():  # half of the third layer's filters are tiny: global ranking takes them
        model.features[4][0].weight[:32] *= 1e-3  # type: ignore[index]
    pruned = prune_channels(model, Channel(ratio=0.25, global_ranking=True), example_inputs=x)
    widths = [m.out_channels for m in pruned.modules() if isinstance(m, nn.Conv2d)]
    assert sum(widths) == 176 - 44
    assert widths[2] == 32 and widths != [12, 24, 48, 48]
    layer_wise = prune_channels(model, Channel(ratio=0.25), example_inputs=x)
    widths = [m.out_channels for m in layer_wise.modules() if isinstance(m, nn.Conv2d)]
    assert widths == [12, 24, 48, 48]


def test_scope_excludes_layers_and_unknown_scope_fails() -> None:
    model, x = _zoo("mlp")
    pruned = prune_channels(model, Channel(ratio=0.5, exclude=["fc1"]), example_inputs=x)
    assert pruned.fc1.out_features == 32 and pruned.fc2.out_features == 16  # type: ignore[union-attr]
    with pytest.raises(ScopeError):
        prune_channels(model, Channel(), example_inputs=x, scope=Scope(include=["nope"]))


def test_config_rejects_bad_values_and_roundtrips() -> None:
    with pytest.raises(ConfigError, match="did you mean 'ratio'"):
        Channel(ratoi=0.3)  # type: ignore[call-arg]
    with pytest.raises(ConfigError):
        Channel(ratio=1.0)
    cfg = Channel(ratio=0.3, criterion="fpgm", round_to=8)
    assert Channel.from_dict(cfg.to_dict()) == cfg
    assert METHODS.entry("prune.channel").meta["config"] is Channel


def test_record_lists_kept_positions() -> None:
    model, x = _zoo("mlp")
    pruned = prune_channels(model, Channel(ratio=0.5), example_inputs=x)
    rec = pruning_record(pruned)
    assert rec is not None and len(rec["slices"]["fc1.weight"]["0"]) == 16
    assert rec["slices"]["fc2.weight"]["1"] == rec["slices"]["fc1.weight"]["0"]


@pytest.mark.parametrize("case", [k for k, v in CASES.items() if v[2] == "prunes"])
def test_awkward_models_prune_exactly(case: str) -> None:
    factory, make_input, _ = CASES[case]
    model, x = factory().eval(), (make_input(),)
    assert assert_exact_removal(model, x, Channel(ratio=0.5, criterion="random")) > 0
    pruned = prune_channels(model, Channel(ratio=0.5), example_inputs=x)
    assert _params(pruned) < _params(model)


@pytest.mark.parametrize("case", [k for k, v in CASES.items() if v[2] != "prunes"])
def test_awkward_models_refuse_the_layer_by_name(case: str) -> None:
    factory, make_input, module = CASES[case]
    model, x = factory().eval(), (make_input(),)
    assert_exact_removal(model, x, Channel(ratio=0.5, criterion="random"))  # the rest stays exact
    pruned = prune_channels(model, Channel(ratio=0.5), example_inputs=x)
    assert pruned.get_submodule(module).weight.shape == model.get_submodule(module).weight.shape
    rec = pruning_record(pruned)
    assert rec is not None and any(module in s for s in rec["skipped"])
    with pytest.raises(UnsupportedError, match=f"{module}.*Scope\\(exclude=\\['{module}'\\]\\)"):
        prune_channels(model, Channel(include=[module]), example_inputs=x)
