"""Hardware profiles: peak compute per dtype and memory bandwidth, measured here or from a preset.

A roofline needs two numbers per dtype: how fast the machine computes and how fast it moves
bytes. ``measure_hardware`` times this machine (fp32 / bf16 / fp16 torch.matmul, ORT int8
MatMulInteger, a large tensor copy); presets in ``presets/*.yaml`` describe other targets from
their spec sheets, each citing its source::

    hw = load_profile("this")                 # measured once, then cached per CPU and threads
    hw = load_profile("raspberry_pi_4")       # a preset; list_presets() names them all
    hw = load_profile("my_board.yaml")        # any file written by HardwareProfile.to_yaml
    hw.peak("int8"), hw.mem_bandwidth_gbs, hw.ridge_point("fp32")   # op/byte
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import os
import re
import time
from collections.abc import Iterator
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import torch
import yaml
from pydantic import Field

from slimkit.core.config import Config
from slimkit.core.io import PathLike, atomic_write
from slimkit.core.machine import cpu_info, versions
from slimkit.core.registry import did_you_mean
from slimkit.errors import ConfigError, RegistryError

Dtype = Literal["fp32", "fp16", "bf16", "int8"]


class HardwareProfile(Config):
    """Peak throughput per dtype (None: no fast path on this target) and memory bandwidth.

    ``source`` cites the spec sheet of a preset, or says where a measured profile was taken;
    ``details`` keeps how each number was obtained (sizes, times, derivations).
    """

    name: str
    kind: Literal["preset", "measured"] = "preset"
    device: Literal["cpu", "gpu"] = "cpu"
    source: str = Field(min_length=1)
    peak_fp32_gflops: float = Field(gt=0)
    peak_fp16_gflops: float | None = Field(default=None, gt=0)
    peak_bf16_gflops: float | None = Field(default=None, gt=0)
    peak_int8_gops: float | None = Field(default=None, gt=0)
    mem_bandwidth_gbs: float = Field(gt=0)
    flags: tuple[str, ...] = ()
    threads: int | None = Field(default=None, gt=0)
    date: str = ""
    details: dict[str, Any] = Field(default_factory=dict)

    def peak(self, dtype: Dtype) -> float | None:
        """Peak GFLOP/s (GOP/s for int8) for ``dtype``, or None when it has no fast path."""
        if dtype not in ("fp32", "fp16", "bf16", "int8"):
            raise ConfigError(f"unknown dtype {dtype!r}", fix="use fp32, fp16, bf16 or int8")
        unit = "gops" if dtype == "int8" else "gflops"
        value: float | None = getattr(self, f"peak_{dtype}_{unit}")
        return value

    def ridge_point(self, dtype: Dtype = "fp32") -> float | None:
        """Operations per byte above which a kernel is compute-bound rather than memory-bound."""
        p = self.peak(dtype)
        return None if p is None else p / self.mem_bandwidth_gbs

    def to_yaml(self, path: PathLike) -> Path:
        """Write the profile as YAML, atomically; ``from_yaml`` reads it back unchanged."""
        with atomic_write(path) as f:
            yaml.safe_dump(self.to_dict(), f, sort_keys=False, allow_unicode=True)
        return Path(path)

    @classmethod
    def from_yaml(cls, path: PathLike) -> HardwareProfile:
        """Read a profile written by ``to_yaml`` or by hand (see the presets for the keys)."""
        p = Path(path)
        if not p.is_file():
            raise ConfigError(
                f"hardware profile file {str(p)!r} does not exist",
                fix="check the path, or use 'this' or a preset name: " + ", ".join(list_presets()),
            )
        return _parse(p.read_text(encoding="utf-8"), str(p))


def _parse(text: str, where: str) -> HardwareProfile:
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(
            f"{where} is not valid YAML ({str(e).splitlines()[0]})", fix="fix the YAML syntax"
        ) from None
    if not isinstance(data, dict):
        raise ConfigError(
            f"{where} does not hold a mapping of profile fields",
            fix="write `name:`, `source:`, `peak_fp32_gflops:`, `mem_bandwidth_gbs:` ... as keys",
        )
    return HardwareProfile.from_dict(data)


# --- presets -----------------------------------------------------------------------------------


def _preset_files() -> dict[str, Any]:
    folder = resources.files("slimkit.analyze").joinpath("presets")
    return {
        f.name.rsplit(".", 1)[0]: f
        for f in sorted(folder.iterdir(), key=lambda f: f.name)
        if f.name.endswith((".yaml", ".yml"))
    }


def list_presets() -> list[str]:
    """Names of the bundled presets (the YAML files in ``slimkit/analyze/presets``)."""
    return list(_preset_files())


# --- measurement -------------------------------------------------------------------------------


@contextlib.contextmanager
def _torch_threads(n: int) -> Iterator[None]:
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _best_time(fn: Any, repeats: int, max_seconds: float) -> tuple[float, int]:
    """Best wall time of ``fn()`` over up to ``repeats`` runs, stopping after ``max_seconds``."""
    best, runs, start = float("inf"), 0, time.perf_counter()
    while runs < repeats:
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
        runs += 1
        if time.perf_counter() - start > max_seconds:
            break
    return best, runs


def _matmul_gflops(
    dtype: torch.dtype, n: int, repeats: int, budget_s: float, grow: bool = False
) -> dict[str, Any]:
    """GFLOP/s of an n x n torch.matmul. With ``grow`` start small and double n while one run
    stays well inside the budget: bf16 / fp16 without hardware support run at ~1 GFLOP/s, where
    a 2048 matmul would take seconds."""
    size = 128 if grow else n
    a, b = torch.randn(size, size).to(dtype), torch.randn(size, size).to(dtype)
    t0 = time.perf_counter()
    c = torch.matmul(a, b)  # warm-up (and, when growing, a first estimate)
    took = time.perf_counter() - t0
    while grow and size < n and took * 8 < budget_s / 4:
        size *= 2
        a, b = torch.randn(size, size).to(dtype), torch.randn(size, size).to(dtype)
        t0 = time.perf_counter()
        c = torch.matmul(a, b)
        took = time.perf_counter() - t0
    best, runs = _best_time(lambda: torch.matmul(a, b, out=c), repeats, budget_s)
    return {
        "gflops": 2 * size**3 / best / 1e9,
        "n": size,
        "best_s": best,
        "runs": runs,
        "capped": size < n,
    }


def _copy_bandwidth(mb: int, repeats: int, budget_s: float) -> dict[str, Any]:
    """GB/s of ``dst.copy_(src)`` on ``mb`` MiB, counting the bytes read plus those written."""
    numel = mb * 2**20 // 4
    src, dst = torch.ones(numel), torch.empty(numel)
    dst.copy_(src)  # touch every page before timing
    best, runs = _best_time(lambda: dst.copy_(src), repeats, budget_s)
    return {"gbs": 2 * numel * 4 / best / 1e9, "mib": mb, "best_s": best, "runs": runs}


def measure_hardware(threads: int = 2, *, quick: bool = False) -> HardwareProfile:
    """Measure this machine: fp32 / bf16 / fp16 matmul, ORT int8 MatMulInteger, copy bandwidth.

    Every figure is the best of several runs (noise on shared machines only slows runs down).
    ``quick`` (about 2 s) uses fewer runs and smaller time caps than the default (about 6 s).
    Without bf16 / fp16 hardware those matmuls are slow and are measured on a small size, which
    ``details`` records (``capped``).
    """
    info = cpu_info()
    reps, cap = (3, 0.3) if quick else (6, 1.5)
    details: dict[str, Any] = {}
    with _torch_threads(threads):
        details["fp32"] = _matmul_gflops(torch.float32, 2048, reps, 4 * cap)
        details["bf16"] = _matmul_gflops(torch.bfloat16, 2048, reps, cap, grow=True)
        details["fp16"] = _matmul_gflops(torch.float16, 2048, reps, cap, grow=True)
        details["copy"] = _copy_bandwidth(256, 2 * reps, 2 * cap)
    try:
        from slimkit.export.microbench import matmul_integer_gops

        details["int8"] = matmul_integer_gops(
            1024 if quick else 2048, threads=threads, repeats=reps, max_seconds=2 * cap
        )
    except Exception as e:  # onnxruntime missing or broken: the profile is still useful
        details["int8"] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"}
    details["versions"] = versions()
    details["bytes_counted"] = "copy: bytes read + bytes written (2 x size)"
    flags = ", ".join(info["flags"]) or "no SIMD flags reported"
    return HardwareProfile(
        name="this",
        kind="measured",
        device="cpu",
        source=f"measured on {info['cpu']} ({flags}), {threads} threads",
        peak_fp32_gflops=details["fp32"]["gflops"],
        peak_fp16_gflops=details["fp16"]["gflops"],
        peak_bf16_gflops=details["bf16"]["gflops"],
        peak_int8_gops=details["int8"].get("gops"),
        mem_bandwidth_gbs=details["copy"]["gbs"],
        flags=tuple(info["flags"]),
        threads=threads,
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        details=details,
    )


# --- lookup ------------------------------------------------------------------------------------


def cache_dir() -> Path:
    """Where measured profiles are cached: ``$SLIMKIT_CACHE_DIR`` or the user cache directory."""
    env = os.environ.get("SLIMKIT_CACHE_DIR")
    if env:
        return Path(env)
    import platformdirs

    return Path(platformdirs.user_cache_dir("slimkit"))


def _cache_file(threads: int) -> Path:
    info = cpu_info()
    # the model name alone can be ambiguous ("AMD EPYC" covers Zen 3 and Zen 4): add the flags
    key = "|".join([info["cpu"], ",".join(info["flags"]), str(info["cores"]), str(threads),
                    torch.__version__])  # fmt: skip
    slug = re.sub(r"[^a-z0-9]+", "-", info["cpu"].lower()).strip("-")[:40] or "cpu"
    digest = hashlib.sha256(key.encode()).hexdigest()[:10]
    return cache_dir() / "hardware" / f"{slug}-{digest}-{threads}t.yaml"


def load_profile(
    name_or_path: str | os.PathLike[str], *, threads: int = 2, refresh: bool = False
) -> HardwareProfile:
    """``"this"`` (measured, cached per CPU and thread count), a preset name, or a YAML path.

    ``refresh=True`` measures this machine again instead of reading the cache.
    """
    text = str(name_or_path)
    if text == "this":
        cached = _cache_file(threads)
        if cached.is_file() and not refresh:
            return HardwareProfile.from_yaml(cached)
        profile = measure_hardware(threads)
        profile.to_yaml(cached)
        return profile
    presets = _preset_files()
    if text in presets:
        return _parse(presets[text].read_text(encoding="utf-8"), f"preset {text!r}")
    if isinstance(name_or_path, os.PathLike) or text.endswith((".yaml", ".yml")) or os.sep in text:
        return HardwareProfile.from_yaml(text)
    hint = did_you_mean(text, ["this", *presets])
    raise RegistryError(
        f"unknown hardware profile {text!r}",
        fix=f"{hint + ' ' if hint else ''}use 'this' (measure this machine), a preset ("
        f"{', '.join(presets)}) or the path of a .yaml profile",
    )
