"""The float prefix: leading layers kept float where ORT runs them faster (quant.prefix)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from slimkit.errors import ConfigError
from slimkit.export.qdq import export_quantized
from slimkit.graph_opt.bn_fold import fold_bn
from slimkit.quant import prefix, sim
from slimkit.quant.modules import ActQuant, QuantLayer
from slimkit.quant.ptq import PTQ, quantize_ptq
from slimkit.testing.numerics import sqnr
from slimkit.zoo import create_model, example_inputs

MNV2 = "mobilenetv2_cifar"


def _folded(name: str) -> tuple[torch.fx.GraphModule, sim.Placement, torch.Tensor]:
    model = create_model(name)
    x = example_inputs(name, batch=2, seed=0)[0]
    gm = fold_bn(model, example_inputs=(x,))
    return gm, sim.place(gm, None), x


def test_leading_chain_stops_at_the_first_branch() -> None:
    gm, plan, _ = _folded(MNV2)
    chain, nxt = prefix.leading_chain(gm, plan.weighted)
    targets = [plan.weighted[n] for n in chain]
    # stem, block 1 (depthwise, project), block 2 (expand, depthwise, project); block 2's output
    # feeds block 3 and its residual add, so the chain ends there
    block1 = ["features.0.0", "features.1.conv.0.0", "features.1.conv.1"]
    assert targets == [*block1, "features.2.conv.0.0", "features.2.conv.1.0", "features.2.conv.2"]
    assert plan.weighted[nxt] == "features.3.conv.0.0"
    gm, plan, _ = _folded("resnet18_cifar")
    chain, nxt = prefix.leading_chain(gm, plan.weighted)
    assert [plan.weighted[n] for n in chain] == ["conv1"]
    assert plan.weighted[nxt] == "layer1.0.conv1"


def test_pick_takes_the_longest_cut_among_ties() -> None:
    assert prefix.pick([1.0, 1.2, 0.9, 0.98, 1.5]) == 3  # 0.98 is within 10 % of 0.9
    assert prefix.pick([1.0, 1.2, 1.5]) == 0  # all-int8 fastest: nothing float
    assert prefix.pick([1.0, 0.8, 0.9]) == 1  # 12.5 % slower is not a tie
    assert prefix.pick([float("nan"), 1.0]) == 1


def test_only_small_leading_layers_are_candidates() -> None:
    """Candidates hold at most 2 % of the weights together, so a model never comes back mostly
    float because float happens to be faster for it: an MLP's first layer is too big to try, a
    small CNN's 1-channel stem is the only one tried."""
    gm, plan, x = _folded("mlp")
    choice = prefix.choose(gm, plan.weighted, (x,))
    assert choice.layers == [] and choice.times_ms == []
    assert "no leading chain" in choice.summary()
    gm, plan, x = _folded("digits_cnn")
    choice = prefix.choose(gm, plan.weighted, (x,))
    assert len(choice.candidates) == 1 and len(choice.times_ms) == 2


def test_choose_times_every_cut_and_keeps_a_prefix(tmp_path: Path) -> None:
    gm, plan, x = _folded(MNV2)
    prefix._CACHE.clear()
    choice = prefix.choose(gm, plan.weighted, (x,))
    assert len(choice.times_ms) == len(choice.candidates) + 1 == 7  # cuts 0..6, all timed
    assert all(t > 0 for t in choice.times_ms)
    assert choice.layers == choice.candidates[: len(choice.layers)]
    assert prefix.choose(gm, plan.weighted, (x,)) == choice  # cached by structure


def test_keep_float_places_the_quantizer_after_the_float_layers_activation() -> None:
    """A float conv followed by ReLU6 feeding an int8 layer: quantize after the ReLU6 (range from
    0, all 256 codes on the values that exist), not before it."""
    gm, _, x = _folded(MNV2)
    plan = sim.place(gm, None, keep_float={"features.0.0"})
    assert "features.0.0" in plan.skipped and "features_0_0" not in plan.weighted
    assert "x" not in plan.points  # the input of a float stem is not quantized
    assert "features_0_2" in plan.points and "features_0_0" not in plan.points


def test_timed_choice_is_recorded_and_the_rest_stays_integer(tmp_path: Path) -> None:
    model = create_model(MNV2)
    calib = [example_inputs(MNV2, batch=2, seed=i)[0] for i in range(8)]
    prefix._CACHE.clear()
    q = quantize_ptq(model, PTQ(), data=calib)
    meta = q.meta["slimkit"]
    assert len(prefix._CACHE) == 1
    choice = prefix.choose(*_placed(model, calib[0]), (calib[0],))  # the cached choice
    assert meta["float_prefix"] == choice.summary()
    assert meta["float_layers"] == meta["float_prefix_layers"] == choice.layers
    for name in choice.layers:
        assert isinstance(q.get_submodule(name), nn.Conv2d)  # not swapped for a QuantLayer
    rep, kernels = export_quantized(q, tmp_path / "q.onnx", example_inputs=(calib[0],))
    assert kernels.ops.get("QLinearConv", 0) == 52 - len(choice.layers)  # the rest is integer


