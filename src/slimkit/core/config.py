"""The base of every method config: a frozen pydantic v2 model that forbids unknown keys.

The same class serves the Python call, the YAML recipe step and the CLI flags. Any validation
failure becomes a ``ConfigError`` naming the field and, for a misspelt key, the one that was meant::

    class PTQ(Config):
        calibration: Literal["minmax", "percentile"] = "minmax"   # how ranges are chosen

    PTQ(calibraton="percentile")
    # ConfigError: PTQ: unknown key 'calibraton'. Fix: did you mean 'calibration'? valid keys: ...
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError

from slimkit.core.registry import did_you_mean
from slimkit.errors import ConfigError

C = TypeVar("C", bound="Config")


class Config(BaseModel):
    """Frozen, strict config. Subclasses add typed fields with commented defaults."""

    model_config = ConfigDict(frozen=True, extra="forbid", validate_default=True)

    def __init__(self, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as e:
            raise config_error(type(self), e, data) from None

    @classmethod
    def from_dict(cls: type[C], data: Mapping[str, Any] | None) -> C:
        """Build from a recipe step / parsed YAML mapping, with the same friendly errors."""
        if data is None:
            return cls()
        if not isinstance(data, Mapping):
            raise ConfigError(
                f"{cls.__name__}: expected a mapping of options, got {type(data).__name__}",
                fix=f"write the step as a mapping, e.g. {{{', '.join(cls.model_fields)}}}",
            )
        return cls(**dict(data))

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON/YAML-ready values (round-trips through ``from_dict``)."""
        return self.model_dump(mode="json")

    def replace(self: C, **changes: Any) -> C:
        """A copy with some fields changed, validated again."""
        return type(self)(**{**self.model_dump(), **changes})


def config_error(
    cls: type[BaseModel], err: ValidationError, data: Mapping[str, Any]
) -> ConfigError:
    """Turn pydantic's report into one readable ConfigError (unknown keys get a did-you-mean)."""
    fields = list(cls.model_fields)
    problems: list[str] = []
    fixes: list[str] = []
    unknown = False
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "(config)"
        if e["type"] == "extra_forbidden":
            unknown = True
            key = str(e["loc"][0])
            problems.append(f"unknown key {key!r}")
            hint = did_you_mean(key, fields)
            if hint:
                fixes.append(hint)
        else:
            got = e.get("input", data.get(loc, None)) if isinstance(data, Mapping) else None
            problems.append(f"{loc}: {e['msg']} (got {got!r})")
            # a bad value: the fix is the value the field takes, not the list of keys
            default = cls.model_fields[str(e["loc"][0])].default if e["loc"] and str(
                e["loc"][0]) in cls.model_fields else None  # fmt: skip
            fixes.append(f"{loc}: {_wanted(e['msg'])}"
                         + (f" (default {default!r})" if default is not None else ""))  # fmt: skip
    if unknown:
        fixes.append(f"valid keys: {', '.join(fields) or '(none)'}")
    return ConfigError(f"{cls.__name__}: " + "; ".join(problems), fix="; ".join(fixes))


def _wanted(msg: str) -> str:
    """pydantic's "Input should be greater than 90" as the fix "use a value greater than 90"."""
    rest = msg.removeprefix("Input should be ").strip()
    if rest == msg.strip():
        return msg
    if rest.startswith(("greater", "less", "at least", "at most", "a multiple")):
        return f"use a value {rest}"
    return f"use {rest}"
