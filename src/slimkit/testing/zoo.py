"""Small instances of the zoo models for tests, and BatchNorms with non-trivial statistics."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

# the bigger zoo models at sizes where a test forward stays around a second on 2 cores
SMALL_KWARGS: dict[str, dict[str, Any]] = {
    "bert_encoder": dict(vocab_size=64, seq_len=16, n_layer=1, d_model=32, d_ff=64),
    "gpt": dict(n_layer=1, seq_len=16, d_model=32),
    "text_classifier": dict(n_layer=1, seq_len=16, d_model=32, d_ff=64),
    "resnet18": dict(width_mult=0.25),
    "resnet18_cifar": dict(width_mult=0.25),
    "mobilenetv2": dict(width_mult=0.25),
    "mobilenetv2_cifar": dict(width_mult=0.25),
}
SMALL_IMAGE = {"resnet18": 32, "mobilenetv2": 16}  # the 224x224 models' layers on small images


def small_zoo(name: str, batch: int = 2) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """A (small) zoo model and example inputs for it."""
    from slimkit.zoo.models import create_model, example_inputs

    kw = SMALL_KWARGS.get(name, {})
    x = example_inputs(name, batch, **kw)
    if name in SMALL_IMAGE:
        side = SMALL_IMAGE[name]
        x = (torch.randn(batch, 3, side, side),)
    return create_model(name, **kw), x


def randomise_bn(model: nn.Module, seed: int = 1) -> nn.Module:
    """Give every BatchNorm non-trivial statistics and affine parameters (so a wrong fold cannot
    pass by accident); returns the model in eval mode."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                n = m.num_features
                assert m.running_mean is not None and m.running_var is not None
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.5)
                m.running_var.copy_(torch.rand(n, generator=g) * 2 + 0.2)
                if m.affine:
                    m.weight.copy_(torch.randn(n, generator=g))
                    m.bias.copy_(torch.randn(n, generator=g))
    return model.eval()
