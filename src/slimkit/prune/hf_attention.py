"""Attention modules that store their head count, kept in step with their pruned projections.

Hugging Face transformers attention (BERT's ``BertSelfAttention`` and its relatives) keeps
``num_attention_heads`` and ``all_head_size`` as plain ints beside the ``query``/``key``/``value``
Linears. Pruning heads shrinks the Linears; ``sync_head_counts`` then sets those ints from the
query width and the (unchanged) head size, so the module describes the tensors it holds::

    sync_head_counts(pruned, slices)  # {"bert.encoder.layer.0.attention.self":
                                      #  {"num_attention_heads": 2, "all_head_size": 32}, ...}

Only modules whose query rows were sliced are touched. Grouped-query attention (a separate
key/value head count) is not handled: ``head_layout`` returns None for it, and the dependency
graph then refuses its heads.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn

HEAD_COUNT_ATTRS = ("num_heads", "n_head", "n_heads", "num_attention_heads")
_HEAD_SIZE_ATTRS = ("attention_head_size", "head_dim", "head_size")
_QUERY_NAMES = ("query", "q_proj", "q_lin")
_TOTAL_ATTRS = ("all_head_size",)  # head count * head size
_GROUPED_ATTRS = ("num_key_value_heads", "num_key_value_groups")

Sliced = Mapping[str, Mapping[Any, Any]]  # tensor name -> dims that lost positions (a Slices)


def _int_attr(m: nn.Module, names: tuple[str, ...]) -> tuple[str, int] | None:
    for a in names:
        v = getattr(m, a, None)
        if isinstance(v, int) and not isinstance(v, bool):
            return a, v
    return None


def head_layout(m: nn.Module) -> tuple[str, int] | None:
    """``(name of the query Linear, head size)`` of an attention module whose head-count
    attributes slimkit can recompute, or None."""
    size = _int_attr(m, _HEAD_SIZE_ATTRS)
    query = next((a for a in _QUERY_NAMES if isinstance(getattr(m, a, None), nn.Linear)), None)
    if size is None or query is None or _int_attr(m, HEAD_COUNT_ATTRS) is None:
        return None
    if _int_attr(m, _GROUPED_ATTRS) is not None:
        return None
    return query, size[1]


def head_counts(model: nn.Module, slices: Sliced | None = None) -> dict[str, dict[str, int]]:
    """For each such module of ``model`` (with ``slices``: each whose query rows were sliced), the
    values its attributes must have to match its query width; ``model`` is not modified."""
    out: dict[str, dict[str, int]] = {}
    for name, m in model.named_modules():
        layout = head_layout(m)
        if layout is None:
            continue
        query, size = layout
        fqn = f"{name}.{query}.weight" if name else f"{query}.weight"
        if slices is not None and not {0, "0"} & set(slices.get(fqn, {})):
            continue
        heads = int(getattr(m, query).weight.shape[0]) // size
        attrs = {a: heads for a in HEAD_COUNT_ATTRS if _int_attr(m, (a,))}
        attrs.update({a: heads * size for a in _TOTAL_ATTRS if _int_attr(m, (a,))})
        out[name] = attrs
    return out


def sync_head_counts(model: nn.Module, slices: Sliced | None = None) -> dict[str, dict[str, int]]:
    """Set the head-count attributes of each such module (with ``slices``: each whose query rows
    were sliced) from its query width, in place; returns the values set, by module name."""
    counts = head_counts(model, slices)
    for name, attrs in counts.items():
        m = model.get_submodule(name)
        for a, v in attrs.items():
            setattr(m, a, v)
    return counts
