"""A weight-sharing supernet over a :class:`CNNSpace`, trained once with the sandwich rule.

Every architecture of the space is a slice of the supernet's largest one: the first ``width``
output channels of a layer, the first ``cin * expand`` hidden channels of a block, the centre
``k x k`` of the largest depthwise kernel, the first ``depth`` blocks of a stage (Cai et al.,
"Once-for-All", ICLR 2020; Yu et al., "BigNAS", ECCV 2020)::

    net = SuperNet(space)
    train_supernet(net, task.loader("train", 64, shuffle=True), epochs=4, lr=3e-3)
    sub = net.extract(arch)                     # a plain ArchNet with the sliced weights
    recalibrate_bn(sub, calib_batches)          # BatchNorm statistics of that sub-network

Training goes through ``core.train.fit`` with the sandwich loss: each step runs the largest
network (cross entropy against the labels), the smallest and ``n_random`` random ones (KL against
the largest's softened output: in-place distillation), and back-propagates the sum.
"""

from __future__ import annotations

import random
from collections.abc import Iterable
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn

from slimkit.core.train import TrainResult, fit
from slimkit.nas.model import ArchNet, conv_bn
from slimkit.nas.space import Arch, CNNSpace


class ElasticConvBN(nn.Module):
    """Conv -> BatchNorm (-> ReLU6) at its largest size, run at any smaller one by slicing."""

    def __init__(
        self,
        cin: int,
        cout: int,
        kernel: int = 1,
        stride: int = 1,
        depthwise: bool = False,
        act: bool = True,
    ) -> None:
        super().__init__()
        groups = cout if depthwise else 1
        self.conv = nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(cout)
        self.depthwise, self.act, self.stride = depthwise, act, stride

    def weights(self, cin: int, cout: int, kernel: int) -> dict[str, torch.Tensor]:
        """The slices of a ``cin -> cout`` layer with a ``kernel`` x ``kernel`` window, named
        as in ``model.conv_bn`` (0: conv, 1: BatchNorm)."""
        w = self.conv.weight[:cout] if self.depthwise else self.conv.weight[:cout, :cin]
        off = (self.conv.kernel_size[0] - kernel) // 2
        w = w[:, :, off : off + kernel, off : off + kernel]
        bn = self.bn
        assert bn.running_mean is not None and bn.running_var is not None
        return {
            "0.weight": w,
            "1.weight": bn.weight[:cout],
            "1.bias": bn.bias[:cout],
            "1.running_mean": bn.running_mean[:cout],
            "1.running_var": bn.running_var[:cout],
        }

    def forward(self, x: torch.Tensor, cout: int, kernel: int) -> torch.Tensor:
        p = self.weights(x.shape[1], cout, kernel)
        y = F.conv2d(
            x, p["0.weight"], None, self.stride, kernel // 2, groups=cout if self.depthwise else 1
        )
        # slices of the running statistics are views: training updates the shared buffers
        y = F.batch_norm(
            y,
            p["1.running_mean"],
            p["1.running_var"],
            p["1.weight"],
            p["1.bias"],
            self.training,
            self.bn.momentum or 0.1,
            self.bn.eps,
        )
        return F.relu6(y) if self.act else y


class SuperBlock(nn.Module):
    """An inverted residual block at its largest input width, expansion, kernel and width."""

    def __init__(self, cin: int, cout: int, stride: int, kernel: int, expand: int) -> None:
        super().__init__()
        hidden = cin * expand
        self.expand = ElasticConvBN(cin, hidden)
        self.dw = ElasticConvBN(hidden, hidden, kernel, stride, depthwise=True)
        self.project = ElasticConvBN(hidden, cout, act=False)
        self.stride = stride

    def forward(self, x: torch.Tensor, cout: int, kernel: int, expand: int) -> torch.Tensor:
        hidden = x.shape[1] * expand
        y = self.project(self.dw(self.expand(x, hidden, 1), hidden, kernel), cout, 1)
        return x + y if self.stride == 1 and x.shape[1] == cout else y


