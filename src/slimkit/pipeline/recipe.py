"""Recipes: YAML <-> an ordered list of steps, each a registered method and its config.

A recipe names the model and the data by reference (``slimkit.pipeline.refs``), lists the steps in
order, and says how to export. Every step is ``{registered name: config fields}``, the same config
class as the Python call, so a misspelt key gets the config's did-you-mean::

    version: 1
    model: zoo:digits_cnn            # zoo:NAME, file.pt2, or package.module:factory (+ weights)
    data: zoo:digits:calibration     # default: the zoo model's own calibration data
    batch_size: 8
    seed: 0
    steps:
    - prune.channel: {ratio: 0.3}
    - finetune: {epochs: 1}          # built in: distil from the source model on its zoo task
    - quant.ptq: {calibration: mse, float_prefix: []}
      scope: {exclude: [fc]}         # step-level: a Scope (include / exclude regexes, types)
    export: {onnx: true, opset: 17, batch: 1}

Step-level keys beside the method: ``scope`` (which modules the step touches) and, for
``quant.ptq``, ``max_drop`` (search the fewest float layers that keep the zoo task's validation
metric within that drop; the recipe a run writes pins the result as ``scope.exclude``).

``Recipe.load(path)`` / ``Recipe.from_dict(d)`` validate everything before any work starts;
``recipe.save(path)`` writes it atomically. Relative file references in a recipe file are read
relative to the file's folder.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from slimkit.core.config import Config
from slimkit.core.io import PathLike, atomic_write
from slimkit.core.registry import did_you_mean
from slimkit.core.scope import Scope
from slimkit.errors import ConfigError, RegistryError, SlimkitError

VERSION = 1  # 1: model/data references, steps, export, seed (unversioned files read as 1)
STEP_KEYS = ("scope", "max_drop")
HEADER = "# slimkit recipe: `slimkit run {name} --out DIR` repeats it\n"


class Export(Config):
    """How the result is exported: ONNX checked in ONNX Runtime (QDQ for int8 models)."""

    onnx: bool = True  # write model.onnx into the artifact
    opset: int = Field(17, ge=7)  # float models; int8 models export at the QDQ exporter's opset
    batch: int = Field(1, ge=1)  # batch the model is traced with (the ONNX batch stays dynamic)
    exporter: Literal["torchscript", "dynamo"] = "torchscript"
    atol: float = Field(1e-4, gt=0.0)  # float models: largest ORT-vs-PyTorch difference accepted


class Finetune(Config):
    """Built-in step: fine-tune on the zoo model's task, distilling from the source model."""

    epochs: int = Field(1, ge=1)
    lr: float = Field(1e-3, gt=0.0)
    batch_size: int = Field(64, ge=1)  # train-split batches, shuffled with a fixed seed
    distill: bool = True  # teacher = the model the recipe started from
    temperature: float = Field(4.0, gt=0.0)
    alpha: float = Field(0.5, ge=0.0, le=1.0)  # weight of the distillation term


class ScopeSpec(Config):
    """A step's scope in YAML: regexes on module names, ``torch.nn`` type names."""

    include: list[str] = Field(default_factory=list)
    exclude: list[str] = Field(default_factory=list)
    types: list[str] = Field(default_factory=list)  # e.g. [Conv2d, Linear]

    def to_scope(self) -> Scope:
        from torch import nn

        types = []
        for t in self.types:
            cls = getattr(nn, t, None)
            if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
                names = [n for n, c in vars(nn).items() if isinstance(c, type)]
                hint = did_you_mean(t, names)
                raise ConfigError(
                    f"scope type {t!r} is not a torch.nn module class",
                    fix=f"{hint + ' ' if hint else ''}write class names such as Conv2d, Linear",
                )
            types.append(cls)
        return Scope(include=self.include, exclude=self.exclude, types=tuple(types))


# steps the pipeline runs itself (not registered methods: they change no architecture)
BUILTIN_STEPS: dict[str, type[Config]] = {"finetune": Finetune}


