"""Post-training int8 quantization: slimkit against ONNX Runtime's quantizer and NNCF, same run.

For each reference model (random weights, SQNR vs the float model on held-out random inputs):
ORT fp32 as the baseline; ORT ``quantize_static`` (QDQ, uint8 activations, int8 weights) over
per-tensor / per-channel x MinMax / Percentile x reduce_range off / on, reporting the best-SQNR
and the fastest of those; NNCF (ONNX backend) when installed; and slimkit's default PTQ.
Latency: ORT, 2 threads, batch 1, interleaved rounds. The CPU's features are recorded (VNNI or
not), since int8 speed and correctness depend on them.

    python benchmarks/bench_ptq.py --quick     # about a minute: 32x32 CNNs + encoder, fewer runs
    python benchmarks/bench_ptq.py             # ResNet-18, MobileNetV2 at 224 and the encoder
    python benchmarks/bench_ptq.py --w4a8      # 4-bit weights, int8 kernels: results/ptq_w4a8.json

W4A8 (``--w4a8``): 4-bit weight codes (per channel; depthwise convs keep 8) with uint8 activations
run on ORT's int8 kernels, the file storing the codes as INT4. Rows: round-to-nearest on the
weight-MSE clipping (RTN), AdaRound (learned rounding on an output-error-chosen scale; 50 and 200
iterations), and block reconstruction (``brecq``: rounding and biases learned block by block
against the float block, started from AdaRound's codes); ResNet-18 / MobileNetV2 by SQNR as run,
the trained zoo CNNs (digits_cnn, shapes_cnn, and shapes_mobilenetv2: a trained MobileNetV2) by
test top-1 and the SQNR of their logits as run; ORT's own ``quantize_static`` with ``QInt4``
weights as the peer. For the reference models a W8A8 row (int8 default, the same activation grid)
and, per slimkit row, the simulated SQNR with only the weights or only the activations quantized
(``quant.diagnose``) show how much of the error a 4-bit weight method can remove at all.
"""

from __future__ import annotations

import json
import logging
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))

from _common import parser, print_table, start, write_result  # noqa: E402
from slimkit.analyze.latency import measure_latency, ort_runner  # noqa: E402
from slimkit.core.machine import cpu_info  # noqa: E402
from slimkit.export.ort import ort_session, run_session  # noqa: E402
from slimkit.export.ort_dynamic import export_preprocessed  # noqa: E402
from slimkit.export.qdq import export_quantized  # noqa: E402
from slimkit.quant.diagnose import diagnose  # noqa: E402
from slimkit.quant.ptq import PTQ, quantize_ptq  # noqa: E402
from slimkit.testing.numerics import sqnr  # noqa: E402
from slimkit.zoo import create_model, example_inputs  # noqa: E402

FULL = ["resnet18", "mobilenetv2", "bert_encoder"]
QUICK = ["resnet18_cifar", "mobilenetv2_cifar", "bert_encoder"]
ROW_NAME = {"bert_encoder": "encoder"}  # the result-file names of BENCHMARKS.md / issue 5
N_CALIB, N_TEST = 32, 8


