from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from slimkit.core.io import safe_torch_load
from slimkit.core.train import fit
from slimkit.errors import CheckpointError, DataError


def tiny_model() -> nn.Module:
    torch.manual_seed(0)
    # dropout makes the result depend on the RNG state, which resuming must reproduce
    return nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Dropout(0.2), nn.Linear(16, 3))


def loader(batch_size: int = 8) -> DataLoader:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(64, 6, generator=g)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()
    gen = torch.Generator().manual_seed(0)
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=True, generator=gen)


def same_weights(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


class Crash(Exception):
    pass


def test_resume_after_a_crash_gives_identical_weights(tmp_path: Path) -> None:
    def val_fn(model: nn.Module) -> float:  # a function of the weights only
        x, y = loader().dataset.tensors
        with torch.no_grad():
            return -float(nn.functional.cross_entropy(model(x), y))

    kw = dict(epochs=4, lr=1e-2, weight_decay=1e-2, val_fn=val_fn, progress=False)
    reference = tiny_model()
    fit(reference, loader(), **kw)

    def crash_at_epoch_3(model: nn.Module, seen: list[int] = []) -> float:  # noqa: B006
        seen.append(1)
        if len(seen) == 3:
            raise Crash
        return val_fn(model)

    ckpt = tmp_path / "run.ckpt"
    with pytest.raises(Crash):
        fit(tiny_model(), loader(), checkpoint=ckpt, **{**kw, "val_fn": crash_at_epoch_3})
    assert safe_torch_load(ckpt)["epoch"] == 2  # written after epochs 1 and 2, not after the crash

    resumed = tiny_model()  # a fresh process: new model, new loader
    result = fit(resumed, loader(), checkpoint=ckpt, **kw)
    assert result.resumed_from == 2
    assert result.epochs_run == 4 and len(result.history) == 4
    assert same_weights(resumed, reference)
    assert not same_weights(resumed, tiny_model())  # it did train


def test_two_epochs_then_two_more_equals_four(tmp_path: Path) -> None:
    kw = dict(lr=1e-2, scheduler="none", progress=False)
    reference = tiny_model()
    fit(reference, loader(), epochs=4, **kw)
    ckpt = tmp_path / "run.ckpt"
    fit(tiny_model(), loader(), epochs=2, checkpoint=ckpt, **kw)
    model = tiny_model()
    result = fit(model, loader(), epochs=4, checkpoint=ckpt, **kw)
    assert result.resumed_from == 2 and result.steps == 4 * 8
    assert same_weights(model, reference)


def test_checkpoint_of_another_kind_is_refused(tmp_path: Path) -> None:
    ckpt = tmp_path / "other.ckpt"
    torch.save({"weights": torch.zeros(2)}, ckpt)
    with pytest.raises(CheckpointError, match="not a checkpoint written by slimkit"):
        fit(tiny_model(), loader(), epochs=1, lr=1e-2, checkpoint=ckpt, progress=False)


def test_nan_loss_names_epoch_and_step() -> None:
    x = torch.randn(32, 6)
    x[20] = float("nan")  # in the third batch of 8
    data = DataLoader(TensorDataset(x, torch.zeros(32, dtype=torch.long)), batch_size=8)
    with pytest.raises(DataError, match=r"epoch 1, step 3.*lower the learning rate"):
        fit(tiny_model(), data, epochs=2, lr=1e-2, progress=False)


def test_early_stopping_stops_and_restores_the_best_epoch() -> None:
    values = iter([0.5, 0.9, 0.8, 0.7, 0.6, 0.95])
    snapshots: list[dict[str, torch.Tensor]] = []

    def val_fn(model: nn.Module) -> float:
        assert not model.training
        snapshots.append({k: v.clone() for k, v in model.state_dict().items()})
        return next(values)

    model = tiny_model()
    result = fit(model, loader(), epochs=10, lr=1e-2, val_fn=val_fn, early_stopping_patience=2,
                 progress=False)  # fmt: skip
    assert result.stopped_early and result.epochs_run == 4  # best at 2, then 3 and 4 are worse
    assert result.best_epoch == 2 and result.best_val == pytest.approx(0.9)
    assert all(torch.equal(v, snapshots[1][k]) for k, v in model.state_dict().items())


def test_modes_max_steps_and_global_rng() -> None:
    modes: list[bool] = []

    def loss_fn(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        modes.append(model.training)
        return nn.functional.cross_entropy(model(batch[0]), batch[1])

    torch.manual_seed(123)
    before = torch.get_rng_state()
    model = tiny_model().eval()
    torch.set_rng_state(before)
    result = fit(model, loader(), loss_fn=loss_fn, epochs=5, lr=1e-2, max_steps=11, progress=False)
    assert torch.equal(torch.get_rng_state(), before)  # fit leaves the caller's RNG alone
    assert result.steps == 11 and len(modes) == 11 and all(modes)
    assert result.epochs_run == 2  # 8 steps per epoch
    assert not model.training
    assert result.history[-1]["lr"] == pytest.approx(0.0, abs=1e-9)  # cosine reached its end