class SuperNet(nn.Module):
    """Every architecture of ``space`` in one module; ``set_active(arch)`` picks the one that
    ``forward`` runs (default: the largest)."""

    def __init__(self, space: CNNSpace) -> None:
        super().__init__()
        self.space = space
        self.stem = conv_bn(space.in_channels, space.stem, 3, space.stem_stride)
        stages, cin = [], space.stem
        for s in space.stages:
            blocks = [
                SuperBlock(
                    cin if j == 0 else s.widths[-1],
                    s.widths[-1],
                    s.stride if j == 0 else 1,
                    s.kernels[-1],
                    s.expands[-1],
                )
                for j in range(s.depths[-1])
            ]
            stages.append(nn.ModuleList(blocks))
            cin = s.widths[-1]
        self.stages = nn.ModuleList(stages)
        self.head = ElasticConvBN(cin, space.head)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(space.head, space.num_classes)
        self.active: Arch = space.largest()

    def set_active(self, arch: Arch) -> None:
        self.space.check(arch)
        self.active = arch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for blocks, st in zip(self.stages, self.active.stages, strict=True):
            for block, k, e in zip(
                cast(nn.ModuleList, blocks), st.kernels, st.expands, strict=False
            ):
                x = block(x, st.width, k, e)
        x = self.pool(self.head(x, self.space.head, 1))
        return self.classifier(torch.flatten(x, 1))

    @torch.no_grad()
    def extract(self, arch: Arch) -> ArchNet:
        """``arch`` as a plain :class:`ArchNet` holding copies of its slices of the weights
        (BatchNorm statistics included: call :func:`recalibrate_bn` before evaluating it)."""
        net = ArchNet(self.space, arch)
        state: dict[str, torch.Tensor] = {}
        state.update({f"stem.{k}": v for k, v in self.stem.state_dict().items()})
        i, cin = 0, self.space.stem
        for blocks, st in zip(self.stages, arch.stages, strict=True):
            for block, k, e in zip(
                cast(nn.ModuleList, blocks), st.kernels, st.expands, strict=False
            ):
                hidden = cin * e
                sb = cast(SuperBlock, block)
                for name, layer, ci, co, kk in (
                    ("expand", sb.expand, cin, hidden, 1),
                    ("dw", sb.dw, hidden, hidden, k),
                    ("project", sb.project, hidden, st.width, 1),
                ):
                    for key, v in layer.weights(ci, co, kk).items():
                        state[f"blocks.{i}.{name}.{key}"] = v
                i, cin = i + 1, st.width
        state.update(
            {f"head.{k}": v for k, v in self.head.weights(cin, self.space.head, 1).items()}
        )
        state.update({f"classifier.{k}": v for k, v in self.classifier.state_dict().items()})
        own = net.state_dict()
        for key in own:
            if key.endswith("num_batches_tracked"):
                continue
            own[key].copy_(state[key])
        return net.eval()


@torch.no_grad()
def recalibrate_bn(model: nn.Module, batches: Iterable[Any]) -> nn.Module:
    """Reset every BatchNorm's running statistics and re-estimate them (cumulative average) on
    ``batches`` (inputs, or ``(inputs, targets)``); the model is returned in eval mode. A slice of
    a supernet needs its own statistics: the shared ones mix every sub-network's."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
    model.train()
    try:
        for b in batches:
            model(b[0] if isinstance(b, (tuple, list)) else b)
    finally:
        for m, mom in zip(bns, saved, strict=True):
            m.momentum = mom
        model.eval()
    return model


def sandwich_loss(
    net: SuperNet, *, n_random: int = 2, temperature: float = 1.0, seed: int = 0
) -> Any:
    """``loss_fn(model, (x, y))`` for ``core.train.fit``: the sandwich rule with in-place
    distillation (see the module's docstring)."""
    rng = random.Random(seed)
    space = net.space
    largest, smallest = space.largest(), space.smallest()

    def loss(model: nn.Module, batch: Any) -> torch.Tensor:
        x, y = batch
        net.set_active(largest)
        big = model(x)
        total = F.cross_entropy(big, y)
        soft = F.softmax(big.detach() / temperature, dim=-1)
        for arch in [smallest] + [space.sample(rng) for _ in range(n_random)]:
            net.set_active(arch)
            out = F.log_softmax(model(x) / temperature, dim=-1)
            total = total + F.kl_div(out, soft, reduction="batchmean") * temperature**2
        net.set_active(largest)
        return total

    return loss


def train(net: nn.Module, loader: Any, loss_fn: Any, *, epochs: int, lr: float,
          description: str, **kw: Any) -> TrainResult:  # fmt: skip
    """``core.train.fit`` with AdamW, weight decay 1e-4, cosine decay; ``kw``: ``seed``,
    ``progress``, ``max_steps``."""
    return fit(net, loader, loss_fn=loss_fn, epochs=epochs, lr=lr, weight_decay=1e-4,
               description=description, **kw)  # fmt: skip


def train_supernet(net: SuperNet, loader: Any, *, epochs: int, lr: float = 3e-3,
                   n_random: int = 2, seed: int = 0, **kw: Any) -> TrainResult:  # fmt: skip
    """Train ``net`` in place with :func:`sandwich_loss` through ``core.train.fit`` (``kw``:
    ``progress``, ``max_steps``)."""
    loss = sandwich_loss(net, n_random=n_random, seed=seed)
    return train(net, loader, loss, epochs=epochs, lr=lr, seed=seed, description="supernet", **kw)
