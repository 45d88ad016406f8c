"""Post-training static int8 quantization that ONNX Runtime runs as integer kernels.

    q = sk.quantize(model, "int8", data=calib)                         # defaults
    q = sk.quantize(model, PTQ(calibration="entropy"), data=calib, scope=sk.Scope(exclude=["fc"]))

YAML step: ``- quant.ptq: {calibration: percentile, percentile: 99.99}``.
Supports Conv1d/2d/3d and Linear (weights, per output channel, symmetric int8), and quantizes the
activations around them, matmuls, adds, concatenations and average pooling (uint8, per tensor).
Embedding tables of 1 MB and more are stored as int8 rows with a scale each (``embeddings=True``;
ORT gathers the int8 rows: BERT-mini's file 34.8 -> 11.5 MB, output 32.2 -> 32.0 dB, same speed).
The result is an ``fx.GraphModule`` that simulates the integer model exactly; export it with
``sk.export_onnx`` (QDQ ONNX) or ``slimkit.export.qdq.export_quantized`` (also counts the integer
kernels ORT runs). BatchNorm is folded first (exactly; see graph_opt.bn_fold).

Float prefix (``float_prefix=True``, quant.prefix): ORT's int8 kernels are not faster everywhere: a
3-channel stem conv ran 2x slower as QLinearConv than as float Conv, a depthwise conv at 112x112
1.4x slower. The leading layers of the network are timed in ORT both ways when quantizing (0.15-0.9
s) and kept float where that is faster, which also removes the quantization noise that every later
layer amplifies (MobileNetV2: 2-5 % faster, 25.2 -> 26.0 dB; ResNet-18's 7x7 stem stays int8). The
timing runs at batch 1, 2 threads, on this CPU (the deployment this toolkit measures). The choice
is recorded in ``meta["float_prefix_layers"]``; pass that list back as ``float_prefix`` to repeat
it exactly, or ``False`` for all-int8.

Never slower than the source (``speed_check=True``, quant.speed): the int8 model is timed against
the float model in ORT on this machine; layers whose integer kernels are slower stay float, and a
model that is still slower comes back as a copy of the source, with the times in
``meta["speed"]``.
Models torch.fx cannot trace (Hugging Face models, flags in ``forward``) are captured through
``torch.export`` (``core.graph.capture_model``; ``meta["capture"]``), and take keyword inputs.

Weight bits: on CPUs without VNNI, ORT's uint8 x int8 kernels add pairs of products in 16 bits and
saturate with full 8-bit weights (measured here, AVX2: 27 output steps of error on a 3x3 conv fed
codes over 0..255; ResNet-18/32 as run 23.2 dB against 32.6 dB simulated). 7-bit weights keep
every pair sum in range, so ``weight_bits="auto"`` picks 7 there and 8 where VNNI exists.
Keeping 8 bits after ReLU-like inputs was tried and still saturated (23.8 dB as run), so the choice
is per CPU, not per layer, until a per-layer check against ORT exists. ``export_quantized``
measures ORT against the simulation, so saturation shows up as a failed check, never silently.
"""

from __future__ import annotations

import contextlib
import copy
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import torch
from pydantic import Field
from torch import fx, nn

from slimkit.core.config import Config
from slimkit.core.data import Batch, collect_batches, merge_batches
from slimkit.core.graph import capture_model
from slimkit.core.machine import cpu_info
from slimkit.core.registry import METHODS
from slimkit.core.scope import Scope
from slimkit.errors import DataError
from slimkit.quant import bias_correction, sim
from slimkit.quant.primitives import is_depthwise

_T = TypeVar("_T")


