"""Roofline: what bounds each layer on a hardware profile, and what a change would buy before it
is made.

A layer needs ``flops / peak`` seconds of compute and ``bytes / bandwidth`` seconds of memory
traffic; the slower of the two is its lower bound, plus a small per-kernel launch overhead so that
tiny layers are not predicted to take no time at all::

    prof = profile_model(model, (x,))
    rf = roofline(prof, load_profile("this"))            # per layer: intensity, bound, verdict
    rf.bound, rf.total_s, rf.top(5)
    predict(prof, hw, Int8()).speedup                    # int8 weights and activations
    predict(prof, hw, [PruneChannels(0.5), Int8()])      # changes compose, in order

The model of the runtime is ONNX Runtime's: batch norms fold into the conv before them, and
activations (and residual adds after a conv) fuse into it, so those rows cost nothing.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from slimkit.analyze.hardware import Dtype, HardwareProfile
from slimkit.analyze.profile import ModelProfile
from slimkit.core.scope import Scope
from slimkit.errors import ConfigError

DTYPE_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2, "int8": 1}
MAC_OPS = ("conv", "linear", "matmul", "rnn", "attention")
DEFAULT_OVERHEAD_US = {"cpu": 2.0, "gpu": 10.0}  # per kernel, when the profile records none

_BN = ("BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "batch_norm")
_ACTS = {
    "ReLU", "relu", "ReLU6", "relu6", "Hardtanh", "hardtanh", "clamp", "clip", "GELU", "gelu",
    "SiLU", "silu", "Sigmoid", "sigmoid", "Hardswish", "hardswish", "LeakyReLU", "leaky_relu",
    "Tanh", "tanh",
}  # fmt: skip
# ops ORT runs on uint8 tensors in a QDQ model (QLinearAdd, uint8 MaxPool, ...)
_INT8_OK = {"add", "iadd", "ReLU", "relu", "ReLU6", "relu6", "MaxPool2d", "AvgPool2d",
            "AdaptiveAvgPool2d", "max_pool2d", "avg_pool2d", "adaptive_avg_pool2d", "cat", "mul",
            "Hardtanh", "hardtanh"}  # fmt: skip

_DW_KERNELS = {3, 5, 7, 9, 25, 49}

ScopeLike = Scope | str | Sequence[str] | None


@dataclass(frozen=True)
class LayerCost:
    """The work of one op as the runtime sees it; ``kernels`` is 0 for an op fused into another."""

    name: str
    op: str
    target: str
    scope: str
    macs: float
    flops: float
    weight_bytes: float
    input_bytes: float
    output_bytes: float
    output_shape: tuple[int, ...]
    dtype: str = "fp32"
    kernels: float = 1.0
    fused_into: str | None = None

    @property
    def bytes(self) -> float:
        return self.weight_bytes + self.input_bytes + self.output_bytes


def layer_costs(
    profile: ModelProfile, dtype: Dtype = "fp32", *, fuse: bool = True
) -> list[LayerCost]:
    """The profile's rows at ``dtype`` (bytes rescaled), with runtime fusions applied."""
    scale = DTYPE_BYTES[dtype] / profile.dtype_bytes
    out: list[LayerCost] = []
    anchor: LayerCost | None = None  # the last op that kept its own kernel
    for r in profile.rows:
        c = LayerCost(
            r.name, r.op, r.target, r.scope, r.macs, r.flops, r.weight_bytes * scale,
            r.input_bytes * scale, r.output_bytes * scale, r.output_shape, dtype,
        )  # fmt: skip
        host = anchor.name if anchor is not None else None
        fusable = anchor is not None and (
            (r.target in _BN and anchor.op in ("conv", "linear"))
            or (r.target in _ACTS and anchor.op in ("conv", "linear", "matmul"))
            or (r.target in ("add", "iadd") and anchor.op == "conv")
        )
        if fuse and fusable:
            c = replace(c, kernels=0.0, fused_into=host)
        else:
            anchor = c
        out.append(c)
    return out


