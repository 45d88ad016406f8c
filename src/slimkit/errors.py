"""Every error slimkit raises on bad input: what was wrong, where, and what to do about it.

Each message ends with the fix, so a user never has to read slimkit's source to get unstuck::

    raise DataError("batch 3 of the calibration data contains NaN in input 'x'",
                    fix="clean or drop that batch before calibrating")
"""

from __future__ import annotations


class SlimkitError(Exception):
    """Base class: ``str(err)`` is ``"<problem>. Fix: <what to do>"``."""

    def __init__(self, problem: str, *, fix: str) -> None:
        self.problem = problem.rstrip(". ")
        self.fix = fix.rstrip()
        super().__init__(f"{self.problem}. Fix: {self.fix}")


class ConfigError(SlimkitError, ValueError):
    """A method config, recipe step or CLI option is invalid (unknown key, bad value)."""


class RegistryError(SlimkitError, KeyError):
    """A name (method, zoo model, task, preset) is not registered."""

    def __str__(self) -> str:  # KeyError would print the repr with quotes
        return str(self.args[0])


class ScopeError(SlimkitError, ValueError):
    """A Scope matched no module, or its pattern is not a valid regex."""


class DataError(SlimkitError, ValueError):
    """Input data is empty, has NaN/Inf, or has the wrong shape or type."""


class GraphCaptureError(SlimkitError, RuntimeError):
    """torch.fx / torch.export could not capture the model; names the module that broke it."""

    def __init__(self, problem: str, *, fix: str, module: str | None = None) -> None:
        self.module = module
        super().__init__(problem, fix=fix)


class CheckpointError(SlimkitError, OSError):
    """A weights file is missing, corrupted, or not plain weights (e.g. an arbitrary pickle)."""


class OutputError(SlimkitError, OSError):
    """An output path cannot be written (a directory where a file is meant, no permission)."""


class ExportError(SlimkitError, RuntimeError):
    """ONNX export failed, or the exported model does not match PyTorch."""


class UnsupportedError(SlimkitError, NotImplementedError):
    """A layer, model or option that the requested technique does not support."""


class ReferenceResolutionError(SlimkitError, ValueError):
    """A model / data / metric reference (``zoo:NAME``, ``pkg.mod:fn``, a file) did not resolve."""
