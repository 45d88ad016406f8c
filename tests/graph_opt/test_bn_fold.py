from __future__ import annotations

import pytest
import torch
from torch import nn

from slimkit.graph_opt.bn_fold import fold_bn
from slimkit.testing.zoo import randomise_bn
from slimkit.zoo import create_model, example_inputs

_randomise_bn = randomise_bn


def _count_bn(model: nn.Module) -> int:
    return sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


ZOO_CNNS = ["cnn_bn", "residual", "inverted_residual", "concat_branch", "resnet18_cifar",
            "mobilenetv2_cifar", "digits_cnn", "small_cnn"]  # fmt: skip


@pytest.mark.parametrize("name", ZOO_CNNS)
def test_zoo_models_fold_every_bn_exactly(name: str) -> None:
    model = _randomise_bn(create_model(name))
    assert _count_bn(model) > 0
    (x,) = example_inputs(name, batch=4)
    folded, rep = fold_bn(model, return_report=True)
    assert _count_bn(folded) == 0 and not rep.kept, rep.summary()
    with torch.no_grad():
        ref, out = model(x), folded(x)
    scale = float(ref.abs().max())
    assert float((ref - out).abs().max()) <= 1e-5 * max(1.0, scale)
    assert _count_bn(model) > 0  # the original is untouched (not inplace)


class Awkward(nn.Module):
    """BN in the places real models put them: after ReLU, after pooling, before a padded conv."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.relu = nn.ReLU()
        self.bn_after_relu = nn.BatchNorm2d(8)  # feeds an unpadded 1x1 conv: folds forward
        self.conv2 = nn.Conv2d(8, 8, 1)
        self.pool = nn.MaxPool2d(2)
        self.bn_after_pool = nn.BatchNorm2d(8)  # feeds a padded 3x3 conv: must be kept
        self.conv3 = nn.Conv2d(8, 4, 3, padding=1)
        self.flat = nn.Flatten()
        self.bn1d = nn.BatchNorm1d(64)  # after flatten, feeds a Linear: folds forward (2-D)
        self.fc = nn.Linear(64, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv2(self.bn_after_relu(self.relu(self.conv1(x))))
        x = self.conv3(self.bn_after_pool(self.pool(x)))
        return self.fc(self.bn1d(self.flat(x)))


def test_bn_after_relu_and_pool_folds_only_where_exact() -> None:
    model = _randomise_bn(Awkward())
    x = torch.randn(3, 3, 8, 8)
    folded, rep = fold_bn(model, example_inputs=(x,), return_report=True)
    assert {b for b, _, _ in rep.folded} == {"bn_after_relu", "bn1d"}
    assert [b for b, _ in rep.kept] == ["bn_after_pool"]
    assert "zero-padded conv" in rep.summary()
    torch.testing.assert_close(folded(x), model(x), atol=1e-5, rtol=0)
    # without example inputs slimkit cannot see that bn1d's input is 2-D, so it keeps it
    _, rep2 = fold_bn(model, return_report=True)
    assert "bn1d" in dict(rep2.kept) and "pass example_inputs" in dict(rep2.kept)["bn1d"]


def test_training_mode_bn_is_kept_and_shared_conv_is_not_folded() -> None:
    m = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).train()
    _, rep = fold_bn(m, return_report=True)
    assert rep.kept and "training mode" in rep.kept[0][1]

    class Shared(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 1)
            self.bn = nn.BatchNorm2d(3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.bn(self.conv(x)) + self.conv(x)

    s = _randomise_bn(Shared())
    x = torch.randn(2, 3, 4, 4)
    folded, rep = fold_bn(s, return_report=True)
    assert rep.kept and not rep.folded
    torch.testing.assert_close(folded(x), s(x))
