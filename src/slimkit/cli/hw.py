"""``slimkit hw measure|list``: hardware profiles for the roofline."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer
from rich import box

from slimkit.cli._ui import console, emit_json, err_console, friendly_errors, status, table

hw_app = typer.Typer(help="Hardware profiles: measure this machine, list the presets.")


def _row(hw: Any) -> dict[str, Any]:
    return {
        "name": hw.name,
        "kind": hw.kind,
        "device": hw.device,
        "peak_fp32_gflops": hw.peak_fp32_gflops,
        "peak_bf16_gflops": hw.peak_bf16_gflops,
        "peak_int8_gops": hw.peak_int8_gops,
        "mem_bandwidth_gbs": hw.mem_bandwidth_gbs,
        "ridge_fp32": hw.ridge_point("fp32"),
        "source": hw.source,
    }


_HEADERS = {"name": "name", "device": "device", "peak_fp32_gflops": "fp32 G/s",
            "peak_bf16_gflops": "bf16 G/s", "peak_int8_gops": "int8 G/s",
            "mem_bandwidth_gbs": "GB/s", "ridge_fp32": "ridge"}  # fmt: skip


@hw_app.command("list")
@friendly_errors
def list_cmd(
    json_out: bool = typer.Option(False, "--json", help="print JSON instead of a table"),
) -> None:
    """List the bundled hardware presets with their peaks and the spec sheets they cite."""
    from slimkit.analyze.hardware import list_presets, load_profile

    rows = [_row(load_profile(name)) for name in list_presets()]
    if json_out:
        emit_json({"presets": rows})
        return
    t = table("hardware presets (--hw NAME)", list(_HEADERS.values()),
              [[r[k] for k in _HEADERS] for r in rows])  # fmt: skip
    t.box, t.show_edge, t.collapse_padding = box.SIMPLE_HEAD, False, True
    t.columns[0].min_width = max(len(r["name"]) for r in rows)
    console.print(t)
    for r in rows:
        console.print(f"[bold]{r['name']}[/]: {r['source']}", soft_wrap=True)


@hw_app.command("measure")
@friendly_errors
def measure_cmd(
    threads: int = typer.Option(2, min=1, help="threads to measure with"),
    out: Path | None = typer.Option(None, "--out", "-o", help="also write the profile here"),
    quick: bool = typer.Option(False, help="about 2 s, fewer runs (not cached)"),
    json_out: bool = typer.Option(False, "--json", help="print JSON instead of a table"),
) -> None:
    """Measure this machine: fp32/bf16/fp16 matmul, ORT int8 GEMM, copy bandwidth, and ORT's
    per-kernel overhead. The result is cached as the 'this' profile (--hw this)."""
    from slimkit.analyze.hardware import load_profile, measure_hardware
    from slimkit.analyze.layer_time import measure_op_overhead

    with status("measuring this machine", not json_out):
        hw = (measure_hardware(threads, quick=True) if quick
              else load_profile("this", threads=threads, refresh=True))  # fmt: skip
        hw.details["op_overhead_us"] = measure_op_overhead(threads=threads)
    if out is not None:
        hw.to_yaml(out)
    if json_out:
        emit_json(hw.to_dict())
        return
    rows: list[list[Any]] = [
        ["source", hw.source],
        ["fp32 GFLOP/s", hw.peak_fp32_gflops],
        ["bf16 GFLOP/s", hw.peak_bf16_gflops],
        ["fp16 GFLOP/s", hw.peak_fp16_gflops],
        ["int8 GOP/s (ORT MatMulInteger)", hw.peak_int8_gops],
        ["memory GB/s (copy)", hw.mem_bandwidth_gbs],
        ["ridge point fp32 / int8 (op/B)", f"{hw.ridge_point('fp32'):.3g} / "
                                           f"{hw.ridge_point('int8') or 0:.3g}"],
        ["ORT per-kernel overhead (us)", hw.details["op_overhead_us"]],
        ["CPU flags", ", ".join(hw.flags) or "-"],
    ]  # fmt: skip
    console.print(table(f"this machine, {threads} threads", ["", "value"], rows))
    if out is not None:
        err_console.print(f"wrote {out}")