def ort_static(fp32: Path, out: Path, calib: list[np.ndarray], name: str, **kw: Any) -> float:
    """ORT quantize_static with the given options; returns the tool time in seconds."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )  # fmt: skip

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.it = iter([{name: x} for x in calib])

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.it, None)

    method = CalibrationMethod.Percentile if kw.pop("percentile") else CalibrationMethod.MinMax
    extra = {"CalibPercentile": 99.999} if method == CalibrationMethod.Percentile else {}
    t0 = time.perf_counter()
    quantize_static(
        str(fp32), str(out), Reader(), quant_format=QuantFormat.QDQ,
        activation_type=QuantType.QUInt8, weight_type=kw.pop("weight_type", QuantType.QInt8),
        calibrate_method=method, extra_options=extra, **kw,
    )  # fmt: skip
    return time.perf_counter() - t0


def nncf_quantize(fp32: Path, out: Path, calib: list[np.ndarray], name: str) -> float | None:
    try:
        import nncf
        import onnx
    except ImportError:
        return None
    nncf.set_log_level(logging.ERROR)
    t0 = time.perf_counter()
    model = onnx.load(str(fp32))
    q = nncf.quantize(model, nncf.Dataset([{name: x} for x in calib]), subset_size=len(calib))
    onnx.save(q, str(out))
    return time.perf_counter() - t0


def _reference(name: str, tmp: Path) -> tuple[Any, list[torch.Tensor], torch.Tensor, Any, Path]:
    """A reference model (random weights), its calibration and held-out inputs, the float
    outputs on those, and its fp32 ONNX after ORT's documented pre-processing (without it the
    exporter's shared initializers leave most convs in float: 4 of 20 on ResNet)."""
    model = create_model(name)
    calib_t = [example_inputs(name, batch=1, seed=i)[0] for i in range(N_CALIB)]
    test_t = torch.cat([example_inputs(name, batch=1, seed=1000 + i)[0] for i in range(N_TEST)])
    with torch.no_grad():
        ref = model(test_t)
    fp32 = export_preprocessed(model, tmp / f"{name}_fp32.onnx", example_inputs=(calib_t[0],))
    return model, calib_t, test_t, ref, fp32


def bench_model(name: str, quick: bool, tmp: Path) -> list[dict[str, Any]]:
    model, calib_t, test_t, ref, fp32 = _reference(name, tmp)
    calib = [x.numpy() for x in calib_t]
    variants: dict[str, dict[str, Any]] = {"fp32": {"tool": "onnxruntime", "path": fp32}}

    configs = [
        (pc, pct, rr) for pc in (False, True) for pct in (False, True) for rr in (False, True)
    ]
    if quick:
        configs = [(True, False, False), (False, True, False), (True, True, True)]
    for pc, pct, rr in configs:
        gran = "per-channel" if pc else "per-tensor"
        calib_name = "percentile" if pct else "minmax"
        label = f"static {gran}, {calib_name}{', reduce_range' if rr else ''}"
        path = tmp / f"{name}_ort_{int(pc)}{int(pct)}{int(rr)}.onnx"
        secs = ort_static(fp32, path, calib, "input", per_channel=pc, reduce_range=rr,
                          percentile=pct)  # fmt: skip
        variants[label] = {"tool": "onnxruntime", "path": path, "tool_s": secs}
    nncf_path = tmp / f"{name}_nncf.onnx"
    secs_nncf = nncf_quantize(fp32, nncf_path, calib, "input")
    if secs_nncf is not None:
        variants["nncf int8 (default)"] = {"tool": "nncf", "path": nncf_path, "tool_s": secs_nncf}

    t0 = time.perf_counter()
    q = quantize_ptq(model, PTQ(), data=calib_t)
    secs = time.perf_counter() - t0
    sk_path = tmp / f"{name}_slimkit.onnx"
    export_quantized(q, sk_path, example_inputs=(calib_t[0],))
    label = f"int8 static, {q.meta['slimkit']['config']['calibration']}, "
    label += f"{q.meta['slimkit']['weight_bits']}-bit weights"
    variants[label] = {"tool": "slimkit", "path": sk_path, "tool_s": secs}
    with torch.no_grad():
        sim_db = sqnr(ref, q(test_t))

    runners, x1 = {}, test_t[:1].numpy()
    for label, v in variants.items():
        sess = ort_session(v["path"])
        (out,) = run_session(sess, [test_t])
        v["sqnr_db"] = sqnr(ref, out)
        runners[label] = ort_runner(sess, [x1])
    runs = 20 if quick else 50
    stats = measure_latency(runners, runs=runs, warmup=5, rounds=3)
    rows = []
    for label, v in variants.items():
        s = stats[label]
        row = {
            "model": ROW_NAME.get(name, name), "tool": v["tool"], "method": label, "batch": 1,
            "latency_ms": round(s.median_ms, 3),
            "latency_spread_ms": [round(t, 3) for t in s.spread_ms],
            "sqnr_db": round(v["sqnr_db"], 2) if label != "fp32" else None,
            "size_mb": round(Path(v["path"]).stat().st_size / 1e6, 3),
        }  # fmt: skip
        if "tool_s" in v:
            row["tool_s"] = round(v["tool_s"], 2)
        if v["tool"] == "slimkit":
            row["sim_sqnr_db"] = round(sim_db, 2)
        rows.append(row)
    return rows


