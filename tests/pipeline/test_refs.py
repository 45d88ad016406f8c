"""References resolve in one place; the data forms recipes record give the same batches each run."""

from __future__ import annotations

import itertools

import pytest
import torch

from slimkit.errors import ReferenceResolutionError
from slimkit.pipeline.refs import default_data, resolve_data, resolve_model
from slimkit.zoo import load_task


def test_calibration_split_is_the_calibration_subset_in_its_order() -> None:
    batches = resolve_data("zoo:digits:calibration", batch_size=8)
    expected = load_task("digits").calibration(n=64, batch_size=8)
    for got, want in zip(batches[:8], expected, strict=True):
        assert torch.equal(got, want)


def test_random_inputs_repeat_on_every_pass() -> None:
    data = resolve_data("zoo:cnn_bn:inputs", batch_size=4)
    first = list(itertools.islice(data, 3))
    again = list(itertools.islice(data, 3))
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert first[0].shape[0] == 4 and not torch.equal(first[0], first[1])


def test_default_data_follows_the_model() -> None:
    assert default_data(resolve_model("zoo:digits_cnn", progress=False)) == "zoo:digits:calibration"
    assert default_data(resolve_model("zoo:cnn_bn")) == "zoo:cnn_bn:inputs"
    assert default_data(resolve_model("torch.nn:Identity", input_shape=(1, 3))) is None


def test_a_model_name_as_data_says_how_to_write_it() -> None:
    with pytest.raises(ReferenceResolutionError, match="zoo:NAME:inputs"):
        resolve_data("zoo:cnn_bn")
    with pytest.raises(ReferenceResolutionError, match="no zoo task 'digitz'"):
        resolve_data("zoo:digitz")


def test_core_refs_keeps_its_old_names() -> None:
    from slimkit.core import refs

    assert refs.resolve_model is resolve_model and refs.resolve_data is resolve_data
    assert refs.parse_shape("1,3,8,8") == (1, 3, 8, 8)
    with pytest.raises(AttributeError):
        _ = refs.nope  # type: ignore[attr-defined]
