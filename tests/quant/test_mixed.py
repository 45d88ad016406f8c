"""quant.mixed: packed 4/2-bit and fp16 weights in the QDQ export, per-layer sensitivity, the
integer-programme solver under a size / bits budget, and the editable YAML plan."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import yaml

import slimkit as sk
from slimkit.errors import ConfigError
from slimkit.export.ort import ort_session, run_session
from slimkit.export.qdq import export_quantized
from slimkit.quant.mixed import BITS, HalfLayer, Mixed, save_plan, solve
from slimkit.quant.modules import QuantLayer
from slimkit.quant.ptq import PTQ
from slimkit.testing.numerics import sqnr
from slimkit.zoo import create_model, example_inputs

LAYERS = ["features.0.0", "features.1.0", "features.3.0", "fc"]  # digits_cnn's Conv/Linear


def _calib(n: int = 8) -> list[torch.Tensor]:
    return [example_inputs("digits_cnn", batch=4, seed=i)[0] for i in range(n)]


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return create_model("digits_cnn").eval()


def _export(q: torch.nn.Module, path: Path) -> tuple[int, dict[str, int], float]:
    """File bytes, ORT's fused ops, and ORT vs simulation SQNR on 16 samples."""
    x = torch.cat(_calib(4))
    rep, kernels = export_quantized(q, path, example_inputs=(x[:1],))
    (out,) = run_session(ort_session(rep.path), [x])
    with torch.no_grad():
        agreement = sqnr(q(x), out)
    return path.stat().st_size, kernels.ops, agreement


def test_w4a8_export_packs_codes_and_keeps_the_integer_kernels(model, tmp_path: Path) -> None:
    sizes, ops = {}, {}
    for bits in (8, 4, 2):
        cfg = PTQ(weight_bits=bits, speed_check=False, float_prefix=False)
        q = sk.quantize(model, cfg, data=_calib())
        sizes[bits], ops[bits], agreement = _export(q, tmp_path / f"w{bits}.onnx")
        assert agreement > 60.0, bits  # measured 142-147 dB: ORT == simulation
    # 23.8k weights: 34.1 kB at W8A8, 22.5 kB at W4A8 (0.66x), 16.5 kB at W2A8 (measured)
    assert sizes[4] < 0.72 * sizes[8] and sizes[2] < 0.85 * sizes[4]
    assert ops[4] == ops[8] == ops[2] and ops[4]["QLinearConv"] == 3  # same fused kernels
    graph = onnx.load(str(tmp_path / "w4.onnx"))
    kinds = {t.data_type for t in graph.graph.initializer}
    assert onnx.TensorProto.INT4 in kinds and graph.opset_import[0].version >= 21
    w8 = onnx.load(str(tmp_path / "w8.onnx"))
    assert w8.opset_import[0].version == 17  # nothing to pack: the file is as before


def test_fp16_layers_are_stored_half_and_computed_in_float(model, tmp_path: Path) -> None:
    plan = {"features.0.0": "fp32", "features.1.0": "fp16", "features.3.0": "fp16", "fc": "int8"}
    q = sk.quantize(model, Mixed(plan=plan, num_batches=4), data=_calib())
    assert isinstance(q.get_submodule("features.3.0"), HalfLayer)
    size, ops, agreement = _export(q, tmp_path / "m.onnx")
    assert agreement > 100.0  # measured 141 dB: the fp16 weights are exact in both
    assert ops.get("Conv", 0) + ops.get("FusedConv", 0) == 3 and ops.get("QGemm") == 1
    graph = onnx.load(str(tmp_path / "m.onnx")).graph
    halves = [t for t in graph.initializer if t.data_type == onnx.TensorProto.FLOAT16]
    assert sorted(int(np.prod(t.dims)) for t in halves) == [4608, 18432]
    assert q.meta["slimkit"]["size_mb"] * 1e6 == size


def test_sensitivity_grows_as_the_format_narrows(model) -> None:
    cfg = Mixed(avg_bits=8, formats=["fp32", "fp16", "int8", "int4", "int2"], num_batches=4)
    q = sk.quantize(model, cfg, data=_calib())
    rec = q.meta["slimkit"]
    assert rec["metric"] == "kl" and list(rec["layers"]) == LAYERS
    for name, info in rec["layers"].items():
        s = info["sensitivity"]
        assert s["fp32"] == 0.0 and s["fp16"] < s["int8"] < s["int4"] < s["int2"], (name, s)
    assert rec["avg_bits"] <= 8.0


