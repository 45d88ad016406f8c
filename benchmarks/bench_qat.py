"""Quantization-aware training at low weight bits on slimkit's trained zoo CNNs, as run in ONNX
Runtime: float, the best PTQ at the same bits (AdaRound, bias correction), the QAT start
(MSE-clipped per-channel steps) and QAT; the share of the best PTQ's loss that QAT won back.

    .venv/bin/python benchmarks/bench_qat.py            # full: W3A8 and W4A8, 3 epochs
    .venv/bin/python benchmarks/bench_qat.py --quick    # digits_cnn, W3A8, 1 epoch
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
from _common import parser, print_table, start, write_result  # noqa: E402
from slimkit.export.ort import ort_session  # noqa: E402
from slimkit.export.qdq import export_quantized  # noqa: E402
from slimkit.zoo import evaluate, load_task, pretrained  # noqa: E402


def ort_top1(model: torch.nn.Module, task: Any, x: torch.Tensor) -> tuple[float, float]:
    """Test top-1 of the int8 model as ONNX Runtime runs it, and its file size in MB."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "q.onnx"
        export_quantized(model, path, example_inputs=(x,))
        sess = ort_session(path)
        xs, ys = task.test.tensors
        name = sess.get_inputs()[0].name
        preds = [sess.run(None, {name: xs[i : i + 256].numpy()})[0].argmax(1)
                 for i in range(0, len(xs), 256)]  # fmt: skip
        return float((np.concatenate(preds) == ys.numpy()).mean()), path.stat().st_size / 1e6


def run(name: str, bits: int, epochs: int) -> list[dict[str, Any]]:
    model = pretrained(name)
    task = load_task(pretrained_task[name])
    x = task.test.tensors[0][:1]

    def val(m: torch.nn.Module) -> float:
        return evaluate(m, task, "val")["top1"]

    t = time.perf_counter()
    cfg = sk.quant.QAT(weight_bits=bits, epochs=epochs, lr=1e-3)
    q = sk.quantize(model, cfg, data=task.loader("train", 64, shuffle=True), val_fn=val)
    seconds = time.perf_counter() - t
    rec = q.meta["slimkit"]["qat"]
    top1, size = ort_top1(q, task, x)
    float_top1 = evaluate(model, task)["top1"]
    # the best PTQ at the same bits: learned rounding (AdaRound) and bias correction
    ptq = sk.quant.PTQ(weight_bits=bits, adaround=50, speed_check=False, float_prefix=False)
    best = sk.quantize(model, ptq, data=task.calibration(256))
    ptq_top1, _ = ort_top1(best, task, x)
    lost = float_top1 - ptq_top1
    return [{"model": name, "tool": "slimkit", "method": f"W{bits}A8 QAT, {epochs} epochs",
             "metric": {"top1": round(top1, 4), "val_top1": rec["val_qat"]},
             "val_float": rec["val_float"], "val_ptq": rec["val_ptq"],
             "recovered": rec.get("recovered"), "test_top1_float": float_top1,
             "test_top1_best_ptq": round(ptq_top1, 4),
             "recovered_vs_best_ptq": round((top1 - ptq_top1) / lost, 3) if lost > 0 else None,
             "sqnr_db_ptq": rec["sqnr_db_ptq"], "sqnr_db": rec["sqnr_db_qat"],
             "size_mb": round(size, 4), "tool_s": round(seconds, 1)}]  # fmt: skip


pretrained_task = {"digits_cnn": "digits", "shapes_cnn": "shapes"}


def main() -> None:
    args = parser("qat", __doc__).parse_args()
    t0 = start()
    cases = [("digits_cnn", 3, 1)] if args.quick else [
        (m, b, 3) for m in ("digits_cnn", "shapes_cnn") for b in (3, 4)]  # fmt: skip
    rows = [r for m, b, e in cases for r in run(m, b, e)]
    shown = [{**r, "top1": r["metric"]["top1"], "val_qat": r["metric"]["val_top1"]} for r in rows]
    print_table("QAT at low weight bits (test top-1 as run in ONNX Runtime; val: the choice)",
                [("model", "model"), ("method", "method"), ("val float", "val_float"),
                 ("val PTQ", "val_ptq"), ("val QAT", "val_qat"), ("recovered", "recovered"),
                 ("test float", "test_top1_float"), ("test PTQ+AdaRound", "test_top1_best_ptq"),
                 ("test QAT", "top1"), ("recovered vs that PTQ", "recovered_vs_best_ptq"),
                 ("SQNR PTQ", "sqnr_db_ptq"), ("SQNR QAT", "sqnr_db"), ("s", "tool_s")],
                shown)  # fmt: skip
    path = write_result("qat", args, rows, {"cases": cases}, t0)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
