"""Deploy a model to one runtime, or to every installed one and keep the fastest whose output still
matches (``backend="auto"``)::

    rep = deploy(model, (x,), backend="auto", out="deployed/")
    rep.chosen, rep.table()       # e.g. "openvino", one row per backend

Each backend gets the same ONNX file (fp32, or slimkit's QDQ int8 graph of a quantized model; a
runtime with its own int8 quantizer, when ``deploy`` quantizes, gets the float model and the
calibration batches instead, and its parity is checked against the float model). Its
runtime settings are tuned by measurement (a short timing per candidate, kept only where parity
holds), then all backends are timed interleaved with the protocol of ``BENCHMARKS.md``. Parity is
the SQNR of the backend's output against slimkit's PyTorch model (its simulation when quantized).
A backend that is missing, or fails on the model, is recorded with the reason (the install command,
or the failing op) and the others still run.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from slimkit.errors import ConfigError
from slimkit.export.backends.base import (
    Arrays,
    Backend,
    BackendFailed,
    BackendUnavailable,
    Runner,
    cpu_threads,
    failure,
)

# parity bounds (SQNR in dB against the PyTorch model): a float runtime must agree far beyond any
# compression error; an integer runtime rounds .5 ties differently (the bound of export.qdq)
MIN_SQNR_FP32 = 40.0
MIN_SQNR_INT8 = 25.0
# a runtime's own int8 quantizer (LiteRT, MNN, ExecuTorch's XNNPACK) is another quantization than
# slimkit's, so it is checked against the float model: at least MIN_SQNR_INT8, or, where slimkit's
# own int8 simulation is further from the float model, no more than this below it
NATIVE_MARGIN_DB = 3.0
# at most this many calibration batches (at the example's batch size) for a runtime's quantizer:
# MNN's tool reads them as text files, which at 224x224 and 1024 samples would be gigabytes
NATIVE_MAX_BATCHES = 128


@dataclass
class BackendResult:
    """One backend on one model: status ``ok`` / ``missing`` / ``failed`` / ``parity`` (ran, but
    its output does not match), the tuned settings, latency, size and SQNR."""

    backend: str
    package: str
    status: str
    version: str | None = None
    reason: str | None = None
    op: str | None = None  # the failing ONNX op, when the runtime named one
    settings: dict[str, Any] | None = None
    tuning: list[dict[str, Any]] = field(default_factory=list)
    latency_ms: float | None = None  # median of the interleaved round medians
    spread_ms: list[float] | None = None
    # median over rounds of each round's lower quartile: other processes only ever slow a run,
    # so on a shared machine this is the steadier estimate, and what auto compares
    quartile_ms: float | None = None
    sqnr_db: float | None = None  # against slimkit's PyTorch model (its simulation when int8)
    sqnr_float_db: float | None = None  # against the float model, when deployed as int8
    quantizer: str | None = None  # the runtime's own int8 quantizer (None: slimkit's QDQ graph)
    size_mb: float | None = None
    files: list[str] = field(default_factory=list)
    roofline_ms: float | None = None
    seconds: float | None = None  # export + tuning time

    @property
    def of_roofline(self) -> float | None:
        """Measured latency over the roofline bound (1.0 would be the machine's limit)."""
        if self.latency_ms is None or not self.roofline_ms:
            return None
        return self.latency_ms / self.roofline_ms

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["of_roofline"] = self.of_roofline
        for k in ("sqnr_db", "sqnr_float_db"):
            if d[k] is not None and not math.isfinite(d[k]):
                d[k] = 999.0 if d[k] > 0 else -999.0  # JSON has no inf: 999 means identical
        return d


@dataclass
class DeployReport:
    """What ``deploy`` measured on every backend, and which one it chose."""

    model: str
    format: str  # fp32 | int8
    batch: int
    backend: str  # what was asked: a name or auto
    min_sqnr_db: float
    chosen: str | None
    results: list[BackendResult]
    out: str | None = None
    roofline: dict[str, Any] | None = None
    load_avg: list[float] | None = None
    notes: list[str] = field(default_factory=list)
    # the bound of a runtime's own int8 quantizer, against the float model (NATIVE_MARGIN_DB)
    native_min_sqnr_db: float | None = None
    # the loaded runtimes that passed parity (not saved): re-measure them with runner.bind(x)
    runners: dict[str, Runner] = field(default_factory=dict, repr=False)

    def result(self, name: str) -> BackendResult:
        return next(r for r in self.results if r.backend == name)

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "runners"}
        d["results"] = [r.to_dict() for r in self.results]
        return d

    def rows(self) -> list[list[Any]]:
        """The comparison table: backend, status, ms, x roofline, MB, SQNR dB, settings / reason."""
        out = []
        for r in self.results:
            mark = " *" if r.backend == self.chosen else ""
            detail = r.reason if r.status != "ok" else _short(r.settings or {})
            out.append([r.backend + mark, r.status, r.latency_ms, r.of_roofline, r.size_mb,
                        r.sqnr_db, detail])  # fmt: skip
        return out