def method_names() -> list[str]:
    """Every name a step may use: the registered methods, then the built-in steps."""
    from slimkit.core.registry import load_methods

    return [*load_methods().names(), *BUILTIN_STEPS]


def config_class(name: str) -> type[Config]:
    """The config class of step ``name`` (RegistryError with a did-you-mean when unknown)."""
    if name in BUILTIN_STEPS:
        return BUILTIN_STEPS[name]
    from slimkit.core.registry import load_methods

    methods = load_methods()
    if name not in methods:
        names = method_names()
        hint = did_you_mean(name, names)
        raise RegistryError(
            f"unknown method {name!r}",
            fix=f"{hint + ' ' if hint else ''}steps are: {', '.join(names)} (`slimkit list`)",
        )
    cls: type[Config] = methods.entry(name).meta["config"]
    return cls


@dataclass(frozen=True)
class Step:
    """One step: a method name, its validated config, and step-level options."""

    name: str
    config: Config
    scope: ScopeSpec | None = None
    max_drop: float | None = None

    @classmethod
    def parse(cls, item: Any, index: int = 0) -> Step:
        """A step from YAML: ``"quant.ptq"`` or ``{"quant.ptq": {...}, "scope": {...}}``."""
        where = f"step {index + 1}"
        if isinstance(item, str):
            item = {item: None}
        if not isinstance(item, Mapping) or not item:
            raise ConfigError(
                f"{where} is a {type(item).__name__}, not a mapping",
                fix="write a step as `- quant.ptq: {calibration: mse}` (name: config fields)",
            )
        names = [str(k) for k in item if k not in STEP_KEYS]
        if len(names) != 1:
            raise ConfigError(
                f"{where} names {len(names)} methods ({', '.join(names) or 'none'})",
                fix="one method per list item, e.g. `- prune.channel: {ratio: 0.3}`; besides it "
                f"a step may hold {', '.join(STEP_KEYS)}",
            )
        name = names[0]
        try:
            config = config_class(name).from_dict(item[name])
            scope = ScopeSpec.from_dict(item["scope"]) if item.get("scope") is not None else None
            if scope is not None:
                scope.to_scope()  # type names and regexes are checked now, not mid-run
        except SlimkitError as e:
            raise type(e)(f"{where} ({name}): {e.problem}", fix=e.fix) from None
        max_drop = item.get("max_drop")
        if max_drop is not None and (
            name != "quant.ptq" or not isinstance(max_drop, (int, float)) or max_drop < 0
        ):
            raise ConfigError(
                f"{where} ({name}): max_drop {max_drop!r} needs quant.ptq and a number >= 0",
                fix="write max_drop: 0.01 beside a quant.ptq step, or remove it",
            )
        return cls(name, config, scope, None if max_drop is None else float(max_drop))

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {self.name: self.config.to_dict()}
        if self.scope is not None:
            out["scope"] = {k: v for k, v in self.scope.to_dict().items() if v}
        if self.max_drop is not None:
            out["max_drop"] = self.max_drop
        return out


class _Fields(Config):
    """The top-level keys of a recipe file (validated for unknown keys and types)."""

    version: int = VERSION
    model: str | None = None
    weights: str | None = None
    input_shape: list[int] | None = None
    data: str | None = None
    batch_size: int = Field(8, ge=1)
    seed: int = 0
    steps: list[Any] = Field(default_factory=list)
    export: dict[str, Any] | None = None


