"""Mixed precision and k-means weights on a Hugging Face BERT classifier built from a config
(keyword inputs, ModelOutput logits): the output stays close to the float model's and the input
model (left in train mode) is untouched."""

from __future__ import annotations

import copy

import pytest
import torch

import slimkit as sk

transformers = pytest.importorskip("transformers")


def _logits(out: object) -> torch.Tensor:
    return out.logits if hasattr(out, "logits") else out["logits"]  # type: ignore[index, attr-defined]


@pytest.mark.parametrize(
    ("config", "min_db"),
    [(sk.quant.Mixed(avg_bits=6, num_batches=4, sensitivity_batches=2), 25.0), ("kmeans", 15.0)],
)
def test_hf_bert_mixed_and_kmeans(config: object, min_db: float) -> None:
    sizes = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2}
    cfg = transformers.BertConfig(vocab_size=200, intermediate_size=64, num_labels=3, **sizes)
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(cfg).train()
    before = copy.deepcopy(model.state_dict())
    data = [{"input_ids": torch.randint(0, 200, (4, 16))} for _ in range(4)]
    q = sk.quantize(model, config, data=data)
    assert model.training and all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with torch.no_grad():
        ref = _logits(model.eval()(**data[0]))
        out = _logits(q(**data[0]))
    db = float(10 * torch.log10(ref.pow(2).sum() / (ref - out).pow(2).sum()))
    assert db > min_db, (
        db
    )  # measured 37.1 dB (mixed, 6 bits per weight) and 25.5 dB (k-means 4-bit)
