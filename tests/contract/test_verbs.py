"""The verbs' one API: names, aliases and config objects dispatch through the registry, a method
of another technique is refused with the verb to call, and every result has a report."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

import slimkit as sk
from slimkit.core.config import Config
from slimkit.core.registry import METHODS, MethodRegistry
from slimkit.core.verbs import TECHNIQUES, Report
from slimkit.errors import ConfigError, RegistryError
from slimkit.graph_opt import OptimizeReport

from . import cases as c


def test_the_calls_of_the_issue_run_through_the_registry() -> None:
    model = c.tiny("cnn_bn")
    x, data = c.inputs("cnn_bn")
    fast = sk.quant.PTQ(float_prefix=False, num_batches=2, speed_check=False)
    for q in (sk.quantize(model, "int8", data=data), sk.quantize(model, "quant.ptq", data=data),
              sk.quantize(model, fast, data=data)):  # fmt: skip
        assert sk.report(q).method == "quant.ptq" and q.meta["slimkit"]["method"] == "quant.ptq"
    p = sk.prune(model, "channel", example_inputs=x)
    assert sk.report(p).method == "prune.channel"
    assert sum(t.numel() for t in p.parameters()) < sum(t.numel() for t in model.parameters())
    m = sk.prune(model, sk.prune.Magnitude(sparsity=0.75))
    assert sk.report(m).changed["zero_weights"][1] >= 0.7
    nm = sk.prune(model, sk.prune.NM())
    assert sk.report(nm).method == "prune.nm" and sk.report(nm).changed["zero_weights"][1] > 0.3
    fused = sk.optimize(model, "graph_opt.fuse", example_inputs=x)
    assert sk.report(fused).method == "graph_opt.fuse"
    assert sk.report(fused).detail.kept  # the BatchNorms that block fusion, with the reason


def test_optimize_called_as_before_returns_the_module_and_its_report() -> None:
    model = c.tiny("residual")
    x, _ = c.inputs("residual")
    gm, rep = sk.optimize(model, x)
    assert isinstance(rep, OptimizeReport) and rep.max_abs_err is not None
    assert rep.max_abs_err < 1e-5 and len(rep.bn_fold.folded) > 0
    gm2, rep2 = sk.optimize(model, example_inputs=(x[0],))
    assert isinstance(gm2, nn.Module) and rep2.to_dict()["bn_fold"] == rep.to_dict()["bn_fold"]
    assert sk.report((gm, rep)).method == "graph_opt.optimize" and sk.report(gm).detail is rep
    with pytest.raises(ConfigError, match="given twice"):
        sk.optimize(model, x, example_inputs=x)


@pytest.mark.parametrize("method", c.METHOD_NAMES)
def test_a_method_of_another_technique_names_the_verb_to_call(method: str) -> None:
    model = c.tiny("mlp")
    right = TECHNIQUES[method.partition(".")[0]].verb
    cfg = c.example_config(method)
    for other in {t.verb for t in TECHNIQUES.values()} - {right}:
        with pytest.raises(ConfigError, match=rf"Fix: call sk\.{right}\("):
            c.call(other, model, method)
        with pytest.raises(
            ConfigError, match=rf"{type(cfg).__name__}\(\.\.\.\) is a .*sk\.{right}"
        ):
            c.call(other, model, cfg)


def test_unknown_names_get_the_closest_ones() -> None:
    model = c.tiny("mlp")
    with pytest.raises(
        ConfigError, match="unknown quantization method 'int9'.*did you mean 'int8'"
    ):
        sk.quantize(model, "int9")
    with pytest.raises(ConfigError, match="did you mean 'magnitude'.*prune.nm \\(nm, 2:4"):
        sk.prune(model, "magnitud")
    with pytest.raises(ConfigError, match="not the config of a registered method"):
        sk.prune(model, _Unregistered())
    assert sk.report(sk.prune(model, "2:4")).config == {"n": 2, "m": 4}


class _Unregistered(Config):
    ratio: float = 0.5


def test_missing_or_unused_arguments_are_errors_not_no_ops() -> None:
    model = c.tiny("mlp")
    x, data = c.inputs("mlp")
    with pytest.raises(ConfigError, match="quant.ptq needs data=.*Fix: pass data="):
        sk.quantize(model, "int8")
    with pytest.raises(ConfigError, match="prune.channel needs example_inputs=.*Fix:"):
        sk.prune(model, "channel")
    with pytest.raises(ConfigError, match="prune.magnitude does not take loss_fn="):
        sk.prune(model, "magnitude", loss_fn=lambda m, b: torch.zeros(()))
    with pytest.raises(ConfigError, match="expected a torch.nn.Module"):
        sk.quantize("model.pt", "int8", data=data)  # type: ignore[arg-type]
    rep = sk.report(sk.quantize(model, "fp16", data=data))
    assert "data was checked but not read: quant.half does not use data" in rep.notes


def test_example_inputs_default_to_the_first_batch_and_iterators_are_read_once() -> None:
    model = c.tiny("cnn_bn")
    x, data = c.inputs("cnn_bn")
    small = sk.prune(model, "channel", data=data)  # traced on data[0]
    assert small(*x).shape == model(*x).shape
    one_pass = (b for b in data)
    q = sk.quantize(
        model, sk.quant.PTQ(float_prefix=False, num_batches=2, speed_check=False), data=one_pass
    )
    assert sk.report(q).record["activation_quantizers"] > 0
    dyn = sk.quantize(c.tiny("mlp"), "dynamic", data=c.inputs("mlp")[1])
    assert isinstance(dyn.path, str) and dyn.path.endswith(".onnx")  # exported on data[0]


def test_pruned_results_keep_the_inputs_mixed_train_eval_flags() -> None:
    model = c.tiny("residual", train=True)
    frozen = [n for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)][:2]
    for n in frozen:
        model.get_submodule(n).eval()  # BatchNorm frozen while the rest trains
    x, _ = c.inputs("residual")
    out = sk.prune(model, sk.prune.Channel(ratio=0.25), example_inputs=x)
    assert {n: m.training for n, m in out.named_modules()} == c.flags(model)
    assert [n for n, m in model.named_modules() if not m.training] == frozen


def test_a_report_holds_only_what_its_own_method_recorded() -> None:
    model = c.tiny("cnn_bn")
    x, _ = c.inputs("cnn_bn")
    pruned = sk.prune(model, "channel", example_inputs=x)
    assert "slices" in sk.report(pruned).record
    small = sk.quantize(pruned, "weight-only")
    rep = sk.report(small)
    assert rep.method == "quant.weight_only" and "slices" not in rep.record
    assert rep.changed["layers"]["QuantLayer"] == [0, 3]


def test_report_of_a_direct_handler_call_and_of_a_plain_module() -> None:
    from slimkit.quant.ptq import PTQ, quantize_ptq

    model = c.tiny("mlp")
    _, data = c.inputs("mlp")
    q = quantize_ptq(model, PTQ(float_prefix=False, num_batches=2, speed_check=False), data=data)
    rep = sk.report(q)
    assert isinstance(rep, Report) and rep.method == "quant.ptq" and not rep.changed
    assert any("no before/after" in n for n in rep.notes)
    assert json.loads(json.dumps(rep.to_dict()))["config"]["num_batches"] == 2
    with pytest.raises(ConfigError, match="not produced by a slimkit verb.*Fix:"):
        sk.report(model)
    text = sk.report(sk.quantize(model, PTQ(speed_check=False), data=data)).summary()
    assert text.startswith("quant.ptq; params") and "ActQuant 0->" in text


def test_slimkit_list_shows_every_registered_method() -> None:
    from slimkit.cli import app

    res = CliRunner().invoke(app, ["list", "--json"])
    assert res.exit_code == 0, res.output
    rows = json.loads(res.stdout)["methods"]
    assert [r["name"] for r in rows] == METHODS.names()
    for r in rows:
        assert r["summary"] and r["verb"].startswith("sk.") and r["config"], r
    assert "int8" in next(r for r in rows if r["name"] == "quant.ptq")["aliases"]


def test_a_method_must_register_its_config_and_summary() -> None:
    reg = MethodRegistry("method")
    with pytest.raises(RegistryError, match="config= is not a Config class.*summary= is missing"):
        reg.add("prune.mine", lambda model, config: model)
    with pytest.raises(RegistryError, match="is not 'technique.method'"):
        reg.add("mine", lambda model, config: model, config=_Unregistered, summary="x")
    reg.add("prune.mine", lambda model, config: model, config=_Unregistered, summary="x")
    reg.annotate("prune.mine", example={"ratio": 0.1})
    assert reg.entry("prune.mine").meta["example"] == {"ratio": 0.1}


def test_a_config_field_given_as_a_keyword_sets_that_field() -> None:
    model = c.tiny("mlp")
    x, _ = c.inputs("mlp")
    rep = sk.report(sk.prune(model, "magnitude", sparsity=0.3))
    assert rep.config["sparsity"] == 0.3
    student = c.tiny("mlp")
    data = [x]  # unlabelled batches: the teacher is the target
    out = sk.distill(student, model, "response", data=data, epochs=1, lr=1e-3)
    assert sk.report(out).config["epochs"] == 1 and sk.report(out).config["lr"] == 1e-3
    with pytest.raises(ConfigError, match="sparsity"):  # the field is validated like the config
        sk.prune(model, "magnitude", sparsity=2.0)
