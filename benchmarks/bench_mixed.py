"""Mixed precision under a size budget on slimkit's trained zoo CNNs, as run in ONNX Runtime:
fp32, uniform W8A8, uniform W4A8 (4-bit codes packed two per byte, int8 kernels), and
``quant.mixed`` at the file size of the uniform W4A8 model (formats fp32/fp16/int8/int4, and
with int2 allowed) and at a size halfway to W8A8. Sizes are the exported files' bytes; top-1 is
the test split run in ORT; latency is ORT at batch 1, all models timed in the same rounds.

    .venv/bin/python benchmarks/bench_mixed.py            # digits_cnn and shapes_cnn
    .venv/bin/python benchmarks/bench_mixed.py --quick    # digits_cnn
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))

import slimkit as sk  # noqa: E402
from _common import ort_latency, parser, print_table, start, write_result  # noqa: E402
from slimkit.export.ort import ort_session  # noqa: E402
from slimkit.quant.mixed import Mixed  # noqa: E402
from slimkit.zoo import load_task, pretrained  # noqa: E402

TASKS = {"digits_cnn": "digits", "shapes_cnn": "shapes"}


def ort_top1(model: torch.nn.Module, task: Any, x: torch.Tensor) -> tuple[float, int]:
    """Test top-1 of ``model`` as ONNX Runtime runs its export, and the file's bytes."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "m.onnx"
        sk.export_onnx(model, path, example_inputs=(x,))
        sess = ort_session(path)
        xs, ys = task.test.tensors
        name = sess.get_inputs()[0].name
        preds = [sess.run(None, {name: xs[i : i + 256].numpy()})[0].argmax(1)
                 for i in range(0, len(xs), 256)]  # fmt: skip
        return float((np.concatenate(preds) == ys.numpy()).mean()), path.stat().st_size


def run(name: str, runs: int, partial: Any) -> list[dict[str, Any]]:
    model = pretrained(name)
    task = load_task(TASKS[name])
    calib = task.calibration(256)
    x = task.test.tensors[0][:1]
    rows: list[dict[str, Any]] = []
    models: dict[str, torch.nn.Module] = {}

    def add(label: str, m: torch.nn.Module, seconds: float, **extra: Any) -> None:
        top1, size = ort_top1(m, task, x)
        models[label] = m
        rows.append({"model": name, "tool": "slimkit", "method": label, "batch": 1,
                     "metric": {"top1": round(top1, 4)}, "size_mb": round(size / 1e6, 5),
                     "tool_s": round(seconds, 2), **extra})  # fmt: skip
        partial(rows)

    add("fp32", model, 0.0)
    uniform = {"int8 (W8A8)": ("auto", 0), "int4 (W4A8, packed)": (4, 0),
               "int4 (W4A8, packed), AdaRound": (4, 50)}  # fmt: skip
    for label, (bits, ada) in uniform.items():
        t = time.perf_counter()
        cfg = sk.quant.PTQ(weight_bits=bits, speed_check=False, float_prefix=False, adaround=ada)
        add(label, sk.quantize(model, cfg, data=calib), time.perf_counter() - t)
    int8_mb, int4_mb = rows[1]["size_mb"], rows[2]["size_mb"]
    budgets = [
        ("mixed @ int4 size", Mixed(max_size_mb=int4_mb)),
        ("mixed +int2 @ int4 size",
         Mixed(max_size_mb=int4_mb, formats=["fp32", "fp16", "int8", "int4", "int2"])),
        ("mixed +int2, AdaRound @ int4 size",
         Mixed(max_size_mb=int4_mb, formats=["fp32", "fp16", "int8", "int4", "int2"], adaround=50)),
        ("mixed @ midway int4-int8", Mixed(max_size_mb=round((int4_mb + int8_mb) / 2, 5))),
    ]  # fmt: skip
    for label, cfg in budgets:
        t = time.perf_counter()
        q = sk.quantize(model, cfg, data=calib)
        rec = q.meta["slimkit"]
        shares = {f: d["param_share"] for f, d in rec["bit_widths"].items()}
        add(label, q, time.perf_counter() - t, budget_mb=cfg.max_size_mb,
            within_budget=rec["within_budget"], avg_bits=rec["avg_bits"], plan=rec["plan"],
            param_share=shares)  # fmt: skip
        print(f"{name} {label}:\n{rec['distribution']}")
    lat = ort_latency(models, x, runs=runs)
    float_top1 = rows[0]["metric"]["top1"]
    for r in rows:
        st = lat[r["method"]]
        r["latency_ms"] = round(st.median_ms, 4)
        r["latency_spread_ms"] = [round(v, 4) for v in st.spread_ms]
        r["top1_drop"] = round(float_top1 - r["metric"]["top1"], 4)
    return rows


def main() -> None:
    args = parser("mixed", __doc__).parse_args()
    t0 = start()
    names = ["digits_cnn"] if args.quick else ["digits_cnn", "shapes_cnn"]
    runs = 20 if args.quick else 50
    done: list[dict[str, Any]] = []
    settings = {"models": names, "calibration_samples": 256, "latency_runs": runs}

    def partial(rows: list[dict[str, Any]]) -> None:
        write_result("mixed", args, done + rows, {**settings, "partial": True}, t0)

    for name in names:
        done += run(name, runs, partial)
        write_result("mixed", args, done, {**settings, "partial": name != names[-1]}, t0)
    shown = [{**r, "top1": r["metric"]["top1"]} for r in done]
    print_table("Mixed precision under a size budget (test top-1 as run in ONNX Runtime, batch 1)",
                [("model", "model"), ("method", "method"), ("size MB", "size_mb"),
                 ("budget MB", "budget_mb"), ("bits/weight", "avg_bits"), ("top-1", "top1"),
                 ("drop", "top1_drop"), ("ms", "latency_ms"), ("tool s", "tool_s")],
                shown)  # fmt: skip
    path = write_result("mixed", args, done, settings, t0)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
