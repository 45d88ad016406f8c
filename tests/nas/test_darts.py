"""The DARTS relaxation: one-hot weights compute exactly the chosen sub-network, the expected
latency is the table's expectation, the latency term moves the alphas to cheaper choices, and the
derived architecture round-trips, extracts, exports and runs in ORT."""

from __future__ import annotations

import itertools
import random

import numpy as np
import pytest
import torch

from slimkit.errors import ConfigError
from slimkit.nas import Arch, CNNSpace, Stage, StageSpace, SuperNet
from slimkit.nas.darts import (
    Alphas,
    Darts,
    ExpectedLatency,
    Probs,
    arch_of,
    darts_search,
    fit_target,
    mixed_forward,
    stage_ops,
)
from slimkit.nas.latency import LatencyTable, _key_str, space_keys
from slimkit.nas.search import Candidate


def tiny_space() -> CNNSpace:
    # stage 0: stride 1 from the 8-channel stem, so its first block has a residual at width 8 only
    return CNNSpace(input_size=16, stem=8, head=16, stages=[
        StageSpace(widths=[8, 12], depths=[1, 2], kernels=[3, 5], expands=[2, 3], stride=1),
        StageSpace(widths=[12, 16], depths=[1, 2], kernels=[3, 5], expands=[2, 4], stride=2),
    ])  # fmt: skip


def macs_table(space: CNNSpace) -> LatencyTable:
    """A synthetic table: ms grows with every block's MACs (a bigger choice costs more)."""
    entries = {}
    for key in space_keys(space):
        if key[0] == "block":
            cin, cout, stride, k, e, size = key[1:]
            out = -(-size // stride)
            entries[_key_str(key)] = 1e-6 * (cin * cin * e * size**2 + cin * e * k * k * out**2
                                             + cin * e * cout * out**2)  # fmt: skip
        else:
            entries[_key_str(key)] = 0.01
    return LatencyTable(entries, call_ms=0.005, scale=0.9, offset=0.002)


def trained_bn_net(space: CNNSpace) -> SuperNet:
    torch.manual_seed(0)
    net = SuperNet(space)
    with torch.no_grad():  # non-trivial BatchNorm statistics and affine parameters
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
    return net.eval()


def random_alphas(space: CNNSpace, *, seed: int) -> Alphas:
    alphas = Alphas(space)
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in alphas.parameters():
            p.normal_()
    return alphas


def test_one_hot_mixture_is_exactly_the_chosen_network():
    space = tiny_space()
    net = trained_bn_net(space)
    x = torch.rand(4, 3, 16, 16)
    rng = random.Random(0)
    archs = [space.largest(), space.smallest(), *[space.sample(rng) for _ in range(8)]]
    assert any(a.stages[0].width == 8 for a in archs)  # the residual of a stride-1 first block
    with torch.no_grad():
        for arch in archs:
            ref = net.extract(arch)(x)
            got = mixed_forward(net, Probs.one_hot(space, arch), x)
            # the same weights on the same channels, extra channels exactly zero: measured 0.0
            torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
        # train mode (batch statistics) too
        arch = archs[2]
        sub = net.extract(arch).train()
        net.train()
        torch.testing.assert_close(mixed_forward(net, Probs.one_hot(space, arch), x), sub(x),
                                   atol=1e-5, rtol=1e-5)  # fmt: skip
        # a soft mixture is none of them
        soft = mixed_forward(net.eval(), Alphas(space).probs(), x)
        assert (soft - net.extract(archs[0])(x)).abs().max() > 1e-3


def test_expected_latency_is_the_tables_expectation():
    space = tiny_space()
    table = macs_table(space)
    expected = ExpectedLatency(space, table)
    rng = random.Random(1)
    for arch in [space.largest(), space.smallest(), space.sample(rng), space.sample(rng)]:
        assert float(expected(Probs.one_hot(space, arch))) == pytest.approx(
            table.predict(space, arch), rel=1e-6
        )
    alphas = random_alphas(space, seed=3)
    logp = alphas.choices()
    keys = list(logp)
    exact = 0.0  # every combination of choices, weighted by its probability
    for pick in itertools.product(*[range(len(logp[k])) for k in keys]):
        prob = float(np.exp(sum(float(logp[k][i]) for k, i in zip(keys, pick, strict=True))))
        exact += prob * table.predict(space, arch_of(space, dict(zip(keys, pick, strict=True))))
    assert float(expected(alphas.probs().detach())) == pytest.approx(exact, rel=1e-5)
    broken = LatencyTable({k: v for k, v in list(table.entries.items())[1:]})
    with pytest.raises(ConfigError, match="no entry"):
        ExpectedLatency(space, broken)


def _data(n: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.rand(16, 3, 16, 16, generator=g), torch.randint(0, 10, (16,), generator=g))
            for _ in range(n)]  # fmt: skip