def test_float_prefix_removes_the_noisiest_quantizers(tmp_path: Path) -> None:
    """The noise entering first is amplified by every later layer: keeping the stem block float
    (a choice the timing makes on the CPUs measured, pinned here) gains 2.2 dB on this model
    (19.2 -> 21.3 dB, measured); ORT runs it as simulated."""
    model = create_model(MNV2)
    calib = [example_inputs(MNV2, batch=2, seed=i)[0] for i in range(8)]
    x = example_inputs(MNV2, batch=4, seed=100)[0]
    stem = ["features.0.0", "features.1.conv.0.0", "features.1.conv.1"]
    off = quantize_ptq(model, PTQ(float_prefix=False), data=calib)
    q = quantize_ptq(model, PTQ(float_prefix=stem), data=calib)
    assert q.meta["slimkit"]["float_layers"] == stem
    with torch.no_grad():
        ref = model(x)
        gain = sqnr(ref, q(x)) - sqnr(ref, off(x))
    assert gain > 1.0
    rep, kernels = export_quantized(q, tmp_path / "q.onnx", example_inputs=(calib[0],))
    assert kernels.ops.get("QLinearConv", 0) == 49
    assert kernels.ops.get("Conv", 0) + kernels.ops.get("FusedConv", 0) == 3


def test_float_prefix_names_are_checked() -> None:
    model = create_model(MNV2)
    calib = [example_inputs(MNV2, batch=2, seed=i)[0] for i in range(2)]
    with pytest.raises(ConfigError, match="features.0.1"):
        quantize_ptq(model, PTQ(float_prefix=["features.0.1"]), data=calib)


def test_float_prefix_off_quantizes_every_layer() -> None:
    model = create_model(MNV2)
    calib = [example_inputs(MNV2, batch=2, seed=i)[0] for i in range(4)]
    q = quantize_ptq(model, PTQ(float_prefix=False), data=calib)
    assert q.meta["slimkit"]["float_layers"] == []
    assert "float_prefix" not in q.meta["slimkit"]
    assert isinstance(q.get_submodule("features.0.0"), QuantLayer)
    assert sum(isinstance(m, ActQuant) for m in q.modules()) > 50


@pytest.mark.parametrize("n", [16, 24])
def test_orthogonal_rotations(n: int) -> None:
    r = prefix.orthogonal(n)
    assert torch.allclose(r @ r.T, torch.eye(n, dtype=torch.float64), atol=1e-12)
    if n == 16:  # Hadamard: every entry +-1/4, every channel spread evenly
        assert torch.allclose(r.abs(), torch.full((n, n), 0.25, dtype=torch.float64))


def test_rotate_boundary_is_exact_in_float_and_only_where_it_may() -> None:
    gm, _, x = _folded(MNV2)
    with torch.no_grad():
        before = gm(x)
    w_stem = gm.get_submodule("features.0.0").weight.clone()
    # the stem's output passes ReLU6 (not rotation-invariant); the projection's is linear
    done = prefix.rotate_boundary(gm, ["features.0.0", "features.1.conv.0.0", "features.1.conv.1"])
    assert done == ["features.1.conv.1"]
    assert torch.equal(gm.get_submodule("features.0.0").weight, w_stem)
    with torch.no_grad():
        after = gm(x)
    assert (after - before).abs().max() <= 1e-5 * before.abs().max()


def test_models_not_timed_say_why() -> None:
    gm, plan, x = _folded(MNV2)
    choice = prefix.choose(gm, plan.weighted, (x, x))
    assert choice.layers == [] and "one batched tensor" in choice.summary()


def test_a_cached_choice_is_named_for_the_model_asking() -> None:
    """The cache is keyed by structure; the layer names come from each model."""
    model = create_model(MNV2)
    x = example_inputs(MNV2, batch=2, seed=0)[0]
    first = prefix.choose(*_placed(model, x), (x,))
    wrapped = prefix.choose(*_placed(nn.Sequential(model), x), (x,))
    assert wrapped.times_ms == first.times_ms  # the same timing, from the cache
    assert wrapped.layers == ["0." + n for n in first.layers]


def _placed(model: nn.Module, x: torch.Tensor) -> tuple[torch.fx.GraphModule, dict[str, str]]:
    gm = fold_bn(model.eval(), example_inputs=(x,))
    return gm, sim.place(gm, None).weighted


class TwoWriters(nn.Module):
    """Two float 1x1 convs write one stream (a + b), read by an int8 1x1 conv."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 1), nn.Conv2d(3, 8, 1)
        self.c = nn.Conv2d(8, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c(self.a(x) + self.b(x))


def test_rotate_boundary_rotates_a_shared_stream_once_and_only_if_all_writers_are_float() -> None:
    x = torch.randn(2, 3, 5, 5)
    gm = torch.fx.symbolic_trace(TwoWriters().eval())
    before = gm(x).detach()
    w_c = gm.c.weight.detach().clone()
    assert prefix.rotate_boundary(gm, ["a"]) == []  # b is int8: its rows cannot take R
    assert prefix.rotate_boundary(gm, ["a", "b"]) == ["a", "b"]
    assert not torch.allclose(gm.c.weight, w_c)  # rotated once (a Hadamard twice is identity)
    assert torch.allclose(gm(x), before, atol=1e-5)


def test_rotate_boundary_leaves_masked_or_sparse_layers_alone() -> None:
    from torch.nn.utils import parametrize

    class Mask(nn.Module):
        def forward(self, w: torch.Tensor) -> torch.Tensor:
            return w * (torch.arange(w.shape[1]) % 2 == 0).view(1, -1, 1, 1)

    gm = torch.fx.symbolic_trace(TwoWriters().eval())
    parametrize.register_parametrization(gm.c, "weight", Mask())
    assert prefix.rotate_boundary(gm, ["a", "b"]) == []
    gm = torch.fx.symbolic_trace(TwoWriters().eval())
    with torch.no_grad():
        gm.c.weight[:, ::2] = 0.0  # a pruned consumer would come out dense
    assert prefix.rotate_boundary(gm, ["a", "b"]) == []
