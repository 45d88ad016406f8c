"""Weight-only int4 / int8 for language models: slimkit against ONNX Runtime's MatMulNBits
quantizer and NNCF's compress_weights, in the same run.

Quality: the zoo's trained byte-level GPT (``pycode_gpt``, the Python standard library's source),
perplexity on the held-out test split and KL divergence to fp32 per token, every model run as
deployed in ONNX Runtime (slimkit's and ORT's MatMulNBits files; NNCF's result in PyTorch, its
own simulation). Calibration: windows of the training split. Peers: ORT's
``MatMulNBitsQuantizer`` (default RTN and HQQ; its GPTQ needs ``neural-compressor``) on the same
fp32 ONNX, and ``nncf.compress_weights`` (INT4, AWQ + scale estimation) on the torch model.

Speed: batch-1 decode on a GPT of the same design scaled up until its fp32 weights are >= 100 MB
(random weights): one forward of sequence length 1 (the zoo GPT has no KV cache, so this is one
new token without attention to past tokens; the weight traffic, which bounds decode, is the same
as one cached step). ORT fp32 vs slimkit int4 (accuracy_level 4) vs ORT's quantizer, interleaved
rounds; PyTorch eager fp32 vs PyTorch's int4 CPU kernel (``_weight_int4pack_mm_for_cpu``) too.
Coverage: Hugging Face GPT-2 and Llama built from small configs, quantized, exported, ORT parity.

    python benchmarks/bench_llm_quant.py --quick   # about a minute
    python benchmarks/bench_llm_quant.py           # about 10 minutes
"""

from __future__ import annotations

import gc
import logging
import math
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))

import slimkit as sk  # noqa: E402
from _common import parser, print_table, start, write_result  # noqa: E402
from slimkit.analyze.latency import measure_latency, ort_runner, torch_runner  # noqa: E402
from slimkit.export.matmulnbits import export_nbits  # noqa: E402
from slimkit.export.onnx import export_onnx  # noqa: E402
from slimkit.export.ort import ort_session  # noqa: E402
from slimkit.quant import Int4  # noqa: E402
from slimkit.quant.nbits import NBitsLinear  # noqa: E402
from slimkit.testing.numerics import sqnr  # noqa: E402
from slimkit.zoo import create_model, load_task, pretrained  # noqa: E402

MB = 1e6


def _mb(path: Path) -> float:
    return round(path.stat().st_size / MB, 3)


# --- quality on the trained GPT ----------------------------------------------------------------


