"""Data-parallel training under ``torchrun`` (gloo on CPU): a 2-process distillation ends at the
1-process run's metric within noise, and a 2-process run killed after an epoch resumes from its
checkpoint to the weights of an uninterrupted 2-process run, bit for bit."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = r"""
import json, os, sys
import torch
from torch import nn
import slimkit as sk
from slimkit.core.train import distributed, fit

out, die_after, mode = sys.argv[1], int(sys.argv[2]), sys.argv[3]
torch.set_num_threads(1)
g = torch.Generator().manual_seed(0)
x = torch.randn(2048, 16, generator=g)
y = (x @ torch.randn(16, 4, generator=g)).argmax(1)
train = [(x[i:i + 64], y[i:i + 64]) for i in range(0, 1536, 64)]
torch.manual_seed(0)
teacher = nn.Sequential(nn.Linear(16, 128), nn.ReLU(), nn.Linear(128, 4))
fit(teacher, train, epochs=8, lr=1e-2, progress=False)  # the same teacher on every rank
torch.manual_seed(1)
student = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))

def val(m):
    if die_after and len(seen) == die_after:
        os._exit(3)  # killed after that epoch's checkpoint
    seen.append(1)
    return float((m(x[1536:]).argmax(1) == y[1536:]).float().mean())

seen = []
ckpt = out + ".ckpt"
if mode == "qat":  # W4A8 QAT of the teacher, trained on the same path
    s = sk.quantize(teacher, sk.quant.QAT(weight_bits=4, epochs=3, lr=1e-3), data=train)
    rank, world = distributed()
    if rank == 0:
        json.dump({"world": world, "top1": val(s), "qat": s.meta["slimkit"]["qat"]["sqnr_db_qat"]},
                  open(out, "w"))
    sys.exit(0)
s = sk.distill(student, teacher, sk.distill.Response(epochs=12, lr=1e-2), data=train,
               val_fn=val, checkpoint=ckpt)
rank, world = distributed()
if rank == 0:
    rec = sk.report(s).record
    torch.save(s.state_dict(), out + ".pt")
    json.dump({"world": world, "top1": val(s), "resumed": rec.get("resumed_from_epoch"),
               "history": rec["history"]}, open(out, "w"))
"""


def _run(
    tmp: Path, name: str, procs: int, die_after: int = 0, mode: str = "distill"
) -> subprocess.CompletedProcess:
    script = tmp / "train.py"
    script.write_text(SCRIPT)
    launch = [sys.executable] if procs == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone",
        f"--nproc_per_node={procs}"]  # fmt: skip
    return subprocess.run([*launch, str(script), str(tmp / name), str(die_after), mode],
                          capture_output=True, text=True, timeout=240)  # fmt: skip


@pytest.mark.slow
def test_two_processes_match_one_and_resume_bit_identically(tmp_path: Path) -> None:
    import torch

    one = _run(tmp_path, "one.json", 1)
    assert one.returncode == 0, one.stderr[-2000:]
    two = _run(tmp_path, "two.json", 2)
    assert two.returncode == 0, two.stderr[-2000:]
    r1 = json.loads((tmp_path / "one.json").read_text())
    r2 = json.loads((tmp_path / "two.json").read_text())
    assert (r1["world"], r2["world"]) == (1, 2)
    assert r2["history"][-1]["loss"] < r2["history"][0]["loss"]
    # the 2-process run averages gradients over twice the samples per step (half the steps)
    assert abs(r1["top1"] - r2["top1"]) <= 0.05, (r1["top1"], r2["top1"])

    cut = _run(tmp_path, "cut.json", 2, die_after=2)  # killed after epoch 2's checkpoint
    assert cut.returncode != 0 and not (tmp_path / "cut.json").exists()
    assert (tmp_path / "cut.json.ckpt").exists()
    again = _run(tmp_path, "cut.json", 2)
    assert again.returncode == 0, again.stderr[-2000:]
    r3 = json.loads((tmp_path / "cut.json").read_text())
    assert r3["resumed"] == 2
    a, b = torch.load(tmp_path / "two.json.pt"), torch.load(tmp_path / "cut.json.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)  # bit-identical to the uninterrupted run


@pytest.mark.slow
def test_two_process_qat_matches_one(tmp_path: Path) -> None:
    runs = [_run(tmp_path, f"q{n}.json", n, mode="qat") for n in (1, 2)]
    for r in runs:
        assert r.returncode == 0, r.stderr[-2000:]
    one, two = (json.loads((tmp_path / f"q{n}.json").read_text()) for n in (1, 2))
    assert (one["world"], two["world"]) == (1, 2)
    assert abs(one["top1"] - two["top1"]) <= 0.05, (one, two)
