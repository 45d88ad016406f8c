"""Low-bit and non-uniform weight quantization (experimental): binary, ternary, powers of two,
k-means weight sharing.

Every Conv / Linear layer in scope keeps its weight as small integer codes into a short table of
levels, times a scale per output channel: ``w[c, ...] = levels[codes[c, ...]] * scale[c]``.

- ``binary``: BinaryConnect / XNOR-Net's BWN (Rastegari et al., 2016): ``sign(w) * mean|w|``
  per channel; levels {-1, +1}, 1 bit.
- ``ternary``: TWN (Li et al., 2016): zero below ``threshold * mean|w|`` (0.7), else ``sign(w)``
  times the mean of the kept magnitudes; levels {-1, 0, +1}, 2 bits.
- ``pow2``: logarithmic levels {0, +-2^-k} (Miyashita et al., 2016) times a per-channel scale
  chosen by squared error; ``bits`` give 2^bits - 1 levels.
- ``kmeans``: Deep Compression's weight sharing (Han et al., 2016): one codebook of 2^bits
  centroids per layer, initialised linearly between the smallest and largest weight, then Lloyd
  iterations (``per_channel=True`` clusters each channel's weights divided by its max |w|).

By default the first and the last Conv / Linear layer (in module order) stay float, as users of
binary nets expect. Without training, binary and ternary lose most of a model's accuracy;
``epochs > 0`` fine-tunes the quantized model by distillation from the float one (the registry's
``distill.response`` on ``core.train.fit``): a float latent weight quantized in the forward with
a straight-through gradient (binary, ternary, pow2), or the centroids trained with the gradients
of their weights summed per cluster, the codes fixed (kmeans).

Experimental, said in every record: there is no kernel for these formats here. The model is
smaller on disk (``sk.export_onnx`` writes the codes as UINT2 / UINT4 / UINT8 initializers and
rebuilds the weights with Cast, Gather and Mul, which ONNX Runtime folds once at load) and runs as
dequantized float weights: not faster than fp32.

    q = sk.quantize(model, "ternary")                                 # no data needed
    q = sk.quantize(model, LowBit(scheme="kmeans", bits=3))
    q = sk.quantize(model, LowBit(scheme="binary", epochs=3, lr=1e-3), data=train_loader)
    sk.export_onnx(q, "model.onnx", example_inputs=(x,))             # codes in 2-bit integers

YAML step: ``- quant.lowbit: {scheme: pow2, bits: 4}``. Supports Conv1d/2d/3d and Linear layers
(Hugging Face Conv1D as Linear); other layers stay float.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from typing import Any, Literal

import torch
from pydantic import Field, model_validator
from torch import nn

from slimkit.core.config import Config
from slimkit.core.io import PathLike
from slimkit.core.rebuild import linearize_conv1d
from slimkit.core.registry import METHODS
from slimkit.core.scope import Scope, set_submodule
from slimkit.core.verbs import dispatch
from slimkit.errors import ConfigError
from slimkit.quant.modules import run_layer
from slimkit.quant.primitives import EPS

Scheme = Literal["binary", "ternary", "pow2", "kmeans"]
LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
# code bits each scheme allows, and its default
BITS: dict[str, tuple[int, int, int]] = {
    "binary": (1, 1, 1),
    "ternary": (2, 2, 2),
    "pow2": (2, 8, 4),
    "kmeans": (1, 8, 4),
}
NOT_FASTER = (
    "experimental: runs as dequantized float weights (ONNX Runtime folds the codebook at load): "
    "smaller, not faster"
)


class LowBit(Config):
    """Binary / ternary / power-of-two / k-means weights (experimental: smaller, not faster)."""

    scheme: Scheme = "ternary"
    bits: int | None = None  # code bits: binary 1, ternary 2; pow2 2-8 and kmeans 1-8 (default 4)
    per_channel: bool | None = None  # a scale per output channel (None: all but kmeans)
    keep_first_last: bool = True  # the first and last Conv/Linear stay float
    threshold: float = Field(0.7, gt=0, lt=2)  # ternary: zero below threshold * mean|w|
    iterations: int = Field(30, ge=1)  # kmeans: Lloyd iterations
    scale_grid: int = Field(20, ge=1, le=100)  # pow2: scales tried per channel (1: max|w|)
    epochs: int = Field(0, ge=0)  # fine-tune by distillation from the float model (needs data)
    lr: float = Field(1e-4, gt=0)
    loss: Literal["auto", "softmax", "sigmoid", "peaked", "regression", "cosine"] = "auto"
    alpha: float = Field(0.5, ge=0, le=1)  # distillation vs label loss, where data has labels
    temperature: float = Field(4.0, gt=0)
    seed: int = 0

    @model_validator(mode="after")
    def _bits_fit_the_scheme(self) -> LowBit:
        lo, hi, _ = BITS[self.scheme]
        if self.bits is not None and not lo <= self.bits <= hi:
            allowed = f"bits: {lo}" if lo == hi else f"bits from {lo} to {hi}"
            raise ValueError(
                f"scheme {self.scheme!r} does not take bits={self.bits}: use {allowed}"
                + (" (or leave bits out)" if lo == hi else "")
                + ("; for more levels use pow2 or kmeans" if self.scheme != "kmeans" else "")
            )
        return self

    @property
    def code_bits(self) -> int:
        return self.bits if self.bits is not None else BITS[self.scheme][2]

    @property
    def channelwise(self) -> bool:
        return self.per_channel if self.per_channel is not None else self.scheme != "kmeans"


def storage_bits(code_bits: int) -> int:
    """The smallest ONNX integer width that holds ``code_bits``: 2 (UINT2), 4 (UINT4) or 8."""
    return 2 if code_bits <= 2 else 4 if code_bits <= 4 else 8


# --- the quantizers: w (C, K) -> codes (C, K) uint8, levels (L,) ascending, scale (C,) ---------


def nearest(x: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """Index of the nearest of the ascending ``levels`` for every element of ``x``."""
    return torch.bucketize(x, (levels[1:] + levels[:-1]) / 2)


def _rows(w: torch.Tensor, per_channel: bool) -> torch.Tensor:
    return w.reshape(w.shape[0], -1) if per_channel else w.reshape(1, -1)


def binary(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """BWN: ``sign(w) * mean|w|`` per row (the L2-optimal scale for fixed signs)."""
    scale = w.abs().mean(1).clamp_min(EPS)
    return (w >= 0).to(torch.uint8), torch.tensor([-1.0, 1.0]), scale


def ternary(w: torch.Tensor, t: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """TWN: zero where ``|w| <= t * mean|w|``, else the sign times the mean kept magnitude."""
    a = w.abs()
    kept = a > t * a.mean(1, keepdim=True)
    n = kept.sum(1)
    scale = torch.where(n > 0, (a * kept).sum(1) / n.clamp_min(1), a.mean(1)).clamp_min(EPS)
    codes = (1 + torch.sign(w) * kept).to(torch.uint8)  # 0, 1, 2 -> -1, 0, +1
    return codes, torch.tensor([-1.0, 0.0, 1.0]), scale


def pow2_levels(bits: int) -> torch.Tensor:
    """{0, +-1, +-1/2, ..., +-2^-(2^(bits-1) - 2)}: 2^bits - 1 levels, ascending."""
    mags = 2.0 ** -torch.arange(2 ** (bits - 1) - 1, dtype=torch.float32)  # 1, 1/2, ...
    return torch.cat([-mags, torch.zeros(1), mags.flip(0)])


def pow2(w: torch.Tensor, bits: int, grid: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Logarithmic levels times the per-row scale (ratios of max|w|) with the least squared
    error."""
    levels = pow2_levels(bits)
    amax = w.abs().amax(1).clamp_min(EPS)
    best_err = torch.full_like(amax, math.inf)
    best = amax.clone()
    for r in torch.linspace(1.0, 0.5, grid) if grid > 1 else torch.ones(1):
        s = amax * r
        q = levels[nearest(w / s[:, None], levels)] * s[:, None]
        err = ((q - w) ** 2).sum(1)
        better = err < best_err
        best_err, best = torch.where(better, err, best_err), torch.where(better, s, best)
    codes = nearest(w / best[:, None], levels).to(torch.uint8)
    return codes, levels, best


