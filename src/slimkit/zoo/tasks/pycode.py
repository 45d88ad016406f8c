"""``pycode_lm`` and ``pycode_cls``: tasks on the Python standard library's own ``.py`` source.

The text is read from ``sysconfig.get_paths()["stdlib"]`` (never downloaded), so it is identical on
every machine with the same Python version, and differs between versions (3.11 vs 3.12 ship
other files). Files that distributions add or patch (site.py, sysconfig.py, _sysconfigdata*, ...),
packages they split off (tkinter, idlelib, lib2to3, ...) and test suites are left out for that
reason. Paths are relative POSIX paths, files are ordered by a stable hash of their path, CRLF is
normalised to LF, and ``Task.meta["sha256"]`` fingerprints the exact bytes of each split.

- ``pycode_lm``: files are split by a stable hash of their relative path (85 / 5 / 10 % of files);
  samples are windows of ``SEQ_LEN + 1`` bytes: ``x = window[:-1]``, ``y = window[1:]`` (int64).
- ``pycode_cls``: 128-byte snippets labelled with the package they come from (8 packages); each
  package's files are split so that about 70 / 10 / 20 % of its bytes fall in train / val / test;
  snippets are evenly spaced over a package's text, the same number per class in every split, and
  a snippet found in an earlier split (a licence header) is dropped.
"""

from __future__ import annotations

import hashlib
import sys
import sysconfig
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import TensorDataset

from slimkit.errors import DataError
from slimkit.zoo.tasks import TASKS, Task

SEQ_LEN = 128
CORPUS_BYTES = 3_000_000  # cap on the language-model corpus
MAX_FILE_BYTES = 200_000  # longer files (generated tables, huge modules) are skipped
LM_EVAL_WINDOWS = {"val": 128, "test": 512}  # evenly spaced windows: evaluation stays quick
# packages (or top-level names) a distribution may split off, patch or generate per build
EXCLUDED_TOP = {
    "site-packages", "dist-packages", "idlelib", "tkinter", "turtledemo", "turtle.py", "lib2to3",
    "distutils", "ensurepip", "venv", "pydoc_data", "encodings", "__phello__", "site.py",
    "sysconfig.py", "sitecustomize.py", "_distutils_system_mod.py", "_aix_support.py",
}  # fmt: skip
EXCLUDED_DIRS = {"test", "tests", "idle_test", "__pycache__"}
PACKAGES = (
    "asyncio", "email", "http", "importlib", "multiprocessing", "unittest", "urllib", "xml",
)  # fmt: skip
CLS_FRACTIONS = {"test": 0.2, "val": 0.1, "train": 0.7}  # of each package's bytes
CLS_PER_CLASS = {"train": 3000, "val": 150, "test": 300}  # snippets of each package per split


def stdlib_root() -> Path:
    """The directory of the running Python's standard library."""
    return Path(sysconfig.get_paths()["stdlib"])


def _stable_hash(text: str) -> int:
    return int(hashlib.sha256(text.encode()).hexdigest()[:12], 16)


def _allowed(rel: str) -> bool:
    parts = rel.split("/")
    return (
        parts[0] not in EXCLUDED_TOP
        and not parts[0].startswith(("_sysconfigdata", "config-"))
        and not any(p in EXCLUDED_DIRS for p in parts[:-1])
    )


@lru_cache(maxsize=1)
def _source_files() -> tuple[tuple[str, bytes], ...]:
    """Every allowed ``.py`` file as (relative POSIX path, bytes), in stable-hash order."""
    root = stdlib_root()
    if not root.is_dir():
        raise DataError(
            f"the Python standard library was not found at {str(root)!r}",
            fix="run slimkit with a full CPython installation (its Lib/ source files are the data)",
        )
    files = []
    for path in root.rglob("*.py"):
        rel = path.relative_to(root).as_posix()
        if not _allowed(rel) or path.is_symlink():
            continue
        data = path.read_bytes().replace(b"\r\n", b"\n")
        if 0 < len(data) <= MAX_FILE_BYTES:
            files.append((rel, data))
    files.sort(key=lambda f: (_stable_hash(f[0]), f[0]))
    return tuple(files)


def lm_files() -> dict[str, list[str]]:
    """The files of each ``pycode_lm`` split (relative paths, sorted)."""
    out: dict[str, list[str]] = {"train": [], "val": [], "test": []}
    total = 0
    for rel, data in _source_files():
        if total >= CORPUS_BYTES:
            break
        total += len(data)
        bucket = _stable_hash("split:" + rel) % 20  # 2/20 test, 1/20 val, the rest train
        out["test" if bucket < 2 else "val" if bucket == 2 else "train"].append(rel)
    return {k: sorted(v) for k, v in out.items()}


