"""Lottery tickets: iterative magnitude pruning with weight rewinding, and the random control.

The lottery-ticket procedure trains the dense network, removes the smallest-magnitude weights
(one global threshold over the layers in scope), rewinds the surviving weights to their values at
the start of training (``rewind_epoch=0``, Frankle and Carbin 2019) or after a few epochs of it
(``rewind_epoch=k``, "late rewinding", Frankle et al. 2020, which is what makes tickets work on
deeper networks), and trains again; ``rounds`` times, each round removing the same fraction of the
weights still left, until ``sparsity`` is reached. The *ticket* is the final mask plus the rewound
weights; retrained, it should match the dense network. The control the paper uses to show that the
rewound weights matter, the same mask on a random re-initialisation trained the same way, runs with
``control=True``.

    t = find_ticket(model, train_loader, Lottery(sparsity=0.8, rounds=4, epochs=10, rewind_epoch=1),
                    val_fn=lambda m: evaluate(m, task, "val")["top1"], workdir="runs/ticket")
    t.model               # the retrained ticket (masks as parametrizations, like prune.magnitude)
    save_ticket(t, "out/ticket")     # mask + rewound weights + history, safetensors and JSON
    again = apply_ticket(fresh_model, *load_ticket("out/ticket")[:2])  # ready to retrain

``sk.prune(model, sk.prune.Lottery(...), data=loader)`` runs it as a verb. The model passed in is
the starting point: an untrained network gives the paper's procedure; a trained one gives
iterative pruning with fine-tuning, each round restarting from its trained weights (learning-rate
rewinding when ``rewind_epoch=0``). Batches with targets train on the task loss (cross entropy over
the last axis); batches without targets train to match the input model's outputs (which presumes a
trained input). ``workdir`` makes a long run resumable: the state after the dense run and after each
round is written there (atomically), and a rerun with the same config continues from it.

Each training run uses ``core.train.fit`` with the config's epochs, learning rate (cosine decay) and
optimizer; after rewinding to epoch ``k`` the retraining runs the remaining ``epochs - k`` epochs.
Like every unstructured mask the zeros shrink a compressed file, not dense-kernel latency.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import nn

from slimkit.core.config import Config
from slimkit.core.data import iter_batches
from slimkit.core.io import (
    PathLike,
    load_into,
    load_weights,
    read_metadata,
    save_weights,
    write_json,
)
from slimkit.core.registry import METHODS
from slimkit.core.scope import Scope
from slimkit.core.train import TrainResult, fit
from slimkit.errors import CheckpointError, ConfigError
from slimkit.prune.artifact import baked_state_dict
from slimkit.prune.unstructured import WEIGHTED, _attach, sparsity

FORMAT = "slimkit.lottery/1"


class Lottery(Config):
    """Iterative magnitude pruning with weight rewinding (a lottery ticket)."""

    sparsity: float = Field(0.8, gt=0.0, lt=1.0)  # fraction of in-scope weights removed at the end
    rounds: int = Field(4, ge=1)  # prune-rewind-retrain rounds; each removes the same fraction left
    epochs: int = Field(10, ge=1)  # epochs of the dense training run
    rewind_epoch: int = Field(1, ge=0)  # rewind to the weights after this many epochs (0: init)
    lr: float = Field(3e-3, gt=0.0)
    optimizer: Literal["adamw", "adam", "sgd"] = "adamw"
    weight_decay: float = Field(5e-4, ge=0.0)
    grad_clip: float | None = None
    max_steps: int | None = Field(None, ge=1)  # cap on the optimizer steps of each training run
    control: bool = False  # also train the final mask from a random re-initialisation
    seed: int = 0

    @model_validator(mode="after")
    def _rewind_inside_training(self) -> Lottery:
        if self.rewind_epoch >= self.epochs:
            raise ValueError(
                f"rewind_epoch={self.rewind_epoch} must be smaller than epochs={self.epochs} "
                "(rewinding to the end of training leaves nothing to retrain)"
            )
        return self

    def round_sparsity(self, r: int) -> float:
        """The sparsity after round ``r`` (1-based): the same fraction of what is left each time."""
        return 1.0 - (1.0 - self.sparsity) ** (r / self.rounds)


@dataclass
class Ticket:
    """The result of :func:`find_ticket`."""

    model: nn.Module  # the retrained ticket, masks attached
    masks: dict[str, torch.Tensor]  # layer name -> 0/1 mask of its weight
    rewind_state: dict[str, torch.Tensor]  # the weights the ticket starts from (dense tensors)
    history: list[dict[str, Any]] = field(default_factory=list)  # one entry per training run
    control: nn.Module | None = None  # the random re-initialisation control, when trained
    dense_state: dict[str, torch.Tensor] | None = None  # after the dense run (None: resumed past)
    resumed_from: str | None = None  # "dense" or "round N" when a workdir run was continued

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "sparsity": round(_masked_sparsity(self.masks), 6),
            "layers": len(self.masks),
            "history": self.history,
        }
        if self.resumed_from is not None:
            out["resumed_from"] = self.resumed_from
        return out

    def summary(self) -> str:
        runs = ", ".join(
            f"{h['run']}: sparsity {h['sparsity']:.2f}"
            + (f", val {h['val']:.4g}" if h.get("val") is not None else "")
            for h in self.history
        )
        return f"lottery ticket over {len(self.masks)} layers; {runs}"


def _masked_sparsity(masks: dict[str, torch.Tensor]) -> float:
    total = sum(m.numel() for m in masks.values())
    return sum(int((m == 0).sum()) for m in masks.values()) / max(total, 1)


def _layers(model: nn.Module, scope: Scope | None) -> list[tuple[str, nn.Module]]:
    return (scope or Scope()).select(model, WEIGHTED)


def _global_masks(
    model: nn.Module, names: list[str], target: float, old: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Masks removing exactly ``round(target * N)`` weights over the layers ``names``: the ones
    already removed first, then the smallest |w| of the (masked) trained weights."""
    mods = dict(model.named_modules())
    scores = []
    for n in names:
        w = mods[n].weight.detach().abs().flatten()  # type: ignore[union-attr]
        if n in old:
            w = torch.where(old[n].flatten() > 0, w, torch.full_like(w, -1.0))
        scores.append(w)
    flat = torch.cat(scores)
    k = int(round(target * flat.numel()))
    keep = torch.ones_like(flat)
    if k > 0:
        keep[flat.argsort(stable=True)[:k]] = 0.0
    out, start = {}, 0
    for n, s in zip(names, scores, strict=True):
        w = mods[n].weight
        out[n] = keep[start : start + s.numel()].reshape(w.shape).clone()
        start += s.numel()
    return out


