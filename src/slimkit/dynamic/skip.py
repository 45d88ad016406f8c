"""Learned block skipping: a small gate before each residual block decides per input whether the
block runs or the input passes through unchanged (SkipNet, Wang et al., ECCV 2018; ConvNet-AIG,
Veit & Belongie, ECCV 2018). Gates and network are trained together by distillation from the
original with a compute penalty; hard decisions in the forward pass, the sigmoid's gradient in
the backward pass (straight-through).

    sg = sk.dynamic.skip_gates(model, sk.dynamic.SkipGates(penalty=2.0), data=train)
    sg.evaluate(test)          # {"top1", "run_fractions", "avg_macs", "macs_saved", ...}

Blocks: by name (``blocks``), else every module holding a conv whose forward adds its own input
to its result (an identity shortcut: ResNet basic blocks, MobileNetV2 blocks with a residual).
Skipping such a block leaves a valid network: the identity path carries the input on.
"""

from __future__ import annotations

import copy
import operator
from collections.abc import Iterable
from typing import Any

import torch
from pydantic import Field
from torch import fx, nn
from torch.nn import functional as F

from slimkit.core.config import Config
from slimkit.core.train import fit
from slimkit.dynamic.early_exit import _batches, _split_batch
from slimkit.errors import ConfigError, DataError


class SkipGates(Config):
    """Which blocks get a gate and how gates and network are trained."""

    blocks: list[str] = []  # module names to gate (empty: every identity-residual block)
    penalty: float = Field(1.0, ge=0.0)  # weight of the compute term (fraction of model MACs)
    threshold: float = Field(0.5, gt=0.0, lt=1.0)  # a block runs when its gate says >= this
    epochs: int = Field(2, ge=0)
    lr: float = Field(1e-3, gt=0)
    temperature: float = Field(2.0, gt=0)
    batch_size: int = Field(64, ge=1)  # for data given as a dataset
    max_steps: int | None = Field(None, ge=1)


class GatedBlock(nn.Module):
    """``block`` behind a gate: global average pool -> linear -> sigmoid. In training the output
    is ``x + g * (block(x) - x)`` with ``g`` the hard decision (straight-through); in eval a
    sample whose gate is below ``threshold`` skips the block (its input is its output)."""

    def __init__(self, block: nn.Module, channels: int, threshold: float) -> None:
        super().__init__()
        self.block = block
        fc = nn.Linear(channels, 1)
        nn.init.zeros_(fc.weight)
        nn.init.constant_(fc.bias, 2.0 / self.SCALE)  # starts open (0.88): the original network
        self.gate = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), fc)
        self.threshold = threshold
        self.last_prob: torch.Tensor | None = None  # for the compute penalty
        self.last_run: torch.Tensor | None = None  # for evaluate()

    # the gate's logit is SCALE x the linear layer's output: Adam moves a parameter by about
    # the learning rate per step whatever its gradient, so at lr 1e-3 an unscaled gate would
    # need thousands of steps to close; scaled, about a hundred
    SCALE = 20.0

    def prob(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.SCALE * self.gate(x)).flatten()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.prob(x)
        run = p >= self.threshold
        if self.training:
            self.last_prob = p
            g = run.float() + p - p.detach()  # hard forward, sigmoid gradient
            return x + g[:, None, None, None] * (self.block(x) - x)
        self.last_run = run
        if torch.jit.is_tracing() or torch.onnx.is_in_onnx_export():
            return torch.where(run[:, None, None, None], self.block(x), x)
        if bool(run.all()):
            out: torch.Tensor = self.block(x)
            return out
        if not bool(run.any()):
            return x
        out = x.clone()
        out[run] = self.block(x[run])
        return out


_ACTS = (nn.ReLU, nn.ReLU6, nn.SiLU, nn.GELU, nn.Hardswish, nn.LeakyReLU, nn.Identity)


def _identity_residual(block: nn.Module) -> bool:
    """Whether ``block`` ends by adding its own input (then, at most, an activation): an
    identity shortcut around the rest of it."""
    try:
        gm = fx.symbolic_trace(block)
    except Exception:
        return False
    nodes = list(gm.graph.nodes)
    inputs = [n for n in nodes if n.op == "placeholder"]
    if len(inputs) != 1 or nodes[-1].op != "output":
        return False
    mods = dict(gm.named_modules())
    node = nodes[-1].args[0]
    while isinstance(node, fx.Node) and (
        (node.op == "call_module" and isinstance(mods.get(str(node.target)), _ACTS))
        or (node.op in ("call_function", "call_method") and "relu" in str(node.target))
    ):
        node = node.args[0]
    adds = (operator.add, operator.iadd, torch.add)
    return (
        isinstance(node, fx.Node)
        and node.op == "call_function"
        and node.target in adds
        and inputs[0] in node.args
    )


def find_blocks(model: nn.Module) -> list[str]:
    """The outermost modules holding a conv whose forward adds their own input (residuals)."""
    found: list[str] = []
    for name, m in model.named_modules():
        if not name or any(name.startswith(f + ".") for f in found):
            continue
        has_conv = any(isinstance(c, nn.Conv2d) for c in m.modules())
        if has_conv and _identity_residual(m):
            found.append(name)
    return found


