"""Knowledge distillation on slimkit's trained zoo models, each against the same student trained
without a teacher (same epochs or steps, same seeds).

1. **image** (the generated shapes task): a student at a quarter of the teacher's MACs (the
   teacher pruned by slimkit, keeping its weights) trained with no teacher (labels only),
   response, feature and relation distillation; top-1 as the mean of the seeds.
2. **text** (which standard-library package a snippet is from): a half-depth student (every
   other layer kept, initialised from the teacher, as DistilBERT was made) distilled from a
   4-layer classifier, vs the teacher on accuracy and ONNX Runtime latency (batch 1).
3. **gpt** (byte-level GPT on the standard library's source): a width + depth pruned student at
   about half the parameters (Minitron-style), distilled, vs the same architecture trained from
   scratch on the same number of tokens; held-out perplexity.

    .venv/bin/python benchmarks/bench_distill.py            # full (about 20 minutes)
    .venv/bin/python benchmarks/bench_distill.py --quick    # about 2 minutes, 1 seed
"""

from __future__ import annotations

import copy
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))

import slimkit as sk  # noqa: E402
from _common import ort_latency, parser, print_table, start, write_result  # noqa: E402
from slimkit.analyze.profile import profile_model  # noqa: E402
from slimkit.core.train import fit  # noqa: E402
from slimkit.zoo import evaluate, load_task, pretrained  # noqa: E402


