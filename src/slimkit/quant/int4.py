"""Weight-only int4 / int8 for language models: group-wise codes, four weight solvers, and ONNX
Runtime's ``MatMulNBits`` kernels for the deployed model.

Every Linear layer in scope (Hugging Face ``Conv1D`` too) becomes an ``NBitsLinear``: 4- or 8-bit
codes in groups of ``group_size`` input channels, a scale (and a zero point unless ``symmetric``)
per group; activations stay float. The weight bytes of a decoder at batch 1 are what bounds its
speed, so 4-bit weights run faster as well as being ~7x smaller; ``accuracy_level=4`` lets ORT
compute the dot products in int8 (the input quantized per block, simulated in PyTorch too).

Solvers (``method``):

- ``rtn``: round to nearest over each group's min / max. No data needed.
- ``mse``: each group's clip ratio searched for the smallest E[x^2]-weighted error (E[x^2] from the
  calibration data; plain MSE without data).
- ``gptq``: Frantar et al., 2022 (``quant/gptq.py``): column-wise error compensation with the
  inverse Hessian of the layer's inputs, act-order, damping, lazy batches.
- ``awq``: Lin et al., 2023 (``quant/awq.py``): per-input-channel activation-aware scales,
  searched against the layers' output error. Layers fed by a norm layer (q / k / v after
  LayerNorm, fc1, lm_head) share one scaling, folded into the norm's weight and bias (kept only
  if the model's output is unchanged); elsewhere it stays a ``Mul`` on the layer's input.

Calibration is layer by layer in forward order (``core/layerwise.py``): each layer's statistics
come from inputs that went through the already-quantized layers before it.

    q = sk.quantize(model, "int4")                                   # rtn, g128, no data
    q = sk.quantize(model, "int4-gptq", data=calib)                  # GPTQ on calibration batches
    q = sk.quantize(model, Int4(method="awq", group_size=64), data=calib,
                    scope=sk.Scope(exclude=["lm_head"]))
    sk.export_onnx(q, "model.onnx", example_inputs=(ids,))           # MatMulNBits nodes

YAML step: ``- quant.int4: {method: gptq, group_size: 128}``. Supports Linear and HF Conv1D
layers; embedding tables become int8 per row (``embeddings="float"`` keeps them); other layers
stay float.
"""

from __future__ import annotations

import copy
from typing import Any, Literal

import torch
from pydantic import Field, field_validator
from torch import nn

from slimkit.core.config import Config
from slimkit.core.data import collect_batches, merge_batches
from slimkit.core.layerwise import InputStats, quantize_layerwise
from slimkit.core.rebuild import linearize_conv1d
from slimkit.core.registry import METHODS
from slimkit.core.scope import Scope, set_submodule
from slimkit.errors import ConfigError
from slimkit.quant.awq import awq
from slimkit.quant.gptq import gptq
from slimkit.quant.groupwise import GroupSpec, quantize_weight, search_range
from slimkit.quant.nbits import Int8Embedding, NBitsLinear

NEEDS_DATA = ("gptq", "awq")


class Int4(Config):
    """Group-wise weight-only quantization of Linear layers (``MatMulNBits`` on ONNX Runtime)."""

    bits: Literal[4, 8] = 4  # code width; MatMulNBits runs 4 and 8 bits
    group_size: int = 128  # input channels per scale: a power of two, 16 to 256
    method: Literal["rtn", "mse", "gptq", "awq"] = "rtn"  # the weight solver (module docstring)
    symmetric: bool = False  # True: no zero points (fixed at 2**(bits-1)), a little smaller
    act_order: bool = True  # gptq: visit columns by decreasing input energy
    damp: float = Field(0.01, gt=0, le=1)  # gptq: diagonal damping, a fraction of mean(diag H)
    clip_grid: int = Field(20, ge=1, le=100)  # range search points (mse, gptq, awq); 1 = none
    awq_grid: int = Field(20, ge=2, le=100)  # awq: alpha values tried in [0, 1)
    accuracy_level: Literal[0, 1, 2, 3, 4] = 4  # ORT compute: 4 = int8 dot products (fastest)
    num_batches: int = Field(32, ge=1)  # calibration batches read (gptq, awq, mse)
    min_features: int = Field(0, ge=0)  # keep layers with fewer input channels than this float
    embeddings: Literal["int8", "float"] = "int8"  # nn.Embedding tables in scope: int8 per row

    @field_validator("group_size")
    @classmethod
    def _power_of_two(cls, v: int) -> int:
        if v < 16 or v > 256 or v & (v - 1):
            raise ValueError(
                f"group_size={v} is not a power of two between 16 and 256 (MatMulNBits needs "
                "one); use 32, 64 or 128"
            )
        return v


