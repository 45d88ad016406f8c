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

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import fx, nn

from slimkit.dynamic.early_exit import EarlyExitModel, confidence
from slimkit.dynamic.skip import GatedBlock, SkipGateModel
from slimkit.errors import ExportError

FORMAT = "slimkit.early_exit/1"


@contextlib.contextmanager
def _atomic_dir(directory: str | os.PathLike[str]) -> Iterator[Path]:
    """A temporary directory beside ``directory`` that replaces it when the block succeeds."""
    out = Path(directory)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".dyn-", dir=out.parent))
    try:
        yield tmp
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _read_meta(directory: str | os.PathLike[str], name: str, fmt: str, writer: str) -> Any:
    path = Path(directory) / name
    if not path.is_file():
        raise ExportError(f"{directory} has no {name}", fix=f"pass a directory written by {writer}")
    meta = json.loads(path.read_text())
    if meta.get("format") != fmt:
        raise ExportError(
            f"{path} is not a {fmt} export ({meta.get('format')!r})",
            fix=f"re-export with slimkit.dynamic.{writer}",
        )
    return meta


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

    with _atomic_dir(directory) as tmp:
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
    return OrtEarlyExit.load(directory, threads=threads)


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
        meta = _read_meta(d, "exits.json", FORMAT, "export_early_exit")
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


# --- learned block skipping ---------------------------------------------------------------------

SKIP_FORMAT = "slimkit.skip_gates/1"


class _WithGates(nn.Module):
    """``body``'s output and the open-probabilities of the gated blocks that follow it (each
    computed on that output: the input those blocks see while the ones before them are
    skipped)."""

    def __init__(self, body: nn.Module, gated: list[GatedBlock]) -> None:
        super().__init__()
        self.body = body
        self.gates = nn.ModuleList([g.gate for g in gated])
        self.scales = [g.SCALE for g in gated]

    def forward(self, x: torch.Tensor) -> Any:
        h = self.body(x)
        if not len(self.gates):
            return h
        probs = [
            torch.sigmoid(s * g(h)).flatten() for g, s in zip(self.gates, self.scales, strict=True)
        ]
        return (h, *probs)


class _GateTracer(fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, GatedBlock) or super().is_leaf_module(m, qualname)


def _skip_pieces(sg: SkipGateModel) -> list[tuple[str, nn.Module]]:
    """The model as a chain of ``("plain", module)`` and ``("gated", GatedBlock)`` pieces."""
    from torch.fx.passes.split_module import split_module

    root = sg.model
    gm = fx.GraphModule(root, _GateTracer().trace(root))
    part: dict[str, int] = {}
    gated: dict[str, str] = {}  # submodule name -> gated block
    pid = 0
    for n in gm.graph.nodes:
        if n.op == "call_module" and str(n.target) in sg.gated:
            part[n.name] = pid = pid + 1
            gated[f"submod_{pid}"] = str(n.target)
            pid += 1
        else:
            part[n.name] = pid
    whole = split_module(gm, root, lambda n: part[n.name], keep_original_order=True)
    calls = [n for n in whole.graph.nodes if n.op == "call_module"]
    prev = next(n for n in whole.graph.nodes if n.op == "placeholder")
    pieces: list[tuple[str, nn.Module]] = []
    for c in calls:
        if list(c.args) != [prev] or c.kwargs:
            raise ExportError(
                f"piece {c.target} of {type(root).__name__} does not take just the previous "
                "piece's output: a gated block is not on the model's main path",
                fix="gate only blocks the whole input passes through (SkipGates(blocks=[...]))",
            )
        if str(c.target) in gated:
            pieces.append(("gated", root.get_submodule(gated[str(c.target)])))
        else:
            pieces.append(("plain", getattr(whole, str(c.target))))
        prev = c
    return pieces


def export_skip_gates(
    sg: SkipGateModel,
    directory: str | os.PathLike[str],
    *,
    example_inputs: torch.Tensor,
    atol: float = 1e-4,
    threads: int = 2,
) -> OrtSkipGates:
    """Write the model as ONNX pieces (plain segments and gated blocks, each also computing the
    gates of the gated blocks right after it) and ``gates.json`` to ``directory``, each piece
    checked in ORT; returns the runner. A closed block costs no ONNX call at all."""
    from slimkit.export.onnx import export_onnx

    with _atomic_dir(directory) as tmp:
        sg = sg.eval()
        pieces = _skip_pieces(sg)
        if pieces and pieces[0][0] == "gated":  # the first gate needs a piece before it
            pieces.insert(0, ("plain", nn.Identity()))
        h = example_inputs[:1]
        meta: list[dict[str, Any]] = []
        for k, (kind, m) in enumerate(pieces):
            follow = []
            for j in range(k + 1, len(pieces)):
                if pieces[j][0] != "gated":
                    break
                follow.append(j)
            body = m.block if isinstance(m, GatedBlock) else m
            gates = [g for j in follow if isinstance(g := pieces[j][1], GatedBlock)]
            name = f"piece_{k}.onnx"
            outs = ["features", *(f"gate_{j}" for j in follow)]
            export_onnx(_WithGates(body, gates), tmp / name, example_inputs=(h,), atol=atol,
                        output_names=outs)  # fmt: skip
            entry: dict[str, Any] = {"kind": kind, "file": name, "gates_for": follow}
            if isinstance(m, GatedBlock):
                entry["threshold"] = m.threshold
            meta.append(entry)
            with torch.no_grad():
                h = body(h)
        doc = {"format": SKIP_FORMAT, "pieces": meta, "blocks": sg.gated}
        (tmp / "gates.json").write_text(json.dumps(doc, indent=2))
    return OrtSkipGates.load(directory, threads=threads)


class OrtSkipGates:
    """Runs exported skip-gate pieces in ONNX Runtime: a gated block runs only for the samples
    whose gate (computed by the piece before it) reaches its threshold."""

    def __init__(self, pieces: list[dict[str, Any]]) -> None:
        self.pieces = pieces

    @classmethod
    def load(cls, directory: str | os.PathLike[str], *, threads: int = 2) -> OrtSkipGates:
        from slimkit.export.ort import ort_session

        d = Path(directory)
        doc = _read_meta(d, "gates.json", SKIP_FORMAT, "export_skip_gates")
        pieces = []
        for p in doc["pieces"]:
            sess = ort_session(d / p["file"], threads=threads)
            pieces.append({**p, "session": sess, "input": sess.get_inputs()[0].name})
        return cls(pieces)

    def __call__(self, x: Any) -> tuple[np.ndarray, np.ndarray]:
        """``(logits, runs)``: ``runs[i, j]`` whether sample ``i`` ran gated block ``j``."""
        h = np.ascontiguousarray(x.numpy() if isinstance(x, torch.Tensor) else x, np.float32)
        pending: dict[int, np.ndarray] = {}  # piece index -> open-probability per sample
        runs = []
        for k, p in enumerate(self.pieces):
            if p["kind"] == "gated":
                run = pending.pop(k) >= p["threshold"]
                runs.append(run)
                if not run.any():
                    continue
                if not run.all():
                    outs = p["session"].run(None, {p["input"]: np.ascontiguousarray(h[run])})
                    h = h.copy()
                    h[run] = outs[0]
                    for j, o in zip(p["gates_for"], outs[1:], strict=True):
                        pending[j][run] = o
                    continue
            outs = p["session"].run(None, {p["input"]: h})
            h = outs[0]
            for j, o in zip(p["gates_for"], outs[1:], strict=True):
                pending[j] = o
        return h, np.stack(runs, 1) if runs else np.zeros((h.shape[0], 0), bool)