def cls_files() -> dict[str, dict[str, list[str]]]:
    """``{package: {split: files}}`` of ``pycode_cls``: about 70 / 10 / 20 % of each package's
    bytes: largest file first, each goes to the split furthest below its share."""
    sizes = {rel: len(data) for rel, data in _source_files()}
    out: dict[str, dict[str, list[str]]] = {}
    for pkg in PACKAGES:
        files = [rel for rel in sizes if rel.startswith(pkg + "/")]  # already in hash order
        if len(files) < 3:
            raise DataError(
                f"standard-library package {pkg!r} has {len(files)} source files in "
                f"{str(stdlib_root())!r}; pycode_cls needs at least 3",
                fix="use a full CPython installation (3.10 or newer)",
            )
        total = sum(sizes[f] for f in files)
        split: dict[str, list[str]] = {"train": [], "val": [], "test": []}
        filled = dict.fromkeys(CLS_FRACTIONS, 0)
        for rel in sorted(files, key=lambda f: -sizes[f]):  # largest first, ties in hash order
            # the file goes to the split that is furthest (in bytes) below its share
            name = max(CLS_FRACTIONS, key=lambda s: CLS_FRACTIONS[s] * total - filled[s])
            filled[name] += sizes[rel]
            split[name].append(rel)
        for name in ("val", "test"):  # a split without files borrows train's smallest
            if not split[name]:
                split[name].append(split["train"].pop())
        out[pkg] = {k: sorted(v) for k, v in split.items()}
    return out


def _files_bytes(files: list[str]) -> dict[str, bytes]:
    wanted = set(files)
    return {rel: data for rel, data in _source_files() if rel in wanted}


def _fingerprint(blobs: list[bytes]) -> str:
    h = hashlib.sha256()
    for b in blobs:
        h.update(len(b).to_bytes(8, "little"))
        h.update(b)
    return h.hexdigest()


def _windows(text: np.ndarray, length: int, stride: int) -> np.ndarray:
    """All windows ``text[i : i + length]`` for ``i = 0, stride, ...``: (n, length)."""
    if len(text) < length:
        return np.empty((0, length), dtype=text.dtype)
    starts = np.arange(0, len(text) - length + 1, stride)
    return text[starts[:, None] + np.arange(length)[None, :]]


def _python() -> str:
    return f"{sys.version_info.major}.{sys.version_info.minor}.{sys.version_info.micro}"


@TASKS.register(
    "pycode_lm",
    kind="language_model",
    summary="byte-level language modelling on the Python standard library's source",
    depends_on_python=True,
)
def pycode_lm() -> Task:
    files = lm_files()
    parts: dict[str, TensorDataset] = {}
    sha: dict[str, str] = {}
    for split, names in files.items():
        blob = b"".join(_files_bytes(names).values())
        sha[split] = _fingerprint([blob])
        text = np.frombuffer(blob, dtype=np.uint8).astype(np.int64)
        if split == "train":
            win = _windows(text, SEQ_LEN + 1, SEQ_LEN)
        else:  # evenly spaced, possibly overlapping, windows over all the split's files
            starts = np.linspace(0, len(text) - SEQ_LEN - 1, LM_EVAL_WINDOWS[split]).astype(int)
            win = text[starts[:, None] + np.arange(SEQ_LEN + 1)[None, :]]
        w = torch.from_numpy(np.ascontiguousarray(win))
        parts[split] = TensorDataset(w[:, :-1].contiguous(), w[:, 1:].contiguous())
    return Task(
        name="pycode_lm",
        kind="language_model",
        train=parts["train"],
        val=parts["val"],
        test=parts["test"],
        num_classes=256,
        input_shape=(SEQ_LEN,),
        classes=None,
        meta={"python": _python(), "files": files, "sha256": sha},
    )


@TASKS.register(
    "pycode_cls",
    kind="classification",
    summary="which of 8 standard-library packages a 128-byte source snippet comes from",
    depends_on_python=True,
)
def pycode_cls() -> Task:
    files = cls_files()
    rng = np.random.default_rng(0)
    parts: dict[str, TensorDataset] = {}
    sha: dict[str, str] = {}
    seen: set[bytes] = set()  # snippets of earlier splits (licence headers recur across files)
    for split, want in CLS_PER_CLASS.items():
        per_class: list[np.ndarray] = []
        blobs: list[bytes] = []
        for pkg in PACKAGES:
            pkg_blobs = list(_files_bytes(files[pkg][split]).values())
            blobs += pkg_blobs
            # evenly spaced windows over the package's text: every file contributes, and small
            # packages get overlapping windows where large ones are sampled sparsely
            text = np.frombuffer(b"".join(pkg_blobs), dtype=np.uint8)
            starts = np.unique(np.linspace(0, len(text) - SEQ_LEN, int(want * 1.1)).astype(int))
            wins = text[starts[:, None] + np.arange(SEQ_LEN)[None, :]]
            per_class.append(wins[[row.tobytes() not in seen for row in wins]])
        sha[split] = _fingerprint(blobs)
        seen.update(row.tobytes() for w in per_class for row in w)
        n = min(want, *(len(w) for w in per_class))
        xs = [w[np.linspace(0, len(w) - 1, n).astype(int)] for w in per_class]
        x = np.concatenate(xs).astype(np.int64)
        y = np.repeat(np.arange(len(PACKAGES)), n)
        order = rng.permutation(len(y))
        parts[split] = TensorDataset(torch.from_numpy(x[order]), torch.from_numpy(y[order]))
    return Task(
        name="pycode_cls",
        kind="classification",
        train=parts["train"],
        val=parts["val"],
        test=parts["test"],
        num_classes=len(PACKAGES),
        input_shape=(SEQ_LEN,),
        classes=PACKAGES,
        meta={"python": _python(), "files": files, "sha256": sha},
    )
