"""What machine a number was measured on: CPU model, cores, the ISA features int8 speed depends on.

Int8 speed and even int8 correctness on ONNX Runtime depend on the CPU (AVX-512 VNNI vs AVX2 only),
so every benchmark result records ``machine_info()`` and features are detected at run time.
"""

from __future__ import annotations

import contextlib
import functools
import os
import platform
from importlib import metadata
from typing import Any

# /proc/cpuinfo flag -> the name slimkit reports
_FLAGS = {
    "avx2": "avx2",
    "fma": "fma",
    "avx512f": "avx512f",
    "avx512bw": "avx512bw",
    "avx512vl": "avx512vl",
    "avx512_vnni": "avx512_vnni",
    "avx_vnni": "avx_vnni",
    "avx512_bf16": "avx512_bf16",
    "amx_int8": "amx_int8",
    "amx_bf16": "amx_bf16",
    "asimd": "neon",
    "asimddp": "neon_dotprod",
    "i8mm": "i8mm",
    "bf16": "bf16",
}


@functools.lru_cache(maxsize=1)
def cpu_info() -> dict[str, Any]:
    """``{"cpu": model, "cores": logical cores, "arch", "flags": [...], "vnni": bool, ...}``."""
    model = platform.processor() or platform.machine()
    flags: set[str] = set()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip().lower()
                if key in ("model name", "hardware") and model in ("", platform.machine()):
                    model = value.strip()
                elif key in ("flags", "features") and not flags:
                    flags = set(value.split())
    except OSError:  # not Linux: model from platform, no flags
        pass
    found = sorted({name for flag, name in _FLAGS.items() if flag in flags})
    return {
        "cpu": model,
        "cores": os.cpu_count() or 1,
        "arch": platform.machine(),
        "flags": found,
        "vnni": bool({"avx512_vnni", "avx_vnni"} & set(found)),
        "bf16_hw": bool({"avx512_bf16", "amx_bf16", "bf16"} & set(found)),
    }


def channel_multiple() -> int:
    """Channel counts that suit this CPU's convolution kernels: ONNX Runtime's x86 NCHWc layout
    works in blocks of 16 channels with AVX-512 and 8 otherwise, and a width off the block costs
    more than its MACs (MobileNetV2 at half the MACs, AVX-512: 1.58x faster with multiples of 8,
    1.70x with multiples of 16)."""
    return 16 if "avx512f" in cpu_info()["flags"] else 8


def versions(*packages: str) -> dict[str, str]:
    """Installed versions of slimkit, python and the given packages (missing ones are skipped)."""
    out = {"python": platform.python_version()}
    for name in ("slimkit", "torch", "onnxruntime", "onnx", *packages):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return out


def machine_info() -> dict[str, Any]:
    """CPU info plus OS and the threads torch uses; what every result file records."""
    import torch

    info = dict(cpu_info())
    info["os"] = f"{platform.system()} {platform.release()}"
    info["torch_threads"] = torch.get_num_threads()
    return info


def configure_threads(threads: int = 2) -> None:
    """The benchmark protocol's PyTorch threading: ``threads`` intra-op, 1 inter-op."""
    import torch

    torch.set_num_threads(threads)
    # only settable before the first parallel region; later calls keep what is set
    with contextlib.suppress(RuntimeError):
        torch.set_num_interop_threads(1)