class PTQ(Config):
    """Static post-training quantization: int8 weights, uint8 activations, calibrated ranges."""

    calibration: Literal["minmax", "percentile", "entropy", "mse"] = "mse"
    percentile: float = Field(99.999, gt=90.0, le=100.0)  # for calibration="percentile"
    # auto: 8 with VNNI, else 7 (exact on ORT); 2-6: low-bit codes on the same int8 kernels
    # (W4A8: per-channel clipping chosen by squared error; pair with adaround for accuracy)
    weight_bits: Literal["auto"] | Annotated[int, Field(ge=2, le=8)] = "auto"
    # per-layer weight bits by layer name, over weight_bits and the depthwise rule (quant.mixed)
    layer_weight_bits: dict[str, Annotated[int, Field(ge=2, le=8)]] = Field(default_factory=dict)
    num_batches: int = Field(32, ge=1)  # calibration batches read from `data`
    fold_bn: bool = True
    bias_correction: bool = True  # remove the mean output shift of each layer (one extra pass)
    # exact float rewrites before calibration (quant.cle): centre the channels of linear streams
    # into the next layers' biases, and Nagel's cross-layer scaling (costs ResNet-18 0.3 dB)
    bias_absorption: bool = True
    cle: bool = False
    # AdaRound iterations per layer (quant.adaround); 0 rounds to nearest. 200 on trained models
    # (50 on random weights): off by default for its 3-5x tool time (see quant.adaround)
    adaround: int = Field(0, ge=0, le=100_000)
    # block reconstruction iterations per block (quant.brecq, experimental): the rounding and
    # biases of a block's layers learned together against the float block output, after
    # AdaRound when both are set; kept only where the model's output error drops. 0: off
    brecq: int = Field(0, ge=0, le=100_000)
    # embedding tables as int8 rows with a scale each (weight-only; BERT's file 34.8 -> ~12 MB)
    embeddings: bool = True
    # keep the model's first layers float where ORT runs them faster than int8, timed here
    # (quant.prefix; MobileNetV2: stem block float, 2-5 % faster and 25.2 -> 26.0 dB); False:
    # none; a list of layer names: exactly those (to repeat: meta["float_prefix_layers"])
    float_prefix: bool | list[str] = True
    rotate_boundary: bool = True  # where the float prefix ends (quant.prefix.rotate_boundary)
    # never slower than the source (quant.speed): time int8 against float in ORT, keep float the
    # layers whose integer kernels are slower, and the whole model if it still is slower
    speed_check: bool = True


def resolve_weight_bits(value: str | int) -> int:
    """``"auto"`` -> 8 on CPUs with VNNI (AVX512-VNNI / AVX-VNNI), 7 elsewhere (worst case)."""
    if value == "auto":
        return 8 if cpu_info()["vnni"] else 7
    return int(value)


def layer_bits(
    bits: int, per_layer: dict[nn.Module, int] | None = None
) -> Callable[[nn.Module, Any], int]:
    """Per-layer weight bits: a layer in ``per_layer`` gets its own (``PTQ.layer_weight_bits``,
    see :func:`named_bits`), depthwise convs 8 (ORT's depthwise kernel accumulates in 32 bits,
    measured exact with 8-bit weights on AVX2), every other layer ``bits``."""

    def choose(layer: nn.Module, _in_quant: Any) -> int:
        if per_layer and layer in per_layer:
            return per_layer[layer]
        return 8 if is_depthwise(layer) else bits

    return choose


def named_bits(gm: nn.Module, names: dict[str, int]) -> dict[nn.Module, int]:
    """``PTQ.layer_weight_bits`` (layer name -> bits) as layer module -> bits for ``layer_bits``;
    a name that is not a Conv/Linear of ``gm`` is a ``ConfigError``."""
    from slimkit.core.registry import did_you_mean
    from slimkit.errors import ConfigError

    modules = {n: m.layer if isinstance(m, sim.LeafInput) else m for n, m in gm.named_modules()}
    layers = [n for n, m in modules.items() if isinstance(m, sim.WEIGHTED)]
    for n in names:
        if n not in layers:
            hint = did_you_mean(n, layers)
            raise ConfigError(f"layer_weight_bits names {n!r}, not a Conv/Linear of the model",
                              fix=f"{hint + ' ' if hint else ''}use names like "
                              f"{', '.join(layers[:3])} (model.named_modules())")  # fmt: skip
    return {modules[n]: b for n, b in names.items()}


