"""Artifacts are all or nothing: a run killed (SIGKILL) while writing leaves a folder that
``sk.load`` refuses by name, a second run into the same folder is refused while the first
writes, and a rerun after the kill completes the artifact."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

import slimkit as sk
from slimkit.errors import CheckpointError, OutputError
from slimkit.pipeline.artifact import INCOMPLETE, LOCK
from slimkit.zoo import create_model

RECIPE = {"model": "zoo:mlp", "steps": [{"prune.channel": {"ratio": 0.5}}]}

# the run, with the ONNX export stalled: the kill lands after the weights are written
SCRIPT = """
import sys, time
import slimkit.pipeline.artifact as a
def stalled(*args, **kwargs):
    time.sleep(120)
a.export_model = stalled
import slimkit as sk
sk.run({recipe!r}, out=sys.argv[1])
"""


def _after_kill(out: Path, case: str, rows: list[dict[str, Any]]) -> None:
    """The killed run's folder must be refused by ``sk.load`` (``named``); one that loads is a
    ``partial`` artifact. The row goes to the reliability table."""
    try:
        sk.load(out, model=create_model("mlp"))
        outcome, line = "partial", "a killed run's folder loaded"
    except CheckpointError as e:
        outcome, line = "named", str(e).splitlines()[0]
    rows.append({"case": f"kill: {case}", "surface": "api", "outcome": outcome, "error": line})
    assert outcome == "named", line
    assert "incomplete artifact" in line


def _wait_for(path: Path, proc: subprocess.Popen[bytes], seconds: float = 120.0) -> None:
    deadline = time.monotonic() + seconds
    while not path.exists():
        assert proc.poll() is None, "the writer exited before writing"
        assert time.monotonic() < deadline, f"{path.name} never appeared"
        time.sleep(0.05)


@contextlib.contextmanager
def _writer(script: str, out: Path) -> Iterator[subprocess.Popen[bytes]]:
    """A run in another process; SIGKILLed when the block ends (it never finishes by itself)."""
    proc = subprocess.Popen([sys.executable, "-c", script, str(out)])
    try:
        yield proc
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()


QUANT = {"model": "zoo:mlp", "data": "zoo:mlp:inputs", "steps": [
    {"quant.ptq": {"speed_check": False, "float_prefix": False, "num_batches": 2}}]}  # fmt: skip


@pytest.mark.slow
def test_killed_quantization_leaves_a_refused_folder_and_a_rerun_completes(
    tmp_path: Path, reliability_rows: list[dict[str, Any]]
) -> None:
    out = tmp_path / "q"
    with _writer(SCRIPT.format(recipe=QUANT), out) as proc:
        _wait_for(out / "model.safetensors", proc)
    _after_kill(out, "quantization, after the weights", reliability_rows)
    res = sk.run(QUANT, out=out)
    assert not (out / INCOMPLETE).exists() and res.kernels is not None
    assert res.kernels.integer > 0 and (out / "model.onnx").exists()


@pytest.mark.slow
def test_killed_writer_leaves_a_refused_folder_and_a_rerun_completes(
    tmp_path: Path, reliability_rows: list[dict[str, Any]]
) -> None:
    out = tmp_path / "p"
    with _writer(SCRIPT.format(recipe=RECIPE), out) as proc:
        _wait_for(out / "model.safetensors", proc)  # weights written, export stalled
        assert (out / INCOMPLETE).exists() and (out / LOCK).exists()
        with pytest.raises(OutputError, match=f"process {proc.pid}.*writing"):
            sk.run(RECIPE, out=out)  # one writer at a time
    _after_kill(out, "pruning, during the export", reliability_rows)
    res = sk.run(RECIPE, out=out)  # takes over the dead writer's lock
    assert not (out / INCOMPLETE).exists() and not (out / LOCK).exists()
    assert (out / "model.onnx").exists() and res.onnx is not None
    loaded = sk.load(out, model=create_model("mlp"))
    assert sum(p.numel() for p in loaded.parameters()) < sum(
        p.numel() for p in create_model("mlp").parameters()
    )


FINETUNE = {"model": "zoo:digits_cnn", "seed": 0,
            "steps": [{"prune.channel": {"ratio": 0.3}}, {"finetune": {"epochs": 3}}]}  # fmt: skip
RUN = "import sys, slimkit as sk; sk.run({recipe!r}, out=sys.argv[1])"


@pytest.mark.slow
def test_killed_fine_tuning_resumes_and_ends_where_an_uninterrupted_run_ends(
    tmp_path: Path, reliability_rows: list[dict[str, Any]]
) -> None:
    from safetensors.torch import load_file

    whole = sk.run(FINETUNE, out=tmp_path / "whole")
    assert "resumed_from_epoch" not in whole.steps[1].details
    out = tmp_path / "cut"
    with _writer(RUN.format(recipe=FINETUNE), out) as proc:
        deadline = time.monotonic() + 120
        while not list(out.glob(".finetune-*.ckpt")):  # the first epoch's checkpoint
            assert proc.poll() is None, "the run ended before its first checkpoint"
            assert time.monotonic() < deadline
            time.sleep(0.02)
    assert not (out / "model.safetensors").exists()  # nothing but the checkpoint was written
    res = sk.run(FINETUNE, out=out)
    assert res.steps[1].details["resumed_from_epoch"] >= 1  # went on, and said so
    assert not list(out.glob(".finetune-*.ckpt"))  # cleaned up once done
    a, b = load_file(tmp_path / "whole" / "model.safetensors"), load_file(out / "model.safetensors")
    same = a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    reliability_rows.append({"case": "kill: fine-tuning, then rerun", "surface": "api",
                             "outcome": "ok" if same else "partial",
                             "error": "" if same else "resumed weights differ"})  # fmt: skip
    assert same  # bit-identical
