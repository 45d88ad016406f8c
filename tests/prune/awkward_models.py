"""Test models with patterns that real code has and the zoo does not, with what slimkit must do.

``prunes``: slimkit must prune it and stay exact when the removed channels are already zero.
``refuses``: the named module's channels must be reported unprunable (and an explicit request to
prune it raises ``UnsupportedError`` naming it).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.nn import functional as F


class BNAfterReLU(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn1(F.relu(self.conv1(x)))  # BN after the activation
        x = F.relu(self.conv2(x))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


class PadSpatial(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3)
        self.conv2 = nn.Conv2d(8, 8, 3)
        self.fc = nn.Linear(8 * 6 * 6, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.pad(F.relu(self.conv1(x)), (1, 1, 1, 1))  # pads H and W only
        x = F.relu(self.conv2(x))  # (B, 8, 6, 6)
        return self.fc(torch.flatten(x, 1))  # flatten into a Linear: H*W columns per channel


class PadChannels(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.pad(self.conv1(x), (0, 0, 0, 0, 0, 2))  # 6 -> 8 channels
        return self.fc(self.conv2(x).mean((2, 3)))


class PermuteReshape(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.fc = nn.Linear(8 * 4 * 4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv1(x))  # (B, 8, 4, 4)
        x = x.permute(0, 2, 3, 1).reshape(x.size(0), -1)  # channels-last: columns interleave
        return self.fc(x)


class HardCodedView(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, stride=2, padding=1)
        self.fc = nn.Linear(16 * 4 * 4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv1(x))
        return self.fc(x.view(-1, 16 * 4 * 4))  # width written into forward


class DynamicView(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, stride=2, padding=1)
        self.fc = nn.Linear(16 * 4 * 4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv1(x))
        return self.fc(x.view(x.size(0), -1))


class ResidualConcat(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.a = nn.Conv2d(8, 8, 3, padding=1)
        self.bn_a = nn.BatchNorm2d(8)
        self.b = nn.Conv2d(8, 4, 1)
        self.gamma = nn.Parameter(torch.rand(1, 12, 1, 1) + 0.5)  # layer-scale on the concat
        self.dw = nn.Conv2d(12, 12, 3, padding=1, groups=12)
        self.head = nn.Conv2d(15, 8, 1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = F.relu(self.stem(x))
        r = F.relu(self.bn_a(self.a(s)) + s)  # residual add
        y = torch.cat([r, self.b(r)], dim=1) * self.gamma  # concat, then a per-channel scale
        y = torch.cat([self.dw(y), x], dim=1)  # concat with the (fixed) input
        return self.fc(self.head(y).mean((2, 3)))


class CustomOp(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.roll(self.conv1(x), 1, dims=1)  # shifts channels: nothing slimkit knows
        return self.fc(self.conv2(x).mean((2, 3)))


class FixedHeads(nn.Module):
    """Attention that stores its head count: pruning heads would break its reshape."""

    def __init__(self, d: int = 16, heads: int = 4) -> None:
        super().__init__()
        self.num_heads, self.head_dim = heads, d // heads
        self.q_proj, self.k_proj = nn.Linear(d, d), nn.Linear(d, d)
        self.v_proj, self.out_proj = nn.Linear(d, d), nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, t, self.num_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.num_heads, self.head_dim).transpose(1, 2)
        att = (q @ k.transpose(-2, -1)).softmax(-1)
        return self.out_proj((att @ v).transpose(1, 2).reshape(b, t, -1))


class FixedHeadsModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = FixedHeads()
        self.fc = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.attn(x).mean(1))


class Conv1dText(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(50, 12)
        self.conv = nn.Conv1d(12, 16, 3, padding=1)
        self.bn = nn.BatchNorm1d(16)
        self.fc = nn.Linear(16, 4)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.embed(idx).transpose(1, 2)  # (B, T, C) -> (B, C, T)
        return self.fc(F.relu(self.bn(self.conv(x))).amax(dim=2))


class UpsampleDecoder(nn.Module):
    """A transposed conv between two convs (a decoder / segmentation head)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.bn = nn.BatchNorm2d(16)
        self.up = nn.ConvTranspose2d(16, 12, 2, stride=2)
        self.bn_up = nn.BatchNorm2d(12)
        self.head = nn.Conv2d(12, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn_up(self.up(F.relu(self.bn(self.conv1(x))))))
        return self.head(y)


class GroupedConv(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.grouped = nn.Conv2d(16, 32, 3, padding=1, groups=4)
        self.fc = nn.Conv2d(32, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(F.relu(self.grouped(F.relu(self.conv1(x)))))


def _img() -> torch.Tensor:
    return torch.randn(2, 3, 8, 8)


# name -> (factory, input factory, expected: "prunes" or the module whose channels are refused)
CASES: dict[str, tuple[Callable[[], nn.Module], Callable[[], torch.Tensor], str]] = {
    "bn_after_relu": (BNAfterReLU, _img, "prunes"),
    "pad_spatial": (PadSpatial, lambda: torch.randn(2, 3, 8, 8), "prunes"),
    "pad_channels": (PadChannels, _img, "conv1"),
    "permute_reshape": (PermuteReshape, _img, "prunes"),  # interleaved Linear columns
    "hard_coded_view": (HardCodedView, _img, "conv1"),
    "dynamic_view": (DynamicView, _img, "prunes"),
    "residual_concat": (ResidualConcat, _img, "prunes"),
    "custom_op": (CustomOp, _img, "conv1"),
    "fixed_heads": (FixedHeadsModel, lambda: torch.randn(2, 5, 16), "attn.q_proj"),
    "conv1d_text": (Conv1dText, lambda: torch.randint(0, 50, (2, 10)), "prunes"),
    "conv_transpose": (UpsampleDecoder, _img, "prunes"),
    "grouped_conv": (GroupedConv, _img, "prunes"),  # whole conv groups
}