@dataclass(frozen=True)
class Recipe:
    """A parsed, validated recipe (see the module docstring for the YAML form)."""

    model: str | None = None
    steps: tuple[Step, ...] = ()
    data: str | None = None
    weights: str | None = None
    input_shape: tuple[int, ...] | None = None
    batch_size: int = 8
    seed: int = 0
    export: Export = field(default_factory=Export)
    version: int = VERSION
    base: Path | None = field(default=None, compare=False)  # folder of the file it came from

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, base: PathLike | None = None) -> Recipe:
        """Validate a parsed recipe mapping (unknown keys get a did-you-mean)."""
        if not isinstance(data, Mapping):
            raise ConfigError(
                f"a recipe is a mapping of fields, not a {type(data).__name__}",
                fix="start the file with `model: zoo:NAME` and a `steps:` list",
            )
        try:
            f = _Fields.from_dict(data)
        except ConfigError as e:
            raise ConfigError(e.problem.replace("_Fields", "recipe", 1), fix=e.fix) from None
        if f.version > VERSION:
            raise ConfigError(
                f"the recipe has version {f.version}; this slimkit reads up to {VERSION}",
                fix="upgrade slimkit, or rewrite the recipe for this version",
            )
        try:
            export = Export.from_dict(f.export)
        except ConfigError as e:
            raise ConfigError(f"export: {e.problem}", fix=e.fix) from None
        return cls(
            model=f.model,
            steps=tuple(Step.parse(s, i) for i, s in enumerate(f.steps)),
            data=f.data,
            weights=f.weights,
            input_shape=tuple(f.input_shape) if f.input_shape else None,
            batch_size=f.batch_size,
            seed=f.seed,
            export=export,
            version=VERSION,
            base=Path(base) if base is not None else None,
        )

    @classmethod
    def for_model(
        cls,
        model: str,
        *,
        weights: PathLike | None = None,
        input_shape: tuple[int, ...] | None = None,
        data: str | None = None,
        **fields: Any,
    ) -> Recipe:
        """A recipe for the references a user typed; file references become absolute paths so
        the recipe runs from any folder (the commands build theirs this way)."""
        w = absolute_ref(str(weights)) if weights is not None else None
        return cls(model=absolute_ref(model), weights=w, input_shape=input_shape,
                   data=absolute_ref(data), **fields)  # fmt: skip

    @classmethod
    def from_yaml(cls, text: str, *, base: PathLike | None = None) -> Recipe:
        """Parse YAML text (``yaml.safe_load``: plain data only)."""
        import yaml

        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ConfigError(f"the recipe is not valid YAML ({e})", fix="fix the YAML") from None
        return cls.from_dict(data if data is not None else {}, base=base)

    @classmethod
    def load(cls, path: PathLike) -> Recipe:
        """Read a recipe file; its relative file references resolve against its folder."""
        p = Path(path)
        if not p.is_file():
            raise ConfigError(
                f"recipe {str(p)!r} does not exist",
                fix="pass a recipe.yaml (every artifact slimkit writes holds one)",
            )
        return cls.from_yaml(p.read_text(encoding="utf-8"), base=p.parent)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"version": self.version, "model": self.model}
        if self.weights is not None:
            out["weights"] = self.weights
        if self.input_shape is not None:
            out["input_shape"] = list(self.input_shape)
        if self.data is not None:
            out["data"] = self.data
        out.update(batch_size=self.batch_size, seed=self.seed)
        out["steps"] = [s.to_dict() for s in self.steps]
        out["export"] = self.export.to_dict()
        return out

    def to_yaml(self) -> str:
        import yaml

        return yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=False)

    def save(self, path: PathLike) -> Path:
        """Write the recipe (atomically) with a header saying how to run it."""
        p = Path(path)
        with atomic_write(p) as f:
            f.write(HEADER.format(name=p.name))
            f.write(self.to_yaml())
        return p

    def replace(self, **changes: Any) -> Recipe:
        """A copy with some fields changed (steps as a tuple of ``Step``)."""
        return replace(self, **changes)

    def path(self, ref: str | None) -> str | None:
        """``ref`` with a relative file path read against the recipe's folder (when it exists
        there); other references (``zoo:``, ``package.module:attr``) unchanged."""
        if ref is None or self.base is None or ref.startswith("zoo:") or Path(ref).is_absolute():
            return ref
        local = self.base / ref
        return str(local) if local.exists() else ref


def absolute_ref(ref: str | None) -> str | None:
    """A reference to an existing file as an absolute path (what a written recipe records, so it
    runs from any folder); other references unchanged."""
    if ref is None or ref.startswith("zoo:") or not Path(ref).exists():
        return ref
    return str(Path(ref).resolve())
