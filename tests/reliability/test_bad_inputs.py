"""The bad-input table: every case, through the Python API and through the CLI, ends in a named
``SlimkitError`` whose message carries a fix, never a raw traceback. Each case is what a user
really gets wrong: empty or odd data, wrong shapes and dtypes, typos in names and patterns,
damaged or crafted files, outputs that cannot be written."""

from __future__ import annotations

import io
import pickle
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

import slimkit as sk
from slimkit.cli import app
from slimkit.errors import (
    CheckpointError,
    ConfigError,
    DataError,
    OutputError,
    ScopeError,
    SlimkitError,
)


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(8, 4)).eval()  # fmt: skip


X = torch.randn(2, 3, 8, 8)
PTQ = sk.quant.PTQ(speed_check=False, float_prefix=False, num_batches=2)


def _q(data: object, **kw: object) -> object:
    return sk.quantize(_net(), PTQ, data=data, **kw)  # type: ignore[arg-type]


def _nan() -> list[torch.Tensor]:
    bad = X.clone()
    bad[0, 0, 0, 0] = float("nan")
    return [X, bad]


def _pickle_weights(tmp: Path) -> Path:
    class Payload:
        def __reduce__(self):  # type: ignore[no-untyped-def]
            return (print, ("executed",))

    p = tmp / "w.pt"
    p.write_bytes(pickle.dumps({"w": Payload()}))
    return p


def _truncated_safetensors(tmp: Path) -> Path:
    from slimkit.core.io import save_weights

    p = tmp / "w.safetensors"
    save_weights(_net(), p)
    p.write_bytes(p.read_bytes()[:40])
    return p


def _torch_save_object(tmp: Path) -> Path:
    buf = io.BytesIO()
    torch.save({"model": nn.Linear(2, 2)}, buf)  # a whole module: pickled code, not weights
    p = tmp / "m.pt"
    p.write_bytes(buf.getvalue())
    return p


API: dict[str, tuple[Callable[[Path], object], type[SlimkitError]]] = {
    "empty data": (lambda t: _q([]), DataError),
    "NaN in data": (lambda t: _q(_nan()), DataError),
    "a batch of 0 samples": (lambda t: _q([torch.randn(0, 3, 8, 8)]), DataError),
    "wrong channel count": (lambda t: _q([torch.randn(2, 4, 8, 8)]), DataError),
    "wrong rank": (lambda t: _q([torch.randn(2, 3, 8)]), DataError),
    "integer data": (lambda t: _q([torch.randint(0, 9, (2, 3, 8, 8))]), DataError),
    "float64 data": (lambda t: _q([X.double()]), DataError),
    "shape changes mid-stream": (lambda t: _q([X, torch.randn(2, 3, 4, 4)]), DataError),
    "data is not iterable": (lambda t: _q(3), DataError),
    "unknown config key": (lambda t: sk.quant.PTQ(calibraton="mse"), ConfigError),
    "bad config value": (lambda t: sk.quant.PTQ(percentile=5.0), ConfigError),
    "unknown method name": (lambda t: sk.quantize(_net(), "int3", data=[X]), ConfigError),
    "prune config to quantize": (lambda t: sk.quantize(_net(), sk.prune.Channel(), data=[X]),
                                 ConfigError),
    "unknown keyword": (lambda t: _q([X], calib=[X]), ConfigError),
    "scope exclude matching nothing": (lambda t: _q([X], scope=sk.Scope(exclude=["head"])),
                                       ScopeError),
    "scope regex invalid": (lambda t: sk.Scope(include=["("]), ScopeError),
    "ratios pattern matching nothing": (lambda t: sk.prune(
        _net(), sk.prune.Channel(ratios={"fc": 0.5}), example_inputs=(X,)), ConfigError),
    "prune wrong shape": (lambda t: sk.prune(_net(), sk.prune.Channel(ratio=0.5),
                                             example_inputs=(torch.randn(1, 4, 8, 8),)), DataError),
    "optimize wrong shape": (lambda t: sk.optimize(_net(), (torch.randn(2, 4, 8, 8),)), DataError),
    "analyze wrong shape": (lambda t: sk.analyze(_net(), (torch.randn(2, 4, 8, 8),)), DataError),
    "analyze no inputs": (lambda t: sk.analyze(_net(), ()), DataError),
    "export wrong shape": (lambda t: sk.export_onnx(_net(), t / "m.onnx",
                                                    example_inputs=(torch.randn(2, 4, 8, 8),)),
                           DataError),
    "export float64 input": (lambda t: sk.export_onnx(_net(), t / "m.onnx",
                                                      example_inputs=(X.double(),)), DataError),
    "export onto a directory": (lambda t: sk.export_onnx(_net(), t, example_inputs=(X,)),
                                OutputError),
    "export with no inputs": (lambda t: sk.export_onnx(_net(), t / "m.onnx", example_inputs=()),
                              SlimkitError),
    "pickled code as weights": (lambda t: sk.core.io.load_weights(_pickle_weights(t)),
                                CheckpointError),
    "a whole pickled module as weights": (lambda t: sk.core.io.load_weights(
        _torch_save_object(t)), CheckpointError),
    "truncated safetensors": (lambda t: sk.core.io.load_weights(_truncated_safetensors(t)),
                              CheckpointError),
    "missing weights file": (lambda t: sk.core.io.load_weights(t / "nope.safetensors"),
                             CheckpointError),
    "garbage .pt2": (lambda t: sk.core.io.load_program(_garbage(t, "m.pt2")), CheckpointError),
    "load an artifact that is not one": (lambda t: sk.load(t / "nothing", model=_net()),
                                         CheckpointError),
}  # fmt: skip


