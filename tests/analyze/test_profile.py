from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from slimkit.analyze.profile import profile_model
from slimkit.zoo.models import create_model, example_inputs


def _row(prof, name):  # type: ignore[no-untyped-def]
    return next(r for r in prof.rows if r.name == name)


def test_resnet18_macs_and_params() -> None:
    model = create_model("resnet18")
    prof = profile_model(model, example_inputs("resnet18", 1))
    # Hand count at 224x224, MACs = out_h * out_w * out_ch * (in_ch / groups) * kh * kw:
    #   conv1 7x7/2 3->64 at 112x112: 112*112*64 * 3*7*7                        = 118,013,952
    #   layer1 4 convs 3x3 64->64 at 56x56: 4 * 56*56*64 * 64*9                  = 462,422,016
    #   layer2 at 28x28: 3x3 64->128 + 3 x 3x3 128->128 + 1x1 64->128 downsample
    #     = 784*128*(64*9 + 3*128*9 + 64)                                        = 411,041,792
    #   layer3 (14x14, 128->256) and layer4 (7x7, 256->512): the same count each  = 411,041,792
    #   fc 512 -> 1000                                                            =     512,000
    #   total 118,013,952 + 462,422,016 + 3 * 411,041,792 + 512,000            = 1,814,073,344
    # the "1.82 GMACs" usually quoted for torchvision's resnet18 (e.g. fvcore / ptflops tables).
    by_op = prof.macs_by_op()
    assert by_op["conv"] + by_op["linear"] == pytest.approx(1_814_073_344, rel=0.01)
    assert _row(prof, "conv1").macs == 118_013_952  # exact: the formula above
    assert _row(prof, "conv1").output_shape == (1, 64, 112, 112)
    assert prof.total_params == sum(p.numel() for p in model.parameters()) == 11_689_512
    assert sum(r.params for r in prof.rows) == prof.total_params  # every parameter on some row
    assert prof.method == "fx" and not prof.warnings
    # BN / ReLU / pooling / residual adds have rows with bytes but no MACs
    for op in ("norm", "elementwise", "pool"):
        rows = [r for r in prof.rows if r.op == op]
        assert rows and all(r.macs == 0 and r.output_bytes > 0 for r in rows)
    assert any(r.target == "add" for r in prof.rows)  # the functional residual add is seen


def test_mobilenetv2_macs_with_depthwise() -> None:
    model = create_model("mobilenetv2")
    prof = profile_model(model, example_inputs("mobilenetv2", 1))
    # MobileNetV2 1.0 at 224: "300M" multiply-adds in Sandler et al. 2018 (arXiv:1801.04381,
    # Table 4); the exact layer count of torchvision's architecture is 300.77 M, measured here.
    by_op = prof.macs_by_op()
    assert by_op["conv"] + by_op["linear"] == pytest.approx(300_800_000, rel=0.01)
    assert prof.total_params == sum(p.numel() for p in model.parameters()) == 3_504_872
    # first depthwise 3x3 (32 channels at 112x112): in_ch / groups = 1
    dw = next(r for r in prof.rows if r.op == "conv" and r.name.endswith("conv.0.0"))
    assert dw.output_shape == (1, 32, 112, 112) and dw.macs == 112 * 112 * 32 * 1 * 9


def test_bert_encoder_counts_attention_matmuls() -> None:
    model = create_model("bert_encoder")
    prof = profile_model(model, example_inputs("bert_encoder", 1))  # seq 128, hidden 256
    by_op = prof.macs_by_op()
    # QK^T and AV: 4 layers * 2 * T*T*d per sample (heads split d, they do not add work)
    assert by_op["matmul"] == 4 * 2 * 128 * 128 * 256
    # q/k/v/out projections (4 * d*d) and the FFN (2 * d*1024), per token, per layer
    assert by_op["linear"] == 4 * 128 * (4 * 256 * 256 + 2 * 256 * 1024)
    qk = _row(prof, "matmul")
    assert qk.scope == "blocks.0.attn" and qk.output_shape == (1, 4, 128, 128)
    assert {"embedding", "norm", "elementwise"} <= set(by_op)
    assert prof.total_params == sum(p.numel() for p in model.parameters())
    tok = _row(prof, "tok_emb")  # reads the gathered rows, not the 31 MB table
    assert tok.weight_bytes == 128 * 256 * 4 and tok.input_bytes == 128 * 8  # int64 ids
    json.dumps(prof.to_dict())  # plain data


