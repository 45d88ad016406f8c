"""Low-rank decomposition on a trained VGG-style CNN: every rank rule in one table.

Part 1, accuracy: a VGG-style CNN, four 3x3 conv-BN-ReLU blocks with max-pools (16-64 channels,
the zoo's trained ``shapes_cnn`` features as its start) and a flatten + classifier of two hidden
Linear layers of 1024 (97 % of its 2.16 M parameters), trained on the zoo's generated ``shapes``
images (32x32, 10 classes; the test split is never seen in training or fine-tuning). Its weights
are cached (``<slimkit cache>/bench_lowrank-<hash>.safetensors``).

Rows: dense; ``svd`` at each rank rule (energy, a params budget, VBMF, a fixed rank; Linear and
conv layers; energy and VBMF also data-aware, from 256 training images); ``tucker`` and ``cp``
on the conv layers (VBMF ranks, and a MAC budget over the convs). Every factorised model
gets the same short fine-tune (``slimkit.prune.recover``: response distillation from the dense
model, the same steps and seed), then: params, MACs, top-1 before and after fine-tuning, ONNX
Runtime latency at batch 1 (all rows timed in the same interleaved rounds) and the roofline's
predicted speed-up (``analyze.roofline`` on this machine's measured profile) next to the measured
one.

Part 2, speed (full mode): ResNet-18 at 224x224 with random weights (enough for latency): Tucker,
CP and SVD of its convs, ORT batch 1 measured against the roofline's prediction.

    python benchmarks/bench_lowrank.py --quick   # 150 dense steps, 3 rows, 20 fine-tune steps
    python benchmarks/bench_lowrank.py           # 400 dense steps, 12 rows, 80 fine-tune steps
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # spinning OpenMP threads: 4x slower training

import copy  # noqa: E402
import hashlib  # noqa: E402
import inspect  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import torch  # noqa: E402
from torch import nn  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))

import slimkit as sk  # noqa: E402
from _common import ort_latency, parser, print_table, start, write_result  # noqa: E402
from slimkit.analyze.hardware import load_profile  # noqa: E402
from slimkit.analyze.profile import profile_model  # noqa: E402
from slimkit.analyze.roofline import roofline  # noqa: E402
from slimkit.core.io import load_into, load_weights, save_weights  # noqa: E402
from slimkit.core.train import fit  # noqa: E402
from slimkit.lowrank import CP, SVD, RankRule, Tucker  # noqa: E402
from slimkit.prune.recover import recover  # noqa: E402
from slimkit.zoo import create_model, evaluate, load_task, pretrained  # noqa: E402
from slimkit.zoo.pretrained import cache_dir  # noqa: E402

SEED = 0


class VGG(nn.Module):
    """VGG-style: ``features`` (conv-BN-ReLU blocks and max-pools), flattened, then a large
    Linear classifier."""

    def __init__(self, features: nn.Module, flat: int, hidden: int = 1024, classes: int = 10):
        super().__init__()
        self.features = features
        self.classifier = nn.Sequential(
            nn.Flatten(),  # (B, 64, 4, 4) -> (B, 1024)
            nn.Linear(flat, hidden), nn.ReLU(), nn.Dropout(0.3),
            nn.Linear(hidden, hidden), nn.ReLU(), nn.Dropout(0.3),
            nn.Linear(hidden, classes),
        )  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def dense_model(steps: int) -> tuple[nn.Module, float]:
    """The trained VGG and the seconds its training took (0 when cached). Its conv features
    start from the zoo's trained ``shapes_cnn`` (4 conv-BN-ReLU, 16-64 channels: training a VGG
    on shapes from scratch takes minutes per epoch here); the whole model, classifier and
    features, is then trained ``steps`` steps on the task. Cached by a hash of this code."""
    src = inspect.getsource(VGG) + inspect.getsource(dense_model)
    key = hashlib.sha256(f"{src}{steps}".encode()).hexdigest()[:16]
    path = cache_dir() / f"bench_lowrank-{key}.safetensors"
    torch.manual_seed(SEED)
    model = VGG(copy.deepcopy(pretrained("shapes_cnn", progress=False).features), 64 * 4 * 4)
    if path.is_file():
        load_into(model, load_weights(path))
        return model.eval(), 0.0
    task = load_task("shapes")
    t0 = time.perf_counter()
    fit(model, task.loader("train", 64, shuffle=True, seed=SEED), epochs=10, max_steps=steps,
        lr=1e-3, weight_decay=5e-4, progress=False, seed=SEED)  # fmt: skip
    path.parent.mkdir(parents=True, exist_ok=True)
    save_weights(model, path)
    return model.eval(), time.perf_counter() - t0


def rules(quick: bool) -> list[tuple[str, RankRule]]:
    """The rows of part 1: every rank rule of svd, and tucker / cp on the convs."""
    if quick:
        return [("svd params 0.1", SVD(params=0.1)), ("tucker vbmf", Tucker(vbmf=True))]
    return [
        ("svd energy 0.9", SVD(energy=0.9)),
        ("svd energy 0.99 data-aware", SVD(energy=0.99, data_aware=True)),
        ("svd params 0.1", SVD(params=0.1)),
        ("svd params 0.05", SVD(params=0.05)),
        ("svd vbmf", SVD(vbmf=True)),
        ("svd vbmf data-aware", SVD(vbmf=True, data_aware=True)),
        ("svd rank 32 linear", SVD(rank=32, layers="linear")),
        ("tucker vbmf", Tucker(vbmf=True)),
        ("tucker macs 0.5", Tucker(macs=0.5)),
        ("cp vbmf", CP(vbmf=True)),
        ("cp macs 0.5", CP(macs=0.5)),
    ]


SPEED_RULES: list[tuple[str, RankRule]] = [
    ("tucker rank 0.5", Tucker(rank=0.5)),
    ("tucker macs 0.4 round_to 8", Tucker(macs=0.4, round_to=8)),
    ("cp rank 0.25", CP(rank=0.25, als_iters=10)),
    ("svd conv rank 0.5", SVD(rank=0.5, layers="conv")),
]


def speed(name: str) -> list[dict[str, Any]]:
    """Part 2: the convs of a larger model (random weights: enough for speed), ORT batch 1."""
    torch.manual_seed(SEED)
    dense = create_model(name).eval()
    x = torch.randn(1, 3, 224, 224)
    models: dict[str, nn.Module] = {"dense": dense}
    rows: list[dict[str, Any]] = [{"model": name, "tool": "slimkit", "method": "dense",
                                   "label": "dense"}]  # fmt: skip
    for label, cfg in SPEED_RULES:
        t1 = time.perf_counter()
        models[label] = sk.decompose(dense, cfg, example_inputs=(x,))
        tool_s = round(time.perf_counter() - t1, 2)
        rows.append({"model": name, "tool": "slimkit", "method": label, "label": label,
                     "config": cfg.to_dict(), "tool_s": tool_s})  # fmt: skip
        print(f"{name} {label}: decomposed in {rows[-1]['tool_s']} s", flush=True)
    _measure(rows, models, x, runs=20)
    return rows


def main() -> None:
    args = parser("lowrank", __doc__).parse_args()
    t0 = start()
    dense_steps, steps = (150, 20) if args.quick else (400, 80)
    task = load_task("shapes")
    dense, train_s = dense_model(dense_steps)
    x = task.test.tensors[0][:1]
    calib = task.calibration(256, 64)  # train split: data-aware SVD's input statistics
    models: dict[str, nn.Module] = {"dense": dense}
    top1 = round(evaluate(dense, task)["top1"], 4)
    rows: list[dict[str, Any]] = [{"model": "vgg_shapes", "tool": "slimkit", "method": "dense",
                                   "label": "dense", "train_s": round(train_s, 1),
                                   "metric": {"top1": top1}}]  # fmt: skip
    print(f"dense: top-1 {rows[0]['metric']['top1']:.4f} (trained {train_s:.0f} s)", flush=True)
    for label, cfg in rules(args.quick):
        t1 = time.perf_counter()
        small = sk.decompose(dense, cfg, example_inputs=(x,), data=calib)
        tool_s = time.perf_counter() - t1
        rec = sk.report(small).record
        oneshot = evaluate(small, task)["top1"]
        tuned = copy.deepcopy(small)
        t1 = time.perf_counter()
        recover(tuned, task.loader("train", 64, shuffle=True, seed=SEED), teacher=dense,
                epochs=1, max_steps=steps, lr=1e-3, progress=False, seed=SEED)  # fmt: skip
        models[label] = tuned
        rows.append({
            "model": "vgg_shapes", "tool": "slimkit", "method": label, "label": label,
            "config": cfg.to_dict(), "tool_s": round(tool_s, 2),
            "finetune_steps": steps, "finetune_s": round(time.perf_counter() - t1, 1),
            "layers": [{k: r[k] for k in ("name", "kind", "rank", "params", "rel_error")}
                       for r in rec["layers"]],
            "metric": {"top1": round(evaluate(tuned, task)["top1"], 4),
                       "top1_oneshot": round(oneshot, 4)},
        })  # fmt: skip
        print(f"{label}: {len(rec['layers'])} layers, one-shot {oneshot:.4f}, "
              f"tuned {rows[-1]['metric']['top1']:.4f}", flush=True)  # fmt: skip
    _measure(rows, models, x, runs=30 if args.quick else 100)
    speed_rows = [] if args.quick else speed("resnet18")
    checks = _checks(rows, speed_rows)
    settings = {"dense_steps": dense_steps, "dense_start": "zoo shapes_cnn features",
                "finetune_steps": steps, "finetune_lr": 1e-3, "speed_model": "resnet18 224x224",
                "finetune": "slimkit.prune.recover, response distillation from the dense model",
                "batch": 1, "threads": 2, "hardware_profile": "this (measured)"}  # fmt: skip
    path = write_result("lowrank", args, rows + speed_rows, settings, t0, checks=checks)
    for r in rows:
        r["top1"], r["top1_oneshot"] = r["metric"]["top1"], r["metric"].get("top1_oneshot")
    print_table("low-rank decomposition of a VGG on shapes (ORT batch 1, same fine-tuning)",
                [("method", "method"), ("params", "params"), ("kept", "params_fraction"),
                 ("MACs", "macs"), ("top-1 one-shot", "top1_oneshot"), ("top-1 tuned", "top1"),
                 ("ms", "latency_ms"), ("speed-up", "speedup"),
                 ("roofline", "predicted_speedup")], rows)  # fmt: skip
    if speed_rows:
        print_table("speed: convs of ResNet-18 at 224x224, random weights, ORT batch 1",
                    [("method", "method"), ("params", "params"), ("MACs", "macs"),
                     ("ms", "latency_ms"), ("speed-up", "speedup"),
                     ("roofline", "predicted_speedup")], speed_rows)  # fmt: skip
    for k, v in checks.items():
        print(f"{'ok ' if v['ok'] else 'NOT'} {k}: {v['detail']}")
    print(f"wrote {path}")


def _measure(rows: list[dict[str, Any]], models: dict[str, nn.Module], x: torch.Tensor,
             *, runs: int) -> None:  # fmt: skip
    """Params, MACs, ORT latency (all rows in the same interleaved rounds) and the roofline."""
    hw = load_profile("this")
    stats = ort_latency(models, x, runs=runs, warmup=5, rounds=3)
    base = rows[0]
    for row in rows:
        m = models[row["label"]]
        prof = profile_model(m, (x,))
        st = stats[row["label"]]
        row.update(batch=1, params=prof.total_params, macs=prof.total_macs,
                   latency_ms=round(st.median_ms, 4),
                   latency_spread_ms=[round(v, 4) for v in st.spread_ms],
                   roofline_ms=round(roofline(prof, hw).total_s * 1e3, 4))  # fmt: skip
    for row in rows:
        row["params_fraction"] = round(row["params"] / base["params"], 4)
        row["speedup"] = round(base["latency_ms"] / row["latency_ms"], 3)
        row["predicted_speedup"] = round(base["roofline_ms"] / row["roofline_ms"], 3)


def _checks(rows: list[dict[str, Any]], speed_rows: list[dict[str, Any]]) -> dict[str, Any]:
    top = rows[0]["metric"]["top1"]
    svd = [r for r in rows if r["method"].startswith("svd")]
    best = max(svd, key=lambda r: (1 - r["params_fraction"]) * (top - r["metric"]["top1"] <= 0.01))
    drop = top - best["metric"]["top1"]
    out = {
        "svd removes >= 80 % of the parameters with a top-1 drop <= 1 point": {
            "ok": best["params_fraction"] <= 0.2 and drop <= 0.01,
            "detail": f"{best['method']}: {1 - best['params_fraction']:.1%} removed, top-1 "
            f"{top:.4f} -> {best['metric']['top1']:.4f} ({-100 * drop:+.2f} points)",
        }
    }
    for r in rows + speed_rows:
        dense = next(d for d in rows + speed_rows if d["model"] == r["model"])
        if r["method"].startswith(("tucker", "cp")):
            beyond = r["speedup"] >= 1.15  # the protocol: differences under 15 % are ties
            out[f"{r['model']} {r['method']}: measured ORT speed-up beyond noise (>= 1.15x)"] = {
                "ok": beyond,
                "detail": f"{r['speedup']}x measured{'' if beyond else ' (a tie)'}, "
                f"{r['predicted_speedup']}x predicted by the roofline, MACs "
                f"{r['macs'] / dense['macs']:.2f} of dense",
            }
    return out


if __name__ == "__main__":
    main()
