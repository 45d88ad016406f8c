"""Name -> object registries with wildcard listing (methods, zoo models, tasks, hardware presets).

A registry answers an unknown name with the closest registered ones, so typos are cheap::

    MODELS = Registry("zoo model")

    @MODELS.register("mlp", kind="tiny")
    def mlp(...): ...

    MODELS.get("mpl")   # RegistryError: unknown zoo model 'mpl'. Fix: did you mean 'mlp'? ...
"""

from __future__ import annotations

import difflib
import fnmatch
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from slimkit.errors import RegistryError

T = TypeVar("T")


@dataclass(frozen=True)
class Entry(Generic[T]):
    """A registered object and its free-form metadata (``config=PTQConfig``, ``kind="tiny"``)."""

    name: str
    obj: T
    meta: dict[str, Any] = field(default_factory=dict)


def did_you_mean(word: str, choices: list[str], n: int = 3) -> str:
    """``"did you mean 'a' or 'b'?"`` for the closest choices, or ``""`` when none is close."""
    close = difflib.get_close_matches(word, choices, n=n, cutoff=0.6)
    if not close:
        return ""
    return "did you mean " + " or ".join(repr(c) for c in close) + "?"


class Registry(Generic[T]):
    """An ordered mapping of dotted names to objects, with metadata and wildcard listing."""

    def __init__(self, what: str) -> None:
        self.what = what
        self._entries: dict[str, Entry[T]] = {}

    def register(self, name: str, **meta: Any) -> Callable[[T], T]:
        """Decorator: ``@registry.register("prune.channel", config=ChannelConfig)``."""

        def deco(obj: T) -> T:
            self.add(name, obj, **meta)
            return obj

        return deco

    def add(self, name: str, obj: T, **meta: Any) -> None:
        if name in self._entries:
            raise RegistryError(
                f"{self.what} {name!r} is registered twice",
                fix="give the second one another name",
            )
        self._entries[name] = Entry(name, obj, dict(meta))

    def entry(self, name: str) -> Entry[T]:
        try:
            return self._entries[name]
        except KeyError:
            hint = did_you_mean(name, list(self._entries))
            known = ", ".join(self._entries) or "(none)"
            raise RegistryError(
                f"unknown {self.what} {name!r}",
                fix=f"{hint + ' ' if hint else ''}registered names are: {known}",
            ) from None

    def get(self, name: str) -> T:
        return self.entry(name).obj

    def names(self, pattern: str = "*") -> list[str]:
        """Names matching a shell-style wildcard (``"prune.*"``), in registration order."""
        return [n for n in self._entries if fnmatch.fnmatchcase(n, pattern)]

    def entries(self, pattern: str = "*") -> list[Entry[T]]:
        return [self._entries[n] for n in self.names(pattern)]

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)


class MethodRegistry(Registry[Callable[..., Any]]):
    """The registry of compression methods: each entry is a handler with its config class.

    A method registers itself in its own file, and is then reachable by name from every verb,
    recipe step, ``slimkit list`` and the contract tests (``tests/contract``)::

        @METHODS.register("prune.magnitude", config=Magnitude, summary="zero the smallest weights",
                          aliases={"magnitude": {}, "sparse": {"sparsity": 0.8}})
        def prune_magnitude(model, config, *, scope=None) -> nn.Module: ...

    The handler is called as ``handler(model, config, **inputs)`` by ``core.verbs.dispatch``; its
    keyword-only parameters say what it reads (``data``, ``example_inputs``, ``scope``, ...). It
    returns a new module, or ``(module, report)`` where ``report`` has ``to_dict()``.

    Metadata (``Entry.meta``):

    - ``config`` (required): the method's ``Config`` subclass.
    - ``summary`` (required): one line for ``slimkit list``.
    - ``aliases``: short names -> config fields (``{"int8": {}, "fp16": {"dtype": "fp16"}}``). The
      part after the dot (``"magnitude"``) is always a name too.
    - ``example``: config fields for a quick run (the contract tests; ``{}``: the defaults).
    - ``unsupported``: tiny zoo model -> why this method does not apply to it (the contract tests
      skip it with that reason).
    - ``export``: how a result is deployed: ``"onnx"`` (``export_onnx`` with float parity, the
      default), ``"qdq"`` (``export.qdq.export_quantized``: integer ONNX checked by SQNR), or
      ``"ort"`` (the result already runs in ONNX Runtime; its file is at ``result.path``).
    - ``export_atol``: the parity tolerance of an ``"onnx"`` export (default ``1e-4``; 16-bit
      results compute in 16 bits on both sides, rounding differently).
    """

    def add(self, name: str, obj: Callable[..., Any], **meta: Any) -> None:
        technique, dot, method = name.partition(".")
        config = meta.get("config")
        problems = []
        if not dot or not technique or not method:
            problems.append(f"name {name!r} is not 'technique.method'")
        if not (isinstance(config, type) and hasattr(config, "from_dict")):
            problems.append("config= is not a Config class")
        if not meta.get("summary"):
            problems.append("summary= is missing")
        if not callable(obj):
            problems.append("the handler is not callable")
        if problems:
            raise RegistryError(
                f"method {name!r} cannot be registered: {'; '.join(problems)}",
                fix='register as @METHODS.register("technique.method", config=MyConfig, '
                'summary="one line")',
            )
        super().add(name, obj, **meta)

    def annotate(self, name: str, **meta: Any) -> None:
        """Add metadata to a registered method (for a method whose file cannot say it itself)."""
        self.entry(name).meta.update(meta)


# The compression methods (quant.*, prune.*, graph_opt.*, lowrank.*, distill.*). Each technique
# folder registers into it at import; ``load_methods()`` imports them all so that listing sees
# every method.
METHODS = MethodRegistry("method")

TECHNIQUES = (
    "slimkit.quant",
    "slimkit.prune",
    "slimkit.graph_opt",
    "slimkit.lowrank",
    "slimkit.distill",
    "slimkit.lightweight",
)


def load_methods() -> MethodRegistry:
    """Import every technique package (registering its methods) and return ``METHODS``."""
    import importlib

    for mod in TECHNIQUES:
        importlib.import_module(mod)
    return METHODS
