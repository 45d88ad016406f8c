"""``slimkit list`` and ``slimkit zoo list|train``."""

from __future__ import annotations

from typing import Any

import typer

from slimkit.cli._ui import console, emit_json, friendly_errors, table

zoo_app = typer.Typer(
    help="The model zoo: tiny and reference models, bundled tasks, trained weights."
)


def _method_rows(pattern: str) -> list[dict[str, Any]]:
    """Every registered method: its name, the verb that runs it, its config class, the other
    names the verb accepts for it, and its summary."""
    from slimkit.core.registry import load_methods
    from slimkit.core.verbs import TECHNIQUES, names

    rows = []
    for e in load_methods().entries(pattern):
        technique = e.name.partition(".")[0]
        tech = TECHNIQUES.get(technique)
        others = names(technique) if tech else {}
        rows.append(
            {
                "name": e.name,
                "verb": f"sk.{tech.verb}" if tech else "",
                "config": e.meta["config"].__name__,
                "aliases": ", ".join(k for k, (x, _) in others.items() if x is e and k != e.name),
                "summary": e.meta.get("summary", ""),
            }
        )
    return rows


def _zoo_rows(pattern: str) -> dict[str, list[dict[str, Any]]]:
    from slimkit.zoo.models import MODELS, list_models
    from slimkit.zoo.pretrained import PRETRAINED, weights_path
    from slimkit.zoo.tasks import TASKS

    return {
        "methods": _method_rows(pattern),
        "pretrained": [
            {
                "name": e.name,
                "model": e.obj.model,
                "task": e.obj.task,
                "cached": weights_path(e.name).is_file(),
                "summary": e.obj.summary,
            }
            for e in PRETRAINED.entries(pattern)
        ],
        "models": [
            {
                "name": n,
                "kind": MODELS.entry(n).meta["kind"],
                "summary": MODELS.entry(n).meta.get("summary", ""),
            }
            for n in list_models(pattern)
        ],
        "tasks": [
            {"name": e.name, "summary": e.meta.get("summary", "")} for e in TASKS.entries(pattern)
        ],
    }


def _print(rows: dict[str, list[dict[str, Any]]], sections: list[str]) -> None:
    titles = {
        "methods": "compression methods",
        "pretrained": "trained zoo models (zoo:NAME)",
        "models": "zoo architectures (zoo:NAME, random weights)",
        "tasks": "bundled tasks (zoo:TASK[:split])",
    }
    for s in sections:
        items = rows[s]
        if not items:
            if s == "methods":
                console.print("[dim]no compression methods are registered yet[/]")
            continue
        cols = list(items[0])
        console.print(table(titles[s], cols, [[r[c] for c in cols] for r in items]))


@friendly_errors
def list_cmd(
    pattern: str = typer.Argument("*", help="shell-style wildcard, e.g. 'prune.*' or 'resnet*'"),
    json_out: bool = typer.Option(False, "--json", help="print JSON instead of tables"),
) -> None:
    """List every registered method, zoo model and bundled task."""
    rows = _zoo_rows(pattern)
    if json_out:
        emit_json(rows)
    else:
        _print(rows, ["methods", "pretrained", "models", "tasks"])


@zoo_app.command("list")
@friendly_errors
def zoo_list(
    pattern: str = typer.Argument("*", help="shell-style wildcard"),
    json_out: bool = typer.Option(False, "--json", help="print JSON instead of tables"),
) -> None:
    """List zoo models, trained weights (and whether they are cached) and tasks."""
    rows = _zoo_rows(pattern)
    rows.pop("methods")
    if json_out:
        emit_json(rows)
    else:
        _print(rows, ["pretrained", "models", "tasks"])


@zoo_app.command("train")
@friendly_errors
def zoo_train(
    name: str = typer.Argument(..., help="a trained zoo model, e.g. digits_cnn"),
    retrain: bool = typer.Option(False, help="train again even if cached"),
    json_out: bool = typer.Option(False, "--json", help="print JSON instead of a table"),
) -> None:
    """Train a zoo model once and cache its weights (later uses load them)."""
    from slimkit.zoo.pretrained import PRETRAINED, pretrained, pretrained_metrics

    recipe = PRETRAINED.get(name)
    pretrained(name, retrain=retrain, progress=not json_out)
    metrics = pretrained_metrics(name)
    if json_out:
        emit_json({"name": name, "model": recipe.model, "task": recipe.task, "metrics": metrics})
        return
    rows = [[k, v] for k, v in metrics.items() if isinstance(v, (int, float))]
    console.print(
        table(f"{name}: {recipe.model} on {recipe.task} (test split)", ["metric", "value"], rows)
    )
