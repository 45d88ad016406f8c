"""The dependency graph couples the right dimensions, and refuses what it cannot follow, by name."""

from __future__ import annotations

import pytest
import torch

from slimkit.errors import DataError
from slimkit.prune import Member, build_depgraph
from slimkit.zoo.models import create_model, example_inputs

from .awkward_models import CASES, DynamicView, ResidualConcat


def _group_of(graph, module: str, role: str = "out"):  # type: ignore[no-untyped-def]
    (g,) = [g for g in graph.groups if module in g.modules(role)]
    return g


def test_residual_add_couples_both_branches_into_one_group() -> None:
    model = create_model("residual")
    graph = build_depgraph(model, example_inputs("residual", 2))
    g = _group_of(graph, "features.0.0")
    assert {"features.0.0", "features.1.conv2", "features.1.bn2"} <= set(g.modules())
    assert "features.2.conv1" in g.modules("in") and "features.2.downsample.0" in g.modules("in")
    assert g.prunable and g.units == 8


def test_flatten_into_linear_gives_each_channel_hw_columns() -> None:
    graph = build_depgraph(DynamicView().eval(), (torch.randn(2, 3, 8, 8),))
    g = _group_of(graph, "conv1")
    assert Member("fc", "weight", 1, 0, 16, "in") in g.members  # 4x4 map per channel


def test_concat_offsets_and_per_channel_parameter() -> None:
    graph = build_depgraph(ResidualConcat().eval(), (torch.randn(2, 3, 8, 8),))
    b = _group_of(graph, "b")
    assert Member("head", "weight", 1, 8, 1, "in") in b.members  # after the 8 residual channels
    assert Member("", "gamma", 1, 8, 1, "norm") in b.members
    assert Member("dw", "weight", 0, 8, 1, "norm") in b.members  # depthwise: channel-wise
    assert all(m.offset < 12 for m in b.members if m.module == "head")  # input x is at 12..14


def test_attention_heads_are_one_group_of_head_dim_rows() -> None:
    model = create_model("transformer_block")
    graph = build_depgraph(model, example_inputs("transformer_block", 2))
    heads = [g for g in graph.groups if g.kind == "head"]
    assert len(heads) == 1 and heads[0].units == 4 and heads[0].prunable
    assert Member("attn.out_proj", "weight", 1, 0, 8, "in") in heads[0].members
    assert Member("attn.q_proj", "bias", 0, 0, 8, "out") in heads[0].members
    residual = _group_of(graph, "attn.out_proj")
    assert not residual.prunable and any("output" in r for r in residual.reasons)


def test_layernorm_groups_are_marked_lossy() -> None:
    model = create_model("gpt_tiny")
    graph = build_depgraph(model, example_inputs("gpt_tiny", 2))
    hidden = _group_of(graph, "tok_emb")
    assert hidden.lossy and hidden.prunable and "pos_emb" in hidden.modules("out")
    assert "ln_f" in hidden.modules("norm")


@pytest.mark.parametrize("case", [k for k, v in CASES.items() if v[2] != "prunes"])
def test_unfollowable_ops_make_the_group_unprunable_with_a_named_reason(case: str) -> None:
    factory, make_input, module = CASES[case]
    graph = build_depgraph(factory().eval(), (make_input(),))
    bad = [g for g in graph.unprunable() if module in g.modules()]
    assert bad and all("node" in r or "attention" in r for g in bad for r in g.reasons)
    assert module.split(".")[0] in graph.summary()


def test_hard_coded_width_names_the_view() -> None:
    factory, make_input, _ = CASES["hard_coded_view"]
    graph = build_depgraph(factory().eval(), (make_input(),))
    (reason,) = _group_of(graph, "conv1").reasons
    assert "hard-codes width 256" in reason and "'view'" in reason


def test_wrong_example_inputs_say_how_to_fix() -> None:
    with pytest.raises(DataError, match="example_inputs"):
        build_depgraph(create_model("cnn_bn"), (torch.randn(2, 5, 16, 16),))
