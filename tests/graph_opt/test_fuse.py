"""Fusion: exact on every zoo model and on each hand-made pattern; refusals are reported."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from slimkit.errors import GraphCaptureError
from slimkit.graph_opt import Fuse, FusedConvAct, FusedLinearAct, fuse, optimize
from slimkit.testing.zoo import SMALL_KWARGS, randomise_bn, small_zoo
from slimkit.zoo.models import create_model, example_inputs, list_models

KWARGS = SMALL_KWARGS
_zoo = small_zoo
_randomise_bn = randomise_bn


def _assert_exact(a: nn.Module, b: nn.Module, *x: torch.Tensor, atol: float = 1e-5) -> None:
    with torch.no_grad():
        ref, out = a(*x), b(*x)
    assert out.shape == ref.shape and out.dtype == ref.dtype
    err = float((ref.double() - out.double()).abs().max())
    assert err <= atol * max(1.0, float(ref.abs().max())), err


def _count(model: nn.Module, kind: type | tuple[type, ...]) -> int:
    return sum(isinstance(m, kind) for m in model.modules())


@pytest.mark.parametrize("name", list_models())
def test_optimize_is_exact_on_every_zoo_model(name: str) -> None:
    model, x = _zoo(name)
    _randomise_bn(model)
    opt, rep = optimize(model, x)
    _assert_exact(model, opt, *x)
    with torch.no_grad():
        scale = max(1.0, float(model(*x).abs().max()))
    assert rep.max_abs_err is not None and rep.max_abs_err <= 1e-5 * scale
    assert _count(opt, nn.modules.batchnorm._BatchNorm) == 0
    n_conv_act = sum(1 for k, _, _ in rep.fuse.fused if k.startswith("conv+"))
    assert _count(opt, FusedConvAct) == n_conv_act
    if _count(model, nn.Conv2d) and _count(model, (nn.ReLU, nn.ReLU6)):
        assert n_conv_act > 0, rep.fuse.summary()  # every zoo CNN has Conv-BN-ReLU blocks
    if _count(model, nn.GELU):
        assert _count(opt, FusedLinearAct) > 0, rep.fuse.summary()
    assert _count(opt, (nn.Dropout, nn.Identity)) == 0
    assert _count(model, nn.modules.batchnorm._BatchNorm) == _count(
        create_model(name, **KWARGS.get(name, {})), nn.modules.batchnorm._BatchNorm
    )  # the original is untouched


class Affine(nn.Module):
    """Per-channel scale and shift after a conv and a Linear, in the forms users write them."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1, bias=False)
        self.scale = nn.Parameter(torch.randn(6, 1, 1))  # (C, 1, 1)
        self.register_buffer("shift", torch.randn(1, 6, 1, 1))  # (1, C, 1, 1): needs the rank
        self.relu = nn.ReLU()
        self.fc = nn.Linear(24, 5)
        self.register_buffer("div", torch.rand(5) + 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.relu(self.conv(x) * self.scale + self.shift)
        y = F.adaptive_avg_pool2d(y, 2).flatten(1)  # (B, 6, 2, 2) -> (B, 24)
        return 1.5 - (self.fc(y) / self.div).mul(2)


def test_per_channel_affine_folds_into_conv_and_linear() -> None:
    model = Affine().eval()
    x = torch.randn(2, 3, 8, 8)
    fused, rep = fuse(model, example_inputs=(x,), return_report=True)
    _assert_exact(model, fused, x)
    assert [k for k, _, _ in rep.fused].count("affine") == 5 and not rep.kept, rep.summary()
    assert isinstance(fused.get_submodule("conv"), FusedConvAct)  # conv * a + b -> relu fused
    assert set(rep.removed) == {"scale", "shift", "div"}
    assert not hasattr(fused, "scale") and hasattr(model, "scale")
    # without example inputs slimkit cannot see that (1, C, 1, 1) broadcasts over a batch
    fused2, rep2 = fuse(model, return_report=True)
    assert any("pass example_inputs" in why for _, why in rep2.kept), rep2.summary()
    _assert_exact(model, fused2, x)


class NotPerChannel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.register_buffer("spatial", torch.randn(1, 1, 5, 5))  # varies over positions
        self.register_buffer("wide", torch.randn(4, 1, 1, dtype=torch.float64))
        self.conv2 = nn.Conv2d(4, 4, 1)
        self.fc = nn.Linear(4, 4)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x) * self.spatial
        z = (self.conv2(y) * self.wide).float()
        return self.bn(z) + self.fc(z.mean((2, 3))).view(-1, 4, 1, 1) * 3.0


