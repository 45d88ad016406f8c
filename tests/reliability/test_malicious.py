"""Malicious and malformed files of every kind slimkit reads never execute anything: each case
hides a pickle payload (which, if unpickled, creates a marker file) or damages the format, hands
the file to the loader a user would reach, and records the outcome: ``named`` (a SlimkitError),
``executed`` (the marker exists), ``traceback`` (any other exception) or ``ok`` (loaded)."""

from __future__ import annotations

import io
import json
import struct
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

import slimkit as sk
from slimkit.core.io import load_weights
from slimkit.errors import SlimkitError


class _Payload:
    """Unpickling this creates ``path``: the proof that a loader executed pickled code."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (Path.touch, (self.path,))


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(8, 4)).eval()  # fmt: skip


X = torch.randn(2, 3, 8, 8)


def _program(tmp: Path, marker: Path, member: str) -> Path:
    """A valid ``.pt2`` whose archive member ``member`` is replaced by a pickle payload."""
    src = tmp / "net.pt2"
    torch.export.save(torch.export.export(_net(), (X,)), str(src))
    buf = io.BytesIO()
    torch.save(((_Payload(marker),), {}), buf)
    dest = tmp / f"evil-{member}.pt2"
    hit = False
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dest, "w") as zout:
        for item in zin.infolist():
            data = zin.read(item.filename)
            if member in item.filename and not hit:
                data, hit = buf.getvalue(), True
            zout.writestr(item, data)
    assert hit, f"no archive member matches {member!r}"
    return dest


def _npz(tmp: Path, marker: Path) -> None:
    from slimkit.core.refs import resolve_data_file

    arr = np.empty(1, dtype=object)
    arr[0] = _Payload(marker)
    np.savez(tmp / "evil.npz", x=arr)
    resolve_data_file(str(tmp / "evil.npz"), batch_size=2)


def _pt(tmp: Path, marker: Path) -> None:
    torch.save({"w": _Payload(marker)}, tmp / "evil.pt")
    load_weights(tmp / "evil.pt")


def _pt2(member: str) -> Callable[[Path, Path], None]:
    def case(tmp: Path, marker: Path) -> None:
        from slimkit.core.refs import resolve_model_file

        resolve_model_file(str(_program(tmp, marker, member)))

    return case


def _safetensors_header(tmp: Path, marker: Path) -> None:
    bad = tmp / "bad.safetensors"  # a header length far beyond the file
    bad.write_bytes(struct.pack("<Q", 1 << 40) + b"{}")
    load_weights(bad)


def _safetensors_json(tmp: Path, marker: Path) -> None:
    header = json.dumps({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 999]}}).encode()
    (tmp / "bad.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 16)
    load_weights(tmp / "bad.safetensors")


def _artifact(tmp: Path) -> Path:
    out = tmp / "art"
    sk.prune.save_pruned(sk.prune(_net(), sk.prune.Channel(ratio=0.5), example_inputs=(X,)), out)
    return out


def _artifact_weights(tmp: Path, marker: Path) -> None:
    out = _artifact(tmp)
    torch.save({"0.weight": _Payload(marker)}, out / "model.safetensors")  # a pickle in disguise
    sk.load(out, model=_net())


def _artifact_record(bad: dict[str, Any]) -> Callable[[Path, Path], None]:
    def case(tmp: Path, marker: Path) -> None:
        out = _artifact(tmp)
        rec = json.loads((out / "pruning.json").read_text())
        (out / "pruning.json").write_text(json.dumps({**rec, **bad}))
        sk.load(out, model=_net())

    return case


def _npz_junk(tmp: Path, marker: Path) -> None:
    from slimkit.core.refs import resolve_data_file

    (tmp / "junk.npz").write_bytes(b"junk")
    resolve_data_file(str(tmp / "junk.npz"), batch_size=2)


def _checkpoint(tmp: Path, marker: Path) -> None:
    from slimkit.core.train import fit

    torch.save({"model": _Payload(marker)}, tmp / "run.ckpt")
    fit(
        _net(),
        [(X, torch.zeros(2, dtype=torch.long))],
        epochs=1,
        lr=1e-3,
        checkpoint=tmp / "run.ckpt",
    )


def _recipe(tmp: Path, marker: Path) -> None:
    from slimkit.pipeline.recipe import Recipe

    (tmp / "evil.yaml").write_text(
        f"version: 1\nmodel: !!python/object/apply:pathlib.Path.touch [!!python/object/apply:"
        f"pathlib.Path ['{marker}']]\nsteps: []\n"
    )
    Recipe.load(tmp / "evil.yaml")


CASES: dict[str, Callable[[Path, Path], None]] = {
    "npz object array": _npz,
    "pt pickled object": _pt,
    "pt2 pickle in sample inputs": _pt2("sample_inputs"),
    "pt2 pickle in weights": _pt2("weights"),
    "safetensors header length": _safetensors_header,
    "safetensors offsets": _safetensors_json,
    "artifact weights are a pickle": _artifact_weights,
    "artifact record: slices not a mapping": _artifact_record({"slices": "oops"}),
    "artifact record: index not an int": _artifact_record({"slices": {"0.weight": {"0": ["a"]}}}),
    "artifact record: dropped not a list": _artifact_record({"dropped": 3}),
    "npz not a zip": _npz_junk,
    "training checkpoint pickle": _checkpoint,
    "recipe yaml python tag": _recipe,
}


def _outcome(case: Callable[[Path, Path], None], tmp: Path) -> tuple[str, str]:
    marker = tmp / "executed"
    try:
        case(tmp, marker)
        outcome, line = "ok", ""
    except SlimkitError as e:
        outcome, line = "named", str(e).splitlines()[0]
    except Exception as e:  # noqa: BLE001 - what the table is here to catch
        outcome, line = "traceback", f"{type(e).__name__}: {e}".splitlines()[0]
    return ("executed" if marker.exists() else outcome), line


@pytest.mark.parametrize("case", list(CASES))
def test_a_malicious_or_malformed_file_is_refused_by_name(
    case: str, tmp_path: Path, reliability_rows: list[dict[str, Any]]
) -> None:
    outcome, line = _outcome(CASES[case], tmp_path)
    reliability_rows.append({"case": f"file: {case}", "surface": "api", "outcome": outcome,
                             "error": line[:200]})  # fmt: skip
    assert outcome == "named", line
