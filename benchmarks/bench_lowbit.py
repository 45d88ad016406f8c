"""Low-bit and non-uniform weights (quant.lowbit, experimental) on slimkit's trained zoo CNN and
GPT, as run in ONNX Runtime: binary, ternary, powers of two and k-means weight sharing, each
without and with the same short distillation fine-tune, against fp32 and the best uniform 4-bit
PTQ (W4A8, AdaRound). Size is the measured ONNX file; latency is ORT batch 1 (these formats have
no kernel here: they run as dequantized float weights, so they are not expected to be faster).

    .venv/bin/python benchmarks/bench_lowbit.py          # shapes_cnn (2 epochs, 2560 samples) + GPT
    .venv/bin/python benchmarks/bench_lowbit.py --quick  # digits_cnn, 1 epoch, no GPT
"""

from __future__ import annotations

import itertools
import math
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
from slimkit.export.qdq import export_quantized  # noqa: E402
from slimkit.quant import PTQ, LowBit  # noqa: E402
from slimkit.zoo import evaluate, load_task, pretrained  # noqa: E402

SCHEMES: list[tuple[str, int | None]] = [
    ("binary", None), ("ternary", None), ("pow2", 3), ("pow2", 4),
    ("kmeans", 2), ("kmeans", 3), ("kmeans", 4),
]  # fmt: skip
TASK = {"digits_cnn": "digits", "shapes_cnn": "shapes"}
TRAIN_BATCHES = 40  # of 64 samples


def _label(scheme: str, bits: int | None, epochs: int) -> str:
    name = f"{scheme} {bits}-bit" if bits is not None else scheme
    return f"{name}, fine-tuned {epochs} epochs" if epochs else name


def _export(model: torch.nn.Module, path: Path, x: torch.Tensor) -> list[str]:
    """Write ``model`` to ``path`` as deployed (integer QDQ for PTQ); the export's notes."""
    meta = getattr(model, "meta", {})
    if isinstance(meta, dict) and meta.get("slimkit", {}).get("method") == "quant.ptq":
        rep, _ = export_quantized(model, path, example_inputs=(x,))
    else:
        rep = sk.export_onnx(model, path, example_inputs=(x,))
    return rep.notes


def ort_top1(path: Path, task: Any) -> float:
    sess = ort_session(path)
    xs, ys = task.test.tensors
    name = sess.get_inputs()[0].name
    preds = [sess.run(None, {name: xs[i : i + 256].numpy()})[0].argmax(1)
             for i in range(0, len(xs), 256)]  # fmt: skip
    return float((np.concatenate(preds) == ys.numpy()).mean())


def cnn_rows(name: str, epochs: int, tmp: Path, save: Any) -> list[dict[str, Any]]:
    model = pretrained(name).eval()
    task = load_task(TASK[name])
    x = task.test.tensors[0][:1]

    def val(m: torch.nn.Module) -> float:
        return evaluate(m, task, "val")["top1"]

    rows: list[dict[str, Any]] = []
    timed: dict[str, torch.nn.Module] = {"fp32": model}

    def add(label: str, m: torch.nn.Module, seconds: float, **extra: Any) -> None:
        path = tmp / f"{len(rows)}.onnx"
        notes = _export(m, path, x)
        row = {"model": name, "tool": "slimkit", "method": label, "batch": 1,
               "metric": {"top1": round(ort_top1(path, task), 4)},
               "size_mb": round(path.stat().st_size / 1e6, 4), "tool_s": round(seconds, 1),
               **extra}  # fmt: skip
        if notes:
            row["export"] = notes[0]
        rows.append(row)
        print(f"  {name} {label}: top1 {row['metric']['top1']} size {row['size_mb']} MB "
              f"({seconds:.1f} s)", flush=True)  # fmt: skip
        save(rows)

    add("fp32", model, 0.0)
    t = time.perf_counter()
    ptq = PTQ(weight_bits=4, adaround=50, speed_check=False, float_prefix=False)
    w4 = sk.quantize(model, ptq, data=task.calibration(256))
    add("uniform W4A8 PTQ (AdaRound)", w4, time.perf_counter() - t)
    timed["uniform W4A8 PTQ (AdaRound)"] = w4
    # the same short fine-tune for every scheme: a fixed subset of the train split (2 cores)
    train = list(itertools.islice(task.loader("train", 64, shuffle=True), TRAIN_BATCHES))
    for scheme, bits in SCHEMES:
        for e in (0, epochs):
            cfg = LowBit(scheme=scheme, bits=bits, epochs=e, lr=1e-3)  # type: ignore[arg-type]
            t = time.perf_counter()
            q = sk.quantize(model, cfg, data=train if e else None)
            rec = q.meta["slimkit"]
            add(_label(scheme, bits, e), q, time.perf_counter() - t, scheme=scheme,
                bits=rec["bits"], epochs=e, val_top1=round(val(q), 4),
                packed_bytes=rec["packed_bytes"])  # fmt: skip
            if e == 0:
                timed[_label(scheme, bits, 0)] = q
    # latency does not depend on the trained values: the untrained models stand for both
    lat = ort_latency(timed, x, runs=50, rounds=3)
    fp32_ms = lat["fp32"].median_ms
    for r in rows:
        base = r["method"].split(", fine-tuned")[0]
        if base in lat:
            s = lat[base]
            r["latency_ms"] = round(s.median_ms, 4)
            r["latency_spread_ms"] = [round(v, 4) for v in s.spread_ms]
            r["x_fp32_latency"] = round(s.median_ms / fp32_ms, 3)
    save(rows)
    return rows


