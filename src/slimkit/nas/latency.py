"""Latency of an architecture without building it: a per-block lookup table measured on ONNX
Runtime on this machine, or the roofline of a hardware profile for a machine you do not have.

    table = LatencyTable.measure(space)          # every distinct block, timed in ORT; cached
    table.calibrate(space, archs)                # fits ms = a * sum(blocks) + b on measured nets
    table.predict(space, arch)                   # ms, from the table
    roofline_ms(space, arch, load_profile("raspberry_pi_4"))   # a lower bound from the profile
    check = validate(table, space, held_out)     # measured vs predicted, median relative error

Each distinct block (input and output width, stride, kernel, expansion, input size), the stem
and the head are exported alone and timed in ONNX Runtime (the lower quartile of each interleaved
round's runs: other processes only slow a run down, so it is the steadier number on a shared
machine). A whole network runs its blocks back to back in one session, so it costs less than the
sum of separately run blocks (one session call, warm caches); :meth:`LatencyTable.calibrate`
fits that difference as a scale and an offset on a few measured networks, and :func:`validate`
checks the result on others. The table is cached in ``<slimkit cache>/nas/`` under a key of the
CPU (model, flags, cores), the thread count, the torch and onnxruntime versions and the space.
"""

from __future__ import annotations

import hashlib
import json
import statistics
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from torch import nn

from slimkit.core.io import write_json
from slimkit.core.machine import cpu_info
from slimkit.nas.model import Block, block_shapes, conv_bn
from slimkit.nas.space import Arch, CNNSpace

# a key: ("stem",), ("block", cin, cout, stride, kernel, expand, size), ("head", cin, size)
Key = tuple[Any, ...]