def _solver(cfg: Int4, notes: dict[str, Any]) -> Any:
    spec = GroupSpec(cfg.bits, cfg.group_size, cfg.symmetric)

    def layer(lin: nn.Linear, codes: Any, scale: Any, zero: Any, in_scale: Any) -> NBitsLinear:
        bias = None if lin.bias is None else lin.bias.detach().float()
        return NBitsLinear.from_codes(codes, scale, zero, spec, in_features=lin.in_features,
                                      bias=bias, input_scale=in_scale,
                                      accuracy_level=cfg.accuracy_level)  # fmt: skip

    def one(name: str, lin: nn.Linear, stats: InputStats | None) -> nn.Module:
        w = lin.weight.detach().float()
        method = cfg.method if stats is not None or cfg.method in ("rtn", "mse") else "rtn"
        if method != cfg.method:
            notes.setdefault("rtn_fallback", []).append(name)
        in_scale = None
        if method == "gptq" and stats is not None:
            codes, scale, zero = gptq(w, stats.hessian(), spec, act_order=cfg.act_order,
                                      damp=cfg.damp, clip_grid=cfg.clip_grid)  # fmt: skip
        elif method == "awq" and stats is not None:
            codes, scale, zero, in_scale, alpha = awq(
                w, stats.hessian(), stats.abs_mean(), spec, grid=cfg.awq_grid,
                clip_grid=cfg.clip_grid,
            )  # fmt: skip
            notes.setdefault("awq_alpha", {})[name] = alpha
            in_scale = in_scale if alpha > 0 else None  # alpha 0: all ones, no Mul needed
        else:
            grid = cfg.clip_grid if method == "mse" else 1
            imp = stats.sq_mean() if stats is not None else None
            scale, zero = search_range(w, spec, imp, grid=grid)
            codes = quantize_weight(w, scale, zero, spec)
        return layer(lin, codes, scale, zero, in_scale)

    def solve(
        group: list[tuple[str, nn.Linear]], stats: InputStats | None, producer: str | None
    ) -> list[nn.Module]:
        if cfg.method != "awq" or stats is None or producer is None:
            return [one(name, lin, stats) for name, lin in group]
        # one input scaling for every layer after the norm, so that it folds into the norm: the
        # search runs on their rows stacked (same inputs, so the same output error summed)
        w = torch.cat([lin.weight.detach().float() for _, lin in group])
        h, act = stats.hessian(), stats.abs_mean()
        codes, scale, zero, s, alpha = awq(w, h, act, spec, grid=cfg.awq_grid,
                                           clip_grid=cfg.clip_grid)  # fmt: skip
        in_scale = s if alpha > 0 else None
        rows = [lin.out_features for _, lin in group]
        parts = zip(codes.split(rows), scale.split(rows), zero.split(rows), strict=True)
        notes.setdefault("awq_alpha", {}).update({name: alpha for name, _ in group})
        return [layer(lin, *p, in_scale) for (_, lin), p in zip(group, parts, strict=True)]

    return solve