def quantize_embeddings(
    gm: fx.GraphModule, scope: Scope | None = None, min_bytes: int = 1 << 20
) -> list[str]:
    """Swap the ``nn.Embedding`` modules of ``gm`` (in ``scope``) for int8-row tables; returns
    their names. Tables under ``min_bytes`` (position and segment tables: their bytes do not
    matter, their noise does), tables whose weight the graph also reads directly (tied to an
    output layer as a tensor), and tables with ``max_norm`` stay float."""
    from slimkit.quant.modules import QuantEmbedding

    cands = [(n, m) for n, m in gm.named_modules() if isinstance(m, nn.Embedding)
             and (scope is None or scope.matches(n, m))]  # fmt: skip
    read = {str(n.target) for n in gm.graph.nodes if n.op == "get_attr"}
    called = {str(n.target) for n in gm.graph.nodes if n.op == "call_module"}
    done = []
    for name, emb in cands:
        small = emb.weight.numel() * emb.weight.element_size() < min_bytes
        if small or name not in called or f"{name}.weight" in read or emb.max_norm is not None:
            continue
        sim.set_submodule(gm, name, QuantEmbedding(emb))
        done.append(name)
    return done


def _layer_names(gm: fx.GraphModule, names: list[str]) -> list[str]:
    from slimkit.errors import ConfigError

    modules = dict(gm.named_modules())
    for n in names:
        if not isinstance(modules.get(n), sim.WEIGHTED):
            from slimkit.core.registry import did_you_mean

            layers = [k for k, m in modules.items() if isinstance(m, sim.WEIGHTED)]
            hint = did_you_mean(n, layers)
            raise ConfigError(
                f"float_prefix names {n!r}, which is not a Conv/Linear layer of the model",
                fix=f"{hint + ' ' if hint else ''}use names like {', '.join(layers[:3])} (from "
                "model.named_modules() or a previous result's meta['float_prefix_layers'])",
            )
    return names


@contextlib.contextmanager
def channels_last(module: nn.Module, batches: list[Batch]) -> Iterator[list[Batch]]:
    """Image batches and ``module``'s 4-D weights in channels-last layout for the duration (the
    statistics passes: MobileNetV2 in PyTorch runs 1.7x faster, ResNet-18 1.2x); others as is."""
    if not all(t.dim() == 4 for b in batches for t in b.inputs):
        yield batches
        return
    cl = torch.channels_last
    module.to(memory_format=cl)  # type: ignore[call-overload]
    try:
        yield [Batch(b.index, tuple(t.contiguous(memory_format=cl) for t in b.args),
                     {k: t.contiguous(memory_format=cl) for k, t in b.kwargs.items()}, b.target)
               for b in batches]  # fmt: skip
    finally:
        module.to(memory_format=torch.contiguous_format)  # type: ignore[call-overload]