def test_macs_scale_with_batch_and_bytes_with_dtype() -> None:
    model = create_model("transformer_block")
    one = profile_model(model, example_inputs("transformer_block", 1))
    four = profile_model(model, example_inputs("transformer_block", 4), dtype_bytes=1)
    assert four.total_macs == 4 * one.total_macs
    assert four.weight_bytes * 4 == one.weight_bytes == one.total_params * 4


def test_grouped_conv_functional_ops_and_lstm() -> None:
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(8, 16, 3, padding=1, groups=4)
            self.w = nn.Parameter(torch.randn(5, 16))  # used functionally
            self.lstm = nn.LSTM(5, 6, num_layers=2, batch_first=True, bidirectional=True)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.conv(x).flatten(2).transpose(1, 2)  # (B, 64, 16)
            h = F.linear(h, self.w)  # (B, 64, 5)
            g = torch.bmm(h, h.transpose(1, 2))  # (B, 64, 64)
            out, _ = self.lstm(h)
            return out.sum() + g.sum()

    prof = profile_model(Net(), torch.randn(2, 8, 8, 8))
    assert _row(prof, "conv").macs == 2 * 16 * 8 * 8 * (8 // 4) * 9
    assert _row(prof, "linear").macs == 2 * 64 * 5 * 16 and _row(prof, "linear").params == 80
    assert _row(prof, "bmm").macs == 2 * 64 * 64 * 5
    # LSTM: steps * sum over layers and directions of 4 * H * (I + H)
    lstm = 2 * 64 * (2 * 4 * 6 * (5 + 6) + 2 * 4 * 6 * (12 + 6))
    assert _row(prof, "lstm").macs == lstm and _row(prof, "lstm").op == "rnn"
    assert sum(r.params for r in prof.rows) == prof.total_params


class Gate(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:  # data-dependent control flow: torch.fx cannot trace this
            return self.fc(x)
        return self.fc(-x)


class Untraceable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.pre = nn.Linear(4, 8)
        self.gate = Gate()
        self.post = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.gate(self.pre(x))
        return self.post(h @ h.transpose(0, 1) @ h)  # functional matmuls outside the gate


def test_untraceable_submodule_still_counted_with_a_warning() -> None:
    with pytest.warns(UserWarning, match="could not trace module 'gate' \\(Gate"):
        prof = profile_model(Untraceable(), torch.randn(3, 4))
    assert prof.method == "fx+hooks" and "'gate'" in prof.warnings[0]
    assert "functional ops" in prof.warnings[0]
    assert _row(prof, "pre").macs == 3 * 8 * 4
    assert _row(prof, "gate.fc").macs == 3 * 8 * 8  # inside the untraceable module, via a hook
    assert _row(prof, "post").macs == 3 * 2 * 8
    # the matmuls outside the gate are still found through the graph
    assert prof.macs_by_op()["matmul"] == 3 * 3 * 8 + 3 * 8 * 3


def test_untraceable_top_level_falls_back_to_hooks() -> None:
    class Top(Untraceable):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if x.mean() > 10:  # in the model's own forward: no graph at all
                x = x * 2
            return self.post(self.gate.fc(self.pre(x)))

    with pytest.warns(UserWarning, match="top-level forward of Top.*functional ops"):
        prof = profile_model(Top(), torch.randn(3, 4))
    assert prof.method == "hooks"
    assert [r.name for r in prof.rows] == ["pre", "gate.fc", "post"]
    assert prof.total_macs == 3 * (8 * 4 + 8 * 8 + 2 * 8)
