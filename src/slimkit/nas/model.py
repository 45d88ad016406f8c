"""The plain network of one architecture: standard ``nn.Conv2d`` / ``BatchNorm2d`` / ``Linear``
layers, nothing elastic, so it exports to ONNX, prunes and quantizes like any model::

    net = ArchNet(space, arch)               # random weights; NASResult.model has trained ones
    net(torch.randn(1, 3, 32, 32)).shape     # (1, 10)
"""

from __future__ import annotations

import torch
from torch import nn

from slimkit.nas.space import Arch, CNNSpace


def conv_bn(
    cin: int, cout: int, kernel: int = 1, stride: int = 1, groups: int = 1, act: bool = True
) -> nn.Sequential:
    """Conv (no bias, 'same' padding) -> BatchNorm -> ReLU6, indexed 0 / 1 / 2."""
    layers: list[nn.Module] = [
        nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
    ]
    if act:
        layers.append(nn.ReLU6())
    return nn.Sequential(*layers)


class Block(nn.Module):
    """Inverted residual: 1x1 expand -> kxk depthwise (stride) -> 1x1 project, plus the input
    when the stride is 1 and the width is unchanged."""

    def __init__(self, cin: int, cout: int, stride: int, kernel: int, expand: int) -> None:
        super().__init__()
        hidden = cin * expand
        self.expand = conv_bn(cin, hidden)
        self.dw = conv_bn(hidden, hidden, kernel, stride, groups=hidden)
        self.project = conv_bn(hidden, cout, act=False)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.project(self.dw(self.expand(x)))
        return x + y if self.residual else y


def block_shapes(space: CNNSpace, arch: Arch) -> list[tuple[int, int, int, int, int, int]]:
    """``(cin, cout, stride, kernel, expand, input_size)`` of every block of ``arch``."""
    out = []
    cin, size = space.stem, -(-space.input_size // space.stem_stride)
    for s, st in zip(space.stages, arch.stages, strict=True):
        for j, (k, e) in enumerate(zip(st.kernels, st.expands, strict=True)):
            stride = s.stride if j == 0 else 1
            out.append((cin, st.width, stride, k, e, size))
            cin, size = st.width, -(-size // stride)
    return out


class ArchNet(nn.Module):
    """The network of ``arch`` in ``space``: stem, blocks, 1x1 head, pooling, classifier."""

    def __init__(self, space: CNNSpace, arch: Arch) -> None:
        super().__init__()
        space.check(arch)
        self.stem = conv_bn(space.in_channels, space.stem, 3, space.stem_stride)
        self.blocks = nn.Sequential(
            *[Block(ci, co, s, k, e) for ci, co, s, k, e, _ in block_shapes(space, arch)]
        )
        self.head = conv_bn(arch.stages[-1].width, space.head)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(space.head, space.num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.head(self.blocks(self.stem(x))))
        return self.classifier(torch.flatten(x, 1))  # (B, C, 1, 1) -> (B, C)