class SkipGateModel(nn.Module):
    """``model`` with gated blocks (``gated``: their names); ``evaluate`` measures how often each
    runs and the average MACs."""

    def __init__(self, model: nn.Module, gated: list[str]) -> None:
        super().__init__()
        self.model = model
        self.gated = gated
        self.block_macs: list[int] = []
        self.gate_macs: list[int] = []
        self.full_macs = 0

    def blocks(self) -> list[GatedBlock]:
        return [self.model.get_submodule(n) for n in self.gated]  # type: ignore[misc]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.model(x)
        return out

    def count_macs(self, example: torch.Tensor) -> None:
        from slimkit.analyze.profile import profile_model

        seen: dict[str, torch.Tensor] = {}
        hooks = [
            b.register_forward_pre_hook(lambda m, a, n=n: seen.__setitem__(n, a[0][:1]))
            for n, b in zip(self.gated, self.blocks(), strict=True)
        ]
        keep = [b.threshold for b in self.blocks()]
        try:
            with torch.no_grad():
                self.eval()
                for b in self.blocks():
                    b.threshold = 0.0  # every block runs
                self.model(example[:1])
        finally:
            for b, t in zip(self.blocks(), keep, strict=True):
                b.threshold = t
            for h in hooks:
                h.remove()
        self.block_macs = [profile_model(b.block, (seen[n],)).total_macs
                           for n, b in zip(self.gated, self.blocks(), strict=True)]  # fmt: skip
        self.gate_macs = [profile_model(b.gate, (seen[n],)).total_macs
                          for n, b in zip(self.gated, self.blocks(), strict=True)]  # fmt: skip
        plain = copy.deepcopy(self.model)
        for n, b in zip(self.gated, self.blocks(), strict=True):
            _set(plain, n, b.block)
        self.full_macs = profile_model(plain, (example[:1],)).total_macs

    def evaluate(self, data: Iterable[Any]) -> dict[str, Any]:
        """Top-1 (labelled batches), how often each block runs, average MACs per sample (gates
        included) and the fraction of the original model's MACs saved."""
        self.eval()
        runs = torch.zeros(len(self.gated))
        n = correct = 0
        labelled = True
        with torch.no_grad():
            for batch in data:
                x, y = _split_batch(batch)
                pred = self(x).argmax(-1)
                runs += torch.stack([b.last_run.float().sum() for b in self.blocks()])  # type: ignore[union-attr]
                n += x.shape[0]
                if y is None:
                    labelled = False
                else:
                    correct += int((pred == y).sum())
        if n == 0:
            raise DataError("the data is empty", fix="pass at least one batch")
        frac = runs / n
        skipped = float(
            sum((1 - f) * m for f, m in zip(frac.tolist(), self.block_macs, strict=True))
        )
        avg = self.full_macs - skipped + sum(self.gate_macs)
        out: dict[str, Any] = {
            "samples": n,
            "blocks": list(self.gated),
            "run_fractions": [round(float(f), 4) for f in frac],
            "avg_macs": avg,
            "full_macs": self.full_macs,
            "macs_saved": 1.0 - avg / self.full_macs,
        }
        if labelled:
            out["top1"] = correct / n
        return out


def _set(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, module)


def _channels(model: nn.Module, names: list[str], x: torch.Tensor) -> list[int]:
    seen: dict[str, int] = {}
    hooks = [
        model.get_submodule(n).register_forward_pre_hook(
            lambda m, a, n=n: seen.__setitem__(n, int(a[0].shape[1]))
        )
        for n in names
    ]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return [seen[n] for n in names]


def skip_gates(
    model: nn.Module,
    config: SkipGates | None = None,
    *,
    data: Any,
    progress: bool = True,
) -> SkipGateModel:
    """A copy of the classifier ``model`` (never modified) with a learned gate before each
    residual block, trained on ``data`` (``(inputs, labels)`` or inputs) by distillation from
    ``model`` plus ``penalty`` x the fraction of the model's MACs the gated blocks run."""
    cfg = config or SkipGates()
    train = _batches(data, cfg.batch_size)
    x0, _ = _split_batch(train[0])
    src = copy.deepcopy(model).eval()
    names = cfg.blocks or find_blocks(src)
    if not names:
        raise ConfigError(
            f"{type(model).__name__} has no residual block to gate (a module with a conv whose "
            "forward adds its own input)",
            fix="name the blocks to gate: SkipGates(blocks=['layer1.0', ...])",
        )
    for n in names:
        try:
            src.get_submodule(n)
        except AttributeError:
            raise ConfigError(f"no module {n!r} to gate", fix="name modules of the model") from None
    channels = _channels(src, names, x0)
    for n, c in zip(names, channels, strict=True):
        _set(src, n, GatedBlock(src.get_submodule(n), c, cfg.threshold))
    sg = SkipGateModel(src, names)
    sg.count_macs(x0)
    if cfg.epochs > 0:
        teacher = copy.deepcopy(model).eval()
        fit(sg, train, loss_fn=_loss(cfg, teacher, sg), epochs=cfg.epochs, lr=cfg.lr,
            max_steps=cfg.max_steps, progress=progress, description="skip gates")  # fmt: skip
    return sg.eval()


def _loss(cfg: SkipGates, teacher: nn.Module, sg: SkipGateModel) -> Any:
    weights = torch.tensor(sg.block_macs, dtype=torch.float32) / max(sg.full_macs, 1)

    def loss_fn(model: nn.Module, batch: Any) -> torch.Tensor:
        x, y = _split_batch(batch)
        with torch.no_grad():
            ref = teacher(x)
        out = model(x)
        t = cfg.temperature
        loss = F.kl_div(F.log_softmax(out / t, -1), F.softmax(ref / t, -1),
                        reduction="batchmean") * t * t  # fmt: skip
        if y is not None:
            loss = loss + F.cross_entropy(out, y)
        probs = torch.stack([b.last_prob.mean() for b in sg.blocks()])  # type: ignore[union-attr]
        return loss + cfg.penalty * (probs * weights).sum()

    return loss_fn