def _garbage(tmp: Path, name: str) -> Path:
    p = tmp / name
    p.write_bytes(b"\x00garbage\xff" * 10)
    return p


def _outcome(call: Callable[[], object]) -> tuple[str, str, BaseException | None]:
    """``(outcome, first line, error)``: ``named`` for a SlimkitError, ``traceback`` for any
    other exception, ``ok`` when nothing was raised."""
    try:
        call()
    except SlimkitError as e:
        return "named", str(e).splitlines()[0][:200], e
    except Exception as e:  # noqa: BLE001 - what the table is there to catch
        return (
            "traceback",
            f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}",
            e,
        )
    return "ok", "", None


@pytest.mark.parametrize("case", list(API))
def test_api_bad_input_is_named(case: str, tmp_path: Path, reliability_rows: list) -> None:
    import slimkit.core.io  # noqa: F401 - sk.core.io in the table

    call, error = API[case]
    outcome, line, err = _outcome(lambda: call(tmp_path))
    reliability_rows.append({"case": case, "surface": "api", "outcome": outcome, "error": line})
    assert outcome == "named" and isinstance(err, error), line
    assert isinstance(err, SlimkitError) and "Fix:" in str(err) and len(err.fix) > 10


def _cli_cases(tmp: Path) -> dict[str, list[str]]:
    afile = tmp / "afile"
    afile.write_text("x")
    bad_recipe = tmp / "r.yaml"
    bad_recipe.write_text("model: zoo:mlp\nsteps:\n- quant.ptq: {calibraton: mse}\n")
    unknown_step = tmp / "s.yaml"
    unknown_step.write_text("model: zoo:mlp\nsteps:\n- quant.ptqq: {}\n")
    return {
        "--weight-bits abc": ["quantize", "zoo:mlp", "--weight-bits", "abc", "--out",
                              str(tmp / "q")],
        "quantize --out an existing file": ["quantize", "zoo:mlp", "--out", str(afile)],
        "prune --out an existing file": ["prune", "zoo:mlp", "--ratio", "0.5", "--out",
                                         str(afile)],
        "export --out a directory": ["export", "zoo:mlp", "--out", str(tmp)],
        "analyze with a wrong input shape": ["analyze", "zoo:mlp", "--input-shape", "1,3"],
        "unknown zoo model": ["quantize", "zoo:mpl", "--out", str(tmp / "q")],
        "garbage .pt2 model": ["export", str(_garbage(tmp, "g.pt2")), "--out",
                               str(tmp / "g.onnx")],
        "unknown method": ["quantize", "zoo:mlp", "--method", "kl", "--out", str(tmp / "q")],
        "recipe with a misspelt key": ["run", str(bad_recipe), "--out", str(tmp / "r")],
        "recipe with an unknown step": ["run", str(unknown_step), "--out", str(tmp / "r")],
        "missing recipe": ["run", str(tmp / "none.yaml"), "--out", str(tmp / "r")],
    }  # fmt: skip


@pytest.mark.parametrize("case", [
    "--weight-bits abc", "quantize --out an existing file", "prune --out an existing file",
    "export --out a directory", "analyze with a wrong input shape", "unknown zoo model",
    "garbage .pt2 model", "unknown method", "recipe with a misspelt key",
    "recipe with an unknown step", "missing recipe",
])  # fmt: skip
def test_cli_bad_input_is_named(case: str, tmp_path: Path, reliability_rows: list) -> None:
    args = _cli_cases(tmp_path)[case]
    res = CliRunner().invoke(app, args)
    named = res.exit_code == 2 and "error:" in res.output and "fix:" in res.output
    first = next((ln for ln in res.output.splitlines() if ln.startswith("error:")), "")
    reliability_rows.append({"case": case, "surface": "cli", "error": first[:200],
                             "outcome": "named" if named else "traceback"})  # fmt: skip
    assert res.exit_code == 2, res.output
    assert "error:" in res.output and "fix:" in res.output
    assert "Traceback" not in res.output
