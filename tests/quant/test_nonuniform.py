"""Low-bit and non-uniform weights (quant.lowbit, experimental): the quantizers' numerics, the
distinct values each layer really holds, fine-tuning, the packed ONNX file (its size, its code
types, ORT == PyTorch), bad configs, and the recipe step."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import slimkit as sk
from slimkit.errors import ConfigError
from slimkit.quant.nonuniform import (
    LowBit,
    LowBitLayer,
    binary,
    kmeans,
    nearest,
    pow2,
    pow2_levels,
    quantize_weight,
    ternary,
)
from slimkit.testing.numerics import sqnr
from slimkit.zoo import create_model, example_inputs


def _layers(q: nn.Module) -> dict[str, LowBitLayer]:
    return {n: m for n, m in q.named_modules() if isinstance(m, LowBitLayer)}


def test_binary_is_sign_times_mean_abs_per_channel() -> None:
    w = torch.randn(6, 40)
    codes, levels, scale = binary(w)
    assert torch.allclose(scale, w.abs().mean(1))
    assert torch.equal(levels[codes.long()], torch.where(w >= 0, 1.0, -1.0))


def test_ternary_zeroes_below_the_threshold_and_scales_by_the_kept_mean() -> None:
    w = torch.randn(5, 100)
    codes, levels, scale = ternary(w, 0.7)
    q = levels[codes.long()]
    kept = w.abs() > 0.7 * w.abs().mean(1, keepdim=True)
    assert torch.equal(q == 0, ~kept) and torch.equal(q, torch.sign(w) * kept)
    assert torch.allclose(scale, (w.abs() * kept).sum(1) / kept.sum(1))


def test_pow2_levels_are_powers_of_two_and_the_scale_search_helps() -> None:
    levels = pow2_levels(3)  # 2^3 - 1 levels: 0, +-1, +-1/2, +-1/4
    assert levels.tolist() == [-1, -0.5, -0.25, 0, 0.25, 0.5, 1]
    w = torch.randn(8, 256)
    _, _, searched = pow2(w, 3, grid=20)
    _, _, plain = pow2(w, 3, grid=1)
    assert torch.equal(plain, w.abs().amax(1))

    def err(s: torch.Tensor) -> float:
        return float(((levels[nearest(w / s[:, None], levels)] * s[:, None] - w) ** 2).sum())

    assert err(searched) < 0.8 * err(plain)  # measured 0.71x


def test_kmeans_ends_on_a_lloyd_fixed_point_better_than_its_linear_start() -> None:
    w = torch.randn(16, 64) ** 3  # heavy tails: linear levels waste most of their range
    codes, c = kmeans(w, 3, iterations=50)
    assert c.numel() == 8 and bool((c[1:] > c[:-1]).all())
    x, idx = w.reshape(-1), codes.reshape(-1).long()
    for k in idx.unique():  # every centroid is the mean of its cluster, every weight is nearest
        assert torch.isclose(c[k], x[idx == k].mean(), atol=1e-5)
    assert torch.equal(nearest(x, c), idx)
    lin = torch.linspace(float(x.min()), float(x.max()), 8)
    start = float(((lin[nearest(x, lin)] - x) ** 2).sum())
    assert float(((c[idx] - x) ** 2).sum()) < 0.35 * start  # measured 0.26x


# scheme, bits -> (levels per layer, SQNR floor in dB on cnn_bn with random weights and every
# layer quantized: measured value minus a margin, the measured value in the comment)
SCHEMES = {
    ("binary", None): (2, 2.5),  # 3.8
    ("ternary", None): (3, 2.5),  # 3.5
    ("pow2", 3): (7, 9.0),  # 11.3
    ("kmeans", 2): (4, 9.0),  # 10.7
    ("kmeans", 4): (16, 20.0),  # 22.5
}


@pytest.mark.parametrize(("scheme", "bits"), list(SCHEMES))
def test_each_layer_holds_the_promised_number_of_values(scheme: str, bits: int | None) -> None:
    model = create_model("cnn_bn").eval()
    (x,) = example_inputs("cnn_bn", batch=8)
    q = sk.quantize(model, LowBit(scheme=scheme, bits=bits, keep_first_last=False))  # type: ignore[arg-type]
    n_levels, floor = SCHEMES[(scheme, bits)]
    layers = _layers(q)
    assert len(layers) == 3
    for name, m in layers.items():
        assert m.levels.numel() == n_levels and int(m.codes.max()) < n_levels
        w = m.weight().reshape(m.codes.shape[0], -1)
        per_channel = max(len(row.unique()) for row in w)  # kmeans: one codebook for the layer
        assert (len(w.unique()) if scheme == "kmeans" else per_channel) <= n_levels, name
        assert q.meta["slimkit"]["layers"][name]["levels"] == n_levels
    with torch.no_grad():
        assert sqnr(model(x), q(x)) >= floor


def test_first_and_last_layers_stay_float_and_the_record_counts_bytes() -> None:
    model = create_model("residual").eval()
    q = sk.quantize(model, "binary")
    rec = q.meta["slimkit"]
    assert rec["float_layers"] == ["features.0.0", "fc"] and "experimental" in rec["note"]
    assert isinstance(q.fc, nn.Linear) and len(_layers(q)) == 5  # 7 layers, ends float
    codes = sum(m.codes.numel() for m in _layers(q).values())
    assert rec["packed_bytes"] == codes * 2 // 8 + sum(
        4 * (m.levels.numel() + m.scale.numel()) for m in _layers(q).values()
    )  # codes at the 2 bits ONNX stores them in
    assert rec["size_bytes"] < rec["fp32_bytes"] / 2
    assert "not faster" in " ".join(sk.report(q).notes)


def test_fine_tuning_by_distillation_wins_back_accuracy() -> None:
    model = create_model("mlp").eval()
    data = [example_inputs("mlp", batch=16, seed=i) for i in range(20)]
    (x,) = example_inputs("mlp", batch=64, seed=99)
    cfg = LowBit(scheme="binary", keep_first_last=False)
    plain = sk.quantize(model, cfg)
    tuned = sk.quantize(model, cfg.replace(epochs=5, lr=1e-3), data=data)
    with torch.no_grad():
        ref = model(x)
        before, after = sqnr(ref, plain(x)), sqnr(ref, tuned(x))
    assert after > before + 2.0  # measured 6.3 -> 9.4 dB
    assert all(int(m.codes.max()) <= 1 for m in _layers(tuned).values())
    assert len(tuned.meta["slimkit"]["finetune"]["history"]) == 5
    assert not any(p.requires_grad for p in tuned.parameters())


def test_kmeans_fine_tuning_moves_the_centroids_and_keeps_the_codes() -> None:
    model = create_model("mlp").eval()
    data = [example_inputs("mlp", batch=16, seed=i) for i in range(10)]
    cfg = LowBit(scheme="kmeans", bits=2, keep_first_last=False)
    plain = sk.quantize(model, cfg)
    tuned = sk.quantize(model, cfg.replace(epochs=2, lr=1e-3), data=data)
    for (name, a), b in zip(_layers(plain).items(), _layers(tuned).values(), strict=True):
        assert torch.equal(a.codes, b.codes), name
        assert not torch.equal(a.levels, b.levels) and b.levels.numel() == 4


def test_bad_configs_are_config_errors_with_a_fix() -> None:
    with pytest.raises(ConfigError, match=r"binary.*bits=2.*Fix:.*bits: 1"):
        LowBit(scheme="binary", bits=2)
    with pytest.raises(ConfigError, match=r"kmeans.*bits=9.*Fix:.*from 1 to 8"):
        LowBit(scheme="kmeans", bits=9)
    with pytest.raises(ConfigError, match=r"pow2.*bits=1"):
        LowBit.from_dict({"scheme": "pow2", "bits": 1})
    with pytest.raises(ConfigError, match=r"unknown key 'shceme'.*did you mean 'scheme'"):
        LowBit.from_dict({"shceme": "binary"})
    with pytest.raises(ConfigError, match=r"needs training data.*Fix:"):
        sk.quantize(create_model("mlp"), LowBit(epochs=1))


class Wide(nn.Module):
    """Big enough layers that the file is the weights, not the graph."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 64, 3, padding=1)
        self.body = nn.Sequential(nn.Conv2d(64, 128, 3, padding=1), nn.ReLU(),
                                  nn.Conv2d(128, 128, 3, padding=1), nn.ReLU())  # fmt: skip
        self.fc = nn.Linear(128, 512)
        self.head = nn.Linear(512, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.body(self.conv(x)).mean((2, 3))  # (B, 128)
        return self.head(torch.relu(self.fc(h)))


@pytest.mark.parametrize(
    ("scheme", "bits", "onnx_type", "min_ratio"),
    [
        ("binary", None, "UINT2", 12.0),  # measured 13.9x (2-bit storage: 16x at most)
        ("kmeans", 4, "UINT4", 6.5),  # measured 7.6x
        ("kmeans", 6, "UINT8", 3.5),  # measured 3.9x
    ],
)
def test_the_onnx_file_stores_small_codes_and_runs_like_pytorch(
    scheme: str, bits: int | None, onnx_type: str, min_ratio: float, tmp_path: Path
) -> None:
    import onnx
    from onnx import numpy_helper

    from slimkit.export.qdq import kernel_report

    torch.manual_seed(0)
    model = Wide().eval()
    x = torch.randn(2, 3, 8, 8)
    q = sk.quantize(model, LowBit(scheme=scheme, bits=bits, keep_first_last=False))  # type: ignore[arg-type]
    f32 = sk.export_onnx(model, tmp_path / "f.onnx", example_inputs=(x,))
    rep = sk.export_onnx(q, tmp_path / "q.onnx", example_inputs=(x,))
    assert rep.max_abs_err is not None and rep.max_abs_err < 1e-5  # ORT == the PyTorch module
    assert f32.size_bytes / rep.size_bytes >= min_ratio, (f32.size_bytes, rep.size_bytes)
    assert any(onnx_type in n for n in rep.notes), rep.notes
    graph = onnx.load(str(tmp_path / "q.onnx")).graph
    codes = [i for i in graph.initializer if i.name.endswith(".codes")]
    assert len(codes) == 5 and {onnx.TensorProto.DataType.Name(c.data_type) for c in codes} == {
        onnx_type
    }
    for c in codes:
        layer = q.get_submodule(c.name.removesuffix(".codes"))
        assert isinstance(layer, LowBitLayer)
        stored = numpy_helper.to_array(c).astype(np.int64)
        assert len(np.unique(stored)) <= layer.levels.numel()
        assert np.array_equal(stored, layer.codes.long().numpy())
    ops = kernel_report(tmp_path / "q.onnx").ops  # ORT folded the codebooks away at load
    assert not {"Gather", "Cast"} & set(ops) and ops.get("Conv", 0) + ops.get("FusedConv", 0) == 3


def test_the_quantize_weight_of_every_scheme_keeps_the_layer_shape() -> None:
    w = torch.randn(4, 3, 3, 3)
    for cfg in (LowBit(scheme="binary"), LowBit(scheme="pow2", bits=2), LowBit(scheme="kmeans")):
        codes, levels, scale = quantize_weight(w, cfg)
        assert codes.shape == w.shape and codes.dtype == torch.uint8
        assert scale.numel() == (1 if cfg.scheme == "kmeans" else 4)


def test_a_recipe_step_runs_through_the_runner_and_writes_a_small_onnx(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = Wide().eval()
    data = [torch.randn(4, 3, 8, 8) for _ in range(3)]
    recipe = {"steps": [{"quant.lowbit": {"scheme": "ternary", "epochs": 1, "lr": 1e-3}}]}
    res = sk.run(recipe, model=model, data=data, out=tmp_path / "a")
    assert res.quant_method == "quant.lowbit" and res.export_kind == "onnx"
    details = res.steps[0].details
    assert details["scheme"] == "ternary" and details["float_layers"] == ["conv", "head"]
    assert res.onnx is not None and res.onnx.max_abs_err < 1e-5
    assert (tmp_path / "a" / "model.onnx").stat().st_size < details["fp32_bytes"] / 4


@pytest.mark.slow
def test_a_recipe_step_that_trains_reads_the_tasks_training_split() -> None:
    recipe = {
        "model": "zoo:digits_cnn",
        "steps": [{"quant.lowbit": {"scheme": "ternary", "epochs": 1, "lr": 1e-3}}],
    }
    res = sk.run(recipe)  # no data given: training batches, not the calibration samples
    assert res.steps[0].details["data"] == "digits train split"
    res = sk.run({**recipe, "steps": [{"quant.lowbit": {"scheme": "ternary"}}]})
    assert "data" not in res.steps[0].details  # no training: the calibration samples


def test_batchnorm_after_a_low_bit_conv_folds_into_its_scale(tmp_path: Path) -> None:
    import onnx

    model = create_model("cnn_bn").eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):  # non-trivial statistics to fold
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
                m.weight.uniform_(0.5, 1.5)
    (x,) = example_inputs("cnn_bn", batch=2)
    q = sk.quantize(model, LowBit(scheme="ternary", keep_first_last=False))
    rep = sk.export_onnx(q, tmp_path / "q.onnx", example_inputs=(x,))
    assert rep.max_abs_err is not None and rep.max_abs_err < 1e-5
    ops = {n.op_type for n in onnx.load(str(tmp_path / "q.onnx")).graph.node}
    assert "BatchNormalization" not in ops and "Conv" in ops


@pytest.mark.slow
def test_quantize_command_runs_each_scheme_by_name(tmp_path: Path) -> None:
    import json

    from typer.testing import CliRunner

    from slimkit.cli import app

    out = tmp_path / "k"
    res = CliRunner().invoke(app, ["quantize", "zoo:digits_cnn", "--method", "kmeans", "--bits",
                                   "3", "--runs", "3", "--out", str(out), "--json"])  # fmt: skip
    assert res.exit_code == 0, res.output
    info = json.loads(res.output[res.output.index("{") :])
    assert info["experimental"] and info["config"]["scheme"] == "kmeans"
    assert info["config"]["bits"] == 3 and info["float_layers"] == ["features.0.0", "fc"]
    assert info["size_mb"]["kmeans 3-bit"] < info["size_mb"]["fp32"] / 3
    assert info["metrics"]["top1_kmeans 3-bit_ort"] > 0.9  # measured 0.967 (float 0.994)
    assert "quant.lowbit" in (out / "recipe.yaml").read_text()
    bad = CliRunner().invoke(app, ["quantize", "zoo:digits_cnn", "--method", "binary", "--bits",
                                   "2", "--out", str(tmp_path / "x")])  # fmt: skip
    assert bad.exit_code != 0 and "bits: 1" in bad.output
