"""Deployment backends side by side: ONNX Runtime, OpenVINO, TVM, MNN, LiteRT, ExecuTorch (every
one installed), fp32 and int8, on ResNet-18, MobileNetV2 and the BERT-style encoder.

int8 is slimkit's PTQ (its QDQ graph) on ORT, OpenVINO and TVM, and the runtime's own quantizer on
the float model, calibrated on the same batches, where it has one: LiteRT's full-integer converter,
ExecuTorch's XNNPACK PT2E quantizer, MNN's offline quantization tool (method ``int8 native``; their
parity is checked against the float model, see ``deploy``).

Each row is one backend on one model and format, with its settings tuned by measurement
(``slimkit.export.backends.deploy``): latency at batch 1 (median of interleaved round medians),
the runtime's file size, SQNR against the float PyTorch model, parity against slimkit's PyTorch
model (its int8 simulation for QDQ int8; the float model for a native int8), and the roofline
bound of slimkit.analyze. Then the backend ``auto`` chose is re-measured against all the others
in fresh interleaved rounds: the ``slimkit`` row ``auto -> NAME`` must be within 15 % of the
fastest.

    python benchmarks/bench_backends.py            # trained shapes ResNet-18 / MobileNetV2, encoder
    python benchmarks/bench_backends.py --quick    # shapes_resnet18 only, fewer runs
    python benchmarks/bench_backends.py --models resnet18 mobilenetv2   # the 224x224 references
    python benchmarks/bench_backends.py --backends ort litert           # some runtimes only

results/backends.json is the first command with every runtime installed (the backends extra,
executorch, and litert: ``pip install 'slimkit[litert]' && pip install --no-deps tf-keras``);
633 s at load 3.2-3.5 on 2 shared cores.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # idle torch threads must not spin
sys.path.insert(0, str(Path(__file__).parent))

import torch  # noqa: E402

from _common import parser, print_table, start, write_result  # noqa: E402
from slimkit.analyze.latency import measure_latency  # noqa: E402
from slimkit.export.backends import BACKENDS, available_backends, deploy  # noqa: E402
from slimkit.zoo import PRETRAINED, create_model, example_inputs, load_task, pretrained  # noqa: E402

# the trained zoo CNNs (32x32 shapes, calibrated on their task) and the BERT-style encoder
# (random weights, seq 128); --models resnet18 mobilenetv2 runs the 224x224 reference CNNs
FULL = ["shapes_resnet18", "shapes_mobilenetv2", "bert_encoder"]
QUICK = ["shapes_resnet18"]
WITHIN = 1.15  # auto's choice on re-measurement vs the fastest


def load(name: str, batches: int) -> tuple[torch.nn.Module, torch.Tensor, list[torch.Tensor]]:
    """The model, one input at batch 1, and calibration batches (the task's train split for a
    trained model, random example inputs otherwise)."""
    if name in PRETRAINED:
        task = load_task(PRETRAINED.get(name).task)
        calib = task.calibration(n=batches * 8, batch_size=8)
        return pretrained(name).eval(), task.test.tensors[0][:1], calib
    calib = [example_inputs(name, batch=4)[0] for _ in range(batches)]
    return create_model(name).eval(), example_inputs(name, batch=1)[0], calib


def _say(prefix: str) -> Any:
    return lambda msg: print(f"  {prefix}: {msg}", flush=True)


def _settings(s: dict[str, Any] | None) -> str:
    return ", ".join(f"{k}={v}" for k, v in (s or {}).items())


def _db(v: float | None) -> float | None:
    return None if v is None else round(min(v, 999.0), 2)


def rows_for(name: str, fmt: str, rep: Any, params: int, tool_s: float) -> list[dict[str, Any]]:
    out = []
    for r in rep.results:
        if r.status == "missing" and BACKENDS[r.backend]().missing() and r.backend in (
            "litert", "executorch", "tensorrt"):  # fmt: skip
            continue  # not convertible here: listed once in the result file, not per model
        kind = f"{fmt} native" if r.quantizer else fmt
        row: dict[str, Any] = {
            "model": name, "tool": r.package, "method": f"{kind} on {r.backend}",
            "batch": rep.batch, "status": r.status, "params": params,
        }  # fmt: skip
        if fmt == "int8":
            row["quantizer"] = r.quantizer or "slimkit PTQ, QDQ graph"
            row["parity_against"] = "float model" if r.quantizer else "slimkit int8 simulation"
            row["parity_min_db"] = _db(rep.native_min_sqnr_db if r.quantizer else rep.min_sqnr_db)
        if r.status == "ok":
            row.update({
                "method": f"{kind} on {r.backend} ({_settings(r.settings)})",
                "latency_ms": round(r.latency_ms, 4),
                "latency_spread_ms": [round(v, 4) for v in r.spread_ms or []],
                "quartile_ms": None if r.quartile_ms is None else round(r.quartile_ms, 4),
                "size_mb": round(r.size_mb or 0.0, 3),
                "sqnr_db": _db(r.sqnr_float_db if fmt == "int8" else r.sqnr_db),
                "parity_db": _db(r.sqnr_db),
                "roofline_ms": None if r.roofline_ms is None else round(r.roofline_ms, 4),
                "x_roofline": None if r.of_roofline is None else round(r.of_roofline, 2),
                "tuning": r.tuning, "tool_s": round(r.seconds or 0.0, 1), "version": r.version,
            })  # fmt: skip
        else:
            row.update({"reason": r.reason, "op": r.op, "sqnr_db": _db(r.sqnr_db)})
        out.append(row)
    return out


def remeasure(name: str, fmt: str, rep: Any, x: torch.Tensor, runs: int) -> dict[str, Any]:
    """Fresh interleaved rounds over every backend that passed parity; the auto row."""
    feeds = [x.numpy()]
    stats = measure_latency({n: r.bind(feeds) for n, r in rep.runners.items()},
                            runs=runs, warmup=5, rounds=3, max_seconds=60.0)  # fmt: skip
    fastest = min(stats, key=lambda n: stats[n].quartile_ms)
    chosen = stats[rep.chosen]
    ratio = chosen.quartile_ms / stats[fastest].quartile_ms  # what auto compares
    median_ratio = chosen.median_ms / min(s.median_ms for s in stats.values())
    r = rep.result(rep.chosen)
    return {
        "model": name, "tool": "slimkit", "method": f"auto {fmt} -> {rep.chosen}",
        "batch": rep.batch, "latency_ms": round(chosen.median_ms, 4),
        "latency_spread_ms": [round(v, 4) for v in chosen.spread_ms],
        "size_mb": round(r.size_mb or 0.0, 3),
        "sqnr_db": _db(r.sqnr_float_db if fmt == "int8" else r.sqnr_db),
        "quartile_ms": round(chosen.quartile_ms, 4),
        "remeasured_ms": {n: round(s.median_ms, 4) for n, s in stats.items()},
        "remeasured_quartile_ms": {n: round(s.quartile_ms, 4) for n, s in stats.items()},
        "fastest_on_remeasure": fastest, "x_fastest": round(ratio, 3),
        "x_fastest_median": round(median_ratio, 3),
        "within_15pct": ratio <= WITHIN,
    }  # fmt: skip


def main() -> None:
    p = parser("backends", __doc__)
    p.add_argument("--models", nargs="*", default=None, help="zoo models (default: by mode)")
    p.add_argument("--tvm-trials", type=int, default=0, help="TVM MetaSchedule trials (0: none)")
    p.add_argument("--backends", nargs="*", default=None,
                   help="backends to compare (default: auto, every one installed)")  # fmt: skip
    args = p.parse_args()
    t0 = start(2)
    torch.manual_seed(0)
    models = args.models or (QUICK if args.quick else FULL)
    runs = 20 if args.quick else 50
    rows: list[dict[str, Any]] = []
    backends = args.backends or "auto"
    for name in models:
        model, x, calib = load(name, 4 if args.quick else 8)
        params = sum(q.numel() for q in model.parameters())
        for fmt in ("fp32", "int8"):
            ts = time.perf_counter()
            # int8: slimkit's PTQ (int8 everywhere, ORT's speed check off) on the same calibration
            # batches the runtimes' own quantizers get; SQNR against the float model for all
            rep = deploy(model, (x,), backend=backends, runs=runs, rounds=3, max_seconds=60.0,
                         name=name, options={"tvm": {"tune_trials": args.tvm_trials}},
                         int8=fmt == "int8", data=calib if fmt == "int8" else None,
                         progress=_say(f"{name} {fmt}"))  # fmt: skip
            rows += rows_for(name, fmt, rep, params, time.perf_counter() - ts)
            if rep.notes:
                print(f"  {name} {fmt}: {'; '.join(rep.notes)}", flush=True)
            if rep.chosen is not None:
                auto = remeasure(name, fmt, rep, x, runs)
                auto["tool_s"] = round(time.perf_counter() - ts, 1)
                rows.append(auto)
                fastest = auto["fastest_on_remeasure"]
                print(f"{name} {fmt}: auto -> {rep.chosen}, x{auto['x_fastest']} of the "
                      f"fastest ({fastest}) re-measured", flush=True)  # fmt: skip
            rep.runners.clear()
    settings = {
        "threads": "tuned per backend among 1 and the cores", "rounds": 3, "runs": runs,
        "batch": 1, "parity_db": {"fp32": 40, "int8": 25}, "tvm_trials": args.tvm_trials,
        "int8": "slimkit PTQ (mse calibration, bias correction), QDQ ONNX, on the trained models' "
        "task calibration batches (random inputs for the encoder); native int8 (LiteRT, "
        "ExecuTorch, MNN) on the same batches, parity against the float model at "
        "min(25 dB, slimkit int8's SQNR vs float - 3 dB)",
        "load_avg_end": list(os.getloadavg()),
    }  # fmt: skip
    path = write_result("backends", args, rows, settings, t0,
                        backends=available_backends())  # fmt: skip
    print_table(
        "Backends: batch 1, tuned settings, SQNR vs float PyTorch",
        [("model", "model"), ("tool", "tool"), ("method", "method"), ("status", "status"),
         ("ms", "latency_ms"), ("x roof", "x_roofline"), ("MB", "size_mb"),
         ("SQNR dB", "sqnr_db"), ("x fastest", "x_fastest")],
        rows,
    )  # fmt: skip
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
