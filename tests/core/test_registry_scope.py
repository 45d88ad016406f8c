from __future__ import annotations

import pytest
from torch import nn

from slimkit.core.registry import Registry
from slimkit.core.scope import Scope
from slimkit.errors import RegistryError, ScopeError


def test_registry_wildcards_and_did_you_mean() -> None:
    reg: Registry[int] = Registry("method")
    reg.add("prune.channel", 1, kind="structured")
    reg.add("prune.magnitude", 2)
    reg.add("quant.ptq", 3)
    assert reg.names("prune.*") == ["prune.channel", "prune.magnitude"]
    assert reg.get("quant.ptq") == 3 and reg.entry("prune.channel").meta == {"kind": "structured"}
    with pytest.raises(RegistryError) as ei:
        reg.get("prune.chanel")
    assert "did you mean 'prune.channel'" in str(ei.value)
    with pytest.raises(RegistryError, match="registered twice"):
        reg.add("quant.ptq", 4)


def _model() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8, 4)
    )


def test_scope_include_exclude_types() -> None:
    m = _model()
    assert [n for n, _ in Scope().select(m)] == ["0", "1", "2", "3", "4"]
    assert [n for n, _ in Scope(types=(nn.Conv2d, nn.Linear)).select(m)] == ["0", "4"]
    assert [n for n, _ in Scope(exclude=["4"]).select(m, (nn.Conv2d, nn.Linear))] == ["0"]
    assert [n for n, _ in Scope(include="[01]").select(m)] == ["0", "1"]


def test_scope_that_matches_nothing_raises_with_names() -> None:
    with pytest.raises(ScopeError) as ei:
        Scope(include=["head.*"]).select(_model(), (nn.Linear,))
    assert "matches no module of type Linear" in str(ei.value) and "'4'" not in str(ei.value)
    assert "include: 4" in str(ei.value)
    with pytest.raises(ScopeError, match="not a valid regular expression"):
        Scope(include=["layer[1"])