def _in_scope(scope: ScopeLike, c: LayerCost) -> bool:
    if scope is None:
        return True
    if isinstance(scope, Scope):
        if scope.types and c.target not in {t.__name__ for t in scope.types}:
            return False
        if scope.include and not any(re.fullmatch(p, c.name) for p in scope.include):
            return False
        return not any(re.fullmatch(p, c.name) for p in scope.exclude)
    patterns = [scope] if isinstance(scope, str) else list(scope)
    return any(re.fullmatch(p, c.name) or re.fullmatch(p, c.scope) for p in patterns)


# --- candidate changes -------------------------------------------------------------------------


@dataclass(frozen=True)
class Int8:
    """Weights and activations in int8 (QDQ): bytes / 4 and the int8 peak for MAC ops; ops the
    runtime cannot run in int8 (norms, softmax, GELU) stay fp32 behind a quantize / dequantize,
    and the model's input and output are converted (ORT on x86: plus NHWC transposes)."""

    scope: ScopeLike = None

    def describe(self) -> str:
        return "int8"

    def apply(self, costs: list[LayerCost]) -> list[LayerCost]:
        """The layer costs after the change (every change has ``describe`` and ``apply``)."""
        out, first = [], True
        for c in costs:
            if not _in_scope(self.scope, c) or c.dtype == "int8":
                out.append(c)
                continue
            shrink = DTYPE_BYTES["int8"] / DTYPE_BYTES.get(c.dtype, 4)
            smaller = {
                k: getattr(c, k) * shrink for k in ("weight_bytes", "input_bytes", "output_bytes")
            }
            if c.op in MAC_OPS or c.target in _INT8_OK or c.kernels == 0:
                c = replace(c, dtype="int8", **smaller)
            elif c.kernels > 0:  # dequantize before, quantize after
                c = replace(
                    c, kernels=c.kernels + 1, input_bytes=c.input_bytes + smaller["input_bytes"]
                )
            if first and c.kernels > 0:
                # quantize the model input, dequantize its output; int8 convs run in NHWC on
                # x86, so two layout transposes more
                extra = 4 if any(x.op == "conv" for x in costs) else 2
                c, first = replace(c, kernels=c.kernels + extra), False
            out.append(c)
        return out


@dataclass(frozen=True)
class PruneChannels:
    """Remove ``ratio`` of the channels of every conv / linear in scope, uniformly.

    Inner layers lose input and output channels, so MACs and weights scale by ``(1-r)^2``; the
    first layer (its input is the data) and the last (its output is the prediction) by ``(1-r)``;
    a depthwise conv by ``(1-r)``; activations and the ops between layers by ``(1-r)``.
    """

    ratio: float
    scope: ScopeLike = None

    def __post_init__(self) -> None:
        if not 0.0 <= self.ratio < 1.0:
            raise ConfigError(f"pruning ratio {self.ratio} is outside [0, 1)", fix="use e.g. 0.5")

    def describe(self) -> str:
        return f"prune {self.ratio:.0%} channels"

    def apply(self, costs: list[LayerCost]) -> list[LayerCost]:
        keep = 1.0 - self.ratio
        weighted = [i for i, c in enumerate(costs) if c.weight_bytes > 0]
        macs = [i for i in weighted if costs[i].op in ("conv", "linear")]
        if not weighted or not macs:
            return list(costs)
        first, last = weighted[0], macs[-1]
        out = []
        for i, c in enumerate(costs):
            if not _in_scope(self.scope, c) or i < first or i > last:
                out.append(c)
                continue
            f_in = 1.0 if i == first else keep
            f_out = 1.0 if i == last else keep
            if c.op in ("conv", "linear") and c.weight_bytes > 0:
                f_work = f_out * (1.0 if _depthwise(c) else f_in)
            else:  # activations, norms, pools, attention matmuls: one side shrinks
                f_work = keep
            c = _scaled(c, f_work, f_in, f_out)
            out.append(c)
        return out


def _scaled(c: LayerCost, work: float, f_in: float = 1.0, f_out: float = 1.0) -> LayerCost:
    """``c`` with MACs, FLOPs and weights times ``work``, input and output bytes times their
    factors."""
    return replace(
        c, macs=c.macs * work, flops=c.flops * work, weight_bytes=c.weight_bytes * work,
        input_bytes=c.input_bytes * f_in, output_bytes=c.output_bytes * f_out,
    )  # fmt: skip


