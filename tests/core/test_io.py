from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from torch import nn

from slimkit.core.io import (
    atomic_write,
    load_into,
    load_weights,
    read_metadata,
    safe_torch_load,
    save_weights,
)
from slimkit.errors import CheckpointError


class _Evil:
    def __reduce__(self):  # noqa: ANN204 - would run a command if unpickled blindly
        return (os.system, ("echo pwned",))


def test_safetensors_round_trip_with_tied_weights(tmp_path: Path) -> None:
    m = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 10, bias=False))
    m[1].weight = m[0].weight  # tied: safetensors refuses shared storage unless copied
    p = save_weights(m, tmp_path / "w.safetensors", metadata={"note": "tied"})
    sd = load_weights(p)
    assert torch.equal(sd["0.weight"], m[0].weight) and torch.equal(sd["1.weight"], m[0].weight)
    assert read_metadata(p) == {"note": "tied"}
    fresh = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 10, bias=False))
    load_into(fresh, sd)
    assert torch.equal(fresh[1].weight, m[1].weight)


def test_atomic_write_leaves_nothing_on_failure(tmp_path: Path) -> None:
    target = tmp_path / "out.json"
    target.write_text("old")
    with pytest.raises(RuntimeError), atomic_write(target) as f:
        f.write("half")
        raise RuntimeError("interrupted")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]  # no temp file left behind
    with atomic_write(target) as f:
        f.write("new")
    assert target.read_text() == "new" and target.stat().st_mode & 0o044  # readable by others


def test_missing_corrupted_and_wrong_shape(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        load_weights(tmp_path / "nope.safetensors")
    p = save_weights({"w": torch.ones(3)}, tmp_path / "w.safetensors")
    p.write_bytes(p.read_bytes()[:20])  # truncated
    with pytest.raises(CheckpointError, match="not a readable safetensors"):
        load_weights(p)
    with pytest.raises(CheckpointError, match=r"shape mismatch.*weight"):
        load_into(nn.Linear(2, 2), {"weight": torch.ones(3, 3), "bias": torch.ones(2)})
    with pytest.raises(CheckpointError, match=r"missing \['bias'\]"):
        load_into(nn.Linear(2, 2), {"weight": torch.ones(2, 2)})


def test_pickles_that_are_not_plain_weights_are_refused(tmp_path: Path) -> None:
    p = tmp_path / "evil.pt"
    torch.save({"w": torch.ones(2), "x": _Evil()}, p)
    with pytest.raises(CheckpointError, match="does not execute pickled code"):
        safe_torch_load(p)
    with pytest.raises(CheckpointError, match="does not execute pickled code"):
        load_weights(p)
    ok = tmp_path / "ok.pt"
    torch.save({"state_dict": {"w": torch.ones(2)}}, ok)
    assert torch.equal(load_weights(ok)["w"], torch.ones(2))
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"\x00not a checkpoint")
    with pytest.raises(CheckpointError, match="not a readable PyTorch checkpoint"):
        safe_torch_load(junk)
    meta = tmp_path / "meta.pt"
    torch.save({"epoch": 3}, meta)
    with pytest.raises(CheckpointError, match="not a state dict of tensors"):
        load_weights(meta)
