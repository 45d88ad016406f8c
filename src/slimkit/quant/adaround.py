"""AdaRound: learn, layer by layer, whether each weight rounds up or down.

Rounding every weight to its nearest grid point does not minimise a layer's output error: the
errors of one output add up over its inputs, and rounding some weights the other way can cancel the
rest. AdaRound (Nagel et al., "Up or Down? Adaptive Rounding for Post-Training Quantization",
ICML 2020) relaxes the choice to ``floor(w / s) + h(v)`` with a rectified sigmoid ``h``, minimises
the layer's output error on calibration data plus a regulariser ``1 - |2h - 1|^beta`` whose
``beta`` anneals from 20 to 2, which drives every ``h`` to 0 or 1, then rounds ``h``.

Choices made here (measured on MobileNetV2 / ResNet-18 / BERT-mini with random weights, 7-bit
weights, 32 calibration images; see ``quant.ptq`` for the numbers as run in ONNX Runtime):

- The grid is the ``QuantLayer``'s own (per output channel, symmetric, narrow); the learned codes
  are written to its int8 ``w_q``, so export writes exactly those integers.
- A layer's input is the quantized model's (upstream layers already rounded, activations
  quantized) and its target the float model's output, so it also absorbs the error that reaches it
  (the paper's "asymmetric" reconstruction; ``inputs="float"`` feeds the float input through the
  layer's own quantizer instead: MobileNetV2 24.2 dB against 24.5 dB, ResNet-18 43.3 against 43.8).
  ``run_layer_by_layer`` runs both models side by side, node by node, over all batches.
- The error is quadratic in the weights, so the input's second moments stand in for the data
  (per group, ``K x K`` with ``K`` = inputs per output, 9 for a depthwise 3x3) when ``K <= 2 *
  batch``: an iteration costs one ``(out, K) x (K, K)`` product whatever the number of positions.
  Wider layers draw positions per iteration from a pool, as the paper does.
- The objective is the *centred* error: each output channel's mean error goes into its bias
  afterwards (``correct_mean``: bias correction on the learned codes and the quantized inputs), so
  the rounding is not spent on what the bias fixes.
- The regulariser is weighed per weight by its input's mean square (what one step of that weight
  costs alone), so that all weights binarise at the same pace: on a layer with correlated inputs,
  200 iterations then lower the error 2.0x where a uniform weight gains 1.0-1.3x.
- Every 4th calibration batch is held out: a layer keeps round-to-nearest unless the learned
  rounding is also better there (small layers otherwise fit their 32 samples: an MLP's held-out
  error doubled).
- At 6 bits and fewer (``search_scale``), each output channel's scale is first re-chosen by that
  channel's output error under nearest rounding (27 steps from 0.6x to 1.25x the weight-MSE
  clipping), since at 4 bits where to clip matters as much as which way to round (W4A8 MobileNetV2
  with random weights: 22.1 -> 22.7 dB, ``benchmarks/bench_ptq.py --w4a8``).
- Iterations: on trained models 200 do clearly better than 50 at 4 bits (W4A8 as run, logit SQNR:
  digits_cnn +1.9 dB, shapes_cnn +1.6 dB, a trained MobileNetV2 +0.5 dB); on the random-weight
  reference models 50 do as well (0.1-0.2 dB better). The time goes into elementwise passes over
  the weights and the two forward passes (``benchmarks/bench_ptq.py --w4a8``, README).

Python: ``quantize(model, PTQ(adaround=50), data=calib)``; YAML: ``- quant.ptq: {adaround: 50}``.
Supports Conv1d/Conv2d (any groups, stride, dilation, padding mode) and Linear; Conv3d and layers
called more than once keep round-to-nearest, and the report says so.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import fx, nn

from slimkit.core.data import Batch
from slimkit.core.graph import call_counts
from slimkit.errors import DataError
from slimkit.quant.modules import ActQuant, QuantLayer

ZETA, GAMMA = 1.1, -0.1  # the rectified sigmoid's stretch (paper, eq. 23)
WORK = 1 << 24  # most multiply-adds per gradient product for layers learned on sampled positions


@dataclass
class LayerResult:
    """One layer's output MSE (per output channel and position, on the held-out calibration
    batches when there are 4 or more) with round-to-nearest and with learned rounding;
    ``mse_inputs`` is the part that the error already in its input causes alone."""

    name: str
    mse_nearest: float
    mse_adaround: float
    mse_inputs: float
    flipped: float  # fraction of weights not rounded to nearest
    seconds: float


@dataclass
class AdaRoundReport:
    layers: list[LayerResult] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (layer, reason)
    seconds: float = 0.0

    def summary(self) -> str:
        gains = [r.mse_nearest / max(r.mse_adaround, 1e-30) for r in self.layers if r.flipped > 0]
        text = f"learned rounding in {len(gains)} of {len(self.layers) + len(self.skipped)} layers"
        if gains:
            geo = math.exp(sum(math.log(g) for g in gains) / len(gains))
            text += f" (their output MSE / {geo:.2f}, geometric mean)"
        return text + f", {self.seconds:.1f} s"

    def to_dict(self) -> dict[str, Any]:
        return {
            "layers": [vars(r) for r in self.layers],
            "skipped": [{"layer": n, "reason": r} for n, r in self.skipped],
            "seconds": round(self.seconds, 3),
        }


def patches(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The layer's input as the vectors its weights multiply: ``(groups, K, positions)``."""
    if isinstance(layer, nn.Linear):
        return x.reshape(-1, x.shape[-1]).t().unsqueeze(0)  # (1, in, N)
    assert isinstance(layer, (nn.Conv1d, nn.Conv2d))
    k, s, d = layer.kernel_size, layer.stride, layer.dilation
    if isinstance(layer, nn.Conv1d):
        x, k, s, d = x.unsqueeze(2), (1, *k), (1, *s), (1, *d)  # (B, C, 1, L)
    g = layer.groups
    if all(v == 1 for v in k) and not any(layer._reversed_padding_repeated_twice):
        cols = x[:, :, :: s[0], :: s[1]].flatten(2)  # a 1x1 conv reads single pixels
        b, c, n = cols.shape
        return cols.view(b, g, c // g, n).permute(1, 2, 0, 3).reshape(g, c // g, b * n)
    mode = "constant" if layer.padding_mode == "zeros" else layer.padding_mode
    x = F.pad(x, layer._reversed_padding_repeated_twice, mode=mode)
    cols = F.unfold(x, k, dilation=d, stride=s)  # (B, C*kh*kw, L), channel-major like the weight
    b, ck, n = cols.shape
    return cols.view(b, g, ck // g, n).permute(1, 2, 0, 3).reshape(g, ck // g, b * n)


def grouped(w: torch.Tensor, groups: int) -> torch.Tensor:
    """A Conv/Linear weight as ``(groups, out // groups, K)``."""
    return w.reshape(groups, w.shape[0] // groups, -1)


class Objective:
    """A layer's squared output error per position, summed over outputs, as a function of
    ``dw = w_q - w`` (grouped): ``E||dw x~ + w (x~ - x)||^2`` for quantized input ``x~``.

    ``add`` folds in batches of patches; ``finish`` turns them into second moments (``hessian``)
    or a pool of sampled positions; the input's own error ``w (x~ - x)`` stays as a constant and a
    cross term. ``centred`` leaves out each output's mean error (the bias takes it).
    """

    def __init__(self, w: torch.Tensor, use_hessian: bool) -> None:
        self.w = w  # (G, O, K)
        self.use_hessian = use_hessian
        g, _, k = w.shape
        self.hess = torch.zeros(g, k, k, dtype=torch.float64)  # sum x~ x~^T   (hessian only)
        self.cross = torch.zeros(g, k, k, dtype=torch.float64)  # sum D x~^T, D = x~ - x
        self.sum_x = torch.zeros(g, k, dtype=torch.float64)
        self.sum_d = torch.zeros(g, k, dtype=torch.float64)
        self.sum_noise = 0.0  # sum ||w D||^2
        self.count = 0
        self.cols: list[torch.Tensor] = []  # pooled x~ (G, K, p)      (pool only)
        self.errs: list[torch.Tensor] = []  # pooled w D (G, O, p)

    def add(self, xq: torch.Tensor, d: torch.Tensor, take: int, gen: torch.Generator) -> None:
        r = torch.bmm(self.w, d)  # (G, O, P)
        self.sum_noise += float(r.square().sum())
        self.sum_x += xq.sum(-1).double()
        self.sum_d += d.sum(-1).double()
        self.count += xq.shape[-1]
        if self.use_hessian:
            self.hess += torch.bmm(xq, xq.transpose(1, 2)).double()
            self.cross += torch.bmm(d, xq.transpose(1, 2)).double()
        else:
            idx = torch.randperm(xq.shape[-1], generator=gen)[:take]
            self.cols.append(xq[:, :, idx])
            self.errs.append(r[:, :, idx])

    def finish(self, centred: bool) -> None:
        n = max(self.count, 1)
        self.mean_x = (self.sum_x / n).float()  # (G, K)
        mean_d = self.sum_d / n
        self.mean_err = torch.einsum("gok,gk->go", self.w.double(), mean_d)  # E[w D]: (G, O)
        self.const = self.sum_noise / n
        if centred:
            self.const -= float(self.mean_err.pow(2).sum())
        if self.use_hessian:
            h, c = self.hess / n, self.cross / n
            if centred:
                h = h - self.mean_x.double().unsqueeze(2) * self.mean_x.double().unsqueeze(1)
                c = c - mean_d.unsqueeze(2) * self.mean_x.double().unsqueeze(1)
            self.h = h.float()  # (G, K, K)
            self.wc = torch.bmm(self.w.double(), c).float()  # w E[D x~^T]: (G, O, K)
        else:
            self.x = torch.cat(self.cols, -1)  # (G, K, P)
            self.r = torch.cat(self.errs, -1)  # (G, O, P)
            if centred:
                self.x = self.x - self.mean_x.unsqueeze(-1)
                self.r = self.r - self.mean_err.float().unsqueeze(-1)
        del self.hess, self.cross, self.cols, self.errs

    def curvature(self) -> torch.Tensor:
        """Each input's mean square, ``(G, 1, K)``: what one weight step costs on its own."""
        diag = self.h.diagonal(dim1=1, dim2=2) if self.use_hessian else self.x.pow(2).mean(-1)
        return diag.unsqueeze(1)

    def loss(self, dw: torch.Tensor) -> float:
        if self.use_hessian:
            val = (torch.bmm(dw, self.h) * dw).sum() + 2 * (dw * self.wc).sum()
            return float(val) + self.const
        return float((torch.bmm(dw, self.x) + self.r).pow(2).sum()) / self.x.shape[-1]

    def loss_per_output(self, dw: torch.Tensor, positions: int = 512) -> torch.Tensor:
        """Each output's error ``(G, O)`` for ``dw`` (the constant and cross terms left out where
        exact second moments are not kept: wide layers use ``positions`` pooled inputs)."""
        if self.use_hessian:
            return (torch.bmm(dw, self.h) * dw).sum(-1) + 2 * (dw * self.wc).sum(-1)
        x, r = self.x[:, :, :positions], self.r[:, :, :positions]
        return (torch.bmm(dw, x) + r).pow(2).mean(-1)

    def grad(self, dw: torch.Tensor, batch: int, gen: torch.Generator) -> torch.Tensor:
        if self.use_hessian:
            return 2 * (torch.bmm(dw, self.h) + self.wc)
        x, r = self.x, self.r
        if x.shape[-1] > batch:
            idx = torch.randint(x.shape[-1], (batch,), generator=gen)
            x, r = x[:, :, idx], r[:, :, idx]
        e = torch.bmm(dw, x) + r  # (G, O, B)
        return torch.bmm(e, x.transpose(1, 2)) * (2.0 / x.shape[-1])

    def mean_error(self, dw: torch.Tensor) -> torch.Tensor:
        """Each output's mean error with weights ``w + dw`` (what bias correction removes)."""
        return torch.einsum("gok,gk->go", dw, self.mean_x) + self.mean_err.float()


def _search_scale(
    layer: QuantLayer, w: torch.Tensor, obj: Objective, qmax: int, groups: int
) -> None:
    """Each output channel's weight scale re-chosen by its *output* error with nearest rounding
    (the input's second moments weigh the weights), from 0.6x to 1.25x the weight-MSE choice;
    a channel keeps its scale unless another one is better."""
    base = layer.w_scale.view(groups, -1, 1)

    def error(sc: torch.Tensor) -> torch.Tensor:
        return obj.loss_per_output(torch.clamp(torch.round(w / sc), -qmax, qmax) * sc - w)

    best, best_err = base, error(base)
    for f in torch.linspace(0.6, 1.25, 27).tolist():
        err = error(base * f)
        better = (err < best_err).unsqueeze(-1)
        best, best_err = torch.where(better, base * f, best), torch.minimum(err, best_err)
    layer.set_weight_scale(best.reshape(-1))


def learn_rounding(
    w: torch.Tensor,
    scale: torch.Tensor,
    qmax: int,
    loss: Callable[[torch.Tensor], float],
    grad: Callable[[torch.Tensor], torch.Tensor],
    *,
    iterations: int,
    curvature: torch.Tensor | float = 1.0,
    lr: float = 0.03,
    reg: float = 1.0,
) -> tuple[torch.Tensor, float, float]:
    """Integer codes for ``w`` on ``-qmax..qmax`` at ``scale`` (broadcasting), learned by AdaRound.

    ``loss(dw)`` / ``grad(dw)`` give the output error and its gradient for ``dw = w_q - w``;
    ``curvature`` (broadcasting to ``w``) weighs the regulariser per weight. Returns ``(codes,
    loss with nearest rounding, loss with the codes)``; the codes are nearest's when learning did
    not do better.
    """
    x = w / scale
    nearest = torch.clamp(torch.round(x), -qmax, qmax)
    loss_near = loss(nearest * scale - w)
    if iterations <= 0:
        return nearest, loss_near, loss_near
    norm = max(loss_near, 1e-30)  # scale-free: the rounding term starts near 1
    base = torch.floor(x).clamp(-qmax, qmax - 1)  # base + h stays on the grid for h in [0, 1]
    rest = (x - base).clamp(1e-4, 1 - 1e-4)
    v = -torch.log((ZETA - GAMMA) / (rest - GAMMA) - 1)  # h(v) == rest: starts at w itself
    opt = torch.optim.Adam([v], lr=lr, fused=True)
    step = (scale / norm).expand_as(w)  # d(dw)/dh, per unit of the starting error
    weight = (reg * curvature * scale**2 / norm).expand_as(w)  # one step's cost, same units
    # elementwise passes over every weight dominate on CPU: each line below is one or two
    for t in range(iterations):
        sig = torch.sigmoid(v)
        h = sig.mul(ZETA - GAMMA).add_(GAMMA).clamp_(0, 1)
        g = grad(torch.addcmul(-w, base + h, scale)).mul_(step)  # d(rounding term)/dh
        beta = 20 - 18 * t / max(iterations - 1, 1)
        u = h.mul(2).sub_(1)
        g.addcmul_(u.abs().pow_(beta - 2).mul_(u), weight, value=-2 * beta)  # + d(reg)/dh
        live = (h > 0) & (h < 1)  # the rectified sigmoid is flat outside
        v.grad = g.mul_(torch.addcmul(sig, sig, sig, value=-1)).mul_(live).mul_(ZETA - GAMMA)
        opt.step()
    h = (torch.sigmoid(v) * (ZETA - GAMMA) + GAMMA).clamp(0, 1)
    codes = base + (h >= 0.5).float()
    loss_ada = loss(codes * scale - w)
    if loss_ada >= loss_near:
        return nearest, loss_near, loss_near
    return codes, loss_near, loss_ada


Visit = Callable[[fx.Node, QuantLayer, list[torch.Tensor], list[torch.Tensor]], None]


def run_layer_by_layer(
    gm: fx.GraphModule, batches: Sequence[Batch], visit: Visit, *, quantized: bool
) -> None:
    """Run the float version of ``gm`` (quantizers off, layers' float originals) over all
    ``batches`` node by node, and with ``quantized`` the quantized version beside it. Before each
    ``QuantLayer``, ``visit(node, layer, float_inputs, quant_inputs)`` (one tensor per batch; the
    quantized ones empty unless ``quantized``) may change the layer before the model goes on.
    """
    nodes = list(gm.graph.nodes)
    last_use = {n: i for i, node in enumerate(nodes) for n in node.all_input_nodes}
    modes = (False, True) if quantized else (False,)
    envs: list[dict[fx.Node, Any]] = []  # one per (batch, mode)
    placeholders = [n for n in nodes if n.op == "placeholder"]
    for b in batches:
        values: dict[fx.Node, Any] = {}
        for i, p in enumerate(placeholders):
            if i < len(b.args):
                values[p] = b.args[i]
            elif str(p.target) in b.kwargs:
                values[p] = b.kwargs[str(p.target)]
            elif p.args:
                values[p] = p.args[0]  # the default value
            else:
                raise DataError(
                    f"calibration batch {b.index} has no value for input {p.target!r}",
                    fix="give every calibration batch all of the model's inputs",
                )
        envs += [dict(values) for _ in modes]
    for i, node in enumerate(nodes):
        if node.op in ("placeholder", "output"):
            continue
        mod = gm.get_submodule(str(node.target)) if node.op == "call_module" else None
        if isinstance(mod, QuantLayer) and isinstance(node.args[0], fx.Node):
            src = node.args[0]
            xs = [env[src] for env in envs]
            visit(node, mod, xs[:: len(modes)], xs[1 :: len(modes)])
        for j, env in enumerate(envs):
            env[node] = _run_node(gm, node, mod, env, quant=modes[j % len(modes)])
            for n in node.all_input_nodes:
                if last_use.get(n) == i:
                    del env[n]


def _run_node(
    gm: fx.GraphModule, node: fx.Node, mod: nn.Module | None, env: dict[fx.Node, Any], quant: bool
) -> Any:
    args = fx.node.map_arg(node.args, env.__getitem__)
    kwargs = fx.node.map_arg(node.kwargs, env.__getitem__)
    if mod is not None:
        if not quant and isinstance(mod, ActQuant):
            return args[0]
        if not quant and isinstance(mod, QuantLayer):
            return mod.float_layer(*args, **kwargs)
        return mod(*args, **kwargs)
    if node.op == "call_function":
        return node.target(*args, **kwargs)  # type: ignore[operator]
    if node.op == "call_method":
        return getattr(args[0], str(node.target))(*args[1:], **kwargs)
    if node.op == "get_attr":
        obj: Any = gm
        for part in str(node.target).split("."):
            obj = getattr(obj, part)
        return obj
    raise AssertionError(f"unexpected fx node {node.op}")


def adaround(
    qmodel: fx.GraphModule,
    batches: Sequence[Batch],
    *,
    iterations: int = 50,
    inputs: Literal["float", "quantized"] = "quantized",
    correct_mean: bool = True,
    batch: int = 256,
    pool: int = 4096,
    lr: float = 0.03,
    reg: float = 1.0,
    seed: int = 0,
    search_scale: int = 6,
) -> AdaRoundReport:
    """Learn the rounding of every ``QuantLayer`` of ``qmodel`` in place (see the module doc).

    ``iterations`` per layer (0 keeps nearest rounding, and still corrects the mean when asked).
    Layers with more than ``2 * batch`` inputs per output learn on a pool of ``pool`` positions,
    ``batch`` per iteration (fewer for the widest: ``WORK`` multiply-adds at most); the others
    use exact second moments.
    """
    report = AdaRoundReport()
    t_all = time.perf_counter()
    gen = torch.Generator().manual_seed(seed)
    calls = call_counts(qmodel)

    def visit(node: fx.Node, layer: QuantLayer, xf: list[torch.Tensor], xq: list[torch.Tensor]):
        t0 = time.perf_counter()
        name, fl = str(node.target), layer.float_layer
        if not isinstance(fl, (nn.Linear, nn.Conv1d, nn.Conv2d)):
            report.skipped.append((name, f"{type(fl).__name__} is not supported: nearest kept"))
            return
        if calls[name] != 1:
            report.skipped.append((name, "called more than once: nearest kept"))
            return
        if inputs == "float":  # each layer's own input quantizer on the float input
            src = node.args[0]
            quant = qmodel.get_submodule(str(src.target)) if src.op == "call_module" else None  # type: ignore[union-attr]
            xq = [quant(x) for x in xf] if isinstance(quant, ActQuant) else xf
        groups = fl.groups if isinstance(fl, (nn.Conv1d, nn.Conv2d)) else 1
        w = grouped(fl.weight.detach().float(), groups)  # (G, O, K)
        hessian = w.shape[-1] <= 2 * batch
        fit, check = Objective(w, hessian), Objective(w, hessian)
        held_out = len(xf) >= 4  # every 4th batch judges the learned rounding
        for i, (a, b) in enumerate(zip(xf, xq, strict=True)):
            pq = patches(fl, b.float())
            obj = check if held_out and i % 4 == 3 else fit
            obj.add(pq, pq - patches(fl, a.float()), math.ceil(pool / len(xf)), gen)
        fit.finish(centred=correct_mean)
        qmax = 2 ** (layer.weight_bits - 1) - 1
        if search_scale and layer.weight_bits <= search_scale:
            _search_scale(layer, w, fit, qmax, groups)
        scale = layer.w_scale.view(groups, -1, 1)
        per_step = min(batch, max(64, WORK // w.numel()))  # wide layers: fewer positions a step
        codes, l_near, l_ada = learn_rounding(
            w, scale, qmax, fit.loss, lambda dw: fit.grad(dw, per_step, gen),
            iterations=iterations, curvature=fit.curvature(), lr=lr, reg=reg,
        )  # fmt: skip
        nearest = torch.clamp(torch.round(w / scale), -qmax, qmax)
        judge = fit
        if held_out:
            check.finish(centred=correct_mean)
            judge = check
            l_near, l_ada = check.loss(nearest * scale - w), check.loss(codes * scale - w)
            if l_ada >= l_near:  # learned on the fitting batches only: keep nearest
                codes, l_ada = nearest, l_near
        layer.set_weight_codes(codes.reshape(layer.w_q.shape))
        if correct_mean:
            dw = codes * scale - w
            n_fit, n_check = fit.count, check.count
            mean = fit.mean_error(dw) * n_fit + (check.mean_error(dw) * n_check if n_check else 0)
            layer.correct_bias((mean / (n_fit + n_check)).reshape(-1))
        n_out = w.shape[0] * w.shape[1]
        report.layers.append(LayerResult(
            name, l_near / n_out, l_ada / n_out, judge.const / n_out,
            float((codes != nearest).float().mean()), time.perf_counter() - t0,
        ))  # fmt: skip

    with torch.no_grad():
        run_layer_by_layer(qmodel, batches, visit, quantized=inputs == "quantized")
    report.seconds = time.perf_counter() - t_all
    return report
