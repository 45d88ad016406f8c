"""Hardware-aware architecture search on the generated shapes task, measured in ONNX Runtime.

One weight-sharing supernet over the MobileNetV2-style space (``nas.CNNSpace()``) is trained once
(sandwich rule: largest + smallest + ``--n-random`` random sub-networks per step, in-place
distillation) on the first ``--train-images`` training images (a budget for a shared 2-core
machine). Three latency targets are the measured ORT latencies
(batch 1, 1 thread) of the uniformly width-scaled baselines: every stage at its smallest,
middle and largest width, full depth, 3x3 kernels, the largest expansion. For each target:

- NSGA-II, random search and a REINFORCE controller, the same number of trials each, on the
  supernet: proxy top-1 on the ``--proxy-images`` training images the supernet and fine-tuning
  never see (after BatchNorm re-estimation on training images), latency from the lookup table
  with the table's held-out median error as a safety margin below the target. An architecture
  the table puts over the target is re-drawn before it is evaluated (it costs no trial; random
  search samples uniformly among the feasible ones). NSGA-II's first population is seeded with
  the feasible width-scaled family and the largest feasible networks (``nas.seed_archs``), the
  rest random. NSGA-II and random search each run ``--search-seeds`` times per target (the
  supernet and its proxies are shared, so a seed costs only proxy evaluations): the JSON and
  the table report the mean and sd over seeds of the best feasible proxy top-1 and of the
  hypervolume of the accuracy-latency front; the first seed's pick is the one fine-tuned. The
  pick is the most accurate feasible trial, ties (within ``--tolerance`` of proxy top-1) to the
  slowest, the one that uses most of the budget;
- DARTS (``nas.darts``): a copy of the same trained supernet, relaxed (softmax over width, depth
  and kernel x expansion), trained by first-order alternation for ``--darts-epochs`` (alpha steps
  on the 500 validation images the proxy does not use, weight steps on the training images) with
  the expected-latency term against the same target; its argmax, stepped down to the target if
  needed, is extracted from that copy; a control row takes the same architecture from the shared
  supernet instead (DARTS' copy had its weight steps too: the control separates the architecture
  from those extra steps);
- the best of each search and the width-scaled baseline are extracted (from the supernet; DARTS'
  from its copy) and fine-tuned the same way (the same ``--finetune-epochs``, data, seed and
  distillation from the supernet's largest sub-network), then evaluated on the test split and
  re-measured in ORT in the same interleaved rounds.

The latency model is validated on held-out random architectures measured as whole networks:
median relative error of the lookup table, and of the roofline of this machine's measured
hardware profile (raw lower bound, and with one scale fitted on the calibration networks).

    .venv/bin/python benchmarks/bench_nas.py            # results/nas.json, 25-40 min
    .venv/bin/python benchmarks/bench_nas.py --strategies darts   # only DARTS + the baseline
    .venv/bin/python benchmarks/bench_nas.py --quick    # small space, about 1 min
"""

from __future__ import annotations

import copy
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).parent))

from _common import parser, print_table, start, write_result  # noqa: E402
from slimkit.core.io import load_into, load_weights, save_weights  # noqa: E402
from slimkit.nas import (  # noqa: E402
    CNNSpace,
    Darts,
    Evaluator,
    StageSpace,
    SuperNet,
    calibrated_table,
    darts_search,
    finetune,
    recalibrate_bn,
    roofline_ms,
    search,
    seed_archs,
    train_supernet,
)
from slimkit.nas.api import held_out  # noqa: E402
from slimkit.nas.latency import measure_archs, ort_times  # noqa: E402
from slimkit.zoo.tasks import evaluate, load_task  # noqa: E402

# strategy -> the method name of its rows
STRATEGIES = {"nsga2": "nas (NSGA-II)", "random": "nas, random search", "rl": "nas, rl",
              "darts": "nas, darts"}  # fmt: skip
# a control: DARTS' architecture extracted from the shared supernet instead of DARTS' own copy
# (whose weights had DARTS' weight steps too), fine-tuned the same way
DARTS_ARCH_ONLY = "nas, darts arch on the shared supernet"
SEEDED = ("nsga2", "random")  # the strategies run over several search seeds


def mean_sd(values: list[float]) -> dict[str, Any]:
    return {"values": values, "mean": statistics.fmean(values),
            "sd": statistics.stdev(values) if len(values) > 1 else 0.0}  # fmt: skip


