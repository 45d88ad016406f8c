from __future__ import annotations

import hashlib
import sys
import time

import pytest
import torch
from torch import nn

from slimkit.errors import ConfigError, RegistryError
from slimkit.zoo.tasks import TASKS, Task, evaluate, load_task, pycode, shapes

NAMES = TASKS.names()


def test_the_four_tasks_are_registered() -> None:
    assert set(NAMES) == {"digits", "shapes", "pycode_lm", "pycode_cls"}
    with pytest.raises(RegistryError, match="did you mean 'digits'"):
        load_task("digit")


@pytest.mark.parametrize("name", NAMES)
def test_shapes_dtypes_and_ranges(name: str) -> None:
    task = load_task(name)
    assert task.kind == TASKS.entry(name).meta["kind"]
    for split in ("train", "val", "test"):
        x, y = task.split(split).tensors
        assert len(x) == len(y) > 0
        assert tuple(x.shape[1:]) == task.input_shape
        assert y.dtype == torch.int64
        assert int(y.min()) >= 0 and int(y.max()) < task.num_classes
        if task.kind == "language_model":
            assert x.dtype == torch.int64 and y.shape == x.shape
            assert torch.equal(x[:, 1:], y[:, :-1])  # targets are the next bytes
            assert int(x.min()) >= 0 and int(x.max()) < 256
        elif x.dtype.is_floating_point:
            assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0
    if task.classes is not None:
        assert len(task.classes) == task.num_classes


def _row_hashes(x: torch.Tensor) -> set[str]:
    return {hashlib.sha1(row.numpy().tobytes()).hexdigest() for row in x}


@pytest.mark.parametrize("name", NAMES)
def test_splits_are_disjoint(name: str) -> None:
    task = load_task(name)
    hashes = {s: _row_hashes(task.split(s).tensors[0]) for s in ("train", "val", "test")}
    assert not hashes["train"] & hashes["test"]
    assert not hashes["val"] & hashes["test"]
    assert not hashes["train"] & hashes["val"]


def test_pycode_splits_share_no_file() -> None:
    lm = pycode.lm_files()
    assert all(lm.values())
    assert not set(lm["train"]) & set(lm["test"])
    assert not set(lm["train"]) & set(lm["val"]) and not set(lm["val"]) & set(lm["test"])
    for pkg, files in pycode.cls_files().items():
        assert all(files.values()), pkg
        every = files["train"] + files["val"] + files["test"]
        assert len(every) == len(set(every)) and all(f.startswith(pkg + "/") for f in every)
    for rel in lm["train"] + lm["val"] + lm["test"]:
        assert not {"test", "tests", "site-packages"} & set(rel.split("/")), rel


def test_pycode_corpus_is_identified_by_python_version_and_hashes() -> None:
    task = load_task("pycode_lm")
    assert task.meta["python"].startswith(f"{sys.version_info.major}.{sys.version_info.minor}.")
    assert set(task.meta["sha256"]) == {"train", "val", "test"}
    listed = {f for files in task.meta["files"].values() for f in files}
    total = sum(len(data) for rel, data in pycode._source_files() if rel in listed)
    assert 0.5 * pycode.CORPUS_BYTES < total < 1.2 * pycode.CORPUS_BYTES


@pytest.mark.parametrize("name", NAMES)
def test_building_twice_gives_the_same_data(name: str) -> None:
    if name == "shapes":  # the full build takes seconds: compare the generator itself
        a, b = shapes.generate(300, seed=5), shapes.generate(300, seed=5)
        assert (a[0] == b[0]).all() and (a[1] == b[1]).all()
        assert not (shapes.generate(300, seed=6)[0] == a[0]).all()
        return
    cached, fresh = load_task(name), TASKS.get(name)()
    for split in ("train", "val", "test"):
        for t1, t2 in zip(cached.split(split).tensors, fresh.split(split).tensors, strict=True):
            assert torch.equal(t1, t2)


@pytest.mark.parametrize("name", ["shapes", "pycode_cls", "digits"])
def test_classes_are_balanced(name: str) -> None:
    task = load_task(name)
    for split in ("train", "val", "test"):
        counts = torch.bincount(task.split(split).tensors[1], minlength=task.num_classes)
        if name == "digits":  # stratified from sklearn's own slightly unequal classes
            assert int(counts.max()) - int(counts.min()) <= 0.1 * int(counts.max()) + 2
        else:
            assert int(counts.min()) == int(counts.max())


def test_shapes_generation_is_quick_and_balanced() -> None:
    t0 = time.perf_counter()
    x, y = shapes.generate(2000, seed=0)
    assert time.perf_counter() - t0 < 5.0  # about 0.4 s here: 12k images in about 2.5 s
    assert x.shape == (2000, 3, 32, 32) and x.dtype.name == "float32"
    assert (torch.bincount(torch.from_numpy(y)) == 200).all()
    # a shape is drawn: images of a class differ from their background on average
    assert float(x.std(axis=(2, 3)).mean()) > 0.05


def test_loader_and_calibration() -> None:
    task = load_task("digits")
    x, y = next(iter(task.loader("train", 16)))
    assert x.shape == (16, 1, 8, 8) and torch.equal(x, task.train.tensors[0][:16])
    a = next(iter(task.loader("train", 16, shuffle=True, seed=3)))[0]
    b = next(iter(task.loader("train", 16, shuffle=True, seed=3)))[0]
    assert torch.equal(a, b) and not torch.equal(a, x)
    calib = task.calibration(20, batch_size=8)
    assert [len(c) for c in calib] == [8, 8, 4]
    train_rows = _row_hashes(task.train.tensors[0])
    assert _row_hashes(torch.cat(calib)) <= train_rows  # calibration data come from train only
    with pytest.raises(ConfigError):
        task.calibration(10**6)
    with pytest.raises(ConfigError, match="no split"):
        task.loader("valid")


class Uniform(nn.Module):
    """Equal logits for every class: (B, out), or (B, T, out) with ``per_token``."""

    def __init__(self, out: int, per_token: bool = False) -> None:
        super().__init__()
        self.out, self.per_token = out, per_token

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.zeros(*x.shape[: 2 if self.per_token else 1], self.out)


def test_evaluate_metrics_of_a_uniform_model() -> None:
    lm = load_task("pycode_lm")
    m = evaluate(Uniform(256, per_token=True), lm, "val")
    assert m["perplexity"] == pytest.approx(256.0, rel=1e-5)
    assert m["bits_per_byte"] == pytest.approx(8.0, rel=1e-6)
    cls: Task = load_task("pycode_cls")
    model = Uniform(cls.num_classes).train()
    m = evaluate(model, cls, "test")
    # argmax of equal logits is class 0: exactly the share of class 0 in a balanced split
    assert m["top1"] == pytest.approx(1 / cls.num_classes)
    assert model.training  # the mode is restored