def _reinit(model: nn.Module, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    for m in model.modules():
        if hasattr(m, "reset_parameters"):
            m.reset_parameters()
    return model


def _count(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def image(epochs: int, seeds: int, samples: int) -> list[dict[str, Any]]:
    task = load_task("shapes")
    xs, ys = task.train.tensors[0][:samples], task.train.tensors[1][:samples]
    teacher = pretrained("shapes_cnn")
    x = task.test.tensors[0][:1]
    shape = sk.distill.student(teacher, macs=0.25, example_inputs=(x,))
    t_macs, s_macs = profile_model(teacher, (x,)).total_macs, profile_model(shape, (x,)).total_macs
    methods: dict[str, Any] = {
        "no teacher": None,
        "response": sk.distill.Response(epochs=epochs, lr=3e-3),
        "feature": sk.distill.Feature(epochs=epochs, lr=3e-3),
        "relation": sk.distill.Relation(epochs=epochs, lr=3e-3),
    }
    rows = [
        {
            "task": "image",
            "tool": "slimkit",
            "method": "teacher",
            "params": _count(teacher),
            "macs": t_macs,
            "metric": {"top1": evaluate(teacher, task)["top1"]},
        }
    ]
    for name, cfg in methods.items():
        scores = []
        for seed in range(seeds):
            torch.manual_seed(seed)
            student = copy.deepcopy(shape)  # the pruned teacher's weights (slimkit's recovery)
            g = torch.Generator().manual_seed(seed)
            loader = torch.utils.data.DataLoader(
                torch.utils.data.TensorDataset(xs, ys), batch_size=64, shuffle=True, generator=g
            )
            if cfg is None:
                fit(student, loader, epochs=epochs, lr=3e-3, seed=seed, progress=False)
            else:
                student = sk.distill(student, teacher, cfg.replace(seed=seed), data=loader)
            scores.append(evaluate(student, task)["top1"])
        rows.append(
            {
                "task": "image",
                "tool": "slimkit",
                "method": name,
                "params": _count(shape),
                "macs": s_macs,
                "seeds": seeds,
                "epochs": epochs,
                "metric": {"top1": round(statistics.mean(scores), 4)},
                "top1_per_seed": [round(s, 4) for s in scores],
            }
        )
    return rows


def text(steps: int) -> list[dict[str, Any]]:
    task = load_task("pycode_cls")
    teacher = pretrained("pycode_classifier_deep")  # 4 layers: the student keeps 2
    x = task.test.tensors[0][:1]
    half = sk.distill.student(teacher, depth=0.5, example_inputs=(x,))
    loader = task.loader("train", 32, shuffle=True)
    distilled = sk.distill(
        half, teacher, sk.distill.Response(epochs=1, lr=1e-3), data=loader, max_steps=steps
    )
    plain = copy.deepcopy(half)
    fit(plain, loader, epochs=1, lr=1e-3, max_steps=steps, progress=False)
    models = {
        "teacher": teacher,
        "half depth, no teacher": plain,
        "half depth, response": distilled,
    }
    stats = ort_latency(models, x)
    rows = []
    t_top1 = evaluate(teacher, task)["top1"]
    for label, m in models.items():
        top1 = evaluate(m, task)["top1"]
        st = stats[label]
        rows.append(
            {
                "task": "text",
                "tool": "slimkit",
                "method": label,
                "params": _count(m),
                "steps": steps,
                "batch": 1,
                "latency_ms": round(st.median_ms, 4),
                "latency_spread_ms": [round(v, 4) for v in st.spread_ms],
                "metric": {"top1": round(top1, 4)},
                "top1_vs_teacher": round(top1 / t_top1, 4),
                "speedup_vs_teacher": round(stats["teacher"].median_ms / st.median_ms, 3),
            }
        )
    return rows


def gpt(steps: int) -> list[dict[str, Any]]:
    task = load_task("pycode_lm")
    teacher = pretrained("pycode_gpt")
    x = task.test.tensors[0][:2]
    half_params = _count(teacher) / 2
    student = None
    for macs in (0.9, 0.8, 0.7, 0.6, 0.5, 0.4):  # the widest student at or under half the params
        student = sk.distill.student(teacher, depth=0.75, macs=macs, example_inputs=(x,))
        if _count(student) <= half_params:
            break
    assert student is not None
    loader = task.loader("train", 32, shuffle=True)
    distilled = sk.distill(
        student, teacher, sk.distill.Response(epochs=1, lr=1e-3), data=loader, max_steps=steps
    )
    scratch = _reinit(copy.deepcopy(student), 0)
    fit(
        scratch,
        loader,
        epochs=1,
        lr=3e-3,
        max_steps=steps,
        warmup_steps=min(30, steps // 5),
        grad_clip=1.0,
        progress=False,
    )
    tokens = steps * 32 * task.test.tensors[0].shape[1]
    rows = []
    for label, m in (
        ("teacher", teacher),
        ("pruned + distilled", distilled),
        ("same architecture, from scratch", scratch),
    ):
        ppl = evaluate(m, task)["perplexity"]
        rows.append(
            {
                "task": "gpt",
                "tool": "slimkit",
                "method": label,
                "params": _count(m),
                "steps": steps,
                "tokens": tokens if m is not teacher else None,
                "metric": {"perplexity": round(ppl, 3)},
            }
        )
    return rows


def main() -> None:
    args = parser("distill", __doc__).parse_args()
    t0 = start()
    epochs, seeds, samples = (1, 1, 2000) if args.quick else (10, 3, 3000)
    steps = 30 if args.quick else 150
    settings = {"epochs": epochs, "seeds": seeds, "image_samples": samples, "steps": steps}
    rows: list[dict[str, Any]] = []
    parts = {"text": lambda: text(steps), "gpt": lambda: gpt(steps),
             "image": lambda: image(epochs, seeds, samples)}  # fmt: skip
    for part, fn in parts.items():
        t = time.perf_counter()
        rows += fn()
        print(f"{part}: {time.perf_counter() - t:.0f} s", file=sys.stderr)
        write_result("distill", args, rows, {**settings, "parts_done": part}, t0)  # so far
    shown = [{**r, **{f"metric.{k}": v for k, v in r["metric"].items()}} for r in rows]
    print_table(
        "distillation: image (top-1, mean of seeds)",
        [("method", "method"), ("params", "params"), ("MACs", "macs"), ("top-1", "metric.top1")],
        [r for r in shown if r["task"] == "image"],
    )
    print_table(
        "half-depth text classifier (ONNX Runtime, batch 1)",
        [
            ("model", "method"),
            ("params", "params"),
            ("top-1", "metric.top1"),
            ("x teacher top-1", "top1_vs_teacher"),
            ("ms", "latency_ms"),
            ("speed-up", "speedup_vs_teacher"),
        ],
        [r for r in shown if r["task"] == "text"],
    )
    print_table(
        "GPT at about half the parameters (held-out perplexity)",
        [
            ("model", "method"),
            ("params", "params"),
            ("tokens", "tokens"),
            ("perplexity", "metric.perplexity"),
        ],
        [r for r in shown if r["task"] == "gpt"],
    )
    path = write_result("distill", args, rows, settings, t0)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