def kmeans(w: torch.Tensor, bits: int, iterations: int) -> tuple[torch.Tensor, torch.Tensor]:
    """1-D k-means of all of ``w`` into 2^bits centroids (linear init, Lloyd); codes, centroids."""
    x = w.reshape(-1)
    k = 2**bits
    c = torch.linspace(float(x.min()), float(x.max()), k)
    idx = nearest(x, c)
    for _ in range(iterations):
        sums = torch.zeros(k).index_add_(0, idx, x)
        counts = torch.bincount(idx, minlength=k)
        c = torch.where(counts > 0, sums / counts.clamp_min(1), c).sort().values
        new = nearest(x, c)
        if torch.equal(new, idx):
            break
        idx = new
    return idx.to(torch.uint8).reshape(w.shape), c


def quantize_weight(w: torch.Tensor, cfg: LowBit) -> tuple[torch.Tensor, ...]:
    """``(codes, levels, scale)`` of weight ``w`` (out channels first) under ``cfg``; codes have
    ``w``'s shape, scale one value per output channel (or one for the layer)."""
    rows = _rows(w.detach().float(), cfg.channelwise)
    if cfg.scheme == "binary":
        codes, levels, scale = binary(rows)
    elif cfg.scheme == "ternary":
        codes, levels, scale = ternary(rows, cfg.threshold)
    elif cfg.scheme == "pow2":
        codes, levels, scale = pow2(rows, cfg.code_bits, cfg.scale_grid)
    else:
        scale = rows.abs().amax(1).clamp_min(EPS) if cfg.channelwise else torch.ones(1)
        codes, levels = kmeans(rows / scale[:, None], cfg.code_bits, cfg.iterations)
    return codes.reshape(w.shape), levels, scale


