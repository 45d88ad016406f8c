"""Per-layer ratios, exact widths, composed records, iterative schedules and automatic targets."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from slimkit.analyze.profile import profile_model
from slimkit.errors import CheckpointError, ConfigError
from slimkit.prune import Channel, load_pruned, prune_channels, pruning_record, save_pruned
from slimkit.prune.auto import Target, prune_to_target
from slimkit.prune.channel import compose_slices, group_widths
from slimkit.prune.schedule import prune_iterative
from slimkit.zoo import evaluate, load_task, pretrained
from slimkit.zoo.models import create_model, example_inputs


def _cnn() -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    torch.manual_seed(0)
    return create_model("cnn_bn").eval(), example_inputs("cnn_bn", 2)


def _macs(m: nn.Module, x: tuple[torch.Tensor, ...]) -> int:
    return profile_model(m, x).total_macs


def test_per_layer_ratios_override_the_default() -> None:
    model, x = _cnn()
    before = group_widths(model, x)
    first = next(iter(before))
    small = prune_channels(model, Channel(ratio=0.0, ratios={first: 0.5}), example_inputs=x)
    after = group_widths(small, x)
    assert after[first] == before[first] - int(before[first] * 0.5)
    assert all(after[k] == v for k, v in before.items() if k != first)
    with pytest.raises(ConfigError, match="not in"):
        prune_channels(model, Channel(ratios={first: 1.5}), example_inputs=x)


def test_exact_widths_and_unknown_group_error() -> None:
    model, x = _cnn()
    widths = {k: max(1, v // 3) for k, v in group_widths(model, x).items()}
    small = prune_channels(model, Channel(ratio=0.0), example_inputs=x, widths=widths)
    assert group_widths(small, x) == widths
    with pytest.raises(ConfigError, match="not prunable here"):
        prune_channels(model, Channel(), example_inputs=x, widths={"no.such.layer": 3})


def test_pruning_twice_composes_the_record_and_reloads(tmp_path) -> None:  # type: ignore[no-untyped-def]
    model, x = _cnn()
    once = prune_channels(model, Channel(ratio=0.25), example_inputs=x)
    twice = prune_channels(once, Channel(ratio=0.25), example_inputs=x)
    save_pruned(twice, tmp_path)
    back = load_pruned(tmp_path, model=model)
    with torch.no_grad():
        torch.testing.assert_close(back(*x), twice(*x), atol=1e-6, rtol=0)
    assert sum(p.numel() for p in twice.parameters()) < sum(p.numel() for p in once.parameters())


def test_compose_slices_maps_back_to_original_positions() -> None:
    first = {"a.weight": {0: [0, 2, 4, 6]}}
    then = {"a.weight": {0: [1, 3], 1: [0]}, "b.weight": {1: [2]}}
    out = compose_slices(first, then)
    assert out == {"a.weight": {0: [2, 6], 1: [0]}, "b.weight": {1: [2]}}


@pytest.mark.slow
def test_iterative_schedule_reaches_the_one_shot_widths_and_resumes(tmp_path) -> None:  # type: ignore[no-untyped-def]
    task = load_task("digits")
    dense = pretrained("digits_cnn", progress=False)
    x = task.test.tensors[0][:1]
    loader = task.loader("train", 64, shuffle=True)
    cfg = Channel(ratio=0.5)
    one_shot = prune_channels(dense, cfg, example_inputs=(x,))
    kw = dict(example_inputs=(x,), train_loader=loader, steps=2, epochs_per_step=1, progress=False)
    small = prune_iterative(dense, cfg, checkpoint_dir=tmp_path, **kw)  # type: ignore[arg-type]
    assert group_widths(small, (x,)) == group_widths(one_shot, (x,))
    assert evaluate(small, task)["top1"] > 0.85  # measured 0.95
    assert (tmp_path / "step_1" / "pruning.json").is_file()
    assert (tmp_path / "step_2" / "pruning.json").is_file()
    # resuming after the last step trains nothing more and gives the same model
    again = prune_iterative(dense, cfg, checkpoint_dir=tmp_path, **kw)  # type: ignore[arg-type]
    with torch.no_grad():
        torch.testing.assert_close(again(x), small(x), atol=1e-6, rtol=0)
    back = load_pruned(tmp_path / "step_2", model=dense)
    with torch.no_grad():
        torch.testing.assert_close(back(x), small(x), atol=1e-6, rtol=0)
    with pytest.raises(ConfigError, match="steps"):
        prune_iterative(dense, cfg, steps=0, **{k: v for k, v in kw.items() if k != "steps"})  # type: ignore[arg-type]


@pytest.mark.parametrize("what", ["macs", "params"])
@pytest.mark.parametrize("allocation", ["uniform", "sensitivity"])
def test_target_fraction_is_reached(what: str, allocation: str) -> None:
    torch.manual_seed(0)
    model = create_model("resnet18", width_mult=0.25).eval()
    x = (torch.randn(1, 3, 32, 32),)
    data = [torch.randn(4, 3, 32, 32)]
    # widths in multiples of 8 on every CPU (the default block is 16 with AVX-512: coarser)
    tgt = Target(**{what: 0.5}, allocation=allocation, channel=Channel(ratio=0, round_to=8))  # type: ignore[arg-type]
    small = prune_to_target(model, tgt, example_inputs=x, data=data)
    if what == "macs":
        before, after = _macs(model, x), _macs(small, x)
    else:
        before = sum(p.numel() for p in model.parameters())
        after = sum(p.numel() for p in small.parameters())
    assert 0.40 <= after / before <= 0.52, after / before  # cost model is near exact
    rec = pruning_record(small)
    assert rec is not None and rec["method"] == "prune.auto"
    assert set(rec["auto"]["widths"])  # per-group (before, after) widths are reported
    with torch.no_grad():
        assert small(*x).shape == model(*x).shape


def test_sensitivity_allocation_spares_the_sensitive_group() -> None:
    # most units of the second hidden layer barely reach the output, every unit of the first does:
    # the allocation must cut the second one deeper
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4)
    ).eval()
    with torch.no_grad():
        model[4].weight[:, 4:].mul_(1e-3)
    x = (torch.randn(1, 8),)
    small = prune_to_target(model, Target(macs=0.6, allocation="sensitivity"), example_inputs=x,
                            data=[torch.randn(64, 8)])  # fmt: skip
    widths = pruning_record(small)["auto"]["widths"]  # type: ignore[index]
    assert widths["2"][1] < widths["0"][1]


def test_target_errors_are_clear() -> None:
    model, x = _cnn()
    with pytest.raises(ValueError, match="exactly one of"):
        Target(macs=0.5, speedup=2.0)
    with pytest.raises(ValueError, match="exactly one of"):
        Target()
    with pytest.raises(ConfigError, match="calibration data"):
        prune_to_target(model, Target(macs=0.5, allocation="sensitivity"), example_inputs=x)


@pytest.mark.slow
def test_speedup_target_is_measured_and_met() -> None:
    torch.manual_seed(0)
    model = create_model("resnet18", width_mult=0.5).eval()
    x = (torch.randn(1, 3, 64, 64),)
    small = prune_to_target(model, Target(speedup=1.5, search_steps=6), example_inputs=x)
    rec = pruning_record(small)
    assert rec is not None
    assert rec["auto"]["measured_speedup"] >= 1.5
    assert _macs(small, x) < _macs(model, x)


def test_load_pruned_refuses_a_foreign_architecture(tmp_path) -> None:  # type: ignore[no-untyped-def]
    model, x = _cnn()
    save_pruned(prune_to_target(model, Target(macs=0.5), example_inputs=x), tmp_path)
    with pytest.raises(CheckpointError):
        load_pruned(tmp_path, model=nn.Sequential(nn.Linear(2, 2)))
    back = load_pruned(tmp_path, model=copy.deepcopy(model))
    assert _macs(back, x) < _macs(model, x)


def test_speedup_target_on_a_hardware_profile_uses_the_roofline() -> None:
    from slimkit.analyze.hardware import load_profile
    from slimkit.analyze.roofline import roofline

    torch.manual_seed(0)
    model = create_model("resnet18", width_mult=0.5).eval()
    x = (torch.randn(1, 3, 64, 64),)
    small = prune_to_target(model, Target(speedup=2.0, hw="raspberry_pi_4", search_steps=12),
                            example_inputs=x)  # fmt: skip
    rec = pruning_record(small)["auto"]  # type: ignore[index]
    hw = load_profile("raspberry_pi_4")
    got = (roofline(profile_model(model, x), hw).total_s
           / roofline(profile_model(small, x), hw).total_s)  # fmt: skip
    assert 2.0 <= got <= 2.2, got  # within the default 10 % tolerance
    assert rec["predicted_speedup_on_raspberry_pi_4"] == pytest.approx(got, rel=1e-3)


def test_default_widths_follow_the_cpu_channel_block() -> None:
    from slimkit.core.machine import channel_multiple, cpu_info

    block = channel_multiple()
    assert block == (16 if "avx512f" in cpu_info()["flags"] else 8)
    assert Target(macs=0.5).channel.round_to == block
    torch.manual_seed(0)
    model = create_model("resnet18", width_mult=0.25).eval()  # groups 16..128 wide
    x = (torch.randn(1, 3, 32, 32),)
    small = prune_to_target(model, Target(macs=0.5, channel=Channel(ratio=0, round_to=16)),
                            example_inputs=x)  # fmt: skip
    rec = pruning_record(small)
    assert rec is not None
    for before, after in rec["auto"]["widths"].values():
        # a group narrower than two blocks rounds to half a block, so 16-wide groups can shrink
        assert after % (16 if before >= 32 else 8) == 0 or after == before
    assert _macs(small, x) < 0.55 * _macs(model, x)


def test_report_of_a_direct_prune_to_target_call_rebuilds_its_target() -> None:
    import slimkit as sk
    from slimkit.prune.auto import Target, prune_to_target

    model, x = _cnn()
    small = prune_to_target(model, Target(macs=0.5), example_inputs=x)
    rep = sk.report(small)
    assert rep.method == "prune.auto" and rep.config == Target(macs=0.5).to_dict()