def _depthwise(c: LayerCost) -> bool:
    """A conv whose MACs per output element are one odd kernel's size (3, 5, 7, 3x3, 5x5, 7x7):
    in/groups == 1. A heuristic: the profile does not record groups."""
    out_elems = c.output_bytes / max(DTYPE_BYTES.get(c.dtype, 4), 1)
    return c.op == "conv" and out_elems > 0 and round(c.macs / out_elems) in _DW_KERNELS


@dataclass(frozen=True)
class LowRank:
    """Factorise each conv / linear in scope into two of rank ``rank`` (an int, or a fraction of
    each layer's full rank): MACs per output position become ``r * (in + out)`` instead of
    ``in * out``; one more kernel and the rank-r intermediate activation per layer."""

    rank: int | float
    scope: ScopeLike = None

    def __post_init__(self) -> None:
        if self.rank <= 0 or (isinstance(self.rank, float) and self.rank >= 1.0):
            raise ConfigError(
                f"rank {self.rank} is invalid",
                fix="use a positive int, or a fraction of the full rank in (0, 1)",
            )

    def describe(self) -> str:
        r = self.rank
        return f"low rank {r:.0%}" if isinstance(r, float) else f"low rank r={r}"

    def apply(self, costs: list[LayerCost]) -> list[LayerCost]:
        out = []
        for c in costs:
            layer = c.op in ("conv", "linear") and c.weight_bytes > 0
            if not layer or not _in_scope(self.scope, c):
                out.append(c)
                continue
            n_out = c.output_shape[1] if c.op == "conv" else c.output_shape[-1]
            out_elems = c.output_bytes / DTYPE_BYTES.get(c.dtype, 4)
            positions = out_elems / max(n_out, 1)
            n_in = c.macs / max(out_elems, 1)  # in/groups * kernel for a conv
            full = min(n_in, n_out)
            r = self.rank * full if isinstance(self.rank, float) else float(self.rank)
            r = max(1.0, round(r))
            if r >= full or _depthwise(c):
                out.append(c)
                continue
            new_macs = positions * r * (n_in + n_out)
            bpe = DTYPE_BYTES.get(c.dtype, 4)
            mid = positions * r * bpe  # written by the first factor, read by the second
            out.append(
                replace(_scaled(c, new_macs / c.macs), input_bytes=c.input_bytes + mid,
                        output_bytes=c.output_bytes + mid, kernels=c.kernels + 1)
            )  # fmt: skip
        return out


Change = Int8 | PruneChannels | LowRank


# --- bounds ------------------------------------------------------------------------------------


def overhead_seconds(hw: HardwareProfile, overhead_us: float | None = None) -> float:
    """Per-kernel launch overhead: given, from the profile's ``details['op_overhead_us']``, or a
    default for the device kind."""
    if overhead_us is None:
        overhead_us = hw.details.get("op_overhead_us") or DEFAULT_OVERHEAD_US[hw.device]
    return float(overhead_us) * 1e-6


def _peak(hw: HardwareProfile, dtype: str) -> float:
    p = hw.peak(dtype) if dtype in DTYPE_BYTES else None  # type: ignore[arg-type]
    return (p or hw.peak_fp32_gflops) * 1e9


def _times(c: LayerCost, hw: HardwareProfile, overhead: float) -> tuple[float, float, float]:
    """(compute s, memory s, lower-bound s including launch overhead)."""
    if c.kernels == 0:
        return 0.0, 0.0, 0.0
    compute = c.flops / _peak(hw, c.dtype)
    memory = c.bytes / (hw.mem_bandwidth_gbs * 1e9)
    return compute, memory, max(compute, memory) + c.kernels * overhead


def predicted_seconds(costs: Iterable[LayerCost], hw: HardwareProfile, overhead: float) -> float:
    """Sum of the layers' lower bounds, each with ``overhead`` seconds per kernel."""
    return sum(_times(c, hw, overhead)[2] for c in costs)