def decode(codes: torch.Tensor, levels: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``levels[codes] * scale`` along the first axis (differentiable in levels and scale)."""
    w = levels[codes.long()]
    return w * scale.view((-1,) + (1,) * (w.dim() - 1))


class _Decode(torch.autograd.Function):
    """:func:`decode`; exports as ``slimkit::LowBitDecode``, a placeholder that
    ``export.codebook`` replaces with small-integer codes, Cast, Gather and Mul."""

    @staticmethod
    def forward(ctx: Any, codes: torch.Tensor, levels: torch.Tensor, scale: torch.Tensor,
                bits: int) -> torch.Tensor:  # fmt: skip
        return decode(codes, levels, scale)

    @staticmethod
    def symbolic(g: Any, codes: Any, levels: Any, scale: Any, bits: int) -> Any:
        y = g.op("slimkit::LowBitDecode", codes, levels, scale, bits_i=bits)
        y.setType(levels.type().with_sizes(codes.type().sizes()))  # the weight's static shape
        return y


class LowBitLayer(nn.Module):
    """A Conv / Linear whose weight is ``levels[codes] * scale`` (``layer`` keeps the rest: bias,
    stride, padding, groups; its float weight is gone)."""

    exports_codebook = True  # export.onnx packs the codes into small integer initializers
    codes: torch.Tensor
    levels: torch.Tensor
    scale: torch.Tensor

    def __init__(self, layer: nn.Module, codes: torch.Tensor, levels: torch.Tensor,
                 scale: torch.Tensor, bits: int) -> None:  # fmt: skip
        super().__init__()
        if not isinstance(layer, LAYERS):
            raise TypeError(f"LowBitLayer wraps Conv/Linear, not {type(layer).__name__}")
        del layer.weight
        self.layer = layer
        self.bits = bits
        self.register_buffer("codes", codes.to(torch.uint8))
        self.register_buffer("levels", levels.float())
        self.register_buffer("scale", scale.float())

    def weight(self) -> torch.Tensor:
        if torch.onnx.is_in_onnx_export():
            out: torch.Tensor = _Decode.apply(self.codes, self.levels, self.scale, self.bits)
            return out
        return decode(self.codes, self.levels, self.scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return run_layer(self.layer, x, self.weight(), self.layer.bias)

    def packed_bytes(self) -> int:
        """Bytes of the codes at their ONNX storage width, the levels and the scales."""
        codes = math.ceil(self.codes.numel() * storage_bits(self.bits) / 8)
        return codes + 4 * (self.levels.numel() + self.scale.numel())

    def extra_repr(self) -> str:
        return f"{self.bits}-bit codes, {self.levels.numel()} levels"


# --- fine-tuning: the quantized layers made trainable, then frozen back -------------------------


class _Trainable(nn.Module):
    """A :class:`LowBitLayer` in training: a float latent weight quantized in the forward with a
    straight-through gradient, or (kmeans) the centroids themselves trained, codes fixed."""

    def __init__(self, q: LowBitLayer, latent: torch.Tensor, cfg: LowBit) -> None:
        super().__init__()
        self.q, self.cfg = q, cfg
        q.layer.requires_grad_(True)
        if cfg.scheme == "kmeans":
            self.centroids = nn.Parameter(q.levels.clone())
        else:
            self.latent = nn.Parameter(latent.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q = self.q
        if self.cfg.scheme == "kmeans":  # the index's backward sums each cluster's gradients
            w = decode(q.codes, self.centroids, q.scale)
        else:
            wq = decode(*quantize_weight(self.latent, self.cfg))
            w = self.latent + (wq - self.latent).detach()  # straight-through
        return run_layer(q.layer, x, w, q.layer.bias)

    @torch.no_grad()
    def freeze(self) -> LowBitLayer:
        q = self.q
        if self.cfg.scheme == "kmeans":
            q.levels.copy_(self.centroids)
        else:
            codes, levels, scale = quantize_weight(self.latent, self.cfg)
            q.codes.copy_(codes)
            q.levels.copy_(levels)
            q.scale.copy_(scale)
        return q


def _finetune(
    out: nn.Module,
    teacher: nn.Module,
    latents: dict[str, torch.Tensor],
    cfg: LowBit,
    data: Any,
    val_fn: Callable[[nn.Module], float] | None,
    checkpoint: PathLike | None,
    progress: bool,
) -> dict[str, Any]:
    """Train ``out`` in place by response distillation from ``teacher``; its record."""
    from slimkit.core.verbs import report, resolve

    swapped = {}
    for name, latent in latents.items():
        q = out.get_submodule(name)
        assert isinstance(q, LowBitLayer)
        swapped[name] = _Trainable(q, latent, cfg)
        set_submodule(out, name, swapped[name])
    # the registry's response distillation (no import of another technique), in place
    _, default = resolve("distill", "response")
    fields = ("loss", "alpha", "temperature", "epochs", "lr", "seed")
    response = default.replace(**{k: getattr(cfg, k) for k in fields})
    trained = dispatch("distill", out, response, data=data, teacher=teacher, inplace=True,
                       val_fn=val_fn, checkpoint=checkpoint, progress=progress or None)  # fmt: skip
    train = report(trained).record
    for name, layer in swapped.items():
        set_submodule(out, name, layer.freeze())
    out.requires_grad_(False)
    return {"epochs": cfg.epochs, "history": train.get("history", []),
            "loss_kinds": [d["kind"] for d in train.get("losses", [])]}  # fmt: skip


def _chosen(model: nn.Module, scope: Scope | None, keep_first_last: bool) -> tuple[list[str], ...]:
    """The layers to quantize, and those kept float as the first / last layer."""
    every = [n for n, m in model.named_modules() if isinstance(m, LAYERS)]
    ends = {every[0], every[-1]} if keep_first_last and every else set()
    chosen = [n for n, m in (scope or Scope()).select(model, LAYERS) if isinstance(m, LAYERS)]
    return [n for n in chosen if n not in ends], [n for n in chosen if n in ends]


@METHODS.register(
    "quant.lowbit",
    config=LowBit,
    summary="EXPERIMENTAL binary / ternary / pow2 / k-means weights: smaller, not faster",
    aliases={
        "binary": {"scheme": "binary"},
        "ternary": {"scheme": "ternary"},
        "pow2": {"scheme": "pow2"},
        "kmeans": {"scheme": "kmeans"},
    },
    example={"scheme": "ternary", "keep_first_last": False, "epochs": 1, "lr": 1e-3},
)
def quantize_lowbit(
    model: nn.Module,
    config: LowBit | None = None,
    *,
    data: Any = None,
    scope: Scope | None = None,
    val_fn: Callable[[nn.Module], float] | None = None,
    checkpoint: PathLike | None = None,
    progress: bool = False,
) -> nn.Module:
    """A copy of ``model`` whose Conv / Linear layers hold low-bit codes (``LowBitLayer``); the
    original is not modified. ``epochs > 0`` needs ``data`` (training batches)."""
    cfg = config or LowBit()
    if cfg.epochs > 0 and data is None:
        raise ConfigError(
            f"quant.lowbit epochs={cfg.epochs} fine-tunes and needs training data",
            fix="pass data=... (batches of the model's inputs, with targets if any), or epochs=0",
        )
    teacher = copy.deepcopy(model).eval()
    out = copy.deepcopy(model).eval()
    converted = linearize_conv1d(out)
    chosen, kept = _chosen(out, scope, cfg.keep_first_last)
    fp32_bytes = sum(t.numel() * t.element_size() for t in [*out.parameters(), *out.buffers()])
    latents: dict[str, torch.Tensor] = {}
    layers: dict[str, Any] = {}
    for name in chosen:
        layer = out.get_submodule(name)
        weight = layer.weight
        assert isinstance(weight, torch.Tensor)
        w = weight.detach().float()
        latents[name] = w
        codes, levels, scale = quantize_weight(w, cfg)
        set_submodule(out, name, LowBitLayer(layer, codes, levels, scale, cfg.code_bits))
    record: dict[str, Any] = {"method": "quant.lowbit", "config": cfg.to_dict(),
                              "note": NOT_FASTER, "scheme": cfg.scheme, "bits": cfg.code_bits,
                              "storage_bits": storage_bits(cfg.code_bits)}  # fmt: skip
    if cfg.epochs > 0 and chosen:
        if val_fn is not None:
            record["val_float"] = float(val_fn(teacher))
            record["val_before"] = float(val_fn(out))
        record["finetune"] = _finetune(out, teacher, latents, cfg, data, val_fn, checkpoint,
                                       progress)  # fmt: skip
        if val_fn is not None:
            record["val_after"] = float(val_fn(out.eval()))
    for name in chosen:
        q = out.get_submodule(name)
        assert isinstance(q, LowBitLayer)
        layers[name] = {"levels": int(q.levels.numel()), "used": int(q.codes.unique().numel()),
                        "shape": list(q.codes.shape), "packed_bytes": q.packed_bytes()}  # fmt: skip
    packed = sum(v["packed_bytes"] for v in layers.values())
    low = {id(t) for n in chosen for t in out.get_submodule(n).buffers()}
    rest = sum(t.numel() * t.element_size()
               for t in [*out.parameters(), *out.buffers()] if id(t) not in low)  # fmt: skip
    record.update(layers=layers, float_layers=kept, packed_bytes=packed, float_bytes=rest,
                  size_bytes=packed + rest, fp32_bytes=fp32_bytes)  # fmt: skip
    if not chosen:
        record["unchanged"] = "no Conv/Linear layer in scope besides the first and last (kept " \
            "float: keep_first_last=False quantizes them)"  # fmt: skip
    if converted:
        record["conv1d_as_linear"] = converted
    out.__dict__["meta"] = {"slimkit": record}
    return out