def _trained(name: str, tmp: Path) -> tuple[Any, torch.nn.Module, list[Any], torch.Tensor, Path]:
    """A trained zoo model, its task, 256 calibration images, one test input, its fp32 ONNX."""
    from slimkit.zoo import PRETRAINED, load_task, pretrained

    task = load_task(PRETRAINED.get(name).task)
    model = pretrained(name, progress=False)
    calib = task.calibration(n=N_CALIB * 8, batch_size=8)
    x1 = task.test.tensors[0][:1]
    fp32 = export_preprocessed(model, tmp / f"{name}_fp32.onnx", example_inputs=(x1,))
    return task, model, calib, x1, fp32


def bench_trained(name: str, tmp: Path) -> list[dict[str, Any]]:
    """Trained zoo model: top-1 on its held-out test split, float vs int8 as run in ORT."""
    from slimkit.export.ort import OrtModule
    from slimkit.zoo import evaluate

    task, model, calib_batches, x1, fp32 = _trained(name, tmp)
    calib = [b.numpy() for b in calib_batches]
    rows = [{"model": name, "tool": "onnxruntime", "method": "fp32", "batch": 1,
             "metric": {"top1": evaluate(OrtModule(ort_session(fp32)), task)["top1"]}}]  # fmt: skip
    for pc, pct in ((True, False), (False, True)):
        path = tmp / f"{name}_ort_{int(pc)}{int(pct)}.onnx"
        secs = ort_static(fp32, path, calib, "input", per_channel=pc, reduce_range=False,
                          percentile=pct)  # fmt: skip
        label = (
            f"static {'per-channel' if pc else 'per-tensor'}, {'percentile' if pct else 'minmax'}"
        )
        top1 = evaluate(OrtModule(ort_session(path)), task)["top1"]
        rows.append({"model": name, "tool": "onnxruntime", "method": label, "batch": 1,
                     "metric": {"top1": top1}, "tool_s": round(secs, 2)})  # fmt: skip
    t0 = time.perf_counter()
    q = quantize_ptq(model, PTQ(), data=calib_batches)
    secs = time.perf_counter() - t0
    path = tmp / f"{name}_slimkit.onnx"
    export_quantized(q, path, example_inputs=(x1,))
    top1 = evaluate(OrtModule(ort_session(path)), task)["top1"]
    rows.append({"model": name, "tool": "slimkit", "method": "int8 static, mse", "batch": 1,
                 "metric": {"top1": top1}, "tool_s": round(secs, 2)})  # fmt: skip
    return rows


W8_LABEL = "W8A8 (8-bit weights, same activations; reference)"
W4A8 = {
    "W4A8 round-to-nearest": {},
    "W4A8 AdaRound": {"adaround": 50},
    "W4A8 AdaRound, 200 iterations": {"adaround": 200},
    "W4A8 block reconstruction": {"adaround": 50, "brecq": 100},
}


def _w4a8_variants(
    model: torch.nn.Module, calib: list[Any], x1: torch.Tensor, tmp: Path, name: str,
    table: dict[str, dict[str, Any]] = W4A8, **pinned: Any,
) -> dict[str, dict[str, Any]]:  # fmt: skip
    """slimkit's variants (``table``: label -> PTQ options, 4-bit weights unless they say),
    exported; label -> {path, tool_s, q}. ``pinned``: PTQ options every variant shares (the
    trained models pin the float prefix and the speed check off, so that timing noise on a busy
    machine cannot hand back a float model or change which layers are int8 between variants)."""
    out = {}
    for label, opts in table.items():
        t0 = time.perf_counter()
        q = quantize_ptq(model, PTQ(**{"weight_bits": 4, **opts}, **pinned), data=calib)
        secs = time.perf_counter() - t0
        path = tmp / f"{name}_{len(out)}.onnx"
        export_quantized(q, path, example_inputs=(x1,))
        out[label] = {"tool": "slimkit", "path": path, "tool_s": secs, "q": q}
        print(f"  {name}: {label} in {secs:.1f} s", flush=True)
    return out


