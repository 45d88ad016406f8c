"""Recipes: YAML <-> validated steps, with errors that name the fix before any work starts."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from torch import nn

from slimkit.errors import ConfigError, RegistryError, ScopeError
from slimkit.pipeline.recipe import Export, Finetune, Recipe, ScopeSpec, Step, absolute_ref
from slimkit.prune import Channel
from slimkit.quant import PTQ

TEXT = """
version: 1
model: zoo:digits_cnn
data: zoo:digits:calibration
seed: 3
steps:
- prune.channel: {ratio: 0.3, round_to: 8}
- finetune: {epochs: 2}
- quant.ptq: {calibration: percentile, float_prefix: [features.0]}
  scope: {exclude: [fc], types: [Conv2d, Linear]}
- prune.nm
export: {opset: 18, batch: 2}
"""


def test_parse_builds_each_steps_own_config() -> None:
    r = Recipe.from_yaml(TEXT)
    assert [s.name for s in r.steps] == ["prune.channel", "finetune", "quant.ptq", "prune.nm"]
    ch, ft, q = (s.config for s in r.steps[:3])
    assert isinstance(ch, Channel) and ch.ratio == 0.3 and ch.round_to == 8
    assert isinstance(ft, Finetune) and ft.epochs == 2
    assert isinstance(q, PTQ) and q.calibration == "percentile"
    assert q.float_prefix == ["features.0"]
    assert r.steps[3].config.to_dict() == {"n": 2, "m": 4}  # a bare name: the defaults
    spec = r.steps[2].scope
    assert spec is not None
    scope = spec.to_scope()
    assert [t.__name__ for t in scope.types] == ["Conv2d", "Linear"]
    assert scope.matches("features.0", nn.Conv2d(1, 1, 1)) and not scope.matches(
        "fc", nn.Linear(1, 1)
    )
    assert not scope.matches("act", nn.ReLU())
    assert r.export == Export(opset=18, batch=2) and r.seed == 3


def test_yaml_round_trip_is_lossless() -> None:
    r = Recipe.from_yaml(TEXT)
    again = Recipe.from_yaml(r.to_yaml())
    assert again == r
    assert again.to_dict() == r.to_dict()
    # every config field is written out, so the file says exactly what ran
    fields = yaml.safe_load(r.to_yaml())["steps"][2]["quant.ptq"]
    assert set(fields) == set(PTQ.model_fields)


def test_save_writes_a_header_and_loads_back(tmp_path: Path) -> None:
    r = Recipe.from_yaml(TEXT)
    path = r.save(tmp_path / "sub" / "recipe.yaml")
    text = path.read_text()
    assert text.startswith("# slimkit recipe: `slimkit run recipe.yaml")
    assert Recipe.load(path) == r
    assert not list(path.parent.glob(".*.tmp"))  # the atomic write left no temporary file


def test_the_unversioned_format_quantize_used_to_write_still_reads() -> None:
    old = {"model": "zoo:cnn_bn", "steps": [
        {"quant.ptq": {"calibration": "mse", "float_prefix": []}, "scope": {"exclude": ["fc"]}}
    ]}  # fmt: skip
    r = Recipe.from_dict(old)
    assert r.version == 1 and r.steps[0].scope == ScopeSpec(exclude=["fc"])
    assert r.export.onnx and r.data is None


@pytest.mark.parametrize(
    ("text", "error", "expected"),
    [
        ("steps: [{quant.ptqq: {}}]", RegistryError, "did you mean 'quant.ptq'"),
        ("steps: [{finetun: {}}]", RegistryError, "did you mean 'finetune'"),
        ("steps: [{quant.ptq: {calibraton: mse}}]", ConfigError, "did you mean 'calibration'"),
        ("steps: [{prune.channel: {ratio: 2}}]", ConfigError, "ratio"),
        ("stpes: []", ConfigError, "did you mean 'steps'"),
        ("export: {opst: 17}", ConfigError, "did you mean 'opset'"),
        ("steps: [{quant.ptq: {}, prune.nm: {}}]", ConfigError, "one method per list item"),
        ("steps: [{quant.ptq: {}, scope: {exclud: [fc]}}]", ConfigError, "did you mean 'exclude'"),
        ("steps: [{quant.ptq: {}, scope: {types: [Conv2D]}}]", ConfigError, "'Conv2d'"),
        ("steps: [{quant.ptq: {}, scope: {include: ['(']}}]", ScopeError, "regular expression"),
        ("steps: [{prune.nm: {}, max_drop: 0.01}]", ConfigError, "needs quant.ptq"),
        ("version: 9", ConfigError, "upgrade slimkit"),
        ("steps: [3]", ConfigError, "not a mapping"),
        ("- a\n- b", ConfigError, "a recipe is a mapping"),
        ("steps: [", ConfigError, "not valid YAML"),
    ],
)
def test_bad_recipes_fail_early_with_the_fix(text: str, error: type, expected: str) -> None:
    with pytest.raises(error) as info:
        Recipe.from_yaml(text)
    assert expected in str(info.value) and "Fix:" in str(info.value)


def test_errors_name_the_step() -> None:
    with pytest.raises(ConfigError, match=r"step 2 \(quant.ptq\): PTQ: unknown key"):
        Recipe.from_yaml("steps: [prune.nm, {quant.ptq: {calibraton: mse}}]")


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        Recipe.load(tmp_path / "nope.yaml")


def test_file_references_resolve_against_the_recipe_folder(tmp_path: Path) -> None:
    (tmp_path / "calib.npz").write_bytes(b"")
    r = Recipe.load(Recipe(model="zoo:mlp", data="calib.npz").save(tmp_path / "r.yaml"))
    assert r.path(r.data) == str(tmp_path / "calib.npz")
    assert r.path("zoo:digits") == "zoo:digits" and r.path("pkg.mod:make") == "pkg.mod:make"
    assert absolute_ref("zoo:mlp") == "zoo:mlp"
    rec = Recipe.for_model("zoo:mlp", data=str(tmp_path / "calib.npz"))
    assert rec.data is not None and Path(rec.data).is_absolute()


def test_step_to_dict_writes_scope_and_max_drop() -> None:
    step = Step("quant.ptq", PTQ(), ScopeSpec(exclude=["fc"]), max_drop=0.01)
    d = step.to_dict()
    assert d["scope"] == {"exclude": ["fc"]} and d["max_drop"] == 0.01
    assert Step.parse(d) == step
