from __future__ import annotations

import numpy as np
import pytest
import torch

from slimkit.core.data import collect_batches, iter_batches
from slimkit.errors import DataError


def test_forms_of_batches() -> None:
    x, y = torch.randn(4, 3), torch.arange(4)
    assert collect_batches(x)[0].args[0] is x  # a lone tensor is one batch
    b = collect_batches([(x, y), (x, y)])
    assert len(b) == 2 and b[1].index == 1 and b[0].target is y and b[0].size == 4
    d = collect_batches([{"input_ids": x, "labels": y}])[0]
    assert d.args == () and set(d.kwargs) == {"input_ids"} and d.target is y
    n = collect_batches([np.ones((2, 3), dtype=np.float32)])[0]
    assert isinstance(n.args[0], torch.Tensor) and n.args[0].shape == (2, 3)
    two = collect_batches([(x, x, y)], n_inputs=2)[0]
    assert len(two.args) == 2 and two.target is y
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=2)
    assert [b.size for b in iter_batches(loader)] == [2, 2]


def test_nan_names_the_batch() -> None:
    good = torch.zeros(2, 3)
    bad = torch.zeros(2, 3)
    bad[1, 2] = float("nan")
    bad[0, 0] = float("inf")
    with pytest.raises(DataError) as ei:
        collect_batches([good, good, bad], what="calibration data")
    msg = str(ei.value)
    assert "calibration data: batch 2" in msg and "1 NaN and 1 Inf" in msg and "Fix:" in msg


def test_shape_change_and_expected_shape_and_empty() -> None:
    with pytest.raises(DataError, match=r"batch 1 has shape \[\(B, 5\) float32\]"):
        collect_batches([torch.zeros(2, 3), torch.zeros(2, 5)])
    with pytest.raises(DataError, match="model expects"):
        collect_batches([torch.zeros(2, 3)], sample_shape=(1, 3))
    with pytest.raises(DataError, match="is empty"):
        collect_batches([])
    with pytest.raises(DataError, match="not a tensor"):
        collect_batches([["a", "b"]])
    with pytest.raises(DataError, match="not iterable"):
        collect_batches(3)
    # a smaller last batch is fine: only per-sample shapes must agree
    assert len(collect_batches([torch.zeros(4, 3), torch.zeros(1, 3)])) == 2


def test_merge_batches_concatenates_up_to_a_sample_budget() -> None:
    from slimkit.core.data import merge_batches

    xs = [torch.full((2, 3), float(i)) for i in range(5)]
    merged = merge_batches(collect_batches(xs), max_samples=4)
    assert [b.index for b in merged] == [0, 2, 4] and [b.size for b in merged] == [4, 4, 2]
    assert torch.equal(torch.cat([b.args[0] for b in merged]), torch.cat(xs))  # order kept
    kw = merge_batches(collect_batches([{"ids": torch.ones(1, 5), "mask": torch.zeros(1, 5)}] * 3))
    assert len(kw) == 1 and kw[0].kwargs["ids"].shape == (3, 5) and kw[0].target is None
    # tensors that do not share one leading batch size are left alone
    odd = collect_batches([(torch.ones(2, 3), torch.ones(3, 3))] * 2, n_inputs=2)
    assert merge_batches(odd) == odd