@METHODS.register("quant.ptq", config=PTQ, summary="static int8 PTQ, ORT integer kernels")
def quantize_ptq(
    model: nn.Module,
    config: PTQ | None = None,
    *,
    data: Any,
    example_inputs: tuple[torch.Tensor, ...] | None = None,
    example_kwargs: dict[str, Any] | None = None,
    scope: Scope | None = None,
    progress: bool = False,
) -> nn.Module:
    """Quantize ``model`` (not modified, nor its mode) with ``config``; ``data`` is the
    calibration data (batches of tensors, tuples, or dicts of keyword inputs such as
    ``input_ids`` / ``attention_mask``). ``example_inputs`` / ``example_kwargs`` default to the
    first batch. Models torch.fx cannot trace are captured through torch.export
    (``meta["capture"]`` says which path was taken and what was left whole)."""
    cfg = config or PTQ()
    t0 = time.perf_counter()
    batches = collect_batches(data, what="calibration data", limit=cfg.num_batches)
    if example_inputs is None and example_kwargs is None:
        args, kwargs = batches[0].args, dict(batches[0].kwargs)
    else:
        args, kwargs = tuple(example_inputs or ()), dict(example_kwargs or {})
    src = copy.deepcopy(model).eval()
    if cfg.fold_bn:
        from slimkit.graph_opt.bn_fold import fold_bn

        gm = fold_bn(src, example_inputs=args, example_kwargs=kwargs, inplace=True)
    else:
        gm = capture_model(src, args, kwargs)
    notes: dict[str, str] = {}
    merged = merge_batches(batches)  # the statistics passes run 2-3x faster on batches of 16

    def passes(module: nn.Module, fn: Callable[[list[Batch]], _T]) -> _T:
        if len(merged) == len(batches):
            return fn(batches)
        try:
            with channels_last(module, merged) as fast:
                return fn(fast)
        except (RuntimeError, DataError):  # a batch-size-bound model, or a message to locate
            return fn(batches)

    if cfg.cle or cfg.bias_absorption:
        from slimkit.quant.cle import equalize

        gm, eq = passes(gm, lambda bs: equalize(gm, scale=cfg.cle, absorb=cfg.bias_absorption,
                                                data=bs, inplace=True))  # fmt: skip
        notes["equalisation"] = eq.summary()
    floated: list[str] = []
    if isinstance(cfg.float_prefix, list):
        floated = _layer_names(gm, cfg.float_prefix)
    elif cfg.float_prefix:
        from slimkit.quant import prefix

        choice = prefix.choose(gm, sim.place(gm, scope).weighted, () if kwargs else args)
        floated = choice.layers
        notes["float_prefix"] = choice.summary()
    weighted_all = [n for n, m in gm.named_modules() if isinstance(m, sim.WEIGHTED)]
    if weighted_all and set(weighted_all) <= set(floated):  # every layer float: the model itself
        same = copy.deepcopy(model).eval()
        same.meta = {"slimkit": _meta(cfg, gm, 0, 0, weighted_all, floated, {}, notes, t0)}  # type: ignore[assignment]
        return same
    source = copy.deepcopy(model).eval() if cfg.speed_check else None  # what int8 must beat
    plan = sim.place(gm, scope, keep_float=floated)
    if floated and cfg.rotate_boundary:
        from slimkit.quant.prefix import rotate_boundary

        notes["rotated"] = ", ".join(rotate_boundary(gm, floated)) or "none"
    quants = sim.insert_quantizers(gm, plan)
    # submodules kept whole because nothing could capture them: their layers, one by one
    leaves = sim.wrap_leaves(gm, gm.meta.get("capture", {}).get("leaves", {}), scope, floated)
    quants.update({w.act.name: w.act for w in leaves.values()})
    needs_hist = cfg.calibration != "minmax"
    stats = passes(gm, lambda bs: sim.observe(gm, quants, bs, histogram=needs_hist))
    const = sim.constants(stats)
    inputs = {n.name for n in gm.graph.nodes if n.op == "placeholder"}
    for name in const:
        if name in inputs:
            raise DataError(
                f"calibration data: model input {name!r} is the same value ({const[name]:g}) "
                "in every sample",
                fix="calibrate with real, varied samples (not zeros or a single repeated input)",
            )
    bits = resolve_weight_bits(cfg.weight_bits)
    choose = layer_bits(bits, named_bits(gm, cfg.layer_weight_bits))
    out = sim.convert(gm, plan, quants, stats, method=cfg.calibration,
                      percentile=cfg.percentile, weight_bits=choose)  # fmt: skip
    leaf_layers = dict(zip(leaves, sim.convert_leaves(leaves, choose), strict=True))
    if leaf_layers:
        notes["leaf_layers"] = ", ".join(leaf_layers)  # quantized inside submodules kept whole
    if cfg.adaround:  # learns the rounding, then corrects the biases on the learned weights
        from slimkit.quant.adaround import adaround

        ada = adaround(out, batches, iterations=cfg.adaround, correct_mean=cfg.bias_correction)
        notes["adaround"] = ada.summary()
    elif cfg.bias_correction:
        layers = {t: out.get_submodule(t) for t in plan.weighted.values()}
        layers.update(leaf_layers)
        passes(out, lambda bs: bias_correction.correct(out, layers, bs))  # type: ignore[arg-type]
    if cfg.brecq:  # then block by block: rounding and biases learned against the float block
        from slimkit.quant.brecq import reconstruct

        start = "codes" if cfg.adaround else "float"
        rec = reconstruct(out, batches, iterations=cfg.brecq, start=start)
        notes["brecq"] = rec.summary()
    if cfg.embeddings:
        notes["int8_embeddings"] = ", ".join(quantize_embeddings(out, scope)) or "none"
    out.eval()
    quantized = [*dict.fromkeys(plan.weighted.values()), *leaf_layers]  # a layer called twice: once
    out.meta["slimkit"] = _meta(cfg, gm, bits, len(quants), plan.skipped, floated, const, notes,
                                t0, quantized=len(quantized))  # fmt: skip
    if cfg.brecq:  # per block: errors at the start, kept, and with the float layers
        out.meta["slimkit"]["brecq_blocks"] = [b.to_dict() for b in rec.blocks]
    if source is None or not quantized:
        return out
    return _never_slower(model, cfg, out, source, quantized, floated,
                         data=batches, args=args, kwargs=kwargs, scope=scope)  # fmt: skip


