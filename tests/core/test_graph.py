from __future__ import annotations

import pytest
import torch
from torch import nn

from slimkit.core.graph import capture
from slimkit.errors import GraphCaptureError


class Gate(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:  # data-dependent control flow: untraceable
            return self.proj(x)
        return x


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Linear(4, 4)
        self.blocks = nn.Sequential(nn.ReLU(), Gate())
        self.rnn = nn.LSTM(4, 4, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(self.stem(x))


@pytest.mark.parametrize("method", ["fx", "export"])
def test_failure_names_the_module(method: str) -> None:
    with pytest.raises(GraphCaptureError) as ei:
        capture(Net(), (torch.randn(2, 4),), method=method)  # type: ignore[arg-type]
    err = ei.value
    assert err.module == "blocks.1"
    assert "module 'blocks.1' (Gate)" in str(err) and "Scope(exclude=['blocks.1'])" in str(err)


def test_leaf_module_steps_around_the_failure_and_matches_eager() -> None:
    m = Net().eval()
    gm = capture(m, leaf_names=["blocks.1"])
    x = torch.randn(3, 4)
    torch.testing.assert_close(gm(x), m(x), atol=1e-6, rtol=0)
    assert any(n.op == "call_module" and n.target == "blocks.1" for n in gm.graph.nodes)


def test_export_capture_and_top_level_failure() -> None:
    lin = nn.Linear(4, 2)
    ep = capture(lin, (torch.randn(2, 4),), method="export")
    x = torch.randn(2, 4)
    torch.testing.assert_close(ep.module()(x), lin(x))

    class Top(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * 2 if x.mean() > 0 else x

    with pytest.raises(GraphCaptureError, match="top-level forward of Top"):
        capture(Top(), method="fx")
    with pytest.raises(GraphCaptureError, match="needs example inputs"):
        capture(lin, method="export")
