"""Does the roofline rank speed-ups correctly? Predicted vs measured, on ONNX Runtime at batch 1.

Variants: models x fp32 / int8 x channel pruning realised as narrower models (``width_mult`` /
``width`` / ``d_model``). Int8 is ORT ``quantize_static``: QDQ, uint8 activations, int8 per-channel
weights, MinMax on 8 calibration samples (enough for a latency measurement). Every variant of a
model is timed in the same interleaved rounds. Each variant's speed-up is against that model's
fp32 unpruned variant; the headline is the Spearman rank correlation of predicted against measured
speed-up over all variants (target >= 0.8).

Two predictions per variant: ``predicted_speedup`` from the roofline of the variant as built, and
``predicted_from_base``: ``predict(profile_of_the_base_model, hw, [PruneChannels(r), Int8()])``,
made before the change exists.

    python benchmarks/bench_roofline.py            # 4 models x 3 widths x fp32/int8 = 24 variants
    python benchmarks/bench_roofline.py --quick    # 4 models x 2 widths x fp32/int8 = 16 variants
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))

import torch  # noqa: E402
from scipy.stats import spearmanr  # noqa: E402

from _common import parser, print_table, start, write_result  # noqa: E402
from slimkit.analyze.hardware import load_profile  # noqa: E402
from slimkit.analyze.latency import measure_latency, ort_runner  # noqa: E402
from slimkit.analyze.layer_time import measure_op_overhead  # noqa: E402
from slimkit.analyze.profile import profile_model  # noqa: E402
from slimkit.analyze.roofline import Int8, PruneChannels, predict, roofline  # noqa: E402
from slimkit.export.onnx import export_onnx  # noqa: E402
from slimkit.export.ort import ort_session  # noqa: E402
from slimkit.zoo import create_model, example_inputs  # noqa: E402

BERT_QUICK = {"n_layer": 2, "seq_len": 64}


def model_kwargs(name: str, keep: float, quick: bool) -> dict[str, Any]:
    """Options that build ``name`` with ``keep`` of its channels."""
    if name in ("resnet18_cifar", "mobilenetv2_cifar"):
        return {"width_mult": keep}
    if name == "small_cnn":
        return {"width": round(16 * keep)}
    if name == "bert_encoder":  # d_model stays divisible by the 4 heads
        return {**(BERT_QUICK if quick else {}), "d_model": int(256 * keep) // 4 * 4,
                "d_ff": int(1024 * keep), "dropout": 0.0}  # fmt: skip
    raise KeyError(name)


def quantize(fp32: Path, dest: Path, name: str, kwargs: dict[str, Any]) -> None:
    """ORT static QDQ: uint8 activations, int8 per-channel weights, MinMax, 8 samples."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    pre = dest.with_suffix(".pre.onnx")  # folds the Identity-shared initializers the exporter
    quant_pre_process(str(fp32), str(pre), skip_symbolic_shape=True)  # writes, so QDQ fuses
    in_name = ort_session(fp32).get_inputs()[0].name
    samples = [example_inputs(name, 1, seed=s, **kwargs)[0].numpy() for s in range(8)]

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.it = iter({in_name: x} for x in samples)

        def get_next(self) -> dict[str, Any] | None:
            return next(self.it, None)

    quantize_static(
        str(pre), str(dest), Reader(), quant_format=QuantFormat.QDQ,
        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, per_channel=True,
        calibrate_method=CalibrationMethod.MinMax,
    )  # fmt: skip