COLUMNS = ["backend", "status", "ms", "x roofline", "MB", "SQNR dB", "settings / reason"]


def _short(settings: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in settings.items())


def _flat_outputs(out: Any) -> list[np.ndarray]:
    from slimkit.export.onnx import _flatten

    return [t.detach().cpu().numpy() for t in _flatten(out)]


def _sqnr(ref: list[np.ndarray], out: list[np.ndarray]) -> float:
    from slimkit.testing.numerics import sqnr

    if [r.shape for r in ref] != [np.shape(o) for o in out]:
        return -math.inf
    return sqnr(ref, out)


def _quantize(model: nn.Module, data: Any, inputs: tuple[torch.Tensor, ...]) -> nn.Module:
    """slimkit's int8 PTQ, kept int8 everywhere: each runtime is timed on it, so the ORT-only
    speed check of ``sk.quantize`` (which may keep layers float) is off."""
    from slimkit.quant.ptq import PTQ
    from slimkit.quant.verb import quantize

    return quantize(model, PTQ(speed_check=False, float_prefix=False),
                    data=data if data is not None else [inputs])  # fmt: skip


def _calibration(data: Any, args: tuple[torch.Tensor, ...]) -> list[tuple[torch.Tensor, ...]]:
    """The calibration batches (``data``, else the example inputs) re-cut to the example's batch
    size: a runtime's own quantizer runs the model at the shapes it was converted with."""
    from slimkit.core.data import collect_batches

    batches = collect_batches(data if data is not None else [args], what="calibration data",
                              limit=32)  # fmt: skip
    ins = [b.inputs for b in batches]
    n = int(args[0].shape[0]) if args[0].dim() else 0
    same = all(
        len(b) == len(args)
        and all(
            t.dim() == a.dim() and t.shape[1:] == a.shape[1:] for t, a in zip(b, args, strict=True)
        )
        for b in ins
    )
    if not n or not same:
        return ins
    cols = [torch.cat([b[k] for b in ins]) for k in range(len(args))]
    cut = [c.split(n) for c in cols]
    whole = [tuple(c[i] for c in cut) for i in range(len(cut[0])) if cut[0][i].shape[0] == n]
    return whole[:NATIVE_MAX_BATCHES]


def _roofline_ms(model: nn.Module, inputs: tuple[torch.Tensor, ...], dtype: str, hw: Any,
                 threads: int) -> tuple[float | None, dict[str, Any] | None]:  # fmt: skip
    """The roofline lower bound of the whole model on ``hw`` (slimkit.analyze), in ms."""
    from slimkit.analyze.hardware import HardwareProfile, load_profile
    from slimkit.analyze.profile import profile_model
    from slimkit.analyze.roofline import roofline

    profile = hw if isinstance(hw, HardwareProfile) else load_profile(hw, threads=threads)
    rf = roofline(profile_model(model, inputs), profile, dtype)  # type: ignore[arg-type]
    info = {"hardware": rf.hardware, "dtype": dtype, "bound_ms": rf.total_s * 1e3,
            "bound": rf.bound, "summary": rf.summary}  # fmt: skip
    return rf.total_s * 1e3, info


def _tune(
    be: Backend, files: list[Path], inputs: list[np.ndarray], ref: list[np.ndarray],
    threads: int, min_db: float, runs: int, tune: bool,
) -> tuple[Runner | None, dict[str, Any] | None, float | None, list[dict[str, Any]]]:  # fmt: skip
    """Each candidate setting: load, parity, a short timing. The fastest with parity wins."""
    from slimkit.analyze.latency import measure_latency

    grid = be.settings(threads) if tune else be.settings(threads)[:1]
    tried: list[dict[str, Any]] = []
    best: tuple[float, Runner, dict[str, Any], float] | None = None
    for s in grid:
        row: dict[str, Any] = {"settings": s}
        tried.append(row)
        try:
            runner = be.load(files, inputs, s)
            db = _sqnr(ref, runner.run(inputs))
        except Exception as e:  # noqa: BLE001 - a setting the runtime rejects is skipped
            row["error"] = f"{type(e).__name__}: {str(e).strip()[:200]}"
            continue
        row["sqnr_db"] = db if math.isfinite(db) else (999.0 if db > 0 else -999.0)
        if not db >= min_db:
            row["parity"] = False
            continue
        if len(grid) > 1:
            t = measure_latency(
                {"c": runner.bind(inputs)}, runs=runs, warmup=3, rounds=1, max_seconds=5.0
            )  # a slow runtime is told apart in a few runs
            row["latency_ms"], row["quartile_ms"] = t["c"].median_ms, t["c"].quartile_ms
            key = t["c"].quartile_ms
        else:
            key = 0.0
        if best is None or key < best[0]:
            best = (key, runner, s, db)
    if best is None:
        return None, None, max((r.get("sqnr_db", -math.inf) for r in tried), default=None), tried
    return best[1], best[2], best[3], tried


