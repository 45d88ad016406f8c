from __future__ import annotations

import pytest
import torch
import torch.fx

from slimkit.errors import ConfigError, RegistryError
from slimkit.export.onnx import export_onnx
from slimkit.zoo.models import MODELS, create_model, example_inputs, list_models, output_shape

NAMES = MODELS.names()
NOT_FX_TRACEABLE: set[str] = set()  # every zoo model traces (nn.LSTM is an fx leaf module)


def _n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", NAMES)
def test_forward_shape_and_finite(name: str) -> None:
    model = create_model(name)
    inputs = example_inputs(name, batch=2)
    assert not model.training
    assert len(inputs) == 1 and inputs[0].shape[0] == 2
    assert inputs[0].dtype in (torch.float32, torch.int64)
    with torch.no_grad():
        out = model(*inputs)
    assert tuple(out.shape) == output_shape(name, batch=2)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", NAMES)
def test_seed_makes_weights_deterministic(name: str) -> None:
    rng = torch.get_rng_state()
    a, b = create_model(name, seed=1).state_dict(), create_model(name, seed=1).state_dict()
    c = create_model(name, seed=2).state_dict()
    assert torch.equal(rng, torch.get_rng_state())  # the global RNG is left alone
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_reference_models_match_torchvision() -> None:
    # torchvision's published parameter counts: resnet18 11,689,512, mobilenet_v2 3,504,872
    resnet, mobilenet = create_model("resnet18"), create_model("mobilenetv2")
    assert _n_params(resnet) == 11_689_512
    assert _n_params(mobilenet) == 3_504_872
    # torchvision's parameter names, so that its state dicts load
    resnet_keys = {"layer2.0.downsample.0.weight", "layer4.1.bn2.running_var", "fc.bias"}
    mobilenet_keys = {"features.1.conv.1.weight", "features.2.conv.0.0.weight"}
    mobilenet_keys |= {"features.18.0.weight", "classifier.1.weight"}
    assert resnet_keys <= resnet.state_dict().keys()
    assert mobilenet_keys <= mobilenet.state_dict().keys()
    assert _n_params(create_model("resnet18", width_mult=0.5)) < 11_689_512 / 3


@pytest.mark.parametrize("name", [n for n in NAMES if n not in NOT_FX_TRACEABLE])
def test_fx_trace_matches_eager(name: str) -> None:
    model = create_model(name)
    (x,) = example_inputs(name, batch=2, seed=3)
    traced = torch.fx.symbolic_trace(model)
    with torch.no_grad():
        torch.testing.assert_close(traced(x), model(x), atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", NAMES)
def test_onnx_parity(name: str, tmp_path) -> None:
    model = create_model(name)
    report = export_onnx(model, tmp_path / f"{name}.onnx", example_inputs=example_inputs(name, 2))
    assert report.parity_batch == 3
    assert report.max_abs_err is not None and report.max_abs_err < 1e-4


def test_gpt_accepts_shorter_sequences_after_tracing() -> None:
    model = create_model("gpt_tiny")
    traced = torch.fx.symbolic_trace(model)
    (x,) = example_inputs("gpt_tiny", batch=2, seq_len=32)
    short = x[:, :11]
    with torch.no_grad():
        out = model(short)
        torch.testing.assert_close(traced(short), out, atol=1e-5, rtol=0)
        # causal: the first 11 positions do not see the 21 later ones
        torch.testing.assert_close(model(x)[:, :11], out, atol=1e-5, rtol=0)
    assert out.shape == (2, 11, 256)


def test_attention_runs_with_pruned_heads() -> None:
    block = create_model("transformer_block")  # d_model 32, 4 heads of 8
    attn = block.attn
    keep = torch.arange(16)  # the first 2 heads
    for proj in (attn.q_proj, attn.k_proj, attn.v_proj):
        proj.weight.data, proj.bias.data = proj.weight.data[keep], proj.bias.data[keep]
        proj.out_features = 16
    attn.out_proj.weight.data = attn.out_proj.weight.data[:, keep]
    attn.out_proj.in_features = 16
    assert block(*example_inputs("transformer_block", batch=2)).shape == (2, 16, 32)


def test_kwargs_reach_model_and_inputs() -> None:
    (x,) = example_inputs("gpt", batch=2, seq_len=64, vocab_size=100)
    assert x.shape == (2, 64) and x.dtype == torch.int64 and int(x.max()) < 100
    model = create_model("gpt", seq_len=64, vocab_size=100, n_layer=1)
    assert model(x).shape == (2, 64, 100) == output_shape("gpt", 2, seq_len=64, vocab_size=100)
    bert = create_model("bert_encoder", vocab_size=1000, n_layer=1, num_classes=3)
    assert bert(*example_inputs("bert_encoder", 2, vocab_size=1000)).shape == (2, 3)


def test_unknown_kwarg_names_the_valid_ones() -> None:
    with pytest.raises(ConfigError, match="n_layer") as err:
        create_model("gpt", n_layers=2)
    assert "n_layers" in str(err.value)
    with pytest.raises(ConfigError, match="num_classes"):
        example_inputs("resnet18", classes=10)


def test_unknown_model_suggests_a_name() -> None:
    with pytest.raises(RegistryError, match="did you mean 'resnet18'"):
        create_model("resnet81")


def test_list_models_filters() -> None:
    tiny = list_models(kind="tiny")
    assert {"mlp", "cnn_bn", "lstm", "gpt_tiny", "transformer_block"} <= set(tiny)
    assert "resnet18" not in tiny
    assert list_models("resnet*") == ["resnet18", "resnet18_cifar"]
    assert set(list_models(kind="task")) == {"digits_cnn", "small_cnn", "gpt", "text_classifier"}
    assert sorted(list_models()) == sorted(NAMES)
    with pytest.raises(ConfigError, match="tiny"):
        list_models(kind="tiniest")
