"""quant.int4: the weight solvers beat round-to-nearest where they should, the packed model is
really smaller and runs in ONNX Runtime as simulated, bad configs get a ConfigError."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

import slimkit as sk
from slimkit.core.layerwise import InputStats
from slimkit.errors import ConfigError
from slimkit.export.matmulnbits import export_nbits
from slimkit.quant import Int4
from slimkit.quant.awq import awq
from slimkit.quant.gptq import gptq
from slimkit.quant.groupwise import GroupSpec, dequantize_weight, quantize_weight, search_range
from slimkit.quant.nbits import NBitsLinear
from slimkit.testing.numerics import sqnr
from slimkit.zoo import create_model, example_inputs

SPEC = GroupSpec(4, 64)


def _layer_sqnr(w: torch.Tensor, deq: torch.Tensor, x: torch.Tensor) -> float:
    return sqnr(x @ w.T, x @ deq.T)


def _rtn(w: torch.Tensor) -> torch.Tensor:
    s, z = search_range(w, SPEC, grid=1)
    return dequantize_weight(quantize_weight(w, s, z, SPEC), s, z, w.shape[1])


def test_gptq_beats_round_to_nearest_on_correlated_inputs() -> None:
    w = torch.randn(64, 256)
    x = torch.randn(4096, 32) @ torch.randn(32, 256) + 0.1 * torch.randn(4096, 256)  # low rank
    stats = InputStats.empty(256)
    stats.add(x)
    codes, s, z = gptq(w, stats.hessian(), SPEC)
    gain = _layer_sqnr(w, dequantize_weight(codes, s, z, 256), x) - _layer_sqnr(w, _rtn(w), x)
    assert gain > 10.0  # measured +13.3 dB (34.5 vs 21.1 dB); +11.4 dB without act-order


def test_awq_beats_round_to_nearest_on_outlier_channels() -> None:
    w = torch.randn(64, 256)
    x = torch.randn(4096, 256)
    x[:, :8] *= 30  # eight channels with 30x larger activations
    stats = InputStats.empty(256)
    stats.add(x)
    codes, s, z, in_scale, alpha = awq(w, stats.hessian(), stats.abs_mean(), SPEC)
    deq = dequantize_weight(codes, s, z, 256) * in_scale  # the layer: (x * in_scale) @ Q^T
    gain = _layer_sqnr(w, deq, x) - _layer_sqnr(w, _rtn(w), x)
    assert alpha > 0 and gain > 3.0  # measured +3.9 dB (24.9 vs 20.9 dB), alpha 0.3


def _lm_data(n: int = 4) -> list[torch.Tensor]:
    return [example_inputs("gpt_tiny", batch=4, seed=i)[0] for i in range(n)]


@pytest.mark.parametrize("method", ["rtn", "mse", "gptq", "awq"])
def test_every_method_keeps_a_tiny_gpt_close_and_exports(method: str, tmp_path: Path) -> None:
    model = create_model("gpt_tiny").eval()
    data = _lm_data()
    q = sk.quantize(model, Int4(method=method, group_size=32), data=data)
    packed = [m for m in q.modules() if isinstance(m, NBitsLinear)]
    assert len(packed) == 13  # 2 blocks x 6 Linear + lm_head
    (x,) = example_inputs("gpt_tiny", batch=2, seed=9)
    with torch.no_grad():
        db = sqnr(model(x), q(x))
    assert db > 15.0  # measured 17.7 / 17.7 / 20.8 / 17.9 dB (rtn / mse / gptq / awq), g32
    rep = export_nbits(q, tmp_path / "q.onnx", example_inputs=(x,))
    assert rep.nodes == 13 and rep.export.dynamic_batch  # runs at a batch size never traced


def test_int4_is_much_smaller_in_memory_and_on_disk(tmp_path: Path) -> None:
    model = nn.Sequential(nn.Linear(512, 1024), nn.ReLU(), nn.Linear(1024, 512))
    q = sk.quantize(model, "int4")
    before, after = sk.report(q).changed["bytes"]
    assert after < before / 6.5  # measured 7.4x (a scale and a zero point per 128 weights)
    x = torch.randn(2, 512)
    sk.export_onnx(model, tmp_path / "f.onnx", example_inputs=(x,))
    rep = export_nbits(q, tmp_path / "q.onnx", example_inputs=(x,))
    fp32 = (tmp_path / "f.onnx").stat().st_size
    assert rep.export.size_bytes < fp32 / 6.5  # measured 7.4x


def test_group_size_not_dividing_in_features_is_handled(tmp_path: Path) -> None:
    model = nn.Sequential(nn.Linear(100, 40), nn.ReLU(), nn.Linear(40, 5))  # 100 = 3 x 32 + 4
    q = sk.quantize(model, Int4(group_size=32, method="gptq"), data=[torch.randn(16, 100)])
    x = torch.randn(3, 100)
    with torch.no_grad():
        assert sqnr(model(x), q(x)) > 14.0  # measured 16.5 dB
    assert export_nbits(q, tmp_path / "q.onnx", example_inputs=(x,)).nodes == 2


def test_bad_configs_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="bits"):
        Int4(bits=3)
    with pytest.raises(ConfigError, match="group_size=48 is not a power of two"):
        Int4(group_size=48)
    with pytest.raises(ConfigError, match="method='gptq' needs calibration data.*Fix:"):
        sk.quantize(create_model("mlp"), "int4-gptq")


def test_scope_and_int8_and_the_record() -> None:
    model = create_model("gpt_tiny").eval()
    q = sk.quantize(model, "int8-rtn", scope=sk.Scope(exclude=["lm_head"]))
    assert isinstance(q.lm_head, nn.Linear)
    assert {m.spec.bits for m in q.modules() if isinstance(m, NBitsLinear)} == {8}
    (x,) = example_inputs("gpt_tiny", batch=2)
    with torch.no_grad():
        assert sqnr(model(x), q(x)) > 35.0  # measured 38.5 dB
    rep = sk.report(sk.quantize(model, "int4-gptq", data=_lm_data(2)))
    assert rep.record["calibration_passes"] == 9  # qkv, out, fc1, fc2 per block + lm_head


def test_hugging_face_gpt2_conv1d_layers(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=128, n_positions=64)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    ids = torch.randint(0, 128, (2, 16))
    q = sk.quantize(model, Int4(method="awq", group_size=32), data=[ids, ids.flip(1)])
    assert sk.report(q).record["conv1d_as_linear"]  # c_attn, c_proj, c_fc, ...
    with torch.no_grad():
        db = sqnr(model(ids).logits, q(ids).logits)
    assert db > 17.0  # measured 20.4 dB
    # input_ids by name: the export adds the attention mask HF's causal masking needs
    rep = export_nbits(
        q, tmp_path / "hf.onnx", example_inputs=(), example_kwargs={"input_ids": ids}
    )
    assert rep.nodes == 9  # 4 Conv1D per block + lm_head (tied to the embedding)


def test_awq_folds_its_input_scaling_into_the_norm_layers() -> None:
    model = create_model("gpt_tiny").eval()
    q = sk.quantize(model, Int4(method="awq", group_size=32), data=_lm_data())
    folded = sk.report(q).record["awq_folded"]
    assert folded["blocks.0.ln1"] == [f"blocks.0.attn.{p}_proj" for p in "qkv"]
    assert set(folded) == {"blocks.0.ln1", "blocks.0.ln2", "blocks.1.ln1", "blocks.1.ln2", "ln_f"}
    kept = [n for n, m in q.named_modules() if getattr(m, "input_scale", None) is not None]
    assert sorted(kept) == [f"blocks.{i}.{p}" for i in (0, 1) for p in ("attn.out_proj", "mlp.fc2")]
    # k_proj kept float also reads ln1's output: folding would change it, so it is undone
    q = sk.quantize(model, Int4(method="awq", group_size=32), data=_lm_data(),
                    scope=sk.Scope(exclude=[r".*\.k_proj"]))  # fmt: skip
    folded = sk.report(q).record["awq_folded"]
    assert "blocks.0.ln1" not in folded and "blocks.1.ln1" not in folded and "ln_f" in folded
    assert q.blocks[0].attn.q_proj.input_scale is not None
    assert torch.equal(q.blocks[0].ln1.weight, model.blocks[0].ln1.weight)