def quick_space() -> CNNSpace:
    return CNNSpace(stem=8, head=32, stages=[
        StageSpace(widths=[8, 12, 16], depths=[1, 2], kernels=[3, 5], expands=[2, 4]),
        StageSpace(widths=[16, 24, 32], depths=[1, 2], kernels=[3, 5], expands=[2, 4], stride=2),
    ])  # fmt: skip


def latency_model(space: CNNSpace, threads: int, cache: bool) -> tuple[Any, dict[str, Any]]:
    from slimkit.analyze.hardware import load_profile

    table, check = calibrated_table(space, threads=threads, n_calib=8, n_val=12, cache=cache)
    out: dict[str, Any] = {"lookup_table": check.to_dict(), "table_from_cache": cache,
                           "scale": table.scale,
                           "offset": table.offset, "entries": len(table.entries)}  # fmt: skip
    try:
        hw = load_profile("this", threads=threads)
        # the roofline on the same held-out networks (their measured ms are in `check`)
        import random

        rng = random.Random(0)
        cal = [space.largest(), space.smallest(), *[space.sample(rng) for _ in range(6)]]
        held = [a for a in (space.sample(rng) for _ in range(48)) if a not in cal][:12]
        roof_held = [roofline_ms(space, a, hw) for a in held]
        cal_meas = measure_archs(space, cal, threads=threads)
        scale = statistics.median(
            m / roofline_ms(space, a, hw) for a, m in zip(cal, cal_meas, strict=True)
        )
        meas = check.measured_ms
        raw = [abs(p - m) / m for p, m in zip(roof_held, meas, strict=True)]
        fitted = [abs(scale * p - m) / m for p, m in zip(roof_held, meas, strict=True)]
        out["roofline"] = {"profile": hw.name, "median_rel_error_raw": statistics.median(raw),
                           "median_rel_error_scaled": statistics.median(fitted),
                           "scale": scale}  # fmt: skip
    except Exception as e:  # the roofline is a side result; say why it is missing
        out["roofline"] = {"error": f"{type(e).__name__}: {e}"}
    return table, out