@dataclass
class LayerBound:
    """One layer on the roofline: intensity (FLOP per byte), bound and the plain-words verdict."""

    name: str
    op: str
    target: str
    scope: str
    macs: int
    flops: int
    bytes: int
    intensity: float
    compute_s: float
    memory_s: float
    time_s: float
    bound: str  # compute | memory | overhead | fused
    int8_speedup: float
    verdict: str

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class Roofline:
    """Every layer's bound on one hardware profile and dtype, and the whole model's."""

    hardware: str
    dtype: str
    ridge_point: float
    overhead_s: float
    layers: list[LayerBound]
    summary: str = ""

    @property
    def total_s(self) -> float:
        """Predicted time of the whole model: the sum of the layers' bounds and overheads."""
        return sum(r.time_s for r in self.layers)

    @property
    def intensity(self) -> float:
        """The whole model's FLOPs per byte moved (fused ops excluded)."""
        kept = [r for r in self.layers if r.bound != "fused"]
        return sum(r.flops for r in kept) / max(sum(r.bytes for r in kept), 1)

    @property
    def bound(self) -> str:
        """``compute`` when the model's intensity is above the ridge point, else ``memory``."""
        return "compute" if self.intensity >= self.ridge_point else "memory"

    def share(self, bound: str) -> float:
        """Fraction of the predicted time spent in layers with this bound."""
        return sum(r.time_s for r in self.layers if r.bound == bound) / max(self.total_s, 1e-12)

    def top(self, k: int = 10) -> list[LayerBound]:
        """The ``k`` layers with the largest predicted time."""
        return sorted(self.layers, key=lambda r: r.time_s, reverse=True)[:k]

    def to_dict(self) -> dict[str, Any]:
        return {
            "hardware": self.hardware,
            "dtype": self.dtype,
            "ridge_point": self.ridge_point,
            "overhead_s": self.overhead_s,
            "total_s": self.total_s,
            "intensity": self.intensity,
            "bound": self.bound,
            "share": {b: self.share(b) for b in ("compute", "memory", "overhead")},
            "summary": self.summary,
            "layers": [r.to_dict() for r in self.layers],
        }


def _verdict(
    c: LayerCost, bound: str, intensity: float, ridge: float, work: float, overhead: float,
    int8_x: float, int8_ratio: float | None,
) -> str:  # fmt: skip
    if bound == "fused":
        return f"fused into {c.fused_into} by the runtime: costs nothing"
    if bound == "overhead":
        return (
            f"tiny ({work * 1e6:.2g} us of work vs ~{overhead * 1e6:.2g} us per kernel): "
            "overhead-dominated, leave it"
        )
    if bound == "memory":
        head = f"memory-bound ({intensity:.2g} FLOP/B, ridge {ridge:.2g}): "
        if c.dtype == "int8":
            return head + "already int8; pruning channels cuts bytes linearly"
        return head + (
            f"int8 weights cut bytes {DTYPE_BYTES.get(c.dtype, 4)}x, expect ~{int8_x:.1f}x; "
            "pruning channels cuts bytes linearly"
        )
    head = f"compute-bound at {c.flops / 1e9:.2g} GFLOP: "
    if c.dtype == "int8":
        return head + "already int8; pruning channels or low rank help linearly"
    if int8_ratio is None:
        return head + "no int8 path on this hardware; pruning channels helps linearly"
    if int8_ratio >= 2.5:
        return head + (
            f"int8 runs {int8_ratio:.1f}x fp32 here (a fast int8 path), expect "
            f"~{int8_x:.1f}x; pruning channels helps linearly"
        )
    return head + (
        f"int8 helps only where the CPU has VNNI / a fast int8 path (here "
        f"{int8_ratio:.1f}x fp32, expect ~{int8_x:.1f}x); pruning channels helps "
        "linearly"
    )


def _summary(rf: Roofline, hw: HardwareProfile) -> str:
    comp, mem, ovh = (rf.share(b) for b in ("compute", "memory", "overhead"))
    ratio = (hw.peak("int8") or 0) / hw.peak_fp32_gflops
    if ovh > 0.5:
        what = (
            f"tiny: the runtime's per-kernel overhead ({rf.overhead_s * 1e6:.2g} us) dominates, "
            "so pruning or int8 will barely make it faster; fewer, fused ops or a larger batch will"
        )
    elif rf.bound == "compute":
        what = (
            f"compute-bound overall ({rf.intensity:.3g} FLOP/B above the ridge at "
            f"{rf.ridge_point:.3g}): only fewer operations (pruning, low rank) or cheaper ones "
            f"(int8: {ratio:.1f}x the fp32 peak here) make it faster"
        )
    else:
        what = (
            f"memory-bound overall ({rf.intensity:.3g} FLOP/B below the ridge at "
            f"{rf.ridge_point:.3g}): fewer bytes (int8 weights and activations, pruning) make "
            "it faster"
        )
    return (
        f"{what}. Predicted time {rf.total_s * 1e3:.3g} ms: {comp:.0%} in compute-bound "
        f"layers, {mem:.0%} memory-bound, {ovh:.0%} overhead-dominated."
    )