def _constant(space: CNNSpace, table: LatencyTable):
    def evaluate(arch: Arch) -> Candidate:
        return Candidate(arch, 0.5, table.predict(space, arch), 0)

    return evaluate


def test_the_latency_term_moves_the_alphas_to_the_cheaper_choices():
    space = tiny_space()
    table = macs_table(space)
    lo = table.predict(space, space.smallest())
    torch.manual_seed(0)
    net = SuperNet(space)
    cfg = Darts(epochs=1, alpha_lr=0.1, latency_weight=20.0, max_steps=8)
    res = darts_search(net, table, train_loader=_data(8, 0), val=_data(2, 1), target_ms=lo / 2,
                       evaluate=_constant(space, table), config=cfg)  # fmt: skip
    info = res.info
    trace = [t["expected_ms"] for t in info["trace"]]
    assert trace[-1] < 0.9 * trace[0]
    # each width, depth and the joint (kernel, expansion) choice: the cheapest option gained
    # probability over uniform (1/n); measured >= 0.79 (widths, depths), >= 0.42 (ops, where the
    # kernel size costs little: 0.25 is uniform)
    for key, probs in info["probs"].items():
        assert probs[0] > 1 / len(probs) + 0.1, (key, probs)
    assert res.trials[0].arch == space.smallest() and info["argmax"] == space.smallest().describe()
    # without the latency term nothing pulls them there (a control: the test can fail)
    net = SuperNet(space)
    free = darts_search(net, table, train_loader=_data(8, 0), val=_data(2, 1), target_ms=1e3,
                        evaluate=_constant(space, table),
                        config=cfg.replace(latency_weight=0.0))  # fmt: skip
    assert min(p[0] for p in free.info["probs"].values()) < 0.6


def more_probable_neighbours(space: CNNSpace, alphas: Alphas, arch: Arch) -> list[Arch]:
    """The architectures one width or one used op away from ``arch`` with a more probable
    choice under ``alphas``."""
    logp, out = alphas.choices(), []
    for s, (st, a) in enumerate(zip(space.stages, arch.stages, strict=True)):
        ops = stage_ops(space, s)
        current = {("width", s): st.widths.index(a.width)}
        current.update({("op", s, j): ops.index(o)
                        for j, o in enumerate(zip(a.kernels, a.expands, strict=True))})  # fmt: skip
        for key, cur in current.items():
            for i in range(len(logp[key])):
                if logp[key][i] > logp[key][cur]:
                    stages = list(arch.stages)
                    if key[0] == "width":
                        stages[s] = Stage(st.widths[i], a.kernels, a.expands)
                    else:
                        k, e = list(a.kernels), list(a.expands)
                        k[key[2]], e[key[2]] = ops[i]
                        stages[s] = Stage(a.width, tuple(k), tuple(e))
                    out.append(Arch(tuple(stages)))
    return out