class LMEval:
    """Perplexity and KL(fp32 || model) per token on fixed test windows."""

    def __init__(self, xs: torch.Tensor, ys: torch.Tensor, ref: Any, batch: int = 32) -> None:
        self.xs, self.ys, self.batch = xs, ys, batch
        self.ref_logp = [lp for lp, _ in self._run(ref)]

    def _run(self, fn: Any) -> Any:
        for i in range(0, len(self.xs), self.batch):
            x = self.xs[i : i + self.batch]
            with torch.no_grad():
                logits = fn(x)
            yield torch.as_tensor(logits).float().log_softmax(-1), i

    def __call__(self, fn: Any) -> dict[str, float]:
        nll = kl = 0.0
        for logp, i in self._run(fn):
            y = self.ys[i : i + self.batch]
            nll -= float(logp.gather(-1, y[..., None]).sum())
            ref = self.ref_logp[i // self.batch]
            kl += float((ref.exp() * (ref - logp)).sum())
        n = self.ys.numel()
        return {"perplexity": round(math.exp(nll / n), 4), "kl": round(kl / n, 5)}


def ort_fn(path: Path) -> Any:
    sess = ort_session(path)
    name = sess.get_inputs()[0].name
    return lambda x: sess.run(None, {name: x.numpy()})[0]


def slimkit_rows(
    model: nn.Module,
    calib: list[torch.Tensor],
    ev: LMEval,
    x1: torch.Tensor,
    tmp: Path,
    settings: list[tuple[str, int, int]],
) -> list[dict[str, Any]]:
    rows = []
    for method, bits, gs in settings:
        cfg = Int4(bits=bits, group_size=gs, method=method)  # type: ignore[arg-type]
        t0 = time.perf_counter()
        q = sk.quantize(model, cfg, data=calib if method != "rtn" else None)
        tool_s = time.perf_counter() - t0
        path = tmp / f"sk_{method}_{bits}_{gs}.onnx"
        rep = export_nbits(q, path, example_inputs=(x1,))
        row = {
            "model": "pycode_gpt",
            "tool": "slimkit",
            "method": f"int{bits} {method} g{gs}",
            "metric": ev(ort_fn(path)),
            "size_mb": _mb(path),
            "tool_s": round(tool_s, 2),
            "ort_vs_sim": rep.export.notes[-1],
        }
        rows.append(row)
        print(f"  slimkit {row['method']}: {row['metric']} ({tool_s:.1f} s)", flush=True)
    return rows


def ort_peer_rows(
    fp32: Path, ev: LMEval, tmp: Path, groups: list[int], hqq: bool
) -> list[dict[str, Any]]:
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import (
        DefaultWeightOnlyQuantConfig,
        HQQWeightOnlyQuantConfig,
        MatMulNBitsQuantizer,
    )

    logging.getLogger("onnxruntime").setLevel(logging.ERROR)
    rows = []
    configs: list[tuple[str, int, Any]] = [
        (
            "rtn",
            gs,
            DefaultWeightOnlyQuantConfig(block_size=gs, is_symmetric=False, accuracy_level=4),
        )
        for gs in groups
    ]
    if hqq:
        configs.append(("hqq", 128, HQQWeightOnlyQuantConfig(block_size=128, bits=4)))
    for name, gs, algo in configs:
        t0 = time.perf_counter()
        qz = MatMulNBitsQuantizer(
            onnx.load(str(fp32)),
            block_size=gs,
            is_symmetric=False,
            accuracy_level=4,
            algo_config=algo,
        )
        qz.process()
        path = tmp / f"ort_{name}_{gs}.onnx"
        qz.model.save_model_to_file(str(path))
        tool_s = time.perf_counter() - t0
        row = {
            "model": "pycode_gpt",
            "tool": "onnxruntime",
            "method": f"int4 {name} g{gs}",
            "metric": ev(ort_fn(path)),
            "size_mb": _mb(path),
            "tool_s": round(tool_s, 2),
        }
        rows.append(row)
        print(f"  onnxruntime {row['method']}: {row['metric']}", flush=True)
    rows.append(
        {
            "model": "pycode_gpt",
            "tool": "onnxruntime",
            "method": "int4 gptq g128",
            "skipped": _gptq_skip_reason(),
        }
    )
    return rows


def _gptq_skip_reason() -> str:
    try:
        import neural_compressor  # noqa: F401
    except ImportError:
        return "ORT's GPTQ config runs through neural-compressor, which is not installed"
    return "not run"


def nncf_rows(
    model: nn.Module, calib: list[torch.Tensor], ev: LMEval, quick: bool
) -> list[dict[str, Any]]:
    import copy

    try:
        import nncf
    except ImportError:
        return [
            {
                "model": "pycode_gpt",
                "tool": "nncf",
                "method": "int4 awq+se g128",
                "skipped": "nncf is not installed (pip install -e .[bench])",
            }
        ]
    logging.getLogger("nncf").setLevel(logging.ERROR)
    rows = []
    for mode, label in (
        (nncf.CompressWeightsMode.INT4_ASYM, "asym"),
        (nncf.CompressWeightsMode.INT4_SYM, "sym"),
    )[: 1 if quick else 2]:
        t0 = time.perf_counter()
        try:
            q = nncf.compress_weights(
                copy.deepcopy(model).eval(),
                mode=mode,
                group_size=128,
                ratio=1.0,
                all_layers=True,
                awq=True,
                scale_estimation=True,
                dataset=nncf.Dataset(calib),
                subset_size=sum(len(c) for c in calib),
                ignored_scope=nncf.IgnoredScope(types=["embedding"], validate=False),
            )
        except Exception as e:  # noqa: BLE001 - report the peer's failure, keep the run
            rows.append(
                {
                    "model": "pycode_gpt",
                    "tool": "nncf",
                    "method": f"int4 {label} awq+se g128",
                    "skipped": f"{type(e).__name__}: {str(e)[:200]}",
                }
            )
            continue
        tool_s = time.perf_counter() - t0
        row = {
            "model": "pycode_gpt",
            "tool": "nncf",
            "method": f"int4 {label} awq+se g128",
            "metric": ev(q),
            "tool_s": round(tool_s, 2),
            "note": "evaluated in PyTorch (NNCF's own decompression), not exported",
        }
        rows.append(row)
        print(f"  nncf {row['method']}: {row['metric']}", flush=True)
    return rows


def bench_quality(quick: bool, tmp: Path) -> list[dict[str, Any]]:
    torch.manual_seed(0)
    model = pretrained("pycode_gpt").eval()
    task = load_task("pycode_lm")
    xs, ys = task.test[: 64 if quick else 512]
    train_x = task.train[:][0]
    picks = torch.linspace(0, len(train_x) - 1, 16 if quick else 64).long()
    calib = list(train_x[picks].split(8))  # 2 / 8 batches of 8 windows of 128 bytes
    x1 = xs[:2]
    fp32 = tmp / "gpt_fp32.onnx"
    export_onnx(model, fp32, example_inputs=(x1,))
    ev = LMEval(xs, ys, ort_fn(fp32))
    rows = [
        {
            "model": "pycode_gpt",
            "tool": "slimkit",
            "method": "fp32",
            "metric": ev(ort_fn(fp32)),
            "size_mb": _mb(fp32),
        }
    ]
    settings = [
        ("rtn", 8, 128),
        ("rtn", 4, 128),
        ("mse", 4, 128),
        ("gptq", 4, 128),
        ("awq", 4, 128),
    ]
    if not quick:
        settings += [(m, 4, g) for g in (32, 64) for m in ("rtn", "mse", "gptq", "awq")]
    rows += slimkit_rows(model, calib, ev, x1, tmp, settings)
    rows += ort_peer_rows(fp32, ev, tmp, [128] if quick else [32, 64, 128], hqq=not quick)
    rows += nncf_rows(model, calib, ev, quick)
    return rows


# --- speed on a big GPT ------------------------------------------------------------------------


class TorchInt4Linear(nn.Module):
    """An ``NBitsLinear`` (4-bit) run by PyTorch's int4 CPU kernel: ``w = (q - 8) * s + z``."""

    def __init__(self, nb: NBitsLinear) -> None:
        super().__init__()
        codes, zero = nb.codes()
        k = nb.in_features
        self.k, self.gs, self.bias = k, nb.spec.group_size, nb.bias
        self.packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(
            codes[:, :k].to(torch.int32), 2
        )
        s = nb.scales
        self.sz = torch.stack([s, (8 - zero.float()) * s], -1).transpose(0, 1).contiguous()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(
            x.reshape(-1, self.k), self.packed, self.gs, self.sz
        )
        y = y.reshape(*x.shape[:-1], -1)
        return y if self.bias is None else y + self.bias


def _torch_int4(q: nn.Module) -> nn.Module:
    import copy

    out = copy.deepcopy(q)
    for name, m in list(out.named_modules()):
        if isinstance(m, NBitsLinear) and m.input_scale is None:
            parent, _, leaf = name.rpartition(".")
            setattr(out.get_submodule(parent) if parent else out, leaf, TorchInt4Linear(m))
    return out


def bench_speed(quick: bool, tmp: Path) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import (
        DefaultWeightOnlyQuantConfig,
        MatMulNBitsQuantizer,
    )

    d, layers = (512, 4) if quick else (768, 4)
    torch.manual_seed(0)
    big = create_model("gpt", d_model=d, n_layer=layers, n_head=d // 64).eval()
    weight_mb = sum(m.weight.numel() * 4 for m in big.modules() if isinstance(m, nn.Linear)) / MB
    x = torch.randint(0, 256, (1, 1))  # batch 1, one new token
    fp32 = tmp / "big_fp32.onnx"
    export_onnx(big, fp32, example_inputs=(x,))  # dynamic batch, as export_nbits writes it
    q = sk.quantize(big, Int4(method="rtn", group_size=128, accuracy_level=4))
    q0 = sk.quantize(big, Int4(method="rtn", group_size=128, accuracy_level=0))
    qf = sk.quantize(big, Int4(method="rtn", group_size=128, embeddings="float"))
    paths = {
        "fp32": fp32,
        "slimkit int4 rtn g128 acc4": tmp / "big_sk4.onnx",
        "slimkit int4 rtn g128 acc4 float-emb": tmp / "big_sk4f.onnx",
        "slimkit int4 rtn g128 acc0": tmp / "big_sk0.onnx",
        "onnxruntime int4 rtn g128 acc4": tmp / "big_ort4.onnx",
    }
    export_nbits(q, paths["slimkit int4 rtn g128 acc4"], example_inputs=(x,))
    export_nbits(qf, paths["slimkit int4 rtn g128 acc4 float-emb"], example_inputs=(x,))
    export_nbits(q0, paths["slimkit int4 rtn g128 acc0"], example_inputs=(x,))
    qz = MatMulNBitsQuantizer(
        onnx.load(str(fp32)),
        block_size=128,
        is_symmetric=False,
        accuracy_level=4,
        algo_config=DefaultWeightOnlyQuantConfig(
            block_size=128, is_symmetric=False, accuracy_level=4
        ),
    )
    qz.process()
    qz.model.save_model_to_file(str(paths["onnxruntime int4 rtn g128 acc4"]))
    runs = 10 if quick else 50
    runners = {k: ort_runner(ort_session(p), [x]) for k, p in paths.items()}
    lat = measure_latency(runners, runs=runs, warmup=5, rounds=3)
    del runners  # idle ORT threads spin: PyTorch is timed once the sessions are gone
    gc.collect()
    t_int4 = _torch_int4(q0)
    with torch.no_grad():
        kernel_sqnr = sqnr(q0(x), t_int4(x))
        lat.update(
            measure_latency(
                {
                    "torch eager fp32": torch_runner(big, [x]),
                    "torch int4pack_mm": torch_runner(t_int4, [x]),
                },
                runs=runs,
                warmup=5,
                rounds=3,
            )
        )
    rows = []
    for name, st in lat.items():
        tool = "torch" if name.startswith("torch") else name.split()[0]
        if tool == "fp32":
            tool = "onnxruntime"
        method = name.removeprefix("slimkit ").removeprefix("onnxruntime ")
        row: dict[str, Any] = {
            "model": f"gpt_big_d{d}",
            "tool": tool if tool != "torch" else "torch",
            "method": method,
            "batch": 1,
            "latency_ms": round(st.median_ms, 3),
            "latency_spread_ms": [round(v, 3) for v in st.spread_ms],
            "latency_q1_ms": round(st.quartile_ms, 3),
        }
        if name in paths:
            row["size_mb"] = _mb(paths[name])
        rows.append(row)
    f32 = lat["fp32"].median_ms
    summary = {
        "weights_fp32_mb": round(weight_mb, 1),
        "d_model": d,
        "n_layer": layers,
        "speedup_slimkit_int4_acc4_vs_fp32": round(
            f32 / lat["slimkit int4 rtn g128 acc4"].median_ms, 2
        ),
        "latency_slimkit_vs_ort_int4_acc4": round(
            lat["slimkit int4 rtn g128 acc4"].median_ms
            / lat["onnxruntime int4 rtn g128 acc4"].median_ms,
            2,
        ),
        "speedup_slimkit_int4_acc0_vs_fp32": round(
            f32 / lat["slimkit int4 rtn g128 acc0"].median_ms, 2
        ),
        "speedup_ort_int4_acc4_vs_fp32": round(
            f32 / lat["onnxruntime int4 rtn g128 acc4"].median_ms, 2
        ),
        "speedup_torch_int4_vs_torch_fp32": round(
            lat["torch eager fp32"].median_ms / lat["torch int4pack_mm"].median_ms, 2
        ),
        "size_ratio_fp32_vs_slimkit_int4": round(
            paths["fp32"].stat().st_size / paths["slimkit int4 rtn g128 acc4"].stat().st_size, 2
        ),
        "torch_int4_kernel_vs_simulation_sqnr_db": round(kernel_sqnr, 1),
        "decode": "one forward of sequence length 1 at batch 1 (no KV cache in the zoo GPT)",
    }
    return rows, summary


# --- Hugging Face coverage ---------------------------------------------------------------------


def bench_hf(tmp: Path, quick: bool) -> list[dict[str, Any]]:
    try:
        import transformers
    except ImportError:
        return [{"model": "hf", "skipped": "transformers is not installed"}]
    transformers.logging.set_verbosity_error()
    cfgs = {
        "hf_gpt2": transformers.GPT2Config(
            n_layer=2,
            n_embd=128,
            n_head=4,
            vocab_size=256,
            n_positions=64,
            bos_token_id=0,
            eos_token_id=0,
        ),
        "hf_llama": transformers.LlamaConfig(
            hidden_size=128,
            intermediate_size=256,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=256,
            max_position_embeddings=64,
            bos_token_id=0,
            eos_token_id=0,
        ),
    }
    rows = []
    for name, cfg in cfgs.items():
        torch.manual_seed(0)
        model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
        ids = [torch.randint(0, 256, (4, 32)) for _ in range(4)]
        for method in ("gptq",) if quick else ("rtn", "gptq", "awq"):
            q = sk.quantize(model, Int4(method=method, group_size=32), data=ids)  # type: ignore[arg-type]
            with torch.no_grad():
                db = sqnr(model(ids[0]).logits, q(ids[0]).logits)
            rep = export_nbits(
                q,
                tmp / f"{name}_{method}.onnx",
                example_inputs=(),
                example_kwargs={"input_ids": ids[0]},
            )
            rows.append(
                {
                    "model": name,
                    "tool": "slimkit",
                    "method": f"int4 {method} g32",
                    "sqnr_db": round(db, 2),
                    "matmulnbits_nodes": rep.nodes,
                    "ort_vs_sim": rep.export.notes[-1],
                    "ort_max_abs_err": rep.export.max_abs_err,
                }
            )
    return rows


def main() -> None:
    args = parser("llm_quant", __doc__).parse_args()
    t0 = start()
    with tempfile.TemporaryDirectory() as tmp:
        print("quality on pycode_gpt", flush=True)
        quality = bench_quality(args.quick, Path(tmp))
        print(f"decode speed ({time.perf_counter() - t0:.0f} s)", flush=True)
        speed, speed_summary = bench_speed(args.quick, Path(tmp))
        print(f"Hugging Face coverage ({time.perf_counter() - t0:.0f} s)", flush=True)
        hf = bench_hf(Path(tmp), args.quick)
    summary = summarise(quality, speed_summary)
    settings = {
        "threads": 2,
        "calibration_windows": 16 if args.quick else 64,
        "test_windows": 64 if args.quick else 512,
        "window_bytes": 128,
        "eval_runtime": "onnxruntime (slimkit and ORT rows), PyTorch (nncf rows)",
    }
    for r in quality:
        if "metric" in r:
            r["perplexity"], r["kl"] = r["metric"]["perplexity"], r["metric"]["kl"]
    path = write_result("llm_quant", args, quality + speed + hf, settings, t0, summary=summary)
    print_table(
        "pycode_gpt: held-out perplexity and KL to fp32 (as run in ORT)",
        [
            ("tool", "tool"),
            ("method", "method"),
            ("perplexity", "perplexity"),
            ("KL", "kl"),
            ("size MB", "size_mb"),
            ("tool s", "tool_s"),
            ("skipped", "skipped"),
        ],
        quality,
    )
    print_table(
        f"batch-1 decode, GPT d{speed_summary['d_model']} "
        f"({speed_summary['weights_fp32_mb']} MB fp32 weights)",
        [
            ("tool", "tool"),
            ("method", "method"),
            ("ms / token", "latency_ms"),
            ("size MB", "size_mb"),
        ],
        speed,
    )
    print_table(
        "Hugging Face causal LMs (random weights): int4 g32, exported, ORT parity",
        [
            ("model", "model"),
            ("method", "method"),
            ("SQNR dB", "sqnr_db"),
            ("nodes", "matmulnbits_nodes"),
            ("ORT vs sim", "ort_vs_sim"),
        ],
        hf,
    )
    print_table(
        "summary",
        [("what", "what"), ("value", "value")],
        [{"what": k, "value": v} for k, v in summary.items()],
    )
    print(f"wrote {path}")


def summarise(quality: list[dict[str, Any]], speed: dict[str, Any]) -> dict[str, Any]:
    def ppl(r: dict[str, Any]) -> float:
        return float(r["metric"]["perplexity"])

    done = [r for r in quality if "metric" in r]
    fp32 = next(ppl(r) for r in done if r["method"] == "fp32")
    ours = [
        r
        for r in done
        if r["tool"] == "slimkit"
        and r["method"].startswith("int4")
        and r["method"].endswith("g128")
    ]
    best = min(ours, key=ppl)
    peers = [r for r in done if r["tool"] != "slimkit" and r["method"].endswith("g128")]
    best_peer = min(peers, key=ppl) if peers else None
    out: dict[str, Any] = {
        "fp32_perplexity": fp32,
        "best_slimkit_int4_g128": best["method"],
        "best_slimkit_int4_g128_perplexity": ppl(best),
        "best_slimkit_int4_g128_vs_fp32_pct": round(100 * (ppl(best) / fp32 - 1), 2),
        "size_ratio_fp32_vs_best_int4_g128": round(
            next(r["size_mb"] for r in done if r["method"] == "fp32") / best["size_mb"], 2
        ),
    }
    if best_peer is not None:
        out["best_peer_int4_g128"] = f"{best_peer['tool']} {best_peer['method']}"
        out["best_peer_int4_g128_perplexity"] = ppl(best_peer)
        out["slimkit_beats_every_peer_g128"] = all(ppl(best) < ppl(p) for p in peers)
    return {**out, **speed}


if __name__ == "__main__":
    main()