def apply_ticket(
    model: nn.Module, masks: dict[str, torch.Tensor], state: dict[str, torch.Tensor] | None = None
) -> nn.Module:
    """A copy of ``model`` with ``state`` loaded (when given) and ``masks`` attached: the ticket,
    ready to train (the masked weights stay zero through training and export)."""
    out = copy.deepcopy(model)
    if state is not None:
        load_into(out, state)
    mods = dict(out.named_modules())
    for name, mask in masks.items():
        if name not in mods or not isinstance(mods[name], WEIGHTED):
            raise CheckpointError(
                f"the ticket masks layer {name!r}, which the model lacks (or is not a Linear/Conv)",
                fix="apply the ticket to the architecture it was found on",
            )
        shape = tuple(mods[name].weight.shape)  # type: ignore[union-attr]
        if tuple(mask.shape) != shape:
            raise CheckpointError(
                f"the ticket's mask of layer {name!r} is {tuple(mask.shape)}, its weight {shape}",
                fix="apply the ticket to the architecture it was found on",
            )
        _attach(mods[name], mask.to(torch.float32))
    return out


def _plain_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict with masked weights as plain ``weight`` keys (no parametrization keys)."""
    return {k: v.detach().clone() for k, v in baked_state_dict(model).items()}


def _reinitialise(model: nn.Module, seed: int) -> nn.Module:
    """A copy with every parameter drawn afresh (each module's own ``reset_parameters``)."""
    out = copy.deepcopy(model)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for m in out.modules():
            reset = getattr(m, "reset_parameters", None)
            if callable(reset):
                reset()
    return out


def _loss(reference: nn.Module) -> Callable[[nn.Module, Any], torch.Tensor]:
    """Cross entropy on batches with targets; without targets, the reference model's outputs are
    the targets (KL divergence of softmaxed logits)."""
    reference = copy.deepcopy(reference).eval()

    def loss(model: nn.Module, raw: Any) -> torch.Tensor:
        b = next(iter_batches([raw], what="training data", check_finite=False))
        out = b.run(model)
        if not isinstance(out, torch.Tensor):
            raise ConfigError(
                f"prune.lottery trains models that return one tensor; got {type(out).__name__}",
                fix="wrap the model so that forward returns the logits tensor",
            )
        logits = out.reshape(-1, out.shape[-1])
        if isinstance(b.target, torch.Tensor):
            return F.cross_entropy(logits, b.target.reshape(-1).long())
        with torch.no_grad():
            ref = b.run(reference).reshape(-1, out.shape[-1])
        return F.kl_div(F.log_softmax(logits, -1), F.log_softmax(ref, -1), log_target=True,
                        reduction="batchmean")  # fmt: skip

    return loss


class _Snapshot:
    """``val_fn`` for ``fit`` that also keeps the weights after epoch ``at`` (the rewind point)."""

    def __init__(self, at: int, val_fn: Callable[[nn.Module], float] | None) -> None:
        self.at, self.val_fn, self.epoch = at, val_fn, 0
        self.state: dict[str, torch.Tensor] | None = None
        self.last: float | None = None

    def __call__(self, model: nn.Module) -> float:
        self.epoch += 1
        if self.epoch == self.at:
            self.state = _plain_state(model)
        self.last = float(self.val_fn(model)) if self.val_fn is not None else None
        return 0.0 if self.last is None else self.last


def _train(
    model: nn.Module,
    data: Any,
    cfg: Lottery,
    loss_fn: Callable[[nn.Module, Any], torch.Tensor],
    *,
    epochs: int,
    snapshot: _Snapshot,
    progress: bool,
    description: str,
) -> TrainResult:
    return fit(model, data, loss_fn=loss_fn, epochs=epochs, lr=cfg.lr, optimizer=cfg.optimizer,
               weight_decay=cfg.weight_decay, grad_clip=cfg.grad_clip, max_steps=cfg.max_steps,
               val_fn=snapshot, restore_best=False, seed=cfg.seed, progress=progress,
               description=description)  # fmt: skip


# --- resumable state ---------------------------------------------------------------------------


def _state_file(workdir: PathLike) -> Path:
    return Path(workdir) / "lottery_state.safetensors"


def _save_state(
    workdir: PathLike,
    cfg: Lottery,
    done: int,
    masks: dict[str, torch.Tensor],
    rewind: dict[str, torch.Tensor],
    trained: dict[str, torch.Tensor],
    history: list[dict[str, Any]],
) -> None:
    tensors = {f"mask.{k}": v for k, v in masks.items()}
    tensors.update({f"rewind.{k}": v for k, v in rewind.items()})
    tensors.update({f"trained.{k}": v for k, v in trained.items()})
    meta = {"format": FORMAT, "config": json.dumps(cfg.to_dict(), sort_keys=True),
            "rounds_done": str(done), "history": json.dumps(history)}  # fmt: skip
    Path(workdir).mkdir(parents=True, exist_ok=True)
    save_weights(tensors, _state_file(workdir), metadata=meta)


def _split(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}


def _load_state(workdir: PathLike, cfg: Lottery) -> tuple[int, dict[str, Any], list[Any]] | None:
    path = _state_file(workdir)
    if not path.exists():
        return None
    meta = read_metadata(path)
    if meta.get("format") != FORMAT:
        raise CheckpointError(
            f"{str(path)!r} is not a lottery state file",
            fix="point workdir at an empty or a lottery run's folder",
        )
    if json.loads(meta["config"]) != cfg.to_dict():
        raise CheckpointError(
            f"{str(path)!r} was written by a run with another config",
            fix="rerun with the same config, or use a fresh workdir",
        )
    t = load_weights(path)
    parts = {p: _split(t, f"{p}.") for p in ("mask", "rewind", "trained")}
    return int(meta["rounds_done"]), parts, json.loads(meta["history"])


# --- the procedure -----------------------------------------------------------------------------


def find_ticket(
    model: nn.Module,
    data: Any,
    config: Lottery | None = None,
    *,
    scope: Scope | None = None,
    val_fn: Callable[[nn.Module], float] | None = None,
    workdir: PathLike | None = None,
    progress: bool = True,
) -> Ticket:
    """Find a lottery ticket of ``model`` on the training batches ``data`` (see the module
    docstring); the input model is not changed. ``val_fn(model) -> float`` is recorded after every
    training run (and every epoch's call is passed on to ``fit``)."""
    cfg = config or Lottery()
    start = copy.deepcopy(model).eval()
    names = [n for n, _ in _layers(start, scope)]
    if not names:
        raise ConfigError(
            "prune.lottery found no Linear/Conv layer in scope",
            fix="widen the scope, or prune a model with Linear/Conv layers",
        )
    loss_fn = _loss(model)
    retrain_epochs = cfg.epochs - cfg.rewind_epoch
    history: list[dict[str, Any]] = []
    masks: dict[str, torch.Tensor] = {}
    resumed: str | None = None
    saved = _load_state(workdir, cfg) if workdir is not None else None
    dense: dict[str, torch.Tensor] | None = None
    if saved is not None:
        done, parts, history = saved
        masks, rewind, trained = parts["mask"], parts["rewind"], parts["trained"]
        net = apply_ticket(start, masks, trained)
        resumed = "dense" if done == 0 else f"round {done}"
        dense = trained if done == 0 else None
    else:
        done, net = 0, copy.deepcopy(start)
        snap = _Snapshot(cfg.rewind_epoch, val_fn)
        if cfg.rewind_epoch == 0:
            snap.state = _plain_state(net)
        res = _train(net, data, cfg, loss_fn, epochs=cfg.epochs, snapshot=snap,
                     progress=progress, description="lottery: dense")  # fmt: skip
        # max_steps may end the run before the rewind epoch: rewind to where it ended
        rewind = snap.state if snap.state is not None else _plain_state(net)
        history.append({"run": "dense", "sparsity": 0.0, "val": snap.last,
                        "epochs": res.epochs_run, "steps": res.steps})  # fmt: skip
        dense = _plain_state(net)
        if workdir is not None:
            _save_state(workdir, cfg, 0, {}, rewind, dense, history)
    for r in range(done + 1, cfg.rounds + 1):
        masks = _global_masks(net, names, cfg.round_sparsity(r), masks)
        net = apply_ticket(start, masks, rewind)
        snap = _Snapshot(-1, val_fn)
        res = _train(net, data, cfg, loss_fn, epochs=retrain_epochs, snapshot=snap,
                     progress=progress, description=f"lottery: round {r}/{cfg.rounds}")  # fmt: skip
        history.append(
            {
                "run": f"round {r}",
                "sparsity": round(_masked_sparsity(masks), 6),
                "val": snap.last,
                "epochs": res.epochs_run,
                "steps": res.steps,
            }
        )
        if workdir is not None:
            _save_state(workdir, cfg, r, masks, rewind, _plain_state(net), history)
    control = None
    if cfg.control:
        control = apply_ticket(_reinitialise(start, cfg.seed + 1), masks)
        snap = _Snapshot(-1, val_fn)
        res = _train(control, data, cfg, loss_fn, epochs=retrain_epochs, snapshot=snap,
                     progress=progress, description="lottery: random re-init control")  # fmt: skip
        history.append(
            {
                "run": "random re-init",
                "sparsity": round(_masked_sparsity(masks), 6),
                "val": snap.last,
                "epochs": res.epochs_run,
                "steps": res.steps,
            }
        )
    return Ticket(net.eval(), masks, rewind, history, control, dense, resumed)


@METHODS.register(
    "prune.lottery",
    config=Lottery,
    summary="lottery ticket: iterative magnitude pruning with weight rewinding (trains; masks)",
    aliases={"lottery_ticket": {}, "imp": {}},
    example={"sparsity": 0.5, "rounds": 2, "epochs": 2, "rewind_epoch": 1, "max_steps": 2},
)
def prune_lottery(
    model: nn.Module,
    config: Lottery | None = None,
    *,
    data: Any,
    scope: Scope | None = None,
    val_fn: Callable[[nn.Module], float] | None = None,
    workdir: PathLike | None = None,
    progress: bool = False,
) -> tuple[nn.Module, Ticket]:
    """The retrained lottery ticket of ``model`` (masks attached) and its :class:`Ticket`."""
    t = find_ticket(model, data, config, scope=scope, val_fn=val_fn, workdir=workdir,
                    progress=progress)  # fmt: skip
    return t.model, t


def save_ticket(ticket: Ticket, directory: PathLike) -> Path:
    """Write ``ticket.safetensors`` (masks and rewound weights) and ``ticket.json`` (history,
    sparsity) into ``directory``, each atomically."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {f"mask.{k}": v for k, v in ticket.masks.items()}
    tensors.update({f"rewind.{k}": v for k, v in ticket.rewind_state.items()})
    save_weights(tensors, out / "ticket.safetensors", metadata={"format": FORMAT})
    write_json(out / "ticket.json", {"format": FORMAT, **ticket.to_dict(),
                                     "layer_sparsity": sparsity(ticket.model)})  # fmt: skip
    return out


def load_ticket(
    directory: PathLike,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, Any]]:
    """``(masks, rewound weights, ticket.json)`` of a ticket written by :func:`save_ticket`."""
    d = Path(directory)
    path = d / "ticket.safetensors"
    if not path.is_file() or read_metadata(path).get("format") != FORMAT:
        raise CheckpointError(
            f"{str(path)!r} is not a slimkit lottery ticket",
            fix="point load_ticket at a folder written by save_ticket",
        )
    t = load_weights(path)
    info = json.loads((d / "ticket.json").read_text()) if (d / "ticket.json").is_file() else {}
    return _split(t, "mask."), _split(t, "rewind."), info