def _ort_int4(fp32: Path, tmp: Path, calib: list[np.ndarray], name: str) -> dict[str, Any]:
    """ORT's quantize_static with 4-bit weights (per channel, MinMax), or why it could not."""
    from onnxruntime.quantization import QuantType

    path = tmp / f"{name}_ort_w4.onnx"
    try:
        secs = ort_static(fp32, path, calib, "input", per_channel=True, reduce_range=False,
                          percentile=False, weight_type=QuantType.QInt4)  # fmt: skip
    except Exception as e:  # noqa: BLE001 - a peer's failure is a result, reported by name
        return {"tool": "onnxruntime", "error": f"{type(e).__name__}: {e}"[:200]}
    return {"tool": "onnxruntime", "path": path, "tool_s": secs}


def bench_w4a8(name: str, tmp: Path) -> list[dict[str, Any]]:
    """A reference model with random weights: SQNR as run in ORT, latency, size."""
    model, calib_t, test_t, ref, fp32 = _reference(name, tmp)
    variants = {"fp32": {"tool": "onnxruntime", "path": fp32}}
    variants["ORT static, QInt4 weights, per-channel minmax"] = _ort_int4(
        fp32, tmp, [x.numpy() for x in calib_t], name
    )
    # and the same activations with 8-bit weights: what no 4-bit weight method can beat
    table: dict[str, dict[str, Any]] = {**W4A8, W8_LABEL: {"weight_bits": "auto"}}
    variants.update(_w4a8_variants(model, calib_t, calib_t[0], tmp, name, table))
    runners, x1 = {}, test_t[:1].numpy()
    for label, v in variants.items():
        if "error" in v:
            continue
        sess = ort_session(v["path"])
        (out,) = run_session(sess, [test_t])
        v["sqnr_db"] = sqnr(ref, out)
        if "q" in v:  # simulated, held-out inputs: as quantized, and split into its halves
            d = diagnose(v["q"], data=[test_t], reference=model, per_layer=False)
            v["sim_sqnr_db"] = d.full_db
            v["sim_weights_only_sqnr_db"] = d.weights_only_db
            v["sim_acts_only_sqnr_db"] = d.activations_only_db
        runners[label] = ort_runner(sess, [x1])
    stats = measure_latency(runners, runs=50, warmup=5, rounds=3)
    rows = []
    for label, v in variants.items():
        row: dict[str, Any] = {"model": name, "tool": v["tool"], "method": label, "batch": 1}
        if "error" in v:
            row["error"] = v["error"]
        else:
            row.update({
                "latency_ms": round(stats[label].median_ms, 3),
                "sqnr_db": round(v["sqnr_db"], 2) if label != "fp32" else None,
                "size_mb": round(Path(v["path"]).stat().st_size / 1e6, 3),
            })  # fmt: skip
        for k in ("tool_s", "sim_sqnr_db", "sim_weights_only_sqnr_db", "sim_acts_only_sqnr_db"):
            if k in v:
                row[k] = round(v[k], 2)
        if "q" in v:  # which layers stayed float (timed per process: the same in every row)
            row["float_prefix_layers"] = v["q"].meta["slimkit"]["float_prefix_layers"]
        if "q" in v and "brecq" in v["q"].meta["slimkit"]:  # incl. each block's float-layer error
            row["brecq"] = v["q"].meta["slimkit"]["brecq"]
            row["brecq_blocks"] = [
                {k: b[k] for k in ("block", "loss_nearest", "loss", "loss_float")}
                for b in v["q"].meta["slimkit"]["brecq_blocks"]
            ]
        rtn = variants["W4A8 round-to-nearest"].get("sqnr_db")
        if label.startswith("W4A8") and label != "W4A8 round-to-nearest" and rtn is not None:
            row["gain_over_rtn_db"] = round(v["sqnr_db"] - rtn, 2)
        rows.append(row)
    return rows


