from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from slimkit.errors import DataError, ExportError
from slimkit.export.onnx import export_onnx
from slimkit.export.ort import ort_session, run_session


def _cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5),
    ).eval()  # fmt: skip


@pytest.mark.parametrize("exporter", ["torchscript", "dynamo"])
def test_export_dynamic_batch_and_parity(tmp_path: Path, exporter: str) -> None:
    m = _cnn()
    rep = export_onnx(
        m, tmp_path / "m.onnx", example_inputs=torch.randn(2, 3, 8, 8), exporter=exporter
    )  # type: ignore[arg-type]
    assert rep.max_abs_err is not None and rep.max_abs_err < 1e-5  # measured ~2e-7
    assert rep.parity_batch == 3 and rep.size_bytes > 0
    sess = ort_session(rep.path)
    x = torch.randn(7, 3, 8, 8)  # a batch size never seen at export
    (out,) = run_session(sess, [x])
    np.testing.assert_allclose(out, m(x).detach().numpy(), atol=1e-5)
    assert m.training is False


def test_multiple_inputs_and_outputs(tmp_path: Path) -> None:
    class Two(nn.Module):
        def forward(self, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return a + b, a * b

    rep = export_onnx(
        Two(), tmp_path / "t.onnx", example_inputs=(torch.ones(1, 2), torch.ones(1, 2))
    )
    assert rep.input_names == ["input_0", "input_1"] and rep.output_names == [
        "output_0",
        "output_1",
    ]
    assert rep.max_abs_err == 0.0


def test_parity_failure_is_an_error_and_leaves_no_file(tmp_path: Path) -> None:
    class Sneaky(nn.Module):
        """Bakes the traced batch size into the graph: wrong at any other batch size."""

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.reshape(int(x.shape[0]), -1).sum(0, keepdim=True).expand(2, -1)

    with pytest.raises(ExportError, match="shape|differs"):
        export_onnx(Sneaky(), tmp_path / "s.onnx", example_inputs=torch.ones(2, 3))

    class Broken(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            raise RuntimeError("boom")

    with pytest.raises(DataError, match="Broken fails on example_inputs.*boom"):
        export_onnx(Broken(), tmp_path / "b.onnx", example_inputs=torch.ones(2, 3))
    assert not (tmp_path / "b.onnx").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp files left


def test_bad_inputs_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ExportError, match="example_inputs must be"):
        export_onnx(nn.Identity(), tmp_path / "x.onnx", example_inputs=[3])  # type: ignore[list-item]
    with pytest.raises(ExportError, match="does not exist"):
        ort_session(tmp_path / "missing.onnx")
    (tmp_path / "junk.onnx").write_bytes(b"not onnx")
    with pytest.raises(ExportError, match="could not load"):
        ort_session(tmp_path / "junk.onnx")
