"""MkDocs hook: fill the pages' generated sections from the code, at build time.

A page asks for a section with an HTML comment on a line of its own; the hook replaces it with
markdown, so the CLI reference, the method list and the benchmark tables never go stale:

- ``<!-- slimkit:cli -->``: every command of the typer app, its usage, arguments and options.
- ``<!-- slimkit:methods -->``: the registered methods (``load_methods()``) and the built-in steps.
- ``<!-- slimkit:configs -->``: each method's config fields, types, defaults and comments.
- ``<!-- slimkit:bench -->``: one table per ``benchmarks/results/*.json`` (quick runs left out).

An unknown marker fails the build.
"""

from __future__ import annotations

import inspect
import json
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "benchmarks" / "results"
MARKER = re.compile(r"^<!-- slimkit:(?P<what>[\w-]+) -->$", flags=re.M)


def _cell(value: Any) -> str:
    """A value as one markdown table cell (pipes escaped, no line breaks, numbers shortened)."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        text = f"{value:.4g}"
    elif isinstance(value, int):
        text = f"{value:,}" if abs(value) >= 10_000 else str(value)
    else:
        text = str(value)
    text = " ".join(text.split())
    return text.replace("\\", "\\\\").replace("|", "\\|").replace("<", "&lt;").replace("*", "\\*")


def _table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def _text(help_text: str | None) -> str:
    """Help text as markdown paragraphs (typer help is plain text: keep it literal)."""
    if not help_text:
        return ""
    paras = [" ".join(p.split()) for p in help_text.strip().split("\n\n")]
    return "\n\n".join(p.replace("*", "\\*").replace("<", "&lt;") for p in paras)


# --- the CLI reference -------------------------------------------------------------------------


def _type_name(param: Any) -> str:
    annotation = getattr(getattr(param, "type_descriptor", None), "annotation", None)
    if annotation is None:
        return ""
    if getattr(param, "is_bool_flag", False):
        return "flag"
    name = getattr(annotation, "__name__", None) or str(annotation)
    return name.replace("typing.", "").replace("Optional[", "").rstrip("]") if "[" in name else name


def _param_row(param: Any) -> list[Any]:
    opts = ", ".join(f"`{o}`" for o in [*param.opts, *param.secondary_opts])
    if type(param).__name__.endswith("Argument"):
        opts = f"`{param.name.upper()}`"
    default = "required" if param.required else param.default
    if getattr(param, "is_bool_flag", False) and not param.required:
        off = param.secondary_opts[0] if param.secondary_opts else "off"
        default = param.opts[0] if param.default else off
    elif isinstance(default, str) and default != "required":
        default = repr(default)
    elif default is not None and not isinstance(default, str):
        default = str(default)  # exact, not shortened like a measured number
    return [opts, _type_name(param), default, getattr(param, "help", "") or ""]


def _commands(group: Any, prefix: str) -> Iterator[tuple[str, Any]]:
    for name, cmd in group.commands.items():
        if getattr(cmd, "hidden", False):
            continue
        if hasattr(cmd, "commands"):
            yield f"{prefix} {name}", cmd
            yield from _commands(cmd, f"{prefix} {name}")
        else:
            yield f"{prefix} {name}", cmd


def cli_reference() -> str:
    """Markdown for every command of ``slimkit`` (usage, help, a table of its parameters)."""
    import typer.main

    from slimkit.cli import app

    root = typer.main.get_command(app)
    out = [_text(root.help), "", "| command | what it does |", "|---|---|"]
    commands = list(_commands(root, "slimkit"))
    for path, cmd in commands:
        anchor = path.replace(" ", "-")
        out.append(f"| [`{path}`](#{anchor}) | {_cell((cmd.help or '').split(chr(10))[0])} |")
    for path, cmd in commands:
        anchor = path.replace(" ", "-")
        out += ["", f"## `{path}` {{#{anchor}}}", "", _text(cmd.help), ""]
        if hasattr(cmd, "commands"):
            out.append("Subcommands: " + ", ".join(f"`{path} {n}`" for n in cmd.commands))
            continue
        args = " ".join(
            p.name.upper() if p.required else f"[{p.name.upper()}]"
            for p in cmd.params
            if type(p).__name__.endswith("Argument")
        )
        out += ["```text", f"{path} [OPTIONS] {args}".rstrip(), "```", ""]
        rows = [_param_row(p) for p in cmd.params if not getattr(p, "hidden", False)]
        if rows:
            out.append(_table(["argument / option", "type", "default", "meaning"], rows))
    return "\n".join(out)


# --- methods and their configs -------------------------------------------------------------------


def _methods() -> Any:
    from slimkit.core.registry import load_methods

    return load_methods()


def method_list() -> str:
    """The registered methods (recipe step names) and the built-in steps, as one table."""
    from slimkit.pipeline.recipe import BUILTIN_STEPS

    rows = []
    for entry in _methods().entries():
        aliases = ", ".join(f"`{a}`" for a in entry.meta.get("aliases") or {})
        rows.append(
            [f"`{entry.name}`", entry.meta["summary"], aliases, entry.meta["config"].__name__]
        )
    for name, cls in BUILTIN_STEPS.items():
        doc = (cls.__doc__ or "").strip().split("\n")[0]
        rows.append([f"`{name}`", f"built-in step: {doc}", "", cls.__name__])
    return _table(["step name", "what it does", "short names (Python verbs)", "config"], rows)


def _field_comments(cls: type) -> dict[str, str]:
    """``field: type = default  # comment`` -> {field: comment}, from the class source."""
    comments: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not klass.__module__.startswith("slimkit"):
            continue
        try:
            source = inspect.getsource(klass)
        except (OSError, TypeError):
            continue
        for m in re.finditer(r"^    (\w+)\s*:[^#\n]*#\s*(.+)$", source, flags=re.M):
            comments[m.group(1)] = m.group(2).strip()
    return comments


