"""The zoo's models by name: tiny ones for unit tests, reference ones for benchmarks, and the ones
the bundled tasks train::

    model = create_model("resnet18", seed=0)        # eval mode, the same weights for the same seed
    (x,) = example_inputs("resnet18", batch=2)      # float (2, 3, 224, 224)
    list_models(kind="tiny")                        # ['mlp', 'cnn_bn', ...]

Every model takes one tensor (float images / features, or int64 token ids), traces with
``torch.fx.symbolic_trace`` and exports to ONNX (opset 17) with a dynamic batch axis. Model options
are keyword arguments (``create_model("gpt", n_layer=2)``); ``example_inputs`` and ``output_shape``
take the same ones so that shapes agree.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from slimkit.core.registry import Registry, did_you_mean
from slimkit.errors import ConfigError

KINDS = ("tiny", "reference", "task")

MODELS: Registry[Callable[..., nn.Module]] = Registry("zoo model")
"""Factories with meta ``kind`` (one of KINDS), ``summary`` (one line), ``inputs(batch, **kwargs)``
(a tuple of tensors) and ``output_shape(batch, **kwargs)``; ``kwargs`` are the factory's, defaults
filled in."""

InputFn = Callable[..., tuple[torch.Tensor, ...]]


def images(channels: int, height: int, width: int) -> InputFn:
    """Inputs for an image model: one float tensor (batch, channels, height, width)."""

    def make(batch: int, **_: Any) -> tuple[torch.Tensor, ...]:
        return (torch.randn(batch, channels, height, width),)

    return make


def tokens(vocab_size: int, seq_len: int) -> InputFn:
    """Inputs for a token model: int64 ids (batch, seq_len); the model's own ``vocab_size`` and
    ``seq_len`` options, when it has them, override these defaults."""

    def make(batch: int, **kw: Any) -> tuple[torch.Tensor, ...]:
        vocab, length = kw.get("vocab_size", vocab_size), kw.get("seq_len", seq_len)
        return (torch.randint(0, vocab, (batch, length)),)

    return make


def logits(batch: int, *, num_classes: int, **_: Any) -> tuple[int, ...]:
    """``output_shape`` of a classifier: (batch, num_classes)."""
    return (batch, num_classes)


def resolve_kwargs(name: str, kwargs: dict[str, Any]) -> dict[str, Any]:
    """The model's options with defaults filled in; an unknown option is a ConfigError."""
    params = inspect.signature(MODELS.get(name)).parameters
    for key in kwargs:
        if key not in params:
            valid = ", ".join(f"{k}={p.default!r}" for k, p in params.items()) or "(none)"
            hint = did_you_mean(key, list(params))
            raise ConfigError(
                f"zoo model {name!r} has no option {key!r}",
                fix=f"{hint + ' ' if hint else ''}its options are: {valid}",
            )
    return {**{k: p.default for k, p in params.items()}, **kwargs}


def create_model(name: str, *, seed: int = 0, **kwargs: Any) -> nn.Module:
    """Build zoo model ``name`` with deterministic weights for ``seed``, in eval mode.

    The global RNG is left untouched (the seed applies inside a forked RNG state).
    """
    factory = MODELS.get(name)
    resolve_kwargs(name, kwargs)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = factory(**kwargs)
    return model.eval()


def example_inputs(
    name: str, batch: int = 1, *, seed: int = 0, **kwargs: Any
) -> tuple[torch.Tensor, ...]:
    """Random inputs of the right shape and dtype for ``create_model(name, **kwargs)``."""
    resolved = resolve_kwargs(name, kwargs)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return MODELS.entry(name).meta["inputs"](batch, **resolved)


def output_shape(name: str, batch: int = 1, **kwargs: Any) -> tuple[int, ...]:
    """The shape of ``create_model(name, **kwargs)(*example_inputs(name, batch, **kwargs))``."""
    resolved = resolve_kwargs(name, kwargs)
    return tuple(MODELS.entry(name).meta["output_shape"](batch, **resolved))


def list_models(pattern: str = "*", kind: str | None = None) -> list[str]:
    """Model names matching a shell-style wildcard, optionally of one kind, tiny ones first."""
    if kind is not None and kind not in KINDS:
        hint = did_you_mean(kind, list(KINDS))
        raise ConfigError(
            f"unknown zoo model kind {kind!r}",
            fix=f"{hint + ' ' if hint else ''}kinds are: {', '.join(KINDS)}",
        )
    entries = [e for e in MODELS.entries(pattern) if kind is None or e.meta["kind"] == kind]
    return [e.name for e in sorted(entries, key=lambda e: KINDS.index(e.meta["kind"]))]


# Registers the models; after the names above because these modules import them.
from slimkit.zoo.models import text, tiny, vision  # noqa: E402, F401