def main() -> None:
    p = parser("nas", __doc__)
    p.add_argument("--trials", type=int, default=None, help="trials per search")
    p.add_argument(
        "--search-seeds",
        type=int,
        default=None,
        help="NSGA-II and random search runs per target (different seeds)",
    )
    p.add_argument(
        "--proxy-images",
        type=int,
        default=None,
        help="proxy top-1 on this many training images after --train-images",
    )
    p.add_argument(
        "--tolerance",
        type=float,
        default=None,
        help="proxy top-1 differences up to this are ties (default: 1 / sqrt(images))",
    )
    p.add_argument(
        "--targets",
        type=int,
        nargs="+",
        default=[1, 2, 3],
        choices=[1, 2, 3],
        help="which width-scaled baselines set the targets (experiments)",
    )
    p.add_argument("--supernet-epochs", type=int, default=None)
    p.add_argument("--finetune-epochs", type=int, default=None)
    p.add_argument("--finetune-seeds", type=int, default=None,
                   help="fine-tune every chosen network this many times (seeds, data orders); "
                   "test top-1 is their mean (default 3)")  # fmt: skip
    p.add_argument("--train-images", type=int, default=None, help="first N training images")
    p.add_argument("--n-random", type=int, default=1, help="random sub-networks per step")
    p.add_argument(
        "--strategies",
        nargs="+",
        choices=list(STRATEGIES),
        default=list(STRATEGIES),
        help="the searches to run (the width-scaled baseline always runs)",
    )
    p.add_argument("--darts-epochs", type=int, default=1, help="DARTS alternation epochs")
    p.add_argument("--measure-margin", type=float, default=0.03,
                   help="the fine-tuned pick of NSGA-II, random and RL is the best trial measured "
                   "in ORT under target x (1 - this): the noise of one measurement")  # fmt: skip
    p.add_argument("--table-cache", action="store_true",
                   help="reuse this machine's cached latency table (default: measure it afresh; "
                   "a table cached on a busy machine mispredicts on a quiet one)")  # fmt: skip
    p.add_argument(
        "--supernet-cache",
        type=Path,
        default=None,
        help="load the trained supernet from this safetensors file if it exists, "
        "else train it and save it there (experiments; the JSON says which)",
    )
    args = p.parse_args()
    strategies = [st for st in STRATEGIES if st in args.strategies]
    t0 = start(threads=1)
    threads = 1
    quick = args.quick
    space = quick_space() if quick else CNNSpace()
    trials = args.trials or (8 if quick else 40)
    n_seeds = args.search_seeds or (2 if quick else 5)
    sn_epochs = args.supernet_epochs or (1 if quick else 5)
    ft_epochs = args.finetune_epochs or (1 if quick else 2)
    ft_seeds = args.finetune_seeds or (1 if quick else 3)
    max_steps = 15 if quick else None
    task = load_task("shapes")
    n_train = args.train_images or (2000 if quick else 6400)
    xs, ys = task.train.tensors
    n_proxy = min(args.proxy_images or (500 if quick else 1000), len(xs) - n_train)
    if n_proxy < 100:
        raise SystemExit(f"--train-images {n_train} leaves {n_proxy} training images for the proxy")
    tolerance = args.tolerance if args.tolerance is not None else 1 / n_proxy**0.5
    train_set = TensorDataset(xs[:n_train], ys[:n_train])
    # the proxy's images: training images that neither the supernet nor fine-tuning see
    proxy = list(zip(xs[n_train : n_train + n_proxy].split(500),
                     ys[n_train : n_train + n_proxy].split(500), strict=True))  # fmt: skip
    calib = list(zip(xs[:384].split(64), ys[:384].split(64), strict=True))  # BatchNorm statistics

    def loader(seed: int) -> DataLoader:
        gen = torch.Generator().manual_seed(seed)
        return DataLoader(train_set, batch_size=64, shuffle=True, generator=gen)

    load = os.getloadavg()

    tl = time.perf_counter()
    table, lat_info = latency_model(space, threads, args.table_cache)
    lat_info["seconds"] = round(time.perf_counter() - tl, 1)
    print(f"latency table: {lat_info['entries']} entries, held-out median error "
          f"{lat_info['lookup_table']['median_rel_error']:.1%}", flush=True)  # fmt: skip

    def latency(a: Any) -> float:
        return table.predict(space, a)

    ts = time.perf_counter()
    torch.manual_seed(0)
    net = SuperNet(space)
    cached = args.supernet_cache is not None and args.supernet_cache.is_file()
    if cached:
        load_into(net, load_weights(args.supernet_cache))
    else:
        train_supernet(net, loader(0), epochs=sn_epochs, n_random=args.n_random,
                       max_steps=max_steps, progress=False)  # fmt: skip
        if args.supernet_cache is not None:
            save_weights(net, args.supernet_cache)
    supernet_s = time.perf_counter() - ts
    print(f"supernet: {sn_epochs} epochs in {supernet_s:.0f} s"
          f"{' (loaded from the cache)' if cached else ''}", flush=True)  # fmt: skip
    ev = Evaluator(net, calib=calib, val=proxy, latency=latency)
    teacher = recalibrate_bn(net.extract(space.largest()), calib)
    margin = lat_info["lookup_table"]["median_rel_error"]

    darts_cfg = Darts(epochs=args.darts_epochs, max_steps=max_steps)
    baselines = [space.uniform(i) for i in range(3)]
    base_ms = measure_archs(space, baselines, threads=threads)
    rows: list[dict[str, Any]] = []
    searches: list[dict[str, Any]] = []
    seeded: dict[str, Any] = {}
    finals: dict[str, Any] = {}
    tuned: dict[Any, Any] = {}
    for i, (base, target) in enumerate(zip(baselines, base_ms, strict=True)):
        if i + 1 not in args.targets:
            continue
        tag = f"target {i + 1}"
        got = {}
        picks: dict[str, Any] = {}
        source = {st: (net, ev) for st in strategies}
        goal = target * (1 - margin)
        initial = seed_archs(space, latency, goal)
        for strategy in strategies:
            tt = time.perf_counter()
            if strategy == "darts":  # trains a copy of the supernet: the others keep theirs
                dnet = copy.deepcopy(net)
                dev = Evaluator(dnet, calib=calib, val=proxy, latency=latency)
                res = darts_search(dnet, table, train_loader=loader(100 + i), val=held_out(task),
                                   target_ms=goal, evaluate=dev, seed=i,
                                   config=darts_cfg)  # fmt: skip
                source[strategy] = (dnet, dev)
            else:
                runs = [
                    search(
                        space,
                        ev,
                        trials=trials,
                        target_ms=goal,
                        strategy=strategy,
                        seed=10 * i + s,
                        latency=latency,
                        tolerance=tolerance,
                        initial=initial if strategy == "nsga2" else (),
                    )  # fmt: skip
                    for s in range(n_seeds if strategy in SEEDED else 1)
                ]
                res = runs[0]  # the first seed's pick is fine-tuned
                # hardware in the loop: the pick among the most accurate trials measured in ORT
                # under the target less the measurement noise allowance
                picks[strategy] = res.measured_best(
                    lambda archs: measure_archs(space, archs, threads=threads),
                    target * (1 - args.measure_margin),
                )
                seeded[f"{tag}|{strategy}"] = {
                    "best_top1": mean_sd([r.best_top1() for r in runs]),
                    "hypervolume": mean_sd([r.hypervolume() for r in runs]),
                }
            got[strategy] = res
            d = res.to_dict()
            d.pop("all")
            if picks.get(strategy) is not None:  # the one fine-tuned
                d["picked"] = picks[strategy].to_dict()
            searches.append({"target": tag, "target_ms": target, **d,
                             "seconds": round(time.perf_counter() - tt, 1)})  # fmt: skip
            print(f"{tag} {strategy}: best proxy top-1 {res.best.top1 if res.best else None} "
                  f"({time.perf_counter() - tt:.0f} s)", flush=True)  # fmt: skip
        chosen = [("width-scaled", base, net, ev)] + [
            (STRATEGIES[st], (picks.get(st) or got[st].best).arch, *source[st])
            for st in strategies
            if got[st].best
        ]
        if "darts" in strategies and got["darts"].best:
            chosen.append((DARTS_ARCH_ONLY, got["darts"].best.arch, net, ev))
        for label, arch, src, src_ev in chosen:
            # the same architecture, weights and seed: the same fine-tuning
            key = (arch, i, id(src))
            if key not in tuned:  # --finetune-seeds runs: data order and seed differ
                tuned[key] = []
                for s in range(ft_seeds):
                    model = recalibrate_bn(src.extract(arch), calib)
                    finetune(model, teacher, loader(i + 1 + 1000 * s), epochs=ft_epochs,
                             max_steps=max_steps, progress=False, seed=s)  # fmt: skip
                    tuned[key].append(model)
            finals[f"{tag}|{label}"] = (tuned[key], arch, target, src_ev(arch))
    x = torch.randn(1, space.in_channels, space.input_size, space.input_size)
    # the same architecture runs at the same speed whatever its weights: the first seed is timed
    times = ort_times({k: (ms[0], x) for k, (ms, *_r) in finals.items()}, threads=threads, runs=50)
    for key, (models, arch, target, cand) in finals.items():
        tag, label = key.split("|")
        top1s = [evaluate(m, task, "test")["top1"] for m in models]
        rows.append({
            "model": "shapes", "tool": "slimkit", "method": f"{label}, {tag}", "batch": 1,
            "target_ms": target, "latency_ms": times[key]["ms"],
            "latency_median_ms": times[key]["median_ms"], "latency_spread_ms": times[key]["spread"],
            "meets_target": times[key]["ms"] <= target, "predicted_ms": cand.latency_ms,
            "metric": {"top1": statistics.mean(top1s), "proxy_top1": cand.top1},
            "top1_seeds": top1s, "top1_sd": statistics.pstdev(top1s),
            "params": cand.params, "arch": arch.describe(),
        })  # fmt: skip
    rows.append({"model": "shapes", "tool": "slimkit", "method": "nas latency model",
                 "median_rel_error": lat_info["lookup_table"]["median_rel_error"]})  # fmt: skip
    cols = [("method", "method"), ("arch", "arch"), ("target ms", "target_ms"),
            ("ms", "latency_ms"), ("meets", "meets_target"), ("top-1", "top1"), ("sd", "top1_sd"),
            ("proxy", "proxy"), ("params", "params")]  # fmt: skip
    shown = [{**r, "top1": r["metric"]["top1"], "proxy": r["metric"]["proxy_top1"]}
             for r in rows[:-1]]  # fmt: skip
    print_table("bench_nas: shapes, ORT batch 1, 1 thread; top-1 on the test split, proxy top-1 "
                "on held-out training images", cols, shown)  # fmt: skip
    seed_rows = [
        {"search": f"{STRATEGIES[k.split('|')[1]]}, {k.split('|')[0]}", "trials": trials,
         "seeds": len(v["best_top1"]["values"]),
         "best": f"{v['best_top1']['mean']:.4f} ± {v['best_top1']['sd']:.4f}",
         "hv": f"{v['hypervolume']['mean']:.4f} ± {v['hypervolume']['sd']:.4f}"}
        for k, v in seeded.items()
    ]  # fmt: skip
    print_table("bench_nas: best feasible proxy top-1 and hypervolume, mean ± sd over search seeds",
                [("search", "search"), ("trials", "trials"), ("seeds", "seeds"),
                 ("best proxy top-1", "best"), ("hypervolume", "hv")], seed_rows)  # fmt: skip
    best = {(s["target"], s["strategy"]): (s["best"] or {}).get("top1", 0.0) for s in searches}
    per_target = []
    for i in args.targets:
        tag = f"target {i}"
        r = {row["method"].rsplit(", ", 1)[0]: row for row in rows if row["method"].endswith(tag)}
        base_row = r["width-scaled"]
        entry: dict[str, Any] = {
            "target": tag,
            "target_ms": base_row["target_ms"],
            "proxy_best": {st: best[(tag, st)] for st in strategies},
            "width_scaled_meets_own_target": base_row["meets_target"],
        }
        names = {STRATEGIES[st]: "nas" if st == "nsga2" else st for st in strategies}
        names[DARTS_ARCH_ONLY] = "darts_arch_only"
        for label, name in names.items():  # "nas": NSGA-II, the headline
            row = r.get(label)
            if row is None:
                continue
            entry[f"{name}_meets_target"] = row["meets_target"]
            entry[f"{name}_top1_minus_width_scaled"] = (row["metric"]["top1"]
                                                        - base_row["metric"]["top1"])  # fmt: skip
            entry[f"{name}_ms_over_width_scaled_ms"] = row["latency_ms"] / base_row["latency_ms"]
            # the target is the baseline's latency: re-measured beside it in the same interleaved
            # rounds, a load change between the first measurement and the last cannot decide
            entry[f"{name}_meets_target_same_rounds"] = row["latency_ms"] <= base_row["latency_ms"]
            sd = (row["top1_sd"] ** 2 + base_row["top1_sd"] ** 2) ** 0.5
            gain = row["metric"]["top1"] - base_row["metric"]["top1"]
            entry[f"{name}_top1_gain_over_sd"] = gain / max(sd, 1e-9)
        entry["search_seeds"] = {k.split("|")[1]: v for k, v in seeded.items()
                                 if k.startswith(f"{tag}|")}  # fmt: skip
        if all(f"{tag}|{st}" in seeded for st in SEEDED):
            evo, rnd = (seeded[f"{tag}|{st}"] for st in SEEDED)
            pairs = list(zip(evo["best_top1"]["values"], rnd["best_top1"]["values"], strict=True))
            entry["nsga2_vs_random_by_seed"] = {"wins": sum(a > b for a, b in pairs),
                                                "ties": sum(a == b for a, b in pairs),
                                                "losses": sum(a < b for a, b in pairs)}  # fmt: skip
            for what in ("best_top1", "hypervolume"):
                entry[f"nsga2_beats_random_{what}_mean"] = (evo[what]["mean"]
                                                            > rnd[what]["mean"])  # fmt: skip
        per_target.append(entry)
    summary: dict[str, Any] = {"latency_model": lat_info, "per_target": per_target}
    for st in ("nsga2", "rl"):  # proxy top-1 on the same supernet (not DARTS: its own weights)
        if st in strategies and "random" in strategies:  # the first seed's searches
            summary[f"{st}_beats_random_proxy"] = sum(
                best[(f"target {i}", st)] > best[(f"target {i}", "random")] for i in args.targets
            )
    if all(st in strategies for st in SEEDED):
        for what in ("best_top1", "hypervolume"):
            summary[f"nsga2_beats_random_{what}_mean"] = sum(
                e[f"nsga2_beats_random_{what}_mean"] for e in per_target
            )
    summary.update({
        "searches": searches,
        "supernet_seconds": round(supernet_s, 1),
        "supernet_from_cache": cached,
        "load_average_start": load,
        "load_average_end": os.getloadavg(),
    })  # fmt: skip
    settings = {"threads": threads, "trials": trials, "search_seeds": n_seeds,
                "supernet_epochs": sn_epochs, "train_images": n_train,
                "proxy_images": n_proxy, "tolerance": tolerance, "n_random": args.n_random,
                "finetune_epochs": ft_epochs, "finetune_seeds": ft_seeds, "margin": margin,
                "measure_margin": args.measure_margin, "strategies": strategies,
                "targets": args.targets, "darts": darts_cfg.to_dict(),
                "space": space.to_dict()}  # fmt: skip
    print(f"wrote {write_result('nas', args, rows, settings, t0, summary=summary)}")


if __name__ == "__main__":
    main()
