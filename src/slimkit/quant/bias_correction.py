"""Bias correction: remove the mean output shift that quantization adds to each Conv/Linear.

Rounding weights and clipping activations shifts the *mean* of a layer's output, and the shifts
add up through the network (it is what costs depthwise MobileNets most). Conv and Linear are
linear, so a layer's expected output is the layer applied to its expected input. One pass of the
float model gives, per layer, the mean float input ``E[x]`` and the mean of that input after the
layer's own input quantizer ``E[q(x)]``; the layer's own shift per output channel is
``f_q(E[q(x)]) - f(E[x])`` and is subtracted from its bias (re-quantized to int32). Using float
inputs keeps each correction local, so corrections do not compound. Nagel et al., "Data-Free
Quantization Through Weight Equalization and Bias Correction", ICCV 2019 (section 4.2), in its
empirical form.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from slimkit.core.data import Batch
from slimkit.quant.modules import QuantLayer, float_pass
from slimkit.quant.primitives import nhwc


def _apply(layer: nn.Module, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """The layer without bias on one mean input; returns the per-channel mean output."""
    if isinstance(layer, nn.Linear):
        return F.linear(x, w)
    assert isinstance(layer, (nn.Conv1d, nn.Conv2d, nn.Conv3d))
    conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[w.dim() - 2]
    y = conv(x.unsqueeze(0), w, None, layer.stride, layer.padding, layer.dilation, layer.groups)
    return y.flatten(2).mean(2)[0]


def _batch_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum over dim 0 (float32 within a batch, accumulated in float64 by the caller: a float64
    reduction costs 5x); channels-last tensors are summed in their memory order."""
    v = nhwc(t)
    return (t.sum(0) if v is None else v.sum(0).permute(2, 0, 1)).double()


def correct(qmodel: nn.Module, layers: dict[str, QuantLayer], batches: Sequence[Batch]) -> int:
    """Correct every layer's bias from one float pass over ``batches``; returns how many."""
    acc: dict[str, list[Any]] = {}

    def hook(name: str, layer: QuantLayer) -> Any:
        linear = isinstance(layer.float_layer, nn.Linear)
        qmax = 2**8 - 1

        def fn(_m: nn.Module, args: tuple[Any, ...]) -> None:
            x = args[0].detach()
            xq = torch.fake_quantize_per_tensor_affine(
                x, layer.input_scale, layer.input_zero_point, 0, qmax
            )
            if linear:
                x, xq = x.reshape(-1, x.shape[-1]), xq.reshape(-1, xq.shape[-1])
            entry = acc.setdefault(name, [0.0, 0.0, 0])
            # float32 within a batch, float64 across batches (a float64 sum costs 5x)
            entry[0] = entry[0] + _batch_sum(x)
            entry[1] = entry[1] + _batch_sum(xq)
            entry[2] += x.shape[0]

        return fn

    handles = [layer.register_forward_pre_hook(hook(n, layer)) for n, layer in layers.items()]
    try:
        with float_pass(qmodel, layers.values()), torch.no_grad():
            for b in batches:
                b.run(qmodel)
    finally:
        for h in handles:
            h.remove()
    with torch.no_grad():
        for name, layer in layers.items():
            sx, sxq, n = acc[name]
            w = layer.float_layer.weight.detach()
            assert isinstance(w, torch.Tensor)
            mf, mq = (sx / n).float(), (sxq / n).float()
            delta = _apply(layer.float_layer, mq, layer.weight()) - _apply(layer.float_layer, mf, w)
            layer.correct_bias(delta)
    return len(acc)