def fold_input_scale(model: nn.Module, norm_name: str, names: list[str]) -> Any:
    """Move the shared ``input_scale`` of the packed layers ``names`` into the norm layer that
    feeds them (its weight and bias times the scale); returns an undo, or None if they do not
    share one."""
    layers = [model.get_submodule(n) for n in names]
    scales = [getattr(m, "input_scale", None) for m in layers]
    first = scales[0]
    if first is None or not all(s is not None and torch.equal(s, first) for s in scales):
        return None
    norm = model.get_submodule(norm_name)
    params = [p for p in (getattr(norm, "weight", None), getattr(norm, "bias", None))
              if isinstance(p, torch.Tensor)]  # fmt: skip
    saved = [p.detach().clone() for p in params]
    with torch.no_grad():
        for p in params:
            p.mul_(first)
    for m in layers:
        setattr(m, "input_scale", None)  # noqa: B010 - a registered buffer set to None

    def undo() -> None:
        with torch.no_grad():
            for p, old in zip(params, saved, strict=True):
                p.copy_(old)
        for m in layers:
            setattr(m, "input_scale", first)  # noqa: B010

    return undo


@METHODS.register(
    "quant.int4",
    config=Int4,
    summary="weight-only int4/int8, group-wise (rtn, mse, gptq, awq) -> ORT MatMulNBits",
    aliases={
        "int4-rtn": {},
        "int4-mse": {"method": "mse"},
        "int4-gptq": {"method": "gptq"},
        "int4-awq": {"method": "awq"},
        "int8-rtn": {"bits": 8},
        "int8-gptq": {"bits": 8, "method": "gptq"},
    },
    example={"method": "gptq", "group_size": 32, "num_batches": 2},
    export="qdq",  # MatMulNBits in ORT, checked by SQNR against the simulation
)
def quantize_int4(
    model: nn.Module,
    config: Int4 | None = None,
    *,
    data: Any = None,
    scope: Scope | None = None,
    progress: bool = False,
) -> nn.Module:
    """A copy of ``model`` whose Linear layers hold packed group-wise codes (``NBitsLinear``);
    the original is not modified. ``gptq`` and ``awq`` need ``data`` (calibration batches)."""
    cfg = config or Int4()
    if cfg.method in NEEDS_DATA and data is None:
        raise ConfigError(
            f"quant.int4 method={cfg.method!r} needs calibration data",
            fix="pass data=... (a few batches of the model's inputs), or use method='rtn'",
        )
    out = copy.deepcopy(model).eval()
    converted = linearize_conv1d(out)
    chosen = [
        n
        for n, m in (scope or Scope()).select(out, (nn.Linear,))
        if isinstance(m, nn.Linear) and m.in_features >= cfg.min_features
    ]
    batches = None
    if data is not None and cfg.method != "rtn":
        batches = merge_batches(collect_batches(data, what="calibration data",
                                                limit=cfg.num_batches))  # fmt: skip
    notes: dict[str, Any] = {}
    embeddings = [n for n, m in out.named_modules() if isinstance(m, nn.Embedding)
                  and cfg.embeddings == "int8" and (scope or Scope()).matches(n, m)]  # fmt: skip
    for name in embeddings:
        set_submodule(out, name, Int8Embedding(out.get_submodule(name)))  # type: ignore[arg-type]
    rep = quantize_layerwise(out, chosen, batches, _solver(cfg, notes), progress=progress,
                             fold=fold_input_scale if cfg.method == "awq" else None)  # fmt: skip
    record: dict[str, Any] = {
        "method": "quant.int4",
        "config": cfg.to_dict(),
        "layers": rep.order,
        "calibration_passes": rep.passes,
    }
    if converted:
        record["conv1d_as_linear"] = converted
    if embeddings:
        record["int8_embeddings"] = embeddings
    if rep.not_called:
        record["not_reached"] = f"no calibration input reached {', '.join(rep.not_called)} (rtn)"
    if notes.get("rtn_fallback"):
        record["rtn_fallback"] = notes["rtn_fallback"]
    if "awq_alpha" in notes:
        record["awq_alpha"] = notes["awq_alpha"]
    if rep.folded:
        record["awq_folded"] = rep.folded  # norm layer -> the layers whose input scale it took
    out.__dict__["meta"] = {"slimkit": record}
    return out