def test_fit_target_steps_the_argmax_down_under_the_target():
    space = tiny_space()
    table = macs_table(space)

    def predict(a: Arch) -> float:
        return table.predict(space, a)

    lo, hi = predict(space.smallest()), predict(space.largest())
    alphas = random_alphas(space, seed=2)
    with torch.no_grad():  # the argmax is the largest network
        for p in alphas.parameters():
            p.add_(torch.arange(len(p)) * 3.0)
    assert alphas.derive() == space.largest()
    target = lo + 0.4 * (hi - lo)
    arch = fit_target(space, alphas, predict, target)
    assert predict(arch) <= target < hi and predict(arch) > lo  # not simply the smallest
    # stage 0's ops are barely preferred and cheap to give up, stage 1's second block is not: the
    # step down changes stage 0's ops first, then drops the block, which frees enough budget to
    # take the preferred op back (without the step back up: 'k33 e22', 0.158 ms of 0.205)
    with torch.no_grad():
        for s in range(2):
            alphas.width[s].copy_(torch.tensor([0.0, 3.0]))
            alphas.depth[s].copy_(torch.tensor([0.0, 3.0 if s == 0 else 0.5]))
            for p in alphas.op[s]:
                p.copy_(torch.tensor([0.0, 0.0, 0.0, 0.02 if s == 0 else 3.0]))
    target = lo + 0.6 * (hi - lo)
    arch = fit_target(space, alphas, predict, target)
    assert predict(arch) <= target and arch.stages[1].depth == 1
    assert arch.stages[0].expands != (2, 2)
    # no change of one width or used op is both more probable and under the target
    assert all(predict(a) > target for a in more_probable_neighbours(space, alphas, arch))


def test_derived_arch_round_trips_extracts_and_runs_in_ort(tmp_path):
    from slimkit.export.onnx import export_onnx
    from slimkit.export.ort import ort_session, run_session

    space = tiny_space()
    net = trained_bn_net(space)
    arch = random_alphas(space, seed=5).derive()
    space.check(arch)
    assert Arch.from_yaml(arch.to_yaml(tmp_path / "arch.yaml")) == arch
    sub = net.extract(arch)
    x = torch.rand(3, 3, 16, 16)
    export_onnx(sub, tmp_path / "m.onnx", example_inputs=(x[:1],))
    (got,) = run_session(ort_session(tmp_path / "m.onnx"), [x])
    with torch.no_grad():
        ref = sub(x).numpy()
    assert np.abs(got - ref).max() < 1e-4  # float ONNX vs PyTorch, measured ~1e-6


def test_bad_darts_input():
    with pytest.raises(ConfigError, match="positive"):
        Darts(alpha_lr=0.0)
    with pytest.raises(ConfigError, match="epochs"):
        Darts(epochs=0)
    with pytest.raises(ConfigError, match="latency weight"):
        Darts(latency_weight=-1.0)
    from slimkit.nas import search_arch

    with pytest.raises(ConfigError, match="unknown search strategy 'grid'.*darts"):
        search_arch("shapes", strategy="grid")  # before anything is measured or trained
    space = tiny_space()
    table = macs_table(space)
    with pytest.raises(ConfigError, match="held-out"):
        darts_search(SuperNet(space), table, train_loader=_data(1, 0), val=[], target_ms=1.0,
                     evaluate=_constant(space, table))  # fmt: skip


@pytest.mark.slow
def test_nas_command_with_darts_writes_a_model_that_runs_in_ort(tmp_path, monkeypatch):
    import json

    import yaml
    from typer.testing import CliRunner

    from slimkit.cli import app
    from slimkit.export.ort import ort_session, run_session
    from slimkit.nas import load

    monkeypatch.setenv("SLIMKIT_CACHE_DIR", str(tmp_path / "cache"))
    space = CNNSpace(stem=8, head=16, stages=[
        StageSpace(widths=[8, 12], depths=[1, 2], kernels=[3], expands=[2]),
        StageSpace(widths=[12, 16], depths=[1, 2], kernels=[3, 5], expands=[2], stride=2),
    ])  # fmt: skip
    space.to_yaml(tmp_path / "space.yaml")
    out = tmp_path / "art"
    args = ["nas", "--out", str(out), "--space", str(tmp_path / "space.yaml"), "--strategy",
            "darts", "--supernet-epochs", "1", "--max-steps", "3", "--json"]  # fmt: skip
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    info = json.loads(res.output[res.output.index("{") :])
    assert info["strategy"] == "darts" and info["search"]["trials"] == 1
    assert info["search"]["info"]["steps"] == 3
    assert info["predicted_ms"] <= info["target_ms"] * (1 - info["margin"]) + 1e-12
    spec = yaml.safe_load((out / "arch.yaml").read_text())
    assert Arch.from_dict(spec["arch"]).describe() == info["describe"]
    back = load(out)
    x = torch.rand(3, 3, 32, 32)
    (got,) = run_session(ort_session(out / "model.onnx"), [x])
    with torch.no_grad():
        assert np.abs(got - back(x).numpy()).max() < 1e-4  # measured ~1e-6
