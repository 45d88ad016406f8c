"""``.pt2`` programs (torch.export.save): loaded without running pickled code, rebuilt into
ordinary layers, and taken by every verb; a crafted or damaged file is refused by name."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import pytest
import torch
from torch import nn

import slimkit as sk
from slimkit.core.io import load_program
from slimkit.core.rebuild import program_module
from slimkit.core.refs import resolve_model_file
from slimkit.errors import CheckpointError


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(8, 4)).eval()  # fmt: skip


@pytest.fixture
def program(tmp_path: Path) -> Path:
    path = tmp_path / "net.pt2"
    torch.export.save(torch.export.export(_net(), (torch.randn(2, 3, 16, 16),)), str(path))
    return path


class Marker:
    """A pickle payload that, if unpickled, creates a file: the proof of code execution."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (Path.touch, (self.path,))


def _with_payload(src: Path, dest: Path, marker: Path) -> Path:
    buf = io.BytesIO()
    torch.save(((Marker(marker),), {}), buf)
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dest, "w") as zout:
        for item in zin.infolist():
            data = zin.read(item.filename)
            if "sample_inputs" in item.filename:
                data = buf.getvalue()
            zout.writestr(item, data)
    return dest


def test_program_is_rebuilt_into_layers_and_computes_the_same(program: Path) -> None:
    ep = load_program(program)
    gm = program_module(ep).eval()  # ep.module() itself refuses .eval()
    kinds = [type(m).__name__ for _, m in gm.named_children()]
    assert kinds == ["Conv2d", "BatchNorm2d", "Conv2d", "Linear"]
    x = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(gm(x), _net()(x), rtol=0, atol=1e-6)


def test_program_goes_through_the_verbs(program: Path, tmp_path: Path) -> None:
    rm = resolve_model_file(str(program))
    (x,) = rm.inputs(2)
    data = [torch.randn(2, 3, 16, 16) for _ in range(4)]
    q = sk.quantize(rm.model, sk.quant.PTQ(speed_check=False, float_prefix=False), data=data)
    assert q.meta["slimkit"]["quantized_layers"] == 3  # BN folded into the first conv
    p = sk.prune(rm.model, sk.prune.Channel(ratio=0.5), example_inputs=(x,))
    assert sum(t.numel() for t in p.parameters()) < sum(t.numel() for t in rm.model.parameters())
    rep = sk.export_onnx(rm.model, tmp_path / "net.onnx", example_inputs=(x,), dynamic_batch=False)
    assert rep.max_abs_err is not None and rep.max_abs_err < 1e-4
    assert sk.analyze(rm.model, (x,)).profile is not None


def test_pickled_payload_is_refused_and_never_runs(program: Path, tmp_path: Path) -> None:
    marker = tmp_path / "executed"
    evil = _with_payload(program, tmp_path / "evil.pt2", marker)
    with pytest.raises(CheckpointError, match="pickled Python objects.*Fix:"):
        load_program(evil)
    with pytest.raises(CheckpointError):
        resolve_model_file(str(evil))
    assert not marker.exists()
    torch.export.load(str(program))  # torch's loader is back to normal afterwards


def test_damaged_files_are_refused_by_name(tmp_path: Path) -> None:
    junk = tmp_path / "junk.pt2"
    junk.write_bytes(b"not a zip at all")
    with pytest.raises(CheckpointError, match="not a torch.export archive"):
        load_program(junk)
    empty_zip = tmp_path / "empty.pt2"
    with zipfile.ZipFile(empty_zip, "w") as z:
        z.writestr("x.txt", "hello")
    with pytest.raises(CheckpointError, match="not a readable torch.export program"):
        load_program(empty_zip)