def run_model(name: str, keeps: list[float], hw: Any, overhead_us: float, args: Any,
              runs: int) -> list[dict[str, Any]]:  # fmt: skip
    variants: dict[str, dict[str, Any]] = {}
    runners = {}
    with tempfile.TemporaryDirectory() as tmp:
        base_prof = None
        for keep in keeps:
            kw = model_kwargs(name, keep, args.quick)
            model = create_model(name, **kw)
            x = example_inputs(name, 1, **kw)
            prof = profile_model(model, x)
            base_prof = base_prof or prof
            fp32 = Path(tmp) / f"{keep}.onnx"
            export_onnx(model, fp32, example_inputs=x)
            int8 = Path(tmp) / f"{keep}_int8.onnx"
            quantize(fp32, int8, name, kw)
            before = [PruneChannels(1 - keep)] if keep < 1 else []
            for dtype, path in (("fp32", fp32), ("int8", int8)):
                changes = before + ([Int8()] if dtype == "int8" else [])
                pred = (roofline(prof, hw, overhead_us=overhead_us).total_s if dtype == "fp32"
                        else predict(prof, hw, Int8(), overhead_us=overhead_us).new_s)  # fmt: skip
                from_base = predict(base_prof, hw, changes, overhead_us=overhead_us).speedup
                label = f"{dtype} width {keep:g}"
                variants[label] = {
                    "keep": keep, "pred": pred, "from_base": from_base, "macs": prof.total_macs,
                    "params": prof.total_params,
                }  # fmt: skip
                runners[label] = ort_runner(ort_session(path), x)
        stats = measure_latency(runners, runs=runs, warmup=5, rounds=3)
    base = "fp32 width 1"
    rows = []
    for label, v in variants.items():
        s = stats[label]
        rows.append({
            "model": name, "tool": "slimkit", "method": label, "batch": 1,
            "latency_ms": round(s.median_ms, 4),
            "latency_spread_ms": [round(t, 4) for t in s.spread_ms],
            "predicted_ms": round(v["pred"] * 1e3, 4),
            "predicted_speedup": round(variants[base]["pred"] / v["pred"], 3),
            "measured_speedup": round(stats[base].median_ms / s.median_ms, 3),
            "predicted_from_base": round(v["from_base"], 3),
            "macs": v["macs"], "params": v["params"],
        })  # fmt: skip
    return rows


def main() -> None:
    args = parser("roofline", __doc__).parse_args()
    t0 = start()
    torch.manual_seed(0)
    models = ["resnet18_cifar", "mobilenetv2_cifar", "bert_encoder", "small_cnn"]
    keeps = [1.0, 0.5] if args.quick else [1.0, 0.75, 0.5]
    runs = 10 if args.quick else 50
    hw = load_profile("this")
    overhead_us = measure_op_overhead(runs=30 if args.quick else 100)
    print(f"hardware: {hw.source}; per-kernel overhead {overhead_us:.2f} us", flush=True)
    rows = []
    for name in models:
        rows += run_model(name, keeps, hw, overhead_us, args, runs)
        print(f"{name}: done", flush=True)
    pred = [r["predicted_speedup"] for r in rows]
    meas = [r["measured_speedup"] for r in rows]
    rho = float(spearmanr(pred, meas).statistic)
    rho_base = float(spearmanr([r["predicted_from_base"] for r in rows], meas).statistic)
    settings = {
        "threads": 2, "rounds": 3, "runs": runs, "warmup": 5, "batch": 1, "keeps": keeps,
        "hardware": hw.to_dict(), "op_overhead_us": overhead_us,
        "int8": "ORT quantize_static QDQ, uint8 activations, int8 per-channel weights, MinMax, "
                "8 calibration samples", "bert_quick": BERT_QUICK if args.quick else None,
    }  # fmt: skip
    path = write_result("roofline", args, rows, settings, t0, spearman=round(rho, 4),
                        spearman_from_base=round(rho_base, 4))  # fmt: skip
    print_table(
        "roofline: predicted vs measured speed-up (ORT, batch 1)",
        [("model", "model"), ("variant", "method"), ("ms", "latency_ms"),
         ("pred ms", "predicted_ms"), ("pred x", "predicted_speedup"),
         ("meas x", "measured_speedup"), ("pred x (before)", "predicted_from_base")],
        rows,
    )  # fmt: skip
    print(f"Spearman (predicted vs measured speed-up, {len(rows)} variants): {rho:.3f}; "
          f"predicted before the change: {rho_base:.3f}")  # fmt: skip
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
