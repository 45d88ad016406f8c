"""Convolutional networks: ResNet-18 and MobileNetV2 with torchvision's structure (same parameter
names and counts, so a torchvision state dict loads), their 32x32 CIFAR variants, and the small CNNs
the bundled tasks train. Activations are not in-place, so that hooks see every tensor unchanged, and
no activation module is called twice, so that each call site can get its own observer."""

from __future__ import annotations

import torch
from torch import nn

from slimkit.zoo.models import MODELS, images, logits


def make_divisible(value: float, divisor: int = 8) -> int:
    """``value`` rounded to a multiple of ``divisor``, never more than 10 % below it."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * value else rounded


def conv_bn(
    cin: int,
    cout: int,
    kernel: int = 3,
    stride: int = 1,
    groups: int = 1,
    act: type[nn.Module] | None = nn.ReLU,
) -> nn.Sequential:
    """Conv (no bias, 'same' padding) -> BatchNorm -> activation, indexed 0 / 1 / 2."""
    layers: list[nn.Module] = [
        nn.Conv2d(cin, cout, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
    ]
    if act is not None:
        layers.append(act())
    return nn.Sequential(*layers)


class BasicBlock(nn.Module):
    """ResNet basic block: two 3x3 conv-BN, plus the input (through a 1x1 conv-BN ``downsample``
    when the stride or the width changes), then ReLU."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu2 = nn.ReLU()
        self.downsample: nn.Module | None = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu1(self.bn1(self.conv1(x)))
        return self.relu2(self.bn2(self.conv2(out)) + identity)


class InvertedResidual(nn.Module):
    """MobileNetV2 block: 1x1 expansion (skipped when ``expand == 1``), 3x3 depthwise, linear 1x1
    projection; the input is added when the shape is unchanged."""

    def __init__(self, cin: int, cout: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = int(round(cin * expand))
        self.use_res_connect = stride == 1 and cin == cout
        layers: list[nn.Module] = []
        if expand != 1:
            layers.append(conv_bn(cin, hidden, 1, act=nn.ReLU6))
        layers += [
            conv_bn(hidden, hidden, 3, stride, groups=hidden, act=nn.ReLU6),
            nn.Conv2d(hidden, cout, 1, bias=False),
            nn.BatchNorm2d(cout),
        ]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


class ConvClassifier(nn.Module):
    """``features`` (a conv stack ending in ``channels`` maps) -> global average pool -> linear."""

    def __init__(self, features: nn.Module, channels: int, num_classes: int) -> None:
        super().__init__()
        self.features = features
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.features(x)), 1))  # (B, C, 1, 1) -> (B, C)


def plain_cnn(in_channels: int, cfg: list[int | str], num_classes: int) -> ConvClassifier:
    """VGG-style ConvClassifier: an int in ``cfg`` is a 3x3 conv-BN-ReLU of that width, "M" a 2x2
    max-pool."""
    layers: list[nn.Module] = []
    channels = in_channels
    for item in cfg:
        if isinstance(item, int):
            layers.append(conv_bn(channels, item))
            channels = item
        else:
            layers.append(nn.MaxPool2d(2))
    return ConvClassifier(nn.Sequential(*layers), channels, num_classes)


class ResNet(nn.Module):
    """ResNet with basic blocks; ``cifar_stem`` swaps the 7x7/2 conv + max-pool for a 3x3/1 conv."""

    def __init__(
        self,
        depths: tuple[int, int, int, int] = (2, 2, 2, 2),
        num_classes: int = 1000,
        width_mult: float = 1.0,
        cifar_stem: bool = False,
    ) -> None:
        super().__init__()
        widths = [make_divisible(w * width_mult) for w in (64, 128, 256, 512)]
        if cifar_stem:
            self.conv1 = nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)
            self.maxpool: nn.Module = nn.Identity()
        else:
            self.conv1 = nn.Conv2d(3, widths[0], 7, 2, 3, bias=False)
            self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU()
        stages, cin = [], widths[0]
        for i, (depth, cout) in enumerate(zip(depths, widths, strict=True)):
            blocks = [BasicBlock(cin, cout, 1 if i == 0 else 2)]
            stages.append(
                nn.Sequential(*blocks, *(BasicBlock(cout, cout) for _ in range(1, depth)))
            )
            cin = cout
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))  # (B, C, 1, 1) -> (B, C)


