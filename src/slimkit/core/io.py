"""Files: atomic writes, safetensors weights with metadata, and pickle-free checkpoint loading.

Nothing slimkit writes is ever half-written: every file goes to a temporary sibling and is renamed
into place (``os.replace`` is atomic on POSIX and Windows). Weights are stored as safetensors; a
``.pt`` file is only ever read with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import IO, Any

import torch

from slimkit.errors import CheckpointError

PathLike = str | os.PathLike[str]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def check_writable(path: PathLike, what: str = "output file") -> Path:
    """``path`` as a Path, after checking that a file can be written there (its folder created):
    called before the compute, so a bad ``--out`` fails in a second, not after minutes."""
    from slimkit.errors import OutputError

    dest = Path(path)
    if dest.is_dir():
        raise OutputError(
            f"the {what} {str(dest)!r} is an existing directory",
            fix=f"name a file inside it, e.g. {str(dest / ('model' + (dest.suffix or '.onnx')))!r}",
        )
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(
            f"cannot create the folder of the {what} {str(dest)!r} ({e.strerror or e})",
            fix="choose a path in a folder you can write to",
        ) from None
    if not os.access(dest.parent, os.W_OK | os.X_OK):
        raise OutputError(
            f"cannot write the {what} {str(dest)!r}: its folder is not writable",
            fix="choose a path in a folder you can write to, or fix its permissions",
        )
    return dest


@contextlib.contextmanager
def atomic_path(path: PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``, renamed to ``path`` only if the block succeeds."""
    dest = check_writable(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp makes 0600; give the usual file mode
        os.replace(tmp_path, dest)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


@contextlib.contextmanager
def atomic_write(
    path: PathLike, mode: str = "w", encoding: str | None = "utf-8"
) -> Iterator[IO[Any]]:
    """``open()`` for writing, but the file appears at ``path`` only once it is complete."""
    with atomic_path(path) as tmp:
        enc = None if "b" in mode else encoding
        with open(tmp, mode, encoding=enc) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())


def write_json(path: PathLike, obj: Any) -> None:
    with atomic_write(path) as f:
        json.dump(obj, f, indent=2, sort_keys=False, default=str)
        f.write("\n")


def read_record(path: PathLike, fmt: int, bad: Exception) -> dict[str, Any]:
    """The JSON object in ``path`` whose ``format`` is ``fmt`` (an artifact's record file);
    raises ``bad`` when the file is missing, not JSON, not an object or of another format."""
    try:
        record = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        raise bad from None
    if not isinstance(record, dict) or record.get("format") != fmt:
        raise bad
    return record


def _require_file(path: PathLike, what: str) -> Path:
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(
            f"{what} {str(p)!r} does not exist" + (" (it is a directory)" if p.is_dir() else ""),
            fix="check the path; artifacts store weights as model.safetensors inside their folder",
        )
    return p


def save_weights(
    state: Mapping[str, torch.Tensor] | torch.nn.Module,
    path: PathLike,
    metadata: Mapping[str, str] | None = None,
) -> Path:
    """Save a state dict (or a module's) as safetensors, atomically. Shared tensors are copied."""
    from safetensors.torch import save_file

    sd = state.state_dict() if isinstance(state, torch.nn.Module) else state
    # safetensors refuses tensors that share storage (tied weights, views): store each one dense.
    tensors = {
        k: v.detach().contiguous().clone() for k, v in sd.items() if isinstance(v, torch.Tensor)
    }
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=dict(metadata or {}))
    return Path(path)


def load_weights(path: PathLike, device: str = "cpu") -> dict[str, torch.Tensor]:
    """Load a safetensors file, or a ``.pt``/``.pth`` file that holds nothing but tensors."""
    p = _require_file(path, "weights file")
    if p.suffix in (".pt", ".pth", ".bin", ".ckpt"):
        obj = safe_torch_load(p, device=device)
        if isinstance(obj, torch.nn.Module):  # pragma: no cover - weights_only refuses modules
            obj = obj.state_dict()
        if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
            obj = obj["state_dict"]
        plain = isinstance(obj, Mapping) and all(isinstance(v, torch.Tensor) for v in obj.values())
        if not plain:
            raise CheckpointError(
                f"{str(p)!r} loads, but is not a state dict of tensors (got {type(obj).__name__})",
                fix="save it with torch.save(model.state_dict(), path) or as safetensors",
            )
        return dict(obj)
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(p), device=device)
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(
            f"{str(p)!r} is not a readable safetensors file ({e})",
            fix="the file is corrupted or truncated: re-create it (slimkit writes atomically, so "
            "this usually means it was copied partially or is another format)",
        ) from None


def read_metadata(path: PathLike) -> dict[str, str]:
    """The string metadata stored in a safetensors header."""
    from safetensors import SafetensorError, safe_open

    p = _require_file(path, "weights file")
    try:
        with safe_open(str(p), framework="pt") as f:
            return dict(f.metadata() or {})
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(
            f"{str(p)!r} is not a readable safetensors file ({e})",
            fix="re-create the file; it is corrupted or not safetensors",
        ) from None


