"""``slimkit.load`` lives in ``slimkit.pipeline.artifact`` (it reloads pruned artifacts, which
``core`` must not know about); this name stays so that ``slimkit.core.artifacts.load`` keeps
working. It resolves on first use, so importing ``core`` imports no technique."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from slimkit.pipeline.artifact import load

__all__ = ["load"]


def __getattr__(name: str) -> Any:
    if name == "load":
        return importlib.import_module("slimkit.pipeline.artifact").load
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