def test_constants_that_are_not_per_channel_are_left_alone() -> None:
    model = NotPerChannel().eval()
    x = torch.randn(2, 3, 5, 5)
    fused, rep = fuse(model, example_inputs=(x,), return_report=True)
    _assert_exact(model, fused, x)
    kept = dict(rep.kept)
    assert "not per-channel" in kept["Conv2d 'conv' -> mul"]
    assert "change the output dtype" in kept["Conv2d 'conv2' -> mul_1"]
    # fc's output is reshaped before the * 3.0, so there is no candidate there
    assert not any(k.startswith("Linear") for k in kept)
    _, rep2 = fuse(nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)).eval(), return_report=True)
    assert "fold_bn" in rep2.kept[0][1]


class Pads(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.pad = nn.ZeroPad2d(1)
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)  # 1 + 1
        self.conv2 = nn.Conv2d(4, 4, 3, padding="valid", padding_mode="reflect")
        self.conv3 = nn.Conv2d(4, 4, 3)
        self.reflect = nn.ReflectionPad2d(1)
        self.conv4 = nn.Conv2d(4, 4, 3)
        self.conv5 = nn.Conv1d(4, 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv1(self.pad(x))
        y = self.conv2(F.pad(y, (2, 2, 1, 1)))  # symmetric per dimension: folds
        y = self.conv3(F.pad(y, (0, 1, 0, 1)))  # asymmetric: kept
        y = self.conv4(self.reflect(y))  # not zero padding: kept
        z = F.pad(y.flatten(2), (1, 1), value=0.0)  # (B, 4, H*W + 2), Conv1d
        return self.conv5(z).sum(-1) + self.conv5.bias


def test_zero_pads_fold_into_conv_padding_and_others_are_kept() -> None:
    model = Pads().eval()
    x = torch.randn(2, 3, 6, 6)
    fused, rep = fuse(model, return_report=True)
    _assert_exact(model, fused, x)
    assert [k for k, _, _ in rep.fused].count("pad") == 3
    assert fused.get_submodule("conv1").padding == (2, 2)
    assert fused.get_submodule("conv2").padding == (1, 2)
    assert fused.get_submodule("conv2").padding_mode == "zeros"
    reasons = " ".join(why for _, why in rep.kept)
    assert "asymmetric" in reasons and "copies of the input" in reasons
    assert fused.get_submodule("conv5").padding == (1,)  # the Conv1d's bias is read elsewhere too


class Linears(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(16, 32)
        self.b = nn.Linear(32, 8, bias=False)  # a -> b: 16*8 MACs instead of 16*32 + 32*8
        self.down = nn.Linear(8, 2)
        self.up = nn.Linear(2, 8)  # low rank: 8*2 + 2*8 < 8*8, kept split
        self.c = nn.Linear(8, 8)
        self.d = nn.Linear(8, 8)  # c has a second user: kept

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.b(self.a(x))  # merges
        y = self.up(self.down(torch.relu(y)))  # low rank: kept
        z = self.c(torch.relu(y))
        return self.d(z) + z


def test_linear_pairs_merge_only_when_cheaper() -> None:
    model = Linears().eval()
    x = torch.randn(4, 3, 16)
    fused, rep = fuse(model, return_report=True)
    _assert_exact(model, fused, x)
    assert [w for k, w, _ in rep.fused if k == "linear+linear"] == ["Linear 'a' -> Linear 'b'"]
    merged = fused.get_submodule("a.linear")  # then fused with the ReLU after it
    assert (merged.in_features, merged.out_features) == (16, 8) and not hasattr(fused, "b")
    kept = dict(rep.kept)
    assert "low-rank" in kept["Linear 'down' -> Linear 'up'"]
    assert "2 users" in kept["Linear 'c' -> Linear 'd'"]


class Acts(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 4, 3, padding=1)
        self.c2 = nn.Conv2d(4, 4, 3, padding=1)
        self.c3 = nn.Conv2d(4, 4, 1)
        self.c4 = nn.Conv2d(4, 4, 1)
        self.relu6 = nn.ReLU6()
        self.gelu = nn.GELU()
        self.drop = nn.Dropout(0.5)
        self.ident = nn.Identity()
        self.fc = nn.Linear(4, 8)
        self.fc2 = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.c1(x))  # functional ReLU: fuses
        y = self.relu6(self.ident(self.c2(y)))  # Identity removed first, then fuses
        z = self.c3(y)
        y = torch.relu(z) + z  # conv output has a second user: kept
        y = self.gelu(self.c4(y))  # no Conv+GELU unit: kept
        y = self.drop(y.mean((2, 3)))
        return self.fc2(F.gelu(self.fc(y), approximate="tanh"))


def test_activations_fuse_into_units_and_refusals_are_reported() -> None:
    model = Acts().eval()
    x = torch.randn(2, 3, 6, 6)
    fused, rep = fuse(model, Fuse(merge_linear=False), return_report=True)
    _assert_exact(model, fused, x)
    kinds = [k for k, _, _ in rep.fused]
    assert kinds.count("identity") == 2  # nn.Identity and eval-mode Dropout
    assert kinds.count("conv+relu") == 1 and kinds.count("conv+relu6") == 1
    assert kinds.count("linear+gelu") == 1
    assert isinstance(fused.get_submodule("c1"), FusedConvAct)
    assert isinstance(fused.get_submodule("c2").act, nn.ReLU6)
    unit = fused.get_submodule("fc")
    assert isinstance(unit, FusedLinearAct) and unit.act.approximate == "tanh"
    kept = dict(rep.kept)
    assert "2 users" in kept["Conv2d 'c3' + relu"]
    assert "no fused unit for a conv + gelu" in kept["Conv2d 'c4' + GELU 'gelu'"]
    # a model in training mode keeps its dropout, and says so
    _, rep_train = fuse(model.train(), return_report=True)
    assert any("training mode" in why for _, why in rep_train.kept)


def test_fused_model_exports_to_onnx_as_conv_relu(tmp_path: Path) -> None:
    import onnx

    from slimkit.export.onnx import export_onnx

    model = _randomise_bn(create_model("cnn_bn"))
    (x,) = example_inputs("cnn_bn", batch=2)
    opt, rep = optimize(model, (x,))
    assert _count(opt, FusedConvAct) == 2
    report = export_onnx(opt, tmp_path / "m.onnx", example_inputs=(x,))  # checks ORT parity
    assert report.max_abs_err is not None and report.max_abs_err < 1e-4
    graph = onnx.load(str(tmp_path / "m.onnx")).graph
    producer = {out: n for n in graph.node for out in n.output}
    relus = [n for n in graph.node if n.op_type == "Relu"]
    assert len(relus) == 2 and all(producer[r.input[0]].op_type == "Conv" for r in relus)
    assert not any(n.op_type == "BatchNormalization" for n in graph.node)


class Chain(nn.Module):
    """Conv -> BN -> a per-channel scale computed in forward -> ReLU, then a Linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.log_scale = nn.Parameter(torch.randn(8) * 0.1)
        self.relu = nn.ReLU()
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn(self.conv(x)) * self.log_scale.exp().view(-1, 1, 1)
        return self.head(self.relu(y).mean((2, 3)))


def test_optimize_chains_bn_fold_const_fold_and_fuse() -> None:
    import json

    from slimkit.core.graph import capture
    from slimkit.graph_opt import FUSED, fold_bn

    model = _randomise_bn(Chain())
    x = torch.randn(2, 3, 8, 8)
    opt, rep = optimize(model, x)
    _assert_exact(model, opt, x)
    assert rep.max_abs_err is not None and rep.max_abs_err <= 1e-5
    assert [b for b, _, _ in rep.bn_fold.folded] == ["bn"]
    assert [e for e, _ in rep.const_fold.folded] == ["log_scale.exp().view(-1, 1, 1)"]
    assert [k for k, _, _ in rep.fuse.fused] == ["affine", "conv+relu"]
    # the whole block is one unit; only its folded weight and bias remain
    assert isinstance(opt.get_submodule("conv"), FusedConvAct)
    assert {n for n, _ in opt.named_parameters()} == {
        "conv.conv.weight",
        "conv.conv.bias",
        "head.weight",
        "head.bias",
    }
    assert "fuse: 2 rewrites" in rep.summary()
    json.dumps(rep.to_dict())
    # fuse alone evaluates the constant scale itself
    alone, rep_alone = fuse(fold_bn(model), example_inputs=(x,), return_report=True)
    assert [k for k, _, _ in rep_alone.fused] == ["affine", "conv+relu"]
    assert rep_alone.removed == ["log_scale"]
    _assert_exact(model, alone, x)
    # capturing again with the fused types as leaves keeps the unit whole
    again = capture(opt, leaves=FUSED)
    assert [n.target for n in again.graph.nodes if n.op == "call_module"] == ["conv", "head"]
    # optimizing twice (fold_bn traces through the unit) rebuilds it under the same name
    twice, rep_twice = optimize(opt, x)
    assert isinstance(twice.get_submodule("conv"), FusedConvAct)
    assert {n for n, _ in twice.named_parameters()} == {n for n, _ in opt.named_parameters()}
    assert rep_twice.max_abs_err is not None and rep_twice.max_abs_err <= 1e-5


class Branchy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:  # data-dependent control flow: fx cannot trace it
            return self.conv(x)
        return x


def test_untraceable_model_gets_a_clear_error() -> None:
    model = nn.Sequential(nn.Conv2d(3, 3, 1), Branchy())
    with pytest.raises(GraphCaptureError, match=r"module '1' \(Branchy\)") as err:
        fuse(model)
    assert "Scope(exclude=['1'])" in str(err.value)
