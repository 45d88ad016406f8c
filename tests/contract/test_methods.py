"""The contract every registered method keeps, on every tiny zoo model it supports.

Parametrized over ``METHODS`` (after ``load_methods()``) and ``slimkit.zoo.models`` of kind tiny,
so a method is tested the moment it is registered: its config round-trips through YAML; its verb
returns a new model, leaves the input bit-identical (parameters, buffers, BatchNorm statistics,
train/eval flags) in train and in eval mode, and records a report; the result runs without NaN,
exports to ONNX and runs in ONNX Runtime; bad input gets the named error with a fix.
"""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest
import torch
import yaml

import slimkit as sk
from slimkit.core.verbs import TECHNIQUES, resolve
from slimkit.errors import ConfigError, DataError, ScopeError

from . import cases as c


@pytest.mark.parametrize("method", c.METHOD_NAMES)
def test_config_round_trips_through_yaml(method: str) -> None:
    cls = c.entry(method).meta["config"]
    for cfg in (c.example_config(method), cls.from_dict(c.entry(method).meta.get("example"))):
        text = yaml.safe_dump(cfg.to_dict())
        back = cls.from_dict(yaml.safe_load(text))
        assert back == cfg and back.to_dict() == cfg.to_dict(), text


@pytest.mark.parametrize("method", c.METHOD_NAMES)
def test_unknown_config_key_is_a_config_error_with_a_fix(method: str) -> None:
    cls = c.entry(method).meta["config"]
    example = dict(c.entry(method).meta.get("example", {}))
    with pytest.raises(ConfigError, match="unknown key 'no_such_option'.*Fix: .*valid keys"):
        cls.from_dict({**example, "no_such_option": 1})
    fields = [f for f in cls.model_fields if len(f) > 3]
    if fields:  # a misspelt key gets the one that was meant
        typo = fields[0][:-1]
        with pytest.raises(ConfigError, match=f"did you mean '{fields[0]}'"):
            cls.from_dict({**example, typo: example.get(fields[0])})


@pytest.mark.parametrize("mode", ["eval", "train"])
@pytest.mark.parametrize(("method", "zoo"), list(c.method_model_cases()))
def test_verb_returns_a_new_model_and_leaves_the_input_alone(
    method: str, zoo: str, mode: str, tmp_path: Path
) -> None:
    model = c.tiny(zoo, train=mode == "train")
    x, data = c.inputs(zoo)
    before, modes = c.state(model), c.flags(model)
    cfg = c.example_config(method)

    out = c.verb(method)(model, cfg, data=data, example_inputs=x)

    assert out is not model
    c.assert_identical(before, c.state(model))
    assert c.flags(model) == modes, "the verb changed the input's train/eval flags"
    shared = {id(t) for t in model.parameters()} & {id(t) for t in out.parameters()}
    assert not shared, "the result shares parameters with the input"
    keeps = TECHNIQUES[method.partition(".")[0]].keeps_mode
    assert out.training == (model.training if keeps else False)
    rep = sk.report(out)
    assert rep.method == method and rep.config == cfg.to_dict()
    assert {"params", "bytes", "zero_weights", "layers"} <= set(rep.changed)
    out.eval()
    with torch.no_grad():
        ys = c.tensors(out(*x))
    assert ys and all(bool(torch.isfinite(y).all()) for y in ys if y.is_floating_point())
    if mode == "eval":  # the export does not depend on the input's mode: once is enough
        _exports_and_runs_in_ort(method, out, x, tmp_path)


def _exports_and_runs_in_ort(
    method: str, out: torch.nn.Module, x: tuple[torch.Tensor, ...], tmp_path: Path
) -> None:
    from slimkit.export.ort import ort_session, run_session
    from slimkit.export.qdq import export_quantized

    kind = c.entry(method).meta.get("export", "onnx")
    path = tmp_path / "m.onnx"
    if kind == "onnx":
        atol = c.entry(method).meta.get("export_atol", 1e-4)
        rep = sk.export_onnx(out, path, example_inputs=x, atol=atol)  # raises unless ORT agrees
        assert rep.max_abs_err is not None and rep.max_abs_err <= atol
    elif kind == "qdq":
        rep, _ = export_quantized(out, path, example_inputs=x)  # raises below its SQNR bound
        assert rep.max_abs_err is not None
    else:
        assert kind == "ort", f"{method}: unknown export kind {kind!r}"
        path = Path(out.path)  # type: ignore[arg-type]
        with torch.no_grad():
            ref = c.tensors(out(*x))
        got = run_session(ort_session(path), list(x))
        assert len(got) == len(ref)
        for r, g in zip(ref, got, strict=True):
            assert torch.equal(r, torch.from_numpy(g))
    assert path.is_file() and path.stat().st_size > 0