def safe_torch_load(path: PathLike, device: str = "cpu") -> Any:
    """``torch.load(weights_only=True)`` with errors that say what went wrong and what to do."""
    import pickle

    p = _require_file(path, "checkpoint")
    try:
        return torch.load(p, map_location=device, weights_only=True)
    except pickle.UnpicklingError as e:
        text = str(e)
        if "GLOBAL" in text:  # the file names a class or function to run: refuse it
            culprit = next(ln for ln in text.splitlines() if "GLOBAL" in ln).strip()
            raise CheckpointError(
                f"{str(p)!r} is a pickle that holds more than plain weights, and slimkit does not "
                f"execute pickled code ({culprit})",
                fix="if you trust the file, load it yourself and re-save it with "
                "torch.save(model.state_dict(), path) or slimkit.core.io.save_weights",
            ) from None
        raise CheckpointError(
            f"{str(p)!r} is not a readable PyTorch checkpoint (the pickle stream is invalid)",
            fix="the file is corrupted, truncated or another format: re-create it",
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise CheckpointError(
            f"{str(p)!r} is not a readable PyTorch checkpoint ({str(e).splitlines()[0]})",
            fix="the file is corrupted or truncated: re-create it",
        ) from None


def load_into(
    model: torch.nn.Module, state: Mapping[str, torch.Tensor], *, strict: bool = True
) -> None:
    """``load_state_dict`` with an error listing missing / unexpected / mis-shaped keys."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in own
        if k in state and tuple(state[k].shape) != tuple(own[k].shape)
    ]
    if shapes or (strict and (missing or unexpected)):
        parts = []
        if missing:
            parts.append(f"missing {missing[:5]}{' ...' if len(missing) > 5 else ''}")
        if unexpected:
            parts.append(f"unexpected {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}")
        if shapes:
            parts.append(f"shape mismatch {shapes[:5]}")
        raise CheckpointError(
            "weights do not fit the model: " + "; ".join(parts),
            fix="load them into the architecture they were saved from (for a compressed model use "
            "slimkit.load(artifact_dir, model=original), which replays its structural changes)",
        )
    model.load_state_dict(dict(state), strict=strict)


@contextlib.contextmanager
def _tensors_only() -> Iterator[None]:
    """While a ``.pt2`` archive loads: every ``torch.load`` inside torch's loader is
    ``weights_only=True`` (torch falls back to ``weights_only=False`` for sample inputs and
    pickled constants), and plain-pickle / TorchScript-object payloads are refused. The patch is
    process-wide for the duration of the load."""
    import pickle
    import types

    import torch.export.pt2_archive._package as package

    real_load, real_obj, real_pickle = torch.load, torch._C._pickle_load_obj, package.pickle

    def load(f: Any, *args: Any, **kwargs: Any) -> Any:
        kwargs["weights_only"] = True
        return real_load(f, *args, **kwargs)

    def refuse(*_a: Any, **_k: Any) -> Any:
        raise pickle.UnpicklingError("GLOBAL: a pickled Python object, not a tensor")

    torch.load = load  # type: ignore[assignment]
    torch._C._pickle_load_obj = refuse
    package.pickle = types.SimpleNamespace(loads=refuse)  # type: ignore[assignment]
    try:
        yield
    finally:
        torch.load = real_load
        torch._C._pickle_load_obj = real_obj
        package.pickle = real_pickle  # type: ignore[assignment]


def load_program(path: PathLike) -> Any:
    """A ``torch.export`` program saved with ``torch.export.save``, loaded without running any
    pickled code: weights, constants and sample inputs must be plain tensors (what
    ``torch.export.save`` writes for ordinary models); anything else is refused by name."""
    import pickle
    import zipfile

    p = _require_file(path, "torch.export program")
    if not zipfile.is_zipfile(p):
        raise CheckpointError(
            f"{str(p)!r} is not a torch.export archive (not a zip file)",
            fix="save the program with torch.export.save(torch.export.export(model, args), path)",
        )
    try:
        with _tensors_only():
            return torch.export.load(str(p))
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"{str(p)!r} holds pickled Python objects besides tensors, and slimkit does not "
            f"execute pickled code ({str(e).splitlines()[0][:160]})",
            fix="if you trust the file, load it yourself and save the program again from plain "
            "tensor inputs, or pass the model as package.module:factory with safetensors weights",
        ) from None
    except Exception as e:  # torch raises many types for a damaged archive
        raise CheckpointError(
            f"{str(p)!r} is not a readable torch.export program ({type(e).__name__}: "
            f"{str(e).strip().splitlines()[0][:160] if str(e).strip() else ''})",
            fix="re-create it with torch.export.save; the file is damaged or from another tool",
        ) from None
