"""What every command shares: the console, tables, JSON output, progress, and error reporting."""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from functools import wraps
from typing import Any, TypeVar

import typer
from rich.console import Console
from rich.table import Table

from slimkit.errors import SlimkitError

console = Console(stderr=False, highlight=False)
err_console = Console(stderr=True, highlight=False, soft_wrap=True)  # errors stay greppable

F = TypeVar("F", bound=Callable[..., Any])


def fmt(value: Any, digits: int = 3) -> str:
    """Human formatting: 3 significant digits, thousands separators for big ints."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if math.isinf(value) or math.isnan(value):
            return str(value)
        if value != 0 and (abs(value) >= 1e5 or abs(value) < 1e-3):
            return f"{value:.{digits - 1}e}"
        return f"{value:.{digits}g}" if abs(value) < 10**digits else f"{value:,.0f}"
    return str(value)


def table(title: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> Table:
    """A rich table: numbers right-aligned, text left-aligned."""
    t = Table(title=title, title_justify="left", header_style="bold")
    for i, c in enumerate(columns):
        cells = [r[i] for r in rows if i < len(r) and r[i] is not None]
        numeric = i > 0 and all(isinstance(v, (int, float)) for v in cells)
        t.add_column(c, justify="right" if numeric else "left")
    for r in rows:
        t.add_row(*[fmt(v) for v in r])
    return t


def emit_json(obj: Any) -> None:
    """Machine-readable output on stdout (no colour, no progress)."""
    sys.stdout.write(json.dumps(obj, indent=2, default=str) + "\n")


@contextmanager
def status(message: str, enabled: bool = True) -> Iterator[None]:
    if not enabled:
        yield
        return
    with err_console.status(message):
        yield


@contextmanager
def stages(enabled: bool = True) -> Iterator[Callable[[str], None]]:
    """A spinner naming the pipeline's current stage (pass the callback as ``on_event``); stages
    that draw their own progress bar (``finetune``) run without it, so two never overlap."""
    current: Any = None

    def update(message: str) -> None:
        nonlocal current
        if current is not None:
            current.stop()
            current = None
        if enabled and not message.endswith(": finetune"):
            current = err_console.status(message)
            current.start()

    try:
        yield update
    finally:
        if current is not None:
            current.stop()


def friendly_errors(fn: F) -> F:
    """Turn a SlimkitError into a red message and exit code 2 instead of a traceback."""

    @wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except SlimkitError as e:
            err_console.print(f"[bold red]error:[/] {e.problem}")
            err_console.print(f"[bold]fix:[/] {e.fix}")
            raise typer.Exit(code=2) from None

    return wrapper  # type: ignore[return-value]
