"""Lottery tickets (prune.lottery): the masks reach the sparsity, nest round by round and survive
training; the ticket starts from the rewound weights; an interrupted run resumes to the same
result; the ticket round-trips through its files; the random control shares only the mask."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

import slimkit as sk
from slimkit.errors import CheckpointError, ConfigError
from slimkit.prune.lottery import (
    Lottery,
    _global_masks,
    apply_ticket,
    find_ticket,
    load_ticket,
    save_ticket,
)
from slimkit.prune.unstructured import sparsity


def _task(n: int = 256, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 20, generator=g)
    y = (x @ torch.randn(20, 4, generator=g)).argmax(1)
    return [(x[i : i + 32], y[i : i + 32]) for i in range(0, n, 32)]


def _mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 4))


def _acc(model: nn.Module, data: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
    with torch.no_grad():
        hits = sum(int((model(x).argmax(1) == y).sum()) for x, y in data)
    return hits / sum(len(y) for _, y in data)


CFG = Lottery(sparsity=0.75, rounds=2, epochs=4, rewind_epoch=1, lr=1e-2)


def test_config_refuses_rewinding_past_training_and_splits_sparsity_evenly() -> None:
    with pytest.raises(ConfigError, match="rewind_epoch=3 must be smaller than epochs=3"):
        Lottery.from_dict({"epochs": 3, "rewind_epoch": 3})
    cfg = Lottery(sparsity=0.75, rounds=2)
    assert cfg.round_sparsity(1) == pytest.approx(0.5)  # half of what is left, twice
    assert cfg.round_sparsity(2) == pytest.approx(0.75)


def test_global_masks_remove_exactly_k_and_keep_earlier_zeros() -> None:
    model = _mlp()
    names = ["0", "2"]
    first = _global_masks(model, names, 0.5, {})
    total = sum(m.numel() for m in first.values())
    assert sum(int((m == 0).sum()) for m in first.values()) == round(0.5 * total)
    # earlier zeros stay zero even where the weight is now large
    with torch.no_grad():
        model[0].weight.mul_(100.0)
    second = _global_masks(model, names, 0.7, first)
    for n in names:
        assert bool((second[n][first[n] == 0] == 0).all())
    assert sum(int((m == 0).sum()) for m in second.values()) == round(0.7 * total)


def test_ticket_reaches_its_sparsity_trains_and_starts_from_the_rewound_weights() -> None:
    data, model = _task(), _mlp()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    t = find_ticket(model, data, CFG.replace(control=True), progress=False)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # input alone
    assert sparsity(t.model)["(global)"] == pytest.approx(0.75, abs=1e-3)
    assert [h["run"] for h in t.history] == ["dense", "round 1", "round 2", "random re-init"]
    assert _acc(t.model, data) > 0.7  # it trained (a chance guess is 0.25)
    # the rewind point is the weights after epoch 1: neither the input nor the trained ones
    assert not torch.equal(t.rewind_state["0.weight"], before["0.weight"])
    # the masks survived training: every masked weight is exactly zero
    for name, mask in t.masks.items():
        w = dict(t.model.named_modules())[name].weight
        assert bool((w[mask == 0] == 0).all())
    # the control: same mask, other weights
    assert t.control is not None
    cw = t.control[0].weight
    assert bool((cw[t.masks["0"] == 0] == 0).all())
    assert not torch.allclose(cw, t.model[0].weight)


def test_rewind_epoch_zero_rewinds_to_the_input_weights() -> None:
    model = _mlp()
    t = find_ticket(model, _task(), CFG.replace(rewind_epoch=0), progress=False)
    for k, v in model.state_dict().items():
        assert torch.equal(t.rewind_state[k], v), k


def test_an_interrupted_run_resumes_to_the_same_ticket(tmp_path: Path) -> None:
    data, model = _task(), _mlp()
    whole = find_ticket(model, data, CFG, progress=False)

    calls = {"n": 0}

    def crash_in_round_two(m: nn.Module) -> float:
        calls["n"] += 1
        if calls["n"] > CFG.epochs + (CFG.epochs - CFG.rewind_epoch):  # dense + round 1 done
            raise KeyboardInterrupt
        return 0.0

    with pytest.raises(KeyboardInterrupt):
        find_ticket(model, data, CFG, val_fn=crash_in_round_two, workdir=tmp_path, progress=False)
    resumed = find_ticket(model, data, CFG, workdir=tmp_path, progress=False)
    assert resumed.resumed_from == "round 1"
    assert [h["run"] for h in resumed.history] == ["dense", "round 1", "round 2"]
    for k, v in whole.model.state_dict().items():
        torch.testing.assert_close(resumed.model.state_dict()[k], v, rtol=0, atol=1e-6)
    with pytest.raises(CheckpointError, match="another config"):
        find_ticket(model, data, CFG.replace(sparsity=0.5), workdir=tmp_path, progress=False)


def test_ticket_round_trips_through_its_files(tmp_path: Path) -> None:
    data, model = _task(), _mlp()
    t = find_ticket(model, data, CFG, progress=False)
    save_ticket(t, tmp_path / "ticket")
    masks, rewind, info = load_ticket(tmp_path / "ticket")
    assert info["sparsity"] == pytest.approx(0.75, abs=1e-3) and len(info["history"]) == 3
    again = apply_ticket(_mlp(seed=5), masks, rewind)
    for name in masks:
        torch.testing.assert_close(
            dict(again.named_modules())[name].weight, t.rewind_state[f"{name}.weight"] * masks[name]
        )
    with pytest.raises(CheckpointError, match=r"mask of layer '0' is \(64, 20\), its weight"):
        apply_ticket(nn.Sequential(nn.Linear(20, 4)), masks)
    with pytest.raises(CheckpointError, match="masks layer '2'"):
        apply_ticket(nn.Sequential(nn.Linear(20, 64)), masks)
    with pytest.raises(CheckpointError, match="not a slimkit lottery ticket"):
        load_ticket(tmp_path)


def test_the_verb_runs_it_and_reports_the_rounds() -> None:
    out = sk.prune(_mlp(), Lottery(sparsity=0.5, rounds=1, epochs=2, rewind_epoch=0), data=_task())
    rep = sk.report(out)
    assert rep.method == "prune.lottery"
    assert rep.record["sparsity"] == pytest.approx(0.5, abs=1e-3)
    assert [h["run"] for h in rep.record["history"]] == ["dense", "round 1"]
    assert rep.changed["zero_weights"][1] > rep.changed["zero_weights"][0]


@pytest.mark.slow
def test_the_example_recipe_gives_a_sparse_digits_cnn_that_keeps_its_accuracy(
    tmp_path: Path,
) -> None:
    from slimkit.export.ort import OrtModule, ort_session
    from slimkit.zoo import evaluate, load_task

    recipe = Path(__file__).resolve().parents[2] / "recipes" / "digits_lottery.yaml"
    res = sk.run(recipe, out=tmp_path)
    assert sparsity(res.model)["(global)"] == pytest.approx(0.8, abs=1e-3)
    task = load_task("digits")
    dense = evaluate(res.source.model, task)["top1"]
    deployed = OrtModule(ort_session(tmp_path / "model.onnx"))
    # fine-tuned at 55 % then 80 % sparsity, as run in ONNX Runtime
    assert evaluate(deployed, task)["top1"] >= dense - 0.02
