"""Scope: which modules a technique touches, by regex on module names and by module type.

A scope that matches nothing is an error, never a silent no-op::

    Scope(include=[r"features\\..*"], exclude=[r".*\\.downsample.*"], types=(nn.Conv2d,))
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from torch import nn

from slimkit.errors import ScopeError


def _compile(patterns: Sequence[str], which: str) -> list[re.Pattern[str]]:
    out = []
    for p in patterns:
        try:
            out.append(re.compile(p))
        except re.error as e:
            raise ScopeError(
                f"{which} pattern {p!r} is not a valid regular expression ({e})",
                fix=r"escape dots and brackets, e.g. 'layer1\.0\.conv1' or 'head.*'",
            ) from None
    return out


@dataclass(frozen=True)
class Scope:
    """Include / exclude module names (``re.fullmatch``) and restrict to module types.

    ``include`` empty means every module; ``exclude`` wins over ``include``; ``types`` empty means
    any type. Names are those of ``model.named_modules()`` (the root is ``""``).
    """

    include: Sequence[str] = ()
    exclude: Sequence[str] = ()
    types: Sequence[type[nn.Module]] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        for which in ("include", "exclude"):
            value = getattr(self, which)
            if isinstance(value, str):  # a lone string is a common slip: treat it as one pattern
                object.__setattr__(self, which, (value,))
        object.__setattr__(self, "types", tuple(self.types))
        _compile(self.include, "include")
        _compile(self.exclude, "exclude")

    def matches(self, name: str, module: nn.Module) -> bool:
        if self.types and not isinstance(module, tuple(self.types)):
            return False
        inc = _compile(self.include, "include")
        if inc and not any(p.fullmatch(name) for p in inc):
            return False
        return not any(p.fullmatch(name) for p in _compile(self.exclude, "exclude"))

    def select(
        self, model: nn.Module, candidates: Iterable[type[nn.Module]] | None = None
    ) -> list[tuple[str, nn.Module]]:
        """The ``(name, module)`` pairs in scope, optionally limited to the types a method supports.

        Raises ``ScopeError`` when nothing matches, listing a few names that exist.
        """
        cand = tuple(candidates) if candidates is not None else ()
        self._check_patterns(model, cand)
        chosen = [
            (n, m)
            for n, m in model.named_modules()
            if n and (not cand or isinstance(m, cand)) and self.matches(n, m)
        ]
        if not chosen:
            pool = [n for n, m in model.named_modules() if n and (not cand or isinstance(m, cand))]
            what = f" of type {'/'.join(t.__name__ for t in cand)}" if cand else ""
            raise ScopeError(
                f"scope {self.describe()} matches no module{what} in {type(model).__name__}",
                fix=f"check the patterns (they must match whole names); modules{what} here "
                f"include: {', '.join(pool[:8]) or '(none)'}{' ...' if len(pool) > 8 else ''}",
            )
        return chosen

    def _check_patterns(self, model: nn.Module, cand: tuple[type[nn.Module], ...]) -> None:
        """Every include / exclude pattern must match some module: a typo in an exclude list
        would otherwise quantize or prune the very layer the user meant to protect."""
        names = [n for n, m in model.named_modules() if n and (not cand or isinstance(m, cand))]
        for which in ("include", "exclude"):
            for p, raw in zip(_compile(getattr(self, which), which), getattr(self, which),
                              strict=True):  # fmt: skip
                if not any(p.fullmatch(n) for n in names):
                    from slimkit.core.registry import did_you_mean

                    hint = did_you_mean(raw, names)
                    what = f" of type {'/'.join(t.__name__ for t in cand)}" if cand else ""
                    raise ScopeError(
                        f"scope {which} pattern {raw!r} matches no module{what} in "
                        f"{type(model).__name__}",
                        fix=f"{hint + ' ' if hint else ''}patterns match whole names (regex); "
                        f"modules{what} here include: {', '.join(names[:8]) or '(none)'}"
                        f"{' ...' if len(names) > 8 else ''}",
                    )

    def describe(self) -> str:
        parts = []
        if self.include:
            parts.append(f"include={list(self.include)}")
        if self.exclude:
            parts.append(f"exclude={list(self.exclude)}")
        if self.types:
            parts.append(f"types={[t.__name__ for t in self.types]}")
        return "(" + ", ".join(parts) + ")" if parts else "(everything)"


def set_submodule(root: nn.Module, target: str, module: nn.Module) -> None:
    """Put ``module`` at the dotted path ``target`` of ``root`` (its parent must exist)."""
    parent_name, _, leaf = target.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, leaf, module)
