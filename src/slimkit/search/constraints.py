"""What the compressed model must reach: file size, latency, and the largest loss of quality.

::

    c = Constraints(size_mb=5, latency_ms=10, max_drop=0.01)      # Python
    c = Constraints.parse(size="5MB", latency="10ms", drop="1%")   # what the CLI types

``size_mb`` is the size of the exported ONNX file; ``latency_ms`` the ONNX Runtime latency at
``batch``, measured on this machine (``hw`` names a hardware profile the planner and the cheap
proxies predict with, default this machine's); ``max_drop`` the largest drop of the metric in its
own units (a top-1 of 0.91 may fall to 0.90 with ``max_drop=0.01``: "1%" is one point).
"""

from __future__ import annotations

from typing import Any

from pydantic import Field, model_validator

from slimkit.core.config import Config
from slimkit.errors import ConfigError

SIZE_UNITS = {"gb": 1e3, "mb": 1.0, "kb": 1e-3, "b": 1e-6}  # -> MB
TIME_UNITS = {"ms": 1.0, "us": 1e-3, "s": 1e3}  # -> ms
DROP_UNITS = {"%": 0.01, "": 1.0}


class Constraints(Config):
    """Goals of ``slimkit.compress``: each one set is a limit every accepted model meets."""

    size_mb: float | None = Field(None, gt=0.0)  # exported ONNX file, MB (1e6 bytes)
    latency_ms: float | None = Field(None, gt=0.0)  # ORT latency at `batch`, measured here
    batch: int = Field(1, ge=1)  # the batch latency is measured at
    hw: str | None = None  # hardware profile for predictions (preset, YAML); None: this machine
    max_drop: float | None = Field(None, ge=0.0)  # largest metric drop, in the metric's units
    metric: str | None = None  # top1 | perplexity | sqnr | package.module:function

    @model_validator(mode="after")
    def _some_goal(self) -> Constraints:
        if self.size_mb is None and self.latency_ms is None and self.max_drop is None:
            raise ValueError(
                "no goal: set at least one of size_mb, latency_ms, max_drop "
                "(CLI: --max-size 5MB, --max-latency 10ms, --max-drop 1%)"
            )
        return self

    @classmethod
    def parse(
        cls,
        *,
        size: str | float | None = None,
        latency: str | float | None = None,
        drop: str | float | None = None,
        **fields: Any,
    ) -> Constraints:
        """Constraints from typed text: ``size="5MB"`` (GB, MB, KB, B; a bare number is MB),
        ``latency="10ms"`` (s, ms, us; bare: ms), ``drop="1%"`` (or a fraction, 0.01)."""
        return cls(
            size_mb=parse_quantity(size, SIZE_UNITS, "--max-size", "5MB, 500KB or 0.5 (MB)"),
            latency_ms=parse_quantity(latency, TIME_UNITS, "--max-latency", "10ms, 0.5s"),
            max_drop=parse_quantity(drop, DROP_UNITS, "--max-drop", "1% or 0.01"),
            **fields,
        )

    def goals(self) -> dict[str, float]:
        """The limits that are set, by objective name (``metric`` is the smallest metric drop)."""
        out = {"size_mb": self.size_mb, "latency_ms": self.latency_ms, "drop": self.max_drop}
        return {k: v for k, v in out.items() if v is not None}

    def violations(self, values: dict[str, float], source_metric: float) -> dict[str, float]:
        """How far ``values`` (metric, latency_ms, size_mb) are past each limit: <= 0 is met."""
        out: dict[str, float] = {}
        if self.size_mb is not None:
            out["size_mb"] = values["size_mb"] - self.size_mb
        if self.latency_ms is not None:
            out["latency_ms"] = values["latency_ms"] - self.latency_ms
        if self.max_drop is not None:
            out["drop"] = (source_metric - values["metric"]) - self.max_drop
        return out

    def describe(self) -> str:
        parts = []
        if self.size_mb is not None:
            parts.append(f"size <= {self.size_mb:g} MB")
        if self.latency_ms is not None:
            parts.append(f"latency <= {self.latency_ms:g} ms at batch {self.batch}")
        if self.max_drop is not None:
            parts.append(f"metric drop <= {self.max_drop:g}")
        return ", ".join(parts)


def parse_quantity(
    text: str | float | None, units: dict[str, float], what: str, example: str
) -> float | None:
    """``"5MB"`` -> 5.0 with ``units`` (suffix -> scale, the longest suffix first; the ``""``
    entry or the first unit applies to a bare number)."""
    if text is None or isinstance(text, (int, float)):
        return None if text is None else float(text)
    t = text.strip().lower().replace(" ", "")
    bare = units.get("", 1.0)
    for unit in sorted((u for u in units if u), key=len, reverse=True):
        if t.endswith(unit):
            t, bare = t[: -len(unit)], units[unit]
            break
    try:
        value = float(t) * bare
    except ValueError:
        raise ConfigError(
            f"{what} {text!r} is not a quantity", fix=f"write it like {example}"
        ) from None
    if value <= 0 and what != "--max-drop":
        raise ConfigError(f"{what} {text!r} is not positive", fix=f"write it like {example}")
    if value < 0:
        raise ConfigError(f"{what} {text!r} is negative", fix=f"write it like {example}")
    return value
