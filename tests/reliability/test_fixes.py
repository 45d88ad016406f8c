"""Every error's suggested fix names things that exist: the ``fix=`` text of every error raised
in ``src/slimkit`` is read from the source, and each CLI option, ``slimkit`` command, ``sk.*`` or
``slimkit.*`` name and ``Config(field=...)`` it mentions must be real. (Whether a fix then works
is what the bad-input table checks case by case; this catches a fix that cannot work at all.)"""

from __future__ import annotations

import ast
import importlib
import inspect
import re
from pathlib import Path
from typing import Any

import click
import pytest
import typer

import slimkit as sk
from slimkit.cli import app
from slimkit.core.registry import load_methods

SRC = Path(sk.__file__).parent


def _fixes() -> list[tuple[str, str]]:
    """``(where, text)`` of every ``fix=`` keyword in the package (string parts joined)."""
    out = []
    for f in sorted(SRC.rglob("*.py")):
        for node in ast.walk(ast.parse(f.read_text(encoding="utf-8"))):
            if isinstance(node, ast.keyword) and node.arg == "fix":
                text = "".join(
                    n.value
                    for n in ast.walk(node.value)
                    if isinstance(n, ast.Constant) and isinstance(n.value, str)
                )
                out.append((f"{f.relative_to(SRC)}:{node.lineno}", text))
    return out


FIXES = _fixes()


def _cli() -> tuple[set[str], set[str]]:
    """Every command path word and every option of the ``slimkit`` CLI."""
    commands: set[str] = set()
    options: set[str] = set()

    def walk(cmd: click.Command) -> None:
        for p in cmd.params:
            options.update(o for o in p.opts if o.startswith("--"))
            options.update(o for o in getattr(p, "secondary_opts", []) if o.startswith("--"))
        for name, sub in getattr(cmd, "commands", {}).items():
            commands.add(name)
            walk(sub)

    walk(typer.main.get_command(app))
    return commands, options


def _resolve(dotted: str) -> Any:
    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj: Any = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for attr in parts[i:]:
            obj = getattr(obj, attr)
        return obj
    raise ImportError(dotted)


def _configs() -> dict[str, set[str]]:
    """Config class name -> its fields, for every registered method and ``Scope``."""
    from slimkit.core.scope import Scope

    out = {e.meta["config"].__name__: set(e.meta["config"].model_fields) for e in
           load_methods().entries()}  # fmt: skip
    out["Scope"] = set(inspect.signature(Scope).parameters)
    return out


def test_fixes_were_found() -> None:
    assert len(FIXES) > 100


def _problems(text: str) -> list[str]:
    commands, options = _cli()
    configs = _configs()
    found = []
    for opt in re.findall(r"(?<![\w-])--[a-z][a-z0-9-]+", text):
        if opt not in options:
            found.append(f"CLI option {opt}, which no command has")
    for cmd in re.findall(r"`slimkit ([a-z][\w-]*)", text):
        if cmd not in commands:
            found.append(f"`slimkit {cmd}`, which is no command")
    for ref in re.findall(r"\b(?:sk|slimkit)\.[A-Za-z_][\w.]*\w", text):
        try:
            _resolve("slimkit" + ref[ref.index(".") :])
        except (ImportError, AttributeError):
            found.append(f"{ref}, which does not exist")
    for cls, field in re.findall(r"\b([A-Z]\w+)\((\w+)=", text):
        if cls in configs and field not in configs[cls]:
            found.append(f"{cls}({field}=...), which is no field of {cls}")
    return found


def test_the_audit_catches_a_fix_that_cannot_work() -> None:
    bad = ("pass --no-such-flag, run `slimkit frobnicate`, call sk.prune.nothing(...) or "
           "slimkit.quant.Nope, or set PTQ(colour=1)")  # fmt: skip
    assert len(_problems(bad)) == 5, _problems(bad)
    assert _problems("pass --out DIR, run `slimkit list`, sk.prune.Channel(ratio=0.5)") == []


@pytest.mark.parametrize(("where", "text"), FIXES, ids=[w for w, _ in FIXES])
def test_a_fix_names_only_what_exists(where: str, text: str) -> None:
    assert not _problems(text), f"{where}: the fix names {_problems(text)}"
