"""Lottery tickets on a trained zoo CNN: iterative magnitude pruning with late rewinding to 80 %
sparsity, the rewound ticket retrained, against the dense network and the random
re-initialisation control (the same mask, fresh weights, trained the same way), over 3 seeds.

Each seed starts from a fresh initialisation of the zoo architecture and trains with the zoo
recipe (epochs, learning rate, batch size, weight decay); test top-1 is measured once at the end
of each run (the validation split is only recorded).

    .venv/bin/python benchmarks/bench_lottery.py            # digits_cnn, 80 %, 4 rounds, 3 seeds
    .venv/bin/python benchmarks/bench_lottery.py --model shapes_cnn --rounds 2
    .venv/bin/python benchmarks/bench_lottery.py --quick    # 1 seed, 2 rounds, 4 epochs
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))

from _common import RESULTS, parser, print_table, start, write_result  # noqa: E402
from slimkit.core.io import load_into  # noqa: E402
from slimkit.prune.lottery import Lottery, find_ticket  # noqa: E402
from slimkit.prune.unstructured import sparsity  # noqa: E402
from slimkit.zoo import evaluate, load_task  # noqa: E402
from slimkit.zoo.models import create_model  # noqa: E402
from slimkit.zoo.pretrained import PRETRAINED  # noqa: E402


def run(name: str, cfg: Lottery, seed: int) -> dict[str, Any]:
    recipe = PRETRAINED.get(name)
    task = load_task(recipe.task)
    model = create_model(recipe.model, seed=seed, **dict(recipe.model_kwargs))
    data = task.loader("train", recipe.batch_size, shuffle=True, seed=seed)
    t = time.perf_counter()
    ticket = find_ticket(model, data, cfg.replace(seed=seed),
                         val_fn=lambda m: evaluate(m, task, "val")["top1"])  # fmt: skip
    seconds = time.perf_counter() - t
    dense = create_model(recipe.model, seed=seed, **dict(recipe.model_kwargs))
    assert ticket.dense_state is not None and ticket.control is not None
    load_into(dense, ticket.dense_state)
    return {
        "seed": seed,
        "dense": evaluate(dense, task)["top1"],
        "ticket": evaluate(ticket.model, task)["top1"],
        "control": evaluate(ticket.control, task)["top1"],
        "sparsity": sparsity(ticket.model)["(global)"],
        "history": ticket.history,
        "seconds": round(seconds, 1),
    }


def main() -> None:
    p = parser("lottery", __doc__)
    p.add_argument("--model", default="digits_cnn", help="a trained zoo CNN (its recipe is used)")
    p.add_argument("--sparsity", type=float, default=0.8)
    p.add_argument("--rewind-epoch", type=int, default=1)
    p.add_argument("--rounds", type=int, default=4, help="prune-rewind-retrain rounds")
    p.add_argument("--threads", type=int, default=2, help="torch threads")
    p.add_argument("--epochs", type=int, default=None,
                   help="epochs of every training run, dense and ticket alike (default: the "
                        "zoo recipe's)")  # fmt: skip
    args = p.parse_args()
    t0 = start(threads=args.threads)
    recipe = PRETRAINED.get(args.model)
    epochs = 4 if args.quick else (args.epochs or recipe.epochs)
    cfg = Lottery(sparsity=args.sparsity, rounds=2 if args.quick else args.rounds, epochs=epochs,
                  rewind_epoch=min(args.rewind_epoch, epochs - 1), lr=recipe.lr,
                  optimizer=recipe.optimizer, weight_decay=recipe.weight_decay,
                  control=True)  # fmt: skip
    seeds = [0] if args.quick else [0, 1, 2]
    runs = [run(args.model, cfg, s) for s in seeds]
    mean = {k: statistics.mean(r[k] for r in runs) for k in ("dense", "ticket", "control")}
    sd = {k: statistics.pstdev(r[k] for r in runs) for k in ("dense", "ticket", "control")}
    s = round(statistics.mean(r["sparsity"] for r in runs), 4)
    base = {"model": args.model, "tool": "slimkit", "seeds": seeds}
    what = f"{cfg.rounds} rounds, rewind to epoch {cfg.rewind_epoch}, {epochs} epochs"
    rows = [
        {**base, "method": "dense (same recipe)", "sparsity": 0.0,
         "metric": {"top1": round(mean["dense"], 4)}, "top1_sd": round(sd["dense"], 4)},
        {**base, "method": f"lottery ticket ({what})", "sparsity": s,
         "metric": {"top1": round(mean["ticket"], 4)}, "top1_sd": round(sd["ticket"], 4),
         "drop_vs_dense": round(mean["dense"] - mean["ticket"], 4),
         "beats_control_seeds": sum(r["ticket"] > r["control"] for r in runs)},
        {**base, "method": "lottery random re-init control (same mask)", "sparsity": s,
         "metric": {"top1": round(mean["control"], 4)}, "top1_sd": round(sd["control"], 4)},
    ]  # fmt: skip
    shown = [{**r, "top1": r["metric"]["top1"]} for r in rows]
    print_table(f"Lottery tickets on {args.model} (test top-1, mean of {len(seeds)} seeds)",
                [("model", "model"), ("method", "method"), ("sparsity", "sparsity"),
                 ("top-1", "top1"), ("sd", "top1_sd"), ("drop vs dense", "drop_vs_dense"),
                 ("seeds ticket > control", "beats_control_seeds")], shown)  # fmt: skip
    # one file for every model benchmarked: this model's rows replace its previous ones
    old = RESULTS / f"lottery{'_quick' if args.quick else ''}.json"
    kept, kept_runs, settings = [], {}, {}
    if args.json is None and old.is_file():
        prev = json.loads(old.read_text())
        kept = [r for r in prev.get("rows", []) if r.get("model") != args.model]
        kept_runs = {k: v for k, v in prev.get("runs", {}).items() if k != args.model}
        settings = {k: v for k, v in prev.get("settings", {}).items() if k != args.model}
    settings[args.model] = {"config": cfg.to_dict(), "seeds": seeds}
    path = write_result("lottery", args, kept + rows, settings, t0,
                        runs={**kept_runs, args.model: runs})  # fmt: skip
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