def deploy(
    model: nn.Module,
    example_inputs: Sequence[torch.Tensor] | torch.Tensor,
    *,
    backend: str | Sequence[str] = "auto",
    out: str | os.PathLike[str] | None = None,
    int8: bool = False,
    data: Any = None,
    min_sqnr_db: float | None = None,
    threads: int | None = None,
    tune: bool = True,
    runs: int = 50,
    rounds: int = 3,
    max_seconds: float | None = 60.0,
    hw: Any = "this",
    name: str | None = None,
    progress: Callable[[str], None] | None = None,
    options: dict[str, dict[str, Any]] | None = None,
) -> DeployReport:
    """Export ``model`` to ``backend`` (a name, a list of names, or ``auto``: every one installed),
    tune each runtime's settings, time them all interleaved, and keep the fastest (by the lower
    quartile of the runs: steadier than the median on a shared machine) whose SQNR against
    ``model`` is at least ``min_sqnr_db`` (40 dB fp32, 25 dB int8 by default).

    ``int8=True`` quantizes first (slimkit's PTQ, calibrated on ``data``, else on the example
    inputs); runtimes with their own quantizer (``Backend.native_int8``: LiteRT, ExecuTorch, MNN)
    quantize the float model on the same batches, checked against the float model at
    ``DeployReport.native_min_sqnr_db``. A model already quantized by ``sk.quantize`` deploys as
    its int8 graph. With
    ``out`` the chosen backend's files, ``model.onnx`` and ``deploy.json`` (the full table) are
    written there. ``hw`` is the hardware profile of the roofline bound (``None``: none).
    ``options`` are per-backend arguments, e.g. ``{"tvm": {"tune_trials": 64}}``.
    """
    from slimkit.analyze.latency import measure_latency
    from slimkit.export.backends import BACKENDS, get_backend
    from slimkit.export.onnx import _integer_graph, export_onnx

    names = (
        list(BACKENDS)
        if backend == "auto"
        else [backend]
        if isinstance(backend, str)
        else list(backend)
    )
    opts = options or {}
    backends = [get_backend(n, **opts.get(n, {})) for n in names]  # unknown names fail first
    args = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs)
    threads = threads or cpu_threads()
    say = progress or (lambda _msg: None)
    was_training = model.training
    model.eval()
    float_model = None
    if int8 and not _integer_graph(model):
        say("quantizing to int8")
        float_model, model = model, _quantize(model, data, args)
    fmt = "int8" if _integer_graph(model) else "fp32"
    min_db = (
        min_sqnr_db
        if min_sqnr_db is not None
        else MIN_SQNR_INT8
        if fmt == "int8"
        else MIN_SQNR_FP32
    )
    with torch.no_grad():
        ref = _flat_outputs(model(*args))
        ref_float = _flat_outputs(float_model(*args)) if float_model is not None else None
    calib: list[tuple[torch.Tensor, ...]] = []
    if float_model is not None and any(be.native_int8 for be in backends):
        calib = _calibration(data, args)
    inputs = [a.detach().cpu().numpy() for a in args]
    batch = int(args[0].shape[0]) if args[0].dim() else 1
    asked = backend if isinstance(backend, str) else ",".join(names)
    rep = DeployReport(name or type(model).__name__, fmt, batch, asked, min_db, None, [])
    rep.load_avg = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    if ref_float is not None:
        rep.native_min_sqnr_db = (
            min_sqnr_db
            if min_sqnr_db is not None
            else min(MIN_SQNR_INT8, _sqnr(ref_float, ref) - NATIVE_MARGIN_DB)
        )
    bound = None
    if hw is not None:
        try:
            bound, rep.roofline = _roofline_ms(float_model or model, args, fmt, hw, threads)
        except Exception as e:  # noqa: BLE001 - the hardware note is optional
            rep.notes.append(f"no roofline bound: {type(e).__name__}: {str(e)[:200]}")
    work = Path(tempfile.mkdtemp(prefix="slimkit-deploy-"))
    try:
        onnx_path = work / "model.onnx"
        say("exporting to ONNX")
        export_onnx(model, onnx_path, example_inputs=args)
        runners = rep.runners
        files: dict[str, list[Path]] = {}
        float_onnx = work / "float.onnx"
        for be in backends:
            res = BackendResult(be.name, be.package, "missing", version=be.version())
            rep.results.append(res)
            reason = be.missing()
            if reason is not None:
                res.reason = reason
                continue
            say(f"{be.name}: export and tune")
            bdir = work / be.name
            bdir.mkdir()
            import time

            t0 = time.perf_counter()
            # the runtime's own int8 quantizer, on the float model, checked against it
            fm = float_model if be.native_int8 and ref_float is not None else None
            native = fm is not None
            src, be_ref, be_db = onnx_path, ref, min_db
            if fm is not None and ref_float is not None:
                src, be_ref = float_onnx, ref_float
                be_db = rep.native_min_sqnr_db if rep.native_min_sqnr_db is not None else min_db
                res.quantizer = be.native_int8
            try:
                try:
                    if fm is not None and not float_onnx.is_file() and be.consumes != "torch":
                        export_onnx(fm, float_onnx, example_inputs=args)
                    if fm is not None and be.consumes == "torch":
                        fs = be.export_torch_int8(fm, args, calib, bdir)
                    elif fm is not None:
                        np_calib: list[Arrays] = [[t.detach().cpu().numpy() for t in b]
                                                  for b in calib]  # fmt: skip
                        fs = be.export_int8(float_onnx, inputs, np_calib, bdir)
                    elif be.consumes == "torch":
                        fs = be.export_torch(model, args, bdir)
                    else:
                        fs = be.export(onnx_path, inputs, bdir)
                except BackendFailed:
                    raise
                except Exception as e:  # noqa: BLE001 - any runtime error is reported by name
                    raise failure(be, "convert", e, src) from None
                try:
                    runner, settings, db, tried = _tune(be, fs, inputs, be_ref, threads, be_db,
                                                        max(10, runs // 3), tune)  # fmt: skip
                except Exception as e:  # noqa: BLE001
                    raise failure(be, "run", e, src) from None
                if all("error" in t for t in tried):
                    raise failure(be, "run", tried[0]["error"], src)
                detail = be.int8_detail(fs) if native else None
                if detail:
                    res.quantizer = f"{be.native_int8}: {detail}"
            except BackendFailed as e:
                res.status, res.reason, res.op = "failed", str(e), e.op
                continue
            res.seconds = time.perf_counter() - t0
            res.tuning, res.files = tried, [str(f.name) for f in fs]
            res.size_mb = sum(f.stat().st_size for f in fs if f.is_file()) / 1e6
            res.roofline_ms = bound
            if runner is None:
                res.status = "parity"
                res.sqnr_db = db
                res.reason = (f"output differs from PyTorch: SQNR {db:.1f} dB < {be_db:g} dB"
                              + (" (its own int8 against the float model)" if native else "")
                              if db is not None and db > -999 else
                              "output differs from PyTorch in shape or is not finite")  # fmt: skip
                continue
            res.status, res.settings, res.sqnr_db = "ok", settings, db
            if ref_float is not None:
                res.sqnr_float_db = _sqnr(ref_float, runner.run(inputs))
            runners[be.name], files[be.name] = runner, fs
        if runners:
            say(f"timing {', '.join(runners)} interleaved")
            stats = measure_latency({n: r.bind(inputs) for n, r in runners.items()}, runs=runs,
                                    warmup=5, rounds=rounds, max_seconds=max_seconds)  # fmt: skip
            for n, st in stats.items():
                r = rep.result(n)
                r.latency_ms, r.spread_ms = st.median_ms, list(st.spread_ms)
                r.quartile_ms = st.quartile_ms
            rep.chosen = min(stats, key=lambda n: stats[n].quartile_ms)
        if out is not None:
            _write(rep, Path(out), onnx_path, files.get(rep.chosen or "", []))
        return rep
    finally:
        shutil.rmtree(work, ignore_errors=True)
        model.train(was_training)


def _write(rep: DeployReport, out: Path, onnx_path: Path, chosen: list[Path]) -> None:
    """``out/model.onnx``, the chosen backend's files and ``out/deploy.json``, each atomic."""
    from slimkit.core.io import atomic_path, check_writable, write_json

    out.mkdir(parents=True, exist_ok=True)
    check_writable(out / "deploy.json", "deploy report")
    for f in dict.fromkeys([onnx_path, *chosen]):
        with atomic_path(out / f.name) as tmp:
            shutil.copyfile(f, tmp)
    rep.out = str(out)
    write_json(out / "deploy.json", rep.to_dict())


def check_backend_name(name: str, known: Sequence[str]) -> None:
    if name != "auto" and name not in known:
        from slimkit.core.registry import did_you_mean

        hint = did_you_mean(name, [*known, "auto"])
        names = ", ".join([*known, "auto"])
        raise ConfigError(f"unknown backend {name!r}",
                          fix=f"{hint + ' ' if hint else ''}use one of: {names}")  # fmt: skip


__all__ = ["BackendResult", "BackendUnavailable", "DeployReport", "deploy"]