# Handlers that change their input when called directly (the verbs restore it; these are bugs in
# files this suite does not own, listed so that a fix turns the xfail into a failure to remove).
HANDLER_BUGS: dict[str, str] = {}


@pytest.mark.parametrize(
    "method",
    [
        pytest.param(m, marks=pytest.mark.xfail(strict=True, reason=HANDLER_BUGS[m]))
        if m in HANDLER_BUGS
        else m
        for m in c.METHOD_NAMES
    ],
)
def test_handler_called_directly_leaves_a_train_mode_input_alone(method: str) -> None:
    zoo = c.bad_input_model(method)
    model = c.tiny(zoo, train=True)
    x, data = c.inputs(zoo)
    before, modes = c.state(model), c.flags(model)
    handler = c.entry(method).obj
    takes = inspect.signature(handler).parameters
    given = {"data": data, "example_inputs": x, "teacher": c.tiny(zoo, train=True)}
    handler(model, c.example_config(method), **{k: v for k, v in given.items() if k in takes})
    c.assert_identical(before, c.state(model))
    assert c.flags(model) == modes, "the handler changed the input's train/eval flags"


@pytest.mark.parametrize("method", c.METHOD_NAMES)
def test_bad_data_gets_a_data_error_with_a_fix(method: str) -> None:
    zoo = c.bad_input_model(method)
    model, cfg, run = c.tiny(zoo), c.example_config(method), c.verb(method)
    x, data = c.inputs(zoo)
    with pytest.raises(DataError, match="calibration data is empty. Fix:"):
        run(model, cfg, data=[], example_inputs=x)
    poisoned = [data[0], data[1][0].clone()]
    poisoned[1].view(-1)[0] = float("nan")
    with pytest.raises(DataError, match=r"batch 1, input 0 .* 1 NaN and 0 Inf.*Fix:"):
        run(model, cfg, data=poisoned, example_inputs=x)
    poisoned[1].view(-1)[0] = float("inf")
    with pytest.raises(DataError, match=r"0 NaN and 1 Inf"):
        run(model, cfg, data=poisoned)
    with pytest.raises(DataError, match=r"batch 0 input 0 is .*example_inputs\[0\].*Fix:"):
        run(model, cfg, data=[x[0].unsqueeze(-1)], example_inputs=x)  # one dimension too many
    with pytest.raises(DataError, match=r"fails on calibration data batch 0 .*Fix:"):
        run(model, cfg, data=[c.bad_shape(x[0])])  # the model cannot run on it
    with pytest.raises(DataError, match=r"fails on example_inputs .*Fix:"):
        run(model, cfg, example_inputs=(c.bad_shape(x[0]),))


@pytest.mark.parametrize("method", c.METHOD_NAMES)
def test_a_scope_that_matches_nothing_is_an_error(method: str) -> None:
    zoo = c.bad_input_model(method)
    model, cfg = c.tiny(zoo), c.example_config(method)
    x, data = c.inputs(zoo)
    nothing = sk.Scope(include=["no_such_layer"])
    if "scope" in inspect.signature(c.entry(method).obj).parameters:
        with pytest.raises(ScopeError, match="matches no module.*Fix:"):
            c.verb(method)(model, cfg, data=data, example_inputs=x, scope=nothing)
    else:  # a scope the method would ignore is refused, never dropped silently
        with pytest.raises(ConfigError, match=f"{method} does not take scope=.*Fix:"):
            c.verb(method)(model, cfg, data=data, example_inputs=x, scope=nothing)


@pytest.mark.parametrize("method", c.METHOD_NAMES)
def test_every_name_of_a_method_resolves_to_it(method: str) -> None:
    technique, _, short = method.partition(".")
    aliases = c.entry(method).meta.get("aliases", {})
    cls = c.entry(method).meta["config"]
    for name, fields in [(method, {}), (short, {}), *aliases.items()]:
        try:
            e, cfg = resolve(technique, name)
        except ConfigError as err:  # only a method with no default config may refuse its name
            assert cls.__name__ in str(err) and "Fix:" in str(err)
            with pytest.raises(ConfigError):
                cls.from_dict(fields)
            continue
        assert e.name == method, name
        assert cfg == c.entry(method).meta["config"].from_dict(fields)
        e, same = resolve(technique, cfg)
        assert e.name == method and same is cfg
