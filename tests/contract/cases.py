"""What the contract tests iterate over: every registered method, every tiny zoo model, and the
way each method is called, exported and checked. Nothing here is specific to one method: a new
method declares what it needs in its registry metadata (see ``core.registry.MethodRegistry``)."""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
from torch import nn

import slimkit as sk
from slimkit.core.config import Config
from slimkit.core.registry import METHODS, Entry, load_methods
from slimkit.core.verbs import TECHNIQUES
from slimkit.testing.zoo import randomise_bn
from slimkit.zoo.models import create_model, example_inputs, list_models

load_methods()
METHOD_NAMES = METHODS.names()
TINY = list_models(kind="tiny")
# the model the bad-input checks use: the first of these a method supports (float inputs)
BAD_INPUT_MODELS = ("cnn_bn", "residual", "mlp", "transformer_block")


def entry(method: str) -> Entry[Any]:
    return METHODS.entry(method)


def verb(method: str) -> Callable[..., Any]:
    """``sk.quantize`` / ``sk.prune`` / ``sk.optimize``: the verb that runs ``method``."""
    name = TECHNIQUES[method.partition(".")[0]].verb
    return lambda model, *args, **kwargs: call(name, model, *args, **kwargs)


def call(verb_name: str, model: nn.Module, config: Any = None, **kwargs: Any) -> Any:
    """``sk.<verb_name>(model, config, ...)``; distillation's verb takes the teacher second (a
    copy of ``model`` here)."""
    fn = getattr(sk, verb_name)
    head = (model, copy.deepcopy(model)) if verb_name == "distill" else (model,)
    return fn(*head, **kwargs) if config is None else fn(*head, config, **kwargs)


def example_config(method: str) -> Config:
    """The method's config for a quick run (its ``example`` metadata over the defaults)."""
    e = entry(method)
    cfg: Config = e.meta["config"].from_dict(e.meta.get("example", {}))
    return cfg


def unsupported(method: str, model: str) -> str | None:
    reason = entry(method).meta.get("unsupported", {}).get(model)
    return None if reason is None else str(reason)


def method_model_cases() -> Iterator[Any]:
    """``(method, model)`` for every pair; the pairs a method declares unsupported are skipped
    with the reason it gives."""
    for m in METHOD_NAMES:
        for z in TINY:
            reason = unsupported(m, z)
            marks = [pytest.mark.skip(reason=f"{m} on {z}: {reason}")] if reason else []
            yield pytest.param(m, z, marks=marks, id=f"{m}-{z}")


def bad_input_model(method: str) -> str:
    for z in BAD_INPUT_MODELS:
        if unsupported(method, z) is None:
            return z
    raise AssertionError(f"{method} supports none of {BAD_INPUT_MODELS}; add one to the list")


def tiny(name: str, *, train: bool = False) -> nn.Module:
    """A tiny zoo model with non-trivial BatchNorm statistics, in train or eval mode."""
    model = randomise_bn(create_model(name))
    return model.train(train)


def inputs(name: str, n_batches: int = 2) -> tuple[tuple[torch.Tensor, ...], list[Any]]:
    """Example inputs (batch 2) and a few calibration batches for zoo model ``name``."""
    x = example_inputs(name, batch=2)
    data = [example_inputs(name, batch=2, seed=i + 1) for i in range(n_batches)]
    return x, data


def state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer (persistent or not) by name, copied."""
    out = {f"p:{k}": v.detach().clone() for k, v in model.named_parameters()}
    out.update({f"b:{k}": v.detach().clone() for k, v in model.named_buffers()})
    out.update({f"s:{k}": v.detach().clone() for k, v in model.state_dict().items()})
    return out


def flags(model: nn.Module) -> dict[str, bool]:
    return {n: m.training for n, m in model.named_modules()}


def assert_identical(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> None:
    assert before.keys() == after.keys(), set(before) ^ set(after)
    changed = [
        k
        for k in before
        if before[k].dtype != after[k].dtype or not torch.equal(before[k], after[k])
    ]
    assert not changed, f"the verb changed its input: {changed[:5]}"


def tensors(out: Any) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in tensors(o)]
    return []


def bad_shape(x: torch.Tensor) -> torch.Tensor:
    """``x`` with its feature / channel dimension cut to 1: no tiny model runs on it (images
    lose 2 of 3 channels, feature vectors 63 of 64 features, sequences 31 of 32 features)."""
    return x[..., :1] if x.dim() == 3 else x[:, :1]