def _meta(cfg: PTQ, gm: fx.GraphModule, bits: int, n_quants: int, float_layers: list[str],
          floated: list[str], const: dict[str, float], notes: dict[str, str], t0: float,
          quantized: int = 0) -> dict[str, Any]:  # fmt: skip
    return {
        "method": "quant.ptq",
        "config": cfg.to_dict(),
        "weight_bits": bits,  # depthwise convs: 8
        "activation_quantizers": n_quants,
        "quantized_layers": quantized,
        "float_layers": float_layers,  # out of scope, in the float prefix, or slower in int8
        "float_prefix_layers": floated,
        # one value on all calibration data (zero-initialised branches, dead channels):
        # quantized exactly, listed here
        "constant_activations": dict(const),
        "capture": gm.meta.get("capture", {}),
        **notes,
        "seconds": round(time.perf_counter() - t0, 3),
    }


def _never_slower(
    model: nn.Module, cfg: PTQ, out: fx.GraphModule, source: nn.Module,
    layers: list[str], floated: list[str], *, data: list[Batch], args: tuple[Any, ...],
    kwargs: dict[str, Any], scope: Scope | None,
) -> nn.Module:  # fmt: skip
    """``out``, or ``out`` with its slow layers float, or a copy of the source model: whichever is
    not slower than the source model (exported as is) on ORT (quant.speed)."""
    from slimkit.quant import speed

    t0 = time.perf_counter()
    try:
        with speed.workdir() as d:
            tmp = Path(d)
            result, inputs, paths = speed.check(source, out, args, kwargs, tmp)
            chosen: nn.Module = out
            if result.int8_ms > speed.TOLERANCE * result.fp32_ms:
                slow = speed.slow_layers(paths["fp32"], paths["int8"], inputs, layers)
                chosen = source
                result.decision = "float"
                if slow and len(slow) < len(layers):
                    again = cfg.replace(speed_check=False, float_prefix=sorted({*floated, *slow}))
                    retry = quantize_ptq(model, again, data=data, example_inputs=args,
                                         example_kwargs=kwargs, scope=scope)  # fmt: skip
                    fp, q = speed.retime(paths["fp32"], retry, args, kwargs, inputs, tmp)
                    result.slow_layers, result.retry_ms = slow, round(q, 4)
                    if q <= speed.TOLERANCE * fp:
                        chosen, result.decision = retry, "int8, slow layers float"
    except Exception as e:  # noqa: BLE001 - timing is a check: a failure keeps int8, said so
        first = str(e).strip().splitlines()[0][:160] if str(e).strip() else ""
        out.meta["slimkit"]["speed"] = {"decision": "int8", "not_timed": f"{type(e).__name__}: "
                                        f"{first}"}  # fmt: skip
        return out
    if chosen is source:  # an nn.Module of the user's class: the slimkit record goes on .meta
        layer_names = sorted({*layers, *floated})  # pinned, a rerun returns the model again
        # every layer is float now: those out of scope as well as those it had quantized
        all_float = sorted({*out.meta["slimkit"]["float_layers"], *layer_names})
        source.meta = {"slimkit": {  # type: ignore[assignment]
            **out.meta["slimkit"], "quantized_layers": 0, "activation_quantizers": 0,
            "float_layers": all_float, "float_prefix_layers": layer_names,
            "kept_float": "int8 ran slower than the float model on ONNX Runtime on this CPU",
        }}  # fmt: skip
    meta: dict[str, Any] = getattr(chosen, "meta")["slimkit"]  # noqa: B009 - set above
    meta["speed"] = {**result.to_dict(), "summary": result.summary(),
                     "seconds": round(time.perf_counter() - t0, 3)}  # fmt: skip
    meta["seconds"] = round(meta["seconds"] + meta["speed"]["seconds"], 3)
    return chosen
