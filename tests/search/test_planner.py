"""The planner and the search space: data-driven knobs, ordered steps, a recipe that says why."""

from __future__ import annotations

import pytest

from slimkit.errors import ConfigError
from slimkit.pipeline.recipe import Recipe
from slimkit.search.constraints import Constraints
from slimkit.search.judge import Deployed
from slimkit.search.planner import Analysis, make_plan
from slimkit.search.space import build_space

METHODS = ["prune.auto", "lowrank.svd", "quant.ptq", "quant.mixed", "distill.response"]


def _analysis() -> Analysis:
    # a source of 1 ms and 1 MB; the roofline predicts int8 1.5x, pruning to k of the MACs 1/k
    prune = {k: (1 / k, 1.5 / k) for k in (1.0, 0.75, 0.5, 0.35, 0.25)}
    return Analysis(
        "net",
        250_000,
        10_000_000,
        Deployed(0.9, 1.0, 1.0),
        "this",
        "compute-bound",
        1e-3,
        1.5,
        prune,
    )


def test_space_follows_the_registry_and_the_budget() -> None:
    sp = build_space(["quant.ptq"], training=None, size_mb=1.0, source_size_mb=1.0)
    assert set(sp.choices) == {"quant"} and sp.choices["quant"] == ("fp32", "int8")
    assert any("prune.auto is not registered" in n for n in sp.notes)
    sp = build_space(METHODS, training="finetune", size_mb=0.1, source_size_mb=1.0)
    assert "mixed" in sp.choices["quant"] and "recovery_epochs" in sp.choices
    with pytest.raises(ConfigError, match="did you mean 'prune_macs'"):
        build_space(
            METHODS, training=None, size_mb=None, source_size_mb=1.0, override={"prune_mac": [0.5]}
        )


def test_plan_prunes_then_recovers_then_quantizes_and_says_why() -> None:
    c = Constraints(latency_ms=0.4, max_drop=0.01)  # needs 2.5x: int8 (1.5x) + pruning
    sp = build_space(METHODS, training="finetune", size_mb=None, source_size_mb=1.0)
    p = make_plan(_analysis(), c, sp)
    assert p.params["prune_macs"] == 0.5 and p.params["quant"] == "int8"  # 1.5 / 0.5 = 3x
    assert [s.name for s in sp.steps(p.params)] == ["prune.auto", "finetune", "quant.ptq"]
    assert p.predicted["latency_ms"] == pytest.approx(1 / 3)
    recipe = p.recipe(model="zoo:digits_cnn")
    text = p.to_yaml(recipe)
    assert text.count("# why:") == 4 and "latency goal needs 2.50x" in text
    again = Recipe.from_yaml(text)  # the comments leave a valid recipe
    assert [s.name for s in again.steps] == ["prune.auto", "finetune", "quant.ptq"]


def test_plan_for_a_small_size_budget_uses_mixed_precision() -> None:
    c = Constraints(size_mb=0.15)  # 6.7x below the fp32 file: past what int8 reaches
    sp = build_space(METHODS, training=None, size_mb=0.15, source_size_mb=1.0)
    p = make_plan(_analysis(), c, sp)
    assert p.params["quant"] == "mixed" and p.params["prune_macs"] == 1.0
    step = sp.steps(p.params)[-1]
    assert step.name == "quant.mixed" and step.config.to_dict()["max_size_mb"] == 0.15


def test_per_layer_allocation_is_a_knob_only_when_pruning() -> None:
    sp = build_space(METHODS, training="finetune", size_mb=None, source_size_mb=1.0)
    assert sp.choices["prune_allocation"] == ("uniform", "sensitivity")
    assert "prune_allocation" not in sp.complete({"prune_macs": 1.0})
    (step,) = sp.steps({"prune_macs": 0.5, "prune_allocation": "sensitivity", "quant": "fp32",
                        "recovery_epochs": 0})  # fmt: skip
    assert step.name == "prune.auto" and step.config.to_dict()["allocation"] == "sensitivity"
    uniform = sp.steps({"prune_macs": 0.5, "quant": "fp32", "recovery_epochs": 0})[0]
    assert uniform.config.to_dict()["allocation"] == "uniform"


def test_a_sensitivity_step_in_a_recipe_reads_the_models_own_data() -> None:
    import slimkit as sk
    from slimkit.prune import pruning_record

    recipe = {
        "model": "zoo:cnn_bn",
        "steps": [{"prune.auto": {"macs": 0.6, "allocation": "sensitivity", "levels": 4}}],
    }
    res = sk.run(recipe)  # no data given: the zoo model's random inputs feed the sensitivity
    auto = (pruning_record(res.model) or {})["auto"]
    assert auto["target"]["allocation"] == "sensitivity"
    before, after = res.steps[0].details["changed"]["macs"]
    assert after <= 0.6 * before * 1.05