def arch_keys(space: CNNSpace, arch: Arch) -> list[Key]:
    """The table entries a network of ``arch`` is made of, in order."""
    shapes = block_shapes(space, arch)
    last = shapes[-1]
    size = -(-last[5] // last[2])
    return [("stem",), *[("block", *s) for s in shapes], ("head", arch.stages[-1].width, size)]


def space_keys(space: CNNSpace) -> list[Key]:
    """Every distinct table entry of ``space``."""
    keys: list[Key] = [("stem",)]
    cins, size = [space.stem], -(-space.input_size // space.stem_stride)
    for s in space.stages:
        for co in s.widths:
            for k in s.kernels:
                for e in s.expands:
                    keys += [("block", ci, co, s.stride, k, e, size) for ci in cins]
        size = -(-size // s.stride)
        if s.depths[-1] > 1:
            keys += [
                ("block", co, co, 1, k, e, size)
                for co in s.widths
                for k in s.kernels
                for e in s.expands
            ]
        cins = list(s.widths)
    keys += [("head", ci, size) for ci in cins]
    return list(dict.fromkeys(keys))


def key_module(space: CNNSpace, key: Key) -> tuple[nn.Module, torch.Tensor]:
    """The module of one table entry and an input of its shape (batch 1)."""
    if key[0] == "stem":
        return conv_bn(space.in_channels, space.stem, 3, space.stem_stride), torch.randn(
            1, space.in_channels, space.input_size, space.input_size
        )
    if key[0] == "block":
        cin, cout, stride, k, e, size = key[1:]
        return Block(cin, cout, stride, k, e), torch.randn(1, cin, size, size)
    cin, size = key[1:]
    head = nn.Sequential(
        conv_bn(cin, space.head),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(space.head, space.num_classes),
    )
    return head, torch.randn(1, cin, size, size)


def ort_times(
    models: Mapping[str, tuple[nn.Module, torch.Tensor]],
    *,
    threads: int = 1,
    runs: int = 30,
    rounds: int = 3,
    warmup: int = 5,
    progress: Callable[[str], None] | None = None,
) -> dict[str, dict[str, Any]]:
    """Each model exported to ONNX and timed in ONNX Runtime at batch 1, in interleaved rounds:
    label -> ``{"ms": lower quartile, "median_ms": median, "spread": [lo, hi]}``."""
    from slimkit.analyze.latency import measure_latency, ort_runner
    from slimkit.export.onnx import export_onnx
    from slimkit.export.ort import ort_session

    runners = {}
    with tempfile.TemporaryDirectory() as tmp:
        for i, (label, (model, x)) in enumerate(models.items()):
            if progress is not None:
                progress(label)
            path = Path(tmp) / f"m{i}.onnx"
            export_onnx(model.eval(), path, example_inputs=(x,), check=False)
            runners[label] = ort_runner(ort_session(path, threads=threads), [x])
    stats = measure_latency(runners, runs=runs, rounds=rounds, warmup=warmup)
    return {
        k: {"ms": s.quartile_ms, "median_ms": s.median_ms, "spread": list(s.spread_ms)}
        for k, s in stats.items()
    }


def _key_str(key: Key) -> str:
    return ":".join(map(str, key))


def cache_key(space: CNNSpace, threads: int) -> str:
    info = cpu_info()
    try:
        ort_version = metadata.version("onnxruntime")
    except metadata.PackageNotFoundError:  # pragma: no cover - a core dependency
        ort_version = "?"
    text = json.dumps(
        [
            "v2",  # entries net of the session call
            info["cpu"],
            info["flags"],
            info["cores"],
            threads,
            torch.__version__,
            ort_version,
            space.to_dict(),
        ],
        sort_keys=True,
    )
    return hashlib.sha256(text.encode()).hexdigest()[:12]


@dataclass
class LatencyTable:
    """Measured ms per table entry, plus the whole-network calibration ``ms = scale * sum +
    offset`` (identity until :meth:`calibrate`)."""

    entries: dict[str, float]
    threads: int = 1
    key: str = ""
    call_ms: float = 0.0  # one session call on a trivial graph, paid once per network
    scale: float = 1.0
    offset: float = 0.0
    meta: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def measure(
        cls,
        space: CNNSpace,
        *,
        threads: int = 1,
        runs: int = 30,
        rounds: int = 3,
        cache: bool = True,
        progress: Callable[[str], None] | None = None,
        chunk: int = 24,
        refresh: bool = False,
    ) -> LatencyTable:
        """Time every entry of ``space`` (or read them from the cache: ``meta["cached"]`` is then
        True). Entries are timed in interleaved groups of ``chunk``. ``refresh``: time them even
        when cached, and replace the cached table."""
        from slimkit.analyze.hardware import cache_dir

        key = cache_key(space, threads)
        path = cache_dir() / "nas" / f"latency-{key}.json"
        if cache and not refresh and path.is_file():
            table = cls(**json.loads(path.read_text(encoding="utf-8")))
            table.meta = {**table.meta, "cached": True}
            return table
        keys = space_keys(space)
        entries: dict[str, float] = {}
        calls = []
        for i in range(0, len(keys), chunk):
            group = {_key_str(k): key_module(space, k) for k in keys[i : i + chunk]}
            # the cost of one session call on a trivial graph, timed in the same rounds: every
            # entry pays it once, a whole network pays it once in all
            group["call"] = (nn.ReLU(), torch.randn(1, 1, 1, 1))
            times = ort_times(group, threads=threads, runs=runs, rounds=rounds, progress=progress)
            call = times.pop("call")["ms"]
            calls.append(call)
            entries.update({k: max(v["ms"] - call, 0.0) for k, v in times.items()})
        table = cls(entries, threads, key, call_ms=statistics.median(calls),
                    meta={"cpu": cpu_info()["cpu"], "runs": runs})  # fmt: skip
        if cache:
            table.save(path)
        return table

    def save(self, path: Path) -> None:
        write_json(
            path,
            {
                "entries": self.entries,
                "threads": self.threads,
                "key": self.key,
                "call_ms": self.call_ms,
                "scale": self.scale,
                "offset": self.offset,
                "meta": self.meta,
            },
        )

    def raw(self, space: CNNSpace, arch: Arch) -> float:
        """One session call plus the entries of ``arch`` (ms), before calibration."""
        return self.call_ms + sum(self.entries[_key_str(k)] for k in arch_keys(space, arch))

    def predict(self, space: CNNSpace, arch: Arch) -> float:
        """Predicted whole-network ms of ``arch`` in ORT at batch 1."""
        return self.scale * self.raw(space, arch) + self.offset

    def calibrate(
        self, space: CNNSpace, archs: Sequence[Arch], measured: Sequence[float] | None = None
    ) -> dict[str, float]:
        """Fit ``scale`` and ``offset`` (least squares) on ``archs`` measured as whole networks
        (measured here when ``measured`` is not given)."""
        if measured is None:
            measured = measure_archs(space, archs, threads=self.threads)
        xs = [self.raw(space, a) for a in archs]
        mx, my = statistics.fmean(xs), statistics.fmean(measured)
        var = sum((x - mx) ** 2 for x in xs)
        self.scale = (
            sum((x - mx) * (y - my) for x, y in zip(xs, measured, strict=True)) / var
            if var > 0
            else my / mx
        )
        self.offset = my - self.scale * mx
        return {"scale": self.scale, "offset": self.offset, "archs": len(archs)}


def measure_archs(
    space: CNNSpace, archs: Sequence[Arch], *, threads: int = 1, runs: int = 30, rounds: int = 3
) -> list[float]:
    """Whole-network ORT ms (lower quartile) of each architecture, random weights, interleaved."""
    from slimkit.nas.model import ArchNet

    x = torch.randn(1, space.in_channels, space.input_size, space.input_size)
    models = {str(i): (ArchNet(space, a), x) for i, a in enumerate(archs)}
    times = ort_times(models, threads=threads, runs=runs, rounds=rounds)
    return [times[str(i)]["ms"] for i in range(len(archs))]


def roofline_ms(space: CNNSpace, arch: Arch, hw: Any) -> float:
    """The roofline lower bound (ms) of ``arch`` on hardware profile ``hw`` (fp32, runtime
    fusions, the profile's per-kernel overhead): for targets without a device to measure."""
    from slimkit.analyze.profile import profile_model
    from slimkit.analyze.roofline import layer_costs, overhead_seconds, predicted_seconds
    from slimkit.nas.model import ArchNet

    x = torch.randn(1, space.in_channels, space.input_size, space.input_size)
    costs = layer_costs(profile_model(ArchNet(space, arch), x))
    return 1e3 * predicted_seconds(costs, hw, overhead_seconds(hw))


@dataclass
class Validation:
    """Predicted vs measured whole-network latency on held-out architectures."""

    measured_ms: list[float]
    predicted_ms: list[float]

    @property
    def errors(self) -> list[float]:
        return [abs(p - m) / m for p, m in zip(self.predicted_ms, self.measured_ms, strict=True)]

    @property
    def median_error(self) -> float:
        return statistics.median(self.errors)

    def to_dict(self) -> dict[str, Any]:
        return {
            "median_rel_error": self.median_error,
            "max_rel_error": max(self.errors),
            "n": len(self.errors),
            "measured_ms": self.measured_ms,
            "predicted_ms": self.predicted_ms,
        }


def validate(
    predict: Callable[[Arch], float],
    space: CNNSpace,
    archs: Sequence[Arch],
    *,
    threads: int = 1,
    measured: Sequence[float] | None = None,
) -> Validation:
    """Compare ``predict(arch)`` with each architecture measured as a whole network in ORT."""
    got = list(measured) if measured is not None else measure_archs(space, archs, threads=threads)
    return Validation(got, [predict(a) for a in archs])


def _chunks(seq: Sequence[Any], n: int) -> Iterator[Sequence[Any]]:  # pragma: no cover
    for i in range(0, len(seq), n):
        yield seq[i : i + n]