def _annotation(annotation: Any) -> str:
    text = getattr(annotation, "__name__", None) if isinstance(annotation, type) else None
    text = text or str(annotation)
    return re.sub(r"\b(typing|collections\.abc|slimkit\.[\w.]+|pathlib)\.", "", text)


def _default(field: Any) -> Any:
    if field.is_required():
        return "required"
    if field.default_factory is not None:
        return repr(field.default_factory())
    return repr(field.default)


def config_tables() -> str:
    """One section per method: its config fields, types, defaults and the source comments."""
    from slimkit.pipeline.recipe import BUILTIN_STEPS

    sections = []
    configs = [(e.name, e.meta["config"]) for e in _methods().entries()]
    for name, cls in [*configs, *BUILTIN_STEPS.items()]:
        notes = _field_comments(cls)
        rows = [
            [f"`{field}`", _annotation(info.annotation), _default(info), notes.get(field, "")]
            for field, info in cls.model_fields.items()
        ]
        doc = _text((cls.__doc__ or "").strip().split("\n\n")[0])
        body = _table(["field", "type", "default", "note"], rows) if rows else "No fields."
        sections.append(f"### `{name}`\n\n`{cls.__name__}`: {doc}\n\n{body}")
    return "\n\n".join(sections)


# --- benchmark tables ----------------------------------------------------------------------------

TITLES = {
    "runtime": "PyTorch eager vs ONNX Runtime, fp32",
    "ptq": "int8 PTQ against ONNX Runtime's quantizer (and NNCF when installed)",
    "qat": "Quantization-aware training at low weight bits",
    "mixed": "Mixed precision under a size budget",
    "lowbit": "Low-bit weights (binary, ternary, pow2, k-means)",
    "llm_quant": "Weight-only int4 / int8 for language models",
    "prune": "Channel pruning",
    "distill": "Distillation",
    "lowrank": "Low-rank decomposition",
    "roofline": "Roofline predictions against measured latency",
    "coverage": "Models no one here wrote: export and PTQ",
    "reliability": "Reliability: bad input named before compute",
}
FIRST = ["model", "task", "case", "surface", "tool", "method", "label", "outcome", "batch"]
LEAVE_OUT = {"latency_q25_ms", "latency_q1_ms", "notes", "note", "error_type"}
MAX_COLUMNS = 12


def _flat(row: dict[str, Any]) -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in row.items():
        if key == "metric" and isinstance(value, dict):
            flat.update({f"metric.{k}": v for k, v in value.items()})
        elif key not in LEAVE_OUT and (value is None or isinstance(value, (str, int, float))):
            flat[key] = value
    return flat


def bench_table(path: Path) -> str:
    """A benchmark JSON as a section: how it was run, on what, and every row."""
    data = json.loads(path.read_text(encoding="utf-8"))
    rows = [_flat(r) for r in data.get("rows", [])]
    keys: list[str] = [k for k in FIRST if any(k in r for r in rows)]
    for r in rows:
        keys += [k for k in r if k not in keys]
    keys = keys[:MAX_COLUMNS]
    machine = data.get("machine", {})
    versions = data.get("versions", {})
    facts = [
        f"`python benchmarks/bench_{data.get('benchmark', path.stem)}.py`",
        f"{machine.get('cpu', '?')}, {machine.get('cores', '?')} cores",
        "flags " + ", ".join(machine.get("flags", [])) if machine.get("flags") else "",
        ", ".join(f"{k} {v}" for k, v in versions.items()),
        f"{data['seconds']:.0f} s" if isinstance(data.get("seconds"), (int, float)) else "",
    ]
    head = f"## {TITLES.get(path.stem, path.stem)} {{#{path.stem.replace('_', '-')}}}"
    lines = [head, "", "; ".join(f for f in facts if f) + f" (`{path.relative_to(ROOT)}`)", ""]
    if isinstance(data.get("summary"), dict):
        summary = {k: v for k, v in data["summary"].items() if not isinstance(v, (list, dict))}
        lines += ["Summary: " + "; ".join(f"{k} {_cell(v)}" for k, v in summary.items()), ""]
    lines.append(_table(keys, [[r.get(k) for k in keys] for r in rows]) if keys else "No rows.")
    return "\n".join(lines)


def bench_tables() -> str:
    paths = sorted(p for p in RESULTS.glob("*.json") if not p.stem.endswith("_quick"))
    return "\n\n".join(bench_table(p) for p in paths)


SECTIONS: dict[str, Callable[[], str]] = {
    "cli": cli_reference,
    "methods": method_list,
    "configs": config_tables,
    "bench": bench_tables,
}


def render(markdown: str) -> str:
    """``markdown`` with every ``<!-- slimkit:NAME -->`` line replaced by its section."""

    def fill(m: re.Match[str]) -> str:
        what = m.group("what")
        if what not in SECTIONS:
            raise ValueError(f"unknown docs marker {m.group(0)!r}; known: {', '.join(SECTIONS)}")
        return SECTIONS[what]()

    return MARKER.sub(fill, markdown)


def on_page_markdown(markdown: str, **_: Any) -> str:
    return render(markdown)


def on_page_content(html: str, **_: Any) -> str:
    """Docstrings introduce their examples reST-style (``text::``); markdown keeps the ``::``."""
    return html.replace("::</p>", ":</p>")