def bench_w4a8_trained(name: str, tmp: Path) -> list[dict[str, Any]]:
    """A trained zoo CNN: test top-1 and the logits' SQNR as run in ORT, float against W4A8."""
    from slimkit.export.ort import OrtModule
    from slimkit.zoo import evaluate

    task, model, calib, x1, fp32 = _trained(name, tmp)
    variants = {"fp32": {"tool": "onnxruntime", "path": fp32}}
    variants.update(
        _w4a8_variants(model, calib, x1, tmp, name, float_prefix=False, speed_check=False)
    )
    rows = []
    xs = task.test.tensors[0][:512]  # SQNR of the logits against fp32, as run
    (ref,) = run_session(ort_session(fp32), [xs])
    for label, v in variants.items():
        sess = ort_session(v["path"])
        top1 = evaluate(OrtModule(sess), task)["top1"]
        size = round(Path(v["path"]).stat().st_size / 1e6, 4)
        row = {"model": name, "tool": v["tool"], "method": label, "batch": 1,
               "metric": {"top1": top1}, "size_mb": size}  # fmt: skip
        if label != "fp32":
            (out,) = run_session(sess, [xs])
            v["sqnr_db"] = sqnr(ref, out)
            row["sqnr_db"] = round(v["sqnr_db"], 2)
            rtn = variants["W4A8 round-to-nearest"].get("sqnr_db")
            if label != "W4A8 round-to-nearest" and rtn is not None:
                row["gain_over_rtn_db"] = round(v["sqnr_db"] - rtn, 2)
        if "tool_s" in v:
            row["tool_s"] = round(v["tool_s"], 2)
        rows.append(row)
    return rows


def main_w4a8(args: Any, t0: float) -> None:
    """The W4A8 rows; ``--models a,b`` reruns only those and keeps the file's other rows."""
    reference = QUICK[:2] if args.quick else FULL[:2]
    trained = ["digits_cnn", "shapes_cnn", "shapes_mobilenetv2"]  # the last: a trained MobileNetV2
    chosen = args.models.split(",") if args.models else reference + trained
    path = (
        args.json
        or Path(__file__).parent / "results" / f"ptq_w4a8{'_quick' if args.quick else ''}.json"
    )
    kept: list[dict[str, Any]] = []
    if args.models and Path(path).exists():
        kept = [r for r in json.loads(Path(path).read_text())["rows"] if r["model"] not in chosen]
    rows: list[dict[str, Any]] = []
    settings = {"calibration_samples": N_CALIB, "test_samples": N_TEST, "threads": 2,
                "vnni": cpu_info()["vnni"], "variants": W4A8,
                "trained_models": "float prefix and speed check off (all-int8 W4A8)",
                "rerun": chosen if args.models else "all"}  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        for name in chosen:
            bench = bench_w4a8_trained if name in trained else bench_w4a8
            rows += bench(name, Path(tmp))
            write_result("ptq_w4a8", args, kept + rows, settings, t0)  # partial results as it goes
    rows = kept + rows
    for r in rows:
        r["top1"] = r.get("metric", {}).get("top1")
    print_table("W4A8 on ONNX Runtime, batch 1", [("model", "model"), ("method", "method"),
                ("tool", "tool"), ("ms", "latency_ms"), ("SQNR dB", "sqnr_db"), ("top-1", "top1"),
                ("gain dB", "gain_over_rtn_db"), ("W-only dB", "sim_weights_only_sqnr_db"),
                ("A-only dB", "sim_acts_only_sqnr_db"), ("MB", "size_mb"), ("tool s", "tool_s")],
                rows)  # fmt: skip
    print(f"wrote {path}")


