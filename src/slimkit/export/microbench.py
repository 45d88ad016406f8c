"""ONNX Runtime micro-benchmarks for hardware profiles: int8 GEMM throughput.

Lives in ``export/`` because it builds ONNX graphs. ``MatMulInteger`` with uint8 activations and a
constant int8 weight is the kernel ORT runs for the QDQ models slimkit exports, so its speed is the
int8 peak a roofline should use on this machine::

    matmul_integer_gops(1024, threads=2)   # {"gops": 260.3, "n": 1024, "best_s": ..., "runs": 5}
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from slimkit.export.ort import ort_session


def _matmul_integer_model(n: int, seed: int = 0) -> bytes:
    """A: uint8 (n, n) input, B: int8 (n, n) constant weight, zero points 128 / 0 -> int32."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    weight = rng.integers(-128, 128, size=(n, n), dtype=np.int8)
    inits = [
        numpy_helper.from_array(weight, "B"),
        numpy_helper.from_array(np.array(128, dtype=np.uint8), "a_zero"),
        numpy_helper.from_array(np.array(0, dtype=np.int8), "b_zero"),
    ]
    node = helper.make_node("MatMulInteger", ["A", "B", "a_zero", "b_zero"], ["Y"])
    graph = helper.make_graph(
        [node],
        "matmul_integer",
        [helper.make_tensor_value_info("A", TensorProto.UINT8, [n, n])],
        [helper.make_tensor_value_info("Y", TensorProto.INT32, [n, n])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8  # readable by every onnxruntime slimkit supports
    return bytes(model.SerializeToString())


def matmul_integer_gops(
    n: int = 1024, *, threads: int = 2, repeats: int = 5, max_seconds: float = 2.0
) -> dict[str, Any]:
    """Best-of-``repeats`` GOP/s (2 * n^3 ops per run) of ORT MatMulInteger, u8 x s8 -> s32.

    Stops early once ``max_seconds`` of timed runs have passed (at least one run is timed).
    """
    session = ort_session(_matmul_integer_model(n), threads=threads)
    a = np.random.default_rng(1).integers(0, 256, size=(n, n), dtype=np.uint8)
    feed = {"A": a}
    session.run(None, feed)  # warm-up: weight packing, thread pool start
    best, runs, start = float("inf"), 0, time.perf_counter()
    while runs < repeats:
        t0 = time.perf_counter()
        session.run(None, feed)
        best = min(best, time.perf_counter() - t0)
        runs += 1
        if time.perf_counter() - start > max_seconds:
            break
    return {"gops": 2 * n**3 / best / 1e9, "n": n, "best_s": best, "runs": runs}
