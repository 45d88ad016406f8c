"""Hugging Face BERT, built from a config (nothing downloaded), prunes by whole attention heads and
FFN neurons through the torch.export capture; it stays exact on already-zero units, exports to ONNX
and reloads from its artifact with the attention modules' head counts in step."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from slimkit.errors import CheckpointError, GraphCaptureError, UnsupportedError
from slimkit.prune import (
    Channel,
    DepGraph,
    Group,
    Member,
    build_depgraph,
    plan_channels,
    prune_channels,
    pruning_record,
)
from slimkit.prune.artifact import load_pruned, save_pruned
from slimkit.prune.hf_attention import head_counts, sync_head_counts
from slimkit.zoo.models import create_model, example_inputs

transformers = pytest.importorskip("transformers")

HEADS, HEAD_DIM, FFN = 4, 16, 128


def _config(**kw: Any) -> Any:
    return transformers.BertConfig(
        hidden_size=HEADS * HEAD_DIM,
        num_hidden_layers=2,
        num_attention_heads=HEADS,
        intermediate_size=FFN,
        vocab_size=500,
        **kw,
    )


def _classifier(**kw: Any) -> nn.Module:
    return transformers.BertForSequenceClassification(_config(**kw)).eval()


def _inputs(batch: int = 2, seq: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(1, 500, (batch, seq), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[1, seq - 5 :] = 0  # padding, so the mask really takes part
    return ids, mask


def _logits(model: nn.Module, x: tuple[torch.Tensor, ...]) -> torch.Tensor:
    with torch.no_grad():
        return model(*x).logits


def _params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def _attn(model: nn.Module, layer: int) -> Any:
    return model.bert.encoder.layer[layer].attention  # type: ignore[union-attr,index]


def _producing(graph: DepGraph, module: str) -> Group:
    (g,) = [g for g in graph.groups if module in g.modules("out")]
    return g


@pytest.fixture(scope="module")
def pruned() -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    model = _classifier()
    return model, prune_channels(model, Channel(ratio=0.5), example_inputs=_inputs())


def test_graph_groups_heads_ffn_and_hidden_width() -> None:
    model, x = _classifier(), _inputs()
    with pytest.raises(GraphCaptureError):  # fx cannot trace HF code: the graph comes from export
        build_depgraph(model, x, method="fx")
    graph = build_depgraph(model, x)
    heads = [g for g in graph.groups if g.kind == "head"]
    assert [(g.units, g.prunable) for g in heads] == [(HEADS, True)] * 2
    (h0,) = [g for g in heads if "bert.encoder.layer.0.attention.self.query" in g.modules()]
    for proj in ("query", "key", "value"):  # q/k/v rows and the output columns, a head at a time
        assert f"bert.encoder.layer.0.attention.self.{proj}" in h0.modules("out")
    dense = "bert.encoder.layer.0.attention.output.dense"
    assert [m for m in h0.members if m.module == dense] == [
        Member(dense, "weight", 1, 0, HEAD_DIM, "in")
    ]
    ffn = _producing(graph, "bert.encoder.layer.0.intermediate.dense")
    assert (
        ffn.units == FFN and ffn.prunable and "bert.encoder.layer.0.output.dense" in ffn.modules()
    )
    hidden = _producing(graph, "bert.embeddings.word_embeddings")
    assert hidden.prunable and hidden.lossy  # the residual stream, under every LayerNorm
    out = _producing(graph, "classifier")
    assert not out.prunable and "reaches the model output" in out.reasons[0]


def test_heads_are_pruned_whole_and_attention_attributes_follow(
    pruned: tuple[nn.Module, nn.Module],
) -> None:
    model, small = pruned
    assert _params(small) < _params(model)
    rec = pruning_record(small)
    assert rec is not None
    for layer in range(2):
        attn = _attn(small, layer)
        widths = [getattr(attn.self, p).out_features for p in ("query", "key", "value")]
        assert widths == [HEADS // 2 * HEAD_DIM] * 3
        assert attn.output.dense.in_features == HEADS // 2 * HEAD_DIM
        prefix = f"bert.encoder.layer.{layer}.attention"
        kept = rec["slices"][f"{prefix}.self.query.weight"]["0"]
        starts = kept[::HEAD_DIM]  # whole heads: blocks of HEAD_DIM rows starting at a head
        assert all(s % HEAD_DIM == 0 for s in starts)
        assert kept == [s + i for s in starts for i in range(HEAD_DIM)]
        assert rec["slices"][f"{prefix}.self.value.weight"]["0"] == kept
        assert rec["slices"][f"{prefix}.output.dense.weight"]["1"] == kept
    synced = sync_head_counts(small)  # (also done on reload, see test_..._reloads_...)
    for layer in range(2):
        attn = _attn(small, layer).self
        assert synced[f"bert.encoder.layer.{layer}.attention.self"] == {
            "num_attention_heads": HEADS // 2,
            "all_head_size": HEADS // 2 * HEAD_DIM,
        }
        assert attn.num_attention_heads * attn.attention_head_size == attn.query.out_features
        assert attn.all_head_size == attn.query.out_features
    logits = _logits(small, _inputs())
    assert logits.shape == (2, 2) and torch.isfinite(logits).all()


def test_ffn_neurons_and_hidden_width_are_pruned(pruned: tuple[nn.Module, nn.Module]) -> None:
    _, small = pruned
    for layer in small.bert.encoder.layer:  # type: ignore[union-attr]
        assert layer.intermediate.dense.out_features == FFN // 2
        assert layer.output.dense.in_features == FFN // 2
    emb = small.bert.embeddings  # type: ignore[union-attr]
    assert emb.word_embeddings.embedding_dim == emb.LayerNorm.normalized_shape[0] == 32
    assert small.classifier.out_features == 2  # type: ignore[union-attr]


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
def test_removing_zeroed_heads_and_neurons_is_exact(attn_implementation: str) -> None:
    model = _classifier(attn_implementation=attn_implementation)
    x = _inputs()
    zero_heads = {0: [1], 1: [3]}
    zero_ffn = {0: list(range(0, FFN, 4)), 1: list(range(1, FFN, 4))}  # a quarter of each
    with torch.no_grad():
        for i, layer in enumerate(model.bert.encoder.layer):  # type: ignore[union-attr]
            rows = [h * HEAD_DIM + k for h in zero_heads[i] for k in range(HEAD_DIM)]
            for proj in (layer.attention.self.query, layer.attention.self.key):
                proj.weight[rows] = 0.0
                proj.bias[rows] = 0.0
            layer.attention.self.value.weight[rows] = 0.0
            layer.attention.self.value.bias[rows] = 0.0
            layer.attention.output.dense.weight[:, rows] = 0.0
            layer.intermediate.dense.weight[zero_ffn[i]] = 0.0
            layer.intermediate.dense.bias[zero_ffn[i]] = 0.0
            layer.output.dense.weight[:, zero_ffn[i]] = 0.0
    # LayerNorm widths and the pooler keep their size: only the zeroed units go
    cfg = Channel(ratio=0.25, keep_normalized=True, exclude=[r"bert\.pooler\.dense"])
    plan = plan_channels(model, cfg, example_inputs=x)
    removed = sorted(plan.remove.values())
    assert removed == sorted([zero_heads[0], zero_heads[1], zero_ffn[0], zero_ffn[1]])
    small = prune_channels(model, cfg, example_inputs=x)
    assert _params(small) < _params(model)
    # lossless: measured 2e-09
    torch.testing.assert_close(_logits(small, x), _logits(model, x), atol=1e-5, rtol=0)


def test_pruned_bert_exports_to_onnx_with_ort_parity(
    pruned: tuple[nn.Module, nn.Module], tmp_path: Path
) -> None:
    from slimkit.export.onnx import export_onnx

    _, small = pruned
    rep = export_onnx(small, tmp_path / "bert.onnx", example_inputs=_inputs(), atol=1e-5)
    # measured 7e-09 at batch 3 (a batch size the export never saw)
    assert rep.max_abs_err is not None and rep.max_abs_err < 1e-5 and rep.parity_batch == 3


def test_pruned_bert_reloads_from_its_artifact(
    pruned: tuple[nn.Module, nn.Module], tmp_path: Path
) -> None:
    _, small = pruned
    save_pruned(small, tmp_path / "art")
    record = json.loads((tmp_path / "art" / "pruning.json").read_text())
    assert record["attributes"]["bert.encoder.layer.1.attention.self"]["num_attention_heads"] == 2
    fresh = transformers.BertForSequenceClassification(_config())  # other weights, train mode
    reloaded = load_pruned(tmp_path / "art", model=fresh).eval()
    x = _inputs(batch=3, seq=12)
    torch.testing.assert_close(_logits(reloaded, x), _logits(small, x), atol=0, rtol=0)
    assert head_counts(reloaded) == record["attributes"]
    for layer in range(2):  # set on reload, without calling sync_head_counts
        assert _attn(reloaded, layer).self.num_attention_heads == HEADS // 2
        assert _attn(reloaded, layer).self.all_head_size == HEADS // 2 * HEAD_DIM
    assert _attn(fresh, 0).self.num_attention_heads == HEADS  # the fresh model is not modified
    assert _params(fresh) > _params(reloaded)


def test_record_whose_head_counts_disagree_with_the_weights_is_refused(
    pruned: tuple[nn.Module, nn.Module], tmp_path: Path
) -> None:
    _, small = pruned
    path = save_pruned(small, tmp_path / "art") / "pruning.json"
    record = json.loads(path.read_text())
    record["attributes"]["bert.encoder.layer.0.attention.self"]["num_attention_heads"] = 3
    path.write_text(json.dumps(record))
    with pytest.raises(CheckpointError, match=r"layer\.0\.attention\.self.*num_attention_heads"):
        load_pruned(tmp_path / "art", model=_classifier())


def test_bert_model_prunes_heads_and_refuses_its_output_width_by_name() -> None:
    model = transformers.BertModel(_config()).eval()
    x = _inputs()
    small = prune_channels(model, Channel(ratio=0.5), example_inputs=x)
    assert small.encoder.layer[0].attention.self.query.out_features == 32  # type: ignore[union-attr,index]
    assert small.encoder.layer[0].intermediate.dense.out_features == FFN // 2  # type: ignore[union-attr,index]
    with torch.no_grad():  # last_hidden_state and pooler_output are the model's output: kept
        assert small(*x).last_hidden_state.shape == model(*x).last_hidden_state.shape
    rec = pruning_record(small)
    assert rec is not None and any("word_embeddings" in s for s in rec["skipped"])
    with pytest.raises(
        UnsupportedError,
        match=r"'embeddings\.word_embeddings'.*reaches the model output.*Scope\(exclude=",
    ):
        prune_channels(model, Channel(include=["embeddings.word_embeddings"]), example_inputs=x)


@pytest.mark.parametrize("name", ["transformer_block", "residual", "cnn_bn"])
def test_export_capture_finds_the_groups_fx_finds(name: str) -> None:
    def groups(method: str) -> list[tuple[Any, ...]]:
        graph = build_depgraph(model, x, method=method)  # type: ignore[arg-type]
        return sorted(
            (g.kind, g.units, g.prunable, g.lossy, sorted(map(str, g.members)))
            for g in graph.groups
        )

    model, x = create_model(name).eval(), example_inputs(name, 2)
    assert groups("export") == groups("fx")


def test_pruning_without_heads_leaves_head_counts_alone(tmp_path: Path) -> None:
    model, x = _classifier(), _inputs()
    small = prune_channels(model, Channel(ratio=0.5, heads=False), example_inputs=x)
    assert _attn(small, 0).self.query.out_features == HEADS * HEAD_DIM
    save_pruned(small, tmp_path / "art")
    assert "attributes" not in json.loads((tmp_path / "art" / "pruning.json").read_text())
    reloaded = load_pruned(tmp_path / "art", model=_classifier()).eval()
    assert _attn(reloaded, 1).self.num_attention_heads == HEADS
    torch.testing.assert_close(_logits(reloaded, x), _logits(small, x), atol=0, rtol=0)
