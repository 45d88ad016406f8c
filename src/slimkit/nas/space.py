"""Search spaces as data: what a network may look like, and one sampled architecture.

A :class:`CNNSpace` describes a MobileNetV2-style network (stem, stages of inverted-residual
blocks, 1x1 head, pooling, classifier) by the choices each stage offers: output width, depth
(blocks), and per block the depthwise kernel size and the expansion ratio. An :class:`Arch` is one
choice per gene; both are plain data that round-trip through YAML, so a user extends the space by
editing numbers, not code::

    space = CNNSpace.from_yaml("space.yaml")          # or CNNSpace() for the shapes default
    arch = space.sample(random.Random(0))             # Arch(stages=(Stage(width=24, ...), ...))
    space.to_yaml("space.yaml"); arch.to_yaml("arch.yaml"); Arch.from_yaml("arch.yaml")
    genes = space.encode(arch); space.decode(genes) == arch  # the integer vector search sees

:class:`EncoderSpace` is the same idea for Transformer encoders (depth, heads, FFN width); it
samples and round-trips, but has no supernet yet.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import Field, field_validator, model_validator

from slimkit.core.config import Config
from slimkit.core.io import PathLike, atomic_write
from slimkit.errors import ConfigError


def write_yaml(path: PathLike, data: Any) -> Path:
    """``data`` as YAML at ``path``, atomically."""
    with atomic_write(path) as f:
        f.write(yaml.safe_dump(data, sort_keys=False))
    return Path(path)


def _choices(values: list[int], what: str) -> list[int]:
    if not values or any(v < 1 for v in values):
        raise ValueError(f"{what} must be a non-empty list of positive integers")
    return sorted(set(values))


class StageSpace(Config):
    """The choices of one stage; the first block has ``stride``, the others stride 1."""

    widths: list[int]  # output channels to choose from
    depths: list[int]  # number of blocks to choose from
    kernels: list[int] = Field(default_factory=lambda: [3, 5])  # depthwise kernel sizes (odd)
    expands: list[int] = Field(default_factory=lambda: [2, 4])  # hidden = expand * input width
    stride: int = 1

    @field_validator("widths", "depths", "expands")
    @classmethod
    def _positive(cls, v: list[int]) -> list[int]:
        return _choices(v, "widths, depths and expands")

    @field_validator("kernels")
    @classmethod
    def _odd(cls, v: list[int]) -> list[int]:
        v = _choices(v, "kernels")
        if any(k % 2 == 0 for k in v):
            raise ValueError("kernel sizes must be odd (3, 5, 7) so that padding keeps the size")
        return v

    @field_validator("stride")
    @classmethod
    def _stride(cls, v: int) -> int:
        if v not in (1, 2):
            raise ValueError("stride must be 1 or 2")
        return v


def _default_stages() -> list[StageSpace]:
    return [
        StageSpace(widths=[8, 12, 16], depths=[1], stride=1),
        StageSpace(widths=[16, 24, 32], depths=[1, 2, 3], stride=2),
        StageSpace(widths=[24, 40, 56], depths=[1, 2, 3], stride=2),
        StageSpace(widths=[48, 64, 80], depths=[1, 2], stride=1),
    ]


@dataclass(frozen=True)
class Stage:
    """One stage of an architecture: its width and, per block, kernel size and expansion."""

    width: int
    kernels: tuple[int, ...]
    expands: tuple[int, ...]

    @property
    def depth(self) -> int:
        return len(self.kernels)


@dataclass(frozen=True)
class Arch:
    """One architecture of a :class:`CNNSpace`: a tuple of :class:`Stage` (hashable, YAML-able)."""

    stages: tuple[Stage, ...]

    def to_dict(self) -> dict[str, Any]:
        return {
            "stages": [
                {**asdict(s), "kernels": list(s.kernels), "expands": list(s.expands)}
                for s in self.stages
            ]
        }

    @classmethod
    def from_dict(cls, data: Any) -> Arch:
        try:
            stages = tuple(
                Stage(
                    int(s["width"]),
                    tuple(int(k) for k in s["kernels"]),
                    tuple(int(e) for e in s["expands"]),
                )
                for s in data["stages"]
            )
        except (KeyError, TypeError, ValueError) as e:
            raise ConfigError(
                f"not an architecture mapping ({type(e).__name__}: {e})",
                fix="write {stages: [{width: 16, kernels: [3, 5], expands: [6, 6]}, ...]}",
            ) from None
        if any(len(s.kernels) != len(s.expands) or not s.kernels for s in stages):
            raise ConfigError(
                "each stage needs as many kernels as expands, at least one",
                fix="give one kernel size and one expansion ratio per block",
            )
        return cls(stages)

    def to_yaml(self, path: PathLike) -> Path:
        return write_yaml(path, self.to_dict())

    @classmethod
    def from_yaml(cls, path: PathLike) -> Arch:
        return cls.from_dict(yaml.safe_load(Path(path).read_text(encoding="utf-8")))

    def describe(self) -> str:
        """``w16 d2 k35 e36 | ...``: width, depth, kernels, expands per stage."""
        return " | ".join(
            f"w{s.width} d{s.depth} k{''.join(map(str, s.kernels))} e{''.join(map(str, s.expands))}"
            for s in self.stages
        )


class CNNSpace(Config):
    """A MobileNetV2-style space: ``stem`` 3x3 conv (stride ``stem_stride``), the stages, a 1x1
    ``head`` conv, global pooling and a linear classifier. The default fits the 32x32 ``shapes``
    task: 4.6e7 architectures from 0.65 to 6.1 M MACs."""

    in_channels: int = 3
    input_size: int = 32  # height = width of the input images
    num_classes: int = 10
    stem: int = 16
    stem_stride: int = 2
    head: int = 128
    stages: list[StageSpace] = Field(default_factory=_default_stages)

    @model_validator(mode="after")
    def _nonempty(self) -> CNNSpace:
        if not self.stages:
            raise ValueError("a space needs at least one stage")
        return self

    # --- the architectures of the space ---------------------------------------------------

    def largest(self) -> Arch:
        return Arch(
            tuple(
                Stage(
                    s.widths[-1], (s.kernels[-1],) * s.depths[-1], (s.expands[-1],) * s.depths[-1]
                )
                for s in self.stages
            )
        )

    def smallest(self) -> Arch:
        return Arch(
            tuple(
                Stage(s.widths[0], (s.kernels[0],) * s.depths[0], (s.expands[0],) * s.depths[0])
                for s in self.stages
            )
        )

    def uniform(
        self, width_index: int, *, kernel: int | None = None, expand: int | None = None
    ) -> Arch:
        """Every stage at its ``width_index``-th width and its largest depth; one kernel size
        and expansion everywhere (default: the smallest kernel, the largest expansion). The
        width-scaled baseline of the benchmark."""
        out = []
        for s in self.stages:
            d = s.depths[-1]
            k = kernel if kernel is not None else s.kernels[0]
            e = expand if expand is not None else s.expands[-1]
            out.append(Stage(s.widths[min(width_index, len(s.widths) - 1)], (k,) * d, (e,) * d))
        arch = Arch(tuple(out))
        self.check(arch)
        return arch

    def sample(self, rng: random.Random) -> Arch:
        return Arch(
            tuple(
                Stage(
                    rng.choice(s.widths),
                    tuple(rng.choice(s.kernels) for _ in range(d)),
                    tuple(rng.choice(s.expands) for _ in range(d)),
                )
                for s in self.stages
                for d in [rng.choice(s.depths)]
            )
        )

    def size(self) -> int:
        """How many distinct architectures the space holds."""
        n = 1
        for s in self.stages:
            per_block = len(s.kernels) * len(s.expands)
            n *= len(s.widths) * sum(per_block**d for d in s.depths)
        return n

    def check(self, arch: Arch) -> None:
        """Raise ``ConfigError`` naming the first choice ``arch`` makes outside this space."""
        if len(arch.stages) != len(self.stages):
            raise ConfigError(
                f"the architecture has {len(arch.stages)} stages, the space {len(self.stages)}",
                fix="sample the architecture from this space (space.sample(rng))",
            )
        for i, (a, s) in enumerate(zip(arch.stages, self.stages, strict=True)):
            bad = [
                f"{what} {v} not in {allowed}"
                for what, vals, allowed in (
                    ("width", [a.width], s.widths),
                    ("depth", [a.depth], s.depths),
                    ("kernel", a.kernels, s.kernels),
                    ("expand", a.expands, s.expands),
                )
                for v in vals
                if v not in allowed
            ]
            if bad:
                raise ConfigError(
                    f"stage {i} of the architecture is outside the space: {bad[0]}",
                    fix="choose from the space's lists, or add the value to the space",
                )

    # --- the integer vector an optimiser sees ---------------------------------------------

    def genes(self) -> list[tuple[str, list[int]]]:
        """(name, choices) per gene: per stage width and depth, then kernel and expansion of
        every block position up to the largest depth (unused positions are ignored)."""
        out: list[tuple[str, list[int]]] = []
        for i, s in enumerate(self.stages):
            out += [(f"s{i}.width", s.widths), (f"s{i}.depth", s.depths)]
            for j in range(s.depths[-1]):
                out += [(f"s{i}.b{j}.kernel", s.kernels), (f"s{i}.b{j}.expand", s.expands)]
        return out

    def decode(self, values: Sequence[int] | dict[str, int]) -> Arch:
        """An architecture from gene values (a list in :meth:`genes` order, or name -> value)."""
        names = [n for n, _ in self.genes()]
        v = dict(values) if isinstance(values, dict) else dict(zip(names, values, strict=True))
        stages = []
        for i, _ in enumerate(self.stages):
            d = v[f"s{i}.depth"]
            stages.append(
                Stage(
                    v[f"s{i}.width"],
                    tuple(v[f"s{i}.b{j}.kernel"] for j in range(d)),
                    tuple(v[f"s{i}.b{j}.expand"] for j in range(d)),
                )
            )
        arch = Arch(tuple(stages))
        self.check(arch)
        return arch

    def encode(self, arch: Arch) -> list[int]:
        """Gene values of ``arch`` (unused block positions take the first choice)."""
        self.check(arch)
        out: list[int] = []
        for a, s in zip(arch.stages, self.stages, strict=True):
            out += [a.width, a.depth]
            for j in range(s.depths[-1]):
                used = j < a.depth
                out += [
                    a.kernels[j] if used else s.kernels[0],
                    a.expands[j] if used else s.expands[0],
                ]
        return out

    def to_yaml(self, path: PathLike) -> Path:
        return write_yaml(path, self.to_dict())

    @classmethod
    def from_yaml(cls, path: PathLike) -> CNNSpace:
        return cls.from_dict(yaml.safe_load(Path(path).read_text(encoding="utf-8")))


class EncoderSpace(Config):
    """A Transformer-encoder space: depth, attention heads and FFN width per layer, at a fixed
    hidden size. Data only for now: it samples and round-trips; no supernet trains it yet."""

    hidden: int = 256
    depths: list[int] = Field(default_factory=lambda: [2, 3, 4])
    heads: list[int] = Field(default_factory=lambda: [2, 4])
    ffn: list[int] = Field(default_factory=lambda: [256, 512, 1024])

    @model_validator(mode="after")
    def _divides(self) -> EncoderSpace:
        for name in ("depths", "heads", "ffn"):
            _choices(getattr(self, name), name)
        if any(self.hidden % h for h in self.heads):
            raise ValueError(f"every head count must divide hidden={self.hidden}")
        return self

    def sample(self, rng: random.Random) -> dict[str, Any]:
        """``{"layers": [{"heads": 4, "ffn": 512}, ...]}`` with a random depth."""
        d = rng.choice(self.depths)
        return {
            "layers": [
                {"heads": rng.choice(self.heads), "ffn": rng.choice(self.ffn)} for _ in range(d)
            ]
        }
