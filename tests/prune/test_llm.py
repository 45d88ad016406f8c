"""SparseGPT and Wanda: the solvers on a layer (sparsity pattern, output error against magnitude),
the verb on the tiny zoo GPT and a Hugging Face GPT-2 built from a config, and the compact
bit-mask + values artifact (exact reload, size measured)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

import slimkit as sk
from slimkit.core.io import save_weights
from slimkit.errors import CheckpointError, ConfigError
from slimkit.prune import SparseGPT, Wanda, load_sparse, save_sparse
from slimkit.prune.llm import sparsegpt_prune, wanda_mask
from slimkit.prune.sparse_store import pack_bits, unpack_bits
from slimkit.prune.unstructured import nm_mask
from slimkit.testing.numerics import sqnr
from slimkit.zoo.models import create_model, example_inputs


def _layer_case(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A weight (32, 64) and inputs (512, 64) with correlated, unevenly scaled features."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(64, 64, generator=g) / 8
    scale = torch.rand(64, generator=g) * 4 + 0.1
    x = (torch.randn(512, 64, generator=g) @ (torch.eye(64) + mix)) * scale
    return torch.randn(32, 64, generator=g), x


def _out_err(w: torch.Tensor, new: torch.Tensor, x: torch.Tensor) -> float:
    return float(((x @ (w - new).T) ** 2).mean())


def test_solvers_zero_the_asked_fraction_and_sparsegpt_reconstructs_best() -> None:
    w, x = _layer_case()
    h = x.T @ x / len(x)
    errs = {}
    for n in (0, 2):  # 50 % unstructured, then 2:4
        cfg = SparseGPT(sparsity=0.5, n=n)
        sgpt, mask = sparsegpt_prune(w, h, cfg)
        assert torch.equal(sgpt == 0, mask == 0)
        wmask = wanda_mask(w, torch.diagonal(h).sqrt(), Wanda(sparsity=0.5, n=n))
        for m in (mask, wmask):
            if n:  # exactly 2 kept in every 4 consecutive inputs of every row
                assert torch.equal(m.reshape(-1, 4).sum(1), torch.full((32 * 16,), 2.0))
            else:
                assert int((m == 0).sum()) == pytest.approx(w.numel() // 2, abs=2)
        wanda_rows = (wmask == 0).sum(1)
        assert torch.equal(wanda_rows, torch.full((32,), 32))  # per output row
        by_size = (w.abs() > w.abs().flatten().kthvalue(w.numel() // 2).values).float()
        mag = w * (nm_mask(w, 2, 4) if n else by_size)
        errs[n] = (_out_err(w, sgpt, x), _out_err(w, w * wmask, x), _out_err(w, mag, x))
    print(errs)
    for n, (e_sgpt, e_wanda, e_mag) in errs.items():
        # measured (unstructured / 2:4): SparseGPT 19.2 / 43.3, Wanda 24.5 / 61.0, magnitude
        # 54.7 / 105.9 (mean squared output error)
        assert e_sgpt < 0.9 * e_wanda and e_wanda < 0.7 * e_mag, (n, e_sgpt, e_wanda, e_mag)


def test_sparsegpt_at_zero_sparsity_returns_the_weights() -> None:
    w, x = _layer_case(1)
    new, mask = sparsegpt_prune(w, x.T @ x / len(x), SparseGPT(sparsity=0.0))
    assert bool(mask.all())
    assert float((new - w).abs().max()) < 1e-5


def test_the_verbs_on_the_zoo_gpt() -> None:
    model = create_model("gpt_tiny").eval()
    data = [example_inputs("gpt_tiny", batch=4, seed=i) for i in range(2)]
    (x,) = example_inputs("gpt_tiny", batch=2, seed=9)
    with torch.no_grad():
        ref = model(x)
    for cfg in (Wanda(sparsity=0.5), SparseGPT(sparsity=0.5), SparseGPT(n=2, m=4)):
        out = sk.prune(model, cfg, data=data, scope=sk.Scope(exclude=["lm_head"]))
        rec = sk.report(out).record
        assert rec["sparsity"] == 0.5 and rec["calibration_passes"] == 8  # qkv, out, fc1, fc2 x2
        lin = {n: m for n, m in out.named_modules() if isinstance(m, nn.Linear)}
        for name, m in lin.items():
            zeros = float((m.weight == 0).float().mean())
            assert zeros == (0.0 if name == "lm_head" else pytest.approx(0.5, abs=0.01)), name
        with torch.no_grad():
            assert sqnr(ref, out(x)) > 7.0  # measured 9.1-10.6 dB on random weights
    with pytest.raises(ConfigError, match="n=4 must be smaller than m=4"):
        sk.prune(model, "sparsegpt", n=4, data=data)
    with pytest.raises(ConfigError, match="no Linear layer in scope can be pruned.*Fix:"):
        sk.prune(model, SparseGPT(n=2, m=7), data=data)
    with pytest.raises(ConfigError, match="needs data="):
        sk.prune(model, "wanda")


def test_hugging_face_gpt2_from_a_config(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=128, n_positions=64)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    g = torch.Generator().manual_seed(0)
    data = [torch.randint(0, 128, (4, 32), generator=g) for _ in range(3)]
    ids = torch.randint(0, 128, (2, 32), generator=g)
    with torch.no_grad():
        ref = model(ids).logits
    db = {}
    for name, cfg_ in (("magnitude", sk.prune.NM()), ("sparsegpt", SparseGPT(n=2, m=4)),
                       ("wanda", Wanda(n=2, m=4))):  # fmt: skip
        out = sk.prune(model, cfg_, data=data)
        with torch.no_grad():
            db[name] = sqnr(ref, out(ids).logits)
        if name == "sparsegpt":
            rec = sk.report(out).record
            assert "transformer.h.0.attn.c_attn" in rec["conv1d_as_linear"]
            assert "lm_head (weight tied to an embedding)" in rec["left_dense"]
            assert torch.equal(out.lm_head.weight, model.lm_head.weight)
            path = save_sparse(out, tmp_path / "gpt2.safetensors")
            back = load_sparse(path, model=model)
            with torch.no_grad():
                assert torch.equal(back(ids).logits, out(ids).logits)
    # logits vs dense, measured: magnitude 2:4 9.6 dB, Wanda 11.4 dB, SparseGPT 13.6 dB
    assert db["sparsegpt"] > db["magnitude"] + 2.5 and db["wanda"] > db["magnitude"] + 1, db


def test_sparse_artifact_is_compact_and_reloads_exactly(tmp_path: Path) -> None:
    model = create_model("gpt_tiny").eval()
    data = [example_inputs("gpt_tiny", batch=4, seed=i) for i in range(2)]
    out = sk.prune(model, SparseGPT(sparsity=0.75), data=data)
    sparse = save_sparse(out, tmp_path / "s.safetensors")
    dense = save_weights(model, tmp_path / "d.safetensors")
    ratio = sparse.stat().st_size / dense.stat().st_size
    assert ratio < 0.43  # measured 0.396: Linear weights at 1/32 + 1/4, embeddings dense
    back = load_sparse(sparse, model=model)
    (x,) = example_inputs("gpt_tiny", batch=2, seed=5)
    with torch.no_grad():
        assert torch.equal(back(x), out(x))
    assert torch.equal(back.blocks[0].mlp.fc1.parametrizations.weight[0].mask,
                       out.blocks[0].mlp.fc1.parametrizations.weight[0].mask)  # fmt: skip
    with pytest.raises(CheckpointError, match="not written by save_sparse.*Fix:"):
        load_sparse(dense, model=model)


def test_bit_packing_round_trips() -> None:
    m = torch.rand(7, 13) > 0.5
    packed = pack_bits(m)
    assert packed.dtype == torch.uint8 and packed.numel() == (7 * 13 + 7) // 8
    assert torch.equal(unpack_bits(packed, m.shape), m)
