"""Tiny models for unit tests: each one exercises one structure that compression must handle (plain
Linear stack, conv-BN, residual add, depthwise conv, channel concat, attention, LSTM) and runs in
milliseconds."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from slimkit.zoo.models import MODELS, images, logits, tokens
from slimkit.zoo.models.text import GPT, Block, lm_shape
from slimkit.zoo.models.vision import (
    BasicBlock,
    ConvClassifier,
    InvertedResidual,
    conv_bn,
    plain_cnn,
)


class MLP(nn.Module):
    """Three Linear layers with ReLU in between."""

    def __init__(self, in_features: int, hidden: int, num_classes: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden)
        self.act1 = nn.ReLU()
        self.fc2 = nn.Linear(hidden, hidden)
        self.act2 = nn.ReLU()
        self.fc3 = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc3(self.act2(self.fc2(self.act1(self.fc1(x)))))


class ConcatBranch(nn.Module):
    """Inception-like: a 1x1 branch and a 1x1 -> 3x3 branch, concatenated on channels."""

    def __init__(self, cin: int, c1: int, c2: int) -> None:
        super().__init__()
        self.branch1 = conv_bn(cin, c1, 1)
        self.branch2 = nn.Sequential(conv_bn(cin, c2, 1), conv_bn(c2, c2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.branch1(x), self.branch2(x)], dim=1)  # (B, c1 + c2, H, W)


class LSTMClassifier(nn.Module):
    """Embedding -> one-layer LSTM -> Linear on the last time step."""

    def __init__(self, vocab_size: int, embed_dim: int, hidden: int, num_classes: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab_size, embed_dim)
        self.lstm = nn.LSTM(embed_dim, hidden, batch_first=True)
        self.fc = nn.Linear(hidden, num_classes)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        out = self.lstm(self.embed(idx))[0]  # (B, T, hidden)
        return self.fc(out[:, -1])  # last step: (B, hidden) -> (B, num_classes)


def _features(batch: int, *, in_features: int, **_: Any) -> tuple[torch.Tensor, ...]:
    return (torch.randn(batch, in_features),)


def _sequence(batch: int, *, d_model: int, **_: Any) -> tuple[torch.Tensor, ...]:
    return (torch.randn(batch, 16, d_model),)


@MODELS.register(
    "mlp",
    kind="tiny",
    inputs=_features,
    output_shape=logits,
    summary="3-layer MLP, 64 features -> 10 classes",
)
def mlp(*, in_features: int = 64, hidden: int = 32, num_classes: int = 10) -> MLP:
    return MLP(in_features, hidden, num_classes)


@MODELS.register(
    "cnn_bn",
    kind="tiny",
    inputs=images(3, 16, 16),
    output_shape=logits,
    summary="2x conv-BN-ReLU with a max-pool, global pool, linear; 3x16x16 input",
)
def cnn_bn(*, width: int = 8, num_classes: int = 10) -> ConvClassifier:
    return plain_cnn(3, [width, "M", 2 * width], num_classes)


@MODELS.register(
    "residual",
    kind="tiny",
    inputs=images(3, 16, 16),
    output_shape=logits,
    summary="stem + ResNet basic blocks (identity, then strided with 1x1 projection); 3x16x16",
)
def residual(*, width: int = 8, num_classes: int = 10) -> ConvClassifier:
    features = nn.Sequential(
        conv_bn(3, width), BasicBlock(width, width), BasicBlock(width, 2 * width, stride=2)
    )
    return ConvClassifier(features, 2 * width, num_classes)


@MODELS.register(
    "inverted_residual",
    kind="tiny",
    inputs=images(3, 16, 16),
    output_shape=logits,
    summary="stem + MobileNetV2 blocks (expanded depthwise with residual, then strided); 3x16x16",
)
def inverted_residual(*, width: int = 8, expand: int = 4, num_classes: int = 10) -> ConvClassifier:
    features = nn.Sequential(
        conv_bn(3, width, act=nn.ReLU6),
        InvertedResidual(width, width, 1, expand),
        InvertedResidual(width, 2 * width, 2, expand),
    )
    return ConvClassifier(features, 2 * width, num_classes)


@MODELS.register(
    "concat_branch",
    kind="tiny",
    inputs=images(3, 16, 16),
    output_shape=logits,
    summary="stem + two conv branches concatenated on channels + conv; 3x16x16",
)
def concat_branch(*, width: int = 8, num_classes: int = 10) -> ConvClassifier:
    features = nn.Sequential(
        conv_bn(3, width), ConcatBranch(width, width, width), conv_bn(2 * width, 2 * width)
    )
    return ConvClassifier(features, 2 * width, num_classes)


@MODELS.register(
    "transformer_block",
    kind="tiny",
    inputs=_sequence,
    output_shape=lambda batch, *, d_model, **_: (batch, 16, d_model),
    summary="one pre-LN encoder block on float (B, 16, 32)",
)
def transformer_block(*, d_model: int = 32, n_head: int = 4, d_ff: int = 64) -> Block:
    return Block(d_model, n_head, d_ff, pre_norm=True)


@MODELS.register(
    "gpt_tiny",
    kind="tiny",
    inputs=tokens(256, 32),
    output_shape=lm_shape,
    summary="2-layer GPT on bytes: vocab 256, seq 32, d 64, 4 heads",
)
def gpt_tiny(
    *,
    vocab_size: int = 256,
    seq_len: int = 32,
    n_layer: int = 2,
    d_model: int = 64,
    n_head: int = 4,
    dropout: float = 0.0,
) -> GPT:
    return GPT(**locals())  # every option, by name


@MODELS.register(
    "lstm",
    kind="tiny",
    inputs=tokens(256, 24),
    output_shape=logits,
    summary="embedding -> 1-layer LSTM -> linear on the last step; tokens (B, 24)",
)
def lstm(
    *, vocab_size: int = 256, embed_dim: int = 32, hidden: int = 32, num_classes: int = 10
) -> LSTMClassifier:
    return LSTMClassifier(vocab_size, embed_dim, hidden, num_classes)
