"""Distillation: the loss chosen per output kind, the losses themselves, feature pairing with
adapters, relations, and the verb's guarantees (student copied, teacher untouched)."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from torch import nn

import slimkit as sk
from slimkit.core.data import flatten_output
from slimkit.distill import feature as ft
from slimkit.distill.losses import detect, kind_loss
from slimkit.errors import ConfigError


def test_the_loss_is_chosen_from_the_outputs_and_targets() -> None:
    torch.manual_seed(0)
    logits = torch.randn(64, 10)
    assert detect("o", logits, torch.randint(0, 10, (64,))).kind == "softmax"
    assert detect("o", logits.softmax(-1)).kind == "softmax"
    balanced = torch.rand(64, 20)
    assert detect("o", balanced).kind == "sigmoid"
    heat = torch.zeros(64, 200)
    heat[torch.arange(64), torch.randint(0, 200, (64,))] = 0.9
    d = detect("o", heat)
    assert d.kind == "peaked" and "collapse" in d.reason
    multi_hot = (torch.rand(64, 20) > 0.5).float()
    d = detect("o", logits.repeat(1, 2), multi_hot)
    assert d.kind == "sigmoid" and d.logits
    assert detect("o", torch.randn(64, 3), torch.randn(64, 3)).kind == "regression"
    assert detect("o", torch.randn(4, 16, 100)).kind == "softmax"  # token logits, no targets
    assert detect("o", torch.randn(64, 8)).kind == "regression"  # values, no targets


@pytest.mark.parametrize("kind", ["softmax", "sigmoid", "peaked", "regression", "cosine"])
def test_each_loss_is_zero_at_the_teacher_and_positive_elsewhere(kind: str) -> None:
    torch.manual_seed(0)
    t = torch.rand(32, 50) if kind in ("sigmoid", "peaked") else torch.randn(32, 50)
    other = torch.rand(32, 50) if kind in ("sigmoid", "peaked") else torch.randn(32, 50)
    same = kind_loss(kind, t.clone(), t, temperature=4.0, logits=False)
    diff = kind_loss(kind, other, t, temperature=4.0, logits=False)
    assert abs(float(same)) < 1e-5 and float(diff) > 1e-3


def test_outputs_of_any_structure_are_walked() -> None:
    out = {"logits": torch.zeros(2, 3), "aux": (torch.ones(2), torch.zeros(2, dtype=torch.long))}
    assert [n for n, _ in flatten_output(out)] == ["logits", "aux.0"]


class _Two(nn.Module):
    """A model returning a dict: class logits and an embedding."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(12, width), nn.ReLU(), nn.Linear(width, width))
        self.head = nn.Linear(width, 4)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.body(x)
        return {"logits": self.head(h), "score": self.head(h).sum(-1, keepdim=True)}


def _data() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(32, 12, generator=g), torch.randint(0, 4, (32,), generator=g))
            for _ in range(8)]  # fmt: skip


def test_distilling_a_dict_output_leaves_student_and_teacher_alone() -> None:
    torch.manual_seed(0)
    teacher, student = _Two(32).train(), _Two(8)
    t_state, s_state = copy.deepcopy(teacher.state_dict()), copy.deepcopy(student.state_dict())
    out = sk.distill(student, teacher, sk.distill.Response(epochs=2, lr=1e-2), data=_data())
    for ref, now in ((t_state, teacher.state_dict()), (s_state, student.state_dict())):
        assert all(torch.equal(ref[k], now[k]) for k in ref)
    assert teacher.training  # its mode is restored too
    rec = sk.report(out).record
    assert [d["output"] for d in rec["losses"]] == ["logits", "score"]
    assert rec["alpha"] == 1.0  # two outputs, one target: distillation only
    assert rec["history"][-1]["loss"] < rec["history"][0]["loss"]
    assert not any("no measurable change" in n for n in sk.report(out).notes)


def _cnn(width: int) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, width, 3, padding=1), nn.ReLU(), nn.Conv2d(width, width, 3, padding=1),
        nn.ReLU(), nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * width, 5),
    )  # fmt: skip


def test_feature_pairs_are_found_by_depth_and_shape_and_adapters_bridge_widths() -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8)
    s = ft.trace_features(_cnn(4), lambda m: m(x))
    t = ft.trace_features(_cnn(16), lambda m: m(x))
    pairs = ft.pair_layers(s, t, 3)
    assert len(pairs) == 3 and all(a == b for a, b in pairs)  # same design, other width
    shapes_s, shapes_t = dict(s), dict(t)
    for a, b in pairs:
        adapter = ft.Adapter(shapes_s[a], shapes_t[b])
        assert adapter(torch.randn(shapes_s[a])).shape == shapes_t[b]


