"""Channel pruning: slimkit against Torch-Pruning at the same channel ratio, same fine-tuning.

Trained zoo CNNs (their bundled task's test split, never used in training): the dense model, then
each tool removes the same fraction of channels by L1 norm (final classifier kept whole), all
pruned models get the same fine-tuning budget with slimkit's trainer (slimkit also with its
recovery recipe: response distillation from the dense model), and we report top-1 before
and after fine-tuning, parameters, MACs and ORT latency (batch 1, interleaved rounds).

    python benchmarks/bench_prune.py --quick   # shapes_cnn + digits_cnn, ratio 0.3, 1 epoch
    python benchmarks/bench_prune.py           # ratios 0.3 and 0.5, 3 epochs of fine-tuning
"""

from __future__ import annotations

import copy
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))

from _common import parser, print_table, start, write_result  # noqa: E402
from slimkit.analyze.latency import measure_latency, ort_runner  # noqa: E402
from slimkit.analyze.profile import profile_model  # noqa: E402
from slimkit.export.onnx import export_onnx  # noqa: E402
from slimkit.export.ort import ort_session  # noqa: E402
from slimkit.prune import Channel, prune_channels  # noqa: E402
from slimkit.prune.recover import recover  # noqa: E402
from slimkit.zoo import PRETRAINED, evaluate, load_task, pretrained  # noqa: E402


def torch_pruning(model: nn.Module, x: torch.Tensor, ratio: float) -> nn.Module | None:
    """Torch-Pruning's L1 magnitude pruner at the same channel ratio (None when not installed)."""
    try:
        import torch_pruning as tp
    except ImportError:
        return None
    m = copy.deepcopy(model)
    last = [mod for mod in m.modules() if isinstance(mod, nn.Linear)][-1]
    pruner = tp.pruner.MetaPruner(m, x, importance=tp.importance.MagnitudeImportance(p=1),
                                  pruning_ratio=ratio, ignored_layers=[last])  # fmt: skip
    pruner.step()
    return m


def finetune(model: nn.Module, task: Any, epochs: int, teacher: nn.Module | None = None) -> float:
    t0 = time.perf_counter()
    recover(model, task.loader("train", 64, shuffle=True), teacher=teacher, epochs=epochs, lr=1e-3,
            progress=False, weight_decay=5e-4)  # fmt: skip
    return time.perf_counter() - t0


def bench(name: str, ratios: list[float], epochs: int, tmp: Path) -> list[dict[str, Any]]:
    recipe = PRETRAINED.get(name)
    task = load_task(recipe.task)
    dense = pretrained(name, progress=False)
    x = task.test.tensors[0][:1]
    variants: dict[str, tuple[str, nn.Module, dict[str, Any]]] = {
        "dense": ("slimkit", dense, {"top1": evaluate(dense, task)["top1"]})
    }
    for r in ratios:
        small = prune_channels(dense, Channel(ratio=r), example_inputs=(x,))
        peers = {"slimkit": small, "slimkit+kd": copy.deepcopy(small),
                 "torch-pruning": torch_pruning(dense, x, r)}  # fmt: skip
        for tool, m in peers.items():
            if m is None:
                continue
            info = {"top1_oneshot": evaluate(m, task)["top1"]}
            teacher = dense if tool == "slimkit+kd" else None
            info["finetune_s"] = round(finetune(m, task, epochs, teacher), 1)
            info["top1"] = evaluate(m, task)["top1"]
            variants[f"{tool}: l1 ratio {r}"] = (tool, m, info)
    runners, rows = {}, []
    for label, (_tool, m, _info) in variants.items():
        path = tmp / f"{name}_{len(runners)}.onnx"
        export_onnx(m, path, example_inputs=(x,))
        runners[label] = ort_runner(ort_session(path), [x])
    stats = measure_latency(runners, runs=50, warmup=10, rounds=3)
    for label, (tool, m, info) in variants.items():
        prof = profile_model(m, (x,))
        method = "dense" if label == "dense" else f"l1, ratio {label.rsplit(' ', 1)[1]}"
        if tool == "slimkit+kd":
            tool, method = "slimkit", method + ", distilled from the dense model"
        rows.append({
            "model": name, "tool": tool, "method": method,
            "batch": 1, "metric": {k: round(v, 4) for k, v in info.items() if "top1" in k},
            "finetune_epochs": 0 if label == "dense" else epochs,
            "finetune_s": info.get("finetune_s"), "macs": prof.total_macs,
            "params": prof.total_params, "latency_ms": round(stats[label].median_ms, 4),
            "latency_spread_ms": [round(v, 4) for v in stats[label].spread_ms],
        })  # fmt: skip
    return rows


def main() -> None:
    args = parser("prune", __doc__).parse_args()
    t0 = start()
    ratios, epochs = ([0.3], 1) if args.quick else ([0.3, 0.5], 3)
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in ("shapes_cnn", "digits_cnn"):
            rows += bench(name, ratios, epochs, Path(tmp))
            print(f"done {name}", flush=True)
    for r in rows:
        r["top1"], r["top1_oneshot"] = r["metric"]["top1"], r["metric"].get("top1_oneshot")
    settings = {"ratios": ratios, "finetune_epochs": epochs, "lr": 1e-3, "threads": 2}
    path = write_result("prune", args, rows, settings, t0)
    print_table("channel pruning, same ratio, same fine-tuning (ORT batch 1)",
                [("model", "model"), ("tool", "tool"), ("method", "method"), ("MACs", "macs"),
                 ("params", "params"), ("ms", "latency_ms"), ("top-1 one-shot", "top1_oneshot"),
                 ("top-1 tuned", "top1")], rows)  # fmt: skip
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