def roofline(
    profile: ModelProfile,
    hw: HardwareProfile,
    dtype: Dtype = "fp32",
    *,
    overhead_us: float | None = None,
    fuse: bool = True,
) -> Roofline:
    """Per-layer intensity, bound, lower-bound time and verdict of ``profile`` on ``hw``."""
    overhead = overhead_seconds(hw, overhead_us)
    costs = layer_costs(profile, dtype, fuse=fuse)
    int8_costs = Int8().apply(costs)
    ridge = hw.ridge_point(dtype) or hw.ridge_point("fp32") or 0.0
    p8 = hw.peak("int8")
    int8_ratio = None if p8 is None else p8 / (hw.peak(dtype) or hw.peak_fp32_gflops)
    rows = []
    for c, q in zip(costs, int8_costs, strict=True):
        compute, memory, t = _times(c, hw, overhead)
        t8 = _times(q, hw, overhead)[2]
        intensity = c.flops / c.bytes if c.bytes else 0.0
        if c.kernels == 0:
            bound = "fused"
        elif max(compute, memory) < overhead * c.kernels:
            bound = "overhead"
        else:
            bound = "compute" if compute >= memory else "memory"
        x8 = t / t8 if t8 > 0 else 1.0
        verdict = _verdict(
            c, bound, intensity, ridge, max(compute, memory), overhead, x8, int8_ratio
        )
        rows.append(
            LayerBound(
                c.name,
                c.op,
                c.target,
                c.scope,
                int(c.macs),
                int(c.flops),
                int(c.bytes),
                intensity,
                compute,
                memory,
                t,
                bound,
                x8,
                verdict,
            )
        )
    rf = Roofline(hw.name, dtype, ridge, overhead, rows)
    rf.summary = _summary(rf, hw)
    return rf


# --- predictions -------------------------------------------------------------------------------


@dataclass
class Prediction:
    """Predicted time before and after a change, from the roofline alone (nothing is run)."""

    change: str
    base_s: float
    new_s: float
    macs_before: int
    macs_after: int
    layers: list[dict[str, Any]] = field(default_factory=list)

    @property
    def speedup(self) -> float:
        return self.base_s / self.new_s if self.new_s > 0 else float("inf")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["speedup"] = self.speedup
        return d


def predict(
    profile: ModelProfile,
    hw: HardwareProfile,
    change: Change | Sequence[Change],
    *,
    dtype: Dtype = "fp32",
    overhead_us: float | None = None,
) -> Prediction:
    """Predicted speed-up of ``change`` (or several, applied in order) on ``hw``."""
    changes = [change] if isinstance(change, (Int8, PruneChannels, LowRank)) else list(change)
    for ch in changes:
        if not isinstance(ch, (Int8, PruneChannels, LowRank)):
            raise ConfigError(
                f"{ch!r} is not a change slimkit can predict",
                fix="use Int8(), PruneChannels(ratio) or LowRank(rank)",
            )
    overhead = overhead_seconds(hw, overhead_us)
    before = layer_costs(profile, dtype)
    after = before
    for ch in changes:
        after = ch.apply(after)
    layers = []
    for b, a in zip(before, after, strict=True):
        tb, ta = _times(b, hw, overhead)[2], _times(a, hw, overhead)[2]
        if tb != ta:
            layers.append({"name": b.name, "before_s": tb, "after_s": ta})
    return Prediction(
        change=" + ".join(ch.describe() for ch in changes),
        base_s=predicted_seconds(before, hw, overhead),
        new_s=predicted_seconds(after, hw, overhead),
        macs_before=int(sum(c.macs for c in before)),
        macs_after=int(sum(c.macs for c in after)),
        layers=layers,
    )