def test_feature_distillation_trains_the_adapters_and_reports_the_pairs() -> None:
    torch.manual_seed(0)
    data = [(torch.randn(16, 3, 8, 8), torch.randint(0, 5, (16,))) for _ in range(6)]
    teacher = _cnn(16)
    out = sk.distill(_cnn(4), teacher, sk.distill.Feature(epochs=2, n_pairs=2), data=data)
    rec = sk.report(out).record
    assert len(rec["pairs"]) == 2
    assert sum(p.numel() for p in out.parameters()) == sum(p.numel() for p in _cnn(4).parameters())
    with pytest.raises(ConfigError, match="no layer named|no single tensor output"):
        sk.distill(_cnn(4), teacher, sk.distill.Feature(epochs=1, pairs={"nope": "0"}), data=data)


def test_relation_losses_see_relations_not_scale() -> None:
    torch.manual_seed(0)
    e = torch.randn(16, 8)
    assert float(ft.rkd_loss(3 * e, e, distance=1.0, angle=2.0)) < 1e-6  # same relations
    assert float(ft.rkd_loss(torch.randn(16, 8), e, distance=1.0, angle=2.0)) > 1e-3
    proj = nn.Identity()
    assert float(ft.contrastive_loss(e, e, proj)) < float(ft.contrastive_loss(e.flip(0), e, proj))


@pytest.mark.parametrize("cfg", [sk.distill.Relation(epochs=2),
                                 sk.distill.Relation(kind="contrastive", epochs=2)])  # fmt: skip
def test_relation_distillation_runs_on_the_embedding(cfg: sk.distill.Relation) -> None:
    data = [(torch.randn(16, 3, 8, 8), torch.randint(0, 5, (16,))) for _ in range(6)]
    out = sk.distill(_cnn(4), _cnn(16), cfg, data=data)
    assert sk.report(out).record["embeddings"] == ["8", "8"]  # the input of the last Linear


def test_bad_calls_are_named() -> None:
    with pytest.raises(ConfigError, match="teacher model second"):
        sk.distill(_cnn(4), "response")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="loss"):
        sk.distill.Response(loss="l1")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="did you mean 'temperature'"):
        sk.distill.Response.from_dict({"temperatur": 2})
    with pytest.raises(ConfigError, match="differ in shape"):
        sk.distill(nn.Linear(12, 3), nn.Linear(12, 4), "kd", data=[torch.randn(4, 12)])


def test_recover_after_pruning_distils_with_the_chosen_loss() -> None:
    torch.manual_seed(0)
    data = [(torch.randn(16, 3, 8, 8), torch.randint(0, 5, (16,))) for _ in range(6)]
    dense = _cnn(16).eval()
    small = sk.prune(dense, sk.prune.Channel(ratio=0.5), example_inputs=(data[0][0],))
    res = sk.prune.recover(small, data, teacher=dense, epochs=2, lr=1e-3, progress=False)
    assert res.epochs_run == 2 and res.final_loss is not None
    assert not small.training


def test_hugging_face_models_distil_and_train_quantized(tmp_path: Path) -> None:
    """A Hugging Face BERT classifier built from a config: dict batches with labels, a
    ``ModelOutput`` walked to its logits, the teacher left alone in train mode; QAT on the same
    model ends as an integer graph that ONNX Runtime runs as simulated."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=200, hidden_size=32, num_hidden_layers=2,
                                  num_attention_heads=2, intermediate_size=64,
                                  num_labels=3)  # fmt: skip
    teacher = transformers.BertForSequenceClassification(cfg).train()
    small = transformers.BertConfig(**{**cfg.to_dict(), "num_hidden_layers": 1})
    student = transformers.BertForSequenceClassification(small).eval()
    data = [{"input_ids": torch.randint(0, 200, (4, 16)),
             "attention_mask": torch.ones(4, 16, dtype=torch.long),
             "labels": torch.randint(0, 3, (4,))} for _ in range(6)]  # fmt: skip
    before = copy.deepcopy(teacher.state_dict())
    out = sk.distill(student, teacher, sk.distill.Response(epochs=1), data=data)
    losses = sk.report(out).record["losses"]
    assert [(d["output"], d["kind"]) for d in losses] == [("logits", "softmax")]
    assert teacher.training and all(
        torch.equal(before[k], v) for k, v in teacher.state_dict().items()
    )
    q = sk.quantize(teacher.eval(), sk.quant.QAT(weight_bits=4, epochs=1), data=data)
    assert q.meta["slimkit"]["qat"]["layers"] > 0
    feeds = {k: v for k, v in data[0].items() if k != "labels"}
    rep = sk.export_onnx(q, tmp_path / "q.onnx", example_kwargs=feeds)
    assert rep.max_abs_err is not None and rep.size_bytes > 0
