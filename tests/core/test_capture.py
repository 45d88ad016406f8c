"""capture_model: torch.fx with flags fixed, then torch.export rebuilt into module-level graphs,
then fx with the failing submodules kept whole; each path recorded, each result exact."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from slimkit.core.graph import capture_model
from slimkit.errors import GraphCaptureError


class Flagged(nn.Module):
    """Ordinary Python in forward: a flag, a None mask, an early return."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor, embed: bool = False, mask: torch.Tensor | None = None):
        h = torch.relu(self.bn(self.conv(x))).mean((2, 3))
        if embed:
            return h
        if mask is not None:
            h = h * mask
        return self.fc(h)


class ItemAssign(nn.Module):
    """A shape list built and edited in Python: torch.fx cannot trace it."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(6, 6)
        self.fc2 = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        shape = list(x.shape)[:2]
        shape[1] = -1
        h = torch.relu(self.fc1(x.reshape(shape)))
        return {"logits": self.fc2(h), "hidden": h}


class Loop(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for row in x:  # iterating over a Proxy
            x = x + row.sum()
        return self.fc(x)


class Outer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.odd = Loop()
        self.b = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.odd(self.a(x)))


def _kinds(gm: torch.fx.GraphModule) -> list[str]:
    return [type(gm.get_submodule(str(n.target))).__name__ for n in gm.graph.nodes
            if n.op == "call_module"]  # fmt: skip


def test_fx_fixes_plain_defaults_and_drops_their_guards() -> None:
    m = Flagged().eval()
    x = torch.randn(2, 3, 8, 8)
    gm = capture_model(copy.deepcopy(m), (x,))
    assert gm.meta["capture"]["path"] == "fx"
    assert gm.meta["capture"]["fixed"] == ["embed", "mask"]
    assert [n.op for n in gm.graph.nodes].count("placeholder") == 1  # forward(x) only
    torch.testing.assert_close(gm(x), m(x), rtol=0, atol=0)


def test_export_path_rebuilds_module_calls_and_keeps_dict_outputs() -> None:
    m = ItemAssign().eval()
    x = torch.randn(3, 2, 3)
    gm = capture_model(copy.deepcopy(m), (x,))
    cap = gm.meta["capture"]
    assert cap["path"] == "torch.export" and cap["failed"][0].startswith("torch.fx")
    assert _kinds(gm) == ["Linear", "Linear"]  # aten.linear became calls of the real layers
    y = torch.randn(5, 2, 3)
    out, ref = gm(y), m(y)
    assert set(out) == {"logits", "hidden"}  # same output structure, another batch size
    torch.testing.assert_close(out["logits"], ref["logits"], rtol=0, atol=1e-6)


def test_failing_submodule_is_kept_whole_without_example_inputs() -> None:
    m = Outer().eval()
    gm = capture_model(copy.deepcopy(m))  # no inputs: torch.export cannot run, leaves can
    cap = gm.meta["capture"]
    assert cap["path"] == "fx+leaves" and list(cap["leaves"]) == ["odd"]
    assert "iterate" in cap["leaves"]["odd"].lower() or "proxy" in cap["leaves"]["odd"].lower()
    x = torch.randn(3, 4)
    torch.testing.assert_close(gm(x), m(x), rtol=0, atol=0)


def test_nothing_works_names_both_failures() -> None:
    class Top(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if x.sum() > 0:  # data-dependent: neither capture handles it
                return x
            return -x

    with pytest.raises(GraphCaptureError, match="torch.fx.*torch.export"):
        capture_model(Top(), (torch.randn(2, 2),))


transformers = pytest.importorskip("transformers")


def _bert() -> tuple[nn.Module, dict[str, torch.Tensor]]:
    cfg = transformers.BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=64, vocab_size=100)  # fmt: skip
    torch.manual_seed(0)
    ids = torch.randint(0, 100, (2, 8))
    return transformers.BertModel(cfg).eval(), {"input_ids": ids, "attention_mask": ids * 0 + 1}


def test_hugging_face_bert_through_export_with_keyword_inputs() -> None:
    m, kw = _bert()
    gm = capture_model(copy.deepcopy(m), (), kw)
    assert gm.meta["capture"]["path"] == "torch.export"
    kinds = _kinds(gm)
    assert kinds.count("Linear") == 7 and "Embedding" in kinds and "LayerNorm" in kinds
    out, ref = gm(**kw), m(**kw)
    assert type(out) is type(ref)  # a ModelOutput stays a ModelOutput
    torch.testing.assert_close(out.last_hidden_state, ref.last_hidden_state, rtol=0, atol=1e-6)


def test_gpt2_conv1d_becomes_linear_and_tied_weights_stay_tied() -> None:
    cfg = transformers.GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=100, n_positions=32)
    torch.manual_seed(0)
    m = transformers.GPT2LMHeadModel(cfg).eval()
    ids = torch.randint(0, 100, (2, 8))
    gm = capture_model(copy.deepcopy(m), (), {"input_ids": ids})
    cap = gm.meta["capture"]
    assert len(cap["conv1d_as_linear"]) == 4  # c_attn, c_proj, c_fc, mlp.c_proj
    kinds = _kinds(gm)
    assert kinds.count("Linear") == 5 and kinds.count("Embedding") == 2  # lm_head + wte/wpe
    torch.testing.assert_close(gm(input_ids=ids).logits, m(input_ids=ids).logits, rtol=0,
                               atol=1e-5)  # fmt: skip
    assert m.config.use_cache is True  # the user's model (config included) is not changed
