"""Early exit: classifier heads after chosen stages of a trained network, trained by distillation
from its final head, with confidence thresholds calibrated on held-out data so that the accuracy
drops by at most ``max_drop``; an input leaves at the first head that is confident enough.

    ee = sk.dynamic.early_exit(model, sk.dynamic.EarlyExit(max_drop=0.01), data=train, calib=val)
    ee.evaluate(test)          # {"top1", "full_top1", "exit_fractions", "macs_saved", ...}
    ee(x)                      # logits; per sample from the exit that took it
    runner = sk.dynamic.export_early_exit(ee, "out/", example_inputs=x[:1])   # ONNX Runtime

Papers: BranchyNet (Teerapittayanon et al., ICPR 2016), Shallow-Deep Networks (Kaya et al.,
ICML 2019); confidence by max-softmax or normalised entropy. Supported models: those torch.fx
traces and that can be cut into a chain (see ``segments``): plain CNNs, ResNets, MobileNets.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable
from typing import Any, Literal

import torch
from pydantic import Field
from torch import nn
from torch.nn import functional as F

from slimkit.core.config import Config
from slimkit.core.train import fit
from slimkit.dynamic.segments import split
from slimkit.errors import ConfigError, DataError

NEVER = 2.0  # a threshold above every confidence (both criteria lie in [0, 1])
Criterion = Literal["max_softmax", "entropy"]


class EarlyExit(Config):
    """Where to put the exits, how to train them and how to set their thresholds."""

    exits: list[str] = []  # modules after which to attach a head (empty: by ``at``)
    at: list[float] = [0.25, 0.5, 0.75]  # else: the cut points nearest these MAC fractions
    head_width: int = Field(64, ge=1)  # a head: 1x1 conv to this width, BN, ReLU, pool, linear
    # 0: the 1x1 conv runs at the feature's resolution, then a global pool; g > 0: the feature is
    # average-pooled to about g x g first and the linear reads the whole g x g map (cheaper on
    # large early maps, and it keeps where things are, which a global pool loses)
    head_grid: int = Field(0, ge=0)
    criterion: Criterion = "max_softmax"  # confidence: top softmax prob. or 1 - entropy/log(C)
    max_drop: float = Field(0.01, ge=0.0, le=1.0)  # accuracy drop allowed on the calibration data
    # what the drop is measured against: disagreement with the full model (an upper bound of the
    # accuracy drop on any data, and steadier on a small split) or the calibration labels
    calibrate_on: Literal["agreement", "labels"] = "agreement"
    epochs: int = Field(3, ge=0)  # training of the heads (0: untrained, for tests)
    lr: float = Field(3e-3, gt=0)
    temperature: float = Field(2.0, gt=0)  # distillation from the final head
    alpha: float = Field(0.5, ge=0.0, le=1.0)  # weight of distillation vs labels (when given)
    finetune: bool = False  # train the backbone too, distilling every exit from the original
    batch_size: int = Field(64, ge=1)  # for data given as a dataset rather than batches
    max_steps: int | None = Field(None, ge=1)  # cap on training steps (quick runs)


class ExitHead(nn.Module):
    """A small classifier on an intermediate feature map: (B, C, H, W) -> 1x1 conv, BN, ReLU,
    global pool, linear; with ``grid`` g: average pool to about g x g, 1x1 conv, BN, ReLU,
    linear on the flattened map; (B, C) -> linear."""

    def __init__(self, shape: tuple[int, ...], num_classes: int, width: int, grid: int = 0) -> None:
        super().__init__()
        self.body: nn.Module
        if len(shape) == 4 and grid > 0:
            kh, kw = max(1, shape[2] // grid), max(1, shape[3] // grid)  # a fixed kernel: exports
            cells = (shape[2] // kh) * (shape[3] // kw)
            self.body = nn.Sequential(
                nn.AvgPool2d((kh, kw)),
                nn.Conv2d(shape[1], width, 1, bias=False),
                nn.BatchNorm2d(width),
                nn.ReLU(),
                nn.Flatten(),
                nn.Linear(width * cells, num_classes),
            )
        elif len(shape) == 4:
            self.body = nn.Sequential(
                nn.Conv2d(shape[1], width, 1, bias=False),
                nn.BatchNorm2d(width),
                nn.ReLU(),
                nn.AdaptiveAvgPool2d(1),
                nn.Flatten(),
                nn.Linear(width, num_classes),
            )
        elif len(shape) == 2:
            self.body = nn.Linear(shape[1], num_classes)
        else:
            raise ConfigError(
                f"an exit head needs a (B, C, H, W) or (B, C) feature, got shape {shape}",
                fix="attach the exit after another module",
            )

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.body(h)
        return out


def confidence(logits: torch.Tensor, criterion: str) -> torch.Tensor:
    """Per-sample confidence in [0, 1]: the top softmax probability, or 1 - entropy / log(C)."""
    p = logits.float().softmax(-1)
    if criterion == "max_softmax":
        return p.amax(-1)
    ent = -(p * p.clamp_min(1e-12).log()).sum(-1)
    return 1.0 - ent / math.log(logits.shape[-1])


def _exporting() -> bool:
    return bool(
        torch.jit.is_tracing() or torch.onnx.is_in_onnx_export() or torch.compiler.is_compiling()
    )


class EarlyExitModel(nn.Module):
    """The backbone cut into ``segments`` with ``heads[k]`` after segment ``k``; in eval mode a
    sample takes the first exit whose confidence reaches ``thresholds[k]`` (computation stops
    once every sample of the batch has exited). ``exit_logits(x)`` gives every head's logits."""

    thresholds: torch.Tensor

    def __init__(
        self,
        segments: list[nn.Module],
        heads: list[nn.Module],
        criterion: str,
        cuts: list[str],
    ) -> None:
        super().__init__()
        self.segments = nn.ModuleList(segments)
        self.heads = nn.ModuleList(heads)
        self.criterion = criterion
        self.cuts = list(cuts)  # the module each exit follows
        self.register_buffer("thresholds", torch.full((len(heads),), NEVER))
        self.segment_macs: list[int] = []  # per sample, filled by ``count_macs``
        self.head_macs: list[int] = []
        self.freeze_backbone = True

    def train(self, mode: bool = True) -> EarlyExitModel:
        super().train(mode)
        if mode and self.freeze_backbone:
            self.segments.eval()  # frozen: BatchNorm statistics of the backbone stay
        return self

    def exit_logits(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Logits of every exit and, last, of the model's own head."""
        outs, h = [], x
        for seg, head in zip(self.segments, self.heads, strict=False):
            h = seg(h)
            outs.append(head(h))
        outs.append(self.segments[-1](h))
        return outs

    def forward_with_exits(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(logits, exit index)`` per sample; index ``len(heads)`` is the model's own head."""
        n = len(self.heads)
        h, out, taken = x, None, torch.full((x.shape[0],), n, dtype=torch.long)
        done = torch.zeros(x.shape[0], dtype=torch.bool)
        for k in range(n):
            h = self.segments[k](h)
            logits = self.heads[k](h)
            take = (confidence(logits, self.criterion) >= self.thresholds[k]) & ~done
            out = logits if out is None else torch.where(take[:, None], logits, out)
            taken = torch.where(take, torch.full_like(taken, k), taken)
            done = done | take
            if not _exporting() and bool(done.all()):
                return out, taken
        final = self.segments[-1](h)
        out = final if out is None else torch.where(done[:, None], out, final)
        return out, taken

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_with_exits(x)[0]

    def count_macs(self, example: torch.Tensor) -> None:
        """MACs per sample of every segment and head (``slimkit.analyze``'s counting)."""
        from slimkit.analyze.profile import profile_model

        self.segment_macs, self.head_macs = [], []
        h = example[:1]
        with torch.no_grad():
            for k, seg in enumerate(self.segments):
                self.segment_macs.append(profile_model(seg, (h,)).total_macs)
                h = seg(h)
                if k < len(self.heads):
                    self.head_macs.append(profile_model(self.heads[k], (h,)).total_macs)

    def exit_macs(self) -> list[int]:
        """MACs per sample of leaving at exit k (k = len(heads): the full model, every head
        evaluated on the way)."""
        out = []
        for k in range(len(self.heads) + 1):
            out.append(sum(self.segment_macs[: k + 1]) + sum(self.head_macs[: k + 1]))
        return out

    @property
    def full_macs(self) -> int:
        """MACs of the original model alone (every segment, no head)."""
        return sum(self.segment_macs)

    def evaluate(self, data: Iterable[Any]) -> dict[str, Any]:
        """On ``(inputs, labels)`` batches: top-1 of the early-exit policy and of the full
        model, agreement between them, the fraction leaving at each exit, average MACs and the
        fraction of the full model's MACs saved."""
        logits, labels = _collect(self, data)
        conf = torch.stack([confidence(lg, self.criterion) for lg in logits[:-1]])
        taken = _policy(conf, self.thresholds)
        pred = torch.stack([lg.argmax(-1) for lg in logits])  # (E + 1, N)
        chosen = pred.gather(0, taken[None])[0]
        costs = torch.tensor(self.exit_macs(), dtype=torch.float64)
        avg = float(costs[taken].mean())
        out: dict[str, Any] = {
            "samples": int(taken.numel()),
            "agreement": float((chosen == pred[-1]).float().mean()),
            "exit_fractions": [float((taken == k).float().mean()) for k in range(len(logits))],
            "avg_macs": avg,
            "full_macs": self.full_macs,
            "macs_saved": 1.0 - avg / self.full_macs,
            "thresholds": [float(t) for t in self.thresholds],
        }
        if labels is not None:
            out["top1"] = float((chosen == labels).float().mean())
            out["full_top1"] = float((pred[-1] == labels).float().mean())
            out["exit_top1"] = [float((p == labels).float().mean()) for p in pred]
        return out


def _policy(conf: torch.Tensor, thresholds: torch.Tensor) -> torch.Tensor:
    """Exit index per sample from confidences (E, N): the first k with conf >= threshold."""
    n_exits, n = conf.shape
    taken = torch.full((n,), n_exits, dtype=torch.long)
    for k in reversed(range(n_exits)):
        taken = torch.where(conf[k] >= thresholds[k], torch.full_like(taken, k), taken)
    return taken


def _split_batch(batch: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    if isinstance(batch, torch.Tensor):
        return batch, None
    if isinstance(batch, list | tuple) and batch and isinstance(batch[0], torch.Tensor):
        y = batch[1] if len(batch) > 1 and isinstance(batch[1], torch.Tensor) else None
        return batch[0], y
    raise DataError(
        f"a batch of type {type(batch).__name__} is neither a tensor nor (inputs, labels)",
        fix="pass batches of input tensors or (inputs, labels) tuples",
    )


def _collect(
    ee: EarlyExitModel, data: Iterable[Any]
) -> tuple[list[torch.Tensor], torch.Tensor | None]:
    """Every exit's logits over ``data`` (concatenated), and the labels when every batch has
    them."""
    was = ee.training
    ee.eval()
    parts: list[list[torch.Tensor]] = []
    ys: list[torch.Tensor] = []
    try:
        with torch.no_grad():
            for batch in data:
                x, y = _split_batch(batch)
                parts.append(ee.exit_logits(x))
                if y is not None:
                    ys.append(y)
    finally:
        ee.train(was)
    if not parts:
        raise DataError("the data is empty", fix="pass at least one batch")
    logits = [torch.cat(p) for p in zip(*parts, strict=True)]
    labels = torch.cat(ys) if len(ys) == len(parts) else None
    return logits, labels


def calibrate(
    ee: EarlyExitModel, data: Iterable[Any], max_drop: float, *, use_labels: bool = False
) -> dict[str, Any]:
    """Set ``ee.thresholds`` on held-out ``data`` so that the early-exit policy loses at most
    ``max_drop`` against the full model: at most that fraction of samples predicted differently
    from the full model (the default; it bounds the accuracy drop on these samples, whatever the
    labels), or with ``use_labels`` (and labelled batches) at most that much accuracy.

    Greedy, exit by exit: exit ``k`` gets the lowest threshold at which the policy so far (later
    samples assumed to run to the end) stays within ``max_drop * (k + 1) / n_exits``.
    """
    logits, labels = _collect(ee, data)
    n_exits, n = len(ee.heads), logits[0].shape[0]
    pred = [lg.argmax(-1) for lg in logits]
    ref = labels if (use_labels and labels is not None) else pred[-1]
    right = torch.stack([(p == ref).float() for p in pred])  # (E + 1, N)
    conf = torch.stack([confidence(lg, ee.criterion) for lg in logits[:-1]])
    thresholds = torch.full((n_exits,), NEVER)
    exited = torch.zeros(n, dtype=torch.bool)
    lost = 0.0  # accuracy lost so far (in samples) by the exits already set
    for k in range(n_exits):
        budget = max_drop * n * (k + 1) / n_exits
        idx = (~exited).nonzero().flatten()
        order = idx[conf[k, idx].argsort(descending=True)]
        delta = torch.cumsum(right[-1, order] - right[k, order], 0)  # loss if the top j exit
        c = conf[k, order]
        # a threshold admits every sample with that confidence: only the last of ties counts
        last_of_tie = torch.ones_like(c, dtype=torch.bool)
        last_of_tie[:-1] = c[1:] < c[:-1]
        ok = ((lost + delta) <= budget + 1e-9) & last_of_tie
        if bool(ok.any()):
            j = int(ok.nonzero().flatten()[-1])
            thresholds[k] = c[j]
            lost += float(delta[j])
            exited[order[: j + 1]] = True
    ee.thresholds.copy_(thresholds)
    return {
        "thresholds": thresholds.tolist(),
        "lost": lost / n,
        "exited": float(exited.float().mean()),
    }


def _loss(alpha: float, temperature: float, teacher: nn.Module | None) -> Any:
    """Distillation of every exit from the final head (frozen backbone) or, when fine-tuning,
    of every exit and the final head from ``teacher`` (the original model); plus labels."""

    def loss_fn(ee: nn.Module, batch: Any) -> torch.Tensor:
        if isinstance(batch, dict):  # frozen backbone: features cached by _cache
            y = batch.get("y")
            heads: nn.ModuleList = ee.heads  # type: ignore[assignment]
            outs = [h(f.float()) for h, f in zip(heads, batch["features"], strict=True)]
            outs.append(batch["final"])
            x = outs[0]
        else:
            x, y = _split_batch(batch)
            outs = ee.exit_logits(x)  # type: ignore[operator]
        if teacher is None:
            ref, students = outs[-1].detach(), outs[:-1]
        else:
            with torch.no_grad():
                ref = teacher(x)
            students = outs
        t = temperature
        soft = F.softmax(ref / t, -1)
        total = x.new_zeros(())
        for lg in students:
            kd = F.kl_div(F.log_softmax(lg / t, -1), soft, reduction="batchmean") * t * t
            part = kd if y is None else alpha * kd + (1 - alpha) * F.cross_entropy(lg, y)
            total = total + part
        return total

    return loss_fn


def _cache(ee: EarlyExitModel, train: list[Any]) -> list[dict[str, Any]]:
    """One pass of the frozen backbone over ``train``: each exit's input features (fp16, to
    halve the memory) and the final logits, so that epochs of head training cost only the
    heads."""
    out = []
    ee.segments.eval()
    with torch.no_grad():
        for batch in train:
            x, y = _split_batch(batch)
            feats, h = [], x
            for seg in ee.segments[:-1]:
                h = seg(h)
                feats.append(h.half())
            item: dict[str, Any] = {"features": feats, "final": ee.segments[-1](h)}
            if y is not None:
                item["y"] = y
            out.append(item)
    return out


def _batches(data: Any, batch_size: int) -> list[Any]:
    if isinstance(data, torch.utils.data.Dataset) and not isinstance(data, list):
        return list(torch.utils.data.DataLoader(data, batch_size=batch_size, shuffle=False))
    out = list(data)
    if not out:
        raise DataError("the training data is empty", fix="pass at least one batch")
    return out


def early_exit(
    model: nn.Module,
    config: EarlyExit | None = None,
    *,
    data: Any,
    calib: Any = None,
    num_classes: int | None = None,
    progress: bool = True,
) -> EarlyExitModel:
    """An early-exit copy of the classifier ``model`` (never modified).

    ``data``: training batches (``(inputs, labels)`` or inputs alone: then the heads learn only
    from the final head); ``calib``: held-out batches for the thresholds (default: ``data``).
    By default the backbone is frozen: the full model's output is unchanged, only the heads
    learn. ``finetune=True`` trains the backbone too, every exit (the final one included)
    distilled from the original model: stronger early exits, a final head that may move.
    """
    cfg = config or EarlyExit()
    train = _batches(data, cfg.batch_size)
    x0, _ = _split_batch(train[0])
    if not bool(torch.isfinite(x0).all()):
        raise DataError("the first training batch has NaN or Inf", fix="clean the data")
    src = copy.deepcopy(model).eval()
    with torch.no_grad():
        try:
            out = src(x0)
        except Exception as e:
            raise DataError(
                f"{type(model).__name__} fails on the first batch of shape {tuple(x0.shape)}: "
                f"{str(e).splitlines()[0][:200] if str(e) else type(e).__name__}",
                fix="pass batches of the model's input shape",
            ) from None
    if not isinstance(out, torch.Tensor) or out.dim() != 2:
        raise ConfigError(
            f"early exit needs a classifier returning (batch, classes) logits; "
            f"{type(model).__name__} returns {getattr(out, 'shape', type(out).__name__)}",
            fix="wrap the model so that forward returns the logits tensor",
        )
    classes = num_classes or out.shape[1]
    chain = split(src, x0, names=cfg.exits, at=cfg.at)
    heads = [ExitHead(c.shape, classes, cfg.head_width, cfg.head_grid) for c in chain.cuts]
    ee = EarlyExitModel(
        list(chain.segments), list(heads), cfg.criterion, [c.module for c in chain.cuts]
    )
    ee.freeze_backbone = not cfg.finetune
    for p in ee.segments.parameters():
        p.requires_grad_(cfg.finetune)
    ee.count_macs(x0)
    if cfg.epochs > 0:
        teacher = copy.deepcopy(model).eval() if cfg.finetune else None
        fit(
            ee,
            train if cfg.finetune else _cache(ee, train[: cfg.max_steps]),
            loss_fn=_loss(cfg.alpha, cfg.temperature, teacher),
            epochs=cfg.epochs,
            lr=cfg.lr,
            weight_decay=5e-4,
            max_steps=cfg.max_steps,
            progress=progress,
            description="early-exit heads",
        )
    calibrate(ee, calib if calib is not None else train, cfg.max_drop,
              use_labels=cfg.calibrate_on == "labels")  # fmt: skip
    return ee.eval()