def summarise(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per model: slimkit vs the best-SQNR peer and vs the fastest peer (ratios and dB deltas)."""
    out = []
    for model in dict.fromkeys(r["model"] for r in rows if "latency_ms" in r):
        rs = [r for r in rows if r["model"] == model]
        sk = next(r for r in rs if r["tool"] == "slimkit")
        peers = [r for r in rs if r["tool"] != "slimkit" and r["sqnr_db"] is not None]
        best = max(peers, key=lambda r: r["sqnr_db"])
        fastest = min(peers, key=lambda r: r["latency_ms"])
        fp32 = next(r for r in rs if r["method"] == "fp32")
        ort_tools = [r["tool_s"] for r in peers if r["tool"] == "onnxruntime"]
        out.append({
            "model": model,
            "sqnr_gain_db": round(sk["sqnr_db"] - best["sqnr_db"], 2),
            "best_peer": f"{best['tool']}: {best['method']}",
            "latency_vs_fastest": round(sk["latency_ms"] / fastest["latency_ms"], 3),
            "fastest_peer": f"{fastest['tool']}: {fastest['method']}",
            "speedup_vs_fp32": round(fp32["latency_ms"] / sk["latency_ms"], 3),
            "tool_time_vs_ort": round(sk["tool_s"] / float(np.median(ort_tools)), 3),
        })  # fmt: skip
    return out


def warm_up(tmp: Path) -> None:
    """One untimed run of each tool on a tiny model, so that no tool's tool time includes its
    one-time costs (lazy imports, first graph capture, kernel selection)."""
    name = "cnn_bn"
    model = create_model(name)
    calib_t = [example_inputs(name, batch=1, seed=i)[0] for i in range(2)]
    fp32 = export_preprocessed(model, tmp / "warm_fp32.onnx", example_inputs=(calib_t[0],))
    ort_static(fp32, tmp / "warm_ort.onnx", [x.numpy() for x in calib_t], "input",
               per_channel=True, reduce_range=False, percentile=False)  # fmt: skip
    nncf_quantize(fp32, tmp / "warm_nncf.onnx", [x.numpy() for x in calib_t], "input")
    quantize_ptq(model, PTQ(), data=calib_t)


def main() -> None:
    p = parser("ptq", __doc__)
    p.add_argument("--w4a8", action="store_true", help="the W4A8 rows (results/ptq_w4a8.json)")
    p.add_argument("--models", default="", help="with --w4a8: rerun only these (comma-separated)")
    args = p.parse_args()
    t0 = start()
    if args.w4a8:
        main_w4a8(args, t0)
        return
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        warm_up(Path(tmp))
        for name in QUICK if args.quick else FULL:
            rows += bench_model(name, args.quick, Path(tmp))
            print(f"done {name}", flush=True)
        trained = [bench_trained(n, Path(tmp)) for n in ("digits_cnn", "shapes_cnn")]
        accuracy = [r for rs in trained for r in rs]
    summary = summarise(rows)
    settings = {"calibration_samples": N_CALIB, "test_samples": N_TEST, "threads": 2,
                "vnni": cpu_info()["vnni"]}  # fmt: skip
    path = write_result("ptq", args, rows + accuracy, settings, t0, summary=summary)
    print_table("int8 PTQ on ONNX Runtime, batch 1 (SQNR vs float, random weights)",
                [("model", "model"), ("method", "method"), ("tool", "tool"), ("ms", "latency_ms"),
                 ("SQNR dB", "sqnr_db"), ("tool s", "tool_s")], rows)  # fmt: skip
    print_table("slimkit vs peers", [("model", "model"), ("SQNR gain dB", "sqnr_gain_db"),
                ("latency / fastest", "latency_vs_fastest"), ("x fp32", "speedup_vs_fp32"),
                ("tool time / ORT", "tool_time_vs_ort")], summary)  # fmt: skip
    for r in accuracy:
        r["top1"] = r["metric"]["top1"]
    print_table("trained zoo models: test top-1 as run in ONNX Runtime", [("model", "model"),
                ("tool", "tool"), ("method", "method"), ("top-1", "top1"), ("tool s", "tool_s")],
                accuracy)  # fmt: skip
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
