"""Layers refused before: grouped convolutions (pruned group-wise), PReLU (per-channel slopes), and
channel ``chunk`` / GLU gates (unit u = channel u of every piece); ``split`` by fixed sizes is
refused by name.
Removing zeroed units is exact (1e-5), the pruned model is smaller, exports to ONNX with ORT parity
and reloads from its artifact."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import slimkit as sk
from slimkit.prune import (
    Channel,
    apply_slices,
    build_depgraph,
    plan_channels,
    prune_channels,
    pruning_record,
)
from slimkit.prune.artifact import load_pruned, save_pruned

from .awkward_models import GroupedConv
from .test_channel import assert_exact_removal, zero_removed


class ResNeXtBlock(nn.Module):
    """Stem, a bottleneck with a grouped 3x3 (4 groups) and a residual add, PReLU activations."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.bn0 = nn.BatchNorm2d(16)
        self.act0 = nn.PReLU(16)
        self.reduce = nn.Conv2d(16, 12, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(12)
        self.grouped = nn.Conv2d(12, 24, 3, padding=1, groups=4, bias=False)
        self.bn2 = nn.BatchNorm2d(24)
        self.act2 = nn.PReLU()  # one shared slope
        self.expand = nn.Conv2d(24, 16, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(16)
        self.head = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act0(self.bn0(self.stem(x)))
        y = F.relu(self.bn1(self.reduce(x)))
        y = self.act2(self.bn2(self.grouped(y)))
        x = F.relu(x + self.bn3(self.expand(y)))
        return self.head(x.mean((2, 3)))


class Gated(nn.Module):
    """Gated 1-d convs: chunk(2) then a * sigmoid(b), nn.GLU, F.glu, chunk(3) summed."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv1d(4, 16, 3, padding=1)
        self.conv2 = nn.Conv1d(8, 12, 3, padding=1)
        self.glu = nn.GLU(dim=1)
        self.conv3 = nn.Conv1d(6, 10, 1)
        self.conv4 = nn.Conv1d(5, 18, 1)
        self.out = nn.Conv1d(6, 3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.conv1(x).chunk(2, dim=1)
        y = self.glu(self.conv2(a * torch.sigmoid(b)))
        y = F.glu(self.conv3(y), dim=1)
        p, q, r = torch.chunk(self.conv4(y), 3, 1)
        return self.out(p + torch.tanh(q) * r)


class DenseBlock(nn.Module):
    """DenseNet-style: each layer's output concatenated to its input, BN over the concatenation."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1, self.c1 = nn.BatchNorm2d(8), nn.Conv2d(8, 4, 3, padding=1)
        self.bn2, self.c2 = nn.BatchNorm2d(12), nn.Conv2d(12, 4, 3, padding=1)
        self.bn3, self.trans = nn.BatchNorm2d(16), nn.Conv2d(16, 8, 1)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = torch.cat([x, self.c1(F.relu(self.bn1(x)))], 1)
        x = torch.cat([x, self.c2(F.relu(self.bn2(x)))], 1)
        x = self.trans(F.relu(self.bn3(x)))
        return self.head(F.adaptive_avg_pool2d(x, 1).flatten(1))


class SplitBySize(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv1d(4, 16, 3, padding=1)
        self.out = nn.Conv1d(8, 3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = torch.split(self.conv1(x), 8, dim=1)  # 8 is written down: it cannot follow
        return self.out(a * b)


def _model(cls: type[nn.Module]) -> nn.Module:
    torch.manual_seed(0)
    m = cls().eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, nn.BatchNorm2d):
                mod.running_mean.normal_(0, 0.1, generator=g)
                mod.running_var.uniform_(0.5, 2, generator=g)
            if isinstance(mod, nn.PReLU):
                mod.weight.uniform_(0.05, 0.5, generator=g)
    return m


def _input(cls: type[nn.Module]) -> tuple[torch.Tensor, ...]:
    return (torch.randn(2, 4, 10),) if cls in (Gated, SplitBySize) else (torch.randn(2, 3, 8, 8),)


@pytest.mark.parametrize("cls", [GroupedConv, ResNeXtBlock, Gated, DenseBlock])
def test_zeroed_groups_and_channels_are_removed_exactly(cls: type[nn.Module]) -> None:
    model, x = _model(cls), _input(cls)
    assert assert_exact_removal(model, x, Channel(ratio=0.5, criterion="random")) > 0


def test_grouped_conv_loses_whole_groups_and_keeps_its_group_width(tmp_path: Path) -> None:
    model, x = _model(ResNeXtBlock), (torch.randn(2, 3, 8, 8),)
    graph = build_depgraph(model, x)
    (g,) = [g for g in graph.groups if "grouped" in g.modules("out")]
    assert g.prunable and g.units == 4  # the 4 conv groups: 3 input and 6 output channels each
    assert {"reduce", "bn1", "grouped", "bn2", "expand"} <= set(g.modules())
    stem = [g for g in graph.groups if "stem" in g.modules("out")][0]
    assert stem.prunable and "act0" in stem.modules("norm")  # PReLU(16): one slope per channel
    out = prune_channels(model, Channel(ratio=0.5), example_inputs=x)
    assert (out.grouped.groups, out.grouped.in_channels, out.grouped.out_channels) == (2, 6, 12)
    assert out.act0.num_parameters == out.stem.out_channels == 8
    assert sum(p.numel() for p in out.parameters()) < sum(p.numel() for p in model.parameters())
    rep = sk.export_onnx(out, tmp_path / "m.onnx", example_inputs=x, atol=1e-4)  # ORT parity
    assert rep.max_abs_err is not None and rep.max_abs_err <= 1e-4
    save_pruned(out, tmp_path / "art")
    back = load_pruned(tmp_path / "art", model=model)
    assert back.grouped.groups == 2
    with torch.no_grad():
        assert torch.equal(back(*x), out(*x))


def test_a_grouped_conv_on_the_model_input_is_left_whole() -> None:
    # removing a conv group would remove input channels too, and the model's input is fixed
    model = nn.Sequential(nn.Conv2d(4, 8, 3, groups=2), nn.ReLU(), nn.Conv2d(8, 2, 1)).eval()
    x = (torch.randn(1, 4, 8, 8),)
    graph = build_depgraph(model, x)
    assert not [g for g in graph.prunable() if "0" in g.modules()]
    with pytest.warns(UserWarning, match="removed nothing"):
        pruned = prune_channels(model, Channel(ratio=0.5), example_inputs=x)
    assert pruned[0].weight.shape == model[0].weight.shape


def test_chunked_channels_prune_together_and_export(tmp_path: Path) -> None:
    model, x = _model(Gated), _input(Gated)
    graph = build_depgraph(model, x)
    (g,) = [g for g in graph.groups if "conv1" in g.modules("out")]
    assert g.prunable and g.units == 8  # channel u and u + 8 gate each other
    offsets = sorted(m.offset for m in g.members if m.module == "conv1" and m.param == "weight")
    assert offsets == [0, 8]
    (g4,) = [g for g in graph.groups if "conv4" in g.modules("out")]
    assert g4.units == 6 and len([m for m in g4.members if m.fqn == "conv4.weight"]) == 3
    out = prune_channels(model, Channel(ratio=0.5), example_inputs=x)
    widths = [out.conv1.out_channels, out.conv2.out_channels, out.conv3.out_channels]
    assert widths == [8, 6, 6] and out.conv4.out_channels == 9 and out.out.in_channels == 3
    rep = sk.export_onnx(out, tmp_path / "g.onnx", example_inputs=x, atol=1e-4)  # ORT parity
    assert rep.max_abs_err is not None and rep.max_abs_err <= 1e-4


def test_split_by_fixed_sizes_is_refused_by_name() -> None:
    model, x = _model(SplitBySize), _input(SplitBySize)
    (g,) = [g for g in build_depgraph(model, x).groups if "conv1" in g.modules("out")]
    assert not g.prunable and "at node" in g.reasons[0]
    assert "split with 8" in g.reasons[0] and "chunk into equal pieces" in g.reasons[0]


def test_dense_concatenation_prunes_every_layer_and_exports(tmp_path: Path) -> None:
    model, x = _model(DenseBlock), _input(DenseBlock)
    out = prune_channels(model, Channel(ratio=0.5), example_inputs=x)
    assert [out.stem.out_channels, out.c1.out_channels, out.c2.out_channels] == [4, 2, 2]
    assert out.bn3.num_features == out.trans.in_channels == 8  # the concatenation, pruned
    rep = sk.export_onnx(out, tmp_path / "d.onnx", example_inputs=x, atol=1e-4)  # ORT parity
    assert rep.max_abs_err is not None and rep.max_abs_err <= 1e-4


class AudioHead(nn.Module):
    """A (channels, time) map, permuted to (time, channels) and flattened into a Linear: the
    Linear's column t * C + c reads channel c, so channel c owns T interleaved columns."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(4, 8, 3, padding=1)
        self.prelu = nn.PReLU(8)
        self.fc = nn.Linear(10 * 8, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 4, 10)
        h = self.prelu(self.conv(x)).permute(0, 2, 1)  # (B, T, C)
        return self.fc(h.reshape(h.shape[0], -1))  # (B, T * C)


def test_permute_reshape_into_a_linear_follows_the_interleaved_columns(tmp_path: Path) -> None:
    model, x = _model(AudioHead), (torch.randn(2, 4, 10),)
    assert assert_exact_removal(model, x, Channel(ratio=0.5, criterion="random")) == 4
    graph = build_depgraph(model, x)
    (g,) = [g for g in graph.groups if "conv" in g.modules("out")]
    offsets = sorted(m.offset for m in g.members if m.module == "fc")
    assert offsets == list(range(0, 80, 8))  # one run of 8 channels per time step
    out = prune_channels(model, Channel(ratio=0.5), example_inputs=x)
    kept = pruning_record(out)["slices"]["conv.weight"]["0"]
    cols = pruning_record(out)["slices"]["fc.weight"]["1"]
    assert cols == [t * 8 + c for t in range(10) for c in kept]  # not a channel-major block
    rep = sk.export_onnx(out, tmp_path / "a.onnx", example_inputs=x, atol=1e-4)  # ORT parity
    assert rep.max_abs_err is not None and rep.max_abs_err <= 1e-4
    data = [torch.randn(8, 4, 10) for _ in range(2)]
    t = prune_channels(model, Channel(ratio=0.5, criterion="thinet"), example_inputs=x, data=data)
    assert pruning_record(t)["thinet_refit"] == ["fc"]


class MHABlock(nn.Module):
    """nn.MultiheadAttention self-attention (4 heads of 4) in a residual block."""

    def __init__(self, batch_first: bool = True) -> None:
        super().__init__()
        self.inp = nn.Linear(8, 16)
        self.attn = nn.MultiheadAttention(16, 4, batch_first=batch_first)
        self.fc = nn.Linear(16, 32)
        self.out = nn.Linear(32, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        a, _ = self.attn(h, h, h, need_weights=False)
        return self.out(F.gelu(self.fc(a + h)))


class CrossMHA(MHABlock):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        a, _ = self.attn(h, h.flip(1), h.flip(1))
        return self.out(F.gelu(self.fc(a + h)))


def test_multihead_attention_prunes_by_heads_exports_and_reloads(tmp_path: Path) -> None:
    from slimkit.prune.mha import HeadAttention, split_attention

    for batch_first in (True, False):
        model = _model(lambda bf=batch_first: MHABlock(bf))  # type: ignore[misc]
        x = (torch.randn(2, 5, 8) if batch_first else torch.randn(5, 2, 8),)
        twin = copy.deepcopy(model)
        assert split_attention(twin) == ["attn"]
        mask = torch.ones(5, 5, dtype=torch.bool).triu(1)
        h = model.inp(x[0])
        with torch.no_grad():  # the split module computes what nn.MultiheadAttention does
            torch.testing.assert_close(twin(*x), model(*x), atol=1e-5, rtol=0)
            ref, got = model.attn(h, h, h, attn_mask=mask), twin.attn(h, h, h, attn_mask=mask)
            for r, g in zip(ref, got, strict=True):
                torch.testing.assert_close(g, r, atol=1e-5, rtol=0)
        assert assert_exact_removal(twin, x, Channel(ratio=0.5, criterion="random")) > 0
    out = prune_channels(model, Channel(ratio=0.5), example_inputs=x)
    assert isinstance(out.attn, HeadAttention) and out.attn.q_proj.out_features == 8  # 2 heads
    assert pruning_record(out)["attention_split"] == ["attn"]
    rep = sk.export_onnx(out, tmp_path / "m.onnx", example_inputs=x, atol=1e-4)  # ORT parity
    assert rep.max_abs_err is not None and rep.max_abs_err <= 1e-4
    save_pruned(out, tmp_path / "art")
    back = load_pruned(tmp_path / "art", model=model)
    with torch.no_grad():
        assert torch.equal(back(*x), out(*x))


def test_cross_attention_is_refused_by_name() -> None:
    model, x = _model(CrossMHA), (torch.randn(2, 5, 8),)
    out = prune_channels(model, Channel(ratio=0.5), example_inputs=x)
    assert out.attn.q_proj.out_features == 16  # no head removed
    assert any("separate key / value" in s for s in pruning_record(out)["skipped"])


def test_hugging_face_regnet_prunes_its_grouped_convs_and_squeeze_excitation(
    tmp_path: Path,
) -> None:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.RegNetConfig(embedding_size=16, hidden_sizes=[16, 32, 64, 128],
                                    depths=[1, 1, 1, 1], groups_width=8)  # fmt: skip
    model = transformers.RegNetForImageClassification(cfg).eval()
    x = (torch.randn(2, 3, 32, 32),)
    plan = plan_channels(model, Channel(ratio=0.5, criterion="random"), example_inputs=x)
    # only the classifier's output is refused: the grouped convs and SE gates all prune
    assert len(plan.skipped) == 1 and "classifier" in plan.skipped[0]
    zeroed = copy.deepcopy(model)
    zero_removed(zeroed, plan)
    pruned = apply_slices(copy.deepcopy(zeroed), plan.slices(zeroed))
    with torch.no_grad():
        ref, out = zeroed(*x).logits, pruned(*x).logits
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
    n = sum(p.numel() for p in pruned.parameters())
    assert n < 0.5 * sum(p.numel() for p in model.parameters())  # measured 22.4 k of 69.5 k
    g = pruned.regnet.encoder.stages[1].layers[0].layer[1].convolution
    assert g.groups == 2 and g.in_channels == 16  # 2 of the 4 groups of 8 channels removed


class ReadsInternals(MHABlock):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        a, _ = self.attn(h, h, h)
        return self.out(F.gelu(self.fc(a + h))) * self.attn.num_heads  # reads nn.MHA's own field


def test_attention_inside_torch_layers_or_read_by_the_model_is_left_as_it_is() -> None:
    enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 4, 32, batch_first=True), 1)
    model = nn.Sequential(nn.Linear(8, 16), enc, nn.Linear(16, 3)).eval()
    x = (torch.randn(2, 5, 8),)
    with pytest.warns(UserWarning, match="removed nothing"):  # the fast path reads in_proj_weight
        out = prune_channels(model, Channel(ratio=0.5), example_inputs=x)
    assert isinstance(out[1].layers[0].self_attn, nn.MultiheadAttention)
    assert "attention_split" not in pruning_record(out)
    model = _model(ReadsInternals)
    out = prune_channels(model, Channel(ratio=0.5), example_inputs=x)
    assert isinstance(out.attn, nn.MultiheadAttention)  # the split copy failed to run: kept
    with torch.no_grad():
        assert out(*x).shape == (2, 5, 3)
