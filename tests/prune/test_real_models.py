"""Channel pruning on architectures no one here wrote: Hugging Face decoder and encoder models
(captured through torch.export), and recurrent models where nothing can be removed, which the
result says, with the reason."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import slimkit as sk
from slimkit.prune import pruning_record

T = pytest.importorskip("transformers")


def _params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


class Tagger(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(8, 16)
        self.rnn = nn.LSTM(16, 16, batch_first=True)
        self.out = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.rnn(self.inp(x))[0])


def test_nothing_removed_is_said_with_the_reason() -> None:
    model = Tagger().eval()
    with pytest.warns(UserWarning, match="removed nothing.*LSTM"):
        p = sk.prune(model, sk.prune.Channel(ratio=0.3), example_inputs=(torch.randn(1, 5, 8),))
    assert _params(p) == _params(model)
    rec = pruning_record(p)
    assert rec is not None and "LSTM" in rec["nothing_removed"]


def test_llama_prunes_through_torch_export_and_exports(tmp_path) -> None:
    torch.manual_seed(0)
    cfg = T.LlamaConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                        num_key_value_heads=1, intermediate_size=64, vocab_size=100)  # fmt: skip
    model = T.LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, 100, (1, 8))
    p = sk.prune(model, sk.prune.Channel(ratio=0.3), example_inputs=(ids,))
    assert _params(p) < _params(model)  # the MLP's hidden units (measured 64 -> 45)
    rec = pruning_record(p)
    assert rec is not None and rec["capture"] == "torch.export"
    assert model.config.use_cache is True  # caches were off for the capture only
    rep = sk.export_onnx(p, tmp_path / "p.onnx", example_kwargs={"input_ids": ids})
    assert rep.max_abs_err is not None and rep.max_abs_err < 1e-4


def test_t5_encoder_prunes_instead_of_failing_on_a_dynamic_reduction() -> None:
    torch.manual_seed(0)
    cfg = T.T5Config(d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4, vocab_size=100)
    model = T.T5EncoderModel(cfg).eval()
    ids = torch.randint(0, 100, (1, 8))
    p = sk.prune(model, sk.prune.Channel(ratio=0.3), example_inputs=(ids,))
    assert _params(p) < _params(model)
    ref, out = model(input_ids=ids).last_hidden_state, p(input_ids=ids).last_hidden_state
    assert out.shape == ref.shape  # the hidden size is kept: only inner widths shrink