class MobileNetV2(nn.Module):
    """MobileNetV2 (ReLU6, width multiplier); ``cifar`` makes the stem and the first strided stage
    stride 1, so a 32x32 input ends at 4x4 instead of 1x1."""

    # (expansion t, channels c, repeats n, first stride s) per stage
    STAGES = (
        (1, 16, 1, 1),
        (6, 24, 2, 2),
        (6, 32, 3, 2),
        (6, 64, 4, 2),
        (6, 96, 3, 1),
        (6, 160, 3, 2),
        (6, 320, 1, 1),
    )

    def __init__(
        self,
        num_classes: int = 1000,
        width_mult: float = 1.0,
        dropout: float = 0.2,
        cifar: bool = False,
    ) -> None:
        super().__init__()
        cin = make_divisible(32 * width_mult)
        last = make_divisible(1280 * max(1.0, width_mult))
        layers: list[nn.Module] = [conv_bn(3, cin, 3, 1 if cifar else 2, act=nn.ReLU6)]
        for i, (t, c, n, s) in enumerate(self.STAGES):
            cout = make_divisible(c * width_mult)
            stride = 1 if cifar and i == 1 else s
            for j in range(n):
                layers.append(InvertedResidual(cin, cout, stride if j == 0 else 1, t))
                cin = cout
        layers.append(conv_bn(cin, last, 1, act=nn.ReLU6))
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Dropout(dropout), nn.Linear(last, num_classes))
        # fan_in, not torchvision's fan_out: PyTorch's fan_out ignores groups, so each depthwise
        # conv would scale activations by ~2/channels and, with random weights and eval-mode BN,
        # the output would shrink to ~1e-9
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_in")
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.features(x))
        return self.classifier(torch.flatten(x, 1))  # (B, C, 1, 1) -> (B, C)


@MODELS.register(
    "resnet18",
    kind="reference",
    inputs=images(3, 224, 224),
    output_shape=logits,
    summary="ResNet-18 as in torchvision, 224x224, 1000 classes (11.7 M parameters)",
)
def resnet18(*, num_classes: int = 1000, width_mult: float = 1.0) -> ResNet:
    return ResNet((2, 2, 2, 2), num_classes, width_mult)


@MODELS.register(
    "resnet18_cifar",
    kind="reference",
    inputs=images(3, 32, 32),
    output_shape=logits,
    summary="ResNet-18 for 32x32 images: 3x3 stride-1 stem, no max-pool, 10 classes",
)
def resnet18_cifar(*, num_classes: int = 10, width_mult: float = 1.0) -> ResNet:
    return ResNet((2, 2, 2, 2), num_classes, width_mult, cifar_stem=True)


@MODELS.register(
    "mobilenetv2",
    kind="reference",
    inputs=images(3, 224, 224),
    output_shape=logits,
    summary="MobileNetV2 as in torchvision, 224x224, 1000 classes (3.5 M parameters)",
)
def mobilenetv2(
    *, num_classes: int = 1000, width_mult: float = 1.0, dropout: float = 0.2
) -> MobileNetV2:
    return MobileNetV2(num_classes, width_mult, dropout)


@MODELS.register(
    "mobilenetv2_cifar",
    kind="reference",
    inputs=images(3, 32, 32),
    output_shape=logits,
    summary="MobileNetV2 for 32x32 images: stride-1 stem and second stage, 10 classes",
)
def mobilenetv2_cifar(
    *, num_classes: int = 10, width_mult: float = 1.0, dropout: float = 0.2
) -> MobileNetV2:
    return MobileNetV2(num_classes, width_mult, dropout, cifar=True)


@MODELS.register(
    "digits_cnn",
    kind="task",
    inputs=images(1, 8, 8),
    output_shape=logits,
    summary="CNN for scikit-learn's 8x8 digits: 3 conv-BN-ReLU, one max-pool, 10 classes",
)
def digits_cnn(*, width: int = 16, num_classes: int = 10) -> ConvClassifier:
    return plain_cnn(1, [width, 2 * width, "M", 4 * width], num_classes)


@MODELS.register(
    "small_cnn",
    kind="task",
    inputs=images(3, 32, 32),
    output_shape=logits,
    summary="CNN for 3x32x32 images: 4 conv-BN-ReLU, 3 max-pools, 10 classes",
)
def small_cnn(*, width: int = 16, num_classes: int = 10) -> ConvClassifier:
    return plain_cnn(3, [width, "M", 2 * width, "M", 4 * width, "M", 4 * width], num_classes)