def gpt_rows(tmp: Path, save: Any, done: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The trained GPT, no fine-tune: held-out perplexity as run in ORT."""
    model = pretrained("pycode_gpt").eval()
    task = load_task("pycode_lm")
    xs, ys = task.test[:64]
    x1 = xs[:2]
    rows: list[dict[str, Any]] = []

    def ppl(path: Path) -> float:
        sess = ort_session(path)
        name = sess.get_inputs()[0].name
        nll = 0.0
        for i in range(0, len(xs), 32):
            logp = torch.from_numpy(sess.run(None, {name: xs[i : i + 32].numpy()})[0])
            logp = logp.float().log_softmax(-1)
            nll -= float(logp.gather(-1, ys[i : i + 32, :, None]).sum())
        return round(math.exp(nll / ys.numel()), 4)

    cases: list[tuple[str, torch.nn.Module]] = [("fp32", model)]
    for scheme, bits in [("ternary", None), ("pow2", 4), ("kmeans", 3), ("kmeans", 4)]:
        cases.append((_label(scheme, bits, 0), LowBit(scheme=scheme, bits=bits)))  # type: ignore[arg-type]
    for label, what in cases:
        t = time.perf_counter()
        m = what if isinstance(what, torch.nn.Module) else sk.quantize(model, what)
        path = tmp / f"gpt{len(rows)}.onnx"
        notes = sk.export_onnx(m, path, example_inputs=(x1,)).notes
        row = {"model": "pycode_gpt", "tool": "slimkit", "method": label,
               "metric": {"perplexity": ppl(path)}, "size_mb": round(path.stat().st_size / 1e6, 4),
               "tool_s": round(time.perf_counter() - t, 1)}  # fmt: skip
        if notes:
            row["export"] = notes[0]
        rows.append(row)
        print(f"  pycode_gpt {label}: ppl {row['metric']['perplexity']} size {row['size_mb']} MB",
              flush=True)  # fmt: skip
        save(done + rows)
    return rows


def main() -> None:
    args = parser("lowbit", __doc__).parse_args()
    t0 = start()
    name, epochs = ("digits_cnn", 1) if args.quick else ("shapes_cnn", 2)
    settings = {"cnn": name, "epochs": epochs, "train_samples": 64 * TRAIN_BATCHES, "lr": 1e-3,
                "ptq": "W4A8 adaround 50",
                "keep_first_last": True, "gpt": not args.quick}  # fmt: skip

    def save(rows: list[dict[str, Any]]) -> Path:
        return write_result("lowbit", args, rows, settings, t0)

    with tempfile.TemporaryDirectory() as d:
        rows = cnn_rows(name, epochs, Path(d), save)
        if not args.quick:
            rows += gpt_rows(Path(d), save, rows)
    shown = [{**r, **r["metric"]} for r in rows]
    print_table(
        "low-bit weights (experimental; as run in ONNX Runtime, dequantized float kernels)",
        [("model", "model"), ("method", "method"), ("top1", "top1"), ("val", "val_top1"),
         ("ppl", "perplexity"), ("size MB", "size_mb"), ("ms b1", "latency_ms"),
         ("x fp32", "x_fp32_latency"), ("s", "tool_s")],
        shown,
    )  # fmt: skip
    print(f"wrote {save(rows)}")


if __name__ == "__main__":
    main()
