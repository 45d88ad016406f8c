from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

from slimkit.analyze import hardware
from slimkit.analyze.hardware import (
    HardwareProfile,
    list_presets,
    load_profile,
    measure_hardware,
)
from slimkit.core.machine import cpu_info
from slimkit.errors import ConfigError, RegistryError


def test_presets_load_with_positive_peaks_and_a_source() -> None:
    names = list_presets()
    assert len(names) >= 4
    assert {"raspberry_pi_4", "jetson_orin_nano", "ryzen7_5800u", "xeon_8380"} <= set(names)
    for name in names:
        hw = load_profile(name)
        assert hw.name == name and hw.kind == "preset"
        assert "http" in hw.source  # cites the spec sheet it came from
        assert hw.peak_fp32_gflops > 0 and hw.mem_bandwidth_gbs > 0
        assert hw.peak("int8") is not None and hw.peak("int8") >= hw.peak_fp32_gflops  # type: ignore[operator]
        ridge = hw.ridge_point("fp32")
        assert ridge is not None and 1 < ridge < 100  # FLOP/byte of real machines
    pi = load_profile("raspberry_pi_4")
    assert pi.peak_fp32_gflops == 4 * 1.5 * 8 and pi.peak("bf16") is None
    assert pi.mem_bandwidth_gbs == 12.8


def test_yaml_round_trip(tmp_path: Path) -> None:
    hw = HardwareProfile(
        name="board",
        source="measured on test",
        kind="measured",
        peak_fp32_gflops=12.5,
        peak_int8_gops=40.0,
        mem_bandwidth_gbs=3.2,
        flags=("neon",),
        threads=4,
        date="2026-01-01",
        details={"fp32": {"n": 256, "runs": 3}},
    )
    path = hw.to_yaml(tmp_path / "sub" / "board.yaml")
    assert HardwareProfile.from_yaml(path) == hw
    assert load_profile(str(path)) == hw and load_profile(path) == hw
    assert [p.name for p in path.parent.iterdir()] == ["board.yaml"]  # no temporary left over


def test_unknown_preset_lists_the_valid_ones() -> None:
    with pytest.raises(RegistryError) as ei:
        load_profile("raspbery_pi_4")
    msg = str(ei.value)
    assert "did you mean 'raspberry_pi_4'" in msg
    for name in [*list_presets(), "'this'", ".yaml"]:
        assert name in msg


def test_bad_yaml_keys_and_values_are_config_errors(tmp_path: Path) -> None:
    path = tmp_path / "x.yaml"
    path.write_text("name: x\nsource: s\npeak_fp32_gflop: 1\nmem_bandwidth_gbs: 1\n")
    with pytest.raises(ConfigError, match="did you mean 'peak_fp32_gflops'"):
        HardwareProfile.from_yaml(path)
    path.write_text("name: x\nsource: s\npeak_fp32_gflops: -1\nmem_bandwidth_gbs: 1\n")
    with pytest.raises(ConfigError, match="peak_fp32_gflops"):
        HardwareProfile.from_yaml(path)
    with pytest.raises(ConfigError, match="does not exist"):
        load_profile(tmp_path / "missing.yaml")


def test_this_is_measured_once_then_cached(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SLIMKIT_CACHE_DIR", str(tmp_path))
    calls: list[int] = []
    fake = HardwareProfile(
        name="this", kind="measured", source="measured on test", peak_fp32_gflops=1.0,
        mem_bandwidth_gbs=1.0, threads=3,
    )  # fmt: skip

    def measure(threads: int = 2, *, quick: bool = False) -> HardwareProfile:
        calls.append(threads)
        return fake

    monkeypatch.setattr(hardware, "measure_hardware", measure)
    assert load_profile("this", threads=3) == fake
    assert load_profile("this", threads=3) == fake and calls == [3]  # second one from the cache
    cached = list((tmp_path / "hardware").iterdir())
    assert len(cached) == 1 and cached[0].name.endswith("-3t.yaml")
    load_profile("this", threads=3, refresh=True)
    assert calls == [3, 3]


def _plain_matmul_gflops(n: int = 2048, runs: int = 4) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    best = min(_timed(lambda: torch.mm(a, b)) for _ in range(runs))
    return 2 * n**3 / best / 1e9


def _plain_copy_gbs(mib: int = 256, runs: int = 5) -> float:
    src = torch.rand(mib * 2**20 // 4)
    dst = torch.zeros_like(src)
    dst.copy_(src)
    best = min(_timed(lambda: dst.copy_(src)) for _ in range(runs))
    return 2 * src.numel() * 4 / best / 1e9  # read + write


def _timed(fn) -> float:  # type: ignore[no-untyped-def]
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def test_measure_this_machine_agrees_with_plain_timings() -> None:
    # Shared machines only ever slow a run down, so each side is a best-of-N, and a disagreement
    # gets two fresh attempts; a wrong operation count (2x) would fail all three. ~3 s per attempt.
    for _attempt in range(3):
        hw = measure_hardware(threads=2, quick=True)
        with hardware._torch_threads(2):
            fp32, copy = _plain_matmul_gflops(), _plain_copy_gbs()
        if abs(hw.peak_fp32_gflops / fp32 - 1) < 0.2 and abs(hw.mem_bandwidth_gbs / copy - 1) < 0.2:
            break
    assert hw.peak_fp32_gflops == pytest.approx(fp32, rel=0.2)
    assert hw.mem_bandwidth_gbs == pytest.approx(copy, rel=0.2)
    assert hw.kind == "measured" and hw.threads == 2
    assert list(hw.flags) == cpu_info()["flags"] and cpu_info()["cpu"] in hw.source
    for dtype in ("fp32", "bf16", "fp16", "int8"):
        peak = hw.peak(dtype)  # type: ignore[arg-type]
        assert peak is not None and peak > 0, dtype
    if not cpu_info()["bf16_hw"]:  # no bf16 hardware: measured small, and it says so
        assert hw.details["bf16"]["capped"] and hw.peak("bf16") < hw.peak_fp32_gflops  # type: ignore[operator]
