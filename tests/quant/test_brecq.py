"""Block reconstruction (BRECQ-style): blocks found by module path, the rounding of a block's
layers learned together, kept only where it lowers the held-out block error; ORT runs the codes."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

import slimkit as sk
from slimkit.export.qdq import export_quantized
from slimkit.quant.brecq import block_of


def test_blocks_are_module_paths_up_to_the_first_number() -> None:
    assert block_of("layer1.0.conv1") == "layer1.0"
    assert block_of("features.3.conv.0.0") == "features.3"
    assert block_of("blocks.1.attn.qkv") == "blocks.1"
    assert block_of("fc") == "fc" and block_of("head.proj") == "head"


class _Res(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(c, c, 3, padding=1), nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x + self.conv2(torch.relu(self.conv1(x))))


def _net() -> nn.Module:
    torch.manual_seed(0)
    stem = [nn.Conv2d(3, 16, 3, padding=1), nn.ReLU()]
    head = [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10)]
    return nn.Sequential(*stem, _Res(16), _Res(16), *head).eval()


def _sqnr(ref: torch.Tensor, out: torch.Tensor) -> float:
    return float(10 * torch.log10(ref.pow(2).sum() / (ref - out).pow(2).sum()))


def test_block_reconstruction_beats_nearest_at_4_bits_and_exports(tmp_path: Path) -> None:
    torch.manual_seed(0)
    calib = [torch.randn(8, 3, 12, 12) for _ in range(8)]
    x = torch.randn(32, 3, 12, 12)
    model = _net()
    base = sk.quant.PTQ(weight_bits=4, speed_check=False, float_prefix=False)
    near = sk.quantize(model, base, data=calib)
    rec = sk.quantize(model, base.replace(brecq=100), data=calib)
    summary = rec.meta["slimkit"]["brecq"]
    assert "block reconstruction: 4 blocks" in summary  # the stem, two residual blocks, the head
    blocks = rec.meta["slimkit"]["brecq_blocks"]  # per block, in order
    assert [b["block"] for b in blocks] == ["0", "2", "3", "6"]
    assert all(b["loss"] <= b["loss_nearest"] for b in blocks)
    with torch.no_grad():
        ref = model(x)
        s_near, s_rec = _sqnr(ref, near(x)), _sqnr(ref, rec(x))
    assert s_rec > s_near + 0.5, (s_near, s_rec)  # measured on held-out inputs: see the summary
    rep, _ = export_quantized(rec, tmp_path / "q.onnx", example_inputs=(x[:2],))
    assert rep.max_abs_err is not None and rep.max_abs_err < 1e-4


def test_started_from_adaround_it_keeps_only_what_lowers_the_model_output_error() -> None:
    """Block by block, the learned codes stay only where the model's own output error on the
    held-out calibration batches (every 4th) goes down: never worse there than AdaRound alone."""
    torch.manual_seed(0)
    calib = [torch.randn(8, 3, 12, 12) for _ in range(8)]
    held = torch.cat([calib[3], calib[7]])
    model = _net()
    ada = sk.quant.PTQ(weight_bits=4, speed_check=False, float_prefix=False, adaround=50)
    a = sk.quantize(model, ada, data=calib)
    ab = sk.quantize(model, ada.replace(brecq=100), data=calib)
    with torch.no_grad():
        ref = model(held)
        assert _sqnr(ref, ab(held)) >= _sqnr(ref, a(held)) - 1e-3
    assert "block reconstruction: 4 blocks" in ab.meta["slimkit"]["brecq"]


def test_report_gives_each_blocks_error_with_its_float_layers() -> None:
    """Each block's error with its float layers on the same quantized inputs and activation grid:
    on this small network (inputs white, 4-bit codes) below the codes' error in every block, and
    the report says by how much (``headroom``, geometric mean)."""
    from slimkit.core.data import Batch
    from slimkit.quant.brecq import reconstruct

    torch.manual_seed(0)
    calib = [torch.randn(8, 3, 12, 12) for _ in range(8)]
    base = sk.quant.PTQ(weight_bits=4, speed_check=False, float_prefix=False)
    q = sk.quantize(_net(), base, data=calib)
    rep = reconstruct(q, [Batch(i, (x,)) for i, x in enumerate(calib)], iterations=20)
    assert len(rep.blocks) == 4
    for b in rep.blocks:
        assert b.loss_float < b.loss_nearest, b.to_dict()  # 4-bit codes cost something
        assert b.to_dict()["loss_float"] == b.loss_float
    assert rep.headroom() > 1.0
    assert f"{rep.headroom():.2f}x with float layers" in rep.summary()
