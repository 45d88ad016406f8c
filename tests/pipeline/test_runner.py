"""The runner: steps dispatched by technique, choices pinned, artifacts written and reloaded."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from torch import nn

import slimkit as sk
from slimkit.core.io import load_weights, read_metadata
from slimkit.errors import ConfigError
from slimkit.pipeline.recipe import Recipe, Step
from slimkit.pipeline.runner import _pin, _searched_budget
from slimkit.prune.auto import Target
from slimkit.prune.channel import set_record
from slimkit.testing.numerics import sqnr
from slimkit.zoo import create_model, example_inputs


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4)).eval()


def test_python_objects_run_without_writing_anything() -> None:
    model = _mlp()
    before = copy.deepcopy(model.state_dict())
    data = [torch.randn(8, 16) for _ in range(4)]
    recipe = {"steps": [{"quant.ptq": {"float_prefix": False, "num_batches": 4,
                                       "speed_check": False}}]}  # fmt: skip
    seen: list[str] = []
    res = sk.run(recipe, model=model, data=data, on_step=lambda r, m: seen.append(r.name))
    assert seen == ["quant.ptq"] and res.steps[0].via == "slimkit.quantize"
    assert res.quant_method == "quant.ptq" and res.export_kind == "qdq" and res.out is None
    assert res.steps[0].details["quantized_layers"] == 2
    x = data[0]
    with torch.no_grad():
        assert sqnr(model(x), res.model(x)) > 25.0  # measured ~40 dB
    for k, v in model.state_dict().items():  # the source is never modified
        assert torch.equal(v, before[k])
    # a Python object has no reference: the recipe says so instead of naming the wrong data
    assert res.recipe.data is None and res.recipe.model is None
    assert any("Python object" in n for n in res.notes)
    assert res.recipe.steps[0].config.float_prefix == []  # False is pinned as "no layer"


def test_artifact_reloads_and_stale_files_go(tmp_path: Path) -> None:
    out = tmp_path / "a"
    res = sk.run({"model": "zoo:cnn_bn", "steps": [{"prune.channel": {"ratio": 0.5}}]}, out=out)
    assert {p.name for p in out.iterdir()} == {"model.safetensors", "pruning.json", "model.onnx",
                                              "recipe.yaml", "metrics.json", "report.html",
                                              "layers.json"}  # fmt: skip
    # the per-layer sensitivity costs seconds: left for `slimkit report DIR`
    assert json.loads((out / "layers.json").read_text())["sensitivity"] == "deferred"
    page = (out / "report.html").read_text()
    assert '<section id="roofline">' in page and "prune.channel" in page
    back = sk.load(out, model=create_model("cnn_bn"))
    (x,) = example_inputs("cnn_bn", batch=3)
    with torch.no_grad():
        torch.testing.assert_close(back.eval()(x), res.model(x), atol=1e-6, rtol=0)
    assert res.onnx is not None and res.onnx.max_abs_err < 1e-4
    # every step records the MACs before and after it (batch 1), and the report shows them
    before, after = res.steps[0].details["changed"]["macs"]
    assert 0 < after < 0.5 * before  # half the channels of each pair: about a quarter of MACs
    assert f"{before:,} → {after:,}" in page
    # the same folder, now a quantized model: the pruning record would describe another model
    sk.run({"model": "zoo:cnn_bn", "steps": [{"quant.ptq": {"float_prefix": False}}]}, out=out)
    assert not (out / "pruning.json").exists()
    assert read_metadata(out / "model.safetensors")["method"] == "quant.ptq"
    assert Recipe.load(out / "recipe.yaml").data == "zoo:cnn_bn:inputs"  # the default, written


def test_masks_and_graph_passes_dispatch_through_their_verbs(tmp_path: Path) -> None:
    recipe = {"model": "zoo:cnn_bn", "steps": ["graph_opt.bn_fold", {"prune.magnitude": {}}]}
    res = sk.run(recipe, out=tmp_path)
    assert [s.via for s in res.steps] == ["slimkit.optimize", "slimkit.prune"]
    assert not any(isinstance(m, nn.BatchNorm2d) for m in res.model.modules())
    assert (tmp_path / "pruning.json").is_file()  # masks are baked into plain weights
    saved = load_weights(tmp_path / "model.safetensors")  # masks baked: plain weight keys
    layers = [(n, m) for n, m in res.model.named_modules() if hasattr(m, "parametrizations")]
    assert layers and all(torch.equal(saved[f"{n}.weight"], m.weight) for n, m in layers)
    assert sum(int((saved[f"{n}.weight"] == 0).sum()) for n, _ in layers) > 0


def test_model_override_and_default_example_inputs() -> None:
    res = sk.run({"model": "zoo:resnet18", "steps": ["prune.nm"]}, model="zoo:mlp")
    assert res.source.name == "mlp" and res.recipe.model == "zoo:mlp"
    assert res.recipe.export.onnx  # nothing exported without out=, but the settings stay


def test_steps_that_need_what_is_missing_say_so() -> None:
    with pytest.raises(ConfigError, match="names no model"):
        sk.run({"steps": ["prune.nm"]})
    with pytest.raises(ConfigError, match="bundled task"):
        sk.run({"model": "zoo:cnn_bn", "steps": ["finetune"]})
    with pytest.raises(ConfigError, match="needs data"):
        sk.run({"steps": ["quant.ptq"]}, model=_mlp(), example_inputs=torch.randn(1, 16))


def test_measured_speedup_target_is_pinned_as_the_mac_budget_it_chose() -> None:
    search = [{"macs": 0.5, "speedup": 1.5}, {"macs": 0.25, "speedup": 2.3},
              {"macs": 0.375, "speedup": 1.9}]  # fmt: skip
    assert _searched_budget(search, 2.0) == 0.25
    assert _searched_budget([{"macs": 0.4, "speedup": 3.0}], 2.0) is None  # not a bisection
    model = _mlp()
    set_record(model, {"method": "prune.auto", "auto": {"search": search}})
    pinned = _pin(Step("prune.auto", Target(speedup=2.0)), model)
    cfg = pinned.config
    assert isinstance(cfg, Target) and cfg.speedup is None and cfg.macs == 0.25
    roofline = Step("prune.auto", Target(speedup=2.0, hw="xeon_8380"))  # predicted: repeatable
    assert _pin(roofline, model) == roofline
