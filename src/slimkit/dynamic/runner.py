"""Early exit on ONNX Runtime: each segment with its exit head is its own ONNX graph, run in
sequence until one is confident::

    runner = export_early_exit(ee, "out/ee", example_inputs=x[:1])   # segment_k.onnx, exits.json
    logits, exit_index = runner(x_numpy)          # only the samples still undecided run further
    runner = OrtEarlyExit.load("out/ee")          # later, without PyTorch models

Piece ``k`` < last maps the previous feature map to ``(features, logits, confidence)``; the last
piece maps it to the model's logits. The confidence is computed inside the graph, so the gating
costs one comparison per sample in Python. Files are written to a temporary directory and moved
into place, so a failed export leaves no half-written set.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from slimkit.dynamic.early_exit import EarlyExitModel, confidence
from slimkit.errors import ExportError

FORMAT = "slimkit.early_exit/1"


class _Piece(nn.Module):
    def __init__(self, segment: nn.Module, head: nn.Module | None, criterion: str) -> None:
        super().__init__()
        self.segment, self.head, self.criterion = segment, head, criterion

    def forward(self, h: torch.Tensor) -> Any:
        h = self.segment(h)
        if self.head is None:
            return h
        logits = self.head(h)
        return h, logits, confidence(logits, self.criterion)


def export_early_exit(
    ee: EarlyExitModel,
    directory: str | os.PathLike[str],
    *,
    example_inputs: torch.Tensor,
    atol: float = 1e-4,
    threads: int = 2,
) -> OrtEarlyExit:
    """Write ``segment_k.onnx`` for every piece and ``exits.json`` (thresholds, criterion) to
    ``directory``; each piece is checked against PyTorch in ORT (``atol``). Returns the runner."""
    from slimkit.export.onnx import export_onnx

    out = Path(directory)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".ee-", dir=out.parent))
    try:
        ee = ee.eval()
        h = example_inputs[:1]
        files = []
        for k, seg in enumerate(ee.segments):
            head = ee.heads[k] if k < len(ee.heads) else None
            piece = _Piece(seg, head, ee.criterion).eval()
            name = f"segment_{k}.onnx"
            names = ["features", "logits", "confidence"] if head is not None else ["logits"]
            export_onnx(piece, tmp / name, example_inputs=(h,), atol=atol, output_names=names)
            files.append(name)
            with torch.no_grad():
                h = seg(h)
        meta = {
            "format": FORMAT,
            "files": files,
            "thresholds": [float(t) for t in ee.thresholds],
            "criterion": ee.criterion,
            "exits_after": ee.cuts,
            "exit_macs": ee.exit_macs(),
            "full_macs": ee.full_macs,
        }
        (tmp / "exits.json").write_text(json.dumps(meta, indent=2))
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return OrtEarlyExit.load(out, threads=threads)


class OrtEarlyExit:
    """Runs exported early-exit pieces in ONNX Runtime, stopping per sample at the first exit
    whose confidence reaches its threshold."""

    def __init__(self, sessions: Sequence[Any], thresholds: Sequence[float]) -> None:
        if len(sessions) != len(thresholds) + 1:
            raise ExportError(
                f"{len(sessions)} ONNX pieces for {len(thresholds)} thresholds",
                fix="one piece per exit plus the final one: re-export with export_early_exit",
            )
        self.sessions = list(sessions)
        self.thresholds = np.asarray(thresholds, dtype=np.float32)
        self._inputs = [s.get_inputs()[0].name for s in self.sessions]

    @classmethod
    def load(cls, directory: str | os.PathLike[str], *, threads: int = 2) -> OrtEarlyExit:
        from slimkit.export.ort import ort_session

        d = Path(directory)
        meta_path = d / "exits.json"
        if not meta_path.is_file():
            raise ExportError(
                f"{d} has no exits.json", fix="pass a directory written by export_early_exit"
            )
        meta = json.loads(meta_path.read_text())
        if meta.get("format") != FORMAT:
            raise ExportError(
                f"{meta_path} is not an early-exit export ({meta.get('format')!r})",
                fix="re-export with slimkit.dynamic.export_early_exit",
            )
        sessions = [ort_session(d / f, threads=threads) for f in meta["files"]]
        return cls(sessions, meta["thresholds"])

    def __call__(self, x: Any) -> tuple[np.ndarray, np.ndarray]:
        """``(logits, exit index)`` for a batch ``x`` (numpy or tensor)."""
        h = np.ascontiguousarray(x.numpy() if isinstance(x, torch.Tensor) else x, np.float32)
        n_exits = len(self.thresholds)
        if h.shape[0] == 1:  # the common deployment case: no index bookkeeping
            for k in range(n_exits):
                h, logits, conf = self.sessions[k].run(None, {self._inputs[k]: h})
                if conf[0] >= self.thresholds[k]:
                    return logits, np.array([k])
            return self.sessions[-1].run(None, {self._inputs[-1]: h})[0], np.array([n_exits])
        out: np.ndarray | None = None
        taken = np.full(h.shape[0], n_exits)
        alive = np.arange(h.shape[0])
        for k in range(n_exits):
            h, logits, conf = self.sessions[k].run(None, {self._inputs[k]: h})
            if out is None:
                out = np.empty((x.shape[0], logits.shape[1]), np.float32)
            take = conf >= self.thresholds[k]
            out[alive[take]] = logits[take]
            taken[alive[take]] = k
            alive, h = alive[~take], np.ascontiguousarray(h[~take])
            if alive.size == 0:
                return out, taken
        final = self.sessions[-1].run(None, {self._inputs[-1]: h})[0]
        if out is None:
            return final, taken
        out[alive] = final
        return out, taken
