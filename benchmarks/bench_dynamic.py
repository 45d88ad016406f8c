"""Dynamic inference and lightweight blocks on trained zoo CNNs (the generated ``shapes`` task),
everything as deployed in ONNX Runtime at batch 1.

Rows per model (default: ``shapes_resnet18`` with early exit and skip gates, ``shapes_cnn`` with
early exit and both lightweight conversions; ``--models`` / ``--methods`` choose):

- ``float``: the trained model exported to ONNX, the reference.
- ``early exit ...``: exit heads at the cut points nearest 50 / 63 / 75 % of the MACs, width
  64 (``shapes_cnn``: 50 / 75 %, width 32; ``--ee-at``, ``--ee-width``, ``--ee-grid``). On the
  ResNet the backbone is fine-tuned with them for ``--ee-epochs`` (6), every exit and the final
  head distilled from the original (``--ee-frozen``: heads only), and the fine-tuned network
  without its exits gets a row of its own (``early-exit backbone alone``: what fine-tuning alone
  did; ``top1_drop_vs_backbone`` is what the exits cost against it); on ``shapes_cnn`` the
  backbone is frozen (heads distilled from its final head, features cached once).
  Max-softmax thresholds calibrated on the val split so that at most ``d`` of it is predicted
  differently from the full model, one row per ``d`` in ``--calib-drops`` (the same trained
  model and ONNX pieces); run by ``OrtEarlyExit`` (one ONNX graph per segment).
  ``macs_saved``: the average over the test split (analyze's MAC counting, the heads on the way
  included); latency: the average per test image, gating included.
- ``lightweight separable`` / ``lightweight ghost``: the 3x3 convs (not the RGB stem) converted
  (SVD / paired-filter initialisation), then distilled from the float model (``--lw-epochs`` over
  ``--train-subset`` train images).
- ``skip gate``: a learned gate before each identity-residual block, gates and network trained
  together (distillation + compute penalty, ``--sg-epochs`` over ``--sg-subset`` images); run
  by ``OrtSkipGates``; latency averaged per image.

Top-1 is measured on the whole test split (never seen in training or calibration) from the ORT
outputs. Latency: every row of a model timed in the same interleaved rounds, each round the mean
over the same ``--timed-images`` test images at batch 1; the median of 3 round means and their
spread. Torch and ONNX Runtime use one thread (a shared machine: the load average is in the
JSON).

    python benchmarks/bench_dynamic.py --quick   # shapes_cnn, a few steps, 200 test images
    python benchmarks/bench_dynamic.py           # both models (results/dynamic.json: 612 s)
    python benchmarks/bench_dynamic.py --models shapes_resnet18 --methods early-exit \
        --calib-drops 0.01 0.02 0.03 0.05 \
        --json benchmarks/results/dynamic_early_exit.json                      # 1070 s
    python benchmarks/bench_dynamic.py --models shapes_cnn --methods ghost separable \
        --lw-epochs 10 --json benchmarks/results/dynamic_lightweight.json   # 284 s
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # spinning OpenMP threads: slower training

import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))

import slimkit as sk  # noqa: E402
from _common import parser, print_table, start, write_result  # noqa: E402
from slimkit.analyze.profile import profile_model  # noqa: E402
from slimkit.dynamic import (  # noqa: E402
    EarlyExit,
    OrtEarlyExit,
    SkipGates,
    calibrate,
    early_exit,
    export_early_exit,
    export_skip_gates,
    skip_gates,
)
from slimkit.dynamic.measure import mean_latency, top1  # noqa: E402
from slimkit.export.onnx import export_onnx  # noqa: E402
from slimkit.export.ort import ort_session  # noqa: E402
from slimkit.lightweight import Ghost, Separable  # noqa: E402
from slimkit.zoo import load_task, pretrained  # noqa: E402

THREADS = 1
Runner = Callable[[np.ndarray], np.ndarray]


def _subset(task: Any, split: str, n: int, batch: int, seed: int = 0) -> list[Any]:
    xs, ys = task.split(split).tensors
    idx = torch.randperm(len(xs), generator=torch.Generator().manual_seed(seed))[:n]
    return [(xs[idx[i : i + batch]], ys[idx[i : i + batch]]) for i in range(0, len(idx), batch)]


def _static(model: torch.nn.Module, tmp: Path, name: str, x: torch.Tensor) -> Runner:
    path = tmp / f"{name}.onnx"
    export_onnx(model.eval(), path, example_inputs=(x,))
    sess = ort_session(path, threads=THREADS)
    inp = sess.get_inputs()[0].name

    def run(a: np.ndarray) -> np.ndarray:
        out: np.ndarray = sess.run(None, {inp: a})[0]
        return out

    return run


DEFAULT = {  # model -> methods (lightweight distillation on the ResNet is too slow here)
    "shapes_resnet18": ("early-exit", "skip-gate"),
    "shapes_cnn": ("early-exit", "separable", "ghost"),
}


def _early_exit(model: Any, args: Any, task: Any, x1: torch.Tensor, tmp: Path) -> list[Any]:
    """One early-exit model, trained once, at each calibration budget of ``--calib-drops``
    (same ONNX pieces, other thresholds): one row each."""
    q = args.quick
    resnet = "resnet" in args.current
    at = args.ee_at or ([0.5, 0.63, 0.75] if resnet else [0.5, 0.75])
    ft = args.ee_finetune and resnet
    width = args.ee_width or (64 if resnet else 32)
    cfg = EarlyExit(max_drop=args.calib_drops[0], epochs=1 if q else args.ee_epochs, at=at,
                    head_width=width, head_grid=args.ee_grid, lr=args.ee_lr,
                    finetune=ft)  # fmt: skip
    t0 = time.perf_counter()
    n = 512 if q else args.ee_subset or len(task.train)
    train = _subset(task, "train", n, 64, seed=1)
    val = task.loader("val", 256)
    ee = early_exit(model, cfg, data=train, calib=val, progress=False)
    tool_s = time.perf_counter() - t0
    first = export_early_exit(ee, tmp / "ee", example_inputs=x1, threads=THREADS)
    out = []
    if ft:  # the fine-tuned network without its exits: what fine-tuning alone did to top-1
        label = "early-exit backbone alone (fine-tuned, no exits)"
        row = {"method": label, "macs": ee.full_macs, "train_images": n,
               "tool_s": round(tool_s, 1)}  # fmt: skip
        out.append((label, _static(nn.Sequential(*ee.segments), tmp, "backbone", x1), row))
    for drop in args.calib_drops:
        calibrate(ee, val, drop)
        ev = ee.evaluate(task.loader("test", 256))
        run = OrtEarlyExit(first.sessions, ee.thresholds.tolist())
        how = "fine-tuned" if ft else "frozen backbone"
        label = f"early exit (max-softmax, {len(ee.heads)} exits, {how}, calibrated {drop:g})"
        row = {"method": label, "macs": round(ev["avg_macs"]),
               "macs_saved": round(ev["macs_saved"], 4),
               "exit_fractions": [round(f, 4) for f in ev["exit_fractions"]],
               "exits_after": ee.cuts, "thresholds": ev["thresholds"],
               "exit_top1_torch": [round(f, 4) for f in ev["exit_top1"]],
               "full_top1_torch": round(ev["full_top1"], 4), "torch_top1": round(ev["top1"], 4),
               "train_images": n, "tool_s": round(tool_s, 1),
               "config": cfg.replace(max_drop=drop).to_dict()}  # fmt: skip
        out.append((label, (lambda a, r=run: r(a)[0]), row))
    return out


def _lightweight(model: Any, kind: str, args: Any, train: list[Any], x1: torch.Tensor,
                 tmp: Path) -> tuple[Any, ...]:  # fmt: skip
    q = args.quick
    fields = {"epochs": 1 if q else args.lw_epochs, "lr": 2e-3, "max_steps": 20 if q else None}
    cfg = Separable(**fields) if kind == "separable" else Ghost(**fields)
    t0 = time.perf_counter()
    small = sk.lighten(model, cfg, data=train, progress=False)
    tool_s = time.perf_counter() - t0
    label = f"lightweight {kind} + distillation"
    row = {"method": label, "config": cfg.to_dict(), "macs": profile_model(small, (x1,)).total_macs,
           "params": sum(p.numel() for p in small.parameters()), "train_images": len(train) * 64,
           "tool_s": round(tool_s, 1)}  # fmt: skip
    return label, _static(small, tmp, kind, x1), row


def _skip_gate(model: Any, args: Any, task: Any, x1: torch.Tensor, tmp: Path) -> tuple[Any, ...]:
    q = args.quick
    train = _subset(task, "train", 512 if q else args.sg_subset, 64, seed=2)
    cfg = SkipGates(penalty=args.penalty, epochs=1 if q else args.sg_epochs, lr=args.sg_lr,
                    max_steps=10 if q else None)  # fmt: skip
    t0 = time.perf_counter()
    sg = skip_gates(model, cfg, data=train, progress=False)
    tool_s = time.perf_counter() - t0
    ev = sg.evaluate(task.loader("test", 256))
    run = export_skip_gates(sg, tmp / "sg", example_inputs=x1, threads=THREADS)
    label = f"skip gate (penalty {cfg.penalty:g}, {len(sg.gated)} blocks)"
    row = {"method": label, "macs": round(ev["avg_macs"]), "macs_saved": round(ev["macs_saved"], 4),
           "run_fractions": ev["run_fractions"], "blocks": sg.gated,
           "torch_top1": round(ev["top1"], 4), "train_images": len(train) * 64,
           "tool_s": round(tool_s, 1), "config": cfg.to_dict()}  # fmt: skip
    return label, (lambda a: run(a)[0]), row


def bench_model(name: str, methods: tuple[str, ...], args: Any) -> list[dict[str, Any]]:
    task = load_task("shapes")
    model = pretrained(name).eval()
    args.current = name
    q = args.quick
    x1 = task.test.tensors[0][:1]
    n_test = 200 if q else len(task.test)
    images = [a[None].numpy() for a in task.test.tensors[0][:n_test]]
    labels = task.test.tensors[1][:n_test].numpy()
    full_macs = profile_model(model, (x1,)).total_macs
    train = _subset(task, "train", 512 if q else args.train_subset or len(task.train), 64)
    base = {"model": name, "tool": "slimkit", "batch": 1}
    runners: dict[str, Runner] = {}
    rows: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        runners["float"] = _static(model, tmp, "float", x1)
        rows["float"] = {"method": "float (ORT fp32)", "macs": full_macs,
                         "params": sum(p.numel() for p in model.parameters())}  # fmt: skip
        for m in methods:
            if m == "early-exit":
                made = _early_exit(model, args, task, x1, tmp)
            elif m == "skip-gate":
                made = [_skip_gate(model, args, task, x1, tmp)]
            else:
                made = [_lightweight(model, m, args, train, x1, tmp)]
            for label, fn, row in made:
                runners[label], rows[label] = fn, row
                print(f"{name} {label}: {row['tool_s']} s", flush=True)
        for label, fn in runners.items():
            rows[label]["metric"] = {"top1": top1(fn, images, labels)}
        timed = images[: 100 if q else args.timed_images]
        timing = mean_latency(runners, timed, rounds=2 if q else 3)
    ref, top_ref = timing["float"]["latency_ms"], rows["float"]["metric"]["top1"]
    backbone = rows.get("early-exit backbone alone (fine-tuned, no exits)")
    out = []
    for label, r in rows.items():
        r.update(timing[label])
        r["latency_vs_float"] = round(r["latency_ms"] / ref, 3)
        r["top1_drop"] = round(top_ref - r["metric"]["top1"], 4)
        if backbone is not None and label.startswith("early exit"):  # the exits' own cost
            r["top1_drop_vs_backbone"] = round(backbone["metric"]["top1"] - r["metric"]["top1"], 4)
        r.setdefault("macs_saved", round(1 - r["macs"] / full_macs, 4))
        r["timed_images"], r["test_images"] = len(timed), n_test
        out.append({**base, **r})
    return out


def main() -> None:
    p = parser("dynamic", __doc__)
    p.add_argument("--models", nargs="+", default=None, help="zoo names (shapes task)")
    p.add_argument("--methods", nargs="+", default=None,
                   help="early-exit skip-gate separable ghost (default: per model)")  # fmt: skip
    p.add_argument(
        "--calib-drops",
        type=float,
        nargs="+",
        default=[0.01, 0.02, 0.03],
        help="val disagreement with the full model the exits may cost (a row each)",
    )
    p.add_argument("--ee-epochs", type=int, default=6, help="early-exit training epochs")
    p.add_argument("--ee-subset", type=int, default=0, help="train images for the exits (0: all)")
    p.add_argument(
        "--ee-frozen",
        dest="ee_finetune",
        action="store_false",
        help="ResNet: train only the heads (default: the backbone too, distilled)",
    )
    p.add_argument("--ee-lr", type=float, default=1e-3, help="exit training learning rate")
    p.add_argument("--ee-at", type=float, nargs="+", default=None,
                   help="exit positions as MAC fractions (default: per model)")  # fmt: skip
    p.add_argument("--ee-width", type=int, default=0, help="exit head width (0: per model)")
    p.add_argument("--ee-grid", type=int, default=0, help="exit head grid (0: global pool)")
    p.add_argument("--lw-epochs", type=int, default=5, help="lightweight distillation epochs")
    p.add_argument("--sg-epochs", type=int, default=2, help="skip-gate training epochs")
    p.add_argument("--sg-lr", type=float, default=2e-3, help="skip-gate training learning rate")
    p.add_argument("--penalty", type=float, default=3.0, help="skip-gate compute penalty")
    p.add_argument("--train-subset", type=int, default=0, help="train images, lightweight (0: all)")
    p.add_argument("--sg-subset", type=int, default=3072, help="train images for the skip gates")
    p.add_argument("--timed-images", type=int, default=500, help="test images per timed round")
    args = p.parse_args()
    t0 = start(THREADS)
    models = args.models or (["shapes_cnn"] if args.quick else list(DEFAULT))
    rows = []
    for name in models:
        methods = tuple(args.methods) if args.methods else DEFAULT.get(name, ("early-exit",))
        rows += bench_model(name, methods, args)
    print_table(
        "dynamic inference and lightweight blocks (ORT, batch 1, mean per test image)",
        [("model", "model"), ("method", "method"), ("top-1", "top1"), ("drop", "top1_drop"),
         ("MACs saved", "macs_saved"), ("ms", "latency_ms"), ("x float", "latency_vs_float")],
        [{**r, "top1": r["metric"]["top1"]} for r in rows],
    )  # fmt: skip
    settings = {k: v for k, v in vars(args).items() if k not in ("json", "current")}
    settings["threads"] = THREADS
    path = write_result("dynamic", args, rows, settings, t0)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
