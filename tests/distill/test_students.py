"""Student builders: depth (evenly spaced blocks kept, DistilBERT-style), width (MACs target), both
(Minitron-style); the student starts from the teacher's weights and reloads from its record."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import slimkit as sk
from slimkit.errors import ConfigError
from slimkit.prune.blocks import evenly_spaced
from slimkit.zoo import create_model


def _n(m: torch.nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def test_evenly_spaced_keeps_each_stack_first_and_last() -> None:
    assert evenly_spaced([f"b.{i}" for i in range(4)], 2) == ["b.1", "b.2"]
    six = evenly_spaced([f"e.{i}" for i in range(12)], 6)
    assert len(six) == 6 and "e.0" not in six and "e.11" not in six
    assert len(evenly_spaced(["a.1", "a.2", "b.1", "b.2", "b.3"], 2)) == 2


def test_depth_and_width_student_of_a_gpt_reloads(tmp_path: Path) -> None:
    torch.manual_seed(0)
    gpt = create_model("gpt", n_layer=4).eval()
    ids = torch.randint(0, 256, (2, 32))
    half = sk.distill.student(gpt, depth=0.5, example_inputs=(ids,))
    assert [type(b).__name__ for b in half.blocks] == ["Block", "Dropped", "Dropped", "Block"]
    assert torch.equal(half.blocks[0].ln1.weight, gpt.blocks[0].ln1.weight)  # from the teacher
    both = sk.distill.student(gpt, depth=0.5, macs=0.5, example_inputs=(ids,))
    assert _n(both) < _n(half) < _n(gpt)
    sk.prune.save_pruned(both, tmp_path / "s")
    again = sk.load(tmp_path / "s", model=create_model("gpt", n_layer=4))
    assert torch.equal(again(ids), both(ids))


def test_student_needs_a_size() -> None:
    gpt = create_model("gpt", n_layer=2)
    with pytest.raises(ConfigError, match="depth=, width= or macs="):
        sk.distill.student(gpt)
    with pytest.raises(ConfigError, match="not a fraction"):
        sk.distill.student(gpt, depth=2.0, example_inputs=(torch.zeros(1, 8, dtype=torch.long),))