def test_size_budget_is_met_on_the_measured_file(model, tmp_path: Path) -> None:
    budget = 0.026  # between W4A8 (22.5 kB) and W8A8 (34.1 kB)
    q = sk.quantize(model, Mixed(max_size_mb=budget, num_batches=4), data=_calib())
    rec = q.meta["slimkit"]
    rep = sk.export_onnx(q, tmp_path / "m.onnx", example_inputs=(_calib(1)[0][:1],))
    assert rep.size_bytes <= budget * 1e6 and rec["within_budget"]
    assert abs(rep.size_bytes - rec["size_mb"] * 1e6) < 200  # the record is the file
    formats = set(rec["plan"].values())
    assert "int4" in formats and formats != {"int4"}  # it had to mix
    shares = rec["bit_widths"]
    assert sum(d["param_share"] for d in shares.values()) == pytest.approx(1.0, abs=1e-3)
    assert sum(d["layers"] for d in shares.values()) == 4
    assert "format  layers" in rec["distribution"] and "MB" in rec["distribution"]
    assert "format  layers" in sk.report(q).summary()
    with pytest.raises(ConfigError, match="below what this model can reach.*Fix:"):
        sk.quantize(model, Mixed(max_size_mb=0.01, num_batches=2), data=_calib(2))


def test_solver_is_exact_under_both_budgets() -> None:
    rng = np.random.default_rng(0)
    names, fmts = [f"l{i}" for i in range(5)], ["fp16", "int8", "int4"]
    params = {n: int(rng.integers(100, 1000)) for n in names}
    costs = {n: {f: params[n] * BITS[f] // 8 + 10 for f in fmts} for n in names}
    sens = {n: {"fp16": 0.0, "int8": float(rng.random()), "int4": float(1 + rng.random())}
            for n in names}  # fmt: skip
    limit, bits = 0.55 * sum(c["fp16"] for c in costs.values()), 9.0
    got = solve(sens, costs, params, max_bytes=limit, avg_bits=bits)
    best = min(
        (dict(zip(names, combo, strict=True)) for combo in itertools.product(fmts, repeat=5)
         if sum(costs[n][f] for n, f in zip(names, combo, strict=True)) <= limit
         and sum(params[n] * BITS[f] for n, f in zip(names, combo, strict=True))
         <= bits * sum(params.values())),
        key=lambda p: sum(sens[n][f] for n, f in p.items()),
    )  # fmt: skip
    assert got == best
    assert sum(costs[n][f] for n, f in got.items()) <= limit


def test_plan_round_trips_through_yaml_and_an_edit_is_applied_exactly(
    model, tmp_path: Path
) -> None:
    q = sk.quantize(model, Mixed(max_size_mb=0.026, num_batches=4), data=_calib())
    path = save_plan(q, tmp_path / "plan.yaml")
    text = path.read_text()
    assert "params; bytes" in text and "kl" in text  # commented for a reader
    again = sk.quantize(model, Mixed(plan=str(path), num_batches=4), data=_calib())
    assert again.meta["slimkit"]["plan"] == q.meta["slimkit"]["plan"]
    x = _calib(1)[0]
    with torch.no_grad():
        assert torch.equal(again(x), q(x))
    edited = yaml.safe_load(text)
    edited["layers"] = {n: "int4" for n in edited["layers"]} | {"fc": "int8"}
    q2 = sk.quantize(model, Mixed(plan=edited, num_batches=4), data=_calib())
    assert q2.meta["slimkit"]["plan"] == edited["layers"]
    bits = {n: m.weight_bits for n, m in q2.named_modules() if isinstance(m, QuantLayer)}
    assert bits["features.3.0"] == 4 and bits["fc"] in (7, 8)


@pytest.mark.parametrize(
    ("plan", "match"),
    [
        ({"features.0.0": "int8", "features.1.0": "int8", "features.3.0": "int8", "fcc": "int8"},
         r"names layer 'fcc'.*Fix: did you mean 'fc'"),
        ({"features.0.0": "int3", "features.1.0": "int8", "features.3.0": "int8", "fc": "int8"},
         r"unknown format 'int3'.*Fix: use one of fp32, fp16, int8, int4, int2"),
        ({"features.0.0": "int8"}, r"no format for 3 layer.*Fix: add a line per layer"),
        ("/no/such/plan.yaml", r"does not exist.*Fix:"),
    ],
)  # fmt: skip
def test_a_bad_plan_names_the_problem_and_the_fix(model, plan, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        sk.quantize(model, Mixed(plan=plan, num_batches=2), data=_calib(2))


def test_no_budget_is_a_config_error(model) -> None:
    with pytest.raises(ConfigError, match="needs a budget or a plan.*Fix:"):
        sk.quantize(model, Mixed(), data=_calib(2))


def test_a_recipe_step_runs_and_exports_packed(model, tmp_path: Path) -> None:
    recipe = {"steps": [{"quant.mixed": {"max_size_mb": 0.03, "num_batches": 4}}]}
    res = sk.run(recipe, model=model, data=_calib(), out=tmp_path / "a")
    assert res.quant_method == "quant.mixed" and res.export_kind == "qdq"
    assert (tmp_path / "a" / "model.onnx").stat().st_size <= 0.03e6
    assert res.kernels is not None and res.kernels.integer > 0
    # the recipe written beside it pins the plan it solved: a rerun applies it exactly
    from slimkit.pipeline.recipe import Recipe

    pinned = Recipe.load(tmp_path / "a" / "recipe.yaml").steps[0].config
    assert pinned.plan == res.model.meta["slimkit"]["plan"]  # type: ignore[attr-defined]
    again = sk.run(tmp_path / "a" / "recipe.yaml", model=model, data=_calib())
    assert again.model.meta["slimkit"]["plan"] == pinned.plan
    x = _calib()[0]
    with torch.no_grad():
        torch.testing.assert_close(again.model(x), res.model(x), rtol=0, atol=1e-6)


def test_cli_writes_a_plan_under_the_budget_and_applies_it_back(tmp_path: Path) -> None:
    import json

    from typer.testing import CliRunner

    from slimkit.cli import app

    runner, plan = CliRunner(), tmp_path / "plan.yaml"
    common = ["--runs", "2", "--num-batches", "4", "--json"]
    res = runner.invoke(app, ["quantize", "zoo:digits_cnn", "--method", "mixed", "--max-size",
                              "26KB", "--plan-out", str(plan), "--out", str(tmp_path / "a"),
                              *common])  # fmt: skip
    assert res.exit_code == 0, res.output
    r = json.loads(res.stdout)
    assert r["within_budget"] and (tmp_path / "a" / "model.onnx").stat().st_size <= 26_000
    assert r["metrics"]["top1_mixed_ort"] > r["metrics"]["top1_float"] - 0.05  # measured -0.0
    assert yaml.safe_load(plan.read_text())["layers"] == r["plan"]
    res = runner.invoke(app, ["quantize", "zoo:digits_cnn", "--method", "mixed", "--plan",
                              str(plan), "--out", str(tmp_path / "b"), *common])  # fmt: skip
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["plan"] == r["plan"]
    bad = runner.invoke(app, ["quantize", "zoo:digits_cnn", "--method", "mixed", "--max-size",
                              "big", "--out", str(tmp_path / "c")])  # fmt: skip
    assert bad.exit_code != 0 and "not a size" in bad.output


def test_adaround_learns_the_rounding_of_the_plans_integer_layers(model) -> None:
    """``Mixed(adaround=N)`` hands the iterations to PTQ: the int4 layers' codes are learned
    (some differ from nearest rounding) and the output gets no worse than with nearest."""
    plan = {"features.0.0": "int8", "features.1.0": "int4", "features.3.0": "int4", "fc": "int8"}
    x = torch.cat(_calib(4))
    near = sk.quantize(model, Mixed(plan=plan, num_batches=8), data=_calib())
    ada = sk.quantize(model, Mixed(plan=plan, num_batches=8, adaround=30), data=_calib())
    assert "learned rounding in" in str(ada.meta["slimkit"])
    codes = [ada.get_submodule(n).w_q for n in ("features.1.0", "features.3.0")]
    assert any(not torch.equal(c, near.get_submodule(n).w_q) for c, n in
               zip(codes, ("features.1.0", "features.3.0"), strict=True))  # fmt: skip
    with torch.no_grad():
        ref = model(x)
        err_near = float((near(x) - ref).pow(2).mean())
        err_ada = float((ada(x) - ref).pow(2).mean())
    assert err_ada <= err_near * 1.05


def test_solver_meets_a_time_budget_at_the_least_sensitivity() -> None:
    sens = {"a": {"fp32": 0.0, "int8": 1.0}, "b": {"fp32": 0.0, "int8": 5.0}}
    costs = {n: {"fp32": 400, "int8": 100} for n in sens}
    seconds = {"a": {"fp32": 3.0, "int8": 1.0}, "b": {"fp32": 2.0, "int8": 1.5}}
    params = {n: 100 for n in sens}
    # all fp32 takes 5 s; within 4 s only a in int8 fits (1 + 2; b in int8 gives 3 + 1.5)
    assert solve(sens, costs, params, seconds=seconds, max_seconds=4.0) == {
        "a": "int8", "b": "fp32"}  # fmt: skip
    assert solve(sens, costs, params, seconds=seconds, max_seconds=2.6) == {
        "a": "int8", "b": "int8"}  # fmt: skip
    with pytest.raises(ConfigError, match="no choice of formats meets the budget"):
        solve(sens, costs, params, seconds=seconds, max_seconds=2.0)


def test_a_latency_budget_is_measured_per_layer_and_on_the_result(model) -> None:
    q = sk.quantize(model, Mixed(max_latency_ms=1000.0, num_batches=4), data=_calib(4))
    rec = q.meta["slimkit"]
    assert rec["latency_ms"] > 0 and rec["within_latency_budget"] is True
    assert rec["budget"]["max_latency_ms"] == 1000.0
    for name in LAYERS:  # every layer's kernels were timed in both arithmetics
        ms = rec["layers"][name]["ms"]
        assert ms["fp32"] > 0 and ms["int8"] > 0 and ms["int4"] == ms["int8"]
    with pytest.raises(ConfigError, match=r"max_latency_ms=1e-06 is below what this model"):
        sk.quantize(model, Mixed(max_latency_ms=1e-6, num_batches=4), data=_calib(4))
