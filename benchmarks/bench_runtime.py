"""Runtime baseline: PyTorch eager vs ONNX Runtime (fp32) on the reference models.

Every later benchmark compares compressed models against these two. Protocol of BENCHMARKS.md:
2 threads, interleaved rounds (eager, ORT, eager, ORT, ...), median of round medians with spread.

    python benchmarks/bench_runtime.py            # full: 3 models x batch 1 and the larger batch
    python benchmarks/bench_runtime.py --quick    # about a minute
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from _common import parser, print_table, start, write_result  # noqa: E402
from slimkit.analyze.latency import eager_vs_ort  # noqa: E402
from slimkit.zoo import create_model, example_inputs  # noqa: E402

# model -> the larger batch of BENCHMARKS.md (encoder: 8, CNNs: 16)
FULL = {"resnet18": 16, "mobilenetv2": 16, "bert_encoder": 8}
QUICK = {"resnet18_cifar": 16, "mobilenetv2_cifar": 16, "bert_encoder": 8}


def main() -> None:
    args = parser("runtime", __doc__).parse_args()
    t0 = start()
    models = QUICK if args.quick else FULL
    runs_b1, runs_bn = (20, 10) if args.quick else (50, 20)
    rows = []
    for name, big in models.items():
        model = create_model(name)
        params = sum(p.numel() for p in model.parameters())
        for batch, runs in ((1, runs_b1), (big, runs_bn)):
            inputs = example_inputs(name, batch=batch)
            stats = eager_vs_ort(model, inputs, runs=runs, warmup=5, rounds=3)
            eager = stats["pytorch eager"].median_ms
            for runtime, s in stats.items():
                rows.append({
                    "model": name,
                    "tool": "torch" if runtime == "pytorch eager" else "onnxruntime",
                    "method": f"{runtime} fp32",
                    "batch": batch,
                    "latency_ms": round(s.median_ms, 3),
                    "latency_spread_ms": [round(v, 3) for v in s.spread_ms],
                    "speedup_vs_eager": round(eager / s.median_ms, 3),
                    "params": params,
                })  # fmt: skip
            print(f"{name} batch {batch}: eager {eager:.2f} ms, ORT "
                  f"{stats['onnxruntime'].median_ms:.2f} ms", flush=True)  # fmt: skip
    settings = {"threads": 2, "rounds": 3, "runs_b1": runs_b1, "runs_bn": runs_bn, "warmup": 5}
    path = write_result("runtime", args, rows, settings, t0)
    print_table(
        "PyTorch eager vs ONNX Runtime, fp32",
        [("model", "model"), ("runtime", "method"), ("batch", "batch"), ("ms", "latency_ms"),
         ("x eager", "speedup_vs_eager")],
        rows,
    )  # fmt: skip
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
